"""Bad input: every kind of wrong remote input has a defined rule (dropped and counted,
refused with a clear error, or redirected) and never crashes the node or breaks an
invariant (Raft paper §5.1: stale terms are rejected, newer terms adopted). Ends with
Hypothesis fuzzing of ``step`` by random message sequences."""

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.raft import (
    Config,
    ConfState,
    Entry,
    EntryType,
    LocalProtocolError,
    MemoryStorage,
    Message,
    MessageType,
    ProposalDropped,
    RaftNode,
    Role,
    Snapshot,
    SnapshotMetadata,
)

MT = MessageType


def test_proposal_to_follower_is_refused_with_leader_hint(cluster):
    c = cluster(3)
    c.elect(2)
    with pytest.raises(ProposalDropped) as exc:
        c[1].propose(b"x")
    assert exc.value.leader_hint == 2 and "not the leader" in str(exc.value)


def test_proposal_with_no_leader_known():
    n = RaftNode(Config(id=1), MemoryStorage(ConfState(voters=(1, 2, 3))), random.Random(0))
    with pytest.raises(ProposalDropped) as exc:
        n.propose(b"x")
    assert exc.value.leader_hint == 0


@pytest.mark.parametrize("msg,reason", [
    (Message(MT.VOTE_RESP, 1, 9, 1), "unknown_sender"),
    (Message(MT.HEARTBEAT_RESP, 1, 9, 1), "unknown_sender"),
    (Message(MT.VOTE, 1, 9, 5, log_term=9, index=9), "vote_in_lease"),
    (Message(MT.APPEND_RESP, 1, 9, 1, index=1), "unknown_sender"),
    (Message(MT.HEARTBEAT, 7, 2, 1), "misaddressed"),
    (Message(MT.HEARTBEAT, 1, 1, 1), "bad_sender"),
    (Message(MT.HEARTBEAT, 1, 0, 1), "bad_sender"),
    (Message(MT.PROPOSE, 1, 2, 1), "local_only_type"),
    (Message(MT.HUP, 1, 2, 1), "local_only_type"),
    (Message(MT.HEARTBEAT, 1, 2, 0), "malformed_term"),
    (Message(MT.APPEND, 1, 2, 1, index=0, entries=(Entry(1, 2),)), "malformed_append"),
    (Message(MT.APPEND, 1, 2, 1, index=0, entries=(Entry(2, 1),)), "malformed_append"),
    (Message(MT.APPEND, 1, 2, 2, index=0, entries=(Entry(2, 1), Entry(1, 2))), "malformed_append"),
    (Message(MT.APPEND, 1, 2, 1, log_term=3, index=0), "malformed_append"),
    (Message(MT.SNAPSHOT, 1, 2, 1), "malformed_snapshot"),
    (Message(MT.SNAPSHOT, 1, 2, 1, snapshot=Snapshot(SnapshotMetadata(5, 4, ConfState((1,))), b"")),
     "malformed_snapshot"),
])
def test_bad_remote_input_is_dropped_and_counted(cluster, msg, reason):
    c = cluster(3)
    c.elect(1)
    before = (c[1].term, c[1].commit_index, c[1].role)
    c[1].step(msg)
    c[1].check_invariants()
    assert c[1].status().dropped.get(reason) == 1, c[1].status().dropped
    assert (c[1].term, c[1].commit_index, c[1].role) == before


def test_step_with_a_non_message_is_a_caller_error():
    n = RaftNode(Config(id=1), MemoryStorage(ConfState(voters=(1,))), random.Random(0))
    with pytest.raises(LocalProtocolError):
        n.step(b"raw bytes")  # type: ignore[arg-type]


def test_future_term_append_is_followed_stale_is_answered(cluster):
    c = cluster(3)
    c.elect(1)
    f = c[2]
    f.step(Message(MT.APPEND, 2, 3, 9, log_term=1, index=1, commit=1))
    assert (f.term, f.leader_id, f.role) == (9, 3, Role.FOLLOWER)
    f.step(Message(MT.APPEND, 2, 1, 1, log_term=1, index=1, commit=1))
    assert f.status().dropped == {} or "stale_term" not in f.status().dropped
    rd = f.ready()
    assert any(m.to == 1 and m.type is MT.APPEND_RESP and m.term == 9 for m in rd.messages)
    f.advance(rd)


def test_append_conflicting_with_committed_entries_is_dropped(cluster):
    c = cluster(3)
    c.elect(1)
    c[1].propose(b"x")
    c.stabilize()
    f = c[2]
    assert f.commit_index == 2
    # a (byzantine or corrupted) leader of a later term rewrites committed index 2: the rule
    # is "answer with our commit index", never truncate
    f.step(Message(MT.APPEND, 2, 3, 5, log_term=1, index=1, entries=(Entry(5, 2, data=b"evil"),)))
    assert f.log.term(2) == 1 and f.commit_index == 2
    rd = f.ready()
    assert [(m.type, m.index) for m in rd.messages] == [(MT.APPEND_RESP, 2)]
    f.advance(rd)


def test_messages_from_a_removed_node_are_ignored(cluster):
    c = cluster(3)
    c.elect(1)
    from coordinator.raft import ConfChange, ConfChangeType
    c[1].propose_conf_change(ConfChange(((ConfChangeType.REMOVE_VOTER, 3),)))
    c.stabilize()
    # a vote request is accepted from anyone (our config may be the stale one), but the
    # leader lease and PreVote keep a removed node from disrupting the cluster
    c[1].step(Message(MT.PRE_VOTE, 1, 3, c[1].term + 1, log_term=9, index=99))
    assert c[1].role is Role.LEADER and c[1].status().dropped["vote_in_lease"] == 1
    before = c[1].status().dropped.get("unknown_sender", 0)
    c[1].step(Message(MT.APPEND_RESP, 1, 3, c[1].term, index=1))
    assert c[1].status().dropped["unknown_sender"] == before + 1


# fuzzing step with random message sequences ------------------------------------------------

ids = st.integers(0, 4)
terms = st.integers(0, 6)
idx = st.integers(0, 8)


@st.composite
def entries(draw, start, term):
    n = draw(st.integers(0, 3))
    consistent = draw(st.booleans())
    out, t = [], 1
    for k in range(n):
        t = draw(st.integers(t, max(t, term))) if consistent else draw(terms)
        out.append(Entry(t, start + 1 + k if consistent else draw(idx),
                         draw(st.sampled_from(EntryType)), b"d"))
    return tuple(out)


@st.composite
def messages(draw):
    t = draw(terms)
    i = draw(idx)
    typ = draw(st.sampled_from(MT))
    snap = None
    if typ is MT.SNAPSHOT and draw(st.booleans()):
        snap = Snapshot(SnapshotMetadata(draw(idx), draw(terms), ConfState((1, 2, 3))), b"")
    return Message(typ, draw(st.sampled_from([1, 1, 1, 2])), draw(ids), t,
                   log_term=draw(terms), index=i, entries=draw(entries(i, t)),
                   commit=draw(idx), reject=draw(st.booleans()), reject_hint=draw(idx),
                   snapshot=snap, context=draw(st.sampled_from([b"", b"c"])))


actions = st.lists(st.one_of(messages(), st.sampled_from(["tick", "propose", "ready",
                                                           "campaign", "read"])),
                   min_size=1, max_size=60)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions, st.integers(0, 3))
def test_fuzz_step_keeps_invariants(acts, seed):
    st_ = MemoryStorage(ConfState(voters=(1, 2, 3)))
    n = RaftNode(Config(id=1, election_tick=3), st_, random.Random(seed))
    last_term, last_commit, votes = 0, 0, {}
    committed: dict[int, int] = {}
    for a in acts:
        if a == "tick":
            n.tick()
        elif a == "campaign":
            n.campaign()
        elif a == "propose":
            try:
                n.propose(b"p")
            except ProposalDropped:
                pass
        elif a == "read":
            try:
                n.read_index(b"r")
            except ProposalDropped:
                pass
        elif a == "ready":
            if n.has_ready():
                rd = n.ready()
                if rd.snapshot is not None:
                    st_.apply_snapshot(rd.snapshot)
                st_.append(rd.entries)
                if rd.hard_state:
                    st_.set_hard_state(rd.hard_state)
                n.advance(rd)
        else:
            n.step(a)
        n.check_invariants()
        assert n.term >= last_term and n.commit_index >= last_commit
        if n.vote:
            assert votes.setdefault(n.term, n.vote) == n.vote  # one vote per term
        # committed entries never change
        for i in range(max(n.log.first_index(), 1), n.commit_index + 1):
            t = n.log.term(i)
            assert committed.setdefault(i, t) == t
        last_term, last_commit = n.term, n.commit_index
