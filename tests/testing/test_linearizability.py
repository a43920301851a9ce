"""The linearizability checker against histories whose answer is known.

Hand-written cases first (each says why it is or is not linearizable), then a Hypothesis
property: a history produced by a real sequential register, with every operation's call and
return stretched around its true instant, must always be accepted. Last, the search bound.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.testing.history import HistoryRecorder, Operation, OpKind
from coordinator.testing.linearizability import (
    CheckResult,
    MultiKeyModel,
    RegisterModel,
    check_history,
    check_multikey,
)

R, W, C = OpKind.READ, OpKind.WRITE, OpKind.CAS
_ids = itertools.count()


def op(client, kind, inp, out, call, ret, key="x", unknown=False) -> Operation:
    return Operation(next(_ids), client, key, kind, inp, out, call, ret, unknown)


def result(ops) -> CheckResult:
    return check_history(ops).result


# ---------------------------------------------------------------- linearizable histories


def test_empty_history_is_ok():
    assert result([]) is CheckResult.OK


def test_sequential_write_then_read():
    assert result([op(1, W, 1, None, 0, 10), op(2, R, None, 1, 20, 30)]) is CheckResult.OK


def test_read_of_initial_value():
    assert result([op(1, R, None, None, 0, 5)]) is CheckResult.OK


def test_read_concurrent_with_write_may_see_either_value():
    write = op(1, W, 1, None, 0, 100)
    assert result([write, op(2, R, None, None, 10, 20)]) is CheckResult.OK
    assert result([write, op(2, R, None, 1, 10, 20)]) is CheckResult.OK


def test_concurrent_writes_then_reads_fix_one_order():
    # Both writes overlap; later reads see 2 then... 2 again: order w1, w2.
    ops = [
        op(1, W, 1, None, 0, 50),
        op(2, W, 2, None, 10, 60),
        op(3, R, None, 2, 70, 80),
        op(3, R, None, 2, 90, 95),
    ]
    assert result(ops) is CheckResult.OK


def test_cas_success_and_failure():
    ops = [
        op(1, W, 0, None, 0, 10),
        op(2, C, (0, 5), True, 20, 30),
        op(3, C, (0, 9), False, 40, 50),
        op(1, R, None, 5, 60, 70),
    ]
    assert result(ops) is CheckResult.OK


def test_concurrent_cas_exactly_one_wins():
    ops = [
        op(1, W, 0, None, 0, 10),
        op(2, C, (0, 1), True, 20, 50),
        op(3, C, (0, 2), False, 25, 55),
        op(1, R, None, 1, 60, 70),
    ]
    assert result(ops) is CheckResult.OK


def test_touching_operations_count_as_concurrent():
    # The read is called at the instant the write returns: either order is allowed.
    assert result([op(1, W, 1, None, 0, 10), op(2, R, None, None, 10, 20)]) is CheckResult.OK


# ------------------------------------------------------------ non-linearizable histories


def test_stale_read_after_write_returned_is_illegal():
    ops = [op(1, W, 1, None, 0, 10), op(1, W, 2, None, 20, 30), op(2, R, None, 1, 40, 50)]
    report = check_history(ops)
    assert report.result is CheckResult.ILLEGAL
    # The explanation names the key, the rejected read and the value the register held.
    assert "key 'x'" in report.explanation
    assert "read(x) -> 1" in report.explanation
    assert "holds 2" in report.explanation


def test_read_of_never_written_value_is_illegal():
    report = check_history([op(1, R, None, 7, 0, 10)])
    assert report.result is CheckResult.ILLEGAL
    assert "Not even a first operation" in report.explanation


def test_reads_going_back_in_time_are_illegal():
    # One write of 1 overlaps two sequential reads; seeing 1 then the initial None is impossible.
    ops = [op(1, W, 1, None, 0, 100), op(2, R, None, 1, 10, 20), op(2, R, None, None, 30, 40)]
    assert result(ops) is CheckResult.ILLEGAL


def test_two_cas_both_succeeding_from_same_value_is_illegal():
    ops = [
        op(1, W, 0, None, 0, 10),
        op(2, C, (0, 1), True, 20, 50),
        op(3, C, (0, 2), True, 25, 55),
    ]
    assert result(ops) is CheckResult.ILLEGAL


def test_cas_reporting_failure_although_value_matched_is_illegal():
    ops = [op(1, W, 3, None, 0, 10), op(2, C, (3, 4), False, 20, 30)]
    report = check_history(ops)
    assert report.result is CheckResult.ILLEGAL
    assert "cas would return True" in report.explanation


def test_lost_write_is_illegal():
    # A write acknowledged before a later read began must be visible to it.
    ops = [op(1, W, 1, None, 0, 10), op(2, W, 2, None, 0, 10), op(3, R, None, None, 20, 30)]
    assert result(ops) is CheckResult.ILLEGAL


# ------------------------------------------------------------------- unknown outcomes


def test_unknown_write_that_took_effect():
    ops = [op(1, W, 1, None, 0, 10, unknown=True), op(2, R, None, 1, 50, 60)]
    assert result(ops) is CheckResult.OK


def test_unknown_write_that_never_took_effect():
    ops = [op(1, W, 1, None, 0, 10, unknown=True), op(2, R, None, None, 50, 60)]
    assert result(ops) is CheckResult.OK


def test_unknown_write_may_take_effect_long_after_the_client_gave_up():
    ops = [
        op(1, W, 1, None, 0, 10, unknown=True),
        op(2, R, None, None, 50, 60),
        op(2, R, None, 1, 70, 80),
    ]
    assert result(ops) is CheckResult.OK


def test_unknown_write_cannot_take_effect_before_its_call():
    ops = [op(2, R, None, 1, 0, 10), op(1, W, 1, None, 20, 30, unknown=True)]
    assert result(ops) is CheckResult.ILLEGAL


def test_unknown_write_takes_effect_at_most_once():
    # 1 -> 2 -> 1 again would need the unknown write of 1 to happen twice.
    ops = [
        op(1, W, 1, None, 0, 5, unknown=True),
        op(3, R, None, 1, 10, 20),
        op(2, W, 2, None, 30, 40),
        op(3, R, None, 1, 50, 60),
    ]
    assert result(ops) is CheckResult.ILLEGAL


def test_unknown_cas_follows_the_register():
    ops = [
        op(1, W, 0, None, 0, 10),
        op(2, C, (0, 5), None, 20, 30, unknown=True),
        op(3, R, None, 5, 40, 50),
    ]
    assert result(ops) is CheckResult.OK
    # An unknown cas that could not have matched cannot produce its new value.
    ops[0] = op(1, W, 9, None, 0, 10)
    assert result(ops) is CheckResult.ILLEGAL


def test_unknown_read_constrains_nothing():
    assert result([op(1, R, None, 42, 0, 10, unknown=True)]) is CheckResult.OK


# ------------------------------------------------------------------------ per key


def test_keys_are_checked_independently():
    ok_key = [op(1, W, 1, None, 0, 10, key="a"), op(2, R, None, 1, 20, 30, key="a")]
    bad_key = [op(1, W, 1, None, 0, 10, key="b"), op(2, R, None, 2, 20, 30, key="b")]
    report = check_history(ok_key + bad_key)
    assert report.result is CheckResult.ILLEGAL
    assert report.per_key["a"] is CheckResult.OK
    assert report.per_key["b"] is CheckResult.ILLEGAL
    assert "key 'b'" in report.explanation
    # A value read under another key is no excuse.
    cross = [op(1, W, 2, None, 0, 10, key="a"), op(2, R, None, 2, 20, 30, key="b")]
    assert result(cross) is CheckResult.ILLEGAL


def test_bad_input_is_rejected_clearly():
    with pytest.raises(ValueError, match="before its call"):
        check_history([op(1, R, None, None, 10, 5)])
    with pytest.raises(ValueError, match="no return time"):
        check_history([op(1, R, None, None, 10, None)])


# ----------------------------------------------------------------------- recorder


def test_recorder_round_trip_and_open_operations_become_unknown():
    rec = HistoryRecorder(max_ops=3)
    a = rec.invoke(1, "k", W, 5, now=0)
    b = rec.invoke(2, "k", R, None, now=1)
    c = rec.invoke(3, "k", W, 6, now=2)
    rec.complete(a, None, now=4)
    rec.give_up(b, now=9)
    ops = rec.operations()
    assert [o.unknown for o in ops] == [False, True, True]
    assert ops[0].ret == 4 and ops[1].ret == 9 and ops[2].op_id == c
    with pytest.raises(ValueError, match="not open"):
        rec.complete(a, None, now=10)
    with pytest.raises(RuntimeError, match="max_ops"):
        rec.invoke(4, "k", R, None, now=3)
    assert check_history(ops).result is CheckResult.OK


# ------------------------------------------------------------ generated histories


@st.composite
def sequential_histories(draw):
    """A real register run: op i takes effect at instant 10*i+5; its call and return are
    stretched around that instant by random amounts, so operations overlap at random.
    Some clients give up (unknown outcome); some of those operations never took effect."""
    n = draw(st.integers(min_value=0, max_value=14))
    keys = draw(st.sampled_from([("x",), ("x", "y")]))
    regs: dict[str, int | None] = {k: None for k in keys}
    ops = []
    for i in range(n):
        key = draw(st.sampled_from(keys))
        kind = draw(st.sampled_from([R, W, C]))
        instant = 10 * i + 5
        call = instant - draw(st.integers(min_value=0, max_value=40))
        ret = instant + draw(st.integers(min_value=0, max_value=40))
        unknown = draw(st.integers(min_value=0, max_value=5)) == 0
        happened = not unknown or draw(st.booleans())
        value = draw(st.integers(min_value=0, max_value=3))
        if kind is R:
            inp, out = None, regs[key]
        elif kind is W:
            inp, out = value, None
            if happened:
                regs[key] = value
        else:
            expected = draw(st.sampled_from([regs[key], value]))
            inp, out = (expected, value + 10), regs[key] == expected
            if happened and out:
                regs[key] = value + 10
        ops.append(
            Operation(i, i % 4, key, kind, inp, None if unknown else out, call, ret, unknown)
        )
    return ops


@settings(max_examples=300, deadline=None)
@given(sequential_histories())
def test_histories_from_a_sequential_register_are_linearizable(ops):
    report = check_history(ops)
    assert report.result is CheckResult.OK, report.explanation


def _brute_force_linearizable(ops: list[Operation]) -> bool:
    """Reference: try every order of every subset of the unknown operations (the rest never
    happened) that respects real time (a before b when a returned strictly before b's call)."""
    model = RegisterModel()
    unknown_ops = [o for o in ops if o.unknown and o.kind is not R]  # unknown reads: no-ops
    sure = [o for o in ops if not o.unknown]

    def ret(o: Operation) -> float:
        return float("inf") if o.unknown else o.ret

    for mask in range(1 << len(unknown_ops)):
        chosen = sure + [o for i, o in enumerate(unknown_ops) if mask >> i & 1]
        for order in itertools.permutations(chosen):
            if any(ret(b) < a.call for i, a in enumerate(order) for b in order[i + 1 :]):
                continue
            state, ok = model.init, True
            for o in order:
                ok, state = model.step(state, o)
                if not ok:
                    break
            if ok:
                return True
    return False


@st.composite
def random_small_histories(draw):
    """Random operations with random outputs: a mix of legal and illegal histories."""
    n = draw(st.integers(min_value=1, max_value=6))
    values = st.sampled_from([None, 0, 1, 2])
    ops, unknowns = [], 0
    for i in range(n):
        call = draw(st.integers(min_value=0, max_value=12))
        ret = call + draw(st.integers(min_value=0, max_value=8))
        kind = draw(st.sampled_from([R, W, C]))
        unknown = unknowns < 2 and draw(st.integers(min_value=0, max_value=4)) == 0
        unknowns += unknown
        if kind is R:
            inp, out = None, draw(values)
        elif kind is W:
            inp, out = draw(st.sampled_from([0, 1, 2])), None
        else:
            inp, out = (draw(values), draw(st.sampled_from([0, 1, 2]))), draw(st.booleans())
        ops.append(Operation(i, i, "x", kind, inp, None if unknown else out, call, ret, unknown))
    return ops


@settings(max_examples=400, deadline=None)
@given(random_small_histories())
def test_checker_agrees_with_brute_force_on_small_random_histories(ops):
    expected = CheckResult.OK if _brute_force_linearizable(ops) else CheckResult.ILLEGAL
    assert check_history(ops).result is expected


# ---------------------------------------------------------------------------- bound


def test_search_bound_answers_unknown_on_an_adversarial_history():
    # 40 fully concurrent writes of distinct values and one concurrent read of a value
    # nobody wrote: every subset of the writes is a reachable state, the read never fits,
    # so only the bound can stop the search.
    ops = [op(i, W, i, None, 0, 1000) for i in range(40)]
    ops.append(op(99, R, None, -1, 0, 1000))
    report = check_history(ops, max_states=20_000)
    assert report.result is CheckResult.UNKNOWN
    assert "20000 states" in report.explanation
    report = check_history(ops, max_states=10**9, time_limit_s=0.2)
    assert report.result is CheckResult.UNKNOWN
    assert "time limit" in report.explanation


def test_register_model_initial_value():
    assert check_history([op(1, R, None, 0, 0, 1)], model=RegisterModel(init=0)).ok


# ---------------------------------------------------------------- several keys at once
def _mk() -> MultiKeyModel:
    return MultiKeyModel(["a", "b", "c"])


def _txn_move(a_was, new_a, new_b):
    """if a == a_was then a := new_a, b := new_b else get a"""
    return ((("value", "a", a_was),), (("put", "a", new_a), ("put", "b", new_b)), (("get", "a"),))


def test_multikey_accepts_a_range_and_a_txn_that_fit_one_order():
    ops = [
        op(0, W, "1", None, 0, 1, key="a"),
        op(1, OpKind.TXN, _txn_move("1", "2", "x"), (True, ()), 2, 5, key="*"),
        op(2, OpKind.RANGE, ("a", "z"), (("a", "1"),), 3, 4, key="*"),  # concurrent: before it
        op(2, OpKind.RANGE, ("a", "z"), (("a", "2"), ("b", "x")), 6, 7, key="*"),
        op(0, OpKind.TXN, _txn_move("1", "3", "y"), (False, ("2",)), 8, 9, key="*"),
    ]
    assert check_multikey(ops, _mk()).result is CheckResult.OK


def test_multikey_rejects_a_range_that_sees_half_a_transaction():
    ops = [
        op(0, W, "1", None, 0, 1, key="a"),
        op(1, OpKind.TXN, _txn_move("1", "2", "x"), (True, ()), 2, 5, key="*"),
        op(2, OpKind.RANGE, ("a", "z"), (("a", "2"),), 3, 4, key="*"),  # a moved, b not yet
    ]
    report = check_multikey(ops, _mk())
    assert report.result is CheckResult.ILLEGAL and "range" in report.explanation


def test_multikey_rejects_a_stale_range_and_a_txn_that_ignored_its_compare():
    stale = [
        op(0, W, "1", None, 0, 1, key="a"),
        op(0, W, "2", None, 2, 3, key="a"),
        op(1, OpKind.RANGE, ("a", "b"), (("a", "1"),), 4, 5, key="*"),  # after the write of 2
    ]
    assert check_multikey(stale, _mk()).result is CheckResult.ILLEGAL
    wrong_branch = [
        op(0, W, "1", None, 0, 1, key="a"),
        op(1, OpKind.TXN, _txn_move("9", "2", "x"), (True, ()), 2, 3, key="*"),
    ]
    assert check_multikey(wrong_branch, _mk()).result is CheckResult.ILLEGAL
    # an unknown transaction may or may not have run: both readings are accepted
    maybe = [
        op(1, OpKind.TXN, ((("absent", "a"),), (("put", "a", "5"),), ()), None, 0, 1,
           key="*", unknown=True),
        op(2, R, None, "5", 2, 3, key="a"),
    ]
    assert check_multikey(maybe, _mk()).result is CheckResult.OK
    never = [maybe[0], op(2, R, None, None, 2, 3, key="a")]
    assert check_multikey(never, _mk()).result is CheckResult.OK
