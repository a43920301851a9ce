"""Issue 17 in Ray actors: RayCluster.restart of a node whose directory was wiped starts it
with ``join`` (recovering, then repaired), and a snapshot forked from inside a Ray actor
process (coordinator.snapshotting: the child must not touch the actor's threads, sockets or
Ray's state) is written and the actor goes on working."""

from __future__ import annotations

import shutil

import pytest

from coordinator import RayCluster

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_restart_of_a_wiped_ray_node_rejoins_recovering_and_is_repaired(
        ray_session, tmp_path, wait_for) -> None:
    data_dir = tmp_path / "ray-coordinator"
    with RayCluster(nodes=3, data_dir=data_dir) as cluster:
        with cluster.client(timeout_s=30) as client:
            for i in range(20):
                client.put(f"k{i}", b"v%d" % i)
            leader = cluster.leader()
            wiped = next(i for i in cluster.node_ids if i != leader)
            target = cluster.status(leader)["commit"]
            wait_for(lambda: (cluster.status(wiped) or {}).get("applied", 0) >= target,
                     "the follower to apply everything")
            cluster.kill(wiped)
            shutil.rmtree(data_dir / f"node-{wiped}")
            cluster.restart(wiped)
            wait_for(lambda: (lambda st: st.get("recovering") is False and st.get(
                "applied", 0) >= target)(cluster.status(wiped) or {}),
                "the wiped node to be repaired")
            assert not (data_dir / f"node-{wiped}" / "RECOVERING").exists()
            with cluster.client(timeout_s=30, endpoints=[cluster.endpoint(wiped)]) as local:
                assert local.get("k19", consistency="stale") == b"v19"
            client.put("after", b"1")
            assert client.get("after") == b"1"


def test_a_snapshot_forked_inside_a_ray_actor_is_written(ray_session, tmp_path) -> None:
    import ray

    @ray.remote(num_cpus=0)
    class Forker:
        def snapshot(self, path: str) -> tuple[int, int]:
            import threading

            from coordinator.raft import ConfState, SnapshotMetadata
            from coordinator.snapshotting import fork_snapshot, wait_child
            from coordinator.statemachine import StateMachine, encode_command

            sm = StateMachine()
            sm.apply(1, encode_command("register", 0, 0, 0, 1))
            for i in range(2, 2002):
                sm.apply(i, encode_command("put", 1, i, i, 1, b"k%d" % i, b"v" * 100))
            busy = threading.Thread(target=lambda: sum(range(10**6)))  # threads are running
            busy.start()
            md = SnapshotMetadata(2001, 1, ConfState(voters=(1,)))
            code = wait_child(fork_snapshot(sm, __import__("pathlib").Path(path), md,
                                            fsync=False))
            busy.join()
            return code, len(sm.kv)

        def ping(self) -> str:
            return "alive"

    forker = Forker.remote()
    path = tmp_path / "snap.tmp"
    code, keys = ray.get(forker.snapshot.remote(str(path)), timeout=120)
    assert code == 0 and keys == 2000
    assert ray.get(forker.ping.remote(), timeout=60) == "alive"

    from coordinator.statemachine import StateMachine
    from coordinator.storage import _SNAP_HEADER, _check_snapshot_file

    _check_snapshot_file(path, 2001, 1)
    raw = path.read_bytes()
    import msgpack

    _, _, _, data = msgpack.unpackb(raw[_SNAP_HEADER.size:], raw=False)
    restored = StateMachine()
    restored.restore(data)
    assert len(restored.kv) == 2000 and restored.applied_index == 2001
    ray.kill(forker)
