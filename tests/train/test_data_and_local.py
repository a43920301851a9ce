"""Data sharding (DistributedSampler semantics without padding) and the no-Ray local mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

import synctrain
from synctrain.context import local_reports
from synctrain.data import ShardedBatchSampler


def epoch_batches(n, world, batch, *, seed=0, shuffle=True, drop_last=False, epochs=1):
    samplers = [ShardedBatchSampler(n, world, r, batch, shuffle=shuffle, seed=seed,
                                    drop_last=drop_last) for r in range(world)]
    return [[list(s) for s in samplers] for _ in range(epochs)]  # [epoch][rank][batch]


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 400), world=st.integers(1, 5), batch=st.integers(1, 40), seed=st.integers(0, 9))
def test_every_sample_once_per_epoch_and_equal_batch_counts(n, world, batch, seed):
    if n < world:
        with pytest.raises(ValueError, match="fewer than the"):
            ShardedBatchSampler(n, world, 0, batch)
        return
    (per_rank,) = epoch_batches(n, world, batch, seed=seed)
    seen = [i for rank in per_rank for b in rank for i in b]
    assert sorted(seen) == list(range(n))  # each sample exactly once across ranks
    assert len({len(rank) for rank in per_rank}) == 1  # same number of batches on every rank
    assert all(len(b) >= 1 for rank in per_rank for b in rank)  # never an empty batch
    assert len(per_rank[0]) == len(ShardedBatchSampler(n, world, 0, batch))


def test_reshuffled_each_epoch_with_a_seed_shared_by_ranks():
    epochs = epoch_batches(100, 2, 8, seed=3, epochs=3)
    assert epochs[0] != epochs[1] != epochs[2]  # a new order each epoch, without set_epoch
    again = epoch_batches(100, 2, 8, seed=3, epochs=3)
    assert epochs == again  # same seed, same orders: every rank computes the same permutation
    assert epoch_batches(100, 2, 8, seed=4)[0] != epochs[0]


def test_global_batches_match_a_single_big_batch_process():
    """Step t across all ranks holds exactly the t-th batch of one process with batch world*b."""
    (sharded,) = epoch_batches(90, 3, 4, seed=1)
    (single,) = epoch_batches(90, 1, 12, seed=1)
    for t, big in enumerate(single[0]):
        assert sorted(i for rank in sharded for i in rank[t]) == sorted(big)


def test_set_epoch_pins_the_order():
    s = ShardedBatchSampler(50, 2, 0, 5, seed=0)
    first = list(s)
    s.set_epoch(0)
    assert list(s) == first
    s.set_epoch(7)
    assert list(s) != first


def test_drop_last_drops_only_the_short_final_global_batch():
    (per_rank,) = epoch_batches(100, 2, 8, drop_last=True)
    assert len(per_rank[0]) == 6 and all(len(b) == 8 for b in per_rank[0])


def test_no_shuffle_keeps_order():
    (per_rank,) = epoch_batches(10, 2, 2, shuffle=False)
    assert per_rank[0][0] == [0, 1] and per_rank[1][0] == [2, 3]


def plain_loop(config):
    ctx = synctrain.get_context()
    torch.manual_seed(0)
    model = synctrain.prepare_model(torch.nn.Linear(3, 2))
    opt = synctrain.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    ds = TensorDataset(torch.randn(20, 3), torch.randint(0, 2, (20,)))
    loader = synctrain.prepare_data_loader(DataLoader(ds, batch_size=5, shuffle=True))
    for x, y in loader:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        synctrain.report({"loss": loss, "rank": ctx.rank})
    return model, opt, loader, ctx


def test_the_same_loop_runs_in_a_plain_process_without_ray():
    import ray

    ray_was_up = ray.is_initialized()
    before = len(local_reports())
    model, opt, loader, ctx = plain_loop({})
    assert ray.is_initialized() == ray_was_up  # the helpers never start Ray themselves
    assert (ctx.rank, ctx.world_size, ctx.mode) == (0, 1, "local")
    assert type(model) is torch.nn.Linear and type(opt) is torch.optim.SGD
    assert isinstance(loader, DataLoader) and loader.batch_size == 5
    assert len(local_reports()) - before == 4
    assert isinstance(local_reports()[-1]["loss"], float)  # tensors become plain numbers
    assert synctrain.all_reduce(torch.ones(2)).tolist() == [1.0, 1.0]
    synctrain.barrier()


def test_report_rejects_values_that_are_not_scalars():
    with pytest.raises(ValueError, match="tensor of 3 elements"):
        synctrain.report({"v": torch.ones(3)})
    with pytest.raises(TypeError, match="use numbers or strings"):
        synctrain.report({"v": object()})


def test_prepare_data_loader_needs_a_batch_size():
    from synctrain.data import shard_data_loader

    ds = TensorDataset(torch.randn(10, 2))
    bad = DataLoader(ds, batch_sampler=[[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="batch_size"):
        shard_data_loader(bad, 2, 0, 0, torch.device("cpu"))


def broadcast_loop(config):
    ctx = synctrain.get_context()
    t = torch.full((3,), float(ctx.rank + 1))
    synctrain.broadcast(t, src=1)
    s = torch.tensor([float(ctx.rank + 1)])
    synctrain.all_reduce(s, op="sum")
    return t.tolist(), s.item()


@pytest.mark.ray
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_broadcast_and_all_reduce_helpers_in_both_modes(ray_session, mode):
    result = synctrain.Trainer(broadcast_loop, num_workers=2, mode=mode, use_gpu=False,
                               progress=False).fit()
    assert result.outputs == [([2.0, 2.0, 2.0], 3.0), ([2.0, 2.0, 2.0], 3.0)]


def test_session_reports_are_bounded_and_drained_in_order(monkeypatch):
    from synctrain import context

    monkeypatch.setattr(context, "MAX_PENDING_REPORTS", 5)
    session = context.Session(context.TrainContext(), None)
    for i in range(8):
        session.add_report({"i": i})
    reports, nxt = session.drain_reports(0)
    assert [r["i"] for r in reports] == [3, 4, 5, 6, 7] and nxt == 8
    assert session.dropped_reports == 3
    reports, nxt = session.drain_reports(6)  # frees 3..5
    assert [r["i"] for r in reports] == [6, 7] and nxt == 8
    session.add_report({"i": 8})
    assert [r["i"] for r in session.drain_reports(8)[0]] == [8]
