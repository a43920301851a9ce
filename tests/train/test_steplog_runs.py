"""Rank 0's step records as *runs* (``{"run": first, "times": [...]}``) and the writer's batch
bounds: a run must leave the step log exactly as the records it stands for would, whatever
the batches and resends; a backlog goes in commits the log accepts."""

from __future__ import annotations

import types

from hypothesis import given, settings
from hypothesis import strategies as st

import coordinator.steplog  # noqa: F401 - registers the step log's commands
from coordinator.statemachine import StateMachine, encode_command
from synctrain.worker import step as ws


class Log:
    """Step-log commands applied to a state machine as committed entries of one session."""

    def __init__(self) -> None:
        self.sm = StateMachine()
        self.seq = 0
        self.session = self._apply(encode_command("register", 0, 0, 0, 0))["session"]

    def _apply(self, data: bytes) -> dict:
        answer = self.sm.apply(self.sm.applied_index + 1, data)
        assert answer is not None
        return answer

    def cmd(self, op: str, *args) -> dict:
        self.seq += 1
        return self._apply(encode_command(f"steplog.{op}", self.session, self.seq, 1, 0, *args))

    def items(self, kind: str) -> list[dict]:
        return self.sm.query("steplog", "records", ("j", kind, 0, 2000))["items"]


def started() -> Log:
    log = Log()
    assert log.cmd("create", "j", {}, False)["ok"]
    assert log.cmd("generation", "j", 1, [{"rank": 0, "node_id": "a"}], None, 0, 0, "start", 1.0)["ok"]
    return log


def step_records(n: int, reports_at: set[int], clocks: bool) -> list[dict]:
    out, seq = [], 0
    for step in range(1, n + 1):
        rec = {"step": step, "time": 1000.0 + step / 8, "reports": [], "ps_clock": step * 3 if clocks else None}
        if step in reports_at:
            rec["reports"] = [{"seq": seq, "metrics": {"loss": 1.0 / step}}]
            seq += 1
        out.append(rec)
    return out


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 60), reports_at=st.sets(st.integers(1, 60), max_size=8), clocks=st.booleans(),
       cuts=st.lists(st.integers(0, 60), max_size=4), overlap=st.integers(0, 6))
def test_runs_leave_the_log_as_the_records_they_stand_for(n, reports_at, clocks, cuts, overlap):
    """The same steps sent as plain records and as runs, in the same batches, each batch after
    the first resending the last ``overlap`` records of the one before (as a retried batch
    does): the same steps, reports and answers."""
    records = step_records(n, reports_at, clocks)
    bounds = sorted({0, n, *(c for c in cuts if c < n)})
    plain, compact = started(), started()
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        batch = records[max(0, lo - overlap):hi]
        a = plain.cmd("steps", "j", 1, 0, batch)
        b = compact.cmd("steps", "j", 1, 0, ws._runs(batch))
        assert a == b and a["ok"], (a, b)
    for kind in ("steps", "reports"):
        assert compact.items(kind) == plain.items(kind)
    assert compact.sm.snapshot() == plain.sm.snapshot()
    assert [s["step"] for s in compact.items("steps")] == list(range(1, n + 1))


def test_plain_steps_go_as_runs_and_everything_else_as_records():
    records = step_records(12, {5}, clocks=False)
    records[9]["digest"] = "ab" * 8
    out = ws._runs(records[:2] + records[3:])  # step 3 missing: a run never spans a hole
    assert out[0] == records[0] and out[1] == records[1]
    assert out[2] == records[3] and out[3] == records[4]  # step 4 alone, then 5 has a report
    assert out[4] == {"run": 6, "times": [r["time"] for r in records[5:9]]}
    assert out[5] == records[9]  # a digest
    assert out[6:] == records[10:12]  # two plain steps: fewer than RUN_MIN
    clocked = ws._runs(step_records(5, set(), clocks=True))
    assert clocked == [{"run": 1, "times": [1000.0 + s / 8 for s in range(1, 6)],
                        "ps_clocks": [3, 6, 9, 12, 15]}]


def test_a_run_that_jumps_a_gap_is_refused_unless_a_continue_generation_allows_it():
    log = started()
    assert log.cmd("steps", "j", 1, 0, [{"run": 1, "times": [1.0, 2.0]}])["last_step"] == 2
    gap = log.cmd("steps", "j", 1, 0, [{"run": 5, "times": [3.0, 4.0]}])
    assert gap["error"] == "gap" and gap["last_step"] == 2
    assert log.cmd("generation", "j", 2, [{"rank": 0, "node_id": "a"}], None, -1, -1, "continue", 5.0)["ok"]
    assert log.cmd("steps", "j", 2, 0, [{"run": 5, "times": [6.0, 7.0]}])["last_step"] == 6
    steps = log.items("steps")
    assert [(s["step"], s.get("lost", False)) for s in steps] == [
        (1, False), (2, False), (3, True), (4, True), (5, False), (6, False)]
    assert steps[2]["time"] == 6.0  # a placeholder takes the time of the step after it


def test_bad_runs_are_refused_and_change_nothing():
    log = started()
    for bad in ({"run": 1, "times": []}, {"run": 1, "times": [1.0, float("nan")]},
                {"run": 1, "times": [float("inf"), 2.0]}, {"run": 1, "times": [True]},
                {"run": 1, "times": ["1"]}, {"run": -1, "times": [1.0]},
                {"run": 1, "times": [1.0, 2.0], "ps_clocks": [1]},
                {"run": 1, "times": [1.0], "ps_clocks": ["x"]},
                {"run": 1, "times": [1.0], "extra": 1}):
        answer = log.cmd("steps", "j", 1, 0, [bad])
        assert answer["error"] == "bad_argument", (bad, answer)
    too_many = [{"run": 1, "times": [1.0] * 4000}, {"run": 4001, "times": [1.0] * 97}]
    answer = log.cmd("steps", "j", 1, 0, too_many)
    assert answer["error"] == "bad_argument" and "4096 steps" in answer["detail"]
    assert log.items("steps") == []
    assert log.sm.query("steplog", "job", ("j",))["job"]["last_step"] == 0


def test_a_fenced_run_is_recorded_with_its_first_step_and_last_time():
    log = started()
    assert log.cmd("generation", "j", 2, [{"rank": 0, "node_id": "a"}], None, 0, 0, "again", 2.0)["ok"]
    answer = log.cmd("steps", "j", 1, 0, [{"run": 7, "times": [3.0, 4.5]}])
    assert answer["error"] == "fenced"
    [fenced] = log.items("fenced")
    assert (fenced["step"], fenced["time"], fenced["generation"]) == (7, 4.5, 1)


class FakeStepLog:
    def __init__(self):
        self.calls = []

    def steps(self, generation, rank, records, refs=None):
        self.calls.append((records, refs))
        return {"ok": True}

    def close(self):
        pass


def test_a_backlog_goes_in_commits_the_log_accepts(tmp_path):
    """More than a commit may carry queued (the coordinator was away, K is large): several
    commits in order, each within the step log's bounds; the committed step follows."""
    cfg = ws.StepLogConfig(endpoints=("127.0.0.1:9",), token=b"t", job="j", job_dir=str(tmp_path),
                           max_uncommitted_steps=100_000)
    boundary = types.SimpleNamespace(cfg=cfg, rank=0, generation=1, committed_step=0, sync_digest_every=0)
    writer = ws._Writer(boundary)
    writer.steplog = fake = FakeStepLog()
    n = 2 * ws.MAX_BATCH_ITEMS + 123
    writer.queue.extend(("step", s, 1000.0 + s, None) for s in range(1, n + 1))
    writer.queue.append(("report", n, 0, {"loss": 1.0}))
    while writer.queue:
        with writer.cond:
            batch = writer._take_batch()
        assert len(batch) <= ws.MAX_BATCH_ITEMS
        assert writer._commit(batch, 1)
    assert len(fake.calls) == 3 and boundary.committed_step == n
    log = started()
    for records, _ in fake.calls:  # what was sent is what the state machine takes
        answer = log.cmd("steps", "j", 1, 0, records)
        assert answer["ok"], answer
    assert answer["last_step"] == n and answer["report_seq"] == 1
    assert [len(records) for records, _ in fake.calls][0] == 1  # one run of 4,000 steps
