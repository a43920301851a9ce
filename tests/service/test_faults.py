"""Real faults on a real 3-node cluster under concurrent client load.

Every test runs the ``Workload`` (client threads writing, reading and cas-ing a few keys and
putting unique keys) while it injects one fault with real signals and real sockets, then
checks that the client history is linearizable per key and that every acknowledged write is
still there. Waits are on conditions (a new leader, more completed operations), never sleeps.
"""

from __future__ import annotations

import time

import pytest

pytestmark = [pytest.mark.fault, pytest.mark.slow]

LOAD_OPS = 60  # operations that must complete in each phase of a test


def _role(cluster, node_id: int) -> str | None:
    status = cluster.status(node_id)
    return None if status is None else status["role"]


@pytest.mark.parametrize("extra_args", [[], ["--persist-before-send", "--commit-broadcast"]],
                         ids=["leader-parallel-persist", "persist-before-send"])
def test_kill_leader(make_cluster, Workload, extra_args) -> None:
    cluster = make_cluster(extra_args=extra_args)
    with Workload(cluster) as load:
        load.wait_completed(LOAD_OPS)
        old = cluster.leader()
        cluster.kill(old)
        assert cluster.leader(exclude=(old,)) != old
        load.wait_completed(LOAD_OPS)  # the survivors serve
        cluster.restart(old)
        load.wait_completed(LOAD_OPS)
    with cluster.client() as client:
        load.check(client)


def test_a_killed_leader_is_replaced_before_any_election_timeout(make_cluster) -> None:
    """kill -9 closes the leader's sockets: both followers see its connection end, forget it
    (no lease left) and elect one of them within a few ticks -- long before their election
    timeout (60-120 ticks of 50 ms here: at least 3 s) could have fired."""
    cluster = make_cluster(tick_ms=50.0, election_tick=60)
    old = cluster.leader()
    with cluster.client() as client:
        client.put("before", b"1")
    killed = time.monotonic()
    cluster.kill(old)
    new = cluster.leader(exclude=(old,))
    took = time.monotonic() - killed
    assert took < 60 * 0.050, f"a new leader only after {took:.1f} s: the timeout, not the disconnect"
    for i in cluster.node_ids:
        if i != old:
            status = cluster.status(i)
            assert status is not None and status["raft_dropped"].get("leader_disconnected", 0) >= 1, status
    with cluster.client() as client:
        client.put("after", b"2")  # the new leader commits
        assert client.get("before") == b"1"
    assert new != old


def test_paused_leader_steps_down_and_serves_no_stale_read(make_cluster, Workload,
                                                          wait_for) -> None:
    cluster = make_cluster()
    with Workload(cluster) as load:
        load.wait_completed(LOAD_OPS)
        old = cluster.leader()
        with cluster.client() as client:
            client.put("fresh", b"before")
        cluster.pause(old)
        try:
            cluster.leader(exclude=(old,))
            with cluster.client() as client:
                client.put("fresh", b"after")  # committed by the new leader while old sleeps
            load.wait_completed(LOAD_OPS)
        finally:
            cluster.resume(old)
        # A client that only knows the old leader: its linearizable read must see "after".
        with cluster.client(endpoints=[cluster.endpoint(old)]) as only_old:
            assert only_old.get("fresh") == b"after"
        wait_for(lambda: _role(cluster, old) == "follower", f"node {old} to step down")
        load.wait_completed(LOAD_OPS)
    with cluster.client() as client:
        load.check(client)


def test_kill_follower_and_restart_it_from_its_wal(make_cluster, Workload, wait_for) -> None:
    cluster = make_cluster()
    with Workload(cluster) as load:
        load.wait_completed(LOAD_OPS)
        leader = cluster.leader()
        follower = next(i for i in cluster.node_ids if i != leader)
        cluster.kill(follower)
        load.wait_completed(LOAD_OPS)
        cluster.restart(follower)
        restarted = cluster.status(follower)
        assert restarted is not None and restarted["log_last"] > 0, "recovered nothing"
        load.wait_completed(LOAD_OPS)
    target = cluster.status(cluster.leader())["commit"]
    wait_for(lambda: (cluster.status(follower) or {}).get("applied", 0) >= target,
             f"node {follower} to catch up to index {target}")
    with cluster.client(endpoints=[cluster.endpoint(follower)]) as at_follower:
        for key, value in list(load.acked.items())[:50]:
            assert at_follower.get(key, consistency="stale") == value
    with cluster.client() as client:
        load.check(client)


def test_restart_whole_cluster_at_once(make_cluster, Workload) -> None:
    cluster = make_cluster()
    with Workload(cluster) as load:
        load.wait_completed(LOAD_OPS)
        for i in cluster.node_ids:
            cluster.kill(i)
        for i in cluster.node_ids:
            cluster.restart(i)
        cluster.leader()
        load.wait_completed(LOAD_OPS)
    with cluster.client() as client:
        load.check(client)


def test_leader_cut_off_from_the_others(make_cluster, Workload, wait_for) -> None:
    cluster = make_cluster()
    with Workload(cluster) as load:
        load.wait_completed(LOAD_OPS)
        old = cluster.leader()
        cluster.partition(old)
        new = cluster.leader(exclude=(old,))
        assert new != old
        # CheckQuorum: the cut-off leader notices it lost its majority and steps down.
        wait_for(lambda: _role(cluster, old) != "leader", f"node {old} to step down")
        load.wait_completed(LOAD_OPS)
        cluster.heal()
        load.wait_completed(LOAD_OPS)
    with cluster.client() as client:
        load.check(client)


def test_stale_read_from_a_cut_off_follower_is_never_newer_than_committed(
        make_cluster, wait_for) -> None:
    cluster = make_cluster()
    leader = cluster.leader()
    follower = next(i for i in cluster.node_ids if i != leader)
    with cluster.client() as client, \
            cluster.client(endpoints=[cluster.endpoint(follower)]) as at_follower:
        client.put("x", b"v1")
        wait_for(lambda: at_follower.get("x", consistency="stale") == b"v1",
                 "the follower to apply v1")
        cluster.partition(follower)
        client.put("x", b"v2")
        committed = client.status(cluster.endpoint(leader))
        stale = at_follower.get_record("x", consistency="stale")  # answered in the minority
        assert stale["value"] == b"v1" and stale["node"] == follower
        assert stale["mod_revision"] <= committed["revision"]
        assert stale["applied"] <= committed["commit"]
        # A linearizable read through the cut-off follower is redirected to the leader.
        assert at_follower.get("x") == b"v2"
        cluster.heal()
        wait_for(lambda: at_follower.get("x", consistency="stale") == b"v2",
                 "the healed follower to catch up")


def test_async_client_rides_out_a_leader_kill(make_cluster) -> None:
    """Many concurrent writes on one AsyncClient while the leader is killed: every write that
    was acknowledged is present exactly once; none reports success without being applied."""
    import asyncio

    from coordinator import AsyncClient, OutcomeUnknown, Unavailable

    cluster = make_cluster()
    old = cluster.leader()

    async def run() -> dict[str, bytes]:
        acked: dict[str, bytes] = {}
        async with AsyncClient(cluster.endpoints, token=cluster.token, timeout_s=30) as c:
            async def writer(w: int) -> None:
                for n in range(25):
                    key, value = f"async-{w}-{n}", b"%d" % n
                    try:
                        await c.put(key, value)
                    except (Unavailable, OutcomeUnknown):
                        continue
                    acked[key] = value
                    if w == 0 and n == 5:
                        cluster.kill(old)  # mid-load, from inside the workload

            await asyncio.gather(*(writer(w) for w in range(8)))
        return acked

    acked = asyncio.run(run())
    assert len(acked) > 100, f"only {len(acked)} of 200 writes were acknowledged"
    with cluster.client() as client:
        for key, value in acked.items():
            record = client.get_record(key)
            assert record["value"] == value and record["version"] == 1, (key, record)
