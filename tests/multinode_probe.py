"""Multi-node probe, run by ``tests/test_multinode.py`` in a subprocess (not collected by pytest).

Starts a 3-node Ray cluster on this machine with ``ray.cluster_utils.Cluster`` (three real
raylets, each its own Ray node id, 1 CPU each), connects to it, then:

* ``async``: one ``Trainer(mode="async", num_workers=2, num_ps_shards=2)`` job; rank 0 asks
  each parameter-server shard actor which Ray node it runs on (``__ray_call__`` runs a function
  inside the actor), and the GCS actor table gives the same answer from the driver's side.
* ``raycluster``: ``coordinator.RayCluster(nodes=3)``; each coordinator actor reports its Ray
  node id, bind address and advertised host; the placement group table says where its bundles
  went; then put/get, kill the leader's actor, put/get again.

Prints exactly one line starting with ``MULTINODE_RESULT `` followed by a JSON object of what
it observed (also on failure: ``{"ok": false, "error": ...}``), and shuts the cluster down
whatever happens. The test asserts on that JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from typing import Any

import ray
import torch
import torch.nn.functional as F
from torch import nn

import synctrain
from synctrain import context as session_context

MARKER = "MULTINODE_RESULT "
RAY_NODES = 3
STEPS = 8


def _node_of_actor(_instance: Any) -> str:
    """Runs inside an actor (through ``__ray_call__``): the Ray node it lives on."""
    return ray.get_runtime_context().get_node_id()


def _coordinator_facts(placed: dict[str, Any]) -> dict[str, Any]:
    """A coordinator actor's Ray node, what it binds and what it advertises (as the actor
    reported them when it started: a serving actor takes no calls)."""
    return {"ray_node": placed["ray_node_id"], "bind": placed["bind"], "host": placed["host"],
            "port": placed["port"]}


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """A few SGD steps of Linear(8, 4) on random data; rank 0 also locates the shard actors.

    Defined in ``__main__``, so cloudpickle ships it to the workers by value.
    """
    ctx = synctrain.get_context()
    torch.manual_seed(0)
    model = synctrain.prepare_model(nn.Linear(8, 4))
    opt = synctrain.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=0.05))
    gen = torch.Generator().manual_seed(100 + ctx.rank)
    losses = []
    for _ in range(config["steps"]):
        x = torch.randn(16, 8, generator=gen)
        opt.zero_grad()
        loss = F.mse_loss(model(x), x[:, :4])
        loss.backward()
        opt.step()
        losses.append(float(loss))
    out: dict[str, Any] = {"rank": ctx.rank, "worker_node": ray.get_runtime_context().get_node_id(),
                           "steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1]}
    if ctx.rank == 0:
        shards = session_context.current_session().strategy.shards
        out["shard_ids"] = [s._actor_id.hex() for s in shards]
        out["shard_nodes"] = ray.get([s.__ray_call__.remote(_node_of_actor) for s in shards], timeout=60)
    return out


def _gcs_actor_nodes(actor_ids: list[str]) -> dict[str, Any]:
    """The driver's view: the GCS actor table's node id (and class) for each actor id."""
    table = ray._private.state.actors()  # GCS-backed; ray.util.state needs the dashboard
    return {aid: {"node": (table.get(aid) or {}).get("Address", {}).get("NodeID"),
                  "class": (table.get(aid) or {}).get("ActorClassName")} for aid in actor_ids}


def probe_async() -> dict[str, Any]:
    result = synctrain.Trainer(train_loop, num_workers=2, mode="async", num_ps_shards=2,
                               use_gpu=False, progress=False, config={"steps": STEPS}).fit()
    outputs = result.outputs
    rank0 = outputs[0] if outputs else {}
    facts: dict[str, Any] = {
        "outputs": outputs,
        "shard_nodes": rank0.get("shard_nodes"),
        "num_ps_shards": result.strategy_info.get("num_ps_shards"),
        "updates_applied": result.strategy_info.get("updates_applied"),
        "pushes_received": result.strategy_info.get("pushes_received"),
    }
    try:
        facts["gcs_shards"] = _gcs_actor_nodes(rank0.get("shard_ids", []))
    except Exception as exc:  # noqa: BLE001 - a cross-check only; the per-actor answer stands
        facts["gcs_error"] = f"{type(exc).__name__}: {exc}"
    return facts


def _wait_dead(actor: Any, endpoint: str, timeout_s: float = 30.0) -> bool:
    """``ray.kill`` only requests the kill: wait until the actor is gone and its port refuses
    connections, so the writes that follow really run without the old leader."""
    import socket

    from ray.exceptions import GetTimeoutError, RayActorError

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.node_ip.remote(), timeout=2)
        except RayActorError:
            break
        except GetTimeoutError:
            pass
        time.sleep(0.05)
    else:
        return False
    host, port = endpoint.rsplit(":", 1)
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
        except OSError:
            return True
        time.sleep(0.05)
    return False


def probe_raycluster() -> dict[str, Any]:
    from ray.util import placement_group_table

    from coordinator import RayCluster

    facts: dict[str, Any] = {}
    # CPUs reserved: the STRICT_SPREAD placement-group path (0-CPU nodes, the default, are
    # pinned by node affinity instead).
    with RayCluster(nodes=3, num_cpus_per_node=0.1) as cluster:
        facts["endpoints"] = list(cluster.endpoints)
        facts["node_ips"] = {str(i): ip for i, ip in cluster.node_ips().items()}
        facts["actors"] = {str(i): _coordinator_facts(cluster.placement(i)) for i in cluster.actors}
        if cluster._pg is not None:
            table = placement_group_table(cluster._pg)
            facts["pg"] = {"strategy": table.get("strategy"), "state": table.get("state"),
                           "bundle_nodes": {str(k): v for k, v in table["bundles_to_node_id"].items()}}
        else:
            facts["pg"] = None
        with cluster.client(timeout_s=30) as client:
            client.put("k", b"v")
            facts["get_before"] = (client.get("k") or b"").decode()
            leader = int(client.status()["leader"])
            facts["killed"] = leader
            victim = cluster.actors[leader]
            cluster.kill(leader)  # the leader's actor: its process dies; two of three remain
            facts["killed_dead"] = _wait_dead(victim, facts["endpoints"][leader - 1])
            facts["node_ips_after_kill"] = {str(i): ip for i, ip in cluster.node_ips().items()}
            t0 = time.monotonic()
            client.put("k2", b"v2")
            facts["failover_put_s"] = round(time.monotonic() - t0, 3)
            facts["get_after"] = [(client.get("k") or b"").decode(), (client.get("k2") or b"").decode()]
            facts["new_leader"] = int(client.status()["leader"])
    return facts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="async,raycluster")
    args = parser.parse_args()
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    from ray.cluster_utils import Cluster

    out: dict[str, Any] = {"ok": False}
    timings: dict[str, float] = {}
    cluster = None
    t0 = time.monotonic()
    try:
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "include_dashboard": False, "object_store_memory": 80 * 1024 * 1024})
        for _ in range(RAY_NODES - 1):
            cluster.add_node(num_cpus=1, object_store_memory=80 * 1024 * 1024)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
        timings["cluster_up_s"] = time.monotonic() - t0
        out["ray_nodes"] = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))
        for part, fn in (("async", probe_async), ("raycluster", probe_raycluster)):
            if part in args.parts.split(","):
                t = time.monotonic()
                out[part] = fn()
                timings[f"{part}_s"] = time.monotonic() - t
        out["ok"] = True
    except BaseException as exc:  # noqa: BLE001 - reported in the JSON line
        out["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        out["traceback"] = traceback.format_exc()[-4000:]
    finally:
        t = time.monotonic()
        try:
            ray.shutdown()
        finally:
            if cluster is not None:
                cluster.shutdown()
        timings["shutdown_s"] = time.monotonic() - t
        out["timings"] = {k: round(v, 2) for k, v in timings.items()}
        print(MARKER + json.dumps(out, default=str), flush=True)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
