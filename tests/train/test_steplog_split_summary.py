"""benchmarks/steplog_split.py's arithmetic and output, without Ray: each variant's overhead is
against its own round's step_log=False run, with the median's interval; bad arguments are
refused before anything runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "steplog_split.py"


@pytest.fixture(scope="module")
def split(benchmark_module):
    return benchmark_module("steplog_split")


def _run(samples_per_s: float, cpu: float | None = 60.0, own: float = 0.0, loop: float = 0.0) -> dict:
    return {"samples_per_s": samples_per_s, "cpu_ms_per_1k": cpu, "steplog_cpu_share": own,
            "steplog_loop_share": loop}


def test_each_round_is_compared_with_its_own_baseline(split):
    rounds = [{split.BASE: _run(100.0, 50.0), "default": _run(90.0, 60.0, 0.03), "no checkpoints": _run(100.0, 50.0)},
              {split.BASE: _run(200.0, 40.0), "default": _run(190.0, 44.0), "no checkpoints": _run(210.0, 40.0)},
              {split.BASE: _run(150.0, 45.0), "default": _run(120.0, 50.0), "no checkpoints": _run(150.0, 45.0)}]
    table = {r["variant"]: r for r in split.summarize(rounds)}
    assert list(table) == [split.BASE, "default", "no checkpoints"], "the order of VARIANTS"
    default = table["default"]
    assert default["overheads"] == pytest.approx([0.10, 0.05, 0.20])
    assert default["overhead"] == pytest.approx(0.10)  # the median of the rounds, not of the pooled runs
    low, high = default["interval"]
    assert low <= default["overhead"] <= high and low >= 0.05 and high <= 0.20
    assert default["samples_per_s"] == 120.0 and default["cpu_ms_per_1k"] == 50.0
    assert default["cpu_overhead"] == pytest.approx(50.0 / 45.0 - 1)
    assert table["no checkpoints"]["overhead"] == pytest.approx(0.0)
    assert "overhead" not in table[split.BASE] and "own_cpu" not in table[split.BASE]
    assert default["own_cpu"] == 0.0 and default["own_cpu_interval"][1] == pytest.approx(0.03)


def test_the_markdown_and_plot_come_from_a_stored_json(split, tmp_path):
    rounds = [{split.BASE: _run(100.0), "default": _run(95.0, own=0.02, loop=0.01)},
              {split.BASE: _run(110.0), "default": _run(99.0, own=0.03, loop=0.004)}]
    data = {"meta": {"model": "mlp", "mode": "async", "epochs": 60, "rounds_asked": 2, "rounds_done": 2,
                     "load_avg_start": [1.0, 1.0, 1.0], "wall_s": 120.0, "command": "benchmarks/steplog_split.py"},
            "table": split.summarize(rounds), "rounds": rounds}
    (tmp_path / "stored.json").write_text(json.dumps(data))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--render", str(tmp_path / "stored.json"), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = (tmp_path / "out" / "steplog_split.md").read_text()
    assert "| default | 2 | 97 | +7.5% [+5.0, +10.0] |" in md, md
    # the step log's own CPU, its share of the loop's thread, and their sum per run (the direct cost)
    assert "| 2.50% [2.00, 3.00] | 0.70% | 3.20% [3.00, 3.40] |" in md, md
    assert (tmp_path / "out" / "steplog_split.png").stat().st_size > 0
    # another cell's results stand beside the default cell's, not over them
    data["meta"]["mode"] = "sync"
    (tmp_path / "sync.json").write_text(json.dumps(data))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--render", str(tmp_path / "sync.json"), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out" / "steplog_split_mlp_sync.md").read_text().startswith(
        "# Where the step log's cost goes: mlp, sync mode")
    assert split.result_name("mlp", "async") == "steplog_split"


def test_bad_arguments_are_refused_before_anything_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "0", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--rounds and --epochs must be at least 1" in proc.stderr
    assert not (tmp_path / "steplog_split.json").exists()


def test_the_stand_in_load_burns_cpu_that_counts_as_the_step_logs(split):
    """The calibration variant's load: a process whose title steplog_cpu_s counts and whose CPU
    time grows while it runs; a share of more than one CPU is refused."""
    so = split.so

    def own_s(pid: int) -> float:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9

    counted, title = so.steplog_cpu_s(0), b""
    burner = split.start_load(0.1, 0.01)
    try:
        deadline = time.monotonic() + 60
        while own_s(burner.pid) < 0.05 or not title:  # the title is there once exec is done
            with open(f"/proc/{burner.pid}/cmdline", "rb") as f:
                title = f.read()
            assert burner.poll() is None, "the load process exited"
            assert time.monotonic() < deadline, "the load burned no CPU"
            time.sleep(0.05)
        assert title.startswith(so.LOAD_PROCESS.encode()), title
        burned = own_s(burner.pid)
        assert so.steplog_cpu_s(0) - counted >= burned, "steplog_cpu_s left the load out"
    finally:
        burner.kill()
        burner.wait()
    with pytest.raises(ValueError, match="one CPU's worth"):
        split.start_load(1.0, 0.01)


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
def test_the_idle_priority_load_runs_at_sched_idle(split):
    """The idle-priority variant's load lowers itself before its first burst; the plain one does not."""
    plain, idle = split.start_load(0.05, 0.01), split.start_load(0.05, 0.01, idle=True)
    try:
        deadline = time.monotonic() + 60
        while os.sched_getscheduler(idle.pid) != os.SCHED_IDLE:
            assert idle.poll() is None, "the load process exited"
            assert time.monotonic() < deadline, "the load never lowered its priority"
            time.sleep(0.05)
        assert os.sched_getscheduler(plain.pid) == os.SCHED_OTHER
    finally:
        for p in (plain, idle):
            p.kill()
            p.wait()


def test_some_variants_run_alone_and_keep_their_own_results(split, tmp_path):
    """``--variants``: the named ones beside the baseline and the defaults, in VARIANTS' order;
    an unknown name is refused before anything runs; such a run's results never take a full
    split's name."""
    assert [name for name, _ in split.variants(["niced", "default"])] == [split.BASE, "default", split.NICED]
    assert [name for name, _ in split.variants(["niced"])] == [split.BASE, "default", split.NICED]
    assert len(split.variants()) >= len(split.VARIANTS) - 1  # all (tmpfs where /dev/shm is)
    assert split.parse_variants(" default,niced ") == ["default", "niced"]
    with pytest.raises(ValueError, match="unknown variant.*'fast'.*niced"):
        split.parse_variants("default,fast")
    assert split.result_name("mlp", "sync", ["niced"]) == "steplog_split_mlp_sync_niced"
    assert split.result_name("mlp", "async", ["default"]) == "steplog_split_mlp_async_default"
    assert split.result_name("mlp", "async") == "steplog_split"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--variants", "default,fast", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--variants: unknown variant(s) ['fast']" in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir())


def test_the_niced_variant_lowers_the_logs_priority_for_its_own_job_only(split, monkeypatch):
    """The variant sets the step log's priority knob while its job starts, then puts it back."""
    from synctrain.driver import coord

    seen = []
    monkeypatch.setattr(split.so, "throughput", lambda *a, **k: seen.append(coord.STEPLOG_NICE) or {})
    default = coord.STEPLOG_NICE
    assert default != split.NICED_NICE
    split.run_variant(split.NICED, {}, Path("/nonexistent"), None, "mlp", "sync", 1, 0.0)
    split.run_variant("default", {}, Path("/nonexistent"), None, "mlp", "sync", 1, 0.0)
    assert seen == [split.NICED_NICE, default] and coord.STEPLOG_NICE == default
