"""Randomized whole-cluster runs of the core under faults (drops, duplicates, reordering,
partitions, crashes losing unpersisted state, compaction + snapshots, membership changes,
leadership transfers, reads), checking safety after every Ready (one leader per term, no two
different entries applied at one index -- see conftest.Cluster) and liveness after healing.
The deterministic simulator in coordinator/testing runs far more of these; this is the core's
own, self-contained check. RAFT_RANDOM_SEEDS=N runs more seeds."""

import os
import random

import pytest

from coordinator.raft import (
    ConfChange,
    ConfChangeType,
    LocalProtocolError,
    MessageType,
    ProposalDropped,
    Role,
)

SEEDS = int(os.environ.get("RAFT_RANDOM_SEEDS", "12"))


def _faulty_deliver(c, rng, cut):
    q, c.queue = c.queue, []
    rng.shuffle(q)  # reordering
    for m in q:
        if rng.random() < 0.05:
            c.queue.append(m)  # delayed to a later round (and maybe duplicated below)
            continue
        if rng.random() < 0.1 or ((m.frm in cut) != (m.to in cut)):
            continue
        n = c.nodes.get(m.to)
        if n is None:
            continue
        n.step(m)
        n.check_invariants()
        if rng.random() < 0.03:
            n.step(m)  # duplicate
    return bool(q)


def _act(c, rng, state):
    live = c.live()
    leaders = [i for i, n in live if n.role is Role.LEADER]
    r = rng.random()
    try:
        if r < 0.35 and leaders:
            c[leaders[-1]].propose_batch([b"%d" % rng.randint(0, 999)] * rng.randint(1, 4))
        elif r < 0.40:
            i = rng.choice(list(c.nodes))
            if c.nodes[i] is None:
                c.start(i)
            elif sum(1 for _ in live) > 2:
                c.crash(i)
        elif r < 0.45:
            state["cut"] = set(rng.sample(list(c.nodes), rng.randint(0, 2)))
        elif r < 0.48 and live:
            i, n = rng.choice(live)
            st = c.storage[i]
            if n.log.applied > st.first_index():
                st.create_snapshot(n.log.applied, n.conf_state(), b"")
                st.compact(n.log.applied)
        elif r < 0.50 and leaders:
            c[leaders[-1]].transfer_leadership(rng.choice(list(c.nodes)))
        elif r < 0.53 and leaders:
            kind = rng.choice([ConfChangeType.ADD_LEARNER, ConfChangeType.ADD_VOTER,
                               ConfChangeType.REMOVE_VOTER])
            c[leaders[-1]].propose_conf_change(ConfChange(((kind, rng.choice(list(c.nodes))),)))
        elif r < 0.56 and live:
            rng.choice(live)[1].read_index(b"r%d" % rng.randint(0, 10**6))
    except (ProposalDropped, LocalProtocolError):
        pass


def run_random(Cluster, seed: int, steps: int = 300) -> None:  # noqa: N803 - a class
    rng = random.Random(seed)
    c = Cluster(rng.choice([3, 5]), seed=seed, election_tick=5, max_inflight_msgs=4,
                max_size_per_msg=64)
    state = {"cut": set()}
    for _ in range(steps):
        _act(c, rng, state)
        for _i, n in c.live():
            if rng.random() < 0.9:  # nodes tick at slightly different rates
                n.tick()
        for _ in range(3):
            for i, _n in c.live():
                c.process(i)
            _faulty_deliver(c, rng, state["cut"])
    # liveness: heal everything, restart the crashed, and demand a leader and convergence
    for i in list(c.nodes):
        if c.nodes[i] is None:
            c.start(i)
    c.drop = lambda m: False
    for _ in range(400):
        c.tick(1)
        leaders = c.leaders()
        members = [i for i, n in c.live() if n.promotable() or i in n.trk.progress]
        if len(leaders) == 1:
            lc = c[leaders[0]].commit_index
            if lc == c[leaders[0]].log.last_index() and all(
                    c[i].commit_index == lc for i in members if i in c[leaders[0]].trk.progress):
                return
    raise AssertionError(f"seed {seed}: no convergence after healing: "
                         f"{[(i, n.role, n.term, n.commit_index) for i, n in c.live()]}")


@pytest.mark.parametrize("seed", range(SEEDS))
def test_random_cluster_is_safe_and_live(cluster, seed):
    run_random(cluster, seed)


def test_message_types_all_exercised(cluster):
    """The scripted run reaches the rarer message types (keeps the checks honest)."""
    Cluster = cluster  # noqa: N806
    seen = set()
    orig = Cluster.deliver

    def spy(self):
        seen.update(m.type for m in self.queue)
        return orig(self)

    Cluster.deliver = spy
    try:
        for seed in range(3):
            c = Cluster(3, seed=seed, election_tick=5)
            c.elect(1)
            c[1].propose(b"x")
            c.stabilize()
            c[2].read_index(b"r")
            c[1].transfer_leadership(2)
            c.stabilize()
    finally:
        Cluster.deliver = orig
    assert {MessageType.APPEND, MessageType.VOTE, MessageType.TIMEOUT_NOW,
            MessageType.READ_INDEX, MessageType.READ_INDEX_RESP} <= seen


def _observable(n):
    return (n.role, n.term, n.vote, n.leader_id, len(n.msgs), n.lead_transferee,
            dict(n.dropped), n.commit_index,
            sorted((i, pr.recent_active) for i, pr in n.trk.progress.items()))


@pytest.mark.parametrize("seed", range(int(os.environ.get("TICK_SEEDS", "4"))))
def test_ticks_before_the_due_one_only_count(cluster, seed):
    """``ticks_until_due``, which a tickless driver sleeps by: under the random run's faults,
    every tick it calls idle (all but the due one) changes nothing a peer or the driver could
    see and brings the due tick one closer; and the due tick is not late: a node left to
    tick alone acts on exactly that tick (a follower campaigns, a leader heartbeats)."""
    rng = random.Random(1000 + seed)
    c = cluster(rng.choice([3, 5]), seed=seed, election_tick=5, max_inflight_msgs=4,
                max_size_per_msg=64)
    state = {"cut": set()}
    idle = acted_on_time = 0
    for _ in range(250):
        _act(c, rng, state)
        for _i, n in c.live():
            due = n.ticks_until_due()
            before = _observable(n)
            n.tick()
            if due is not None and due > 1:
                assert _observable(n) == before, (due, n.status())
                assert n.ticks_until_due() == due - 1
                idle += 1
        for _ in range(3):
            for i, _n in c.live():
                c.process(i)
            _faulty_deliver(c, rng, state["cut"])
    for i, n in c.live():  # cut off from everyone: the due tick must be the one that acts
        while c.process(i):
            pass
        n.msgs.clear()  # what its last Readies said (dropped: it is cut off)
        due = n.ticks_until_due()
        if due is None or (n.role is Role.LEADER and len(n.trk.progress) == 1):
            continue  # a leader alone has no one to heartbeat: its due tick may pass unseen
        for _ in range(due - 1):
            n.tick()
        assert not n.msgs
        before = _observable(n)
        n.tick()
        assert _observable(n) != before, n.status()  # a heartbeat, a step-down, a campaign, a CheckQuorum round
        acted_on_time += 1
    assert idle > 30 and acted_on_time + sum(n.ticks_until_due() is None for _i, n in c.live()) >= 1
