"""A shared-memory all-reduce for the ranks of one host.

Theory of operation. The ranks of one host map one file in ``/dev/shm`` (a :class:`Segment`):
a header, one 64-byte control line per rank, and a data region of two *sets* of ``n`` slots,
``chunk_bytes`` each. A tensor is reduced chunk by chunk; each chunk is one *step*:

1. every rank copies its chunk into its own slot of the step's set;
2. barrier;
3. every rank sums its 1/n slice of the chunk over all slots, in rank order
   (``slot0 + slot1 + ... + slot{n-1}``), writing the sum into slot 0's slice;
4. barrier;
5. every rank copies slot 0 (the whole reduced chunk) out.

Each element is summed by exactly one rank, always in the same order, so the result is
bit-identical on every rank and the same from run to run. A tensor of at most
:data:`SMALL_BYTES` (:data:`SMALL_BYTES_TWO_RANKS` with two ranks) that fits one slot skips
steps 3-4: after the barrier every rank sums the whole of it, in
rank order, itself (the same additions everywhere, so the same bits): a barrier costs a
sleep and a wake-up, and on a busy host those dominate a small all-reduce. Steps alternate between the two
sets, which is what lets one barrier per phase suffice: a rank writes set ``s % 2`` in step
``s`` only after it passed step ``s-1``'s first barrier, which every rank reaches only after
it finished reading in step ``s-2`` (the invariant every step kind here keeps: writes, then a
barrier, then reads). A chunk is small (1 MiB by default) so that the copy in, the sum and
the copy out stay in the cache the cores share.

The barrier. Each rank's control line holds its *arrival count*; a rank arrives by storing
its count + 1 (one 8-byte store, only ever by that rank) and waits until every peer's count
reached its own. No lock and no atomic read-modify-write is needed: each word has one
writer, and x86-64 keeps stores in program order (a reader that sees a count also sees the
data written before it), which is why the path is offered on x86-64 only. A waiter spins a
little (adaptively: less when spinning did not pay), then sleeps in ``futex(FUTEX_WAIT)`` on the word of the peer it waits for;
an arriving rank issues one ``FUTEX_WAKE`` on its own word. There is no Ray call, socket or
lock on this path.

Faults. A waiter sleeps at most :data:`LIVENESS_POLL_S` at a time; between sleeps it checks
the peer it waits for: a peer whose process exited (a ``pidfd`` that became readable; the
pid and start time are in its control line, so a reused pid is not mistaken for it), or that
marked its line *closed* (its loop ended or raised, see :meth:`ShmCommunicator.close`), ends
the wait at once with :class:`~synctrain.errors.CollectiveError` naming it; a peer that is
alive but does not arrive within ``timeout_s`` ends it too. A rank that raised marks its own
line closed and wakes its waiters, so an error spreads to the whole host in milliseconds
instead of each rank waiting out the collective timeout.

Lifetime (what :mod:`synctrain.ps.shm` learned). The host's lowest rank creates the file
(``O_EXCL``, mode 0600, pages reserved with ``posix_fallocate`` so a full ``/dev/shm`` is an
error now rather than a ``SIGBUS`` later) with a random 128-bit token in its header; the
others map it only after checking owner, size, layout and token (compared in constant time);
once every rank mapped it, the name is unlinked, and from then on the memory lives exactly as
long as the mappings, so ``kill -9`` of any process leaks nothing. Names carry the job id, the
generation and the rendezvous port (a new process group gets a fresh segment) and 64 random
bits (nobody can create the name first). Only a rank killed between create and unlink leaves
a file; the driver removes its job's leftovers (:func:`remove_leftovers`).

The segment holds raw numbers only: nothing in it is unpickled or executed.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import hmac
import logging
import mmap
import os
import platform
import secrets
import select
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from synctrain.errors import CollectiveError

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"  # noqa: S108 - shared memory, not a temporary file
PREFIX = "synctrain-ar-"
MAGIC = b"SYNCTAR1"
NONCE_BYTES, TOKEN_BYTES = 8, 16
#: magic, token, ranks on the host, bytes per slot.
_HEADER = struct.Struct("<8s16sqq")
PAGE = 4096
LINE = 64  # one control line per rank: its own cache line, so arrivals do not false-share
#: Bounds: ranks that may share one segment, and the slot size.
MAX_LOCAL_RANKS = 512
MAX_CHUNK_BYTES = 64 << 20
DEFAULT_CHUNK_BYTES = 1 << 20
#: Slices handed to the ranks start on cache-line boundaries (no false sharing when summing).
SLICE_ALIGN_BYTES = 64
#: Slot sets: chunk i+1 is copied in while chunk i is summed and chunk i-1 copied out.
SETS = 3
#: Up to this size an all-reduce takes one barrier instead of two (every rank sums it all);
#: with two ranks, up to 1 MiB (bounded by the slot; every rank adds as much as it copies): measured
#: between two processes on the 2-core machine, 1 MB took 0.19-0.22 ms on one barrier against
#: 0.34-0.39 ms on two, 512 KB 0.11-0.14 against 0.21-0.36 ms.
SMALL_BYTES = 256 << 10
SMALL_BYTES_TWO_RANKS = 1 << 20
#: Checks of a peer's arrival count before sleeping, adapted per rank between these bounds:
#: doubled after a wait that spinning ended, halved after one that had to sleep. Spinning
#: only pays while every rank has a core; on an oversubscribed host it takes the core the
#: awaited peer needs (measured on 2 busy cores: 4x slower at 2,000 checks than at none).
SPIN_CHECKS_MIN, SPIN_CHECKS_START, SPIN_CHECKS_MAX = 4, 64, 2048
#: The longest sleep between checks of a peer's liveness while waiting for it.
LIVENESS_POLL_S = 0.05
#: A segment may take at most this share of /dev/shm's free space.
MAX_SHARE_OF_FREE = 0.25

# Fields of a control line (int64 each). The arrival count comes first: its low 32 bits are
# the futex word.
_ARRIVALS, _STATE, _PID, _START_TIME = 0, 1, 2, 3
_FIELDS = LINE // 8
STATE_EMPTY, STATE_ACTIVE, STATE_CLOSED = 0, 1, 2

_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
_SYS_FUTEX = {"x86_64": 202, "AMD64": 202}.get(platform.machine())


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _libc_syscall() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syscall
    except (OSError, AttributeError):  # pragma: no cover - not glibc/musl
        return None
    fn.restype = ctypes.c_long
    return fn


_syscall = _libc_syscall() if _SYS_FUTEX is not None else None


def supported() -> str | None:
    """None when this host can run the shared-memory path, else why not (for messages)."""
    if _SYS_FUTEX is None or _syscall is None:
        return (f"the shared-memory all-reduce needs x86-64 Linux (its barrier relies on x86-64's "
                f"store order and the futex call); this is {platform.machine()} {platform.system()}")
    if not (os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)):
        return f"{SHM_DIR} is missing or not writable"
    return None


def segment_bytes(local_size: int, chunk_bytes: int) -> int:
    """Size of a segment for ``local_size`` ranks with slots of ``chunk_bytes``."""
    return _data_offset(local_size) + SETS * local_size * chunk_bytes


def _data_offset(local_size: int) -> int:
    return -(-(LINE + local_size * LINE) // PAGE) * PAGE


def file_name(job_id: str, generation: int, rendezvous_port: int, leader_rank: int, nonce: bytes) -> str:
    """A segment's name: job, generation, rendezvous (a new process group gets a new one), the
    host's lowest rank, and ``nonce`` (8 random bytes, so nobody can create the name first)."""
    assert len(nonce) == NONCE_BYTES, nonce
    return f"{PREFIX}{job_id}-g{generation}-p{rendezvous_port}-r{leader_rank}-{nonce.hex()}"


def _proc_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in (b"Z", b"X"):  # exited, not yet reaped
        return None
    return int(fields[19])


class Segment:
    """One host's mapped segment: header, control lines, and the slot sets."""

    def __init__(self, path: str, token: bytes, local_size: int, chunk_bytes: int, mm: mmap.mmap) -> None:
        self.path = path
        self.token = token
        self.local_size = local_size
        self.chunk_bytes = chunk_bytes
        self._mm: mmap.mmap | None = mm
        words = np.frombuffer(memoryview(mm), dtype=np.int64, count=local_size * _FIELDS, offset=LINE)
        self.control = words.reshape(local_size, _FIELDS)  # control[rank, field]
        self.base_address = self.control.ctypes.data - LINE  # for futex calls

    @classmethod
    def create(cls, path: str, local_size: int, chunk_bytes: int) -> Segment:
        """The host's lowest rank: a new segment file. Raises OSError when it cannot be made."""
        assert 1 <= local_size <= MAX_LOCAL_RANKS, local_size
        assert 0 < chunk_bytes <= MAX_CHUNK_BYTES and chunk_bytes % PAGE == 0, chunk_bytes
        size = segment_bytes(local_size, chunk_bytes)
        free = os.statvfs(SHM_DIR)
        if size > MAX_SHARE_OF_FREE * free.f_bavail * free.f_frsize:
            raise OSError(f"{SHM_DIR} has {free.f_bavail * free.f_frsize >> 20} MiB free; a {size >> 20} MiB "
                          f"segment would take more than {MAX_SHARE_OF_FREE:.0%} of it")
        token = secrets.token_bytes(TOKEN_BYTES)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)  # reserve the pages: ENOSPC here, not SIGBUS later
            mm = mmap.mmap(fd, size)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        finally:
            os.close(fd)
        mm[:_HEADER.size] = _HEADER.pack(MAGIC, token, local_size, chunk_bytes)
        return cls(path, token, local_size, chunk_bytes, mm)

    @classmethod
    def attach(cls, path: str, token: bytes, job_id: str, local_size: int, chunk_bytes: int) -> Segment:
        """Another rank of the host: map the lowest rank's segment after checking it is that
        one. Raises CollectiveError naming what does not match."""
        real = os.path.realpath(path)
        if (os.path.dirname(real) != os.path.realpath(SHM_DIR)
                or not os.path.basename(real).startswith(f"{PREFIX}{job_id}-")):
            raise CollectiveError(f"refused to map {path!r}: not a segment {SHM_DIR}/{PREFIX}{job_id}-...")
        fd = os.open(real, os.O_RDWR | os.O_NOFOLLOW)
        try:
            info = os.fstat(fd)
            size = segment_bytes(local_size, chunk_bytes)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_size != size:
                raise CollectiveError(
                    f"refused to map {real}: expected a regular file of uid {os.getuid()} holding {size} "
                    f"bytes, found uid {info.st_uid}, {info.st_size} bytes")
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        magic, got_token, got_size, got_chunk = _HEADER.unpack(mm[:_HEADER.size])
        if magic != MAGIC or not hmac.compare_digest(got_token, token) \
                or (got_size, got_chunk) != (local_size, chunk_bytes):
            mm.close()
            raise CollectiveError(f"refused to map {real}: its header is not the one this job's lowest rank "
                                  "on this host wrote (wrong token or layout)")
        return cls(real, token, local_size, chunk_bytes, mm)

    def slots(self, dtype: torch.dtype) -> list[list[torch.Tensor]]:
        """``slots[set][rank]``: each slot as a flat tensor of ``dtype``."""
        assert self._mm is not None, "segment closed"
        itemsize = torch.empty(0, dtype=dtype).element_size()
        count = self.chunk_bytes // itemsize
        start = _data_offset(self.local_size)
        return [[torch.frombuffer(self._mm, dtype=dtype, count=count,
                                  offset=start + (s * self.local_size + r) * self.chunk_bytes)
                 for r in range(self.local_size)] for s in range(SETS)]

    def unlink(self) -> None:
        """Remove the name; the memory stays while it is mapped."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def close(self) -> None:
        """Drop this process's mapping (best effort: views still held keep it alive)."""
        mm, self._mm = self._mm, None
        self.control = np.zeros((self.local_size, _FIELDS), dtype=np.int64)
        if mm is not None:
            with contextlib.suppress(BufferError):
                mm.close()


class _PeerWatch:
    """Is a peer process still there? A pidfd per peer where the kernel has them (readable
    once the process exited), else /proc with the start time against pid reuse."""

    def __init__(self, pid: int, start_time: int) -> None:
        self.pid = pid
        self.start_time = start_time
        self.fd: int | None = None
        if hasattr(os, "pidfd_open"):
            with contextlib.suppress(OSError):
                self.fd = os.pidfd_open(pid)
        # The pidfd (or pid) must be the process that wrote the line: check after opening.
        self.visible = _proc_start_time(pid) == start_time

    def alive(self) -> bool:
        if self.fd is not None:
            readable, _, _ = select.select([self.fd], [], [], 0)
            return not readable
        return _proc_start_time(self.pid) == self.start_time

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


class ShmCommunicator:
    """All-reduce, broadcast and barrier among the ranks of one host, through a Segment.

    ``ranks`` are the global ranks of the host's ranks, lowest first; this process is
    ``ranks[local_rank]``. Not thread-safe across calls (a lock asserts it); every rank of the
    host must make the same calls in the same order, as with any collective.
    """

    def __init__(self, segment: Segment, local_rank: int, ranks: list[int], timeout_s: float) -> None:
        assert segment.local_size == len(ranks) >= 2 and 0 <= local_rank < len(ranks), (ranks, local_rank)
        self.segment = segment
        self.local_rank = local_rank
        self.ranks = list(ranks)
        self.size = len(ranks)
        self.timeout_s = float(timeout_s)
        self._arrivals = int(segment.control[local_rank, _ARRIVALS])
        self._set_base = 0  # the slot set the next collective's first chunk uses
        self._spin_checks = SPIN_CHECKS_START
        self._small_limit = min(SMALL_BYTES_TWO_RANKS if self.size == 2 else SMALL_BYTES, segment.chunk_bytes)
        self._slots: dict[torch.dtype, list[list[torch.Tensor]]] = {}
        self._watch: dict[int, _PeerWatch] = {}
        self._lock = threading.Lock()
        self._broken: CollectiveError | None = None
        me = segment.control[local_rank]
        me[_PID] = os.getpid()
        me[_START_TIME] = _proc_start_time(os.getpid()) or 0
        me[_STATE] = STATE_ACTIVE

    # ---- set-up ------------------------------------------------------------------------
    def watch_peers(self) -> bool:
        """Once every rank attached: open a watch on each peer's process. False when a peer's
        process is not visible from here (another pid namespace): then a dead peer is only
        found by the timeout."""
        ok = True
        for peer in range(self.size):
            if peer == self.local_rank:
                continue
            line = self.segment.control[peer]
            watch = _PeerWatch(int(line[_PID]), int(line[_START_TIME]))
            ok = ok and watch.visible and int(line[_STATE]) == STATE_ACTIVE
            self._watch[peer] = watch
        return ok

    # ---- collectives -------------------------------------------------------------------
    def all_reduce_(self, flat: torch.Tensor, between_hosts: Callable[[torch.Tensor], None] | None = None) -> None:
        """Sum the 1-D contiguous CPU tensor ``flat`` over the host's ranks, in place.

        With ``between_hosts``, the host's sum lands in the lowest rank's ``flat``, which
        calls ``between_hosts(flat)`` (the sum over the hosts' lowest ranks, in place) and
        hands the result to the host's other ranks.
        """
        assert flat.dim() == 1 and flat.is_contiguous() and flat.device.type == "cpu", flat.shape
        with self._collective("all-reduce"):
            if flat.numel() * flat.element_size() <= self._small_limit:
                self._reduce_small(flat)
            else:
                self._reduce_chunks(flat, everyone=between_hosts is None)
            if between_hosts is not None:
                if self.local_rank == 0:
                    between_hosts(flat)
                self._broadcast_chunks(flat, 0)

    def broadcast_(self, flat: torch.Tensor, src_local: int) -> None:
        """Overwrite ``flat`` on every rank of the host with local rank ``src_local``'s."""
        assert flat.dim() == 1 and flat.is_contiguous() and flat.device.type == "cpu", flat.shape
        assert 0 <= src_local < self.size, src_local
        with self._collective("broadcast"):
            self._broadcast_chunks(flat, src_local)

    def barrier(self) -> None:
        """Wait until every rank of the host got here."""
        with self._collective("barrier"):
            self._arrive_and_wait("barrier")

    def close(self) -> None:
        """Leave: mark this rank's line closed (a peer still waiting for it fails at once
        instead of timing out) and drop the mapping. Idempotent."""
        self._mark_closed()
        self._slots.clear()  # the views go before the mapping does
        self.segment.close()
        for watch in self._watch.values():
            watch.close()
        self._watch.clear()

    # ---- the pipeline ------------------------------------------------------------------
    # Chunk i of a collective uses slot set (base + i) % 3 and is written in phase i, summed
    # in phase i+1 and read out in phase i+2; a barrier ends every phase that wrote. So a set
    # is written again (chunk i+3, phase i+3) only after the barrier that ends phase i+2, and
    # the set a collective reads in its last, barrier-less phase is not the one the next
    # collective writes first. One barrier per chunk, plus one.

    def _reduce_chunks(self, flat: torch.Tensor, everyone: bool) -> None:
        """The host's sum into every rank's ``flat`` (``everyone``) or only the lowest rank's
        (the others' ``flat`` then holds its own input and its slices of the sum)."""
        sets = self._slots_of(flat.dtype)
        chunks = self._chunks(flat, sets)
        base = self._claim_sets(len(chunks))
        me = self.local_rank
        for phase in range(len(chunks) + 2):
            if phase < len(chunks):  # copy in what the others sum (not my own slice)
                start, length = chunks[phase]
                lo, hi = self._my_slice(length, flat.element_size())
                mine = sets[(base + phase) % 3][me]
                mine[:lo].copy_(flat[start:start + lo])
                mine[hi:length].copy_(flat[start + hi:start + length])
            if 1 <= phase <= len(chunks):
                self._sum_my_slice(sets[(base + phase - 1) % 3], flat, *chunks[phase - 1])
            if phase >= 2 and (everyone or me == 0):  # copy out the others' slices of the sum
                start, length = chunks[phase - 2]
                lo, hi = self._my_slice(length, flat.element_size())
                total = sets[(base + phase - 2) % 3][0]
                flat[start:start + lo].copy_(total[:lo])
                flat[start + hi:start + length].copy_(total[hi:length])
            if phase <= len(chunks):
                self._arrive_and_wait("all-reduce")

    def _reduce_small(self, flat: torch.Tensor) -> None:
        """One chunk, one barrier: every rank sums all slots itself, in rank order. The same
        additions of the same numbers on every rank: the same bits. n times the additions of
        :meth:`_reduce_chunks`, which for a small tensor cost less than the second barrier."""
        sets = self._slots_of(flat.dtype)
        slots = sets[self._claim_sets(1)]
        length = flat.numel()
        slots[self.local_rank][:length].copy_(flat)
        self._arrive_and_wait("all-reduce")
        torch.add(slots[0][:length], slots[1][:length], out=flat)
        for r in range(2, self.size):
            flat.add_(slots[r][:length])

    def _sum_my_slice(self, slots: list[torch.Tensor], flat: torch.Tensor, start: int, length: int) -> None:
        """Slice [lo, hi) of the chunk: x0 + x1 + ... in rank order (my own x from ``flat``),
        into slot 0 for the others and into ``flat`` for me."""
        lo, hi = self._my_slice(length, flat.element_size())
        if hi <= lo:
            return
        me = self.local_rank
        mine = flat[start + lo:start + hi]
        parts = [mine if r == me else slots[r][lo:hi] for r in range(self.size)]
        total = slots[0][lo:hi]
        torch.add(parts[0], parts[1], out=total)
        for part in parts[2:]:
            total.add_(part)
        mine.copy_(total)

    def _broadcast_chunks(self, flat: torch.Tensor, src_local: int) -> None:
        sets = self._slots_of(flat.dtype)
        chunks = self._chunks(flat, sets)
        base = self._claim_sets(len(chunks))
        for phase in range(len(chunks) + 1):
            if phase < len(chunks) and self.local_rank == src_local:
                start, length = chunks[phase]
                sets[(base + phase) % 3][src_local][:length].copy_(flat[start:start + length])
            if phase >= 1 and self.local_rank != src_local:
                start, length = chunks[phase - 1]
                flat[start:start + length].copy_(sets[(base + phase - 1) % 3][src_local][:length])
            if phase < len(chunks):
                self._arrive_and_wait("broadcast")

    @staticmethod
    def _chunks(flat: torch.Tensor, sets: list[list[torch.Tensor]]) -> list[tuple[int, int]]:
        per_chunk = sets[0][0].numel()
        return [(start, min(per_chunk, flat.numel() - start)) for start in range(0, flat.numel(), per_chunk)]

    def _claim_sets(self, chunks: int) -> int:
        base = self._set_base
        self._set_base = (base + chunks) % 3
        return base

    def _my_slice(self, length: int, itemsize: int) -> tuple[int, int]:
        align = max(1, SLICE_ALIGN_BYTES // itemsize)
        per_rank = -(-length // self.size)
        per_rank = -(-per_rank // align) * align
        lo = min(length, self.local_rank * per_rank)
        return lo, min(length, lo + per_rank)

    def _slots_of(self, dtype: torch.dtype) -> list[list[torch.Tensor]]:
        if dtype not in self._slots:
            self._slots[dtype] = self.segment.slots(dtype)
        return self._slots[dtype]

    @contextlib.contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        if self._broken is not None:
            raise CollectiveError(f"rank {self.ranks[self.local_rank]}: the shared-memory collectives failed "
                                  f"before this {what}: {self._broken}")
        if self.segment._mm is None:
            raise CollectiveError(f"rank {self.ranks[self.local_rank]}: {what} after the shared-memory "
                                  "communicator was closed")
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(f"two threads ran shared-memory collectives at once ({what}); they must "
                               "run one at a time, in the same order on every rank")
        try:
            yield
        except BaseException as exc:  # peers waiting for this rank must fail now, not time out
            self._broken = exc if isinstance(exc, CollectiveError) else CollectiveError(
                f"this rank's {what} raised {type(exc).__name__}: {exc}")
            self._mark_closed()
            raise
        finally:
            self._lock.release()

    # ---- the barrier -------------------------------------------------------------------
    def _arrive_and_wait(self, what: str) -> None:
        self._arrivals += 1
        target = self._arrivals
        control = self.segment.control
        control[self.local_rank, _ARRIVALS] = target
        self._futex(self.local_rank, _FUTEX_WAKE, 0x7FFFFFFF, None)
        for peer in range(self.size):
            if peer != self.local_rank and control[peer, _ARRIVALS] < target:
                self._wait_for(peer, target, what)

    def _wait_for(self, peer: int, target: int, what: str) -> None:
        control = self.segment.control
        spin = self._spin_checks
        for _ in range(spin):
            if control[peer, _ARRIVALS] >= target:
                self._spin_checks = min(SPIN_CHECKS_MAX, spin * 2)
                return
        self._spin_checks = max(SPIN_CHECKS_MIN, spin // 2)
        deadline = time.monotonic() + self.timeout_s
        while True:
            seen = int(control[peer, _ARRIVALS])
            if seen >= target:
                return
            self._futex(peer, _FUTEX_WAIT, seen & 0xFFFFFFFF, LIVENESS_POLL_S)
            if control[peer, _ARRIVALS] >= target:
                return
            self._check_peer(peer, what, deadline)

    def _check_peer(self, peer: int, what: str, deadline: float) -> None:
        """Raise if ``peer`` will not arrive: a peer process exited, a peer left, or the time is
        up. When several are gone, name the cause, not a survivor that gave up on it first and
        exited: a process that died without closing its line (killed, crashed) before one that
        left without arriving (its loop ended or raised), before one that closed and exited
        (a survivor that gave up)."""
        me = self.ranks[self.local_rank]
        control = self.segment.control
        closed = {other for other in range(len(self.ranks)) if other != self.local_rank
                  and int(control[other, _STATE]) == STATE_CLOSED}
        dead = [other for other, watch in self._watch.items() if not watch.alive()]
        left = [other for other in sorted(closed) if control[other, _ARRIVALS] < self._arrivals]
        crashed = [other for other in dead if other not in closed]
        if crashed or (dead and not left):
            other = (crashed or dead)[0]
            raise CollectiveError(
                f"rank {self.ranks[other]} (pid {self._watch[other].pid}) exited during the shared-memory "
                f"{what}; rank {me} stops instead of waiting for it (the job fails, or recovers when it can)")
        if left:
            them = self.ranks[peer if peer in left else left[0]]
            raise CollectiveError(
                f"rank {them} left the shared-memory {what} (its training loop ended or raised) while "
                f"rank {me} waited for it; rank {them}'s own error is the cause")
        them = self.ranks[peer]
        if time.monotonic() > deadline:
            raise CollectiveError(
                f"rank {them} did not reach the shared-memory {what} within {self.timeout_s:g} s while rank "
                f"{me} waited (it is alive: stuck, or running other collectives than this rank); raise "
                "collective_timeout_s if a step can legitimately take that long")

    def _futex(self, rank: int, op: int, value: int, timeout_s: float | None) -> None:
        assert _syscall is not None and _SYS_FUTEX is not None
        address = self.segment.base_address + LINE + rank * LINE  # the low half of its arrivals
        if op == _FUTEX_WAIT:
            secs = float(timeout_s or 0.0)
            ts = _Timespec(int(secs), int((secs % 1.0) * 1e9))
            _syscall(_SYS_FUTEX, ctypes.c_void_p(address), op, ctypes.c_uint32(value), ctypes.byref(ts), None, 0)
        else:
            _syscall(_SYS_FUTEX, ctypes.c_void_p(address), op, value, None, None, 0)

    def _mark_closed(self) -> None:
        if self.segment._mm is None:
            return
        self.segment.control[self.local_rank, _STATE] = STATE_CLOSED
        self._futex(self.local_rank, _FUTEX_WAKE, 0x7FFFFFFF, None)


def remove_leftovers(job_id: str) -> int:
    """Unlink this job's segment files still named in /dev/shm (a rank killed between creating
    one and every rank mapping it). Only regular files of this process's user are touched;
    never raises (it runs while the driver hands back a result). Returns how many went."""
    removed = 0
    try:
        paths = glob.glob(os.path.join(SHM_DIR, f"{PREFIX}{glob.escape(job_id)}-*"))
    except OSError as exc:  # pragma: no cover - glob swallows most errors itself
        log.warning("could not list %s for job %s's leftover segments: %s", SHM_DIR, job_id, exc)
        return 0
    for path in paths:
        try:
            info = os.lstat(path)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
                log.warning("left %s alone: named like job %s's segment but not a file of uid %d", path,
                            job_id, os.getuid())
                continue
            os.unlink(path)
            removed += 1
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("could not remove job %s's leftover segment %s: %s", job_id, path, exc)
    return removed
