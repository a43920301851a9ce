"""benchmarks/steplog_overhead.py's arithmetic, without Ray: how rounds of every variant and the
judged pair's extra rounds become the table and the verdict, and the slow variants' epochs."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def bench(benchmark_module):
    return benchmark_module("steplog_overhead")


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
    # judged on the median of the rounds' overheads (+5.0, -6.7, +2.0) and its interval
    assert table[default]["median_overhead"] == pytest.approx(1 - 99 / 101)
    low, high = table[default]["overhead_low"], table[default]["overhead_high"]
    assert low <= table[default]["median_overhead"] <= high and low < 0.03 < high
    verdict = bench.verdicts(list(table.values()), [])["overhead_at_default_K"]
    assert verdict["met"] is None and verdict["status"] == "not shown"  # the interval holds 3%
    assert verdict["cells"]["mlp sync"]["status"] == "not shown"


def _rounds(bench, overheads: list[float]) -> list[list[dict]]:
    default = f"K={bench.DEFAULT_MAX_UNCOMMITTED_STEPS} (default)"
    return [[_run("mlp", "step_log=False", 100.0), _run("mlp", default, 100.0 * (1 - o))] for o in overheads]


def test_the_target_is_met_missed_or_not_shown_by_the_interval_of_the_median(bench):
    def verdict(overheads):
        return bench.verdicts(bench.summarize(_rounds(bench, overheads)), [])["overhead_at_default_K"]

    met = verdict([0.01, 0.02, 0.0, 0.015, 0.025, 0.01, 0.005, 0.02])
    assert met["met"] is True and met["status"] == "met" and met["cells"]["mlp sync"]["high"] <= 0.03
    missed = verdict([0.06, 0.07, 0.05, 0.08, 0.065, 0.055, 0.07, 0.06])
    assert missed["met"] is False and missed["status"] == "not met" and missed["cells"]["mlp sync"]["low"] > 0.03
    assert missed["worst"] == pytest.approx(0.0625) and missed["where"] == "mlp sync"
    noisy = verdict([-0.10, 0.12, 0.02, -0.05, 0.09, 0.04, -0.02, 0.08])
    assert noisy["met"] is None and noisy["status"] == "not shown"
    # the same data give the same interval (a seeded bootstrap); one round is its own interval
    assert bench.median_interval([0.1, -0.1, 0.05, 0.0]) == bench.median_interval([0.1, -0.1, 0.05, 0.0])
    assert bench.median_interval([0.04]) == (0.04, 0.04)
    assert verdict([0.02])["met"] is True and verdict([0.04])["met"] is False  # --quick: one round


def test_the_markdown_says_each_cells_interval_and_status(bench):
    rounds = _rounds(bench, [0.06, 0.07, 0.05, 0.08, 0.065, 0.055, 0.07, 0.06])
    table = bench.summarize(rounds)
    meta = {"rounds": 8, "rounds_asked": 8, "load_avg_start": [0.5] * 3, "load_avg_end": [0.5] * 3,
            "cpus": 2, "ray_num_cpus": 4, "wall_s": 60.0, "command": "steplog_overhead.py"}
    text = "\n".join(bench.markdown(table, [], bench.verdicts(table, []), meta))
    assert "mlp sync +6.2% [" in text and "not met: **NOT met**" in text
    assert "spread of the runs" in text and "90% interval" in text
    assert "Short timed windows" in text and "mlp sync (8.0 s)" in text  # _run's windows are 8 s


def test_windows_of_at_least_the_minimum_get_no_warning(bench):
    rounds = _rounds(bench, [0.01, 0.02, 0.015])
    for rnd in rounds:
        for run in rnd:
            run["timed_s"] = bench.MIN_WINDOW_S
    table = bench.summarize(rounds)
    assert bench.short_windows(table) == []
    meta = {"rounds": 3, "rounds_asked": 3, "load_avg_start": [0.5] * 3, "load_avg_end": [0.5] * 3,
            "cpus": 2, "ray_num_cpus": 4, "wall_s": 60.0, "command": "steplog_overhead.py"}
    assert "Short timed windows" not in "\n".join(bench.markdown(table, [], bench.verdicts(table, []), meta))


def test_the_direct_cost_is_the_logs_own_cpu_plus_its_share_of_the_loops_thread(bench):
    """Judged beside the samples/s, never instead: its own CPU and its time on the loop's thread,
    per run; a stored run without the loop's share is never called met on its own CPU alone."""
    default = f"K={bench.DEFAULT_MAX_UNCOMMITTED_STEPS} (default)"

    def cell(shares, loops=None):
        rounds = []
        for i, share in enumerate(shares):
            run = _run("mlp", default, 100, share)
            if loops is not None:
                run["steplog_loop_share"] = loops[i]
            rounds.append([_run("mlp", "step_log=False", 100), run])
        table = bench.summarize(rounds)
        return ({r["variant"]: r for r in table}[default],
                bench.verdicts(table, [])["direct_cost_at_default_K"])

    row, verdict = cell([0.020, 0.021, 0.019, 0.020], [0.004, 0.005, 0.004, 0.006])
    assert row["direct_cost_rounds"] == pytest.approx([0.024, 0.026, 0.023, 0.026])
    assert row["steplog_loop_share"] == pytest.approx(0.0045)
    assert verdict["cells"]["mlp sync"]["measure"] == "direct" and verdict["status"] == "met"
    _, verdict = cell([0.020, 0.021, 0.019, 0.020], [0.012, 0.011, 0.013, 0.012])  # 3.2%: past the target
    assert verdict["status"] == "not met" and verdict["met"] is False
    row, verdict = cell([0.020, 0.021, 0.019, 0.020])  # a stored run: no loop share
    assert bench.direct_costs([_run("mlp", default, 1, 0.02)]) == [] and "direct_cost" not in row
    assert verdict["cells"]["mlp sync"]["measure"] == "own CPU" and verdict["status"] == "not shown"
    assert bench.direct_cost_verdict([]) | {"target": None} == {"target": None, "confidence": bench.CONFIDENCE,
                                                            "met": None, "cells": {}, "status": "not shown"}


def test_slow_variants_train_a_fraction_of_the_epochs(bench):
    assert bench.variant_epochs(120, {"max_uncommitted_steps": 0}) == 120 // bench.EPOCH_DIVISOR[0]
    assert bench.variant_epochs(120, {"max_uncommitted_steps": 8}) == 120 // bench.EPOCH_DIVISOR[8]
    assert bench.variant_epochs(120, {"max_uncommitted_steps": bench.DEFAULT_MAX_UNCOMMITTED_STEPS}) == 120
    assert bench.variant_epochs(120, {"step_log": False}) == 120
    assert bench.variant_epochs(1, {"max_uncommitted_steps": 0}) == 1  # never none


def _stored(bench, tmp_path, name: str, overheads: list[float], code: dict | None = None, **meta) -> str:
    """A stored run's JSON: its rounds, the judged pair each, and the meta pooling compares."""
    rounds = _rounds(bench, overheads)
    for rnd in rounds:
        for run in rnd:
            run["steplog_loop_share"] = 0.004 if run["variant"] != "step_log=False" else 0.0
            run["steplog_cpu_share"] = 0.012 if run["variant"] != "step_log=False" else 0.0
    full = {"workers": 2, "batch_per_worker": 32, "epochs": {"mlp": 480, "conv": 120}, "warmup_steps": 5,
            "staleness": 2, "default_K": bench.DEFAULT_MAX_UNCOMMITTED_STEPS, "checkpoint_every": 100,
            "ray_num_cpus": 4, "epoch_divisor": {"0": 4, "8": 2}, "command": f"steplog_overhead.py ({name})",
            "load_avg_start": [1.0, 1.0, 1.0], "wall_s": 60.0, "code": code, **meta}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"meta": full, "rounds": rounds, "faults": [], "throughput": []}))
    return str(path)


def test_pooled_runs_of_one_commit_are_judged_over_all_their_rounds(bench, tmp_path):
    code = {"commit": "a" * 40, "dirty": False}
    # the first run alone cannot tell (its interval holds 3%); with the second it shows the target met
    one = _stored(bench, tmp_path, "one", [0.01, 0.05, -0.01, 0.04, 0.0], code)
    two = _stored(bench, tmp_path, "two", [0.015, -0.005, 0.029, 0.01, 0.005, 0.02], code)
    alone = bench.pool([bench.load_run(one), bench.load_run(one)])  # the same run twice: its own figures
    data = bench.pool([bench.load_run(one), bench.load_run(two)])
    assert data["meta"]["rounds"] == 11 and data["meta"]["same_code_vouched"] is False
    cell = data["verdict"]["overhead_at_default_K"]["cells"]["mlp sync"]
    assert cell["rounds"] == 11 and cell["median"] == pytest.approx(0.01)
    assert cell["high"] <= 0.03 and cell["status"] == "met"
    assert [r["rounds"] for r in data["runs"]] == [5, 6]
    assert data["runs"][0]["overhead"]["mlp sync"]["status"] == "not shown"
    assert data["runs"][0]["overhead"] == alone["runs"][0]["overhead"]
    assert data["verdict"]["direct_cost_at_default_K"]["cells"]["mlp sync"]["median"] == pytest.approx(0.016)
    text = "\n".join(bench.pooled_markdown(data, "steplog_overhead.py --pool one two"))
    assert "pooled over 2 runs" in text and "| **pooled** | 11 |" in text and "--same-code" not in text


def test_runs_that_trained_differently_or_measured_unknown_or_dirty_code_are_not_pooled(bench, tmp_path):
    code = {"commit": "b" * 40, "dirty": False}
    one = bench.load_run(_stored(bench, tmp_path, "one", [0.01, 0.02], code))
    longer = bench.load_run(_stored(bench, tmp_path, "longer", [0.01, 0.02], code, epochs={"mlp": 960, "conv": 120}))
    with pytest.raises(bench.PoolError, match="epochs"):
        bench.pool([one, longer])
    unknown = bench.load_run(_stored(bench, tmp_path, "unknown", [0.01, 0.02]))
    with pytest.raises(bench.PoolError, match="REV:PATH.*--same-code"):
        bench.pool([one, unknown])
    vouched = bench.pool([one, unknown], same_code=True)
    assert vouched["meta"]["same_code_vouched"] and vouched["meta"]["unknown_commits"] == [unknown["spec"]]
    assert "Pooled with `--same-code`" in "\n".join(bench.pooled_markdown(vouched, "x"))
    with pytest.raises(bench.PoolError, match="uncommitted"):
        bench.load_run(_stored(bench, tmp_path, "dirty", [0.01], {"commit": "c" * 40, "dirty": True}))
    with pytest.raises(bench.PoolError, match="at least two"):
        bench.pool([one])
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(bench.PoolError, match="not a steplog_overhead.json"):
        bench.load_run(str(bad))
