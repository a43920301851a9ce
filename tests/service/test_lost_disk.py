"""A member that lost its disk is repaired, and casts no vote before that (issue 17, point 2).

Real processes. A follower's data directory is wiped while it is down:

- ``coordinator serve`` on the empty directory refuses without ``--join`` (a peer that is
  up knows the node took part before: the replicated ``members`` extension), and says so;
- ``LocalCluster.restart`` passes ``--join`` by itself; the node starts *recovering*: while
  no leader can repair it (the old leader is down too) it refuses every pre-vote and vote
  (the remaining node cannot win an election without it) and never campaigns;
- once a leader is back it is repaired with no new writes, applies everything, drops its
  RECOVERING marker and votes again -- also after a later restart.

The protocol itself (Config.recovering) is checked in the simulator by
tests/raft/test_recovering.py; this checks the server's wiring of it.
"""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from coordinator.server import RECOVERING_MARKER


def _status(cluster, node_id: int) -> dict:
    return cluster.status(node_id) or {}


@pytest.mark.slow
def test_wiped_follower_needs_join_votes_not_and_is_repaired(make_cluster, wait_for) -> None:
    cluster = make_cluster()
    leader = cluster.leader()
    survivor, wiped = (i for i in cluster.node_ids if i != leader)
    with cluster.client() as c:
        for i in range(60):
            c.put(f"k{i}", b"v%d" % i)
    target = _status(cluster, leader)["commit"]
    # Every node has applied everything, and the cluster has recorded who took part.
    wait_for(lambda: all(_status(cluster, i).get("applied", 0) >= target
                         and wiped in _status(cluster, i).get("members_seen", ())
                         for i in cluster.node_ids), "every node to apply and know its peers")

    cluster.kill(wiped)
    shutil.rmtree(cluster.node_dir(wiped))
    cluster.kill(leader)  # nobody can repair it now: only its votes could elect a leader

    # Without --join: refused, with an error that says what to do.
    cmd = cluster._command(wiped)
    assert "--join" not in cmd
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "--join" in done.stderr and "lost its" in done.stderr, done.stderr[-2000:]
    assert not (cluster.node_dir(wiped) / "wal-00000001-0000000000000001.log").exists()

    cluster.restart(wiped)  # an empty directory: restarted with --join, recovering
    assert (cluster.node_dir(wiped) / RECOVERING_MARKER).exists()
    wait_for(lambda: _status(cluster, wiped).get("raft_dropped", {}).get(
        "vote_refused_recovering", 0) >= 2, "the recovering node to refuse the survivor's votes")
    for _ in range(10):  # several election timeouts: no leader without the wiped node's vote
        st, sv = _status(cluster, wiped), _status(cluster, survivor)
        assert st.get("recovering") is True and st.get("role") == "follower", st
        assert sv.get("role") != "leader" and st.get("applied", 0) < target, (st, sv)
        time.sleep(0.1)
    assert _status(cluster, wiped)["raft_dropped"].get("campaign_refused_recovering", 0) >= 1

    started = time.monotonic()
    cluster.restart(leader)  # a leader again: it repairs the wiped node, no writes needed
    wait_for(lambda: (lambda st: st.get("recovering") is False
                      and st.get("applied", 0) >= target)(_status(cluster, wiped)),
             "the wiped node to be repaired and apply everything", timeout_s=30)
    print(f"repaired and caught up {time.monotonic() - started:.2f} s after a leader came back")
    assert not (cluster.node_dir(wiped) / RECOVERING_MARKER).exists()
    with cluster.client(endpoints=[cluster.endpoint(wiped)]) as at_wiped:
        for i in range(60):
            assert at_wiped.get(f"k{i}", consistency="stale") == b"v%d" % i

    # Repaired for good: after a restart it is not recovering, and with one node down its
    # vote is needed for any election.
    cluster.restart(wiped)
    assert _status(cluster, wiped)["recovering"] is False
    killed = cluster.leader()
    cluster.kill(killed)
    assert cluster.leader(timeout_s=30) != killed
    with cluster.client() as c:
        c.put("after", b"repair")
        assert c.get("k59") == b"v59"
