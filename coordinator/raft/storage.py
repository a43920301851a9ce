"""Stable storage as the Raft core sees it, and an in-memory implementation.

Theory of operation
-------------------
The node only *reads* storage (``initial_state``, ``entries``, ``term``, ``first_index``,
``last_index``, ``snapshot``). The driver *writes* it with what each ``Ready`` asks to make
durable (``apply_snapshot``, ``append``, ``set_hard_state``) before it sends that Ready's
messages, and compacts it after taking a snapshot (``create_snapshot``, ``compact``).

:class:`MemoryStorage` keeps a list whose element 0 is a dummy entry standing for the last
compacted (snapshot) entry: its index and term are the snapshot's, so ``term(first_index-1)``
is always answerable. The service's ``DiskStorage`` implements the same methods.
"""

from __future__ import annotations

from bisect import bisect_right
from itertools import accumulate
from operator import attrgetter

from .messages import ConfState, Entry, HardState, Snapshot, SnapshotMetadata

__all__ = ["StorageError", "Compacted", "Unavailable", "SnapshotOutOfDate", "MemoryStorage",
           "limit_size"]


_DATA = attrgetter("data")


class StorageError(Exception):
    """Base class of the errors a storage raises to the Raft core."""


class Compacted(StorageError):
    """The requested index was compacted away into a snapshot (etcd's ErrCompacted)."""


class Unavailable(StorageError):
    """The requested index is beyond the last stored entry (etcd's ErrUnavailable)."""


class SnapshotOutOfDate(StorageError):
    """A snapshot older than the one already held was offered."""


def limit_size(ents: list[Entry], max_bytes: int | None) -> list[Entry]:
    """Longest prefix of ``ents`` whose data fits in ``max_bytes`` (at least one entry)."""
    if max_bytes is None or len(ents) <= 1:
        return ents
    # C-level loops (map/accumulate/bisect): this is on the replication hot path.
    cum = list(accumulate(map(len, map(_DATA, ents))))
    if cum[-1] <= max_bytes:
        return ents
    return ents[:max(1, bisect_right(cum, max_bytes))]


class MemoryStorage:
    """Volatile storage for tests, the simulator and benchmarks.

    ``MemoryStorage(conf_state=ConfState(voters=(1, 2, 3)))`` bootstraps a fresh cluster
    member; ``MemoryStorage()`` is a blank node that learns its configuration from a leader.
    """

    def __init__(self, conf_state: ConfState | None = None) -> None:
        self._hard_state = HardState()
        self._snapshot = Snapshot(SnapshotMetadata(0, 0, conf_state or ConfState(voters=())), b"")
        self._ents: list[Entry] = [Entry(0, 0)]  # [0] is the dummy for the snapshot point

    # ---- reads (the node) ---------------------------------------------------------------

    def initial_state(self) -> tuple[HardState, ConfState]:
        return self._hard_state, self._snapshot.metadata.conf_state

    def first_index(self) -> int:
        return self._ents[0].index + 1

    def last_index(self) -> int:
        return self._ents[0].index + len(self._ents) - 1

    def term(self, i: int) -> int:
        offset = self._ents[0].index
        if i < offset:
            raise Compacted(f"index {i} is compacted (first kept is {offset})")
        if i - offset >= len(self._ents):
            raise Unavailable(f"index {i} is beyond the last index {self.last_index()}")
        return self._ents[i - offset].term

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        """Entries ``[lo, hi)``, cut to ``max_bytes`` of data (always at least one)."""
        offset = self._ents[0].index
        if lo <= offset:
            raise Compacted(f"entries from {lo} are compacted (first kept is {offset + 1})")
        if hi > self.last_index() + 1:
            raise Unavailable(f"entries up to {hi - 1} requested, last index is {self.last_index()}")
        return limit_size(self._ents[lo - offset:hi - offset], max_bytes)

    def snapshot(self) -> Snapshot:
        return self._snapshot

    # ---- writes (the driver) ------------------------------------------------------------

    def set_hard_state(self, hs: HardState) -> None:
        self._hard_state = hs

    def apply_snapshot(self, snap: Snapshot) -> None:
        """Replace everything with ``snap`` (an older snapshot raises SnapshotOutOfDate)."""
        if snap.metadata.index < self._snapshot.metadata.index:
            raise SnapshotOutOfDate(f"snapshot at {snap.metadata.index} is older than the "
                                    f"held one at {self._snapshot.metadata.index}")
        self._snapshot = snap
        self._ents = [Entry(snap.metadata.term, snap.metadata.index)]

    def create_snapshot(self, index: int, conf_state: ConfState | None, data: bytes) -> Snapshot:
        """Record a snapshot of the state machine at applied ``index`` (log kept until compact)."""
        if index <= self._snapshot.metadata.index:
            raise SnapshotOutOfDate(f"snapshot at {index} is not newer than the held one at "
                                    f"{self._snapshot.metadata.index}")
        if index > self.last_index():
            raise Unavailable(f"snapshot index {index} is beyond the last index {self.last_index()}")
        cs = conf_state if conf_state is not None else self._snapshot.metadata.conf_state
        self._snapshot = Snapshot(SnapshotMetadata(index, self.term(index), cs), data)
        return self._snapshot

    def compact(self, index: int) -> None:
        """Drop entries before ``index`` (``index`` stays, as the new dummy)."""
        offset = self._ents[0].index
        if index <= offset:
            raise Compacted(f"already compacted up to {offset}")
        if index > self.last_index():
            raise Unavailable(f"cannot compact to {index}, last index is {self.last_index()}")
        i = index - offset
        self._ents = [Entry(self._ents[i].term, index)] + self._ents[i + 1:]

    def append(self, entries: list[Entry] | tuple[Entry, ...]) -> None:
        """Append ``entries``, truncating any conflicting suffix; must be contiguous."""
        if not entries:
            return
        first = self.first_index()
        last = entries[0].index + len(entries) - 1
        if last < first:
            return  # all compacted already
        if first > entries[0].index:
            entries = entries[first - entries[0].index:]
        offset = entries[0].index - self._ents[0].index
        if offset > len(self._ents):
            raise Unavailable(f"missing log entry: last index {self.last_index()}, "
                              f"appended entries start at {entries[0].index}")
        del self._ents[offset:]
        self._ents.extend(entries)
