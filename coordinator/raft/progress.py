"""What a leader knows about each follower, and the membership configuration.

Theory of operation
-------------------
For every peer the leader keeps a :class:`Progress`: ``match`` (highest index known
replicated there; it only moves forward -- PySyncObj #167 -- with one exception, below) and
``next`` (the next index to send). Flow control is a small state machine (etcd's design):

* ``PROBE``     -- we don't know where the follower's log ends: send one APPEND per
                   heartbeat interval and wait for the answer (``probe_sent``), backing off
                   ``next`` on each rejection using the follower's hint.
* ``REPLICATE`` -- the follower is in sync: send optimistically (pipelining), advancing
                   ``next`` past what was sent, bounded by ``Inflights`` (max messages in
                   flight, freed by acknowledgements).
* ``SNAPSHOT``  -- the entries it needs are compacted: a snapshot is on its way; pause
                   until it is acknowledged or reported failed.

A follower that lost its disk and came back under the same id no longer holds what it
acknowledged. A probe at ``match`` that it rejects proves that (or is a stale duplicate,
which costs one more round trip): :meth:`Progress.regress` then forgets ``match``, so that
``next`` can go below it and the leader repairs the follower from its log or a snapshot.
Without it ``next >= match + 1`` would hold forever and the leader would re-send the same
entry forever (issue 17).

:class:`ProgressTracker` holds the configuration (incoming/outgoing voters for joint
consensus, learners), the progress map, and the votes of the current election.
"""

from __future__ import annotations

import enum
from collections import deque

from . import quorum
from .messages import ConfState

__all__ = ["ProgressState", "Inflights", "Progress", "ProgressTracker"]


class ProgressState(enum.Enum):
    PROBE = "probe"
    REPLICATE = "replicate"
    SNAPSHOT = "snapshot"


class Inflights:
    """A bounded FIFO of the last index of each APPEND in flight to one follower."""

    __slots__ = ("capacity", "_q")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"max_inflight_msgs must be >= 1, got {capacity}")
        self.capacity = capacity
        self._q: deque[int] = deque()

    def add(self, last_index: int) -> None:
        if len(self._q) >= self.capacity:
            raise OverflowError("inflights full: check full() before sending")
        self._q.append(last_index)

    def free_le(self, index: int) -> None:
        """Acknowledge every message whose last index is <= ``index``."""
        q = self._q
        while q and q[0] <= index:
            q.popleft()

    def free_first(self) -> None:
        if self._q:
            self._q.popleft()

    def full(self) -> bool:
        return len(self._q) >= self.capacity

    def count(self) -> int:
        return len(self._q)

    def reset(self) -> None:
        self._q.clear()


class Progress:
    __slots__ = ("match", "next", "state", "pending_snapshot", "recent_active", "probe_sent",
                 "inflights", "is_learner", "snapshot_wait")

    def __init__(self, next_index: int, max_inflight: int, is_learner: bool = False) -> None:
        self.match = 0
        self.next = next_index
        self.state = ProgressState.PROBE
        self.pending_snapshot = 0
        self.recent_active = False
        self.probe_sent = False
        self.inflights = Inflights(max_inflight)
        self.is_learner = is_learner
        self.snapshot_wait = 0  # heartbeat responses seen while in SNAPSHOT state

    def _reset_state(self, state: ProgressState) -> None:
        self.probe_sent = False
        self.pending_snapshot = 0
        self.snapshot_wait = 0
        self.state = state
        self.inflights.reset()

    def become_probe(self) -> None:
        if self.state is ProgressState.SNAPSHOT:
            pending = self.pending_snapshot
            self._reset_state(ProgressState.PROBE)
            self.next = max(self.match + 1, pending + 1)
        else:
            self._reset_state(ProgressState.PROBE)
            self.next = self.match + 1

    def become_replicate(self) -> None:
        self._reset_state(ProgressState.REPLICATE)
        self.next = self.match + 1

    def become_snapshot(self, snapshot_index: int) -> None:
        self._reset_state(ProgressState.SNAPSHOT)
        self.pending_snapshot = snapshot_index

    def maybe_update(self, n: int) -> bool:
        """An acknowledgement up to ``n``: raise match (never lower it); True if it moved."""
        updated = False
        if self.match < n:
            self.match = n
            updated = True
            self.probe_sent = False
        if self.next < n + 1:
            self.next = n + 1
        return updated

    def sent_entries(self, last_index: int, n_entries: int) -> None:
        """Bookkeeping after sending an APPEND that ends at ``last_index``."""
        if self.state is ProgressState.REPLICATE:
            if n_entries:
                self.next = last_index + 1
                self.inflights.add(last_index)
        elif self.state is ProgressState.PROBE:
            self.probe_sent = True

    def maybe_decr_to(self, rejected: int, match_hint: int) -> bool:
        """A rejection of the APPEND at ``rejected``; False if it is stale (ignore it)."""
        if self.state is ProgressState.REPLICATE:
            if rejected <= self.match:
                return False
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False  # not the probe we are waiting for
        self.next = max(min(rejected, match_hint + 1), self.match + 1, 1)
        self.probe_sent = False
        return True

    def regress(self, rejected: int, match_hint: int) -> None:
        """The follower rejected our probe at ``rejected == match``: its log ends below what
        it acknowledged. Forget ``match`` and probe from the follower's hint."""
        assert self.state is ProgressState.PROBE and rejected == self.match, (self, rejected)
        self._reset_state(ProgressState.PROBE)
        self.match = 0
        self.next = max(min(rejected, match_hint + 1), 1)

    def is_paused(self) -> bool:
        if self.state is ProgressState.PROBE:
            return self.probe_sent
        if self.state is ProgressState.REPLICATE:
            return self.inflights.full()
        return True

    def __repr__(self) -> str:
        return (f"Progress(match={self.match}, next={self.next}, state={self.state.value}"
                f"{', learner' if self.is_learner else ''})")


class ProgressTracker:
    """Configuration + per-peer progress + votes. Configuration changes go through
    :mod:`coordinator.raft.confchange`, which builds a new tracker state."""

    def __init__(self, max_inflight: int) -> None:
        self.max_inflight = max_inflight
        self.voters: frozenset[int] = frozenset()
        self.voters_outgoing: frozenset[int] = frozenset()
        self.learners: frozenset[int] = frozenset()
        self.learners_next: frozenset[int] = frozenset()
        self.auto_leave = False
        self.progress: dict[int, Progress] = {}
        self.votes: dict[int, bool] = {}
        self._all_voters: tuple[int, ...] = ()

    # ---- configuration ------------------------------------------------------------------

    def set_config(self, voters, outgoing, learners, learners_next, auto_leave: bool,
                   next_index: int) -> None:
        """Install a configuration; keep the progress of members that stay."""
        self.voters = frozenset(voters)
        self.voters_outgoing = frozenset(outgoing)
        self.learners = frozenset(learners)
        self.learners_next = frozenset(learners_next)
        self.auto_leave = auto_leave
        self._all_voters = tuple(sorted(self.voters | self.voters_outgoing))
        members = self.voters | self.voters_outgoing | self.learners | self.learners_next
        for gone in set(self.progress) - members:
            del self.progress[gone]
        for m in members:
            pr = self.progress.get(m)
            if pr is None:
                pr = self.progress[m] = Progress(next_index, self.max_inflight)
                pr.recent_active = True  # a new member gets a grace period (etcd does the same)
            pr.is_learner = m not in self.voters and m not in self.voters_outgoing

    def conf_state(self) -> ConfState:
        return ConfState(voters=tuple(sorted(self.voters)), learners=tuple(sorted(self.learners)),
                         voters_outgoing=tuple(sorted(self.voters_outgoing)),
                         auto_leave=self.auto_leave, learners_next=tuple(sorted(self.learners_next)))

    @property
    def joint(self) -> bool:
        return bool(self.voters_outgoing)

    def is_voter(self, i: int) -> bool:
        return i in self.voters or i in self.voters_outgoing

    def all_voters(self) -> tuple[int, ...]:
        return self._all_voters

    def is_singleton(self) -> bool:
        return len(self.voters) == 1 and not self.voters_outgoing

    # ---- quorum decisions ---------------------------------------------------------------

    def committed(self) -> int:
        """Largest index replicated on a quorum (joint: on a quorum of both halves)."""
        prs = self.progress

        def acked(i: int) -> int:
            pr = prs.get(i)
            return pr.match if pr is not None else 0

        c = quorum.majority_committed(self.voters, acked)
        if self.voters_outgoing:
            c = min(c, quorum.majority_committed(self.voters_outgoing, acked))
        return c

    def quorum_active(self) -> bool:
        """Did a quorum of voters show signs of life since the last check?"""
        prs = self.progress
        votes = {i: prs[i].recent_active for i in self._all_voters if i in prs}
        return quorum.joint_vote_result(self.voters, self.voters_outgoing,
                                        votes) is quorum.VoteResult.WON

    def reset_votes(self) -> None:
        self.votes = {}

    def record_vote(self, i: int, granted: bool) -> None:
        """Record the first answer of ``i`` in this election; later duplicates are ignored."""
        self.votes.setdefault(i, granted)

    def tally(self) -> quorum.VoteResult:
        return quorum.joint_vote_result(self.voters, self.voters_outgoing, self.votes)
