"""GPU checks. Skipped on machines without CUDA; run them where a GPU is present.

* one worker per GPU trains on CUDA with NCCL, and every rank ends with the same parameters;
* two workers sharing one GPU (``resources_per_worker={"GPU": 0.5}``): sync mode falls back to
  gloo (NCCL refuses two ranks on one device) and still computes what the CPU run computes;
* async mode on CUDA (parameters staged through host memory to the shards) with
  ``staleness=0`` gives the parameters of sync mode.
"""

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
    module = getattr(model, "module", model)
    return {"device": str(next(module.parameters()).device),
            "params": [p.detach().cpu() for p in module.parameters()],
            "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None}


def _gpus(ray_session) -> int:
    gpus = int(ray_session.cluster_resources().get("GPU", 0))
    if gpus < 1:
        pytest.skip("the Ray cluster has no GPU")
    return gpus


def _cpu_reference(mode: str = "sync", **options):
    return synctrain.Trainer(gpu_loop, num_workers=2, mode=mode, use_gpu=False, progress=False,
                             **options).fit().outputs[0]["params"]


def _max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def test_use_gpu_auto_trains_on_cuda_with_nccl(ray_session):
    workers = min(2, _gpus(ray_session))
    result = synctrain.Trainer(gpu_loop, num_workers=workers, use_gpu="auto", progress=False).fit()
    assert all(out["device"].startswith("cuda") for out in result.outputs)
    assert all(out["backend"] == "nccl" for out in result.outputs)
    first = result.outputs[0]["params"]
    for out in result.outputs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(first, out["params"], strict=True))


def test_two_ranks_sharing_one_gpu_use_gloo_and_match_cpu(ray_session):
    _gpus(ray_session)
    result = synctrain.Trainer(gpu_loop, num_workers=2, use_gpu=True, progress=False,
                               resources_per_worker={"CPU": 1, "GPU": 0.5}).fit()
    assert all(out["device"].startswith("cuda") for out in result.outputs)
    assert [out["backend"] for out in result.outputs] == ["gloo", "gloo"]
    first = result.outputs[0]["params"]
    assert all(torch.equal(a, b) for a, b in zip(first, result.outputs[1]["params"], strict=True))
    assert _max_diff(first, _cpu_reference()) <= 1e-4


def test_async_staleness_zero_on_gpu_matches_sync(ray_session):
    _gpus(ray_session)
    result = synctrain.Trainer(gpu_loop, num_workers=2, mode="async", staleness=0, use_gpu=True,
                               progress=False, resources_per_worker={"CPU": 1, "GPU": 0.5}).fit()
    assert all(out["device"].startswith("cuda") for out in result.outputs)
    info = result.strategy_info
    assert info["pushes_received"] == 2 * info["updates_applied"] > 0  # one averaged update per clock
    reference = _cpu_reference()
    for out in result.outputs:
        assert _max_diff(out["params"], reference) <= 1e-4
