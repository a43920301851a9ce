"""Pulled digests in the step log (coordinator/steplog.py, async mode): each check judged once
as it arrives, a worker whose held copy differs from what the shards served named, a shard
that served two digests for one version named, retried batches judged once, versions of an
older generation not compared, bad checks refused, and snapshots (format 3, reading 2)."""

from __future__ import annotations

import msgpack

from coordinator import steplog as sl
from coordinator.statemachine import StateMachine
from tests.service.test_steplog_digests import Log, rec


def two_workers() -> Log:
    log = Log()
    assert log.cmd("create", "j", {}, False)["ok"]
    assert log.generation(1, members=2)["ok"]
    return log


def pulled(step: int, versions: list[int], served: list[str], held: list[str] | None = None) -> dict:
    return {"step": step, "time": 2.0,
            "pulled": {"versions": versions, "served": served, "held": held if held is not None else served}}


def summary(log: Log) -> dict:
    return log.job()["digests"]["pulled"]


def test_agreeing_checks_are_counted_and_find_nothing() -> None:
    log = two_workers()
    assert log.steps(1, rec(1), pulled(1, [3, 3], ["a", "b"]))["ok"] is True
    assert log.steps(1, pulled(1, [3, 4], ["a", "c"]), rank=1)["ok"]  # same version 3: same digest
    got = summary(log)
    assert got["checks"] == 2 and got["mismatches"] == 0 and got["recent"] == []


def test_a_held_copy_that_differs_from_what_was_served_names_the_worker() -> None:
    log = two_workers()
    log.steps(1, rec(1))
    assert log.steps(1, pulled(5, [7, 7], ["a", "b"], ["a", "X"]), rank=1)["ok"]
    [found] = summary(log)["recent"]
    assert found == {"kind": "held", "rank": 1, "step": 5, "shards": [1], "versions": [7],
                     "generation": 1}


def test_a_shard_that_served_two_digests_for_one_version_is_named() -> None:
    log = two_workers()
    log.steps(1, rec(1), pulled(1, [9], ["good"]))
    log.steps(1, pulled(4, [9], ["bad"]), rank=1)  # the held copy matches what it got
    [found] = summary(log)["recent"]
    assert found["kind"] == "served" and found["rank"] is None and found["shard"] == 0
    assert found["version"] == 9 and found["served_to"] == [0, 1] and found["steps"] == [1, 4]


def test_a_retried_batch_is_judged_once() -> None:
    log = two_workers()
    log.steps(1, rec(1))
    bad = pulled(2, [1], ["a"], ["b"])
    log.steps(1, bad, rank=1)
    log.steps(1, bad, rank=1)  # re-sent after a timeout
    got = summary(log)
    assert got["checks"] == 1 and got["mismatches"] == 1


def test_versions_of_an_older_generation_are_not_compared() -> None:
    """A restore puts a shard back to an older version, whose parameters then differ."""
    log = two_workers()
    log.steps(1, rec(1), pulled(1, [5], ["old"]))
    assert log.generation(2, start_step=0)["ok"]
    log.steps(2, rec(1), pulled(1, [5], ["new"]))
    got = summary(log)
    assert got["checks"] == 2 and got["mismatches"] == 0


def test_bad_checks_are_refused() -> None:
    log = two_workers()
    for bad in ({"versions": [1], "served": ["a"]},  # no held
                {"versions": [1, 2], "served": ["a"], "held": ["a"]},  # lengths differ
                {"versions": [], "served": [], "held": []},
                {"versions": [1], "served": [""], "held": ["a"]},
                {"versions": [-1], "served": ["a"], "held": ["a"]},
                [1, "a", "a"]):
        answer = log.steps(1, {"step": 1, "time": 2.0, "pulled": bad}, rank=1)
        assert answer["error"] == "bad_argument" and "pulled" in answer["detail"], (bad, answer)
    assert summary(log)["checks"] == 0


def test_mismatches_kept_are_bounded_and_counted(monkeypatch) -> None:
    monkeypatch.setattr(sl, "MAX_PULLED_MISMATCHES_KEPT", 3)
    log = two_workers()
    log.steps(1, rec(1))
    for step in range(1, 6):
        log.steps(1, pulled(step, [step], ["a"], ["b"]), rank=1)
    got = summary(log)
    assert got["mismatches"] == 5 and got["dropped"] == 2
    assert [m["step"] for m in got["recent"]] == [3, 4, 5]


def test_snapshot_keeps_the_checks_and_format_2_still_restores() -> None:
    log = two_workers()
    log.steps(1, rec(1), pulled(1, [2], ["a"], ["b"]))
    restored = StateMachine()
    restored.restore(log.sm.snapshot())
    assert restored.snapshot() == log.sm.snapshot()
    assert restored.query("steplog", "job", ("j",)) == log.query("job", "j")
    state = log.sm.extensions["steplog"].snapshot_state()
    fields_2 = len(sl._JOB_FIELDS_FORMAT_2)
    v2 = {"format": 2, "jobs": [values[:fields_2] for values in state["jobs"]]}
    ext = sl.StepLog()
    ext.restore_state(msgpack.unpackb(msgpack.packb(v2, use_bin_type=True), raw=False))
    job = ext.jobs["j"]
    assert job.pulled_checks == 0 and job.pulled_mismatches == [] and job.generation == 1
