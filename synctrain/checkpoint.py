"""Checkpoint files: written atomically, checksummed, loaded without unpickling code.

A checkpoint is one file ``ckpt-<step>-g<generation>.pt`` in the job directory holding a plain
document (tensors, numbers, strings, lists, tuples, dicts): the step, each prepared model's
and optimizer's ``state_dict``, the objects registered with ``synctrain.register_state``, the
RNG states, the data loaders' positions, the number of reports made so far, and the
strategy's own state (the parameter-server shards in async mode).

The file format (:func:`encode`): the magic ``STCKPT\\0\\2``, the header's length (8 bytes,
little-endian), the header -- the document as msgpack, each tensor replaced by a reference
(dtype, shape, offset, length) and each tuple tagged as one -- then every tensor's raw bytes,
each at a 64-byte aligned offset. Reading it back parses msgpack and makes tensors of a fixed
list of dtypes over the file's bytes (views of one buffer, not copies): nothing in a checkpoint
file can run code. It replaced ``torch.save`` (format 1), whose pickler held the writer thread
in Python -- under the GIL the training loop needs between its kernels -- for most of a
checkpoint's encoding: for the digits MLP 0.35-0.38 ms against 0.08-0.09 ms here, and a
restore's decode 0.9 ms against 0.07 ms (25M parameters: 226 -> 94 ms and 214 -> 0.09 ms;
``benchmarks/checkpoint_cost.py``). Numpy arrays and scalars of plain dtypes (a registered
object's state may hold them; ``torch.load(weights_only=True)`` refuses them, so such a
checkpoint could be written but never restored) are kept as such. A document holding anything
else (a sparse tensor) is still written as format 1, and format-1 files still read
(``torch.load(weights_only=True)``, which refuses anything but plain types).

Durability: the bytes go to ``<name>.tmp``, are fsync'd, renamed over the final name, and
the directory is fsync'd; only then is the reference (path, size, sha256) committed to the
step log. A reader verifies size and sha256 before it trusts a file: a torn or corrupted file
is detected, never loaded (:class:`CheckpointCorruptError`), and recovery falls back to the
previous committed checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import pathlib
import random
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import torch

#: The ``torch.save`` format (still written for documents the container cannot hold).
FORMAT_VERSION = 1
#: The container format's magic: its last byte is the format's number.
MAGIC = b"STCKPT\x00\x02"
_ALIGN = 64
_EXT_TENSOR = 1
_EXT_TUPLE = 2
_EXT_NUMPY = 3
_NUMPY_KINDS = "biufc"  # numpy arrays and scalars of these kinds (bool, ints, floats, complex)
#: The dtypes a container holds, by name (anything else: format 1).
_DTYPES: dict[str, torch.dtype] = {
    str(dt).removeprefix("torch."): dt
    for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64,
               torch.complex128, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
               torch.uint16, torch.uint32, torch.uint64, torch.bool)}
_DTYPE_NAMES = {dt: name for name, dt in _DTYPES.items()}


class CheckpointCorruptError(Exception):
    """A checkpoint file is missing, truncated or does not match its committed checksum."""


class _NotPlain(Exception):
    """The document holds something the container format does not (written as format 1)."""


def encode(doc: dict[str, Any], *, container: bool = True) -> bytes:
    """``doc`` as a checkpoint file's bytes: the container format when it can hold ``doc``
    (``container=False``: always ``torch.save``'s, format 1)."""
    if container:
        try:
            return _encode_container(doc)
        except _NotPlain:
            pass
    buf = io.BytesIO()
    torch.save({"format": FORMAT_VERSION, **doc}, buf)
    return buf.getvalue()


def _encode_container(doc: dict[str, Any]) -> bytes:
    parts: list[Any] = []  # the tensors' bytes and their padding, in file order
    size = 0

    def payload(raw: Any, nbytes: int) -> int:
        nonlocal size
        offset = size
        if nbytes:
            parts.append(raw)
            pad = -nbytes % _ALIGN
            if pad:
                parts.append(bytes(pad))
            size += nbytes + pad
        return offset

    def default(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            t = obj.detach()
            name = _DTYPE_NAMES.get(t.dtype)
            if name is None or t.layout != torch.strided or t.is_quantized:
                raise _NotPlain(f"a {t.dtype} {t.layout} tensor")
            if t.device.type != "cpu":
                t = t.cpu()
            t = t.contiguous()
            nbytes = t.numel() * t.element_size()
            offset = payload(t.reshape(-1).view(torch.uint8).numpy(), nbytes)
            return msgpack.ExtType(_EXT_TENSOR, msgpack.packb([name, list(t.shape), offset, nbytes]))
        if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in _NUMPY_KINDS:
            a = np.asarray(obj)  # a scalar as a 0-d array (ascontiguousarray would make it 1-d)
            if not a.flags.c_contiguous:
                a = np.ascontiguousarray(a)
            offset = payload(a.reshape(-1).view(np.uint8), a.nbytes)
            return msgpack.ExtType(_EXT_NUMPY, msgpack.packb(
                [a.dtype.str, list(a.shape), offset, a.nbytes, isinstance(obj, np.generic)]))
        if isinstance(obj, tuple):
            return msgpack.ExtType(_EXT_TUPLE, _pack(list(obj), default))
        if isinstance(obj, dict):  # an OrderedDict (a state_dict): its order is kept
            return dict(obj)
        if isinstance(obj, list):
            return list(obj)
        raise _NotPlain(type(obj).__name__)

    header = _pack({"format": 2, **doc}, default)
    lead = len(MAGIC) + 8 + len(header)
    return b"".join([MAGIC, len(header).to_bytes(8, "little"), header, bytes(-lead % _ALIGN), *parts])


def _pack(value: Any, default: Callable[[Any], Any]) -> bytes:
    try:  # strict: a subclass of a plain type (a numpy float, an OrderedDict) goes to default
        return msgpack.packb(value, default=default, use_bin_type=True, strict_types=True)
    except (TypeError, ValueError, OverflowError) as exc:  # an int past 64 bits, a key msgpack refuses
        raise _NotPlain(str(exc)) from None


def decode(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    """A checkpoint document from a file's bytes (either format)."""
    if bytes(data[:len(MAGIC)]) == MAGIC:
        return _decode_container(data)
    doc = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_VERSION:
        raise CheckpointCorruptError(f"not a synctrain checkpoint (format {doc.get('format')!r})"
                                     if isinstance(doc, dict) else "not a synctrain checkpoint")
    return doc


def _decode_container(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    # writable (torch.frombuffer warns on a read-only buffer): a file is read into a bytearray
    # (:func:`_read`), other bytes are copied once
    buf = memoryview(data if isinstance(data, bytearray) else bytearray(data))
    if len(buf) < len(MAGIC) + 8:
        raise CheckpointCorruptError("truncated checkpoint header")
    start = len(MAGIC) + 8
    header_len = int.from_bytes(buf[len(MAGIC):start], "little")
    if start + header_len > len(buf):
        raise CheckpointCorruptError(f"checkpoint header of {header_len} bytes past the end of the file")
    base = start + header_len + (-(start + header_len) % _ALIGN)

    def reference(payload: bytes, what: str, fields: int, itemsize: Callable[[Any], int]) -> list:
        """A tensor's or array's ``[dtype, shape, offset, nbytes, ...]``, checked against the file."""
        ref = msgpack.unpackb(payload)
        if not (isinstance(ref, list) and len(ref) == fields and isinstance(ref[1], list)
                and all(isinstance(v, int) and v >= 0 for v in (*ref[1], ref[2], ref[3]))):
            raise CheckpointCorruptError(f"bad {what} reference {ref!r}")
        size = itemsize(ref[0])
        if math.prod(ref[1]) * size != ref[3] or base + ref[2] + ref[3] > len(buf):
            raise CheckpointCorruptError(f"{what} reference {ref!r} does not fit the file")
        return ref

    def tensor_itemsize(name: Any) -> int:
        if not isinstance(name, str) or name not in _DTYPES:
            raise CheckpointCorruptError(f"bad tensor dtype {name!r}")
        return _DTYPES[name].itemsize

    def array_itemsize(code: Any) -> int:
        try:
            dtype = np.dtype(code)
        except TypeError:
            raise CheckpointCorruptError(f"bad array dtype {code!r}") from None
        if dtype.kind not in _NUMPY_KINDS:
            raise CheckpointCorruptError(f"bad array dtype {code!r}")
        return dtype.itemsize

    def tensor(payload: bytes) -> torch.Tensor:
        name, shape, offset, nbytes = reference(payload, "tensor", 4, tensor_itemsize)
        dtype = _DTYPES[name]
        if not nbytes:
            return torch.empty(shape, dtype=dtype)
        # a view of the buffer, not a copy: the document's tensors share it (64-byte aligned)
        raw = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=base + offset)
        return raw.view(dtype).reshape(shape)

    def array(payload: bytes) -> Any:
        code, shape, offset, _, scalar = reference(payload, "array", 5, array_itemsize)
        if scalar and shape:
            raise CheckpointCorruptError(f"a numpy scalar of shape {shape}")
        a = np.frombuffer(buf, dtype=np.dtype(code), count=math.prod(shape), offset=base + offset).reshape(shape)
        return a[()] if scalar else a

    def ext_hook(code: int, payload: bytes) -> Any:
        if code == _EXT_TENSOR:
            return tensor(payload)
        if code == _EXT_NUMPY:
            return array(payload)
        if code == _EXT_TUPLE:
            return tuple(_unpack(payload, ext_hook))
        raise CheckpointCorruptError(f"unknown checkpoint value type {code}")

    doc = _unpack(buf[start:start + header_len], ext_hook)
    if not isinstance(doc, dict) or doc.get("format") != 2:
        raise CheckpointCorruptError("not a synctrain checkpoint")
    return doc


def _unpack(data: Any, ext_hook: Callable[[int, bytes], Any]) -> Any:
    try:
        return msgpack.unpackb(data, ext_hook=ext_hook, raw=False, strict_map_key=False)
    except CheckpointCorruptError:
        raise
    except Exception as exc:  # noqa: BLE001 - any msgpack error is corruption
        raise CheckpointCorruptError(f"checkpoint header cannot be read: {exc}") from None


def checkpoint_name(step: int, generation: int) -> str:
    return f"ckpt-{step:09d}-g{generation}.pt"


def write(directory: pathlib.Path, name: str, data: bytes,
          spare: pathlib.Path | None = None) -> dict[str, Any]:
    """Write ``data`` durably as ``directory/name``; return its reference (path, size, sha256).

    ``spare``: a file in ``directory`` that nothing needs any more (see :func:`make_spare`),
    written over instead of a new file when it is still there. Writing into the pages a file
    already has costs a fraction of allocating new ones: for a 330 KB checkpoint on ext4,
    0.05 ms of CPU instead of 0.9 ms (``os.write`` into a fresh file; the fsync is 0.1 ms
    either way), which a loop that checkpoints several times a second pays on rank 0."""
    path = directory / name
    tmp = directory / (name + ".tmp")
    fd = _open_spare(spare, tmp) if spare is not None else None
    if fd is None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.ftruncate(fd, len(data))  # a longer spare's tail goes
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(directory)
    return {"path": str(path), "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def make_spare(path: str | pathlib.Path) -> pathlib.Path | None:
    """Turn a pruned checkpoint into a spare file for :func:`write` to reuse: renamed to
    ``<name>.spare.tmp`` (never a ``ckpt-*.pt``; a resumed job sweeps ``*.tmp`` files). None
    if it is gone."""
    path = pathlib.Path(path)
    spare = path.with_name(path.name + ".spare.tmp")
    try:
        os.replace(path, spare)
    except FileNotFoundError:
        return None
    return spare


def _open_spare(spare: pathlib.Path, tmp: pathlib.Path) -> int | None:
    """``spare`` renamed to ``tmp`` and opened for writing over, or None (it was swept away)."""
    try:
        os.replace(spare, tmp)
        return os.open(tmp, os.O_WRONLY)
    except OSError:
        return None


def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint document in the file ``path`` (either format; ``synctrain.load_checkpoint``).

    For a checkpoint outside a job: its size and sha256 are in the job's step log
    (:func:`read_verified` checks them). Raises :class:`CheckpointCorruptError` for a file
    that is not a checkpoint or is damaged beyond reading."""
    data = _read(pathlib.Path(path))
    try:
        return decode(data)
    except CheckpointCorruptError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decode failure is corruption
        raise CheckpointCorruptError(f"checkpoint {path} cannot be decoded: {exc}") from None


def _read(path: pathlib.Path) -> bytearray:
    """A file's bytes, read into a bytearray (the container's tensors are views of it)."""
    try:
        with open(path, "rb") as f:
            data = bytearray(os.fstat(f.fileno()).st_size)
            got = f.readinto(data)
    except OSError as exc:
        raise CheckpointCorruptError(f"checkpoint {path} cannot be read: {exc}") from None
    del data[got:]  # shorter than its size said: a torn file, caught by the size check
    return data


def read_verified(ref: dict[str, Any]) -> dict[str, Any]:
    """Load the checkpoint ``ref`` points to, after checking its size and sha256."""
    path = pathlib.Path(ref["path"])
    data = _read(path)
    if len(data) != ref["size"] or hashlib.sha256(data).hexdigest() != ref["sha256"]:
        raise CheckpointCorruptError(
            f"checkpoint {path} does not match its committed checksum ({len(data)} bytes, "
            f"{ref['size']} expected): it is torn or corrupted")
    try:
        return decode(data)
    except Exception as exc:  # noqa: BLE001 - any decode failure is corruption
        raise CheckpointCorruptError(f"checkpoint {path} cannot be decoded: {exc}") from None


def remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def fsync_dir(directory: pathlib.Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- RNG states
def capture_rng() -> dict[str, Any]:
    """Every RNG a training loop may draw from, as checkpointable values."""
    np_state: tuple[Any, ...] = tuple(np.random.get_state())
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": _py_state_to_list(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(_py_state_from_list(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state_to_list(st: tuple) -> list:
    """Python's Mersenne Twister state (625 ints) as one int64 tensor: torch.save pickles a
    list of ints one object at a time through its persistent-id hook, which made it 0.3 ms of
    a 1.3 ms checkpoint encode (the writer thread's, under the GIL the loop needs)."""
    version, internal, gauss = st
    return [version, torch.from_numpy(np.asarray(internal, dtype=np.int64)), gauss]


def _py_state_from_list(st: list) -> tuple:
    version, internal, gauss = st
    if isinstance(internal, torch.Tensor):  # a list in checkpoints written before 2026-12-03
        internal = internal.tolist()
    return (version, tuple(int(v) for v in internal), gauss)
