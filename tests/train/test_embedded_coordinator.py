"""The embedded coordinator's liveness checks, against real nodes killed for real."""

from __future__ import annotations

import os
import signal
import time

from coordinator.cluster import ray_worker_niceness
from synctrain.driver import coord
from synctrain.driver.coord import EmbeddedCoordinator


def test_a_node_killed_a_moment_before_the_last_look_is_found_dead(ray_session, tmp_path):
    """The job's last look (``dead_nodes(wait_s=...)``) comes right after training ends; a node
    killed just before must be found dead although Ray may not have seen its death yet (a
    leader killed near a job's end once went unrecorded), and live nodes must be found live."""
    coordinator = EmbeddedCoordinator(tmp_path / "coordinator")
    coordinator.start()
    try:
        assert coordinator.dead_nodes() == []
        victim = sorted(coordinator.cluster.actors)[1]
        os.kill(coordinator.cluster.actor_pid(victim), signal.SIGKILL)
        assert coordinator.dead_nodes(wait_s=60.0) == [victim]
        assert coordinator.dead_nodes() == [victim]  # and stays dead until restarted
        coordinator.restart(victim)
        assert coordinator.dead_nodes(wait_s=60.0) == []
    finally:
        coordinator.stop()


def test_idle_nodes_are_plain_processes_that_wake_rarely_and_stop_cleanly(ray_session, tmp_path, monkeypatch):
    """The embedded nodes are plain ``coordinator serve`` processes, children of the driver
    (``STEPLOG_NODE_PROCESSES``), not Ray actors: an idle node's process wakes for its own
    clock only. A node hosted in a Ray actor wakes ~55 times a second at rest, ~48 of them
    Ray's threads (docs/fault-tolerance.md); a node process ~7-11 (measured here). Every thread
    of a node runs at least STEPLOG_NICE below the default priority (set to 7 here; 0 by
    default). ``stop`` stops every node; none is left running."""
    monkeypatch.setattr(coord, "STEPLOG_NICE", 7)
    coordinator = EmbeddedCoordinator(tmp_path / "coordinator")
    coordinator.start()
    try:
        cluster = coordinator.cluster
        pids = [cluster.actor_pid(i) for i in cluster.node_ids]
        for pid in pids:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            assert argv[1:4] == [b"-m", b"coordinator.cli", b"serve"], argv
            assert _parent(pid) == os.getpid()
            with open(f"/proc/{pid}/environ", "rb") as f:
                assert coordinator.token not in f.read()  # the token came over a pipe
            assert coordinator.token not in b" ".join(argv)
        before = {pid: sum(_switches(pid).values()) for pid in pids}
        time.sleep(4.0)
        for pid in pids:
            woke = sum(_switches(pid).values()) - before[pid]
            assert woke < 4.0 * 25, (pid, woke)  # all threads; a Ray-hosted node: ~220
            threads = os.listdir(f"/proc/{pid}/task")
            nice = {tid: os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in threads}
            # Ray's workers' priority (nice 15 by default) and STEPLOG_NICE below it, at most 19
            assert min(nice.values()) >= min(19, ray_worker_niceness() + 7), (pid, nice)
            assert os.getpgid(pid) == pid and os.getsid(pid) == os.getsid(0)  # own group, our session
    finally:
        coordinator.stop()
    assert coordinator.cluster.actors == {}
    for pid in pids:
        assert _gone(pid, 30.0), f"node process {pid} still runs after stop()"
    for node in (1, 2, 3):  # each stopped cleanly (a thread blocked on stdin once aborted it)
        log = (tmp_path / "coordinator" / f"node-{node}.log").read_text()
        assert f"node {node} stopped" in log and "Fatal Python error" not in log, log


def test_node_processes_die_with_the_process_that_hosts_them(tmp_path):
    """A node process stops when its host process dies (its stdin pipe closes): a killed
    driver's nodes let go of their WALs, which a resumed job needs."""
    import subprocess
    import sys

    script = tmp_path / "host.py"
    script.write_text(HOST_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "nodes")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("PIDS "), line
        pids = [int(p) for p in line.split()[1:]]
        for pid in pids:
            os.kill(pid, 0)  # running
        assert len(list((tmp_path / "nodes").glob("node-*/LOCK"))) == 3
        assert not _unlocked(tmp_path / "nodes")  # each node holds its WAL
    finally:
        proc.kill()
        proc.wait()
    for pid in pids:
        assert _gone(pid, 30.0), f"node process {pid} outlived its host"
    assert _unlocked(tmp_path / "nodes")
    for node in (1, 2, 3):
        log = (tmp_path / "nodes" / f"node-{node}.log").read_text()
        assert "stdin closed" in log and f"node {node} stopped" in log, log
        assert "Fatal Python error" not in log, log


HOST_SCRIPT = """
import pathlib, sys
from unittest import mock
from coordinator.cluster import NodeProcessHost, free_port
from coordinator.transport import generate_token

# no Ray here: the host asks Ray only where it is
with mock.patch("ray.get_runtime_context"), mock.patch("ray.util.get_node_ip_address", return_value="127.0.0.1"):
    host = NodeProcessHost(generate_token().encode(), tick_ms=100, heartbeat_tick=3)
    base = pathlib.Path(sys.argv[1])
    peers = {}
    for i in (1, 2, 3):
        where = host.reserve(i, str(base / f"node-{i}"), False)
        peers[i] = (where["host"], where["port"])
    started = host.start([1, 2, 3], peers)
print("PIDS", *[started[i]["pid"] for i in (1, 2, 3)], flush=True)
sys.stdin.read()  # until killed
"""


def _unlocked(base) -> bool:
    """Every node directory's LOCK is free (a live holder would refuse a new server)."""
    import fcntl

    for lock in base.glob("node-*/LOCK"):
        with open(lock, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False
            fcntl.flock(f, fcntl.LOCK_UN)
    return True


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _switches(pid: int) -> dict[str, int]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            text = f.read()
        out[tid] = int(text.split("voluntary_ctxt_switches:")[1].split()[0])
    return out


def _gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False

