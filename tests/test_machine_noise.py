"""benchmarks/machine_noise.py: fresh processes time the same step; the spread is computed
from what they measured, and bad arguments are refused with a clear message."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "machine_noise.py"


def test_two_fresh_processes_write_their_timings_and_the_spread(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--processes", "2", "--windows", "2", "--steps", "30",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "machine_noise.json").read_text())
    procs = data["processes"]
    assert len(procs) == 2 and procs[0]["pid"] != procs[1]["pid"], "each in a fresh process"
    assert all(len(p["mlp_us"]) == 2 and min(p["mlp_us"]) > 0 for p in procs)
    mlp = data["summary"]["mlp_us"]
    medians = sorted(statistics.median(p["mlp_us"]) for p in procs)
    assert (mlp["min"], mlp["max"]) == (medians[0], medians[1])
    assert mlp["max_over_min"] == medians[1] / medians[0] - 1
    assert "| digits MLP step (batch 32, SGD) |" in (tmp_path / "machine_noise.md").read_text()


def test_one_process_is_refused_with_the_reason(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--processes", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--processes must be at least 2" in proc.stderr
    assert not (tmp_path / "machine_noise.json").exists()
