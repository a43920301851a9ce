"""Raft's safety properties, checked by the simulator after every event.

Theory of operation
-------------------
The checker sees what a real deployment could see: each node's *durable* storage (what the
driver handed to it), its applied entries, and its public status (role, term, commit). It
keeps a little global knowledge to compare nodes with one another:

* Election safety (Raft §5.2): ``leaders[term]`` remembers the first leader seen in a term;
  a second one is a violation.
* Log matching (§5.3), checked incrementally: when a node persists an entry, the pair
  (index, term) must map to the same (previous term, type, data) on every node. By induction
  over indexes, two logs that agree on an (index, term) agree on everything before it.
* State machine safety: ``applied[index]`` is the first entry applied there; any node that
  applies another entry at that index violates it.
* Leader completeness (§5.4): an entry committed in term C is in the log of every leader of
  a term after C. The checker learns that index i is committed when it first sees a node
  with commit index >= i, and notes that node's current term: an upper bound of C (a leader
  commits in its own term; a follower learns the commit from a leader of its current term),
  so the check never blames a stale leader of a term <= C, which may legally lack the
  entry. When a node becomes leader, and whenever indexes become committed, every leader of
  a later term must hold those entries (or a snapshot covering them) in its durable log.
* Monotonic commit: a node's commit index never decreases during one life, and its
  persisted commit never decreases across lives.
* Durable term and vote: the persisted term never decreases and a persisted vote is never
  changed within a term (a node that forgot its vote could vote twice).
* Persist before send, checked on every message as it leaves: its term is durable (PreVote
  traffic excepted: it carries a term not yet adopted), a granted vote is durable, and an
  acknowledged log index is durable. A crash right after the send must not be able to take
  back what the message promised.

With lease clients, :class:`LeaseChecker` adds the lease invariants (its docstring states
them exactly): expiry only on the log clock, never before a holder's acknowledged renewal plus
the TTL, no expiry in a new leader's grace.

Violations raise :class:`InvariantViolation`; the simulator turns it into a report with the
seed and the event trace.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from coordinator.raft.messages import Entry, HardState, Message, MessageType

from .kv import LEASE_EXISTS, LEASE_NOT_FOUND, decode_command

__all__ = ["InvariantChecker", "InvariantViolation", "LeaseChecker"]


class InvariantViolation(AssertionError):
    """A Raft safety property was broken; ``invariant`` names it."""

    def __init__(self, invariant: str, detail: str) -> None:
        super().__init__(f"{invariant}: {detail}")
        self.invariant = invariant
        self.detail = detail


@dataclass
class _NodeView:
    commit: int = 0  # highest commit index seen in the current life
    checked_leader_term: int = -1  # term whose leadership was already checked for completeness


@dataclass
class InvariantChecker:
    leaders: dict[int, int] = field(default_factory=dict)  # term -> leader id
    log_pairs: dict[tuple[int, int], tuple[int, int, bytes]] = field(default_factory=dict)
    applied: dict[int, tuple[int, int, bytes, int]] = field(default_factory=dict)
    # index -> (term of the entry, or None if unseen; upper bound of the term it was committed in)
    committed: dict[int, tuple[int | None, int]] = field(default_factory=dict)
    max_committed: int = 0
    views: dict[int, _NodeView] = field(default_factory=dict)
    checks: int = 0

    # ---- hooks the driver calls ---------------------------------------------------------------

    def on_hard_state(self, node_id: int, old: HardState, new: HardState) -> None:
        """Called before ``new`` replaces ``old`` in the node's durable storage."""
        if new.term < old.term:
            raise InvariantViolation(
                "durable term", f"node {node_id} persisted term {new.term} after {old.term}"
            )
        if new.term == old.term and old.vote and new.vote != old.vote:
            raise InvariantViolation(
                "durable vote",
                f"node {node_id} changed its vote in term {new.term} from {old.vote} to {new.vote}",
            )
        if new.commit < old.commit:
            raise InvariantViolation(
                "monotonic commit",
                f"node {node_id} persisted commit {new.commit} after {old.commit}",
            )

    def on_persisted(self, node_id: int, storage: Any, entries: list[Entry]) -> None:
        """Called after ``entries`` were appended to the node's durable storage."""
        for e in entries:
            if e.index < storage.first_index():
                continue
            prev = storage.term(e.index - 1)
            seen = self.log_pairs.setdefault((e.index, e.term), (prev, int(e.type), e.data))
            if seen != (prev, int(e.type), e.data):
                raise InvariantViolation(
                    "log matching",
                    f"node {node_id} persisted index {e.index} term {e.term} with previous term "
                    f"{prev}, type {int(e.type)}, data {e.data[:40]!r}; another node has previous "
                    f"term {seen[0]}, type {seen[1]}, data {seen[2][:40]!r}",
                )

    def on_send(self, node_id: int, storage: Any, m: Message) -> None:
        """Called as the driver sends ``m``: what it promises must already be durable."""
        if m.type in (MessageType.PRE_VOTE, MessageType.PRE_VOTE_RESP):
            return
        hs = storage.initial_state()[0]
        if m.term > hs.term:
            raise InvariantViolation(
                "persist before send",
                f"node {node_id} sends {m.type.name} to {m.to} in term {m.term} but has "
                f"only term {hs.term} on disk",
            )
        if m.type is MessageType.VOTE_RESP and not m.reject and hs.vote != m.to:
            raise InvariantViolation(
                "persist before send",
                f"node {node_id} grants its term-{m.term} vote to {m.to} but its disk "
                f"records a vote for {hs.vote}",
            )
        if m.type is MessageType.APPEND_RESP and not m.reject and storage.last_index() < m.index:
            raise InvariantViolation(
                "persist before send",
                f"node {node_id} acknowledges index {m.index} to {m.to} but its disk ends "
                f"at {storage.last_index()}",
            )

    def on_apply(self, node_id: int, e: Entry) -> bool:
        """Called as a node applies ``e``; returns True if no node had applied index e.index."""
        mine = (e.term, int(e.type), e.data, node_id)
        seen = self.applied.setdefault(e.index, mine)
        if seen[:3] != mine[:3]:
            raise InvariantViolation(
                "state machine safety",
                f"node {node_id} applied term {e.term} data {e.data[:40]!r} at index {e.index}; "
                f"node {seen[3]} applied term {seen[0]} data {seen[2][:40]!r} there",
            )
        known = self.committed.get(e.index, (None, 0))[0]
        if known is not None and known != e.term:
            raise InvariantViolation(
                "state machine safety",
                f"node {node_id} applied term {e.term} at index {e.index}, but the entry "
                f"committed there has term {known}",
            )
        return seen is mine

    def on_restart(self, node_id: int) -> None:
        self.views[node_id] = _NodeView()

    def after_event(self, nodes: dict[int, Any], storages: dict[int, Any]) -> None:
        """Monotonic commit, election safety and leader completeness over the live nodes.

        ``nodes`` maps id -> live RaftNode (crashed nodes absent); ``storages`` id -> storage.
        """
        self.checks += 1
        newly_committed = self.max_committed + 1
        for nid, node in nodes.items():
            view = self.views.setdefault(nid, _NodeView())
            commit = node.commit_index
            if commit < view.commit:
                raise InvariantViolation(
                    "monotonic commit",
                    f"node {nid} commit index went from {view.commit} to {commit}",
                )
            view.commit = commit
            if commit > self.max_committed:
                self._record_commits(node, storages[nid], commit)
        for nid, node in nodes.items():
            if node.role.name != "LEADER":
                continue
            term, view = node.term, self.views[nid]
            first = self.leaders.setdefault(term, nid)
            if first != nid:
                raise InvariantViolation(
                    "election safety", f"nodes {first} and {nid} are both leader of term {term}"
                )
            if view.checked_leader_term != term:
                view.checked_leader_term = term
                self.check_holds_committed(nid, term, storages[nid], 1)
            elif self.max_committed >= newly_committed:
                self.check_holds_committed(nid, term, storages[nid], newly_committed)

    def _record_commits(self, node: Any, storage: Any, commit: int) -> None:
        lo, last = storage.first_index() - 1, storage.last_index()
        for i in range(self.max_committed + 1, commit + 1):
            entry_term = storage.term(i) if lo <= i <= last else None
            self.committed[i] = (entry_term, node.term)
        self.max_committed = commit

    def check_holds_committed(self, nid: int, term: int, storage: Any, lo: int) -> None:
        """Leader completeness on leader ``nid`` of ``term`` for committed indexes >= ``lo``."""
        first, last = storage.first_index() - 1, storage.last_index()
        for i in range(lo, self.max_committed + 1):
            entry_term, commit_term = self.committed[i]
            if commit_term >= term:
                continue  # possibly committed in this term or later: not required yet
            if i > last:
                raise InvariantViolation(
                    "leader completeness",
                    f"node {nid}, leader of term {term}, has a log ending at {last} but index "
                    f"{i} was committed by term {commit_term}",
                )
            if i >= first and entry_term is not None and storage.term(i) != entry_term:
                raise InvariantViolation(
                    "leader completeness",
                    f"node {nid}, leader of term {term}, holds term {storage.term(i)} at index "
                    f"{i}, but the entry committed there by term {commit_term} has term "
                    f"{entry_term}",
                )


@dataclass
class _LeaseView:
    holder: int
    ttl: int
    renewed: int  # the log clock at its last applied grant or keepalive
    renewed_term: int  # the term of that entry
    acked_from: int | None = None  # invocation time of its holder's last acknowledged renewal
    revoked_at: int | None = None  # sim time its revocation was first applied
    revoked_term: int = 0


@dataclass
class LeaseChecker:
    """The lease invariants (see :mod:`.kv` for the commands, ``coordinator/leases.py`` for
    the rules they mirror). The simulator's clocks: every proposal carries ``ts`` = the
    proposer's wall clock, ``now + offset`` with ``|offset| <= skew`` (``skew`` 0: one
    perfectly synchronized clock; tick-period skew changes when nodes *decide*, never a
    timestamp). The log clock ``C(e)`` at entry ``e`` is the largest ``ts`` up to ``e``.

    The checker keeps an independent model of the leases, fed with each entry the first time
    any node applies it (which happens in index order; every other replica applies the same
    entry, or restores a snapshot of a replica that did), and checks:

    * **Lease safety (log clock)**: an expire entry ``x`` revokes lease ``L`` only if
      ``C(x) - C(r) >= ttl``, ``r`` the last applied grant/keepalive of ``L``; and every
      lease it names that is due that way is revoked (the replicas' answer is the model's).
      A keepalive committed before the expire entry thus saves the lease.
    * **Lease safety (holder)**: a lease whose holder had a grant or keepalive acknowledged
      for an operation it *invoked* at time ``s`` is revoked (its key gone) on no replica
      before ``s + ttl - 2 * skew``; with ``skew`` 0 (no wall-clock faults) exactly
      ``s + ttl``. Sound: the applied entry was proposed after ``s``, so ``C(r) >= s - skew``;
      the revoking entry has ``C(x) >= C(r) + ttl``; and no entry's ``ts`` exceeds its
      proposal time + ``skew``, so ``C(x) <= t + skew`` at any apply time ``t``. (``s`` is the
      invocation, not the acknowledgement: the TTL runs from the proposal, as in etcd, and
      an acknowledgement may arrive long after.) Checked both when the revocation is first
      applied and when an acknowledgement arrives.
    * **Lease grace**: no lease is revoked by an expire entry that its leader proposed less
      than one election timeout (``election_tick * period``, its period when it was
      elected) after it became leader (etcd's rule: keepalives reached no leader during
      the election).
    * The model's log clock equals the replica's, and grants, keepalives and lease puts are
      answered as the model says (a lease never vanishes without an expire).

    ``stats``: ``lease_expiries``; ``lease_expiries_across_terms``: revoked by a leader of
    another term than the one whose entry last renewed the lease (expiry across a leader
    change); ``lease_leader_changes``: leaders elected while a lease was live;
    ``lease_expiries_averted``: leases an expire entry named that a keepalive committed
    first had moved on.
    """

    skew: int = 0
    clock: int = 0
    last_index: int = 0
    leases: dict[int, _LeaseView] = field(default_factory=dict)
    gone: dict[int, _LeaseView] = field(default_factory=dict)  # revoked leases
    sessions: dict[int, int] = field(default_factory=dict)  # lease client -> last seq applied
    leader_starts: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    proposals: dict[tuple[int, bytes], int] = field(default_factory=dict)
    stats: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("lease_expiries", "lease_expiries_across_terms", "lease_leader_changes",
             "lease_expiries_averted"), 0)
    )

    def on_leader(self, nid: int, term: int, now: int, grace_until: int) -> None:
        """``nid`` became leader of ``term`` at ``now``; it must expire nothing before
        ``grace_until``."""
        self.leader_starts.setdefault(term, (nid, now, grace_until))
        if self.leases:
            self.stats["lease_leader_changes"] += 1

    def on_expire_proposed(self, term: int, data: bytes, now: int) -> None:
        self.proposals.setdefault((term, data), now)

    def on_first_apply(self, e: Entry, out: Any, now: int, kv_clock: int) -> None:
        """The entry ``e``, applied for the first time by any node at ``now``; ``out`` is
        what the replica's :meth:`SimKV.apply` returned, ``kv_clock`` its log clock after."""
        if e.index != self.last_index + 1:
            raise RuntimeError(f"lease model: first application of {e.index} after {self.last_index}")
        self.last_index = e.index
        cmd = decode_command(e.data) if e.data else None
        if cmd is None:
            return
        client, seq, op, _key, a, b, ts = cmd
        if ts is not None:
            self.clock = max(self.clock, ts)
        if kv_clock != self.clock:
            raise InvariantViolation(
                "lease log clock", f"index {e.index}: the replica's log clock is {kv_clock}, "
                f"the log's is {self.clock}")
        if op == "x":
            return self._expire(e, a, out[2], now)
        if op not in ("g", "k", "W"):
            return None
        if seq <= self.sessions.get(client, 0):
            return None  # a retry: answered from the session
        self.sessions[client] = seq
        lid = a if op in ("g", "k") else b
        lease = self.leases.get(lid)
        if op == "g":
            expected: Any = True if lease is None else LEASE_EXISTS
            if expected is True:
                self.leases[lid] = _LeaseView(client, b, self.clock, e.term)
        else:
            expected = True if lease is not None else LEASE_NOT_FOUND
            if lease is not None and op == "k":
                lease.renewed, lease.renewed_term = self.clock, e.term
        if out[2] != expected:
            raise InvariantViolation(
                "lease model", f"index {e.index}: {op}({lid}) of client {client} answered "
                f"{out[2]!r}, the lease model says {expected!r} (live leases "
                f"{sorted(self.leases)})")
        return None

    def _expire(self, e: Entry, ids: Any, revoked: list[int], now: int) -> None:
        due = [lid for lid in ids if lid in self.leases
               and self.clock - self.leases[lid].renewed >= self.leases[lid].ttl]
        for lid in revoked:
            lease = self.leases.get(lid)
            if lid not in due:
                detail = "that does not exist" if lease is None else (
                    f"last renewed at log clock {lease.renewed} (term {lease.renewed_term}), "
                    f"{self.clock - lease.renewed} < ttl {lease.ttl} earlier")
                raise InvariantViolation(
                    "lease safety (log clock)", f"the expire entry at index {e.index} (term "
                    f"{e.term}, log clock {self.clock}) revoked lease {lid} {detail}")
        missed = [lid for lid in due if lid not in revoked]
        if missed:
            raise InvariantViolation(
                "lease expiry (log clock)", f"the expire entry at index {e.index} left leases "
                f"{missed}, due at log clock {self.clock}, alive")
        self.stats["lease_expiries_averted"] += sum(
            1 for lid in ids if lid in self.leases and lid not in due)
        if not revoked:
            return
        start = self.leader_starts.get(e.term)
        proposed = self.proposals.get((e.term, e.data))
        if start is not None and proposed is not None and proposed < start[2]:
            raise InvariantViolation(
                "lease grace", f"node {start[0]} became leader of term {e.term} at t={start[1]} "
                f"and proposed at t={proposed} (before its grace ended at t={start[2]}) the "
                f"expire entry at index {e.index} that revoked leases {revoked}")
        for lid in revoked:
            lease = self.leases.pop(lid)
            lease.revoked_at, lease.revoked_term = now, e.term
            self.gone[lid] = lease
            self.stats["lease_expiries"] += 1
            if e.term != lease.renewed_term:
                self.stats["lease_expiries_across_terms"] += 1
            self._check_holder(lid, lease)

    def on_ack(self, lid: int, invoked_at: int) -> None:
        """The holder got a grant or keepalive of ``lid`` acknowledged, for an operation it
        invoked at ``invoked_at``."""
        lease = self.leases.get(lid) or self.gone.get(lid)
        if lease is None:
            raise InvariantViolation("lease model", f"lease {lid} acknowledged but never applied")
        lease.acked_from = max(lease.acked_from or invoked_at, invoked_at)
        self._check_holder(lid, lease)

    def _check_holder(self, lid: int, lease: _LeaseView) -> None:
        if lease.revoked_at is None or lease.acked_from is None:
            return
        bound = lease.acked_from + lease.ttl - 2 * self.skew
        if lease.revoked_at < bound:
            raise InvariantViolation(
                "lease safety (holder)", f"lease {lid} of client {lease.holder} was revoked at "
                f"t={lease.revoked_at} (term {lease.revoked_term}), but its holder had a "
                f"renewal acknowledged that it invoked at t={lease.acked_from}: not before "
                f"t={bound} (ttl {lease.ttl}, wall-clock skew {self.skew})")
