"""The training step log (coordinator/steplog.py): its commands as pure state-machine
transitions (fencing, superseding, gaps, duplicates, pruning, bounds, snapshots), then once
through the wire on a real 3-node cluster with a leader killed in between."""

from __future__ import annotations

import asyncio
import os

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator import AsyncClient, RequestRejected
from coordinator import steplog as sl
from coordinator.statemachine import StateMachine, encode_command


class Log:
    """Feeds step-log commands to a state machine as committed entries of one session."""

    def __init__(self, sm: StateMachine | None = None) -> None:
        self.sm = sm or StateMachine()
        self.entries: list[bytes] = []
        self.seq = 0
        self.session = self.apply(encode_command("register", 0, 0, 0, 0))["session"]

    def apply(self, data: bytes) -> dict:
        self.entries.append(data)
        answer = self.sm.apply(self.sm.applied_index + 1, data)
        assert answer is not None
        return answer

    def cmd(self, op: str, *args, seq: int | None = None) -> dict:
        if seq is None:
            self.seq += 1
            seq = self.seq
        return self.apply(encode_command(f"steplog.{op}", self.session, seq, 1, 0, *args))

    def query(self, name: str, *args) -> dict:
        return self.sm.query("steplog", name, args)

    def job(self, name: str = "j") -> dict:
        answer = self.query("job", name)
        assert answer["ok"], answer
        return answer["job"]

    def items(self, kind: str, name: str = "j") -> list[dict]:
        return self.query("records", name, kind, 0, 2000)["items"]

    # shorthands for the common commands
    def generation(self, g: int, start_step: int = 0, start_report: int = 0, name: str = "j",
                   members: int = 2) -> dict:
        ms = [{"rank": r, "node_id": f"n{r}"} for r in range(members)]
        return self.cmd("generation", name, g, ms, "10.0.0.1:29500", start_step, start_report,
                        "test", 1.0)

    def steps(self, g: int, *records, rank: int = 0, name: str = "j") -> dict:
        return self.cmd("steps", name, g, rank, list(records))


def rec(step: int, *report_seqs: int, t: float = 2.0) -> dict:
    r: dict = {"step": step, "time": t}
    if report_seqs:
        r["reports"] = [{"seq": s, "metrics": {"loss": 1.0 / (s + 1), "tag": "x"}}
                        for s in report_seqs]
    return r


def started(generation: int = 1) -> Log:
    log = Log()
    assert log.cmd("create", "j", {"lr": 0.1, "layers": (1, 2)}, False) == {
        "ok": True, "created": True}
    for g in range(1, generation + 1):
        assert log.generation(g)["ok"]
    return log


def state_bytes(log: Log) -> bytes:
    return msgpack.packb(log.sm.extensions["steplog"].snapshot_state(), use_bin_type=True)


def test_write_from_an_older_generation_is_fenced_and_changes_nothing() -> None:
    log = started(generation=1)
    assert log.steps(1, rec(1), rec(2, 0))["ok"]
    assert log.generation(2, start_step=2, start_report=1)["ok"]
    before = log.job()
    answer = log.steps(1, rec(3, 1, t=7.5), rec(4))  # the replaced worker still writes
    assert answer["error"] == "fenced" and answer["current"] == 2
    assert "generation 1 is not the current generation 2" in answer["detail"]
    assert "replaced" in answer["detail"]
    ckpt = log.cmd("checkpoint", "j", 1, 4, "/ck/4.pt", 10, "ab" * 32, 8.0)
    assert ckpt["error"] == "fenced"
    after = log.job()
    assert after["fenced"] == before["fenced"] + 2
    assert {k: v for k, v in after.items() if k != "fenced"} == {
        k: v for k, v in before.items() if k != "fenced"}, "a fenced write changed the log"
    assert log.items("fenced") == [
        {"generation": 1, "rank": 0, "step": 3, "time": 2.0, "current": 2, "what": "steps"},
        {"generation": 1, "rank": None, "step": 4, "time": 8.0, "current": 2,
         "what": "checkpoint"}]
    assert log.generation(2)["error"] == "fenced", "a generation starts only as current + 1"
    assert log.generation(4)["error"] == "fenced"
    n = len(log.items("fenced"))
    assert log.steps(3, rec(3))["error"] == "not_yet", "a future generation waits, is not fenced"
    assert len(log.items("fenced")) == n, "a not-yet write is not recorded as fenced"


def test_continue_generation_rolls_nothing_back_and_lets_rank0_jump() -> None:
    log = started()
    assert log.steps(1, rec(1, 0), rec(2, 1))["ok"]
    assert log.generation(2, start_step=-1, start_report=-1)["ok"]
    assert not any(s.get("superseded") for s in log.items("steps"))
    assert log.items("generations")[-1]["start_step"] == 2
    assert log.items("generations")[-1]["continue"] is True
    assert log.steps(2, rec(5, 2))["ok"], "a replacement rank 0 resumes at its clock"
    steps = log.items("steps")
    assert [(s["step"], bool(s.get("lost"))) for s in steps] == [
        (1, False), (2, False), (3, True), (4, True), (5, False)]
    assert log.steps(2, rec(7))["error"] == "gap", "only the first step after it may jump"


def test_new_generation_supersedes_what_lies_beyond_its_start() -> None:
    log = started()
    assert log.steps(1, rec(1, 0), rec(2, 1), rec(3, 2), rec(4, 3))["ok"]
    for step in (2, 4):
        log.cmd("checkpoint", "j", 1, step, f"/ck/{step}", 1, "0" * 64, 3.0)
    assert log.generation(2, start_step=2, start_report=2)["ok"]
    steps = log.items("steps")
    assert [(s["step"], s.get("superseded_by")) for s in steps] == [
        (1, None), (2, None), (3, 2), (4, 2)]
    reports = log.items("reports")
    assert [(r["seq"], r["step"], r.get("superseded_by")) for r in reports] == [
        (0, 1, None), (1, 2, None), (2, 3, 2), (3, 4, 2)]
    assert [(c["step"], c.get("superseded_by")) for c in log.items("checkpoints")] == [
        (2, None), (4, 2)]
    job = log.job()
    assert (job["generation"], job["last_step"], job["report_seq"]) == (2, 2, 2)
    assert [c["step"] for c in job["checkpoints"]] == [2]
    # The new generation redoes step 3 and report 2; the old records stay, marked.
    assert log.steps(2, rec(3, 2))["ok"]
    steps = log.items("steps")
    assert [(s["step"], s["generation"], s.get("superseded", False)) for s in steps] == [
        (1, 1, False), (2, 1, False), (3, 1, True), (4, 1, True), (3, 2, False)]
    # A third generation going back further supersedes across both histories, once each.
    assert log.generation(3, start_step=1, start_report=1)["ok"]
    assert [(s["step"], s.get("superseded_by")) for s in log.items("steps")] == [
        (1, None), (2, 3), (3, 2), (4, 2), (3, 3)]
    assert [r.get("superseded_by") for r in log.items("reports")] == [None, 3, 2, 2, 3]
    gens = log.items("generations")
    assert [(g["generation"], g["start_step"], g["start_report"]) for g in gens] == [
        (1, 0, 0), (2, 2, 2), (3, 1, 1)]
    assert gens[0]["members"] == [{"rank": 0, "node_id": "n0"}, {"rank": 1, "node_id": "n1"}]


def test_gap_refuses_the_whole_batch() -> None:
    log = started()
    assert log.steps(1, rec(1, 0))["ok"]
    before = state_bytes(log)
    answer = log.steps(1, rec(2), rec(4))
    assert answer["error"] == "gap" and "step 4 arrived where step 3 was due" in answer["detail"]
    assert (answer["last_step"], answer["report_seq"]) == (1, 1)
    answer = log.steps(1, rec(2, 1), rec(3, 3))
    assert answer["error"] == "gap" and "report 3 arrived where report 2 was due" in answer["detail"]
    assert state_bytes(log) == before, "a refused batch applied part of itself"
    assert log.steps(1, rec(2, 1), rec(3, 2)) == {"ok": True, "last_step": 3, "report_seq": 3}


def test_retried_batch_applies_once() -> None:
    log = started()
    batch = [rec(1, 0), rec(2, 1, 2)]
    first = log.steps(1, *batch)
    assert first == {"ok": True, "last_step": 2, "report_seq": 3}
    # The same command retried (same session seq): answered from the session, not applied.
    assert log.cmd("steps", "j", 1, 0, batch, seq=log.seq) == first
    # The same records resent as a new command (the worker lost the answer and its session):
    # every record is a duplicate by step and seq, so nothing changes.
    before = state_bytes(log)
    assert log.steps(1, *batch) == first
    assert state_bytes(log) == before
    # Overlapping resend: old records skipped, the new tail applied.
    assert log.steps(1, rec(2, 1, 2), rec(3, 3)) == {"ok": True, "last_step": 3,
                                                    "report_seq": 4}
    assert [s["step"] for s in log.items("steps")] == [1, 2, 3]
    assert [r["seq"] for r in log.items("reports")] == [0, 1, 2, 3]


def test_reports_only_records_and_reports_before_the_first_step() -> None:
    log = started()
    assert log.steps(1, rec(0, 0, 1)) == {"ok": True, "last_step": 0, "report_seq": 2}
    assert log.steps(1, rec(1)) == {"ok": True, "last_step": 1, "report_seq": 2}
    # Reports made after step 1, before step 2, arrive in a record of step 1.
    assert log.steps(1, rec(1, 2), rec(2, 3)) == {"ok": True, "last_step": 2, "report_seq": 4}
    assert [(r["seq"], r["step"]) for r in log.items("reports")] == [(0, 0), (1, 0), (2, 1),
                                                                      (3, 2)]
    assert [s["step"] for s in log.items("steps")] == [1, 2]
    assert log.items("reports")[0]["metrics"] == {"loss": 1.0, "tag": "x"}



def test_each_report_carries_the_time_of_the_step_it_followed() -> None:
    log = started()
    log.steps(1, rec(0, 0, t=1.0))  # before the first step: no step time to carry
    log.steps(1, rec(1, 1, t=5.0))  # on its own step's record
    log.steps(1, rec(1, 2, t=9.0))  # made after step 1, sent in a later batch: step 1's time
    log.steps(1, rec(2, t=6.0), rec(2, 3, t=9.5))  # its step came earlier in the same batch
    assert [(r["seq"], r.get("time")) for r in log.items("reports")] == [
        (0, None), (1, 5.0), (2, 5.0), (3, 6.0)]
    # After a rollback to step 1 the superseded step 2 is not the one a report follows.
    assert log.generation(2, start_step=1, start_report=2)["ok"]
    log.steps(2, rec(1, 2, t=20.0))
    assert log.items("reports")[-1] == {"seq": 2, "step": 1, "generation": 2, "time": 5.0,
                                        "metrics": {"loss": 1.0 / 3, "tag": "x"}}

def test_other_ranks_only_report_progress() -> None:
    log = started()
    assert log.steps(1, rec(1, 0), rec(2), rank=1) == {"ok": True, "last_step": 0,
                                                        "report_seq": 0}
    assert log.steps(1, rec(1), rank=1)["ok"]
    job = log.job()
    assert job["progress"] == {"1": 2} and job["steps"] == 0 and job["reports"] == 0
    assert log.generation(2)["ok"] and log.job()["progress"] == {}, "progress is per generation"


def test_survivor_ahead_of_the_log_leaves_lost_placeholders() -> None:
    log = started()
    assert log.steps(1, rec(1), rec(2))["ok"]
    assert log.generation(2, start_step=5, start_report=3)["ok"]
    steps = log.items("steps")
    assert [(s["step"], s["generation"], s.get("lost", False)) for s in steps] == [
        (1, 1, False), (2, 1, False), (3, 1, True), (4, 1, True), (5, 1, True)]
    assert (log.job()["last_step"], log.job()["report_seq"]) == (5, 3)
    assert log.steps(2, rec(6, 3))["ok"]
    too_far = log.generation(3, start_step=6 + sl.MAX_LOST_STEPS + 1)
    assert too_far["error"] == "bad_argument"


def test_checkpoint_pruning_keeps_two_live() -> None:
    log = started()
    prunes = [log.cmd("checkpoint", "j", 1, step, f"/ck/{step}.pt", 100 + step, "f" * 64,
                      float(step))["prune"] for step in (10, 20, 30, 40)]
    assert prunes == [[], [], ["/ck/10.pt"], ["/ck/20.pt"]]
    live = log.job()["checkpoints"]
    assert [(c["step"], c["path"], c["size"]) for c in live] == [(30, "/ck/30.pt", 130),
                                                                 (40, "/ck/40.pt", 140)]
    # After a rollback to 30, checkpoint 40 is superseded (not pruned); a new 40 reusing the
    # same path is live, and pruning never names a path a live checkpoint still uses.
    assert log.generation(2, start_step=30)["ok"]
    assert [c["step"] for c in log.job()["checkpoints"]] == [30]
    assert log.cmd("checkpoint", "j", 2, 40, "/ck/40.pt", 1, "e" * 64, 50.0)["prune"] == []
    assert log.cmd("checkpoint", "j", 2, 50, "/ck/30.pt", 1, "e" * 64, 60.0)["prune"] == []
    assert [(c["step"], c["generation"]) for c in log.job()["checkpoints"]] == [(40, 2), (50, 2)]


def test_checkpoints_ride_on_rank0_steps_after_the_records_they_cover() -> None:
    """One steps command carries rank 0's records and checkpoint references: the steps first,
    then each checkpoint as a checkpoint command would record it (pruning included); a batch
    sent again records each once; a bad reference or another rank's refuses the whole batch."""
    log = started()
    ref = lambda step: [step, f"/ck/{step}.pt", 100 + step, "f" * 64, float(step), "d" * 64]  # noqa: E731
    answer = log.cmd("steps", "j", 1, 0, [rec(s) for s in range(1, 11)], [ref(10)])
    assert answer == {"ok": True, "last_step": 10, "report_seq": 0, "prune": []}
    assert log.cmd("steps", "j", 1, 0, [rec(s) for s in range(11, 31)], [ref(20), ref(30)])["prune"] == ["/ck/10.pt"]
    # sent again (an answer lost on the way): nothing recorded twice
    assert log.cmd("steps", "j", 1, 0, [rec(s) for s in range(11, 31)], [ref(20), ref(30)])["prune"] == []
    job = log.job()
    assert job["last_step"] == 30
    assert [(c["step"], c["digest"]) for c in job["checkpoints"]] == [(20, "d" * 64), (30, "d" * 64)]
    assert len(log.items("checkpoints")) == 3
    before = state_bytes(log)
    for bad in ([ref(40)[:4]], [["x", "/p", 1, "f", 1.0]], "no list"):
        answer = log.cmd("steps", "j", 1, 0, [rec(31)], bad)
        assert answer["error"] == "bad_argument", answer
    assert log.cmd("steps", "j", 1, 1, [rec(31)], [ref(31)])["error"] == "bad_argument"
    assert log.cmd("steps", "j", 1, 0, [rec(33)], [ref(33)])["error"] == "gap"
    assert state_bytes(log) == before  # refused whole: neither steps nor checkpoints
    # a zombie's batch is fenced, checkpoints and all
    assert log.generation(2, start_step=30)["ok"]
    assert log.cmd("steps", "j", 1, 0, [rec(31)], [ref(31)])["error"] == "fenced"
    assert [c["step"] for c in log.job()["checkpoints"]] == [20, 30]


def test_create_resume_job_exists_job_finished() -> None:
    log = started()
    again = log.cmd("create", "j", {}, False)
    assert again["error"] == "job_exists" and "'j'" in again["detail"]
    assert "running" in again["detail"]
    assert log.cmd("end", "j", "failed", "worker lost", 9.0) == {"ok": True}
    assert log.job()["end"] == {"state": "failed", "reason": "worker lost", "time": 9.0,
                                "generation": 1, "last_step": 0}
    assert log.generation(2)["error"] == "job_not_running"
    resumed = log.cmd("create", "j", {"ignored": True}, True)
    assert resumed == {"ok": True, "created": False, "state": "failed",
                       "spec": {"lr": 0.1, "layers": [1, 2]}}
    assert log.job()["state"] == "running" and log.job()["end"] is None
    assert log.generation(2)["ok"]
    assert log.cmd("end", "j", "finished", "done", 10.0)["ok"]
    assert log.cmd("create", "j", {}, True)["error"] == "job_finished"
    assert log.cmd("end", "j", "failed", "late", 11.0)["error"] == "job_finished"
    assert log.cmd("create", "new", {}, True) == {"ok": True, "created": True}
    jobs = log.query("jobs")
    assert [(j["name"], j["state"]) for j in jobs["jobs"]] == [("j", "finished"),
                                                               ("new", "running")]


def test_failures_are_recorded_and_annotated() -> None:
    log = started()
    failure = {"generation": 1, "rank": 1, "kind": "worker_died", "step": 60, "time": 5.0,
               "recovery": "restart", "recovery_s": None}
    assert log.cmd("failure", "j", failure) == {"ok": True, "index": 0}
    assert log.cmd("failure", "j", dict(failure, rank=None, detail="oom")) == {"ok": True,
                                                                              "index": 1}
    assert log.cmd("annotate_failure", "j", 0, {"recovery_s": 3.5, "detail": "ok"}) == {
        "ok": True}
    items = log.items("failures")
    assert items[0] == dict(failure, recovery_s=3.5, detail="ok")
    assert items[1]["rank"] is None and log.job()["failures"] == 2
    assert log.cmd("annotate_failure", "j", 0, {"kind": "x"})["error"] == "bad_argument"
    assert log.cmd("annotate_failure", "j", 2, {"detail": "x"})["error"] == "bad_argument"
    missing = {k: v for k, v in failure.items() if k != "kind"}
    assert log.cmd("failure", "j", missing)["error"] == "bad_argument"


def test_bounds_are_refused_with_error_answers(monkeypatch) -> None:
    log = started()
    too_many = [rec(s) for s in range(1, sl.MAX_RECORDS_PER_BATCH + 2)]
    assert log.steps(1, *too_many)["error"] == "bad_argument"
    wide = {"step": 1, "time": 1.0, "reports": [
        {"seq": 0, "metrics": {f"m{i}": i for i in range(sl.MAX_METRICS_PER_REPORT + 1)}}]}
    assert log.steps(1, wide)["error"] == "bad_argument"
    long_key = {"step": 1, "time": 1.0, "reports": [{"seq": 0, "metrics": {"k" * 129: 1}}]}
    assert log.steps(1, long_key)["error"] == "bad_argument"
    long_value = {"step": 1, "time": 1.0, "reports": [{"seq": 0, "metrics": {"k": "v" * 1025}}]}
    assert log.steps(1, long_value)["error"] == "bad_argument"
    nested = {"step": 1, "time": 1.0, "reports": [{"seq": 0, "metrics": {"k": [1, 2]}}]}
    assert log.steps(1, nested)["error"] == "bad_argument"
    assert log.job()["last_step"] == 0
    assert log.cmd("create", "bad name!", {}, False)["error"] == "bad_argument"
    assert log.cmd("create", "x" * 201, {}, False)["error"] == "bad_argument"
    assert log.cmd("create", "big", {"blob": "x" * sl.MAX_SPEC_BYTES}, False)["error"] == (
        "bad_argument")
    for _ in range(sl.MAX_FENCED_KEPT + 5):  # fenced refusals: the newest kept, the rest counted
        assert log.steps(0, rec(1))["error"] == "fenced"
    job = log.job()
    assert job["fenced"] == sl.MAX_FENCED_KEPT + 5 and job["fenced_dropped"] == 5
    assert log.query("records", "j", "fenced")["total"] == sl.MAX_FENCED_KEPT
    monkeypatch.setattr(sl, "MAX_FAILURES", 2)
    monkeypatch.setattr(sl, "MAX_JOBS", 2)
    monkeypatch.setattr(sl, "MAX_GENERATIONS", 2)
    failure = {"generation": 1, "rank": 0, "kind": "k", "step": 0, "time": 0.0,
               "recovery": None, "recovery_s": None}
    assert [log.cmd("failure", "j", failure).get("error") for _ in range(3)] == [
        None, None, "quota_exceeded"]
    assert log.cmd("create", "second", {}, False)["ok"]
    assert log.cmd("create", "third", {}, False)["error"] == "quota_exceeded"
    assert log.generation(2)["ok"] and log.generation(3)["error"] == "quota_exceeded"


def test_queries_page_and_refuse_bad_arguments() -> None:
    log = started()
    log.steps(1, *[rec(s) for s in range(1, 101)])
    page = log.query("records", "j", "steps", 10, 25)
    assert [s["step"] for s in page["items"]] == list(range(11, 36))
    assert (page["next"], page["total"]) == (35, 100)
    assert log.query("records", "j", "steps", 0, 10**9)["next"] == 100  # limit capped, not refused
    assert log.query("job", "nope")["error"] == "no_such_job"
    assert log.query("records", "j", "nonsense", 0, 1)["error"] == "bad_argument"
    assert log.query("frobnicate")["error"] == "unknown_query"
    assert log.query("job")["error"] == "bad_query"
    assert log.sm.query("nope", "job", ("j",))["error"] == "unknown_extension"
    big = {"step": 101, "time": 1.0, "reports": [
        {"seq": s, "metrics": {f"m{i}": "v" * 1000 for i in range(64)}} for s in range(20)]}
    assert log.steps(1, big)["ok"]
    page = log.query("records", "j", "reports", 0, 2000)
    assert 0 < len(page["items"]) < 20, "a query answer is cut at its byte budget"
    assert len(msgpack.packb(page, use_bin_type=True)) < sl.MAX_QUERY_ANSWER_BYTES + 80_000


_arg = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True),
              st.text(max_size=5), st.binary(max_size=3)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(["step", "time", "seq", "metrics",
                                                             "rank", "node_id", "reports"]),
                                            inner, max_size=4)),
    max_leaves=8)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(sl.COMMANDS)), st.lists(_arg, max_size=9))
def test_malformed_commands_are_answered_never_raised(op, args) -> None:
    log = started()
    log.steps(1, rec(1, 0))
    args = ["j", *args[1:]] if args and isinstance(args[0], str) else args
    answer = log.apply(encode_command(op, log.session, 100, 1, 0, *args))
    assert answer["ok"] in (True, False)
    assert answer["ok"] or answer["error"] != "internal_error", answer
    restored = StateMachine()
    restored.restore(log.sm.snapshot())
    assert restored.snapshot() == log.sm.snapshot()


def _busy_log() -> Log:
    log = started()
    log.steps(1, rec(0, 0), rec(1, 1), rec(2), rec(3, 2, 3))
    log.steps(1, rec(2), rank=1)
    log.cmd("checkpoint", "j", 1, 2, "/ck/2", 5, "a" * 64, 4.0)
    log.cmd("failure", "j", {"generation": 1, "rank": 1, "kind": "died", "step": 3,
                             "time": 4.5, "recovery": "restart", "recovery_s": 1.25})
    log.generation(2, start_step=2, start_report=2, members=3)
    log.steps(1, rec(3))  # fenced
    log.steps(2, rec(3, 2), rec(4))
    log.cmd("create", "other", {"nested": {"a": [1, {"b": None}]}}, False)
    log.cmd("end", "other", "interrupted", "ctrl-c", 6.0)
    return log


def test_snapshot_restore_round_trip() -> None:
    log = _busy_log()
    data = log.sm.snapshot()
    restored = StateMachine()
    restored.restore(data)
    assert restored.snapshot() == data
    original, copy = log.sm.extensions["steplog"], restored.extensions["steplog"]
    assert isinstance(original, sl.StepLog) and isinstance(copy, sl.StepLog)
    assert copy.jobs == original.jobs
    for name in ("j", "other"):
        assert restored.query("steplog", "job", (name,)) == log.query("job", name)
    # A replica restored mid-log and fed the rest ends in the same state.
    replica = StateMachine()
    for i, entry in enumerate(log.entries[:7], start=1):
        replica.apply(i, entry)
    mid = StateMachine()
    mid.restore(replica.snapshot())
    for i, entry in enumerate(log.entries[7:], start=8):
        assert mid.apply(i, entry) == replica.apply(i, entry)
    assert mid.snapshot() == replica.snapshot() == data


def test_restore_empty_resets_the_extension() -> None:
    log = _busy_log()
    ext = log.sm.extensions["steplog"]
    log.sm.restore_empty(log.sm.applied_index)
    assert log.sm.extensions["steplog"] is not ext
    assert log.query("jobs")["jobs"] == []
    # restore() also starts from a fresh instance: a snapshot without jobs leaves none.
    log2 = _busy_log()
    log2.sm.restore(StateMachine().snapshot())
    assert log2.query("jobs")["total"] == 0


# ---------------------------------------------------------------------- over the wire
@pytest.mark.slow
def test_step_log_over_the_wire_survives_a_leader_kill(make_cluster, wait_for) -> None:
    cluster = make_cluster(3)
    leader = cluster.leader()
    members = [{"rank": 0, "node_id": "a"}, {"rank": 1, "node_id": "b"}]
    with cluster.client(timeout_s=30) as c:
        assert c.command("steplog.create", "wire", {"lr": 0.1}, False)["created"] is True
        assert c.command("steplog.generation", "wire", 1, members, None, 0, 0, "start", 1.0)["ok"]
        assert c.command("steplog.steps", "wire", 1, 0, [rec(1, 0), rec(2)]) == {
            "ok": True, "last_step": 2, "report_seq": 1}
        with pytest.raises(RequestRejected) as refused:
            c.command("steplog.steps", "wire", 1, 0, [rec(4)])
        assert refused.value.code == "gap" and refused.value.answer["last_step"] == 2
        with pytest.raises(RequestRejected, match="bad_request"):
            c.command("register", os.urandom(16))  # sessionless: not proposable by name
        with pytest.raises(RequestRejected, match="bad_request"):
            c.command("steplog.nonsense", 1)
        # One failure record sent twice with the same session sequence number, with the
        # leader killed in between: the retry is answered from the session, applied once.
        failure = {"generation": 1, "rank": 1, "kind": "died", "step": 2, "time": 3.0,
                   "recovery": "restart", "recovery_s": None}
        seq, _ = c._session.begin()
        body = {"op": "command", "name": "steplog.failure", "session": c._session.session,
                "seq": seq, "ack": seq, "args": ["wire", failure]}
        first = c._call(body, is_write=True, what="failure")
        assert first == {"ok": True, "index": 0}
        cluster.kill(leader)
        new_leader = cluster.leader(exclude=(leader,))
        assert c._call(body, is_write=True, what="failure") == first
        c._session.end(seq)
        assert c.command("steplog.steps", "wire", 1, 0, [rec(2), rec(3, 1)])["last_step"] == 3
        job = c.query("steplog", "job", "wire")["job"]
        assert (job["last_step"], job["report_seq"], job["failures"]) == (3, 2, 1)
        assert c.query("steplog", "records", "wire", "failures", 0, 10)["total"] == 1
        with pytest.raises(RequestRejected, match="no_such_job"):
            c.query("steplog", "job", "absent")
        with pytest.raises(RequestRejected, match="unknown_extension"):
            c.query("nope", "job", "wire")
        follower = next(i for i in cluster.node_ids if i not in (leader, new_leader))
    stale = wait_for(lambda: _stale_job_at(cluster, follower, "wire", 3),
                     "the follower to apply step 3")
    assert stale["stale"] is True and stale["node"] == follower
    cluster.restart(leader)  # it recovers the step log from its WAL and catches up
    wait_for(lambda: _stale_job_at(cluster, leader, "wire", 3), "the restarted node to catch up")

    async def through_async_client() -> None:
        async with AsyncClient(cluster.endpoints, token=cluster.token, timeout_s=30) as ac:
            answer = await ac.command("steplog.steps", "wire", 1, 0, [rec(4, 2)])
            assert answer == {"ok": True, "last_step": 4, "report_seq": 3}
            job = (await ac.query("steplog", "job", "wire"))["job"]
            assert job["last_step"] == 4
            with pytest.raises(RequestRejected, match="fenced"):
                await ac.command("steplog.steps", "wire", 0, 0, [rec(5)])
            page = await ac.query("steplog", "records", "wire", "steps", consistency="stale")
            assert page["stale"] is True and page["total"] >= 3

    asyncio.run(through_async_client())


def _stale_job_at(cluster, node_id: int, job: str, last_step: int) -> dict | None:
    """Node ``node_id``'s own (stale) answer about ``job`` once it has ``last_step``."""
    with cluster.client(timeout_s=5, endpoints=[cluster.endpoint(node_id)]) as c:
        try:
            answer = c.query("steplog", "job", job, consistency="stale")
        except RequestRejected:  # no_such_job: not applied that far yet
            return None
    return answer if answer["job"]["last_step"] == last_step else None
