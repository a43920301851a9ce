"""A slow disk delays commits, never heartbeats.

A node's saves run in its disk thread; while one is in flight the node used to send nothing
at all. A save queued behind a snapshot being adopted (or behind another process's fsync of
tens of MB on the same disk) then silenced a leader for longer than the election timeout and
its followers elected a new leader nobody asked for: CI saw it once in
tests/service/test_snapshot_off_loop.py. Now heartbeats and their answers leave while a
save is in flight. These tests hold a node's disk thread for ten election timeouts
(``admin_stall_disk``, a real stall of the real thread) while a write waits on it, and
demand that no election happens and the write still lands.
"""

from __future__ import annotations

import threading

import pytest

from coordinator import LocalCluster, RequestRejected

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
