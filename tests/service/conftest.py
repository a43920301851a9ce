"""Fixtures for the service tests: real clusters of real processes, and a client workload
whose history is checked for linearizability.

The tests run with ``--import-mode=importlib``, so helpers are handed out by fixtures
(``make_cluster``, ``Workload``) rather than imported.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from coordinator import Client, LocalCluster, OutcomeUnknown, Unavailable
from coordinator.testing.history import Operation, OpKind
from coordinator.testing.linearizability import CheckResult, check_history

# Generous: the CI machine has 2 slow cores shared with everything else.
OP_TIMEOUT_S = 15.0
CONDITION_TIMEOUT_S = 60.0


def wait_for(predicate: Callable[[], object], what: str, timeout_s: float = CONDITION_TIMEOUT_S,
             interval_s: float = 0.05) -> object:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


@pytest.fixture
def make_cluster(tmp_path, request) -> Iterator[Callable[..., LocalCluster]]:
    """``make_cluster(nodes=3, **kw)`` starts a LocalCluster under tmp_path, stopped at the
    end; a failing test prints the tail of every node's log."""
    clusters: list[LocalCluster] = []

    def make(nodes: int = 3, **kwargs) -> LocalCluster:
        cluster = LocalCluster(nodes=nodes, data_dir=tmp_path / f"cluster{len(clusters)}", **kwargs)
        clusters.append(cluster)
        cluster.start()
        return cluster

    yield make
    failed = getattr(request.node, "rep_call", None)
    for cluster in clusters:
        cluster.stop()
        if failed is not None and failed.failed:
            for i in cluster.node_ids:
                text = cluster.log_path(i).read_text(errors="replace")[-4000:]
                print(f"----- node {i} log tail -----\n{text}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def timed_call(call: Callable[[], object]) -> tuple[object, bool, int, int] | None:
    """Run one client operation for a history: (output, unknown, call ns, return ns), or None
    when it certainly did not apply (Unavailable: not part of the history)."""
    start = time.monotonic_ns()
    unknown, output = False, None
    try:
        output = call()
    except OutcomeUnknown:
        unknown = True
    except Unavailable:
        return None
    return output, unknown, start, time.monotonic_ns()


@pytest.fixture(name="timed_call")
def timed_call_fixture():
    """The :func:`timed_call` helper."""
    return timed_call


class _Workload:
    """A few client threads doing reads, writes and cas on a few keys (recording a history
    for the linearizability checker) plus puts of unique keys (the acknowledged writes that
    must survive every fault). Bounded in op count; ``stop()`` ends it early."""

    def __init__(self, cluster: LocalCluster, threads: int = 4, keys: int = 3,
                 max_ops_per_thread: int = 3000, pause_s: float = 0.005, seed: int = 0) -> None:
        self.cluster = cluster
        self.keys = [f"reg-{k}" for k in range(keys)]
        self.max_ops = max_ops_per_thread
        self.pause_s = pause_s
        self.history: list[Operation] = []
        self.acked: dict[str, bytes] = {}
        self.completed = 0
        self.unknown = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(t, seed), daemon=True)
                         for t in range(threads)]
        self.errors: list[BaseException] = []

    def __enter__(self) -> _Workload:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(OP_TIMEOUT_S * 3)
        assert not any(t.is_alive() for t in self._threads), "a workload thread is stuck"
        assert not self.errors, f"workload threads raised: {self.errors!r}"

    def wait_completed(self, more: int) -> None:
        """Wait until ``more`` further operations have completed (the cluster makes progress)."""
        target = self.completed + more
        wait_for(lambda: self.completed >= target, f"{more} more client operations to complete")

    def _record(self, op: Operation | None, ok: bool) -> None:
        with self._lock:
            if op is not None:
                self.history.append(op)
            if ok:
                self.completed += 1
            elif op is not None and op.unknown:
                self.unknown += 1

    def _run(self, t: int, seed: int) -> None:
        rng = random.Random(seed * 1000 + t)
        client = Client(self.cluster.endpoints, token=self.cluster.token, timeout_s=OP_TIMEOUT_S)
        last_seen: dict[str, bytes | None] = {}
        try:
            for n in range(self.max_ops):
                if self._stop.is_set():
                    break
                self._one(client, t, n, rng, last_seen)
                time.sleep(self.pause_s)
        except BaseException as exc:  # surfaced by stop()
            self.errors.append(exc)
        finally:
            client.close()

    def _one(self, client: Client, t: int, n: int, rng: random.Random,
             last_seen: dict[str, bytes | None]) -> None:
        if n % 4 == 0:  # a unique key: an acknowledged write that must be present at the end
            key, value = f"acked-{t}-{n}", f"{t}:{n}".encode()
            try:
                client.put(key, value)
            except (Unavailable, OutcomeUnknown):
                return
            with self._lock:
                self.acked[key] = value
            self._record(None, True)
            return
        key = rng.choice(self.keys)
        roll = rng.random()
        value = f"{t}:{n}".encode()
        if roll < 0.4:
            kind, inp, call = OpKind.WRITE, value, (lambda: client.put(key, value) and None)
        elif roll < 0.8:
            kind, inp, call = OpKind.READ, None, (lambda: client.get(key))
        else:
            expected = last_seen.get(key)
            kind, inp = OpKind.CAS, (expected, value)
            call = lambda: client.cas(key, expected, value)  # noqa: E731
        timed = timed_call(call)
        if timed is None:
            return  # certainly not applied: not part of the history
        output, unknown, start, end = timed
        if kind is OpKind.READ and not unknown:
            last_seen[key] = output
        op = Operation(0, t, key, kind, inp, output, start, end, unknown)
        self._record(op, not unknown)

    def check(self, client: Client) -> None:
        """The history is linearizable per key and every acknowledged write is present."""
        ops = [Operation(i, o.client, o.key, o.kind, o.input, o.output, o.call, o.ret, o.unknown)
               for i, o in enumerate(self.history)]
        report = check_history(ops, time_limit_s=120)
        assert report.result is CheckResult.OK, report.explanation
        assert len(ops) > 20, f"too little load reached the cluster ({len(ops)} operations)"
        print(f"history: {len(ops)} operations ({self.unknown} unknown), {len(self.acked)} "
              f"acknowledged unique writes, checker explored {report.states_explored} states")
        records = {k: client.get_record(k) for k in self.acked}
        missing = sorted(k for k, v in self.acked.items() if records[k]["value"] != v)
        assert not missing, f"acknowledged writes lost: {missing[:10]}"
        # Each unique key was put once (retries reuse the sequence number): version 1 means
        # the put was applied exactly once, however often the client had to resend it.
        twice = sorted(k for k, r in records.items() if r["version"] != 1)
        assert not twice, f"writes applied more than once: {twice[:10]}"


@pytest.fixture
def Workload():  # noqa: N802 - hands out a class
    return _Workload


@pytest.fixture(name="wait_for")
def wait_for_fixture():
    """The :func:`wait_for` helper: ``wait_for(predicate, what, timeout_s=60)``."""
    return wait_for


_KILL9_WRITER = textwrap.dedent("""
    import sys
    from coordinator.raft.messages import ConfState, Entry, HardState
    from coordinator.storage import DiskStorage
    s = DiskStorage(sys.argv[1], conf_state=ConfState(voters=(1,)), {storage_args})
    i = s.last_index()
    while True:
        batch = [Entry(1, i + k, data=(b"%d;" % (i + k)) * 20) for k in range(1, 4)]
        s.save(HardState(1, 1, i), batch)
        i += 3
        print(i, flush=True)  # acknowledged: durable before this line is written
""")


def _kill9_rounds(data_dir, storage_args: str, rounds: int, spacing: int, **reopen) -> None:
    """Run a writer process saving batches of 3 entries (fsync on) and kill -9 it at a
    different point each round; after each kill the log must hold a prefix of what was
    written that includes every acknowledged entry."""
    from coordinator.raft.messages import Entry
    from coordinator.storage import DiskStorage

    code = _KILL9_WRITER.format(storage_args=storage_args)
    for round_ in range(rounds):
        writer = subprocess.Popen([sys.executable, "-c", code, str(data_dir)],
                                  stdout=subprocess.PIPE, text=True)
        acked = 0
        for _ in range(30 + spacing * round_):
            acked = int(writer.stdout.readline())
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        with DiskStorage(data_dir, fsync=False, **reopen) as s:
            last = s.last_index()
            assert last >= acked, f"round {round_}: acknowledged {acked}, recovered {last}"
            got = s.entries(1, last + 1)
            assert got == [Entry(1, i, data=(b"%d;" % i) * 20) for i in range(1, last + 1)]
            assert s.initial_state()[0].commit >= acked - 3


@pytest.fixture
def kill9_rounds():
    return _kill9_rounds
