"""``Config.commit_broadcast``: whether a leader announces a new commit index at once in
empty APPENDs (etcd's behaviour, the core's default) or lets it ride on the next APPEND or
heartbeat (the server's default: one message and one answer less per follower per write)."""

from __future__ import annotations

import random

import pytest

from coordinator.raft import Config, ConfState, MemoryStorage, Message, MessageType, RaftNode, Role

MT = MessageType


def leader_with_one_entry(commit_broadcast: bool) -> tuple[RaftNode, MemoryStorage]:
    st = MemoryStorage(ConfState(voters=(1, 2, 3)))
    n = RaftNode(Config(id=1, commit_broadcast=commit_broadcast), st, random.Random(0))
    n.campaign()
    _drain(n, st)
    n.step(Message(MT.PRE_VOTE_RESP, 1, 2, n.term + 1))
    _drain(n, st)
    n.step(Message(MT.VOTE_RESP, 1, 2, n.term))
    assert n.role is Role.LEADER
    _drain(n, st)  # the empty entry of the new term goes out to 2 and 3
    n.step(Message(MT.APPEND_RESP, 1, 2, n.term, index=1))  # node 2 holds it: committed
    n.step(Message(MT.APPEND_RESP, 1, 3, n.term, index=1))
    _drain(n, st)
    n.propose(b"x")  # index 2, sent to both followers
    sent = _drain(n, st)
    assert sorted((m.to, m.index, len(m.entries)) for m in sent if m.type is MT.APPEND) == \
        [(2, 1, 1), (3, 1, 1)]
    return n, st


def _drain(n: RaftNode, st: MemoryStorage) -> list[Message]:
    out: list[Message] = []
    while n.has_ready():
        rd = n.ready()
        st.append(rd.entries)
        if rd.hard_state is not None:
            st.set_hard_state(rd.hard_state)
        out += rd.messages
        n.advance(rd)
    return out


@pytest.mark.parametrize("commit_broadcast", [True, False])
def test_a_new_commit_index_is_broadcast_only_when_asked(commit_broadcast: bool) -> None:
    n, st = leader_with_one_entry(commit_broadcast)
    n.step(Message(MT.APPEND_RESP, 1, 2, n.term, index=2))  # a quorum (1, 2) holds index 2
    sent = _drain(n, st)
    assert n.commit_index == 2
    notices = [(m.to, m.commit) for m in sent if m.type is MT.APPEND and not m.entries]
    if commit_broadcast:
        assert sorted(notices) == [(2, 2), (3, 2)]
    else:
        assert notices == []


def test_without_broadcast_the_commit_index_rides_on_the_next_heartbeat() -> None:
    n, st = leader_with_one_entry(commit_broadcast=False)
    n.step(Message(MT.APPEND_RESP, 1, 2, n.term, index=2))
    _drain(n, st)
    for _ in range(n.cfg.heartbeat_tick):
        n.tick()
    beats = {m.to: m.commit for m in _drain(n, st) if m.type is MT.HEARTBEAT}
    # node 2 holds index 2: it learns the commit; node 3 has not acknowledged it yet, so its
    # heartbeat carries only what it holds (never a commit beyond its own log)
    assert beats == {2: 2, 3: 1}


def test_without_broadcast_the_commit_index_rides_on_the_next_append() -> None:
    n, st = leader_with_one_entry(commit_broadcast=False)
    n.step(Message(MT.APPEND_RESP, 1, 2, n.term, index=2))
    n.step(Message(MT.APPEND_RESP, 1, 3, n.term, index=2))
    _drain(n, st)
    n.propose(b"y")
    appends = [m for m in _drain(n, st) if m.type is MT.APPEND]
    assert sorted((m.to, m.commit, len(m.entries)) for m in appends) == [(2, 2, 1), (3, 2, 1)]


@pytest.mark.parametrize("commit_broadcast", [True, False])
def test_followers_apply_everything_either_way(cluster, commit_broadcast: bool) -> None:
    c = cluster(3, commit_broadcast=commit_broadcast)
    leader = c.elect(1)
    for k in range(5):
        leader.propose(b"v%d" % k)
    c.stabilize()
    want = [b"v%d" % k for k in range(5)]
    assert c.applied[1] == want
    if not commit_broadcast:  # the followers hold the entries but learn the commit later
        assert c.applied[2] != want and c.applied[3] != want
        c.tick(leader.cfg.heartbeat_tick, only=(1,))
    assert c.applied[2] == want and c.applied[3] == want
