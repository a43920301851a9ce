"""The bundled example reaches its accuracy target; the CLI and benchmark scripts run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray.cloudpickle

import synctrain
from synctrain.cli import main as cli_main
from synctrain.trainer import DEFAULT_MAX_UNCOMMITTED_STEPS

ROOT = Path(__file__).resolve().parents[2]


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    ray.cloudpickle.register_pickle_by_value(module)  # workers cannot import it by name
    return module


def run_quick(ray_session, script: str, out: Path, *args: str, result: str | None = None) -> dict:
    """Run ``benchmarks/<script> --quick --out <out>`` in the test session's Ray; its JSON
    (``<out>/<result>.json``, by default named after the script)."""
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / f"{result or script.replace('.py', '')}.json").read_text())


@pytest.mark.ray
@pytest.mark.slow
def test_digits_sync_reaches_95_percent_with_two_workers(ray_session):
    digits = load(ROOT / "examples" / "digits.py", "digits")
    result = synctrain.Trainer(digits.train_loop, num_workers=2, mode="sync", use_gpu=False,
                               progress=False,
                               config={"lr": 0.05, "epochs": 15, "batch_size": 32}).fit()
    accs = [out["test_acc"] for out in result.outputs]
    assert accs[0] == accs[1]  # identical replicas
    assert accs[0] >= 0.95, accs
    steps = [m["step"] for m in result.metrics]
    assert steps == sorted(steps) and len(result.metrics) == 15  # one report per epoch, rank 0
    assert result.metrics[-1]["samples"] == 15 * 1438  # every training sample once per epoch


def test_cli_cluster_without_a_cluster(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cli_main(["cluster"]) == 0
    assert "sync" in capsys.readouterr().out


def test_cli_run_refuses_a_missing_script(capsys):
    assert cli_main(["run", "no/such/script.py"]) == 2
    assert "no such script" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.slow
def test_throughput_benchmark_quick_mode_writes_results(ray_session, tmp_path):
    # joins the session's Ray instead of starting a second one
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--quick",
                           "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "throughput.json").read_text())
    assert set(data["models"]) == {"mlp", "convnet"}
    assert all(v["ratio"] > 0 for v in data["models"].values())
    assert "1MB" in data["allreduce"]
    assert "| model |" in (tmp_path / "throughput.md").read_text()


@pytest.mark.ray
@pytest.mark.slow
def test_async_benchmarks_quick_mode_write_results(ray_session, tmp_path):
    ps = run_quick(ray_session, "ps_throughput.py", tmp_path)  # one round: test_ps_throughput_rounds.py has more
    conv = run_quick(ray_session, "convergence.py", tmp_path, "--model", "conv", "--channels", "16",
                     "--optimizer", "adam")  # one repeat: test_convergence_repeats.py covers more
    assert [r["name"] for r in ps["rows"]][0].startswith("naive")
    assert all(len(r["pushes_per_s_rounds"]) == 1 and r["pushes_per_s"] > 0 for r in ps["rows"])
    assert "CPU ms per push" in (tmp_path / "ps_throughput.md").read_text()
    # The quick run measures both transports: shared memory (same machine) and Ray.
    assert [r["push_transport"] for r in ps["rows"][1:]] == [["shared_memory"], ["ray"]]
    assert conv["meta"]["optimizer"] == "adam" and conv["meta"]["repeats"] == 1
    assert {r["name"] for r in conv["runs"]} >= {"sync + straggler", "async s=2 + straggler"}
    assert all(len(r["times_to_95_s"]) == 1 for r in conv["runs"] if r["mode"] != "single")
    assert (tmp_path / "convergence.png").stat().st_size > 0


@pytest.mark.ray
@pytest.mark.slow
def test_steplog_overhead_benchmark_quick_mode_writes_results(ray_session, tmp_path):
    data = run_quick(ray_session, "steplog_overhead.py", tmp_path)
    variants = [r["variant"] for r in data["throughput"]]
    assert variants == ["step_log=False", f"K={DEFAULT_MAX_UNCOMMITTED_STEPS} (default)"]
    assert all(r["samples_per_s"] > 0 for r in data["throughput"])
    # the machine's CPU time per sample over rank 0's timed window, for both variants
    assert all(r["cpu_ms_per_1k"] > 0 for r in data["throughput"]), data["throughput"]
    assert data["throughput"][1]["cpu_overhead"] > -1
    # The step-logged run committed every optimizer step to the log, the plain one none.
    runs = {r["variant"]: r for r in data["rounds"][0]}
    assert runs["step_log=False"]["committed_steps"] == 0
    logged = runs[variants[1]]
    assert logged["committed_steps"] == logged["steps"][0] > 0
    # the step log's own CPU (writer threads, the coordinator's nodes): none without the log
    assert runs["step_log=False"]["steplog_cpu_share"] == 0
    assert 0 < logged["steplog_cpu_share"] < 1, logged
    # The leader kill: no new generation, commits resumed (the stall was measured).
    (leader,) = data["faults"]
    assert leader["fault"] == "leader kill" and leader["generations"] == 1
    assert leader["commit_stall_s"] is not None and leader["commit_stall_s"] > 0
    assert data["verdict"]["overhead_at_default_K"]["met"] in (True, False)
    assert "| model | mode | variant |" in (tmp_path / "steplog_overhead.md").read_text()
    assert "CPU ms per 1k samples" in (tmp_path / "steplog_overhead.md").read_text()
    assert (tmp_path / "steplog_overhead.png").stat().st_size > 0


JOIN_SCRIPT = """
import os, ray, synctrain
def loop(config):
    return synctrain.get_context().world_size
out = synctrain.Trainer(loop, num_workers=2, use_gpu=False, progress=False).fit().outputs
assert out == [2, 2], out
print("joined", ray.get_runtime_context().gcs_address)
"""


@pytest.mark.ray
def test_trainer_joins_the_cluster_named_by_RAY_ADDRESS(ray_session, tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    script = tmp_path / "join.py"
    script.write_text(JOIN_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RAY_ADDRESS": address})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"joined {address}" in proc.stdout  # the existing cluster, not a new local one


@pytest.mark.ray
@pytest.mark.slow
def test_steplog_split_benchmark_quick_mode_writes_results(ray_session, tmp_path):
    # the variants asked for (the tmpfs and nice ones differ from the defaults only in where
    # the job directory is and at what priority the log runs), beside the baseline and the defaults
    only = "coordinator,no-checkpoints,load,load-idle"
    name = "steplog_split_mlp_async_coordinator_no-checkpoints_load_load-idle"  # its results' name
    data = run_quick(ray_session, "steplog_split.py", tmp_path, "--variants", only, result=name)
    (runs,) = data["rounds"]
    assert set(runs) == {"step_log=False", "step_log=False + idle coordinator", "default", "no checkpoints",
                         "step_log=False + CPU load", "step_log=False + CPU load, idle priority"}
    assert data["meta"]["variants"] == only.split(",")
    assert all(r["samples_per_s"] > 0 for r in runs.values())
    # only the step-logged variants committed their steps to a log
    assert runs["step_log=False"]["committed_steps"] == 0
    assert runs["step_log=False + idle coordinator"]["committed_steps"] == 0
    assert runs["default"]["committed_steps"] == runs["default"]["steps"][0] > 0
    assert runs["no checkpoints"]["committed_steps"] > 0
    # the stand-in load: no log, and its CPU counted where the log's own is
    load = runs["step_log=False + CPU load"]
    assert load["committed_steps"] == 0 and load["steplog_cpu_share"] > 0
    idle = runs["step_log=False + CPU load, idle priority"]
    assert idle["committed_steps"] == 0 and idle["steplog_cpu_share"] > 0
    assert [r["variant"] for r in data["table"]][:3] == ["step_log=False", "step_log=False + idle coordinator",
                                                         "default"]
    assert "| default | 1 |" in (tmp_path / f"{name}.md").read_text()
    assert (tmp_path / f"{name}.png").stat().st_size > 0
