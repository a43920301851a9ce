"""A deterministic simulator of a Raft cluster under faults (VOPR-style).

Theory of operation
-------------------
One seed drives everything: ``random.Random(seed)`` decides the cluster size, each node's
election randomness (a ``random.Random`` seeded from it), the fault schedule, the network's
fates and the clients' workload. Time is an integer clock in abstract *units*; a node ticks
every ``period`` units (periods differ between nodes and change: clock skew). Everything that
happens is an event in one priority queue ordered by (time, sequence number), so a seed
replays exactly; the run keeps a hash of every event it handled (``trace_hash``) and the
last ``trace_lines`` of them in readable form.

Each node is driven like the real server drives it (docs/raft-core-api.md): after every input
the simulator drains ``ready()``: persist snapshot, entries and hard state into the node's
``MemoryStorage`` (its "disk"), only then send the messages, apply the committed entries to
the node's :class:`SimKV`, serve reads, ``advance``. A crash throws the ``RaftNode`` and the
``SimKV`` away and rebuilds both from the storage alone; a crash can also strike in the middle
of that drain (before persisting, halfway through the write, after persisting but before
sending, after sending but before applying), which loses exactly what a real process would
lose. A targeted crash hits a node right after it grants a vote or acknowledges entries and
restarts it a moment later, the window in which anything not durable would be forgotten.
A share of the fault schedule's restarts (``wipe_fraction``, drawn from a stream of its own so
the rest of a seed's schedule is unchanged) replaces the node's storage with an empty one
holding only the bootstrap configuration, and starts it with ``Config.recovering``; like a real
server's marker file, ``SimNode.recovering`` survives crashes until the core reports the
repair finished in a Ready that was then made durable. One node at a time: two lost disks
can lose a committed entry, which no protocol can prevent.

Snapshots are taken the way the server takes them (``coordinator/snapshotting.py``): a share
of them (``slow_snapshot``, drawn from a stream of their own) is *slow* — the state is
captured at the applied index, the node goes on ticking, voting, replicating and applying
while the snapshot is "written" for ``snapshot_time`` units (longer than an election timeout:
a snapshot of a large state), and only then does it become the node's snapshot and the log
get compacted up to it. A crash before that loses it (the log is still whole); a newer
snapshot installed from the leader meanwhile supersedes it. One at a time per node.

A run has two phases. The *safety phase* injects faults: message loss, duplication,
reordering and delay; symmetric and one-way partitions; crashes and restarts (some with an
empty disk, see below); clock skew;
leadership transfers; membership changes (spare nodes join as learners or voters, voters
leave, single-server and joint); log compaction with snapshots throughout; and per-seed core
settings (PreVote or CheckQuorum off, tiny messages, a window of one message). The *liveness
phase* heals the network and the clocks and restarts every node, and requires that within
``liveness_time`` units a leader exists, every client has finished its pending operation plus
one more, and every member has applied all that the leader committed.

Leases (``SimParams.lease_clients`` > 0; none by default, and then a seed runs exactly as it
did before leases existed) mirror the server's (``coordinator/leases.py``) in simulated time:
lease clients (:class:`~.workload.LeaseClient`: keepers, lapsers, racers) grant a lease, attach
a key and keep it alive or not; every command carries its proposer's wall clock (``now`` plus
the node's ``wall_offset``, which clock faults set within ``lease_clock_skew``; 0 by default);
the leader scans its applied state every tick and proposes ``expire`` for leases due on its
wall clock, but not within one election timeout (``election_tick`` of its own ticks) of its
election; the state machine revokes only what is due on the log clock at that entry. The TTL
is four election timeouts, so a keeper (keepalive every TTL/3) rides out an election. The
:class:`~.invariants.LeaseChecker` states and checks the lease invariants; the healed phase
also requires every lease not kept alive, and a lapser's key, gone from every member, and each
one revoked within ``lease_expiry_bound`` of being due with a leader past its grace in office.
The stats count expiries by a leader of another term than the lease's last renewal
(``lease_expiries_across_terms``) and elections while leases were live.

After every event :class:`~.invariants.InvariantChecker` checks Raft's safety properties and
persist-before-send on every outgoing message; at the end replicas at one applied index must
hold one state and the client history must be linearizable (:mod:`.linearizability`, per
key). A failure prints ``SEED=<n>``, what broke and the trace. ``SimParams(bug=...)`` injects
a known bug (see ``BUGS``) to show that the checks catch it.

``python -m coordinator.testing.simulator --seeds N --start S [--verbose]`` runs many seeds.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import random
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack

from coordinator.raft.messages import (
    ConfChange,
    ConfChangeType,
    ConfState,
    EntryType,
    Message,
    MessageType,
    decode_conf_change,
    decode_message,
    encode_message,
)
from coordinator.raft.node import RaftNode
from coordinator.raft.storage import MemoryStorage, StorageError
from coordinator.raft.types import Config, ProposalDropped, RaftError, Ready, Role

from .history import HistoryRecorder, OpKind
from .invariants import InvariantChecker, InvariantViolation, LeaseChecker
from .kv import LEASE_NOT_FOUND, STALE, SimKV, encode_command
from .linearizability import CheckReport, CheckResult, check_history
from .network import FaultNetwork
from .workload import (
    LEASE_ROLES,
    ClientReply,
    ClientRequest,
    LeaseClient,
    LeaseOp,
    SimClient,
    choose_operation,
)

__all__ = ["SeedResult", "SimParams", "Simulation", "main", "run_seed"]

# Event kinds (ints keep the heap entries cheap and comparable).
TICK, DELIVER, REQUEST, REPLY, CLIENT_TIMER, FAULT, RESTART, SNAPSHOT_DONE = range(8)
CRASH_POINTS = ("before_persist", "torn_persist", "after_persist", "after_send")
BUGS = ("stale_reads", "no_dedup", "lossy_snapshot", "send_before_persist", "volatile_vote",
        "wiped_node_votes", "expire_without_check", "no_lease_grace")
LEASE_BUGS = ("expire_without_check", "no_lease_grace")  # inert without lease clients
LEASE_CLIENT_BASE = 1000  # lease clients are 1000, 1001, ...; the others 100, 101, ...


@dataclass(frozen=True)
class SimParams:
    """Knobs of one run. ``nodes=0`` lets the seed pick 3 or 5 nodes."""

    nodes: int = 0
    clients: int = 3
    keys: int = 2
    safety_time: int = 2500  # units of the safety phase (a node ticks every ~tick_unit)
    liveness_time: int = 4000  # units the healed cluster gets to finish everything
    tick_unit: int = 10
    election_tick: int = 10
    heartbeat_tick: int = 2
    client_retry: int = 60
    client_timeout: int = 400
    think_time: int = 20
    fault_every: int = 120  # mean units between fault decisions
    compact_every: int = 25  # applied entries between snapshots (0 = never compact)
    faults: bool = True
    wipe_fraction: float = 0.25  # share of fault restarts that come back with an empty disk
    slow_snapshot: float = 0.3  # share of snapshots written in the background (see the module doc)
    snapshot_time: int = 150  # units such a snapshot takes (an election timeout is ~100)
    membership: bool = True  # spare nodes join and voters leave during the safety phase
    # Healing also brings the clocks back within +-15% of nominal. Without it, a node ticking
    # 2.6x faster than the rest and holding a stale log can starve elections forever when
    # PreVote is off (its VOTE requests bump everyone's term and reset their timers).
    heal_clocks: bool = True
    codec: bool = True  # send every message through the msgpack codec
    trace_lines: int = 300
    max_queue: int = 200_000  # events; a run that exceeds it is a bug in the simulator
    check_time_limit_s: float = 10.0
    # Leases (see the module doc). 0 lease clients: none, and a seed runs exactly as it did
    # before leases existed (nothing is drawn, no command carries a timestamp).
    lease_clients: int = 0
    lease_ttl: int = 0  # units; 0: four election timeouts (4 * election_tick * tick_unit)
    lease_clock_skew: int = 0  # a clock fault also sets the node's wall clock off by up to this
    lease_expiry_bound: int = 0  # liveness slack in units; 0: two election timeouts
    bug: str | None = None  # inject a known bug (see BUGS) to prove the checkers work


@dataclass
class SeedResult:
    seed: int
    failure: str | None  # None: all checks passed
    trace_hash: str
    trace: list[str]
    linearizability: CheckResult
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.failure is None

    def report(self) -> str:
        lines = [f"SEED={self.seed}", f"FAILED: {self.failure}", f"last {len(self.trace)} events:"]
        lines += ["  " + t for t in self.trace]
        lines.append(
            f"SEED={self.seed} (rerun: python -m coordinator.testing.simulator "
            f"--seeds 1 --start {self.seed} --verbose)"
        )
        return "\n".join(lines)


class LivenessFailure(AssertionError):
    pass


@dataclass
class SimNode:
    """One simulated server: durable storage plus the volatile node, KV and request tables."""

    id: int
    storage: MemoryStorage
    period: int
    raft: RaftNode | None = None
    kv: SimKV = field(default_factory=SimKV)
    epoch: int = 0  # bumped by every crash and restart
    conf_state: ConfState | None = None
    crash_point: str | None = None
    crash_trigger: MessageType | None = None  # crash only at a ready that sends this, granted
    restart_after: int | None = None  # units from a crash to the restart that follows it
    recovering: bool = False  # lost its disk and not yet repaired (a durable marker)
    snapshotting: tuple[int, ConfState | None, bytes] | None = None  # a slow snapshot being written
    pending_writes: dict[tuple[int, int], int] = field(default_factory=dict)  # -> attempt
    pending_reads: dict[bytes, ClientRequest] = field(default_factory=dict)
    waiting_reads: list[tuple[int, ClientRequest]] = field(default_factory=list)
    wall_offset: int = 0  # its wall clock reads now + wall_offset (lease timestamps)
    lease_grace_until: int = 0  # as leader: it expires no lease before this time
    grace_noted: bool = False  # a due lease waited for its grace (counted once per term)
    expiry_proposed: dict[int, int] = field(default_factory=dict)  # lease -> when, as leader

    MAX_PENDING = 1024

    @property
    def alive(self) -> bool:
        return self.raft is not None


class Simulation:
    """One seeded run. ``run()`` returns a :class:`SeedResult`; it never raises for a
    violation (the result carries it), only for a bug in the simulator itself."""

    def __init__(self, seed: int, params: SimParams | None = None) -> None:
        self.seed = seed
        self.p = params or SimParams()
        if self.p.bug is not None and self.p.bug not in BUGS:
            raise ValueError(f"unknown bug {self.p.bug!r}; choose one of {BUGS}")
        self.rng = random.Random(seed)
        n = self.p.nodes or self.rng.choice((3, 3, 5))
        spares = self.rng.choice((0, 1, 1, 2)) if self.p.membership else 0
        self.ids = list(range(1, n + spares + 1))  # spares start outside the configuration
        self.now = 0
        self.queue: list[tuple[int, int, int, Any, Any]] = []
        self._seq = 0
        self.trace: deque[str] = deque(maxlen=self.p.trace_lines)
        self._hash = hashlib.blake2b(digest_size=16)
        self.checker = InvariantChecker()
        self.history = HistoryRecorder(max_ops=50_000)
        self.net = FaultNetwork(self.rng, self.ids)
        self.keys = [f"k{i}" for i in range(self.p.keys)]
        self.liveness = False
        self.stats = {
            "events": 0,
            "crashes": 0,
            "restarts": 0,
            "snapshots_sent": 0,
            "compactions": 0,
            "elections": 0,
            "transfers": 0,
            "conf_changes": 0,
            "redirects": 0,
            "wipes": 0,
            "recoveries": 0,
            "slow_snapshots": 0,
            "slow_snapshots_lost": 0,
        }
        voters = ConfState(voters=tuple(range(1, n + 1)))
        self.bootstrap_conf = voters
        self._wipe_rng = random.Random(f"wipe/{seed}")
        self._snap_rng = random.Random(f"snapshot/{seed}")
        self.nodes: dict[int, SimNode] = {}
        for nid in self.ids:
            period = self._random_period()
            node = SimNode(nid, MemoryStorage(conf_state=voters), period)
            node.kv = self._new_kv()
            self.nodes[nid] = node
        self.clients = [SimClient(100 + i) for i in range(self.p.clients)]
        self.raft_knobs = self._draw_raft_knobs()
        # Leases draw from a stream of their own: their clients, their messages' fates, the
        # wall-clock offsets.
        self._lease_rng = random.Random(f"lease/{seed}")
        self.election_timeout = self.p.election_tick * self.p.tick_unit
        self.lease_ttl = self.p.lease_ttl or 4 * self.election_timeout
        self.lease_bound = self.p.lease_expiry_bound or 2 * self.election_timeout
        self.lease_clients = [
            LeaseClient(LEASE_CLIENT_BASE + i, LEASE_ROLES[i % len(LEASE_ROLES)])
            for i in range(self.p.lease_clients)
        ]
        self.lease_check = LeaseChecker(skew=self.p.lease_clock_skew) if self.lease_clients else None
        if self.lease_check is not None:
            self.stats["lease_grace_waits"] = 0

    def _draw_raft_knobs(self) -> dict[str, Any]:
        """Per-seed core settings, so that seeds also cover the less common configurations:
        PreVote or CheckQuorum off, tiny messages, a window of one message in flight, a
        limit on uncommitted bytes (proposals then get refused), a commit index that waits for
        the next append or heartbeat instead of being broadcast (the server's setting)."""
        rng = self.rng
        return {
            "pre_vote": rng.random() < 0.8,
            "check_quorum": rng.random() < 0.8,
            "max_size_per_msg": rng.choice((64, 1024, 1 << 20)),
            "max_inflight_msgs": rng.choice((1, 4, 16, 256)),
            "max_uncommitted_entries_size": rng.choice((0, 0, 512)),
            # drawn from its own stream, so every other draw of a seed stays what it was
            "commit_broadcast": random.Random(f"commit_broadcast/{self.seed}").random() < 0.5,
        }

    # ---- the event loop ------------------------------------------------------------------------

    def _push(self, at: int, kind: int, a: Any = None, b: Any = None) -> None:
        if len(self.queue) >= self.p.max_queue:
            raise RuntimeError(f"simulator event queue exceeded {self.p.max_queue} events")
        self._seq += 1
        heapq.heappush(self.queue, (at, self._seq, kind, a, b))

    def log(self, text: str) -> None:
        line = f"t={self.now} {text}"
        self.trace.append(line)
        self._hash.update(line.encode())

    def run(self) -> SeedResult:
        failure = None
        report = CheckReport(CheckResult.UNKNOWN)
        try:
            self._start()
            self._run_until(self.p.safety_time)
            self._heal()
            self._run_until(self.p.safety_time + self.p.liveness_time, self._finished)
            if not self._finished():
                raise LivenessFailure(self._liveness_problem())
            self._check_replicas_agree()
            self._check_lease_liveness()
            report = check_history(
                self.history.operations(), time_limit_s=self.p.check_time_limit_s
            )
            if report.result is CheckResult.ILLEGAL:
                failure = "linearizability: " + report.explanation
        except InvariantViolation as e:
            failure = f"invariant violated: {e}"
        except LivenessFailure as e:
            failure = f"liveness: {e}"
        except (RaftError, StorageError) as e:
            failure = f"the node or its storage raised {type(e).__name__}: {e}"
        except Exception as e:  # a crash inside the core (or the simulator) is a finding too
            where = "".join(traceback.format_exception(e)[-6:])
            failure = f"unexpected {type(e).__name__}: {e}\n{where}"
        if failure:
            self.log(f"FAILED {failure.splitlines()[0]}")
        self.stats["ops"] = len(self.history)
        self.stats["sent"], self.stats["dropped"] = self.net.sent, self.net.dropped
        if self.lease_check is not None:
            self.stats.update(self.lease_check.stats)
            self.stats["lease_keeper_losses"] = sum(
                c.lost for c in self.lease_clients if c.role == "keeper")
            self.stats["lease_grants"] = sum(c.gen for c in self.lease_clients)
        return SeedResult(
            self.seed, failure, self._hash.hexdigest(), list(self.trace), report.result, self.stats
        )

    def _start(self) -> None:
        voters = self.nodes[1].storage.initial_state()[1].voters
        self.log(
            f"start: voters {list(voters)}, spares {[i for i in self.ids if i not in voters]}, "
            f"{len(self.clients)} clients, bug={self.p.bug}, raft {self.raft_knobs}"
        )
        for node in self.nodes.values():
            self._boot(node)
        for c in self.clients:
            self._push(self.rng.randint(0, self.p.think_time), CLIENT_TIMER, c.id, c.timer_token)
        if self.lease_clients:
            self.log(f"lease clients {[(c.id, c.role) for c in self.lease_clients]}, "
                     f"ttl {self.lease_ttl}, wall-clock skew {self.p.lease_clock_skew}")
        for lc in self.lease_clients:
            lc.keepalives = self._lease_rng.randint(0, 3)
            self._push(self._lease_rng.randint(0, self.p.think_time), CLIENT_TIMER, lc.id,
                       lc.timer_token)
        if self.p.faults:
            self._push(self.p.fault_every, FAULT)

    def _run_until(self, end: int, done: Callable[[], bool] | None = None) -> None:
        handlers = (
            self._on_tick,
            self._on_deliver,
            self._on_request,
            self._on_reply,
            self._on_client_timer,
            self._on_fault,
            self._on_restart,
            self._on_snapshot_done,
        )
        while self.queue and self.queue[0][0] <= end:
            at, _, kind, a, b = heapq.heappop(self.queue)
            self.now = at
            self.stats["events"] += 1
            handlers[kind](a, b)
            self._check()
            if done is not None and done():
                return
        self.now = max(self.now, end)

    def _check(self) -> None:
        live = {nid: n.raft for nid, n in self.nodes.items() if n.raft is not None}
        self.checker.after_event(live, {nid: n.storage for nid, n in self.nodes.items()})

    # ---- nodes: boot, tick, deliver, drain -----------------------------------------------------

    def _random_period(self) -> int:
        unit = self.p.tick_unit
        return self.rng.randint(max(1, unit * 6 // 10), unit * 16 // 10)

    def _new_kv(self) -> SimKV:
        return SimKV(
            dedup=self.p.bug != "no_dedup",
            lossy_snapshot=self.p.bug == "lossy_snapshot",
            expire_check=self.p.bug != "expire_without_check",
        )

    def _boot(self, node: SimNode) -> None:
        """(Re)create the volatile node from durable storage alone."""
        snap = node.storage.snapshot()
        node.kv = self._new_kv()
        node.kv.restore(snap.data, snap.metadata.index)
        node.conf_state = node.storage.initial_state()[1]
        cfg = Config(
            id=node.id,
            election_tick=self.p.election_tick,
            heartbeat_tick=self.p.heartbeat_tick,
            applied=snap.metadata.index,
            recovering=node.recovering,
            **self.raft_knobs,
        )
        node.raft = RaftNode(cfg, node.storage, random.Random(self.rng.getrandbits(64)))
        node.epoch += 1
        node.crash_point, node.crash_trigger, node.restart_after = None, None, None
        node.snapshotting = None  # a snapshot of the old process is never finished
        self.checker.on_restart(node.id)
        self._push(self.now + self.rng.randint(1, node.period), TICK, node.id, node.epoch)
        self._drain(node)

    def _crash(self, node: SimNode, where: str) -> None:
        self.log(f"n{node.id} CRASH ({where})")
        self.stats["crashes"] += 1
        node.raft = None
        node.epoch += 1
        node.crash_point, node.crash_trigger = None, None
        if node.restart_after is not None:
            self._push(self.now + node.restart_after, RESTART, node.id, node.epoch)
            node.restart_after = None
        node.pending_writes.clear()
        node.pending_reads.clear()
        node.waiting_reads.clear()
        if node.snapshotting is not None:  # never made durable
            node.snapshotting = None
            self.stats["slow_snapshots_lost"] += 1

    def _on_restart(self, nid: int, epoch: int) -> None:
        node = self.nodes[nid]
        if node.raft is None and node.epoch == epoch and not self.liveness:
            self.log(f"n{nid} RESTART from storage (right after its crash)")
            self.stats["restarts"] += 1
            self._boot(node)

    def _on_tick(self, nid: int, epoch: int) -> None:
        node = self.nodes[nid]
        if node.raft is None or node.epoch != epoch:
            return
        node.raft.tick()
        self._hash.update(b"t%d" % nid)
        self._drain(node)
        if self.lease_check is not None and node.raft is not None and node.epoch == epoch:
            self._expire_leases(node)
        if node.raft is not None and node.epoch == epoch:
            self._push(self.now + node.period, TICK, nid, epoch)

    def _on_deliver(self, env: tuple[Message, int, int], _: Any) -> None:
        """Deliver one copy of a message unless a crash or a partition swallowed it. The
        sender of a snapshot learns its fate (``report_snapshot``), as a transport would."""
        m, src_epoch, dst_epoch = env
        self.net.arrived()
        src, dst = self.nodes.get(m.frm), self.nodes.get(m.to)
        sender_alive = src is not None and src.raft is not None and src.epoch == src_epoch
        delivered = (
            sender_alive
            and dst is not None
            and dst.raft is not None
            and dst.epoch == dst_epoch
            and self.net.link_up(m.frm, m.to)
        )
        if delivered:
            assert dst is not None and dst.raft is not None
            self.log(_describe(m))
            dst.raft.step(m)
            self._drain(dst)
        if m.type == MessageType.SNAPSHOT and sender_alive:
            assert src is not None and src.raft is not None
            if src.epoch == src_epoch:
                src.raft.report_snapshot(m.to, delivered)
                self._drain(src)

    def _drain(self, node: SimNode) -> None:
        """The driver loop: persist, then send, then apply, then advance; crash on cue."""
        while node.raft is not None and node.raft.has_ready():
            raft = node.raft
            rd = raft.ready()
            point = self._crash_point_for(node, rd)
            if point == "before_persist":
                return self._crash(node, "before persisting a ready")
            if point == "torn_persist":
                self._persist_torn(node, rd)
                return self._crash(node, "in the middle of persisting a ready")
            if self.p.bug == "send_before_persist":  # BUG on purpose: acks may outlive a crash
                self._send(node, rd.messages)
                if point is not None:
                    return self._crash(node, "after sending, before persisting (bug)")
                self._persist(node, rd)
            else:
                self._persist(node, rd)
                if point == "after_persist":
                    return self._crash(node, "after persisting, before sending")
                self._send(node, rd.messages)
            if point == "after_send":
                return self._crash(node, "after sending, before applying")
            if rd.soft_state is not None:
                self.log(
                    f"n{node.id} is {rd.soft_state.role.name} term {raft.term} "
                    f"leader={rd.soft_state.leader_id}"
                )
                if rd.soft_state.role is Role.LEADER:
                    self.stats["elections"] += 1
                    if self.lease_check is not None:
                        self._became_leader(node, raft.term)
            for text in rd.notices:
                self.log(f"NOTICE {text}")
            self._apply(node, rd)
            raft.advance(rd)
            if node.recovering and not raft.recovering:
                node.recovering = False  # the Ready that completed the repair is durable
                self.stats["recoveries"] += 1
                self.log(f"n{node.id} repaired: votes again")
            self._serve_waiting_reads(node)
            self._maybe_compact(node)
        return None

    @staticmethod
    def _crash_point_for(node: SimNode, rd: Ready) -> str | None:
        """Where this ready is cut short by a crash, if the node is armed for it."""
        if node.crash_point is None or node.crash_trigger is None:
            return node.crash_point
        sends = any(m.type == node.crash_trigger and not m.reject for m in rd.messages)
        return node.crash_point if sends else None

    def _persist(self, node: SimNode, rd: Ready) -> None:
        st = node.storage
        if rd.snapshot is not None:
            self.log(
                f"n{node.id} persists snapshot at {rd.snapshot.metadata.index} "
                f"term {rd.snapshot.metadata.term}"
            )
            st.apply_snapshot(rd.snapshot)
        if rd.entries:
            st.append(rd.entries)
            self.checker.on_persisted(node.id, st, rd.entries)
        if rd.hard_state is not None:
            hs = rd.hard_state
            if self.p.bug == "volatile_vote":  # BUG on purpose: the vote never reaches disk
                hs = replace(hs, vote=0)
            self.checker.on_hard_state(node.id, st.initial_state()[0], hs)
            st.set_hard_state(hs)

    def _persist_torn(self, node: SimNode, rd: Ready) -> None:
        """A crash during the write: the disk keeps a prefix of [snapshot, entries...,
        hard state], as a write-ahead log with torn-tail recovery would."""
        writes: list[Any] = ([rd.snapshot] if rd.snapshot is not None else []) + list(rd.entries)
        kept = writes[: self.rng.randint(0, len(writes))]
        if kept and kept[0] is rd.snapshot:
            node.storage.apply_snapshot(kept.pop(0))
        if kept:
            node.storage.append(kept)
            self.checker.on_persisted(node.id, node.storage, kept)
        self.log(f"n{node.id} torn write: {len(kept)} of {len(rd.entries)} entries reached disk")

    def _send(self, node: SimNode, messages: list[Message]) -> None:
        for m in messages:
            self.checker.on_send(node.id, node.storage, m)
            if self.p.codec:
                m = decode_message(encode_message(m))
            dst = self.nodes.get(m.to)
            if dst is None:
                continue
            if m.type == MessageType.SNAPSHOT:
                self.stats["snapshots_sent"] += 1
            for delay in self.net.delays():
                self._push(self.now + delay, DELIVER, (m, node.epoch, dst.epoch))

    def _apply(self, node: SimNode, rd: Ready) -> None:
        assert node.raft is not None
        if rd.snapshot is not None and rd.snapshot.metadata.index > node.kv.applied:
            node.kv.restore(rd.snapshot.data, rd.snapshot.metadata.index)
            node.conf_state = rd.snapshot.metadata.conf_state
        for e in rd.committed_entries:
            if e.index <= node.kv.applied:
                continue  # covered by a snapshot installed in this same ready
            first = self.checker.on_apply(node.id, e)
            out = node.kv.apply(e.index, e.data)
            if first and self.lease_check is not None:
                self.lease_check.on_first_apply(e, out, self.now, node.kv.clock)
                if out is not None and out[0] == 0 and out[2]:
                    self.log(f"n{node.id} first applies the expiry of leases {out[2]} "
                             f"(index {e.index}, log clock {node.kv.clock})")
            if e.type == EntryType.CONF_CHANGE:
                node.conf_state = node.raft.apply_conf_change(decode_conf_change(e.data))
            if out is not None:
                client, seq, result = out
                attempt = node.pending_writes.pop((client, seq), None)
                if attempt is not None and result != STALE:
                    self._reply(node, ClientReply(client, seq, attempt, True, result))
        for rs in rd.read_states:
            req = node.pending_reads.pop(rs.context, None)
            if req is not None:
                node.waiting_reads.append((rs.index, req))
        for ctx in getattr(rd, "dropped_reads", ()):
            req = node.pending_reads.pop(ctx, None)
            if req is not None:
                self._reply(
                    node,
                    ClientReply(req.client, req.seq, req.attempt, False, None, node.raft.leader_id),
                )

    def _serve_waiting_reads(self, node: SimNode) -> None:
        if not node.waiting_reads:
            return
        still = []
        for index, req in node.waiting_reads:
            if node.kv.applied >= index:
                self._reply(
                    node, ClientReply(req.client, req.seq, req.attempt, True, node.kv.read(req.key))
                )
            else:
                still.append((index, req))
        node.waiting_reads = still

    def _maybe_compact(self, node: SimNode) -> None:
        """Snapshot the KV and compact the log every ``compact_every`` applied entries,
        keeping a random short tail so that some followers catch up from the log and
        others need InstallSnapshot. Also right after a membership change is applied: the
        core neither sends nor installs a snapshot whose configuration leaves the receiver
        out, so a member added after the last snapshot needs a newer one (etcd's server
        builds a fresh snapshot for every send instead)."""
        every, st, applied = self.p.compact_every, node.storage, node.kv.applied
        if not every:
            return
        held = st.snapshot().metadata
        conf_moved = node.conf_state != held.conf_state and applied > held.index
        if applied - st.first_index() < every and not conf_moved or node.snapshotting is not None:
            return
        if self._snap_rng.random() < self.p.slow_snapshot:
            node.snapshotting = (applied, node.conf_state, node.kv.snapshot())
            took = self._snap_rng.randint(self.p.snapshot_time // 2, self.p.snapshot_time * 3 // 2)
            self._push(self.now + took, SNAPSHOT_DONE, node.id, node.epoch)
            self.stats["slow_snapshots"] += 1
            self.log(f"n{node.id} starts a slow snapshot at {applied} ({took} units)")
            return
        st.create_snapshot(applied, node.conf_state, node.kv.snapshot())
        keep = self.rng.randint(0, every // 2)
        st.compact(max(applied - keep, st.first_index()))
        self.stats["compactions"] += 1
        self.log(f"n{node.id} snapshot at {applied}, log from {st.first_index()}")

    def _on_snapshot_done(self, nid: int, epoch: int) -> None:
        """A slow snapshot is durable: it becomes the node's snapshot and the log is compacted
        up to it, unless the node crashed meanwhile or already holds a newer snapshot."""
        node = self.nodes[nid]
        if node.raft is None or node.epoch != epoch or node.snapshotting is None:
            return
        index, conf, data = node.snapshotting
        node.snapshotting = None
        st = node.storage
        if index <= st.snapshot().metadata.index:
            self.log(f"n{nid} slow snapshot at {index} superseded by one at {st.snapshot().metadata.index}")
            return
        st.create_snapshot(index, conf, data)
        keep = self._snap_rng.randint(0, self.p.compact_every // 2)
        st.compact(max(index - keep, st.first_index()))
        self.stats["compactions"] += 1
        self.log(f"n{nid} slow snapshot at {index} written, log from {st.first_index()}")

    # ---- clients ---------------------------------------------------------------------------

    def _client(self, cid: int) -> SimClient:
        return self.clients[cid - 100]

    def _client_delay(self, rng: random.Random | None = None) -> int | None:
        """Delay of a client <-> node message, or None if the network loses it."""
        rng = rng or self.rng
        f = self.net.faults
        if f.drop and rng.random() < f.drop:
            return None
        return rng.randint(1, f.max_delay)

    def _arm_timer(self, c: SimClient, after: int) -> None:
        c.timer_token += 1
        self._push(self.now + after, CLIENT_TIMER, c.id, c.timer_token)

    def _on_client_timer(self, cid: int, token: int) -> None:
        if cid >= LEASE_CLIENT_BASE:
            return self._on_lease_timer(self.lease_clients[cid - LEASE_CLIENT_BASE], token)
        c = self._client(cid)
        if token != c.timer_token:
            return
        if not c.busy:
            return self._start_op(c)
        if not self.liveness and self.now - c.started >= self.p.client_timeout:
            assert c.op_id is not None
            self.log(f"c{c.id} gives up seq {c.seq} (outcome unknown)")
            self.history.give_up(c.op_id, self.now)
            c.op_id = None
            return self._arm_timer(c, self.rng.randint(1, self.p.think_time))
        self._send_attempt(c)
        return None

    def _start_op(self, c: SimClient) -> None:
        if self.liveness and c.final_op_done:
            return
        c.seq += 1
        c.kind, c.key, c.args = choose_operation(self.rng, c, self.keys)
        c.op_id = self.history.invoke(c.id, c.key, c.kind, c.args, self.now)
        c.started, c.attempt = self.now, 0
        self.log(f"c{c.id} calls seq {c.seq} {c.kind.value}({c.key}, {c.args!r})")
        self._send_attempt(c)

    def _send_attempt(self, c: SimClient) -> None:
        c.attempt += 1
        if c.kind is OpKind.READ or not c.leader_hint or c.attempt % 3 == 0:
            target = self.rng.choice(self.ids)  # reads go anywhere; hints can be stale
        else:
            target = c.leader_hint
        delay = self._client_delay()
        if delay is not None:
            self._push(self.now + delay, REQUEST, target, c.request())
        self._arm_timer(c, self.p.client_retry)

    def _on_reply(self, reply: ClientReply, _: Any) -> None:
        if reply.client >= LEASE_CLIENT_BASE:
            return self._on_lease_reply(self.lease_clients[reply.client - LEASE_CLIENT_BASE], reply)
        c = self._client(reply.client)
        if not c.busy or reply.seq != c.seq:
            return  # an answer to an operation already finished or given up
        if not reply.ok:
            self.stats["redirects"] += 1
            c.leader_hint = reply.leader_hint
            return self._arm_timer(c, self.rng.randint(5, 15))
        assert c.op_id is not None
        output = None if c.kind is OpKind.WRITE else reply.value
        self.history.complete(c.op_id, output, self.now)
        self.log(f"c{c.id} returns seq {c.seq} -> {output!r} (attempt {reply.attempt})")
        if c.kind is OpKind.READ:
            c.known[c.key] = reply.value
        elif c.kind is OpKind.WRITE or (c.kind is OpKind.CAS and reply.value):
            c.known[c.key] = c.args if c.kind is OpKind.WRITE else c.args[1]
        c.op_id = None
        if self.liveness:
            c.final_op_done = c.final_op_done or self._started_after_heal(c)
        self._arm_timer(c, self.rng.randint(1, self.p.think_time))
        return None

    def _started_after_heal(self, c: SimClient) -> bool:
        return c.started >= self.p.safety_time

    def _reply(self, node: SimNode, reply: ClientReply) -> None:
        lease = reply.client >= LEASE_CLIENT_BASE
        delay = self._client_delay(self._lease_rng if lease else self.rng)
        if delay is not None:
            self._push(self.now + delay, REPLY, reply)

    # ---- the server side of a client request ---------------------------------------------------

    def _on_request(self, nid: int, req: ClientRequest) -> None:
        node = self.nodes[nid]
        raft = node.raft
        if raft is None:
            return  # sent to a dead server: lost
        self.log(f"n{nid} <- c{req.client} seq {req.seq} attempt {req.attempt} {req.kind.value}")
        if req.kind is OpKind.READ:
            if self.p.bug == "stale_reads":  # BUG on purpose: no ReadIndex, local state
                return self._reply(
                    node, ClientReply(req.client, req.seq, req.attempt, True, node.kv.read(req.key))
                )
            ctx = msgpack.packb([req.client, req.seq, req.attempt])
            try:
                raft.read_index(ctx)
            except RaftError as e:
                return self._redirect(node, req, getattr(e, "leader_hint", raft.leader_id))
            _bounded_put(node.pending_reads, ctx, req, node.MAX_PENDING)
        else:
            ts = self._wall(node) if self.lease_check is not None else None
            if isinstance(req.kind, LeaseOp):
                data = self._lease_command(req, ts)
            elif req.kind is OpKind.WRITE:
                data = encode_command(req.client, req.seq, "w", req.key, req.args, None, ts)
            else:
                expected, new = req.args
                data = encode_command(req.client, req.seq, "c", req.key, expected, new, ts)
            try:
                raft.propose(data)
            except ProposalDropped as e:
                return self._redirect(node, req, e.leader_hint)
            _bounded_put(node.pending_writes, (req.client, req.seq), req.attempt, node.MAX_PENDING)
        self._drain(node)
        return None

    def _redirect(self, node: SimNode, req: ClientRequest, hint: int) -> None:
        self._reply(node, ClientReply(req.client, req.seq, req.attempt, False, None, hint))

    # ---- leases ------------------------------------------------------------------------------

    def _wall(self, node: SimNode) -> int:
        """The node's wall clock: the timestamp of what it proposes."""
        return self.now + node.wall_offset

    @staticmethod
    def _lease_command(req: ClientRequest, ts: int | None) -> bytes:
        if req.kind is LeaseOp.GRANT:
            lease, ttl = req.args
            return encode_command(req.client, req.seq, "g", "", lease, ttl, ts)
        if req.kind is LeaseOp.KEEPALIVE:
            return encode_command(req.client, req.seq, "k", "", req.args, None, ts)
        value, lease = req.args
        return encode_command(req.client, req.seq, "W", req.key, value, lease, ts)

    def _became_leader(self, node: SimNode, term: int) -> None:
        """The server's ``_on_role``: a new leader expires no lease for one election timeout
        (``election_tick`` of its own ticks) and forgets what it proposed before."""
        assert self.lease_check is not None
        grace_until = self.now + self.p.election_tick * node.period
        # BUG on purpose with "no_lease_grace": it may expire leases at once
        node.lease_grace_until = self.now if self.p.bug == "no_lease_grace" else grace_until
        node.grace_noted = False
        node.expiry_proposed.clear()
        self.lease_check.on_leader(node.id, term, self.now, grace_until)

    def _expire_leases(self, node: SimNode) -> None:
        """The leader's scan, every tick (the server's ``_expire_leases``): propose the expiry
        of the leases due on its wall clock in its applied state, not in its grace; a lease
        already named waits an election timeout before it is named again. The apply checks
        again, on the log clock."""
        raft = node.raft
        assert raft is not None and self.lease_check is not None
        if raft.role is not Role.LEADER:
            return
        wall = self._wall(node)
        due = node.kv.due(wall)
        if not due:
            return
        if self.now < node.lease_grace_until:
            if not node.grace_noted:
                node.grace_noted = True
                self.stats["lease_grace_waits"] += 1
                self.log(f"n{node.id} holds back the expiry of leases {due} until its grace "
                         f"ends at t={node.lease_grace_until}")
            return
        proposed = node.expiry_proposed
        due = [lid for lid in due if self.now - proposed.get(lid, -(1 << 62)) >= self.election_timeout]
        if not due:
            return
        data = encode_command(0, 0, "x", "", due, None, wall)
        try:
            raft.propose(data)
        except ProposalDropped:
            return
        for lid in due:
            proposed[lid] = self.now
        self.lease_check.on_expire_proposed(raft.term, data, self.now)
        self.log(f"n{node.id} proposes the expiry of leases {due} (wall clock {wall})")
        self._drain(node)

    def _lease_arm(self, c: LeaseClient, after: int) -> None:
        c.timer_token += 1
        self._push(self.now + after, CLIENT_TIMER, c.id, c.timer_token)

    def _lease_interval(self, c: LeaseClient) -> int:
        ttl = self.lease_ttl
        if c.role == "racer":
            return self._lease_rng.randint(ttl * 85 // 100, ttl * 105 // 100)
        return ttl // 3

    def _on_lease_timer(self, c: LeaseClient, token: int) -> None:
        """A lease client's next step (see :class:`LeaseClient`), or a retry of its
        outstanding operation."""
        if token != c.timer_token:
            return None
        if c.op is not None:
            return self._lease_attempt(c)
        if c.state == "keep" and c.role == "lapser" and c.keepalives <= 0:
            c.state = "lapsed"
            self.log(f"c{c.id} stops keeping lease {c.lease} alive")
            if not self.liveness:  # it grants a new lease later (in the safety phase only)
                self._lease_arm(c, self.lease_ttl + self._lease_rng.randint(0, self.lease_ttl))
            return None
        if c.state == "lapsed":
            if self.liveness:
                return None
            c.state, c.keepalives = "grant", self._lease_rng.randint(0, 3)
        op: LeaseOp
        if c.state == "grant":
            c.gen += 1
            c.lease = c.id * 1_000_000 + c.gen
            c.granted.append(c.lease)
            op, c.args = LeaseOp.GRANT, (c.lease, self.lease_ttl)
        elif c.state == "attach":
            op, c.args = LeaseOp.PUT, (c.id * 1_000_000 + c.seq + 1, c.lease)
        else:
            op, c.args = LeaseOp.KEEPALIVE, c.lease
        c.seq += 1
        c.op, c.started, c.attempt = op, self.now, 0
        self.log(f"c{c.id} calls seq {c.seq} {op.value}{c.args!r}")
        return self._lease_attempt(c)

    def _lease_attempt(self, c: LeaseClient) -> None:
        c.attempt += 1
        if not c.leader_hint or c.attempt % 3 == 0:
            target = self._lease_rng.choice(self.ids)
        else:
            target = c.leader_hint
        delay = self._client_delay(self._lease_rng)
        if delay is not None:
            self._push(self.now + delay, REQUEST, target, c.request())
        self._lease_arm(c, self.p.client_retry)

    def _on_lease_reply(self, c: LeaseClient, reply: ClientReply) -> None:
        if c.op is None or reply.seq != c.seq:
            return None
        if not reply.ok:
            self.stats["redirects"] += 1
            c.leader_hint = reply.leader_hint
            return self._lease_arm(c, self._lease_rng.randint(5, 15))
        assert self.lease_check is not None
        op, result = c.op, reply.value
        c.op = None
        self.log(f"c{c.id} returns seq {c.seq} {op.value} -> {result!r} (attempt {reply.attempt})")
        if result == LEASE_NOT_FOUND:  # its lease is gone: grant a new one
            c.lost += 1
            c.state = "grant"
            return self._lease_arm(c, self._lease_rng.randint(1, self.p.think_time))
        if self.liveness and c.started >= self.p.safety_time:
            c.acked_after_heal = True
        if op is LeaseOp.GRANT:
            self.lease_check.on_ack(c.lease, c.started)
            c.state = "attach"
            return self._lease_arm(c, self._lease_rng.randint(1, self.p.think_time))
        if op is LeaseOp.KEEPALIVE:
            self.lease_check.on_ack(c.lease, c.started)
            c.keepalives -= 1
        c.state = "keep"
        return self._lease_arm(c, self._lease_interval(c))

    def _lease_problem(self) -> str | None:
        """Why the lease clients have not finished in the healed phase (None: they have):
        every keeper and racer had an operation invoked after healing acknowledged and every
        lapser stopped; no member holds a lease but the keepers' and racers' current ones
        (every other one is due: its holder stopped keeping it alive), a lapser's key, or a
        keeper's key not attached to its current lease."""
        leader = self._leader()
        if not self.liveness or leader is None:
            return "no leader since healing"
        members = [self.nodes[i].kv for i in self._members(leader)]
        kept = {c.lease for c in self.lease_clients if c.role != "lapser"}
        problems: list[str] = []
        for c in self.lease_clients:
            for lid in c.granted:
                if lid in kept:
                    continue
                holders = [kv for kv in members if lid in kv.leases]
                if holders and not problems:
                    problems.append(f"lease {lid} of c{c.id}, not kept alive, still held by "
                                    f"{len(holders)} of {len(members)} members")
            if c.role == "lapser":
                if c.state != "lapsed" or c.op is not None:
                    problems.append(f"c{c.id} has not stopped keeping its lease alive")
                elif any(c.key in kv.kv for kv in members):
                    problems.append(f"c{c.id}'s key {c.key} outlives its lease {c.lease}")
            elif not c.acked_after_heal:
                problems.append(f"c{c.id} had no operation invoked after healing acknowledged")
            elif c.role == "keeper" and any(kv.key_lease.get(c.key) != c.lease for kv in members):
                problems.append(f"c{c.id}'s key {c.key} is not attached to its lease {c.lease} "
                                "on every member")
        return "; ".join(problems[:3]) or None

    def _check_lease_liveness(self) -> None:
        """After the healed phase (:meth:`_finished` already required every lease not kept
        alive, and a lapser's key, gone from every member): each lease first revoked after
        healing was revoked within ``lease_bound`` units of ``max(due, heal, grace)``, where
        ``due`` = its last renewal on the log clock + TTL (wall clocks are exact after
        healing) and ``grace`` = when the grace of the last leader elected by then ended: a
        lease is revoked promptly once it is due and a leader past its grace is in office."""
        if self.lease_check is None:
            return
        worst = 0
        heal = self.p.safety_time
        for lid, lease in self.lease_check.gone.items():
            if lease.revoked_at is None or lease.revoked_at < heal:
                continue
            due = lease.renewed + lease.ttl
            term, (_, _, grace) = max(
                (t, start) for t, start in self.lease_check.leader_starts.items()
                if start[1] <= lease.revoked_at)
            lag = lease.revoked_at - max(due, heal, grace)
            worst = max(worst, lag)
            if lag > self.lease_bound:
                raise LivenessFailure(
                    f"lease {lid} of c{lease.holder}, due at t={due}, was revoked only at "
                    f"t={lease.revoked_at}, {lag} units after max(due, heal, the end of the grace "
                    f"of the leader of term {term}: t={grace}) (bound {self.lease_bound})")
        self.stats["lease_expiry_lag_max"] = worst

    # ---- faults, healing, liveness ---------------------------------------------------------------

    def _on_fault(self, _a: Any, _b: Any) -> None:
        """One decision of the fault schedule, then schedule the next one."""
        if self.liveness:
            return
        actions = (
            (12, self._fault_crash),
            (18, self._fault_restart),
            (12, self._fault_partition),
            (8, self._fault_one_way),
            (14, self._fault_heal_links),
            (16, self._network_weather),
            (8, self._fault_clock),
            (8, self._fault_crash_after_reply),
            (6, self._transfer_leadership),
            (10 if self.p.membership else 0, self._change_membership),
        )
        roll = self.rng.random() * sum(w for w, _ in actions)
        for weight, action in actions:
            roll -= weight
            if roll < 0:
                action()
                break
        spread = self.rng.randint(self.p.fault_every // 2, self.p.fault_every * 3 // 2)
        self._push(self.now + spread, FAULT)

    def _fault_crash(self) -> None:
        alive = [n for n in self.nodes.values() if n.alive]
        if not alive:
            return
        node = self.rng.choice(alive)
        if self.rng.random() < 0.5:
            self._crash(node, "fault schedule")
        else:
            node.crash_point, node.crash_trigger = self.rng.choice(CRASH_POINTS), None
            self.log(f"n{node.id} will crash at its next ready ({node.crash_point})")

    def _fault_crash_after_reply(self) -> None:
        """Arm a node to crash right after it grants a vote or acknowledges entries, and to
        come back a moment later: the window where anything not durable would be forgotten
        (a second vote in one term, an acknowledged entry lost)."""
        alive = [n for n in self.nodes.values() if n.alive]
        if not alive:
            return
        node = self.rng.choice(alive)
        node.crash_trigger = self.rng.choice(
            (MessageType.VOTE_RESP, MessageType.APPEND_RESP, MessageType.PRE_VOTE_RESP)
        )
        node.crash_point = "after_send"
        node.restart_after = self.rng.randint(1, 3 * self.p.tick_unit)
        self.log(f"n{node.id} will crash after its next granted {node.crash_trigger.name}")

    def _fault_restart(self) -> None:
        dead = [n for n in self.nodes.values() if not n.alive]
        if dead:
            node = self.rng.choice(dead)
            wipe = self._wipe_rng.random() < self.p.wipe_fraction
            if wipe and not any(n.recovering for n in self.nodes.values() if n is not node):
                self._wipe(node)
            self.log(f"n{node.id} RESTART from storage")
            self.stats["restarts"] += 1
            self._boot(node)

    def _wipe(self, node: SimNode) -> None:
        """The node's disk is lost: it comes back with an empty one (the bootstrap
        configuration only) and in recovering mode until a leader has repaired it."""
        node.storage = MemoryStorage(conf_state=self.bootstrap_conf)
        # BUG on purpose with "wiped_node_votes": it votes at once, possibly a second time
        node.recovering = self.p.bug != "wiped_node_votes"
        self.stats["wipes"] += 1
        self.log(f"n{node.id} LOST ITS DISK: restarts empty, recovering")

    def _fault_partition(self) -> None:
        side = set(self.rng.sample(self.ids, self.rng.randint(1, len(self.ids) // 2)))
        self.net.heal_links()
        self.net.partition(side)
        self.log(f"partition {sorted(side)} | rest")

    def _fault_one_way(self) -> None:
        a, b = self.rng.sample(self.ids, 2)
        self.net.block_one_way(a, b)
        self.log(f"one-way partition: {a} -> {b} blocked")

    def _fault_heal_links(self) -> None:
        self.net.heal_links()
        self.log("links healed")

    def _fault_clock(self) -> None:
        node = self.rng.choice(list(self.nodes.values()))
        node.period = self._random_period()
        self.log(f"n{node.id} now ticks every {node.period} units")
        skew = self.p.lease_clock_skew
        if skew and self.lease_check is not None:
            node.wall_offset = self._lease_rng.randint(-skew, skew)
            self.log(f"n{node.id}'s wall clock is now off by {node.wall_offset} units")

    def _change_membership(self) -> None:
        """Ask the leader for a membership change: add a learner, add or remove a voter
        (single-server), or swap a voter for another in one joint-consensus change."""
        leader = self._leader()
        if leader is None or leader.raft is None:
            return
        cs = leader.raft.status().conf_state
        voters, learners = set(cs.voters) | set(cs.voters_outgoing), set(cs.learners)
        outsiders = [i for i in self.ids if i not in voters and i not in learners]
        choices: list[tuple[tuple[ConfChangeType, int], ...]] = []
        if outsiders:
            choices.append(((ConfChangeType.ADD_LEARNER, self.rng.choice(outsiders)),))
        for x in sorted(learners) + outsiders:
            choices.append(((ConfChangeType.ADD_VOTER, x),))
        if len(cs.voters) > 3:  # keep three voters: liveness needs a healthy majority
            choices.append(((ConfChangeType.REMOVE_VOTER, self.rng.choice(sorted(cs.voters))),))
        if outsiders or learners:
            joiner = self.rng.choice(sorted(learners) + outsiders)
            leaver = self.rng.choice(sorted(cs.voters))
            choices.append(
                ((ConfChangeType.ADD_VOTER, joiner), (ConfChangeType.REMOVE_VOTER, leaver))
            )
        if not choices:
            return
        cc = ConfChange(self.rng.choice(choices))
        text = ", ".join(f"{k.name} {n}" for k, n in cc.changes)
        try:
            leader.raft.propose_conf_change(cc)
        except RaftError as e:
            self.log(f"n{leader.id} refused membership change [{text}]: {e}")
            return
        self.stats["conf_changes"] += 1
        self.log(f"n{leader.id} proposes membership change [{text}]")
        self._drain(leader)

    def _network_weather(self) -> None:
        f = self.net.faults
        f.drop = self.rng.choice((0.0, 0.0, 0.02, 0.1, 0.3))
        f.duplicate = self.rng.choice((0.0, 0.05, 0.2))
        f.max_delay = self.rng.choice((3, 10, 40))
        self.log(f"network: drop={f.drop} duplicate={f.duplicate} max_delay={f.max_delay}")

    def _transfer_leadership(self) -> None:
        leaders = [
            n for n in self.nodes.values() if n.raft is not None and n.raft.role is Role.LEADER
        ]
        if not leaders:
            return
        node = self.rng.choice(leaders)
        to = self.rng.choice([i for i in self.ids if i != node.id])
        self.log(f"n{node.id} asked to transfer leadership to n{to}")
        self.stats["transfers"] += 1
        assert node.raft is not None
        try:
            node.raft.transfer_leadership(to)
        except RaftError as e:
            self.log(f"n{node.id} refused the transfer: {e}")
        self._drain(node)

    def _heal(self) -> None:
        """Start the liveness phase: a perfect network, every node up, no more faults."""
        self.liveness = True
        self.net.faults.heal()
        self.log("HEAL: liveness phase starts")
        for node in self.nodes.values():
            node.crash_point, node.crash_trigger, node.restart_after = None, None, None
            if self.p.heal_clocks:
                unit = self.p.tick_unit
                node.period = self.rng.randint(unit * 85 // 100, unit * 115 // 100)
                node.wall_offset = 0
            if not node.alive:
                self.log(f"n{node.id} RESTART from storage")
                self._boot(node)
        for c in self.clients:
            if not c.busy:
                self._arm_timer(c, self.rng.randint(1, self.p.think_time))

    def _leader(self) -> SimNode | None:
        for node in self.nodes.values():
            if node.raft is not None and node.raft.role is Role.LEADER:
                return node
        return None

    def _finished(self) -> bool:
        """Liveness reached: every client finished, a leader leads, and every member of its
        configuration has applied everything the leader committed; with leases also every
        lease client finished (:meth:`_lease_problem`)."""
        if self.lease_check is not None and self._lease_problem() is not None:
            return False
        if not all(c.final_op_done for c in self.clients):
            return False
        leader = self._leader()
        if leader is None or leader.raft is None:
            return False
        target = leader.raft.commit_index
        return all(self.nodes[i].kv.applied >= target for i in self._members(leader))

    def _members(self, leader: SimNode) -> list[int]:
        assert leader.raft is not None
        cs = leader.raft.status().conf_state
        return sorted(set(cs.voters) | set(cs.voters_outgoing) | set(cs.learners))

    def _check_replicas_agree(self) -> None:
        """At the end, replicas that applied the same prefix must hold the same state:
        this catches a wrong snapshot install or restore, which per-entry checks cannot."""
        leader = self._leader()
        assert leader is not None
        by_index: dict[int, tuple[int, bytes]] = {}
        for nid in self._members(leader):
            kv = self.nodes[nid].kv
            state = kv.snapshot()
            first = by_index.setdefault(kv.applied, (nid, state))
            if first[1] != state:
                raise InvariantViolation(
                    "replica agreement",
                    f"nodes {first[0]} and {nid} applied up to {kv.applied} but hold different "
                    f"states: {self.nodes[first[0]].kv.kv} vs {kv.kv}",
                )

    def _liveness_problem(self) -> str:
        busy = [f"c{c.id} seq {c.seq} {c.kind.value}({c.key})" for c in self.clients if c.busy]
        status = ", ".join(
            f"n{n.id}: {n.raft.role.name} term {n.raft.term} commit {n.raft.commit_index} "
            f"applied {n.kv.applied}"
            if n.raft is not None
            else f"n{n.id}: down"
            for n in self.nodes.values()
        )
        leader = self._leader()
        leases = self._lease_problem() if self.lease_check is not None else None
        return (
            f"{self.p.liveness_time} units after healing: leader="
            f"{f'n{leader.id}' if leader else 'none'}; "
            f"unfinished: {busy or 'none'}; nodes: {status}"
            + (f"; leases: {leases}" if leases else "")
        )


def _bounded_put(table: dict, key: Any, value: Any, limit: int) -> None:
    """Insert into a table that forgets its oldest entry beyond ``limit`` (the client retries)."""
    table[key] = value
    if len(table) > limit:
        del table[next(iter(table))]


def _describe(m: Message) -> str:
    parts = [f"{m.frm}->{m.to} {m.type.name} term={m.term}"]
    if m.type in (MessageType.APPEND, MessageType.APPEND_RESP, MessageType.HEARTBEAT):
        parts.append(f"idx={m.index} logterm={m.log_term} commit={m.commit}")
    if m.entries:
        parts.append(f"entries={m.entries[0].index}..{m.entries[-1].index}")
    if m.reject:
        parts.append(f"REJECT hint={m.reject_hint}")
    if m.snapshot is not None:
        parts.append(f"snapshot@{m.snapshot.metadata.index}")
    return " ".join(parts)


def run_seed(seed: int, params: SimParams | None = None) -> SeedResult:
    """Run one seed; the result says whether every check passed and how to replay it."""
    return Simulation(seed, params).run()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="coordinator sim",
        description="Run the deterministic Raft simulator over a range of seeds. Every seed "
        "injects faults, checks Raft's safety invariants after every event, demands progress "
        "once the cluster is healed, and checks the client history for linearizability.",
    )
    ap.add_argument("--seeds", type=int, default=100, help="how many seeds to run (default 100)")
    ap.add_argument("--start", type=int, default=0, help="first seed (default 0)")
    ap.add_argument("--verbose", action="store_true", help="one line per seed, and full traces")
    ap.add_argument("--nodes", type=int, default=0, help="cluster size (default: 3 or 5 by seed)")
    ap.add_argument(
        "--safety-time",
        type=int,
        default=SimParams.safety_time,
        help="time units of the faulty phase per seed",
    )
    ap.add_argument("--clients", type=int, default=SimParams.clients, help="concurrent clients")
    ap.add_argument("--keys", type=int, default=SimParams.keys, help="keys the clients share")
    ap.add_argument("--no-faults", action="store_true", help="a perfect network, no crashes")
    ap.add_argument(
        "--bug", choices=BUGS, default=None, help="inject a known bug, to see the checkers catch it"
    )
    ap.add_argument(
        "--leases",
        type=int,
        default=None,
        help="lease clients (default 0; 3 with a lease bug): keepers, lapsers and racers",
    )
    ap.add_argument(
        "--lease-skew", type=int, default=0, help="wall-clock offsets up to this many units"
    )
    ap.add_argument(
        "--max-failures",
        type=int,
        default=10,
        help="stop after this many failing seeds (default 10)",
    )
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.start < 0:
        ap.error("--seeds must be >= 1 and --start >= 0")
    if not 1 <= args.clients <= 100 or not 1 <= args.keys <= 100:
        ap.error("--clients and --keys must be between 1 and 100")
    if args.leases is None:
        args.leases = 3 if args.bug in LEASE_BUGS else 0
    if not 0 <= args.leases <= 100 or args.lease_skew < 0:
        ap.error("--leases must be between 0 and 100 and --lease-skew >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``coordinator sim`` and ``python -m coordinator.testing.simulator``.

    Returns 0 when every seed passed, 1 when any failed (each failure printed with its
    ``SEED=``), 2 for bad arguments (argparse exits).
    """
    args = _parse_args(argv)
    params = replace(
        SimParams(),
        nodes=args.nodes,
        clients=args.clients,
        keys=args.keys,
        safety_time=args.safety_time,
        faults=not args.no_faults,
        bug=args.bug,
        lease_clients=args.leases,
        lease_clock_skew=args.lease_skew,
    )
    started, cpu_started = time.monotonic(), time.process_time()
    last_progress = started
    failures: list[int] = []
    unknown = ran = 0
    for seed in range(args.start, args.start + args.seeds):
        result = run_seed(seed, params)
        ran += 1
        unknown += result.linearizability is CheckResult.UNKNOWN
        if args.verbose:
            print(
                f"seed {seed}: {'ok' if result.ok else 'FAILED'} trace={result.trace_hash} "
                f"lin={result.linearizability.value} {result.stats}",
                flush=True,
            )
        if not result.ok:
            failures.append(seed)
            print(result.report() if args.verbose else _short_report(result), flush=True)
            if len(failures) >= args.max_failures:
                print(f"stopping after {len(failures)} failures", flush=True)
                break
        now = time.monotonic()
        if now - last_progress >= 10 or ran == args.seeds:
            last_progress = now
            print(
                f"[sim] {ran}/{args.seeds} seeds from {args.start}, {len(failures)} failed, "
                f"{ran / max(now - started, 1e-9) * 60:.0f} seeds/min",
                flush=True,
            )
    elapsed = time.monotonic() - started
    cpu = time.process_time() - cpu_started
    print(
        f"ran {ran} seeds ({args.start}..{args.start + ran - 1}) in {elapsed:.1f} s: "
        f"{ran / max(elapsed, 1e-9) * 60:.0f} seeds/min ({cpu:.1f} s of CPU: "
        f"{ran / max(cpu, 1e-9) * 60:.0f} seeds/min per busy core); failed: {len(failures)}"
        f"{' ' + str(failures) if failures else ''}; linearizability unknown: {unknown}"
    )
    return 1 if failures else 0


def _short_report(result: SeedResult, lines: int = 40) -> str:
    short = replace(result, trace=result.trace[-lines:])
    return short.report()


if __name__ == "__main__":
    sys.exit(main())
