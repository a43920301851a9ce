"""The recovery policy: failures in, a decision out. Pure — no Ray, no clock, no I/O.

Theory of operation. The driver (:mod:`synctrain.driver.shell`) observes the job — worker
outcomes, progress polls, the liveness of parameter-server shards and coordinator nodes — and
turns what it sees into :class:`Failure` events. For each fault it asks
:meth:`RecoveryPolicy.decide`, which returns one :class:`Decision`; the driver only carries it
out (kill, replace, restore, restart). Keeping the decision here, as the Raft core keeps
consensus apart from sockets, lets every path be tested from a script of events
(``tests/train/test_policy.py``) without starting anything.

The paths, one per kind of failure:

* a worker died, stalled (then it is killed: a stall is handled as a death) or its loop
  raised:
  - sync mode, ``recovery="auto"``: **heal from a live peer** — the surviving ranks hold
    identical committed state; the one that got furthest (a rank is at most one step ahead
    of another) hands its state to the others and to the replacement, so at most the step in
    flight is redone. Not possible when no survivor's state is whole (the failure tore an
    optimizer step, or no rank survived) or when the optimizer state is sharded over ranks
    (ZeRO-1: a dead rank took its shard with it) — then:
  - **restore the last committed checkpoint** (also always with ``recovery="checkpoint"``);
  - async mode: **continue** — the survivors never stop; the dead rank's clock is released
    and a replacement joins from the shards' current parameters;
* a parameter-server shard died: restore the last committed checkpoint (parameters and
  optimizer state of every shard, consistently);
* a coordinator node died: **continue** (restart the node from its WAL; no new generation);
* the ranks' parameter digests disagree (sync): **restore the last checkpoint whose digests
  agreed**, on every rank — the odd rank's gradients have been averaged into all of them since
  the corruption, so no live peer holds good state; no process is at fault, none is replaced.
  In async mode the same for a shard that served two different digests for one version (its
  parameters changed with no update): the checkpoint must hold that shard from before it. A
  worker whose pulled copy differed never reaches the policy: it dropped those gradients;
* a configuration error (it would fail again): give up at once;
* more than ``max_failures`` failures in all: give up (``max_failures=0``: the first one).

Membership (elastic jobs), asked by the shell after it tried to carry a decision out:

* no new worker could be placed for a dead rank within the placement timeout (its node is
  gone, the cluster lacks the CPUs or GPUs): **shrink** — the job goes on without that rank
  if at least ``min_workers`` remain (:meth:`RecoveryPolicy.unplaced`), else give up;
* new workers were placed while the job runs with fewer than ``num_workers``: **grow** by as
  many as are missing (:meth:`RecoveryPolicy.capacity`) — at the next checkpoint in sync mode,
  at once in async mode (the shell's part).
"""

from __future__ import annotations

import dataclasses
import enum

#: Failure kinds, as recorded in the step log and ``Result.failures``.
KINDS = ("died", "stalled", "raised", "shard_died", "coordinator_node_died",
         "driver_died", "resumed",  # these two: recorded by a driver taking a job over
         "digest_mismatch")
WORKER_KINDS = ("died", "stalled", "raised")


class Action(enum.Enum):
    GIVE_UP = "give_up"
    HEAL_FROM_PEER = "heal_from_peer"
    RESTORE_CHECKPOINT = "restore_checkpoint"
    CONTINUE = "continue"
    SHRINK = "shrink"
    GROW = "grow"


@dataclasses.dataclass(frozen=True, slots=True)
class Failure:
    """One observed fault. ``fatal``: an error that would happen again (a bad configuration)."""

    kind: str
    rank: int | None = None
    step: int | None = None
    fatal: bool = False
    detail: str = ""

    def __post_init__(self) -> None:
        assert self.kind in KINDS, self.kind


@dataclasses.dataclass(frozen=True, slots=True)
class Survivor:
    """A rank whose process is alive after a failure: where it stopped and whether its state
    is whole (False when the failure hit inside an optimizer step)."""

    rank: int
    step: int | None
    consistent: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    recovery: str  # as recorded: peer | checkpoint | continue | none
    replace: tuple[int, ...] = ()  # ranks that get a new worker
    source_rank: int | None = None  # HEAL_FROM_PEER: whose state everyone continues from
    start_step: int | None = None  # HEAL_FROM_PEER: the step that state is at
    reason: str = ""
    drop: tuple[int, ...] = ()  # SHRINK: ranks the job goes on without
    add: int = 0  # GROW: workers the job takes on


class RecoveryPolicy:
    """See the module doc. ``failures`` counts every failure seen so far."""

    def __init__(self, mode: str, *, max_failures: int = 3, recovery: str = "auto",
                 sharded_state: bool = False, num_workers: int | None = None,
                 min_workers: int | None = None) -> None:
        assert mode in ("sync", "async") and recovery in ("auto", "checkpoint")
        assert max_failures >= 0
        # the job's size and the fewest workers it may go on with (None: it never shrinks)
        self.num_workers = num_workers
        self.min_workers = num_workers if min_workers is None else min_workers
        assert min_workers is None or (num_workers is not None and 1 <= min_workers <= num_workers)
        self.mode = mode
        self.max_failures = max_failures
        self.recovery = recovery
        self.sharded_state = sharded_state  # ZeRO-1: no single rank holds the optimizer state
        self.failures = 0

    def decide(self, failures: list[Failure], survivors: list[Survivor]) -> Decision:
        """The decision for one fault, which may have hit several ranks at once."""
        assert failures, "decide() needs at least one failure"
        self.failures += len(failures)
        fatal = [f for f in failures if f.fatal]
        if fatal:
            return Decision(Action.GIVE_UP, "none", reason=f"{fatal[0].detail or fatal[0].kind} "
                            "(a configuration error: it would fail again)")
        if self.failures > self.max_failures:
            return Decision(Action.GIVE_UP, "none",
                            reason=f"{self.failures} failures, more than max_failures={self.max_failures}")
        kinds = {f.kind for f in failures}
        if kinds == {"coordinator_node_died"}:
            return Decision(Action.CONTINUE, "continue", reason="coordinator node restarted from its WAL")
        dead = tuple(sorted({f.rank for f in failures if f.kind in WORKER_KINDS and f.rank is not None}))
        if "digest_mismatch" in kinds:
            return Decision(Action.RESTORE_CHECKPOINT, "checkpoint", replace=dead,
                            reason="the parameter digests disagree: every rank rolls back to the "
                                   "last checkpoint whose digests agreed" if self.mode == "sync" else
                                   "a shard's parameters changed with no update: every rank rolls back to "
                                   "the newest checkpoint holding that shard from before the change")
        if "shard_died" in kinds:
            return Decision(Action.RESTORE_CHECKPOINT, "checkpoint", replace=dead,
                            reason="a parameter-server shard died: its state comes from the checkpoint")
        if self.mode == "async":
            return Decision(Action.CONTINUE, "continue", replace=dead,
                            reason="async: survivors go on; the replacement joins from the shards")
        return self._sync(dead, survivors)

    def _sync(self, dead: tuple[int, ...], survivors: list[Survivor]) -> Decision:
        if self.recovery == "checkpoint":
            return Decision(Action.RESTORE_CHECKPOINT, "checkpoint", replace=dead,
                            reason="recovery='checkpoint'")
        if self.sharded_state:
            return Decision(Action.RESTORE_CHECKPOINT, "checkpoint", replace=dead,
                            reason="the optimizer state is sharded over ranks (ZeRO-1): no peer holds it all")
        whole = [s for s in survivors if s.consistent and s.step is not None and s.rank not in dead]
        if not whole:
            return Decision(Action.RESTORE_CHECKPOINT, "checkpoint", replace=dead,
                            reason="no surviving rank holds whole state")
        source = max(whole, key=lambda s: (s.step, -s.rank))
        return Decision(Action.HEAL_FROM_PEER, "peer", replace=dead, source_rank=source.rank,
                        start_step=source.step, reason=f"rank {source.rank} hands on its step {source.step}")

    def unplaced(self, ranks: tuple[int, ...], world_size: int) -> Decision:
        """No new worker could be placed for ``ranks`` (of a job of ``world_size``): shrink
        while at least ``min_workers`` remain, else give up."""
        assert ranks and len(ranks) <= world_size
        left = world_size - len(ranks)
        names = ", ".join(map(str, ranks))
        floor = self.min_workers if self.min_workers is not None else world_size
        if left >= floor:
            return Decision(Action.SHRINK, "none", drop=ranks,
                            reason=f"no worker could be placed for rank{'s' * (len(ranks) > 1)} {names}: "
                                   f"the job goes on with {left} of {self.num_workers} workers "
                                   f"(min_workers={floor})")
        return Decision(Action.GIVE_UP, "none",
                        reason=f"no worker could be placed for rank{'s' * (len(ranks) > 1)} {names} (its node "
                               "is gone, or the Ray cluster lacks the CPUs, GPUs or resources a worker asks "
                               f"for) and {left} worker{'s' * (left != 1)} would be fewer than min_workers="
                               f"{floor}: add resources to the cluster, or let the job shrink "
                               "with Trainer(min_workers=...)")

    def capacity(self, world_size: int, ready: int) -> Decision | None:
        """``ready`` new workers are placed while the job runs ``world_size`` workers: grow
        by as many as it misses (None: it misses none)."""
        add = min(ready, (self.num_workers or world_size) - world_size)
        if add <= 0:
            return None
        return Decision(Action.GROW, "none", add=add,
                        reason=f"resources are back: the job grows from {world_size} to {world_size + add} "
                               f"of {self.num_workers} workers")


def blame_stalled(ranks: list[tuple[int, bool, int | None, bool]]) -> list[int]:
    """Which ranks to treat as stalled once some rank made no progress for the stall timeout.

    ``ranks``: every running rank as (rank, still answers polls, step, idle past the timeout).
    When one rank stops, the others soon wait on it (a collective, or the staleness bound) and
    look idle too — possibly idle for longer than it, having waited on it before it stopped.
    So a rank whose process no longer answers (stopped) is the cause, past the timeout or not;
    if all answer, the idle ranks furthest behind are (the others wait for them); if they are
    all level, every idle one is.
    """
    idle = [(rank, step) for rank, _, step, over in ranks if over]
    if not idle:
        return []
    silent = [rank for rank, answers, _, _ in ranks if not answers]
    if silent:
        return sorted(silent)
    steps = [step for _, step in idle if step is not None]
    if not steps:
        return sorted(rank for rank, _ in idle)
    low = min(steps)
    return sorted(rank for rank, step in idle if step is None or step == low)
