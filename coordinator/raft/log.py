"""The node's view of the replicated log: stable storage plus not-yet-durable entries.

Theory of operation
-------------------
``RaftLog`` = ``storage`` (durable, read-only here) + ``_Unstable`` (entries and maybe a
snapshot the node has accepted but the driver has not yet persisted). Unstable entries start
at ``unstable.offset``; everything below it is in storage. The driver persists what
``unstable_entries()`` returns and the node then calls ``stable_to``.

Two indexes move only forward: ``committed`` (known replicated on a quorum) and
``applied`` (handed to the state machine), with ``applied <= committed <= last_index``.
``persisted`` is the highest index known durable locally: a leader counts only that index
for itself when computing the commit index (etcd #14370).
"""

from __future__ import annotations

from .messages import Entry, Snapshot
from .storage import Compacted, Unavailable, limit_size

__all__ = ["RaftLog", "LogInvariantError"]


class LogInvariantError(AssertionError):
    """A request would break a log invariant (e.g. truncating committed entries)."""


class _Unstable:
    __slots__ = ("offset", "entries", "snapshot")

    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.entries: list[Entry] = []
        self.snapshot: Snapshot | None = None

    def truncate_and_append(self, ents: list[Entry] | tuple[Entry, ...]) -> None:
        first = ents[0].index
        if first == self.offset + len(self.entries):
            self.entries.extend(ents)
        elif first <= self.offset:
            # replaces everything unstable; stable entries from `first` on get overwritten
            self.offset = first
            self.entries = list(ents)
        else:
            del self.entries[first - self.offset:]
            self.entries.extend(ents)


class RaftLog:
    """Log state of one node. Internal to :class:`~coordinator.raft.node.RaftNode`."""

    def __init__(self, storage, max_applying_bytes: int = 1 << 26) -> None:
        self.storage = storage
        first = storage.first_index()
        last = storage.last_index()
        self.unstable = _Unstable(last + 1)
        self.committed = first - 1
        self.applied = first - 1
        self.max_applying_bytes = max_applying_bytes

    # ---- indexes and terms --------------------------------------------------------------

    def first_index(self) -> int:
        s = self.unstable.snapshot
        return s.metadata.index + 1 if s is not None else self.storage.first_index()

    def last_index(self) -> int:
        u = self.unstable
        if u.entries:
            return u.offset + len(u.entries) - 1
        if u.snapshot is not None:
            return u.snapshot.metadata.index
        return self.storage.last_index()

    @property
    def persisted(self) -> int:
        """Highest index durable in storage (everything unstable is above it)."""
        return self.unstable.offset - 1

    def last_term(self) -> int:
        return self.term(self.last_index())

    def term(self, i: int) -> int:
        """Term of entry ``i``; raises Compacted / Unavailable when it is not known."""
        u = self.unstable
        if i >= u.offset:
            k = i - u.offset
            if k < len(u.entries):
                return u.entries[k].term
            raise Unavailable(f"index {i} is beyond the last index {self.last_index()}")
        if u.snapshot is not None:
            if i == u.snapshot.metadata.index:
                return u.snapshot.metadata.term
            if i < u.snapshot.metadata.index:
                raise Compacted(f"index {i} is below the pending snapshot")
        return self.storage.term(i)

    def term_or_zero(self, i: int) -> int:
        try:
            return self.term(i)
        except (Compacted, Unavailable):
            return 0

    def match_term(self, i: int, t: int) -> bool:
        try:
            return self.term(i) == t
        except (Compacted, Unavailable):
            return False

    def is_up_to_date(self, last_index: int, term: int) -> bool:
        """§5.4.1: is a candidate's log (last_index, term) at least as up to date as ours?"""
        lt = self.last_term()
        return term > lt or (term == lt and last_index >= self.last_index())

    # ---- appending ----------------------------------------------------------------------

    def find_conflict(self, ents: tuple[Entry, ...] | list[Entry]) -> int:
        """Index of the first entry whose term differs from ours (or is new); 0 if none."""
        for e in ents:
            if not self.match_term(e.index, e.term):
                return e.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> int:
        """Largest index <= ``index`` whose term is <= ``term`` (fast back-off, §5.3)."""
        first = self.first_index()
        while index >= first - 1:
            try:
                t = self.term(index)
            except (Compacted, Unavailable):
                return index
            if t <= term:
                return index
            index -= 1
        return index

    def maybe_append(self, index: int, log_term: int, committed: int,
                     ents: tuple[Entry, ...]) -> int | None:
        """Accept an APPEND whose predecessor is (index, log_term); return the last new index,
        or None when the predecessor does not match (the caller rejects)."""
        if not self.match_term(index, log_term):
            return None
        last_new = index + len(ents)
        if ents:
            # Fast path: the common case appends right after our last entry.
            if ents[0].index == self.last_index() + 1:
                self.append(ents)
            else:
                ci = self.find_conflict(ents)
                if ci:
                    if ci <= self.committed:
                        raise LogInvariantError(
                            f"entry {ci} conflicts with the committed prefix (commit {self.committed})")
                    self.append(ents[ci - ents[0].index:])
        self.commit_to(min(committed, last_new))
        return last_new

    def append(self, ents: tuple[Entry, ...] | list[Entry]) -> int:
        if not ents:
            return self.last_index()
        if ents[0].index - 1 < self.committed:
            raise LogInvariantError(f"append after {ents[0].index - 1} would truncate committed "
                                    f"entries (commit {self.committed})")
        self.unstable.truncate_and_append(ents)
        return self.last_index()

    # ---- commit / apply -----------------------------------------------------------------

    def commit_to(self, i: int) -> None:
        """Raise ``committed`` to ``i``; never lowers it (PySyncObj #166)."""
        if i > self.committed:
            if i > self.last_index():
                raise LogInvariantError(f"commit {i} is beyond the last index {self.last_index()}")
            self.committed = i

    def maybe_commit(self, max_index: int, term: int) -> bool:
        """Commit ``max_index`` only if its entry is of the current ``term`` (§5.4.2)."""
        if max_index > self.committed and self.term_or_zero(max_index) == term:
            self.commit_to(max_index)
            return True
        return False

    def applied_to(self, i: int) -> None:
        if i == 0:
            return
        if i > self.committed or i < self.applied:
            raise LogInvariantError(f"applied {i} out of range [{self.applied}, {self.committed}]")
        self.applied = i

    def has_next_committed_entries(self) -> bool:
        return self.committed > self.applied and self.unstable.snapshot is None

    def next_committed_entries(self) -> list[Entry]:
        if not self.has_next_committed_entries():
            return []
        lo = max(self.applied + 1, self.first_index())
        return self.slice(lo, self.committed + 1, self.max_applying_bytes)

    # ---- unstable -> stable -------------------------------------------------------------

    def unstable_entries(self) -> list[Entry]:
        return list(self.unstable.entries)

    def stable_to(self, i: int, t: int) -> None:
        """The driver persisted entries up to (i, t): drop them from the unstable part."""
        u = self.unstable
        if i < u.offset or i >= u.offset + len(u.entries) or u.entries[i - u.offset].term != t:
            return  # stale: entries were replaced since the Ready was built
        del u.entries[:i + 1 - u.offset]
        u.offset = i + 1

    def stable_snap_to(self, i: int) -> None:
        u = self.unstable
        if u.snapshot is not None and u.snapshot.metadata.index == i:
            u.snapshot = None

    def restore(self, snap: Snapshot) -> None:
        """Replace the log with ``snap`` (to be persisted via Ready.snapshot)."""
        idx = snap.metadata.index
        self.committed = idx
        self.unstable.offset = idx + 1
        self.unstable.entries = []
        self.unstable.snapshot = snap

    def snapshot(self) -> Snapshot:
        if self.unstable.snapshot is not None:
            return self.unstable.snapshot
        return self.storage.snapshot()

    # ---- reading ------------------------------------------------------------------------

    def slice(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        """Entries ``[lo, hi)`` cut to ``max_bytes`` (at least one); raises Compacted."""
        if lo >= hi:
            return []
        if lo < self.first_index():
            raise Compacted(f"entries from {lo} are compacted (first is {self.first_index()})")
        if hi > self.last_index() + 1:
            raise Unavailable(f"slice to {hi - 1} beyond last index {self.last_index()}")
        u = self.unstable
        if hi <= u.offset:
            return self.storage.entries(lo, hi, max_bytes)
        if lo >= u.offset:
            return limit_size(u.entries[lo - u.offset:hi - u.offset], max_bytes)
        ents = self.storage.entries(lo, u.offset, max_bytes)
        if len(ents) < u.offset - lo:
            return ents  # size limit hit inside storage
        return limit_size(ents + u.entries[:hi - u.offset], max_bytes)

    def entries_from(self, i: int, max_bytes: int | None = None) -> list[Entry]:
        return self.slice(i, self.last_index() + 1, max_bytes)
