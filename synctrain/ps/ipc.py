"""The doorbell of a same-machine push: a Unix socket between a worker and a shard.

Theory of operation. With the bytes in a shared-memory channel (:mod:`synctrain.ps.shm`),
what is left of a push is a few numbers each way: which clock, whether to send parameters,
and the clocks and version in the answer. A Ray actor call for that costs about 1.5 ms of
CPU on a 2-core machine (measured, an empty call); the same exchange over a Unix socket
costs 0.03-0.05 ms. So a shard on the worker's machine also listens on a Unix socket in the
abstract namespace (no file, nothing to clean up: the name dies with the process), on its
own event loop, which is the actor's: a push served here is as atomic with respect to
everything else the shard does as one arriving through Ray.

Frames are a 4-byte little-endian length and a msgpack map, at most :data:`MAX_FRAME_BYTES`;
nothing is unpickled. A connection is authenticated by its first frame, ``hello``, which
names the job and the worker and carries the worker's channel token (128 random bits that
only the worker and the shard know, compared in constant time); anything else closes it.
An abstract socket has no file permissions and its name is listed in ``/proc/net/unix`` for
every local user, so before the hello the shard checks the peer's uid (``SO_PEERCRED``,
:func:`peer_uid`), bounds how many connections it serves, and reads a hello of at most
:data:`MAX_HELLO_BYTES` within a short deadline: a stranger can make it hold neither memory
nor a connection slot for long.

Requests on one connection are served in order; a worker has at most one push in flight per
shard. A push is answered; a snapshot request (``{"snap": tag}``, between pushes) is not.
The snapshot itself is fetched on a second connection, the worker's step-log writer's
(``{"take": tag}``): the answer is one frame of at most :data:`MAX_SNAPSHOT_BYTES` holding
the shard's state as a tree of maps, lists and tensors (:func:`pack_tree`: a tensor is its
dtype, shape and raw bytes, never a pickle), instead of a Ray call that costs ~1.5 ms of CPU
at each end.
An error on the shard comes back as a frame naming one of the parameter server's error
classes and its message, and is raised as that class on the worker. A shard that dies
closes the socket: the worker's read sees end of file at once and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import sys
from collections import OrderedDict
from typing import Any

import msgpack
import numpy as np
import torch

from synctrain.ps import errors as ps_errors
from synctrain.ps.errors import ParameterServerError, StalenessTimeoutError

#: Requests and answers are a few numbers (and a learning rate per param group).
MAX_FRAME_BYTES = 1 << 20
#: A snapshot answer (``{"take": tag}``) at most: a shard whose state is larger is fetched
#: through Ray's object store, which suits large arrays better than one socket frame.
MAX_SNAPSHOT_BYTES = 64 << 20
#: A hello is the job id, a worker index and a 16-byte token: a few dozen bytes.
MAX_HELLO_BYTES = 512
_LENGTH = struct.Struct("<I")
_PEER_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid
#: Error classes a shard may name in an error frame; anything else arrives as the base class.
ERRORS: dict[str, type[ParameterServerError]] = {
    cls.__name__: cls for cls in (
        ps_errors.ParameterServerError, ps_errors.StaleJobError, ps_errors.StalenessTimeoutError,
        ps_errors.NonFiniteGradientError, ps_errors.GradientShapeError)
}


def available() -> bool:
    """Abstract Unix sockets are a Linux feature."""
    return sys.platform == "linux"


def encode(message: dict[str, Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME_BYTES:
        raise ParameterServerError(f"a parameter-server frame of {len(body)} bytes is over the "
                                   f"{MAX_FRAME_BYTES}-byte limit")
    return _LENGTH.pack(len(body)) + body


def decode(body: bytes) -> dict[str, Any]:
    message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    if not isinstance(message, dict):
        raise ParameterServerError("a parameter-server frame must be a map")
    return message


# ---- trees of tensors (a snapshot's answer) -----------------------------------------------
_EXT_TENSOR, _EXT_TUPLE, _EXT_ORDERED = 1, 2, 3
_HEADER = struct.Struct("<I")


def pack_tree(obj: Any) -> bytes:
    """``obj`` (nested dicts, lists, tuples, tensors, numbers, strings, bytes, None) as msgpack;
    tensors as ``[dtype, shape]`` and their raw bytes, tuples and OrderedDicts kept as such, so
    :func:`unpack_tree` gives back what a pickle would. Anything else is a TypeError."""
    return msgpack.packb(obj, default=_pack_ext, use_bin_type=True, strict_types=True)


def unpack_tree(data: bytes) -> Any:
    """The inverse of :func:`pack_tree` (tensors own their memory; nothing is unpickled)."""
    return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_unpack_ext)


def _pack_ext(obj: Any) -> msgpack.ExtType:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        head = msgpack.packb([str(t.dtype).removeprefix("torch."), list(t.shape)])
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return msgpack.ExtType(_EXT_TENSOR, _HEADER.pack(len(head)) + head + raw)
    if isinstance(obj, OrderedDict):
        return msgpack.ExtType(_EXT_ORDERED, pack_tree(list(obj.items())))
    if isinstance(obj, tuple):
        return msgpack.ExtType(_EXT_TUPLE, pack_tree(list(obj)))
    if isinstance(obj, dict):  # another dict subclass: its items, in order (an OrderedDict back)
        return msgpack.ExtType(_EXT_ORDERED, pack_tree(list(obj.items())))
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} cannot travel in a snapshot frame")


def _unpack_ext(code: int, data: bytes) -> Any:
    if code == _EXT_TENSOR:
        (n,) = _HEADER.unpack_from(data)
        name, shape = msgpack.unpackb(data[_HEADER.size:_HEADER.size + n])
        dtype = getattr(torch, str(name), None)
        if not isinstance(dtype, torch.dtype):
            raise ParameterServerError(f"a snapshot frame names no torch dtype {name!r}")
        raw = data[_HEADER.size + n:]
        if not raw:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)
    if code == _EXT_TUPLE:
        return tuple(unpack_tree(data))
    if code == _EXT_ORDERED:
        return OrderedDict((k, v) for k, v in unpack_tree(data))
    raise ParameterServerError(f"a snapshot frame holds an unknown extension type {code}")


class SnapshotViaRayError(ParameterServerError):
    """A snapshot the socket does not carry (over :data:`MAX_SNAPSHOT_BYTES`, or holding a type
    :func:`pack_tree` refuses): the shard keeps it, to be fetched through Ray."""


def snapshot_frame(state: Any) -> bytes:
    """The answer to ``{"take": tag}``: ``{"snapshot": state}`` as one frame."""
    try:
        body = pack_tree({"snapshot": state})
    except TypeError as exc:
        raise SnapshotViaRayError(f"the snapshot does not travel on the socket: {exc}") from None
    if len(body) > MAX_SNAPSHOT_BYTES:
        raise SnapshotViaRayError(f"a snapshot of {len(body)} bytes is over the {MAX_SNAPSHOT_BYTES}-byte "
                                   "limit of a socket frame")
    return _LENGTH.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader, max_bytes: int = MAX_FRAME_BYTES) -> dict[str, Any] | None:
    """The next frame, or None at end of file. A frame over ``max_bytes`` is an error, raised
    before any of its body is read."""
    try:
        (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    except asyncio.IncompleteReadError:
        return None
    if length > max_bytes:
        raise ParameterServerError(f"a frame of {length} bytes announced; the limit is {max_bytes}")
    try:
        return decode(await reader.readexactly(length))
    except asyncio.IncompleteReadError:
        return None


def peer_uid(sock: Any) -> int | None:
    """The uid of the process at the other end of a connected Unix socket (None: unknown)."""
    try:
        credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEER_CREDENTIALS.size)
    except (OSError, AttributeError):
        return None
    _pid, uid, _gid = _PEER_CREDENTIALS.unpack(credentials)
    return int(uid)


def error_frame(exc: BaseException) -> dict[str, Any]:
    """The frame that carries a shard's error to the worker."""
    if isinstance(exc, ParameterServerError):
        name = type(exc).__name__ if type(exc).__name__ in ERRORS else "ParameterServerError"
        return {"error": name, "message": str(exc)}
    return {"error": "ParameterServerError", "message": f"{type(exc).__name__} on the shard: {exc}"}


class ShardLink:
    """The worker's end: a connected, authenticated socket to one shard."""

    def __init__(self, shard_index: int, timeout_s: float) -> None:
        self.shard_index = shard_index
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._buffer = bytearray()

    @classmethod
    def connect(cls, shard_index: int, address: str, job_id: str, worker: int, token: bytes,
                timeout_s: float) -> ShardLink:
        link = cls(shard_index, timeout_s)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout_s)
        try:
            sock.connect(address)
        except OSError:
            sock.close()
            raise
        link._sock = sock
        try:
            link.send({"hello": job_id, "worker": worker, "token": token})
            link.receive()  # the shard's "ok" (or its refusal, raised)
        except BaseException:
            link.close()
            raise
        return link

    def send(self, message: dict[str, Any]) -> None:
        if self._sock is None:
            raise ParameterServerError(f"the link to shard {self.shard_index} was closed after an error")
        try:
            self._sock.sendall(encode(message))
        except OSError as exc:
            self.close()
            raise ParameterServerError(f"shard {self.shard_index} cannot be reached ({exc}); "
                                       "it may have died") from None

    def receive(self) -> dict[str, Any]:
        """The next answer; an error frame is raised as the error the shard named."""
        return self._receive(MAX_FRAME_BYTES, decode)

    def take_snapshot(self, tag: str) -> Any:
        """The snapshot ``tag`` (asked for with ``{"snap": tag}`` on the loop's connection)."""
        self.send({"take": tag, "wait": max(self.timeout_s - 1.0, 0.0)})  # the shard's error comes first
        return self._receive(max(MAX_SNAPSHOT_BYTES, MAX_FRAME_BYTES), unpack_tree)["snapshot"]

    def _receive(self, max_bytes: int, decoder: Any) -> dict[str, Any]:
        header = self._read(_LENGTH.size)
        (length,) = _LENGTH.unpack(header)
        if length > max_bytes:
            self.close()
            raise ParameterServerError(f"shard {self.shard_index} announced a {length}-byte frame")
        try:
            message = decoder(self._read(length))
        except (ValueError, TypeError) as exc:
            self.close()
            raise ParameterServerError(f"shard {self.shard_index} sent a malformed frame ({exc})") from None
        if not isinstance(message, dict):
            self.close()
            raise ParameterServerError(f"shard {self.shard_index} answered with something not a map")
        if "error" in message:
            cls = SnapshotViaRayError if message.get("via_ray") else ERRORS.get(str(message["error"]),
                                                                               ParameterServerError)
            raise cls(str(message.get("message", "")))
        return message

    def _read(self, n: int) -> bytes:
        while len(self._buffer) < n:
            if self._sock is None:
                raise ParameterServerError(f"the link to shard {self.shard_index} was closed after an error")
            try:
                chunk = self._sock.recv(max(65536, n - len(self._buffer)))
            except TimeoutError:
                self.close()
                raise StalenessTimeoutError(
                    f"no answer from parameter-server shard {self.shard_index} after {self.timeout_s:g} s; "
                    "it may have died or be overloaded") from None
            except OSError as exc:
                self.close()
                raise ParameterServerError(f"shard {self.shard_index} dropped the connection ({exc}); "
                                           "it may have died") from None
            if not chunk:
                self.close()
                raise ParameterServerError(f"shard {self.shard_index} closed the connection in the middle "
                                           "of a push; it has died or was stopped")
            self._buffer += chunk
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
