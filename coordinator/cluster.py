"""Running whole coordinator clusters: :class:`LocalCluster` (subprocesses) and
:class:`RayCluster` (Ray actors spread over Ray nodes).

Theory of operation
-------------------
``LocalCluster`` starts every node as its own ``coordinator.cli serve`` process (forked from a
warm launcher that has imported the server, :mod:`coordinator.launcher`, so a restart skips the
interpreter's start; ``warm_start=False``: a fresh ``python -m coordinator.cli serve``) on a
loopback port picked up front, all sharing one token file (mode 0600) and each with its own
data directory and log file under ``data_dir`` (mode 0700; log files 0600). A token file
already there is used only if this user owns it and nobody else can read it: a token file
someone else planted in a shared directory would otherwise make the cluster theirs. A node writes ``node-<id>.ready`` once it
serves, which is how ``start``/``restart`` know it is up. Faults are real: ``kill`` is SIGKILL,
``pause``/``resume`` are SIGSTOP/SIGCONT, ``restart`` starts a new process on the same data
directory (so it recovers from its WAL and snapshot), and ``partition`` asks the nodes'
transports to drop every frame between the cut-off node and the rest (an authenticated
``admin_partition`` request; network namespaces need privileges we cannot assume). The nodes
run in sessions of their own; those of a cluster its program never stopped are stopped when
that program exits (an ``atexit`` hook, with a warning), not when it is killed with SIGKILL.

``RayCluster`` hosts each node in a Ray actor: with at least as many Ray nodes as coordinator
nodes, a STRICT_SPREAD placement group puts each on its own machine (so losing one machine
loses one node); with fewer, actors are spread best-effort (``"SPREAD"``). Each actor
reserves a port on its own node's IP first (held bound until its server binds it, so no
outgoing connection takes it meanwhile), then all of them start with the full peer map.
Then each actor's one thread is parked in ``serve()`` until its node stops (an idle Ray
actor's thread wakes every 10 ms; a parked one does not): the node is stopped over its port
(``admin_stop``), and ``serve()``'s object ref tells the driver when a node is gone.

``RayCluster(node_processes=True)`` (the training's embedded coordinator) places nodes the same
way but runs each as a plain ``coordinator serve`` process (:class:`NodeProcessHost`): the
caller's children on its own Ray node, a host actor's children on any other. A node process
wakes about 10 times a second at rest, a Ray-hosted node about 55 (Ray's own threads), which
beside training in lockstep on few cores is most of what the step log costs. The token reaches
a node over a pipe on its stdin, and the node stops when that pipe closes, so nodes die with
the process hosting them as actors would.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from typing import Any

from coordinator.client import Client, Unavailable
from coordinator.launcher import LaunchedProcess, Launcher, LauncherGone, open_node_log
from coordinator.storage import holds_state
from coordinator.transport import check_token, generate_token

logger = logging.getLogger(__name__)

DEFAULT_STARTUP_TIMEOUT_S = 60.0


#: Starts of a new LocalCluster on freshly picked ports when one was taken meanwhile.
PORT_TRIES = 3


class PortInUseError(RuntimeError):
    """A node could not bind its port: another process took it after it was picked."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the usual small race is accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def write_token_file(path: pathlib.Path) -> bytes:
    """Create ``path`` (mode 0600) holding a fresh cluster token; returns the token bytes.
    Never writes through an existing file or symlink (FileExistsError): one planted there
    would keep its owner's access to the token."""
    token = generate_token()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token.encode()


def read_own_token_file(path: pathlib.Path) -> bytes:
    """The token in ``path``, which must be a regular file of this user that nobody else
    can read or write (PermissionError otherwise, saying what to do)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a FIFO: no hang
    except OSError as exc:
        raise PermissionError(f"cannot open the token file {str(path)!r} ({exc.strerror}); "
                              "a symlink is refused: remove it to have a fresh one made") from exc
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_uid != os.getuid() or st.st_mode & 0o077 or not stat.S_ISREG(st.st_mode):
            raise PermissionError(
                f"refusing the token file {str(path)!r}: owned by uid {st.st_uid} (you are "
                f"{os.getuid()}) with mode {stat.S_IMODE(st.st_mode):04o}; a token file must be "
                "yours and readable by you alone (someone else may know this token). Remove it "
                "to have a fresh one made, or `chmod 600` it if it is yours")
        return check_token(f.read(4096).strip(), f"the token in {str(path)!r}")


#: LocalClusters started and not stopped, with the pid of the process that started them.
_UNSTOPPED: dict[int, tuple[LocalCluster, int]] = {}


@atexit.register
def _stop_unstopped_clusters() -> None:
    """At interpreter exit, stop the nodes of every LocalCluster its program forgot to stop
    (the nodes run in sessions of their own and would otherwise serve on, orphaned). Only in
    the process that started them: a forked child that exits leaves its parent's alone."""
    for cluster, owner in list(_UNSTOPPED.values()):
        if owner != os.getpid():
            continue
        logger.warning("a LocalCluster of %d nodes (%s) was never stopped: stopping its nodes "
                       "at exit (use it as a context manager, or call stop())",
                       len(cluster.node_ids), cluster.data_dir)
        with contextlib.suppress(Exception):
            cluster.stop(timeout_s=5.0)


def _own_private_dir(path: pathlib.Path) -> None:
    """Create ``path`` (mode 0700), or check that an existing one is this user's and make it
    private; PermissionError for another user's directory."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise PermissionError(f"the data directory {str(path)!r} belongs to uid {st.st_uid}, "
                              f"not to you ({os.getuid()}): choose a directory of your own")
    if stat.S_IMODE(st.st_mode) & 0o077:
        path.chmod(0o700)


def _wait_until(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def serve_command(node_id: int, listen: str, addresses: dict[int, tuple[str, int]],
                  data_dir: str | os.PathLike, token_file: str, ready_file: str | os.PathLike,
                  tick_ms: float, election_tick: int) -> list[str]:
    """The command line of one ``coordinator serve`` node (``token_file`` "-": from stdin)."""
    peers = ",".join(f"{i}={h}:{p}" for i, (h, p) in addresses.items())
    return [sys.executable, "-m", "coordinator.cli", "serve", "--id", str(node_id),
            "--listen", listen, "--peers", peers, "--data-dir", str(data_dir),
            "--token-file", token_file, "--tick-ms", str(tick_ms),
            "--election-tick", str(election_tick), "--ready-file", str(ready_file)]


def wait_node_ready(node_id: int, proc: Any, ready_file: pathlib.Path, log_path: pathlib.Path,
                    timeout_s: float) -> None:
    """Wait until a starting node process wrote its ready file; if it exits first, raise with
    the end of its log (PortInUseError when its port was taken)."""

    def ready() -> bool:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
            error = PortInUseError if "address already in use" in tail else RuntimeError
            raise error(f"coordinator node {node_id} exited with {proc.returncode} "
                        f"while starting; its log ({log_path}) ends:\n{tail}")
        return ready_file.exists()

    _wait_until(ready, timeout_s, f"node {node_id} to start serving")


def terminate_processes(procs: list[Any], timeout_s: float) -> None:
    """SIGTERM these processes (resuming stopped ones), SIGKILL what is left after
    ``timeout_s``, and reap them all."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()


class LocalCluster:
    """``nodes`` coordinator processes on loopback; a context manager. See the module doc."""

    def __init__(self, nodes: int = 3, data_dir: str | os.PathLike | None = None, *,
                 host: str = "127.0.0.1", tick_ms: float = 15.0, election_tick: int = 10,
                 fsync: bool = True, snapshot_every: int | None = None,
                 startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
                 extra_args: list[str] | None = None, warm_start: bool = True) -> None:
        if not 1 <= nodes <= 9:
            raise ValueError("a local cluster has 1..9 nodes")
        self._own_dir = data_dir is None
        self.data_dir = pathlib.Path(data_dir or tempfile.mkdtemp(prefix="coordinator-"))
        self.host = host
        self.node_ids = list(range(1, nodes + 1))
        self.tick_ms, self.election_tick, self.fsync = tick_ms, election_tick, fsync
        self.snapshot_every = snapshot_every
        self.startup_timeout_s = startup_timeout_s
        self.extra_args = list(extra_args or [])
        self.addresses: dict[int, tuple[str, int]] = {}
        self.procs: dict[int, subprocess.Popen | LaunchedProcess] = {}
        # warm_start: nodes are forked from a launcher that has imported the server already
        # (coordinator.launcher); a restart then costs no interpreter start. Off, or if the
        # launcher fails: each node is a fresh `python -m coordinator.cli serve`.
        self.warm_start = warm_start
        self._launcher: Launcher | None = None
        self.token_file = self.data_dir / "token"
        self.token = b""
        self.keep_data = False  # True: stop() keeps even a temporary data_dir (logs to read)
        self._started = False

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        """Pick ports, write the token file, start every node and wait until all serve."""
        _own_private_dir(self.data_dir)
        _UNSTOPPED[id(self)] = (self, os.getpid())
        if os.path.lexists(self.token_file):
            self.token = read_own_token_file(self.token_file)
        else:
            self.token = write_token_file(self.token_file)
        # Ports we pick were free a moment ago; another process (any outgoing connection takes
        # an ephemeral port from the same range) may take one first. Then, for a new cluster
        # (no node held state before), every node starts again on new ports (the peer list
        # names them all) from empty directories. Given addresses are the caller's: no retry.
        if self.warm_start and (self._launcher is None or not self._launcher.alive):
            self._launcher = Launcher()
        picked = not self.addresses
        fresh = not any(holds_state(self.node_dir(i)) for i in self.node_ids)
        for attempt in range(PORT_TRIES):
            if picked:
                self.addresses = {i: (self.host, free_port(self.host)) for i in self.node_ids}
            self._started = True
            for i in self.node_ids:
                self._spawn(i)
            try:
                for i in self.node_ids:
                    self._wait_ready(i)
                return
            except PortInUseError:
                if not (picked and fresh) or attempt == PORT_TRIES - 1:
                    raise
                self.stop_processes()
                for i in self.node_ids:
                    shutil.rmtree(self.node_dir(i), ignore_errors=True)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM every node (resuming paused ones), SIGKILL what is left after ``timeout_s``."""
        self.stop_processes(timeout_s)
        if self._launcher is not None:
            self._launcher.close()
            self._launcher = None
        self._remove_own_dir()
        _UNSTOPPED.pop(id(self), None)

    def stop_processes(self, timeout_s: float = 10.0) -> None:
        """The process part of :meth:`stop`: the data directory stays."""
        terminate_processes(list(self.procs.values()), timeout_s)
        self.procs.clear()

    def _remove_own_dir(self) -> None:
        if self._own_dir and self._started and not self.keep_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        self._started = False

    # ------------------------------------------------------------ queries
    @property
    def endpoints(self) -> list[str]:
        return [self.endpoint(i) for i in self.node_ids]

    def endpoint(self, node_id: int) -> str:
        host, port = self.addresses[node_id]
        return f"{host}:{port}"

    def node_dir(self, node_id: int) -> pathlib.Path:
        return self.data_dir / f"node-{node_id}"

    def log_path(self, node_id: int) -> pathlib.Path:
        return self.data_dir / f"node-{node_id}.log"

    def pid(self, node_id: int) -> int:
        return self.procs[node_id].pid

    def is_running(self, node_id: int) -> bool:
        proc = self.procs.get(node_id)
        return proc is not None and proc.poll() is None

    def is_serving(self, node_id: int) -> bool:
        """Running and past its start (it wrote its ready file)."""
        return self.is_running(node_id) and self._ready_file(node_id).exists()

    def exit_code(self, node_id: int) -> int | None:
        """The node process's exit status, or None while it runs."""
        proc = self.procs.get(node_id)
        return None if proc is None else proc.poll()

    def start_node(self, node_id: int) -> None:
        """Start a node that is not running again on its data directory and port, without
        waiting (see :meth:`is_serving`; :meth:`restart` waits). A node whose directory
        lost its state rejoins with ``--join`` (see :meth:`restart`)."""
        if self.is_running(node_id):
            raise RuntimeError(f"node {node_id} is running (pid {self.procs[node_id].pid})")
        self._spawn(node_id, rejoin=True)

    def client(self, timeout_s: float = 10.0, endpoints: list[str] | None = None) -> Client:
        return Client(endpoints or self.endpoints, token=self.token, timeout_s=timeout_s)

    def status(self, node_id: int, timeout_s: float = 2.0) -> dict | None:
        """The node's status, or None if it does not answer within ``timeout_s``."""
        try:
            with Client([self.endpoint(node_id)], token=self.token, timeout_s=timeout_s) as c:
                return c.status(self.endpoint(node_id))
        except Unavailable:
            return None

    def leader(self, timeout_s: float = 30.0, exclude: tuple[int, ...] = ()) -> int:
        """Wait until a running node (not in ``exclude``) is leader of the highest term any
        running node reports; return its id."""

        def find() -> int | None:
            best: tuple[int, int] | None = None
            terms = []
            for i in self.node_ids:
                if not self.is_running(i):
                    continue
                st = self.status(i, timeout_s=0.5)
                if st is None:
                    continue
                terms.append(st["term"])
                if st["role"] == "leader" and i not in exclude and (best is None or st["term"] > best[0]):
                    best = (st["term"], i)
            if best is not None and best[0] >= max(terms):
                return best[1]
            return None

        return _wait_until(find, timeout_s, "a leader to be elected", interval_s=0.05)

    # ------------------------------------------------------------ faults
    def kill(self, node_id: int) -> None:
        """SIGKILL the node's process and reap it."""
        proc = self.procs[node_id]
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()

    def pause(self, node_id: int) -> None:
        os.kill(self.procs[node_id].pid, signal.SIGSTOP)

    def resume(self, node_id: int) -> None:
        os.kill(self.procs[node_id].pid, signal.SIGCONT)

    def restart(self, node_id: int) -> None:
        """Stop the node if it runs (SIGTERM, then SIGKILL), start it again on the same data
        directory and port, and wait until it serves. If the directory holds no state (the
        node lost its disk) it is started with ``--join``: it comes back recovering, casts no
        vote until the leader has repaired it, and then serves as before."""
        proc = self.procs.get(node_id)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._spawn(node_id, rejoin=True)
        self._wait_ready(node_id)

    def add_node(self, node_id: int | None = None, *, learner: bool = True) -> int:
        """Grow the cluster by one node (etcd's member add, then the new node's start): pick a
        port, ``member add`` it (a learner by default: :meth:`promote` it once caught up), start
        it with ``serve --join`` and wait until it serves. Returns its id."""
        node_id = node_id or max(self.node_ids) + 1
        if node_id in self.node_ids:
            raise ValueError(f"node {node_id} is already in this cluster")
        address = (self.host, free_port(self.host))
        with self.client(timeout_s=30) as client:
            client.member_add(node_id, f"{address[0]}:{address[1]}", learner=learner)
        self.addresses[node_id] = address
        self.node_ids.append(node_id)
        self._spawn(node_id, rejoin=True)
        self._wait_ready(node_id)
        return node_id

    def promote(self, node_id: int, timeout_s: float = 60.0) -> None:
        """Promote learner ``node_id`` to a voter, retrying while it is still catching up."""
        from coordinator.client import RequestRejected

        def done() -> bool:
            try:
                with self.client(timeout_s=30) as client:
                    client.member_promote(node_id)
                return True
            except RequestRejected as exc:
                if exc.code != "learner_not_ready":
                    raise
                return False

        _wait_until(done, timeout_s, f"learner {node_id} to be promoted", interval_s=0.2)

    def remove_node(self, node_id: int, timeout_s: float = 60.0) -> None:
        """``member remove`` the node, wait until its process has stopped itself, and forget it."""
        with self.client(timeout_s=30) as client:
            client.member_remove(node_id)
        proc = self.procs.get(node_id)
        if proc is not None:
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"removed node {node_id} did not stop within {timeout_s:.0f} s") from None
            self.procs.pop(node_id)
        self.node_ids.remove(node_id)
        self.addresses.pop(node_id)

    def partition(self, node_id: int, tell: Iterable[int] | None = None) -> None:
        """Cut ``node_id`` off from every other node (both directions); clients still reach
        all. ``tell``: the other nodes to send the block list to (default: all of them);
        leave out a stopped one, which cannot answer: ``node_id`` alone already drops
        everything to and from it."""
        others = [i for i in self.node_ids if i != node_id]
        self._admin_partition(node_id, others)
        for i in others if tell is None else tell:
            if i != node_id:
                self._admin_partition(i, [node_id])

    def heal(self, tell: Iterable[int] | None = None) -> None:
        """Undo every partition (on the running nodes, or those in ``tell``)."""
        for i in self.node_ids if tell is None else tell:
            if self.is_running(i):
                self._admin_partition(i, [])

    def _admin_partition(self, node_id: int, block: list[int]) -> None:
        with Client([self.endpoint(node_id)], token=self.token, timeout_s=5.0) as c:
            c.admin_partition(self.endpoint(node_id), block)

    # ------------------------------------------------------------ internals
    def _command(self, node_id: int, join: bool = False) -> list[str]:
        cmd = serve_command(node_id, self.endpoint(node_id), self.addresses, self.node_dir(node_id),
                            str(self.token_file), self._ready_file(node_id), self.tick_ms,
                            self.election_tick)
        if not self.fsync:
            cmd.append("--no-fsync")
        if self.snapshot_every is not None:
            cmd += ["--snapshot-every", str(self.snapshot_every)]
        if join:
            cmd.append("--join")
        return cmd + self.extra_args

    def _ready_file(self, node_id: int) -> pathlib.Path:
        return self.data_dir / f"node-{node_id}.ready"

    def _spawn(self, node_id: int, rejoin: bool = False) -> None:
        """Start the node's process; ``rejoin`` (a start after the cluster's first): pass
        ``--join`` if the node's directory holds no state."""
        join = rejoin and not holds_state(self.node_dir(node_id))
        self._ready_file(node_id).unlink(missing_ok=True)
        cmd = self._command(node_id, join)
        if self._launcher is not None and self._launcher.alive:
            try:
                self.procs[node_id] = self._launcher.launch(cmd[3:], str(self.log_path(node_id)))
                return
            except LauncherGone as exc:  # a cold start below does the same, only slower
                logger.warning("coordinator node launcher failed (%s); starting node %d cold", exc, node_id)
        log = os.fdopen(open_node_log(self.log_path(node_id)), "ab")  # owned by the child
        try:
            self.procs[node_id] = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()

    def _wait_ready(self, node_id: int) -> None:
        wait_node_ready(node_id, self.procs[node_id], self._ready_file(node_id),
                        self.log_path(node_id), self.startup_timeout_s)

    def describe(self) -> dict:
        """What a client needs: endpoints, token file, data dir (written to state files)."""
        return {"endpoints": self.endpoints, "token_file": str(self.token_file),
                "data_dir": str(self.data_dir), "pids": {i: p.pid for i, p in self.procs.items()}}


# ---------------------------------------------------------------------------- Ray
def lower_thread_priority(nice: int, tid: int | None = None) -> bool:
    """Lower one thread's CPU priority by ``nice`` (capped at 19): ``tid`` (a native thread
    id), or the calling thread. Linux only, where a thread's nice value is its own (elsewhere
    ``setpriority`` would take the whole process); False where it cannot be done (another
    system, or the thread has exited)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        if tid is None:
            import threading

            tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
        return True
    except OSError:
        return False


def lower_priority(nice: int) -> None:
    """Lower this process's CPU priority by ``nice``. On Linux the nice value is each
    thread's own (threads inherit their creator's): every thread the process has now is
    lowered (:func:`lower_thread_priority`; one that exited meanwhile is skipped), and the
    ones it starts later inherit it. Elsewhere, ``os.nice``."""
    tasks = pathlib.Path("/proc/self/task")
    if not sys.platform.startswith("linux") or not tasks.is_dir():
        os.nice(nice)
        return
    for task in tasks.iterdir():
        if task.name.isdigit():
            lower_thread_priority(nice, int(task.name))


def idle_priority() -> bool:
    """Put every thread of this process under ``SCHED_IDLE`` (Linux): its threads run only on
    a CPU that no thread of a normal policy wants, and their wake-ups never preempt one; the
    threads it starts later inherit it. False where it cannot be done (another system, or a
    thread refused it)."""
    tasks = pathlib.Path("/proc/self/task")
    if not hasattr(os, "SCHED_IDLE") or not tasks.is_dir():
        return False
    done = True
    for task in tasks.iterdir():
        if task.name.isdigit():
            try:
                os.sched_setscheduler(int(task.name), os.SCHED_IDLE, os.sched_param(0))
            except ProcessLookupError:
                continue  # exited meanwhile
            except OSError:
                done = False
    return done


def hold_port(bind: str, port: int = 0) -> tuple[socket.socket | None, int]:
    """Bind ``port`` (0: a free one) on ``bind`` and hold it: (the socket, the port). Held
    bound until the node's server binds it (seconds later, once every node has its address):
    meanwhile no outgoing connection on this host can take it as its ephemeral port, which
    once failed a job's start with "address already in use". A given port that is taken for
    now (a restart's) comes back with no socket: the server's own bind will say."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((bind, port))
    except OSError:
        sock.close()
        if not port:
            raise
        return None, port
    return sock, sock.getsockname()[1]


class _RayNode:
    """Body of the Ray actor hosting one coordinator node in a background thread.

    Once :meth:`start` returns, :meth:`serve` parks the actor's only thread until the node
    stops (RayCluster calls it at once): Ray wakes an idle actor's thread every 10 ms to check
    for signals, about 1% of a core per node, which a parked thread is spared. The actor takes
    no other call meanwhile: the node is stopped over its port (``admin_stop``), and the
    object ref of ``serve`` is the node's liveness (it resolves when the node stops or the
    actor dies).

    ``data_dir`` None: the actor makes a temporary directory on its own host (removed by
    :meth:`stop` with ``remove_dir``); otherwise the given directory (created mode 0700) is
    used, and removed by :meth:`stop` only if ``temporary`` (a restarted node's temporary
    directory). A restarted node is a new actor given the same directory and address.
    """

    def __init__(self, node_id: int, data_dir: str | None = None,
                 temporary: bool = False) -> None:
        self.node_id = node_id
        self.host = "127.0.0.1"
        self.port = 0
        self._bind = "127.0.0.1"
        self._thread: Any = None
        self._loop: Any = None
        self._server: Any = None
        self._done: Any = None  # a threading.Event: the node's loop has ended
        self._held_port: socket.socket | None = None  # the reserved port, until start() binds it
        self._owns_dir = data_dir is None or temporary
        if data_dir is None:
            self.data_dir = tempfile.mkdtemp(prefix=f"coordinator-ray-{node_id}-")
        else:
            path = pathlib.Path(data_dir)
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            if path.stat().st_uid == os.getuid():
                path.chmod(0o700)
            self.data_dir = str(path)

    def __repr__(self) -> str:  # Ray prefixes the actor's log lines with this
        return f"_RayNode(node {self.node_id})"

    def reserve(self, bind_all: bool, port: int = 0) -> tuple[str, int]:
        """Pick this node's address: its host's IP (``bind_all``) or loopback, and ``port``
        (0: a free one)."""
        import ray

        self.host = ray.util.get_node_ip_address() if bind_all else "127.0.0.1"
        self._bind = "0.0.0.0" if bind_all else "127.0.0.1"
        self._release_port()
        self._held_port, self.port = hold_port(self._bind, port)
        return self.host, self.port

    def _release_port(self) -> None:
        sock, self._held_port = self._held_port, None
        if sock is not None:
            sock.close()

    def where(self) -> dict[str, Any]:
        """Ray node id, host IP, process id and data directory of this actor."""
        import ray

        return {"ray_node_id": ray.get_runtime_context().get_node_id(),
                "ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
                "data_dir": self.data_dir, "bind": self._bind, "host": self.host, "port": self.port}

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def pid(self) -> int:
        return os.getpid()

    def start(self, peers: dict[int, tuple[str, int]], token: bytes, tick_s: float,
              rejoin: bool = False, heartbeat_tick: int = 1, election_tick: int = 10,
              nice: int = 0, idle: bool = False) -> str:
        """Serve; ``rejoin`` (a restart): a directory that lost its state starts with
        ``join`` (recovering until the leader repaired it; see LocalCluster.restart);
        ``nice``: lower this process's CPU priority by that much first; ``idle``: run it
        under SCHED_IDLE (see RayCluster)."""
        import asyncio
        import threading

        if nice:
            lower_priority(nice)
        if idle and not idle_priority():
            logger.warning("coordinator node %d: could not run at idle priority (SCHED_IDLE); it runs at "
                        "its normal priority", self.node_id)

        from coordinator.server import CoordinatorServer, ServerConfig

        config = ServerConfig(node_id=self.node_id,
                              peers={int(k): (str(v[0]), int(v[1])) for k, v in peers.items()},
                              data_dir=pathlib.Path(self.data_dir), token=token,
                              listen=(self._bind, self.port), tick_s=tick_s,
                              heartbeat_tick=heartbeat_tick, election_tick=election_tick,
                              join=rejoin and not holds_state(self.data_dir), remote_stop=True)
        started = threading.Event()
        done = self._done = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = CoordinatorServer(config)
                loop.run_until_complete(self._server.start())
            except BaseException as exc:  # reported to the caller below
                errors.append(exc)
                started.set()
                done.set()
                return
            started.set()
            try:
                # until a stop (admin_stop, stop(), a fatal error) begins; then all of it
                loop.run_until_complete(self._server.wait_stopped())
                loop.run_until_complete(self._server.stop())
            finally:
                loop.close()
                done.set()

        self._thread = threading.Thread(target=run, name=f"coordinator-{self.node_id}", daemon=True)
        self._release_port()  # the server binds it at once (SO_REUSEADDR)
        self._thread.start()
        if not started.wait(DEFAULT_STARTUP_TIMEOUT_S):
            raise TimeoutError(f"coordinator node {self.node_id} did not start serving within "
                               f"{DEFAULT_STARTUP_TIMEOUT_S:.0f} s")
        if errors:
            raise errors[0]
        return f"{self.host}:{self.port}"

    def serve(self) -> str:
        """Park this actor's thread until the node has stopped (see the class doc); why."""
        if self._done is None:
            return "never started"
        self._done.wait()
        error = getattr(self._server, "fatal_error", None)
        return "stopped" if error is None else f"stopped by a fatal error: {error!r}"

    def stop(self, remove_dir: bool = True) -> None:
        """Stop the server (releasing its data directory) unless it has stopped already;
        remove the directory only if this actor made it (a temporary one) and ``remove_dir``."""
        import asyncio

        if self._server is not None and self._loop is not None:
            if not self._done.is_set():
                fut = asyncio.run_coroutine_threadsafe(self._server.stop(), self._loop)
                fut.result(30)
            self._thread.join(30)
            self._server = None
        if remove_dir and self._owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def ray_worker_niceness() -> int:
    """The nice value Ray gives its worker processes: ``RAY_worker_niceness`` if set, else
    Ray's default, 15 (a driver runs at its own, usually 0)."""
    try:
        return int(os.environ.get("RAY_worker_niceness", "15"))
    except ValueError:
        return 15


class NodeProcessHost:
    """Coordinator nodes as child processes of this process (each a ``coordinator serve``),
    on this host: for :class:`RayCluster` with ``node_processes``, one per Ray node that
    hosts nodes: the driver's own process for its Ray node, a Ray actor on any other.

    A node process has no Ray in it. At rest it wakes for its own Raft clock and messages
    (about 10 times a second at the embedded coordinator's clock); a node hosted in a Ray
    actor wakes about 60 times a second, 48 of them Ray's own threads (gRPC pollers, the core
    worker's io loop), and beside training in lockstep on few cores each wake-up can stall
    every rank (docs/fault-tolerance.md).

    Each node reads the token from a pipe on its standard input (never from a file or its
    command line) and stops when that pipe closes: its nodes die with this process, a killed
    driver's or a lost Ray node's actor's, as a Ray actor's would. They run in a process group
    of their own, so a Ctrl-C at the driver's terminal reaches the driver, which stops them.
    They run at the CPU priority of Ray's workers (:func:`ray_worker_niceness`, plus ``nice``),
    as a node in a Ray actor did: children of the driver would otherwise run at its nice 0,
    28 times the weight of the training's nice-15 threads, and their wake-ups would preempt it.

    ``reserve`` picks a node's directory and address (the port held bound until ``start``);
    ``start`` spawns nodes and waits until each serves; ``exited`` says (or waits until) a
    node's process ended; ``kill`` is SIGKILL; ``stop`` is SIGTERM (SIGKILL after 30 s).
    A node's log is ``<its dir>.log``, next to its data directory.
    """

    def __init__(self, token: bytes, tick_ms: float, heartbeat_tick: int = 1,
                 election_tick: int = 10, nice: int = 0, idle: bool = False,
                 startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S) -> None:
        self._token = check_token(token, "the cluster's token")
        self.tick_ms, self.heartbeat_tick, self.election_tick = tick_ms, heartbeat_tick, election_tick
        self.nice, self.idle, self.startup_timeout_s = nice, idle, startup_timeout_s
        self._procs: dict[int, subprocess.Popen] = {}
        self._where: dict[int, dict[str, Any]] = {}  # per node: directory, address, pid
        self._held: dict[int, socket.socket] = {}  # ports reserved, until their node starts
        self._temporary: set[int] = set()  # nodes in a directory made here, removed by stop()
        self._temp_base: str | None = None

    def __repr__(self) -> str:  # Ray prefixes the actor's log lines with this; never the token
        return f"NodeProcessHost(nodes={sorted(self._where)})"

    def reserve(self, node_id: int, data_dir: str | None, bind_all: bool, port: int = 0,
                temporary: bool = False) -> dict[str, Any]:
        """Pick node ``node_id``'s directory (``data_dir``, created 0700; None: a temporary
        one here) and address: this host's IP (``bind_all``) or loopback, and ``port`` (0: a
        free one). Returns where it will run (``ray_node_id``, ``ip``, ``data_dir``,
        ``bind``, ``host``, ``port``)."""
        import ray

        if data_dir is None:
            if self._temp_base is None:
                self._temp_base = tempfile.mkdtemp(prefix="coordinator-ray-")
            data_dir, temporary = os.path.join(self._temp_base, f"node-{node_id}"), True
        path = pathlib.Path(data_dir)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.stat().st_uid == os.getuid():
            path.chmod(0o700)
        if temporary:
            self._temporary.add(node_id)
        bind = "0.0.0.0" if bind_all else "127.0.0.1"
        self._release(node_id)
        sock, port = hold_port(bind, port)
        if sock is not None:
            self._held[node_id] = sock
        self._where[node_id] = {
            "ray_node_id": ray.get_runtime_context().get_node_id(),
            "ip": ray.util.get_node_ip_address(), "pid": None, "data_dir": str(path),
            "bind": bind, "host": ray.util.get_node_ip_address() if bind_all else "127.0.0.1",
            "port": port}
        return dict(self._where[node_id])

    def start(self, node_ids: list[int], peers: dict[int, tuple[str, int]],
              rejoin: bool = False) -> dict[int, dict[str, Any]]:
        """Start these reserved nodes with the full peer map and wait until each serves;
        ``rejoin`` (a restart): a directory that lost its state starts with ``--join``.
        Returns where each runs, its ``pid`` now set."""
        peers = {int(k): (str(v[0]), int(v[1])) for k, v in peers.items()}
        for i in node_ids:
            self._spawn(i, peers, rejoin)
        for i in node_ids:
            where = self._where[i]
            wait_node_ready(i, self._procs[i], pathlib.Path(where["data_dir"] + ".ready"),
                            pathlib.Path(where["data_dir"] + ".log"), self.startup_timeout_s)
        return {i: dict(self._where[i]) for i in node_ids}

    def _spawn(self, node_id: int, peers: dict[int, tuple[str, int]], rejoin: bool) -> None:
        where = self._where[node_id]
        data_dir = where["data_dir"]
        pathlib.Path(data_dir + ".ready").unlink(missing_ok=True)
        cmd = serve_command(node_id, f"{where['bind']}:{where['port']}", peers, data_dir, "-",
                            data_dir + ".ready", self.tick_ms, self.election_tick)
        cmd += ["--heartbeat-tick", str(self.heartbeat_tick), "--stop-on-stdin-eof"]
        if rejoin and not holds_state(data_dir):
            cmd.append("--join")
        if self.nice:
            cmd += ["--nice", str(self.nice)]
        if self.idle:
            cmd.append("--sched-idle")
        env = dict(os.environ)  # the node imports this copy of the package, installed or not
        source = str(pathlib.Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (source, env.get("PYTHONPATH")) if p)
        log = os.fdopen(open_node_log(data_dir + ".log"), "ab")  # owned by the child
        self._release(node_id)  # the server binds it at once (SO_REUSEADDR)
        try:
            # A process group of its own (a Ctrl-C at the terminal reaches only the driver), in
            # the host's session: with Linux's autogroups a session of its own would be
            # scheduled as a peer of everything else, as heavily as the whole training.
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                    process_group=0, env=env)
        finally:
            log.close()
        assert proc.stdin is not None
        proc.stdin.write(self._token + b"\n")
        proc.stdin.flush()  # and kept open: the node stops when it closes
        self._procs[node_id] = proc
        where["pid"] = proc.pid

    def _release(self, node_id: int) -> None:
        sock = self._held.pop(node_id, None)
        if sock is not None:
            sock.close()

    def pid(self, node_id: int) -> int:
        return self._procs[node_id].pid

    def exited(self, node_id: int, wait_s: float | None = 0.0) -> bool:
        """Whether the node's process has ended, waiting up to ``wait_s`` (None: until it
        does; a Ray actor parks a call here as the node's liveness)."""
        proc = self._procs.get(node_id)
        if proc is None:
            return True
        if not wait_s and wait_s is not None:
            return proc.poll() is not None
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill(self, node_id: int) -> None:
        """SIGKILL the node's process and reap it."""
        proc = self._procs.pop(node_id, None)
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
            self._close_pipe(proc)

    def stop(self, node_ids: list[int] | None = None, remove_dir: bool = True,
             timeout_s: float = 30.0) -> None:
        """Stop these nodes (default: all) as on SIGTERM; remove their directories if made
        here and ``remove_dir`` (and, once no node is left, this host's temporary base)."""
        ids = list(self._where) if node_ids is None else list(node_ids)
        procs = [self._procs.pop(i) for i in ids if i in self._procs]
        terminate_processes(procs, timeout_s)
        for proc in procs:
            self._close_pipe(proc)
        for i in ids:
            self._release(i)
            if remove_dir and i in self._temporary:
                shutil.rmtree(self._where[i]["data_dir"], ignore_errors=True)
        if remove_dir and node_ids is None and self._temp_base is not None:
            shutil.rmtree(self._temp_base, ignore_errors=True)
            self._temp_base = None

    @staticmethod
    def _close_pipe(proc: subprocess.Popen) -> None:
        with contextlib.suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()


class RayCluster:
    """``nodes`` coordinator nodes as Ray actors spread over the Ray cluster's nodes.

    Requires ``ray.init`` to have been called (or calls it with defaults). With one Ray node
    everything binds to loopback; with several, nodes bind on all interfaces of their host
    and advertise its IP. A context manager like :class:`LocalCluster`.

    Placement: by default a node reserves no CPU (``num_cpus_per_node=0``: the coordinator
    is mostly idle, and training workers must not wait for CPUs it holds). Ray puts an actor
    that requests nothing on any node whatever its strategy, so 0-CPU nodes are pinned
    round-robin over the alive Ray nodes (hard node affinity). With CPUs reserved and at
    least as many Ray nodes as coordinator nodes, a STRICT_SPREAD placement group puts each
    on its own machine; with fewer, Ray spreads them best-effort (``"SPREAD"``).

    ``data_dir``: node ``i`` keeps its WAL and snapshots in ``data_dir/node-<i>`` (created
    0700, on the host the node runs on, never deleted by :meth:`stop`); without it each node
    uses a temporary directory that :meth:`stop` removes. :meth:`restart` starts a fresh
    actor for a node on the same Ray node, directory and address, so it recovers from its
    WAL and its peers need no new address.

    ``tick_ms``, ``heartbeat_tick``, ``election_tick``: the nodes' Raft clock (as
    ``coordinator serve``'s flags; a leader heartbeats every ``heartbeat_tick`` ticks, an
    election times out after ``election_tick``-``2*election_tick`` ticks).

    ``nice``: each node's process runs that much below the default CPU priority (0 to 19; 0:
    unchanged). For nodes that share their cores with work that matters more than their
    latency: a node wakes for little, and the scheduler may give a busy core back to that work
    sooner (Linux: every thread of the actor's process). A training job's embedded coordinator
    measured no gain from it and leaves it at 0 (``synctrain.driver.coord.STEPLOG_NICE``).

    ``idle_priority``: each node's process runs under ``SCHED_IDLE`` (Linux; elsewhere a
    warning and the normal priority): it gets a CPU only when no normal thread wants one, and
    its wake-ups never preempt one (a nice value does not stop a sleeper's wake-up from
    preempting). For nodes beside work in lockstep, where every preemption of one rank stalls
    all of them (see ``synctrain.driver.coord.STEPLOG_IDLE_PRIORITY``).

    ``node_processes``: each node is a plain ``coordinator serve`` process, not a Ray actor
    (see :class:`NodeProcessHost`): those on the caller's own Ray node are its children, and
    those on another Ray node the children of one host actor there (``NodeProcessHost``,
    pinned to it, reserving no CPU). Needs ``num_cpus_per_node=0`` (a process reserves
    nothing); placement is round-robin over the alive Ray nodes as for 0-CPU actors. The
    nodes die with the process that hosts them (the caller, or the host actor). ``actors``
    then maps each live node to its host, and :meth:`actor_pid` is the node's own process.
    """

    def __init__(self, nodes: int = 3, *, token: bytes | None = None, tick_ms: float = 15.0,
                 heartbeat_tick: int = 1, election_tick: int = 10,
                 num_cpus_per_node: float = 0.0,
                 data_dir: str | os.PathLike | None = None, nice: int = 0,
                 idle_priority: bool = False, node_processes: bool = False) -> None:
        if not 1 <= nodes <= 9:
            raise ValueError("a Ray-hosted cluster has 1..9 nodes")
        if num_cpus_per_node < 0:
            raise ValueError("num_cpus_per_node must be >= 0")
        if node_processes and num_cpus_per_node:
            raise ValueError("node_processes=True needs num_cpus_per_node=0: a node's process is not "
                             "a Ray actor and reserves no CPU")
        self.node_processes = bool(node_processes)
        self._hosts: dict[str, Any] = {}  # node_processes: per Ray node id, its NodeProcessHost
        self._here: str | None = None  # node_processes: this process's Ray node id
        if not 0 <= nice <= 19:
            raise ValueError(f"nice must be 0..19 (how far below the default CPU priority), not {nice!r}")
        self.nice = nice
        self.idle_priority = bool(idle_priority)
        self.node_ids = list(range(1, nodes + 1))
        self.token = token or generate_token().encode()
        self.tick_s = tick_ms / 1000.0
        self.heartbeat_tick, self.election_tick = heartbeat_tick, election_tick
        self.num_cpus_per_node = num_cpus_per_node
        self.data_dir = None if data_dir is None else pathlib.Path(data_dir)
        self.actors: dict[int, Any] = {}
        self._serving: dict[int, Any] = {}  # per live node, the object ref of its actor's serve()
        self.endpoints: list[str] = []
        self.addresses: dict[int, tuple[str, int]] = {}
        # Per node, where its first actor ran: Ray node id, data dir, scheduling strategy.
        self._placed: dict[int, dict[str, Any]] = {}
        self._multi_host = False
        self._pg: Any = None  # the STRICT_SPREAD placement group, when there is one

    def __repr__(self) -> str:  # never the token or the endpoints
        return (f"RayCluster(nodes={len(self.node_ids)}, actors={sorted(self.actors)}, "
                f"num_cpus_per_node={self.num_cpus_per_node})")

    def __enter__(self) -> RayCluster:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        """Place and start every node; returns once all of them serve."""
        import ray

        if not ray.is_initialized():
            ray.init()
        alive = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))
        self._multi_host = len(alive) > 1
        if self.node_processes:
            self._start_processes(alive)
            return
        strategies = self._placement(alive)
        for k, i in enumerate(self.node_ids):
            self.actors[i] = self._new_actor(i, strategies[k], self._node_dir(i), False)
        timeout_s = DEFAULT_STARTUP_TIMEOUT_S
        addrs = ray.get([self.actors[i].reserve.remote(self._multi_host) for i in self.node_ids],
                        timeout=timeout_s)
        self.addresses = {i: (str(a[0]), int(a[1])) for i, a in zip(self.node_ids, addrs, strict=True)}
        places = ray.get([self.actors[i].where.remote() for i in self.node_ids], timeout=timeout_s)
        for k, (i, where) in enumerate(zip(self.node_ids, places, strict=True)):
            self._placed[i] = dict(where, strategy=strategies[k])
        self.endpoints = ray.get([self.actors[i].start.remote(self.addresses, self.token, self.tick_s,
                                                              heartbeat_tick=self.heartbeat_tick,
                                                              election_tick=self.election_tick,
                                                              nice=self.nice, idle=self.idle_priority)
                                  for i in self.node_ids], timeout=timeout_s)
        for i in self.node_ids:
            self._serving[i] = self.actors[i].serve.remote()

    def _node_dir(self, node_id: int) -> str | None:
        return None if self.data_dir is None else str(self.data_dir / f"node-{node_id}")

    # ------------------------------------------------------------ node_processes
    def _start_processes(self, alive: list[str]) -> None:
        import ray

        self._here = ray.get_runtime_context().get_node_id()
        hosts = {i: self._host(alive[k % len(alive)]) for k, i in enumerate(self.node_ids)}
        for i in self.node_ids:
            self._placed[i] = dict(self._call(hosts[i], "reserve", i, self._node_dir(i), self._multi_host),
                                   strategy=None)
            self.addresses[i] = (str(self._placed[i]["host"]), int(self._placed[i]["port"]))
        by_host: dict[int, list[int]] = {}
        for i, host in hosts.items():
            by_host.setdefault(id(host), []).append(i)
        local = [ids for ids in by_host.values() if isinstance(hosts[ids[0]], NodeProcessHost)]
        remote = [ids for ids in by_host.values() if ids not in local]
        # remote hosts start their nodes while this one starts its own
        pending = [hosts[ids[0]].start.remote(ids, self.addresses) for ids in remote]
        for ids in local:
            self._started(hosts[ids[0]], hosts[ids[0]].start(ids, self.addresses))
        for ids, started in zip(remote, ray.get(pending, timeout=DEFAULT_STARTUP_TIMEOUT_S), strict=True):
            self._started(hosts[ids[0]], started)
        self.endpoints = [self.endpoint(i) for i in self.node_ids]

    def _host(self, ray_node_id: str) -> Any:
        """The NodeProcessHost for a Ray node: this process on its own, an actor elsewhere."""
        if ray_node_id not in self._hosts:
            nice = self.nice  # below the host's own: a host actor runs at Ray's workers' priority
            if ray_node_id == self._here:  # the driver: lowered to it, as an actor is
                nice = min(19, max(0, ray_worker_niceness() - os.getpriority(os.PRIO_PROCESS, 0)) + nice)
            args = (self.token, self.tick_s * 1000.0, self.heartbeat_tick, self.election_tick,
                    nice, self.idle_priority)
            if ray_node_id == self._here:
                self._hosts[ray_node_id] = NodeProcessHost(*args)
            else:
                import ray
                from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

                # threaded: a call per node stays parked in exited() as that node's liveness
                self._hosts[ray_node_id] = ray.remote(NodeProcessHost).options(
                    num_cpus=0, max_restarts=0, max_concurrency=len(self.node_ids) + 4,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(ray_node_id, soft=False),
                ).remote(*args)
        return self._hosts[ray_node_id]

    @staticmethod
    def _call(host: Any, method: str, *args: Any, timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S) -> Any:
        if isinstance(host, NodeProcessHost):
            return getattr(host, method)(*args)
        import ray

        return ray.get(getattr(host, method).remote(*args), timeout=timeout_s)

    def _started(self, host: Any, started: dict[int, dict[str, Any]]) -> None:
        for i, where in started.items():
            self._placed[int(i)] = dict(where, strategy=None)
            self.actors[int(i)] = host
            if not isinstance(host, NodeProcessHost):
                self._serving[int(i)] = host.exited.remote(int(i), None)

    def _new_actor(self, node_id: int, strategy: Any, data_dir: str | None,
                   temporary: bool) -> Any:
        import ray

        actor_cls = ray.remote(_RayNode)
        # One thread (the default): serve() parks it; see _RayNode.
        return actor_cls.options(
            num_cpus=self.num_cpus_per_node, max_restarts=0,
            scheduling_strategy=strategy).remote(node_id, data_dir, temporary)

    def _placement(self, alive: list[str]) -> list[Any]:
        """One scheduling strategy per coordinator node (see the class docstring)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        n = len(self.node_ids)
        if self.num_cpus_per_node == 0:
            # A placement-group bundle cannot be all zeros, and a 0-CPU actor lands anywhere:
            # pin each node to a Ray node, round-robin.
            return [NodeAffinitySchedulingStrategy(alive[k % len(alive)], soft=False)
                    for k in range(n)]
        if len(alive) < n:
            return ["SPREAD"] * n
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._pg = placement_group([{"CPU": self.num_cpus_per_node}] * n, strategy="STRICT_SPREAD")
        ray.get(self._pg.ready(), timeout=120)
        return [PlacementGroupSchedulingStrategy(placement_group=self._pg,
                                                 placement_group_bundle_index=k)
                for k in range(n)]

    # ------------------------------------------------------------ queries
    def endpoint(self, node_id: int) -> str:
        host, port = self.addresses[node_id]
        return f"{host}:{port}"

    def node_ips(self) -> dict[int, str]:
        """Host IP of each node's actor (a node removed by :meth:`kill` is left out)."""
        return {i: str(self._placed[i]["ip"]) for i in self.actors}

    def placement(self, node_id: int) -> dict[str, Any]:
        """Where the node's current actor runs: ``ray_node_id``, ``ip``, ``pid``, ``data_dir``,
        ``bind``, ``host``, ``port`` (and the scheduling ``strategy``)."""
        return dict(self._placed[node_id])

    def actor_pid(self, node_id: int) -> int:
        """The process id of the node's actor, or of the node's own process with
        ``node_processes`` (to kill it for real: ``os.kill(pid, 9)``)."""
        return int(self._placed[node_id]["pid"])

    def serving(self, node_id: int) -> Any:
        """The object ref that resolves when the node stops serving: its actor died (an
        actor error) or the node stopped (a fatal error, ``admin_stop``); with
        ``node_processes``, when its process ended (or its host actor died). None: no live
        actor, or a node process of this process's own (see :meth:`exited`)."""
        return self._serving.get(node_id) if node_id in self.actors else None

    def exited(self, node_id: int, wait_s: float = 0.0) -> bool:
        """Whether the node stopped serving (see :meth:`serving`), waiting up to ``wait_s``
        for it. A process killed from outside counts once its host (Ray, for an actor) has
        seen it die: that is what ``wait_s`` is for."""
        import ray

        host = self.actors.get(node_id)
        if host is None:
            return True
        if isinstance(host, NodeProcessHost):
            return host.exited(node_id, wait_s)
        ref = self._serving.get(node_id)
        return ref is None or bool(ray.wait([ref], timeout=wait_s)[0])

    def is_running(self, node_id: int, timeout_s: float = 2.0) -> bool:
        """Whether the node is alive and serving, as far as this process has been told
        (see :meth:`exited`). ``timeout_s`` is kept for callers of the earlier ping-based
        check; not waited."""
        return not self.exited(node_id)

    def client(self, timeout_s: float = 10.0, endpoints: list[str] | None = None) -> Client:
        return Client(endpoints or self.endpoints, token=self.token, timeout_s=timeout_s)

    def status(self, node_id: int, timeout_s: float = 2.0) -> dict | None:
        """The node's status, or None if it does not answer within ``timeout_s``."""
        endpoint = self.endpoint(node_id)
        try:
            with Client([endpoint], token=self.token, timeout_s=timeout_s) as c:
                return c.status(endpoint)
        except Unavailable:
            return None

    def leader(self, timeout_s: float = 30.0, exclude: tuple[int, ...] = ()) -> int:
        """Wait until a node (not in ``exclude``) is leader of the highest term any node
        that answers reports; return its id."""

        def find() -> int | None:
            best: tuple[int, int] | None = None
            terms = []
            for i in self.node_ids:
                st = self.status(i, timeout_s=0.5)
                if st is None:
                    continue
                terms.append(st["term"])
                if st["role"] == "leader" and i not in exclude and (
                        best is None or st["term"] > best[0]):
                    best = (st["term"], i)
            return best[1] if best is not None and best[0] >= max(terms) else None

        return _wait_until(find, timeout_s, "a leader to be elected", interval_s=0.05)

    # ------------------------------------------------------------ faults
    def kill(self, node_id: int) -> None:
        """``ray.kill`` the node's actor (its process dies as with SIGKILL); with
        ``node_processes``, SIGKILL the node's process."""
        import ray

        self._serving.pop(node_id, None)
        host = self.actors.pop(node_id)
        if self.node_processes:
            self._call(host, "kill", node_id)
        else:
            ray.kill(host)

    def restart(self, node_id: int, timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S) -> None:
        """Start a fresh actor for ``node_id`` on the same Ray node, data directory and
        address (stopping a live one first), and wait until it serves. Works after
        :meth:`kill` and after the actor's process was killed from outside. A node whose
        directory lost its state rejoins recovering, as in :meth:`LocalCluster.restart`."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        placed = self._placed[node_id]
        if self.node_processes:
            self._restart_process(node_id, timeout_s)
            return
        if node_id in self.actors:
            self._stop_actors([node_id], remove_dir=False)
        strategy = placed["strategy"]
        if not hasattr(strategy, "placement_group"):  # the WAL is on that host's disk
            strategy = NodeAffinitySchedulingStrategy(placed["ray_node_id"], soft=False)
        actor = self._new_actor(node_id, strategy, placed["data_dir"], self.data_dir is None)
        self.actors[node_id] = actor
        host, port = self.addresses[node_id]
        ray.get(actor.reserve.remote(self._multi_host, port), timeout=timeout_s)
        self._placed[node_id] = dict(ray.get(actor.where.remote(), timeout=timeout_s),
                                     strategy=placed["strategy"])
        ray.get(actor.start.remote(self.addresses, self.token, self.tick_s, rejoin=True,
                                   heartbeat_tick=self.heartbeat_tick, election_tick=self.election_tick,
                                   nice=self.nice, idle=self.idle_priority),
                timeout=timeout_s)
        self._serving[node_id] = actor.serve.remote()
        _wait_until(lambda: self.status(node_id) is not None, timeout_s,
                    f"node {node_id} to serve again")

    def _restart_process(self, node_id: int, timeout_s: float) -> None:
        import ray

        placed = self._placed[node_id]
        ray_node = placed["ray_node_id"]
        old = self.actors.pop(node_id, None)
        self._serving.pop(node_id, None)
        try:
            if old is not None:
                self._call(old, "stop", [node_id], False)
            host = self._host(ray_node)
            if not isinstance(host, NodeProcessHost):
                ray.get(host.__ray_ready__.remote(), timeout=timeout_s)
        except ray.exceptions.RayActorError:  # its host actor is gone: a new one on that Ray node
            self._hosts.pop(ray_node, None)
            host = self._host(ray_node)
        self._call(host, "reserve", node_id, placed["data_dir"], self._multi_host,
                   self.addresses[node_id][1], self.data_dir is None, timeout_s=timeout_s)
        started = self._call(host, "start", [node_id], self.addresses, True, timeout_s=timeout_s)
        self._started(host, started)
        _wait_until(lambda: self.status(node_id) is not None, timeout_s,
                    f"node {node_id} to serve again")

    def _stop_actors(self, node_ids: list[int], remove_dir: bool = True,
                     timeout_s: float = 30.0) -> None:
        """Stop these nodes as on SIGTERM (asked over their ports: their actors are parked
        serving), let their actors remove temporary directories, then end the actors. A node
        that cannot be asked (a stopped process) is killed."""
        import ray

        asked = []
        for i in node_ids:
            ref = self._serving.get(i)
            if ref is None or ray.wait([ref], timeout=0)[0]:
                continue  # not serving (dead, or stopped): nothing to ask
            try:
                with Client([self.endpoint(i)], token=self.token, timeout_s=5.0) as c:
                    c.admin_stop(self.endpoint(i))
                asked.append(ref)
            except Exception:  # noqa: BLE001 - it cannot stop gracefully: it is killed below
                pass
        if asked:
            ray.wait(asked, num_returns=len(asked), timeout=timeout_s)
        for i in node_ids:
            actor = self.actors.pop(i)
            ref = self._serving.pop(i, None)
            if ref is None or ray.wait([ref], timeout=0)[0]:  # serve() returned: it takes calls
                with contextlib.suppress(Exception):
                    ray.get(actor.stop.remote(remove_dir=remove_dir), timeout=timeout_s)
            with contextlib.suppress(Exception):
                ray.kill(actor)

    def stop(self) -> None:
        """Stop every node (removing temporary data directories, never a given data_dir)."""
        import ray

        if self.node_processes:
            self._stop_hosts()
            return
        self._stop_actors(list(self.actors))
        if self.data_dir is None:  # temporary dirs of killed nodes, when on this host
            here = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
            for i, placed in self._placed.items():
                if i not in self.actors and placed["ray_node_id"] == here:
                    shutil.rmtree(placed["data_dir"], ignore_errors=True)
        self.actors.clear()
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group

            with contextlib.suppress(Exception):
                remove_placement_group(self._pg)
            self._pg = None

    def _stop_hosts(self) -> None:
        """node_processes: stop every node (SIGTERM, from its host), then end the host actors."""
        import ray

        hosts, self._hosts = self._hosts, {}
        self.actors.clear()
        self._serving.clear()
        remote = [h for h in hosts.values() if not isinstance(h, NodeProcessHost)]
        refs = [h.stop.remote() for h in remote]
        for host in hosts.values():
            if isinstance(host, NodeProcessHost):
                host.stop()
        with contextlib.suppress(Exception):
            ray.get(refs, timeout=60)
        for host in remote:
            with contextlib.suppress(Exception):
                ray.kill(host)


def state_file_path() -> pathlib.Path:
    """Where ``coordinator local`` records its endpoints and token file for other commands."""
    env = os.environ.get("COORDINATOR_STATE_FILE")
    if env:
        return pathlib.Path(env)
    base = os.environ.get("XDG_RUNTIME_DIR") or os.path.join(pathlib.Path.home(), ".cache")
    return pathlib.Path(base) / "synctrain" / "coordinator-local.json"


def write_state_file(cluster: LocalCluster, path: pathlib.Path | None = None) -> pathlib.Path:
    """Record ``cluster`` (endpoints, token file, pids, this process as its owner) in
    ``path`` for the client commands; written whole (a reader never sees half of it)."""
    path = path or state_file_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(dict(cluster.describe(), owner_pid=os.getpid()), indent=2))
    os.replace(tmp, path)
    return path


def read_state_file(path: pathlib.Path) -> dict | None:
    """What a state file records, or None if there is none or it cannot be read."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def state_file_owner_alive(state: dict) -> bool:
    """Whether the ``coordinator local`` that wrote ``state`` still runs (a reused pid may
    pass for it: a stale file is then only found when its endpoints do not answer)."""
    pid = state.get("owner_pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    return True
