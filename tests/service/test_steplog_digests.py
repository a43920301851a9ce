"""Digests in the step log (coordinator/steplog.py): sets judged once complete, the rank
outside the majority named (none without a majority), the trusted step, superseding, the
checkpoint the digests vouch for kept from pruning, and snapshots (format 2, reading 1).
Pure state-machine transitions, fed as committed entries."""

from __future__ import annotations

import msgpack

from coordinator import steplog as sl
from coordinator.statemachine import StateMachine, encode_command


class Log:
    """Feeds step-log commands to a state machine as committed entries of one session."""

    def __init__(self) -> None:
        self.sm = StateMachine()
        self.seq = 0
        self.session = self.apply(encode_command("register", 0, 0, 0, 0))["session"]

    def apply(self, data: bytes) -> dict:
        answer = self.sm.apply(self.sm.applied_index + 1, data)
        assert answer is not None
        return answer

    def cmd(self, op: str, *args) -> dict:
        self.seq += 1
        return self.apply(encode_command(f"steplog.{op}", self.session, self.seq, 1, 0, *args))

    def query(self, name: str, *args) -> dict:
        return self.sm.query("steplog", name, args)

    def job(self) -> dict:
        return self.query("job", "j")["job"]

    def items(self, kind: str) -> list[dict]:
        return self.query("records", "j", kind, 0, 2000)["items"]

    def generation(self, g: int, start_step: int = 0, members: int = 2) -> dict:
        ms = [{"rank": r, "node_id": f"n{r}"} for r in range(members)]
        return self.cmd("generation", "j", g, ms, None, start_step, 0, "test", 1.0)

    def steps(self, g: int, *records, rank: int = 0) -> dict:
        return self.cmd("steps", "j", g, rank, list(records))


def rec(step: int, t: float = 2.0) -> dict:
    return {"step": step, "time": t}


def dig(step: int, value: str, t: float = 2.0) -> dict:
    return {"step": step, "time": t, "digest": value}


def three_ranks() -> Log:
    log = Log()
    assert log.cmd("create", "j", {}, False)["ok"]
    assert log.generation(1, members=3)["ok"]
    return log


def send(log: Log, step: int, digests: dict[int, str], g: int = 1) -> None:
    """Rank 0's step record, then every rank's digest of that step."""
    if step > log.job()["last_step"]:
        assert log.steps(g, rec(step))["ok"]
    for rank, value in digests.items():
        assert log.steps(g, dig(step, value), rank=rank)["ok"]


def digests(log: Log) -> dict:
    return log.job()["digests"]


def test_a_set_is_judged_only_when_every_member_sent_its_digest() -> None:
    log = three_ranks()
    send(log, 1, {0: "aa", 1: "aa"})
    assert digests(log) == {"trusted_step": None, "mismatch": None, "verdict_step": None, "sets": 1,
                            "pulled": {"checks": 0, "mismatches": 0, "dropped": 0, "recent": []}}
    send(log, 1, {2: "aa", 1: "aa"})  # rank 1 again: a retried batch changes nothing
    assert digests(log)["trusted_step"] == 1 and digests(log)["verdict_step"] == 1
    [entry] = log.items("digests")
    assert entry["verdict"] == "agree" and entry["ranks"] == {"0": "aa", "1": "aa", "2": "aa"}


def test_the_rank_outside_the_majority_is_named() -> None:
    log = three_ranks()
    send(log, 1, {0: "aa", 1: "aa", 2: "aa"})
    send(log, 2, {0: "bb", 1: "XX", 2: "bb"})
    mismatch = digests(log)["mismatch"]
    assert mismatch["step"] == 2 and mismatch["minority"] == [1] and mismatch["majority"] == "bb"
    assert mismatch["agreeing"] == 2 and mismatch["trusted_step"] == 1
    # later sets, agreeing or not, neither move the trusted step nor replace the first mismatch
    send(log, 3, {0: "cc", 1: "cc", 2: "cc"})
    send(log, 4, {0: "dd", 1: "dd", 2: "YY"})
    assert digests(log)["trusted_step"] == 1 and digests(log)["mismatch"]["step"] == 2


def test_without_a_majority_no_rank_is_named() -> None:
    log = Log()
    log.cmd("create", "j", {}, False)
    log.generation(1, members=2)
    assert log.steps(1, rec(1))["ok"]
    for rank, value in ((0, "aa"), (1, "bb")):
        assert log.steps(1, dig(1, value), rank=rank)["ok"]
    mismatch = digests(log)["mismatch"]
    assert mismatch["majority"] is None and mismatch["minority"] == [] and mismatch["world"] == 2


def test_a_rollback_supersedes_the_mismatch_and_the_sets_beyond_it() -> None:
    log = three_ranks()
    for step in range(1, 5):
        send(log, step, {0: f"s{step}", 1: f"s{step}" if step < 3 else "bad", 2: f"s{step}"})
    assert digests(log)["mismatch"]["step"] == 3 and digests(log)["trusted_step"] == 2
    assert log.generation(2, start_step=2, members=3)["ok"]
    assert digests(log)["mismatch"] is None and digests(log)["trusted_step"] == 2
    assert [e["step"] for e in log.items("digests") if e.get("superseded")] == [3, 4]
    send(log, 3, {0: "s3", 1: "s3", 2: "s3"}, g=2)
    assert digests(log)["trusted_step"] == 3 and digests(log)["mismatch"] is None


def test_a_peer_heal_beyond_a_mismatch_leaves_it_pending() -> None:
    log = three_ranks()
    send(log, 1, {0: "a", 1: "a", 2: "a"})
    send(log, 2, {0: "b", 1: "b", 2: "X"})
    assert log.generation(2, start_step=3, members=3)["ok"]  # a survivor's step 3: nothing superseded
    assert digests(log)["mismatch"]["step"] == 2 and digests(log)["trusted_step"] == 1


def test_the_trusted_checkpoint_is_never_pruned() -> None:
    """Checkpoints every step, digests of steps 1-2 agree, 3 disagrees: however many
    checkpoints follow, the one of step 2 stays live (the roll-back target), plus at most
    MAX_UNVERIFIED_CHECKPOINTS newer ones."""
    log = three_ranks()

    def checkpoint(step: int) -> list[str]:
        return log.cmd("checkpoint", "j", 1, step, f"/ck/{step}", 1, "f" * 64, 1.0, f"d{step}")["prune"]

    pruned: list[str] = []
    for step in range(1, 30):
        if step <= 3:
            send(log, step, {0: f"s{step}", 1: f"s{step}", 2: f"s{step}" if step < 3 else "bad"})
        else:
            assert log.steps(1, rec(step))["ok"]
        pruned += checkpoint(step)
    live = [c["step"] for c in log.job()["checkpoints"]]
    assert 2 in live and 1 not in live
    assert len(live) == 1 + sl.MAX_UNVERIFIED_CHECKPOINTS
    assert live[1:] == list(range(30 - sl.MAX_UNVERIFIED_CHECKPOINTS, 30))
    assert "/ck/2" not in pruned and "/ck/1" in pruned
    assert log.job()["checkpoints"][0]["digest"] == "d2"


def test_without_digests_two_checkpoints_stay_live() -> None:
    log = three_ranks()
    for step in range(1, 6):
        log.steps(1, rec(step))
        log.cmd("checkpoint", "j", 1, step, f"/ck/{step}", 1, "f" * 64, 1.0)
    assert [c["step"] for c in log.job()["checkpoints"]] == [4, 5]


def test_digests_from_a_rank_outside_the_generation_or_a_bad_digest_are_refused() -> None:
    log = three_ranks()
    log.steps(1, rec(1))
    assert log.steps(1, dig(1, "aa"), rank=7)["ok"]  # not a member: ignored
    assert log.items("digests") == []
    bad = log.steps(1, dig(1, ""), rank=1)
    assert bad["error"] == "bad_argument" and "digest" in bad["detail"]
    assert log.steps(1, dig(1, "x" * 129), rank=1)["error"] == "bad_argument"


def test_snapshot_keeps_digests_and_format_1_still_restores() -> None:
    log = three_ranks()
    send(log, 1, {0: "a", 1: "a", 2: "a"})
    send(log, 2, {0: "b", 1: "c", 2: "b"})
    restored = StateMachine()
    restored.restore(log.sm.snapshot())
    assert restored.snapshot() == log.sm.snapshot()
    assert restored.query("steplog", "job", ("j",)) == log.query("job", "j")
    # a format-1 snapshot (no digest fields) restores with the digests at their defaults
    old = three_ranks()
    state = old.sm.extensions["steplog"].snapshot_state()
    fields_1 = len(sl._JOB_FIELDS_FORMAT_1)
    v1 = {"format": 1, "jobs": [values[:fields_1] for values in state["jobs"]]}
    ext = sl.StepLog()
    ext.restore_state(msgpack.unpackb(msgpack.packb(v1, use_bin_type=True), raw=False))
    assert ext.jobs["j"].digests == [] and ext.jobs["j"].digest_trusted is None
    assert ext.jobs["j"].generation == 1
