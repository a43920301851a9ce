"""The node's clock is tickless (``CoordinatorServer._tick_forever``): an idle node sleeps
through the ticks that could only count and wakes for the ones the core or a chore acts on,
while its logical clock keeps the wall clock's pace -- real processes on loopback."""

from __future__ import annotations

import time


def _stats(cluster, i):
    st = cluster.status(i)
    assert st is not None, f"node {i} did not answer"
    return st["stats"]


def test_an_idle_follower_sleeps_through_ticks_that_only_count(make_cluster, wait_for):
    tick_s = 0.015
    cluster = make_cluster(3, tick_ms=tick_s * 1e3)
    leader = cluster.leader()
    follower = next(i for i in cluster.node_ids if i != leader)
    term = cluster.status(leader)["term"]
    before, started = _stats(cluster, follower), time.monotonic()
    wait_for(lambda: _stats(cluster, follower)["ticks"] - before["ticks"] >= 300,
             "300 ticks on a follower")
    after, took_s = _stats(cluster, follower), time.monotonic() - started
    ticks = after["ticks"] - before["ticks"]
    wakes = after["ticker_wakes"] - before["ticker_wakes"]
    # It wakes for its 16-tick chore (and a few re-arms), not each tick: a ticker firing every
    # 15 ms would have woken ~300 times.
    assert wakes <= ticks / 4, (wakes, ticks)
    # The logical clock keeps pace: the ticks it delivered cover the time that passed, less the
    # 16 ticks a status may find undelivered and what a loaded machine's late wakes drop.
    assert ticks >= 0.5 * took_s / tick_s - 16, (ticks, took_s)
    # ... and the cluster stayed quiet meanwhile: the same leader in the same term.
    assert cluster.status(leader)["term"] == term and cluster.leader() == leader

