"""Coordinator benchmark: synctrain's coordinator vs etcd vs PySyncObj, same load, same run.

Three 3-node clusters on loopback, fsync on (etcd: its default; PySyncObj: its journal file;
coordinator: DiskStorage with fsync), measured one after another with the same client-side
harness:

- sequential put latency (one client, 64-byte values): p50 / p99;
- linearizable and stale get latency (etcd: its serializable read; PySyncObj: a local read);
- put throughput with 1, 16 and 64 concurrent clients: each client is a thread with its own
  connection, spread over ``LOAD_PROCESSES`` load-generator processes so the Python client is
  not the one GIL everything waits on; every client talks to the leader;
- failover: kill -9 the leader, time until a put is acknowledged by the new leader
  (``--failover-trials`` trials; the killed node is restarted between trials);
- watch: a watcher on a prefix (on the leader, from the next revision) and one writer process
  doing ``--watch-puts`` sequential puts under it: events/s delivered (first put's start to the
  last event's arrival) and each put's acknowledgement to its event's arrival, p50 / p99; the
  events must be exactly the puts, in revision order, or the row fails;
- rejoin: kill -9 a follower, ``--rejoin-writes`` puts meanwhile, start it again: seconds from
  the process spawn until that node's status shows it applied what the leader had committed at
  the restart (median of ``--rejoin-trials``), then once more with ``--rejoin-big`` more keys in
  the log. It runs on a fresh cluster, so every system's log holds the same writes.

``--rows`` runs some rows only; their figures then replace those rows in the results already
in ``--out`` and the other rows are kept (the report says which run measured which rows).
PySyncObj runs neither watch (it has none) nor rejoin.

Every loop is bounded in count and in time. The setup step installs what is missing:
``apt-get update && apt-get install -y etcd-server`` and ``pip install pysyncobj``.

    python benchmarks/coordinator_bench.py [--quick] [--systems coordinator,etcd,pysyncobj]
                                           [--rows latency,throughput,watch,failover,rejoin]

Results: ``benchmarks/results/coordinator_bench.{json,md}``.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import multiprocessing
import os
import pathlib
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
VALUE = b"v" * 64
LOAD_PROCESSES = 4
ROWS = ("latency", "throughput", "watch", "failover", "rejoin")
#: The result keys each row writes (a ``--rows`` run replaces these and keeps the others).
ROW_KEYS = {"latency": ("put_sequential", "get_linearizable", "get_stale_follower"),
            "throughput": ("throughput",), "watch": ("watch",), "failover": ("failover",),
            "rejoin": ("rejoin",)}
#: The settings each row records in the results' ``config``.
ROW_CONFIG = {"latency": ("sequential",), "throughput": ("clients", "duration_s", "load_processes"),
              "watch": ("watch_puts",), "failover": ("failover_trials",),
              "rejoin": ("rejoin_writes", "rejoin_trials", "rejoin_big")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100.0 * (len(ordered) - 1))))]


def wait_until(pred: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = pred()
        except Exception:  # noqa: BLE001 - any failure means "not yet"
            value = None
        if value:
            return value
        time.sleep(0.02)
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")


# ----------------------------------------------------------------------------- setup
def setup(systems: list[str]) -> None:
    """Install etcd (Debian etcd-server) and PySyncObj if they are missing."""
    if "etcd" in systems and shutil.which("etcd") is None:  # Debian's etcd-server package
        print("[setup] installing etcd-server with apt-get", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "etcd-server"], check=True, env=env)
    if "pysyncobj" in systems:
        try:
            import pysyncobj  # noqa: F401
        except ImportError:
            print("[setup] pip install pysyncobj", flush=True)
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "pysyncobj"], check=True)


# ----------------------------------------------------------------------------- systems
class System:
    """A 3-node cluster of one kind, plus how a client talks to it."""

    name = ""
    unsupported_rows: frozenset[str] = frozenset()

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def leader(self) -> int: ...
    def kill(self, node: int) -> None: ...
    def restart(self, node: int) -> None: ...
    def start_node(self, node: int) -> None:
        """Spawn a killed node's process again, without waiting for it."""
        raise NotImplementedError

    def raft_indexes(self, node: int) -> tuple[int, int]:
        """(commit index, applied index) from the node's status; raises if it does not answer."""
        raise NotImplementedError

    def client_spec(self, node: int | None) -> dict:
        """A picklable description a load process turns into a connection (make_conn)."""
        raise NotImplementedError


class CoordinatorSystem(System):
    """synctrain's coordinator with its defaults (a steady leader's fsync overlaps its appends)."""

    name = "coordinator"
    extra_args: list[str] = []
    warm_start = True  # nodes forked from LocalCluster's warm launcher (coordinator.launcher)

    def __init__(self) -> None:
        from coordinator import LocalCluster

        self.cluster = LocalCluster(nodes=3, fsync=True, extra_args=self.extra_args,
                                    warm_start=self.warm_start)

    def start(self) -> None:
        self.cluster.start()
        self.cluster.leader()

    def stop(self) -> None:
        self.cluster.stop()

    def leader(self) -> int:
        return self.cluster.leader()

    def kill(self, node: int) -> None:
        self.cluster.kill(node)

    def restart(self, node: int) -> None:
        self.cluster.restart(node)

    def start_node(self, node: int) -> None:
        self.cluster.start_node(node)

    def raft_indexes(self, node: int) -> tuple[int, int]:
        st = self.cluster.status(node, timeout_s=0.5)
        if st is None:
            raise RuntimeError(f"coordinator node {node} does not answer")
        return st["commit"], st["applied"]

    def client_spec(self, node: int | None) -> dict:
        eps = self.cluster.endpoints
        if node is not None:  # put the wanted node first; the client follows redirects
            eps = [self.cluster.endpoint(node)] + [e for e in eps if e != self.cluster.endpoint(node)]
        return {"kind": "coordinator", "endpoints": eps, "token": self.cluster.token}


class CoordinatorStrictSystem(CoordinatorSystem):
    """The same with ``--persist-before-send --commit-broadcast`` (the defaults before they
    changed): the leader too sends nothing before its own fsync returns (one more fsync on
    each write's critical path), and each new commit index goes out at once in empty appends."""

    name = "coordinator-strict"
    extra_args = ["--persist-before-send", "--commit-broadcast"]


class CoordinatorColdSystem(CoordinatorSystem):
    """The coordinator with every node a fresh ``python -m coordinator.cli serve`` (what a
    hand-run or systemd-run node does): its rejoin pays the interpreter's start and imports."""

    name = "coordinator-cold"
    warm_start = False
    unsupported_rows = frozenset({"latency", "throughput", "failover", "watch"})


class EtcdSystem(System):
    """Three ``etcd`` processes with default timing (heartbeat 100 ms, election 1000 ms)."""

    name = "etcd"

    def __init__(self) -> None:
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="bench-etcd-"))
        self.client_ports = {i: free_port() for i in (1, 2, 3)}
        self.peer_ports = {i: free_port() for i in (1, 2, 3)}
        self.procs: dict[int, subprocess.Popen] = {}

    def _spawn(self, i: int, state: str) -> None:
        cluster = ",".join(f"n{j}=http://127.0.0.1:{p}" for j, p in self.peer_ports.items())
        cmd = ["etcd", "--name", f"n{i}", "--data-dir", str(self.dir / f"n{i}"),
               "--listen-client-urls", f"http://127.0.0.1:{self.client_ports[i]}",
               "--advertise-client-urls", f"http://127.0.0.1:{self.client_ports[i]}",
               "--listen-peer-urls", f"http://127.0.0.1:{self.peer_ports[i]}",
               "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_ports[i]}",
               "--initial-cluster", cluster, "--initial-cluster-state", state,
               "--initial-cluster-token", "bench"]
        log = open(self.dir / f"n{i}.log", "ab")  # noqa: SIM115 - owned by the child
        self.procs[i] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        log.close()

    def start(self) -> None:
        for i in (1, 2, 3):
            self._spawn(i, "new")
        self.leader()

    def _status(self, i: int) -> dict:
        return _etcd_call(self.client_ports[i], "/v3/maintenance/status", {}, timeout_s=1.0)

    def leader(self) -> int:
        def find() -> int | None:
            for i, proc in self.procs.items():
                if proc.poll() is not None:
                    continue
                st = self._status(i)
                if st.get("leader") and st["leader"] == st["header"]["member_id"]:
                    return i
            return None

        return wait_until(find, 60, "an etcd leader")

    def kill(self, node: int) -> None:
        self.procs[node].kill()
        self.procs[node].wait()

    def restart(self, node: int) -> None:
        self.start_node(node)
        wait_until(lambda: self._status(node).get("leader"), 60, f"etcd n{node} to rejoin")

    def start_node(self, node: int) -> None:
        self._spawn(node, "existing")

    def raft_indexes(self, node: int) -> tuple[int, int]:
        st = self._status(node)  # raftIndex: the node's commit index (int64s come as strings)
        return int(st["raftIndex"]), int(st["raftAppliedIndex"])

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def client_spec(self, node: int | None) -> dict:
        order = [node] if node else []
        order += [i for i in (1, 2, 3) if i != node]
        return {"kind": "etcd", "ports": [self.client_ports[i] for i in order]}


def _etcd_call(port: int, path: str, body: dict, timeout_s: float) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = json.loads(resp.read() or b"{}")
        if resp.status != 200:
            raise RuntimeError(f"etcd {path}: HTTP {resp.status} {data}")
        return data
    finally:
        conn.close()


class PySyncObjSystem(System):
    """Three PySyncObj nodes (ReplDict, journal file), each with a tiny HTTP front end."""

    name = "pysyncobj"
    unsupported_rows = frozenset({"watch", "rejoin"})

    def __init__(self) -> None:
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="bench-pso-"))
        self.raft_ports = {i: free_port() for i in (1, 2, 3)}
        self.http_ports = {i: free_port() for i in (1, 2, 3)}
        self.procs: dict[int, subprocess.Popen] = {}

    def _spawn(self, i: int) -> None:
        partners = ",".join(f"127.0.0.1:{p}" for j, p in self.raft_ports.items() if j != i)
        cmd = [sys.executable, __file__, "--pysyncobj-node", f"127.0.0.1:{self.raft_ports[i]}",
               partners, str(self.http_ports[i]), str(self.dir / f"n{i}.journal")]
        log = open(self.dir / f"n{i}.log", "ab")  # noqa: SIM115 - owned by the child
        self.procs[i] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        log.close()

    def _status(self, i: int) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_ports[i], timeout=1.0)
        try:
            conn.request("GET", "/status")
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def start(self) -> None:
        for i in (1, 2, 3):
            self._spawn(i)
        self.leader()

    def leader(self) -> int:
        def find() -> int | None:
            for i, proc in self.procs.items():
                if proc.poll() is None and self._status(i).get("is_leader"):
                    return i
            return None

        return wait_until(find, 60, "a PySyncObj leader")

    def kill(self, node: int) -> None:
        self.procs[node].kill()
        self.procs[node].wait()

    def restart(self, node: int) -> None:
        self._spawn(node)
        wait_until(lambda: self._status(node).get("ready"), 60, f"PySyncObj n{node} to rejoin")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def client_spec(self, node: int | None) -> dict:
        order = [node] if node else []
        order += [i for i in (1, 2, 3) if i != node]
        return {"kind": "pysyncobj", "ports": [self.http_ports[i] for i in order]}


def pysyncobj_node_main(self_addr: str, partners: str, http_port: int, journal: str) -> None:
    """One PySyncObj node process: a replicated dict behind a minimal HTTP API."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from pysyncobj import SyncObj, SyncObjConf
    from pysyncobj.batteries import ReplDict

    store = ReplDict()
    conf = SyncObjConf(journalFile=journal, dynamicMembershipChange=False)
    node = SyncObj(self_addr, partners.split(","), conf=conf, consumers=[store])

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()  # answers go out in two writes: no Nagle delay between them
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, *args: Any) -> None:
            pass

        def _reply(self, code: int, doc: dict) -> None:
            body = json.dumps(doc).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/status":
                leader = node._getLeader()
                self._reply(200, {"is_leader": node._isLeader(), "ready": node.isReady(),
                                  "leader": str(leader) if leader else None})
            else:
                self._reply(200, {"value": store.get(self.path[1:])})

        def do_PUT(self) -> None:  # noqa: N802
            value = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                store.set(self.path[1:], value.decode(), sync=True, timeout=2.0)
            except Exception as exc:  # noqa: BLE001 - report any failure as 503
                self._reply(503, {"error": type(exc).__name__})
                return
            self._reply(200, {"ok": True})

    ThreadingHTTPServer(("127.0.0.1", http_port), Handler).serve_forever()


# ----------------------------------------------------------------------------- clients
class Conn:
    def put(self, key: str, value: bytes) -> int | None:
        """Store ``value``; the new revision (None where the system has none)."""

    def get(self, key: str, stale: bool) -> Any: ...
    def close(self) -> None: ...


class CoordinatorConn(Conn):
    def __init__(self, spec: dict, timeout_s: float) -> None:
        from coordinator import Client

        self.c = Client(spec["endpoints"], token=spec["token"], timeout_s=timeout_s)

    def put(self, key: str, value: bytes) -> int:
        return self.c.put(key, value)

    def get(self, key: str, stale: bool) -> Any:
        return self.c.get(key, consistency="stale" if stale else "linearizable")

    def close(self) -> None:
        self.c.close()


class HttpConn(Conn):
    """Keep-alive HTTP to one node; on failure, the next node of ``ports``."""

    def __init__(self, spec: dict, timeout_s: float, attempt_timeout_s: float = 2.0) -> None:
        self.ports, self.i, self.timeout_s = spec["ports"], 0, timeout_s
        self.attempt_timeout_s = attempt_timeout_s
        self.kind = spec["kind"]
        self.conn: http.client.HTTPConnection | None = None

    def _request(self, method: str, path: str, body: bytes | None) -> dict:
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection("127.0.0.1", self.ports[self.i],
                                                           timeout=min(self.attempt_timeout_s, self.timeout_s))
                self.conn.request(method, path, body, {"Content-Type": "application/json"})
                resp = self.conn.getresponse()
                data = json.loads(resp.read() or b"{}")
                if resp.status == 200 and "error" not in data:
                    return data
                raise RuntimeError(f"HTTP {resp.status}: {data}")
            except Exception:
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                self.i = (self.i + 1) % len(self.ports)
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)

    def put(self, key: str, value: bytes) -> int | None:
        if self.kind == "etcd":
            body = {"key": base64.b64encode(key.encode()).decode(),
                    "value": base64.b64encode(value).decode()}
            return int(self._request("POST", "/v3/kv/put", json.dumps(body).encode())["header"]["revision"])
        self._request("PUT", "/" + key, value)
        return None

    def get(self, key: str, stale: bool) -> Any:
        if self.kind == "etcd":
            body = {"key": base64.b64encode(key.encode()).decode(), "serializable": stale}
            return self._request("POST", "/v3/kv/range", json.dumps(body).encode())
        return self._request("GET", "/" + key, None)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def make_conn(spec: dict, timeout_s: float = 10.0, attempt_timeout_s: float = 2.0) -> Conn:
    """A connection; ``attempt_timeout_s`` bounds one HTTP attempt before the next node is
    tried (the coordinator client has its own, 1 s, and sees a killed node at once)."""
    if spec["kind"] == "coordinator":
        return CoordinatorConn(spec, timeout_s)
    return HttpConn(spec, timeout_s, attempt_timeout_s)


class CoordinatorWatchStream:
    """``Client.watch(prefix, prefix=True, start_revision=...)``: its long polls, as
    (revision, key) pairs."""

    def __init__(self, spec: dict, prefix: str, start_revision: int) -> None:
        from coordinator import Client

        self.c = Client(spec["endpoints"], token=spec["token"], timeout_s=10.0)
        self.watch = self.c.watch(prefix, prefix=True, start_revision=start_revision)

    def __iter__(self) -> Any:
        for event in self.watch:
            yield event.revision, event.kv.key.decode()

    def close(self) -> None:
        self.watch.cancel()  # the iteration ends within one long poll
        self.c.close()


class EtcdWatchStream:
    """etcd's v3 JSON gateway: a streaming POST /v3/watch, one JSON message a line."""

    def __init__(self, spec: dict, prefix: str, start_revision: int) -> None:
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)  # the prefix's range end
        b64 = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731
        body = {"create_request": {"key": b64(prefix), "range_end": b64(end),
                                   "start_revision": start_revision}}
        self.conn = http.client.HTTPConnection("127.0.0.1", spec["ports"][0], timeout=30.0)
        self.conn.request("POST", "/v3/watch", json.dumps(body), {"Content-Type": "application/json"})
        self.resp = self.conn.getresponse()
        first = self._message()
        if self.resp.status != 200 or not first.get("created"):
            raise RuntimeError(f"etcd watch not created: HTTP {self.resp.status} {first}")

    def _message(self) -> dict:
        line = self.resp.readline()  # http.client undoes the chunked encoding
        if not line:
            raise EOFError("etcd closed the watch stream")
        msg = json.loads(line)
        if "result" not in msg or msg["result"].get("canceled"):
            raise RuntimeError(f"etcd watch failed: {msg}")
        return msg["result"]

    def __iter__(self) -> Any:
        while True:
            for event in self._message().get("events", []):
                yield int(event["kv"]["mod_revision"]), base64.b64decode(event["kv"]["key"]).decode()

    def close(self) -> None:
        self.conn.close()


def open_watch(spec: dict, prefix: str, start_revision: int) -> CoordinatorWatchStream | EtcdWatchStream:
    if spec["kind"] == "coordinator":
        return CoordinatorWatchStream(spec, prefix, start_revision)
    return EtcdWatchStream(spec, prefix, start_revision)


# ----------------------------------------------------------------------------- measurements
def latency_ms(conn: Conn, op: Callable[[int], Any], count: int, budget_s: float) -> dict:
    samples: list[float] = []
    deadline = time.monotonic() + budget_s
    for i in range(count):
        if time.monotonic() > deadline:
            break
        t0 = time.perf_counter()
        op(i)
        samples.append((time.perf_counter() - t0) * 1e3)
    return {"n": len(samples), "p50_ms": round(percentile(samples, 50), 3),
            "p99_ms": round(percentile(samples, 99), 3),
            "mean_ms": round(statistics.fmean(samples), 3) if samples else None}


def _load_process(spec: dict, threads: int, duration_s: float, max_ops: int, key_space: int,
                  tag: str, out: Any) -> None:
    counts = [0] * threads
    errors = [0] * threads
    start = threading.Barrier(threads + 1)
    stop_at = [0.0]

    def worker(t: int) -> None:
        conn = make_conn(spec)
        conn.put(f"{tag}-warm-{t}", VALUE)
        start.wait()
        i = 0
        while time.monotonic() < stop_at[0] and i < max_ops:
            try:
                conn.put(f"{tag}-{t}-{i % key_space}", VALUE)
                counts[t] += 1
            except Exception:  # noqa: BLE001 - counted, the run goes on
                errors[t] += 1
            i += 1
        conn.close()

    ts = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(threads)]
    for t in ts:
        t.start()
    stop_at[0] = time.monotonic() + duration_s + 1e9  # placeholder until all are connected
    start.wait()
    t0 = time.monotonic()
    stop_at[0] = t0 + duration_s
    for t in ts:
        t.join(duration_s + 30)
    out.put((sum(counts), sum(errors), time.monotonic() - t0))


def throughput(spec: dict, clients: int, duration_s: float, max_ops: int = 200_000,
               key_space: int = 100, tag: str = "") -> dict:
    """Puts from ``clients`` clients for ``duration_s`` (or ``max_ops`` puts each), each
    client cycling over ``key_space`` keys of its own."""
    procs_n = min(LOAD_PROCESSES, clients)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    per = [clients // procs_n + (1 if k < clients % procs_n else 0) for k in range(procs_n)]
    procs = [ctx.Process(target=_load_process,
                         args=(spec, n, duration_s, max_ops, key_space, f"{tag}c{clients}p{k}", out))
             for k, n in enumerate(per)]
    for p in procs:
        p.start()
    results = [out.get(timeout=duration_s + 120) for _ in procs]
    for p in procs:
        p.join(30)
    ops = sum(r[0] for r in results)
    elapsed = max(r[2] for r in results)
    return {"clients": clients, "ops": ops, "errors": sum(r[1] for r in results),
            "seconds": round(elapsed, 2), "ops_per_s": round(ops / elapsed, 1)}


def failover(system: System, trials: int, budget_s: float) -> dict:
    times: list[float] = []
    deadline = time.monotonic() + budget_s
    for trial in range(trials):
        if time.monotonic() > deadline:
            break
        leader = system.leader()
        others = [i for i in (1, 2, 3) if i != leader]
        conn = make_conn(system.client_spec(others[0]), timeout_s=30.0, attempt_timeout_s=0.3)
        conn.put("failover-warm", VALUE)
        system.kill(leader)
        t0 = time.perf_counter()
        conn.put(f"failover-{trial}", VALUE)
        times.append((time.perf_counter() - t0) * 1e3)
        conn.close()
        system.restart(leader)
        print(f"    failover trial {trial}: {times[-1]:.0f} ms", flush=True)
    return {"trials": len(times), "median_ms": round(statistics.median(times), 1) if times else None,
            "max_ms": round(max(times), 1) if times else None, "all_ms": [round(t, 1) for t in times]}


def write_keys(spec: dict, count: int, tag: str, clients: int = 16) -> int:
    """``count`` puts of distinct keys (rounded down to a multiple of ``clients``) from the load
    processes; raises unless every one was acknowledged. Returns how many there were."""
    each = max(1, count // clients)
    r = throughput(spec, clients, duration_s=120.0, max_ops=each, key_space=each, tag=tag)
    if r["ops"] != each * clients or r["errors"]:
        raise RuntimeError(f"writing {each * clients} keys under {tag!r}: {r}")
    return r["ops"]


def put_revision(conn: Conn, key: str) -> int:
    revision = conn.put(key, VALUE)
    if revision is None:
        raise RuntimeError("this system's puts have no revision")
    return revision


def _watch_writer(spec: dict, prefix: str, count: int, budget_s: float, out: Any) -> None:
    """One client's sequential puts: (revision, key, call start, acknowledged) of each."""
    conn = make_conn(spec)
    acks: list[tuple[int, str, float, float]] = []
    deadline = time.monotonic() + budget_s
    for i in range(count):
        if time.monotonic() > deadline:
            break
        key = f"{prefix}{i:06d}"
        t0 = time.monotonic()
        revision = put_revision(conn, key)
        acks.append((revision, key, t0, time.monotonic()))
    conn.close()
    out.put(acks)


def watch_row(system: System, puts: int, budget_s: float = 120.0) -> dict:
    """A watcher on a prefix (this process, on the leader, from the next revision) and a writer
    process putting ``puts`` keys under it. Times are CLOCK_MONOTONIC, the same in both
    processes; the writer has its own process so the two do not share a GIL."""
    spec = system.client_spec(system.leader())
    conn = make_conn(spec)
    start_revision = put_revision(conn, "watch-warm") + 1
    conn.close()
    prefix = "watch/"
    stream = open_watch(spec, prefix, start_revision)
    arrivals: list[tuple[int, str, float]] = []
    failure: list[Exception] = []
    stopping = threading.Event()

    def consume() -> None:
        try:
            for revision, key in stream:
                arrivals.append((revision, key, time.monotonic()))
                if len(arrivals) >= puts:
                    return
        except Exception as exc:  # noqa: BLE001 - reported below, unless we closed it
            if not stopping.is_set():
                failure.append(exc)

    watcher = threading.Thread(target=consume, daemon=True, name="watcher")
    watcher.start()
    time.sleep(0.5)  # the watcher's first request is waiting before the first put
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    writer = ctx.Process(target=_watch_writer, args=(spec, prefix, puts, budget_s, out))
    writer.start()
    acks = out.get(timeout=budget_s + 60)
    writer.join(30)
    try:
        wait_until(lambda: len(arrivals) >= len(acks) or failure, 30, "the watcher's last event")
    finally:
        stopping.set()
        stream.close()
        watcher.join(5)
    if failure:
        raise RuntimeError(f"the watcher failed after {len(arrivals)} events: {failure[0]!r}")
    got = [(revision, key) for revision, key, _ in arrivals]
    put = sorted((revision, key) for revision, key, _, _ in acks)
    if got != put:
        first = next((i for i, (a, b) in enumerate(zip(got, put, strict=False)) if a != b),
                     min(len(got), len(put)))
        raise RuntimeError(f"the watcher got {len(got)} events for {len(acks)} puts; first difference "
                           f"at #{first}: got {got[first:first + 3]}, put {put[first:first + 3]}")
    arrived = {revision: t for revision, _, t in arrivals}
    after_ack = [(arrived[revision] - acked) * 1e3 for revision, _, _, acked in acks]
    after_start = [(arrived[revision] - t0) * 1e3 for revision, _, t0, _ in acks]
    first_put = acks[0][2]
    return {"puts": len(acks), "events": len(arrivals),
            "events_per_s": round(len(arrivals) / (arrivals[-1][2] - first_put), 1),
            "puts_per_s": round(len(acks) / (acks[-1][3] - first_put), 1),
            "ack_to_event_p50_ms": round(percentile(after_ack, 50), 3),
            "ack_to_event_p99_ms": round(percentile(after_ack, 99), 3),
            "ack_to_event_max_ms": round(max(after_ack), 3),
            "events_before_ack": sum(ms < 0 for ms in after_ack),
            "put_start_to_event_p50_ms": round(percentile(after_start, 50), 3)}


def rejoin_once(system: System, writes: int, tag: str) -> dict:
    """Kill a follower, ``writes`` puts meanwhile, spawn it again: seconds until its status
    answers, and until it has applied what the leader had committed at the restart."""
    leader = system.leader()
    node = next(i for i in (1, 2, 3) if i != leader)
    system.kill(node)
    write_keys(system.client_spec(leader), writes, tag, clients=4)
    commit = system.raft_indexes(leader)[0]
    answered: list[float] = []

    def caught_up() -> bool:
        applied = system.raft_indexes(node)[1]
        if not answered:
            answered.append(time.monotonic())
        return applied >= commit

    t0 = time.monotonic()
    system.start_node(node)
    wait_until(caught_up, 120, f"{system.name} node {node} to apply index {commit}")
    done = time.monotonic()
    return {"node": node, "leader_commit": commit, "answered_s": round(answered[0] - t0, 3),
            "caught_up_s": round(done - t0, 3)}


def rejoin(system: System, writes: int, trials: int, big: int) -> dict:
    runs = []
    for trial in range(trials):
        runs.append(rejoin_once(system, writes, f"rejoin{trial}-"))
        print(f"    rejoin trial {trial}: {runs[-1]}", flush=True)
    seconds = [r["caught_up_s"] for r in runs]
    res: dict[str, Any] = {"trials": runs, "median_s": round(statistics.median(seconds), 3), "max_s": max(seconds)}
    if big:
        write_keys(system.client_spec(system.leader()), big, "big-")
        res["big"] = rejoin_once(system, writes, "rejoin-big-")
        print(f"    rejoin after {big} more keys: {res['big']}", flush=True)
    return res


def checked_row(name: str, measure: Callable[[], dict]) -> dict:
    """A row that fails alone: its error is recorded and the other rows go on."""
    load_before = os.getloadavg()[0]
    try:
        res = measure()
    except Exception as exc:  # noqa: BLE001 - recorded, and the run exits 1
        print(f"  {name} FAILED: {exc!r}", flush=True)
        res = {"error": repr(exc)}
    res["load_avg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print(f"  {name}: {res}", flush=True)
    return res


def on_cluster(system: System, measure: Callable[[System], None]) -> None:
    print(f"[{system.name}] starting a 3-node cluster", flush=True)
    system.start()
    try:
        measure(system)
    finally:
        system.stop()


def bench_system(make: type[System], args: argparse.Namespace) -> dict:
    """The selected rows of one system; rejoin on a fresh cluster of its own."""
    rows = [r for r in args.rows if r not in make.unsupported_rows]
    res: dict[str, Any] = {}
    if set(rows) - {"rejoin"}:
        on_cluster(make(), lambda system: bench_rows(system, rows, args, res))
    if "rejoin" in rows:
        on_cluster(make(), lambda system: res.update(rejoin=checked_row("rejoin", lambda: rejoin(
            system, args.rejoin_writes, args.rejoin_trials, args.rejoin_big))))
    return res


def bench_rows(system: System, rows: list[str], args: argparse.Namespace, res: dict[str, Any]) -> None:
    leader = system.leader()
    if "latency" in rows:
        conn = make_conn(system.client_spec(leader))
        seq_budget = 20.0 if system.name != "pysyncobj" else 15.0
        res["put_sequential"] = latency_ms(
            conn, lambda i: conn.put(f"seq-{i % 100}", VALUE), args.sequential, seq_budget)
        print(f"  sequential put: {res['put_sequential']}", flush=True)
        res["get_linearizable"] = latency_ms(
            conn, lambda i: conn.get(f"seq-{i % 100}", stale=False), args.sequential, seq_budget)
        if system.name != "pysyncobj":  # a PySyncObj read is always local (stale)
            print(f"  linearizable get: {res['get_linearizable']}", flush=True)
        else:
            res.pop("get_linearizable")
        follower = [i for i in (1, 2, 3) if i != leader][0]
        fconn = make_conn(system.client_spec(follower))
        res["get_stale_follower"] = latency_ms(
            fconn, lambda i: fconn.get(f"seq-{i % 100}", stale=True), args.sequential, seq_budget)
        print(f"  stale get (follower): {res['get_stale_follower']}", flush=True)
        fconn.close()
        conn.close()
    if "throughput" in rows:
        res["throughput"] = []
        for clients in args.clients:
            r = throughput(system.client_spec(leader), clients, args.duration)
            res["throughput"].append(r)
            print(f"  throughput: {r}", flush=True)
    if "watch" in rows:
        res["watch"] = checked_row("watch", lambda: watch_row(system, args.watch_puts))
    if "failover" in rows:
        res["failover"] = failover(system, args.failover_trials, budget_s=180.0)
        print(f"  failover: {res['failover']}", flush=True)


# ----------------------------------------------------------------------------- report
class RowFailed(Exception):
    pass


def _row(r: dict, key: str) -> dict:
    """A checked row's result; RowFailed (a "failed" cell) if it failed."""
    if "error" in r[key]:
        raise RowFailed(r[key]["error"])
    return r[key]


def _load(r: dict) -> str:
    return "; ".join(f"{key} {'/'.join(map(str, r[key]['load_avg_1min']))}"
                     for key in ("watch", "rejoin") if key in r) or "n/a"


def recorded_runs(results: dict) -> list[dict]:
    """Which run measured which rows; results from before runs were recorded: one full run."""
    return results.get("runs") or [{
        "rows": [row for row in ROWS if any(key in entry for entry in results["systems"].values()
                                            for key in ROW_KEYS[row])],
        "systems": list(results["systems"]), "command": "python benchmarks/coordinator_bench.py"}]


def _runs_line(results: dict) -> str:
    parts = []
    for run in recorded_runs(results):
        when = f", {run['when']}" if run.get("when") else ""
        systems = f" ({', '.join(run['systems'])})" if run.get("systems") else ""
        parts.append(f"rows {', '.join(run['rows'])}{systems} from `{run['command']}`{when}")
    return ("R" + "; ".join(parts)[1:]) + "."


def markdown(results: dict) -> str:
    order = ("coordinator", "coordinator-cold", "coordinator-strict", "etcd", "pysyncobj")
    systems = [s for s in order if s in results["systems"]]
    cfg = results["config"]
    rows = [("sequential put p50 (ms)", lambda r: r["put_sequential"]["p50_ms"]),
            ("sequential put p99 (ms)", lambda r: r["put_sequential"]["p99_ms"]),
            ("linearizable get p50 (ms)", lambda r: r.get("get_linearizable", {}).get("p50_ms", "n/a")),
            ("stale get p50, follower (ms)", lambda r: r["get_stale_follower"]["p50_ms"])]
    for k, clients in enumerate(cfg.get("clients", [])):
        rows.append((f"puts/s, {clients} clients", lambda r, k=k: r["throughput"][k]["ops_per_s"]))
    rows += [(f"watch events/s ({cfg.get('watch_puts')} puts, one writer)",
              lambda r: _row(r, "watch")["events_per_s"]),
             ("watch put ack -> event p50 (ms)", lambda r: _row(r, "watch")["ack_to_event_p50_ms"]),
             ("watch put ack -> event p99 (ms)", lambda r: _row(r, "watch")["ack_to_event_p99_ms"]),
             ("failover median (ms)", lambda r: r["failover"]["median_ms"]),
             ("failover max (ms)", lambda r: r["failover"]["max_ms"]),
             ("failover trials", lambda r: r["failover"]["trials"]),
             (f"rejoin: spawn -> caught up, median of {cfg.get('rejoin_trials')} (s)",
              lambda r: _row(r, "rejoin")["median_s"]),
             (f"rejoin after {cfg.get('rejoin_big')} more keys (s)",
              lambda r: _row(r, "rejoin")["big"]["caught_up_s"]),
             ("rejoin: leader commit index at the spawn (last trial / more keys)",
              lambda r: f"{_row(r, 'rejoin')['trials'][-1]['leader_commit']}/"
                        f"{r['rejoin']['big']['leader_commit']}"),
             ("1-min load average before/after", lambda r: "/".join(map(str, r["load_avg_1min"]))),
             ("1-min load average before/after: watch; rejoin", _load)]
    lines = ["# Coordinator benchmark", "",
             f"{results['machine']}; 3 nodes on loopback, fsync on; 64-byte values"
             + (f"; {cfg['duration_s']} s per throughput point" if "duration_s" in cfg else "")
             + f". {_runs_line(results)}", "",
             "| metric | " + " | ".join(systems) + " |", "|---|" + "---|" * len(systems)]
    for label, fn in rows:
        cells = []
        for s in systems:
            r = results["systems"][s]
            try:
                cells.append(str(fn(r)) if "error" not in r else "error")
            except RowFailed:
                cells.append("failed")
            except (KeyError, IndexError, TypeError):
                cells.append("n/a")
        if set(cells) != {"n/a"}:  # a row no system ran is left out
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for s in systems:
        r = results["systems"][s]
        for what, res in [("", r), *((f" {key}", r[key]) for key in ("watch", "rejoin") if key in r)]:
            if "error" in res:
                lines.append(f"\n{s}{what} failed: {res['error']}")
    lines += ["", "Targets: sequential p50 <= 1.0 ms; puts/s at 64 clients >= etcd's; failover "
              "median <= 300 ms and max <= 1 s.",
              "Watch: one watcher on the leader from the next revision (the coordinator's "
              "`Client.watch`, a long poll; etcd's `/v3/watch` JSON stream) and one writer, in a "
              "process of its own, doing sequential puts under the prefix. Events/s counts from "
              "the first put's start to the last event's arrival, so it is bounded by the "
              "writer's put rate (`puts_per_s` in the JSON); ack -> event is the event's arrival "
              "at the watcher less the put's return to the writer (negative: the event came "
              "first). Rejoin: a follower killed with SIGKILL, puts while it is down, then "
              "spawned again: seconds from the spawn until its status shows it applied what the "
              "leader had committed at the spawn (process start included: for `coordinator` a fork "
              "of LocalCluster's warm launcher, which has imported the server, for "
              "`coordinator-cold` a fresh Python process, for etcd its Go binary); on a fresh "
              "cluster, so each system's log holds the same writes. "
              "PySyncObj has no watch and runs no rejoin.",
              "`coordinator` runs with its defaults: a steady leader's own fsync overlaps its "
              "appends (Raft thesis 10.2.1, as etcd does); `coordinator-strict` runs with "
              "`--persist-before-send --commit-broadcast`: the leader too sends nothing before "
              "its fsync returns, and each new commit index is broadcast at once. Systems run "
              "one after another on the same "
              "machine; the load average row shows how busy it was (other jobs included), and "
              "figures on a shared 2-core machine vary from run to run.", ""]
    return "\n".join(lines)


def merge_results(old: dict, new: dict, rows: list[str]) -> dict:
    """``new``, a run of some ``rows``, over ``old``: those rows' results and settings replaced,
    the other rows kept, and ``runs`` saying which run measured which rows."""
    replaced = {key for row in rows for key in ROW_KEYS[row]}
    runs = recorded_runs(old)
    for run in runs:  # a row stays credited to a run that measured systems this one did not
        run["rows"] = [row for row in run["rows"]
                       if row not in rows or set(run["systems"]) - set(new["systems"])]
    systems = old["systems"]
    for name, entry in new["systems"].items():
        before = {} if "error" in systems.get(name, {}) else systems.get(name, {})
        systems[name] = {k: v for k, v in before.items() if k not in replaced} | entry
    return {"machine": new["machine"], "config": old["config"] | new["config"], "systems": systems,
            "runs": [run for run in runs if run["rows"]] + new["runs"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--systems", default="coordinator,coordinator-strict,etcd,pysyncobj")
    parser.add_argument("--sequential", type=int, default=1000, help="ops per latency series")
    parser.add_argument("--clients", default="1,16,64")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per throughput point")
    parser.add_argument("--failover-trials", type=int, default=7)
    parser.add_argument("--watch-puts", type=int, default=2000, help="puts the watcher must see")
    parser.add_argument("--rejoin-writes", type=int, default=500, help="puts while the follower is down")
    parser.add_argument("--rejoin-trials", type=int, default=3)
    parser.add_argument("--rejoin-big", type=int, default=20_000,
                        help="keys written before the last rejoin (0: none)")
    parser.add_argument("--rows", default=",".join(ROWS),
                        help="rows to run; the others are kept from the results in --out")
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]
    asked = {r.strip() for r in args.rows.split(",") if r.strip()}
    if asked - set(ROWS):
        parser.error(f"unknown rows {', '.join(sorted(asked - set(ROWS)))}; rows: {', '.join(ROWS)}")
    args.rows = [r for r in ROWS if r in asked]  # in ROWS order
    if args.quick:
        args.sequential, args.duration, args.failover_trials = 200, 2.0, 5
        args.watch_puts, args.rejoin_writes, args.rejoin_big = 500, 200, 3000
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    setup(systems)
    makers = {"coordinator": CoordinatorSystem, "coordinator-strict": CoordinatorStrictSystem,
              "coordinator-cold": CoordinatorColdSystem,
              "etcd": EtcdSystem, "pysyncobj": PySyncObjSystem}
    config = {"sequential": args.sequential, "clients": args.clients, "duration_s": args.duration,
              "load_processes": LOAD_PROCESSES, "failover_trials": args.failover_trials,
              "watch_puts": args.watch_puts, "rejoin_writes": args.rejoin_writes,
              "rejoin_trials": args.rejoin_trials, "rejoin_big": args.rejoin_big}
    command = shlex.join(["python", "benchmarks/coordinator_bench.py",
                          *(sys.argv[1:] if argv is None else argv)])
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "config": {key: config[key] for row in args.rows for key in ROW_CONFIG[row]},
        "systems": {},
        "runs": [{"rows": args.rows, "systems": systems, "command": command,
                  "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}],
    }
    partial = len(args.rows) < len(ROWS)
    for name in systems:
        load_before = os.getloadavg()[0]
        try:
            results["systems"][name] = bench_system(makers[name], args)
        except Exception as exc:  # noqa: BLE001 - one system failing still reports the others
            print(f"[{name}] failed: {exc!r}", flush=True)
            results["systems"][name] = {"error": repr(exc)}
        if not partial:  # the machine may be shared: how busy it was around each system's run
            results["systems"][name]["load_avg_1min"] = [round(load_before, 2),
                                                         round(os.getloadavg()[0], 2)]
    failed = [f"{name} {row}" for name, r in results["systems"].items() for row in ("watch", "rejoin")
              if "error" in r.get(row, {})]
    json_path = args.out / "coordinator_bench.json"
    if partial and json_path.is_file():
        results = merge_results(json.loads(json_path.read_text()), results, args.rows)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "coordinator_bench.md").write_text(markdown(results))
    print(markdown(results))
    if failed:
        print(f"FAILED rows: {', '.join(failed)}", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--pysyncobj-node":
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        pysyncobj_node_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:
        sys.exit(main())
