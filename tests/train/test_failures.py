"""Bad input and failures (issue #2, "must show" 4).

Each bad argument is refused with a clear error before any worker starts; a failing loop or a
dead worker makes ``fit()`` raise promptly, naming the rank, never hang.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import synctrain
from synctrain import ConfigError, ResourcesError, TrainingFailedError, WorkerDiedError


def noop_loop(config):
    return config


# ---- refused before anything starts (no Ray needed) -------------------------------------
@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_num_workers_must_be_a_positive_int(bad):
    with pytest.raises(ConfigError, match="num_workers must be an integer >= 1"):
        synctrain.Trainer(noop_loop, num_workers=bad)


def test_unpicklable_config_is_refused_before_any_worker_starts():
    with pytest.raises(ConfigError, match="config cannot be pickled") as info:
        synctrain.Trainer(noop_loop, num_workers=2, config={"lock": threading.Lock()})
    assert "inside the training loop" in str(info.value)


def test_unknown_mode_and_options_are_refused():
    with pytest.raises(ConfigError, match="unknown mode 'bogus'"):
        synctrain.Trainer(noop_loop, mode="bogus")
    with pytest.raises(ConfigError, match="does not take"):
        synctrain.Trainer(noop_loop, mode="sync", warp_speed=9)
    with pytest.raises(ConfigError, match="grad_accum_steps"):
        synctrain.Trainer(noop_loop, mode="sync", grad_accum_steps=0)
    with pytest.raises(ConfigError, match="grad_compression"):
        synctrain.Trainer(noop_loop, mode="sync", grad_compression="int3")
    with pytest.raises(ConfigError, match="use_gpu"):
        synctrain.Trainer(noop_loop, use_gpu="yes")
    with pytest.raises(ConfigError, match="train_loop must be a function"):
        synctrain.Trainer(42)


# ---- refused against the cluster, still before any worker starts -------------------------
@pytest.mark.ray
def test_more_gpus_than_the_cluster_has(ray_session):
    gpus = ray_session.cluster_resources().get("GPU", 0)
    before = len(ray_session.util.list_named_actors(all_namespaces=True)) if hasattr(
        ray_session.util, "list_named_actors") else None
    with pytest.raises(ResourcesError, match=f"the Ray cluster has {gpus:g}"):
        synctrain.Trainer(noop_loop, num_workers=int(gpus) + 1, use_gpu=True).fit()
    if before is not None:
        assert len(ray_session.util.list_named_actors(all_namespaces=True)) == before


@pytest.mark.ray
def test_more_cpus_than_the_cluster_has(ray_session):
    with pytest.raises(ResourcesError, match="do not fit"):
        synctrain.Trainer(noop_loop, num_workers=3, resources_per_worker={"CPU": 100}).fit()


# ---- failures while running ----------------------------------------------------------------
def raising_loop(config):
    ctx = synctrain.get_context()
    if ctx.rank == config["bad_rank"]:
        raise ValueError("the data file is corrupt at row 17")
    synctrain.barrier()  # the healthy rank waits here for the failed one: must not hang fit()
    return "unreachable"


@pytest.mark.ray
def test_a_raising_loop_surfaces_its_traceback_and_rank(ray_session):
    with pytest.raises(TrainingFailedError) as info:
        synctrain.Trainer(raising_loop, num_workers=2, progress=False, config={"bad_rank": 1},
                          max_failures=0).fit()
    err = info.value
    assert err.rank == 1 and err.exc_type == "ValueError"
    assert "the data file is corrupt at row 17" in str(err)
    assert "raising_loop" in err.remote_traceback  # the user's frame is in the traceback


def mismatched_loop(config):
    ctx = synctrain.get_context()
    width = 8 if ctx.rank == 0 else 9
    synctrain.prepare_model(nn.Linear(4, width))
    return "unreachable"


@pytest.mark.ray
def test_mismatched_parameter_shapes_give_a_clear_error(ray_session):
    with pytest.raises(TrainingFailedError) as info:
        synctrain.Trainer(mismatched_loop, num_workers=2, progress=False).fit()
    assert info.value.exc_type == "ModelMismatchError"
    assert "ranks built different models" in str(info.value)
    assert "Every rank must build the same model" in str(info.value)


def forever_loop(config):
    ctx = synctrain.get_context()
    model = synctrain.prepare_model(nn.Linear(4, 2))
    opt = synctrain.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=0.01))
    Path(config["pid_dir"], f"rank{ctx.rank}.pid").write_text(str(os.getpid()))
    while True:  # trains until killed
        opt.zero_grad()
        model(torch.randn(4, 4)).sum().backward()
        opt.step()


@pytest.mark.ray
@pytest.mark.fault
def test_a_worker_killed_mid_run_makes_fit_raise(ray_session, tmp_path, sigkill_when_written):
    sigkill_when_written(tmp_path / "rank1.pid")
    started = time.monotonic()
    with pytest.raises((WorkerDiedError, TrainingFailedError)) as info:
        synctrain.Trainer(forever_loop, num_workers=2, progress=False, max_failures=0,
                          config={"pid_dir": str(tmp_path)}).fit()
    # Rank 1 died; whichever rank's failure reached the driver first is named.
    assert "rank" in str(info.value)
    if isinstance(info.value, WorkerDiedError):
        assert info.value.rank == 1
    # a hang guard, not a performance claim: the job must not wait for a collective timeout
    assert time.monotonic() - started < 120


def test_a_loop_whose_module_the_workers_cannot_import_is_named_not_a_dead_worker(
        ray_session, tmp_path, monkeypatch) -> None:
    """The driver can import the loop's module but the Ray workers cannot: the error must say
    so (and how to fix it), not report a worker that died."""
    (tmp_path / "only_on_the_driver.py").write_text("def loop(config):\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    mod = importlib.import_module("only_on_the_driver")
    with pytest.raises(synctrain.TrainingFailedError) as err:
        synctrain.Trainer(mod.loop, num_workers=2, use_gpu=False, progress=False).fit()
    msg = str(err.value)
    assert "No module named 'only_on_the_driver'" in msg and "importable" in msg
    assert err.value.exc_type == "DriverObjectLoadError"
