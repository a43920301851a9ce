"""One coordinator node: a RaftNode on DiskStorage, driven by asyncio, serving clients.

Theory of operation
-------------------
Everything runs on one asyncio event loop, single-threaded, so the RaftNode (which is not
thread-safe) is only ever touched from the loop:

- a ticker delivers ``node.tick()`` once per ``tick_s`` of logical time (15 ms by default;
  with ``election_tick`` 10 the core randomizes the election timeout in [150, 300) ms), but
  wakes only for the ticks the core or a chore acts on and hands over those it slept through
  together (tickless: :meth:`CoordinatorServer._tick_forever`);
- the transport calls :meth:`CoordinatorServer._on_peer_message` for each authenticated peer
  frame, which is decoded (never unpickled) and stepped into the node;
- client requests (put/get/cas/delete/register/status, and the generic ``command`` and
  ``query`` that carry the step log's ops, :mod:`coordinator.steplog`) arrive as msgpack dicts.

Each of these only *schedules* one run of :meth:`_drive` (``loop.call_soon``), so everything
that arrived in the same loop iteration lands in one ``Ready``: one group commit. ``_drive``
follows the core's contract: persist the snapshot, entries and hard state with a single
``DiskStorage.save`` (one fsync) *before* sending any message that depends on them, then
apply committed entries to the :class:`~coordinator.statemachine.StateMachine`, answer the
clients waiting on them, release ReadIndex reads whose index is applied, and ``advance``.
A steady leader's appends depend on nothing being durable on the leader, so by default
(``leader_parallel_persist``, Raft thesis §10.2.1, as etcd does) they leave first and the
leader's fsync overlaps the followers' — the leader counts its own copy toward a commit only
once its fsync returned; votes, answers and anything after a term change always wait. Every
fsync runs in a worker thread (``persist_in_thread``) while the loop keeps accepting requests
and stepping messages, which pile up into the next, larger batch: the loop never waits for
the disk. Heartbeats and their answers leave while a save is in flight (they depend on
nothing durable but the term and vote): a slow disk delays commits, never heartbeats. A hard
state that only moved the commit index is not fsync'd on its own (etcd's rule), and a new
commit index is not broadcast in empty appends of its own (``commit_broadcast``): it rides on
the next append or heartbeat.

After ``snapshot_every`` applied entries or ``snapshot_bytes`` of applied data (or, from
``snapshot_min_every`` entries on, once the entries applied since outweigh the last snapshot:
a restart re-applies them one by one) the state is snapshotted off the loop by a forked child
(:mod:`coordinator.snapshotting`), adopted and the log compacted in the disk thread. A follower that fell behind the compaction is sent the
snapshot, streamed from its file in chunk frames (a distinct frame kind: see
:data:`SNAPSHOT_CHUNK_MAGIC`) paced by the peer link's backlog; the receiver's
:class:`SnapshotReassembler` spools them to a file (one in flight per sender, CRC-32 checked)
and steps the SNAPSHOT message into the node; the storage adopts the file and a worker thread
decodes it. A lost chunk discards the partial snapshot; the follower then rejects the
leader's next append and is sent it again. Every byte bound is in
:meth:`ServerConfig.memory_bounds` and reported with its use in ``status()["memory"]``.

A member that lost its disk rejoins with ``join``: a RECOVERING marker keeps it from voting
until a leader repaired it (:func:`check_join` refuses an empty directory without it when a
peer knows the node). The ticker logs event-loop lag, a slow drive says what it did, and a
watchdog thread logs the loop thread's stack when the ticker is ``stall_dump_s`` overdue.

Writes are proposed only on the leader; a follower answers ``not_leader`` with the leader's id
and endpoint. A write waits for its own entry to be applied: the waiting request is keyed by
its (session, sequence number), which the command carries, so no log index bookkeeping is
needed and a retry of the same command simply waits for the same key. Linearizable reads are
batched into one ``read_index`` per drive and answered once the applied index reaches the
ReadState's index (Raft thesis §6.4): a queued read is a function that produces its answer
from the state machine then (a key's record for ``get``, an extension's answer for
``query``). Stale reads answer from local state immediately.

When the node stops being leader, every waiting write is answered ``leader_changed`` (its entry
may still commit under the new leader, so the client retries with the same sequence number and
the session table answers it once) and every waiting read ``not_leader`` (reads are safe to
retry). A partition for the fault tests is a pair of transport block lists set by the
``admin_partition`` request; a slow disk, ``admin_stall_disk`` (holds the disk thread). A
node hosted by a Ray actor (``remote_stop``) also takes ``admin_stop``: its actor's thread is
parked serving it and cannot be asked through Ray.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import gc
import itertools
import logging
import math
import os
import pathlib
import random
import signal
import sys
import threading
import time
import traceback
import zlib
from collections import deque
from collections.abc import Callable
from typing import Any

import msgpack

from coordinator import (
    kvrange,
    leases,
    membership,
    snapshotting,
    steplog,  # noqa: F401 - registers the step log's commands and extension
)
from coordinator.raft import (
    Config,
    ConfState,
    DecodeError,
    EntryType,
    Message,
    MessageType,
    ProposalDropped,
    RaftNode,
    Role,
    Snapshot,
    SnapshotMetadata,
    decode_conf_change,
    decode_message,
    encode_message,
)
from coordinator.raft.storage import Unavailable as RaftUnavailable
from coordinator.statemachine import (
    KV_QUERIES,
    MAX_KEY_BYTES,
    MAX_VALUE_BYTES,
    StateMachine,
    encode_command,
    is_session_command,
    register_command,
    register_extension,
)
from coordinator.storage import (
    DiskStorage,
    SnapshotFileWriter,
    SnapshotOutOfDate,
    StorageClosed,
    StorageError,
    holds_state,
    write_snapshot_file,
)
from coordinator.transport import (
    DEFAULT_MAX_FRAME_BYTES,
    ClientConnection,
    FrameTooLarge,
    PeerTransport,
    Server,
    TransportError,
    check_token,
)

log = logging.getLogger("coordinator.server")

Address = tuple[str, int]
_ReadAnswer = Callable[[], dict]  # produces a read's answer from the applied state
# What may leave while a save is in flight (CoordinatorServer._send_while_persisting).
_SENT_WHILE_PERSISTING = frozenset({MessageType.HEARTBEAT, MessageType.HEARTBEAT_RESP})
MAX_DISK_STALL_S = 30.0  # admin_stall_disk's bound
#: A watch's long poll is held this long at most with no change (the client asks again).
MAX_WATCH_WAIT_S = 5.0
#: A non-leader whose ticker woke more than ``stall_warn_s`` late (the loop blocked, or the
#: process stopped) delivers the tick it slept for -- maybe its election deadline -- this many
#: heartbeat intervals later, not at once: after a pause of the whole cluster the leader's
#: overdue heartbeat comes first (see CoordinatorServer._tick_forever).
PAUSE_GRACE_HEARTBEATS = 2


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Everything one node needs. ``peers`` maps every voter id (this node included) to the
    address it listens on for both peers and clients, like etcd's ``--initial-cluster``."""

    node_id: int
    peers: dict[int, Address]
    data_dir: pathlib.Path
    token: bytes = dataclasses.field(repr=False)  # a secret: never in a repr or a log line
    listen: Address | None = None  # default: peers[node_id]
    tick_s: float = 0.015
    election_tick: int = 10
    heartbeat_tick: int = 1
    fsync: bool = True
    # A snapshot is taken after snapshot_every applied entries or snapshot_bytes of applied
    # entry data, whichever comes first, in a forked child (snapshot_in_child; see
    # coordinator.snapshotting), and the log is then compacted to a tail of at most
    # keep_entries_after_snapshot entries and keep_bytes_after_snapshot bytes.
    snapshot_every: int = 10_000
    snapshot_bytes: int = 64 << 20
    # ...and, from snapshot_min_every entries on, as soon as the entry data applied since the
    # last snapshot outweighs it (a small state is cheaper to load than its log is to replay;
    # 0 turns this off). See CoordinatorServer._log_outweighs_snapshot.
    snapshot_min_every: int = 1_000
    keep_entries_after_snapshot: int = 2_000
    keep_bytes_after_snapshot: int = 16 << 20
    snapshot_in_child: bool = True
    # Memory bounds, all in bytes; memory_bounds() and status()["memory"] report them with
    # what is in use. Writes are answered "overloaded" (retryable) while the log held in
    # memory (entries since the last compaction) and the writes queued for it are over
    # max_retained_log_bytes, e.g. while a snapshot of a large state is still being written
    # under a heavy write load, or a slow disk holds the writes back.
    max_retained_log_bytes: int = 256 << 20
    # Appends sent to one follower and not yet acknowledged: max_inflight_bytes //
    # max_append_bytes messages of at most max_append_bytes (plus one command) each.
    max_inflight_bytes: int = 64 << 20
    max_append_bytes: int = 1 << 20
    max_peer_queue_bytes: int = 64 << 20  # queued for one peer's link (oldest dropped beyond)
    # True: this node lost its data directory and rejoins an existing cluster (`serve
    # --join`). On an empty data directory a RECOVERING marker is written first; while it
    # exists the node neither votes nor campaigns until a leader has repaired it.
    join: bool = False
    # The configuration a new storage starts from (None: every node in ``peers`` a voter): a
    # node joining a running cluster starts from the membership it was given by the cluster
    # (``serve --join``, coordinator.membership.fetch_membership).
    bootstrap: ConfState | None = None
    request_timeout_s: float = 5.0
    max_pending_requests: int = 20_000
    persist_in_thread: bool = True  # leader's fsync off the event loop (CoordinatorServer._drive)
    # On by default (as etcd's raft): a steady leader sends its appends while its own fsync
    # runs; nothing that depends on the leader's disk leaves before that fsync (see
    # CoordinatorServer._leader_may_send_first). Off: every message waits for the save.
    leader_parallel_persist: bool = True
    # Off by default: a new commit index reaches the followers on the next append or
    # heartbeat (one tick), not in empty appends of its own; see raft Config.commit_broadcast.
    commit_broadcast: bool = False
    seed: int | None = None
    # The transport's frame limit (peer and client connections; the same on every node). A
    # snapshot larger than one chunk travels as a sequence of chunk frames of at most
    # min(snapshot_chunk_bytes, max_frame_bytes // 2) bytes of data each.
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    snapshot_chunk_bytes: int = 4 << 20
    # Bytes of incoming snapshot chunks a node buffers, all senders together (refused beyond).
    max_snapshot_reassembly_bytes: int = 1 << 30
    # A tick later than this logs a warning naming the lag (the loop was blocked or the
    # process paused); a drive longer than this logs what it did. None: half an election
    # timeout.
    loop_stall_warn_s: float | None = None
    # A loop that has not ticked for this long has its thread's stack logged by a watchdog
    # thread (sys._current_frames, under the GIL): says *where* it was blocked. None: off.
    stall_dump_s: float | None = 2.0
    # Accept the authenticated ``admin_stop`` request (the node stops as on SIGTERM). On for a
    # node hosted by a Ray actor (coordinator.cluster.RayCluster), whose actor is busy serving
    # and cannot be asked to stop through Ray; off otherwise (a process is stopped by signal).
    remote_stop: bool = False
    # A follower whose leader's connection is closed or reset by the other side (a killed
    # leader's sockets close with its process) times out within a few ticks instead of a
    # whole election timeout (raft RaftNode.report_disconnected): a killed leader is replaced
    # at once even with a long timeout and rare heartbeats. A stopped (SIGSTOP) or cut-off
    # leader keeps its sockets and is still found out by the timeout.
    leader_loss_on_disconnect: bool = True

    def __post_init__(self) -> None:
        check_token(self.token)  # ValueError saying how to generate a long enough one
        if self.node_id not in self.peers:
            raise ValueError(f"node id {self.node_id} is not in the peer list "
                             f"{sorted(self.peers)}: --peers must name every member, this one too")
        if self.tick_s <= 0 or self.election_tick <= self.heartbeat_tick:
            raise ValueError("need tick_s > 0 and election_tick > heartbeat_tick")
        if self.max_frame_bytes < 2 * MIN_SNAPSHOT_CHUNK_BYTES:
            raise ValueError(f"max_frame_bytes must be at least {2 * MIN_SNAPSHOT_CHUNK_BYTES}")
        if self.snapshot_chunk_bytes < MIN_SNAPSHOT_CHUNK_BYTES:
            raise ValueError(f"snapshot_chunk_bytes must be at least {MIN_SNAPSHOT_CHUNK_BYTES}")
        if self.max_snapshot_reassembly_bytes < 1:
            raise ValueError("max_snapshot_reassembly_bytes must be positive")
        for name in ("snapshot_every", "snapshot_bytes", "max_retained_log_bytes",
                     "max_inflight_bytes", "max_append_bytes", "max_peer_queue_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.snapshot_min_every < 0:
            raise ValueError("snapshot_min_every must be >= 0 (0: off)")
        if self.keep_entries_after_snapshot < 0 or self.keep_bytes_after_snapshot < 0:
            raise ValueError("keep_entries_after_snapshot and keep_bytes_after_snapshot "
                             "must be >= 0")
        if self.max_retained_log_bytes < self.snapshot_bytes + self.keep_bytes_after_snapshot:
            raise ValueError(f"max_retained_log_bytes ({self.max_retained_log_bytes}) must "
                             "be at least snapshot_bytes + keep_bytes_after_snapshot, or "
                             "writes would be refused before a snapshot is even due")

    @property
    def effective_snapshot_chunk_bytes(self) -> int:
        """Snapshot data per chunk frame: leaves half a frame for the header and the MAC."""
        return min(self.snapshot_chunk_bytes, self.max_frame_bytes // 2)

    @property
    def max_command_bytes(self) -> int:
        """The largest encoded command a client may propose (it must fit one append)."""
        return self.max_frame_bytes // 4

    @property
    def append_bytes(self) -> int:
        """Entry data per append message (at least one entry, so plus one command)."""
        return min(self.max_append_bytes, self.max_command_bytes)

    @property
    def max_inflight_msgs(self) -> int:
        return max(4, self.max_inflight_bytes // self.append_bytes)

    def memory_bounds(self) -> dict[str, int]:
        """Every byte bound of one node, in one place (status()["memory"] adds the usage)."""
        chunk = self.effective_snapshot_chunk_bytes
        return {
            "retained_log_bytes_max": self.max_retained_log_bytes,
            "snapshot_threshold_bytes": self.snapshot_bytes,
            "keep_bytes_after_snapshot": self.keep_bytes_after_snapshot,
            "inflight_msgs_per_peer": self.max_inflight_msgs,
            "inflight_bytes_per_peer_max":
                self.max_inflight_msgs * (self.append_bytes + self.max_command_bytes),
            "peer_queue_bytes_max": max(self.max_peer_queue_bytes, self.max_frame_bytes),
            "snapshot_send_bytes_per_peer_max": 3 * chunk,  # 2 queued + 1 being read
            "snapshot_reassembly_bytes_max": self.max_snapshot_reassembly_bytes,
            "pending_requests_max": 2 * self.max_pending_requests,
            "value_bytes_max": MAX_VALUE_BYTES,
            "key_bytes_max": MAX_KEY_BYTES,
        }

    @property
    def stall_warn_s(self) -> float:
        if self.loop_stall_warn_s is not None:
            return self.loop_stall_warn_s
        return max(0.05, self.election_tick * self.tick_s / 2)


def endpoint_str(addr: Address) -> str:
    return f"{addr[0]}:{addr[1]}"


# ------------------------------------------------------------------ snapshot chunks
#: A peer frame starting with these two bytes is a snapshot chunk, not an encoded Raft
#: message. 0xC1 is the one byte msgpack never uses, so no encoded message (a msgpack array,
#: first byte 0x9C) can start with it; the second byte is the chunk format version.
SNAPSHOT_CHUNK_MAGIC = b"\xc1\x01"
#: Every chunk but the last of a snapshot carries the same number of data bytes, at least this.
MIN_SNAPSHOT_CHUNK_BYTES = 1024
_CHUNK_FIELDS = 8


@dataclasses.dataclass(frozen=True, slots=True)
class SnapshotChunk:
    """One chunk frame: ``magic | msgpack [index, term, seq, total, total_bytes, crc32, data,
    head]``. ``index``/``term`` are the snapshot's (its metadata), ``crc32`` covers the whole
    snapshot data, and ``head`` (chunk 0 only; None in the others) is the encoded SNAPSHOT
    message with empty snapshot data: from, to, the leader's term and the metadata."""

    index: int
    term: int
    seq: int
    total: int
    total_bytes: int
    crc32: int
    data: bytes
    head: bytes | None


def encode_snapshot_chunks(m: Message, chunk_bytes: int) -> list[bytes]:
    """The chunk frames carrying SNAPSHOT message ``m`` (whose data is not empty)."""
    snap = m.snapshot
    if m.type != MessageType.SNAPSHOT or snap is None or not snap.data:
        raise ValueError("only a SNAPSHOT message with snapshot data is sent in chunks")
    if chunk_bytes < MIN_SNAPSHOT_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be at least {MIN_SNAPSHOT_CHUNK_BYTES}")
    data = snap.data
    md = snap.metadata
    head = snapshot_head(m)
    crc = zlib.crc32(data)
    total = -(-len(data) // chunk_bytes)
    view = memoryview(data)
    return [encode_snapshot_chunk(md, seq, total, len(data), crc,
                                  view[seq * chunk_bytes:(seq + 1) * chunk_bytes], head)
            for seq in range(total)]


def snapshot_head(m: Message) -> bytes:
    """Chunk 0's ``head``: SNAPSHOT message ``m`` encoded with empty snapshot data."""
    assert m.snapshot is not None
    return encode_message(dataclasses.replace(m, snapshot=Snapshot(m.snapshot.metadata, b"")))


def encode_snapshot_chunk(md: SnapshotMetadata, seq: int, total: int, total_bytes: int,
                          crc: int, data: bytes | memoryview, head: bytes) -> bytes:
    """Chunk frame ``seq`` of ``total`` (``head`` goes into chunk 0 only)."""
    return SNAPSHOT_CHUNK_MAGIC + msgpack.packb(
        [md.index, md.term, seq, total, total_bytes, crc, data, head if seq == 0 else None],
        use_bin_type=True)


def _chunk_uint(v: Any, what: str, bits: int = 63) -> int:
    if type(v) is not int or v < 0 or v >= 1 << bits:
        got = repr(v) if type(v) is int else f"a {type(v).__name__}"
        raise DecodeError(f"chunk {what} must be an unsigned {bits}-bit integer, got {got:.40}")
    return v


def decode_snapshot_chunk(payload: bytes) -> SnapshotChunk:
    """Decode and range-check one chunk frame (the magic included); DecodeError only."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise DecodeError(f"expected bytes, got {type(payload).__name__}")
    if bytes(payload[:len(SNAPSHOT_CHUNK_MAGIC)]) != SNAPSHOT_CHUNK_MAGIC:
        raise DecodeError("not a snapshot chunk (wrong magic or an unknown chunk version)")
    try:
        v = msgpack.unpackb(memoryview(payload)[len(SNAPSHOT_CHUNK_MAGIC):], raw=False,
                            use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types; normalise them
        raise DecodeError(f"not a valid msgpack value: {exc.__class__.__name__}: {exc}") from None
    if type(v) is not list or len(v) != _CHUNK_FIELDS:  # (no repr: it may hold megabytes)
        got = f"an array of {len(v)}" if type(v) is list else f"a {type(v).__name__}"
        raise DecodeError(f"a chunk must be an array of {_CHUNK_FIELDS}, got {got}")
    index, term, seq, total, total_bytes, crc, data, head = v
    index, term = _chunk_uint(index, "index"), _chunk_uint(term, "term")
    seq, total = _chunk_uint(seq, "seq"), _chunk_uint(total, "total")
    total_bytes, crc = _chunk_uint(total_bytes, "total_bytes"), _chunk_uint(crc, "crc32", 32)
    if index == 0 or term == 0:
        raise DecodeError("chunk of a snapshot at index or term 0")
    if not seq < total <= total_bytes:
        raise DecodeError(f"chunk {seq} of {total} ({total_bytes} bytes) is out of range")
    if type(data) is not bytes or not 0 < len(data) <= total_bytes:
        raise DecodeError("chunk data must be 1 to total_bytes bytes")
    if not (type(head) is bytes if seq == 0 else head is None):
        raise DecodeError("chunk 0, and only chunk 0, carries the message head (bytes)")
    return SnapshotChunk(index, term, seq, total, total_bytes, crc, data, head)


@dataclasses.dataclass(slots=True)
class _PartialSnapshot:
    head: Message  # chunk 0's message, snapshot data empty
    first: SnapshotChunk  # chunk 0, for the fields every later chunk must repeat
    parts: list[bytes]  # the chunks' data (in memory; empty when spooled to a file)
    crc: int  # CRC-32 of the data so far (checked chunk by chunk, not all at the end)
    received: int = 1  # chunks received
    writer: SnapshotFileWriter | None = None  # spooling to a file instead of ``parts``


class SnapshotReassembler:
    """Rebuilds SNAPSHOT messages from chunk frames, per sender (event-loop thread only).

    At most one snapshot is in flight per sender: a chunk 0 (re)starts it, and a chunk of
    another snapshot discards the partial one. Chunks must arrive in order (the transport keeps
    a peer's frames in order; a gap means a frame was lost, and the leader sends the snapshot
    again when the follower rejects its next append), so a missing, repeated or inconsistent
    chunk discards the partial snapshot. The declared sizes of all partial snapshots together
    stay within ``max_bytes``: a snapshot that would exceed it is refused (after discarding
    other senders' partial snapshots of an older leader term). The result is checked against
    its CRC-32 before it is handed out. Everything is counted in ``stats``; nothing raises.

    With ``spool(frm, metadata)`` (a server's), the data is not kept in memory: it is
    written as it arrives into that file, in the storage's snapshot file format
    (:class:`~coordinator.storage.SnapshotFileWriter`), and the message handed out has empty
    snapshot data; :meth:`take_file` gives the file for the storage to adopt. Memory then
    holds one chunk, whatever the size of the state; ``max_bytes`` bounds the disk used.
    """

    STATS = ("snapshot_chunks_in", "snapshots_reassembled", "snapshot_chunks_malformed",
             "snapshot_chunks_out_of_order", "snapshot_reassemblies_discarded",
             "snapshot_reassemblies_refused", "snapshot_checksum_failures")

    def __init__(self, node_id: int, max_bytes: int, stats: dict[str, int],
                 spool: Callable[[int, SnapshotMetadata], pathlib.Path] | None = None) -> None:
        self.node_id = node_id
        self.max_bytes = max_bytes
        self.stats = stats
        for name in self.STATS:
            stats.setdefault(name, 0)
        self._partial: dict[int, _PartialSnapshot] = {}
        self._spool = spool
        self._files: dict[int, tuple[int, int, pathlib.Path]] = {}  # frm -> completed file

    def take_file(self, index: int, term: int) -> pathlib.Path | None:
        """The spooled file of a completed snapshot (index, term), handed over once."""
        for frm, (i, t, path) in list(self._files.items()):
            if (i, t) == (index, term):
                del self._files[frm]
                return path
        return None

    def discard_files(self) -> None:
        """Remove completed files nobody took (shutdown)."""
        for _, _, path in self._files.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._files.clear()

    @property
    def buffered_bytes(self) -> int:
        """The declared sizes of the snapshots being reassembled (what the bound counts)."""
        return sum(p.first.total_bytes for p in self._partial.values())

    def in_flight(self, frm: int) -> tuple[int, int, int] | None:
        """(index, term, chunks received) of the snapshot being reassembled from ``frm``."""
        p = self._partial.get(frm)
        return None if p is None else (p.first.index, p.first.term, p.received)

    def add(self, frm: int, payload: bytes) -> Message | None:
        """Take one chunk frame from peer ``frm``; the whole SNAPSHOT message once complete."""
        self.stats["snapshot_chunks_in"] += 1
        try:
            c = decode_snapshot_chunk(payload)
        except DecodeError as exc:
            self._malformed(frm, str(exc))
            return None
        if c.seq == 0:
            return self._start(frm, c)
        p = self._partial.get(frm)
        if p is None or (c.index, c.term) != (p.first.index, p.first.term):
            # Chunk 0 of this snapshot never arrived (lost, refused, or its snapshot was
            # discarded already): nothing to extend. A partial older snapshot is superseded.
            self.stats["snapshot_chunks_out_of_order"] += 1
            if p is not None:
                self._discard(frm, f"chunk {c.seq} of snapshot {c.index}/{c.term} arrived")
            return None
        f = p.first
        if (c.total, c.total_bytes, c.crc32) != (f.total, f.total_bytes, f.crc32):
            self._discard(frm, "chunk fields differ from chunk 0")
            self._malformed(frm, "total/total_bytes/crc32 differ from chunk 0")
            return None
        if c.seq != p.received:
            self.stats["snapshot_chunks_out_of_order"] += 1
            self._discard(frm, f"chunk {c.seq} arrived where {p.received} was due")
            return None
        size = len(f.data)
        want = size if c.seq < f.total - 1 else f.total_bytes - size * (f.total - 1)
        if len(c.data) != want:
            self._discard(frm, "chunk of the wrong size")
            self._malformed(frm, f"chunk {c.seq} has {len(c.data)} bytes, not {want}")
            return None
        if not self._keep(frm, p, c.data):
            return None
        p.received += 1
        p.crc = zlib.crc32(c.data, p.crc)
        return self._complete(frm) if p.received == f.total else None

    def _keep(self, frm: int, p: _PartialSnapshot, data: bytes) -> bool:
        if p.writer is None:
            p.parts.append(data)
            return True
        try:
            p.writer.write(data)
        except (OSError, ValueError) as exc:
            self._discard(frm, f"cannot spool it: {exc}")
            return False
        return True

    def _start(self, frm: int, c: SnapshotChunk) -> Message | None:
        if frm in self._partial:
            self._discard(frm, f"snapshot {c.index}/{c.term} started")
        assert c.head is not None  # decode_snapshot_chunk: chunk 0 carries it
        try:
            head = decode_message(c.head)
        except DecodeError as exc:
            self._malformed(frm, f"chunk 0 head: {exc}")
            return None
        snap = head.snapshot
        if (head.type != MessageType.SNAPSHOT or snap is None or snap.data
                or (snap.metadata.index, snap.metadata.term) != (c.index, c.term)):
            self._malformed(frm, "chunk 0 head is not this snapshot's SNAPSHOT message")
            return None
        if head.frm != frm or head.to != self.node_id:
            self._malformed(frm, f"chunk 0 head claims {head.frm}->{head.to}")
            return None
        size = len(c.data)
        if c.total != -(-c.total_bytes // size) or (c.total > 1 and size < MIN_SNAPSHOT_CHUNK_BYTES):
            self._malformed(frm, f"{c.total} chunks of {size} bytes cannot carry "
                                 f"{c.total_bytes} bytes")
            return None
        if self.buffered_bytes + c.total_bytes > self.max_bytes:
            # A newer leader's snapshot makes an older leader's partial snapshots useless.
            for other in [i for i, p in self._partial.items() if p.head.term < head.term]:
                self._discard(other, f"node {frm} sent a snapshot in term {head.term}")
        if self.buffered_bytes + c.total_bytes > self.max_bytes:
            self.stats["snapshot_reassemblies_refused"] += 1
            log.warning("node %d: refusing a %d-byte snapshot from node %d: %d bytes already "
                        "buffered, limit %d", self.node_id, c.total_bytes, frm,
                        self.buffered_bytes, self.max_bytes)
            return None
        p = _PartialSnapshot(head, c, [], zlib.crc32(c.data))
        if self._spool is not None:
            try:
                p.writer = SnapshotFileWriter(self._spool(frm, snap.metadata), snap.metadata,
                                              c.total_bytes, sync=None)
            except OSError as exc:
                self.stats["snapshot_reassemblies_refused"] += 1
                log.warning("node %d: cannot spool a snapshot from node %d: %s", self.node_id,
                            frm, exc)
                return None
        self._partial[frm] = p
        if not self._keep(frm, p, c.data):
            return None
        return self._complete(frm) if c.total == 1 else None

    def _complete(self, frm: int) -> Message | None:
        p = self._partial.pop(frm)
        data = b"" if p.writer is not None else (
            p.parts[0] if len(p.parts) == 1 else b"".join(p.parts))
        p.parts.clear()
        size = p.first.total_bytes if p.writer is not None else len(data)
        if size != p.first.total_bytes or p.crc != p.first.crc32:
            self.stats["snapshot_checksum_failures"] += 1
            self.stats["snapshot_reassemblies_discarded"] += 1
            if p.writer is not None:
                p.writer.abort()
            log.warning("node %d: snapshot %d/%d from node %d fails its checksum; discarded",
                        self.node_id, p.first.index, p.first.term, frm)
            return None
        if p.writer is not None:
            try:
                p.writer.finish()
            except OSError as exc:
                p.writer.abort()
                self.stats["snapshot_reassemblies_discarded"] += 1
                log.warning("node %d: cannot finish spooling snapshot %d/%d: %s",
                            self.node_id, p.first.index, p.first.term, exc)
                return None
            old = self._files.pop(frm, None)
            if old is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(old[2])
            self._files[frm] = (p.first.index, p.first.term, p.writer.path)
        self.stats["snapshots_reassembled"] += 1
        snap = p.head.snapshot
        assert snap is not None
        return dataclasses.replace(p.head, snapshot=Snapshot(snap.metadata, data))

    def _discard(self, frm: int, why: str) -> None:
        p = self._partial.pop(frm, None)
        if p is None:
            return
        if p.writer is not None:
            p.writer.abort()
        self.stats["snapshot_reassemblies_discarded"] += 1
        log.warning("node %d: discarding snapshot %d/%d from node %d after %d of %d chunks: %s",
                    self.node_id, p.first.index, p.first.term, frm, p.received,
                    p.first.total, why)

    def _malformed(self, frm: int, why: str) -> None:
        self.stats["snapshot_chunks_malformed"] += 1
        log.warning("node %d: dropping a malformed snapshot chunk from node %d: %s",
                    self.node_id, frm, why)


# ------------------------------------------------------------------ a lost disk
#: While this file exists in the data directory the node starts with ``recovering=True``.
RECOVERING_MARKER = "RECOVERING"


def _write_durably(path: pathlib.Path, data: bytes) -> None:
    """tmp + fsync + rename + directory fsync (the directory is created 0700 if missing)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_recovering_marker(data_dir: pathlib.Path) -> None:
    """Mark ``data_dir`` as a lost disk being rebuilt, durably, before anything else is put
    in it: a crash before the first repair still restarts recovering."""
    _write_durably(data_dir / RECOVERING_MARKER,
                   b"this node lost its state; it does not vote until a leader repaired it\n")


class MembersSeen:
    """State-machine extension ``members``: the ids of the nodes that ever acknowledged a
    leader's entries. The leader proposes ``members.seen`` for a voter the first time its
    progress shows a match (:meth:`CoordinatorServer._record_members`), so every replica
    learns, durably and in log order, which members have taken part; :func:`check_join`
    asks any one of them."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        # id -> "host:port" of members added while the cluster ran (members.addr;
        # coordinator.membership): every node dials them, whatever its --peers said.
        self.addrs: dict[int, str] = {}

    def snapshot_state(self) -> dict[str, Any]:
        return {"seen": sorted(self.seen), "addrs": [[i, a] for i, a in sorted(self.addrs.items())]}

    def restore_state(self, state: Any) -> None:
        if isinstance(state, dict):  # since members were added at run time
            self.seen = {int(i) for i in state.get("seen", [])}
            self.addrs = {int(i): str(a) for i, a in state.get("addrs", [])}
        else:  # the older format: the list of ids seen
            self.seen, self.addrs = {int(i) for i in state}, {}

    def query(self, name: str, args: tuple[Any, ...]) -> dict[str, Any]:
        return {"ok": True, "seen": sorted(self.seen), "addrs": sorted(self.addrs.items())}


register_extension("members", MembersSeen)
_MAX_MEMBER_ID = 1 << 31


@register_command("members.seen", sessionless=True)
def _members_seen(sm: StateMachine, cmd: Any, index: int) -> dict[str, Any]:
    ids = [i for i in cmd.args[:64] if type(i) is int and 0 < i < _MAX_MEMBER_ID]
    ext = sm.extensions["members"]
    assert isinstance(ext, MembersSeen)
    ext.seen.update(ids)
    return {"ok": True}


@register_command("members.addr", sessionless=True)
def _members_addr(sm: StateMachine, cmd: Any, index: int) -> dict[str, Any]:
    """The leader's record of where a member added at run time listens (None: forget it)."""
    if len(cmd.args) != 2 or type(cmd.args[0]) is not int or not 0 < cmd.args[0] < _MAX_MEMBER_ID \
            or (cmd.args[1] is not None and membership.parse_address(cmd.args[1]) is None):
        return {"ok": False, "error": "bad_command", "detail": "members.addr takes (id, 'host:port' or None)"}
    ext = sm.extensions["members"]
    assert isinstance(ext, MembersSeen)
    if cmd.args[1] is None:
        ext.addrs.pop(cmd.args[0], None)
    else:
        ext.addrs[cmd.args[0]] = cmd.args[1]
    return {"ok": True}


class NeedsJoin(RuntimeError):
    """``serve`` on an empty data directory for a node the cluster already knows."""


async def check_join(config: ServerConfig, timeout_s: float = 1.0) -> None:
    """Refuse to start a node on an empty data directory, without ``--join``, when a peer
    that answers within ``timeout_s`` has heard from this node before: it lost its disk,
    and starting it as new could let it vote twice in one term (NeedsJoin says what to do).

    The cluster replicates which members ever acknowledged a leader's entries
    (:class:`MembersSeen`) and each node reports them in ``status``. A node of a cluster
    being created has acknowledged nothing before its first start, so no peer lists it and
    the check never refuses a new cluster, however its nodes' starts interleave. Peers that
    are down cannot answer, and a node lost before any leader recorded it is not listed:
    ``--join`` is the reliable way, this check catches the mistake whenever a peer is up."""
    if config.join or holds_state(config.data_dir):
        return

    async def heard_me(addr: Address) -> int | None:
        try:
            conn = await ClientConnection.connect(addr[0], addr[1], config.token,
                                                  timeout_s=timeout_s)
        except (OSError, asyncio.TimeoutError, TransportError):
            return None
        try:
            answer = await conn.request({"op": "status"}, timeout_s=timeout_s)
        except (OSError, asyncio.TimeoutError, TransportError):
            return None
        finally:
            await conn.close()
        heard = answer.get("members_seen") if isinstance(answer, dict) else None
        return answer.get("id") if isinstance(heard, list) and config.node_id in heard else None

    peers = [a for i, a in config.peers.items() if i != config.node_id]
    found = [i for i in await asyncio.gather(*map(heard_me, peers)) if i is not None]
    if found:
        raise NeedsJoin(
            f"node {config.node_id}: the data directory {config.data_dir} is empty, but node "
            f"{found[0]} knows node {config.node_id} as a member that took part before: it lost its "
            "state (or --data-dir points at the wrong directory). A member that lost its "
            "disk must rejoin with --join, so that it neither votes nor campaigns until the "
            "leader has repaired it (voting again after forgetting a vote could elect two "
            "leaders in one term). Run the same command with --join, or fix --data-dir.")


#: A snapshot child still running after this long is killed (and the snapshot retried).
SNAPSHOT_CHILD_TIMEOUT_S = 600.0


@dataclasses.dataclass(slots=True)
class _SnapshotJob:
    """A snapshot being written off the loop (see :mod:`coordinator.snapshotting`)."""

    md: SnapshotMetadata
    tmp: pathlib.Path
    pid: int  # the child writing it; 0 when written by a thread (no fork)
    started: float  # perf_counter
    fork_ms: float
    exit_code: int | None = None  # set when the writer finished
    written_s: float = 0.0
    adopting: bool = False


def _wake(alarm: asyncio.Future) -> None:
    if not alarm.done():
        alarm.set_result(None)


class CoordinatorServer:
    """Drives one RaftNode; see the module docstring. Use ``await start()`` / ``await stop()``
    or :func:`serve` for a whole process."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.id = config.node_id
        voters = tuple(sorted(config.peers))
        self._marker = config.data_dir / RECOVERING_MARKER
        if config.join and not holds_state(config.data_dir):
            write_recovering_marker(config.data_dir)  # durable before the storage exists
        recovering = self._marker.exists()
        self._marker_cached = recovering
        self.storage = DiskStorage(config.data_dir, conf_state=config.bootstrap or ConfState(voters=voters),
                                   fsync=config.fsync, keep_snapshot_data=False)
        self.sm = StateMachine()
        snap = self.storage.snapshot()
        self.restore_timing: dict[str, float] = {}
        if snap.metadata.index > 0:
            self._restore_at_start(snap.metadata.index)
        self.conf_state = self.storage.initial_state()[1]
        self._snapshot_index = snap.metadata.index
        hard_state = self.storage.initial_state()[0]
        self._saved_term_vote = (hard_state.term, hard_state.vote)  # as of the last save begun
        self._durable_term_vote = self._saved_term_vote  # as of the last save finished
        self._unsaved_hs: Any = None  # a commit-only HardState not yet written
        self._persisting: asyncio.Future | None = None  # the save in flight (persist_in_thread)
        self._disk = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"wal-{self.id}")
        self._init_background_state()
        self.node = self._new_raft_node(snap.metadata.index, recovering)
        self.role = Role.FOLLOWER
        self._pending_writes: dict[tuple, list[asyncio.Future]] = {}
        self._proposals: list[tuple[bytes, tuple, asyncio.Future]] = []
        self._queued_bytes = 0  # of the writes in _proposals: admitted, not yet in the log
        self._saving_bytes = 0  # of the entries in the save in flight, not yet in the storage
        # A linearizable read is (the function producing its answer once applied, future).
        self._reads_unissued: list[tuple[_ReadAnswer, asyncio.Future]] = []
        self._reads_by_ctx: dict[bytes, list[tuple[_ReadAnswer, asyncio.Future]]] = {}
        self._reads_waiting: deque[tuple[int, _ReadAnswer, asyncio.Future]] = deque()
        self._read_ctx_counter = 0
        # (deadline, write key or None for a read, future), in deadline order.
        self._deadlines: deque[tuple[float, tuple | None, asyncio.Future]] = deque()
        self._drive_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ticker: asyncio.Task | None = None
        # the tickless ticker (see _tick_forever): tick k falls at _tick_grid + k * tick_s;
        # _ticks delivered so far; asleep until tick _wake_tick (at _wake_at) on _alarm
        self._tick_grid, self._ticks, self._wake_tick = time.monotonic(), 0, 1
        self._wake_at = time.monotonic() + 1.0  # read by the watchdog thread (_watch_loop)
        self._alarm: asyncio.Future | None = None
        self._stopped = asyncio.Event()
        self._stop_task: asyncio.Future | None = None
        self.fatal_error: BaseException | None = None  # set when the node stopped on an error
        self.stats = {"peer_messages_in": 0, "peer_messages_dropped": 0, "readies": 0,
                      "proposals": 0, "reads_issued": 0, "snapshots": 0, "requests": 0,
                      "snapshots_sent_chunked": 0, "snapshot_chunks_out": 0,
                      "snapshot_send_failures": 0, "snapshot_failures": 0,
                      "snapshots_installed": 0, "writes_refused_log_full": 0,
                      "loop_stalls": 0, "loop_lag_max_ms": 0, "slow_drives": 0,
                      "sent_while_persisting": 0, "disk_stalls_injected": 0,
                      "notices": 0, "appends_repeated_dropped": 0, "ticks": 0, "ticker_wakes": 0}
        self._chunk_bytes = config.effective_snapshot_chunk_bytes
        self._spooled = itertools.count(1)  # numbers the files snapshots are spooled to
        self._reassembler = SnapshotReassembler(
            self.id, config.max_snapshot_reassembly_bytes, self.stats, spool=self._spool_path)
        listen = config.listen or config.peers[self.id]
        self.transport_server = Server(
            node_id=self.id, token=config.token, on_peer_message=self._on_peer_message,
            on_client_request=self._on_client_request, host=listen[0], port=listen[1],
            on_peer_connected=self._on_peer_connected, on_peer_disconnected=self._on_peer_disconnected,
            max_frame_bytes=config.max_frame_bytes)
        self.peer_transport = PeerTransport(
            node_id=self.id, token=config.token,
            peers={i: a for i, a in self._peers_now.items() if i != self.id},
            on_unreachable=self._on_unreachable, max_frame_bytes=config.max_frame_bytes,
            max_queue_bytes=config.max_peer_queue_bytes)

    def _init_background_state(self) -> None:
        """What snapshots, streams, liveness checks and repeated appends keep."""
        # snapshot work: waiting for the snapshot child, reading and checksumming the file
        self._io = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix=f"snap-{self.id}")
        self._snap_job: _SnapshotJob | None = None
        self._snapshot_retry_at = 0.0  # after a failed snapshot, not before this (monotonic)
        self._stalled = False  # the last tick came late (see _note_lag)
        self._last_tick_at = time.monotonic()  # read by the watchdog thread (_watch_loop)
        self._continued_at = -1e9  # when SIGCONT last arrived (note_continued)
        # The watchdog thread's nap (None: no watchdog) and when it last woke: a lag it was
        # held through too was the whole process stopped (see _process_was_held)
        self._watch_nap: float | None = None
        self._watch_at = time.monotonic()
        self._applied_bytes = 0  # entry data applied since the last snapshot started
        self._held_snapshot = (-1, 0)  # (snapshot index, its data bytes): see _log_outweighs_snapshot
        self._senders: dict[int, tuple[tuple[int, int], asyncio.Task]] = {}  # peer -> stream
        self._members_proposed: set[int] = set()  # members.seen proposed in this term
        # Leases: a new leader expires none before this (ms, wall clock; see _expire_leases),
        # and proposes each lease's expiry at most once a second (id -> when last proposed).
        self._lease_grace_until_ms = 0
        self._expiry_proposed: dict[int, float] = {}
        # Watches waiting for a change (long polls): (future, the events query's args, the
        # answer's deadline), answered when an applied change falls in their range.
        self._watchers: list[tuple[asyncio.Future, tuple, float]] = []
        self._watch_revision = 0  # the store's revision when the waiting watches were last checked
        self._member_change: asyncio.Task | None = None  # the membership change in flight
        self._removed_since: float | None = None  # when this node saw itself removed
        self._leaderless_since: float | None = None  # since when it has known no leader
        self._probe_after = 0.0  # no membership probe before this (monotonic)
        self._peers_now: dict[int, Address] = self.peer_addresses()  # what the transport dials
        # peer -> ((term, prev index, prev term), sent at) of the last APPEND with entries
        # it has not answered yet (see _repeats_append)
        self._appends_sent: dict[int, tuple[tuple[int, int, int], float]] = {}
        self._append_resend_s = 2 * self.config.election_tick * self.config.tick_s

    def _new_raft_node(self, applied: int, recovering: bool) -> RaftNode:
        config = self.config
        if recovering:
            log.warning("node %d starts RECOVERING (%s exists): it lost its data directory "
                        "and will neither vote nor campaign until a leader has repaired it",
                        self.id, self._marker)
        rng = random.Random(config.seed if config.seed is not None else os.urandom(8))
        return RaftNode(
            Config(id=self.id, election_tick=config.election_tick,
                   heartbeat_tick=config.heartbeat_tick, applied=applied,
                   commit_broadcast=config.commit_broadcast,
                   # an append must fit a frame (only snapshots are chunked)
                   max_size_per_msg=config.append_bytes,
                   max_inflight_msgs=config.max_inflight_msgs, recovering=recovering),
            self.storage, rng)

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Bind, connect to peers and start ticking. Returns once the node is serving."""
        self._loop = asyncio.get_running_loop()
        await self.transport_server.start()
        await self.peer_transport.start()
        # etcd's initial-election-tick-advance: a node that starts has heard from no leader,
        # so it need not wait a whole election timeout before it may campaign; a whole
        # cluster restarting elects one that much sooner. A node restarting into a cluster
        # that has a leader is refused by PreVote (the others hear their leader), and a
        # recovering node never campaigns.
        for _ in range(self.config.election_tick - 1):
            self.node.tick()
        self._ticker = asyncio.create_task(self._tick_forever(), name=f"ticker-{self.id}")
        if self.config.stall_dump_s is not None:
            loop_thread = threading.get_ident()
            threading.Thread(target=self._watch_loop, args=(loop_thread,), daemon=True,
                             name=f"stall-watchdog-{self.id}").start()
        self._schedule_drive()
        log.info("node %d serving on %s (data dir %s)", self.id,
                 endpoint_str(self.transport_server.address), self.config.data_dir)

    @property
    def address(self) -> Address:
        return self.transport_server.address

    async def stop(self) -> None:
        """Stop ticking, close the network and release the data dir. Idempotent: a second
        call returns once the first one's stop is complete."""
        await asyncio.shield(self._begin_stop())

    def _begin_stop(self) -> asyncio.Future:
        """Start stopping (once) without waiting: the task that does it."""
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._stop())
        return self._stop_task

    async def _stop(self) -> None:
        self._stopped.set()
        if self._ticker is not None:
            self._ticker.cancel()
        self._fail_pending_writes("shutting_down")
        self._fail_pending_reads("shutting_down")
        for fut, _, _ in self._watchers:
            if not fut.done():
                fut.set_result(self._redirect("shutting_down"))
        self._watchers = []
        self._stop_senders()
        job = self._snap_job
        if job is not None and job.pid and job.exit_code is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(job.pid, signal.SIGKILL)  # its waiter thread then returns
        await self.transport_server.close()
        await self.peer_transport.close()
        if self._persisting is not None:
            await asyncio.gather(self._persisting, return_exceptions=True)
        self._disk.shutdown(wait=True)
        self._io.shutdown(wait=True)
        self._reassembler.discard_files()
        self._flush_hard_state()
        self.storage.close()
        log.info("node %d stopped", self.id)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def _tick_forever(self) -> None:
        """The node's clock, tickless: logical tick ``k`` falls at ``_tick_grid + k * tick_s``,
        but the ticker sleeps through the ticks that could only count (the core's
        :meth:`~coordinator.raft.RaftNode.ticks_until_due`, and the periodic chores below)
        and delivers them together when it wakes. An idle follower wakes for its leader's
        heartbeats and little else; a ticker firing every ``tick_s`` woke each node ten to
        sixty times a second for nothing, and on a machine training shares, each wake costs
        the training more than its own CPU. Whatever could move the due tick earlier (a
        message, a role change, a lease, a watcher) re-arms the ticker (:meth:`_rearm_ticker`);
        a message first catches the node up on the ticks due before it (:meth:`_catch_up`)."""
        assert self._loop is not None
        period = self.config.tick_s
        self._tick_grid, self._ticks = time.monotonic(), 0
        graced = -1  # the last tick deferred after a late wake (see below)
        while True:
            wake_tick = self._ticks + self._ticks_to_sleep()
            wake_at = self._tick_grid + wake_tick * period
            self._wake_tick, self._wake_at = wake_tick, wake_at
            alarm = self._alarm = self._loop.create_future()
            timer = self._loop.call_at(wake_at, _wake, alarm)
            try:
                await alarm
            finally:
                timer.cancel()
            now = time.monotonic()
            self.stats["ticker_wakes"] += 1
            if now < wake_at:  # re-armed for an earlier tick: deliver what is due, sleep again
                self._advance_ticks(int((now - self._tick_grid) / period))
                continue
            late_s = now - wake_at
            if late_s > self.config.stall_warn_s and self.role != Role.LEADER and wake_tick != graced:
                # Late, and not a leader: the tick it slept for may be its election deadline,
                # which passed while nothing here ran (the loop blocked, or the process
                # stopped). When the whole cluster was held together (a paused VM, the cgroup
                # freezer), the leader was too, and no heartbeat waits in the socket: firing
                # the deadline now would campaign against a live leader that has not had the
                # chance to speak (seen: an election in one frozen job in three). So deliver
                # the ticks before it and let that one fall PAUSE_GRACE_HEARTBEATS heartbeat
                # intervals from now, time for the leader's overdue heartbeat to arrive. Once
                # per tick: a loop late again when that one comes delivers it, so a node whose
                # loop is always late still campaigns.
                due, graced = wake_tick - 1, wake_tick
                self._tick_grid = now + self._pause_grace_s() - wake_tick * period
            elif late_s > period:
                # Late (the loop was blocked, or the process stopped): deliver the ticks up to
                # the one it slept for and drop the ones missed after it instead of firing them
                # back to back (as etcd's ticker does). A burst would run a follower's election
                # clock ahead of the heartbeats that arrived meanwhile: their peer frames,
                # waiting in the sockets, are read first (I/O before timers in a loop
                # iteration) and reset the clock after _catch_up delivered the ticks before.
                due = wake_tick
                self._tick_grid = now - due * period
            else:
                due = max(wake_tick, int((now - self._tick_grid) / period))
            self._note_lag(late_s)
            self._last_tick_at = now
            self._advance_ticks(due)

    def _pause_grace_s(self) -> float:
        """How long a non-leader that woke late waits before the tick it slept for (see
        :meth:`_tick_forever`): PAUSE_GRACE_HEARTBEATS of its leader's heartbeat intervals."""
        return PAUSE_GRACE_HEARTBEATS * self.config.heartbeat_tick * self.config.tick_s

    def _ticks_to_sleep(self) -> int:
        """Ticks from now to the next one that must be delivered on time: the one the core
        may act on, the next chore's (every 16 ticks ``_check_removed``, a leader's 32nd
        ``_record_members``, every 4th while there are leases or watchers), the oldest
        unanswered request's deadline."""
        t = self._ticks
        due = self.node.ticks_until_due()
        n = 16 - t % 16 if due is None else min(due, 16 - t % 16)
        if self.role == Role.LEADER:
            n = min(n, 32 - t % 32)
            if self.sm.leases:
                n = min(n, 4 - t % 4)
        if self._watchers:
            n = min(n, 4 - t % 4)
        if self._deadlines:
            at = self._deadlines[0][0]
            n = min(n, max(1, math.ceil((at - self._tick_grid) / self.config.tick_s) - t))
        return n

    def _advance_ticks(self, due: int) -> None:
        """Deliver the ticks up to ``due``, with the chores that fall on them (from the
        ticker, and from :meth:`_catch_up` before a message)."""
        if due <= self._ticks:
            return
        while self._ticks < due:
            self._ticks = ticks = self._ticks + 1
            self.node.tick()
            self.stats["ticks"] += 1
            if ticks % 32 == 0 and self.role == Role.LEADER:
                self._record_members()
            if ticks % 16 == 0:
                self._check_removed()
            if ticks % 4 == 0:
                if self.role == Role.LEADER and self.sm.leases:
                    self._expire_leases()
                if self._watchers:
                    self._answer_watchers(time.monotonic())
        self._expire_requests()
        self._schedule_drive()

    def _catch_up(self) -> None:
        """Before a message is stepped: deliver the ticks that fell before it, up to the one
        before the ticker's (that one and any missed after it are the ticker's, see
        :meth:`_tick_forever`), so that what the message resets (a follower's election
        clock) counts from now, as it would have with a ticker firing every tick."""
        if self._alarm is None:
            return
        now = time.monotonic()
        self._advance_ticks(min(int((now - self._tick_grid) / self.config.tick_s),
                                self._wake_tick - 1))

    def _rearm_ticker(self) -> None:
        """After anything that can move the due tick earlier: wake the ticker if it sleeps
        past it (it delivers what is due and sleeps again)."""
        alarm = self._alarm
        if alarm is not None and not alarm.done() \
                and self._ticks + self._ticks_to_sleep() < self._wake_tick:
            alarm.set_result(None)

    def _note_lag(self, late_s: float) -> None:
        """Event-loop lag, as seen by the ticker: a tick that came late by more than half an
        election timeout means nothing ran here for that long (no votes, no heartbeats, no
        status answers), so say so: the log is where a stalled node explains itself."""
        lag_ms = int(late_s * 1e3)
        self.stats["loop_lag_max_ms"] = max(self.stats["loop_lag_max_ms"], lag_ms)
        stalled, self._stalled = self._stalled, late_s > self.config.stall_warn_s
        if self._stalled and not stalled:  # once per stall, not for each tick caught up
            self.stats["loop_stalls"] += 1
            now = time.monotonic()
            stopped = now - self._continued_at < late_s + self.config.tick_s or self._process_was_held(now, late_s)
            log.warning("node %d: the event loop %s for %d ms: no ticks, votes, heartbeats or "
                        "answers meanwhile (role %s, term %d, snapshot %s)", self.id,
                        "was stopped (SIGSTOP or frozen)" if stopped else "was blocked",
                        lag_ms, self.role.name.lower(), self.node.term,
                        "in progress" if self._snap_job else "idle")

    def _process_was_held(self, now: float, late_s: float) -> bool:
        """Whether the watchdog thread, which the loop never blocks, has not woken for about as
        long as the loop lagged: then the whole process was held (frozen: no SIGCONT), not the
        loop blocked. Asked by the loop as soon as it runs again, which may be before the
        watchdog wakes and notes the freeze itself. A blocked loop leaves the watchdog waking
        every nap (a loop in Python code lets it take the GIL within the switch interval)."""
        nap = self._watch_nap
        return nap is not None and now - self._watch_at > max(1.5 * nap, late_s / 2)

    def _watch_loop(self, loop_thread: int) -> None:
        """Watchdog thread: when the ticker is ``stall_dump_s`` overdue, log where the
        loop thread is (once per stall). It takes the frames under the GIL
        (``sys._current_frames``), never faulthandler's walk of a running thread's
        frames without the GIL, which can crash the process (a node died in the middle of
        such a dump in a soak, most likely from that)."""
        assert self.config.stall_dump_s is not None
        limit_s, logged_for = self.config.stall_dump_s, 0.0
        nap = min(0.5, limit_s / 4)
        self._watch_nap, self._watch_at = nap, time.monotonic()
        while not self._stopped.is_set():
            slept = time.monotonic()
            time.sleep(nap)
            now = time.monotonic()
            if now - slept > nap + limit_s / 2:
                # This thread, which the loop never blocks, was held too: the whole process
                # was stopped or frozen (the freezer sends no SIGCONT), not the loop blocked.
                self._continued_at = now
            self._watch_at = now
            last, due = self._last_tick_at, self._wake_at  # the ticker sleeps until it is due
            if now - due < limit_s or logged_for == last or now - self._continued_at < 1.0:
                continue
            logged_for = last
            frame = sys._current_frames().get(loop_thread)
            where = "".join(traceback.format_stack(frame)) if frame is not None else "?"
            log.warning("node %d: the event loop has not ticked for %.1f s; it is at:\n%s",
                        self.id, now - last, where)

    def note_continued(self) -> None:
        """SIGCONT arrived (:func:`serve` installs this), or the watchdog thread found itself
        held as long (a freeze): a lag that ends now was the process being stopped, not the
        loop being blocked (nor is a watchdog stack written meanwhile a place where it was
        stuck)."""
        self._continued_at = time.monotonic()

    # ------------------------------------------------------------ raft I/O
    def _schedule_drive(self) -> None:
        if not self._drive_scheduled and not self._stopped.is_set():
            self._drive_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._drive)

    def _spool_path(self, frm: int, md: SnapshotMetadata) -> pathlib.Path:
        """A fresh file for one reception of a snapshot from ``frm``. Numbered: a leader may
        send the same snapshot twice (a stale rejection makes it probe again), and a second
        copy must neither truncate nor unlink the file of the first, which the disk thread
        may be placing (a name per snapshot did both: a fatal FileNotFoundError)."""
        return self.config.data_dir / (
            f"snap-{md.index:016d}-{md.term:016d}.from-{frm}.{next(self._spooled)}.tmp")

    def _on_peer_message(self, frm: int, payload: bytes) -> None:
        self.stats["peer_messages_in"] += 1
        if payload[:1] == SNAPSHOT_CHUNK_MAGIC[:1]:  # never the first byte of a Raft message
            chunked = self._reassembler.add(frm, payload)
            if chunked is None:  # more chunks to come, or dropped (counted there)
                return
            msg = chunked
        else:
            try:
                msg = decode_message(payload)
            except DecodeError as exc:
                self.stats["peer_messages_dropped"] += 1
                log.warning("dropping a malformed message from node %d: %s", frm, exc)
                return
        if msg.frm != frm or msg.to != self.id:
            self.stats["peer_messages_dropped"] += 1
            log.warning("dropping a message claiming %d->%d on node %d's link to %d",
                        msg.frm, msg.to, frm, self.id)
            return
        if msg.type == MessageType.APPEND_RESP:
            self._appends_sent.pop(frm, None)  # answered: the next APPEND may go at once
        self._catch_up()
        self.node.step(msg)
        self._rearm_ticker()
        self._schedule_drive()

    def _on_peer_connected(self, peer: int) -> None:
        # A peer that dials us is up (restarted, or a partition healed): dial it back now
        # rather than after our backoff, so it hears heartbeats and vote requests at once.
        self.peer_transport.redial(peer)
        if not self._stopped.is_set():
            self.node.report_reachable(peer)  # a leader heartbeats it now: probed sooner
            self._schedule_drive()

    def _on_peer_disconnected(self, peer: int) -> None:
        if self.config.leader_loss_on_disconnect and not self._stopped.is_set():
            self._catch_up()  # the election clock jumps from where it is now
            self.node.report_disconnected(peer)
            self._schedule_drive()

    def _on_unreachable(self, peer: int) -> None:
        self._appends_sent.pop(peer, None)  # whatever was in flight may be lost: resend
        if not self._stopped.is_set():
            self.node.report_unreachable(peer)

    def _repeats_append(self, m: Message) -> bool:
        """Whether APPEND ``m`` repeats one sent to the same peer less than
        ``append_resend_s`` ago that the peer has not answered yet (then it is dropped:
        Raft tolerates a lost message, and the core resends after that).

        Why: a follower in PROBE gets an APPEND with up to ``append_bytes`` of entries
        from ``next`` on *every* heartbeat response, one per 15 ms tick (etcd-io/raft #52),
        whether or not the previous one was answered. A follower back from a kill or a
        SIGSTOP, thousands of entries behind, was sent the same megabyte dozens of times a
        second; encoding them held the leader's loop for seconds (the watchdog's stacks:
        encode_message in _send), its heartbeats to the others went out late, they elected,
        and meanwhile the node answered nothing -- the soak's leaderless majority
        (tests/service/test_soak.py). An answer (APPEND_RESP) or a lost link allows the next
        one at once."""
        key = (m.term, m.index, m.log_term)
        now = time.monotonic()
        sent = self._appends_sent.get(m.to)
        if sent is not None and sent[0] == key and now - sent[1] < self._append_resend_s:
            return True
        self._appends_sent[m.to] = (key, now)
        return False

    def _drive(self) -> None:
        """Run every pending Ready through persist -> send -> apply -> advance.

        With ``persist_in_thread`` a leader's fsync runs in a worker thread while the loop
        keeps accepting client requests and peer messages (the core takes inputs between
        ``ready`` and ``advance``, as etcd's RawNode does); they all land in the next Ready, so
        batches grow with load instead of the loop stalling on the disk. A follower saves
        inline: it has nothing to overlap (its next append waits for this save anyway) and the
        thread hand-off would only add latency. Nothing is sent before the save returns
        (unless ``leader_parallel_persist``, see :meth:`_leader_may_send_first`).
        """
        self._drive_scheduled = False
        if self._stopped.is_set():
            return
        if self._persisting is not None:
            self._send_while_persisting()
            return
        started, readies, applied = time.perf_counter(), self.stats["readies"], \
            self.sm.applied_index
        try:
            self._drive_readies()
        except Exception as exc:  # a bug or a disk failure: never limp on with a broken node
            self._fail(exc)
        self._rearm_ticker()  # a new role, a lease: the next due tick may be sooner
        took_s = time.perf_counter() - started
        if took_s > self.config.stall_warn_s:
            self.stats["slow_drives"] += 1
            log.warning("node %d: one drive held the event loop for %.0f ms (%d readies, %d "
                        "entries applied, %d retained log bytes)", self.id, took_s * 1e3,
                        self.stats["readies"] - readies, self.sm.applied_index - applied,
                        self.storage.retained_bytes())

    def _send_while_persisting(self) -> None:
        """While a save is in flight, let heartbeats and heartbeat answers leave anyway.

        They depend on nothing durable but the term and vote, and those are (checked here).
        Held back until the save returned, a save queued in the disk thread behind a snapshot
        being adopted (or another process's fsync of tens of MB) silenced a leader for longer
        than the election timeout, and its followers elected a new one (CI saw it in
        tests/service/test_snapshot_off_loop.py); a follower's silence likewise looks to a
        CheckQuorum leader like a lost quorum. Appends and their answers still wait."""
        if (self.node.term, self.node.vote) != self._durable_term_vote:
            return
        early = self.node.take_messages(_SENT_WHILE_PERSISTING)
        if early:
            self.stats["sent_while_persisting"] += len(early)
            self._send(early)

    def _fail(self, exc: BaseException) -> None:
        log.critical("node %d: fatal error, shutting down: %r", self.id, exc, exc_info=exc)
        self.fatal_error = exc
        self._begin_stop()

    def _drive_readies(self) -> None:
        self._issue_proposals()
        self._issue_reads()
        while self.node.has_ready():
            rd = self.node.ready()
            self.stats["readies"] += 1
            if rd.soft_state is not None:
                self._on_role(rd.soft_state.role)
            sent = self._leader_may_send_first(rd)
            if sent:
                self._send(rd.messages)
            save = self._what_to_save(rd)
            if save is not None and (rd.snapshot is not None or self._save_in_thread()):
                # A leader's snapshot to install is written and decoded off the loop too.
                assert self._loop is not None
                # Counted before the disk thread may start (its _save clears it): never twice.
                self._saving_bytes = sum(len(e.data) for e in rd.entries)
                fut: asyncio.Future
                if rd.snapshot is None:
                    fut = self._loop.run_in_executor(self._disk, self._save, save)
                else:
                    md = rd.snapshot.metadata
                    fut = self._loop.run_in_executor(
                        self._disk, self._save_and_decode, save,
                        self._reassembler.take_file(md.index, md.term))
                self._persisting = fut
                fut.add_done_callback(functools.partial(self._persisted, rd, sent,
                                                        self._saved_term_vote))
                return
            if save is not None:
                self._save(save)
                self._durable_term_vote = self._saved_term_vote
            self._finish(rd, sent)
        self._maybe_snapshot()

    def _save_in_thread(self) -> bool:
        """Every fsync runs in the disk thread (unless ``persist_in_thread`` is off): a
        leader overlaps it with taking more requests, and no node's loop ever waits for
        the disk. An fsync queued behind a snapshot being written, or another node's, on
        the same disk took 75-270 ms when leaders and followers saved inline here, enough
        to miss heartbeats (tests/service/test_snapshot_off_loop.py); the hand-off costs a
        lone sequential client a few tens of microseconds per write."""
        return self.config.persist_in_thread

    def _leader_may_send_first(self, rd: Any) -> bool:
        """Whether this Ready's messages may leave before its entries are durable here.

        Only with ``leader_parallel_persist`` (the default), only for a steady leader (no role,
        term or vote change, no snapshot in this Ready): its messages are then appends, heartbeats and
        answers that depend on nothing being durable on the leader, and the core counts the
        leader's own copy toward a commit only after ``advance`` (i.e. after the fsync).
        Raft thesis §10.2.1; etcd's raft does the same.
        """
        if not self.config.leader_parallel_persist or self.role != Role.LEADER:
            return False
        if rd.soft_state is not None or rd.snapshot is not None:
            return False
        hs = rd.hard_state
        return hs is None or (hs.term, hs.vote) == self._saved_term_vote

    def _persisted(self, rd: Any, sent: bool, term_vote: tuple[int, int],
                   fut: asyncio.Future) -> None:
        self._persisting, self._saving_bytes = None, 0
        if fut.cancelled() or self._stopped.is_set():
            return
        save_error = fut.exception()
        if save_error is not None:
            # The log is in an unknown state on disk: continuing could acknowledge what is
            # not durable. Stop serving; a restart recovers from what the WAL holds.
            self._fail(save_error)
            return
        self._durable_term_vote = term_vote
        try:
            self._finish(rd, sent, fut.result())
            self._maybe_snapshot()  # under steady load a drive may never end without a save
        except Exception as exc:
            self._fail(exc)
            return
        self._schedule_drive()

    def _finish(self, rd: Any, sent: bool, restored: StateMachine | None = None) -> None:
        """Everything after the Ready is durable: install, send, apply, answer, advance."""
        for notice in rd.notices:
            self.stats["notices"] += 1
            log.warning("%s", notice)
        if rd.snapshot is not None:
            self._install(rd.snapshot, restored)
        # A follower sends first (its append answers gate the leader's commit); a leader
        # applies first, so its clients' answers are queued ahead of the commit notices.
        send_first = not sent and self.role != Role.LEADER
        if send_first:
            self._send(rd.messages)
        for entry in rd.committed_entries:
            self._apply(entry)
        if not sent and not send_first:
            self._send(rd.messages)
        for rs in rd.read_states:
            self._on_read_state(rs.index, rs.context)
        for ctx in rd.dropped_reads:
            self._answer_reads(self._reads_by_ctx.pop(ctx, ()), self._redirect("not_leader"))
        self.node.advance(rd)
        self._release_reads()
        self._release_watchers()
        if not self.node.recovering and self._marker_present():
            self._drop_marker()

    def _what_to_save(self, rd: Any) -> tuple | None:
        """What of this Ready must be durable before its messages go out (None: nothing).

        As in etcd (``MustSync``), a hard state that only moved the commit index is not worth
        an fsync of its own: no message depends on the commit index being durable (it is
        re-learned from the leader after a restart). It rides along with the next save that
        must sync, and is flushed before a snapshot and at shutdown.
        """
        hs = rd.hard_state if rd.hard_state is not None else self._unsaved_hs
        term_or_vote = hs is not None and (hs.term, hs.vote) != self._saved_term_vote
        if rd.entries or rd.snapshot is not None or term_or_vote:
            self._unsaved_hs = None
            if hs is not None:
                self._saved_term_vote = (hs.term, hs.vote)
            return hs, list(rd.entries), rd.snapshot
        if hs is not None:
            self._unsaved_hs = hs
        return None

    def _save(self, save: tuple) -> None:
        self.storage.save(*save)  # one WAL fsync (group commit)
        # In the disk thread: the entries are counted by the storage now, so no longer here
        # (cleared at once, not on the loop later, so the bound never counts them twice).
        self._saving_bytes = 0

    def _save_and_decode(self, save: tuple, received: pathlib.Path | None) -> StateMachine:
        """Worker thread: make a Ready holding a leader's snapshot durable (its spooled file
        ``received`` synced and renamed into place, or its data written), then decode it
        into a fresh state machine (swapped in by :meth:`_install` on the loop), streamed
        from the file: memory holds one chunk of it at a time."""
        snap = save[2]
        if received is None and not snap.data:  # an empty state (nothing was spooled)
            self.storage.save(*save)
            sm = StateMachine()
            sm.restore_empty(snap.metadata.index)
            return sm
        hard_state, entries, _ = save
        self.storage.save(hard_state, entries, snap, snapshot_file=received)
        return self._decode_stored_snapshot()

    def _decode_stored_snapshot(self) -> StateMachine:
        """The storage's current snapshot decoded into a fresh state machine, streamed from
        its file (checked by the storage when written or at recovery)."""
        path, offset, _, md = self.storage.snapshot_data_span()
        sm = StateMachine()
        with open(path, "rb") as f:
            f.seek(offset)
            sm.restore(f)
        assert sm.applied_index == md.index, (sm.applied_index, md.index)
        return sm

    def _install(self, snap: Snapshot, restored: StateMachine | None) -> None:
        """Take a leader's snapshot (already durable) as the applied state."""
        md = snap.metadata
        if restored is None:  # not decoded in the thread (a Ready with a snapshot always is)
            restored = StateMachine()
            if snap.data:
                restored.restore(snap.data)
            else:
                restored.restore_empty(md.index)
        assert restored.applied_index == md.index, (restored.applied_index, md.index)
        self.sm.replace_with(restored)
        # The restored state is long-lived: keep the collector's full passes (which walk
        # every tracked object, ~300k records here, on the loop) from re-walking it.
        gc.freeze()
        self.conf_state = md.conf_state
        self._snapshot_index = md.index
        self._applied_bytes = 0
        self._refresh_peers()
        self.stats["snapshots_installed"] += 1
        log.info("node %d installed the leader's snapshot at index %d (%d keys)", self.id,
                 md.index, len(self.sm.kv))

    def _marker_present(self) -> bool:
        return self._marker_cached

    def _drop_marker(self) -> None:
        """The repair is durable and advanced: this node may vote again (even after a
        restart), so the RECOVERING marker goes."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._marker)
            _fsync_dir(self.config.data_dir)
        self._marker_cached = False
        log.warning("node %d: repaired by the leader (term %d, applied %d); it votes again "
                    "(removed %s)", self.id, self.node.term, self.sm.applied_index,
                    self._marker)

    def _flush_hard_state(self) -> None:
        if self._unsaved_hs is not None:
            self.storage.save(self._unsaved_hs, [])
            self._unsaved_hs = None

    def _send(self, messages: list[Message]) -> None:
        for m in messages:
            if m.to == self.id:  # defensive: the core should not address itself
                continue
            if m.type == MessageType.APPEND and m.entries and self._repeats_append(m):
                self.stats["appends_repeated_dropped"] += 1
                continue
            if m.type == MessageType.SNAPSHOT and m.snapshot is not None \
                    and not m.snapshot.data and m.snapshot.metadata.index > 0:
                self._start_stream(m)  # from the snapshot file; reports when done
                continue
            try:
                if m.type == MessageType.SNAPSHOT:
                    self._send_snapshot(m)
                else:
                    self.peer_transport.send(m.to, encode_message(m))
            except KeyError:
                log.warning("no address for node %d; dropping a %s", m.to, m.type.name)
                continue
            except FrameTooLarge as exc:
                log.error("node %d: cannot send a %s to node %d: %s", self.id, m.type.name,
                          m.to, exc)
                if m.type == MessageType.SNAPSHOT:
                    self.stats["snapshot_send_failures"] += 1
                    self.node.report_snapshot(m.to, False)
                continue
            if m.type == MessageType.SNAPSHOT:
                # Queued is all we know; a lost snapshot makes the follower reject the next
                # append and the leader probes (and resends) from there.
                self.node.report_snapshot(m.to, True)

    def _send_snapshot(self, m: Message) -> None:
        """Queue a SNAPSHOT message: in one frame if its data fits one chunk, else as chunk
        frames (see :class:`SnapshotReassembler`), all through the same per-peer queue, which
        keeps them in order and ahead of the appends that follow. KeyError, FrameTooLarge."""
        snap = m.snapshot
        if snap is None or len(snap.data) <= self._chunk_bytes:
            self.peer_transport.send(m.to, encode_message(m))
            return
        frames = encode_snapshot_chunks(m, self._chunk_bytes)
        for frame in frames:  # chunk 0 is the largest: a FrameTooLarge comes before any is sent
            self.peer_transport.send(m.to, frame)
        self.stats["snapshots_sent_chunked"] += 1
        self.stats["snapshot_chunks_out"] += len(frames)
        log.info("node %d: snapshot %d (%d bytes) queued to node %d in %d chunks", self.id,
                 snap.metadata.index, len(snap.data), m.to, len(frames))

    # ------------------------------------------------------------ streaming snapshots
    def _start_stream(self, m: Message) -> None:
        """Stream the snapshot file to ``m.to`` (one stream per peer: a resend of the same
        snapshot while it streams is ignored, a newer one replaces it)."""
        assert m.snapshot is not None and self._loop is not None
        key = (m.snapshot.metadata.index, m.snapshot.metadata.term)
        current = self._senders.get(m.to)
        if current is not None and not current[1].done():
            if current[0] == key:
                return
            current[1].cancel()
        task = self._loop.create_task(self._stream_snapshot(m),
                                      name=f"snapshot-{self.id}-to-{m.to}")
        self._senders[m.to] = (key, task)

    def _stop_senders(self) -> None:
        for _, task in self._senders.values():
            task.cancel()
        self._senders.clear()

    async def _stream_snapshot(self, m: Message) -> None:
        ok = False
        try:
            ok = await self._stream_chunks(m)
        except asyncio.CancelledError:
            raise
        except (OSError, StorageError, FrameTooLarge, KeyError) as exc:
            log.warning("node %d: sending the snapshot at %d to node %d failed: %s", self.id,
                        m.snapshot.metadata.index if m.snapshot else 0, m.to, exc)
        finally:
            cur = self._senders.get(m.to)
            if cur is not None and cur[1] is asyncio.current_task():
                del self._senders[m.to]
        if self._stopped.is_set() or self.role != Role.LEADER:
            return
        if not ok:
            self.stats["snapshot_send_failures"] += 1
        # Queued is all we know; a lost snapshot makes the follower reject the next append
        # and the leader probes (and resends) from there.
        self.node.report_snapshot(m.to, ok)
        self._schedule_drive()

    async def _stream_chunks(self, m: Message) -> bool:
        """Read the snapshot's data from its file in chunks (worker thread) and queue each
        chunk frame once the link to the peer has drained to two chunks; False if the
        snapshot was replaced, the link dropped or this node stopped leading."""
        assert m.snapshot is not None and self._loop is not None
        md, to, loop = m.snapshot.metadata, m.to, self._loop
        path, offset, length, held = self.storage.snapshot_data_span()
        if (held.index, held.term) != (md.index, md.term):
            return False  # a newer one replaced it: the core probes and sends that one
        fd = os.open(path, os.O_RDONLY)
        try:
            if length == 0:
                self.peer_transport.send(to, encode_message(m))
                return True
            crc = await loop.run_in_executor(self._io, snapshotting.crc_range, fd, offset,
                                             length)
            chunk, head = self._chunk_bytes, snapshot_head(m)
            total = -(-length // chunk)
            for seq in range(total):
                if not await self._wait_link(to, 2 * chunk):
                    return False
                n = min(chunk, length - seq * chunk)
                data = await loop.run_in_executor(self._io, snapshotting.read_exactly, fd, n,
                                                  offset + seq * chunk)
                self.peer_transport.send(to, encode_snapshot_chunk(md, seq, total, length, crc,
                                                                   data, head))
                self.stats["snapshot_chunks_out"] += 1
        finally:
            os.close(fd)
        self.stats["snapshots_sent_chunked"] += 1
        log.info("node %d: snapshot %d (%d bytes) streamed to node %d in %d chunks", self.id,
                 md.index, length, to, total)
        return True

    async def _wait_link(self, to: int, max_backlog: int) -> bool:
        """Wait (ticking) until at most ``max_backlog`` bytes are queued for peer ``to``;
        False if the link is down, this node stopped leading, or nothing drained for 10 s."""
        deadline = time.monotonic() + 10.0
        while self.peer_transport.backlog_bytes(to) > max_backlog:
            if (not self.peer_transport.connected(to) or self.role != Role.LEADER
                    or time.monotonic() > deadline):
                return False
            await asyncio.sleep(self.config.tick_s)
        return self.peer_transport.connected(to) and self.role == Role.LEADER

    def _election_timeout_s(self) -> float:
        return self.config.election_tick * self.config.tick_s

    def _expire_leases(self) -> None:
        """Leader: propose ``lease.expire`` for the leases due on this leader's clock (see
        :mod:`coordinator.leases`; the apply checks again against the log's clock)."""
        now_ms = int(time.time() * 1000)
        if now_ms < self._lease_grace_until_ms:
            return
        now = time.monotonic()
        due = [lid for lid in leases.due(self.sm, now_ms)
               if now - self._expiry_proposed.get(lid, -1e9) > 1.0]
        if not due:
            return
        try:
            self.node.propose_batch([encode_command("lease.expire", 0, 0, 0, now_ms, *due)])
        except ProposalDropped:
            return
        for lid in due:
            self._expiry_proposed[lid] = now
        if len(self._expiry_proposed) > 4 * leases.MAX_EXPIRE_BATCH:
            self._expiry_proposed = {lid: t for lid, t in self._expiry_proposed.items()
                                     if lid in self.sm.leases}
        self._schedule_drive()

    # ------------------------------------------------------------ watches
    def _watch(self, body: dict) -> dict | asyncio.Future:
        """``{"op": "watch", "key", "end", "prefix", "start_revision", "max_events",
        "wait_s"}``: the changes in range from ``start_revision`` on (``kv.events``), answered
        at once when there are some, else held until one is applied or ``wait_s`` (at most
        :data:`MAX_WATCH_WAIT_S`) has passed (a long poll). Any node serves it from what it has
        applied, which is always committed; one that knows no leader redirects, so a watcher
        never sits on a node cut off from the cluster."""
        if self.role != Role.LEADER and not self.node.leader_id:
            return self._redirect("not_leader")  # no hint: the client tries the next node
        wait_s = body.get("wait_s", 0)
        if not isinstance(wait_s, (int, float)) or isinstance(wait_s, bool) or wait_s < 0:
            return {"ok": False, "error": "bad_request", "detail": "wait_s must be a number >= 0"}
        args = (body.get("key"), body.get("end"), body.get("prefix", False),
                body.get("start_revision", 0), body.get("max_events", 1000), body.get("skip", 0))
        answer = kvrange.events_answer(self.sm, *args)
        if not answer.get("ok") or answer["events"] or wait_s == 0:
            return dict(answer, node=self.id)
        if len(self._watchers) >= self.config.max_pending_requests:
            return dict(answer, node=self.id)  # answered empty at once: the watcher asks again
        assert self._loop is not None
        fut = self._loop.create_future()
        resolved = (*args[:3], answer["next"], args[4], answer["skip"])  # "from now" fixed here
        self._watchers.append((fut, resolved, time.monotonic() + min(wait_s, MAX_WATCH_WAIT_S)))
        self._rearm_ticker()
        self._watch_revision = self.sm.revision
        return fut

    def _answer_watchers(self, now: float, changed: bool = False) -> None:
        """Answer the waiting watches that have events now, or whose wait is over."""
        keep = []
        for fut, args, deadline in self._watchers:
            if fut.done():
                continue
            if changed or deadline <= now:
                answer = kvrange.events_answer(self.sm, *args)
                if not answer.get("ok") or answer["events"] or deadline <= now:
                    fut.set_result(dict(answer, node=self.id))
                    continue
            keep.append((fut, args, deadline))
        self._watchers = keep

    def _release_watchers(self) -> None:
        if self._watchers and self.sm.revision != self._watch_revision:
            self._watch_revision = self.sm.revision
            self._answer_watchers(time.monotonic(), changed=True)

    def members_ext(self) -> MembersSeen:
        return self._members_seen()

    def peer_addresses(self) -> dict[int, Address]:
        """Where each member listens: ``--peers``, overridden by the replicated addresses of
        members added at run time (coordinator.membership)."""
        addrs = dict(self.config.peers)
        for nid, text in self._members_seen().addrs.items():
            parsed = membership.parse_address(text)
            if parsed is not None:
                addrs[nid] = parsed
        return addrs

    def _refresh_peers(self) -> None:
        peers = self.peer_addresses()
        if peers != self._peers_now:
            self._peers_now = peers
            self.peer_transport.set_peers(peers)

    def redirect_answer(self, error: str) -> dict:
        return self._redirect(error)

    def schedule_drive(self) -> None:
        self._schedule_drive()

    def _member(self, body: dict) -> dict | asyncio.Future:
        """``{"op": "member", "action": list|add|remove|promote, "id", "address", "learner"}``
        (coordinator.membership): a list from any node, a change on the leader."""
        checked = membership.check_request(body)
        if isinstance(checked, dict):
            return checked
        action, nid, addr, learner = checked
        if action == "list":
            return membership.member_list(self)
        if self.role != Role.LEADER:
            return self._redirect("not_leader")
        if self._member_change is not None and not self._member_change.done():
            return {"ok": False, "error": "busy", "detail": "a membership change is in progress; "
                                                            "retry when it is answered"}
        assert self._loop is not None
        fut = self._loop.create_future()

        async def run() -> None:
            try:
                answer = await membership.change(self, action, nid, addr, learner)
            except Exception as exc:  # never leave the client hanging on a bug
                log.exception("node %d: member %s %d failed", self.id, action, nid)
                answer = {"ok": False, "error": "internal", "detail": repr(exc)}
            if not fut.done():
                fut.set_result(answer)

        self._member_change = self._loop.create_task(run())
        return fut

    def _check_removed(self) -> None:
        """Stop this node once it has applied a configuration without it, is caught up and
        not leading, and an election timeout has passed (its last messages are out)."""
        if self.id in membership.members_of(self.conf_state) or self.role == Role.LEADER:
            self._removed_since = None
            self._probe_if_removed()
            return
        if self.sm.applied_index < self.node.status().commit:
            return
        now = time.monotonic()
        if self._removed_since is None:
            self._removed_since = now
        elif now - self._removed_since > self._election_timeout_s() * 2:
            log.warning("node %d was removed from the cluster (members %s): stopping", self.id,
                        sorted(membership.members_of(self.conf_state)))
            self._begin_stop()

    def _probe_if_removed(self) -> None:
        """A member removed while it was cut off (or that missed the commit of its removal: a
        leader stops sending to a node it removed) never learns it from the log, and would
        campaign forever. So a node that has known no leader for ten election timeouts asks
        its peers for the membership; if the leader's list does not have it, it stops."""
        now = time.monotonic()
        if self.role == Role.LEADER or self.node.leader_id:
            self._leaderless_since = None
            return
        if self._leaderless_since is None:
            self._leaderless_since = now
            return
        if now - self._leaderless_since < 10 * self._election_timeout_s() or now < self._probe_after:
            return
        self._probe_after = now + 2.0
        assert self._loop is not None
        self._loop.create_task(self._probe_membership())

    async def _probe_membership(self) -> None:
        answer = await membership.fetch_membership(
            dataclasses.replace(self.config, peers=dict(self._peers_now)), timeout_s=1.0)
        if answer is None or answer.get("leader") != answer.get("node") or not answer.get("leader"):
            return  # no leader answered: nothing to conclude
        if self.id not in {row.get("ID") for row in answer.get("members", [])}:
            log.warning("node %d: the leader (node %s) no longer lists it as a member: stopping",
                        self.id, answer.get("leader"))
            await self.stop()

    def _members_seen(self) -> MembersSeen:
        ext = self.sm.extensions["members"]
        assert isinstance(ext, MembersSeen)
        return ext

    def _record_members(self) -> None:
        """Leader: propose ``members.seen`` for the voters (this one included) that have
        acknowledged entries and are not yet recorded (once per term each)."""
        seen = self._members_seen().seen
        progress = getattr(self.node.status(), "progress", None) or {}
        new = sorted(i for i, pr in progress.items()
                     if (i == self.id or pr.match > 0) and i not in seen
                     and i not in self._members_proposed)
        if not new:
            return
        data = encode_command("members.seen", 0, 0, 0, int(time.time() * 1000), *new)
        try:
            self.node.propose_batch([data])
        except ProposalDropped:
            return
        self._members_proposed.update(new)

    def _on_role(self, role: Role) -> None:
        was_leader = self.role == Role.LEADER
        self.role = role
        if was_leader and role != Role.LEADER:
            log.info("node %d stepped down (term %d)", self.id, self.node.term)
            self._stop_senders()
            self._fail_pending_writes("leader_changed")
            self._fail_pending_reads("not_leader")
        elif role == Role.LEADER and not was_leader:
            log.info("node %d became leader (term %d)", self.id, self.node.term)
            self._members_proposed.clear()
            # etcd's rule: no lease expires before one more election timeout has passed
            # (keepalives reached no leader during the election).
            self._lease_grace_until_ms = int(time.time() * 1000 + 1000 * self._election_timeout_s())
            self._expiry_proposed.clear()

    # ------------------------------------------------------------ apply path
    def _apply(self, entry: Any) -> None:
        if entry.type == EntryType.CONF_CHANGE:
            self.sm.apply(entry.index, b"")
            if entry.data:
                self.conf_state = self.node.apply_conf_change(decode_conf_change(entry.data))
            return
        self._applied_bytes += len(entry.data)
        cmd, answer = self.sm.apply_entry(entry.index, entry.data)
        if cmd is not None and cmd.op == "members.addr":
            self._refresh_peers()
        if cmd is None or answer is None or not self._pending_writes:
            return
        key = ("register", cmd.args[0]) if cmd.op == "register" and cmd.args else (
            cmd.session, cmd.seq)
        for fut in self._pending_writes.pop(key, ()):
            if not fut.done():
                fut.set_result(answer)

    def _restore_at_start(self, index: int) -> None:
        """Load the snapshot the storage holds (before the loop runs), timing the read and
        the decode (index rebuild included) for the log and ``status()["restore"]``."""
        t0 = time.perf_counter()
        _, _, size, _ = self.storage.snapshot_data_span()
        if size:
            self.sm.replace_with(self._decode_stored_snapshot())
        else:
            self.sm.restore_empty(index)
        gc.freeze()  # see _install
        t1 = time.perf_counter()
        keys = len(self.sm.kv)
        self.restore_timing = {"decode_ms": round((t1 - t0) * 1e3, 1), "keys": keys,
                               "snapshot_bytes": size}
        log.info("node %d loaded its snapshot at index %d: %d bytes, %d keys, read and decoded "
                 "in %.0f ms (%.0f ms per 100k keys)", self.id, index, size, keys,
                 (t1 - t0) * 1e3, (t1 - t0) * 1e3 * 100_000 / max(keys, 1))

    # ------------------------------------------------------------ snapshots
    def _maybe_snapshot(self) -> None:
        """Start a snapshot when one is due (entries or bytes applied since the last one),
        or adopt a finished one; never more than one at a time."""
        job = self._snap_job
        if job is not None:
            if job.exit_code is not None and not job.adopting and self._persisting is None:
                self._adopt(job)
            elif (job.pid and job.exit_code is None
                  and time.perf_counter() - job.started > SNAPSHOT_CHILD_TIMEOUT_S):
                log.error("node %d: the snapshot child %d has run for %.0f s; killing it",
                          self.id, job.pid, time.perf_counter() - job.started)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(job.pid, signal.SIGKILL)  # its waiter then reports the failure
            return
        applied = self.sm.applied_index
        due = (applied - self._snapshot_index >= self.config.snapshot_every
               or self._applied_bytes >= self.config.snapshot_bytes
               or self._log_outweighs_snapshot(applied - self._snapshot_index))
        if not due or applied <= self._snapshot_index or time.monotonic() < self._snapshot_retry_at:
            return
        self._start_snapshot(applied)

    def _log_outweighs_snapshot(self, since: int) -> bool:
        """Whether the entries applied since the last snapshot hold more bytes than that
        snapshot (and number at least ``snapshot_min_every``). A restart loads the snapshot
        and then replays and re-applies every entry since, entry by entry, the slow part; so
        a small state is snapshotted before its log outgrows it, not only every
        ``snapshot_every`` entries. Each such snapshot costs at most what the log since the
        last one added, so the snapshot work stays linear in the log."""
        floor = self.config.snapshot_min_every
        if not floor or since < floor:
            return False
        if self._held_snapshot[0] != self._snapshot_index:
            try:
                size = self.storage.snapshot_data_span()[2]
            except RaftUnavailable:  # none yet: an empty state is the smallest snapshot
                size = 0
            self._held_snapshot = (self._snapshot_index, size)
        return self._applied_bytes >= self._held_snapshot[1]

    def _start_snapshot(self, applied: int) -> None:
        """Freeze the applied state at ``applied`` and have it written off the loop: by a
        forked child (copy-on-write, see coordinator.snapshotting), or, without fork, by a
        worker thread after serializing here."""
        md = SnapshotMetadata(applied, self.storage.term(applied), self.conf_state)
        tmp = self.storage.snapshot_tmp_path(md.index, md.term)
        loop = self._loop
        assert loop is not None
        started = time.perf_counter()
        fut: asyncio.Future
        if self.config.snapshot_in_child and snapshotting.can_fork():
            pid = snapshotting.fork_snapshot(self.sm, tmp, md, fsync=self.config.fsync)
            fut = loop.run_in_executor(self._io, snapshotting.wait_child, pid)
        else:
            pid, data = 0, self.sm.snapshot()
            sync = os.fsync if self.config.fsync else None
            fut = loop.run_in_executor(self._io, functools.partial(
                write_snapshot_file, tmp, md, data, sync=sync))
        job = _SnapshotJob(md, tmp, pid, started, (time.perf_counter() - started) * 1e3)
        self._snap_job = job
        self._applied_bytes = 0
        fut.add_done_callback(functools.partial(self._snapshot_written, job))

    def _snapshot_written(self, job: _SnapshotJob, fut: asyncio.Future) -> None:
        job.written_s = time.perf_counter() - job.started
        if fut.cancelled() or fut.exception() is not None:
            job.exit_code = -1
            log.error("node %d: writing the snapshot at %d failed: %r", self.id, job.md.index,
                      None if fut.cancelled() else fut.exception())
        else:
            job.exit_code = 0 if job.pid == 0 else fut.result()
        self._schedule_drive()  # the drive adopts it once no save is in flight

    def _adopt(self, job: _SnapshotJob) -> None:
        """Reference the written file in the WAL and compact, in the disk thread (queued
        behind any save, so the log's writes stay in order)."""
        if job.exit_code != 0:
            self._snapshot_failed(job, f"its writer exited with {job.exit_code}")
            return
        job.adopting = True
        self._flush_hard_state()  # the stored commit must not fall behind the snapshot
        keep = min(self.config.keep_entries_after_snapshot, self.config.snapshot_every)
        assert self._loop is not None
        fut = self._loop.run_in_executor(self._disk, self._adopt_and_compact, job, keep)
        fut.add_done_callback(functools.partial(self._adopted, job))

    def _adopt_and_compact(self, job: _SnapshotJob, keep: int) -> int:
        """Disk thread: adopt the snapshot file, then compact to a tail of at most ``keep``
        entries and keep_bytes_after_snapshot bytes; returns the compaction point."""
        self.storage.adopt_snapshot_file(job.tmp, job.md.index, job.md.conf_state)
        compact_to = self.storage.tail_start(job.md.index, keep,
                                             self.config.keep_bytes_after_snapshot)
        if compact_to >= self.storage.first_index():
            self.storage.compact(compact_to)
        return compact_to

    def _adopted(self, job: _SnapshotJob, fut: asyncio.Future) -> None:
        if self._stopped.is_set() or fut.cancelled():
            return
        exc = fut.exception()
        if isinstance(exc, SnapshotOutOfDate):  # a leader's newer snapshot was installed
            self._snapshot_failed(job, "a newer snapshot was installed meanwhile", quiet=True)
            return
        if isinstance(exc, StorageClosed):  # the WAL is in an unknown state: stop
            self._fail(exc)
            return
        if exc is not None:
            self._snapshot_failed(job, repr(exc))
            return
        self._snap_job = None
        self._snapshot_index = max(self._snapshot_index, job.md.index)
        self.stats["snapshots"] += 1
        log.info("node %d snapshot at %d: fork %.1f ms, written off the loop in %.0f ms, "
                 "adopted after %.0f ms; log compacted to %d (%d bytes retained)", self.id,
                 job.md.index, job.fork_ms, job.written_s * 1e3,
                 (time.perf_counter() - job.started) * 1e3, fut.result(),
                 self.storage.retained_bytes())
        self._schedule_drive()

    def _snapshot_failed(self, job: _SnapshotJob, why: str, quiet: bool = False) -> None:
        self._snap_job = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(job.tmp)
        if quiet:
            log.info("node %d: dropped the snapshot at %d: %s", self.id, job.md.index, why)
            return
        self.stats["snapshot_failures"] += 1
        self._snapshot_retry_at = time.monotonic() + 5.0
        log.error("node %d: the snapshot at %d failed (%s); retrying in 5 s", self.id,
                  job.md.index, why)

    # ------------------------------------------------------------ proposals and reads
    def _issue_proposals(self) -> None:
        """Propose every write queued since the last drive as one batch (one append)."""
        if not self._proposals:
            return
        batch, self._proposals, self._queued_bytes = self._proposals, [], 0
        try:
            self.node.propose_batch([data for data, _, _ in batch])
        except ProposalDropped as exc:
            answer = self._redirect("not_leader" if exc.leader_hint != self.id else "unavailable")
            for _, _, fut in batch:  # never appended: certainly not applied
                if not fut.done():
                    fut.set_result(answer)
            return
        self.stats["proposals"] += len(batch)
        for _, key, fut in batch:
            self._pending_writes.setdefault(key, []).append(fut)

    def _issue_reads(self) -> None:
        if not self._reads_unissued:
            return
        batch, self._reads_unissued = self._reads_unissued, []
        if self.role != Role.LEADER:
            self._answer_reads(batch, self._redirect("not_leader"))
            return
        self._read_ctx_counter += 1
        ctx = self._read_ctx_counter.to_bytes(8, "big")
        try:
            self.node.read_index(ctx)
        except ProposalDropped as exc:
            self._answer_reads(batch, self._redirect("overloaded") if exc.leader_hint == self.id
                               else self._redirect("not_leader"))
            return
        self._reads_by_ctx[ctx] = batch
        self.stats["reads_issued"] += 1

    @staticmethod
    def _answer_reads(batch: Any, answer: dict) -> None:
        for _, fut in batch:
            if not fut.done():
                fut.set_result(answer)

    def _on_read_state(self, index: int, ctx: bytes) -> None:
        for produce, fut in self._reads_by_ctx.pop(ctx, ()):
            self._reads_waiting.append((index, produce, fut))

    def _release_reads(self) -> None:
        applied = self.sm.applied_index
        while self._reads_waiting and self._reads_waiting[0][0] <= applied:
            _, produce, fut = self._reads_waiting.popleft()
            if not fut.done():
                fut.set_result(produce())
        # Read states come back in issue order, so the deque stays sorted by index.

    def _fail_pending_reads(self, error: str) -> None:
        answer = self._redirect(error)
        groups = [self._reads_unissued, *self._reads_by_ctx.values(),
                  [(k, f) for _, k, f in self._reads_waiting]]
        for group in groups:
            for _, fut in group:
                if not fut.done():
                    fut.set_result(answer)
        self._reads_unissued, self._reads_by_ctx = [], {}
        self._reads_waiting.clear()

    def _fail_pending_writes(self, error: str) -> None:
        answer = self._redirect(error)
        self._answer_reads([(None, f) for _, _, f in self._proposals], answer)  # never proposed
        self._proposals, self._queued_bytes = [], 0
        answer = dict(answer, maybe_applied=True)
        for futs in self._pending_writes.values():
            for fut in futs:
                if not fut.done():
                    fut.set_result(answer)
        self._pending_writes.clear()

    # ------------------------------------------------------------ client RPCs
    def _redirect(self, error: str) -> dict:
        leader = self.node.leader_id
        endpoint = None
        peers = self._peers_now
        if leader and leader != self.id and leader in peers:
            endpoint = endpoint_str(peers[leader])
        return {"ok": False, "error": error, "leader": leader, "endpoint": endpoint,
                "detail": f"node {self.id} is {self.role.name.lower()}; leader is "
                          f"{leader or 'unknown'}"}

    def _on_client_request(self, body: dict) -> dict | asyncio.Future:
        """Answer one client request (see :mod:`coordinator.client` for the protocol): a dict
        at once, or a Future the transport answers from when it resolves (no task per request)."""
        self.stats["requests"] += 1
        op = body.get("op")
        if op == "get":
            return self._get(body)
        if op in ("put", "delete", "cas", "register", "command"):
            return self._write(op, body)
        if op == "query":
            return self._query(body)
        if op == "watch":
            return self._watch(body)
        if op == "member":
            return self._member(body)
        if op == "status":
            return self.status()
        if op == "admin_partition":
            return self._partition(body.get("block", ()))
        if op == "admin_stop":
            return self._remote_stop()
        if op == "admin_stall_disk":
            return self._stall_disk(body.get("seconds"))
        return {"ok": False, "error": "bad_request", "detail": f"unknown op {op!r}"}

    def _get(self, body: dict) -> dict | asyncio.Future:
        key = body.get("key")
        if not isinstance(key, bytes):
            return {"ok": False, "error": "bad_key", "detail": "key must be bytes"}
        return self._read(functools.partial(self.sm.read_answer, key), body)

    def _query(self, body: dict) -> dict | asyncio.Future:
        """``{"op": "query", "ext", "name", "args", "consistency"}``: an extension's read-only
        query (:meth:`StateMachine.query`), answered like a ``get``."""
        ext, name, args = body.get("ext"), body.get("name"), body.get("args", [])
        if not isinstance(ext, str) or not isinstance(name, str) or not isinstance(args, list):
            return {"ok": False, "error": "bad_request",
                    "detail": "a query needs ext (str), name (str) and args (a list)"}
        if ext not in self.sm.extensions and ext != KV_QUERIES:
            return {"ok": False, "error": "unknown_extension",
                    "detail": f"no extension {ext!r} on this server "
                              f"(known: {sorted(self.sm.extensions)})"}
        return self._read(functools.partial(self.sm.query, ext, name, tuple(args)), body)

    def _read(self, produce: _ReadAnswer, body: dict) -> dict | asyncio.Future:
        """Answer ``produce()`` now (stale) or once a ReadIndex round confirms it (default)."""
        consistency = body.get("consistency", "linearizable")
        if consistency not in ("linearizable", "stale"):
            return {"ok": False, "error": "bad_request",
                    "detail": "consistency must be 'linearizable' or 'stale'"}
        if consistency == "stale":
            answer = produce()
            answer["stale"] = True
            answer["node"] = self.id
            return answer
        if self.role != Role.LEADER:
            return self._redirect("not_leader")
        if len(self._reads_unissued) >= self.config.max_pending_requests:
            return {"ok": False, "error": "overloaded", "detail": "too many reads waiting"}
        assert self._loop is not None
        fut = self._loop.create_future()
        self._reads_unissued.append((produce, fut))
        self._schedule_drive()
        self._deadlines.append((time.monotonic() + self.config.request_timeout_s, None, fut))
        if len(self._deadlines) == 1:
            self._rearm_ticker()
        return fut

    def _write(self, op: str, body: dict) -> dict | asyncio.Future:
        if self.role != Role.LEADER:
            return self._redirect("not_leader")
        if len(self._pending_writes) + len(self._proposals) >= self.config.max_pending_requests:
            return {"ok": False, "error": "overloaded", "detail": "too many writes waiting"}
        # The writes admitted but not in the storage yet count too (those queued, and those
        # in the save in flight): while a save is slow they pile up, and the bound is on
        # what the log will hold.
        retained = self.storage.retained_bytes() + self._saving_bytes + self._queued_bytes
        if retained > self.config.max_retained_log_bytes:
            self.stats["writes_refused_log_full"] += 1
            return {"ok": False, "error": "overloaded",
                    "detail": f"the log held in memory and the writes queued for it ({retained} "
                              f"bytes) are over its bound ({self.config.max_retained_log_bytes}) "
                              "until a save or the snapshot in progress lets them through; "
                              "retry shortly"}
        args = body.get("args", [])
        if op == "command":  # a registered session command by name; args any msgpack values
            name = body.get("name")
            if not isinstance(name, str) or not is_session_command(name) or not isinstance(
                    args, list):
                return {"ok": False, "error": "bad_request",
                        "detail": f"command {name!r:.80} is not a registered session command "
                                  "(or args is not a list)"}
            op = name
        elif not isinstance(args, list) or not all(a is None or isinstance(a, bytes)
                                                   for a in args):
            return {"ok": False, "error": "bad_request", "detail": "args must be bytes or None"}
        ts_ms = int(time.time() * 1000)
        if op == "register":
            if len(args) != 1 or not args[0]:
                return {"ok": False, "error": "bad_request", "detail": "register takes a nonce"}
            key: tuple = ("register", args[0])
            data = encode_command("register", 0, 0, 0, ts_ms, args[0])
        else:
            session, seq, ack = body.get("session"), body.get("seq"), body.get("ack", 0)
            if not (isinstance(session, int) and isinstance(seq, int) and isinstance(ack, int)
                    and min(session, seq, ack) >= 0):
                return {"ok": False, "error": "bad_request", "detail": "session/seq/ack"}
            key = (session, seq)
            data = encode_command(op, session, seq, ack, ts_ms, *args)
            if len(data) > self.config.max_command_bytes:  # must fit one append message
                return {"ok": False, "error": "too_large",
                        "detail": f"the {op} command is {len(data)} bytes encoded, more than "
                                  f"{self.config.max_command_bytes}; send it in parts"}
        assert self._loop is not None
        fut = self._loop.create_future()
        self._proposals.append((data, key, fut))
        self._queued_bytes += len(data)
        self._schedule_drive()
        self._deadlines.append((time.monotonic() + self.config.request_timeout_s, key, fut))
        if len(self._deadlines) == 1:
            self._rearm_ticker()
        return fut

    def _expire_requests(self) -> None:
        """Answer requests older than ``request_timeout_s`` with ``timeout`` (called per tick).

        One deque sorted by deadline (all requests get the same timeout) instead of a timer
        per request: the hot path stays cheap.
        """
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, key, fut = self._deadlines.popleft()
            if fut.done():
                continue
            answer = self._redirect("timeout")
            answer["maybe_applied"] = key is not None  # a write may still commit
            fut.set_result(answer)
            if key is None:
                continue
            waiters = self._pending_writes.get(key)
            if waiters is not None and fut in waiters:
                waiters.remove(fut)
                if not waiters:
                    del self._pending_writes[key]
        while self._deadlines and self._deadlines[0][2].done():
            self._deadlines.popleft()  # answered: the ticker need not wake for its deadline

    def _remote_stop(self) -> dict:
        """``admin_stop``: stop this node soon after answering (only with ``remote_stop``)."""
        if not self.config.remote_stop:
            return {"ok": False, "error": "bad_request",
                    "detail": "this node does not take admin_stop (stop its process instead)"}
        log.info("node %d: stopping at a client's admin_stop request", self.id)
        assert self._loop is not None
        self._loop.call_later(0.05, self._begin_stop)  # the answer goes first
        return {"ok": True, "stopping": self.id}

    def _stall_disk(self, seconds: Any) -> dict:
        """``admin_stall_disk`` (fault injection): hold this node's disk thread for
        ``seconds``, as a slow or saturated disk does: every save queued meanwhile (and the
        answers and commits behind it) waits; the event loop does not."""
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) \
                or not 0 < seconds <= MAX_DISK_STALL_S:
            return {"ok": False, "error": "bad_request",
                    "detail": f"admin_stall_disk takes 0 < seconds <= {MAX_DISK_STALL_S:g}, "
                              f"got {seconds!r}"}
        self.stats["disk_stalls_injected"] += 1
        log.warning("node %d: disk thread held for %.1f s (admin_stall_disk)", self.id, seconds)
        self._disk.submit(time.sleep, float(seconds))
        return {"ok": True, "stalled_s": float(seconds)}

    def _partition(self, block: Any) -> dict:
        ids = [int(i) for i in block if int(i) != self.id]
        self.transport_server.set_blocked_peers(ids)
        self.peer_transport.set_blocked_peers(ids)
        log.warning("node %d: partitioned from %s", self.id, ids or "nobody (healed)")
        return {"ok": True, "blocked": ids}

    def status(self) -> dict:
        """id, role, term, leader, commit, applied, log bounds, per-peer progress, counters."""
        st = self.node.status()
        peers: dict[str, dict[str, int]] = {}  # str keys: msgpack maps with str keys only
        for pid, pr in (getattr(st, "progress", None) or {}).items():
            peers[str(pid)] = {"match": int(getattr(pr, "match", 0)),
                               "next": int(getattr(pr, "next", 0))}
        first, last = self.storage.first_index(), self.storage.last_index()
        return {
            "ok": True, "id": self.id, "role": self.role.name.lower(), "term": self.node.term,
            "leader": self.node.leader_id, "commit": self.node.commit_index,
            "applied": self.sm.applied_index, "log_first": first, "log_last": last,
            "log_size": max(0, last - first + 1), "snapshot_index": self._snapshot_index,
            "revision": self.sm.revision, "keys": len(self.sm.kv),
            "sessions": len(self.sm.sessions), "peers": peers,
            "endpoint": endpoint_str(self.address), "pid": os.getpid(),
            "recovering": bool(self.node.recovering),
            "members_seen": sorted(self._members_seen().seen),
            "raft_dropped": {str(k): int(v) for k, v in (getattr(st, "dropped", None)
                                                         or {}).items()},
            "memory": self._memory(), "snapshot": self._snapshot_status(),
            "restore": dict(self.restore_timing),
            "stats": dict(self.stats), "storage": self.storage.stats.as_dict(),
            "transport": self.transport_server.stats.as_dict(),
        }

    def _memory(self) -> dict[str, int]:
        """The byte bounds (ServerConfig.memory_bounds) and what is in use now."""
        out = self.config.memory_bounds()
        out["retained_log_bytes"] = self.storage.retained_bytes()
        out["queued_write_bytes"] = self._queued_bytes + self._saving_bytes
        out["snapshot_reassembly_bytes"] = self._reassembler.buffered_bytes
        out["peer_queue_bytes"] = max((self.peer_transport.backlog_bytes(i)
                                       for i in self.config.peers if i != self.id), default=0)
        out["pending_requests"] = len(self._pending_writes) + len(self._deadlines)
        return out

    def _snapshot_status(self) -> dict[str, Any]:
        job = self._snap_job
        return {"index": self._snapshot_index, "in_progress": None if job is None else {
                    "index": job.md.index, "pid": job.pid, "written": job.exit_code == 0,
                    "age_ms": int((time.perf_counter() - job.started) * 1e3)},
                "applied_bytes_since": self._applied_bytes,
                "streaming_to": sorted(self._senders)}


async def _join_config(config: ServerConfig) -> ServerConfig:
    """A node joining a running cluster on an empty directory starts from the membership the
    cluster reports (coordinator.membership): the bootstrap configuration and every member's
    address. No member answering: start from --peers as given (a whole cluster restarting)."""
    answer = await membership.fetch_membership(config)
    if answer is None:
        log.warning("node %d: no member in --peers answered; joining with --peers as the "
                    "membership", config.node_id)
        return config
    bootstrap, addrs = membership.bootstrap_from(answer, config.node_id)
    peers = {**addrs, **config.peers}
    log.info("node %d joins a cluster of voters %s, learners %s", config.node_id,
             list(bootstrap.voters), list(bootstrap.learners))
    return dataclasses.replace(config, peers=peers, bootstrap=bootstrap)


async def serve(config: ServerConfig, *, ready_file: pathlib.Path | None = None,
                stop_on_stdin_eof: bool = False) -> None:
    """Run one node until SIGTERM/SIGINT, then shut down cleanly (releasing the data dir).
    On an empty data directory without ``join``, :func:`check_join` may refuse (NeedsJoin).
    ``stop_on_stdin_eof``: also when standard input closes (a pipe from the node's
    supervisor: the node dies with it; a thread blocked reading it costs no wake-up)."""
    await check_join(config)
    if config.join and not holds_state(config.data_dir):
        config = await _join_config(config)
    server = CoordinatorServer(config)
    await server.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop()))
    # A plain handler (not the loop's): it runs as soon as the interpreter resumes, before
    # the late tick is handled, so that tick's log line can tell a stop from a block.
    signal.signal(signal.SIGCONT, lambda *_: server.note_continued())
    if stop_on_stdin_eof:
        threading.Thread(target=_stop_on_eof, args=(loop, server), name="stdin-eof",
                         daemon=True).start()
    if ready_file is not None:
        tmp = ready_file.with_suffix(".tmp")
        tmp.write_text(endpoint_str(server.address))
        os.replace(tmp, ready_file)
    try:
        await server.wait_stopped()
    finally:
        await server.stop()
    if server.fatal_error is not None:
        raise RuntimeError(f"node {config.node_id} stopped on a fatal error: "
                           f"{server.fatal_error!r} (see the log above)")


def _stop_on_eof(loop: asyncio.AbstractEventLoop, server: CoordinatorServer) -> None:
    """Block on stdin until it closes, then stop the server (see :func:`serve`). It reads the
    file descriptor, not ``sys.stdin``: a daemon thread blocked in a buffered reader holds its
    lock, and the interpreter's shutdown then aborts ("could not acquire lock")."""
    with contextlib.suppress(OSError):
        while os.read(0, 4096):
            pass
    log.warning("node %d: stdin closed (its supervisor is gone); stopping", server.config.node_id)
    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: it stopped already
        loop.call_soon_threadsafe(lambda: asyncio.ensure_future(server.stop()))


__all__ = ["CoordinatorServer", "ServerConfig", "serve", "endpoint_str", "check_join",
           "NeedsJoin", "RECOVERING_MARKER"]
