"""Membership changes (Raft paper §6, thesis §4): single-server changes, joint consensus,
learners, and the rules that keep them safe."""

import pytest

from coordinator.raft import (
    ConfChange,
    ConfChangeError,
    ConfChangeType,
    LocalProtocolError,
    MessageType,
    ProposalDropped,
    Role,
)
from coordinator.raft.confchange import Config, apply_change

V, R, L = ConfChangeType.ADD_VOTER, ConfChangeType.REMOVE_VOTER, ConfChangeType.ADD_LEARNER
fs = frozenset


def cc(*changes):
    return ConfChange(tuple(changes))


# the pure transition function ----------------------------------------------------------

def test_simple_change_alters_one_voter():
    assert apply_change(Config(fs({1, 2, 3})), cc((V, 4))).voters == {1, 2, 3, 4}
    assert apply_change(Config(fs({1, 2, 3})), cc((R, 3))).voters == {1, 2}
    out = apply_change(Config(fs({1, 2, 3})), cc((L, 4)))
    assert out.voters == {1, 2, 3} and out.learners == {4}


def test_enter_and_leave_joint_with_demotion():
    j = apply_change(Config(fs({1, 2, 3})), cc((V, 4), (L, 3)))
    assert j.voters == {1, 2, 4} and j.voters_outgoing == {1, 2, 3}
    assert j.learners_next == {3} and j.auto_leave
    out = apply_change(j, cc())
    assert out.voters == {1, 2, 4} and out.learners == {3} and not out.joint


@pytest.mark.parametrize("start,change", [
    (Config(fs({1})), cc((R, 1))),                      # no voter left
    (Config(fs({1, 2, 3})), cc()),                      # leave joint when not joint
    (Config(fs({1, 2}), fs({1, 2, 3})), cc((V, 4))),    # change while joint
    (Config(fs({1, 2, 3})), cc((V, 0))),                # bad id
])
def test_invalid_changes_are_rejected(start, change):
    with pytest.raises(ConfChangeError):
        apply_change(start, change)


# through the cluster ---------------------------------------------------------------------

def test_one_change_at_a_time_and_own_term_commit_first(cluster):
    c = cluster(3)
    c[1].campaign()
    # elected, but the no-op of its term is not committed yet: refused (the single-server
    # change bug: a leader must commit an entry of its own term first)
    while c[1].role is not Role.LEADER:
        c.process(1) or c.deliver()
        for i in (2, 3):
            c.process(i)
    with pytest.raises(ProposalDropped, match="not committed an entry of its term"):
        c[1].propose_conf_change(cc((V, 4)))
    c.stabilize()
    c[1].propose_conf_change(cc((L, 4)))
    with pytest.raises(ProposalDropped, match="not applied yet"):
        c[1].propose_conf_change(cc((V, 5)))
    c.stabilize()
    c[1].propose_conf_change(cc((V, 5)))  # accepted once the first one is applied


def test_invalid_proposal_is_a_caller_error(cluster):
    c = cluster(3)
    c.elect(1)
    with pytest.raises(LocalProtocolError):
        c[1].propose_conf_change(cc())  # not joint


def test_learner_replicates_but_does_not_vote_or_campaign(cluster):
    c = cluster(3)
    c.storage[4] = type(c.storage[1])(c.storage[1].initial_state()[1])
    c.start(4)
    c.elect(1)
    c[1].propose_conf_change(cc((L, 4)))
    c.stabilize()
    c[1].propose(b"x")
    c.stabilize()
    assert c[4].log.last_index() == c[1].log.last_index() and c[4].commit_index == 3
    c[4].campaign()
    assert c[4].role is Role.FOLLOWER
    # its acknowledgement does not count toward commit: drop 2 and 3's acks
    c.drop = lambda m: m.type is MessageType.APPEND_RESP and m.frm in (2, 3)
    c[1].propose(b"y")
    c.stabilize()
    assert c[1].commit_index == 3


def test_removed_leader_steps_down_and_rest_elects(cluster):
    c = cluster(3)
    c.elect(1)
    c[1].propose_conf_change(cc((R, 1)))
    # nothing may follow our own removal in the log (keeps the new voters electable)
    with pytest.raises(ProposalDropped, match="leaving"):
        c[1].propose(b"late")
    c.stabilize()
    assert c[1].role is Role.FOLLOWER and not c[1].promotable()
    assert c[2].log.last_index() == c[1].log.last_index()  # handed over a complete log
    c.tick(25, only=(2, 3))
    leaders = c.leaders()
    assert len(leaders) == 1 and leaders[0] in (2, 3)


def test_joint_config_needs_both_majorities(cluster):
    c = cluster(5, voters=(1, 2, 3))
    c.elect(1)
    c.drop = lambda m: m.to in (4, 5)
    c[1].propose_conf_change(cc((V, 4), (V, 5), (R, 3)))
    c.stabilize()
    cs = c[1].conf_state()
    assert cs.voters == (1, 2, 4, 5) and cs.voters_outgoing == (1, 2, 3)
    before = c[1].commit_index
    c[1].propose(b"x")
    c.stabilize()
    assert c[1].commit_index == before  # old majority (1,2,3) yes, new (1,2,4,5) no
    c.drop = lambda m: False
    c.tick(2)
    assert c[1].conf_state().voters_outgoing == ()  # left joint automatically
    assert c[1].commit_index == c[1].log.last_index()


def test_snapshot_carries_joint_configuration(cluster):
    c = cluster(5, voters=(1, 2, 3))
    c.elect(1)
    c.drop = lambda m: m.to in (4, 5) or m.frm in (4, 5)  # joint can't be left without them
    c[1].propose_conf_change(cc((V, 4), (V, 5), (R, 3)))
    c.stabilize()
    idx = c[1].log.applied
    st = c.storage[1]
    st.create_snapshot(idx, c[1].conf_state(), b"")
    st.compact(idx)
    assert st.snapshot().metadata.conf_state.voters_outgoing == (1, 2, 3)
    # a node restored from that snapshot is in the same joint configuration
    from coordinator.raft import Config as RaftConfig
    from coordinator.raft import MemoryStorage, RaftNode
    fresh = MemoryStorage()
    fresh.apply_snapshot(st.snapshot())
    import random
    n = RaftNode(RaftConfig(id=4), fresh, random.Random(0))
    assert n.conf_state() == c[1].conf_state()
