"""A warm launcher for coordinator node processes: fork a node from a process that has
already imported the server, instead of starting a fresh interpreter.

Theory of operation
-------------------
A cold ``python -m coordinator.cli serve`` spends most of a restart importing: on a 2-core
machine the interpreter and the server's imports take ~0.4 s, while reading the WAL, binding,
reconnecting and catching up take well under 0.1 s. A supervisor that restarts nodes
(:class:`~coordinator.cluster.LocalCluster`, ``coordinator local``) therefore starts one
*launcher* process up front: it imports :mod:`coordinator.cli` and :mod:`coordinator.server`
and then waits, single-threaded and with no event loop, for requests on a pipe. For each it
forks a child that becomes an ordinary node: a session of its own, stdin from ``/dev/null``,
stdout and stderr appended to the node's log, fresh random state, and ``cli.main(argv)`` run
from the top (it opens the data directory, reads the WAL, binds, connects). What a fork skips
is only the import; everything a restart must redo is redone. (This is multiprocessing's
forkserver, or gunicorn's preload, for one kind of child.)

The launcher reaps its children and reports each exit status, so the supervisor's handle
(:class:`LaunchedProcess`) answers ``poll``/``wait``/``kill`` like a ``subprocess.Popen``.
Messages are JSON lines on the launcher's stdin/stdout (a private pipe, nothing from a
network). The launcher exits when its stdin closes, i.e. when the supervisor goes; the nodes it
started keep running, as nodes started with ``Popen(start_new_session=True)`` do.
If the launcher cannot start or dies, the supervisor falls back to cold starts. A child gets
the launcher's environment, i.e. the supervisor's as it was when the launcher started, not as
it is at the restart.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any

#: Seconds the launcher may take to import and say it is ready.
READY_TIMEOUT_S = 60.0
#: Seconds a launch request may take before the supervisor gives up on the launcher.
LAUNCH_TIMEOUT_S = 10.0
#: What a launched child runs unless told otherwise.
DEFAULT_MAIN = "coordinator.cli:main"
#: Exit status reported for a child whose launcher died before the child did.
UNKNOWN_EXIT = 255


class LauncherGone(RuntimeError):
    """The launcher process is not there (it failed to start, exited or was killed)."""


class LaunchedProcess:
    """A node process forked by a :class:`Launcher`: the part of ``subprocess.Popen`` that a
    supervisor uses (``pid``, ``returncode``, ``poll``, ``wait``, signals). It is not this
    process's child: the exit status comes from the launcher, which reaps it."""

    def __init__(self, pid: int, args: list[str], launcher: Launcher) -> None:
        self.pid, self.args = pid, args
        self.returncode: int | None = None
        self._launcher = launcher
        self._exited = threading.Event()

    def _set_exit(self, code: int) -> None:
        self.returncode = code
        self._exited.set()

    def poll(self) -> int | None:
        if not self._exited.is_set() and not self._launcher.alive and not _pid_alive(self.pid):
            self._set_exit(UNKNOWN_EXIT)  # nobody is left to report it
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._exited.wait(0.05):
            if self.poll() is not None:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def open_node_log(path: str | os.PathLike[str]) -> int:
    """A node's log file for appending (created 0600; a symlink planted there is refused):
    the one place both a cold and a forked start open it."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by whoever inherited it) has not run since it exited.
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    return True


class Launcher:
    """The supervisor's side: start the launcher process, ask it to fork nodes."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "coordinator.launcher"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=None, env=env, start_new_session=True)
        self._lock = threading.Lock()
        self._next_id = 0
        self._replies: dict[int, dict] = {}
        self._replied = threading.Condition()
        self._children: dict[int, LaunchedProcess] = {}
        self._early_exits: dict[int, int] = {}
        self._ready = threading.Event()
        self.alive = True
        self._reader = threading.Thread(target=self._read, daemon=True, name="launcher-reader")
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        if not self._ready.wait(timeout_s) or not self.alive:
            self.close()
            raise LauncherGone(f"the node launcher did not start within {timeout_s:.0f} s "
                               f"(exit status {self._proc.poll()})")

    def launch(self, argv: list[str], log_path: str, *, main: str = DEFAULT_MAIN,
               timeout_s: float = LAUNCH_TIMEOUT_S) -> LaunchedProcess:
        """Fork a child running ``main(argv)`` (``"module:function"``; by default the
        coordinator CLI, so ``argv`` is what follows ``python -m coordinator.cli``), its
        output appended to ``log_path``; return its handle once it exists."""
        self.wait_ready()
        with self._lock:
            self._next_id += 1
            req = self._next_id
            self._send({"id": req, "argv": argv, "log": log_path, "main": main})
        deadline = time.monotonic() + timeout_s
        with self._replied:
            while req not in self._replies:
                left = deadline - time.monotonic()
                if not self.alive or left <= 0:
                    raise LauncherGone("the node launcher did not answer a launch request")
                self._replied.wait(min(left, 0.1))
            reply = self._replies.pop(req)
            if "error" in reply:
                raise OSError(f"the node launcher could not start the node: {reply['error']}")
            handle = LaunchedProcess(reply["pid"], [sys.executable, "-m", "coordinator.cli", *argv], self)
            self._children[handle.pid] = handle
            if handle.pid in self._early_exits:  # it exited before we saw its pid
                handle._set_exit(self._early_exits.pop(handle.pid))
        return handle

    def close(self) -> None:
        """Let the launcher go (closing its stdin); the nodes it started keep running."""
        with contextlib.suppress(OSError, ValueError):
            assert self._proc.stdin is not None
            self._proc.stdin.close()
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def _send(self, msg: dict) -> None:
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(json.dumps(msg).encode() + b"\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            self.alive = False
            raise LauncherGone(f"the node launcher is gone ({exc})") from None

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            msg = json.loads(line)
            if msg.get("ready"):
                self._ready.set()
            elif "exited" in msg:
                with self._replied:
                    handle = self._children.pop(msg["exited"], None)
                    if handle is None:
                        self._early_exits[msg["exited"]] = msg["code"]
                    else:
                        handle._set_exit(msg["code"])
            else:
                with self._replied:
                    self._replies[msg["id"]] = msg
                    self._replied.notify_all()
        self.alive = False
        self._ready.set()
        with self._replied:
            self._replied.notify_all()


# ------------------------------------------------------------------ the launcher process
def _exit_code(status: int) -> int:
    """A wait status as ``Popen.returncode`` gives it (minus the signal for a kill)."""
    return os.waitstatus_to_exitcode(status)


def _run_child(main: str, argv: list[str], log_path: str, fds_to_close: list[int]) -> None:
    """In the forked child: become a node process as a cold start would, then exit."""
    code = 1
    try:
        os.setsid()
        for fd in fds_to_close:
            with contextlib.suppress(OSError):
                os.close(fd)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as the interpreter sets it at start
        signal.signal(signal.SIGINT, signal.default_int_handler)
        null = os.open(os.devnull, os.O_RDONLY)
        log = open_node_log(log_path)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(null)
        os.close(log)
        random.seed()  # the launcher's state is every sibling's: draw afresh
        module, function = main.split(":")
        sys.argv = [module, *argv]
        code = getattr(importlib.import_module(module), function)(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported in the node's log, then a failed exit
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _serve_launches() -> None:
    """The launcher process: import the server, then fork nodes on request until stdin closes."""
    # Imported once here, for every child; the last two are what a node imports as it starts.
    import concurrent.futures.thread  # noqa: F401
    import tempfile  # noqa: F401

    from coordinator import cli, server  # noqa: F401

    cli.parser()  # built once, here, for every child

    requests = os.dup(0)
    replies = os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(2, 1)  # a stray print goes to the launcher's stderr, not into the protocol
    os.close(null)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we go

    def reply(msg: dict) -> None:
        os.write(replies, json.dumps(msg).encode() + b"\n")

    reply({"ready": True, "pid": os.getpid()})
    pending = b""
    while True:
        readable, _, _ = select.select([requests, wake_r], [], [])  # PEP 475: no EINTR
        if wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 4096)
        while True:  # reap every child that has exited
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            reply({"exited": pid, "code": _exit_code(status)})
        if requests not in readable:
            continue
        chunk = os.read(requests, 65536)
        if not chunk:
            return  # the supervisor has gone
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            req: dict[str, Any] = json.loads(line)
            try:
                pid = os.fork()
            except OSError as exc:
                reply({"id": req["id"], "error": str(exc)})
                continue
            if pid == 0:
                _run_child(req.get("main", DEFAULT_MAIN), req["argv"], req["log"],
                           [requests, replies, wake_r, wake_w])
            reply({"id": req["id"], "pid": pid})


if __name__ == "__main__":
    _serve_launches()
