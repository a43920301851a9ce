"""benchmarks/steplog_interleaved.py: the arithmetic of interleaved jobs (pure), the cgroup
freezer on a real process, and the script end to end (--quick)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coordinator.testing.freezer import Freezer, FreezerUnavailable, freezer_root

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
_spec = importlib.util.spec_from_file_location("steplog_interleaved", ROOT / "benchmarks" / "steplog_interleaved.py")
si = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(si)


def steady(rate_per_s: float, intervals: list[tuple[float, float]], dt: float = 0.01,
           batch: int = 32) -> list[tuple[float, int]]:
    """Stamps of a rank that steps every ``batch / rate_per_s`` seconds of thawed time, only
    inside ``intervals`` (frozen between them), from the first interval's start."""
    step_s = batch / rate_per_s
    stamps, n, owed = [(intervals[0][0], 0)], 0, step_s  # owed: thawed seconds to the next step's end
    for a, b in intervals:
        t = a
        while t + owed <= b:
            t, n, owed = t + owed, n + batch, step_s
            stamps.append((t, n))
        owed -= b - t
    return stamps


def test_overlap_and_samples_at():
    assert si.overlap([(0, 2), (4, 6), (8, 10)], 1, 9) == pytest.approx(1 + 2 + 1)
    assert si.overlap([(0, 2)], 3, 5) == 0
    stamps = [(1.0, 0), (2.0, 32), (3.0, 64)]
    assert si.samples_at(stamps, 0.5) == 0
    assert si.samples_at(stamps, 2.0) == 32  # a step that ended at t counts at t
    assert si.samples_at(stamps, 2.9) == 32
    assert si.samples_at(stamps, 10) == 64


def test_a_job_frozen_half_the_time_is_measured_at_its_thawed_speed():
    # Job A thawed in [0,1), [2,3), ...; job B in the gaps. A steps at 3200 samples/s of its
    # own time, B at 3104 (3% slower): wall-clock rates would be half of each.
    a_slices = [(2.0 * k, 2.0 * k + 1) for k in range(10)]
    b_slices = [(2.0 * k + 1, 2.0 * k + 2) for k in range(10)]
    a = [steady(3200, a_slices), steady(3200, a_slices)]
    b = [steady(3104, b_slices), steady(3104, b_slices)]
    lo, hi = si.common_period([a, b], 0.0)
    assert (lo, hi) == (pytest.approx(1.0), pytest.approx(min(a[0][-1][0], b[0][-1][0])))
    sa, sb = si.full_slices(a, a_slices, lo, hi), si.full_slices(b, b_slices, lo, hi)
    assert si.job_rate(sa) == pytest.approx(2 * 3200, rel=0.02)  # summed over its two ranks
    assert si.job_rate(sb) == pytest.approx(2 * 3104, rel=0.02)
    assert all(a >= lo and b <= hi for a, b, _ in sa + sb) and abs(len(sa) - len(sb)) <= 1
    ratios = si.sandwich_ratios(sa, sb)
    assert len(ratios) >= len(sa) + len(sb) - 3 and all(r == pytest.approx(0.97, abs=0.01) for r in ratios)
    assert si.steps_while_frozen(a, a_slices, lo, hi) == 0
    # a step stamped inside one of A's frozen gaps is counted
    bad = [sorted(a[0] + [(5.5, a[0][-1][1])])]  # A is frozen in (5, 6)
    assert si.steps_while_frozen(bad, a_slices, lo, hi) == 1


def test_a_machine_that_speeds_up_meets_both_jobs_alike():
    # The machine gets 2% faster every second; the logged job is 3% slower at any moment, and
    # its turns come each a second before the other job's: the samples/s of the whole runs
    # hand it the drift (an overhead near 5%), the sandwiched turns do not.
    def turns(starts, factor):
        return [(t, t + 1.0, int(10_000 * factor * (1 + 0.02 * (t + 0.5)))) for t in starts]

    base = turns([2, 4, 6, 8, 10], 1.0)
    logged = turns([1, 3, 5, 7, 9], 0.97)
    whole = 1 - si.job_rate(logged) / si.job_rate(base)
    assert whole > 0.04
    ratios = si.sandwich_ratios(base, logged)
    assert len(ratios) == 8  # every turn but the first and the last has both neighbours
    overhead = 1 - math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    assert overhead == pytest.approx(0.03, abs=0.002)


def test_pair_result_gives_the_overhead_and_the_direct_cost_over_thawed_seconds():
    a_slices = [(2.0 * k, 2.0 * k + 1) for k in range(20)]
    b_slices = [(2.0 * k + 1, 2.0 * k + 2) for k in range(20)]

    def child(rate, slices, cpu_s=0.0, loop_s=0.0):
        return {"ranks": [{"rank": r, "stamps": steady(rate, slices), "steplog_cpu_s": cpu_s, "steplog_loop_s": loop_s,
                           "samples": 0, "elapsed_s": 0.0} for r in range(2)], "failures": 0, "generations": 1}

    children = {si.BASE: child(3000, a_slices), si.LOGGED: child(2910, b_slices, cpu_s=0.1, loop_s=0.1)}
    out = si.pair_result(children, {si.BASE: a_slices, si.LOGGED: b_slices}, 0.0, cpus=2)
    assert out["overhead"] == pytest.approx(0.03, abs=0.005)
    assert out[si.BASE]["samples_per_s"] == pytest.approx(6000, rel=0.02)
    assert len(out["slice_ratios"]) >= 35 and out[si.LOGGED]["turns"][0][:2] == pytest.approx((1.0, 2.0))
    # The logged job was thawed ~20 s of its 40-s window: 2 x 0.1 CPU s over 2 CPUs x ~20 s is
    # 0.5% of the machine, 0.1 s of its loop's ~20 s is 0.5%: wall-clock seconds would halve both.
    assert out["steplog_cpu_share"] == pytest.approx(0.005, rel=0.1)
    assert out["steplog_loop_share"] == pytest.approx(0.005, rel=0.1)
    assert out["direct_cost"] == pytest.approx(0.01, rel=0.1)
    assert out[si.LOGGED]["steps_while_frozen"] == 0 and out[si.BASE]["slices"] >= 18


def test_the_loop_share_leaves_out_steps_a_freeze_stopped_in_the_log():
    slices = [(2.0 * k, 2.0 * k + 1) for k in range(20)]
    base = steady(3000, slices)
    # 2% of every step in the log's code; the freeze at the end of each turn lands in it, so
    # the step that spans the gap took a whole frozen second of "loop seconds" as well
    stamps, loop = [(base[0][0], 0, 0.0)], 0.0
    for (t0, _), (t1, n) in zip(base, base[1:], strict=False):
        loop += 0.02 * (t1 - t0) if t1 - t0 < 0.5 else 1.0
        stamps.append((t1, n, loop))
    assert si.thawed_loop_share(stamps, slices) == pytest.approx(0.02, rel=1e-6)
    # all the loop seconds over the thawed seconds instead: ~97%, nearly all of it 19 frozen seconds
    assert loop / sum(b - a for a, b in slices) > 0.9
    assert si.thawed_loop_share([(0.0, 0), (1.0, 32)], slices) is None  # stamps without loop seconds
    children = {v: {"ranks": [{"rank": r, "stamps": stamps, "steplog_cpu_s": 0.0, "steplog_loop_s": loop,
                               "samples": 0, "elapsed_s": 0.0} for r in range(2)], "failures": 0, "generations": 1}
                for v in si.VARIANTS}
    out = si.pair_result(children, {v: slices for v in si.VARIANTS}, 0.0, cpus=2)
    assert out["steplog_loop_share"] == pytest.approx(0.02, rel=1e-6) and out["steplog_loop_share_wall"] > 0.9


def test_jobs_that_never_time_at_once_are_refused():
    a = [[(0.0, 0), (1.0, 32)]]
    b = [[(2.0, 0), (3.0, 32)]]
    with pytest.raises(RuntimeError, match="never timing at once"):
        si.pair_result({si.BASE: {"ranks": [{"stamps": a[0]}]}, si.LOGGED: {"ranks": [{"stamps": b[0]}]}},
                       {si.BASE: [(0, 1)], si.LOGGED: [(2, 3)]}, 0.0, cpus=2)


@pytest.mark.slow
def test_interleaved_benchmark_quick_mode_writes_results(tmp_path):
    try:
        Freezer(f"synctrain-test-{time.monotonic_ns()}").remove()
    except FreezerUnavailable as exc:
        pytest.skip(str(exc))
    # its jobs start Rays of their own (each inside its cgroup), not the test session's
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "steplog_interleaved.py"), "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "steplog_interleaved.json").read_text())
    (pair,) = data["pairs"]
    for v in (si.BASE, si.LOGGED):
        job = pair[v]
        assert job["samples_per_s"] > 0 and job["thawed_s"] > 0 and job["slices"] >= 2, job
        assert job["steps_while_frozen"] == 0, job  # the freezer held each job while the other ran
        # freezing is no fault to the job: one generation with the log (none without it)
        assert job["failures"] == 0 and job["generations"] == (1 if v == si.LOGGED else 0), job
    assert pair["period_s"] > pair[si.LOGGED]["thawed_s"]  # the period also held the other job's turns
    assert 0 < pair["direct_cost"] < 1 and pair["overhead"] == data["table"][0]["median_overhead"]
    assert data["verdict"]["status"] in ("met", "not met", "not shown")
    assert "interleaved" in (tmp_path / "steplog_interleaved.md").read_text()
    assert (tmp_path / "steplog_interleaved.png").stat().st_size > 0
    # no cgroup of the run is left behind
    root, _ = freezer_root()
    assert not list(root.glob("synctrain-bench-*"))


def test_stored_runs_pool_their_rounds_and_refuse_what_differs(tmp_path):
    import steplog_overhead as so

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()

    def run(name, overheads, **meta):
        pairs = [{"model": "mlp", "mode": "sync", "overhead": o, "direct_cost": 0.017, "steplog_cpu_share": 0.01,
                  "steplog_loop_share": 0.007, si.BASE: {"samples_per_s": 100.0, "thawed_s": 20.0, "slices": 10},
                  si.LOGGED: {"samples_per_s": 99.0, "thawed_s": 20.0, "slices": 10}} for o in overheads]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"meta": {"code": {"commit": head, "dirty": False}, "epochs": {"mlp": 480},
                                             "default_K": 2048, "slice_s": 2.0, "rounds_done": len(overheads),
                                             "command": "x", **meta}, "pairs": pairs}))
        return str(path)

    a, b = run("a", [0.01, 0.02, 0.00]), run("b", [0.015, 0.005])
    data = si.pool([a, b], same_code=False)
    (row,) = data["table"]
    assert row["rounds"] == 5 and row["median_overhead"] == pytest.approx(0.01)
    assert data["verdict"]["cells"]["mlp sync"]["status"] in ("met", "not shown")
    assert "| mlp | sync | 5 |" in si.pooled_markdown(data, "cmd")
    assert [p["source"] for p in data["pairs"]] == [a] * 3 + [b] * 2  # each round says its run
    with pytest.raises(so.PoolError, match="same run"):
        si.pool([a, a], same_code=False)
    with pytest.raises(so.PoolError, match="uncommitted"):
        si.pool([a, run("dirty", [0.0], code={"commit": head, "dirty": True})], same_code=False)
    with pytest.raises(so.PoolError, match="epochs"):
        si.pool([a, run("short", [0.0], epochs={"mlp": 40})], same_code=False)
    with pytest.raises(so.PoolError, match="logged_options"):  # a split is not pooled with the defaults
        si.pool([a, run("split", [0.0], logged_options={"checkpoint_every": 0})], same_code=False)
    with pytest.raises(so.PoolError, match="logged_variant"):  # nor is the idle-coordinator split
        si.pool([a, run("idle", [0.0], logged_variant="idle-coordinator")], same_code=False)
    # through the CLI: --name keeps the default pool's files where they are
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "steplog_interleaved.py"), "--pool", a, b,
                    "--out", str(out), "--name", "my_pool"], cwd=ROOT / "benchmarks", check=True,
                   capture_output=True)
    assert sorted(p.name for p in out.iterdir()) == ["my_pool.json", "my_pool.md"]
    assert json.loads((out / "my_pool.json").read_text())["table"][0]["rounds"] == 5


def test_logged_options_are_checked_before_any_job_and_mark_the_results_as_a_split():
    import argparse

    parser = argparse.ArgumentParser()
    parser.error = lambda message: (_ for _ in ()).throw(ValueError(message))  # type: ignore[method-assign]
    assert si.parse_logged_options(parser, None, {"sync"}) == {}
    assert si.parse_logged_options(parser, '{"checkpoint_every": 0}', {"sync", "async"}) == {"checkpoint_every": 0}
    for text, problem in [("{checkpoint_every: 0}", "not JSON"), ("[1]", "JSON object"),
                          ('{"step_log": false}', "cannot set step_log"), ('{"staleness": 0}', "both jobs train alike"),
                          ('{"checkpoint_every": -1}', "checkpoint_every"), ('{"chekpoint_every": 0}', "chekpoint_every")]:
        with pytest.raises(ValueError, match=problem):
            si.parse_logged_options(parser, text, {"async"})
    pair = {"model": "conv", "mode": "async", "overhead": 0.01, "direct_cost": 0.01, "steplog_cpu_share": 0.01,
            "steplog_loop_share": 0.0, si.BASE: {"samples_per_s": 100.0, "thawed_s": 20.0, "slices": 10, "turns": []},
            si.LOGGED: {"samples_per_s": 99.0, "thawed_s": 20.0, "slices": 10, "turns": []}}
    meta = {"slice_s": 2.0, "rounds_done": 1, "cpus": 2, "load_avg_start": [0.0, 0.0, 0.0], "command": "x",
            "default_K": 2048}
    table = si.summarize([pair])
    plain = si.markdown({"meta": meta, "table": table, "verdict": si.verdict(table), "pairs": [pair]})
    split = si.markdown({"meta": {**meta, "logged_options": {"checkpoint_every": 0}}, "table": table,
                         "verdict": si.verdict(table), "pairs": [pair]})
    assert "not at the defaults" not in plain and "samples/s at the default K" in plain
    assert '`{"checkpoint_every": 0}`' in split and "Not a verdict on the target" in split
    assert "samples/s at the default K" not in split


def test_the_idle_coordinator_split_is_marked_as_one_and_takes_no_logged_options():
    pair = {"model": "mlp", "mode": "sync", "overhead": 0.01, "direct_cost": 0.0, "steplog_cpu_share": 0.0,
            "steplog_loop_share": 0.0, si.BASE: {"samples_per_s": 100.0, "thawed_s": 20.0, "slices": 10, "turns": []},
            si.LOGGED: {"samples_per_s": 99.0, "thawed_s": 20.0, "slices": 10, "turns": []}}
    meta = {"slice_s": 2.0, "rounds_done": 1, "cpus": 2, "load_avg_start": [0.0, 0.0, 0.0], "command": "x",
            "default_K": 2048, "logged_variant": "idle-coordinator"}
    table = si.summarize([pair])
    text = si.markdown({"meta": meta, "table": table, "verdict": si.verdict(table), "pairs": [pair]})
    assert "has no log" in text and "idle three-node coordinator" in text and "Not a verdict on the target" in text
    assert "samples/s with an idle coordinator, no log" in text and "samples/s at the default K" not in text
    # both at once would be a logged job with options and no log: refused before any job starts
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "steplog_interleaved.py"), "--logged-variant",
                           "idle-coordinator", "--logged-options", '{"checkpoint_every": 0}'],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "goes with the default --logged-variant" in proc.stderr, proc.stderr
