"""A small programmatic driver for Raft core tests (the scenario scripts use the interaction
harness instead). ``Cluster`` persists every Ready before it 'sends' the messages, exactly as
the contract demands, and records what was persisted when, so tests can check ordering."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from coordinator.raft import (
    Config,
    ConfState,
    EntryType,
    HardState,
    MemoryStorage,
    Message,
    RaftNode,
    Ready,
    Role,
    decode_conf_change,
)


class Cluster:
    def __init__(self, n: int = 3, seed: int = 0, voters: tuple[int, ...] | None = None,
                 **cfg) -> None:
        self.seed = seed
        self.cfg = cfg
        ids = tuple(range(1, n + 1))
        self.voters = voters or ids
        self.storage: dict[int, MemoryStorage] = {}
        self.nodes: dict[int, RaftNode | None] = {}
        self.applied: dict[int, list[bytes]] = {}
        self.queue: list[Message] = []
        self.drop: Callable[[Message], bool] = lambda m: False
        self.on_ready: Callable[[int, Ready, MemoryStorage], None] | None = None
        # safety bookkeeping, checked on every Ready: what was applied at each index (by
        # anyone) and who led each term
        self.applied_at: dict[int, tuple[int, bytes]] = {}
        self.leader_of_term: dict[int, int] = {}
        for i in ids:
            self.storage[i] = MemoryStorage(ConfState(voters=self.voters))
            self.start(i)

    def start(self, i: int, **extra) -> RaftNode:
        cfg = Config(id=i, **{**self.cfg, **extra})
        self.nodes[i] = RaftNode(cfg, self.storage[i], random.Random(self.seed * 100 + i))
        self.applied[i] = []
        return self.nodes[i]

    def __getitem__(self, i: int) -> RaftNode:
        n = self.nodes[i]
        assert n is not None, f"node {i} is crashed"
        return n

    def live(self):
        return [(i, n) for i, n in sorted(self.nodes.items()) if n is not None]

    def crash(self, i: int) -> None:
        """Lose everything not persisted (the node object and its unsent messages)."""
        self.nodes[i] = None
        self.queue = [m for m in self.queue if m.to != i and m.frm != i]

    def process(self, i: int) -> bool:
        n = self[i]
        if not n.has_ready():
            return False
        rd = n.ready()
        st = self.storage[i]
        if self.on_ready:
            self.on_ready(i, rd, st)
        if rd.snapshot is not None:
            st.apply_snapshot(rd.snapshot)
        st.append(rd.entries)
        if rd.hard_state is not None:
            st.set_hard_state(rd.hard_state)
        self.queue.extend(rd.messages)
        if n.role is Role.LEADER:
            assert self.leader_of_term.setdefault(n.term, i) == i, f"two leaders in term {n.term}"
        for e in rd.committed_entries:
            seen = self.applied_at.setdefault(e.index, (e.term, e.data))
            assert seen == (e.term, e.data), f"node {i} applied {e} but {seen} was applied before"
            if e.type is EntryType.CONF_CHANGE:
                cs = n.apply_conf_change(decode_conf_change(e.data))
                if st.first_index() > 1 and e.index > st.snapshot().metadata.index:
                    # A driver that compacts must offer a snapshot that includes a member it
                    # adds: the core neither sends nor installs one that leaves the receiver out.
                    st.create_snapshot(e.index, cs, b"")
                    st.compact(e.index)
            elif e.data:
                self.applied[i].append(e.data)
        n.advance(rd)
        n.check_invariants()
        return True

    def deliver(self) -> bool:
        q, self.queue = self.queue, []
        for m in q:
            n = self.nodes.get(m.to)
            if n is None or self.drop(m):
                continue
            n.step(m)
            n.check_invariants()
        return bool(q)

    def stabilize(self, rounds: int = 10_000) -> None:
        for _ in range(rounds):
            moved = False
            for i, _n in self.live():
                moved |= self.process(i)
            moved |= self.deliver()
            if not moved:
                return
        raise AssertionError("cluster did not stabilize")

    def tick(self, times: int = 1, only: tuple[int, ...] | None = None) -> None:
        for _ in range(times):
            for i, n in self.live():
                if only is None or i in only:
                    n.tick()
            self.stabilize()

    def elect(self, i: int) -> RaftNode:
        self[i].campaign()
        self.stabilize()
        assert self[i].role is Role.LEADER, self[i].status()
        return self[i]

    def leaders(self) -> list[int]:
        return [i for i, n in self.live() if n.role is Role.LEADER]

    def hard_state(self, i: int) -> HardState:
        return self.storage[i].initial_state()[0]


@pytest.fixture
def cluster():
    return Cluster
