"""Property tests of the quorum math against naive references (like etcd's
quorum/quick_test.go): commit index (Raft paper §5.3-§5.4: an entry is committed once a
majority stores it) and vote outcome (§5.2), for majority and joint configs (§6)."""

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.raft.quorum import (
    INFINITE_INDEX,
    VoteResult,
    joint_committed,
    joint_vote_result,
    majority_committed,
    majority_vote_result,
)

voter_sets = st.sets(st.integers(1, 9), max_size=7)
acks = st.dictionaries(st.integers(1, 9), st.integers(0, 50))


def naive_committed(voters, acked):
    """Largest index i such that a majority of voters acknowledged >= i (0 if none)."""
    if not voters:
        return INFINITE_INDEX
    best = 0
    for i in {0, *(acked.get(v, 0) for v in voters)}:
        if sum(1 for v in voters if acked.get(v, 0) >= i) >= len(voters) // 2 + 1:
            best = max(best, i)
    return best


def naive_vote(voters, votes):
    """Enumerate every way the missing voters could answer."""
    if not voters:
        return VoteResult.WON
    missing = [v for v in voters if v not in votes]
    outcomes = set()
    for fill in itertools.product([True, False], repeat=len(missing)):
        full = {**votes, **dict(zip(missing, fill, strict=True))}
        yes = sum(1 for v in voters if full[v])
        outcomes.add(yes > len(voters) // 2)
    if outcomes == {True}:
        return VoteResult.WON
    if outcomes == {False}:
        return VoteResult.LOST
    return VoteResult.PENDING


@settings(max_examples=200)
@given(voter_sets, acks)
def test_majority_committed_matches_naive(voters, acked):
    assert majority_committed(voters, lambda v: acked.get(v, 0)) == naive_committed(voters, acked)


@settings(max_examples=200)
@given(voter_sets, voter_sets, acks)
def test_joint_committed_is_min_of_halves_and_naive(inc, out, acked):
    got = joint_committed(inc, out, lambda v: acked.get(v, 0))
    assert got == min(naive_committed(inc, acked), naive_committed(out, acked))
    # the definition: every index <= got is acknowledged by a majority of EACH half
    if got != INFINITE_INDEX:
        for half in (inc, out):
            if half:
                assert sum(1 for v in half if acked.get(v, 0) >= got) > len(half) // 2


@settings(max_examples=200)
@given(voter_sets, acks, st.integers(0, 50))
def test_committed_is_monotone_in_acks(voters, acked, bump):
    """Raising any acknowledgement never lowers the committed index (PySyncObj #166)."""
    before = majority_committed(voters, lambda v: acked.get(v, 0))
    raised = {v: max(acked.get(v, 0), bump) for v in voters}
    assert majority_committed(voters, lambda v: raised.get(v, 0)) >= before


votes = st.dictionaries(st.integers(1, 9), st.booleans())


@settings(max_examples=200)
@given(voter_sets, votes)
def test_majority_vote_matches_naive(voters, vs):
    assert majority_vote_result(voters, vs) == naive_vote(voters, vs)


@settings(max_examples=200)
@given(voter_sets, voter_sets, votes)
def test_joint_vote_matches_naive(inc, out, vs):
    a, b = naive_vote(inc, vs), naive_vote(out, vs)
    want = (VoteResult.WON if a is b is VoteResult.WON else
            VoteResult.LOST if VoteResult.LOST in (a, b) else VoteResult.PENDING)
    assert joint_vote_result(inc, out, vs) == want


def test_examples():
    assert majority_committed([1, 2, 3], {1: 5, 2: 3, 3: 1}.get) == 3
    assert majority_committed([1, 2, 3, 4], {1: 5, 2: 3, 3: 1, 4: 0}.get) == 1
    assert majority_vote_result([1, 2, 3], {1: True}) is VoteResult.PENDING
    assert majority_vote_result([1, 2, 3], {1: True, 2: True}) is VoteResult.WON
    assert majority_vote_result([1, 2, 3], {1: False, 2: False}) is VoteResult.LOST
    assert majority_vote_result([1, 2, 3, 4], {1: True, 2: True, 3: False}) is VoteResult.PENDING
    assert joint_vote_result([1, 2, 3], [3, 4, 5], {1: True, 2: True, 3: True}) is VoteResult.PENDING
