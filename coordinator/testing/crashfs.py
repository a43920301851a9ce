"""Crash images of a directory tree, for checking a program's crash consistency.

Theory of operation
-------------------
The idea is ALICE's (Pillai et al., "All File Systems Are Not Created Equal", OSDI 2014):
record the file-system calls a program makes, and from them build every state a power loss
at any point could leave on disk; then run the program's recovery on each such *crash
image* and check what it recovers.

:class:`CrashRecorder` stands in for the ``os`` module of the code under test (see
:meth:`CrashRecorder.recording`): every call reaches the real file system, so the program
runs normally, and every call that changes files or directories is also applied to a model
of one directory tree that keeps two states per file and directory:

* *current* -- what the program sees (the page cache);
* *durable* -- a file's contents and size as of its last ``fsync``/``fdatasync``, a
  directory's entries as of its last ``fsync``. Everything since is *pending*.

After each recorded call (an *event*) the recorder freezes the model (cheap: immutable
bytes and tuples). :func:`crash_image` turns a frozen model into one possible disk:

* data: each pending write is cut into pages, and each page reaches the disk or not on its
  own, so a later page may persist without an earlier one (any page order);
* a file's size is its size after *some prefix* of its pending size changes (``ftruncate``,
  ``posix_fallocate``, extending writes): metadata is journaled in order. Bytes inside that
  size that no persisted write covers hold what was durable there before, or zeros past the
  durable size; a persisted shrink zeros what lay beyond it;
* directories: each pending create, mkdir, rename or unlink persists or not on its own (a
  rename as a whole, being atomic); a file's own fsync does not persist its name.

``fsync`` and ``fdatasync`` are modelled the same way (both persist the size a read needs),
and are not passed to the real disk: the model, not the disk, decides what is durable, and
the recording runs fast. A smaller model page than the real 4 KiB only adds images (every
4 KiB-page image is also a 512-byte-page one), so tests may use small pages to tear small
files.

The model refuses what it does not cover: an ``os`` call that changes the file system but is
not modelled raises, and so do ``pathlib`` mutators (``Path.unlink`` and friends bypass the
stand-in), so code under test cannot silently escape the recording.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

__all__ = ["CrashPoint", "CrashRecorder", "ImageSpec", "crash_image", "image_key", "write_image"]

# a crash image: relative path -> file contents, or None for a directory
ImageSpec = dict[str, bytes | None]

_ROOT_ID = 0  # the recorder numbers the root directory first
_MAX_EVENTS = 100_000  # a runaway recording fails loudly instead of exhausting memory
_UNMODELLED = frozenset({
    "truncate", "link", "symlink", "rmdir", "removedirs", "makedirs", "renames", "writev",
    "pwritev", "sendfile", "copy_file_range", "fchmod", "chmod", "lchmod", "utime", "mkfifo",
    "mknod", "fchown", "chown", "lchown", "splice"})
_PATH_MUTATORS = ("unlink", "mkdir", "rmdir", "rename", "replace", "touch", "write_bytes",
                  "write_text", "symlink_to", "hardlink_to", "chmod")


@dataclass(eq=False, slots=True)
class _File:
    id: int
    durable: bytes = b""
    current: bytearray = field(default_factory=bytearray)
    # ("write", offset, data) | ("size", new size, b"") | ("shrink", new size, b"")
    pending: list[tuple[str, int, bytes]] = field(default_factory=list)


@dataclass(eq=False, slots=True)
class _Dir:
    id: int
    durable: dict[str, _File | _Dir] = field(default_factory=dict)
    current: dict[str, _File | _Dir] = field(default_factory=dict)
    # ("link", name, node) | ("unlink", name, None) | ("rename", "src\0dst", node)
    pending: list[tuple[str, str, Any]] = field(default_factory=list)


# frozen: node id -> ("f", durable bytes, pending ops) | ("d", durable entries, pending ops),
# where entries and ops name other nodes by id
Frozen = dict[int, tuple[str, Any, tuple[Any, ...]]]


@dataclass(frozen=True, slots=True)
class CrashPoint:
    """The model right after event ``index`` (``what``), recorded while ``tag`` was set."""

    index: int
    what: str
    tag: Any
    frozen: Frozen


class CrashRecorder:
    """Records the file-system calls made under ``root`` and the crash point after each.

    ``root`` and whatever it holds when the recorder is made count as durable. ``tag`` is
    the caller's label for what the program is doing (e.g. the operation in flight); each
    crash point keeps the tag it was recorded under."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(root)
        self.tag: Any = None
        self.points: list[CrashPoint] = []
        self._next_id = 0
        self._fds: dict[int, tuple[_File | _Dir, int]] = {}  # fd -> (node, file position)
        self._root = self._load(self.root)

    # ---- the model ----------------------------------------------------------------------

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def _load(self, path: str) -> _File | _Dir:
        if os.path.isdir(path):
            d = _Dir(self._new_id())
            for name in sorted(os.listdir(path)):
                d.current[name] = self._load(os.path.join(path, name))
            d.durable = dict(d.current)
            return d
        data = pathlib.Path(path).read_bytes()
        return _File(self._new_id(), durable=data, current=bytearray(data))

    def _parent(self, path: str | os.PathLike[str]) -> tuple[_Dir, str]:
        full = os.path.abspath(os.fspath(path))
        rel = os.path.relpath(full, self.root)
        if rel == "." or rel.startswith(".."):
            raise AssertionError(f"the code under test changed {full}, outside the recorded "
                                 f"tree {self.root}")
        node: _File | _Dir = self._root
        *dirs, name = rel.split(os.sep)
        for part in dirs:
            assert isinstance(node, _Dir), f"{part} in {full} is not a directory"
            node = node.current[part]
        assert isinstance(node, _Dir), f"the parent of {full} is not a directory"
        return node, name

    def _lookup(self, path: str | os.PathLike[str]) -> _File | _Dir | None:
        full = os.path.abspath(os.fspath(path))
        if full == self.root:
            return self._root
        parent, name = self._parent(full)
        return parent.current.get(name)

    def _event(self, what: str) -> None:
        if len(self.points) >= _MAX_EVENTS:
            raise AssertionError(f"more than {_MAX_EVENTS} recorded events: a runaway "
                                 "workload (make it smaller)")
        self.points.append(CrashPoint(len(self.points), what, self.tag, self._freeze()))

    def _freeze(self) -> Frozen:
        out: Frozen = {}
        todo: list[_File | _Dir] = [self._root]
        while todo:
            node = todo.pop()
            if node.id in out:
                continue
            if isinstance(node, _File):
                out[node.id] = ("f", node.durable, tuple(node.pending))
                continue
            kids = list(node.durable.values()) + [op[2] for op in node.pending if op[2]]
            todo += kids
            out[node.id] = ("d", tuple((n, c.id) for n, c in node.durable.items()),
                            tuple((k, n, c.id if c else None) for k, n, c in node.pending))
        return out

    def _file_op(self, f: _File, op: str, offset: int, data: bytes = b"") -> None:
        cur = f.current
        if op == "write":
            if offset > len(cur):
                cur.extend(bytes(offset - len(cur)))
            cur[offset:offset + len(data)] = data
        elif op == "size":
            if offset > len(cur):
                cur.extend(bytes(offset - len(cur)))
        else:  # shrink (ftruncate, which may also grow)
            del cur[offset:]
            cur.extend(bytes(offset - len(cur)))
        f.pending.append((op, offset, data))

    def check_mirrors_disk(self) -> None:
        """Assert the model's current state is what the real tree holds (a self-check)."""
        def walk(node: _File | _Dir, path: str) -> None:
            if isinstance(node, _File):
                assert pathlib.Path(path).read_bytes() == bytes(node.current), path
                return
            assert sorted(os.listdir(path)) == sorted(node.current), path
            for name, child in node.current.items():
                walk(child, os.path.join(path, name))
        walk(self._root, self.root)

    # ---- the os stand-in ----------------------------------------------------------------

    @contextlib.contextmanager
    def recording(self, module: ModuleType) -> Iterator[CrashRecorder]:
        """Replace ``module.os`` with this recorder (and refuse ``pathlib`` mutators)."""
        real_os = module.os
        saved = {name: getattr(pathlib.Path, name) for name in _PATH_MUTATORS}

        def refuse(name: str) -> Any:
            def refused(*args: Any, **kwargs: Any) -> Any:
                raise AssertionError(f"Path.{name} bypasses the crash recorder: use os.* in "
                                     "the code under test")
            return refused

        module.os = self  # type: ignore[attr-defined]
        for name in _PATH_MUTATORS:
            setattr(pathlib.Path, name, refuse(name))
        try:
            yield self
        finally:
            module.os = real_os  # type: ignore[attr-defined]
            for name, fn in saved.items():
                setattr(pathlib.Path, name, fn)

    def __getattr__(self, name: str) -> Any:
        if name in _UNMODELLED:
            raise AssertionError(f"os.{name} changes the file system but the crash model "
                                 "does not cover it: add it to coordinator/testing/crashfs.py")
        return getattr(os, name)

    def open(self, path: str | os.PathLike[str], flags: int, mode: int = 0o777) -> int:
        node = self._lookup(path)
        fd = os.open(path, flags, mode)
        if node is None:
            assert flags & os.O_CREAT
            parent, name = self._parent(path)
            node = _File(self._new_id())
            parent.current[name] = node
            parent.pending.append(("link", name, node))
            self._fds[fd] = (node, 0)
            self._event(f"create {os.path.relpath(path, self.root)}")
            return fd
        self._fds[fd] = (node, 0)
        if flags & os.O_TRUNC and isinstance(node, _File) and node.current:
            self._file_op(node, "shrink", 0)
            self._event(f"truncate {os.path.relpath(path, self.root)} on open")
        return fd

    def close(self, fd: int) -> None:
        os.close(fd)
        self._fds.pop(fd, None)

    def _file(self, fd: int) -> _File:
        node = self._fds[fd][0]
        assert isinstance(node, _File), "a data call on a directory descriptor"
        return node

    def write(self, fd: int, data: bytes | memoryview) -> int:
        n = os.write(fd, data)
        node, pos = self._fds[fd]
        assert isinstance(node, _File)
        self._file_op(node, "write", pos, bytes(data[:n]))
        self._fds[fd] = (node, pos + n)
        self._event(f"write {n} bytes at {pos}")
        return n

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        n = os.pwrite(fd, data, offset)
        self._file_op(self._file(fd), "write", offset, bytes(data[:n]))
        self._event(f"pwrite {n} bytes at {offset}")
        return n

    def ftruncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)
        self._file_op(self._file(fd), "shrink", length)
        self._event(f"ftruncate to {length}")

    def posix_fallocate(self, fd: int, offset: int, length: int) -> None:
        os.posix_fallocate(fd, offset, length)
        f = self._file(fd)
        self._file_op(f, "size", max(len(f.current), offset + length))
        self._event(f"fallocate to {offset + length}")

    def fsync(self, fd: int) -> None:  # not passed on: the model decides what is durable
        self._sync(fd, "fsync")

    def fdatasync(self, fd: int) -> None:
        self._sync(fd, "fdatasync")

    def _sync(self, fd: int, what: str) -> None:
        node = self._fds[fd][0]
        if isinstance(node, _File):
            node.durable, node.pending = bytes(node.current), []
        else:
            node.durable, node.pending = dict(node.current), []
            what += " (directory)"
        self._event(what)

    def mkdir(self, path: str | os.PathLike[str], mode: int = 0o777) -> None:
        os.mkdir(path, mode)
        parent, name = self._parent(path)
        node = _Dir(self._new_id())
        parent.current[name] = node
        parent.pending.append(("link", name, node))
        self._event(f"mkdir {os.path.relpath(path, self.root)}")

    def unlink(self, path: str | os.PathLike[str]) -> None:
        os.unlink(path)
        parent, name = self._parent(path)
        del parent.current[name]
        parent.pending.append(("unlink", name, None))
        self._event(f"unlink {os.path.relpath(path, self.root)}")

    remove = unlink

    def replace(self, src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        os.replace(src, dst)
        sp, sname = self._parent(src)
        dp, dname = self._parent(dst)
        assert sp is dp, "renames across directories are not modelled"
        node = sp.current.pop(sname)
        sp.current[dname] = node
        sp.pending.append(("rename", f"{sname}\0{dname}", node))
        self._event(f"rename {sname} -> {dname}")

    rename = replace


# ---- crash images ---------------------------------------------------------------------


def _file_image(durable: bytes, pending: tuple[tuple[str, int, bytes], ...],
                keep: Any, size_prefix: int, page_bytes: int) -> bytes:
    """``durable`` plus the pending page writes ``keep(page)`` says persisted, cut to the
    size after the first ``size_prefix`` pending operations."""
    size = len(durable)
    sizes = [size]
    for op, arg, data in pending:
        size = max(size, arg + len(data)) if op == "write" else (
            max(size, arg) if op == "size" else arg)
        sizes.append(size)
    buf = bytearray(durable)
    buf.extend(bytes(max(sizes) - len(buf)))
    for k, (op, arg, data) in enumerate(pending):
        if op == "shrink" and k < size_prefix:  # a persisted shrink: later growth reads zeros
            buf[arg:] = bytes(len(buf) - arg)
        if op != "write":
            continue
        pos, end = arg, arg + len(data)
        while pos < end:
            stop = min(end, (pos // page_bytes + 1) * page_bytes)
            if keep(("page", pos // page_bytes)):
                buf[pos:stop] = data[pos - arg:stop - arg]
            pos = stop
    return bytes(buf[:sizes[size_prefix]])


def crash_image(frozen: Frozen, persist: str, rng: random.Random | None = None,
                page_bytes: int = 4096) -> ImageSpec:
    """One disk a crash could leave: ``persist`` is "none" (only what is durable), "all"
    (every pending operation reached the disk) or "random" (each pending page and directory
    operation with one probability drawn from ``rng``, each file's size prefix drawn too)."""
    if persist == "random":
        assert rng is not None
        p = rng.random()

        def keep(_what: object) -> bool:
            return rng.random() < p
    else:
        def keep(_what: object) -> bool:
            return persist == "all"

    spec: ImageSpec = {}

    def build(node_id: int, path: str) -> None:
        kind, durable, pending = frozen[node_id]
        if kind == "f":
            if persist == "random":
                prefix = rng.randint(0, len(pending))  # type: ignore[union-attr]
            else:
                prefix = len(pending) if persist == "all" else 0
            spec[path] = _file_image(durable, pending, keep, prefix, page_bytes)
            return
        spec[path] = None
        entries = dict(durable)
        for op, name, child in pending:
            if not keep(("dir", op, name)):
                continue
            if op == "link":
                entries[name] = child
            elif op == "unlink":
                entries.pop(name, None)
            else:
                src, dst = name.split("\0")
                if entries.get(src) == child:
                    entries[dst] = entries.pop(src)
        for name, child in sorted(entries.items()):
            build(child, f"{path}/{name}" if path else name)

    build(_ROOT_ID, "")
    del spec[""]
    return spec


def image_key(spec: ImageSpec, ignore_contents: tuple[str, ...] = ()) -> bytes:
    """A digest of ``spec`` for deduplication; files named in ``ignore_contents`` (e.g. a
    lock file whose contents nobody reads) count by presence only."""
    h = hashlib.blake2b(digest_size=16)
    for path, data in sorted(spec.items()):
        h.update(path.encode() + b"\0")
        if data is None:
            h.update(b"dir\0")
        elif os.path.basename(path) not in ignore_contents:
            h.update(len(data).to_bytes(8, "big") + hashlib.blake2b(data).digest())
    return h.digest()


def write_image(spec: ImageSpec, dest: str | os.PathLike[str]) -> None:
    """Materialize ``spec`` under ``dest`` (emptied first; directories 0700)."""
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest, mode=0o700)
    for path, data in sorted(spec.items()):
        full = os.path.join(dest, path)
        if data is None:
            os.mkdir(full, 0o700)
        else:
            with open(full, "wb") as f:
                f.write(data)
