"""Quorum math: commit index and vote outcome for majority and joint configurations.

Theory of operation
-------------------
A *majority config* is a set of voter ids; a quorum is any ``len//2 + 1`` of them. Its
committed index is the largest index acknowledged by a quorum: sort the acknowledged
indexes descending and take the one at position ``len//2``. A *joint config* (Raft §6,
joint consensus) is a pair (incoming, outgoing); a decision needs a quorum of each, so its
committed index is the min of the two and its vote result is "won" only if both are won.
An empty majority config agrees to everything (so a non-joint config is a joint config whose
outgoing half is empty). These functions are pure; ``tests/raft/test_quorum_props.py``
checks them against a brute-force reference.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping

__all__ = ["VoteResult", "majority_committed", "joint_committed", "majority_vote_result",
           "joint_vote_result", "INFINITE_INDEX"]

#: The committed index of an empty config: it never constrains the min of a joint config.
INFINITE_INDEX = (1 << 63) - 1


class VoteResult(enum.Enum):
    PENDING = "pending"
    LOST = "lost"
    WON = "won"


def majority_committed(voters: Iterable[int], acked: Callable[[int], int]) -> int:
    """Largest index that a majority of ``voters`` has acknowledged (``acked(id)``; 0 = none)."""
    idx = sorted((acked(v) for v in voters), reverse=True)
    if not idx:
        return INFINITE_INDEX
    return idx[len(idx) // 2]


def joint_committed(incoming: Iterable[int], outgoing: Iterable[int],
                    acked: Callable[[int], int]) -> int:
    return min(majority_committed(incoming, acked), majority_committed(outgoing, acked))


def majority_vote_result(voters: Iterable[int], votes: Mapping[int, bool]) -> VoteResult:
    """WON once a majority said yes, LOST once a majority can no longer say yes."""
    voters = list(voters)
    if not voters:
        return VoteResult.WON
    yes = no = 0
    for v in voters:
        got = votes.get(v)
        if got is True:
            yes += 1
        elif got is False:
            no += 1
    q = len(voters) // 2 + 1
    if yes >= q:
        return VoteResult.WON
    if len(voters) - no < q:
        return VoteResult.LOST
    return VoteResult.PENDING


def joint_vote_result(incoming: Iterable[int], outgoing: Iterable[int],
                      votes: Mapping[int, bool]) -> VoteResult:
    r1 = majority_vote_result(incoming, votes)
    r2 = majority_vote_result(outgoing, votes)
    if r1 is r2:
        return r1
    if VoteResult.LOST in (r1, r2):
        return VoteResult.LOST
    return VoteResult.PENDING
