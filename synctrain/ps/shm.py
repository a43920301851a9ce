"""Shared memory between a worker and a parameter-server shard on the same machine.

Theory of operation. Through Ray, a push of a shard range over 100 KB costs an object-store
put, seal and fetch each way, plus the raylet's bookkeeping of both objects (measured: 9.6 ms
per round trip for 4.3 MB on 2 cores, and about 3 ms of raylet CPU per push). When the
worker and the shard run on one machine, the bytes need not travel at all: a
:class:`Channel` is one file in ``/dev/shm`` that both map, laid out as a header, a
gradient region and a parameter region, each the shard range's size. A push writes the
gradient into its region and rings the shard over a Unix socket (:mod:`synctrain.ps.ipc`);
the shard reads the gradient in place and, when asked, writes its parameters into the
parameter region before it answers.

Who touches what, when (no locks needed): the worker writes the gradient region only while
no push of its own is in flight, and reads the parameter region only after the reply came;
the shard reads the gradient and writes the parameters only while it serves that push. The
worker keeps at most one push in flight per shard, so one region of each suffices.

Lifetime. The worker creates the file (``O_EXCL``, mode 0600, its pages reserved with
``posix_fallocate`` so that a full ``/dev/shm`` is a clean error rather than a ``SIGBUS``
later), the shard attaches (checks the header's token, size and dtype), and the worker then
unlinks the name at once: from there on the memory lives exactly as long as the two
mappings, so a ``kill -9`` of either process leaks nothing. Only a worker killed between
create and unlink leaves a file behind; the driver removes its job's leftovers at the end
(:func:`remove_leftovers`), only files its own user owns, and never raises doing so (it runs
while ``fit()`` returns a finished job's result). The job id is public (it is in the shard's
socket name), so a name also carries 64 random bits: nobody can create a channel's name
ahead of the worker, and the shard maps only a file its own user owns.

The channel carries raw numbers only: nothing in it is unpickled or executed.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import mmap
import os
import secrets
import stat
import struct

import numpy as np

from synctrain.ps.errors import ParameterServerError

log = logging.getLogger(__name__)
#: Where the files live: tmpfs on Linux. None of this is used where it does not exist.
SHM_DIR = "/dev/shm"  # noqa: S108 - shared memory, not a temporary file
PREFIX = "synctrain-ps-"
MAGIC = b"SYNCTPS1"
#: magic, token, elements, itemsize, dtype kind (one byte), padded to ALIGN.
_HEADER = struct.Struct("<8s16sqq1s")
ALIGN = 64
#: A channel may take at most this share of /dev/shm's free space (Ray's object store and
#: other jobs live there too); beyond it the push goes through Ray instead.
MAX_SHARE_OF_FREE = 0.25


def _region_bytes(elements: int, itemsize: int) -> int:
    return -(-elements * itemsize // ALIGN) * ALIGN


def channel_bytes(elements: int, itemsize: int) -> int:
    """Size of a channel's file for a shard range of ``elements`` values."""
    return ALIGN + 2 * _region_bytes(elements, itemsize)


def file_name(job_id: str, worker: int, shard: int) -> str:
    """A channel file's name: the job, the worker and the shard, and 64 random bits."""
    return f"{PREFIX}{job_id}-w{worker}-s{shard}-{secrets.token_hex(8)}"


def available() -> bool:
    """Whether this machine has a writable shared-memory directory."""
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


class Channel:
    """One worker's gradient and parameter regions for one shard range, mapped in memory."""

    def __init__(self, path: str, token: bytes, elements: int, dtype: np.dtype, mm: mmap.mmap) -> None:
        self.path = path
        self.token = token
        self.elements = elements
        self.dtype = np.dtype(dtype)
        self._mm: mmap.mmap | None = mm
        region = _region_bytes(elements, self.dtype.itemsize)
        buf = memoryview(mm)
        self.grad = np.frombuffer(buf, dtype=self.dtype, count=elements, offset=ALIGN)
        self.params = np.frombuffer(buf, dtype=self.dtype, count=elements, offset=ALIGN + region)

    @classmethod
    def create(cls, job_id: str, worker: int, shard: int, elements: int, dtype: np.dtype) -> Channel | None:
        """The worker's side: a new channel file, or None where shared memory cannot hold it."""
        dtype = np.dtype(dtype)
        size = channel_bytes(elements, dtype.itemsize)
        if not available() or elements <= 0:
            return None
        stats = os.statvfs(SHM_DIR)
        if size > MAX_SHARE_OF_FREE * stats.f_bavail * stats.f_frsize:
            return None
        path = os.path.join(SHM_DIR, file_name(job_id, worker, shard))
        token = secrets.token_bytes(16)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            return None
        try:
            os.posix_fallocate(fd, 0, size)  # reserve the pages now: ENOSPC here, not SIGBUS later
            mm = mmap.mmap(fd, size)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(path)
            return None
        finally:
            os.close(fd)
        mm[:_HEADER.size] = _HEADER.pack(MAGIC, token, elements, dtype.itemsize, dtype.char.encode())
        return cls(path, token, elements, dtype, mm)

    @classmethod
    def attach(cls, path: str, token: bytes, job_id: str, elements: int, dtype: np.dtype) -> Channel | None:
        """The shard's side: map a worker's channel file. None when it is not on this machine
        (no such file, or another one by that name); a file that is there but does not match
        what the shard holds is an error."""
        dtype = np.dtype(dtype)
        real = os.path.realpath(path)
        if (os.path.dirname(real) != os.path.realpath(SHM_DIR)
                or not os.path.basename(real).startswith(f"{PREFIX}{job_id}-")):
            raise ParameterServerError(
                f"refused to map {path!r}: a parameter-server channel is a file {SHM_DIR}/{PREFIX}<job>-... "
                f"of job {job_id}")
        try:
            fd = os.open(real, os.O_RDWR)
        except FileNotFoundError:
            return None  # the worker is on another machine
        try:
            info = os.fstat(fd)
            size = info.st_size
            if size < _HEADER.size or info.st_uid != os.getuid():
                return None  # not a worker's channel (the workers run as the shard's user)
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        magic, got_token, got_elements, itemsize, kind = _HEADER.unpack(mm[:_HEADER.size])
        if magic != MAGIC or got_token != token:
            mm.close()
            return None  # a file of that name that is not the worker's: another machine's
        if (got_elements != elements or itemsize != dtype.itemsize or kind != dtype.char.encode()
                or size != channel_bytes(elements, dtype.itemsize)):
            mm.close()
            raise ParameterServerError(
                f"channel {path} holds {got_elements} values of {itemsize} bytes ({size} bytes in all), "
                f"but the shard holds {elements} of {dtype}: the worker and the shard disagree on the layout")
        return cls(real, token, elements, dtype, mm)

    def unlink(self) -> None:
        """Remove the name (the memory stays while it is mapped)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def close(self) -> None:
        """Drop this side's mapping (best effort: views still held keep it alive)."""
        mm, self._mm = self._mm, None
        del self.grad, self.params
        if mm is not None:
            with contextlib.suppress(BufferError):
                mm.close()


def remove_leftovers(job_id: str) -> int:
    """Unlink this job's channel files still named in /dev/shm (a worker killed between
    creating one and handing it over). Returns how many were removed.

    Only regular files owned by this process's user are touched: anyone can create a file
    named like this job's. Never raises: a failure is logged, since this runs while the
    driver hands back a finished job's result."""
    removed = 0
    try:
        paths = glob.glob(os.path.join(SHM_DIR, f"{PREFIX}{glob.escape(job_id)}-*"))
    except OSError as exc:  # pragma: no cover - glob swallows most errors itself
        log.warning("could not list %s for job %s's leftover channels: %s", SHM_DIR, job_id, exc)
        return 0
    for path in paths:
        try:
            info = os.lstat(path)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
                log.warning("left %s alone: named like job %s's channel but not a file of uid %d", path,
                            job_id, os.getuid())
                continue
            os.unlink(path)
            removed += 1
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("could not remove job %s's leftover channel %s: %s", job_id, path, exc)
    return removed
