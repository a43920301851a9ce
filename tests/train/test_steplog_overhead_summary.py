"""benchmarks/steplog_overhead.py's arithmetic, without Ray: how rounds of every variant and the
judged pair's extra rounds become the table and the verdict, and the slow variants' epochs."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    for sub in ("benchmarks", "examples"):
        if str(ROOT / sub) not in sys.path:
            sys.path.insert(0, str(ROOT / sub))
    return importlib.import_module("steplog_overhead")


def _run(model: str, variant: str, samples_per_s: float, share: float = 0.0) -> dict:
    return {"model": model, "mode": "sync", "variant": variant, "samples_per_s": samples_per_s,
            "cpu_ms_per_1k": 100.0, "steal": 0.0, "timed_s": 8.0, "steplog_cpu_share": share}


def test_judged_pair_uses_every_round_and_slow_variants_only_their_own(bench):
    default = f"K={bench.DEFAULT_MAX_UNCOMMITTED_STEPS} (default)"
    rounds = [
        [_run("mlp", "step_log=False", 100), _run("mlp", "K=0", 30, 0.05), _run("mlp", default, 95, 0.02)],
        [_run("mlp", "step_log=False", 90), _run("mlp", "K=0", 35, 0.06), _run("mlp", default, 96, 0.03)],
        # a judge round: the pair only; its step_log=False run is the best of all
        [_run("mlp", default, 99, 0.01), _run("mlp", "step_log=False", 101)],
    ]
    table = {r["variant"]: r for r in bench.summarize(rounds)}
    # the default K: best of its three runs against the best of the three step_log=False runs
    assert table[default]["overhead"] == pytest.approx(1 - 99 / 101)
    assert table[default]["overhead_rounds"] == pytest.approx([1 - 95 / 100, 1 - 96 / 90, 1 - 99 / 101])
    assert table[default]["steplog_cpu_share"] == pytest.approx(0.02)
    # K=0 ran in the first two rounds: judged against those rounds' step_log=False runs only
    assert table["K=0"]["overhead"] == pytest.approx(1 - 35 / 100)
    assert len(table["K=0"]["overhead_rounds"]) == 2
    assert bench.verdicts(list(table.values()), [])["overhead_at_default_K"]["met"] is True  # 2.0%
    rounds[2][0]["samples_per_s"] = 97  # now 4.0% behind the best step_log=False run
    assert bench.verdicts(bench.summarize(rounds), [])["overhead_at_default_K"]["met"] is False


def test_slow_variants_train_a_fraction_of_the_epochs(bench):
    assert bench.variant_epochs(120, {"max_uncommitted_steps": 0}) == 120 // bench.EPOCH_DIVISOR[0]
    assert bench.variant_epochs(120, {"max_uncommitted_steps": 8}) == 120 // bench.EPOCH_DIVISOR[8]
    assert bench.variant_epochs(120, {"max_uncommitted_steps": bench.DEFAULT_MAX_UNCOMMITTED_STEPS}) == 120
    assert bench.variant_epochs(120, {"step_log": False}) == 120
    assert bench.variant_epochs(1, {"max_uncommitted_steps": 0}) == 1  # never none
