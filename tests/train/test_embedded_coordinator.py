"""The embedded coordinator's liveness checks, against real nodes killed for real."""

from __future__ import annotations

import os
import signal
import time

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


def test_idle_nodes_park_their_actor_thread_and_stop_cleanly(ray_session, tmp_path, monkeypatch):
    """A node's actor thread is parked in ``serve`` (Ray would wake an idle actor's thread
    every 10 ms): an idle node's process wakes for its own clock only. Every thread of a node
    runs at least STEPLOG_NICE below the default priority (set to 7 here; 0 by default).
    ``stop`` asks every node to stop over its port and ends the actors."""
    monkeypatch.setattr(coord, "STEPLOG_NICE", 7)
    coordinator = EmbeddedCoordinator(tmp_path / "coordinator")
    coordinator.start()
    try:
        cluster = coordinator.cluster
        pids = [cluster.actor_pid(i) for i in cluster.node_ids]
        threads = {pid: set(os.listdir(f"/proc/{pid}/task")) for pid in pids}
        switches_before = {pid: _switches(pid) for pid in pids}
        time.sleep(2.0)
        for pid in pids:
            main = str(pid)  # the main thread's id is the pid
            assert main in threads[pid]
            woke = _switches(pid)[main] - switches_before[pid][main]
            # parked: a handful of wake-ups in 2 s (Ray's signal check alone is ~200)
            assert woke < 40, (pid, woke)
            nice = {tid: os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in threads[pid]}
            assert min(nice.values()) >= 7, (pid, nice)
    finally:
        coordinator.stop()
    assert coordinator.cluster.actors == {}
    for pid in pids:
        assert _gone(pid, 30.0), f"node process {pid} still runs after stop()"


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

