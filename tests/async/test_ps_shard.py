"""One parameter-server shard: update rules, staleness waits, bad input.

Most tests drive the shard object in-process on an asyncio loop (it is a plain class whose
methods are coroutines; Ray only hosts it): deterministic and fast. "Pending" means the push
task has not finished after the loop ran everything runnable. The last tests go through a
real Ray actor: concurrent pushes from two threads, and errors crossing Ray unchanged.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import ray
import torch
from torch import nn

from synctrain.ps import (
    GradientShapeError,
    NonFiniteGradientError,
    OptimizerRecipe,
    ParameterServerError,
    StaleJobError,
    StalenessTimeoutError,
)
from synctrain.ps.layout import Segment
from synctrain.ps.shard import ParameterShard, ShardConfig

JOB = "job-new"
N = 4


def config(staleness, *, skip=False, timeout_s=60.0, scale=0.5):
    return ShardConfig(job_id=JOB, shard_index=0, num_shards=1, num_workers=2, staleness=staleness,
                       skip_nonfinite=skip, update_scale=scale, wait_timeout_s=timeout_s,
                       torch_threads=None)


async def make_shard(staleness, **kw):
    shard = ParameterShard(config(staleness, **kw))
    await setup(shard)
    return shard


async def setup(shard):
    """Rank 0's part: initial parameters 0..N-1 and plain SGD with lr 1."""
    await shard.init_params(JOB, "digest", np.arange(N, dtype=np.float32))
    p = nn.Parameter(torch.zeros(N))
    recipe = OptimizerRecipe.of(torch.optim.SGD([p], lr=1.0), [p])
    await shard.set_optimizer(JOB, 0, recipe, (Segment(0, N, 0),))


def push(shard, worker, clock, grads, min_clock=0, job=JOB):
    """The push coroutine (in-process shard) or its ObjectRef (Ray actor handle)."""
    g = None if grads is None else np.asarray(grads, dtype=np.float32)
    method = shard.push.remote if isinstance(shard, ray.actor.ActorHandle) else shard.push
    return method(job, worker, clock, g, min_clock, 0)


async def settle():
    for _ in range(20):
        await asyncio.sleep(0)


def run(coro):
    return asyncio.run(coro)


def test_bulk_synchronous_applies_the_average_once_per_clock():
    async def scenario():
        shard = await make_shard(0)
        first = asyncio.ensure_future(push(shard, 0, 0, [2, 2, 2, 2], min_clock=1))
        await settle()
        assert not first.done()  # waits for worker 1's gradient of clock 0
        r1 = await push(shard, 1, 0, [4, 0, 0, 4], min_clock=1)
        r0 = await first
        expected = np.arange(N) - 0.5 * np.array([6, 2, 2, 6])  # lr 1, mean of the two pushes
        np.testing.assert_array_equal(r0.params, expected)
        np.testing.assert_array_equal(r1.params, expected)
        stats = shard.stats()
        assert (stats["updates_applied"], stats["pushes_received"], stats["clocks"]) == (1, 2, [1, 1])

    run(scenario())


def test_ssp_holds_a_worker_that_runs_more_than_s_clocks_ahead():
    async def scenario():
        shard = await make_shard(1)
        await push(shard, 0, 0, [0, 0, 0, 0], min_clock=0)  # clock 0 -> 1: bound 1 - 1 = 0
        ahead = asyncio.ensure_future(push(shard, 0, 1, [0, 0, 0, 0], min_clock=1))
        await settle()
        assert not ahead.done()  # clock 1 -> 2 needs worker 1 at clock 1
        await push(shard, 1, 0, [0, 0, 0, 0], min_clock=0)
        reply = await ahead
        assert reply.min_clock == 1 and reply.clocks == (2, 1)

    run(scenario())


def test_fully_async_applies_each_push_on_arrival():
    async def scenario():
        shard = await make_shard(None, scale=1.0)
        for clock in range(3):
            await push(shard, 0, clock, [1, 0, 0, 0])
        reply = await push(shard, 1, 0, [0, 0, 0, 1])
        np.testing.assert_array_equal(reply.params, [-3, 1, 2, 2])
        assert reply.version == 4 and reply.min_clock == 1

    run(scenario())


def test_a_push_that_asks_for_no_parameters_is_acknowledged_at_once():
    async def scenario():
        shard = await make_shard(1)
        await push(shard, 0, 0, [1, 1, 1, 1])
        # clock 1 -> 2 would wait for worker 1, but this push only delivers its gradient
        ack = await shard.push(JOB, 0, 1, np.ones(N, dtype=np.float32), 5, 0, None, False)
        assert ack.params is None and ack.clocks == (2, 0) and ack.wait_s == 0.0
        np.testing.assert_array_equal(shard.params(), np.arange(N) - 1.0)  # 2 pushes x 0.5

    run(scenario())


def test_a_leaving_worker_no_longer_holds_the_others_back():
    async def scenario():
        shard = await make_shard(0)
        waiting = asyncio.ensure_future(push(shard, 0, 0, [2, 2, 2, 2], min_clock=1))
        await settle()
        assert not waiting.done()
        await shard.leave(JOB, 1)
        np.testing.assert_array_equal((await waiting).params, np.arange(N) - 1.0)  # 0.5 * 2

    run(scenario())


def test_staleness_wait_is_bounded_and_names_the_slowest_worker():
    async def scenario():
        shard = await make_shard(0, timeout_s=0.2)
        with pytest.raises(StalenessTimeoutError, match=r"slowest active worker\(s\): \[1\].*raise wait_timeout_s"):
            await push(shard, 0, 0, [1, 1, 1, 1], min_clock=1)

    run(scenario())


def test_nonfinite_gradient_is_rejected_naming_the_worker_and_nothing_changes():
    async def scenario():
        shard = await make_shard(None)
        for bad in (np.nan, np.inf, -np.inf):
            with pytest.raises(NonFiniteGradientError, match=r"worker 1 pushed a gradient with 1 NaN/Inf.*unchanged"):
                await push(shard, 1, 0, [1, bad, 1, 1])
        np.testing.assert_array_equal(shard.params(), np.arange(N))
        await push(shard, 1, 0, [2, 2, 2, 2])  # the same clock, now valid, is accepted
        np.testing.assert_array_equal(shard.params(), np.arange(N) - 1.0)

    run(scenario())


def test_skip_nonfinite_drops_the_step_and_advances_the_clock():
    async def scenario():
        shard = await make_shard(None, skip=True)
        reply = await push(shard, 0, 0, [np.nan, 1, 1, 1])
        np.testing.assert_array_equal(reply.params, np.arange(N))
        assert reply.clocks == (1, 0) and shard.stats()["pushes_skipped"] == 1

    run(scenario())


def test_wrong_shape_wrong_order_other_job_and_early_push_are_refused_without_damage():
    async def scenario():
        early = ParameterShard(config(None))
        with pytest.raises(ParameterServerError, match="before the shard was set up"):
            await push(early, 0, 0, [1, 1, 1, 1])
        shard = await make_shard(None)
        with pytest.raises(GradientShapeError, match=r"shape \(3,\).*holds \(4,\).*nothing was applied"):
            await push(shard, 0, 0, [1, 1, 1])
        with pytest.raises(ParameterServerError, match="pushed clock 5 but shard 0 expected clock 0"):
            await push(shard, 0, 5, [1, 1, 1, 1])
        with pytest.raises(StaleJobError, match=r"from job job-old .* of job job-new; it was refused"):
            await push(shard, 0, 0, [1, 1, 1, 1], job="job-old")
        with pytest.raises(ParameterServerError, match="push from worker 7"):
            await push(shard, 7, 0, [1, 1, 1, 1])
        np.testing.assert_array_equal(shard.params(), np.arange(N))
        assert shard.stats()["pushes_received"] == 0

    run(scenario())


def test_a_worker_with_another_model_or_optimizer_is_told_so():
    async def scenario():
        shard = await make_shard(None)
        with pytest.raises(ParameterServerError, match="worker 1 built a different model than rank 0"):
            await shard.get_params(JOB, 1, "other-digest")
        p = nn.Parameter(torch.zeros(N))
        other = OptimizerRecipe.of(torch.optim.Adam([p]), [p])
        with pytest.raises(ParameterServerError, match="worker 1 built a different optimizer"):
            await shard.set_optimizer(JOB, 1, other, (Segment(0, N, 0),))

    run(scenario())


def test_collective_sums_every_workers_contribution():
    async def scenario():
        shard = await make_shard(None)
        a = asyncio.ensure_future(shard.collective(JOB, 0, 0, np.array([1.0, 2.0]), 2))
        await settle()
        assert not a.done()
        b = await shard.collective(JOB, 0, 1, np.array([10.0, 20.0]), 2)
        np.testing.assert_array_equal(await a, [11.0, 22.0])
        np.testing.assert_array_equal(b, [11.0, 22.0])

    run(scenario())


# ---- through a real Ray actor ------------------------------------------------------------
@pytest.mark.ray
def test_actor_loses_no_update_under_concurrent_pushes_and_errors_cross_ray(ray_session):
    shard = ray.remote(ParameterShard).options(num_cpus=0).remote(config(None, scale=1.0))
    ray.get(shard.init_params.remote(JOB, "digest", np.arange(N, dtype=np.float32)))
    p = nn.Parameter(torch.zeros(N))
    ray.get(shard.set_optimizer.remote(JOB, 0, OptimizerRecipe.of(torch.optim.SGD([p], lr=1.0), [p]),
                                       (Segment(0, N, 0),)))

    def worker(rank, grads):  # like a real worker: one push in flight, the next after the reply
        for clock in range(40):
            ray.get(push(shard, rank, clock, grads))

    threads = [threading.Thread(target=worker, args=(0, [1, 0, 0, 0])),
               threading.Thread(target=worker, args=(1, [0, 0, 0, 2]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = ray.get(shard.stats.remote())
    assert stats["updates_applied"] == stats["pushes_received"] == 80
    np.testing.assert_array_equal(ray.get(shard.params.remote()), [0 - 40, 1, 2, 3 - 80])
    with pytest.raises(NonFiniteGradientError, match="worker 0 pushed a gradient with 1 NaN/Inf"):
        ray.get(push(shard, 0, 40, [np.nan, 0, 0, 0]))
    with pytest.raises(StaleJobError):
        ray.get(push(shard, 0, 40, [0, 0, 0, 0], job="job-old"))
    np.testing.assert_array_equal(ray.get(shard.params.remote()), [0 - 40, 1, 2, 3 - 80])
    ray.kill(shard)


def test_push_chunked_is_push_in_pieces():
    async def main():
        whole, pieces = await make_shard(None), await make_shard(None)
        g = np.array([1, 2, 3, 4], dtype=np.float32)
        expected = await whole.push(JOB, 0, 0, g, 0, 0)
        meta, *parts = await pieces.push_chunked(JOB, 0, 0, 0, 0, None, True, 3, g[:1], g[1:3], g[3:])
        assert meta.params is None and len(parts) == 3
        assert np.array_equal(np.concatenate(parts), expected.params)
        assert (meta.version, meta.clocks, meta.min_clock) == (expected.version, expected.clocks,
                                                               expected.min_clock)
        # No parameters asked for: the pieces are None, the push still counts.
        meta, *parts = await pieces.push_chunked(JOB, 1, 0, 0, 0, None, False, 2, g[:2], g[2:])
        assert parts == [None, None] and meta.clocks == (1, 1)
        # No gradient pieces: a skipped step, the clock advances, the parameters do not move.
        before = pieces.params().copy()
        meta, *parts = await pieces.push_chunked(JOB, 0, 1, 0, 0, None, True, 2)
        assert meta.clocks == (2, 1) and np.array_equal(np.concatenate(parts), before)
        # A wrong total length is the same clear error as for push, nothing applied.
        with pytest.raises(GradientShapeError):
            await pieces.push_chunked(JOB, 1, 1, 0, 0, None, True, 2, g[:2], g[:1])
        assert np.array_equal(pieces.params(), before)
        with pytest.raises(ParameterServerError, match="reply_chunks"):
            await pieces.push_chunked(JOB, 1, 1, 0, 0, None, True, 0, g)

    run(main())
