"""``benchmarks/ps_throughput.py``'s rounds, without Ray: each variant's row is its median
round, every round's figures kept beside it and shown in the table (the smoke test in
``test_examples_and_cli.py`` runs one round of the script for real)."""

from __future__ import annotations

import argparse

import pytest


@pytest.fixture(scope="module")
def ps(benchmark_module):
    return benchmark_module("ps_throughput")


def row(name: str, pushes: float, cpu: float) -> dict:
    return {"name": name, "workers": 2, "pushes_per_s": pushes, "grad_gb_per_s": pushes * 0.004,
            "cpu_ms_per_push": cpu, "shards": 1, "pull_every": 1}


def test_each_variant_takes_its_median_round_and_keeps_every_round(ps):
    rounds = [[row("naive Ray PS (docs)", 50.0, 30.0), row("synctrain async", 180.0, 9.0)],
              [row("naive Ray PS (docs)", 40.0, 35.0), row("synctrain async", 120.0, 12.0)],
              [row("naive Ray PS (docs)", 60.0, 28.0), row("synctrain async", 150.0, 10.0)]]
    naive, ours = ps.median_rows(rounds)
    assert naive["pushes_per_s"] == 50.0 and naive["cpu_ms_per_push"] == 30.0  # the median round's row
    assert naive["pushes_per_s_rounds"] == [50.0, 40.0, 60.0]  # in round order
    assert ours["pushes_per_s"] == 150.0 and ours["cpu_ms_per_push_rounds"] == [9.0, 12.0, 10.0]
    # an even count takes the lower middle
    naive2, _ = ps.median_rows(rounds[:2])
    assert naive2["pushes_per_s"] == 40.0


def test_the_table_shows_each_rounds_ratio_against_that_rounds_naive_server(ps, tmp_path):
    rounds = [[row("naive Ray PS (docs)", 50.0, 30.0), row("synctrain async", 150.0, 9.0)],
              [row("naive Ray PS (docs)", 40.0, 35.0), row("synctrain async", 160.0, 12.0)]]
    args = argparse.Namespace(rounds=2, steps=5)
    ps.write(ps.median_rows(rounds), str(tmp_path), args)
    text = (tmp_path / "ps_throughput.md").read_text()
    # median rows: naive 40 (lower middle), synctrain 150: 3.75x, rounds 150/50 and 160/40
    assert "| synctrain async | 1 | 150.0 | 0.600 | 3.75x (3.00 / 4.00) | 9.0 |" in text, text
    assert "2 interleaved round(s)" in text
