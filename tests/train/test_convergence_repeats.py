"""benchmarks/convergence.py's ``--repeats`` without Ray: each configuration runs that many
times, the row kept is the run with the median time to 95% (a run that never got there counts
as slowest), and every run's time is listed beside it. (The quick-mode smoke test runs one
repeat: this is the part of the script that more repeats exercise.)"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def convergence(benchmark_module):
    return benchmark_module("convergence")


def _fake_runs(monkeypatch, convergence, times):
    calls = []
    left = list(times)

    def run(name, mode, config, **options):
        calls.append((name, mode, dict(config), options))
        return {"name": name, "time_to_95_s": left.pop(0), "n": len(calls)}

    monkeypatch.setattr(convergence, "run", run)
    return calls


def test_the_median_run_is_kept_with_every_time_listed(monkeypatch, convergence):
    calls = _fake_runs(monkeypatch, convergence, [3.0, 1.0, 2.0])
    row = convergence.repeated(3, "sync", "sync", {"epochs": 1}, staleness=2)
    assert len(calls) == 3 and all(c == ("sync", "sync", {"epochs": 1}, {"staleness": 2}) for c in calls)
    assert row["time_to_95_s"] == 2.0 and row["n"] == 3  # the third run: the median
    assert row["times_to_95_s"] == [1.0, 2.0, 3.0]


def test_a_run_that_never_reached_95_percent_counts_as_slowest(monkeypatch, convergence):
    _fake_runs(monkeypatch, convergence, [None, 4.0])
    row = convergence.repeated(2, "async s=2", "async", {})
    # of two, the lower median: the run that got there, not the one that never did
    assert row["time_to_95_s"] == 4.0
    assert row["times_to_95_s"] == [4.0, None]


def test_one_repeat_is_one_run(monkeypatch, convergence):
    calls = _fake_runs(monkeypatch, convergence, [None])
    row = convergence.repeated(1, "sync", "sync", {})
    assert len(calls) == 1 and row["times_to_95_s"] == [None]
