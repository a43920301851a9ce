"""GPU checks (NCCL). Skipped on machines without CUDA; run them where a GPU is present."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import synctrain

pytestmark = [pytest.mark.gpu, pytest.mark.ray]


def gpu_loop(config):
    ctx = synctrain.get_context()
    torch.manual_seed(0)
    model = synctrain.prepare_model(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)))
    opt = synctrain.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(20, 16 * ctx.world_size, 32, generator=g)
    y = torch.randint(0, 4, (20, 16 * ctx.world_size), generator=g)
    for t in range(20):
        xb = x[t, ctx.rank * 16:(ctx.rank + 1) * 16].to(ctx.device)
        yb = y[t, ctx.rank * 16:(ctx.rank + 1) * 16].to(ctx.device)
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    module = model.module
    return {"device": str(next(module.parameters()).device),
            "params": [p.detach().cpu() for p in module.parameters()],
            "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None}


def test_use_gpu_auto_trains_on_cuda_with_nccl(ray_session):
    gpus = int(ray_session.cluster_resources().get("GPU", 0))
    if gpus < 1:
        pytest.skip("the Ray cluster has no GPU")
    workers = min(2, gpus)
    result = synctrain.Trainer(gpu_loop, num_workers=workers, use_gpu="auto", progress=False).fit()
    assert all(out["device"].startswith("cuda") for out in result.outputs)
    first = result.outputs[0]["params"]
    for out in result.outputs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(first, out["params"], strict=True))
