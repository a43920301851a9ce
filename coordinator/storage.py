"""Durable Raft storage: a segmented write-ahead log plus atomic snapshot files.

Theory of operation
-------------------
:class:`DiskStorage` answers the Raft core's reads exactly like
:class:`coordinator.raft.storage.MemoryStorage` -- from an in-memory copy of the log since
the last compaction -- and makes every change durable in ``data_dir`` before ``save``
returns. The driver calls ``save(ready.hard_state, ready.entries, ready.snapshot)`` once per
``Ready``: all its records are written with one ``pwrite`` and made durable with ONE
``fdatasync`` (group commit), and only then may the Ready's messages be sent.

The WAL is a sequence of segment files ``wal-<seq>-<first index>.log`` holding *frames*:
``length u32 | type u8 | crc32 u32 | payload``. Format 2 (this version's) has two kinds:

* the segment header, at offset 0, written and fdatasync'd on its own when the segment is
  created: the whole small state (hard state, bootstrap membership, snapshot mark,
  compaction point) as a msgpack map ``{"format": 2, "state": [...]}``, CRC over type and
  payload, so older segments can be deleted once a snapshot and a compaction cover them;
* one BATCH frame per save, holding all its records (``length u32 | type u8 | msgpack``
  each: ENTRY, HARD_STATE, TRUNCATE, SNAPSHOT, COMPACT). Its CRC covers its type, its own
  byte offset and its payload, so a copy of a frame anywhere else never checks out.

An entry whose index is not past the last one overwrites the conflicting suffix; a TRUNCATE
record says so explicitly. Format 1 (earlier versions) had no batches: each record was its
own frame, with a list as the header. A format 1 directory is still read (by format 1's
per-record rule below); the first write after opening it goes to a new format 2 segment,
and a format 1 reader refuses a format 2 header as malformed instead of misreading it.

Preallocation (etcd's trick). Appending to a file changes its size and allocates blocks on
every write, so each fsync also commits a filesystem-journal transaction: on ext4 a 120-byte
append + fsync measured ~0.14 ms against ~0.09 ms for fdatasync into preallocated space, and
the journal is shared with every other process syncing on the same disk. Instead the
segment is extended with ``posix_fallocate`` in ``preallocate_bytes`` chunks (4 MiB by
default when fsyncing: about once per 4 MiB, not per write), records are written with
``pwrite`` at the segment's *logical* size (the end of its last record, which the storage
tracks; the descriptor has no ``O_APPEND``), and they are made durable with ``fdatasync``,
which skips the metadata a later read does not need (timestamps) but still commits a size
change or newly written blocks. A filesystem without ``fallocate`` support just runs without
preallocation. A segment that fills up is truncated to its logical size and fdatasync'd
before the next one is created, so closed segments carry no zero tail. Directory fsyncs and
snapshot files keep a full ``fsync``.

A segment is closed when it reaches ``segment_bytes`` and also, once it holds 4 MiB, at the
first write after a compaction: segments are deleted only once a compaction covers all
their entries, so without this a restart would replay up to a whole 64 MiB segment of
long-compacted entries; with it, recovery reads about the log since the last snapshot.

Snapshots live in ``snap-<index>-<term>.snap`` files written tmp + fsync + rename + dir
fsync, *then* referenced by a SNAPSHOT record in the WAL; recovery trusts only the snapshot
the WAL references, so a file from an interrupted write is ignored (and removed).

Recovery replays the segments in order. A preallocated segment ends in zero bytes after its
last frame, and no frame is all zeros (type 0 does not exist), so the zero-tail rule is:
if everything after the last valid frame up to the end of the file is zero, that is the
clean end of a preallocated segment -- kept as it is, silently, and the next write goes at
that offset. This holds in any segment (a segment left untrimmed by a crash during rotation,
or by an older version); only with preallocation off is a zero tail in the last segment cut
with a warning like any other tail.

The torn-tail rule. A save is one pwrite and one fdatasync, and the next save is written
only after that fdatasync returned. Until it returns the disk may keep any subset of the
write's pages -- a later page without an earlier one -- so a crash can leave damage
*anywhere* inside the last save's frame, followed by pieces of it. A bad frame in the last
segment with no valid frame anywhere after it is therefore that unacknowledged save (or
zero fill, or appended garbage): it is cut off (``ftruncate``; the next write preallocates
again) with a warning, and the whole save is gone -- a batch is all or nothing. A bad frame
*followed by a valid one*, or in an older segment, cannot come from a crash: the damaged
frame's fdatasync had returned before the later frame was written. That is damage to
acknowledged data: :class:`CorruptLogError` names the file and byte offset and the node
refuses to start rather than silently lose it. (Format 1 applies the same rule per record,
so its last save could still be refused when an earlier page of it was lost.) With fsync
on, acknowledged frames were fdatasync'd, so they never read back as zeros: the zero-tail
rule drops nothing that was acknowledged. ``tests/service/test_crash_consistency.py``
checks all of this against a model of what a power loss can leave on disk.

Files are created 0600 and directories 0700, as etcd does (the log holds every value); a
new data directory is fsync'd into its parent, and an existing one that other users can
open is named in a warning. Segment deletions are made durable one at a time, so a crash
never leaves a gap before a surviving segment.

``<data_dir>/LOCK`` is held with ``fcntl.flock`` for the storage's lifetime, so two
servers can never share a data directory. A tool that only looks (``synctrain status``,
through :mod:`coordinator.offline`) uses :func:`read_log` instead: the same replay, without
the LOCK and without writing (a torn tail ends the read rather than being cut).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import logging
import os
import re
import struct
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from coordinator.raft.messages import (
    ConfState,
    Entry,
    EntryType,
    HardState,
    Snapshot,
    SnapshotMetadata,
)
from coordinator.raft.storage import (
    Compacted,
    SnapshotOutOfDate,
    StorageError,
    Unavailable,
    limit_size,
)

__all__ = [
    "DiskStorage", "StorageStats", "StorageError", "CorruptLogError", "CorruptSnapshotError",
    "DataDirLocked", "StorageClosed", "SnapshotOutOfDate", "Compacted", "Unavailable",
    "SnapshotFileWriter", "write_snapshot_file", "holds_state", "LogView", "read_log",
]

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">IBI")  # a frame: payload length, type, crc32 (see _frame_crc)
_INNER = struct.Struct(">IB")  # a record inside a batch frame: payload length, type
_FORMAT = 2  # the WAL format this version writes; it reads 1 and 2
_MAX_BATCH_BYTES = 0xFFFFFFFF  # a frame's length field is a u32
# etcd's modes: nothing under the data directory is readable by other local users
_DIR_MODE, _FILE_MODE = 0o700, 0o600
_SNAP_MAGIC = b"STSNAP01"
_SNAP_HEADER = struct.Struct(">8sIQ")  # magic, crc32(payload), payload length
_SEGMENT_RE = re.compile(r"^wal-(\d{8})-(\d{16})\.log$")
_SNAP_RE = re.compile(r"^snap-(\d{16})-(\d{16})\.snap$")
_DEFAULT_PREALLOCATE_BYTES = 4 << 20  # one fallocate (one journal commit) per 4 MiB of WAL
SNAPSHOT_SYNC_PIECE_BYTES = 4 << 20  # a snapshot file is synced every 4 MiB as it is written
# posix_fallocate errors that mean "this filesystem cannot do it" (as opposed to ENOSPC)
_FALLOCATE_UNSUPPORTED = frozenset(
    e for e in (errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", None), errno.EINVAL, errno.ENOSYS,
                errno.ENODEV) if e is not None)


class RecordType(enum.IntEnum):
    SEGMENT_HEADER = 1
    ENTRY = 2
    HARD_STATE = 3
    TRUNCATE = 4
    SNAPSHOT = 5
    COMPACT = 6
    BATCH = 7  # format 2: a frame holding all the records of one save


# Format 1 frames are single records of these types; format 2 frames after the header are
# BATCH frames only.
_RECORD_TYPES = frozenset(int(t) for t in RecordType if t != RecordType.BATCH)
_V1, _V2 = "v1", "v2"  # how a frame is parsed: a format 1 record, or a format 2 batch


class CorruptLogError(StorageError):
    """The WAL is damaged somewhere other than its tail; the node must not start on it."""

    def __init__(self, path: str | os.PathLike[str], offset: int, what: str) -> None:
        self.path = str(path)
        self.offset = offset
        super().__init__(
            f"write-ahead log {self.path} is corrupt at byte offset {offset}: {what}. "
            "This is not a torn tail, so acknowledged entries may be damaged; refusing to "
            "start. Restore this node's data directory from a backup, or wipe it and re-add "
            "the node to the cluster so it catches up from the leader.")


class CorruptSnapshotError(StorageError):
    """The snapshot the WAL references is missing or fails its checksum."""

    def __init__(self, path: str | os.PathLike[str], what: str) -> None:
        self.path = str(path)
        super().__init__(
            f"snapshot {self.path} {what}; refusing to start. Restore the data directory "
            "from a backup, or wipe it and re-add the node so it receives a fresh snapshot.")


class DataDirLocked(StorageError):
    """Another live process holds ``<data_dir>/LOCK``."""

    def __init__(self, data_dir: str | os.PathLike[str], holder_pid: int | None) -> None:
        self.data_dir = str(data_dir)
        self.holder_pid = holder_pid
        who = f"process {holder_pid}" if holder_pid else "another process"
        super().__init__(
            f"data directory {self.data_dir} is locked by {who}: two servers must never "
            "share a data directory. Stop that process, or give this one its own --data-dir.")


class StorageClosed(StorageError):
    """The storage was closed, or a failed write left it unusable (restart to recover)."""


@dataclass(slots=True)
class StorageStats:
    """Counters; ``fsyncs`` counts every sync (WAL + directory + snapshot files), of which
    ``wal_fsyncs`` are the WAL's ``fdatasync`` calls; ``wal_preallocations`` counts the
    ``posix_fallocate`` calls that extended a segment."""

    saves: int = 0
    fsyncs: int = 0
    wal_fsyncs: int = 0
    dir_fsyncs: int = 0
    snapshot_fsyncs: int = 0
    records_written: int = 0
    bytes_written: int = 0
    segments_created: int = 0
    segments_deleted: int = 0
    torn_tails_cut: int = 0
    wal_preallocations: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


# ---------------------------------------------------------------------------------------
# record and value codecs


def _v1_record(rtype: RecordType, value: Any) -> bytes:
    """A format 1 record: ``length u32 | type u8 | crc32(type + payload) u32 | payload``.
    Format 2 still writes its segment header this way (see :func:`_header_frame`)."""
    payload = msgpack.packb(value, use_bin_type=True)
    tb = bytes((rtype,))
    return _HEADER.pack(len(payload), rtype, zlib.crc32(payload, zlib.crc32(tb))) + payload


def _record(rtype: RecordType, value: Any) -> bytes:
    """One record inside a batch: ``length u32 | type u8 | msgpack payload`` (no CRC of its
    own: the batch frame's CRC covers it)."""
    payload = msgpack.packb(value, use_bin_type=True)
    return _INNER.pack(len(payload), rtype) + payload


_CRC_PREFIX = struct.Struct(">BQ")  # what a batch frame's CRC covers before its payload


def _frame_crc(rtype: int, offset: int, payload: bytes | memoryview) -> int:
    """A batch frame's CRC covers its type, its own byte offset in the segment and its
    payload: a copy of a frame anywhere else (inside an entry's data, say) never checks out,
    so recovery's "is anything valid after the damage?" scan cannot be fooled by one."""
    return zlib.crc32(payload, zlib.crc32(_CRC_PREFIX.pack(rtype, offset)))


def _batch_frame(records: list[bytes], offset: int) -> bytes:
    """All the records of one save as one frame, to be written at ``offset``."""
    payload = b"".join(records)
    assert len(payload) <= _MAX_BATCH_BYTES, "save() checks the size before any I/O"
    return _HEADER.pack(len(payload), RecordType.BATCH,
                        _frame_crc(RecordType.BATCH, offset, payload)) + payload


def _header_frame(state: _LogState) -> bytes:
    """A format 2 segment's first frame, written (and synced) on its own before any batch.

    It is a valid format 1 SEGMENT_HEADER record whose payload is a map, not format 1's
    list: a version that only knows format 1 refuses the segment loudly ("a record with a
    valid checksum is malformed") instead of cutting the batches after it as a torn tail."""
    return _v1_record(RecordType.SEGMENT_HEADER,
                      {"format": _FORMAT, "state": state.header_value()})


def _inner_records(payload: memoryview) -> list[tuple[int, Any]]:
    """Decode a batch frame's records; raises ValueError on a malformed one."""
    out, off = [], 0
    while off < len(payload):
        if len(payload) - off < _INNER.size:
            raise ValueError(f"{len(payload) - off} stray bytes after the last record")
        length, rtype = _INNER.unpack_from(payload, off)
        start, off = off + _INNER.size, off + _INNER.size + length
        if rtype not in _RECORD_TYPES or rtype == RecordType.SEGMENT_HEADER or off > len(payload):
            raise ValueError(f"bad record (type {rtype}, {length} bytes) inside a batch")
        out.append((rtype, msgpack.unpackb(payload[start:off], raw=False)))
    return out


def _hs_list(hs: HardState) -> list[int]:
    return [hs.term, hs.vote, hs.commit]


def _cs_list(cs: ConfState) -> list[Any]:
    return [list(cs.voters), list(cs.learners), list(cs.voters_outgoing), cs.auto_leave,
            list(cs.learners_next)]


def _cs_from(v: list[Any]) -> ConfState:
    voters, learners, outgoing, auto_leave, learners_next = v
    return ConfState(tuple(voters), tuple(learners), tuple(outgoing), bool(auto_leave),
                     tuple(learners_next))


def _entry_from(v: list[Any]) -> Entry:
    term, index, etype, data = v
    return Entry(term, index, EntryType(etype), data)


def _zero_to_end(buf: bytes, off: int) -> bool:
    """Whether every byte from ``off`` to the end of ``buf`` is zero.

    ``bytes.count`` runs in C (a 64 MiB segment takes milliseconds); ``any(buf[off:])``
    would copy the tail and then walk it one Python int at a time."""
    return buf.count(0, off) == len(buf) - off


def _parse_at(buf: bytes, off: int, kind: str,
              max_record_bytes: int) -> tuple[int, memoryview, int] | str:
    """The frame at ``off`` as ``(type, payload, next offset)``, or why it is not valid.

    ``kind`` is _V1 (a format 1 record, also every segment's first frame) or _V2 (a format
    2 batch frame, whose CRC is bound to ``off``)."""
    if len(buf) - off < _HEADER.size:
        if _zero_to_end(buf, off):  # at most 8 bytes
            return "zero fill to the end of the file"
        return f"incomplete frame header ({len(buf) - off} of {_HEADER.size} bytes)"
    length, rtype, crc = _HEADER.unpack_from(buf, off)
    if rtype not in (_RECORD_TYPES if kind == _V1 else (RecordType.BATCH,)):
        if _zero_to_end(buf, off):
            return "zero fill to the end of the file"
        return f"unexpected frame type {rtype}"
    if kind == _V1 and length > max_record_bytes:
        return f"implausible record length {length}"
    end = off + _HEADER.size + length
    if end > len(buf):
        return f"incomplete frame ({len(buf) - off - _HEADER.size} of {length} payload bytes)"
    payload = memoryview(buf)[off + _HEADER.size:end]
    if kind == _V1:
        ok = zlib.crc32(payload, zlib.crc32(bytes((rtype,)))) == crc
    else:
        ok = _frame_crc(rtype, off, payload) == crc
    return (rtype, payload, end) if ok else "checksum mismatch"


def _next_valid_frame(buf: bytes, bad_off: int, kinds: tuple[str, ...],
                      max_record_bytes: int) -> int | None:
    """Offset of a valid frame of one of ``kinds`` after the bad one at ``bad_off``, if any.

    First tries where the bad frame's own length says the next one starts (a flipped
    payload byte), then every offset whose type byte is a possible frame type (a damaged
    length field). A random match would need a matching CRC32, so false hits are ~2**-32
    per candidate; a format 2 frame also has to sit at the offset its CRC was bound to.
    """
    def valid(off: int) -> bool:
        return any(not isinstance(_parse_at(buf, off, k, max_record_bytes), str)
                   for k in kinds)

    length = _HEADER.unpack_from(buf, bad_off)[0] if len(buf) - bad_off >= _HEADER.size else 0
    natural = bad_off + _HEADER.size + length
    if natural < len(buf) and valid(natural):
        return natural
    types = set(_RECORD_TYPES) if _V1 in kinds else set()
    if _V2 in kinds:
        types.add(RecordType.BATCH)
    candidates: set[int] = set()
    for t in types:
        pos = buf.find(bytes((t,)), bad_off + 5)
        while pos != -1:
            candidates.add(pos - 4)
            pos = buf.find(bytes((t,)), pos + 1)
    for off in sorted(candidates):
        if valid(off):
            return off
    return None


# ---------------------------------------------------------------------------------------
# replay: the log state rebuilt from records


@dataclass(slots=True)
class _Segment:
    path: Path
    seq: int
    size: int = 0  # logical size: the end of the last record, where the next one goes
    file_size: int = 0  # the file's length on disk: ``size`` plus any preallocated zeros
    max_entry_index: int = 0  # highest entry index written into it (0 = none)
    format: int = 0  # 1 or 2, from its header frame; 0 while it has none


@dataclass(slots=True)
class _LogState:
    """The in-memory log: ``entries[k].index == base + 1 + k``; ``base`` is compacted."""

    hard_state: HardState = field(default_factory=HardState)
    bootstrap: ConfState = field(default_factory=lambda: ConfState(voters=()))
    snap_index: int = 0
    snap_term: int = 0
    base: int = 0
    base_term: int | None = 0  # None only mid-replay, after a gap from deleted segments
    entries: list[Entry] = field(default_factory=list)
    data_bytes: int = 0  # sum of len(e.data) over ``entries``: what the retained log holds

    @property
    def last(self) -> int:
        return self.base + len(self.entries)

    def _drop(self, lo: int, hi: int) -> None:
        """Remove ``entries[lo:hi]``, keeping ``data_bytes`` exact."""
        gone = self.entries[lo:hi]
        if gone:
            self.data_bytes -= sum(len(e.data) for e in gone)
            del self.entries[lo:hi]

    def compact_to(self, index: int, term: int) -> None:
        if index < self.base:
            return
        self._drop(0, index - self.base)
        self.base, self.base_term = index, term

    def reset_to(self, index: int, term: int) -> None:
        self.entries, self.base, self.base_term, self.data_bytes = [], index, term, 0

    def put(self, e: Entry) -> None:
        """Append ``e``, truncating a conflicting suffix; a gap means segments were deleted."""
        if e.index <= self.base:
            return  # already compacted
        if e.index > self.last + 1:
            self.entries, self.base, self.base_term, self.data_bytes = [], e.index - 1, None, 0
        self._drop(e.index - self.base - 1, len(self.entries))
        self.entries.append(e)
        self.data_bytes += len(e.data)

    def extend(self, todo: list[Entry]) -> None:
        """Append entries that follow the last one (``save`` truncated first)."""
        self.entries.extend(todo)
        self.data_bytes += sum(len(e.data) for e in todo)

    def truncate_from(self, index: int) -> None:
        self._drop(max(0, index - self.base - 1), len(self.entries))

    def header_value(self) -> list[Any]:
        return [_hs_list(self.hard_state), _cs_list(self.bootstrap), self.snap_index,
                self.snap_term, self.base, self.base_term]

    def apply(self, rtype: int, v: Any) -> int:
        """Apply one decoded record; returns the entry index it wrote (0 for none)."""
        if rtype == RecordType.ENTRY:
            e = _entry_from(v)
            self.put(e)
            return e.index
        if rtype == RecordType.HARD_STATE:
            self.hard_state = HardState(*v)
        elif rtype == RecordType.TRUNCATE:
            self.truncate_from(v[0])
        elif rtype == RecordType.SNAPSHOT:
            index, term, reset = v
            self.snap_index, self.snap_term = index, term
            if reset:
                self.reset_to(index, term)
        elif rtype == RecordType.COMPACT:
            self.compact_to(v[0], v[1])
        elif rtype == RecordType.SEGMENT_HEADER:
            hs, cs, self.snap_index, self.snap_term, base, base_term = v
            self.hard_state, self.bootstrap = HardState(*hs), _cs_from(cs)
            if base > self.base or (base == self.base and self.base_term is None):
                self.compact_to(base, base_term)
        return 0


def _replay_frames(buf: bytes, seg: _Segment, state: _LogState,
                   max_record_bytes: int) -> tuple[int, str | None]:
    """Apply the valid frames of one segment's bytes ``buf``, in order, to ``state`` (no I/O:
    :meth:`DiskStorage._replay_segment` and the read-only :func:`read_log` share it). Returns
    the offset where replay stopped and, when that is before the end of ``buf``, why the frame
    there is not valid: the caller tells a zero tail, a torn tail and corruption apart. A frame
    with a valid checksum but malformed contents is a CorruptLogError."""
    off = 0
    while off < len(buf):
        if off > 0 and seg.format == 2:
            off = _replay_plain_batches(buf, off, seg, state)
            if off >= len(buf):
                break
        kind = _V2 if off > 0 and seg.format == 2 else _V1
        parsed = _parse_at(buf, off, kind, max_record_bytes)
        if isinstance(parsed, str):
            return off, parsed
        rtype, payload, end = parsed
        try:
            if off == 0:
                _apply_segment_header(seg, state, rtype, msgpack.unpackb(payload, raw=False))
            elif kind == _V2:
                for t, v in _inner_records(payload):
                    index = state.apply(t, v)
                    seg.max_entry_index = max(seg.max_entry_index, index)
            else:
                index = state.apply(rtype, msgpack.unpackb(payload, raw=False))
                seg.max_entry_index = max(seg.max_entry_index, index)
        except StorageError:
            raise
        except Exception as exc:
            raise CorruptLogError(seg.path, off, f"a frame with a valid checksum is "
                                  f"malformed ({exc.__class__.__name__}: {exc})") from None
        off = end
    return off, None


_ENTRY_TYPES = {int(t): t for t in EntryType}


def _replay_plain_batches(buf: bytes, off: int, seg: _Segment, state: _LogState) -> int:
    """Replay's fast path, for what a steady log is made of: consecutive valid batch frames
    holding only entries and hard states. Returns the offset of the first frame it leaves to
    :func:`_replay_frames`'s general path (an invalid frame, another record type, a value
    that does not decode, an entry that does not simply extend the log), or the end.

    It applies exactly what the general path would: a frame is decoded whole before any of
    it is applied, so a frame it gives up on is untouched; of the hard states only the last
    is kept, which is all the general path's assignments leave. On this 2-core machine it
    replays ~4x faster, which is most of a restarted node's time to serve again."""
    n, view = len(buf), memoryview(buf)
    header, unpack_header, unpack_inner = _HEADER.size, _HEADER.unpack_from, _INNER.unpack_from
    inner, crc32, crc_prefix, unpackb = _INNER.size, zlib.crc32, _CRC_PREFIX.pack, msgpack.unpackb
    batch, entry_type, hard_state = int(RecordType.BATCH), int(RecordType.ENTRY), int(RecordType.HARD_STATE)
    entries, last_hs, max_index = state.entries, None, seg.max_entry_index
    try:
        while n - off >= header:
            length, rtype, crc = unpack_header(buf, off)
            end = off + header + length
            if rtype != batch or end > n:
                break
            payload = view[off + header:end]
            if crc32(payload, crc32(crc_prefix(rtype, off))) != crc:
                break
            decoded: list[Entry] = []
            frame_hs, expect = None, state.base + len(entries) + 1
            try:
                p = 0
                while p < length:
                    rlen, rt = unpack_inner(payload, p)
                    start, p = p + inner, p + inner + rlen
                    if p > length:
                        raise ValueError("a record runs past its frame")
                    v = unpackb(payload[start:p], raw=False)
                    if rt == entry_type:
                        term, index, etype, data = v
                        if index != expect:  # a truncation or a gap: put() handles it
                            raise ValueError("not the next entry")
                        decoded.append(Entry(term, index, _ENTRY_TYPES[etype], data))
                        expect += 1
                    elif rt == hard_state and len(v) == 3:
                        frame_hs = v
                    else:
                        raise ValueError("not a plain record")
            except Exception:  # noqa: BLE001 - the general path decides what it is
                break
            for e in decoded:
                entries.append(e)
                state.data_bytes += len(e.data)
            if decoded and expect - 1 > max_index:
                max_index = expect - 1
            if frame_hs is not None:
                last_hs = frame_hs
            off = end
    finally:
        if last_hs is not None:
            state.hard_state = HardState(*last_hs)
        seg.max_entry_index = max_index
    return off


def _apply_segment_header(seg: _Segment, state: _LogState, rtype: int, value: Any) -> None:
    """A segment's first frame: format 1's header is the state list itself, format 2's
    a map ``{"format": 2, "state": [...]}``."""
    if rtype != RecordType.SEGMENT_HEADER:
        raise CorruptLogError(seg.path, 0, "the segment does not start with a header")
    if isinstance(value, dict):
        fmt = value.get("format")
        if fmt != _FORMAT:
            raise StorageError(
                f"write-ahead log {seg.path} has format {fmt!r}, and this version reads "
                f"formats 1 and {_FORMAT}: it was written by a newer version. Run that "
                "version on this data directory, or wipe it and re-add the node.")
        seg.format, value = 2, value["state"]
    else:
        seg.format = 1
    state.apply(RecordType.SEGMENT_HEADER, value)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


# ---------------------------------------------------------------------------------------
# snapshot files


def _snap_name(index: int, term: int) -> str:
    return f"snap-{index:016d}-{term:016d}.snap"


def _bin_header(n: int) -> bytes:
    """msgpack's header for a bin value of ``n`` bytes (what ``packb`` writes for bytes)."""
    if n < 1 << 8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def _snapshot_prefix(md: SnapshotMetadata, data_len: int) -> bytes:
    """The payload bytes before the data: ``msgpack [index, term, conf state, <bin header>``.
    The whole payload is ``packb([index, term, conf state, data])``, byte for byte."""
    head = msgpack.packb([md.index, md.term, _cs_list(md.conf_state), b""], use_bin_type=True)
    return head[:-len(_bin_header(0))] + _bin_header(data_len)


class SnapshotFileWriter:
    """Writes one snapshot file piece by piece: ``write`` the data as it comes (a received
    snapshot's chunks), then ``finish``, which writes the header (its CRC covers everything
    written) and syncs; ``abort`` removes the file. The caller renames it into place
    (:meth:`DiskStorage.save` with ``snapshot_file``, or :meth:`DiskStorage.adopt_snapshot_file`)
    and syncs the directory. Touches no DiskStorage, so a forked snapshot process may use it.

    When syncing, the file is preallocated and ``fdatasync``'d every
    :data:`SNAPSHOT_SYNC_PIECE_BYTES` as it is written: the disk never holds more than one
    piece of it unwritten, so a WAL fsync of any process on the same filesystem (which on ext4
    may have to flush other files' dirty data first) waits for one piece, not a snapshot."""

    def __init__(self, path: Path, md: SnapshotMetadata, data_len: int, *,
                 sync: Callable[[int], None] | None) -> None:
        self.path, self.data_len, self._sync = path, data_len, sync
        prefix = _snapshot_prefix(md, data_len)
        self._payload_len = len(prefix) + data_len
        self._crc = zlib.crc32(prefix)
        self._written = self._unsynced = 0
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _FILE_MODE)
        try:
            if sync is not None:
                with contextlib.suppress(OSError):  # only an optimization (block allocation)
                    os.posix_fallocate(self._fd, 0, _SNAP_HEADER.size + self._payload_len)
            _write_all(self._fd, bytes(_SNAP_HEADER.size) + prefix)  # header comes last
        except BaseException:
            self.abort()
            raise

    def write(self, piece: bytes | memoryview) -> None:
        if self._written + len(piece) > self.data_len:
            raise ValueError(f"snapshot data overflows its declared {self.data_len} bytes")
        view = memoryview(piece)
        for start in range(0, len(view), SNAPSHOT_SYNC_PIECE_BYTES):
            part = view[start:start + SNAPSHOT_SYNC_PIECE_BYTES]
            _write_all(self._fd, part)
            self._crc = zlib.crc32(part, self._crc)
            self._written += len(part)
            self._unsynced += len(part)
            if self._sync is not None and self._unsynced >= SNAPSHOT_SYNC_PIECE_BYTES:
                os.fdatasync(self._fd)
                self._unsynced = 0

    def finish(self) -> None:
        """Write the header and sync (``sync(fd)``); the file is then complete."""
        if self._written != self.data_len:
            raise ValueError(f"snapshot data is {self._written} bytes, not the declared "
                             f"{self.data_len}")
        try:
            os.pwrite(self._fd, _SNAP_HEADER.pack(_SNAP_MAGIC, self._crc, self._payload_len), 0)
            if self._sync is not None:
                self._sync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = -1

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def write_snapshot_file(path: Path, md: SnapshotMetadata, data: bytes | memoryview, *,
                        sync: Callable[[int], None] | None) -> None:
    """Write one whole snapshot file at ``path`` (``magic | crc32 | length | payload``, mode
    0600, replacing any file there) with :class:`SnapshotFileWriter`; ``data`` is written as
    it is, never copied into a payload."""
    writer = SnapshotFileWriter(path, md, len(data), sync=sync)
    try:
        writer.write(data)
        writer.finish()
    except BaseException:
        writer.abort()
        raise


def holds_state(data_dir: str | os.PathLike[str]) -> bool:
    """Whether ``data_dir`` holds a node's Raft state (a WAL segment or a snapshot file).
    An absent or empty directory, or one holding only a LOCK or unrelated files, does not:
    a node started on it is new, or lost its disk."""
    try:
        names = os.listdir(data_dir)
    except FileNotFoundError:
        return False
    return any(_SEGMENT_RE.match(n) or _SNAP_RE.match(n) for n in names)


def _check_snapshot_file(path: Path, index: int, term: int) -> ConfState:
    """Check a snapshot file's header, checksum and (index, term) without loading it whole
    (zlib releases the GIL on large pieces) and return its membership; CorruptSnapshotError
    if anything is off."""
    with open(path, "rb") as f:
        head = f.read(_SNAP_HEADER.size)
        if len(head) < _SNAP_HEADER.size:
            raise CorruptSnapshotError(path, f"is truncated ({len(head)} bytes)")
        magic, crc, length = _SNAP_HEADER.unpack(head)
        got, total, first = 0, 0, b""
        while piece := f.read(1 << 20):
            first = first or piece
            got, total = zlib.crc32(piece, got), total + len(piece)
    if magic != _SNAP_MAGIC or length != total or got != crc:
        raise CorruptSnapshotError(path, "fails its header or checksum")
    try:
        up = msgpack.Unpacker(raw=False)
        up.feed(first)
        if up.read_array_header() != 4:
            raise ValueError("not an array of 4")
        s_index, s_term, cs = up.unpack(), up.unpack(), _cs_from(up.unpack())
    except Exception as exc:
        raise CorruptSnapshotError(path, f"has a malformed payload ({exc})") from None
    if (s_index, s_term) != (index, term):
        raise CorruptSnapshotError(path, f"holds index {s_index} term {s_term}, not index "
                                         f"{index} term {term}")
    return cs


def _read_snapshot_file(path: Path, index: int, term: int) -> Snapshot:
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise CorruptSnapshotError(path, "is referenced by the WAL but missing") from None
    if len(blob) < _SNAP_HEADER.size:
        raise CorruptSnapshotError(path, f"is truncated ({len(blob)} bytes)")
    magic, crc, length = _SNAP_HEADER.unpack_from(blob)
    payload = blob[_SNAP_HEADER.size:]
    if magic != _SNAP_MAGIC or length != len(payload) or zlib.crc32(payload) != crc:
        raise CorruptSnapshotError(path, "fails its header or checksum")
    try:
        s_index, s_term, cs, data = msgpack.unpackb(payload, raw=False)
        snap = Snapshot(SnapshotMetadata(s_index, s_term, _cs_from(cs)), data)
    except Exception as exc:  # checksum passed, so this is a writer bug; still be loud
        raise CorruptSnapshotError(path, f"has a malformed payload ({exc})") from None
    if (s_index, s_term) != (index, term):
        raise CorruptSnapshotError(path, f"holds index {s_index} term {s_term}, not the "
                                         f"index {index} term {term} the WAL references")
    return snap


# ---------------------------------------------------------------------------------------
# read-only access: a node's durable state, for tools (the node may be running or gone)


@dataclass(frozen=True, slots=True)
class LogView:
    """One node's durable Raft state as :func:`read_log` found it: its hard state, the
    snapshot its WAL references (data included), and the entries since that snapshot's
    compaction point. ``torn_tail`` says why reading stopped before the end of the last
    segment (a save in progress, or a crash's torn tail the node cuts when it starts)."""

    data_dir: Path
    hard_state: HardState
    conf_state: ConfState
    snapshot: Snapshot
    base_index: int  # entries start at base_index + 1
    base_term: int
    entries: tuple[Entry, ...]
    torn_tail: str | None = None

    @property
    def last_index(self) -> int:
        return self.base_index + len(self.entries)

    @property
    def last_term(self) -> int:
        return self.entries[-1].term if self.entries else self.base_term

    def term(self, index: int) -> int | None:
        """The term of the entry at ``index`` (the compaction point's for ``base_index``);
        None when this log holds no such entry."""
        if index == self.base_index:
            return self.base_term
        if self.base_index < index <= self.last_index:
            return self.entries[index - self.base_index - 1].term
        return None


def read_log(data_dir: str | os.PathLike[str], *, max_record_bytes: int = 256 << 20,
             attempts: int = 3) -> LogView:
    """Read a node's WAL and snapshot without taking its LOCK and without writing anything,
    whether its node runs or not (``coordinator`` tools and ``synctrain status/log``).

    It replays the segments like recovery does (:func:`_replay_frames`), with one difference
    at the end: the first frame of the last segment that is not valid ends the read (a zero
    tail, a save the running node has not finished, or a torn tail) instead of being cut.
    Damage in an earlier segment is a CorruptLogError, as for the node. A running node may
    delete a segment or replace its snapshot while this reads: a file that vanished restarts
    the read, up to ``attempts`` times."""
    assert attempts >= 1
    for attempt in range(attempts):
        try:
            return _read_log_once(Path(data_dir), max_record_bytes)
        except (FileNotFoundError, CorruptSnapshotError) as exc:
            if attempt == attempts - 1 or (isinstance(exc, CorruptSnapshotError)
                                           and "missing" not in str(exc)):
                raise
    raise AssertionError("unreachable")


def _read_log_once(data_dir: Path, max_record_bytes: int) -> LogView:
    names = sorted(os.listdir(data_dir))
    segs = sorted((_Segment(data_dir / n, int(m.group(1)))
                   for n in names if (m := _SEGMENT_RE.match(n))), key=lambda s: s.seq)
    if not segs and any(_SNAP_RE.match(n) for n in names):
        raise CorruptLogError(data_dir, 0, "snapshot files exist but no WAL segment does")
    for prev, seg in zip(segs, segs[1:], strict=False):
        if seg.seq != prev.seq + 1:
            raise CorruptLogError(seg.path, 0, f"segment number {prev.seq + 1} is missing")
    state, torn = _LogState(), None
    for k, seg in enumerate(segs):
        buf = seg.path.read_bytes()
        off, why = _replay_frames(buf, seg, state, max_record_bytes)
        if why is None or _zero_to_end(buf, off):
            continue
        if k < len(segs) - 1:
            raise CorruptLogError(seg.path, off, f"{why}, in a segment that is not the last")
        torn = f"{seg.path.name} at byte offset {off}: {why}"
    if state.base_term is None:
        raise CorruptLogError(segs[0].path, 0, f"entries up to {state.base} are missing and "
                              "no compaction covers them (deleted segment?)")
    if state.snap_index:
        snap = _read_snapshot_file(data_dir / _snap_name(state.snap_index, state.snap_term),
                                   state.snap_index, state.snap_term)
    else:
        snap = Snapshot(SnapshotMetadata(0, 0, state.bootstrap), b"")
    return LogView(data_dir, state.hard_state, snap.metadata.conf_state, snap, state.base,
                   state.base_term, tuple(state.entries), torn)


# ---------------------------------------------------------------------------------------
# the storage


class DiskStorage:
    """Raft stable storage on disk; see the module docstring for the layout and rules.

    ``conf_state`` bootstraps a fresh ``data_dir`` (None = empty membership, for a node that
    joins by receiving a snapshot) and is ignored when the directory already holds a log.
    ``fsync=False`` keeps the write path but skips every fsync (tests, benchmarks): data
    then survives a process crash but not a machine crash. ``preallocate_bytes`` is the
    chunk WAL segments are extended by with ``posix_fallocate`` (0 = off; None = 4 MiB with
    ``fsync=True``, off with ``fsync=False``, whose callers gain nothing from it). Every
    public method is thread-safe, and a reader never waits for a writer's I/O: writers are
    serialized by one lock held through their writes and fsyncs, and take the lock readers
    use only to publish what they wrote. Entries since the last compaction are kept in memory, so
    the driver must snapshot and ``compact`` periodically (:meth:`retained_bytes` says how
    much they hold).

    ``keep_snapshot_data=False`` keeps no snapshot data in memory: :meth:`snapshot` returns
    the metadata with empty data, :meth:`snapshot_data` reads (and checks) the file, and
    :meth:`snapshot_data_span` locates the data in it for streaming. A server uses this;
    the Raft core never looks at snapshot data, it only hands it to the driver.
    """

    def __init__(self, data_dir: str | os.PathLike[str], *, conf_state: ConfState | None = None,
                 fsync: bool = True, segment_bytes: int = 64 << 20,
                 max_record_bytes: int = 256 << 20,
                 preallocate_bytes: int | None = None, keep_snapshot_data: bool = True) -> None:
        if segment_bytes <= 0 or max_record_bytes <= 0:
            raise ValueError("segment_bytes and max_record_bytes must be positive")
        if preallocate_bytes is None:
            preallocate_bytes = _DEFAULT_PREALLOCATE_BYTES if fsync else 0
        if preallocate_bytes < 0:
            raise ValueError(f"preallocate_bytes must be >= 0 (0 = off), not "
                             f"{preallocate_bytes}")
        self.data_dir = Path(data_dir)
        self.stats = StorageStats()
        self._fsync = fsync
        # Fixed for recovery's zero-tail rule; _prealloc_now drops to 0 if the filesystem
        # turns out not to support fallocate.
        self._preallocate = preallocate_bytes
        self._prealloc_now = preallocate_bytes
        self._segment_bytes = segment_bytes
        # After a compaction, a segment this large is closed at the next write, so that
        # the next compaction can delete it: recovery replays the log since about the last
        # snapshot, not a whole 64 MiB segment of entries that were compacted long ago.
        self._rotate_after_compact_bytes = min(segment_bytes, 4 << 20)
        self._rotate_pending = False
        self._max_record_bytes = max_record_bytes
        # _wmu serializes writers (saves, snapshots, compaction, close) for the whole of
        # their I/O; _mu guards the in-memory log and is held only briefly, so a reader (the
        # Raft core on the event loop, a status request) never waits for a writer's fsync.
        self._wmu = threading.Lock()
        self._mu = threading.RLock()
        self._state = _LogState()
        self._snapshot = Snapshot(SnapshotMetadata(0, 0, self._state.bootstrap), b"")
        self._keep_snapshot_data = keep_snapshot_data
        self._segments: list[_Segment] = []
        self._wal_fd = -1
        self._closed: str | None = None
        self._make_data_dir()
        self._lock_fd = self._take_lock()
        try:
            self._recover(conf_state)
        except BaseException:
            self.close()
            raise

    # ---- reads: the MemoryStorage interface ---------------------------------------------

    def initial_state(self) -> tuple[HardState, ConfState]:
        with self._mu:
            self._check_open()
            return self._state.hard_state, self._snapshot.metadata.conf_state

    def first_index(self) -> int:
        with self._mu:
            return self._state.base + 1

    def last_index(self) -> int:
        with self._mu:
            return self._state.last

    def term(self, i: int) -> int:
        with self._mu:
            st = self._state
            if i < st.base:
                raise Compacted(f"index {i} is compacted (first kept is {st.base + 1})")
            if i > st.last:
                raise Unavailable(f"index {i} is beyond the last index {st.last}")
            if i == st.base:
                assert st.base_term is not None
                return st.base_term
            return st.entries[i - st.base - 1].term

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        """Entries ``[lo, hi)``, cut to ``max_bytes`` of data (always at least one)."""
        with self._mu:
            st = self._state
            if lo <= st.base:
                raise Compacted(f"entries from {lo} are compacted (first kept is {st.base + 1})")
            if hi > st.last + 1:
                raise Unavailable(f"entries up to {hi - 1} requested, last index is {st.last}")
            return limit_size(st.entries[lo - st.base - 1:hi - st.base - 1], max_bytes)

    def snapshot(self) -> Snapshot:
        with self._mu:
            return self._snapshot

    def snapshot_data(self) -> bytes:
        """The current snapshot's data (with ``keep_snapshot_data=False``: read from its file
        and checked; :meth:`snapshot_data_span` streams it instead)."""
        with self._mu:
            md = self._snapshot.metadata
            if self._keep_snapshot_data or md.index == 0:
                return self._snapshot.data
            return _read_snapshot_file(self.data_dir / _snap_name(md.index, md.term),
                                       md.index, md.term).data

    def snapshot_data_span(self) -> tuple[Path, int, int, SnapshotMetadata]:
        """Where the current snapshot's data lies: (file, byte offset, length, metadata), for
        streaming it without loading it. The file is replaced (unlinked) when a newer snapshot
        is taken: open it at once; an open descriptor keeps reading the old one."""
        with self._mu:
            md = self._snapshot.metadata
            if md.index == 0:
                raise Unavailable("there is no snapshot yet")
            path = self.data_dir / _snap_name(md.index, md.term)
            payload = path.stat().st_size - _SNAP_HEADER.size
            before = len(_snapshot_prefix(md, 0)) - len(_bin_header(0))  # without bin header
            for hdr in (2, 3, 5):  # the data's bin header: 1 marker byte + 1, 2 or 4 length
                n = payload - before - hdr
                if n >= 0 and len(_bin_header(n)) == hdr:
                    return path, _SNAP_HEADER.size + before + hdr, n, md
            raise CorruptSnapshotError(path, f"has an impossible size ({payload} bytes)")

    def snapshot_tmp_path(self, index: int, term: int) -> Path:
        """Where a snapshot file for (index, term) is written before :meth:`adopt_snapshot_file`
        renames it into place (recovery removes such leftovers)."""
        return self.data_dir / (_snap_name(index, term) + ".tmp")

    def retained_bytes(self) -> int:
        """Bytes of entry data the storage holds in memory (the log since the compaction).
        Read without a lock (one integer): callable on every request."""
        return self._state.data_bytes

    def tail_start(self, upto: int, max_entries: int, max_bytes: int) -> int:
        """The highest index to compact to that keeps a tail of at most ``max_entries``
        entries and ``max_bytes`` of data at or below ``upto`` (at least the entry ``upto``
        itself is dropped from the tail when even one entry is over ``max_bytes``)."""
        with self._mu:
            st = self._state
            upto = min(upto, st.last)
            lo = max(st.base, upto - max_entries)
            kept, index = 0, upto
            while index > lo:
                kept += len(st.entries[index - st.base - 1].data)
                if kept > max_bytes:
                    break
                index -= 1
            return index

    # ---- durable writes -----------------------------------------------------------------

    def save(self, hard_state: HardState | None, entries: Sequence[Entry],
             snapshot: Snapshot | None = None, snapshot_file: Path | None = None) -> None:
        """Make one Ready durable with a single WAL fsync (group commit).

        ``snapshot_file``: the snapshot's file was already written there (complete, not yet
        synced: a streamed snapshot received by :class:`SnapshotFileWriter`); it is synced and
        renamed into place instead of writing ``snapshot.data``.

        Order: ``snapshot`` (installed: the log restarts after it), then ``entries`` (an
        entry at or below the last index truncates the conflicting suffix first; entries
        already compacted are skipped; a gap raises ``Unavailable``), then ``hard_state``.
        Returns once everything is on disk; only then may dependent messages be sent.
        """
        with self._wmu:
            self._check_open()
            if hard_state is None and not entries and snapshot is None:
                return
            records = []  # validated and encoded before any I/O happens
            base, last = self._state.base, self._state.last
            if snapshot is not None:
                md = snapshot.metadata
                self._check_newer(md.index, allow_equal=True)
                records.append(_record(RecordType.SNAPSHOT, [md.index, md.term, True]))
                base = last = md.index
            todo = self._entries_to_write(entries, base, last)
            if todo and todo[0].index <= last:
                records.append(_record(RecordType.TRUNCATE, [todo[0].index]))
            records.extend(self._entry_record(e) for e in todo)
            if hard_state is not None:
                records.append(_record(RecordType.HARD_STATE, _hs_list(hard_state)))
            if sum(map(len, records)) > _MAX_BATCH_BYTES:
                raise ValueError(f"one save encodes to {sum(map(len, records))} bytes, over "
                                 f"the {_MAX_BATCH_BYTES}-byte frame limit; save fewer "
                                 "entries at a time")
            if snapshot is not None:  # durable before the WAL references it
                if snapshot_file is not None:
                    self._place_snapshot_file(snapshot_file, snapshot.metadata)
                else:
                    self._write_snapshot_file(snapshot)
            self._commit(records)
            self.stats.saves += 1
            self._apply_saved(hard_state, todo, snapshot)

    def append(self, entries: Sequence[Entry]) -> None:
        """``MemoryStorage.append`` made durable: ``save(None, entries)``."""
        self.save(None, entries)

    def set_hard_state(self, hs: HardState) -> None:
        self.save(hs, [])

    def apply_snapshot(self, snap: Snapshot) -> None:
        """Install a leader's snapshot: the log is replaced by it (``save(None, [], snap)``)."""
        self.save(None, [], snap)

    def create_snapshot(self, index: int, conf_state: ConfState | None,
                        data: bytes) -> Snapshot:
        """Durably record a snapshot of the applied state at ``index``; the log is kept
        until :meth:`compact`. ``conf_state=None`` keeps the current snapshot's membership."""
        with self._wmu:
            self._check_open()
            self._check_newer(index, allow_equal=False)
            if index > self._state.last:
                raise Unavailable(f"snapshot index {index} is beyond the last index "
                                  f"{self._state.last}")
            cs = conf_state if conf_state is not None else self._snapshot.metadata.conf_state
            snap = Snapshot(SnapshotMetadata(index, self.term(index), cs), data)
            self._write_snapshot_file(snap)  # durable before the WAL references it
            record = _record(RecordType.SNAPSHOT, [index, snap.metadata.term, False])
            self._commit([record])
            with self._mu:
                self._state.snap_index, self._state.snap_term = index, snap.metadata.term
                self._snapshot = self._held(snap)
            self._remove_stale_snapshots()
            return snap

    def adopt_snapshot_file(self, tmp: Path, index: int, conf_state: ConfState) -> Snapshot:
        """Record the snapshot at ``index`` that someone else wrote (and fsync'd) at
        ``tmp`` = :meth:`snapshot_tmp_path`, as :meth:`create_snapshot` records one: rename
        into place, sync the directory, then reference it in the WAL. The file is checked
        against its checksum first. Returns the snapshot (its data empty)."""
        with self._wmu:
            self._check_open()
            self._check_newer(index, allow_equal=False)
            if index > self._state.last:
                raise Unavailable(f"snapshot index {index} is beyond the last index "
                                  f"{self._state.last}")
            term = self.term(index)
            if tmp != self.snapshot_tmp_path(index, term):
                raise ValueError(f"{tmp} is not where the snapshot at {index} (term {term}) "
                                 "is written")
            _check_snapshot_file(tmp, index, term)
            md = SnapshotMetadata(index, term, conf_state)
            os.replace(tmp, self.data_dir / _snap_name(index, term))
            self._fsync_dir()
            self._commit([_record(RecordType.SNAPSHOT, [index, term, False])])
            with self._mu:
                self._state.snap_index, self._state.snap_term = index, term
                self._snapshot = Snapshot(md, b"")
            self._remove_stale_snapshots()
            return self._snapshot

    def _held(self, snap: Snapshot) -> Snapshot:
        """What :meth:`snapshot` keeps of ``snap`` (its data only with keep_snapshot_data)."""
        if self._keep_snapshot_data or not snap.data:
            return snap
        return Snapshot(snap.metadata, b"")

    def compact(self, index: int) -> None:
        """Drop entries up to ``index`` (``term(index)`` stays answerable) and delete the WAL
        segments that only hold compacted entries. ``index`` must be covered by the current
        snapshot, or those entries would be lost on restart (``ValueError``)."""
        with self._wmu:
            self._check_open()
            st = self._state
            if index <= st.base:
                raise Compacted(f"already compacted up to {st.base}")
            if index > st.last:
                raise Unavailable(f"cannot compact to {index}, last index is {st.last}")
            if index > st.snap_index:
                raise ValueError(f"cannot compact to {index}: the snapshot only covers up to "
                                 f"{st.snap_index}; call create_snapshot first")
            term = self.term(index)
            self._commit([_record(RecordType.COMPACT, [index, term])])
            with self._mu:
                st.compact_to(index, term)
            self._delete_covered_segments()
            if self._segments and self._segments[-1].size >= self._rotate_after_compact_bytes:
                self._rotate_pending = True

    def close(self) -> None:
        """Close the WAL and release the data-dir lock; later calls raise StorageClosed."""
        with self._wmu, self._mu:
            if self._closed is None:
                self._closed = "the storage was closed"
            if self._wal_fd >= 0:
                os.close(self._wal_fd)
                self._wal_fd = -1
            if self._lock_fd >= 0:
                os.close(self._lock_fd)  # closing the descriptor releases the flock
                self._lock_fd = -1

    def __enter__(self) -> DiskStorage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the lock and recovery ----------------------------------------------------------

    def _make_data_dir(self) -> None:
        """Create ``data_dir`` (and any missing parent) with mode 0700, each new directory
        made durable in its parent, as etcd does; an existing one open to other users is
        kept as it is, with a warning."""
        missing = []
        d = self.data_dir
        while not d.exists():
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            try:
                os.mkdir(d, _DIR_MODE)
            except FileExistsError:  # another process made it meanwhile
                continue
            self._fsync_dir(d.parent)
        mode = self.data_dir.stat().st_mode & 0o777
        if not missing and mode & 0o077:
            log.warning("data directory %s has mode %03o: other local users can read the "
                        "log and its values. Run chmod 700 %s (new data directories are "
                        "created 0700)", self.data_dir, mode, self.data_dir)

    def _take_lock(self) -> int:
        path = self.data_dir / "LOCK"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, _FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            raise DataDirLocked(self.data_dir, int(holder) if holder.isdigit() else None) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _recover(self, conf_state: ConfState | None) -> None:
        names = sorted(p.name for p in self.data_dir.iterdir())
        segs = [_Segment(self.data_dir / n, int(m.group(1)))
                for n in names if (m := _SEGMENT_RE.match(n))]
        segs.sort(key=lambda s: s.seq)
        if not segs:
            if any(_SNAP_RE.match(n) for n in names):
                raise CorruptLogError(self.data_dir, 0, "snapshot files exist but no WAL "
                                      "segment does")
        for prev, seg in zip(segs, segs[1:], strict=False):
            if seg.seq != prev.seq + 1:
                raise CorruptLogError(seg.path, 0, f"segment number {prev.seq + 1} is missing")
        for k, seg in enumerate(segs):
            self._replay_segment(seg, is_last=k == len(segs) - 1)
        if all(seg.size == 0 for seg in segs):  # fresh, or the bootstrap write was torn
            self._state.bootstrap = conf_state or ConfState(voters=())
        if self._state.base_term is None:
            raise CorruptLogError(segs[0].path, 0, f"entries up to {self._state.base} are "
                                  "missing and no compaction covers them (deleted segment?)")
        self._snapshot = self._load_snapshot()
        self._segments = segs
        if segs:  # no O_APPEND: records go at the logical size, before any preallocated zeros
            self._wal_fd = os.open(segs[-1].path, os.O_WRONLY)
        # Fresh, a new segment torn before its header was durable, or a format 1 segment
        # (closed here: format 2 batches never share a segment with format 1 records).
        self._ensure_segment(force_new=bool(segs) and segs[-1].format == 1)

    def _replay_segment(self, seg: _Segment, is_last: bool) -> None:
        buf = seg.path.read_bytes()
        seg.file_size = len(buf)
        off, why = _replay_frames(buf, seg, self._state, self._max_record_bytes)
        # A zero tail is the clean end of a preallocated segment: kept, the next write at off.
        if why is not None and not ((not is_last or self._preallocate) and _zero_to_end(buf, off)):
            self._cut_tail(seg, buf, off, why, is_last)
            seg.file_size = off
        seg.size = min(off, len(buf))

    def _cut_tail(self, seg: _Segment, buf: bytes, off: int, why: str, is_last: bool) -> None:
        """Cut a damaged tail of the last segment, or refuse when it is not a tail.

        In format 2 the last frame is the last save's whole batch, written with one pwrite
        and synced with one fdatasync, and no later batch is written before that sync
        returns: damage anywhere in it, with no valid frame after it, is that save torn by
        a crash before it was acknowledged. In format 1 the same holds per record."""
        if not is_last:
            raise CorruptLogError(seg.path, off, f"{why}, in a segment that is not the last")
        kinds = (_V1, _V2) if off == 0 else ((_V2,) if seg.format == 2 else (_V1,))
        following = _next_valid_frame(buf, off, kinds, self._max_record_bytes)
        if following is not None:
            raise CorruptLogError(seg.path, off, f"{why}, yet a valid frame follows at "
                                  f"offset {following}")
        # preallocated space after the torn part (rstrip may reach into the last valid frame)
        zeros = min(len(buf) - len(buf.rstrip(b"\x00")), len(buf) - off)
        log.warning("WAL %s: cutting off a torn tail at byte offset %d (%s; %d bytes "
                    "dropped, %d of them trailing zero fill): the last write before a crash "
                    "never completed", seg.path, off, why, len(buf) - off, zeros)
        fd = os.open(seg.path, os.O_WRONLY)
        try:
            os.ftruncate(fd, off)
            self._fsync_fd(fd, "wal")
        finally:
            os.close(fd)
        self.stats.torn_tails_cut += 1

    def _load_snapshot(self) -> Snapshot:
        st = self._state
        keep = _snap_name(st.snap_index, st.snap_term) if st.snap_index else None
        for p in self.data_dir.iterdir():
            if p.name.endswith(".tmp") or (_SNAP_RE.match(p.name) and p.name != keep):
                if _SNAP_RE.match(p.name) and int(p.name[5:21]) > st.snap_index:
                    log.warning("removing snapshot %s: the WAL never referenced it (a "
                                "snapshot write was interrupted)", p)
                os.unlink(p)
        if keep is None:
            return Snapshot(SnapshotMetadata(0, 0, st.bootstrap), b"")
        if not self._keep_snapshot_data:  # checked here, streamed by whoever needs the data
            cs = _check_snapshot_file(self.data_dir / keep, st.snap_index, st.snap_term)
            return Snapshot(SnapshotMetadata(st.snap_index, st.snap_term, cs), b"")
        return _read_snapshot_file(self.data_dir / keep, st.snap_index, st.snap_term)

    # ---- the write path -----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed is not None:
            raise StorageClosed(f"storage {self.data_dir} is unusable: {self._closed}")

    def _check_newer(self, index: int, allow_equal: bool) -> None:
        held = self._state.snap_index
        if index < held or (index == held and not allow_equal):
            raise SnapshotOutOfDate(f"snapshot at {index} is not newer than the held one at "
                                    f"{held}")

    def _fsync_fd(self, fd: int, kind: str) -> None:
        """Make ``fd`` durable: ``fdatasync`` for the WAL (its size and blocks are all a
        read needs), a full ``fsync`` for directories and snapshot files."""
        if not self._fsync:
            return
        if kind == "wal":
            os.fdatasync(fd)
        else:
            os.fsync(fd)
        self.stats.fsyncs += 1
        if kind == "wal":
            self.stats.wal_fsyncs += 1
        elif kind == "dir":
            self.stats.dir_fsyncs += 1
        else:
            self.stats.snapshot_fsyncs += 1

    def _fsync_dir(self, path: Path | None = None) -> None:
        fd = os.open(self.data_dir if path is None else path, os.O_RDONLY)
        try:
            self._fsync_fd(fd, "dir")
        finally:
            os.close(fd)

    def _ensure_segment(self, force_new: bool = False) -> None:
        """Make sure the current segment can take a batch: start a new one when there is
        none, it is full, or ``force_new``; give an empty one its header (rotation happens
        only between saves, so a batch never spans two segments).

        The header is written and synced on its own, before any batch: a format 2 segment
        always starts with a durable header, so damage at offset 0 is a torn header and
        never hides a batch."""
        cur = self._segments[-1] if self._segments else None
        if cur is not None and not force_new and 0 < cur.size < self._segment_bytes:
            return
        if cur is None or force_new or cur.size >= self._segment_bytes:
            if cur is not None:
                self._trim_segment(cur)
            seq = cur.seq + 1 if cur is not None else 1
            path = self.data_dir / f"wal-{seq:08d}-{self._state.last + 1:016d}.log"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
            if self._wal_fd >= 0:
                os.close(self._wal_fd)
            self._wal_fd = fd
            cur = _Segment(path, seq)
            self._segments.append(cur)
            self.stats.segments_created += 1
            self._fsync_dir()
        self._write_durably(cur, _header_frame(self._state))
        cur.format = _FORMAT

    def _trim_segment(self, seg: _Segment) -> None:
        """Cut a full segment's preallocated zeros before it is closed for good, so closed
        segments hold exactly their records (recovery would accept the zeros anyway)."""
        if seg.file_size <= seg.size:
            return
        try:
            os.ftruncate(self._wal_fd, seg.size)
            self._fsync_fd(self._wal_fd, "wal")
        except OSError as exc:
            self._closed = f"trimming a full WAL segment failed ({exc}); restart the node"
            raise StorageClosed(f"storage {self.data_dir}: {self._closed}") from exc
        seg.file_size = seg.size

    def _preallocate_for(self, seg: _Segment, end: int) -> None:
        """Extend ``seg``'s allocation to the next multiple of the preallocation chunk that
        covers ``end``, so that writing up to ``end`` changes no file size or block map.

        A filesystem that cannot fallocate turns preallocation off for this storage's
        lifetime. Any other error (ENOSPC, EIO) skips it for this write only: the write
        then extends the file itself, or fails and closes the storage as any failed write
        does."""
        chunk = self._prealloc_now
        if not chunk or end <= seg.file_size:
            return
        target = -(-end // chunk) * chunk
        try:
            os.posix_fallocate(self._wal_fd, seg.size, target - seg.size)
        except OSError as exc:
            if exc.errno in _FALLOCATE_UNSUPPORTED:
                self._prealloc_now = 0
                log.debug("WAL %s: posix_fallocate is not supported here (%s); writing "
                          "without preallocation", seg.path, exc)
            else:
                log.debug("WAL %s: posix_fallocate of %d bytes failed (%s); writing "
                          "without preallocation", seg.path, target - seg.size, exc)
            return
        seg.file_size = target
        self.stats.wal_preallocations += 1

    def _commit(self, records: list[bytes]) -> None:
        """Make ``records`` durable as ONE batch frame at the current segment's logical end:
        one pwrite, one fdatasync. Recovery reads the batch whole or not at all."""
        self._ensure_segment(force_new=self._rotate_pending)
        self._rotate_pending = False
        seg = self._segments[-1]
        self._write_durably(seg, _batch_frame(records, seg.size))
        self.stats.records_written += len(records)

    def _write_durably(self, seg: _Segment, data: bytes) -> None:
        """Write ``data`` at ``seg``'s logical end with one pwrite and one fdatasync,
        preallocating first when the write would pass the allocated end.

        A failed write or sync leaves the file in an unknown state (and a failed fsync
        cannot be retried safely), so the storage refuses further use; restarting runs
        recovery, which cuts whatever partial frame was left."""
        end = seg.size + len(data)
        self._preallocate_for(seg, end)
        try:
            _pwrite_all(self._wal_fd, data, seg.size)
            self._fsync_fd(self._wal_fd, "wal")
        except OSError as exc:
            self._closed = f"a WAL write failed ({exc}); restart the node to recover"
            raise StorageClosed(f"storage {self.data_dir}: {self._closed}") from exc
        seg.size, seg.file_size = end, max(seg.file_size, end)
        self.stats.bytes_written += len(data)

    def _entries_to_write(self, entries: Sequence[Entry], base: int, last: int) -> list[Entry]:
        for k, e in enumerate(entries):
            if e.index != entries[0].index + k:
                raise ValueError(f"entries must be contiguous: index {e.index} at position {k} "
                                 f"after {entries[0].index}")
        todo = [e for e in entries if e.index > base]
        if todo and todo[0].index > last + 1:
            raise Unavailable(f"missing log entry: last index {last}, appended entries "
                              f"start at {todo[0].index}")
        return todo

    def _entry_record(self, e: Entry) -> bytes:
        rec = _record(RecordType.ENTRY, [e.term, e.index, int(e.type), e.data])
        if len(rec) - _INNER.size > self._max_record_bytes:
            raise ValueError(f"entry {e.index} encodes to {len(rec)} bytes, over the "
                             f"{self._max_record_bytes}-byte record limit")
        return rec

    def _apply_saved(self, hs: HardState | None, todo: list[Entry],
                     snapshot: Snapshot | None) -> None:
        st = self._state
        with self._mu:
            if snapshot is not None:
                md = snapshot.metadata
                st.snap_index, st.snap_term = md.index, md.term
                st.reset_to(md.index, md.term)
                self._snapshot = self._held(snapshot)
            if todo:
                st.truncate_from(todo[0].index)
                st.extend(todo)
            if hs is not None:
                st.hard_state = hs
        if todo:
            seg = self._segments[-1]
            seg.max_entry_index = max(seg.max_entry_index, todo[-1].index)
        if snapshot is not None:
            self._remove_stale_snapshots()
            self._delete_covered_segments()

    def _write_snapshot_file(self, snap: Snapshot) -> None:
        md = snap.metadata
        tmp = self.snapshot_tmp_path(md.index, md.term)
        write_snapshot_file(tmp, md, snap.data,
                            sync=lambda fd: self._fsync_fd(fd, "snapshot"))
        os.replace(tmp, self.data_dir / _snap_name(md.index, md.term))
        self._fsync_dir()

    def _place_snapshot_file(self, path: Path, md: SnapshotMetadata) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            self._fsync_fd(fd, "snapshot")
        finally:
            os.close(fd)
        os.replace(path, self.data_dir / _snap_name(md.index, md.term))
        self._fsync_dir()

    def _remove_stale_snapshots(self) -> None:
        keep = _snap_name(self._state.snap_index, self._state.snap_term)
        for p in self.data_dir.glob("snap-*.snap"):
            if p.name != keep:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)

    def _delete_covered_segments(self) -> None:
        """Delete, oldest first, segments whose entries are all compacted (never the last:
        its header and records carry the current state).

        Each deletion is made durable (directory fsync) before the next one, so a crash can
        only ever bring back the *oldest* deleted segment, never leave a gap before one
        that survived (which recovery would refuse as a missing segment). A segment is
        64 MiB of log by default, so this costs one directory fsync per 64 MiB."""
        while len(self._segments) > 1 and self._segments[0].max_entry_index <= self._state.base:
            os.unlink(self._segments.pop(0).path)
            self._fsync_dir()
            self.stats.segments_deleted += 1
