"""``synctrain run --workers 2`` on a plain single-process script (issue 14, must-show 2 and 3).

One module fixture runs three real launches, each a ``synctrain run`` process joined to the
session's Ray: a sync job in a pseudo-terminal (the progress bar), an async job into a pipe
(a line per N steps), and a job whose rank 1 raises in every generation (a failure, a new
generation, then exit 1). The tests compare what rank 0 wrote with what ``Trainer`` gives for
the same loop and seed, read the progress output, parse ``metrics.jsonl`` and read back the
figures ``synctrain plot`` writes.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import ray.cloudpickle

import synctrain
from synctrain.cli import main as cli_main
from synctrain.metrics import read_metrics

pytestmark = [pytest.mark.ray, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "launch_scripts" / "plain_regression.py"
EPOCHS, LR = 4, 0.05
STEPS = EPOCHS * 96 // 16  # 96 samples, 2 ranks x batch 8
LAUNCH_TIMEOUT_S = 420


def load_script():
    spec = importlib.util.spec_from_file_location("plain_regression", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["plain_regression"] = module
    spec.loader.exec_module(module)
    ray.cloudpickle.register_pickle_by_value(module)  # workers cannot import it by name
    return module


def run_in_pty(argv, env, cwd):
    """Run ``argv`` with stdout and stderr on a pseudo-terminal of 160 columns; (status, text)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env, cwd=cwd)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 1 << 16)
                except OSError:  # EIO: every writer closed its side
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break  # exited, nothing more to read (a helper it started may keep the pty open)
            assert time.monotonic() < deadline, b"".join(chunks)[-3000:]
        return proc.wait(timeout=60), b"".join(chunks).decode("utf-8", "replace")
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def run_in_pipe(argv, env, cwd):
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd, timeout=LAUNCH_TIMEOUT_S)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def launches(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("launches")
    storage = tmp / "store"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
           "SYNCTRAIN_STORAGE_PATH": str(storage), "PYTHONUNBUFFERED": "1"}
    env.pop("SYNCTRAIN_JOB_NAME", None)
    cli = [sys.executable, "-m", "synctrain.cli", "run", "--workers", "2"]
    common = ["--set", f"epochs={EPOCHS}", "--set", f"lr={LR}"]
    out = {"storage": storage, "tmp": tmp}
    out["sync"] = run_in_pty([*cli, "--job-name", "launch-sync", *common, str(SCRIPT), "--out",
                              str(tmp / "sync.json"), "--step-sleep-s", "0.2"], env, tmp)
    out["async"] = run_in_pipe([*cli, "--mode", "async", "--staleness", "0", "--job-name", "launch-async",
                                *common, str(SCRIPT), "--out", str(tmp / "async.json"),
                                "--step-sleep-s", "0.1"], env, tmp)
    out["fail"] = run_in_pipe([*cli, "--max-failures", "1", "--job-name", "launch-fail", *common,
                               str(SCRIPT), "--raise-on-rank", "1", "--at-step", "8",
                               "--step-sleep-s", "0.2"], env, tmp)
    return out


def trainer_params(mode, **options):
    plain = load_script()

    def loop(config):
        return plain.train(int(config["epochs"]), float(config["lr"]))

    result = synctrain.Trainer(loop, num_workers=2, mode=mode, use_gpu=False, seed=0, progress=False,
                               step_log=False, config={"epochs": EPOCHS, "lr": LR}, **options).fit()
    return result.outputs[0]


def assert_same_params(written, expected, atol):
    assert set(written) == set(expected)
    for name, values in expected.items():
        assert len(written[name]) == len(values)
        assert all(abs(a - b) <= atol for a, b in zip(written[name], values, strict=True)), (name, written, expected)


def check_metrics(storage, job, steps):
    rows = read_metrics(storage / job)
    losses = [r for r in rows if "loss" in r]
    assert [r["step"] for r in losses] == list(range(1, steps + 1))
    assert rows[0] == {"step": 0, "generation": 1, "time": 0.0, "total_steps": steps}
    times = [r["time"] for r in losses]
    assert times == sorted(times) and times[0] >= 0
    committed = [m["loss"] for m in synctrain.read_job(job, storage).metrics if "loss" in m]
    assert [r["loss"] for r in losses] == committed
    return rows


# ---- must-show 2: the launcher trains what Trainer trains; exit statuses ----------------------
def test_sync_launch_trains_what_trainer_trains(launches, ray_session):
    status, text = launches["sync"]
    assert status == 0, text[-3000:]
    written = json.loads((launches["tmp"] / "sync.json").read_text())
    assert written["config"] == {"epochs": EPOCHS, "lr": LR}  # --set reached get_context().config
    assert written["argv"][:2] == ["--out", str(launches["tmp"] / "sync.json")]
    assert_same_params(written["params"], trainer_params("sync"), atol=1e-6)


def test_async_launch_trains_what_trainer_trains(launches, ray_session):
    status, stdout, stderr = launches["async"]
    assert status == 0, stderr[-3000:]
    written = json.loads((launches["tmp"] / "async.json").read_text())
    assert_same_params(written["params"], trainer_params("async", staleness=0), atol=1e-5)


def test_a_script_that_raises_exits_1_with_the_failing_ranks_output(launches):
    status, stdout, stderr = launches["fail"]
    assert status == 1, stderr[-3000:]
    assert "[rank 1] rank 1 is about to fail at step 8" in stderr
    assert "synctrain run: training failed" in stderr and "failing on purpose on rank 1" in stderr
    assert "rank 0 of 2 done" not in stdout


# ---- must-show 3: the progress display, metrics.jsonl, the plots --------------------------
def test_on_a_terminal_a_bar_with_loss_samples_per_s_and_epoch_and_rank_0s_output(launches):
    status, text = launches["sync"]
    assert status == 0
    assert "\r" in text  # a bar redrawn in place
    bar = [part for part in text.split("\r") if part.startswith("launch-sync:")]
    assert bar, text[-3000:]
    assert any(f"{STEPS}/{STEPS}" in part for part in bar)
    assert any("loss=" in p and "samples/s=" in p and "epoch=" in p for p in bar), bar[-3:]
    # the bar ends where the loop did: its last epoch (rank 0's final progress), not the last poll's
    assert f"epoch={EPOCHS - 1}" in bar[-1] and "samples/s=" in bar[-1], bar[-3:]
    assert "rank 0 of 2 done: mode sync" in text  # rank 0's stdout, shown as it is
    assert "rank 1 of 2 done" not in text  # the others' stay in the job's output/
    assert "rank 1 of 2 done" in (launches["storage"] / "launch-sync" / "output" / "rank-1.stdout").read_text()


def test_in_a_pipe_a_line_per_n_steps_with_the_async_staleness(launches):
    status, stdout, stderr = launches["async"]
    assert status == 0
    assert "\r" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("launch-async: step ")]
    assert len(lines) >= 2 and lines[-1].startswith(f"launch-async: step {STEPS}/{STEPS} (100%)"), stderr[-3000:]
    assert any("staleness=" in line for line in lines), lines  # samples/s: once a rate is known
    assert "rank 0 of 2 done: mode async" in stdout


def test_failures_and_new_generations_are_shown_as_they_happen(launches):
    stderr = launches["fail"][2]
    assert "synctrain: launch-fail: raised (rank 1, step" in stderr
    assert "synctrain: launch-fail: generation 2 (2 workers) from step " in stderr
    assert "give up" in stderr


def test_metrics_jsonl_holds_each_committed_report_once(launches):
    check_metrics(launches["storage"], "launch-sync", STEPS)
    check_metrics(launches["storage"], "launch-async", STEPS)
    rows = read_metrics(launches["storage"] / "launch-fail")
    job = synctrain.read_job("launch-fail", launches["storage"])
    restart = job.generations[1]["start_step"]  # rank 0 handed its state on: steps after it redone
    assert {r["generation"] for r in rows} == {1, 2}
    assert all(r["step"] <= restart for r in rows if r["generation"] == 1)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, len(rows)))  # each step once
    assert len(rows) == len(job.metrics)


def test_plots_have_a_labelled_panel_and_one_line_per_reported_value(launches, capsys):
    from matplotlib.image import imread

    result = synctrain.plot_job("launch-sync", launches["storage"])
    assert result.keys == ["loss"]
    assert [f.x for f in result.figures] == ["step", "time"]
    for figure in result.figures:
        data = figure.path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
        assert imread(figure.path).shape[0] > 100
        (panel,) = figure.panels
        assert panel["lines"] == ["loss"] and panel["ylabel"] == "loss" and panel["points"] == STEPS
        assert panel["xlabel"] == ("optimizer step" if figure.x == "step" else "time since the job started (s)")
    failed = synctrain.plot_job("launch-fail", launches["storage"])
    assert all(f.panels[0]["markers"] >= 2 for f in failed.figures)  # the failures and generation 2
    assert cli_main(["plot", "launch-sync", "--storage-path", str(launches["storage"])]) == 0
    assert str(result.figures[0].path) in capsys.readouterr().out
