"""Hierarchical all-reduce probe, run by ``tests/train/test_shm_multinode.py`` in a subprocess
(not collected by pytest; the session's Ray is single-node and ``ray.init`` runs once per process).

Starts a 2-node Ray cluster on this machine with ``ray.cluster_utils.Cluster`` (two raylets,
two Ray node ids, 2 CPUs each), connects, and runs one sync job of 4 ranks (so 2 per node)
with ``grad_transport="auto"``: within each Ray node through shared memory, between them
through gloo among the nodes' lowest ranks. Each rank trains a model through the transport
and a twin in plain DDP (gloo), checks ``all_reduce``/``broadcast`` (from a node's lowest rank
and from another rank) and ``barrier``, and reports. Prints one line ``SHM_MULTINODE {json}``.
"""

from __future__ import annotations

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
from torch.nn.parallel import DistributedDataParallel

import synctrain

MARKER = "SHM_MULTINODE "
STEPS = 10
WORKERS = 4


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(13, 9), nn.Tanh(), nn.Linear(9, 3))


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    ctx = synctrain.get_context()
    torch.manual_seed(ctx.rank)  # different init per rank: the broadcast must fix it
    model = synctrain.prepare_model(make_model())
    opt = synctrain.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    torch.manual_seed(ctx.rank)
    twin = DistributedDataParallel(make_model())
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(7 + ctx.rank)
    for _ in range(STEPS):
        x, y = torch.randn(8, 13, generator=g), torch.randint(0, 3, (8,), generator=g)
        for m, o in ((model, opt), (twin, twin_opt)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    diff = max(float((a - b).abs().max()) for a, b in zip(model.parameters(), twin.parameters(), strict=True))
    total = torch.arange(100_003, dtype=torch.float32) * (ctx.rank + 1)
    synctrain.all_reduce(total, op="sum")
    expect = torch.arange(100_003, dtype=torch.float32) * sum(range(1, ctx.world_size + 1))
    broadcasts = []
    for src in (3, 2, 0):  # not a node's lowest rank, then two that are
        t = torch.full((3001,), float(ctx.rank))
        synctrain.broadcast(t, src=src)
        broadcasts.append(bool(torch.equal(t, torch.full((3001,), float(src)))))
    synctrain.barrier()
    digest = [float(p.detach().double().sum()) for p in model.parameters()]
    return {"rank": ctx.rank, "node": ray.get_runtime_context().get_node_id(), "twin_diff": diff,
            "all_reduce_exact": bool(torch.equal(total, expect)), "broadcasts": broadcasts,
            "digest": digest, "grad_transport": synctrain.strategy_metrics()["grad_transport"]}


def main() -> int:
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    from ray.cluster_utils import Cluster

    out: dict[str, Any] = {"ok": False}
    cluster = None
    started = time.monotonic()
    try:
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "include_dashboard": False, "object_store_memory": 80 * 1024 * 1024})
        cluster.add_node(num_cpus=2, object_store_memory=80 * 1024 * 1024)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
        out["ray_nodes"] = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))
        result = synctrain.Trainer(train_loop, num_workers=WORKERS, mode="sync", use_gpu=False,
                                   progress=False, step_log=False, grad_transport="auto").fit()
        out["outputs"] = result.outputs
        out["elapsed_s"] = round(time.monotonic() - started, 1)
        out["ok"] = True
    except BaseException as exc:  # noqa: BLE001 - reported in the JSON line
        out["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        out["traceback"] = traceback.format_exc()[-4000:]
    finally:
        try:
            ray.shutdown()
            if cluster is not None:
                cluster.shutdown()
        except Exception as exc:  # noqa: BLE001 - the result line matters more
            out["shutdown_error"] = str(exc)[:500]
    print(MARKER + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
