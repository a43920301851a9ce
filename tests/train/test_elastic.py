"""Elastic membership (issue 12): a job that loses a worker it cannot replace goes on with
fewer, down to ``min_workers``, and grows back once resources return.

The sampler part runs without Ray: a loader re-sharded from a committed position over another
world size still sees every sample of the epoch exactly once. The cluster part runs
``elastic_probe.py`` in a subprocess (it builds its own ``ray.cluster_utils.Cluster``: the test
session's private Ray is single-node and ``ray.init`` runs once per process).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from synctrain import ConfigError, Trainer
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


def test_prepare_data_loader_keeps_the_global_batch_when_told():
    """keep_global_batch: a 2-rank generation of a 3-worker job cuts global batches of 3 x 4."""
    import synctrain
    from synctrain import context

    session = Session(TrainContext(rank=1, world_size=2, mode="sync"), strategy=None)
    session.batch_workers = 3
    context.set_session(session)
    try:
        loader = synctrain.prepare_data_loader(DataLoader(TensorDataset(torch.arange(48)), batch_size=4))
    finally:
        context.set_session(None)
    assert loader.batch_sampler.global_batch_size == 12
    assert [len(b) for b in loader.batch_sampler] == [6] * 4


@pytest.mark.parametrize("options, message", [
    ({"min_workers": 0}, "min_workers must be an integer from 1 to num_workers=3"),
    ({"min_workers": 4}, "min_workers must be an integer from 1 to num_workers=3"),
    ({"min_workers": 2.0}, "min_workers must be an integer"),
    ({"min_workers": 2, "step_log": False}, "needs the step log"),
    ({"keep_global_batch": "yes"}, "keep_global_batch must be True or False"),
    ({"placement_timeout_s": 0}, "placement_timeout_s must be a number of seconds > 0"),
])
def test_elastic_options_are_checked_before_anything_starts(options, message):
    with pytest.raises(ConfigError, match=message):
        Trainer(lambda: None, num_workers=3, **options)


def test_min_workers_defaults_to_num_workers():
    trainer = Trainer(lambda: None, num_workers=3, placement_timeout_s=2)
    assert (trainer.min_workers, trainer.keep_global_batch, trainer.placement_timeout_s) == (3, False, 2.0)


# ---------------------------------------------------------------------- on a Ray cluster
PROBE = pathlib.Path(__file__).with_name("elastic_probe.py")
MARKER = "ELASTIC "
PROBE_TIMEOUT_S = 400


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.timeout(PROBE_TIMEOUT_S + 30)
def test_a_job_shrinks_when_a_node_is_lost_and_grows_back_when_one_is_added():
    """Issue 12, must show 3: 3 workers on 3 Ray nodes, min_workers=2. The node of rank 1 is
    removed mid-run: its replacement finds no resources, the job goes on with 2; a node is
    added: the job grows back to 3 at the next checkpoint. Every sample of every epoch is seen
    exactly once across the ranks that committed each step."""
    result = _run_probe("sync")
    gens = result["generations"]
    sizes = [len(g["members"]) for g in gens]
    shrink = next((i for i in range(1, len(gens)) if sizes[i - 1] == 3 and sizes[i] == 2), None)
    assert shrink is not None, f"no generation went from 3 to 2 workers: {gens}"
    assert "no worker could be placed for rank 1" in gens[shrink]["reason"], gens[shrink]
    assert [m["rank"] for m in gens[shrink]["members"]] == [0, 1], "a shrunk job renumbers its ranks"
    assert result["removed_node"] not in {m["node_id"] for m in gens[shrink]["members"]}
    grow = next((i for i in range(shrink + 1, len(gens)) if sizes[i - 1] == 2 and sizes[i] == 3), None)
    assert grow is not None, f"the job never grew back to 3 workers: {gens}\n{result['probe_output']}"
    assert "resources are back" in gens[grow]["reason"], gens[grow]
    assert sizes[-1] == 3
    assert gens[grow]["start_step"] % 10 == 0, "sync grows back at a checkpoint (checkpoint_every=10)"

    _check_every_sample_once(result["steps"], result["records"], gens)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.timeout(PROBE_TIMEOUT_S + 30)
def test_async_survivors_go_on_without_an_unplaceable_worker_and_it_joins_when_placed():
    """Async mode: the survivors never stop; the dead rank's replacement is not waited for
    beyond placement_timeout_s (the job goes on with 2, ranks keep their shard slots), and once
    a node is added it joins like a replacement."""
    result = _run_probe("async")
    gens = result["generations"]
    assert [[m["rank"] for m in g["members"]] for g in gens] == [[0, 1, 2], [0, 2], [0, 1, 2]], gens
    assert "no worker could be placed for rank 1" in gens[1]["reason"]
    assert "resources are back" in gens[2]["reason"]
    assert result["removed_node"] not in {m["node_id"] for m in gens[2]["members"]}
    assert [(f["kind"], f["rank"], f["recovery"]) for f in result["failures"]] == [("died", 1, "continue")]
    # the survivors' loops ran once, from generation 1 to the end; rank 1's started again
    assert result["loop_starts"] == ["start-g1-r0.json", "start-g1-r1.json", "start-g1-r2.json",
                                     "start-g3-r1.json"], result["loop_starts"]
    assert result["redone_steps"] == 0


def _run_probe(mode: str) -> dict:
    env = dict(os.environ, RAY_DEDUP_LOGS="1", PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[2]))
    # the probe starts its own cluster, without what this session's ray.init put in the
    # environment: RAY_AUTH_MODE=token made the nodes it adds later never join (no growth)
    for name in [n for n in env if n.startswith("RAY_") and n != "RAY_DEDUP_LOGS"]:
        env.pop(name, None)
    proc = subprocess.run([sys.executable, str(PROBE), mode], capture_output=True, text=True,
                          timeout=PROBE_TIMEOUT_S, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARKER)]
    injected = "\n".join(ln for ln in proc.stderr.splitlines() if ln.startswith("INJECT"))
    tail = f"rc={proc.returncode}\ninjected:\n{injected}\nstderr:\n{proc.stderr[-4000:]}"
    assert lines, f"the probe printed no result line\nstdout:\n{proc.stdout[-3000:]}\n{tail}"
    result = json.loads(lines[-1][len(MARKER):])
    assert result["ok"], f"probe failed: {result.get('error') or result.get('fault_error')}\n" \
                         f"{result.get('traceback', '')}\n{tail}"
    result["probe_output"] = tail  # for the messages of later checks
    return result


def _check_every_sample_once(steps: list[dict], records: list[dict], gens: list[dict]) -> None:
    """Each committed step's samples are those its generation's ranks recorded for it; over an
    epoch they are every sample once."""
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1)), "a committed step is missing"
    assert not any(s.get("lost") for s in steps)
    world = {g["generation"]: len(g["members"]) for g in gens}
    by_step = collections.defaultdict(list)
    for rec in records:
        by_step[(rec["g"], rec["step"])].append(rec)
    per_epoch: dict[int, list[int]] = collections.defaultdict(list)
    worlds_seen = set()
    for s in steps:
        recs = by_step[(s["generation"], s["step"])]
        assert sorted(r["rank"] for r in recs) == list(range(world[s["generation"]])), \
            f"step {s['step']} of generation {s['generation']}: records of ranks {[r['rank'] for r in recs]}"
        assert len({r["epoch"] for r in recs}) == 1
        worlds_seen.add(recs[0]["world"])
        per_epoch[recs[0]["epoch"]] += [i for r in recs for i in r["ids"]]
    assert worlds_seen == {2, 3}
    for epoch, ids in sorted(per_epoch.items()):
        assert len(ids) == len(set(ids)), f"epoch {epoch}: a sample was trained on twice"
        assert sorted(ids) == list(range(600)), f"epoch {epoch}: {600 - len(set(ids))} samples never seen"
