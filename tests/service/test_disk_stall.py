"""A slow disk delays commits, never heartbeats.

A node's saves run in its disk thread; while one is in flight the node used to send nothing
at all. A save queued behind a snapshot being adopted (or behind another process's fsync of
tens of MB on the same disk) then silenced a leader for longer than the election timeout and
its followers elected a new leader nobody asked for: CI saw it once in
tests/service/test_snapshot_off_loop.py. Now heartbeats and their answers leave while a
save is in flight. These tests hold a node's disk thread for ten election timeouts
(``admin_stall_disk``, a real stall of the real thread) while a write waits on it, and
demand that no election happens and the write still lands. Writes that pile up behind a
stalled disk count toward the bound on the log held in memory: beyond it they are refused
(``overloaded``, retried by the client), not queued without limit.
"""

from __future__ import annotations

import os
import threading

import pytest

from coordinator import Client, LocalCluster, RequestRejected

STALL_S = 3.0  # the default election timeout is 150-300 ms


def _write_through_stall(cluster: LocalCluster, stalled: list[int]) -> dict[int, dict]:
    terms = {i: cluster.status(i)["term"] for i in cluster.node_ids}
    done: list[int] = []
    with cluster.client() as admin:
        for i in stalled:
            admin.admin_stall_disk(cluster.endpoint(i), STALL_S)

    def write() -> None:
        with cluster.client(timeout_s=60) as c:
            done.append(c.put("through-the-stall", b"v"))

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    writer.join(60)
    assert done, "the write did not land after the disk stall"
    report = {i: cluster.status(i) for i in cluster.node_ids}
    assert {i: st["term"] for i, st in report.items()} == terms, "an election happened"
    for i in stalled:
        assert report[i]["stats"]["disk_stalls_injected"] == 1
        # the write's save waited behind the stall, and heartbeats (or answers) left meanwhile
        assert report[i]["stats"]["sent_while_persisting"] > 0, report[i]["stats"]
    with cluster.client() as c:
        assert c.get("through-the-stall") == b"v"
    return report


@pytest.mark.slow
def test_a_leader_whose_disk_stalls_keeps_its_followers(make_cluster) -> None:
    cluster = make_cluster()
    leader = cluster.leader()
    report = _write_through_stall(cluster, [leader])
    assert report[leader]["role"] == "leader"


@pytest.mark.slow
def test_followers_whose_disks_stall_keep_a_checkquorum_leader(make_cluster) -> None:
    cluster = make_cluster()
    leader = cluster.leader()
    followers = [i for i in cluster.node_ids if i != leader]
    report = _write_through_stall(cluster, followers)
    # without their heartbeat answers for 3 s, CheckQuorum would have stepped it down
    assert report[leader]["role"] == "leader"


def test_a_disk_stall_is_bounded(make_cluster) -> None:
    cluster = make_cluster(nodes=1)
    with cluster.client() as c:
        for bad in (0, -1, 31, "3", True, None):
            with pytest.raises(RequestRejected, match="admin_stall_disk takes"):
                c.admin_stall_disk(cluster.endpoint(1), bad)
    assert cluster.status(1)["stats"]["disk_stalls_injected"] == 0


VALUE_BYTES = 256 << 10
BOUND = 6 << 20  # --max-retained-log-bytes: the least the snapshot settings below allow


@pytest.mark.slow
def test_writes_queued_behind_a_stalled_disk_count_toward_the_log_bound(make_cluster) -> None:
    cluster = make_cluster(extra_args=["--snapshot-bytes", str(4 << 20),
                                       "--keep-bytes-after-snapshot", str(2 << 20),
                                       "--max-retained-log-bytes", str(BOUND)])
    leader = cluster.leader()
    stop, errors, done = threading.Event(), [], [0]
    ready = threading.Barrier(41)

    def writer(t: int) -> None:  # one write in flight each: 40 x 256 KiB = 10 MiB offered
        try:
            with Client(cluster.endpoints, token=cluster.token, timeout_s=60) as c:
                c.put(f"w{t}", b"registered")  # its session committed before the stall
                ready.wait(60)
                while not stop.is_set():
                    c.put(f"w{t}", os.urandom(VALUE_BYTES))
                    done[0] += 1
        except Exception as exc:  # surfaced below
            errors.append(exc)
            ready.abort()

    threads = [threading.Thread(target=writer, args=(t,), daemon=True) for t in range(40)]
    for t in threads:
        t.start()
    with cluster.client() as admin:
        ready.wait(60)
        admin.admin_stall_disk(cluster.endpoint(leader), STALL_S)
    held_max = 0
    try:
        for _ in range(int(STALL_S / 0.1)):
            mem = cluster.status(leader)["memory"]
            held_max = max(held_max, mem["retained_log_bytes"] + mem["queued_write_bytes"])
            stop.wait(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    st = cluster.status(leader)
    assert not errors, errors[:3]
    assert done[0] > 0
    # what is admitted is checked against the bound first: one write's worth over it at most
    assert held_max <= BOUND + VALUE_BYTES + 1024, held_max
    assert held_max > BOUND // 2  # the stall did hold writes back
    assert st["stats"]["writes_refused_log_full"] > 0
