"""Value types the node hands to its driver, its configuration, and its errors."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .messages import ConfState, Entry, HardState, Message, Snapshot

__all__ = ["Config", "Role", "SoftState", "ReadState", "Ready", "PeerStatus", "Status",
           "RaftError", "ProposalDropped", "LocalProtocolError"]


class Role(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre-candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass
class Config:
    """Node settings. Election timeout is randomized in ``[election_tick, 2*election_tick)``.

    Additions to the API contract: ``max_committed_size_per_ready`` bounds the bytes of
    committed entries one Ready hands out; ``max_pending_read_index`` bounds queued reads;
    ``commit_broadcast=False`` lets a new commit index wait for the next APPEND or heartbeat;
    ``recovering=True`` starts a node that lost its disk (see the field's comment).
    """

    id: int
    election_tick: int = 10
    heartbeat_tick: int = 1
    max_size_per_msg: int = 1 << 20
    max_inflight_msgs: int = 256
    pre_vote: bool = True
    check_quorum: bool = True
    max_uncommitted_entries_size: int = 0  # 0 = no limit
    applied: int = 0
    max_committed_size_per_ready: int = 1 << 26
    max_pending_read_index: int = 4096
    # False: a commit index that moved is not broadcast in empty APPENDs of its own; it rides
    # on the next APPEND or heartbeat (followers learn it within a heartbeat). Saves a message
    # and its answer per follower per commit; etcd's raft broadcasts (the default here).
    commit_broadcast: bool = True
    # True: this node lost its durable state (an empty or replaced disk) and restarts under an
    # id the cluster knows. It may have voted in a term it no longer remembers and held
    # entries that were counted toward a commit, so it neither votes, pre-votes nor campaigns
    # until a leader has repaired it (protocol-aware recovery, Alagappan et al., FAST 2018):
    # see RaftNode.recovering. The driver must keep passing True across restarts until the
    # node reports the repair finished (Status.recovering False, after the Ready is durable).
    recovering: bool = False

    def validate(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"invalid raft Config: {what}")

        need(self.id > 0, f"id must be > 0 (0 means 'nobody'), got {self.id}")
        need(self.heartbeat_tick > 0, f"heartbeat_tick must be > 0, got {self.heartbeat_tick}")
        need(self.election_tick > self.heartbeat_tick,
             f"election_tick ({self.election_tick}) must exceed heartbeat_tick ({self.heartbeat_tick})")
        need(self.max_inflight_msgs > 0, "max_inflight_msgs must be > 0")
        need(self.max_size_per_msg > 0, "max_size_per_msg must be > 0")
        need(self.max_uncommitted_entries_size >= 0, "max_uncommitted_entries_size must be >= 0")
        need(self.applied >= 0, "applied must be >= 0")
        need(self.max_committed_size_per_ready > 0, "max_committed_size_per_ready must be > 0")
        need(self.max_pending_read_index > 0, "max_pending_read_index must be > 0")


@dataclass(frozen=True)
class SoftState:
    leader_id: int
    role: Role


@dataclass(frozen=True)
class ReadState:
    """A ReadIndex answer: once ``applied >= index`` a read tagged ``context`` is linearizable."""

    index: int
    context: bytes


@dataclass
class Ready:
    """One batch of work for the driver. Persist ``snapshot``, ``entries`` and ``hard_state``
    first; only then send ``messages``; apply ``committed_entries`` in order; then
    ``node.advance(ready)``. ``dropped_reads`` (an addition to the contract) lists the contexts
    of this node's ReadIndex requests that were abandoned (e.g. the leader was deposed): the
    client should retry them elsewhere. ``notices`` (an addition too) are one-line reports of
    events an operator must see -- a follower that lost entries it had acknowledged, a repair
    that finished -- which the core, having no I/O, cannot log itself: log each at WARNING.
    Each is also counted in ``Status.dropped`` under a stable key."""

    soft_state: SoftState | None = None
    hard_state: HardState | None = None
    entries: list[Entry] = field(default_factory=list)
    snapshot: Snapshot | None = None
    committed_entries: list[Entry] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    read_states: list[ReadState] = field(default_factory=list)
    dropped_reads: list[bytes] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)

    def must_sync(self) -> bool:
        """True when something must be made durable before the messages may go out."""
        return bool(self.entries) or self.hard_state is not None or self.snapshot is not None


@dataclass(frozen=True)
class PeerStatus:
    match: int
    next: int
    state: str
    is_learner: bool
    inflight: int


@dataclass(frozen=True)
class Status:
    id: int
    role: Role
    term: int
    vote: int
    leader_id: int
    commit: int
    applied: int
    last_index: int
    conf_state: ConfState
    progress: dict[int, PeerStatus]  # only filled on a leader
    dropped: dict[str, int]  # messages/requests dropped by a defined rule, by reason
    lead_transferee: int = 0
    recovering: bool = False  # started with Config.recovering and not yet repaired


class RaftError(Exception):
    """Base of the errors the Raft core raises to its caller."""


class ProposalDropped(RaftError):
    """The request was not accepted here; ``leader_hint`` names the leader (0 = unknown).
    Retry at the leader, or later."""

    def __init__(self, reason: str, leader_hint: int = 0) -> None:
        hint = f"; try node {leader_hint}" if leader_hint else "; no leader known, retry later"
        super().__init__(f"proposal dropped: {reason}{hint}")
        self.reason = reason
        self.leader_hint = leader_hint


class LocalProtocolError(RaftError):
    """The caller used the node wrongly (a bug in the driver, not in a peer)."""
