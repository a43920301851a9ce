"""When a node snapshots: besides every ``snapshot_every`` entries, as soon as the log applied
since the last snapshot outweighs it (from ``snapshot_min_every`` entries on), so a small
state restarts from a fresh snapshot instead of replaying and re-applying a long log."""

from __future__ import annotations

import time

import pytest

from coordinator import LocalCluster
from coordinator.server import ServerConfig

PUTS = 1_300  # over the default snapshot_min_every (1000), far under snapshot_every (10000)


def _overwrite_few_keys(cluster: LocalCluster) -> None:
    with cluster.client() as c:
        for i in range(PUTS):
            c.put(f"k{i % 8}", b"v" * 64)


@pytest.mark.parametrize("min_every, snapshots", [(None, True), (0, False)])
def test_a_small_state_is_snapshotted_once_its_log_outweighs_it(tmp_path, min_every, snapshots, wait_for):
    extra = [] if min_every is None else ["--snapshot-min-every", str(min_every)]
    with LocalCluster(nodes=3, data_dir=tmp_path / "c", fsync=False, extra_args=extra) as cluster:
        _overwrite_few_keys(cluster)
        leader = cluster.leader()
        if snapshots:  # each node decides on its own, by the same rule
            wait_for(lambda: all(cluster.status(i)["snapshot_index"] >= 1_000 for i in cluster.node_ids),
                     "every node's early snapshot")
        else:
            time.sleep(1.0)  # a snapshot would have been taken within the drives above
            assert all(cluster.status(i)["snapshot_index"] == 0 for i in cluster.node_ids)
        follower = next(i for i in cluster.node_ids if i != leader)
        cluster.kill(follower)
        cluster.restart(follower)
        restore = cluster.status(follower)["restore"]
        # a restarted node loads its snapshot (8 keys), then replays only the entries since
        assert (restore.get("keys", 0) == 8) is snapshots, restore


def test_snapshot_min_every_is_checked():
    with pytest.raises(ValueError, match="snapshot_min_every"):
        ServerConfig(node_id=1, peers={1: ("127.0.0.1", 1)}, data_dir="/nonexistent",
                     token=b"t" * 32, snapshot_min_every=-1)
