"""Snapshots taken and sent off a server's event loop.

Theory of operation
-------------------
Taking a snapshot means serializing the whole state machine (the key-value store, the
session table and every extension, e.g. the training step log) and making the file durable.
At 300k keys that is about a second of CPU and a large fsync; done on the event loop it
stalls heartbeats past the election timeout. Here the server *forks*: the child process
inherits a copy-on-write view of the state frozen at the fork (Redis's BGSAVE), serializes
it with the ordinary :meth:`~coordinator.statemachine.StateMachine.snapshot`, writes and
fsyncs ``snap-….snap.tmp`` with :func:`coordinator.storage.write_snapshot_file`, and exits.
The parent only pays for ``fork()`` itself (page tables: ~9 ms at 150 MB of RSS) and keeps
applying, voting and heartbeating meanwhile; a worker thread waits for the child, and the
server then adopts the file (:meth:`DiskStorage.adopt_snapshot_file`: checksum, rename,
directory fsync, WAL record) and compacts the log. The view is consistent with no copying
and no cooperation from extensions, because the child sees memory exactly as it was between
two applied entries. The cost is memory: pages the parent writes to while the child runs are
copied, and the child's own reading touches reference counts, so a snapshot can transiently
need up to the state's size again (as with Redis).

The child must not touch anything shared with the parent: it resets the signal handlers and
the wakeup descriptor asyncio installed (a SIGTERM sent to the child must not reach the
parent's loop), closes every inherited descriptor (the parent's sockets and the data
directory's lock stay the parent's alone), disables the garbage collector (which would walk,
and so copy, every object), lowers its CPU priority (``nice 10``), writes and syncs the file
in 4 MiB pieces (so the WAL fsyncs of the nodes on the same disk never queue behind a whole
snapshot: :func:`coordinator.storage.write_snapshot_file`), asks to die with its parent
(``PR_SET_PDEATHSIG``), never logs
(a logging lock may have been held at the fork) and leaves with ``os._exit``. Where
``os.fork`` does not exist the server serializes on the loop and writes in a thread
(:func:`can_fork`).

Sending one to a follower streams the file: the server reads the snapshot's data range
(:meth:`DiskStorage.snapshot_data_span`) one chunk at a time in a worker thread and queues
each chunk frame only when the peer link's backlog is below two chunks
(:meth:`PeerTransport.backlog_bytes`), so neither the loop nor memory ever holds the whole
snapshot, and heartbeats to that follower wait behind at most two chunks.
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import sys
import traceback
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from coordinator.raft import SnapshotMetadata
from coordinator.storage import write_snapshot_file

if TYPE_CHECKING:
    from coordinator.statemachine import StateMachine

_PR_SET_PDEATHSIG = 1
_READ_PIECE_BYTES = 1 << 20


def can_fork() -> bool:
    return hasattr(os, "fork")


def fork_snapshot(sm: StateMachine, tmp: Path, md: SnapshotMetadata, *, fsync: bool) -> int:
    """Fork a child that writes ``sm``'s snapshot at ``tmp`` and exits 0 (1 on an error,
    printed to stderr); returns its pid. Call between two applied entries."""
    pid = os.fork()
    if pid == 0:
        _child(sm, tmp, md, fsync)
    return pid


def _child(sm: StateMachine, tmp: Path, md: SnapshotMetadata, fsync: bool) -> NoReturn:
    code = 1
    try:
        gc.disable()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        try:
            signal.set_wakeup_fd(-1)
        except (ValueError, OSError):  # not the main thread's interpreter state: nothing set
            pass
        _die_with_parent()
        os.nice(10)  # the node's own loop comes first on a busy machine
        os.closerange(3, os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 65536)
        write_snapshot_file(tmp, md, sm.snapshot(), sync=os.fsync if fsync else None)
        code = 0
    except BaseException:  # reported on stderr (the node's log); the parent sees exit 1
        try:  # os.write, not sys.stderr: its lock may have been held by a thread at the fork
            os.write(2, ("snapshot child: " + traceback.format_exc()).encode(errors="replace"))
        except BaseException:
            pass
    finally:
        os._exit(code)


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies (a killed node leaves no writer)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def wait_child(pid: int) -> int:
    """Block until child ``pid`` exits (a worker thread calls this); its exit code, or
    -signal if a signal killed it."""
    while True:
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            return -1
        except InterruptedError:
            continue
        if os.WIFSIGNALED(status):
            return -os.WTERMSIG(status)
        if os.WIFEXITED(status):
            return os.WEXITSTATUS(status)


def crc_range(fd: int, offset: int, length: int) -> int:
    """CRC-32 of ``length`` bytes of ``fd`` from ``offset``, read in 1 MiB pieces (zlib
    releases the GIL on each); for a worker thread."""
    crc, done = 0, 0
    while done < length:
        piece = os.pread(fd, min(_READ_PIECE_BYTES, length - done), offset + done)
        if not piece:
            raise OSError(f"snapshot file ended {length - done} bytes early")
        crc, done = zlib.crc32(piece, crc), done + len(piece)
    return crc


def read_exactly(fd: int, n: int, offset: int) -> bytes:
    """``n`` bytes of ``fd`` at ``offset`` (OSError if the file is shorter)."""
    parts, got = [], 0
    while got < n:
        piece = os.pread(fd, n - got, offset + got)
        if not piece:
            raise OSError(f"snapshot file ended {n - got} bytes early")
        parts.append(piece)
        got += len(piece)
    return parts[0] if len(parts) == 1 else b"".join(parts)


__all__ = ["can_fork", "fork_snapshot", "wait_child", "crc_range", "read_exactly"]
