"""The driver: validate, connect to Ray, start the workers, supervise them, gather results.

Everything that can be checked is checked before any worker starts: the worker count, the
mode and its options, that the loop and its config pickle, the storage path, the coordinator
and the job name, and that the cluster has the CPUs and GPUs asked for.

With a step log (the default), ``fit`` creates the job directory, starts the embedded
coordinator (or checks the external one), records the job in the step log and hands the run
to :class:`synctrain.driver.shell.JobShell`, which survives worker, shard and coordinator-node
failures per :mod:`synctrain.driver.policy`; the result then comes from the committed log.
With ``step_log=False`` it runs as before the step log existed: one actor per rank, and the
first rank that fails (its loop raised, or its process died) stops the whole job at once and
``fit`` raises an error naming that rank. It never waits on a dead worker.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayError

from synctrain.driver import jobdir as _jobdir
from synctrain.errors import (
    ConfigError,
    ResourcesError,
    TrainingFailedError,
    WorkerDiedError,
)
from synctrain.spec import JobSpec
from synctrain.strategies.base import get_strategy_class, registered_modes
from synctrain.worker import TrainWorker
from synctrain.worker.step import DEFAULT_MAX_UNCOMMITTED_STEPS

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.2
ROOT_CAUSE_GRACE_S = 2.0  # after a failure, how long to wait for the other ranks' outcomes


@dataclass
class Result:
    """What ``Trainer.fit`` returns."""

    outputs: list[Any]  # each rank's return value, by rank
    metrics: list[dict[str, Any]]  # rank 0's reports, in order, each with "step"
    worker_metrics: list[dict[str, Any]] = field(default_factory=list)  # strategy counters, by rank
    strategy_info: dict[str, Any] = field(default_factory=dict)  # driver-side strategy results
    elapsed_s: float = 0.0
    # From the committed step log (empty with step_log=False):
    job_name: str | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)  # one per optimizer step
    generations: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    redone_steps: int = 0  # committed steps that a recovery rolled back and trained again
    checkpoint: str | None = None  # path of the last committed checkpoint
    fenced: list[dict[str, Any]] = field(default_factory=list)  # refused writes of replaced workers


class Trainer:
    """Run ``train_loop(config)`` on ``num_workers`` Ray workers in the given mode.

    ``mode="sync"``: synchronous all-reduce (options ``grad_accum_steps``, ``shard_optimizer``,
    ``grad_compression``). ``mode="async"``: parameter server (options ``staleness``,
    ``num_ps_shards``). ``use_gpu``: True, False or "auto" (GPUs when the cluster has one per
    worker). ``ray_address``: connect there (else ``RAY_ADDRESS``, else start a local Ray).
    ``min_workers``, ``keep_global_batch``, ``placement_timeout_s``: a job that cannot replace a
    dead worker goes on with fewer, and grows back (docs/fault-tolerance.md, "Elastic membership").
    """

    def __init__(
        self,
        train_loop: Callable[..., Any],
        *,
        num_workers: int = 2,
        mode: str = "sync",
        use_gpu: bool | str = "auto",
        config: dict[str, Any] | None = None,
        resources_per_worker: dict[str, float] | None = None,
        ray_address: str | None = None,
        seed: int = 0,
        progress: bool = True,
        collective_timeout_s: float = 300.0,
        strategy_options: dict[str, Any] | None = None,
        job_name: str | None = None,
        storage_path: str | os.PathLike[str] | None = None,
        checkpoint_every: int = 100,
        checkpoint_every_s: float | None = None,
        digest_every: int | None = None,
        max_failures: int = 3,
        spare_workers: int = 0,
        min_workers: int | None = None,
        keep_global_batch: bool = False,
        placement_timeout_s: float = 120.0,
        stall_timeout_s: float = 60.0,
        max_uncommitted_steps: int = DEFAULT_MAX_UNCOMMITTED_STEPS,
        recovery: str = "auto",
        step_log: bool = True,
        coordinator: str | None = None,
        coordinator_token: str | bytes | None = None,
        _fault_hooks: dict[str, Any] | None = None,
        **mode_options: Any,
    ) -> None:
        if not callable(train_loop):
            raise ConfigError(f"train_loop must be a function, got {type(train_loop).__name__}")
        if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
            raise ConfigError(f"num_workers must be an integer >= 1, got {num_workers!r}")
        if use_gpu not in (True, False, "auto"):
            raise ConfigError(f"use_gpu must be True, False or 'auto', got {use_gpu!r}")
        if mode not in registered_modes():
            raise ConfigError(f"unknown mode {mode!r}: choose one of {', '.join(registered_modes())}")
        self.train_loop = train_loop
        self.num_workers = num_workers
        self.mode = mode
        self.use_gpu = use_gpu
        self.config = dict(config or {})
        self.ray_address = ray_address
        self.seed = int(seed)
        self.progress = progress
        self.collective_timeout_s = float(collective_timeout_s)
        self.resources = self._check_resources_arg(resources_per_worker)
        options = {**(strategy_options or {}), **mode_options}
        try:
            self.strategy_options = get_strategy_class(mode).validate_options(options, num_workers)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        # Pickled here, loaded inside the worker's own error handling: a loop whose module the
        # workers cannot import then fails as a TrainingFailedError that says so, instead of
        # Ray failing the call before the worker runs (which looks like a dead worker).
        self._config_blob = _pickled("config", self.config)
        self._loop_blob = _pickled("train_loop", train_loop)
        self._check_fault_options(checkpoint_every, checkpoint_every_s, max_failures, stall_timeout_s,
                                  max_uncommitted_steps, recovery, step_log, digest_every=digest_every)
        self.step_log = step_log
        self.checkpoint_every = checkpoint_every
        self.checkpoint_every_s = checkpoint_every_s
        # every this many steps (default: at every checkpoint step; 0: never) sync ranks' parameters
        # are digested and compared, async workers check what they pulled against the shards'
        # digests of what they served -- docs/fault-tolerance.md, "Digests"
        self.digest_every: int = checkpoint_every if digest_every is None else digest_every
        self.max_failures = max_failures
        if not isinstance(spare_workers, int) or isinstance(spare_workers, bool) or spare_workers < 0:
            raise ConfigError(f"spare_workers must be an integer >= 0, got {spare_workers!r}")
        if spare_workers and not step_log:
            raise ConfigError("spare_workers replace dead workers, which needs the step log: drop "
                              "step_log=False, or spare_workers")
        self.spare_workers = spare_workers
        self.min_workers, self.keep_global_batch, self.placement_timeout_s = _elastic_options(
            min_workers, keep_global_batch, placement_timeout_s, num_workers, step_log)
        self.stall_timeout_s = float(stall_timeout_s)
        self.max_uncommitted_steps = max_uncommitted_steps
        self.recovery = recovery
        self.fault_hooks = dict(_fault_hooks or {})
        if job_name is None and os.environ.get("SYNCTRAIN_JOB_NAME"):
            job_name = os.environ["SYNCTRAIN_JOB_NAME"]  # set by `synctrain resume JOB`
        self.job_name = _jobdir.check_name(job_name) if job_name is not None else \
            _jobdir.default_job_name(getattr(train_loop, "__name__", "job"))
        self.storage_path = storage_path if storage_path is not None else _jobdir.default_storage()
        self.coordinator = coordinator
        self._coordinator_token = _token(coordinator, coordinator_token)
        if step_log:
            self._storage = _jobdir.check_storage(self.storage_path)
            # a finished or running job of this name: JobExistsError now; an unfinished one
            # (its driver died, it failed, Ctrl-C) is resumed by fit()
            self._resuming = _jobdir.JobDir(self._storage, self.job_name).check_reusable()

    def __repr__(self) -> str:  # no token, no endpoints
        return (f"Trainer(mode={self.mode!r}, num_workers={self.num_workers}, "
                f"job_name={self.job_name!r}, step_log={self.step_log})")

    @staticmethod
    def _check_fault_options(every: Any, every_s: Any, max_failures: Any, stall_s: Any, k: Any,
                             recovery: Any, step_log: Any, digest_every: Any = None) -> None:
        def whole(name: str, value: Any, lo: int) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < lo:
                raise ConfigError(f"{name} must be an integer >= {lo}, got {value!r}")

        whole("checkpoint_every", every, 0)
        whole("max_failures", max_failures, 0)
        whole("max_uncommitted_steps", k, 0)
        if digest_every is not None:
            whole("digest_every (None: at every checkpoint step; 0: off)", digest_every, 0)
            if digest_every and step_log is False:
                raise ConfigError("digest_every: the ranks' digests are compared in the step log, "
                                  "which step_log=False turns off; drop one of the two")
        if every_s is not None and not (isinstance(every_s, (int, float)) and every_s > 0):
            raise ConfigError(f"checkpoint_every_s must be None or a number of seconds > 0, got {every_s!r}")
        if not (isinstance(stall_s, (int, float)) and stall_s > 0):
            raise ConfigError(f"stall_timeout_s must be a number of seconds > 0, got {stall_s!r}")
        if recovery not in ("auto", "checkpoint"):
            raise ConfigError(f"recovery must be 'auto' or 'checkpoint', got {recovery!r}")
        if not isinstance(step_log, bool):
            raise ConfigError(f"step_log must be True or False, got {step_log!r}")

    @staticmethod
    def _check_resources_arg(resources: dict[str, float] | None) -> dict[str, float]:
        resources = dict(resources or {})
        for key, value in resources.items():
            if not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"resources_per_worker[{key!r}] must be a number >= 0, got {value!r}")
        resources.setdefault("CPU", 1.0)
        return resources

    # ---- fit ---------------------------------------------------------------------------
    def fit(self) -> Result:
        if self.step_log:
            from synctrain.driver.run import fit_with_step_log

            return fit_with_step_log(self)
        return self._fit_plain()

    def _actor_class(self, spec: JobSpec) -> Any:
        custom = {k: v for k, v in self.resources.items() if k not in ("CPU", "GPU")}
        return ray.remote(TrainWorker).options(
            num_cpus=spec.cpus_per_worker, num_gpus=spec.gpus_per_worker,
            resources=custom or None, max_concurrency=3, max_restarts=0)  # see worker/actor.py

    def _fit_plain(self) -> Result:
        started = time.monotonic()
        self._connect_ray()
        spec = self._make_spec()
        strategy_cls = get_strategy_class(spec.mode)
        handles = strategy_cls.on_driver_start(spec)
        workers: list[Any] = []
        ok = False
        try:
            workers = self._start_workers(spec)
            if spec.mode == "sync":  # the process group's store, held by rank 0 (async has none)
                handles = {**handles, "rendezvous": ray.get(workers[0].rendezvous_address.remote())}
            result = self._run(workers, handles)
            ok = True
        finally:
            for w in workers:
                ray.kill(w, no_restart=True)
            info = strategy_cls.on_driver_finish(spec, handles, ok)
        result.strategy_info = info
        result.elapsed_s = time.monotonic() - started
        return result

    def _connect_ray(self) -> None:
        """Join ``ray_address``/``RAY_ADDRESS``/a running ``ray start`` cluster, or start a local
        Ray; an address that does not answer is a ConfigError at once (see raycluster.py)."""
        from synctrain import raycluster

        raycluster.connect(self.ray_address, self.num_workers, self.resources["CPU"], logging.WARNING)

    def _make_spec(self) -> JobSpec:
        cluster = ray.cluster_resources()
        gpus_have = cluster.get("GPU", 0.0)
        gpus_each = self.resources.get("GPU", 1.0)
        if self.use_gpu == "auto":
            use_gpu = gpus_have >= self.num_workers * gpus_each > 0
        else:
            use_gpu = bool(self.use_gpu)
        gpus_each = gpus_each if use_gpu else 0.0
        if use_gpu and gpus_have < self.num_workers * gpus_each:
            raise ResourcesError(
                f"use_gpu=True asks for {self.num_workers * gpus_each:g} GPUs ({self.num_workers} workers x "
                f"{gpus_each:g}) but the Ray cluster has {gpus_have:g}; use fewer workers, "
                "use_gpu='auto' or use_gpu=False"
            )
        cpus_have = cluster.get("CPU", 0.0)
        if cpus_have < self.num_workers * self.resources["CPU"]:
            raise ResourcesError(
                f"{self.num_workers} workers x {self.resources['CPU']:g} CPUs do not fit the Ray cluster's "
                f"{cpus_have:g} CPUs; use fewer workers or resources_per_worker={{'CPU': smaller}}"
            )
        return JobSpec(job_id=uuid.uuid4().hex[:12], mode=self.mode, num_workers=self.num_workers,
                       use_gpu=use_gpu, cpus_per_worker=self.resources["CPU"], gpus_per_worker=gpus_each,
                       seed=self.seed, strategy_options=self.strategy_options,
                       collective_timeout_s=self.collective_timeout_s)

    def _start_workers(self, spec: JobSpec) -> list[Any]:
        """The job's workers, each importing what its loop will while the others start
        (``TrainWorker.warm``)."""
        from synctrain.driver.shell import start_workers

        return start_workers(self, spec, list(range(spec.num_workers)))

    def _run(self, workers: list[Any], handles: dict[str, Any]) -> Result:
        infos = _get_or_raise([w.node_info.remote() for w in workers])
        local_ranks = _local_ranks([i["node_id"] for i in infos])
        handles = {**handles, "gpus_shared": _gpus_shared(infos)}
        refs = [w.run.remote(self._loop_blob, self._config_blob, handles, local_ranks[r])
                for r, w in enumerate(workers)]
        monitor = _ReportMonitor(workers[0], self.progress)
        outcomes: dict[int, dict[str, Any]] = {}
        rank_of = {ref: r for r, ref in enumerate(refs)}
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_INTERVAL_S)
                failures: list[dict[str, Any]] = []
                for ref in ready:
                    outcome = _outcome(ref, rank_of[ref])
                    if not outcome["ok"]:
                        failures.append(outcome)
                    outcomes[rank_of[ref]] = outcome
                if failures:
                    _raise_root_cause(failures, pending, rank_of)
                monitor.poll()
            monitor.poll()
        finally:
            monitor.close()
        return Result(outputs=[outcomes[r]["value"] for r in range(len(workers))],
                      metrics=monitor.metrics,
                      worker_metrics=[outcomes[r]["metrics"] for r in range(len(workers))])


class _ReportMonitor:
    """Drains rank 0's reports while the job runs and shows them as a progress bar (the
    step-logged path's, with a total and ETA once the loop reports ``total_steps``)."""

    def __init__(self, worker: Any, progress: bool) -> None:
        from synctrain.driver.run import _Progress

        self.worker = worker
        self.metrics: list[dict[str, Any]] = []
        self._next = 0
        self._bar = _Progress(progress, "training")

    def poll(self) -> None:
        try:
            reports, self._next = ray.get(self.worker.poll_reports.remote(self._next), timeout=30)
        except RayError:
            return  # the worker is gone; its run() outcome says why
        if not reports:
            return
        self.metrics.extend(reports)
        self._bar.show(reports)

    def close(self) -> None:
        self._bar.close()


def _outcome(ref: Any, rank: int) -> dict[str, Any]:
    """The worker's run() result, or a failure record if its process is gone."""
    try:
        return ray.get(ref)
    except RayError as exc:
        return {"ok": False, "rank": rank, "died": True, "detail": _first_line(exc)}


def _is_secondary(failure: dict[str, Any]) -> bool:
    """A collective that broke because *another* rank failed (its peer closed the connection)."""
    if failure.get("died"):
        return False
    if failure.get("exc_type") == "CollectiveError":  # the shared-memory path names the vanished peer
        return True
    tb = failure.get("traceback", "")
    return failure.get("exc_type") in ("RuntimeError", "DistBackendError", "DistNetworkError") and (
        "torch/distributed" in tb or "gloo" in tb.lower() or "nccl" in tb.lower())


def _raise_root_cause(failures: list[dict[str, Any]], pending: list[Any], rank_of: dict) -> None:
    """Raise the failure that caused the others.

    When one rank fails, its peers soon fail too, inside a collective. Wait briefly for the
    rest, then prefer a failure that is not such a broken collective, lowest rank first.
    """
    if pending:
        done, _ = ray.wait(pending, num_returns=len(pending), timeout=ROOT_CAUSE_GRACE_S)
        failures += [f for f in (_outcome(r, rank_of[r]) for r in done) if not f["ok"]]
    failures.sort(key=lambda f: (_is_secondary(f), f["rank"]))
    first = failures[0]
    if first.get("died"):
        raise WorkerDiedError(first["rank"], first["detail"])
    raise TrainingFailedError(first["rank"], first["traceback"], first["exc_type"])


def _get_or_raise(refs: list[Any]) -> list[Any]:
    out = []
    for rank, ref in enumerate(refs):
        try:
            out.append(ray.get(ref))
        except RayError as exc:
            raise WorkerDiedError(rank, _first_line(exc)) from None
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _gpus_shared(infos: list[dict[str, Any]]) -> bool:
    """True when two ranks were given the same GPU (fractional ``resources_per_worker``)."""
    seen = set()
    for info in infos:
        for gpu in info.get("gpu_ids", ()):
            if (info["node_id"], gpu) in seen:
                return True
            seen.add((info["node_id"], gpu))
    return False


def _local_ranks(node_ids: list[str]) -> list[int]:
    seen: dict[str, int] = {}
    out = []
    for node in node_ids:
        out.append(seen.get(node, 0))
        seen[node] = out[-1] + 1
    return out


def _elastic_options(min_workers: Any, keep_global_batch: Any, placement_timeout_s: Any,
                     num_workers: int, step_log: Any) -> tuple[int, bool, float]:
    """Checked ``min_workers`` (default ``num_workers``: the job never shrinks),
    ``keep_global_batch`` and ``placement_timeout_s`` (docs/fault-tolerance.md, "Elastic
    membership")."""
    if min_workers is None:
        min_workers = num_workers
    if not isinstance(min_workers, int) or isinstance(min_workers, bool) or not 1 <= min_workers <= num_workers:
        raise ConfigError(f"min_workers must be an integer from 1 to num_workers={num_workers} (the fewest "
                          f"workers the job may go on with), got {min_workers!r}")
    if min_workers < num_workers and step_log is False:
        raise ConfigError("min_workers lets a job go on with fewer workers after a failure, which needs the "
                          "step log: drop step_log=False, or min_workers")
    if not isinstance(keep_global_batch, bool):
        raise ConfigError(f"keep_global_batch must be True or False, got {keep_global_batch!r}")
    if isinstance(placement_timeout_s, bool) or not isinstance(placement_timeout_s, (int, float)) \
            or not placement_timeout_s > 0:
        raise ConfigError(f"placement_timeout_s must be a number of seconds > 0 (how long a new worker may "
                          f"wait for resources), got {placement_timeout_s!r}")
    return min_workers, keep_global_batch, float(placement_timeout_s)


def _token(coordinator: Any, token: str | bytes | None) -> bytes:
    """The external coordinator's token (argument, else SYNCTRAIN_COORDINATOR_TOKEN)."""
    if coordinator is None:
        return b""
    if not isinstance(coordinator, str) or not coordinator.strip():
        raise ConfigError(f"coordinator must be None (embedded) or 'host:port,host:port,...', got {coordinator!r}")
    token = token if token is not None else os.environ.get("SYNCTRAIN_COORDINATOR_TOKEN")
    if not token:
        raise ConfigError("coordinator= names an external coordinator cluster but no token was given: pass "
                          "coordinator_token= or set SYNCTRAIN_COORDINATOR_TOKEN (the cluster's token file)")
    return token.encode() if isinstance(token, str) else bytes(token)


def _pickled(what: str, value: Any) -> bytes:
    try:
        return ray.cloudpickle.dumps(value)
    except Exception as exc:
        raise ConfigError(
            f"{what} cannot be pickled, so it cannot be sent to the workers: {type(exc).__name__}: {exc}. "
            "Pass plain values (numbers, strings, lists, dicts) in config and create locks, open files, "
            "sockets or clients inside the training loop instead."
        ) from None
