"""Elastic membership (issue 12): a job that loses a worker it cannot replace goes on with
fewer, down to ``min_workers``, and grows back once resources return.

The sampler part runs without Ray: a loader re-sharded from a committed position over another
world size still sees every sample of the epoch exactly once. The cluster part runs
``elastic_probe.py`` in a subprocess (it builds its own ``ray.cluster_utils.Cluster``: the test
session's private Ray is single-node and ``ray.init`` runs once per process).
"""

from __future__ import annotations

import collections
import logging

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from synctrain.context import Session, TrainContext
from synctrain.data import ShardedBatchSampler, shard_data_loader

CPU = torch.device("cpu")


def _loaders(n: int, batch: int, world: int, *, drop_last: bool = False, global_batch: int | None = None,
             ) -> list:
    ds = TensorDataset(torch.arange(n))
    return [shard_data_loader(DataLoader(ds, batch_size=batch, shuffle=True, drop_last=drop_last), world,
                              rank, 5, CPU, global_batch_size=global_batch) for rank in range(world)]


def _steps(loaders: list, limit: int | None = None) -> list[list[list[int]]]:
    """Iterate every rank's loader in lockstep (as a sync job does): per step, each rank's ids."""
    iters = [iter(loader) for loader in loaders]
    steps = []
    while limit is None or len(steps) < limit:
        batches = [next(it, None) for it in iters]
        if all(b is None for b in batches):
            break
        assert all(b is not None for b in batches), "ranks ran out of batches at different steps"
        assert all(len(b[0]) > 0 for b in batches), "a rank got an empty batch"
        steps.append([b[0].tolist() for b in batches])
    return steps


def _ids(steps: list[list[list[int]]]) -> list[int]:
    return [i for step in steps for batch in step for i in batch]


@pytest.mark.parametrize("before, after, cut", [(3, 2, 4), (2, 3, 5), (3, 1, 1), (2, 4, 0), (3, 2, 8)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_resharded_epoch_sees_every_sample_exactly_once(before, after, cut, drop_last):
    n, batch = 101, 4
    first = _loaders(n, batch, before, drop_last=drop_last)
    done = _steps(first, cut)
    points = {loader.batch_sampler.resume_point() for loader in first}
    assert len(points) == 1, f"ranks disagree on the position: {points}"
    point = points.pop()
    assert point[2] == len(_ids(done)), "the sample offset counts every rank's samples"
    second = _loaders(n, batch, after, drop_last=drop_last)
    for loader in second:
        loader.batch_sampler.resume_at(*point)
    rest = _steps(second)
    seen = _ids(done) + _ids(rest)
    assert len(seen) == len(set(seen)), "a sample was seen twice within the epoch"
    fault_free = _ids(_steps(_loaders(n, batch, before, drop_last=drop_last)))
    if drop_last:  # each world drops its own partial last batch: never more than one of them
        assert set(seen) <= set(range(n)) and n - len(seen) < max(before, after) * batch
    else:
        assert sorted(seen) == sorted(fault_free) == list(range(n))
    # the next epoch is the new world's own, whole
    nxt = _steps(second)
    assert len(nxt) == len(second[0]) and len(set(_ids(nxt))) == len(_ids(nxt))


def test_position_without_offset_resumes_by_batch_count():
    """A restore document of before re-sharding holds (epoch, batches): resumed as before."""
    full = _steps(_loaders(60, 3, 2))
    resumed = _loaders(60, 3, 2)
    for loader in resumed:
        loader.batch_sampler.resume_at(0, 4)
    assert _steps(resumed) == full[4:]


def test_keep_global_batch_gives_the_same_samples_per_step_on_fewer_ranks():
    n, batch = 96, 4
    fault_free = _steps(_loaders(n, batch, 3))
    first = _loaders(n, batch, 3)
    done = _steps(first, 3)
    point = first[0].batch_sampler.resume_point()
    shrunk = _loaders(n, batch, 2, global_batch=3 * batch)  # keep_global_batch: 12 per step
    for loader in shrunk:
        loader.batch_sampler.resume_at(*point)
    rest = _steps(shrunk)
    assert len(done) + len(rest) == len(fault_free), "the epoch keeps its number of steps"
    for got, want in zip(done + rest, fault_free, strict=True):
        assert sorted(i for b in got for i in b) == sorted(i for b in want for i in b)
    assert {len(b) for step in rest for b in step} == {6}, "each of 2 ranks takes half of 12"


def test_fewer_samples_left_than_ranks_are_skipped_with_a_warning(caplog):
    # 2 ranks x 4 = global batches of 8 over 18 samples: 8, 8, 2 -> after 2 batches 2 remain,
    # fewer than the 3 ranks of a grown world
    first = _loaders(18, 4, 2)
    _steps(first, 2)
    point = first[0].batch_sampler.resume_point()
    assert point == (0, 2, 16)
    grown = _loaders(18, 4, 3)
    for loader in grown:
        loader.batch_sampler.resume_at(*point)
    with caplog.at_level(logging.WARNING, logger="synctrain.data"):
        assert _steps(grown) == []
    assert "the last 2 sample(s) of the epoch are skipped" in caplog.text


def test_session_resumes_loaders_from_a_document_of_another_world_size():
    """The restore document a checkpoint or a peer hands on carries the offset; a session of
    another world size continues the epoch from it."""
    ids = collections.Counter()
    first = _loaders(40, 2, 3)
    for step in _steps(first, 3):
        ids.update(i for b in step for i in b)
    doc = {"step": 3, "report_seq": 0, "loaders": [list(first[0].batch_sampler.resume_point())]}
    samplers = []
    for rank in range(2):
        session = Session(TrainContext(rank=rank, world_size=2, mode="sync"), strategy=None, restore=dict(doc))
        sampler = ShardedBatchSampler(40, 2, rank, 2, seed=5)
        session.add_sampler(sampler)
        samplers.append(sampler)
    for batches in zip(*(list(iter(s)) for s in samplers), strict=True):
        ids.update(i for b in batches for i in b)
    assert sorted(ids) == list(range(40)) and set(ids.values()) == {1}
