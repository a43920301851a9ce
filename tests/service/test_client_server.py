"""Client and server over real sockets: the API, redirects, exactly-once retries, limits,
snapshots with InstallSnapshot, and the asyncio client."""

from __future__ import annotations

import asyncio
import os

import pytest

from coordinator import AsyncClient, Client, RequestRejected, Unavailable
from coordinator.cluster import free_port
from coordinator.transport import BlockingClientConnection

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from coordinator import LocalCluster

    with LocalCluster(nodes=3, data_dir=tmp_path_factory.mktemp("cs")) as c:
        c.leader()
        yield c


def test_put_get_cas_delete(cluster) -> None:
    with cluster.client() as c:
        rev = c.put("k", b"1")
        assert c.get("k") == b"1" and c.get(b"k") == b"1"
        assert c.put("k", "2") == rev + 1, "a put bumps the global revision by one"
        assert c.cas("k", b"2", b"3") and not c.cas("k", b"2", b"4")
        assert c.cas("new-key", None, b"x") and not c.cas("new-key", None, b"y")
        record = c.get_record("k")
        assert record["value"] == b"3" and record["version"] == 3
        assert c.delete("k") and not c.delete("k")
        assert c.get("k") is None


def test_follower_redirects_writes_and_answers_status(cluster) -> None:
    leader = cluster.leader()
    follower = next(i for i in cluster.node_ids if i != leader)
    with cluster.client(endpoints=[cluster.endpoint(follower)]) as c:
        c.put("via-follower", b"ok")  # the follower answers not_leader + the leader endpoint
        assert c.get("via-follower") == b"ok"
        st = c.status(cluster.endpoint(follower))
    assert st["role"] == "follower" and st["leader"] == leader and st["id"] == follower
    for field in ("term", "commit", "applied", "log_size", "peers"):
        assert field in st
    with cluster.client() as c:
        lst = c.status(cluster.endpoint(leader))
    assert set(lst["peers"]) == {str(i) for i in cluster.node_ids}
    assert all(p["match"] > 0 for p in lst["peers"].values())


def test_retried_write_with_the_same_sequence_number_applies_once(cluster) -> None:
    host, port = cluster.addresses[cluster.leader()]
    with BlockingClientConnection(host, port, cluster.token) as conn:
        reg = conn.request({"op": "register", "args": [os.urandom(16)]})
        session = reg["session"]
        body = {"op": "put", "session": session, "seq": 1, "ack": 1, "args": [b"once", b"v"]}
        first = conn.request(body)
        again = conn.request(body)  # a retry: answered from the session, not applied again
        assert first["ok"] and again == first
        later = conn.request(dict(body, seq=2, args=[b"once", b"w"]))
        assert later["revision"] == first["revision"] + 1
        stale = conn.request(dict(body, ack=3))  # seq 1 < ack: refused, not applied
        assert stale["error"] == "stale_sequence"
    with cluster.client() as c:
        assert c.get("once") == b"w"


def test_bad_requests_are_rejected_without_effect(cluster) -> None:
    with cluster.client() as c:
        with pytest.raises(RequestRejected, match="bad_key"):
            c.put("k" * 5000, b"v")
        with pytest.raises(RequestRejected, match="bad_value"):
            c.put("big", b"x" * ((1 << 20) + 1))
        assert c.get("big") is None


def test_unreachable_cluster_is_unavailable() -> None:
    with Client([f"127.0.0.1:{free_port()}"], token=b"t" * 32, timeout_s=0.5) as c, \
            pytest.raises(Unavailable):
        c.put("k", b"v")


def test_async_client_concurrent_writes(cluster) -> None:
    async def run() -> list[int]:
        async with AsyncClient(cluster.endpoints, token=cluster.token, timeout_s=30) as c:
            revs = await asyncio.gather(*(c.put(f"async-{i}", b"%d" % i) for i in range(40)))
            assert await c.get("async-7") == b"7"
            assert await c.get("async-8", consistency="stale") in (b"8", None)
            assert await c.cas("async-1", b"1", b"one")
            assert await c.delete("async-2")
            assert (await c.status())["ok"]
            return revs

    revs = asyncio.run(run())
    assert len(set(revs)) == 40, "every put got its own revision"


def test_snapshot_compaction_and_install_snapshot(make_cluster, wait_for) -> None:
    cluster = make_cluster(snapshot_every=40)
    leader = cluster.leader()
    follower = next(i for i in cluster.node_ids if i != leader)
    with cluster.client() as c:
        for i in range(50):
            c.put(f"s{i}", b"%d" % i)
        cluster.kill(follower)
        for i in range(50, 200):  # the leader snapshots and compacts past the follower
            c.put(f"s{i}", b"%d" % i)
        st = c.status(cluster.endpoint(leader))
        assert st["snapshot_index"] >= 160 and st["log_first"] > 50, st
        cluster.restart(follower)
        with cluster.client(endpoints=[cluster.endpoint(follower)]) as at_follower:
            wait_for(lambda: at_follower.get("s199", consistency="stale") == b"199",
                     "the restarted follower to catch up through InstallSnapshot")
            assert at_follower.get("s3", consistency="stale") == b"3"
    cluster.restart(leader)  # restart from snapshot + WAL tail
    with cluster.client() as c:
        assert c.get("s0") == b"0" and c.get("s199") == b"199"
