"""A coordinator cluster's replicated state, read from its nodes' data directories, read-only.

Theory of operation
-------------------
When a cluster's nodes are gone (a training job's driver stopped its embedded coordinator, or
died with it), their WALs and snapshots are still on disk. :func:`read_state` rebuilds from
them the state a restarted cluster would serve, without starting a node: it reads each node
with :func:`coordinator.storage.read_log` (no LOCK taken, nothing written, a torn tail ends
the read instead of being cut), decides which prefix of the log is committed, and applies
that prefix to a fresh :class:`~coordinator.statemachine.StateMachine` exactly as a node
applies committed entries. Queries then go through the extensions' own code
(``state_machine.query("steplog", ...)``), so the answers are the live ones'.

The committed prefix. Each node's log may end in entries that were never committed (a
leader's tail a later leader overwrites), and offline there is no leader to ask. An index N
counts as committed when either

1. N is at most some node's persisted commit index (``HardState.commit``) or snapshot index:
   a node persists only a commit index a leader sent it, and snapshots only applied entries;
2. the same entry -- index N, term T -- is in the logs of a majority of the voters, T is the
   highest term of any entry in any voter's log, and every voter's log was read.

Rule 2 is Raft's own commit rule (§5.4.2) seen from the disks: a leader counts replicas only
for entries of its current term, because an older-term entry held by a majority can still be
overwritten (the paper's figure 8: a node whose last entry has a newer term wins an election
and replaces it). An entry of the newest term T held by a majority cannot: a future leader
needs a vote from that majority, which is granted only to a log whose last entry has term T
and reaches at least index N, and by the Log Matching property such a log holds (N, T) too.
The rule needs every voter: an unread voter might hold a newer term. It matters after a
crash: the leader acknowledged an entry (a majority had it) but died before persisting its
new commit index, so rule 1 alone would lose the last acknowledged write. The committed
index is the highest index either rule gives (everything below it is committed too); the
state is built from a node that holds the entry at that index (Log Matching again: it then
holds the whole committed prefix), starting from its snapshot.

Membership: the voters are those of the newest configuration found (the snapshot's or the
bootstrap one); node ids come from the directory names ``node-<id>``. The coordinator's
embedded clusters have a fixed membership, which is what this reads; a configuration changed
by log entries after the last snapshot is not followed.

Safety notes (tests in ``tests/service/test_offline.py``):

* Reading changes nothing on disk, whether the node holds its LOCK or not, and a torn tail
  is read around, not cut (``test_read_log_writes_nothing_and_reads_a_running_node``,
  ``test_a_torn_tail_ends_the_read_and_stays_on_disk``).
* An older-term entry on a majority is not committed, a newest-term one is
  (``test_figure_8_an_older_term_on_a_majority_is_not_committed``).
* The offline state answers like the state machine that applied the same committed
  entries (``test_offline_state_answers_like_the_live_state_machine``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import coordinator.server  # noqa: F401 - registers the extensions a node runs (members)
import coordinator.steplog  # noqa: F401 - and the step log, so both are replayed as on a node
from coordinator.raft.messages import EntryType
from coordinator.statemachine import StateMachine
from coordinator.storage import LogView, StorageError, read_log

_NODE_DIR = re.compile(r"^node-(\d+)$")


@dataclasses.dataclass(frozen=True, slots=True)
class NodeState:
    """What one node's data directory says (``error``: why it could not be read)."""

    node_id: int
    data_dir: Path
    term: int = 0
    vote: int = 0
    commit: int = 0  # its persisted commit index
    last_index: int = 0
    last_term: int = 0
    snapshot_index: int = 0
    torn_tail: str | None = None
    error: str | None = None


@dataclasses.dataclass(slots=True)
class OfflineState:
    """The committed state of a cluster, rebuilt from its nodes' disks."""

    state_machine: StateMachine
    commit_index: int
    nodes: list[NodeState]
    voters: tuple[int, ...]
    # The node a majority of voters voted for in the highest term any of them recorded
    # (it won that election), if the disks say so.
    elected: int | None = None
    elected_term: int = 0


def node_dirs(data_dir: str | os.PathLike[str]) -> list[Path]:
    """The ``node-<id>`` directories under a cluster's data directory, by id."""
    try:
        names = os.listdir(data_dir)
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), n) for n in names if (m := _NODE_DIR.match(n))]
    return [Path(data_dir) / n for _, n in sorted(found) if (Path(data_dir) / n).is_dir()]


def committed_index(logs: dict[int, LogView], voters: Sequence[int]) -> tuple[int, int]:
    """(index, term) of the last committed entry by the two rules of the module doc; pure."""
    best, best_term = 0, 0
    for view in logs.values():  # rule 1: persisted commit indexes and snapshots
        for index in (view.hard_state.commit, view.snapshot.metadata.index):
            term = view.term(index)
            if index > best and term is not None:
                best, best_term = index, term
    if not voters or not set(voters) <= set(logs):
        return best, best_term
    newest = max(logs[v].last_term for v in voters)
    quorum = len(voters) // 2 + 1
    holders = Counter((e.index, e.term) for v in voters for e in logs[v].entries
                      if e.term == newest and e.index > best)
    majority = [index for (index, _), n in holders.items() if n >= quorum]
    if majority:  # rule 2: an entry of the newest term on a majority
        best, best_term = max(majority), newest
    return best, best_term


def read_state(dirs: Sequence[str | os.PathLike[str]]) -> OfflineState:
    """The committed state of the cluster whose nodes kept their data in ``dirs`` (see the
    module doc). StorageError when no node's directory could be read."""
    logs: dict[int, LogView] = {}
    nodes: list[NodeState] = []
    for k, d in enumerate(dirs):
        path = Path(d)
        m = _NODE_DIR.match(path.name)
        node_id = int(m.group(1)) if m else k + 1
        try:
            view = logs[node_id] = read_log(path)
        except (OSError, StorageError) as exc:
            nodes.append(NodeState(node_id, path, error=f"{type(exc).__name__}: {exc}"))
            continue
        hs = view.hard_state
        nodes.append(NodeState(node_id, path, hs.term, hs.vote, hs.commit, view.last_index,
                               view.last_term, view.snapshot.metadata.index, view.torn_tail))
    if not logs:
        why = "; ".join(f"node {n.node_id}: {n.error}" for n in nodes) or "no node directories"
        raise StorageError(f"no coordinator node's data could be read ({why})")
    newest_conf = max(logs.values(), key=lambda v: v.snapshot.metadata.index).conf_state
    voters = tuple(newest_conf.voters) or tuple(sorted(logs))
    index, term = committed_index(logs, voters)
    sm = _apply_committed(logs, index, term)
    elected, elected_term = _elected(nodes, voters)
    return OfflineState(sm, index, nodes, voters, elected, elected_term)


def _apply_committed(logs: dict[int, LogView], index: int, term: int) -> StateMachine:
    """A state machine with every entry up to ``index`` applied, built from a node holding
    the entry (index, term), starting at its snapshot (the newest one among such nodes)."""
    holders = [v for v in logs.values()
               if v.snapshot.metadata.index == index or v.term(index) == term]
    assert holders, f"no node holds the committed entry at {index} (term {term})"
    view = max(holders, key=lambda v: v.snapshot.metadata.index)
    start = view.snapshot.metadata.index
    assert start == index or view.base_index <= start < index <= view.last_index, (
        view.base_index, start, index, view.last_index)
    sm = StateMachine()
    if view.snapshot.data:
        sm.restore(view.snapshot.data)
    else:
        sm.restore_empty(start)
    for i in range(start + 1, index + 1):
        entry = view.entries[i - view.base_index - 1]
        assert entry.index == i, (entry.index, i)
        if entry.type == EntryType.CONF_CHANGE:
            sm.apply(i, b"")  # membership is the node's business, not the state machine's
        else:
            sm.apply_entry(i, entry.data)
    return sm


def _elected(nodes: list[NodeState], voters: Sequence[int]) -> tuple[int | None, int]:
    """The node a majority of voters voted for in the highest term with such a majority."""
    quorum = len(voters) // 2 + 1
    votes = Counter((n.term, n.vote) for n in nodes if n.error is None and n.vote
                    and n.node_id in voters)
    won = [(term, vote) for (term, vote), count in votes.items() if count >= quorum]
    if not won:
        return None, 0
    term, vote = max(won)
    return vote, term


__all__ = ["NodeState", "OfflineState", "committed_index", "node_dirs", "read_state"]
