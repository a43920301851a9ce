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

Violations raise :class:`InvariantViolation`; the simulator turns it into a report with the
seed and the event trace.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from coordinator.raft.messages import Entry, HardState, Message, MessageType

__all__ = ["InvariantChecker", "InvariantViolation"]


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
