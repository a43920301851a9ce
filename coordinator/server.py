"""One coordinator node: a RaftNode on DiskStorage, driven by asyncio, serving clients.

Theory of operation
-------------------
Everything runs on one asyncio event loop, single-threaded, so the RaftNode (which is not
thread-safe) is only ever touched from the loop:

- a ticker calls ``node.tick()`` every ``tick_s`` (15 ms by default; with ``election_tick`` 10
  the core randomizes the election timeout in [150, 300) ms);
- the transport calls :meth:`CoordinatorServer._on_peer_message` for each authenticated peer
  frame, which is decoded (never unpickled) and stepped into the node;
- client requests (put/get/cas/delete/register/status) arrive as msgpack dicts.

Each of these only *schedules* one run of :meth:`_drive` (``loop.call_soon``), so everything
that arrived in the same loop iteration lands in one ``Ready``: one group commit. ``_drive``
follows the core's contract: persist the snapshot, entries and hard state with a single
``DiskStorage.save`` (one fsync) *before* sending any message that depends on them, then
apply committed entries to the :class:`~coordinator.statemachine.StateMachine`, answer the
clients waiting on them, release ReadIndex reads whose index is applied, and ``advance``.
A steady leader's appends depend on nothing being durable on the leader, so by default
(``leader_parallel_persist``, Raft thesis §10.2.1, as etcd does) they leave first and the
leader's fsync overlaps the followers' — the leader counts its own copy toward a commit only
once its fsync returned; votes, answers and anything after a term change always wait. With
several writes waiting the fsync runs in a worker thread while the loop keeps accepting
requests, which pile up into the next, larger batch; a hard state that only moved the commit
index is not fsync'd on its own (etcd's rule), and a new commit index is not broadcast in
empty appends of its own (``commit_broadcast``): it rides on the next append or heartbeat.
Every ``snapshot_every`` applied entries the state machine is snapshotted and the log
compacted.

Writes are proposed only on the leader; a follower answers ``not_leader`` with the leader's id
and endpoint. A write waits for its own entry to be applied: the waiting request is keyed by
its (session, sequence number), which the command carries, so no log index bookkeeping is
needed and a retry of the same command simply waits for the same key. Linearizable reads are
batched into one ``read_index`` per drive and answered once the applied index reaches the
ReadState's index (Raft thesis §6.4). Stale reads answer from local state immediately.

When the node stops being leader, every waiting write is answered ``leader_changed`` (its entry
may still commit under the new leader, so the client retries with the same sequence number and
the session table answers it once) and every waiting read ``not_leader`` (reads are safe to
retry). A partition for the fault tests is a pair of transport block lists set by the
``admin_partition`` request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import logging
import os
import pathlib
import random
import signal
import time
from collections import deque
from typing import Any

from coordinator.raft import (
    Config,
    ConfState,
    DecodeError,
    EntryType,
    Message,
    MessageType,
    ProposalDropped,
    RaftNode,
    Role,
    decode_conf_change,
    decode_message,
    encode_message,
)
from coordinator.statemachine import StateMachine, encode_command
from coordinator.storage import DiskStorage
from coordinator.transport import FrameTooLarge, PeerTransport, Server

log = logging.getLogger("coordinator.server")

Address = tuple[str, int]


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Everything one node needs. ``peers`` maps every voter id (this node included) to the
    address it listens on for both peers and clients, like etcd's ``--initial-cluster``."""

    node_id: int
    peers: dict[int, Address]
    data_dir: pathlib.Path
    token: bytes
    listen: Address | None = None  # default: peers[node_id]
    tick_s: float = 0.015
    election_tick: int = 10
    heartbeat_tick: int = 1
    fsync: bool = True
    snapshot_every: int = 10_000
    keep_entries_after_snapshot: int = 2_000
    request_timeout_s: float = 5.0
    max_pending_requests: int = 20_000
    persist_in_thread: bool = True  # leader's fsync off the event loop (CoordinatorServer._drive)
    # On by default (as etcd's raft): a steady leader sends its appends while its own fsync
    # runs; nothing that depends on the leader's disk leaves before that fsync (see
    # CoordinatorServer._leader_may_send_first). Off: every message waits for the save.
    leader_parallel_persist: bool = True
    # Off by default: a new commit index reaches the followers on the next append or
    # heartbeat (one tick), not in empty appends of its own; see raft Config.commit_broadcast.
    commit_broadcast: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.node_id not in self.peers:
            raise ValueError(f"node id {self.node_id} is not in the peer list "
                             f"{sorted(self.peers)}: --peers must name every member, this one too")
        if self.tick_s <= 0 or self.election_tick <= self.heartbeat_tick:
            raise ValueError("need tick_s > 0 and election_tick > heartbeat_tick")


def endpoint_str(addr: Address) -> str:
    return f"{addr[0]}:{addr[1]}"


class CoordinatorServer:
    """Drives one RaftNode; see the module docstring. Use ``await start()`` / ``await stop()``
    or :func:`serve` for a whole process."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.id = config.node_id
        voters = tuple(sorted(config.peers))
        self.storage = DiskStorage(config.data_dir, conf_state=ConfState(voters=voters),
                                   fsync=config.fsync)
        self.sm = StateMachine()
        snap = self.storage.snapshot()
        if snap.metadata.index > 0:
            self._restore(snap.data, snap.metadata.index)
        self.conf_state = self.storage.initial_state()[1]
        self._snapshot_index = snap.metadata.index
        hard_state = self.storage.initial_state()[0]
        self._saved_term_vote = (hard_state.term, hard_state.vote)
        self._unsaved_hs: Any = None  # a commit-only HardState not yet written
        self._persisting: asyncio.Future | None = None  # the save in flight (persist_in_thread)
        self._disk = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"wal-{self.id}")
        rng = random.Random(config.seed if config.seed is not None else os.urandom(8))
        self.node = RaftNode(
            Config(id=self.id, election_tick=config.election_tick,
                   heartbeat_tick=config.heartbeat_tick, applied=snap.metadata.index,
                   commit_broadcast=config.commit_broadcast),
            self.storage, rng)
        self.role = Role.FOLLOWER
        self._pending_writes: dict[tuple, list[asyncio.Future]] = {}
        self._proposals: list[tuple[bytes, tuple, asyncio.Future]] = []
        self._reads_unissued: list[tuple[bytes, asyncio.Future]] = []
        self._reads_by_ctx: dict[bytes, list[tuple[bytes, asyncio.Future]]] = {}
        self._reads_waiting: deque[tuple[int, bytes, asyncio.Future]] = deque()
        self._read_ctx_counter = 0
        # (deadline, write key or None for a read, future), in deadline order.
        self._deadlines: deque[tuple[float, tuple | None, asyncio.Future]] = deque()
        self._drive_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ticker: asyncio.Task | None = None
        self._stopped = asyncio.Event()
        self.fatal_error: BaseException | None = None  # set when the node stopped on an error
        self.stats = {"peer_messages_in": 0, "peer_messages_dropped": 0, "readies": 0,
                      "proposals": 0, "reads_issued": 0, "snapshots": 0, "requests": 0}
        listen = config.listen or config.peers[self.id]
        self.transport_server = Server(
            node_id=self.id, token=config.token, on_peer_message=self._on_peer_message,
            on_client_request=self._on_client_request, host=listen[0], port=listen[1],
            on_peer_connected=self._on_peer_connected)
        self.peer_transport = PeerTransport(
            node_id=self.id, token=config.token,
            peers={i: a for i, a in config.peers.items() if i != self.id},
            on_unreachable=self._on_unreachable)

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Bind, connect to peers and start ticking. Returns once the node is serving."""
        self._loop = asyncio.get_running_loop()
        await self.transport_server.start()
        await self.peer_transport.start()
        self._ticker = asyncio.create_task(self._tick_forever(), name=f"ticker-{self.id}")
        self._schedule_drive()
        log.info("node %d serving on %s (data dir %s)", self.id,
                 endpoint_str(self.transport_server.address), self.config.data_dir)

    @property
    def address(self) -> Address:
        return self.transport_server.address

    async def stop(self) -> None:
        """Stop ticking, close the network and release the data dir. Idempotent."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._ticker is not None:
            self._ticker.cancel()
        self._fail_pending_writes("shutting_down")
        self._fail_pending_reads("shutting_down")
        await self.transport_server.close()
        await self.peer_transport.close()
        if self._persisting is not None:
            await asyncio.gather(self._persisting, return_exceptions=True)
        self._disk.shutdown(wait=True)
        self._flush_hard_state()
        self.storage.close()
        log.info("node %d stopped", self.id)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def _tick_forever(self) -> None:
        period = self.config.tick_s
        next_at = time.monotonic()
        while True:
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if time.monotonic() - next_at > 10 * period:  # we were paused: do not burst ticks
                next_at = time.monotonic()
            self.node.tick()
            self._expire_requests()
            self._schedule_drive()

    # ------------------------------------------------------------ raft I/O
    def _schedule_drive(self) -> None:
        if not self._drive_scheduled and not self._stopped.is_set():
            self._drive_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._drive)

    def _on_peer_message(self, frm: int, payload: bytes) -> None:
        self.stats["peer_messages_in"] += 1
        try:
            msg = decode_message(payload)
        except DecodeError as exc:
            self.stats["peer_messages_dropped"] += 1
            log.warning("dropping a malformed message from node %d: %s", frm, exc)
            return
        if msg.frm != frm or msg.to != self.id:
            self.stats["peer_messages_dropped"] += 1
            log.warning("dropping a message claiming %d->%d on node %d's link to %d",
                        msg.frm, msg.to, frm, self.id)
            return
        self.node.step(msg)
        self._schedule_drive()

    def _on_peer_connected(self, peer: int) -> None:
        # A peer that dials us is up (restarted, or a partition healed): dial it back now
        # rather than after our backoff, so it hears heartbeats and vote requests at once.
        self.peer_transport.redial(peer)

    def _on_unreachable(self, peer: int) -> None:
        if not self._stopped.is_set():
            self.node.report_unreachable(peer)

    def _drive(self) -> None:
        """Run every pending Ready through persist -> send -> apply -> advance.

        With ``persist_in_thread`` a leader's fsync runs in a worker thread while the loop
        keeps accepting client requests and peer messages (the core takes inputs between
        ``ready`` and ``advance``, as etcd's RawNode does); they all land in the next Ready, so
        batches grow with load instead of the loop stalling on the disk. A follower saves
        inline: it has nothing to overlap (its next append waits for this save anyway) and the
        thread hand-off would only add latency. Nothing is sent before the save returns
        (unless ``leader_parallel_persist``, see :meth:`_leader_may_send_first`).
        """
        self._drive_scheduled = False
        if self._stopped.is_set() or self._persisting is not None:
            return
        try:
            self._drive_readies()
        except Exception as exc:  # a bug or a disk failure: never limp on with a broken node
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        log.critical("node %d: fatal error, shutting down: %r", self.id, exc, exc_info=exc)
        self.fatal_error = exc
        asyncio.ensure_future(self.stop())

    def _drive_readies(self) -> None:
        self._issue_proposals()
        self._issue_reads()
        while self.node.has_ready():
            rd = self.node.ready()
            self.stats["readies"] += 1
            if rd.soft_state is not None:
                self._on_role(rd.soft_state.role)
            sent = self._leader_may_send_first(rd)
            if sent:
                self._send(rd.messages)
            save = self._what_to_save(rd)
            if save is not None and self._save_in_thread():
                assert self._loop is not None
                fut = self._loop.run_in_executor(self._disk, self._save, save)
                self._persisting = fut
                fut.add_done_callback(functools.partial(self._persisted, rd, sent))
                return
            if save is not None:
                self._save(save)
            self._finish(rd, sent)
        self._maybe_snapshot()

    def _save_in_thread(self) -> bool:
        """A leader with several writes waiting overlaps its fsync with taking more requests;
        with one (a lone sequential client) the thread hand-off would only add latency."""
        return (self.config.persist_in_thread and self.role == Role.LEADER
                and len(self._pending_writes) > 1)

    def _leader_may_send_first(self, rd: Any) -> bool:
        """Whether this Ready's messages may leave before its entries are durable here.

        Only with ``leader_parallel_persist`` (the default), only for a steady leader (no role,
        term or vote change, no snapshot in this Ready): its messages are then appends, heartbeats and
        answers that depend on nothing being durable on the leader, and the core counts the
        leader's own copy toward a commit only after ``advance`` (i.e. after the fsync).
        Raft thesis §10.2.1; etcd's raft does the same.
        """
        if not self.config.leader_parallel_persist or self.role != Role.LEADER:
            return False
        if rd.soft_state is not None or rd.snapshot is not None:
            return False
        hs = rd.hard_state
        return hs is None or (hs.term, hs.vote) == self._saved_term_vote

    def _persisted(self, rd: Any, sent: bool, fut: asyncio.Future) -> None:
        self._persisting = None
        if fut.cancelled() or self._stopped.is_set():
            return
        save_error = fut.exception()
        if save_error is not None:
            # The log is in an unknown state on disk: continuing could acknowledge what is
            # not durable. Stop serving; a restart recovers from what the WAL holds.
            self._fail(save_error)
            return
        try:
            self._finish(rd, sent)
        except Exception as exc:
            self._fail(exc)
            return
        self._schedule_drive()

    def _finish(self, rd: Any, sent: bool) -> None:
        """Everything after the Ready is durable: install, send, apply, answer, advance."""
        if rd.snapshot is not None:
            self._restore(rd.snapshot.data, rd.snapshot.metadata.index)
            self.conf_state = rd.snapshot.metadata.conf_state
            self._snapshot_index = rd.snapshot.metadata.index
        # A follower sends first (its append answers gate the leader's commit); a leader
        # applies first, so its clients' answers are queued ahead of the commit notices.
        send_first = not sent and self.role != Role.LEADER
        if send_first:
            self._send(rd.messages)
        for entry in rd.committed_entries:
            self._apply(entry)
        if not sent and not send_first:
            self._send(rd.messages)
        for rs in rd.read_states:
            self._on_read_state(rs.index, rs.context)
        for ctx in rd.dropped_reads:
            self._answer_reads(self._reads_by_ctx.pop(ctx, ()), self._redirect("not_leader"))
        self.node.advance(rd)
        self._release_reads()

    def _what_to_save(self, rd: Any) -> tuple | None:
        """What of this Ready must be durable before its messages go out (None: nothing).

        As in etcd (``MustSync``), a hard state that only moved the commit index is not worth
        an fsync of its own: no message depends on the commit index being durable (it is
        re-learned from the leader after a restart). It rides along with the next save that
        must sync, and is flushed before a snapshot and at shutdown.
        """
        hs = rd.hard_state if rd.hard_state is not None else self._unsaved_hs
        term_or_vote = hs is not None and (hs.term, hs.vote) != self._saved_term_vote
        if rd.entries or rd.snapshot is not None or term_or_vote:
            self._unsaved_hs = None
            if hs is not None:
                self._saved_term_vote = (hs.term, hs.vote)
            return hs, list(rd.entries), rd.snapshot
        if hs is not None:
            self._unsaved_hs = hs
        return None

    def _save(self, save: tuple) -> None:
        self.storage.save(*save)  # one WAL fsync (group commit)

    def _flush_hard_state(self) -> None:
        if self._unsaved_hs is not None:
            self.storage.save(self._unsaved_hs, [])
            self._unsaved_hs = None

    def _send(self, messages: list[Message]) -> None:
        for m in messages:
            if m.to == self.id:  # defensive: the core should not address itself
                continue
            try:
                self.peer_transport.send(m.to, encode_message(m))
            except KeyError:
                log.warning("no address for node %d; dropping a %s", m.to, m.type.name)
                continue
            except FrameTooLarge as exc:
                # Today a snapshot travels in one frame; a state over the frame limit cannot
                # be shipped (raise max_frame_bytes, or chunk snapshots: not done yet).
                log.error("node %d: cannot send a %s to node %d: %s", self.id, m.type.name,
                          m.to, exc)
                if m.type == MessageType.SNAPSHOT:
                    self.node.report_snapshot(m.to, False)
                continue
            if m.type == MessageType.SNAPSHOT:
                # Queued is all we know; a lost snapshot makes the follower reject the next
                # append and the leader probes (and resends) from there.
                self.node.report_snapshot(m.to, True)

    def _on_role(self, role: Role) -> None:
        was_leader = self.role == Role.LEADER
        self.role = role
        if was_leader and role != Role.LEADER:
            log.info("node %d stepped down (term %d)", self.id, self.node.term)
            self._fail_pending_writes("leader_changed")
            self._fail_pending_reads("not_leader")
        elif role == Role.LEADER and not was_leader:
            log.info("node %d became leader (term %d)", self.id, self.node.term)

    # ------------------------------------------------------------ apply path
    def _apply(self, entry: Any) -> None:
        if entry.type == EntryType.CONF_CHANGE:
            self.sm.apply(entry.index, b"")
            if entry.data:
                self.conf_state = self.node.apply_conf_change(decode_conf_change(entry.data))
            return
        cmd, answer = self.sm.apply_entry(entry.index, entry.data)
        if cmd is None or answer is None or not self._pending_writes:
            return
        key = ("register", cmd.args[0]) if cmd.op == "register" and cmd.args else (
            cmd.session, cmd.seq)
        for fut in self._pending_writes.pop(key, ()):
            if not fut.done():
                fut.set_result(answer)

    def _restore(self, data: bytes, index: int) -> None:
        if data:
            self.sm.restore(data)
            assert self.sm.applied_index == index, (self.sm.applied_index, index)
        else:
            self.sm.restore_empty(index)

    def _maybe_snapshot(self) -> None:
        applied = self.sm.applied_index
        if applied - self._snapshot_index < self.config.snapshot_every:
            return
        started = time.perf_counter()
        self._flush_hard_state()  # the stored commit must not fall behind the snapshot
        self.storage.create_snapshot(applied, self.conf_state, self.sm.snapshot())
        self._snapshot_index = applied
        # Keep a tail of entries so a briefly lagging follower catches up without a snapshot.
        keep = min(self.config.keep_entries_after_snapshot, self.config.snapshot_every)
        compact_to = applied - keep
        if compact_to >= self.storage.first_index():
            self.storage.compact(compact_to)
        self.stats["snapshots"] += 1
        log.info("node %d snapshot at %d in %.1f ms", self.id, applied,
                 (time.perf_counter() - started) * 1e3)

    # ------------------------------------------------------------ proposals and reads
    def _issue_proposals(self) -> None:
        """Propose every write queued since the last drive as one batch (one append)."""
        if not self._proposals:
            return
        batch, self._proposals = self._proposals, []
        try:
            self.node.propose_batch([data for data, _, _ in batch])
        except ProposalDropped as exc:
            answer = self._redirect("not_leader" if exc.leader_hint != self.id else "unavailable")
            for _, _, fut in batch:  # never appended: certainly not applied
                if not fut.done():
                    fut.set_result(answer)
            return
        self.stats["proposals"] += len(batch)
        for _, key, fut in batch:
            self._pending_writes.setdefault(key, []).append(fut)

    def _issue_reads(self) -> None:
        if not self._reads_unissued:
            return
        batch, self._reads_unissued = self._reads_unissued, []
        if self.role != Role.LEADER:
            self._answer_reads(batch, self._redirect("not_leader"))
            return
        self._read_ctx_counter += 1
        ctx = self._read_ctx_counter.to_bytes(8, "big")
        try:
            self.node.read_index(ctx)
        except ProposalDropped as exc:
            self._answer_reads(batch, self._redirect("overloaded") if exc.leader_hint == self.id
                               else self._redirect("not_leader"))
            return
        self._reads_by_ctx[ctx] = batch
        self.stats["reads_issued"] += 1

    @staticmethod
    def _answer_reads(batch: Any, answer: dict) -> None:
        for _, fut in batch:
            if not fut.done():
                fut.set_result(answer)

    def _on_read_state(self, index: int, ctx: bytes) -> None:
        for key, fut in self._reads_by_ctx.pop(ctx, ()):
            self._reads_waiting.append((index, key, fut))

    def _release_reads(self) -> None:
        applied = self.sm.applied_index
        while self._reads_waiting and self._reads_waiting[0][0] <= applied:
            _, key, fut = self._reads_waiting.popleft()
            if not fut.done():
                fut.set_result(self.sm.read_answer(key))
        # Read states come back in issue order, so the deque stays sorted by index.

    def _fail_pending_reads(self, error: str) -> None:
        answer = self._redirect(error)
        groups = [self._reads_unissued, *self._reads_by_ctx.values(),
                  [(k, f) for _, k, f in self._reads_waiting]]
        for group in groups:
            for _, fut in group:
                if not fut.done():
                    fut.set_result(answer)
        self._reads_unissued, self._reads_by_ctx = [], {}
        self._reads_waiting.clear()

    def _fail_pending_writes(self, error: str) -> None:
        answer = self._redirect(error)
        self._answer_reads([(None, f) for _, _, f in self._proposals], answer)  # never proposed
        self._proposals = []
        answer = dict(answer, maybe_applied=True)
        for futs in self._pending_writes.values():
            for fut in futs:
                if not fut.done():
                    fut.set_result(answer)
        self._pending_writes.clear()

    # ------------------------------------------------------------ client RPCs
    def _redirect(self, error: str) -> dict:
        leader = self.node.leader_id
        endpoint = None
        if leader and leader != self.id and leader in self.config.peers:
            endpoint = endpoint_str(self.config.peers[leader])
        return {"ok": False, "error": error, "leader": leader, "endpoint": endpoint,
                "detail": f"node {self.id} is {self.role.name.lower()}; leader is "
                          f"{leader or 'unknown'}"}

    def _on_client_request(self, body: dict) -> dict | asyncio.Future:
        """Answer one client request (see :mod:`coordinator.client` for the protocol): a dict
        at once, or a Future the transport answers from when it resolves (no task per request)."""
        self.stats["requests"] += 1
        op = body.get("op")
        if op == "get":
            return self._get(body)
        if op in ("put", "delete", "cas", "register"):
            return self._write(op, body)
        if op == "status":
            return self.status()
        if op == "admin_partition":
            return self._partition(body.get("block", ()))
        return {"ok": False, "error": "bad_request", "detail": f"unknown op {op!r}"}

    def _get(self, body: dict) -> dict | asyncio.Future:
        key = body.get("key")
        if not isinstance(key, bytes):
            return {"ok": False, "error": "bad_key", "detail": "key must be bytes"}
        if body.get("consistency", "linearizable") == "stale":
            answer = self.sm.read_answer(key)
            answer["stale"] = True
            answer["node"] = self.id
            return answer
        if self.role != Role.LEADER:
            return self._redirect("not_leader")
        if len(self._reads_unissued) >= self.config.max_pending_requests:
            return {"ok": False, "error": "overloaded", "detail": "too many reads waiting"}
        assert self._loop is not None
        fut = self._loop.create_future()
        self._reads_unissued.append((key, fut))
        self._schedule_drive()
        self._deadlines.append((time.monotonic() + self.config.request_timeout_s, None, fut))
        return fut

    def _write(self, op: str, body: dict) -> dict | asyncio.Future:
        if self.role != Role.LEADER:
            return self._redirect("not_leader")
        if len(self._pending_writes) >= self.config.max_pending_requests:
            return {"ok": False, "error": "overloaded", "detail": "too many writes waiting"}
        args = body.get("args", [])
        if not isinstance(args, list) or not all(a is None or isinstance(a, bytes) for a in args):
            return {"ok": False, "error": "bad_request", "detail": "args must be bytes or None"}
        ts_ms = int(time.time() * 1000)
        if op == "register":
            if len(args) != 1 or not args[0]:
                return {"ok": False, "error": "bad_request", "detail": "register takes a nonce"}
            key: tuple = ("register", args[0])
            data = encode_command("register", 0, 0, 0, ts_ms, args[0])
        else:
            session, seq, ack = body.get("session"), body.get("seq"), body.get("ack", 0)
            if not (isinstance(session, int) and isinstance(seq, int) and isinstance(ack, int)
                    and min(session, seq, ack) >= 0):
                return {"ok": False, "error": "bad_request", "detail": "session/seq/ack"}
            key = (session, seq)
            data = encode_command(op, session, seq, ack, ts_ms, *args)
        assert self._loop is not None
        fut = self._loop.create_future()
        self._proposals.append((data, key, fut))
        self._schedule_drive()
        self._deadlines.append((time.monotonic() + self.config.request_timeout_s, key, fut))
        return fut

    def _expire_requests(self) -> None:
        """Answer requests older than ``request_timeout_s`` with ``timeout`` (called per tick).

        One deque sorted by deadline (all requests get the same timeout) instead of a timer
        per request: the hot path stays cheap.
        """
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, key, fut = self._deadlines.popleft()
            if fut.done():
                continue
            answer = self._redirect("timeout")
            answer["maybe_applied"] = key is not None  # a write may still commit
            fut.set_result(answer)
            if key is None:
                continue
            waiters = self._pending_writes.get(key)
            if waiters is not None and fut in waiters:
                waiters.remove(fut)
                if not waiters:
                    del self._pending_writes[key]

    def _partition(self, block: Any) -> dict:
        ids = [int(i) for i in block if int(i) != self.id]
        self.transport_server.set_blocked_peers(ids)
        self.peer_transport.set_blocked_peers(ids)
        log.warning("node %d: partitioned from %s", self.id, ids or "nobody (healed)")
        return {"ok": True, "blocked": ids}

    def status(self) -> dict:
        """id, role, term, leader, commit, applied, log bounds, per-peer progress, counters."""
        st = self.node.status()
        peers: dict[str, dict[str, int]] = {}  # str keys: msgpack maps with str keys only
        for pid, pr in (getattr(st, "progress", None) or {}).items():
            peers[str(pid)] = {"match": int(getattr(pr, "match", 0)),
                               "next": int(getattr(pr, "next", 0))}
        first, last = self.storage.first_index(), self.storage.last_index()
        return {
            "ok": True, "id": self.id, "role": self.role.name.lower(), "term": self.node.term,
            "leader": self.node.leader_id, "commit": self.node.commit_index,
            "applied": self.sm.applied_index, "log_first": first, "log_last": last,
            "log_size": max(0, last - first + 1), "snapshot_index": self._snapshot_index,
            "revision": self.sm.revision, "keys": len(self.sm.kv),
            "sessions": len(self.sm.sessions), "peers": peers,
            "endpoint": endpoint_str(self.address), "pid": os.getpid(),
            "stats": dict(self.stats), "storage": self.storage.stats.as_dict(),
            "transport": self.transport_server.stats.as_dict(),
        }


async def serve(config: ServerConfig, *, ready_file: pathlib.Path | None = None) -> None:
    """Run one node until SIGTERM/SIGINT, then shut down cleanly (releasing the data dir)."""
    server = CoordinatorServer(config)
    await server.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop()))
    if ready_file is not None:
        tmp = ready_file.with_suffix(".tmp")
        tmp.write_text(endpoint_str(server.address))
        os.replace(tmp, ready_file)
    try:
        await server.wait_stopped()
    finally:
        await server.stop()
    if server.fatal_error is not None:
        raise RuntimeError(f"node {config.node_id} stopped on a fatal error: "
                           f"{server.fatal_error!r} (see the log above)")


__all__ = ["CoordinatorServer", "ServerConfig", "serve", "endpoint_str"]
