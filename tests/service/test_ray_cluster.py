"""A coordinator cluster hosted in Ray actors keeps serving when one of its actors is killed
(ray.kill, or kill -9 of its process), a killed node restarts on its WAL in data_dir and
catches up, and 0-CPU nodes start while every CPU of the Ray cluster is taken."""

from __future__ import annotations

import os

import pytest

from coordinator import RayCluster

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.mark.parametrize("node_processes", [False, True], ids=["actors", "processes"])
def test_ray_hosted_cluster_survives_losing_an_actor(ray_session, wait_for, node_processes) -> None:
    """With ``idle_priority``, every thread of every node's process runs under SCHED_IDLE, the
    restarted node's too, and the cluster serves as before; whether each node is a Ray actor
    or (``node_processes``) a plain process of this one."""
    import pathlib

    with RayCluster(nodes=3, idle_priority=True, node_processes=node_processes) as cluster:
        assert len(cluster.endpoints) == 3
        for node in cluster.node_ids:
            assert _policies(cluster.actor_pid(node)) == {os.SCHED_IDLE}
        with cluster.client(timeout_s=30) as client:
            client.put("k", b"v")
            assert client.get("k") == b"v"
            cluster.kill(1)  # leader or not: two of three remain, a majority
            client.put("k2", b"v2")
            assert client.get("k2") == b"v2" and client.get("k") == b"v"
            temp_dir = pathlib.Path(cluster._placed[1]["data_dir"])
            assert temp_dir.is_dir(), "a killed node keeps its temporary WAL for a restart"
            cluster.restart(1)  # no data_dir: the same temporary directory, same address
            assert _policies(cluster.actor_pid(1)) == {os.SCHED_IDLE}
            wait_for(lambda: (cluster.status(1) or {}).get("applied", 0) >= (
                cluster.status(cluster.leader()) or {}).get("commit", 1), "node 1 to catch up")
    assert not temp_dir.exists(), "stop() left a temporary data directory behind"


def _policies(pid: int) -> set[int]:
    """The scheduling policies of a process's threads (Linux: each thread has its own)."""
    import pathlib

    policies = set()
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        try:
            policies.add(os.sched_getscheduler(int(task.name)))
        except OSError:
            continue  # a thread that exited meanwhile
    return policies


def _nice_values(pid: int) -> set[int]:
    """The nice values of a process's threads (Linux: each thread has its own)."""
    import pathlib

    values = set()
    for stat in pathlib.Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            values.add(int(stat.read_text().rsplit(")", 1)[1].split()[16]))
        except (OSError, IndexError):
            continue  # a thread that exited meanwhile
    return values


@pytest.mark.parametrize("node_processes", [False, True], ids=["actors", "processes"])
def test_killed_actor_restarts_from_its_wal_in_data_dir(ray_session, tmp_path, wait_for,
                                                        node_processes) -> None:
    """kill -9 of the leader's actor process (or of its own, ``node_processes``): a new
    leader serves; the restarted node finds its WAL in data_dir/node-<i> and catches up with
    the leader. With ``nice``, every thread of every node's process runs at least that far
    below the default priority, the restarted node's too."""
    import os
    import signal

    data_dir = tmp_path / "ray-coordinator"
    with RayCluster(nodes=3, data_dir=data_dir, nice=5, node_processes=node_processes) as cluster:
        for node in cluster.node_ids:
            assert min(_nice_values(cluster.actor_pid(node))) >= 5
            if node_processes:  # a child of this process, no Ray in it
                with open(f"/proc/{cluster.actor_pid(node)}/stat") as f:
                    assert int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid()
        text = repr(cluster)
        assert cluster.token.decode() not in text and cluster.endpoints[0] not in text
        with cluster.client(timeout_s=30) as client:
            client.put("before", b"1")
            leader = cluster.leader()
            wal = data_dir / f"node-{leader}"
            assert oct(wal.stat().st_mode & 0o777) == "0o700"
            assert any(p.name.startswith("wal-") for p in wal.iterdir())
            os.kill(cluster.actor_pid(leader), signal.SIGKILL)
            wait_for(lambda: not cluster.is_running(leader), "the killed actor to be gone")
            new_leader = cluster.leader(exclude=(leader,))
            assert new_leader != leader
            client.put("after", b"2")  # served by the new leader
            cluster.restart(leader)
            assert cluster.is_running(leader)
            assert min(_nice_values(cluster.actor_pid(leader))) >= 5

            def caught_up() -> bool:
                mine, theirs = cluster.status(leader), cluster.status(new_leader)
                return bool(mine and theirs and mine["applied"] >= theirs["applied"] > 0)

            wait_for(caught_up, "the restarted node to catch up")
            with cluster.client(timeout_s=30, endpoints=[cluster.endpoint(leader)]) as local:
                assert local.get("before", consistency="stale") == b"1"
                assert local.get("after", consistency="stale") == b"2"
            client.put("later", b"3")
            assert client.get("later") == b"3"
    assert (data_dir / f"node-{leader}").is_dir(), "stop() deleted a caller-given data_dir"


def test_zero_cpu_cluster_starts_while_every_cpu_is_taken(ray_session) -> None:
    import ray

    @ray.remote(num_cpus=1)
    class Busy:
        def ping(self) -> bool:
            return True

    free_cpus = int(ray.available_resources().get("CPU", 0))
    blockers = [Busy.remote() for _ in range(free_cpus)]
    try:
        ray.get([b.ping.remote() for b in blockers], timeout=120)
        assert ray.available_resources().get("CPU", 0) < 1
        with RayCluster(nodes=3) as cluster:  # num_cpus_per_node=0 by default
            with cluster.client(timeout_s=30) as client:
                client.put("k", b"v")
                assert client.get("k") == b"v"
    finally:
        for b in blockers:
            ray.kill(b)


def test_a_serving_node_stops_over_its_port_and_its_serve_ref_says_so(ray_session, tmp_path,
                                                                      make_cluster) -> None:
    """A Ray-hosted node's actor is parked in serve(): admin_stop (authenticated, over the
    node's port) stops the node as SIGTERM would, serve() returns, the actor takes calls
    again and the node restarts on its WAL. A node not hosted by Ray refuses admin_stop."""
    import ray

    from coordinator import Client, RequestRejected

    with RayCluster(nodes=3, data_dir=tmp_path / "ray") as cluster:
        with cluster.client(timeout_s=30) as client:
            client.put("k", b"v")
            endpoint = cluster.endpoint(2)
            assert cluster.is_running(2)
            ref = cluster.serving(2)
            assert ray.wait([ref], timeout=0.5)[0] == []  # parked while serving
            assert client.admin_stop(endpoint)["ok"]
            assert ray.get(ref, timeout=30) == "stopped"
            assert not cluster.is_running(2)
            assert ray.get(cluster.actors[2].pid.remote(), timeout=30) == cluster.actor_pid(2)
            client.put("k2", b"v2")  # two of three serve
            cluster.restart(2)
            assert cluster.is_running(2)
            with cluster.client(timeout_s=30, endpoints=[endpoint]) as local:
                assert local.get("k", consistency="stale") == b"v"
    local_cluster = make_cluster(nodes=1)
    with Client(local_cluster.endpoints, token=local_cluster.token, timeout_s=10) as c:
        with pytest.raises(RequestRejected, match="admin_stop"):
            c.admin_stop(local_cluster.endpoints[0])
        assert c.put("still", b"serving") is not None


def test_node_processes_reserve_no_cpu() -> None:
    with pytest.raises(ValueError, match="node_processes=True needs num_cpus_per_node=0"):
        RayCluster(nodes=3, num_cpus_per_node=0.5, node_processes=True)


def test_nice_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="nice must be 0..19"):
        RayCluster(nodes=3, nice=20)
    with pytest.raises(ValueError, match="nice must be 0..19"):
        RayCluster(nodes=3, nice=-1)


def _threads_around(call: str, report: str) -> list[str]:
    """Run, in a fresh Python, ``call`` between starting one parked thread and another, then
    print ``report`` (an expression of ``tids``: the main thread's and the two parked ones'
    native ids); the printed lines."""
    import subprocess
    import sys

    code = f"""
import os, threading
from coordinator.cluster import idle_priority, lower_priority
done = threading.Event()
tids = [threading.get_native_id()]
def park():
    tids.append(threading.get_native_id())
    done.wait()
threading.Thread(target=park).start()
while len(tids) < 2:
    pass
{call}
threading.Thread(target=park).start()
while len(tids) < 3:
    pass
{report}
done.set()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.splitlines()


def test_lower_priority_lowers_every_thread_and_the_ones_started_later() -> None:
    """A thread running before the call and one started after it both run 3 below the
    default priority (a Linux thread's nice value is its own); nice stays capped at 19."""
    first, second = _threads_around("lower_priority(3)", "print(*[os.getpriority(os.PRIO_PROCESS, t) for t in tids])\n"
                                    "lower_priority(30)\nprint(os.getpriority(os.PRIO_PROCESS, tids[1]))")
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert first.split() == [str(min(19, base + 3))] * 3
    assert second == "19"


def test_idle_priority_puts_every_thread_under_sched_idle_and_the_ones_started_later() -> None:
    ok, policies = _threads_around("print(idle_priority())", "print(*[os.sched_getscheduler(t) for t in tids])")
    assert ok == "True" and policies.split() == [str(os.SCHED_IDLE)] * 3
    assert os.sched_getscheduler(0) != os.SCHED_IDLE  # the test's own process is untouched
