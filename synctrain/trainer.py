"""The driver: validate, connect to Ray, start the workers, supervise them, gather results.

Everything that can be checked is checked before any worker starts: the worker count, the
mode and its options, that the loop and its config pickle, and that the cluster has the CPUs
and GPUs asked for. Then ``fit`` starts one actor per rank, gives them a rendezvous address,
runs the loop, and watches: the first rank that fails (its loop raised, or its process died)
stops the whole job at once and ``fit`` raises an error naming that rank. It never waits on a
dead worker.
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayError

from synctrain.errors import (
    ConfigError,
    ResourcesError,
    TrainingFailedError,
    WorkerDiedError,
)
from synctrain.spec import JobSpec
from synctrain.strategies.base import get_strategy_class, registered_modes
from synctrain.worker import TrainWorker

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


class Trainer:
    """Run ``train_loop(config)`` on ``num_workers`` Ray workers in the given mode.

    ``mode="sync"``: synchronous all-reduce (options ``grad_accum_steps``, ``shard_optimizer``,
    ``grad_compression``). ``mode="async"``: parameter server (options ``staleness``,
    ``num_ps_shards``). ``use_gpu``: True, False or "auto" (GPUs when the cluster has one per
    worker). ``ray_address``: connect there (else ``RAY_ADDRESS``, else start a local Ray).
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
        started = time.monotonic()
        self._connect_ray()
        spec = self._make_spec()
        strategy_cls = get_strategy_class(spec.mode)
        handles = strategy_cls.on_driver_start(spec)
        workers: list[Any] = []
        ok = False
        try:
            workers = self._start_workers(spec)
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
        if ray.is_initialized():
            return
        address = self.ray_address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
            return
        needed = math.ceil(self.num_workers * self.resources["CPU"])
        ray.init(num_cpus=max(os.cpu_count() or 1, needed), include_dashboard=False,
                 logging_level=logging.WARNING)

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
        custom = {k: v for k, v in self.resources.items() if k not in ("CPU", "GPU")}
        actor_cls = ray.remote(TrainWorker).options(
            num_cpus=spec.cpus_per_worker, num_gpus=spec.gpus_per_worker,
            resources=custom or None, max_concurrency=2, max_restarts=0)
        return [actor_cls.remote(rank, spec) for rank in range(spec.num_workers)]

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
    """Drains rank 0's reports while the job runs and shows them as a progress bar."""

    def __init__(self, worker: Any, progress: bool) -> None:
        self.worker = worker
        self.metrics: list[dict[str, Any]] = []
        self._next = 0
        self._bar = None
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(desc="training", unit="step", dynamic_ncols=True)

    def poll(self) -> None:
        try:
            reports, self._next = ray.get(self.worker.poll_reports.remote(self._next), timeout=30)
        except RayError:
            return  # the worker is gone; its run() outcome says why
        if not reports:
            return
        self.metrics.extend(reports)
        if self._bar is not None:
            last = reports[-1]
            self._bar.n = int(last.get("step", len(self.metrics)))
            shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in last.items() if k != "step"}
            self._bar.set_postfix(shown, refresh=False)
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
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


def _pickled(what: str, value: Any) -> bytes:
    try:
        return ray.cloudpickle.dumps(value)
    except Exception as exc:
        raise ConfigError(
            f"{what} cannot be pickled, so it cannot be sent to the workers: {type(exc).__name__}: {exc}. "
            "Pass plain values (numbers, strings, lists, dicts) in config and create locks, open files, "
            "sockets or clients inside the training loop instead."
        ) from None
