"""The per-worker training context and the session that backs the public helpers.

Inside a synctrain worker, :func:`synctrain.get_context` returns the worker's
:class:`TrainContext`; in a plain Python process (no Trainer) it returns a single-process
context, and every ``prepare_*`` helper becomes a no-op, so a training loop can be debugged
locally without Ray.

The :class:`Session` is one run of the loop in one worker (one *generation* of the job). It
holds everything the step boundary needs: the objects the loop prepared or registered (so a
checkpoint can capture them and a restart can load them), the data loaders' positions, the
reports, and — when the job keeps a step log — the :class:`~synctrain.worker.step.StepBoundary`
that records steps, writes checkpoints and holds the worker within K uncommitted steps.

Restoring. A session may start with a *restore document* (a checkpoint, or a live peer's
state): the loop then runs again from its first line and the helpers put it back where that
state left off — ``prepare_model``/``prepare_optimizer``/``register_state`` load their part,
the prepared loaders skip what was done (see :mod:`synctrain.data`), and the RNG states are
put back exactly where the first batch after the restored step is drawn. Until every restored
loader has reached its resume point the loop is *replaying* finished work, and its reports are
dropped: they were committed by the run that did that work.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from synctrain.errors import ModelMismatchError

if TYPE_CHECKING:  # pragma: no cover
    from synctrain.data import ShardedBatchSampler
    from synctrain.strategies.base import Strategy
    from synctrain.worker.step import StepBoundary

#: Reports a worker keeps before the driver collects them; older ones are dropped (and counted).
MAX_PENDING_REPORTS = 100_000
#: Objects one loop may register with ``register_state``.
MAX_REGISTERED = 256


@dataclass(frozen=True)
class TrainContext:
    """Where this copy of the training loop runs. ``mode`` is "sync", "async" or "local".

    ``generation`` counts the job's membership changes (1 for the first run); ``resumed`` is
    True when this run continues from restored state, ``start_step`` and ``start_epoch`` say
    where (optimizer steps done, and the data epoch the loader continues in).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mode: str = "local"
    seed: int = 0
    generation: int = 0
    resumed: bool = False
    start_step: int = 0
    start_epoch: int = 0
    #: The job's config: what ``Trainer(config=...)`` gave (the loop's argument), or the
    #: ``--config`` file and ``--set`` values of ``synctrain run``; {} in a plain process.
    config: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


class Session:
    """A running worker's state: its context, strategy, reports, step counter and the
    objects it prepared. ``report`` is called from the training thread while the driver
    drains reports through the actor's second thread, hence the lock."""

    def __init__(self, context: TrainContext, strategy: Strategy | None,
                 restore: dict[str, Any] | None = None) -> None:
        self.context = context
        self.strategy = strategy
        self.restore = restore
        self.optimizer_steps = int(restore["step"]) if restore else 0
        self._lock = threading.Lock()
        # bounded: when the driver falls behind, the oldest reports go (and are counted)
        self._reports: deque[dict[str, Any]] = deque(maxlen=MAX_PENDING_REPORTS)
        self._first_pending = 0  # global index of self._reports[0]
        self.dropped_reports = 0
        self.report_count = 0
        self.report_seq = int(restore.get("report_seq", 0)) if restore else 0  # job-wide index
        self.replayed_reports = 0
        self.models: list[torch.nn.Module] = []
        self.optimizers: list[Any] = []
        self.samplers: list[ShardedBatchSampler] = []
        # Workers a global batch is cut for: None, this generation's world size; the job's
        # num_workers when it keeps its global batch while it runs on fewer (keep_global_batch)
        self.batch_workers: int | None = None
        self.registered: dict[str, Any] = {}
        self.stepper: StepBoundary | None = None
        self.last_activity = time.monotonic()
        self.started = False  # any step, report or heartbeat yet (startup is timed apart)
        self.in_step = False  # inside an optimizer step: state may be half-updated
        self._replay_waiting = 0  # restored loaders that have not reached their resume point
        self._rng_pending = restore.get("rng") if restore else None
        self._derive_waiting: list[ShardedBatchSampler] = []
        # The state as of the last step boundary (what a peer heal hands on): data positions
        # and the report count then; reports and batches after it are redone.
        # (epoch, batches, sample offset) per loader; restore documents may hold (epoch, batches)
        self.step_positions: list[tuple[int, ...]] = [tuple(p) for p in (restore or {}).get("loaders", [])]
        self.step_report_seq = self.report_seq
        # The capture point: the first batch handed out after a step boundary. The iteration
        # of that step is over by then (its reports made, a scheduler stepped), nothing of the
        # next has happened: the state a checkpoint or a peer heal hands on is taken there.
        self.capture_step = self.optimizer_steps
        self.capture_positions = list(self.step_positions)
        self.capture_report_seq = self.report_seq

    # ---- reports -----------------------------------------------------------------------
    @property
    def replaying(self) -> bool:
        return self._replay_waiting > 0

    def add_report(self, metrics: dict[str, Any]) -> None:
        self.touch()
        if self.replaying:
            self.replayed_reports += 1  # committed by the run that did this work
            return
        record = dict(metrics)
        record.setdefault("step", self.optimizer_steps if self.strategy else self.report_count)
        with self._lock:
            if len(self._reports) == MAX_PENDING_REPORTS:
                self._first_pending += 1
                self.dropped_reports += 1
            self._reports.append(record)  # O(1); the deque drops the oldest when full
            self.report_count += 1
            seq = self.report_seq
            self.report_seq += 1
        if self.stepper is not None:
            self.stepper.on_report(seq, self.optimizer_steps, record)

    def drain_reports(self, since: int) -> tuple[list[dict[str, Any]], int]:
        """Reports with global index >= ``since``; frees those before it. Returns (reports, next)."""
        with self._lock:
            for _ in range(max(0, min(since - self._first_pending, len(self._reports)))):
                self._reports.popleft()
                self._first_pending += 1
            start = max(0, since - self._first_pending)
            out = list(itertools.islice(self._reports, start, None))
            return out, self._first_pending + len(self._reports)

    # ---- progress ----------------------------------------------------------------------
    def touch(self) -> None:
        """Record that the loop is alive (a step, a report, ``synctrain.heartbeat()``)."""
        self.last_activity = time.monotonic()
        self.started = True

    def on_optimizer_step(self) -> None:
        """The one step boundary: both strategies call it after each real optimizer step."""
        self.optimizer_steps += 1
        self.touch()
        self.step_positions = self.loader_positions()
        self.step_report_seq = self.report_seq
        if self.stepper is not None:
            self.stepper.after_step(self)

    def before_optimizer_step(self) -> None:
        """Called by both strategies at the start of each real optimizer step."""
        if self.stepper is not None:
            self.stepper.before_step(self)

    def progress(self) -> dict[str, Any]:
        """What the driver's poll sees: progress for stall detection, and for the progress
        bar the first prepared loader's epoch and the samples it has consumed over all ranks
        (epochs before included), and the strategy's own figures (async: the staleness)."""
        out = {"step": self.optimizer_steps, "idle_s": time.monotonic() - self.last_activity,
               "reports": self.report_count, "in_step": self.in_step, "started": self.started}
        if self.samplers:
            sampler = self.samplers[0]
            epoch = max(0, sampler.iter_epoch)
            out["epoch"] = epoch
            out["samples"] = epoch * sampler.num_samples + sampler.sample_offset()
        if self.strategy is not None:
            out.update(self.strategy.progress())
        return out

    # ---- prepared objects and restore --------------------------------------------------
    def add_model(self, prepared: torch.nn.Module) -> None:
        index = len(self.models)
        self.models.append(prepared)
        if self.restore and self.restore.get("derive_positions") and index == 0:
            # async, joining live or restored shards: this worker continues at the clock the
            # shards gave it, and its data where that many batches end
            clock = int(getattr(self.strategy, "start_clock", self.restore["step"]))
            self.restore["step"] = self.optimizer_steps = clock
            waiting, self._derive_waiting = self._derive_waiting, []
            for sampler in waiting:
                self._resume_derived(sampler)
        if self.restore and self.context.mode != "async":  # async: the shards hold parameters
            states = self.restore.get("models", [])
            if index < len(states):
                _load_model_state(_module(prepared), states[index], index)

    def add_optimizer(self, optimizer: Any) -> None:
        index = len(self.optimizers)
        self.optimizers.append(optimizer)
        if self.restore and self.context.mode != "async":  # async: the shards hold its state
            states = self.restore.get("optimizers", [])
            if index < len(states):
                optimizer.load_state_dict(states[index])

    def add_sampler(self, sampler: ShardedBatchSampler) -> None:
        index = len(self.samplers)
        self.samplers.append(sampler)
        sampler.on_first_batch = self._restore_rng_once
        sampler.on_batch = self._capture_point
        if not self.restore:
            return
        if self.restore.get("derive_positions"):
            if index == 0 and self.models:
                self._resume_derived(sampler)
            elif index == 0:
                self._derive_waiting.append(sampler)  # the clock is known once the model is
            return
        positions = self.restore.get("loaders", [])
        if index < len(positions):
            epoch, done, *offset = positions[index]  # no offset: a document of before re-sharding
            if epoch >= 0:
                self._replay_waiting += 1
                sampler.on_resume_point = self._one_loader_resumed
            sampler.resume_at(int(epoch), int(done), int(offset[0]) if offset else None)

    def _resume_derived(self, sampler: ShardedBatchSampler) -> None:
        epoch, done = divmod(int(self.restore["step"]) if self.restore else 0, max(1, len(sampler)))
        self._replay_waiting += 1
        sampler.on_resume_point = self._one_loader_resumed
        sampler.resume_at(epoch, done)

    def _one_loader_resumed(self) -> None:
        self._replay_waiting = max(0, self._replay_waiting - 1)

    def _capture_point(self) -> None:
        if self.optimizer_steps == self.capture_step:
            return  # not the first batch after a step
        self.capture_step = self.optimizer_steps
        self.capture_positions = self.loader_positions()  # before this batch is counted
        self.capture_report_seq = self.report_seq
        if self.stepper is not None:
            self.stepper.at_capture_point(self)

    def handed_on_state(self) -> tuple[list[tuple[int, ...]], int]:
        """(loader positions, report count) of the state as of the last step: at its capture
        point when the loop got there, else at its boundary (the iteration's tail is lost)."""
        if self.capture_step == self.optimizer_steps:
            return list(self.capture_positions), self.capture_report_seq
        return list(self.step_positions), self.step_report_seq

    def _restore_rng_once(self) -> None:
        if self._rng_pending is not None and not self.replaying:
            from synctrain.checkpoint import restore_rng

            state, self._rng_pending = self._rng_pending, None
            restore_rng(state)

    def register(self, name: str, obj: Any) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"register_state needs a non-empty name, got {name!r}")
        if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
            raise TypeError(f"register_state({name!r}, ...) needs an object with state_dict() and "
                            f"load_state_dict(), got {type(obj).__name__}")
        if name in self.registered and self.registered[name] is not obj:
            raise ValueError(f"register_state: the name {name!r} is already registered for another object")
        if len(self.registered) >= MAX_REGISTERED and name not in self.registered:
            raise ValueError(f"register_state: at most {MAX_REGISTERED} objects per training loop")
        self.registered[name] = obj
        if self.restore and name in self.restore.get("registered", {}):
            obj.load_state_dict(self.restore["registered"][name])

    def loader_positions(self) -> list[tuple[int, ...]]:
        """Each prepared loader's (epoch, batches, sample offset): a run of any world size
        continues there (see :mod:`synctrain.data`)."""
        return [s.resume_point() for s in self.samplers]

    def start_epoch(self) -> int:
        positions = (self.restore or {}).get("loaders", [])
        return int(positions[0][0]) if positions and positions[0][0] >= 0 else 0


def _load_model_state(model: torch.nn.Module, state: dict[str, Any], index: int) -> None:
    """Load a restored model state; a model of other parameter names or shapes than the one
    the state was saved from is a ModelMismatchError (not retried: it would fail again)."""
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    if mine != saved:
        differ = sorted(k for k in mine.keys() | saved.keys() if mine.get(k) != saved.get(k))
        shown = ", ".join(f"{k}: {saved.get(k, 'absent')} saved, {mine.get(k, 'absent')} now" for k in differ[:4])
        raise ModelMismatchError(
            f"prepared model {index} does not match the state it is restored from ({shown}"
            f"{', ...' if len(differ) > 4 else ''}): a resumed job must build the model it was started "
            "with; pick another job_name to train a different model")
    model.load_state_dict(state)


def _module(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside a wrapper (DDP's ``.module``)."""
    return getattr(model, "module", model)


_LOCAL = TrainContext()
_session: Session | None = None
_local_reports: list[dict[str, Any]] = []


def current_session() -> Session | None:
    return _session


def set_session(session: Session | None) -> None:
    global _session
    _session = session


def local_reports() -> list[dict[str, Any]]:
    """What ``report`` recorded in a plain process (no Trainer), for debugging."""
    return _local_reports


def set_local_config(config: dict[str, Any]) -> None:
    """The config a plain process's context carries (``synctrain run --config`` without
    ``--workers``: the script runs once, here)."""
    global _LOCAL
    _LOCAL = dataclasses.replace(_LOCAL, config=dict(config))


def get_context() -> TrainContext:
    """The context of the calling worker, or a single-process context outside a Trainer."""
    return _session.context if _session is not None else _LOCAL
