"""Inspecting jobs (issue 12): ``synctrain status``, ``synctrain log`` and ``synctrain.read_job``
on a running job, a finished one, a failed one and one whose driver died, all read-only; a
job whose coordinator is gone is read from its WALs on disk. The ``--json`` output is parsed.

One module fixture runs the real jobs: a failed one, then one that holds after 3 steps until
the test lets it finish (the running job, later the finished one), and makes the "driver
died" job: a copy, taken while the job runs, of its directory into another storage path --
its ``job.json`` says ``running`` and nobody holds its driver lock (exactly what a killed
driver leaves), and its WALs are live nodes' files copied mid-run, like a crash image. A
hand-built step log covers recovery (superseded steps, a failure, a second generation)
without Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import synctrain
from synctrain.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[2]


def tiny_loop(config):
    model = synctrain.prepare_model(nn.Linear(4, 2))
    opt = synctrain.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    for k in range(config.get("steps", 3)):
        opt.zero_grad()
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        opt.step()
        synctrain.report({"loss": float(loss.detach()), "k": k})
        if k + 1 == config.get("fail_after"):
            raise RuntimeError("the loop broke on purpose")
        if k + 1 == config.get("wait_after"):  # hold the job open until the test says go
            deadline = time.monotonic() + 120
            while not os.path.exists(config["go_file"]) and time.monotonic() < deadline:
                synctrain.heartbeat()
                time.sleep(0.05)
    return "done"


def wait_for(what, check, timeout_s=240.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def cli(capsys, *argv):
    code = cli_main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def fingerprint(d: Path):
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns,
                                    hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def jobs(ray_session, tmp_path_factory):
    storage = tmp_path_factory.mktemp("jobs")
    died = tmp_path_factory.mktemp("died")
    go_file = storage / "go"

    def trainer(name, **config):
        return synctrain.Trainer(tiny_loop, num_workers=2, use_gpu=False, progress=False,
                                 storage_path=str(storage), job_name=name, checkpoint_every=2,
                                 max_failures=0, config=config)

    with pytest.raises(synctrain.TrainingFailedError) as failed:
        trainer("broken", steps=5, fail_after=2).fit()
    outcome: dict = {}

    def run_live():
        try:
            outcome["result"] = trainer("live", steps=5, wait_after=3, go_file=str(go_file)).fit()
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            outcome["error"] = exc

    thread = threading.Thread(target=run_live, daemon=True)
    thread.start()
    def three_steps():
        try:
            return "error" in outcome or synctrain.read_job("live", storage).last_step >= 3
        except synctrain.jobs.JobNotFoundError:  # its directory is not made yet
            return False

    wait_for("3 committed steps of the running job", three_steps)
    assert "error" not in outcome, outcome
    shutil.copytree(storage / "live", died / "live")  # what a killed driver leaves behind

    def finish():
        """Let the running job end; its Result."""
        go_file.touch()
        thread.join(240)
        assert "result" in outcome, outcome
        return outcome["result"]

    yield SimpleNamespace(storage=storage, died=died, failed=failed.value, go_file=go_file,
                          finish=finish)
    go_file.touch()
    thread.join(240)


# ---- a running job: read from its coordinator -------------------------------------------------
@pytest.mark.ray
def test_a_running_job_is_read_from_its_coordinator_and_followed_to_its_end(jobs, capsys):
    storage = str(jobs.storage)
    job = synctrain.read_job("live", storage)
    assert job.state == "running" and job.coordinator_running and job.source == "coordinator"
    assert job.end is None and job.last_step >= 3 and len(job.generations) == 1
    code, out, _ = cli(capsys, "status", "live", "--storage-path", storage)
    assert code == 0
    assert "state:       running (driver pid" in out
    leader = job.coordinator["leader"]
    assert f"running: leader node {leader} (term" in out and "commit lag" in out
    assert sum(line.startswith("  node ") for line in out.splitlines()) == 3
    code, out, _ = cli(capsys, "log", "live", "--storage-path", storage, "--json")
    records = json_lines(out)
    assert [r["type"] for r in records][:3] == ["generation", "step", "report"]
    assert "end" not in {r["type"] for r in records}

    follow = subprocess.Popen(
        [sys.executable, "-m", "synctrain.cli", "log", "live", "--storage-path", storage, "--follow",
         "--json", "--max-wait-s", "120"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = json.loads(follow.stdout.readline())  # following: the log so far comes first
        assert first["type"] == "generation"
        result = jobs.finish()
        out = follow.stdout.read()  # to the end: the job's end, or --max-wait-s
        err = follow.stderr.read()
        follow.wait(30)
    finally:
        follow.kill()
    assert follow.returncode == 0, err[-2000:]
    followed = [first, *json_lines(out)]
    assert followed[-1]["type"] == "end" and followed[-1]["state"] == "finished"
    steps = [{k: v for k, v in r.items() if k != "type"} for r in followed if r["type"] == "step"]
    assert steps == result.steps, "each committed step once, in order"
    assert [r["metrics"] for r in followed if r["type"] == "report"] == result.metrics
    # once its driver is gone, the same job is read from disk, the same records
    after = synctrain.read_job("live", storage)
    assert after.state == "finished" and after.source == "disk" and not after.coordinator_running
    assert after.steps == result.steps and after.metrics == result.metrics


# ---- a finished job: the coordinator is gone, the WALs are read ----------------------------
@pytest.mark.ray
def test_a_finished_job_reads_back_as_its_result_from_disk(jobs, capsys):
    storage = str(jobs.storage)
    result = jobs.finish()
    before = fingerprint(jobs.storage / "live")
    started = time.monotonic()
    job = synctrain.read_job("live", storage)
    assert time.monotonic() - started < 5
    assert (job.name, job.state, job.source, job.coordinator_running) == ("live", "finished", "disk", False)
    assert job.spec["mode"] == "sync" and job.spec["num_workers"] == 2
    assert job.metrics == result.metrics and job.steps == result.steps
    assert job.generations == result.generations and job.failures == result.failures == []
    assert job.checkpoint == result.checkpoint and job.last_step == 5 and job.generation == 1
    assert [c["step"] for c in job.checkpoints] == [2, 4]
    assert job.end["state"] == "finished" and job.world_size == 2
    assert job.last_loss == pytest.approx(result.metrics[-1]["loss"])

    code, out, _ = cli(capsys, "status", "live", "--storage-path", storage)
    assert code == 0 and "coordinator: not running (read from disk)" in out
    assert "last committed step 5" in out and "step 4: ckpt-000000004-g1.pt" in out
    code, out, _ = cli(capsys, "log", "live", "--storage-path", storage, "--json")
    records = json_lines(out)
    assert {r["type"] for r in records} == {"generation", "step", "report", "checkpoint", "end"}
    assert [r["type"] for r in records][-1] == "end"
    assert [{k: v for k, v in r.items() if k != "type"} for r in records if r["type"] == "step"] == result.steps
    assert [r["metrics"] for r in records if r["type"] == "report"] == result.metrics
    (gen,) = [r for r in records if r["type"] == "generation"]
    assert {k: gen[k] for k in result.generations[0]} == result.generations[0]
    order = [(r["type"], r.get("step")) for r in records]
    assert order.index(("checkpoint", 2)) == order.index(("report", 2)) + 1  # after its step
    code, table, _ = cli(capsys, "log", "live", "--storage-path", storage)
    assert code == 0 and table.splitlines()[0].split() == ["TIME", "GEN", "STEP", "EVENT", "DETAIL"]
    assert sum(" step " in line for line in table.splitlines()) == 5
    assert "finished" in table.splitlines()[-1]
    assert fingerprint(jobs.storage / "live") == before, "reading wrote nothing into the job"


@pytest.mark.ray
def test_a_failed_job_shows_its_failure(jobs, capsys):
    storage = str(jobs.storage)
    job = synctrain.read_job("broken", storage)
    assert job.state == "failed" and job.end["state"] == "failed"
    assert job.failures == jobs.failed.failures and job.failures
    assert job.failures[-1]["rank"] is not None
    code, out, _ = cli(capsys, "log", "broken", "--storage-path", storage, "--json")
    records = json_lines(out)
    failures = [{k: v for k, v in r.items() if k != "type"} for r in records if r["type"] == "failure"]
    assert failures == job.failures
    assert records[-1]["type"] == "end" and records[-1]["state"] == "failed"
    kinds = [r["type"] for r in records]
    assert kinds.index("failure") > max(i for i, k in enumerate(kinds) if k == "step")
    code, out, _ = cli(capsys, "status", "broken", "--storage-path", storage)
    assert "state:       failed" in out
    assert re.search(rf"failures: +{len(job.failures)}; last: rank \d raised", out), out


@pytest.mark.ray
def test_a_job_whose_driver_died_is_interrupted_and_read_from_its_wals(jobs, capsys):
    died = str(jobs.died)
    assert json.loads((jobs.died / "live" / "job.json").read_text())["state"] == "running"
    job = synctrain.read_job("live", died)
    assert job.state == "interrupted" and job.source == "disk" and not job.coordinator_running
    assert job.last_step >= 3 and [s["step"] for s in job.steps] == list(range(1, job.last_step + 1))
    assert job.end["state"] == "interrupted" and "is gone" in job.end["reason"]
    code, out, _ = cli(capsys, "status", "live", "--storage-path", died)
    assert "state:       interrupted (driver pid" in out and "is gone" in out
    assert "not running (read from disk)" in out
    code, out, _ = cli(capsys, "log", "live", "--storage-path", died, "--json")
    records = json_lines(out)
    assert records[-1]["type"] == "end" and records[-1]["state"] == "interrupted"
    # --follow of a job that is over prints what there is and returns
    code, again, _ = cli(capsys, "log", "live", "--storage-path", died, "--json", "--follow")
    assert code == 0 and json_lines(again) == records


@pytest.mark.ray
def test_status_lists_every_job(jobs, capsys):
    jobs.finish()
    code, out, _ = cli(capsys, "status", "--storage-path", str(jobs.storage))
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["NAME", "STATE", "MODE", "WORKERS", "GEN", "STEP", "LOSS", "AGE"]
    by_name = {r[0]: r for r in rows[1:]}
    assert set(by_name) == {"broken", "live"}
    assert by_name["live"][1:6] == ["finished", "sync", "2", "1", "5"]
    assert by_name["broken"][1] == "failed"
    code, out, _ = cli(capsys, "status", "--storage-path", str(jobs.died))
    assert out.splitlines()[1].split()[:2] == ["live", "interrupted"]


# ---- no Ray needed ----------------------------------------------------------------------------
def test_unknown_job_and_empty_storage_are_clear(tmp_path, capsys):
    code, out, err = cli(capsys, "log", "nope", "--storage-path", str(tmp_path))
    assert code == 1 and "no job named 'nope'" in err and "jobs there: none" in err
    code, out, _ = cli(capsys, "status", "--storage-path", str(tmp_path / "absent"))
    assert code == 0 and "no jobs in" in out
    assert not (tmp_path / "absent").exists(), "reading creates nothing"
    with pytest.raises(synctrain.jobs.JobNotFoundError, match="no job named"):
        synctrain.read_job("../etc", str(tmp_path))


def hand_built_job(storage: Path, name: str = "healed") -> Path:
    """A job directory whose step log a recovery shaped: generation 1 ran steps 1-6 with a
    checkpoint at 4, rank 1 died at step 6, generation 2 restored step 4 and ran 5-8."""
    from coordinator.raft.messages import ConfState, Entry, HardState
    from coordinator.statemachine import encode_command
    from coordinator.storage import DiskStorage

    cmds = [("register", b"x")]
    members = [{"rank": 0, "node_id": "a"}, {"rank": 1, "node_id": "b"}]
    cmds.append(("steplog.create", name, {"mode": "sync", "num_workers": 2}, False))
    cmds.append(("steplog.generation", name, 1, members, None, 0, 0, "start", 100.0))
    steps = [{"step": s, "time": 100.0 + s, "reports": [{"seq": s - 1, "metrics": {"loss": 1.0 / s, "step": s}}]}
             for s in range(1, 7)]
    cmds.append(("steplog.steps", name, 1, 0, steps))
    cmds.append(("steplog.checkpoint", name, 1, 4, "/x/ckpt-4.pt", 10, "00", 105.0))
    failure = {"generation": 1, "rank": 1, "kind": "worker_died", "step": 6, "time": 107.0,
               "recovery": "restore", "recovery_s": 1.5}
    cmds.append(("steplog.failure", name, failure))
    cmds.append(("steplog.generation", name, 2, members, None, 4, 4, "restore", 108.0))
    steps = [{"step": s, "time": 110.0 + s, "reports": [{"seq": s - 1, "metrics": {"loss": 0.5 / s, "step": s}}]}
             for s in range(5, 9)]
    cmds.append(("steplog.steps", name, 2, 0, steps))
    cmds.append(("steplog.end", name, "finished", "", 120.0))
    datas = [encode_command(op, 0 if op == "register" else 1, k, 1, 0, *args)
             for k, (op, *args) in enumerate(cmds)]
    job_dir = storage / name
    for node in (1, 2, 3):
        with DiskStorage(job_dir / "coordinator" / f"node-{node}", conf_state=ConfState((1, 2, 3)),
                         fsync=False) as s:
            s.save(HardState(1, 1, len(datas)), [Entry(1, i + 1, data=d) for i, d in enumerate(datas)])
    (job_dir / "job.json").write_text(json.dumps({"name": name, "mode": "sync", "num_workers": 2,
                                                  "state": "finished", "created": 90.0, "updated": 121.0}))
    return job_dir


def test_a_recovered_job_reads_in_job_order_with_its_rollback_marked(tmp_path, capsys):
    hand_built_job(tmp_path)
    job = synctrain.read_job("healed", str(tmp_path))
    assert job.state == "finished" and job.generation == 2 and job.last_step == 8
    assert [(s["step"], s["generation"]) for s in job.steps] == [(1, 1), (2, 1), (3, 1), (4, 1),
                                                               (5, 2), (6, 2), (7, 2), (8, 2)]
    assert job.redone_steps == 2 and [m["step"] for m in job.metrics] == list(range(1, 9))
    assert job.failures[0]["kind"] == "worker_died" and job.checkpoint == "/x/ckpt-4.pt"
    code, out, _ = cli(capsys, "log", "healed", "--storage-path", str(tmp_path), "--json")
    records = json_lines(out)
    shape = [(r["type"], r.get("generation"), r.get("step"), bool(r.get("superseded"))) for r in records]
    gen2 = shape.index(("generation", 2, None, False))
    assert shape[gen2 - 1][0] == "failure", "a generation's failures close it"
    assert ("step", 5, 6) not in shape
    assert [x for x in shape[:gen2] if x[0] == "step" and x[3]] == [("step", 1, 5, True), ("step", 1, 6, True)]
    assert shape[-1][0] == "end"
    code, table, _ = cli(capsys, "log", "healed", "--storage-path", str(tmp_path))
    lines = table.splitlines()
    assert any("failure" in line and "rank 1 worker_died at step 6 -> restore (1.5 s)" in line for line in lines)
    assert sum("(rolled back)" in line for line in lines) == 2


# ---- the Ray cluster view moved to `synctrain cluster` ---------------------------------------
def test_status_with_an_address_points_to_cluster(capsys):
    code, _, err = cli(capsys, "status", "--address", "127.0.0.1:1")
    assert code == 2 and "synctrain cluster --address 127.0.0.1:1" in err


def test_a_job_on_an_external_coordinator_says_where_its_records_are(tmp_path, capsys):
    (tmp_path / "ext").mkdir()
    (tmp_path / "ext" / "job.json").write_text(json.dumps(
        {"name": "ext", "mode": "async", "num_workers": 3, "coordinator": "external", "state": "failed"}))
    job = synctrain.read_job("ext", str(tmp_path))
    assert (job.state, job.source, job.spec, job.world_size) == ("failed", "job.json",
                                                                 {"mode": "async", "num_workers": 3}, 3)
    assert job.steps == [] and job.end["state"] == "failed"
    code, out, _ = cli(capsys, "status", "ext", "--storage-path", str(tmp_path))
    assert code == 0 and "kept by the external coordinator" in out
