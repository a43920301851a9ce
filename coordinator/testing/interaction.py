"""Data-driven interaction tests for the Raft core (etcd-io/raft ``testdata/*.txt`` style).

Theory of operation
-------------------
A test file is a script of commands, each followed by ``----`` and the trace it is expected
to print, records separated by blank lines; ``#`` lines are comments. Running a file
replays every command against an :class:`InteractionEnv` -- a handful of ``RaftNode``\\ s with
``MemoryStorage``, a message queue and a toy state machine -- and compares each trace with
the expected one. With ``REWRITE=1`` in the environment the file is rewritten with the
actual traces instead (review the diff, then commit it).

``restart ID wipe=true recovering=true`` brings a crashed node back with an empty disk (its
bootstrap configuration only) in the core's recovering mode; the environment keeps passing
``recovering`` on restarts until a Ready in which the node reports itself repaired has been
persisted, as a server's marker file would.

The environment is a faithful, fully manual driver: ``process-ready`` persists a node's
Ready (entries, hard state, snapshot) *before* its messages join the network queue, then
applies committed entries and calls ``advance``; ``deliver-msgs`` hands queued messages to
their recipients. Nothing happens unless a command says so, so a trace is a readable story.

Commands (``ID`` is a node id; ``(a,b)`` lists take no spaces)::

    add-nodes N [voters=(1,2,3)] [learners=(4)] [pre_vote=true] [check_quorum=true]
              [election_tick=10] [heartbeat_tick=1] [max_size_per_msg=N] [max_inflight_msgs=N]
    campaign ID | tick ID [N] | tick-election ID | tick-heartbeat ID | tick-all [N]
    propose ID DATA | propose-batch ID D1 D2 ... | propose-conf-change ID v4 l5 r2
    read-index ID CTX | transfer-leadership from=ID to=ID
    process-ready [ID...] | deliver-msgs [ID...] [drop=(ID,...)] | stabilize [ID...]
    partition ID... | heal | crash ID | restart ID [wipe=true] [recovering=true] | compact ID INDEX
    raft-state | raft-log ID | status ID | report-unreachable ID PEER | drop-stats ID
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.raft import (
    ConfChange,
    ConfChangeType,
    Config,
    ConfState,
    Entry,
    EntryType,
    MemoryStorage,
    Message,
    MessageType,
    RaftError,
    RaftNode,
    Ready,
    decode_conf_change,
)

__all__ = ["InteractionEnv", "run_file", "parse_file", "format_message", "format_entry"]

MT = MessageType
_MAX_STABILIZE_ROUNDS = 1000


# ---------------------------------------------------------------------------------------
# formatting


def _fmt_cc(data: bytes) -> str:
    cc = decode_conf_change(data)
    letters = {ConfChangeType.ADD_VOTER: "v", ConfChangeType.REMOVE_VOTER: "r",
               ConfChangeType.ADD_LEARNER: "l"}
    return "conf(" + " ".join(f"{letters[t]}{n}" for t, n in cc.changes) + ")"


def format_entry(e: Entry) -> str:
    if e.type is EntryType.CONF_CHANGE:
        return f"{e.term}/{e.index} {_fmt_cc(e.data)}"
    return f"{e.term}/{e.index} {e.data.decode('utf-8', 'backslashreplace')!r}"


def format_conf_state(cs: ConfState) -> str:
    s = "voters=(" + ",".join(map(str, cs.voters)) + ")"
    if cs.voters_outgoing:
        s += "&&(" + ",".join(map(str, cs.voters_outgoing)) + ")"
    if cs.learners:
        s += " learners=(" + ",".join(map(str, cs.learners)) + ")"
    if cs.learners_next:
        s += " learners_next=(" + ",".join(map(str, cs.learners_next)) + ")"
    if cs.auto_leave:
        s += " autoleave"
    return s


def format_message(m: Message) -> str:
    """One line, e.g. ``1->2 APPEND term=1 log=1/3 commit=3 entries=[1/4 'foo']``."""
    head = f"{m.frm}->{m.to} {m.type.name} term={m.term}"
    t = m.type
    if t in (MT.VOTE, MT.PRE_VOTE):
        tail = f" log={m.log_term}/{m.index}" + (" transfer" if m.context else "")
    elif t is MT.APPEND:
        ents = ", ".join(format_entry(e) for e in m.entries)
        tail = f" log={m.log_term}/{m.index} commit={m.commit}" + (f" entries=[{ents}]" if ents else "")
    elif t is MT.APPEND_RESP:
        tail = (f" rejected index={m.index} hint={m.log_term}/{m.reject_hint}" if m.reject
                else f" index={m.index}")
    elif t is MT.HEARTBEAT:
        tail = f" commit={m.commit}" + (f" ctx={m.context.decode()!r}" if m.context else "")
    elif t in (MT.HEARTBEAT_RESP, MT.READ_INDEX):
        tail = f" ctx={m.context.decode()!r}" if m.context else ""
    elif t is MT.READ_INDEX_RESP:
        tail = (" rejected" if m.reject else f" index={m.index}") + f" ctx={m.context.decode()!r}"
    elif t is MT.SNAPSHOT:
        md = m.snapshot.metadata if m.snapshot else None
        tail = f" snap={md.term}/{md.index} {format_conf_state(md.conf_state)}" if md else ""
    elif t is MT.TRANSFER_LEADER:
        tail = f" transferee={m.index}"
    else:
        tail = " rejected" if m.reject else ""
    return head + tail


# ---------------------------------------------------------------------------------------
# the environment


@dataclass
class _Peer:
    storage: MemoryStorage
    config: Config
    node: RaftNode | None
    applied: list[bytes] = field(default_factory=list)
    bootstrap: ConfState | None = None  # what a wiped disk starts from


class InteractionEnv:
    """Nodes, a message queue, partitions. ``handle(cmd, args) -> str`` runs one command."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.peers: dict[int, _Peer] = {}
        self.queue: list[Message] = []
        self.cut: set[int] = set()  # partitioned-off nodes (isolated from everyone else)
        self.out: list[str] = []

    def _p(self, *lines: str) -> None:
        self.out.extend(lines)

    def node(self, i: int) -> RaftNode:
        p = self.peers.get(i)
        if p is None:
            raise KeyError(f"no node {i}")
        if p.node is None:
            raise KeyError(f"node {i} is crashed")
        return p.node

    def handle(self, cmd: str, args: list[str]) -> str:
        self.out = []
        fn = _COMMANDS.get(cmd)
        if fn is None:
            raise ValueError(f"unknown command {cmd!r}; known: {', '.join(sorted(_COMMANDS))}")
        pos, kw = _split_args(args)
        try:
            fn(self, pos, kw)
        except (RaftError, KeyError) as exc:
            self._p(f"error: {type(exc).__name__}: {exc}")
        return "\n".join(self.out) if self.out else "ok"

    # ---- building ---------------------------------------------------------------------

    def add_nodes(self, n: int, kw: dict[str, str]) -> None:
        voters = _ids(kw.get("voters", ""))
        learners = _ids(kw.get("learners", ""))
        opts = {k: v for k, v in kw.items() if k not in ("voters", "learners")}
        for _ in range(n):
            i = max(self.peers, default=0) + 1
            cs = ConfState(voters=voters, learners=learners) if voters else None
            cfg = Config(id=i, **{k: _value(v) for k, v in opts.items()})  # type: ignore[arg-type]
            st = MemoryStorage(cs)
            self.peers[i] = _Peer(st, cfg, None, bootstrap=cs)
            self._start(i)
            self._p(f"INFO node {i} added: {format_conf_state(cs) if cs else 'blank (joins via leader)'}")

    def _start(self, i: int) -> None:
        p = self.peers[i]
        rng = random.Random(self.seed * 1000 + i)
        p.node = RaftNode(p.config, p.storage, rng)
        snap = p.storage.snapshot()
        p.applied = _decode_sm(snap.data)

    # ---- the driver loop --------------------------------------------------------------

    def process_ready(self, i: int) -> bool:
        n = self.node(i)
        if not n.has_ready():
            return False
        rd = n.ready()
        self._p(f"> {i} handling Ready")
        self._print_ready(rd)
        p = self.peers[i]
        if rd.snapshot is not None:  # durable first ...
            p.storage.apply_snapshot(rd.snapshot)
            p.applied = _decode_sm(rd.snapshot.data)
        p.storage.append(rd.entries)
        if rd.hard_state is not None:
            p.storage.set_hard_state(rd.hard_state)
        self.queue.extend(rd.messages)  # ... then send
        for e in rd.committed_entries:
            if e.type is EntryType.CONF_CHANGE:
                cs = n.apply_conf_change(decode_conf_change(e.data))
                self._p(f"  INFO {i} applied {_fmt_cc(e.data)}: {format_conf_state(cs)}")
            elif e.data:
                p.applied.append(e.data)
        n.advance(rd)
        n.check_invariants()
        if p.config.recovering and not n.recovering:
            p.config = dataclasses.replace(p.config, recovering=False)
            self._p(f"  INFO {i} repaired: it votes and campaigns again")
        return True

    def _print_ready(self, rd: Ready) -> None:
        if rd.soft_state is not None:
            self._p(f"  Lead:{rd.soft_state.leader_id} State:{rd.soft_state.role.name}")
        if rd.hard_state is not None:
            hs = rd.hard_state
            self._p(f"  HardState Term:{hs.term} Vote:{hs.vote} Commit:{hs.commit}")
        if rd.snapshot is not None:
            md = rd.snapshot.metadata
            self._p(f"  Snapshot {md.term}/{md.index} {format_conf_state(md.conf_state)}")
        _section(self._p, "Entries", [format_entry(e) for e in rd.entries])
        _section(self._p, "CommittedEntries", [format_entry(e) for e in rd.committed_entries])
        _section(self._p, "Messages", [format_message(m) for m in rd.messages])
        _section(self._p, "ReadStates", [f"index={r.index} ctx={r.context.decode()!r}"
                                         for r in rd.read_states])
        _section(self._p, "DroppedReads", [repr(c.decode()) for c in rd.dropped_reads])
        _section(self._p, "Notices", rd.notices)

    def deliver(self, only: set[int] | None, drop: set[int]) -> int:
        """Deliver (or drop) queued messages to ``only`` (default: all). Returns the count."""
        keep: list[Message] = []
        todo: list[Message] = []
        for m in self.queue:
            (todo if only is None or m.to in only else keep).append(m)
        self.queue = keep
        n = 0
        for m in todo:
            p = self.peers.get(m.to)
            if m.to in drop or p is None or p.node is None or self._cut_between(m.frm, m.to):
                self._p(f"dropped: {format_message(m)}")
                continue
            self._p(format_message(m))
            p.node.step(m)
            p.node.check_invariants()
            n += 1
        return n

    def _cut_between(self, a: int, b: int) -> bool:
        return (a in self.cut) != (b in self.cut)

    def stabilize(self, ids: list[int]) -> None:
        targets = set(ids) if ids else None
        for _ in range(_MAX_STABILIZE_ROUNDS):
            moved = False
            for i in sorted(self.peers):
                if (targets is None or i in targets) and self.peers[i].node is not None:
                    moved |= self.process_ready(i)
            pending = [m for m in self.queue if targets is None or m.to in targets]
            if pending:
                moved = True
                self.deliver(targets, set())
            if not moved:
                return
        raise AssertionError(f"stabilize did not converge in {_MAX_STABILIZE_ROUNDS} rounds")

    # ---- state dumps ------------------------------------------------------------------

    def raft_state(self) -> None:
        for i, p in sorted(self.peers.items()):
            if p.node is None:
                self._p(f"{i}: crashed")
                continue
            n = p.node
            voter = "Voter" if n.trk.is_voter(i) else (
                "Learner" if i in n.trk.progress else "NonMember")
            self._p(f"{i}: {n.role.name} ({voter}) Term:{n.term} Lead:{n.leader_id} "
                    f"Commit:{n.commit_index} Applied:{n.log.applied} Last:{n.log.last_index()}"
                    + (" Recovering" if n.recovering else ""))

    def raft_log(self, i: int) -> None:
        n = self.node(i)
        lo = n.log.first_index()
        ents = n.log.slice(lo, n.log.last_index() + 1)
        if lo > 1:
            self._p(f"log starts after snapshot at {lo - 1}")
        if not ents:
            self._p("log is empty")
        self._p(*(format_entry(e) for e in ents))


# ---------------------------------------------------------------------------------------
# commands


def _cmd_add_nodes(env: InteractionEnv, pos: list[str], kw: dict[str, str]) -> None:
    env.add_nodes(int(pos[0]), kw)


def _cmd_tick(env: InteractionEnv, pos: list[str], kw: dict[str, str], times=None) -> None:
    n = env.node(int(pos[0]))
    count = times(n) if times else (int(pos[1]) if len(pos) > 1 else 1)
    for _ in range(count):
        n.tick()
        n.check_invariants()


def _cmd_tick_all(env: InteractionEnv, pos: list[str], kw: dict[str, str]) -> None:
    for _ in range(int(pos[0]) if pos else 1):
        for p in env.peers.values():
            if p.node is not None:
                p.node.tick()


def _cmd_propose_conf_change(env: InteractionEnv, pos: list[str], kw: dict[str, str]) -> None:
    kinds = {"v": ConfChangeType.ADD_VOTER, "r": ConfChangeType.REMOVE_VOTER,
             "l": ConfChangeType.ADD_LEARNER}
    changes = tuple((kinds[s[0]], int(s[1:])) for s in pos[1:])
    env.node(int(pos[0])).propose_conf_change(ConfChange(changes))


def _cmd_process_ready(env: InteractionEnv, pos: list[str], kw: dict[str, str]) -> None:
    for i in [int(x) for x in pos] or sorted(env.peers):
        if env.peers[i].node is not None and not env.process_ready(i):
            env._p(f"> {i}: no Ready")


def _cmd_deliver(env: InteractionEnv, pos: list[str], kw: dict[str, str]) -> None:
    only = {int(x) for x in pos} or None
    env.deliver(only, set(_ids(kw.get("drop", ""))))


def _cmd_partition(env: InteractionEnv, pos: list[str], kw: dict[str, str]) -> None:
    env.cut = {int(x) for x in pos}
    env._p(f"INFO partitioned off: {sorted(env.cut)}")


def _cmd_heal(env: InteractionEnv, pos: list[str], kw: dict[str, str]) -> None:
    env.cut = set()


def _cmd_crash(env: InteractionEnv, pos: list[str], kw: dict[str, str]) -> None:
    i = int(pos[0])
    env.node(i)
    env.peers[i].node = None
    lost = [m for m in env.queue if m.to == i]
    env.queue = [m for m in env.queue if m.to != i]
    env._p(f"INFO node {i} crashed; {len(lost)} queued message(s) to it lost")


def _cmd_restart(env: InteractionEnv, pos: list[str], kw: dict[str, str]) -> None:
    i = int(pos[0])
    p = env.peers[i]
    if p.node is not None:
        raise KeyError(f"node {i} is running: crash it first")
    if kw.get("wipe") == "true":
        p.storage = MemoryStorage(p.bootstrap)
        p.applied = []
    if kw.get("recovering") == "true":
        p.config = dataclasses.replace(p.config, recovering=True)
    env._start(i)
    n = env.node(i)
    env._p(f"INFO node {i} restarted from {'an empty disk' if 'wipe' in kw else 'storage'}: "
           f"Term:{n.term} Vote:{n.vote} Commit:{n.commit_index} Last:{n.log.last_index()}"
           + (" (recovering)" if n.recovering else ""))


def _cmd_compact(env: InteractionEnv, pos: list[str], kw: dict[str, str]) -> None:
    i, index = int(pos[0]), int(pos[1])
    p, n = env.peers[i], env.node(i)
    if index > n.log.applied:
        raise KeyError(f"cannot snapshot at {index}: node {i} applied only {n.log.applied}")
    # the toy state machine: applied data in order; count how many were applied by `index`
    ents = p.storage.entries(p.storage.first_index(), index + 1) if index >= p.storage.first_index() else []
    prior = _decode_sm(p.storage.snapshot().data)
    upto = prior + [e.data for e in ents if e.type is EntryType.NORMAL and e.data]
    p.storage.create_snapshot(index, n.conf_state(), _encode_sm(upto))
    p.storage.compact(index)
    env._p(f"INFO node {i} snapshot at {index}, log compacted; first index now "
           f"{p.storage.first_index()}")


def _cmd_status(env: InteractionEnv, pos: list[str], kw: dict[str, str]) -> None:
    st = env.node(int(pos[0])).status()
    for i, pr in st.progress.items():
        env._p(f"{i}: {pr.state} match={pr.match} next={pr.next}"
               + (" learner" if pr.is_learner else "") + (f" inflight={pr.inflight}" if pr.inflight else ""))
    if not st.progress:
        env._p(f"{st.id} is {st.role.name}: no progress to show")


def _cmd_drop_stats(env: InteractionEnv, pos: list[str], kw: dict[str, str]) -> None:
    d = env.node(int(pos[0])).status().dropped
    env._p(*(f"{k}: {v}" for k, v in sorted(d.items())) or ["none"])


_COMMANDS: dict[str, Callable[[InteractionEnv, list[str], dict[str, str]], None]] = {
    "add-nodes": _cmd_add_nodes,
    "campaign": lambda e, p, k: e.node(int(p[0])).campaign(),
    "tick": _cmd_tick,
    "tick-election": lambda e, p, k: _cmd_tick(e, p, k, lambda n: n.cfg.election_tick),
    "tick-heartbeat": lambda e, p, k: _cmd_tick(e, p, k, lambda n: n.cfg.heartbeat_tick),
    "tick-all": _cmd_tick_all,
    "propose": lambda e, p, k: e.node(int(p[0])).propose(" ".join(p[1:]).encode()),
    "propose-batch": lambda e, p, k: e.node(int(p[0])).propose_batch([x.encode() for x in p[1:]]),
    "propose-conf-change": _cmd_propose_conf_change,
    "read-index": lambda e, p, k: e.node(int(p[0])).read_index(p[1].encode()),
    "transfer-leadership": lambda e, p, k: e.node(int(k["from"])).transfer_leadership(int(k["to"])),
    "process-ready": _cmd_process_ready,
    "deliver-msgs": _cmd_deliver,
    "stabilize": lambda e, p, k: e.stabilize([int(x) for x in p]),
    "partition": _cmd_partition,
    "heal": _cmd_heal,
    "crash": _cmd_crash,
    "restart": _cmd_restart,
    "compact": _cmd_compact,
    "raft-state": lambda e, p, k: e.raft_state(),
    "raft-log": lambda e, p, k: e.raft_log(int(p[0])),
    "status": _cmd_status,
    "drop-stats": _cmd_drop_stats,
    "report-unreachable": lambda e, p, k: e.node(int(p[0])).report_unreachable(int(p[1])),
}


# ---------------------------------------------------------------------------------------
# helpers


def _section(p: Callable[..., None], title: str, lines: list[str]) -> None:
    if lines:
        p(f"  {title}:", *(f"    {x}" for x in lines))


def _split_args(args: list[str]) -> tuple[list[str], dict[str, str]]:
    pos, kw = [], {}
    for a in args:
        if "=" in a and not a.startswith("="):
            k, v = a.split("=", 1)
            kw[k] = v
        else:
            pos.append(a)
    return pos, kw


def _ids(s: str) -> tuple[int, ...]:
    s = s.strip("()")
    return tuple(int(x) for x in s.split(",") if x)


def _value(v: str) -> int | bool:
    if v in ("true", "false"):
        return v == "true"
    return int(v)


def _encode_sm(items: list[bytes]) -> bytes:
    return b"\x00".join(items)


def _decode_sm(data: bytes) -> list[bytes]:
    return data.split(b"\x00") if data else []


# ---------------------------------------------------------------------------------------
# the file format


@dataclass
class Record:
    line_no: int
    command: str
    expected: str
    actual: str = ""


_BLANK = re.compile(r"^\s*$")


def parse_file(text: str) -> list[str | Record]:
    """Split a script into raw chunks (comments/blank lines) and command records."""
    lines = text.split("\n")
    out: list[str | Record] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if _BLANK.match(line) or line.lstrip().startswith("#"):
            out.append(line)
            i += 1
            continue
        if i + 1 >= len(lines) or lines[i + 1] != "----":
            raise ValueError(f"line {i + 1}: command {line!r} is not followed by '----'")
        j = i + 2
        while j < len(lines) and not _BLANK.match(lines[j]):
            j += 1
        out.append(Record(i + 1, line, "\n".join(lines[i + 2:j])))
        i = j
    return out


def run_file(path: str | Path, rewrite: bool | None = None) -> list[str]:
    """Run one script; return a description of each mismatch (empty = pass).
    With ``rewrite`` (default: env ``REWRITE=1``) the file is updated instead."""
    path = Path(path)
    if rewrite is None:
        rewrite = os.environ.get("REWRITE") == "1"
    chunks = parse_file(path.read_text())
    env = InteractionEnv()
    failures = []
    for c in chunks:
        if isinstance(c, str):
            continue
        cmd, *args = c.command.split()
        c.actual = env.handle(cmd, args)
        if c.actual != c.expected and not rewrite:
            failures.append(f"{path.name}:{c.line_no}: {c.command}\n--- expected\n{c.expected}"
                            f"\n--- actual\n{c.actual}")
    if rewrite:
        out = []
        for c in chunks:
            out.append(c if isinstance(c, str) else f"{c.command}\n----\n{c.actual}")
        path.write_text("\n".join(out))
    return failures
