"""Regression tests for bugs found in other Raft implementations.

* PySyncObj #166 -- the commit index moved backwards.
* PySyncObj #167 -- a follower's match index moved backwards on a stale response.
* PySyncObj #169 / #110 -- an entry of an older term was committed by counting replicas
  (Raft §5.4.2, Figure 8; see also testdata/figure8.txt).
* PySyncObj #202 -- a vote was sent before the new term/vote was durable.
* etcd #14370 -- a single-node cluster reported an entry committed before it was persisted,
  and lost an acknowledged write on crash.
* etcd's ``restore`` -- a snapshot whose ConfState leaves the receiver out is refused ("not in
  ConfState"), answered with the receiver's own position (issue 15, point 10).
"""

import random

from coordinator.raft import (
    Config,
    ConfState,
    Entry,
    HardState,
    MemoryStorage,
    Message,
    MessageType,
    RaftNode,
    Role,
    Snapshot,
    SnapshotMetadata,
)

MT = MessageType


def test_commit_never_moves_back_on_stale_or_duplicated_appends(cluster):
    """PySyncObj #166: a delayed APPEND/HEARTBEAT carrying an old commit never lowers ours."""
    c = cluster(3)
    c.elect(1)
    sent = []
    c.drop = lambda m: sent.append(m) or False  # record every delivered message
    for k in range(5):
        c[1].propose(b"v%d" % k)
        c.stabilize()
    f = c[2]
    assert f.commit_index == 6
    for m in [m for m in sent if m.to == 2 and m.type in (MT.APPEND, MT.HEARTBEAT)]:
        f.step(m)  # replay every old message, in order and reversed
        assert f.commit_index == 6
    for m in reversed([m for m in sent if m.to == 2]):
        if m.type in (MT.APPEND, MT.HEARTBEAT):
            f.step(m)
            assert f.commit_index == 6
            f.check_invariants()
    assert f.log.last_index() == 6  # nothing committed was truncated


def test_commit_never_moves_back_across_restart(cluster):
    c = cluster(3)
    c.elect(1)
    c[1].propose(b"x")
    c.stabilize()
    before = c[2].commit_index
    c.crash(2)
    n = c.start(2)
    assert n.commit_index == before  # commit is in the persisted HardState


def test_match_never_moves_back_on_stale_response(cluster):
    """PySyncObj #167: an old APPEND_RESP (or a stale rejection) must not lower match."""
    c = cluster(3)
    c.elect(1)
    for k in range(3):
        c[1].propose(b"v%d" % k)
        c.stabilize()
    leader = c[1]
    match = leader.status().progress[2].match
    assert match == 4
    leader.step(Message(MT.APPEND_RESP, 1, 2, leader.term, index=2))
    assert leader.status().progress[2].match == match
    leader.step(Message(MT.APPEND_RESP, 1, 2, leader.term, index=3, reject=True, reject_hint=1))
    assert leader.status().progress[2].match == match
    assert leader.status().progress[2].next > match


def _leader_with_old_term_tail():
    """Node 1 of (1,2,3): log [1/1, 1/2] from term 1, then elected at term 2."""
    st = MemoryStorage(ConfState(voters=(1, 2, 3)))
    st.append([Entry(1, 1), Entry(1, 2, data=b"old")])
    st.set_hard_state(HardState(term=1, vote=1, commit=1))
    n = RaftNode(Config(id=1, pre_vote=False), st, random.Random(0))
    n.campaign()
    n.step(Message(MT.VOTE_RESP, 1, 2, 2))
    assert n.role is Role.LEADER and n.term == 2
    return n, st


def test_no_commit_of_older_term_entry_by_counting():
    """PySyncObj #169/#110, Raft §5.4.2: 1/2 on a majority is not committed until an entry
    of the leader's own term (its no-op at index 3) is."""
    n, st = _leader_with_old_term_tail()
    rd = n.ready()
    st.append(rd.entries)
    n.advance(rd)
    n.step(Message(MT.APPEND_RESP, 1, 2, 2, index=2))
    n.step(Message(MT.APPEND_RESP, 1, 3, 2, index=2))
    assert n.commit_index == 1, "entry 2 (term 1) must not be committed by counting"
    n.step(Message(MT.APPEND_RESP, 1, 2, 2, index=3))
    assert n.commit_index == 3  # committing 3 (term 2) commits 2 indirectly (§5.4.2)


def test_term_and_vote_durable_before_any_reply(cluster):
    """PySyncObj #202: every granted vote leaves in a Ready whose hard state (persisted
    before sending) already holds that term and vote; every APPEND_RESP acknowledges only
    entries that are durable once that Ready is persisted."""
    checked = {"votes": 0, "acks": 0}

    def check(i, rd, st):
        hs = rd.hard_state or st.initial_state()[0]
        last_durable = rd.entries[-1].index if rd.entries else st.last_index()
        if rd.snapshot is not None and not rd.entries:
            last_durable = max(last_durable, rd.snapshot.metadata.index)
        for m in rd.messages:
            if m.type is MT.VOTE_RESP and not m.reject:
                assert hs.term == m.term and hs.vote == m.to, (i, hs, m)
                checked["votes"] += 1
            if m.type is MT.APPEND_RESP and not m.reject:
                assert m.index <= last_durable, (i, m, last_durable)
                checked["acks"] += 1
            assert m.term <= hs.term or m.type is MT.PRE_VOTE or (
                m.type is MT.PRE_VOTE_RESP), (i, hs, m)

    rng = random.Random(7)
    c = cluster(5, seed=3)
    c.on_ready = check
    c.drop = lambda m: rng.random() < 0.2
    for step in range(400):
        c.tick(1)
        lead = c.leaders()
        if lead and step % 3 == 0:
            c[lead[0]].propose(b"p%d" % step)
        if step % 40 == 39:  # crash the leader (or anyone) to force elections
            victim = lead[0] if lead else rng.randint(1, 5)
            c.crash(victim)
            c.start(victim)
    assert checked["votes"] > 5 and checked["acks"] > 50, checked


def test_vote_survives_restart_no_double_vote(cluster):
    """After voting and crashing, a node must not vote for someone else in that term."""
    c = cluster(3, pre_vote=False, check_quorum=False)
    c[2].step(Message(MT.VOTE, 2, 1, 5, log_term=0, index=0))
    c.process(2)
    c.crash(2)
    n = c.start(2)
    assert (n.term, n.vote) == (5, 1)
    n.step(Message(MT.VOTE, 2, 3, 5, log_term=0, index=0))
    rd = n.ready()
    assert [m.reject for m in rd.messages if m.type is MT.VOTE_RESP] == [True]


def test_single_node_commits_only_persisted_entries():
    """etcd #14370: a lone voter must not hand out an entry as committed (or put it in the
    hard state's commit) before the entry was in Ready.entries and persisted."""
    st = MemoryStorage(ConfState(voters=(1,)))
    n = RaftNode(Config(id=1), st, random.Random(0))
    n.campaign()
    assert n.role is Role.LEADER
    acked = []
    for k in range(20):
        if k % 3 == 0:
            n.propose_batch([b"a%d" % k, b"b%d" % k])
        while n.has_ready():
            rd = n.ready()
            durable_before = st.last_index()
            for e in rd.committed_entries:
                assert e.index <= durable_before, "committed before persisted"
            if rd.hard_state is not None:
                assert rd.hard_state.commit <= durable_before
            st.append(rd.entries)
            if rd.hard_state is not None:
                st.set_hard_state(rd.hard_state)
            acked += [e.data for e in rd.committed_entries if e.data]
            n.advance(rd)
    assert len(acked) == 14


def test_single_node_keeps_acknowledged_write_across_crash():
    """etcd #14370: crash at any point; restart from persisted state only; every write that
    was acknowledged (applied) is still there."""
    for crash_at in range(1, 12):
        st = MemoryStorage(ConfState(voters=(1,)))
        n = RaftNode(Config(id=1), st, random.Random(crash_at))
        n.campaign()
        acked, steps = [], 0
        while steps < crash_at:
            n.propose(b"w%d" % steps)
            rd = n.ready()
            steps += 1
            if steps == crash_at:
                break  # crash after ready(), before persisting: this Ready is lost
            st.append(rd.entries)
            if rd.hard_state is not None:
                st.set_hard_state(rd.hard_state)
            acked += [e.data for e in rd.committed_entries if e.data]
            n.advance(rd)
        n = RaftNode(Config(id=1), st, random.Random(99))
        n.campaign()
        while n.has_ready():
            rd = n.ready()
            st.append(rd.entries)
            if rd.hard_state is not None:
                st.set_hard_state(rd.hard_state)
            n.advance(rd)
        kept = [e.data for e in st.entries(1, st.last_index() + 1) if e.data]
        assert kept[:len(acked)] == acked
        assert n.commit_index == st.last_index()


def test_snapshot_that_leaves_the_receiver_out_is_refused(cluster):
    """etcd's restore: node 2 is sent a snapshot (index 10) whose voters are (1, 3). It keeps
    its log and configuration and answers with its own commit index, not the snapshot's."""
    c = cluster(3)
    c.elect(1)
    c[1].propose(b"x")
    c.stabilize()
    f = c[2]
    before = (f.log.last_index(), f.commit_index, f.conf_state())
    snap = Snapshot(SnapshotMetadata(10, 1, ConfState(voters=(1, 3))), b"state")
    f.step(Message(MT.SNAPSHOT, 2, 1, f.term, snapshot=snap, commit=10))
    rd = f.ready()
    assert rd.snapshot is None, "a snapshot that leaves the receiver out was installed"
    assert (f.log.last_index(), f.commit_index, f.conf_state()) == before
    answers = [m for m in rd.messages if m.type is MT.APPEND_RESP]
    assert [(m.index, m.reject) for m in answers] == [(before[1], False)]
    assert f.status().dropped["snapshot_excludes_self"] == 1
    f.advance(rd)
    # The same snapshot with the receiver among its learners is installed.
    ok = Snapshot(SnapshotMetadata(10, 1, ConfState(voters=(1, 3), learners=(2,))), b"state")
    f.step(Message(MT.SNAPSHOT, 2, 1, f.term, snapshot=ok, commit=10))
    assert f.ready().snapshot == ok


def test_report_reachable_heartbeats_a_returning_follower_at_once(cluster):
    """A leader told that a peer's link came back (a restarted follower dialled it) sends that
    peer a heartbeat now; the answer shows the follower behind and the leader sends it the
    missing entries, all without a tick. A follower told the same sends nothing."""
    c = cluster(3)
    c.elect(1)
    c.crash(3)
    for k in range(3):
        c[1].propose(b"w%d" % k)
        c.stabilize()
    c.start(3)
    assert c[3].log.last_index() < c[1].log.last_index()
    c[2].report_reachable(3)
    assert not c.process(2) and not c.queue
    c[1].report_reachable(3)
    assert c.process(1)
    assert [(m.type, m.to) for m in c.queue] == [(MT.HEARTBEAT, 3)]
    c.stabilize()  # no tick: the heartbeat's answer alone brings the follower up to date
    assert c[3].log.last_index() == c[1].log.last_index()
    assert c[3].commit_index == c[1].commit_index


def test_heartbeats_taken_while_a_ready_is_out_keep_the_followers(cluster):
    """A driver whose save is slow sends heartbeats (and their answers) ahead of the Ready
    being persisted (``take_messages``): the followers never campaign, the leader never
    loses its quorum, and the held Ready still commits once persisted and advanced."""
    c = cluster(3, check_quorum=True, pre_vote=True)
    leader = c.elect(1)
    leader.propose(b"slow")
    rd = leader.ready()  # its save is "in flight" from here on
    assert rd.entries
    beats = 0
    for _ in range(3 * c[2].cfg.election_tick):  # three election timeouts
        for _i, n in c.live():
            n.tick()
        early = leader.take_messages(frozenset({MT.HEARTBEAT}))
        assert all(m.type is MT.HEARTBEAT for m in early)
        assert all(m.type is not MT.HEARTBEAT for m in leader.msgs)
        beats += len(early)
        for m in early:
            c[m.to].step(m)
        for i in (2, 3):
            for m in c[i].take_messages(frozenset({MT.HEARTBEAT_RESP})):
                leader.step(m)
            assert c[i].role is Role.FOLLOWER and not any(
                m.type in (MT.PRE_VOTE, MT.VOTE) for m in c[i].msgs)
        assert leader.role is Role.LEADER
    assert beats >= 2 * 3 * c[2].cfg.election_tick // c[2].cfg.heartbeat_tick
    c.queue.extend(rd.messages)
    c.storage[1].append(rd.entries)
    if rd.hard_state is not None:
        c.storage[1].set_hard_state(rd.hard_state)
    leader.advance(rd)
    c.stabilize()
    assert c.applied[2][-1] == b"slow" and leader.term == 1
