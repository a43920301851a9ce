"""Membership changes on a running cluster under client load (coordinator/membership.py,
issue 16): a learner added and promoted, a voter added, grown 3 -> 5 and shrunk 5 -> 3 with the
leader among those removed. Real processes: new nodes start with ``serve --join`` from the
membership the cluster reports; removed nodes stop themselves.

What is checked: the client history stays linearizable and every acknowledged write is there;
growing, promoting and removing a follower cause no election at all (the term does not move)
and removing the leader exactly the one election that hands over; the new members hold the
data; the longest pause in completed operations is printed for the record.
"""

from __future__ import annotations

import pytest

from coordinator import RequestRejected

pytestmark = [pytest.mark.slow, pytest.mark.fault]

LOAD_OPS = 60


def _term(cluster) -> int:
    return cluster.status(cluster.leader())["term"]


def _longest_pause_s(history, since_ns: int) -> float:
    returns = sorted(op.ret for op in history if not op.unknown and op.ret >= since_ns)
    gaps = [b - a for a, b in zip(returns, returns[1:], strict=False)]
    return max(gaps, default=0) / 1e9


def test_grow_to_five_and_shrink_to_three_under_load(make_cluster, Workload, wait_for) -> None:
    import time

    cluster = make_cluster()
    with Workload(cluster) as load:
        load.wait_completed(LOAD_OPS)
        started = time.monotonic_ns()
        term = _term(cluster)
        # a learner: it follows the log but has no vote, then is promoted once caught up
        four = cluster.add_node(learner=True)
        with cluster.client() as client:
            row = next(m for m in client.member_list() if m["ID"] == four)
            assert row["isLearner"]
            with pytest.raises(RequestRejected) as info:
                client.member_add(four, "127.0.0.1:1")  # same id, another address
            assert info.value.code == "member_exists"
        load.wait_completed(LOAD_OPS)
        cluster.promote(four)
        five = cluster.add_node(learner=False)
        load.wait_completed(LOAD_OPS)
        with cluster.client() as client:
            members = client.member_list()
        assert sorted(m["ID"] for m in members) == [1, 2, 3, four, five]
        assert not any(m["isLearner"] for m in members)
        assert _term(cluster) == term, "growing the cluster caused an election"
        # the new members hold what was acknowledged before they joined
        commit = cluster.status(cluster.leader())["commit"]
        for node in (four, five):
            wait_for(lambda n=node: (cluster.status(n) or {}).get("applied", 0) >= commit,
                     f"node {node} to catch up")
        with cluster.client(endpoints=[cluster.endpoint(five)]) as at_five:
            for key, value in list(load.acked.items())[:20]:
                assert at_five.get(key, consistency="stale") == value
        grown_pause = _longest_pause_s(load.history, started)

        # shrink: a follower from the first three, then the leader
        leader = cluster.leader()
        follower = next(i for i in (1, 2, 3) if i != leader)
        cluster.remove_node(follower)
        load.wait_completed(LOAD_OPS)
        assert _term(cluster) == term, "removing a follower caused an election"
        before_leader_removal = time.monotonic_ns()
        cluster.remove_node(leader)
        new = cluster.leader(exclude=(leader,))
        load.wait_completed(LOAD_OPS)
        assert _term(cluster) > term and new != leader
        with cluster.client() as client:
            assert sorted(m["ID"] for m in client.member_list()) == sorted(cluster.node_ids)
        assert len(cluster.node_ids) == 3
        handover_pause = _longest_pause_s(load.history, before_leader_removal)
    with cluster.client() as client:
        load.check(client)
    print(f"longest pause in completed operations: {grown_pause:.3f} s while growing, "
          f"{handover_pause:.3f} s around the leader's removal (terms {term} -> {_term(cluster)})")


def test_a_node_that_is_not_a_member_is_told_how_to_join(make_cluster, tmp_path) -> None:
    import subprocess
    import sys

    cluster = make_cluster()
    peers = ",".join(f"{i}={cluster.endpoint(i)}" for i in cluster.node_ids) + ",9=127.0.0.1:1"
    run = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "serve", "--id", "9", "--peers", peers,
         "--data-dir", str(tmp_path / "n9"), "--token-file", str(cluster.token_file), "--join"],
        capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "not a member" in run.stderr and "member add 9" in run.stderr, run.stderr


def test_the_cli_adds_a_learner_promotes_and_removes_it(make_cluster, wait_for) -> None:
    """etcdctl's member commands: add --learner, the new node started with serve --join by
    hand, promote once it caught up, list as a table and JSON, remove (the node stops)."""
    import json
    import os
    import subprocess
    import sys

    from coordinator.cluster import free_port

    cluster = make_cluster()
    env = dict(os.environ, COORDINATOR_ENDPOINTS=",".join(cluster.endpoints),
               COORDINATOR_TOKEN_FILE=str(cluster.token_file))

    def cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
        run = subprocess.run([sys.executable, "-m", "coordinator.cli", *args], env=env,
                             capture_output=True, text=True, timeout=60)
        assert (run.returncode == 0) == ok, (args, run.returncode, run.stdout, run.stderr)
        return run

    with cluster.client() as client:
        client.put("before", "joined")
    address = f"127.0.0.1:{free_port()}"
    added = cli("member", "add", "4", address, "--learner")
    assert "4, node-4, " + address + ", learner" in added.stdout
    assert "serve --id 4" in added.stderr  # says how to start it
    peers = ",".join(f"{i}={cluster.endpoint(i)}" for i in cluster.node_ids) + f",4={address}"
    log = open(cluster.data_dir / "node-4.log", "ab")  # noqa: SIM115 - the child's
    node = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "serve", "--id", "4",
                             "--listen", address, "--peers", peers, "--join", "--data-dir",
                             str(cluster.data_dir / "node-4"), "--token-file", str(cluster.token_file),
                             "--tick-ms", "15"], stdout=log, stderr=subprocess.STDOUT)
    try:
        def promoted() -> bool:
            run = subprocess.run(
                [sys.executable, "-m", "coordinator.cli", "member", "promote", "4"], env=env,
                capture_output=True, text=True, timeout=60)
            assert run.returncode == 0 or "learner_not_ready" in run.stderr, run.stderr
            return run.returncode == 0

        wait_for(promoted, "the learner to catch up and be promoted")
        listed = json.loads(cli("member", "list", "-w", "json").stdout)["members"]
        assert [(m["ID"], m["isLearner"]) for m in listed] == [(1, False), (2, False), (3, False), (4, False)]
        table = cli("member", "list", "-w", "table").stdout
        assert table.splitlines()[0].split(" | ")[0].strip() == "ID" and address in table
        with cluster.client(endpoints=[address]) as at_four:
            assert at_four.get("before", consistency="stale") == b"joined"
        cli("member", "remove", "4")
        assert node.wait(60) == 0  # it stops itself once removed
        bad = cli("member", "remove", "4", ok=False)
        assert "not a member" in bad.stderr
    finally:
        if node.poll() is None:
            node.kill()
            node.wait()
        log.close()
