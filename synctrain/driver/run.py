"""``Trainer.fit`` for a step-logged job: wiring, in order, and the result from the log.

1. connect to Ray and check resources (as without a step log);
2. create the job directory, or take over an unfinished job of that name (its driver died, it
   failed, Ctrl-C): a finished or running job's name is a :class:`JobExistsError`;
3. start a new job's shared actors (the strategy's: parameter-server shards) and the first
   generation's workers, each importing what its loop will (``TrainWorker.warm``), so their
   processes start while the driver starts the embedded coordinator (WALs in
   ``job_dir/coordinator``: a resumed job's nodes recover from them, with the job's token, on
   new ports), or checks the external one;
4. record the job (``steplog.create``; a resumed job's spec is checked against this call),
   start a resumed job's shared actors; its leftovers (shared-memory files of its
   job id, temp files) are removed, and whatever of its old generation still runs is fenced
   off by the new generation;
5. run the :class:`~synctrain.driver.shell.JobShell` until every rank's loop has returned (a
   resumed job starts from its last committed checkpoint that passes its checksum);
6. read ``Result.metrics``, ``steps``, ``generations``, ``failures`` back from the committed
   log, record the job's end, stop everything (the coordinator's WALs and the checkpoints stay
   in the job directory). Meanwhile, and once more from the whole log at the end, the
   committed reports go to ``metrics.jsonl`` in the job directory (:mod:`synctrain.metrics`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

from synctrain.driver import coord as _coord
from synctrain.driver.coord import EmbeddedCoordinator, ExternalCoordinator
from synctrain.driver.jobdir import JobDir
from synctrain.driver.policy import RecoveryPolicy
from synctrain.driver.shell import JobShell, _kill, start_workers
from synctrain.errors import ConfigError
from synctrain.metrics import LiveMetrics, write_final_metrics
from synctrain.progress import ProgressDisplay as _Progress  # the name trainer.py imports
from synctrain.steplog import StepLog
from synctrain.strategies.base import get_strategy_class
from synctrain.worker.step import StepLogConfig

log = logging.getLogger(__name__)


def fit_with_step_log(trainer: Any) -> Any:
    from synctrain.trainer import Result

    started = time.monotonic()
    trainer._connect_ray()
    spec = trainer._make_spec()
    job = JobDir(trainer._storage, trainer.job_name)
    info = {"mode": spec.mode, "num_workers": spec.num_workers, "min_workers": trainer.min_workers,
            "job_id": spec.job_id,
            "coordinator": "external" if trainer.coordinator else "embedded", **_launch_info()}
    external = (ExternalCoordinator(trainer.coordinator, trainer._coordinator_token)
                if trainer.coordinator else None)
    if external is not None:
        external.start()  # a ConfigError before anything of the job exists
    # None: a new job; else the unfinished job's job.json (it is resumed)
    old = job.open(info, check=lambda old: _check_resume(trainer, spec, old))
    if old is not None:
        spec = dataclasses.replace(spec, job_id=str(old["job_id"]))
    coordinator: Any = external or EmbeddedCoordinator(job.coordinator_dir, resume=old is not None)
    if trainer.progress:
        verb = "resuming" if old is not None else "job"
        print(f"synctrain: {verb} {trainer.job_name!r} in {job.path}", flush=True)
    strategy_cls = get_strategy_class(spec.mode)
    handles: dict[str, Any] = {}
    steplog = shell = None
    monitor = _Progress(trainer.progress, trainer.job_name)
    live_metrics: LiveMetrics | None = None
    state, reason, ok = "failed", "", False
    early: list[Any] = []  # the first generation's workers, before the shell takes them
    try:
        # The workers' processes start, and import what their loop will, while the coordinator
        # starts (and a new job's shared actors: a resumed job's wait for its leftovers' removal)
        if old is None:
            handles = strategy_cls.on_driver_start(spec)
        early = start_workers(trainer, spec, list(range(spec.num_workers)))
        if not trainer.coordinator:
            coordinator.start()
        steplog = StepLog(coordinator.endpoints, coordinator.token, trainer.job_name)
        try:
            created = steplog.create(_spec_doc(trainer, spec), old is not None)
        except Exception as exc:
            raise ConfigError(f"the coordinator refused job {trainer.job_name!r}: {exc}") from None
        if old is not None:
            _check_logged_spec(trainer, _spec_doc(trainer, spec), created.get("spec") or {})
            _remove_leftovers(job, spec)
        live_metrics = LiveMetrics(job.path, StepLog(coordinator.endpoints, coordinator.token, trainer.job_name,
                                                     timeout_s=5.0))
        live_metrics.start()
        if old is not None:
            handles = strategy_cls.on_driver_start(spec)
        cfg = StepLogConfig(endpoints=tuple(coordinator.endpoints), token=coordinator.token,
                            job=trainer.job_name, job_dir=str(job.path),
                            max_uncommitted_steps=trainer.max_uncommitted_steps,
                            checkpoint_every=trainer.checkpoint_every,
                            checkpoint_every_s=trainer.checkpoint_every_s,
                            shard_optimizer=bool(spec.strategy_options.get("shard_optimizer")),
                            digest_every=trainer.digest_every,
                            writer_nice=_coord.STEPLOG_NICE,
                            flip_bits=trainer.fault_hooks.get("flip_bits"))  # test hook
        policy = RecoveryPolicy(spec.mode, max_failures=trainer.max_failures, recovery=trainer.recovery,
                                sharded_state=cfg.shard_optimizer, num_workers=spec.num_workers,
                                min_workers=trainer.min_workers)
        shell = JobShell(spec=spec, trainer=trainer, steplog=steplog, steplog_cfg=cfg,
                         coordinator=coordinator, handles=handles, strategy_cls=strategy_cls,
                         policy=policy, monitor=monitor, hooks=trainer.fault_hooks,
                         resume=old, workers=early)
        early = []
        outcomes = shell.run()
        handles = shell.handles
        result = Result(outputs=[o.get("value") for o in outcomes], metrics=[],
                        worker_metrics=[o.get("metrics", {}) for o in outcomes])
        _fill_from_log(result, steplog, trainer.job_name)
        # the last reports and steps came after the last poll: the display ends where the log
        # does, with rank 0's last progress (its final epoch, and samples for the rate)
        final = dict(outcomes[0].get("progress") or {}) if outcomes else {}
        final.update(step=result.steps[-1]["step"] if result.steps else 0, started=True)
        monitor.show(result.metrics[-1:], final)
        state, ok = "finished", True
        return result
    except BaseException as exc:
        reason = f"{type(exc).__name__}: {str(exc)[:300]}"
        state = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        raise
    finally:
        monitor.close()
        for actor in early:  # the shell never took them
            _kill(actor)
        if shell is not None:
            handles = shell.handles
            shell.shutdown()
        info = _finish(strategy_cls, spec, handles, ok)
        if live_metrics is not None:
            live_metrics.stop()
        if steplog is not None:
            try:
                steplog.end(state, reason)
            except Exception as exc:  # noqa: BLE001 - the job's own outcome matters more
                log.warning("could not record the job's end in the step log: %s", exc)
            write_final_metrics(job.path, steplog)  # metrics.jsonl from the whole committed log
            steplog.close()
        coordinator.stop()
        job.update_status(state=state, reason=reason, elapsed_s=round(time.monotonic() - started, 3))
        job.unlock_driver()
        if ok:
            result.strategy_info = info
            result.elapsed_s = time.monotonic() - started


def _launch_info() -> dict[str, Any]:
    """What ``synctrain run`` started (script, arguments, directory): ``synctrain resume``
    runs it again. Empty for a job started any other way."""
    raw = os.environ.get("SYNCTRAIN_LAUNCH")
    if not raw:
        return {}
    try:
        launch = json.loads(raw)
    except ValueError:
        return {}
    return {"launch": launch} if isinstance(launch, dict) else {}


def _check_resume(trainer: Any, spec: Any, old: dict[str, Any]) -> None:
    """A resumed job must be the same job: same mode, same kind of coordinator (its spec in
    the step log is checked too, once the coordinator runs). Another ``num_workers`` is an
    elastic resize: sync mode, at least the job's ``min_workers``."""
    name = trainer.job_name
    if old.get("mode") != spec.mode:
        raise ConfigError(f"job {name!r} was started in mode {old.get('mode')!r}; resuming it with mode="
                          f"{spec.mode!r} is not the same job: pass mode={old.get('mode')!r}, or pick another "
                          "job_name for a new job")
    was = int(old.get("num_workers", spec.num_workers))
    if was != spec.num_workers:
        floor = int(old.get("min_workers") or was)
        if spec.mode != "sync":
            raise ConfigError(f"job {name!r} ran {was} workers; an async job resumes with the same number "
                              f"(each worker's data position is its own): pass num_workers={was}")
        if spec.num_workers < floor:
            raise ConfigError(f"job {name!r} ran {was} workers with min_workers={floor}; resuming it with "
                              f"num_workers={spec.num_workers} is below that: pass num_workers >= {floor} (the "
                              "job was started with that floor), or pick another job_name")
    kind = "external" if trainer.coordinator else "embedded"
    if old.get("coordinator", kind) != kind:
        raise ConfigError(f"job {name!r} kept its step log in an {old.get('coordinator')} coordinator; "
                          f"resume it with the same (coordinator= {'given' if kind == 'embedded' else 'left out'})")


#: Spec fields that make a different job when they change (the rest may, e.g. checkpoint_every;
#: num_workers is checked by _check_resume: a sync job may resume at another size).
SAME_JOB_FIELDS = ("mode", "options", "seed")


def _check_logged_spec(trainer: Any, now: dict[str, Any], logged: dict[str, Any]) -> None:
    changed = [f"{key}: {logged.get(key)!r} -> {now.get(key)!r}" for key in SAME_JOB_FIELDS
               if key in logged and logged.get(key) != now.get(key)]
    if changed:
        raise ConfigError(f"job {trainer.job_name!r} cannot be resumed with other settings ("
                          f"{'; '.join(changed)}): pass the settings it was started with, or pick another "
                          "job_name for a new job")


def _remove_leftovers(job: JobDir, spec: Any) -> None:
    """What a dead driver's job left on this host: shared-memory files of its job id (a worker
    killed before its peers mapped them) and temp files in the job directory."""
    from synctrain.ps import shm as ps_shm
    from synctrain.strategies import shm_allreduce

    removed = job.remove_temp_files()
    for sweep in (ps_shm.remove_leftovers, shm_allreduce.remove_leftovers):
        try:
            sweep(spec.job_id)
        except Exception as exc:  # noqa: BLE001 - a leftover is not worth failing the resume for
            log.warning("could not sweep leftovers of job %s: %s", spec.job_id, exc)
    if removed:
        log.info("removed %d temp file(s) of the interrupted run: %s", len(removed), removed[:5])


def _finish(strategy_cls: Any, spec: Any, handles: dict[str, Any], ok: bool) -> dict[str, Any]:
    try:
        return strategy_cls.on_driver_finish(spec, handles, ok)
    except Exception as exc:  # noqa: BLE001 - never lose a result over cleanup
        log.warning("strategy cleanup failed: %s", exc)
        return {}


def _spec_doc(trainer: Any, spec: Any) -> dict[str, Any]:
    plain = {k: v for k, v in spec.strategy_options.items() if isinstance(v, (int, float, str, bool, type(None)))}
    return {"mode": spec.mode, "num_workers": spec.num_workers, "use_gpu": spec.use_gpu,
            "seed": spec.seed, "options": plain, "checkpoint_every": trainer.checkpoint_every,
            "max_uncommitted_steps": trainer.max_uncommitted_steps, "recovery": trainer.recovery}


def _fill_from_log(result: Any, steplog: StepLog, job_name: str) -> None:
    """Result fields from the committed log: each report and step once, superseded ones left out."""
    reports = [r for r in steplog.records("reports") if not r.get("superseded")]
    result.metrics = [dict(r["metrics"]) for r in sorted(reports, key=lambda r: r["seq"])]
    steps = steplog.records("steps")
    result.steps = [_step(s) for s in steps if not s.get("superseded")]
    result.redone_steps = sum(1 for s in steps if s.get("superseded"))
    result.generations = [{"generation": g["generation"], "members": g["members"],
                           "start_step": g["start_step"], "reason": g["reason"]}
                          for g in steplog.records("generations")]
    result.failures = steplog.records("failures")
    result.fenced = steplog.records("fenced")
    live = [c for c in steplog.records("checkpoints") if not c.get("superseded") and not c.get("pruned")]
    result.checkpoint = live[-1]["path"] if live else None
    result.job_name = job_name


def _step(s: dict[str, Any]) -> dict[str, Any]:
    out = {"step": s["step"], "generation": s["generation"], "time": s["time"]}
    if s.get("lost"):
        out["lost"] = True
    if s.get("ps_clock") is not None:
        out["ps_clock"] = s["ps_clock"]
    return out
