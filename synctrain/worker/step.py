"""The step boundary: what happens in a worker after every optimizer step of a step-logged job.

Theory of operation. Both strategies call ``Session.on_optimizer_step`` once per real
optimizer step; with a step log that lands here (:meth:`StepBoundary.after_step`), which

1. queues the step's record (rank 0: the job's step record, carrying rank 0's reports made
   since the last step and, in async mode, the parameter-server clock; other ranks: their
   progress only) for the :class:`_Writer` thread, which commits queued records to the
   coordinator in batches — one Raft commit carries many steps, every 2 s
   (``FLUSH_INTERVAL_S``) or sooner when three quarters of K are uncommitted (``URGE_AT``), so
   the log costs little even for fast steps;
2. every ``checkpoint_every`` steps (or ``checkpoint_every_s`` seconds), notes a checkpoint
   of this step, which rank 0 captures at the step's *capture point* — the next batch the
   prepared loader hands out: the iteration is over (its reports made, an LR scheduler
   stepped) and nothing of the next has run, so data position, report count and RNG are
   exactly where a resumed loop continues (without a prepared loader: at the start of the
   next optimizer step) — as a document of copies of every tensor, so training goes on at
   once; the writer encodes it, writes it durably and only then commits it to the log
   (ordered after the records of the steps it covers); the log answers which old
   checkpoints to delete. Only the newest two checkpoints of a commit are written
   (:data:`WRITTEN_PER_COMMIT`): without replica digests that commit would prune the others
   at once, and with them a rollback loses at most one commit's worth of steps more;
3. in sync mode, every ``digest_every`` steps, copies the replicated state (the parameters,
   see :mod:`synctrain.digest`) at the same capture point — rank 0 reuses its checkpoint's
   copy — for the writer to hash and commit with the step records: the log compares the
   ranks' digests of each step (a checkpoint carries the digest of what it holds, too); in
   async mode the strategy checks what it pulled against the shards' digests of what they
   served (:meth:`StepBoundary.note_pulled`) and the check rides on the step's record;
4. holds the worker while it is more than K = ``max_uncommitted_steps`` steps ahead of its
   committed records (K = 0: every step waits for its own commit), so a coordinator that lost
   its majority stops training after at most K steps and nothing runs ahead of the log;
5. raises :class:`WorkerFencedError` once the log has refused this worker's records because a
   newer generation replaced it (a *zombie*): it can never commit, and it stops; and
   :class:`RunStopped` once the driver asked it to stop (every rank rolls back after the
   digests disagreed), so the process lives on for the next generation.

Records are idempotent in the log (a step or report number already there is skipped), so the
writer simply re-sends a batch after a timeout or an unavailable cluster.

The writer thread can run below the loop's CPU priority (``StepLogConfig.writer_nice``, from
``synctrain.driver.coord.STEPLOG_NICE`` as for the embedded nodes; 0 by default: measured, a
lower priority bought the loop nothing).
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from coordinator.steplog import LIVE_CHECKPOINTS
from synctrain import checkpoint as ckpt
from synctrain.digest import flip_bit, replicated_state, state_digest
from synctrain.steplog import Fenced, StepLog

if TYPE_CHECKING:  # pragma: no cover
    from synctrain.context import Session

log = logging.getLogger(__name__)

#: K, ``max_uncommitted_steps``: how many optimizer steps a worker may run ahead of its
#: committed step records (the Trainer's default, defined here so that :class:`StepLogConfig`
#: shares it; benchmarks/steplog_overhead.py measures the choices). 2048 with a commit every
#: FLUSH_INTERVAL_S: a fast loop's urge (URGE_AT of K) then comes no sooner than the interval.
DEFAULT_MAX_UNCOMMITTED_STEPS = 2048

#: Longest the writer holds a batch open after its last commit while nothing waits on it
#: (K > 0): each commit costs CPU on three coordinator nodes, which share the machine with
#: training (~5 ms over the three for a fast loop's batch), so fast steps are committed every
#: 2 s. A batch goes at once when it is urgent: K = 0, a loop held by the K bound, a flush, or
#: URGE_AT of K uncommitted. It was 1 s, with K = 1024: a commit every 2 s took the sync
#: digits MLP's step log from 1.7% to 1.4% of the machine's CPU (docs/steplog-cost-history.md).
FLUSH_INTERVAL_S = 2.0
#: The share of K uncommitted at which a worker's batch goes at once. The quarter of K left is
#: the commit's head start on the K bound: 512 steps at the default K, two thirds of a second
#: for the digits MLP's 800 steps a second, where a commit takes ~10 ms. It was a half: then
#: that MLP committed before the flush interval, more often than it had to, each commit
#: costing CPU on three coordinator nodes beside the training.
URGE_AT = 0.75
#: Pause after a failed commit before the writer tries again.
RETRY_BACKOFF_S = 0.2
#: Records the writer keeps queued at most; beyond, the step boundary waits (K bounds it first).
MAX_QUEUED = 100_000
#: Queued items one commit takes at most (steps, reports, digests: under the step log's
#: MAX_RECORDS_PER_BATCH and MAX_REPORTS_PER_BATCH), and checkpoints: a backlog (after the
#: coordinator was unavailable, or with a large K) goes in several commits, one after another.
MAX_BATCH_ITEMS = 4_000
MAX_BATCH_CHECKPOINTS = 64
#: Rank 0 sends this many or more consecutive steps that carry nothing but their time (and PS
#: clock) as one *run* record (see :mod:`coordinator.steplog`): each replica applies it as a loop
#: over two lists instead of a map per step, and the batch is a third of the bytes.
RUN_MIN = 4
#: Pruned checkpoint files rank 0's writer keeps to write the next ones over (see
#: :func:`synctrain.checkpoint.write`), at most, and their bytes at most: enough for a fast
#: loop's checkpoints between two commits (a commit prunes as many as the one before wrote),
#: and little disk (a checkpoint too large for the bound is never written several times a
#: second, so it gains nothing from a spare: it is deleted, as before).
MAX_SPARE_FILES = 8
MAX_SPARE_BYTES = 64 << 20
#: Of the checkpoints one commit carries, only this many newest are written. Without replica
#: digests (async mode, ``digest_every=0``) the log keeps LIVE_CHECKPOINTS live, so the commit
#: would prune the others at once. With digests the log also keeps those whose verdict is open,
#: and a rollback after a mismatch restores the newest one the digests vouch for: with only a
#: commit's newest two written, that one can be up to a commit's worth of steps older (a fast
#: loop's: the digits MLP's commit carries ~16 checkpoints at ``checkpoint_every=100``; a slow
#: loop's commit carries one, so nothing changes for it). A mismatch is rare, and rank 0 writing
#: every checkpoint, eight files a second for that MLP, was a third of its log's cost.
WRITTEN_PER_COMMIT = LIVE_CHECKPOINTS


class WorkerFencedError(RuntimeError):
    """This worker belongs to a generation the job has replaced; it must stop."""


class RunStopped(RuntimeError):
    """The driver stopped this run (to roll the job back); the worker stays for the next one."""


@dataclasses.dataclass(frozen=True)
class StepLogConfig:
    """What a worker needs to write the job's step log (the token never appears in a repr)."""

    endpoints: tuple[str, ...]
    token: bytes = dataclasses.field(repr=False)
    job: str = ""
    job_dir: str = ""
    max_uncommitted_steps: int = DEFAULT_MAX_UNCOMMITTED_STEPS
    checkpoint_every: int = 100
    checkpoint_every_s: float | None = None
    shard_optimizer: bool = False
    digest_every: int = 0  # digest the replicated (sync) or pulled (async) state every N steps (0: never)
    writer_nice: int = 0  # the writer thread runs this far below the loop's CPU priority (Linux)
    # Test hook: {"rank", "step"[, "bit", "generation"]}: flip a bit of that rank's parameters
    # right after that step (of generation 1 unless told), as a silent corruption would.
    flip_bits: dict[str, int] | None = None


class StepBoundary:
    """Per worker and generation; see the module doc."""

    def __init__(self, cfg: StepLogConfig, rank: int, generation: int, mode: str) -> None:
        self.cfg = cfg
        self.rank = rank
        self.generation = generation
        self.mode = mode
        self.committed_step = -1  # unknown until the first commit; set by the driver's start step
        # The newest step in a batch the writer took: committed, or in flight (never below
        # committed_step). The urge counts from it: counted from committed_step, every step
        # during a commit urged the next one, and a fast loop made two commits where one would do.
        self.sent_step = -1
        self.last_checkpoint_t = time.monotonic()
        self.pending: dict[str, Any] | None = None  # a checkpoint due at the next step's start
        self.pending_digest: int | None = None  # the step whose digest is due at its capture point
        self.last_digest_step = -1
        self.pulled: dict[str, Any] | None = None  # async: the check made in the step under way
        self.wait_s = 0.0  # the loop's time held by the K bound
        # The loop's time in this boundary, wait_s included: records queued, checkpoint
        # captures, digests' copies (the step log's cost on the loop's own thread)
        self.loop_s = 0.0
        self.stop_reason: str | None = None  # the driver asked this run to stop
        self.urge_at = max(1, int(cfg.max_uncommitted_steps * URGE_AT))
        # read on every step: plain attributes
        self.k = cfg.max_uncommitted_steps
        self.is_async = mode == "async"
        self.checkpoint_every = cfg.checkpoint_every
        self.checkpoint_every_s = cfg.checkpoint_every_s
        self.sync_digest_every = cfg.digest_every if mode == "sync" else 0
        self.writer = _Writer(self)
        self.writer.start()

    def start_at(self, step: int) -> None:
        self.committed_step = self.sent_step = step

    # ---- called by the session ---------------------------------------------------------
    def on_report(self, seq: int, step: int, record: dict[str, Any]) -> None:
        if self.rank == 0:
            self.writer.put(("report", step, seq, record))

    def after_step(self, session: Session) -> None:
        # Runs on the loop's thread after every optimizer step, so its common path is kept
        # short: one queued tuple, a few comparisons (a fast digits MLP step is ~0.6 ms).
        started = time.perf_counter()
        try:
            step = session.optimizer_steps
            writer = self.writer
            record = ("step", step, time.time(), getattr(session.strategy, "clock", None) if self.is_async else None)
            if self.pulled is None:
                writer.put_step(record)
            else:  # in the same batch as its step
                writer.put(record, ("pulled", step, self.pulled))
                self.pulled = None
            if step - self.sent_step >= self.urge_at and not writer.urgent:
                writer.urge()  # URGE_AT of K uncommitted: commit now, before the loop has to wait
            if self.cfg.flip_bits:
                self._maybe_flip_bits(session, step)
            # Both taken at this step's capture point (the next batch handed out: the iteration
            # is over, an LR scheduler stepped, its reports made), or failing that (no prepared
            # loader) at the start of the next optimizer step.
            every = self.checkpoint_every
            if (every and step % every == 0) or (self.checkpoint_every_s is not None and self._seconds_due()):
                self.pending = {"step": step}
                self.last_checkpoint_t = time.monotonic()
            every = self.sync_digest_every
            if every and step % every == 0:
                self.pending_digest = step
            if step - self.committed_step > self.k or writer.fenced or self.stop_reason is not None:
                self._hold(session, step)
        finally:
            self.loop_s += time.perf_counter() - started

    def note_pulled(self, step: int, versions: list[int], served: list[str], held: list[str]) -> None:
        """Async: the strategy compared what it holds with what the shards served, before
        sending the gradients of ``step``; the check rides on that step's record."""
        self.pulled = {"versions": versions, "served": served, "held": held}
        if served != held:
            log.warning("rank %d, step %d: pulled parameters differ from what the shards served "
                        "(versions %s)", self.rank, step, versions)

    def at_capture_point(self, session: Session) -> None:
        self._at_capture(session, session.capture_positions, session.capture_report_seq)

    def before_step(self, session: Session) -> None:
        """At the start of an optimizer step: what no capture point has taken."""
        self._at_capture(session, session.step_positions, session.report_seq)

    def at_loop_end(self, session: Session) -> None:
        """The loop returned: with digests on, its last step is digested now, due or not (no
        capture point follows, and every rank ends at the same step), so the final parameters
        are checked too. A checkpoint is not taken."""
        step = session.optimizer_steps
        self.pending_digest = None
        if self.mode == "sync" and self.cfg.digest_every and step > 0 and step != self.last_digest_step:
            self.last_digest_step = step
            self.writer.put(("digest", step, replicated_state(session.models)))

    def _at_capture(self, session: Session, positions: list, report_seq: int) -> None:
        step = session.optimizer_steps
        if (self.pending is None or self.pending["step"] != step) and self.pending_digest != step:
            return  # nothing due: the common case, twice a step
        started = time.perf_counter()
        try:
            self._capture_due(session, positions, report_seq)
        finally:
            self.loop_s += time.perf_counter() - started

    def _capture_due(self, session: Session, positions: list, report_seq: int) -> None:
        step = session.optimizer_steps
        doc = None
        if self.pending is not None and self.pending["step"] == step:
            doc = self._take_checkpoint(session, positions, report_seq)
        if self.pending_digest == step:
            self.pending_digest, self.last_digest_step = None, step
            state = replicated_state(session.models, doc["models"] if doc is not None else None)
            self.writer.put(("digest", step, state))  # hashed on the writer's thread

    def _take_checkpoint(self, session: Session, positions: list, report_seq: int,
                         ) -> dict[str, Any] | None:
        pending, self.pending = self.pending, None
        assert pending is not None
        if self.cfg.shard_optimizer:  # ZeRO-1: every rank sends its shard to rank 0 (a collective)
            for opt in session.optimizers:
                opt.consolidate_state_dict(to=0)
        if self.rank != 0:
            return None
        doc = capture(session, self.generation, later=True)
        doc.update(loaders=[list(p) for p in positions], report_seq=report_seq)
        self.writer.put(("checkpoint", pending["step"], doc))
        return doc

    def _maybe_flip_bits(self, session: Session, step: int) -> None:
        """The test hook ``flip_bits`` (see :class:`StepLogConfig`); says what it did."""
        flip = self.cfg.flip_bits
        if (not flip or flip["rank"] != self.rank or flip["step"] != step
                or flip.get("generation", 1) != self.generation):
            return
        what = flip_bit(session.models, int(flip.get("bit", 22)))
        log.warning("INJECT flip_bits on rank %d at step %d of generation %d: %s", self.rank,
                    step, self.generation, what)

    def _seconds_due(self) -> bool:
        """``checkpoint_every_s`` has passed since the last checkpoint (rank 0 alone decides;
        not with ZeRO-1, whose consolidation every rank must join at the same step)."""
        if self.checkpoint_every_s is None or self.cfg.shard_optimizer or self.rank != 0:
            return False
        return time.monotonic() - self.last_checkpoint_t >= self.checkpoint_every_s

    def _hold(self, session: Session, step: int) -> None:
        """Wait while more than K steps are uncommitted; raise if this worker was fenced or
        the driver stopped its run."""
        k = self.cfg.max_uncommitted_steps
        if step - self.committed_step > k:
            self.writer.urge()
            started = time.monotonic()
            with self.writer.cond:
                while step - self.committed_step > k and not self.writer.fenced \
                        and self.stop_reason is None:
                    self.writer.cond.wait(0.5)
                    session.touch()  # waiting on the log is not a stall of the loop
            self.wait_s += time.monotonic() - started
        if self.writer.fenced:
            raise WorkerFencedError(
                f"rank {self.rank} of generation {self.generation} was replaced by a newer "
                f"generation (the step log refused its records: {self.writer.fenced}); stopping")
        if self.stop_reason is not None:
            raise RunStopped(f"rank {self.rank} stopped after step {step} at the driver's "
                             f"request: {self.stop_reason}")

    # ---- called by the actor -----------------------------------------------------------
    def set_generation(self, generation: int) -> None:
        with self.writer.cond:
            self.generation = generation
            self.writer.cond.notify_all()

    def request_stop(self, reason: str) -> None:
        """Stop at the next step boundary (:class:`RunStopped`); a wait on the log ends too."""
        with self.writer.cond:
            self.stop_reason = reason
            self.writer.cond.notify_all()

    def metrics(self) -> dict[str, Any]:
        """This run's step-log figures for ``Result.worker_metrics``: commits made (each one
        Raft commit of a batch), commits that failed and were retried, seconds the loop waited
        on the log (more than K steps uncommitted), and seconds the loop's thread spent in the
        step boundary in all (those waits, queueing records, capturing checkpoints); and how many
        checkpoints were written over a pruned one's file, and how many were left unwritten
        because a newer two in the same commit superseded them (rank 0)."""
        return {"steplog_commits": self.writer.commits, "steplog_failed_commits": self.writer.failed_commits,
                "steplog_reused_files": self.writer.reused_files,
                "steplog_skipped_checkpoints": self.writer.skipped_checkpoints,
                "steplog_wait_s": round(self.wait_s, 3), "steplog_loop_s": round(self.loop_s, 3)}

    def flush(self, timeout_s: float) -> bool:
        """Commit everything queued; True when done within ``timeout_s``."""
        return self.writer.flush(timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        self.writer.stop(timeout_s)


def capture(session: Session, generation: int, *, later: bool = False) -> dict[str, Any]:
    """A checkpoint document of ``session`` as of its last step boundary (every tensor copied).

    Called right after a step (a checkpoint) or after a failed run (a peer heal), when the
    models and optimizers still hold the state of that boundary. ``later`` (async mode): the
    shards' state may be a :class:`Later`, snapshotted now and fetched by :func:`resolve` (the
    writer does, off the loop's thread)."""
    strategy = session.strategy
    positions, report_seq = session.handed_on_state()
    doc: dict[str, Any] = {
        "step": session.optimizer_steps,
        "generation": generation,
        "mode": session.context.mode,
        "report_seq": report_seq,
        "loaders": [list(p) for p in positions],
        "rng": ckpt.capture_rng(),
        "registered": {name: _clone(obj.state_dict()) for name, obj in session.registered.items()},
        "models": [_clone(getattr(m, "module", m).state_dict()) for m in session.models],
        "optimizers": [],
        "strategy": {},
    }
    if session.context.mode != "async":
        doc["optimizers"] = [_clone(opt.state_dict()) for opt in session.optimizers]
    elif strategy is not None:
        fetch = strategy.state_dict_later() if later and hasattr(strategy, "state_dict_later") else None
        doc["strategy"] = Later(fetch) if fetch is not None else _clone(strategy.state_dict())
    return doc


class Later:
    """A part of a checkpoint document taken now and fetched later (see :func:`resolve`)."""

    def __init__(self, fetch: Callable[[], Any]) -> None:
        self.fetch = fetch


def resolve(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with every :class:`Later` value fetched, in place; raises what a fetch raised."""
    for key, value in doc.items():
        if isinstance(value, Later):
            doc[key] = value.fetch()
    return doc


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


class _Writer(threading.Thread):
    """Commits queued step records and checkpoints, in order, in batches (see module doc)."""

    def __init__(self, boundary: StepBoundary) -> None:
        super().__init__(name=f"steplog-writer-{boundary.rank}", daemon=True)
        self.b = boundary
        self.cond = threading.Condition()
        self.queue: deque[tuple] = deque()
        self.inflight = 0
        self.fenced: str | None = None
        self.urgent = False
        self.fetch_due = False  # a queued checkpoint holds a Later: fetch it now, commit later
        self.k0 = boundary.cfg.max_uncommitted_steps == 0  # every put is urgent
        self.stopping = False
        self.failed_commits = 0
        self.commits = 0
        self.steplog = StepLog(list(boundary.cfg.endpoints), boundary.cfg.token, boundary.cfg.job)
        self.spares: list[tuple[pathlib.Path, int]] = []  # pruned checkpoints to write over, sizes (this thread's)
        self.spare_bytes = 0
        self.reused_files = 0
        self.skipped_checkpoints = 0  # superseded in their own commit, so never written (see WRITTEN_PER_COMMIT)

    def put(self, *items: tuple) -> None:
        with self.cond:
            while len(self.queue) >= MAX_QUEUED and not self.fenced:
                self.urgent = True
                self.cond.wait(0.5)
            was_empty = not self.queue
            self.queue.extend(items)
            if self.b.cfg.max_uncommitted_steps == 0:
                self.urgent = True
            later = any(item[0] == "checkpoint" and _unfetched(item) for item in items)
            self.fetch_due = self.fetch_due or later
            if was_empty or self.urgent or later:  # else the writer is awake, or holding the batch open
                self.cond.notify_all()

    def put_step(self, item: tuple) -> None:
        """:meth:`put` for one step record, the loop's every step: the same, minus what a step
        record never needs (no checkpoint to fetch in it)."""
        if self.k0 or len(self.queue) >= MAX_QUEUED:
            self.put(item)  # the slow path: commit at once (K = 0), or wait for room
            return
        with self.cond:
            was_empty = not self.queue
            self.queue.append(item)
            if was_empty or self.urgent:  # else the writer is awake, or holding the batch open
                self.cond.notify_all()

    def urge(self) -> None:
        with self.cond:
            self.urgent = True
            self.cond.notify_all()

    def flush(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            self.urgent = True
            self.cond.notify_all()
            while (self.queue or self.inflight) and not self.fenced:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.5))
                self.urgent = True
        return not self.fenced

    def stop(self, timeout_s: float) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.join(timeout_s)
        self.steplog.close()
        if not self.is_alive():
            for spare, _ in self.spares:
                ckpt.remove(str(spare))
            self.spares.clear()
            self.spare_bytes = 0

    def run(self) -> None:
        if self.b.cfg.writer_nice:
            # imported only when asked (off by default)
            from coordinator.cluster import lower_thread_priority

            lower_thread_priority(self.b.cfg.writer_nice)
        last_flush = 0.0
        while True:
            with self.cond:
                while not self.queue and not self.stopping:
                    self.cond.wait(0.5)
                if self.stopping and not self.queue:
                    return
                if self.fenced:
                    self.queue.clear()
                    self.cond.notify_all()
                    if self.stopping:
                        return
                    continue
                # Hold the batch open for FLUSH_INTERVAL_S since the last commit (a put's
                # notify wakes this wait: it waits again, unless a commit is urgent now)
                deadline = last_flush + FLUSH_INTERVAL_S
                while (not self.urgent and not self.stopping and not self.fetch_due
                       and (left := deadline - time.monotonic()) > 0):
                    self.cond.wait(left)
                docs = None
                if self.fetch_due:  # fetched at once, committed with the batch: until fetched, a
                    # checkpoint's shard state lives only in the shards, which may die
                    self.fetch_due = False
                    if not (self.urgent or self.stopping or time.monotonic() >= deadline):
                        docs = [item[2] for item in self.queue if item[0] == "checkpoint" and _unfetched(item)]
            if docs is not None:  # then back to holding the batch open
                for doc in docs:
                    _fetch(doc, self.b.rank)
                continue
            with self.cond:
                if not self.queue:
                    continue
                batch = self._take_batch()
                self.inflight = len(batch)
                last = next((item[1] for item in reversed(batch) if item[0] == "step"), None)
                if last is not None and last > self.b.sent_step:
                    self.b.sent_step = last
                self.urgent = bool(self.queue)  # a backlog: the rest goes at once
                generation = self.b.generation
            last_flush = time.monotonic()
            ok = self._commit(batch, generation)
            with self.cond:
                self.inflight = 0
                if not ok and not self.fenced:
                    self.queue.extendleft(reversed(batch))  # idempotent: re-sent as is
                    self.b.sent_step = self.b.committed_step
                self.cond.notify_all()
            if not ok and not self.fenced:
                time.sleep(RETRY_BACKOFF_S)

    def _take_batch(self) -> list[tuple]:
        """The oldest queued items, up to the bounds of one commit (under ``cond``)."""
        batch: list[tuple] = []
        checkpoints = 0
        while self.queue and len(batch) < MAX_BATCH_ITEMS:
            if self.queue[0][0] == "checkpoint":
                if checkpoints == MAX_BATCH_CHECKPOINTS:
                    break
                checkpoints += 1
            batch.append(self.queue.popleft())
        return batch

    def _commit(self, batch: list[tuple], generation: int) -> bool:
        # digests as text, in place: a batch that fails is queued again as it is now
        batch[:] = [("digest", item[1], state_digest(item[2]))
                    if item[0] == "digest" and not isinstance(item[2], str) else item for item in batch]
        self._skip_superseded(batch)
        try:
            # Each checkpoint written durably first, then the records and the checkpoints'
            # references in one commit (the log records the references after the steps they
            # cover): a batch costs one Raft commit, however many checkpoints it holds.
            for i, item in enumerate(batch):
                if item[0] == "checkpoint" and len(item) == 3:  # written once, and its copies of
                    # the tensors let go: a batch sent again reuses the reference
                    if not _fetch(item[2], self.b.rank):
                        batch[i] = ("dropped",)
                        continue
                    batch[i] = ("checkpoint", item[1], None, self._write_checkpoint(item, generation))
            batch[:] = [item for item in batch if item[0] != "dropped"]
            refs = [item[3] for item in batch if item[0] == "checkpoint"]
            self._send_records([item for item in batch if item[0] != "checkpoint"], generation, refs)
            self.commits += 1
            return True
        except Fenced as exc:
            with self.cond:
                if self.b.generation != generation:  # told of a newer generation meanwhile
                    return False
                self.fenced = str(exc) or "fenced"
            log.warning("rank %d: the step log fenced this worker off: %s", self.b.rank, exc)
            return False
        except Exception as exc:  # noqa: BLE001 - unavailable cluster, timeouts: retry
            self.failed_commits += 1
            log.info("rank %d: step-log commit failed (%s: %s); retrying", self.b.rank,
                     type(exc).__name__, exc)
            return False

    def _skip_superseded(self, batch: list[tuple]) -> None:
        """Drop, in place, the batch's checkpoints older than its WRITTEN_PER_COMMIT newest,
        unwritten: the commit that would record them would prune them too."""
        at = [i for i, item in enumerate(batch) if item[0] == "checkpoint"]
        superseded = [i for i in at[:-WRITTEN_PER_COMMIT] if len(batch[i]) == 3]  # not written yet
        for i in superseded:
            batch[i] = ("dropped",)
        if superseded:
            batch[:] = [item for item in batch if item[0] != "dropped"]
            self.skipped_checkpoints += len(superseded)

    def _send_records(self, items: list[tuple], generation: int,
                      refs: list[dict[str, Any]] | None = None) -> None:
        records = (_records(items) if self.b.rank == 0 else _progress(items)) if items else []
        if not records and not refs:
            return
        last = max((r["step"] for r in records), default=None)
        answer = self.steplog.steps(generation, self.b.rank, _runs(records) if self.b.rank == 0 else records,
                                    refs)
        for path in answer.get("prune", ()):
            self._retire(path)
        if last is not None:
            with self.cond:
                self.b.committed_step = max(self.b.committed_step, last)

    def _retire(self, path: str) -> None:
        """A checkpoint the log pruned: kept as a spare for the next one to be written over, or
        deleted."""
        pruned = pathlib.Path(path)
        try:
            size = pruned.stat().st_size
        except OSError:
            return  # gone already
        if (len(self.spares) < MAX_SPARE_FILES and self.spare_bytes + size <= MAX_SPARE_BYTES
                and pruned.parent == pathlib.Path(self.b.cfg.job_dir)):
            spare = ckpt.make_spare(pruned)
            if spare is not None:
                self.spares.append((spare, size))
                self.spare_bytes += size
            return
        ckpt.remove(path)

    def _write_checkpoint(self, item: tuple, generation: int) -> dict[str, Any]:
        """Write a queued checkpoint durably (over a spare file, when there is one); its
        reference for the log."""
        _, step, doc = item
        directory = pathlib.Path(self.b.cfg.job_dir)
        spare = None
        if self.spares:
            spare, size = self.spares.pop()
            self.spare_bytes -= size
            self.reused_files += spare.exists()
        ref = ckpt.write(directory, ckpt.checkpoint_name(step, generation), ckpt.encode(doc), spare)
        ref.update(step=step, time=time.time(), digest=state_digest(checkpoint_state(doc)))
        return ref


def _unfetched(item: tuple) -> bool:
    """A queued checkpoint whose document still holds a :class:`Later`."""
    return len(item) == 3 and any(isinstance(v, Later) for v in item[2].values())


def _fetch(doc: dict[str, Any], rank: int) -> bool:
    """Fetch ``doc``'s :class:`Later` parts (:func:`resolve`); False if the checkpoint is lost.

    A fetch that fails (a shard died before its snapshot was fetched) loses that checkpoint:
    the job goes on, and a restore takes the one before (a dead shard fails the run anyway)."""
    if "dropped" in doc:
        return False
    try:
        resolve(doc)
        return True
    except Exception as exc:  # noqa: BLE001 - see above
        doc["dropped"] = f"{type(exc).__name__}: {exc}"
        log.warning("rank %d: checkpoint of step %s dropped: its parameter-server snapshots could not be "
                    "fetched (%s)", rank, doc.get("step"), doc["dropped"])
        return False


def checkpoint_state(doc: dict[str, Any]) -> Any:
    """What a checkpoint's digest covers: the models (sync) or the shards' state (async)."""
    return doc["strategy"] if doc.get("mode") == "async" else doc["models"]


def _records(items: list[tuple]) -> list[dict[str, Any]]:
    """Rank 0's queued steps, reports and digests as step-log records (reports and digests
    ride on their step's record, or on a record of their own if it went in an earlier batch)."""
    records: list[dict[str, Any]] = []
    for item in items:
        if item[0] == "step":
            _, step, t, ps_clock = item
            records.append({"step": step, "time": t, "reports": [], "ps_clock": ps_clock})
        elif item[0] in ("digest", "pulled"):
            _, step, value = item
            if not records or records[-1]["step"] != step:
                records.append({"step": step, "time": time.time(), "reports": []})
            records[-1][item[0]] = value
        else:
            _, step, seq, metrics = item
            if not records or records[-1]["step"] != step:
                records.append({"step": step, "time": time.time(), "reports": []})
            records[-1]["reports"].append({"seq": seq, "metrics": metrics})
    return records


_PLAIN_KEYS = frozenset({"step", "time", "reports", "ps_clock"})


def _runs(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``records`` with every stretch of RUN_MIN or more consecutive steps that carry nothing
    but their time and PS clock sent as one run ``{"run": first, "times"[, "ps_clocks"]}``."""
    out: list[dict[str, Any]] = []
    plain: list[dict[str, Any]] = []

    def close() -> None:
        if len(plain) >= RUN_MIN:
            run: dict[str, Any] = {"run": plain[0]["step"], "times": [r["time"] for r in plain]}
            clocks = [r.get("ps_clock") for r in plain]
            if any(c is not None for c in clocks):
                run["ps_clocks"] = clocks
            out.append(run)
        else:
            out.extend(plain)
        plain.clear()

    for rec in records:
        if rec.get("reports") or not _PLAIN_KEYS.issuperset(rec):
            close()
            out.append(rec)
            continue
        if plain and rec["step"] != plain[-1]["step"] + 1:
            close()
        plain.append(rec)
    close()
    return out


def _progress(items: list[tuple]) -> list[dict[str, Any]]:
    """Another rank's queued items as records: its digests and pulled checks, and the last
    step it reached."""
    out = [{"step": item[1], "time": time.time(), item[0]: item[2]}
           for item in items if item[0] in ("digest", "pulled")]
    steps = [(item[1], item[2]) for item in items if item[0] == "step"]
    if steps:
        out.append({"step": steps[-1][0], "time": steps[-1][1]})
    return out
