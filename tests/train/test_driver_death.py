"""A job outlives its driver (issue 12): the driver process alone is killed with SIGKILL in the
middle of a run, and running the same command again resumes the job from its step log.

Each test starts ``resume_driver.py`` as a separate process, a driver of the test session's Ray
cluster (so killing it is what a crashed laptop or a lost ssh session does: Ray kills the
driver's workers and coordinator actors; the job directory stays). Rank 0 blocks at step
``BLOCK_AT`` in the first generation; once the checkpoint of step ``CKPT_STEP`` is committed
the test kills the driver, starts the same command again (sync) or ``synctrain resume JOB``
(async, started with ``synctrain run``), and checks:

* the job finishes; every step once and no gap in the step log, every report once;
* the second driver started its generation at the last committed checkpoint (step
  ``CKPT_STEP``): it trained only what followed it, and the steps the dead driver's workers had
  committed past it are the only ones redone;
* the takeover is in the log (a ``driver_died`` failure) and the accuracy meets the
  example's target (95% sync, 93% async);
* a finished job's name is refused afterwards, by ``synctrain resume`` too.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

import synctrain
from synctrain.driver.coord import read_job_coordinator
from synctrain.errors import ConfigError, JobExistsError
from synctrain.steplog import StepLog

pytestmark = [pytest.mark.ray, pytest.mark.fault, pytest.mark.slow]

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
CKPT_STEP = 40  # checkpoint_every=20 in resume_driver.py
BLOCK_AT = 50
EPOCHS = {"sync": 8, "async": 12}  # as test_fault_tolerance.py: what meets the accuracy target


def _gcs_address(ray_session) -> str:
    return ray_session.get_runtime_context().gcs_address


def _driver_cmd(*args: str) -> list[str]:
    return [sys.executable, str(HERE / "resume_driver.py"), *args]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def _wait(predicate, timeout_s: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the driver exited (rc {proc.returncode}) before {what}:\n"
                                 f"{proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def _job_info(job_dir: pathlib.Path) -> dict:
    """The job's summary in its step log, or {} while the coordinator is not up yet."""
    try:
        endpoints, token = read_job_coordinator(job_dir)
        log = StepLog(endpoints, token, job_dir.name, timeout_s=2.0)
        try:
            return log.job_info()
        finally:
            log.close()
    except Exception:  # noqa: BLE001 - not up yet
        return {}


def _committed_checkpoints(job_dir: pathlib.Path) -> list[int]:
    return [int(c["step"]) for c in _job_info(job_dir).get("checkpoints", [])]


def _kill_driver_after_checkpoint(proc: subprocess.Popen, job_dir: pathlib.Path, marks: pathlib.Path) -> None:
    _wait(lambda: (marks / "blocked").exists(), 240, "rank 0 to reach the blocking step", proc)
    _wait(lambda: CKPT_STEP in _committed_checkpoints(job_dir), 60, f"the checkpoint of step {CKPT_STEP}", proc)
    # The steps rank 0 made past the checkpoint are committed in the writer's next batch, which
    # may come after the checkpoint's own commit: wait for one, so that there is something
    # for the second driver to redo (the test checks 1 <= redone_steps).
    _wait(lambda: _job_info(job_dir).get("last_step", 0) > CKPT_STEP, 60,
          f"a step past {CKPT_STEP} to be committed", proc)
    assert max(_committed_checkpoints(job_dir)) == CKPT_STEP
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert synctrain.driver.jobdir.job_state(job_dir) == "interrupted"


def _check_resumed(out: dict, mode: str) -> None:
    steps_per_epoch = -(-(1797 - 359) // (32 * 2))
    total = EPOCHS[mode] * steps_per_epoch
    assert [s["step"] for s in out["steps"]] == list(range(1, total + 1)), "every step once, no gap"
    epochs = [m for m in out["metrics"] if "epoch" in m]
    assert [m["epoch"] for m in epochs] == list(range(EPOCHS[mode])), "each report once"
    first, last = out["generations"][0], out["generations"][-1]
    assert first["generation"] == 1 and last["generation"] >= 2
    assert last["start_step"] == CKPT_STEP, last  # only what followed the last committed checkpoint
    gen_of = {s["step"]: s["generation"] for s in out["steps"]}
    assert all(gen_of[s] == 1 for s in range(1, CKPT_STEP + 1)), "the dead driver's steps up to the checkpoint stay"
    assert all(gen_of[s] == last["generation"] for s in range(CKPT_STEP + 1, total + 1))
    assert 1 <= out["redone_steps"] <= BLOCK_AT - CKPT_STEP, out["redone_steps"]
    died = [f for f in out["failures"] if f["kind"] == "driver_died"]
    assert len(died) == 1 and died[0]["recovery"] == "checkpoint", out["failures"]
    assert min(out["acc"]) >= (0.95 if mode == "sync" else 0.93), out["acc"]


def test_sync_driver_killed_then_the_same_command_resumes(ray_session, tmp_path):
    job, storage, marks = "drv-sync", tmp_path / "jobs", tmp_path / "marks"
    marks.mkdir()
    args = ["--mode", "sync", "--epochs", str(EPOCHS["sync"]), "--job", job, "--storage", str(storage), "--marks", str(marks),
            "--address", _gcs_address(ray_session)]
    first = subprocess.Popen(_driver_cmd(*args, "--out", str(tmp_path / "first.json"), "--block-at", str(BLOCK_AT)),
                             env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _kill_driver_after_checkpoint(first, storage / job, marks)
    finally:
        if first.poll() is None:
            first.kill()
    # the interrupted job as `synctrain status` and `synctrain log --json` show it (read from disk)
    cli = [sys.executable, "-m", "synctrain.cli"]
    shown = subprocess.run([*cli, "status", job, "--storage-path", str(storage)], env=_env(), capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0 and "interrupted" in shown.stdout, shown.stdout + shown.stderr
    lines = subprocess.run([*cli, "log", job, "--storage-path", str(storage), "--json"], env=_env(),
                           capture_output=True, text=True, timeout=120)
    records = [json.loads(line) for line in lines.stdout.splitlines() if line.strip()]
    assert [r["type"] for r in records][0] == "generation", lines.stderr
    assert [r["step"] for r in records if r["type"] == "checkpoint"] == [20, CKPT_STEP]
    assert max(r["step"] for r in records if r["type"] == "step") >= CKPT_STEP
    with pytest.raises(ConfigError, match="mode 'sync'.*not the same job"):
        synctrain.Trainer(lambda c: None, mode="async", job_name=job, storage_path=str(storage),
                          step_log=True, progress=False).fit()
    assert synctrain.driver.jobdir.job_state(storage / job) == "interrupted", "a refused resume touches nothing"
    # the same command again (without --block-at: a script that changed nothing would block
    # again at step 50 of generation 1, but this run's generations are 2 and on)
    second = subprocess.run(_driver_cmd(*args, "--out", str(tmp_path / "second.json")), env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    out = json.loads((tmp_path / "second.json").read_text())
    _check_resumed(out, "sync")
    assert not (tmp_path / "first.json").exists()
    assert synctrain.driver.jobdir.job_state(storage / job) == "finished"
    with pytest.raises(JobExistsError, match="finished"):
        synctrain.Trainer(lambda c: None, job_name=job, storage_path=str(storage))
    assert list((storage / job).glob("*.tmp")) == []


def test_async_driver_killed_then_synctrain_resume(ray_session, tmp_path):
    job, storage, marks = "drv-async", tmp_path / "jobs", tmp_path / "marks"
    marks.mkdir()
    env = dict(_env(), SYNCTRAIN_STORAGE_PATH=str(storage))
    cli = [sys.executable, "-m", "synctrain.cli"]
    first = subprocess.Popen([*cli, "run", "--address", _gcs_address(ray_session), str(HERE / "resume_driver.py"),
                              "--mode", "async", "--job", job, "--marks", str(marks), "--out",
                              str(tmp_path / "out.json"), "--block-at", str(BLOCK_AT)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        _kill_driver_after_checkpoint(first, storage / job, marks)
    finally:
        if first.poll() is None:
            first.kill()
    status = json.loads((storage / job / "job.json").read_text())
    assert status["launch"]["args"][-2:] == ["--block-at", str(BLOCK_AT)]
    # `synctrain resume` runs the recorded command again: the same --block-at, which only
    # blocks in generation 1
    second = subprocess.run([*cli, "resume", job, "--storage-path", str(storage)], env=_env(), capture_output=True,
                            text=True, timeout=300, cwd=REPO)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    _check_resumed(out, "async")
    again = subprocess.run([*cli, "resume", job, "--storage-path", str(storage)], env=_env(), capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 2 and "finished" in again.stderr, again.stderr


# ---------------------------------------------------------------------------- resize on resume
IDS = 200  # samples, each its own id


def ids_loop(config):
    """Trains on nothing (lr 0) but records, per rank and step, the sample ids it got."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    ctx = synctrain.get_context()
    model = synctrain.prepare_model(nn.Linear(1, 1))
    opt = synctrain.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=0.0))
    loader = synctrain.prepare_data_loader(
        DataLoader(TensorDataset(torch.arange(IDS, dtype=torch.float32)), batch_size=4, shuffle=True))
    out = pathlib.Path(config["dir"]) / f"ids-g{ctx.generation}-r{ctx.rank}.jsonl"
    step = ctx.start_step
    for epoch in range(2):
        for (x,) in loader:
            opt.zero_grad()
            model(x[:, None]).sum().backward()
            opt.step()
            step += 1
            with out.open("a") as f:
                f.write(json.dumps([epoch, step, x.long().tolist()]) + "\n")
            if step == config.get("fail_at") and ctx.generation == 1:
                _wait_for_a_committed_checkpoint()
                raise RuntimeError(f"injected at step {step}")
    return step


def _wait_for_a_committed_checkpoint(timeout_s: float = 120.0) -> None:
    """In a worker: until the job's step log holds a checkpoint (written asynchronously)."""
    cfg = synctrain.context.current_session().stepper.cfg
    log = StepLog(list(cfg.endpoints), cfg.token, cfg.job, timeout_s=5.0)
    try:
        deadline = time.monotonic() + timeout_s
        while not log.job_info()["checkpoints"] and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        log.close()


def test_a_failed_sync_job_resumes_on_more_workers_with_every_sample_once(ray_session, tmp_path):
    """A changed num_workers on resume is an elastic resize (sync): 2 workers fail at step 15,
    the job resumes on 3 from the checkpoint of step 10, and every sample of every epoch is
    trained once across the ranks of the generation that committed each step."""
    marks = tmp_path / "ids"
    marks.mkdir()
    opts = dict(use_gpu=False, progress=False, storage_path=str(tmp_path), job_name="resize", checkpoint_every=10)
    with pytest.raises(synctrain.errors.TrainingFailedError):
        synctrain.Trainer(ids_loop, num_workers=2, max_failures=0, config={"dir": str(marks), "fail_at": 15},
                          **opts).fit()
    with pytest.raises(ConfigError, match="min_workers=2; resuming it with num_workers=1 is below"):
        synctrain.Trainer(ids_loop, num_workers=1, config={"dir": str(marks)}, **opts).fit()
    result = synctrain.Trainer(ids_loop, num_workers=3, config={"dir": str(marks)}, **opts).fit()
    gens = result.generations
    assert [len(g["members"]) for g in gens] == [2, 3] and gens[1]["start_step"] == 10, gens
    assert gens[1]["reason"].startswith("resumed after the job failed; 2 -> 3 workers"), gens[1]["reason"]
    assert [f["kind"] for f in result.failures][-1] == "resumed", result.failures
    assert {f["kind"] for f in result.failures} == {"raised", "resumed"}, result.failures
    seen: dict[tuple[int, int], list[int]] = {}  # (generation, step) -> ids over its ranks
    for path in marks.glob("ids-g*-r*.jsonl"):
        gen = int(path.name.split("-")[1][1:])
        for line in path.read_text().splitlines():
            epoch, step, ids = json.loads(line)
            seen.setdefault((gen, step), []).extend(ids)
            seen.setdefault(("epoch", gen, step), epoch)
    per_epoch: dict[int, list[int]] = {0: [], 1: []}
    for s in result.steps:
        key = (s["generation"], s["step"])
        per_epoch[seen[("epoch", *key)]] += seen[key]
    for epoch, ids in per_epoch.items():
        assert sorted(ids) == list(range(IDS)), f"epoch {epoch}: every sample once across the resize"
