"""Unit tests of the core against the Raft paper (Ongaro & Ousterhout 2014) and Ongaro's
thesis, section by section, in the manner of etcd-io/raft's raft_paper_test.go."""

import random

import pytest

from coordinator.raft import (
    TRANSFER_CONTEXT,
    Config,
    ConfState,
    Entry,
    HardState,
    LocalProtocolError,
    MemoryStorage,
    Message,
    MessageType,
    ProgressState,
    ProposalDropped,
    RaftNode,
    Role,
)

MT = MessageType


def node(i=1, voters=(1, 2, 3), log=(), hs=None, seed=0, **cfg):
    st = MemoryStorage(ConfState(voters=voters))
    if log:
        st.append([Entry(t, k) for k, t in enumerate(log, 1)])
    if hs:
        st.set_hard_state(hs)
    return RaftNode(Config(id=i, **cfg), st, random.Random(seed)), st


def drain(n, st=None):
    """Persist and collect everything the node wants to send."""
    out = []
    while n.has_ready():
        rd = n.ready()
        if st is not None:
            st.append(rd.entries)
            if rd.hard_state:
                st.set_hard_state(rd.hard_state)
        out += rd.messages
        n.advance(rd)
    return out


def make_leader(n, st):
    n.campaign()
    for m in drain(n, st):
        if m.type in (MT.PRE_VOTE, MT.VOTE):
            n.step(Message(MT.PRE_VOTE_RESP if m.type is MT.PRE_VOTE else MT.VOTE_RESP,
                           n.id, m.to, m.term))
    if n.role is not Role.LEADER:
        for m in drain(n, st):
            if m.type is MT.VOTE:
                n.step(Message(MT.VOTE_RESP, n.id, m.to, m.term))
    assert n.role is Role.LEADER
    drain(n, st)
    return n


# §5.1 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("role", ["follower", "candidate", "leader"])
def test_5_1_higher_term_makes_any_role_follower(role):
    n, st = node(pre_vote=False)
    if role == "candidate":
        n.campaign()
    elif role == "leader":
        make_leader(n, st)
    n.step(Message(MT.APPEND, 1, 2, 9, log_term=0, index=0))
    assert (n.role, n.term, n.leader_id) == (Role.FOLLOWER, 9, 2)
    assert n.vote == 0  # a new term clears the vote


def test_5_1_stale_term_is_ignored_and_counted():
    n, _ = node(hs=HardState(term=5))
    n.step(Message(MT.VOTE_RESP, 1, 2, 3))
    assert n.term == 5 and n.status().dropped["stale_term"] == 1


def test_5_1_stale_leader_is_told_the_newer_term():
    n, _ = node(hs=HardState(term=5))
    n.step(Message(MT.HEARTBEAT, 1, 2, 3))
    (m,) = n.ready().messages
    assert (m.type, m.term) == (MT.APPEND_RESP, 5)


# §5.2 ---------------------------------------------------------------------------------

def test_5_2_election_timeouts_are_randomized_in_range():
    seen = set()
    for seed in range(50):
        n, _ = node(seed=seed, pre_vote=False)
        ticks = 0
        while n.role is Role.FOLLOWER:
            n.tick()
            ticks += 1
        assert 10 <= ticks < 20
        seen.add(ticks)
    assert len(seen) >= 5  # genuinely spread out, so split votes resolve


def test_5_2_follower_votes_at_most_once_per_term():
    n, _ = node(pre_vote=False, check_quorum=False)
    n.step(Message(MT.VOTE, 1, 2, 1, log_term=0, index=0))
    n.step(Message(MT.VOTE, 1, 3, 1, log_term=0, index=0))
    n.step(Message(MT.VOTE, 1, 2, 1, log_term=0, index=0))  # a retry by the same candidate
    resp = [m for m in n.ready().messages if m.type is MT.VOTE_RESP]
    assert [(m.to, m.reject) for m in resp] == [(2, False), (3, True), (2, False)]


def test_5_2_candidate_loses_on_majority_rejection_and_follows_on_append():
    n, _ = node(pre_vote=False)
    n.campaign()
    n.step(Message(MT.VOTE_RESP, 1, 2, 1, reject=True))
    n.step(Message(MT.VOTE_RESP, 1, 3, 1, reject=True))
    assert n.role is Role.FOLLOWER and n.term == 1
    n.campaign()
    assert n.role is Role.CANDIDATE and n.term == 2
    n.step(Message(MT.APPEND, 1, 3, 2, log_term=0, index=0))
    assert n.role is Role.FOLLOWER and n.leader_id == 3


def test_5_2_leader_appends_empty_entry_of_its_term():
    n, st = node()
    make_leader(n, st)
    e = st.entries(1, 2)[0]
    assert (e.term, e.index, e.data) == (n.term, 1, b"")


# §5.3 ---------------------------------------------------------------------------------

def test_5_3_follower_rejects_mismatch_with_hint():
    n, _ = node(log=(1, 1, 2, 2, 2), hs=HardState(term=2))
    # leader at term 3 probing at index 7 (term 3): we only have 5 entries
    n.step(Message(MT.APPEND, 1, 2, 3, log_term=3, index=7))
    rd = n.ready()
    (m,) = rd.messages
    assert m.reject and m.reject_hint == 5 and m.log_term == 2
    n.advance(rd)


def test_5_3_conflicting_suffix_is_replaced():
    n, st = node(log=(1, 1, 2, 2), hs=HardState(term=3))
    n.step(Message(MT.APPEND, 1, 2, 3, log_term=1, index=2,
                   entries=(Entry(3, 3, data=b"x"), Entry(3, 4, data=b"y")), commit=0))
    assert [n.log.term(i) for i in range(1, 5)] == [1, 1, 3, 3]


def test_5_3_fast_backoff_repairs_long_divergence_in_few_round_trips(cluster):
    c = cluster(3)
    c.elect(1)
    c.drop = lambda m: m.to == 3 or m.frm == 3
    for k in range(40):
        c[1].propose(b"a%d" % k)
        c.stabilize()
    # 3 is far behind; count APPEND rejections needed to find the match point
    rejections = []
    c.drop = lambda m: (m.type is MT.APPEND_RESP and m.reject and rejections.append(m)) and False
    c.tick(2)
    assert c[3].log.last_index() == c[1].log.last_index()
    assert len(rejections) <= 2


def test_5_3_batching_respects_max_size_per_msg(cluster):
    c = cluster(3, max_size_per_msg=100)
    c.elect(1)
    sizes = []
    c.drop = lambda m: m.type is MT.APPEND and sizes.append(len(m.entries)) and False
    c[1].propose_batch([b"x" * 40] * 10)
    c.stabilize()
    assert c[2].commit_index == 11
    assert max(sizes) == 2  # 2 x 40 bytes fit in 100, 3 do not


def test_5_3_pipelining_is_bounded_by_max_inflight():
    n, st = node(max_inflight_msgs=4, max_size_per_msg=1)
    make_leader(n, st)
    n.step(Message(MT.APPEND_RESP, 1, 2, n.term, index=1))  # 2 -> replicate
    drain(n, st)
    assert n.status().progress[2].state == "replicate"
    n.propose_batch([b"ab"] * 20)
    sent = [m for m in drain(n, st) if m.to == 2 and m.type is MT.APPEND]
    assert len(sent) == 4 and all(len(m.entries) == 1 for m in sent)
    # an acknowledgement frees window slots and the leader sends more right away
    n.step(Message(MT.APPEND_RESP, 1, 2, n.term, index=sent[1].entries[-1].index))
    more = [m for m in drain(n, st) if m.to == 2 and m.type is MT.APPEND]
    assert len(more) == 2


def test_5_3_probe_state_sends_one_append_until_answered():
    n, st = node()
    make_leader(n, st)
    # make_leader sent the probe (the no-op); 3 has not answered yet
    n.propose(b"a")
    n.propose(b"b")
    assert [m for m in drain(n, st) if m.to == 3] == []
    assert n.trk.progress[3].state is ProgressState.PROBE
    n.step(Message(MT.HEARTBEAT_RESP, 1, 3, n.term))  # alive: probe again, once
    msgs = [m for m in drain(n, st) if m.to == 3]
    assert len(msgs) == 1 and msgs[0].type is MT.APPEND


# §5.4 ---------------------------------------------------------------------------------

def test_5_4_1_vote_denied_to_candidate_with_stale_log():
    n, _ = node(log=(1, 2), hs=HardState(term=2), pre_vote=False)
    n.step(Message(MT.VOTE, 1, 2, 3, log_term=1, index=5))  # longer but older last term
    n.step(Message(MT.VOTE, 1, 3, 3, log_term=2, index=1))  # same term, shorter
    resp = n.ready().messages
    assert all(m.reject for m in resp)


# Thesis §6.2 CheckQuorum and leader lease; §9.6 PreVote ---------------------------------

def test_checkquorum_leader_steps_down_without_majority_contact():
    n, st = node()
    make_leader(n, st)
    for _ in range(20):
        n.tick()
    assert n.role is Role.FOLLOWER and n.status().dropped["check_quorum_step_down"] == 1


def test_lease_ignores_disruptive_vote_but_transfer_bypasses_it():
    n, _ = node()
    n.step(Message(MT.HEARTBEAT, 1, 2, 1))
    n.step(Message(MT.VOTE, 1, 3, 2, log_term=0, index=0))
    assert n.term == 1 and n.status().dropped["vote_in_lease"] == 1
    n.step(Message(MT.VOTE, 1, 3, 2, log_term=0, index=0, context=TRANSFER_CONTEXT))
    assert n.term == 2 and n.vote == 3


def test_prevote_does_not_change_terms():
    n, _ = node(hs=HardState(term=4))
    n.campaign()
    assert n.role is Role.PRE_CANDIDATE and n.term == 4 and n.vote == 0
    (m, _m2) = [m for m in n.ready().messages]
    assert m.type is MT.PRE_VOTE and m.term == 5
    voter, _ = node(i=2, hs=HardState(term=4))
    voter.step(Message(MT.PRE_VOTE, 2, 1, 5, log_term=0, index=0))
    assert voter.term == 4 and voter.vote == 0  # the granting voter did not move either
    (resp,) = voter.ready().messages
    assert (resp.type, resp.reject, resp.term) == (MT.PRE_VOTE_RESP, False, 5)


# ReadIndex (thesis §6.4) --------------------------------------------------------------

def test_read_index_single_node_answers_at_once_after_own_term_commit():
    n, st = node(voters=(1,))
    n.campaign()
    n.read_index(b"r")  # the no-op of its term is not committed yet: deferred
    rd = n.ready()
    assert rd.read_states == []
    st.append(rd.entries)
    n.advance(rd)
    rd = n.ready()
    assert [(r.index, r.context) for r in rd.read_states] == [(1, b"r")]


def test_read_index_without_leader_is_refused():
    n, _ = node()
    with pytest.raises(ProposalDropped) as exc:
        n.read_index(b"r")
    assert exc.value.leader_hint == 0


def test_read_index_queue_is_bounded():
    n, st = node(max_pending_read_index=2)
    make_leader(n, st)
    n.step(Message(MT.APPEND_RESP, 1, 2, n.term, index=1))
    drain(n, st)
    n.read_index(b"a")
    n.read_index(b"b")
    with pytest.raises(ProposalDropped):
        n.read_index(b"c")


# Leadership transfer (thesis §3.10) -----------------------------------------------------

def test_transfer_to_learner_or_unknown_is_a_caller_error():
    n, st = node(voters=(1, 2, 3))
    make_leader(n, st)
    with pytest.raises(LocalProtocolError):
        n.transfer_leadership(9)


def test_transfer_aborts_after_an_election_timeout():
    n, st = node()
    make_leader(n, st)
    n.transfer_leadership(2)  # 2 never answers
    with pytest.raises(ProposalDropped):
        n.propose(b"x")
    for _ in range(10):
        n.step(Message(MT.HEARTBEAT_RESP, 1, 3, n.term))
        n.tick()
    assert n.role is Role.LEADER and n.lead_transferee == 0
    n.propose(b"x")


def test_uncommitted_size_limit_drops_proposals():
    n, st = node(max_uncommitted_entries_size=100)
    make_leader(n, st)
    n.propose(b"x" * 60)
    with pytest.raises(ProposalDropped):
        n.propose(b"y" * 60)


# Flow-control recovery (etcd's lessons) ---------------------------------------------------

def test_replication_recovers_when_every_inflight_append_was_lost(cluster):
    c = cluster(3, max_inflight_msgs=2, max_size_per_msg=1)
    c.elect(1)
    c.drop = lambda m: m.type is MT.APPEND and m.to == 3  # 3 loses every APPEND for a while
    for k in range(6):
        c[1].propose(b"%d" % k)
        c.stabilize()
    assert c[1].trk.progress[3].inflights.full()
    c.drop = lambda m: False
    c.tick(3)  # heartbeat responses free a window slot; the gap is detected and repaired
    assert c[3].log.last_index() == c[1].log.last_index()


def test_lost_snapshot_without_report_is_retried(cluster):
    c = cluster(3)
    c.elect(1)
    c.drop = lambda m: m.to == 3 or m.frm == 3
    for k in range(5):
        c[1].propose(b"%d" % k)
        c.stabilize()
    st = c.storage[1]
    st.create_snapshot(c[1].log.applied, c[1].conf_state(), b"")
    st.compact(c[1].log.applied)
    snaps = []
    c.drop = lambda m: m.type is MT.SNAPSHOT and (snaps.append(m) or len(snaps) == 1)
    c.tick(30)  # the first snapshot is lost and never reported
    assert len(snaps) >= 2 and c[1].status().dropped["snapshot_presumed_lost"] == 1
    assert c[3].commit_index == c[1].commit_index


def test_a_rejected_higher_term_vote_does_not_reset_the_election_timer():
    """§5.2 / Figure 2: a follower restarts its election timer only on leader traffic or when it
    *grants* a vote. Adopting the term of a vote it rejects (the candidate's log is behind) must
    keep the timer running, or a fast-ticking node with a stale log starves elections
    (found by the simulator, seed 175 with PreVote off and clock skew)."""
    n, _ = node(1, log=(1, 1), pre_vote=False, check_quorum=False)
    for _ in range(5):
        n.tick()
    assert n.election_elapsed == 5
    n.step(Message(MT.VOTE, 1, 2, term=5, log_term=1, index=1))  # behind us: rejected
    assert n.term == 5 and n.vote == 0
    assert n.election_elapsed == 5
    n.step(Message(MT.VOTE, 1, 3, term=6, log_term=1, index=2))  # up to date: granted
    assert n.vote == 3 and n.election_elapsed == 0


# A leader's lost connection (an addition to etcd's API) ---------------------------------------
def test_followers_told_their_leader_disconnected_elect_one_in_a_tick_without_a_split(cluster):
    """The leader's process dies (its sockets close): both followers hear of it and the first
    in id order campaigns at its next tick, the other two ticks later -- by then it granted
    the first one's votes, its lease gone too. Without the report, nobody moves for a whole
    election timeout (40-80 ticks here)."""
    c = cluster(3, election_tick=40)
    c.elect(1)
    c.tick(3)
    c.crash(1)
    c.tick(5)
    assert c.leaders() == [], "no timeout fires this early on its own"
    for i in (2, 3):
        c[i].report_disconnected(1)
        assert c[i].leader_id == 0 and c[i].status().dropped["leader_disconnected"] == 1
    c.tick(1)
    assert c.leaders() == [2] and c[2].term == 2 and c[3].leader_id == 2
    assert c[3].role is Role.FOLLOWER and c[3].status().dropped.get("vote_in_lease", 0) == 0


def test_a_disconnect_report_about_a_live_leader_disrupts_nothing(cluster):
    """Only follower 2's link to leader 1 dropped; 3 still hears the leader: 2's PreVote is
    refused under 3's lease, no term moves, and the next heartbeat makes 2 follow 1 again.
    A report about a peer that is not the leader, or made to a leader, changes nothing."""
    c = cluster(3, election_tick=40)
    c.elect(1)
    c[3].report_disconnected(2)
    c[1].report_disconnected(2)
    assert c[3].leader_id == 1 and c[1].role is Role.LEADER
    c[2].report_disconnected(1)
    c.tick(1, only=(2,))
    assert c[2].role is Role.PRE_CANDIDATE and c[3].status().dropped["vote_in_lease"] >= 1
    c.tick(1, only=(1,))  # the leader's heartbeat
    assert c.leaders() == [1] and c[1].term == c[2].term == c[3].term == 1
    assert c[2].role is Role.FOLLOWER and c[2].leader_id == 1
