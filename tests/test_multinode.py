"""Placement across several Ray nodes, on a real 3-raylet Ray cluster (``ray.cluster_utils``).

Two issues promise it: async mode places its parameter-server shards across Ray nodes when
there are several (SPREAD), and ``coordinator.RayCluster`` puts each coordinator node on its own
Ray node when there are enough (STRICT_SPREAD placement group; bind on all interfaces,
advertise the host IP). The session's Ray instance (``ray_session``) is single-node and
``ray.init`` runs once per process, so ``tests/multinode_probe.py`` does the work in a
subprocess: it starts the cluster, runs both parts, prints one JSON line, and shuts down.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROBE = pathlib.Path(__file__).with_name("multinode_probe.py")
MARKER = "MULTINODE_RESULT "
STEPS = 8  # the probe's training steps per worker
PROBE_TIMEOUT_S = 200


def _run_probe() -> dict:
    env = dict(os.environ, RAY_DEDUP_LOGS="1")
    env.pop("RAY_ADDRESS", None)  # the probe must start its own cluster, not join another one
    proc = subprocess.run([sys.executable, str(PROBE)], capture_output=True, text=True,
                          timeout=PROBE_TIMEOUT_S, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARKER)]
    tail = f"rc={proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert lines, f"the probe printed no result line\n{tail}"
    result = json.loads(lines[-1][len(MARKER):])
    assert result["ok"], f"probe failed: {result.get('error')}\n{result.get('traceback', '')}\n{tail}"
    assert proc.returncode == 0, tail
    return result


@pytest.mark.timeout(240)
def test_shards_and_coordinator_nodes_spread_over_ray_nodes() -> None:
    result = _run_probe()
    ray_nodes = set(result["ray_nodes"])
    assert len(ray_nodes) == 3, result["ray_nodes"]

    # (a) async mode, 2 workers, 2 PS shards: the shards sit on 2 distinct Ray nodes.
    run = result["async"]
    outputs = run["outputs"]
    assert [o["rank"] for o in outputs] == [0, 1]
    assert all(o["steps"] == STEPS for o in outputs), outputs
    assert all(o["worker_node"] in ray_nodes for o in outputs)
    shard_nodes = run["shard_nodes"]
    assert len(shard_nodes) == 2 and set(shard_nodes) <= ray_nodes, shard_nodes
    assert len(set(shard_nodes)) == 2, f"both PS shards landed on Ray node {shard_nodes[0]}"
    assert run["num_ps_shards"] == 2
    assert run["pushes_received"] == 2 * 2 * STEPS  # every worker pushed every step to each shard
    if "gcs_shards" in run:  # the driver's view (GCS actor table) agrees with the actors' own
        gcs = [run["gcs_shards"][aid] for aid in outputs[0]["shard_ids"]]
        assert [g["class"] for g in gcs] == ["ParameterShard"] * 2
        assert [g["node"] for g in gcs] == shard_nodes

    # (b) RayCluster(nodes=3) on 3 Ray nodes: one coordinator actor per Ray node.
    rc = result["raycluster"]
    actors = rc["actors"]
    assert sorted(actors) == ["1", "2", "3"]
    actor_nodes = [actors[i]["ray_node"] for i in ("1", "2", "3")]
    assert set(actor_nodes) == ray_nodes, f"coordinator actors on Ray nodes {actor_nodes}"
    pg = rc["pg"]
    assert pg is not None, "3 Ray nodes for 3 coordinator nodes should use a placement group"
    assert pg["strategy"] == "STRICT_SPREAD" and pg["state"] == "CREATED", pg
    assert [pg["bundle_nodes"][str(k)] for k in range(3)] == actor_nodes
    for k, i in enumerate(("1", "2", "3")):  # several Ray nodes: bind all, advertise the host IP
        assert actors[i]["bind"] == "0.0.0.0", actors[i]
        assert actors[i]["host"] == rc["node_ips"][i], (actors[i], rc["node_ips"])
        assert rc["endpoints"][k] == f"{rc['node_ips'][i]}:{actors[i]['port']}"
    assert rc["get_before"] == "v"
    killed = str(rc["killed"])
    assert rc["killed_dead"], "the killed leader's actor did not die (or its port still accepts)"
    assert sorted(rc["node_ips_after_kill"]) == sorted({"1", "2", "3"} - {killed})
    assert rc["get_after"] == ["v", "v2"]
    assert rc["new_leader"] != rc["killed"] and str(rc["new_leader"]) in rc["node_ips_after_kill"]


LAUNCH_PROBE = pathlib.Path(__file__).with_name("launch_multinode_probe.py")
LAUNCH_MARKER = "LAUNCH_MULTINODE "


@pytest.mark.fault
@pytest.mark.timeout(560)
def test_synctrain_run_spreads_a_job_over_ray_nodes_and_survives_losing_one() -> None:
    """Issue 14, must show 5: ``synctrain run --workers 3 --mode async --num-ps-shards 2
    --min-workers 2`` on a 3-node Ray cluster places the 3 coordinator nodes on 3 distinct Ray
    nodes, the 2 shards on 2, the workers one per node; removing a (non-head) Ray node mid-run
    takes a worker, a coordinator node and a shard with it: the job restores its checkpoint
    with new shards, goes on with 2 workers (nowhere to place a third), keeps its coordinator
    on the 2 nodes left (a quorum), and finishes with every step committed once."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.run([sys.executable, str(LAUNCH_PROBE)], capture_output=True, text=True,
                          timeout=540, env=dict(env, RAY_DEDUP_LOGS="1"), check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(LAUNCH_MARKER)]
    tail = f"rc={proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert lines, f"the probe printed no result line\n{tail}"
    result = json.loads(lines[-1][len(LAUNCH_MARKER):])
    output = result.get("run_output", "")
    assert result["ok"], f"probe failed: {result.get('error')}\n{result.get('traceback', '')}\n{output}\n{tail}"

    ray_nodes = set(result["ray_nodes"])
    placed = result["placement"]
    assert len(ray_nodes) == 3
    assert sorted(placed["coordinator_node"]) == sorted(ray_nodes), f"coordinator nodes on {placed['coordinator_node']}"
    assert len(placed["ParameterShard"]) == 2 and len(set(placed["ParameterShard"])) == 2, placed
    assert sorted(placed["TrainWorker"]) == sorted(ray_nodes), f"workers on {placed['TrainWorker']}"
    removed = result["removed_node"]
    assert removed != result["head"] and removed in placed["ParameterShard"]

    assert result["returncode"] == 0, output
    job = result["job"]
    assert job["state"] == "finished", job
    gens = job["generations"]
    assert [len(g["members"]) for g in gens] == [3, 2], gens
    assert "no worker could be placed" in gens[1]["reason"] and "restored step 10" in gens[1]["reason"], gens[1]
    assert removed not in {m["node_id"] for m in gens[1]["members"]}
    kinds = sorted(f["kind"] for f in job["failures"])
    assert kinds == ["coordinator_node_died", "died", "shard_died"], job["failures"]
    steps = [s["step"] for s in job["steps"]]
    assert steps == list(range(1, len(steps) + 1)) and steps, "every step committed once, no gap"
    assert not any(s["lost"] for s in job["steps"])
