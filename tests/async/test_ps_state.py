"""Recovery of the parameter server: snapshots, restore into fresh shards, replacement workers.

A shard's ``export_state`` must come back through ``torch.save``/``torch.load(weights_only=True)``
and, imported into a fresh shard, train on exactly as the original; a replacement worker
``join``s at a clock that blocks nobody, and a push from the process it replaced (a zombie)
is refused. The shard tests drive the class in-process on an asyncio loop, as
test_ps_shard.py does; the last ones go through Ray: the strategy's restore path (fresh
shards, ``restore_shards``, every rank joining) and a real Trainer job saving
``opt.state_dict()``.
"""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
import ray
import torch
from torch import nn

import synctrain
from synctrain import context as session_context
from synctrain.context import TrainContext
from synctrain.ps import OptimizerRecipe, ParameterServerError, StalenessTimeoutError
from synctrain.ps.layout import Segment
from synctrain.ps.shard import ParameterShard, ShardConfig
from synctrain.spec import JobSpec
from synctrain.strategies.paramserver import ParameterServerStrategy, restore_shards

JOB = "job-state"
N = 4


def config(staleness, *, timeout_s=60.0):
    return ShardConfig(job_id=JOB, shard_index=0, num_shards=1, num_workers=2, staleness=staleness,
                       skip_nonfinite=False, update_scale=0.5, wait_timeout_s=timeout_s, torch_threads=None)


def adam_recipe():
    p = nn.Parameter(torch.zeros(N))
    return OptimizerRecipe.of(torch.optim.Adam([p], lr=0.1), [p])


def sgd_recipe():
    p = nn.Parameter(torch.zeros(N))
    return OptimizerRecipe.of(torch.optim.SGD([p], lr=1.0), [p])


async def make_shard(staleness, recipe, **kw):
    shard = ParameterShard(config(staleness, **kw))
    await shard.init_params(JOB, "digest", np.arange(N, dtype=np.float32))
    await shard.set_optimizer(JOB, 0, recipe, (Segment(0, N, 0),))
    return shard


def push(shard, worker, clock, grads, min_clock=0):
    return shard.push(JOB, worker, clock, np.asarray(grads, dtype=np.float32), min_clock, 0)


def through_torch_save(obj):
    """What a checkpoint file does to ``obj``: saved, then loaded with weights_only=True."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)


async def settle():
    for _ in range(20):
        await asyncio.sleep(0)


def run(coro):
    return asyncio.run(coro)


# ---- export and import --------------------------------------------------------------------
def test_a_snapshot_imported_into_a_fresh_shard_trains_on_exactly_as_the_original():
    async def scenario():
        original = await make_shard(None, adam_recipe())
        for clock, (g0, g1) in enumerate([([1, 2, 3, 4], [0, 1, 0, 1]), ([-1, 0, 2, 0], [3, 3, 3, 3])]):
            await push(original, 0, clock, g0)
            await push(original, 1, clock, g1)
        await push(original, 0, 2, [5, 0, 0, 5])  # clocks (3, 2): not all equal
        state = through_torch_save(await original.export_state(JOB))
        assert set(state) == {"shard_index", "num_shards", "params", "optimizer", "clocks", "received",
                              "active", "version", "digest"}
        assert (state["clocks"], state["received"], state["version"]) == ([3, 2], [3, 2], 5)

        restored = ParameterShard(config(None))
        await restored.import_state(JOB, state)
        # Initialised at once: get_params answers before any optimizer, and rank 0 must not init.
        reply = await restored.get_params(JOB, 1, "digest")
        np.testing.assert_array_equal(reply.params, original.params())
        assert reply.clocks == (3, 2) and reply.version == 5
        with pytest.raises(ParameterServerError, match="already initialised"):
            await restored.init_params(JOB, "digest", np.zeros(N, dtype=np.float32))
        await restored.set_optimizer(JOB, 0, adam_recipe(), (Segment(0, N, 0),))  # loads Adam's moments
        mine, theirs = await restored.optimizer_state(JOB), await original.optimizer_state(JOB)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(mine["state"][0][key], theirs["state"][0][key], rtol=0, atol=0)
        assert await restored.clocks(JOB) == await original.clocks(JOB) == [3, 2]
        # The same next push gives the same parameters on both, bit for bit.
        a, b = await push(original, 1, 2, [1, -1, 1, -1]), await push(restored, 1, 2, [1, -1, 1, -1])
        np.testing.assert_array_equal(a.params, b.params)
        assert (a.version, a.clocks) == (b.version, b.clocks) == (6, (3, 3))

    run(scenario())


def test_import_refuses_a_used_shard_and_a_snapshot_of_another_shape():
    async def scenario():
        source = await make_shard(None, sgd_recipe())
        state = await source.export_state(JOB)
        with pytest.raises(ParameterServerError, match="already holds parameters"):
            await source.import_state(JOB, state)
        other = ShardConfig(job_id=JOB, shard_index=1, num_shards=2, num_workers=2, staleness=None,
                            skip_nonfinite=False, update_scale=0.5, wait_timeout_s=5.0)
        with pytest.raises(ParameterServerError, match="same num_ps_shards"):
            await ParameterShard(other).import_state(JOB, state)
        with pytest.raises(ParameterServerError, match="same num_workers"):
            await ParameterShard(config(None)).import_state(JOB, {**state, "clocks": [0, 0, 0]})
        # An optimizer state of another shape is refused when the optimizer is built, and the
        # shard keeps no optimizer (the recipe is not taken).
        adam = await make_shard(None, adam_recipe())
        await push(adam, 0, 0, [1, 1, 1, 1])
        moments = await adam.optimizer_state(JOB)
        moments["state"][0]["exp_avg"] = torch.zeros(N + 1)
        shard = ParameterShard(config(None))
        await shard.import_state(JOB, {**state, "optimizer": moments})
        with pytest.raises(ParameterServerError, match="shape"):
            await shard.set_optimizer(JOB, 0, adam_recipe(), (Segment(0, N, 0),))
        assert shard._recipe is None

    run(scenario())


def test_a_bulk_synchronous_round_in_collection_is_not_in_the_snapshot():
    """Worker 0's push of clock 0 waits for worker 1's: answered to nobody, it is left out of
    the snapshot, so after a restore both push clock 0 again and the round is whole."""
    async def scenario():
        shard = await make_shard(0, sgd_recipe())
        waiting = asyncio.ensure_future(push(shard, 0, 0, [2, 2, 2, 2], min_clock=1))
        await settle()
        state = await shard.export_state(JOB)
        assert (state["clocks"], state["received"]) == ([0, 0], [0, 0])
        restored = ParameterShard(config(0))
        await restored.import_state(JOB, state)
        await restored.set_optimizer(JOB, 0, sgd_recipe(), (Segment(0, N, 0),))
        again = asyncio.ensure_future(push(restored, 0, 0, [2, 2, 2, 2], min_clock=1))
        r1 = await push(restored, 1, 0, [4, 0, 0, 4], min_clock=1)
        np.testing.assert_array_equal((await again).params, r1.params)
        np.testing.assert_array_equal(r1.params, np.arange(N) - 0.5 * np.array([6, 2, 2, 6]))
        await push(shard, 1, 0, [0, 0, 0, 0], min_clock=1)  # end the original's round too
        await waiting

    run(scenario())


# ---- join, leave and zombies ----------------------------------------------------------------
def test_a_replacement_joins_at_a_clock_that_blocks_nobody_and_the_old_process_is_refused():
    async def scenario():
        # staleness 1; a push of clock c asks for every active clock >= c (= c + 1 - s).
        shard = await make_shard(1, sgd_recipe(), timeout_s=2.0)
        await push(shard, 0, 0, [0, 0, 0, 0], min_clock=0)
        await push(shard, 1, 0, [0, 0, 0, 0], min_clock=0)
        await push(shard, 1, 1, [0, 0, 0, 0], min_clock=1)  # worker 1 at clock 2, then it dies
        await shard.leave(JOB, 1)
        for clock in range(1, 6):  # without the leave, clock 3 would wait for worker 1 (timeout 2 s)
            await asyncio.wait_for(push(shard, 0, clock, [0, 0, 0, 0], min_clock=clock), 1.0)
        with pytest.raises(ParameterServerError, match="after it left.*must stop"):
            await push(shard, 1, 2, [1, 1, 1, 1])  # the dead worker's process is not dead after all
        assert await shard.join(JOB, 1) == 6  # max(its own 2, worker 0's 6)
        with pytest.raises(ParameterServerError, match=r"expected clock 6: worker 1 was replaced at "
                                                       r"clock 6: this push comes from its old process \(a zombie\)"):
            await push(shard, 1, 2, [1, 1, 1, 1])
        np.testing.assert_array_equal(shard.params(), np.arange(N))  # nothing of the zombie's applied
        # Neither waits for the other beyond the bound.
        replacement = await asyncio.wait_for(push(shard, 1, 6, [1, 1, 1, 1], min_clock=6), 1.0)
        survivor = await asyncio.wait_for(push(shard, 0, 6, [0, 0, 0, 0], min_clock=6), 1.0)
        assert replacement.clocks == (6, 7) and survivor.clocks == (7, 7)
        np.testing.assert_array_equal(survivor.params, np.arange(N) - 0.5)
        assert shard.stats()["pushes_rejected"] == 2

    run(scenario())


def test_a_worker_that_joins_behind_the_others_is_not_waited_for():
    """Joined at worker 0's clock, worker 1 does not hold worker 0 back as it would at its own
    old clock; from there the staleness bound holds again."""
    async def scenario():
        shard = await make_shard(1, sgd_recipe(), timeout_s=0.5)
        await shard.leave(JOB, 1)
        for clock in range(4):
            await push(shard, 0, clock, [0, 0, 0, 0], min_clock=clock)
        assert await shard.join(JOB, 1) == 4
        await asyncio.wait_for(push(shard, 0, 4, [0, 0, 0, 0], min_clock=4), 1.0)
        # Worker 0 runs ahead by one more: now it must wait for worker 1 (the bound holds).
        with pytest.raises(StalenessTimeoutError, match=r"slowest active worker\(s\): \[1\]"):
            await push(shard, 0, 5, [0, 0, 0, 0], min_clock=5)

    run(scenario())


def test_bulk_synchronous_join_waits_for_the_round_its_predecessor_pushed_to():
    async def scenario():
        shard = await make_shard(0, sgd_recipe())
        dead = asyncio.ensure_future(push(shard, 1, 0, [4, 4, 4, 4], min_clock=1))  # then it dies
        await settle()
        await shard.leave(JOB, 1)
        dead.cancel()
        joining = asyncio.ensure_future(shard.join(JOB, 1))
        await settle()
        assert not joining.done()  # its predecessor's push of clock 0 waits for worker 0's
        await push(shard, 0, 0, [0, 0, 0, 0], min_clock=1)
        assert await joining == 1
        # Both push clock 1, one round, as if nobody had been replaced.
        first = asyncio.ensure_future(push(shard, 1, 1, [2, 0, 0, 0], min_clock=2))
        second = await push(shard, 0, 1, [0, 0, 0, 2], min_clock=2)
        assert (await first).clocks == second.clocks == (2, 2)
        # Round 0: the predecessor's gradient (worker 0 pushed zeros); round 1: both.
        np.testing.assert_array_equal(second.params, np.arange(N) - 0.5 * 4 - 0.5 * np.array([2, 0, 0, 2]))

    run(scenario())


# ---- through Ray: the strategy's restore path and a real job --------------------------------
def spec_for(job_id, **options):
    merged = ParameterServerStrategy.validate_options({"num_ps_shards": 2, **options}, 2)
    return JobSpec(job_id=job_id, mode="async", num_workers=2, use_gpu=False, cpus_per_worker=1,
                   gpus_per_worker=0, strategy_options=merged, collective_timeout_s=30.0)


def worker(spec, handles, rank):
    context = TrainContext(rank=rank, world_size=2, mode="async")
    return ParameterServerStrategy(context, spec, handles)


def model_and_optimizer(strategy):
    torch.manual_seed(0)
    model = strategy.prepare_model(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)))
    return model, strategy.prepare_optimizer(torch.optim.Adam(model.parameters(), lr=0.05))


def train_step(model, opt, seed):
    opt.zero_grad()
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(seed))
    model(x).pow(2).mean().backward()
    opt.step()


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.ray
def test_fresh_shards_restored_from_a_checkpoint_let_every_rank_join_and_train_on(ray_session):
    spec = spec_for("job-restore", staleness=None)
    handles = ParameterServerStrategy.on_driver_start(spec)
    workers = [worker(spec, handles, r) for r in range(2)]
    prepared = [model_and_optimizer(w) for w in workers]  # rank 0 sends, rank 1 pulls
    for step in range(3):
        for rank, (model, opt) in enumerate(prepared):
            train_step(model, opt, 10 * step + rank)
    checkpoint = through_torch_save(workers[0].state_dict())
    opt_checkpoint = through_torch_save(prepared[0][1].state_dict())
    for w in workers:
        w.on_shutdown()
    ParameterServerStrategy.on_driver_finish(spec, handles, True)
    assert checkpoint["mode"] == "async" and checkpoint["clock"] == 3
    assert [s["clocks"] for s in checkpoint["shards"]] == [[3, 3], [3, 3]]

    # The shards are read in parallel, so a snapshot may miss a push another shard has: as if
    # shard 1 had been read before both workers' last push.
    for key in ("clocks", "received"):
        checkpoint["shards"][1][key] = [2, 2]
    fresh = ParameterServerStrategy.on_driver_start(spec)  # the same job, new shards
    restore_shards(fresh["ps_shards"], spec.job_id, checkpoint, timeout_s=60)
    with pytest.raises(ParameterServerError, match="already holds parameters"):
        restore_shards(fresh["ps_shards"], spec.job_id, checkpoint, timeout_s=60)
    resumed_handles = {**fresh, "ps_initialised": True}
    resumed = [worker(spec, resumed_handles, r) for r in range(2)]
    again = [model_and_optimizer(w) for w in resumed]  # rank 0 joins too: no init_params
    # Each rank caught shard 1 up to clock 3 with a skipped push (before any optimizer).
    assert [ray.get(s.clocks.remote(spec.job_id)) for s in fresh["ps_shards"]] == [[3, 3], [3, 3]]
    saved = torch.cat([s["params"] for s in checkpoint["shards"]])
    for w, (model, _) in zip(resumed, again, strict=True):
        assert w.start_clock == w.clock == 3
        torch.testing.assert_close(flat(model), saved, rtol=0, atol=0)
    restored_opt = again[0][1].state_dict()  # Adam's moments came back with the shards
    for mine, theirs in zip(restored_opt["shards"], opt_checkpoint["shards"], strict=True):
        torch.testing.assert_close(mine["state"][0]["exp_avg"], theirs["state"][0]["exp_avg"], rtol=0, atol=0)
    for rank, (model, opt) in enumerate(again):
        train_step(model, opt, 100 + rank)
    assert [ray.get(s.clocks.remote(spec.job_id)) for s in fresh["ps_shards"]] == [[4, 4], [4, 4]]
    for w in resumed:
        w.on_shutdown()
    ParameterServerStrategy.on_driver_finish(spec, fresh, True)


@pytest.mark.ray
def test_a_live_replacement_catches_up_a_shard_that_is_behind(ray_session):
    """The replaced process's last push reached shard 0 only: the replacement's join answers
    clock 2 there and 1 on shard 1, so it pushes a skipped clock 1 to shard 1 and starts at 2."""
    spec = spec_for("job-join", staleness=1)
    handles = ParameterServerStrategy.on_driver_start(spec)
    shards = handles["ps_shards"]
    workers = [worker(spec, handles, r) for r in range(2)]
    prepared = [model_and_optimizer(w) for w in workers]
    for rank, (model, opt) in enumerate(prepared):
        train_step(model, opt, rank)
    ray.get(shards[0].push.remote(spec.job_id, 1, 1, None, 0, 0, None, False))  # half a push, then death
    ray.get([s.leave.remote(spec.job_id, 1) for s in shards])
    workers[1]._close_links()
    replacement = worker(spec, {**handles, "ps_initialised": True}, 1)
    model, opt = model_and_optimizer(replacement)
    assert replacement.start_clock == 2
    assert [ray.get(s.clocks.remote(spec.job_id)) for s in shards] == [[1, 2], [1, 2]]
    torch.testing.assert_close(flat(model), flat(prepared[1][0]), rtol=0, atol=0)  # pulled after both
    train_step(*prepared[0], 8)  # worker 0 first: under staleness 1 the replacement's clock 2 waits for it
    train_step(model, opt, 7)
    assert [ray.get(s.clocks.remote(spec.job_id)) for s in shards] == [[2, 3], [2, 3]]
    replacement.on_shutdown()
    workers[0].on_shutdown()
    ParameterServerStrategy.on_driver_finish(spec, handles, True)


def checkpointing_loop(config):
    """Three Adam steps, then opt.state_dict() and the strategy's state through torch.save;
    loading it back works, a checkpoint of another shard count is refused."""
    torch.manual_seed(0)
    model = synctrain.prepare_model(nn.Linear(6, 3))
    opt = synctrain.prepare_optimizer(torch.optim.Adam(model.parameters(), lr=1e-2))
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 6)).pow(2).sum().backward()
        opt.step()
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "ps": session_context.current_session().strategy.state_dict()}, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    opt.load_state_dict(loaded["opt"])
    refusals = []
    for bad in ({**loaded["opt"], "shards": loaded["opt"]["shards"][:1]}, {"state": {}, "param_groups": []}):
        try:
            opt.load_state_dict(bad)
        except (ParameterServerError, ValueError) as exc:
            refusals.append(str(exc))
    opt.zero_grad()
    model(torch.randn(4, 6)).pow(2).sum().backward()
    opt.step()  # still trains after the load
    return {"checkpoint": buffer.getvalue(), "refusals": refusals}


@pytest.mark.ray
@pytest.mark.slow
def test_async_optimizer_and_strategy_state_dicts_survive_torch_save_in_a_real_job(ray_session):
    result = synctrain.Trainer(checkpointing_loop, num_workers=2, mode="async", use_gpu=False,
                               progress=False, num_ps_shards=2).fit()
    for rank, out in enumerate(result.outputs):
        assert "num_ps_shards=1" in out["refusals"][0] and "not an async-mode" in out["refusals"][1]
        saved = torch.load(io.BytesIO(out["checkpoint"]), weights_only=True)
        opt, ps = saved["opt"], saved["ps"]
        assert opt["synctrain_async"] == 1 and opt["param_groups"][0]["lr"] == 1e-2
        assert len(opt["shards"]) == 2
        for shard in opt["shards"]:  # not silently empty: Adam's moments of every piece
            assert shard["state"] and all(s["exp_avg"].abs().sum() > 0 for s in shard["state"].values())
        assert ps["mode"] == "async" and len(ps["shards"]) == 2
        assert sum(s["params"].numel() for s in ps["shards"]) == 6 * 3 + 3
        assert all(len(s["clocks"]) == 2 and s["clocks"][rank] >= 3 for s in ps["shards"])


def stepping_loop(config):
    """Plain SGD steps on a small model, ``config["steps"]`` of them; a checkpoint every few."""
    torch.manual_seed(0)
    model = synctrain.prepare_model(nn.Linear(6, 3))
    opt = synctrain.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9))
    for _ in range(config["steps"]):
        opt.zero_grad()
        model(torch.randn(4, 6)).pow(2).sum().backward()
        opt.step()
    return {}


def test_a_checkpoint_holds_the_shards_as_of_its_step_though_they_travel_after_it(ray_session, tmp_path):
    """Rank 0 asks each shard for its snapshot over the socket and trains on; the writer
    fetches the snapshots later. Every checkpoint still holds exactly rank 0's pushes up to its
    step (none of the ones it sent after asking), with the optimizer's momentum."""
    steps, every = 40, 5
    result = synctrain.Trainer(stepping_loop, num_workers=2, mode="async", use_gpu=False, progress=False,
                               config={"steps": steps}, storage_path=str(tmp_path), job_name="later",
                               checkpoint_every=every, num_ps_shards=2).fit()
    # the loop's last step has no capture point after it: no checkpoint there
    assert result.worker_metrics[0]["snapshots_later"] == (steps - 1) // every, result.worker_metrics[0]
    # both shards are on this machine: every snapshot came over the writer's own socket
    assert result.worker_metrics[0]["snapshots_by_socket"] == 2 * ((steps - 1) // every), result.worker_metrics[0]
    files = sorted((tmp_path / "later").rglob("ckpt-*.pt"))
    assert files, "no checkpoint kept"
    for path in files:
        doc = synctrain.load_checkpoint(path)
        clock = doc["strategy"]["clock"]
        assert clock == doc["step"] and clock % every == 0, path.name
        for shard in doc["strategy"]["shards"]:
            assert shard["received"][0] == shard["clocks"][0] == clock, (path.name, shard["received"])
            assert shard["optimizer"]["state"], "the momentum buffers are in it"
