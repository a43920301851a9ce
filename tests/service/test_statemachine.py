"""The replicated key-value state machine: revisions, exactly-once sessions, snapshots."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.statemachine import StateMachine, encode_command


class Log:
    """Feeds commands to a state machine as consecutive committed entries."""

    def __init__(self, sm: StateMachine | None = None) -> None:
        self.sm = sm or StateMachine()
        self.entries: list[bytes] = []

    def apply(self, data: bytes) -> dict | None:
        self.entries.append(data)
        return self.sm.apply(self.sm.applied_index + 1, data)

    def register(self, ts_ms: int = 0) -> int:
        answer = self.apply(encode_command("register", 0, 0, 0, ts_ms))
        assert answer and answer["ok"]
        return answer["session"]


def test_put_get_delete_track_revisions() -> None:
    log = Log()
    sid = log.register()
    assert log.apply(encode_command("put", sid, 1, 1, 0, b"a", b"1")) == {"ok": True, "revision": 1}
    assert log.apply(encode_command("put", sid, 2, 1, 0, b"a", b"2"))["revision"] == 2
    assert log.apply(encode_command("put", sid, 3, 1, 0, b"b", b"x"))["revision"] == 3
    rec = log.sm.get(b"a")
    assert rec is not None
    assert (rec.value, rec.create_revision, rec.mod_revision, rec.version) == (b"2", 1, 2, 2)
    assert log.apply(encode_command("delete", sid, 4, 1, 0, b"a")) == {
        "ok": True, "deleted": True, "revision": 4}
    assert log.apply(encode_command("delete", sid, 5, 1, 0, b"a"))["deleted"] is False
    assert log.sm.revision == 4, "a delete of a missing key does not bump the revision"
    assert log.sm.read_answer(b"a")["value"] is None
    assert log.sm.read_answer(b"b")["value"] == b"x"


def test_cas_compares_and_swaps() -> None:
    log = Log()
    sid = log.register()
    assert log.apply(encode_command("cas", sid, 1, 1, 0, b"k", None, b"v1"))["succeeded"]
    assert not log.apply(encode_command("cas", sid, 2, 1, 0, b"k", None, b"v2"))["succeeded"]
    assert not log.apply(encode_command("cas", sid, 3, 1, 0, b"k", b"zz", b"v2"))["succeeded"]
    assert log.apply(encode_command("cas", sid, 4, 1, 0, b"k", b"v1", b"v2"))["succeeded"]
    assert log.sm.get(b"k").value == b"v2"
    assert log.apply(encode_command("cas", sid, 5, 1, 0, b"k", b"v2", None))["succeeded"]
    assert log.sm.get(b"k") is None


def test_retried_command_applies_once() -> None:
    log = Log()
    sid = log.register()
    first = log.apply(encode_command("put", sid, 1, 1, 0, b"a", b"1"))
    log.apply(encode_command("put", sid, 2, 1, 0, b"a", b"2"))
    # The client never saw the answer to seq 1 and retries it: same answer, no new revision.
    again = log.apply(encode_command("put", sid, 1, 1, 0, b"a", b"1"))
    assert again == first
    assert log.sm.get(b"a").value == b"2" and log.sm.revision == 2


def test_acknowledged_sequence_numbers_are_refused_not_reapplied() -> None:
    log = Log()
    sid = log.register()
    log.apply(encode_command("put", sid, 1, 1, 0, b"a", b"1"))
    log.apply(encode_command("put", sid, 2, 2, 0, b"a", b"2"))  # ack=2: answer 1 delivered
    late = log.apply(encode_command("put", sid, 1, 1, 0, b"a", b"1"))
    assert late["ok"] is False and late["error"] == "stale_sequence"
    assert log.sm.get(b"a").value == b"2"


def test_unknown_session_is_refused() -> None:
    log = Log()
    answer = log.apply(encode_command("put", 99, 1, 1, 0, b"a", b"1"))
    assert answer["error"] == "session_expired"
    assert log.sm.get(b"a") is None


def test_idle_sessions_expire_by_log_time() -> None:
    log = Log(StateMachine(session_ttl_ms=1000))
    old = log.register(ts_ms=0)
    young = log.register(ts_ms=900)
    assert log.apply(encode_command("put", young, 1, 1, 1500, b"a", b"1"))["ok"]
    answer = log.apply(encode_command("put", old, 1, 1, 1500, b"a", b"2"))
    assert answer["error"] == "session_expired"
    assert log.sm.get(b"a").value == b"1"


def test_session_table_is_bounded_lru() -> None:
    log = Log(StateMachine(max_sessions=2))
    a, b = log.register(), log.register()
    log.apply(encode_command("put", a, 1, 1, 0, b"k", b"1"))  # a is now the most recent
    c = log.register()  # evicts b
    assert set(log.sm.sessions) == {a, c}
    assert log.apply(encode_command("put", b, 1, 1, 0, b"k", b"2"))["error"] == "session_expired"


def test_answer_cache_is_bounded() -> None:
    log = Log(StateMachine(max_cached_answers=3))
    sid = log.register()
    for seq in range(1, 6):
        log.apply(encode_command("put", sid, seq, 1, 0, b"k", b"%d" % seq))
    assert len(log.sm.sessions[sid].answers) == 3
    assert log.apply(encode_command("put", sid, 1, 1, 0, b"k", b"1"))["error"] == "stale_sequence"
    assert log.sm.get(b"k").value == b"5"


def test_malformed_and_unknown_commands_are_answered_not_raised() -> None:
    log = Log()
    assert log.apply(b"\xc1garbage")["error"] == "bad_command"
    assert log.apply(encode_command("frobnicate", 0, 0, 0, 0))["error"] == "unknown_command"
    sid = log.register()
    assert log.apply(encode_command("put", sid, 1, 1, 0, "str-key", b"v"))["error"] == "bad_key"
    assert log.apply(encode_command("put", sid, 2, 1, 0, b"k"))["error"] == "bad_command"
    assert log.apply(b"") is None  # a leader's no-op


_ops = st.lists(
    st.tuples(
        st.sampled_from(["put", "delete", "cas", "register"]),
        st.integers(0, 3),  # session choice
        st.integers(1, 6),  # seq
        st.sampled_from([b"a", b"b", b"c"]),
        st.one_of(st.none(), st.sampled_from([b"1", b"2"])),
        st.integers(0, 5000),
    ),
    max_size=60,
)


def _command(sm: StateMachine, op, session_choice, seq, key, value, ts) -> bytes:
    sessions = list(sm.sessions) or [0]
    sid = sessions[session_choice % len(sessions)]
    if op == "register":
        return encode_command("register", 0, 0, 0, ts)
    if op == "put":
        return encode_command("put", sid, seq, 1, ts, key, value or b"0")
    if op == "delete":
        return encode_command("delete", sid, seq, 1, ts, key)
    return encode_command("cas", sid, seq, 1, ts, key, value, b"9")


@settings(max_examples=60, deadline=None)
@given(_ops, st.integers(0, 60))
def test_replicas_agree_and_snapshots_restore_mid_log(ops, cut) -> None:
    """Two replicas applying one log agree; a replica restored from a snapshot taken
    anywhere in the log, then fed the rest, ends in the same state."""
    leader = Log(StateMachine(session_ttl_ms=2000, max_sessions=3, max_cached_answers=4))
    for op in ops:
        leader.apply(_command(leader.sm, *op))
    replica = StateMachine(session_ttl_ms=2000, max_sessions=3, max_cached_answers=4)
    cut = min(cut, len(leader.entries))
    for i, data in enumerate(leader.entries[:cut], start=1):
        replica.apply(i, data)
    restored = StateMachine(session_ttl_ms=2000, max_sessions=3, max_cached_answers=4)
    restored.restore(replica.snapshot())
    for i, data in enumerate(leader.entries[cut:], start=cut + 1):
        assert restored.apply(i, data) == replica.apply(i, data)
    assert restored.snapshot() == replica.snapshot() == leader.sm.snapshot()
