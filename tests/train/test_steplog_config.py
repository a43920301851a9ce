"""Bad input for a step-logged job: each a clear ConfigError before any training starts, and
nothing of an existing job overwritten."""

from __future__ import annotations

import os
import time

import pytest
import torch
from torch import nn

import synctrain
from synctrain import ConfigError
from synctrain.errors import JobExistsError

pytestmark = pytest.mark.ray


def tiny_loop(config):
    model = synctrain.prepare_model(nn.Linear(4, 2))
    opt = synctrain.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(config.get("steps", 3)):
        opt.zero_grad()
        model(torch.randn(8, 4)).sum().backward()
        opt.step()
        synctrain.report({"x": 1.0})
    return "done"


def never_runs(config):  # a loop that would show it ran
    raise AssertionError("the loop must not start")


def test_unknown_keyword_is_named():
    with pytest.raises(ConfigError, match="checkpoint_evry"):
        synctrain.Trainer(tiny_loop, checkpoint_evry=5)


@pytest.mark.parametrize("kw, what", [
    ({"max_failures": -1}, "max_failures"), ({"stall_timeout_s": 0}, "stall_timeout_s"),
    ({"max_uncommitted_steps": 1.5}, "max_uncommitted_steps"), ({"recovery": "peer"}, "recovery"),
    ({"job_name": "a/b"}, "job_name"), ({"checkpoint_every_s": -1}, "checkpoint_every_s"),
    ({"coordinator": "127.0.0.1:1"}, "token"),
])
def test_bad_fault_tolerance_options_are_named(kw, what, monkeypatch):
    monkeypatch.delenv("SYNCTRAIN_COORDINATOR_TOKEN", raising=False)
    with pytest.raises(ConfigError, match=what):
        synctrain.Trainer(tiny_loop, **kw)


def test_storage_path_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="not a writable directory"):
        synctrain.Trainer(tiny_loop, storage_path=str(blocker / "results"))


def test_unreachable_coordinator_fails_before_training(ray_session, tmp_path):
    token = "x" * 64
    with pytest.raises(ConfigError, match="cannot use the coordinator"):
        synctrain.Trainer(never_runs, num_workers=1, use_gpu=False, progress=False,
                          storage_path=str(tmp_path), job_name="unreach",
                          coordinator="127.0.0.1:1", coordinator_token=token).fit()
    assert not (tmp_path / "unreach").exists(), "nothing of the job was created"


def test_wrong_token_fails_before_training(ray_session, tmp_path):
    from coordinator.cluster import LocalCluster

    with LocalCluster(nodes=1, data_dir=tmp_path / "coord") as cluster:
        with pytest.raises(ConfigError, match="cannot use the coordinator"):
            synctrain.Trainer(never_runs, num_workers=1, use_gpu=False, progress=False,
                              storage_path=str(tmp_path), job_name="badtoken",
                              coordinator=",".join(cluster.endpoints),
                              coordinator_token="y" * 64).fit()
    assert not (tmp_path / "badtoken").exists()


def test_an_external_coordinator_keeps_the_step_log(ray_session, tmp_path):
    from coordinator.cluster import LocalCluster
    from synctrain.steplog import StepLog

    with LocalCluster(nodes=3, data_dir=tmp_path / "coord") as cluster:
        result = synctrain.Trainer(tiny_loop, num_workers=2, use_gpu=False, progress=False,
                                   storage_path=str(tmp_path), job_name="external",
                                   coordinator=",".join(cluster.endpoints),
                                   coordinator_token=cluster.token).fit()
        assert [s["step"] for s in result.steps] == [1, 2, 3]
        log = StepLog(cluster.endpoints, cluster.token, "external")
        assert log.job_info()["state"] == "finished" and log.job_info()["last_step"] == 3
        log.close()
    assert not (tmp_path / "external" / "coordinator").exists(), "no embedded coordinator"


def test_a_finished_job_name_is_refused_and_left_alone(ray_session, tmp_path):
    result = synctrain.Trainer(tiny_loop, num_workers=2, use_gpu=False, progress=False,
                               storage_path=str(tmp_path), job_name="done-job").fit()
    assert result.outputs == ["done", "done"] and len(result.metrics) == 3
    job_dir = tmp_path / "done-job"
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in job_dir.rglob("*") if p.is_file()}
    with pytest.raises(JobExistsError, match="already exists.*finished"):
        synctrain.Trainer(never_runs, num_workers=2, storage_path=str(tmp_path), job_name="done-job")
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in job_dir.rglob("*") if p.is_file()}
    assert after == before, "nothing of the finished job was touched"
    assert isinstance(JobExistsError("x"), ConfigError)
    assert oct(job_dir.stat().st_mode & 0o777) == "0o700"
    assert oct((job_dir / "coordinator" / "token").stat().st_mode & 0o777) == "0o600"
    assert "token" not in repr(synctrain.Trainer(tiny_loop, storage_path=str(tmp_path)))
    assert os.environ.get("SYNCTRAIN_STORAGE_PATH")  # the suite keeps jobs out of ~


def unpicklable_result_loop(config):
    import threading

    tiny_loop(config)
    return threading.Lock()


def test_a_result_that_cannot_be_pickled_fails_at_once_keeping_the_metrics(ray_session, tmp_path):
    with pytest.raises(synctrain.TrainingFailedError) as info:
        synctrain.Trainer(unpicklable_result_loop, num_workers=2, use_gpu=False, progress=False,
                          storage_path=str(tmp_path), job_name="unpicklable").fit()
    assert info.value.exc_type == "ResultNotPicklableError" and "cannot be pickled" in str(info.value)
    assert len(info.value.failures) >= 1 and info.value.failures[-1]["recovery"] == "none"
    assert len(info.value.metrics) == 3, "rank 0's committed reports survive the failure"


def test_a_fast_loop_batches_its_records_into_few_commits(ray_session, tmp_path):
    """The writer holds a batch open for its flush interval (0.25 s) unless someone waits: a
    loop of 400 fast steps and a report each makes a handful of Raft commits per second, not
    one per step or two (what a put that woke the writer did: issue 11's overhead). Every step
    and report is still committed once."""
    steps = 400
    result = synctrain.Trainer(tiny_loop, num_workers=2, use_gpu=False, progress=False,
                               storage_path=str(tmp_path), job_name="batched", checkpoint_every=0,
                               config={"steps": steps}).fit()
    assert [s["step"] for s in result.steps] == list(range(1, steps + 1))
    assert len(result.metrics) == steps
    for m in result.worker_metrics:
        assert 1 <= m["steplog_commits"] <= steps // 8, m  # the old writer: ~steps / 2
        assert m["steplog_failed_commits"] == 0 and m["steplog_wait_s"] < 60
        assert m["steplog_loop_s"] > 0 and m["steplog_loop_s"] >= m["steplog_wait_s"], m  # the waits are in it


def slow_steps_loop(config):
    """Steps that take a known time each: a time-based checkpoint falls due between them."""
    model = synctrain.prepare_model(nn.Linear(4, 2))
    opt = synctrain.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(config["steps"]):
        opt.zero_grad()
        model(torch.randn(8, 4)).sum().backward()
        opt.step()
        time.sleep(config["step_s"])
    return "done"


def test_checkpoint_every_s_takes_checkpoints_by_time_alone(ray_session, tmp_path):
    """checkpoint_every=0 with checkpoint_every_s: rank 0 alone decides, at a step boundary once
    that long has passed since the last; the references are committed with their steps."""
    steps, step_s = 30, 0.05
    result = synctrain.Trainer(slow_steps_loop, num_workers=2, use_gpu=False, progress=False,
                               storage_path=str(tmp_path), job_name="by-time", checkpoint_every=0,
                               checkpoint_every_s=0.3, digest_every=0,
                               config={"steps": steps, "step_s": step_s}).fit()
    assert [s["step"] for s in result.steps] == list(range(1, steps + 1))
    job = synctrain.read_job("by-time", str(tmp_path))
    taken = [c["step"] for c in job.checkpoints]
    assert len(taken) >= 2 and all(0 < s < steps for s in taken), taken  # none after the last step
    at = {s["step"]: s["time"] for s in result.steps}
    gaps = [at[b] - at[a] for a, b in zip(taken, taken[1:], strict=False)]
    assert min(gaps) >= 0.25, (taken, gaps)  # by time: never closer than checkpoint_every_s
    assert result.checkpoint is not None and result.checkpoint.endswith(".pt")


def test_a_pruned_checkpoint_file_is_written_over_by_a_later_one_and_no_spare_outlives_the_job(
        ray_session, tmp_path):
    """K=0 commits each checkpoint on its own, so the log prunes the oldest of three before the
    next is written: rank 0 writes that one over the pruned file. The job ends with the two
    newest checkpoints, both intact, and nothing else of the writer's in its directory."""
    steps = 12
    result = synctrain.Trainer(slow_steps_loop, num_workers=2, use_gpu=False, progress=False,
                               storage_path=str(tmp_path), job_name="reuse", checkpoint_every=2,
                               max_uncommitted_steps=0, digest_every=0,
                               config={"steps": steps, "step_s": 0.0}).fit()
    job = synctrain.read_job("reuse", str(tmp_path))
    assert [c["step"] for c in job.checkpoints] == [2, 4, 6, 8, 10], job.checkpoints
    assert result.worker_metrics[0]["steplog_reused_files"] >= 1, result.worker_metrics[0]
    assert result.worker_metrics[1]["steplog_reused_files"] == 0  # rank 0 writes the checkpoints
    job_dir = tmp_path / "reuse"
    assert sorted(p.name for p in job_dir.glob("ckpt-*")) == [
        "ckpt-000000008-g1.pt", "ckpt-000000010-g1.pt"]
    assert not list(job_dir.rglob("*.spare.tmp"))
    from synctrain import checkpoint as ckpt
    live = [c for c in job.checkpoints if c["step"] in (8, 10)]
    assert [ckpt.read_verified(c)["step"] for c in live] == [8, 10]
