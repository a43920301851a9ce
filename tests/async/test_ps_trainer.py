"""Async mode end to end through ``Trainer`` (issue #4, "must show" 1, 2 and 6).

Two workers, a tiny MLP on synthetic data, a few dozen steps: enough to compare parameters
bit-for-bit-ish with sync mode and to watch the staleness bound hold under a straggler.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import synctrain
from synctrain import TrainingFailedError, WorkerDiedError
from synctrain import context as session_context
from synctrain.ps import shm

pytestmark = [pytest.mark.ray, pytest.mark.slow]
STEPS = 40


def small_loop(config):
    """40 steps of regression; rank r draws its own batches. Returns the flat parameters."""
    ctx = synctrain.get_context()
    torch.manual_seed(0)
    width = config.get("width", 16)
    model = synctrain.prepare_model(nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, 1)))
    if config.get("opt", "sgd") == "sgd":
        base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    else:
        base = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt = synctrain.prepare_optimizer(base)
    gen = torch.Generator().manual_seed(100 + ctx.rank)
    for step in range(config.get("steps", STEPS)):
        x = torch.randn(16, 8, generator=gen)
        if config.get("zero") == "model":
            model.zero_grad()  # sets every .grad to None: the strategy must cope
        else:
            opt.zero_grad()
        loss = F.mse_loss(model(x), x.sum(1, keepdim=True))
        if step == config.get("nan_step") and ctx.rank == config.get("nan_rank"):
            loss = loss * float("nan")
        loss.backward()
        opt.step()
        if ctx.rank == config.get("slow_rank"):
            time.sleep(config.get("slow_s", 0.0))  # a deliberate straggler, not synchronisation
    synctrain.report({"done": 1, **{k: v for k, v in synctrain.strategy_metrics().items()
                                    if isinstance(v, (int, float))}})
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist()
    if config.get("grad_storages"):  # how many buffers hold the gradients (1: all are views)
        return {"params": flat, "grad_storages": len({p.grad.untyped_storage().data_ptr()
                                                      for p in model.parameters()})}
    if config.get("collectives"):  # all_reduce, broadcast and barrier work in async mode too
        mean = synctrain.all_reduce(torch.tensor([float(ctx.rank), 1.0]))
        synctrain.barrier()
        from_zero = torch.tensor([float(ctx.rank + 7)])
        session_context.current_session().strategy.broadcast(from_zero, src=0)  # no public helper yet
        return {"params": flat, "mean": mean.tolist(), "broadcast": from_zero.item()}
    return flat


def fit(mode, config, **options):
    return synctrain.Trainer(small_loop, num_workers=2, mode=mode, use_gpu=False, progress=False,
                             config=config, **options).fit()


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_staleness_zero_holds_the_parameters_of_sync_mode(ray_session, opt):
    sync = fit("sync", {"opt": opt})
    bsp = fit("async", {"opt": opt}, staleness=0, num_ps_shards=2)
    reference = torch.tensor(sync.outputs[0])
    for rank in range(2):
        diff = (torch.tensor(bsp.outputs[rank]) - reference).abs().max().item()
        assert diff <= 1e-5, f"rank {rank}: max abs diff {diff} after {STEPS} steps"
    assert bsp.worker_metrics[0]["staleness_max"] == 0
    assert bsp.strategy_info["updates_applied"] == 2 * STEPS  # one per clock, per shard


@pytest.mark.parametrize("staleness", [0, None])
def test_mid_sized_shards_travel_in_inline_pieces_with_the_same_result(ray_session, staleness):
    # width 7500: 75,001 parameters = 150 KB per shard with 2 shards, over Ray's 100 KB inline
    # limit, so each push and each reply goes in 2 pieces (push_chunked) instead of the object store
    # (with transport="ray"; by default shards on the worker's machine use shared memory).
    config = {"opt": "adam", "width": 7500, "steps": 12}
    out = fit("async", config, staleness=staleness, num_ps_shards=2, transport="ray")
    assert out.worker_metrics[0]["push_pieces"] == [2, 2]
    assert out.worker_metrics[0]["push_transport"] == ["inline_pieces", "inline_pieces"]
    assert out.strategy_info["pushes_received"] == 2 * 2 * 12
    if staleness == 0:
        sync = torch.tensor(fit("sync", config).outputs[0])
        for rank in range(2):
            assert (torch.tensor(out.outputs[rank]) - sync).abs().max().item() <= 1e-5
    else:
        assert out.strategy_info["updates_applied"] == out.strategy_info["pushes_received"]
        assert all(torch.isfinite(torch.tensor(o)).all() for o in out.outputs)


def shm_leftovers():
    return [f for f in os.listdir(shm.SHM_DIR) if f.startswith(shm.PREFIX)] if shm.available() else []


@pytest.mark.skipif(not shm.available(), reason="this machine has no writable /dev/shm")
@pytest.mark.parametrize("staleness", [0, None])
def test_shared_memory_and_ray_transports_give_the_same_training(ray_session, staleness):
    """On one machine every push goes through shared memory by default; transport="ray" sends
    the same bytes through Ray. Same data, same order: the same parameters (bulk-synchronous),
    and with staleness=None every push applied once either way."""
    config = {"opt": "adam", "steps": 20, "width": 64}
    auto = fit("async", config, staleness=staleness, num_ps_shards=2)
    via_ray = fit("async", config, staleness=staleness, num_ps_shards=2, transport="ray")
    assert auto.worker_metrics[0]["push_transport"] == ["shared_memory"] * 2
    assert via_ray.worker_metrics[0]["push_transport"] == ["ray"] * 2
    if staleness == 0:
        for a, b in zip(auto.outputs, via_ray.outputs, strict=True):
            assert (torch.tensor(a) - torch.tensor(b)).abs().max().item() <= 1e-6
    for result in (auto, via_ray):
        for s in result.strategy_info["shards"]:
            assert s["pushes_received"] == 40 and s["gradients_applied"] == 40
    assert shm_leftovers() == []  # every channel file was unlinked once both sides had it


@pytest.mark.fault
def test_a_worker_killed_mid_run_leaves_no_shared_memory_behind(ray_session, tmp_path, sigkill_when_written):
    pid_file = tmp_path / "rank1.pid"

    def loop(config):
        ctx = synctrain.get_context()
        model = synctrain.prepare_model(nn.Linear(64, 64))
        opt = synctrain.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=0.01))
        for step in range(100_000):  # trains until rank 1 is killed
            opt.zero_grad()
            model(torch.randn(4, 64)).sum().backward()
            opt.step()
            if step == 3:
                (tmp_path / f"rank{ctx.rank}.pid").write_text(str(os.getpid()))

    sigkill_when_written(pid_file)
    with pytest.raises((WorkerDiedError, TrainingFailedError)):
        synctrain.Trainer(loop, num_workers=2, mode="async", staleness=None, use_gpu=False,
                          progress=False, wait_timeout_s=30, max_failures=0).fit()
    assert pid_file.exists()  # it was killed while pushing through shared memory
    assert shm_leftovers() == []


def test_gradients_are_views_of_one_buffer_and_model_zero_grad_still_works(ray_session):
    """backward accumulates straight into the flat buffer that is pushed (no copy per step);
    model.zero_grad(), which replaces every .grad with None, pushes the same gradients (the
    run with opt.zero_grad is checked against sync mode above)."""
    views = fit("async", {"grad_storages": True}, staleness=0)
    replaced = fit("async", {"zero": "model", "grad_storages": True}, staleness=0)
    assert [o["grad_storages"] for o in views.outputs] == [1, 1]
    assert [o["grad_storages"] for o in replaced.outputs] == [1, 1]  # re-bound after the copy
    for a, b in zip(views.outputs, replaced.outputs, strict=True):
        assert (torch.tensor(a["params"]) - torch.tensor(b["params"])).abs().max().item() <= 1e-6


@pytest.mark.parametrize(("staleness", "pull_every", "pipeline"), [(1, 1, False), (3, 2, True)])
def test_observed_lag_never_exceeds_the_bound_with_a_straggler(ray_session, staleness, pull_every,
                                                               pipeline):
    result = fit("async", {"slow_rank": 1, "slow_s": 0.01, "steps": 30}, staleness=staleness,
                 num_ps_shards=2, pull_every=pull_every, pipeline=pipeline)
    for rank, m in enumerate(result.worker_metrics):
        assert m["optimizer_steps"] == 30
        assert m["staleness_max"] <= staleness, (rank, m["staleness_hist"])
        assert len(m["staleness_hist"]) <= staleness + 1
    assert result.metrics[-1]["staleness_max"] <= staleness  # also visible through report()


def test_fully_async_loses_no_update(ray_session):
    result = fit("async", {"steps": 30, "collectives": True}, staleness=None, num_ps_shards=2)
    for out in result.outputs:
        assert out["mean"] == [0.5, 1.0] and out["broadcast"] == 7.0
    shards = result.strategy_info["shards"]
    assert len(shards) == 2
    for s in shards:
        assert s["updates_applied"] == s["pushes_received"] == 60
        assert s["clocks"] == [30, 30] and s["pushes_per_s"] > 0
    assert result.strategy_info["pushes_received"] == result.strategy_info["updates_applied"] == 120


def test_nonfinite_gradient_fails_the_job_naming_the_worker(ray_session):
    with pytest.raises(TrainingFailedError, match="NonFiniteGradientError") as info:
        fit("async", {"steps": 10, "nan_step": 3, "nan_rank": 1}, staleness=None, max_failures=0)
    assert info.value.rank == 1
    assert "worker 1 computed a gradient with NaN/Inf at step 3" in str(info.value)


def test_skip_nonfinite_drops_the_bad_step_and_trains_on(ray_session):
    result = fit("async", {"steps": 10, "nan_step": 3, "nan_rank": 1}, staleness=0,
                 skip_nonfinite=True)
    assert result.worker_metrics[1]["nonfinite_skipped"] == 1
    shard = result.strategy_info["shards"][0]
    assert shard["pushes_skipped"] == 1 and shard["gradients_applied"] == 19
    assert all(abs(v) < 1e3 for v in result.outputs[0])  # no NaN reached the parameters


def test_more_shards_than_parameters_is_a_clear_error(ray_session):
    def tiny_loop(config):
        synctrain.prepare_model(nn.Linear(1, 1))

    with pytest.raises(TrainingFailedError, match=r"num_ps_shards=3 is larger than the model's 2 parameter"):
        synctrain.Trainer(tiny_loop, num_workers=2, mode="async", use_gpu=False, progress=False,
                          num_ps_shards=3, max_failures=0).fit()


def test_optimizer_state_dict_is_the_shards_state_not_silently_empty(ray_session):
    """The worker's optimizer never steps in async mode (the shards do): its own state_dict
    would be empty, so opt.state_dict() holds the shards' optimizer states instead (more in
    test_ps_state.py)."""
    def loop(config):
        model = synctrain.prepare_model(nn.Linear(4, 2))
        opt = synctrain.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        opt.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        state = opt.state_dict()
        opt.load_state_dict(state)
        return sum(entry.get("momentum_buffer") is not None
                   for shard in state["shards"] for entry in shard["state"].values())

    result = synctrain.Trainer(loop, num_workers=2, mode="async", use_gpu=False,
                               progress=False).fit()
    assert result.outputs == [2, 2]  # a momentum buffer for the weight and one for the bias
