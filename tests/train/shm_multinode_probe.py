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

import os
import pathlib
import sys
import time
from typing import Any

import ray
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import synctrain

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/: probe_support
from probe_support import NODE_MEMORY, run_probe  # noqa: E402

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


def _body(cluster: Any, out: dict[str, Any]) -> None:
    started = time.monotonic()
    cluster.add_node(num_cpus=2, **NODE_MEMORY)
    cluster.wait_for_nodes()
    out["ray_nodes"] = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))
    result = synctrain.Trainer(train_loop, num_workers=WORKERS, mode="sync", use_gpu=False,
                               progress=False, step_log=False, grad_transport="auto").fit()
    out["outputs"] = result.outputs
    out["elapsed_s"] = round(time.monotonic() - started, 1)


def main() -> int:
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    return run_probe(MARKER, 2, _body)


if __name__ == "__main__":
    sys.exit(main())
