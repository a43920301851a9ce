"""The driver's shell for a step-logged job: it observes Ray and carries out the policy.

Theory of operation. :class:`JobShell` owns the job's actors (one :class:`TrainWorker` per
rank, the strategy's shards) and its coordinator. It runs the job as a sequence of
*generations*; each is committed to the step log (members, rendezvous, the step and report
number it starts from) before any worker of it runs, so a worker's records carry their
generation and the log can refuse a replaced worker's (fencing).

Watching (:meth:`JobShell._watch`), every ``POLL_INTERVAL_S``:

* ``ray.wait`` on every rank's ``run``: a returned failure or a dead actor is a fault;
* a ``poll`` per rank (one outstanding at a time): a rank whose loop made no progress — no
  step, report or ``heartbeat()`` — for ``stall_timeout_s``, or whose poll got no answer for
  that long (a stopped process), is stalled; among several stalled ranks the ones that stopped
  answering (else the ones furthest behind) are blamed, since the others are waiting on them;
* a ping of every parameter-server shard and coordinator node;
* in sync mode, once a digest step has passed, the log's verdict on the ranks' digests
  (a stale read): a mismatch is a fault that no process caused — every rank's run is asked
  to stop (:meth:`JobShell._stop_runs`), none is killed unless it does not stop, and every
  rank restores the last checkpoint whose digests agreed; in async mode, the log's pulled-digest
  mismatches, each recorded as a failure (:meth:`JobShell._check_pulled`; the worker already
  dropped the gradients computed from a corrupted copy, so no generation changes).

A fault goes to the pure :class:`~synctrain.driver.policy.RecoveryPolicy`; the shell carries
out its decision: kill the failed workers, wait for the others' runs to end (sync mode: their
collectives break), start replacements, hand on the state (a survivor's via the object store,
or the last committed checkpoint that passes its checksum), commit the new generation, run.
A coordinator node that died is restarted from its WAL in the background while training goes
on. Only this module waits, polls and kills; it decides nothing itself.

Membership (elastic jobs). A new worker that is not placed within ``placement_timeout_s``
(its node is gone, the cluster lacks the resources) goes to the policy
(:meth:`~synctrain.driver.policy.RecoveryPolicy.unplaced`): the job goes on without that rank
while ``min_workers`` remain — sync mode renumbers the ranks 0..n-1 and the loaders re-shard
from the handed-on position; async mode releases the rank's clock on the shards and the others
never stop. The unplaced actor stays queued with Ray (:attr:`JobShell.growth`): once it is
placed, the job grows back (:meth:`JobShell._grow`) — sync mode at the next checkpoint
committed after that (every run stops, every rank restores it in the larger world), async mode
at once (the worker joins like a replacement).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError

from synctrain import checkpoint as ckpt
from synctrain.digest import state_digest
from synctrain.driver.policy import (
    Action,
    Decision,
    Failure,
    RecoveryPolicy,
    Survivor,
    blame_stalled,
)
from synctrain.errors import TrainingFailedError, WorkerDiedError
from synctrain.steplog import StepLog
from synctrain.trainer import _first_line, _gpus_shared, _is_secondary, _local_ranks
from synctrain.worker.step import checkpoint_state

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.2
#: How often each rank is asked for its progress (and rank 0 for its reports).
PROGRESS_POLL_S = 1.0
#: Extra time a rank has before its first step, report or heartbeat of a generation (starting
#: a process, importing torch, building the model, forming the process group).
STARTUP_GRACE_S = 120.0
#: How long a sync survivor's run may take to end after a peer failed (its collective breaks).
SURVIVOR_STOP_S = 60.0
#: Sync: once a rank's run ended on a broken collective, how long its still-running peers have
#: to end too. A peer inside a collective notices within milliseconds; one that has not after
#: this is not taking part (stuck in a rendezvous, or in code outside any collective) and is
#: treated as stalled, instead of holding the job until the stall timeout and startup grace.
PEER_END_S = 15.0
#: How long a warm spare may take to answer that it takes a rank (it is idle: milliseconds).
SPARE_TAKE_S = 10.0
#: How long a failure waits for a spare still warming up (or queued for resources) before it
#: starts a new process instead: about what a new process's start and imports take on a busy
#: 2-core machine.
SPARE_WARM_WAIT_S = 30.0
#: Tries at restarting a dead coordinator node before giving up on it (the others keep serving).
NODE_RESTART_TRIES = 3
#: At the job's end, how long to wait for each coordinator node's ping (see ``run``).
FINAL_PING_WAIT_S = 20.0
#: Loop errors that would fail again on a retry: raised at once.
FATAL_EXC_TYPES = ("ConfigError", "ModelMismatchError", "DriverObjectLoadError", "JobExistsError",
                   "ResultNotPicklableError")


@dataclass
class _Rank:
    actor: Any
    run: Any = None  # ObjectRef of the running ``run`` (None: not running)
    poll: Any = None  # outstanding ``poll`` ObjectRef
    poll_sent: float = 0.0
    last_answer: float = field(default_factory=time.monotonic)  # a poll came back
    last_activity: float = field(default_factory=time.monotonic)
    pid: int | None = None  # the worker's process, when it runs on the driver's node
    answered: bool = True
    started: bool = False
    step: int | None = None
    outcome: dict[str, Any] | None = None  # the run's successful outcome
    ended_at: float = 0.0  # when the driver saw ``outcome`` arrive


class JobShell:
    """Runs one step-logged job to its end; see the module doc."""

    def __init__(self, *, spec: Any, trainer: Any, steplog: StepLog, steplog_cfg: Any,
                 coordinator: Any, handles: dict[str, Any], strategy_cls: Any,
                 policy: RecoveryPolicy, monitor: Any, hooks: dict[str, Any] | None = None,
                 resume: dict[str, Any] | None = None, workers: list[Any] | None = None) -> None:
        self.spec = spec
        self.trainer = trainer
        self.log = steplog
        self.steplog_cfg = steplog_cfg
        self.coordinator = coordinator
        self.handles = handles
        self.strategy_cls = strategy_cls
        self.policy = policy
        self.monitor = monitor
        self.hooks = dict(hooks or {})
        self.ranks: dict[int, _Rank] = {}
        self.generation = 0
        self.failure_log: list[dict[str, Any]] = []
        self._awaiting: list[tuple[int, float, int, int | None]] = []  # failure idx, t, start, rank
        self._restarting: set[int] = set()
        # Coordinator nodes whose restart failed every try (their Ray node is gone: the WAL and
        # address are that host's): not restarted again, and their death counted once
        self._unrestartable: set[int] = set()
        self.bookkeeper = _FailureBook(StepLog(list(steplog_cfg.endpoints), steplog_cfg.token,
                                               steplog.job, timeout_s=2.0))
        self._restart_threads: list[threading.Thread] = []
        self._next_report = 0
        self.zombies: list[Any] = []
        self.resume = resume  # the interrupted run's job.json: start from its last checkpoint
        self.spares: list[tuple[Any, Any]] = []  # (actor, its ``warm`` ObjectRef)
        self._loop_modules: list[str] | None = None  # what a live rank's loop imported
        self._modules_ref: Any = None  # the pending ``loop_modules`` call
        self._started = list(workers or [])  # rank r's worker, created before the shell (start_workers)
        # workers the job went on without, still queued with Ray: (actor, its ``node_info`` ref)
        self.growth: list[tuple[Any, Any]] = []
        self._grow_after: tuple[int, int] | None = None  # (generation, newest checkpoint step) then

    # ---- the job -----------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        """Run until every rank's loop returned; return their outcomes by rank."""
        for rank in range(self.spec.num_workers):
            self.ranks[rank] = _Rank(self._new_actor(rank))
        if self.resume is not None:
            self._resume()
        else:
            self._start_generation("start", start_step=0, start_report=0,
                                   restore={r: None for r in self.ranks}, run_ranks=list(self.ranks))
            flip = self.hooks.get("flip_shard_bits")  # test hook: {"shard", "version"[, "bit"]}
            if flip:
                shard = self.handles["ps_shards"][int(flip["shard"])]
                ray.get(shard.inject_flip.remote(self.spec.job_id, int(flip["version"]), int(flip.get("bit", 22))),
                        timeout=30)
        self._start_spares()
        while True:
            failures = self._watch()
            if failures is None:
                # A node lost near the end: wait for every node's ping. A healthy node answers at
                # once; a killed one's ping fails only once Ray has noticed the death, which on a
                # loaded machine took more than 5 s (the kill then went unrecorded).
                self._check_coordinator(wait_s=FINAL_PING_WAIT_S, restart_now=True)
                for thread in self._restart_threads:  # restarts under way: let them finish
                    thread.join(120)
                self._note_recoveries(final=True)  # a recovery the job finished before a ping saw
                self.bookkeeper.flush(timeout_s=120.0)
                return [self.ranks[r].outcome or {} for r in sorted(self.ranks)]
            if failures:
                self._recover_all(failures)
            else:  # no fault: workers the job went without are placed (see _growth_due)
                self._grow()

    def _resume(self) -> None:
        """Take over an interrupted job: its generations go on from the last one in the log;
        every rank starts from the last committed checkpoint that passes its checksum (a
        worker of the old run that still writes is fenced by the new generation). The
        takeover is in the log as a failure of kind ``driver_died`` (or ``resumed`` after a
        run that ended failed or interrupted), ``recovery_s`` timed to the first new commit."""
        assert self.resume is not None
        detected = time.time()
        info = self.log.job_info()
        self.generation = int(info.get("generation") or 0)
        previous = str(self.resume.get("state", "running"))
        kind = "driver_died" if previous == "running" else "resumed"
        driver = self.resume.get("driver") or {}
        detail = (f"the driver (pid {driver.get('pid', '?')} on {driver.get('host', '?')}) died; a new "
                  "driver resumed the job" if kind == "driver_died" else
                  f"the job {previous} ({str(self.resume.get('reason', ''))[:200]}); resumed by a new driver")
        decision = Decision(Action.RESTORE_CHECKPOINT, reason="resume", recovery="checkpoint")
        index = self._record_failure(Failure(kind, None, int(info.get("last_step") or 0), detail=detail), decision)
        if self.spec.mode == "async":
            self.handles = {**self.handles, "ps_initialised": False}
        reason = "resumed after the driver died" if kind == "driver_died" else f"resumed after the job {previous}"
        members = [m for g in self.log.records("generations")[-1:] for m in g.get("members", [])]
        if members and len(members) != len(self.ranks):
            reason += f"; {len(members)} -> {len(self.ranks)} workers"
        # a cluster short of resources now: go on with fewer, down to min_workers (elastic)
        unplaced = self._wait_placed(list(self.ranks))
        if unplaced:
            decision, reason = self._shrink(decision, [], unplaced, reason)
        start = self._restore_checkpoint(reason)
        self._awaiting.append((index, detected, start, None))

    def _recover_all(self, failures: list[Failure]) -> None:
        """Recover; a rank lost while the new generation is set up (it died, or stopped
        answering) is one more failure, recovered from in turn (the policy bounds how many)."""
        earlier: list[tuple[int, float]] = []
        while True:
            try:
                self._recover(failures, earlier)
                return
            except _RanksLost as exc:
                log.warning("generation %d could not start: %s", self.generation + 1,
                            ", ".join(f"{f.kind} rank {f.rank}" for f in exc.lost))
                failures, earlier = exc.lost, exc.earlier

    def _recover(self, failures: list[Failure], earlier: list[tuple[int, float]] | None = None) -> None:
        detected = time.time()  # recovery_s runs from here to the new generation's first commit
        survivors: list[Survivor] = []
        stop_all = self.spec.mode == "sync" or any(f.kind == "shard_died" for f in failures)
        mismatch = [f for f in failures if f.kind == "digest_mismatch"]
        self._kill_ranks([f.rank for f in failures if f.rank is not None and f.kind != "digest_mismatch"])
        if mismatch:  # no process is at fault: stop every run, kill none that stops
            failures = failures + self._stop_runs(f"parameter digests disagree at step {mismatch[0].step}")
        elif stop_all:
            survivors, more = self._stop_survivors({f.rank for f in failures},
                                                   any(f.kind == "shard_died" for f in failures))
            failures = failures + more
        decision = self.policy.decide(failures, survivors)
        log.warning("generation %d: %s -> %s (%s)", self.generation,
                    ", ".join(f"{f.kind} rank {f.rank}" for f in failures), decision.action.value,
                    decision.reason)
        for f in failures:
            log.info("failure detail: %s rank %s: %s", f.kind, f.rank, f.detail[-2000:])
        indices = [self._record_failure(f, decision) for f in failures]
        if decision.action is Action.GIVE_UP:
            self._give_up(failures, decision)
        if decision.action is Action.CONTINUE and all(f.kind == "coordinator_node_died" for f in failures):
            return
        pending = [*(earlier or []), *((i, detected) for i in indices)]
        try:
            start = self._carry_out(decision, failures)
        except _RanksLost as exc:
            exc.earlier = pending  # timed to the commit of the generation that does start
            raise
        for i, t0 in pending:
            self._awaiting.append((i, t0, start, None))

    # ---- watching ----------------------------------------------------------------------
    def _watch(self) -> list[Failure] | None:
        next_ping = 0.0
        while True:
            running = {r.run: rank for rank, r in self.ranks.items() if r.run is not None}
            if not running:
                ended_badly = [_classify(r.outcome) for r in self.ranks.values()
                               if r.outcome is not None and not r.outcome["ok"]]
                return (ended_badly or self._check_digests(final=True) or self._check_pulled(final=True)
                        or None)
            ready, _ = ray.wait(list(running), num_returns=len(running), timeout=POLL_INTERVAL_S)
            failures: list[Failure] = []
            for ref in ready:
                rank = running[ref]
                outcome = _outcome(ref, rank)
                self.ranks[rank].run = None
                self.ranks[rank].outcome, self.ranks[rank].ended_at = outcome, time.monotonic()
                if not outcome["ok"] and not _is_secondary(outcome):
                    failures.append(_classify(outcome))
            if not failures and not any(r.run is not None for r in self.ranks.values()):
                # every run ended, some only with broken collectives: no other cause was seen
                failures = [_classify(r.outcome) for r in self.ranks.values()
                            if r.outcome is not None and not r.outcome["ok"]]
            if not failures and self.spec.mode == "sync":
                failures = self._peers_left_behind()
            self._poll()
            failures += self._stalls({f.rank for f in failures})
            if failures and self.spec.mode == "async":
                dead = self._dead_shards()  # a shard's death fails every worker that pushes to it
                if dead:
                    failures = dead
            if time.monotonic() >= next_ping:
                next_ping = time.monotonic() + 1.0
                failures += [f for f in self._dead_shards() if f not in failures]  # once each
                self._check_coordinator()
                self._note_recoveries()
                self._prime_spares()
                pulled = self._check_pulled()
                if not failures:
                    failures = self._check_digests()
                failures += pulled
                if not failures and self._growth_due():
                    return []  # no fault: the job can grow back
            if failures:
                return failures

    def _poll(self) -> None:
        now = time.monotonic()
        for rank, r in self.ranks.items():
            if r.run is None:
                continue
            if r.poll is None and now - r.last_answer < PROGRESS_POLL_S:
                continue  # each poll is an actor call (~1.5 ms of CPU on this machine)
            if r.poll is None:
                r.poll, r.poll_sent = r.actor.poll.remote(self._next_report if rank == 0 else 1 << 62), now
                continue
            done, _ = ray.wait([r.poll], timeout=0)
            if not done:  # a live process answers within milliseconds; a stopped one never
                r.answered = (now - r.last_answer < max(3.0, min(5.0, self.trainer.stall_timeout_s / 2))
                              and not _stopped(r.pid))
                continue
            try:
                info = ray.get(r.poll)
            except RayError:
                r.poll = None
                continue
            r.poll, r.answered, r.last_answer = None, True, now
            if info.get("step") is not None and info.get("started"):
                r.last_activity = min(now, now - float(info.get("idle_s", 0.0)))
                r.step, r.started = info["step"], True
            if rank == 0:
                self._next_report = info.get("next", self._next_report)
                self.monitor.show(info.get("reports", []), info)

    def _peers_left_behind(self) -> list[Failure]:
        """Sync: the ranks still running :data:`PEER_END_S` after a peer's run ended on a
        broken collective (a port taken from under its rendezvous, a collective that timed out
        waiting for them): they are not in that collective, so they would only notice at the
        collective timeout. They are treated as stalled; the ended rank, whose state is whole,
        can hand it on."""
        broken = [(rank, r) for rank, r in self.ranks.items()
                  if r.run is None and r.outcome is not None and not r.outcome["ok"]]
        running = [rank for rank, r in self.ranks.items() if r.run is not None]
        if not broken or not running:
            return []
        first_rank, first = min(broken, key=lambda item: item[1].ended_at)
        if time.monotonic() - first.ended_at < PEER_END_S:
            return []
        assert first.outcome is not None
        lines = str(first.outcome.get("traceback", "")).strip().splitlines()
        cause = (lines[-1] if lines else str(first.outcome.get("exc_type", "an error")))[:300]
        return [Failure("stalled", rank, self.ranks[rank].step,
                        detail=f"still running {PEER_END_S:g} s after rank {first_rank}'s run ended on a broken "
                               f"collective ({cause}); it is not taking part in that collective")
                for rank in running]

    def _stalls(self, already: set[int | None]) -> list[Failure]:
        now = time.monotonic()
        limit = self.trainer.stall_timeout_s
        # While a rank is still starting (a replacement joining an async job's survivors: its
        # process, imports, the model), a live rank that waits on it (a staleness bound) is not
        # stalled: it is blamed only once the starting rank has started or its grace is over.
        # The grace is for a process that is busy starting, which still answers polls: a rank
        # silent for the whole stall timeout, or stopped (SIGSTOP), has none (a rank that ran
        # its first steps between two polls and then froze is seen as never started).
        grace = {rank: 0.0 if r.started or now - r.last_answer > limit or _stopped(r.pid) else STARTUP_GRACE_S
                 for rank, r in self.ranks.items() if r.run is not None}
        starting = any(r.run is not None and grace[rank] > 0 and now - r.last_activity <= limit + grace[rank]
                       for rank, r in self.ranks.items())
        ranks = [(rank, r.answered, r.step,
                  now - r.last_activity > limit + grace[rank]
                  and not (starting and r.started and r.answered))
                 for rank, r in self.ranks.items() if r.run is not None and rank not in already]
        stalled = [r for r in ranks if r[3]]
        if stalled:
            log.info("ranks (rank, answers polls, step, idle too long): %s; poll ages %s", ranks,
                     {rank: round(now - r.poll_sent, 2) for rank, r in self.ranks.items() if r.poll})
        return [Failure("stalled", rank, self.ranks[rank].step,
                        detail=f"no progress for {self.trainer.stall_timeout_s:g} s")
                for rank in blame_stalled(ranks)]

    def _dead_shards(self) -> list[Failure]:
        shards = self.handles.get("ps_shards") or []
        if not shards:
            return []
        refs = [s.node_id.remote() for s in shards]
        dead = []
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=5.0)
        for i, ref in enumerate(refs):
            if ref in ready:
                try:
                    ray.get(ref)
                except RayError:
                    dead.append(i)
        return [Failure("shard_died", None, None, detail=f"parameter-server shard {i} died") for i in dead]

    def _check_coordinator(self, wait_s: float = 0.0, restart_now: bool = False) -> None:
        """Restart a dead coordinator node in the background; training goes on meanwhile."""
        if self.coordinator is None:
            return
        for node in self.coordinator.dead_nodes(wait_s):
            if node in self._restarting or node in self._unrestartable:
                continue
            self._restarting.add(node)
            decision = self.policy.decide([Failure("coordinator_node_died")], [])
            if decision.action is Action.GIVE_UP:
                self._give_up([Failure("coordinator_node_died")], decision)
            index = self._record_failure(Failure("coordinator_node_died", None, None,
                                                 detail=f"coordinator node {node}"), decision)
            if restart_now:
                self._restart_node(node, index, time.time())
                continue
            thread = threading.Thread(target=self._restart_node, args=(node, index, time.time()),
                                      daemon=True)
            thread.start()
            self._restart_threads.append(thread)

    def _restart_node(self, node: int, index: int, t0: float) -> None:
        """Restart ``node`` from its WAL (a few tries); the failure's recovery_s says when."""
        try:
            for attempt in range(NODE_RESTART_TRIES):
                try:
                    self.coordinator.restart(node)
                    self._annotate(index, time.time() - t0)
                    return
                except Exception as exc:  # noqa: BLE001 - logged, tried again
                    log.warning("restarting coordinator node %d failed (try %d of %d): %s", node,
                                attempt + 1, NODE_RESTART_TRIES, exc)
                    if attempt + 1 < NODE_RESTART_TRIES:
                        time.sleep(1.0 + attempt)
            self._unrestartable.add(node)
            log.warning("coordinator node %d stays down: the coordinator goes on with its other nodes "
                        "while they hold a quorum (another node's death would stop the step log)", node)
        finally:
            self._restarting.discard(node)

    # ---- carrying out ------------------------------------------------------------------
    def _kill_ranks(self, ranks: list[int]) -> None:
        skip = set(self.hooks.get("no_kill_ranks", ()))  # test hook: a kill that did not take
        for rank in ranks:
            r = self.ranks[rank]
            if rank in skip:
                self.zombies.append(r.actor)
            else:
                _kill(r.actor)
            r.run, r.poll = None, None
            r.actor, r.pid = None, None

    def _stop_survivors(self, failed: set[int | None], shard_died: bool = False,
                        ) -> tuple[list[Survivor], list[Failure]]:
        """Wait for the other ranks' runs to end (their collectives break, or a shard they push
        to is gone: ``shard_died``, and then any error is the shard's), bounded."""
        survivors: list[Survivor] = []
        more: list[Failure] = []
        deadline = time.monotonic() + SURVIVOR_STOP_S
        for rank, r in self.ranks.items():
            if rank in failed or r.actor is None:
                continue
            outcome = r.outcome  # already ended (secondary failure, or finished)
            if r.run is None and outcome is None:
                continue  # a new process that has not run yet (a generation that could not start)
            if r.run is not None:
                try:
                    outcome = ray.get(r.run, timeout=max(0.1, deadline - time.monotonic()))
                except GetTimeoutError:
                    outcome = None
                except RayError as exc:
                    outcome = {"ok": False, "rank": rank, "died": True, "detail": _first_line(exc)}
                r.run = None
            if outcome is None:  # never ended: it cannot be trusted to hand on state
                _kill(r.actor)
                r.actor = None
                more.append(Failure("stalled", rank, r.step, detail="did not stop after a peer failed"))
            elif outcome.get("died"):
                r.actor = None
                more.append(_classify(outcome))
            elif outcome["ok"]:
                survivors.append(Survivor(rank, outcome.get("step"), True))
            elif shard_died or _is_secondary(outcome) or outcome.get("exc_type") == "WorkerFencedError":
                survivors.append(Survivor(rank, outcome.get("step"), bool(outcome.get("consistent"))))
            else:
                _kill(r.actor)
                r.actor = None
                more.append(_classify(outcome))
            r.outcome = None
        return survivors, more

    def _carry_out(self, decision: Decision, failures: list[Failure]) -> int:
        reason = "; ".join(f"{f.kind} rank {f.rank}" if f.rank is not None else f.detail or f.kind
                           for f in failures) or decision.reason
        warm: list[int] = []
        # the decision's ranks, and ranks lost while stopping (not in the decision)
        new = [rank for rank in sorted({*decision.replace, *self.ranks}) if self.ranks[rank].actor is None]
        for rank in new:
            self.ranks[rank].actor, self.ranks[rank].outcome = self._new_actor(rank, warm), None
        if warm:
            reason += f"; a warm spare took the place of rank{'s' if len(warm) > 1 else ''} " + \
                ", ".join(map(str, warm))
        unplaced = self._wait_placed([rank for rank in new if rank not in warm])
        if unplaced:
            decision, reason = self._shrink(decision, failures, unplaced, reason)
        if decision.action is Action.HEAL_FROM_PEER:
            start = self._heal(decision, reason)
        elif decision.action is Action.RESTORE_CHECKPOINT:
            start = self._restore_checkpoint(reason)
        else:
            start = self._continue_async(decision, reason)
        self._start_spares()
        return start

    def _heal(self, decision: Decision, reason: str) -> int:
        source = decision.source_rank
        assert source is not None
        state = self.ranks[source].actor.export_state.remote()
        try:  # step and report count of the state handed on
            header = ckpt.decode(ray.get(state, timeout=SURVIVOR_STOP_S))
        except RayError as exc:  # the peer died (or froze) as it handed its state on
            kind = "stalled" if isinstance(exc, GetTimeoutError) else "died"
            raise _RanksLost([Failure(kind, source, self.ranks[source].step,
                                      detail=f"did not hand on its state: {_first_line(exc)}")]) from None
        restore = {r: ("self" if r == source else state) for r in self.ranks}
        self._start_generation(reason, start_step=int(header["step"]),
                               start_report=int(header["report_seq"]), restore=restore,
                               run_ranks=list(self.ranks))
        return int(header["step"])

    def _restore_checkpoint(self, reason: str) -> int:
        doc, ref = self._last_good_checkpoint()
        self._suspect_shard = None  # the shards are rebuilt from ``doc`` below
        skipped = [f for f in self.failure_log if f.get("kind") in _SKIPPED_CHECKPOINT and not f.get("told")]
        for f in skipped:
            f["told"] = True
            reason += f"; the checkpoint of step {f['step']} {_SKIPPED_CHECKPOINT[f['kind']]}"
        reason += f"; restored step {doc['step']}" if doc is not None else "; no checkpoint: from the start"
        if self.spec.mode == "async":
            self._new_shards(doc)
        if doc is None:
            restore: dict[int, Any] = {r: None for r in self.ranks}
            start_step, start_report = 0, 0
        else:
            start_step, start_report = int(doc["step"]), int(doc["report_seq"])
            restore = {r: {"checkpoint": ref} for r in self.ranks}
            if self.spec.mode == "async":  # other ranks continue from their restored clocks
                for r in self.ranks:
                    if r != 0:
                        restore[r] = {"step": 0, "derive_positions": True, "report_seq": 0}
        self._start_generation(reason, start_step=start_step, start_report=start_report,
                               restore=restore, run_ranks=list(self.ranks))
        return start_step

    def _continue_async(self, decision: Decision, reason: str) -> int:
        job = self.spec.job_id
        shards = self.handles.get("ps_shards") or []
        for rank in decision.replace:
            _wait_all([s.leave.remote(job, rank) for s in shards])
        info = self.log.job_info()
        restore = {r: {"step": 0, "derive_positions": True, "report_seq": int(info["report_seq"])}
                   for r in decision.replace}
        self.handles = {**self.handles, "ps_initialised": True}
        self._start_generation(reason, start_step=-1, start_report=-1, restore=restore,
                               run_ranks=list(decision.replace))
        return int(info["last_step"])

    def _last_good_checkpoint(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """The newest committed checkpoint whose file matches its checksum and whose contents
        match the digest committed with it (older on mismatch). While the ranks' digests
        disagree, only a checkpoint at or before the last step whose digests agreed."""
        info = self.log.job_info()
        refs = list(info["checkpoints"])
        mismatch = (info.get("digests") or {}).get("mismatch")
        if mismatch is not None:
            trusted = mismatch.get("trusted_step")
            for ref in refs:
                if trusted is None or ref["step"] > trusted:
                    self.failure_log.append({"kind": "checkpoint_untrusted", "step": ref["step"],
                                             "detail": f"digests disagreed at step {mismatch['step']}"})
            refs = [ref for ref in refs if trusted is not None and ref["step"] <= trusted]
        for ref in reversed(refs):
            try:
                doc = ckpt.read_verified(ref)
            except ckpt.CheckpointCorruptError as exc:
                self._skip_checkpoint(ref, "checkpoint_corrupt", str(exc))
                continue
            if ref.get("digest") and state_digest(checkpoint_state(doc)) != ref["digest"]:
                self._skip_checkpoint(ref, "checkpoint_digest", f"checkpoint {ref['path']} does not "
                                      "hold the state whose digest was committed with it")
                continue
            if self._suspect_shard is not None and _holds_suspect_shard(doc, *self._suspect_shard):
                self._skip_checkpoint(ref, "checkpoint_suspect", f"checkpoint {ref['path']} holds shard "
                                      f"{self._suspect_shard[0]} at or after version {self._suspect_shard[1]}")
                continue
            return doc, ref
        return None, None

    def _skip_checkpoint(self, ref: dict[str, Any], kind: str, detail: str) -> None:
        log.warning("skipping checkpoint of step %s: %s", ref.get("step"), detail)
        self.failure_log.append({"kind": kind, "step": ref.get("step"), "detail": detail})

    def _new_shards(self, doc: dict[str, Any] | None) -> None:
        from synctrain.strategies.paramserver import restore_shards

        for s in self.handles.get("ps_shards") or []:
            _kill(s)
        fresh = self.strategy_cls.on_driver_start(self.spec)
        self.handles = {**self.handles, **fresh, "ps_initialised": doc is not None}
        if doc is not None:
            restore_shards(self.handles["ps_shards"], self.spec.job_id, doc["strategy"],
                           self.spec.collective_timeout_s)
        gone = [rank for rank in range(self.spec.num_workers) if rank not in self.ranks]  # shrunk
        _wait_all([s.leave.remote(self.spec.job_id, rank) for s in self.handles["ps_shards"] for rank in gone])

    def _start_generation(self, reason: str, *, start_step: int, start_report: int,
                          restore: dict[int, Any], run_ranks: list[int]) -> None:
        generation = self.generation + 1
        infos = self._node_infos(generation)
        members = [{"rank": rank, "node_id": infos[rank]["node_id"]} for rank in sorted(infos)]
        handles = dict(self.handles)
        rendezvous = None
        if self.spec.mode == "sync":
            rendezvous = ray.get(self.ranks[0].actor.rendezvous_address.remote())
            handles["rendezvous"] = rendezvous
        handles["gpus_shared"] = _gpus_shared(list(infos.values()))
        survivors = [rank for rank in self.ranks if rank not in run_ranks]
        # Survivors first learn the new number (their writes wait until it is current), then
        # the log makes it current: no window in which a survivor's write could be fenced.
        _wait_all([self.ranks[rank].actor.set_generation.remote(generation) for rank in survivors])
        self.log.generation(generation, members, f"{rendezvous[0]}:{rendezvous[1]}" if rendezvous else None,
                            start_step, start_report, reason)
        self.generation = generation
        if generation > 1:
            self._tell("generation", f"generation {generation} ({len(members)} workers) from step "
                                     f"{start_step if start_step >= 0 else 'current'}: {reason[:200]}")
        local_ranks = dict(zip(sorted(infos), _local_ranks([infos[rank]["node_id"] for rank in sorted(infos)]),
                               strict=True))
        # sync: the ranks are 0..n-1 (a shrunk job renumbers); async: a rank keeps its shard slot
        world = len(self.ranks) if self.spec.mode == "sync" else self.spec.num_workers
        batch_workers = self.spec.num_workers if (self.spec.mode == "sync" and world < self.spec.num_workers
                                                  and getattr(self.trainer, "keep_global_batch", False)) else None
        here = ray.get_runtime_context().get_node_id()
        committed = self.log.job_info()["last_step"] if start_step < 0 else start_step
        for rank in run_ranks:
            r = self.ranks[rank]
            gen = {"generation": generation, "restore": restore.get(rank), "committed_step": committed,
                   "rank": rank, "world_size": world, "batch_workers": batch_workers,
                   "steplog": self.steplog_cfg}
            r.run = r.actor.run.remote(self.trainer._loop_blob, self.trainer._config_blob, handles,
                                       local_ranks[rank], gen)
            r.outcome, r.poll, r.answered, r.started = None, None, True, False
            r.last_activity = r.last_answer = time.monotonic()
            r.pid = infos[rank]["pid"] if infos[rank]["node_id"] == here else None
        if 0 in run_ranks:
            self._next_report = 0

    def _node_infos(self, generation: int) -> dict[int, Any]:
        """Where each rank's process runs. A rank that died, is stopped (SIGSTOP), or does not
        answer within the startup grace is lost: ``_RanksLost`` (the job recovers from it)."""
        stop = self.hooks.pop("stop_in_setup", None) if generation > 1 else None  # test hook
        pid = self.ranks[stop].pid if stop is not None else None
        if pid is not None:
            os.kill(pid, signal.SIGSTOP)
        pending = {rank: r.actor.node_info.remote() for rank, r in self.ranks.items()}
        infos: dict[int, Any] = {}
        lost: list[Failure] = []
        deadline = time.monotonic() + STARTUP_GRACE_S
        while pending and time.monotonic() < deadline:
            ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=1.0)
            for rank in [rank for rank, ref in pending.items() if ref in ready]:
                try:
                    infos[rank] = ray.get(pending.pop(rank))
                except RayError as exc:
                    lost.append(Failure("died", rank, self.ranks[rank].step,
                                        detail=f"died before generation {generation} started: {_first_line(exc)}"))
            for rank in [rank for rank in pending if _stopped(self.ranks[rank].pid)]:
                del pending[rank]
                lost.append(Failure("stalled", rank, self.ranks[rank].step,
                                    detail=f"stopped (SIGSTOP) when generation {generation} was set up"))
        lost += [Failure("stalled", rank, self.ranks[rank].step,
                         detail=f"did not answer within {STARTUP_GRACE_S:g} s when generation {generation} "
                                "was set up") for rank in pending]
        if lost:
            raise _RanksLost(lost)
        return infos

    def _new_actor(self, rank: int, warm: list[int] | None = None) -> Any:
        """A worker for ``rank``: a warm spare when one is ready (``rank`` is added to
        ``warm``), else a new actor."""
        if self._started:
            return self._started.pop(0)
        spare = self._take_spare(rank) if self.spares else None
        if spare is not None:
            if warm is not None:
                warm.append(rank)
            self._start_spares()  # refill (it gets the dead worker's resources once they are freed)
            return spare
        return start_workers(self.trainer, self.spec, [rank])[0]

    def _start_spares(self) -> None:
        """Start spares up to ``spare_workers``: actors with the job's resources, warmed (see
        ``TrainWorker.warm``), idle until a rank needs a new worker."""
        want = int(getattr(self.trainer, "spare_workers", 0) or 0)
        if self.growth:  # resources are short: a spare would take them from the job's own growth
            return
        while len(self.spares) < want:
            actor = self.trainer._actor_class(self.spec).remote(-1, self.spec, self.steplog_cfg)
            self.spares.append((actor, actor.warm.remote(self.trainer._loop_blob)))
            if self._loop_modules:
                actor.preimport.remote(self._loop_modules)

    def _prime_spares(self) -> None:
        """Once rank 0's loop has started, learn what it imported and have each spare import
        the same (``TrainWorker.preimport``), so a spare that takes a rank starts its loop as
        fast as a survivor restarts its own."""
        if not self.spares or self._loop_modules is not None:
            return
        rank0 = self.ranks.get(0)
        if self._modules_ref is None:
            if rank0 is not None and rank0.started and rank0.actor is not None:
                self._modules_ref = rank0.actor.loop_modules.remote()
            return
        if not ray.wait([self._modules_ref], timeout=0)[0]:
            return
        try:
            self._loop_modules = list(ray.get(self._modules_ref))
        except RayError:  # rank 0 died meanwhile: ask the next generation's
            self._modules_ref = None
            return
        for actor, _ in self.spares:
            actor.preimport.remote(self._loop_modules)

    def _take_spare(self, rank: int) -> Any:
        """The first spare that is warm, now ``rank``; None when none is. A spare still
        warming (its process starting, its imports) or still queued for resources (which the
        dead worker's freed ones may give it) is waited for, up to ``SPARE_WARM_WAIT_S`` in all:
        it is ahead of a new process, which would have all of that still to do."""
        deadline = time.monotonic() + SPARE_WARM_WAIT_S
        for i, (actor, ready) in enumerate(list(self.spares)):
            done, _ = ray.wait([ready], timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                continue
            self.spares.remove((actor, ready))
            try:
                ray.get(ready)
                ray.get(actor.take_rank.remote(rank), timeout=SPARE_TAKE_S)
            except (RayError, GetTimeoutError) as exc:
                log.warning("spare worker %d could not take rank %d: %s", i, rank, _first_line(exc))
                _kill(actor)
                continue
            log.info("rank %d: a warm spare takes the dead worker's place", rank)
            return actor
        for actor, _ in self.spares:  # not warm: it would compete with the new worker for resources
            _kill(actor)
        self.spares = []
        return None

    # ---- membership (elastic jobs) ------------------------------------------------------
    def _wait_placed(self, ranks: list[int]) -> dict[int, Any]:
        """Wait up to ``placement_timeout_s`` for the new workers of ``ranks`` to be placed and
        started; returns the ranks whose worker was not, each with its pending ``node_info``
        ref. Progress polls go on meanwhile (async survivors keep training)."""
        refs = {self.ranks[rank].actor.node_info.remote(): rank for rank in ranks}
        pending = list(refs)
        deadline = time.monotonic() + float(getattr(self.trainer, "placement_timeout_s", 120.0))
        while pending and time.monotonic() < deadline:
            _, pending = ray.wait(pending, num_returns=len(pending),
                                  timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            self._poll()
        return {refs[ref]: ref for ref in pending}

    def _shrink(self, decision: Decision, failures: list[Failure], unplaced: dict[int, Any],
                reason: str) -> tuple[Decision, str]:
        """Go on without the ranks whose new worker was not placed, if the policy lets the job
        shrink (else the job fails here). Their actors stay queued with Ray (``growth``). Sync
        mode renumbers the ranks 0..n-1 (the decision's ranks with them); async mode releases
        their clocks on the shards."""
        verdict = self.policy.unplaced(tuple(sorted(unplaced)), len(self.ranks))
        waited = f"none placed within placement_timeout_s={self.trainer.placement_timeout_s:g} s"
        if verdict.action is Action.GIVE_UP:
            self._give_up(failures or [Failure("died", min(unplaced), None, detail=waited)],
                          dataclasses.replace(verdict, reason=f"{verdict.reason} ({waited})"))
        log.warning("generation %d: %s (%s)", self.generation, verdict.reason, waited)
        for rank in sorted(unplaced):
            self.growth.append((self.ranks.pop(rank).actor, unplaced[rank]))
        reason += f"; {verdict.reason} ({waited})"
        if self.spec.mode == "async":
            shards = self.handles.get("ps_shards") or []
            _wait_all([s.leave.remote(self.spec.job_id, rank) for s in shards for rank in unplaced])
            return dataclasses.replace(decision, replace=tuple(r for r in decision.replace if r in self.ranks)), reason
        order = sorted(self.ranks)
        renumber = {old: new for new, old in enumerate(order)}
        self.ranks = {renumber[old]: self.ranks[old] for old in order}
        source = decision.source_rank
        return dataclasses.replace(decision, replace=tuple(renumber[r] for r in decision.replace if r in renumber),
                                   source_rank=None if source is None else renumber[source]), reason

    def _growth_due(self) -> bool:
        """Whether the job should grow now: a worker it went on without is placed, and (sync
        mode) a checkpoint was committed since that was first seen — the next checkpoint
        boundary, which every rank restores in the larger world."""
        if not self.growth or not any(ray.wait([ref], timeout=0)[0] for _, ref in self.growth):
            return False
        if self.spec.mode == "async":
            return True
        try:
            refs = self.log.job_info(consistency="stale")["checkpoints"]
        except Exception:  # noqa: BLE001 - the coordinator may be busy: next time
            return False
        newest = max((int(ref["step"]) for ref in refs), default=-1)
        if self._grow_after is None or self._grow_after[0] != self.generation:
            self._grow_after = (self.generation, newest)
            return False
        return newest > self._grow_after[1]

    def _ready_growth(self) -> list[Any]:
        """The placed workers of ``growth``, taken out of it (one that failed to start is
        replaced by a new one, queued in its place)."""
        ready = []
        for actor, ref in list(self.growth):
            if not ray.wait([ref], timeout=0)[0]:
                continue
            self.growth.remove((actor, ref))
            try:
                ray.get(ref)
            except RayError as exc:
                log.warning("a worker queued for the job to grow back failed (%s); queueing another",
                            _first_line(exc))
                _kill(actor)
                fresh = self.trainer._actor_class(self.spec).remote(-1, self.spec, self.steplog_cfg)
                self.growth.append((fresh, fresh.node_info.remote()))
                continue
            ready.append(actor)
        return ready

    def _grow(self) -> None:
        """Take the placed workers of ``growth`` into the job, as the ranks it misses: async
        mode, they join like replacements; sync mode, every run stops and every rank restores
        the newest checkpoint in the larger world (the steps after it are redone)."""
        ready = self._ready_growth()
        decision = self.policy.capacity(len(self.ranks), len(ready))
        for actor in ready[decision.add if decision is not None else 0:]:  # more than the job misses
            _kill(actor)
        if decision is None:
            return
        log.warning("generation %d: %s", self.generation, decision.reason)
        missing = sorted(set(range(self.spec.num_workers)) - set(self.ranks))[:decision.add]
        if self.spec.mode == "async":
            for rank, actor in zip(missing, ready, strict=False):
                self.ranks[rank] = _Rank(actor)
            self._continue_async(dataclasses.replace(decision, replace=tuple(missing)), decision.reason)
            return
        more = self._stop_runs(f"the job grows back: {decision.reason}")
        reason = decision.reason
        if more:  # a rank died or would not stop meanwhile: a failure like any other
            verdict = self.policy.decide(more, [])
            for f in more:
                self._record_failure(f, verdict)
            if verdict.action is Action.GIVE_UP:
                self._give_up(more, verdict)
            reason += "; " + "; ".join(f"{f.kind} rank {f.rank}" for f in more)
        for rank, actor in zip(missing, ready, strict=False):
            self.ranks[rank] = _Rank(actor)
        self._carry_out(Decision(Action.RESTORE_CHECKPOINT, "checkpoint", reason=reason), [])

    # ---- bookkeeping -------------------------------------------------------------------
    # ---- digests ------------------------------------------------------------------------
    #: (generation, step) of the digest mismatches acted on (a stale read may show one again)
    _digests_acted: tuple[tuple[int, int], ...] = ()
    #: the newest step the log had judged, and in which of our generations we read it
    _digests_seen: tuple[int, int] = (0, -1)

    def _check_digests(self, final: bool = False) -> list[Failure]:
        """The log's verdict on the ranks' digests (sync mode): a ``digest_mismatch`` failure
        per rank outside the majority, or one with rank None when no majority agrees (with 2
        ranks none can be named). Read (stale) only once a digest step has passed since the
        last verdict seen; ``final`` (every run ended): one linearizable read."""
        every = getattr(self.steplog_cfg, "digest_every", 0)
        if self.spec.mode != "sync" or not every:
            return []
        if not final:
            steps = [r.step for r in self.ranks.values() if r.run is not None and r.step is not None]
            due = min(steps) // every * every if steps else 0
            if due == 0 or (self._digests_seen[0] == self.generation and due <= self._digests_seen[1]):
                return []
        try:
            summary = self.log.job_info(consistency="linearizable" if final else "stale")["digests"]
        except Exception:  # noqa: BLE001 - the coordinator may be busy: next time
            return []
        self._digests_seen = (self.generation, int(summary.get("verdict_step") or 0))
        mismatch = summary.get("mismatch")
        if mismatch is None or (mismatch["generation"], mismatch["step"]) in self._digests_acted:
            return []
        self._digests_acted += ((mismatch["generation"], mismatch["step"]),)
        return _digest_failures(mismatch)

    #: pulled-digest mismatches (async) the log had found when last read
    _pulled_seen: int = 0
    #: (generation, digest steps passed by the furthest rank) when the log was last read
    _pulled_due: tuple[int, int] = (0, 0)
    #: (shard, version): a shard's parameters changed with no update at that version, so a
    #: restore takes only a checkpoint of that shard from before it
    _suspect_shard: tuple[int, int] | None = None

    def _check_pulled(self, final: bool = False) -> list[Failure]:
        """Async: the mismatches the log found in the workers' pulled-digest checks since the
        last read. A worker whose copy differed from what the shards served (``held``) dropped
        that step's gradients before sending them and pulled again, so nothing corrupt reached
        a shard: it is recorded as a failure of kind ``digest_mismatch`` with recovery
        ``repulled``, not counted against ``max_failures``, and nothing rolls back. A shard
        that served two different digests for one version (``served``: its memory changed with
        no update applied) is a ``digest_mismatch`` failure of the job, returned: every rank
        rolls back to the newest checkpoint that holds that shard from before that version."""
        every = getattr(self.steplog_cfg, "digest_every", 0)
        if self.spec.mode != "async" or not every:
            return []
        if not final:  # read only once a rank has passed a digest step since the last read
            steps = [r.step for r in self.ranks.values() if r.run is not None and r.step is not None]
            due = (self.generation, max(steps) // every) if steps else (self.generation, 0)
            if due[1] == 0 or due <= self._pulled_due:
                return []
            self._pulled_due = due
        try:
            summary = self.log.job_info(consistency="linearizable" if final else "stale")["digests"]
        except Exception:  # noqa: BLE001 - the coordinator may be busy: next time
            self._pulled_due = (0, 0)
            return []
        pulled = summary.get("pulled") or {}
        total = int(pulled.get("mismatches") or 0)
        if total <= self._pulled_seen:
            return []
        recent = list(pulled.get("recent") or [])
        new = recent[max(0, len(recent) - (total - self._pulled_seen)):]
        self._pulled_seen = total
        failures: list[Failure] = []
        for m in new:
            if m.get("generation") != self.generation:
                continue  # found before a rollback that already replaced that state
            if m.get("kind") != "held":
                shard, version = int(m["shard"]), int(m["version"])
                if self._suspect_shard is None or version < self._suspect_shard[1]:
                    self._suspect_shard = (shard, version)
                failures.append(Failure("digest_mismatch", None, m.get("step"), detail=(
                    f"parameter-server shard {shard} served two different digests for version {version} "
                    f"(to ranks {m.get('served_to')} at their steps {m.get('steps')}): its parameters "
                    "changed with no update applied; every rank rolls back to the newest checkpoint "
                    f"that holds shard {shard} from before version {version}")))
                continue
            detail = (f"rank {m['rank']}'s parameters of shard(s) {m['shards']} (versions "
                      f"{m['versions']}) at step {m['step']} differ from what the shards served: "
                      "that step's gradients were dropped and the parameters pulled again")
            record = {"generation": m["generation"], "rank": m.get("rank"), "kind": "digest_mismatch",
                      "step": m.get("step"), "time": time.time(), "recovery": "repulled",
                      "recovery_s": 0.0, "detail": detail[:500]}
            self.failure_log.append(record)
            self.bookkeeper.add(record)
            self._tell("failure", f"digest_mismatch ({detail[:160]})")
        return failures

    def _stop_runs(self, reason: str) -> list[Failure]:
        """Ask every running rank to stop at its next step boundary and wait for its run to end
        (bounded): the job rolls back and no process is at fault, so only a rank that does not
        stop is killed. Returns the failures seen meanwhile (a rank that died or raised)."""
        running = {rank: r for rank, r in self.ranks.items() if r.run is not None}
        _wait_all([r.actor.request_stop.remote(reason) for r in running.values()], timeout_s=10.0)
        more: list[Failure] = []
        deadline = time.monotonic() + SURVIVOR_STOP_S
        for rank, r in running.items():
            try:
                outcome = ray.get(r.run, timeout=max(0.1, deadline - time.monotonic()))
            except GetTimeoutError:
                outcome = {"ok": False, "rank": rank, "exc_type": "Stalled",
                           "traceback": "did not stop when asked"}
            except RayError as exc:
                outcome = {"ok": False, "rank": rank, "died": True, "detail": _first_line(exc)}
            r.run, r.poll = None, None
            stopped = outcome["ok"] or outcome.get("exc_type") == "RunStopped" or _is_secondary(outcome)
            if not stopped:
                _kill(r.actor)
                r.actor = None
                more.append(Failure("stalled", rank, r.step, detail="did not stop when asked")
                            if outcome.get("exc_type") == "Stalled" else _classify(outcome))
        for r in self.ranks.values():
            r.outcome = None
        return more

    def _record_failure(self, f: Failure, decision: Decision) -> int:
        """Keep the failure and have the bookkeeper commit it (the coordinator may be the
        thing that failed: the record waits until it can be written). Returns its handle."""
        record = {"generation": self.generation, "rank": f.rank, "kind": f.kind, "step": f.step,
                  "time": time.time(), "recovery": decision.recovery, "recovery_s": None,
                  "detail": f.detail[:500]}
        self.failure_log.append(record)
        where = f"rank {f.rank}" if f.rank is not None else "the job"
        self._tell("failure", f"{f.kind} ({where}, step {f.step if f.step is not None else '?'}): "
                              f"{decision.action.value.replace('_', ' ')} ({decision.reason})")
        return self.bookkeeper.add(record)

    def _annotate(self, handle: int, recovery_s: float) -> None:
        self.bookkeeper.annotate(handle, round(recovery_s, 3))
        self._tell("recovered", f"recovered in {recovery_s:.1f} s")

    def _tell(self, kind: str, text: str) -> None:
        """Failures and recoveries to the progress display as they happen."""
        note = getattr(self.monitor, "note", None)
        if note is not None:
            note(kind, text)

    def _note_recoveries(self, final: bool = False) -> None:
        """A recovery is over when the new generation has committed a step past its start.
        ``final`` (the job has ended): a recovery no ping saw end is timed by its first step's
        record in the log (the worker's clock, bounded by now)."""
        if not self._awaiting:
            return
        try:
            last = self.log.job_info(consistency="linearizable" if final else "stale")["last_step"]
        except Exception:  # noqa: BLE001
            return
        keep = []
        for index, t0, start, rank in self._awaiting:
            if last > start:
                now = time.time()
                done = self._first_step_time(start + 1) if final else None
                self._annotate(index, min(now, max(t0, done)) - t0 if done is not None else now - t0)
            else:
                keep.append((index, t0, start, rank))
        self._awaiting = keep

    def _first_step_time(self, step: int) -> float | None:
        """When the live record of ``step`` was made. Records are kept in order, the steps a
        restart superseded and steps lost included, so that record lies at index ``step - 1``
        or a little after."""
        index = max(0, step - 1)
        for _ in range(8):
            try:
                page = self.log.records("steps", start=index, max_items=256)
            except Exception:  # noqa: BLE001 - the time is a figure, not worth failing the job
                return None
            for rec in page:
                if rec.get("step") == step and not rec.get("superseded") and rec.get("time") is not None:
                    return float(rec["time"])
            if len(page) < 256:
                return None
            index += len(page)
        return None

    def _give_up(self, failures: list[Failure], decision: Decision) -> None:
        try:
            self._give_up_raise(failures, decision)
        except TrainingFailedError as exc:
            exc.metrics = self._committed_metrics()  # what the job reported before it failed
            raise

    def _committed_metrics(self) -> list[dict[str, Any]]:
        try:
            reports = [r for r in self.log.records("reports") if not r.get("superseded")]
        except Exception:  # noqa: BLE001 - the error itself matters more
            return []
        return [dict(r["metrics"]) for r in sorted(reports, key=lambda r: r["seq"])]

    def _give_up_raise(self, failures: list[Failure], decision: Decision) -> None:
        history = self.history()
        root = next((f for f in failures if f.kind != "coordinator_node_died"), failures[0])
        if root.kind in ("died", "stalled"):
            raise WorkerDiedError(root.rank, f"{root.kind}: {root.detail}; {decision.reason}",
                                  failures=history)
        tb = root.detail if root.kind == "raised" else f"{root.kind}: {root.detail}"
        exc_type = getattr(root, "exc_type", None) or _exc_type_of(root)
        raise TrainingFailedError(root.rank, tb, exc_type, failures=history,
                                  message=None if self.policy.max_failures == 0 and root.kind == "raised"
                                  else f"the job failed ({decision.reason}); last failure: {root.kind} on "
                                       f"rank {root.rank}.\n{tb}")

    def history(self) -> list[dict[str, Any]]:
        self.bookkeeper.flush(timeout_s=10.0)
        return self.bookkeeper.records()

    def shutdown(self) -> None:
        self.bookkeeper.stop()
        for actor in self._started:
            _kill(actor)
        for r in self.ranks.values():
            if r.actor is not None:
                _kill(r.actor)
        for actor, _ in self.spares + self.growth:
            _kill(actor)
        self.spares, self.growth = [], []
        for z in self.zombies:
            _kill(z)


class _FailureBook(threading.Thread):
    """Commits failure records (and their recovery time) to the step log in order, from its
    own thread and client, retrying while the coordinator cannot commit — so neither a
    coordinator outage nor a slow commit holds up the driver's watch loop."""

    def __init__(self, steplog: StepLog) -> None:
        super().__init__(name="failure-book", daemon=True)
        self.log = steplog
        self.lock = threading.Condition()
        self.entries: list[dict[str, Any]] = []  # {"record", "index" (in the log), "dirty"}
        self.stopping = False
        self.start()

    def add(self, record: dict[str, Any]) -> int:
        with self.lock:
            self.entries.append({"record": dict(record), "index": None, "dirty": False})
            self.lock.notify_all()
            return len(self.entries) - 1

    def annotate(self, handle: int, recovery_s: float) -> None:
        with self.lock:
            entry = self.entries[handle]
            entry["record"]["recovery_s"] = recovery_s
            entry["dirty"] = entry["index"] is not None
            self.lock.notify_all()

    def records(self) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(e["record"]) for e in self.entries]

    def pending(self) -> bool:
        return any(e["index"] is None or e["dirty"] for e in self.entries)

    def flush(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self.lock:
            self.lock.notify_all()
            while self.pending() and time.monotonic() < deadline:
                self.lock.wait(0.2)
            return not self.pending()

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify_all()
        self.join(5)
        self.log.close()

    def run(self) -> None:
        while True:
            with self.lock:
                while not self.pending() and not self.stopping:
                    self.lock.wait(0.5)
                if self.stopping:
                    return
                work = [(i, dict(e["record"]), e["index"]) for i, e in enumerate(self.entries)
                        if e["index"] is None or e["dirty"]]
            for i, record, index in work:
                try:
                    if index is None:
                        index = self.log.failure(record)
                    else:
                        self.log.annotate_failure(index, {"recovery_s": record["recovery_s"]})
                except Exception as exc:  # noqa: BLE001 - the coordinator may be down: later
                    log.info("failure record not committed yet (%s); retrying", exc)
                    time.sleep(0.5)
                    break
                with self.lock:
                    entry = self.entries[i]
                    written = entry["index"] is None
                    entry["index"] = index
                    # annotated while it was being written: one more write
                    entry["dirty"] = (not written and entry["record"]["recovery_s"] != record["recovery_s"]) \
                        or (written and entry["record"]["recovery_s"] != record["recovery_s"])
                    self.lock.notify_all()


# ---------------------------------------------------------------------------- helpers
#: Why a restore passed a checkpoint over, as said in the new generation's reason.
_SKIPPED_CHECKPOINT = {"checkpoint_corrupt": "failed its checksum",
                       "checkpoint_digest": "does not match its committed digest",
                       "checkpoint_untrusted": "is newer than the last step whose digests agreed",
                       "checkpoint_suspect": "holds a shard from after its parameters changed with no update"}


def _holds_suspect_shard(doc: dict[str, Any], shard: int, version: int) -> bool:
    """Whether an async checkpoint holds ``shard`` at ``version`` or later."""
    shards = (doc.get("strategy") or {}).get("shards") or []
    return any(int(s.get("shard_index", -1)) == shard and int(s.get("version", -1)) >= version for s in shards)


def _digest_failures(mismatch: dict[str, Any]) -> list[Failure]:
    """The log's first digest mismatch as failures: one per rank outside the majority, or
    one with rank None when no digest is held by more than half of the ranks."""
    step, world, trusted = mismatch["step"], mismatch["world"], mismatch.get("trusted_step")
    back = (f"every rank rolls back to the last checkpoint at or before step {trusted}, whose digests "
            "agreed" if trusted is not None else "no earlier step's digests agreed: every rank starts over")
    if mismatch.get("minority"):
        return [Failure("digest_mismatch", rank, step,
                        detail=f"rank {rank}'s parameters at step {step} differ from those of "
                               f"the {mismatch['agreeing']} of {world} ranks that agree; {back}")
                for rank in mismatch["minority"]]
    why = "with 2 ranks none can be named" if world == 2 else "no majority of ranks agrees"
    return [Failure("digest_mismatch", None, step,
                    detail=f"the {world} ranks' parameter digests at step {step} disagree and {why}; {back}")]


def _exc_type_of(f: Failure) -> str:
    return f.detail.split(":", 1)[0] if f.kind == "raised" else f.kind


def _classify(outcome: dict[str, Any]) -> Failure:
    rank = outcome.get("rank")
    if outcome.get("died"):
        return Failure("died", rank, outcome.get("step"), detail=outcome.get("detail", ""))
    exc_type = outcome.get("exc_type", "")
    fatal = exc_type in FATAL_EXC_TYPES
    return Failure("raised", rank, outcome.get("step"), fatal=fatal,
                   detail=f"{exc_type}: {outcome.get('traceback', '')}")


def _outcome(ref: Any, rank: int) -> dict[str, Any]:
    try:
        return ray.get(ref)
    except RayError as exc:
        return {"ok": False, "rank": rank, "died": True, "detail": _first_line(exc)}


def _stopped(pid: int | None) -> bool:
    """Whether a process on this machine is stopped (SIGSTOP): state T in /proc/<pid>/stat."""
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] in (b"T", b"t")


def start_workers(trainer: Any, spec: Any, ranks: list[int]) -> list[Any]:
    """New workers for ``ranks``, each already importing what its loop's first lines will
    (``TrainWorker.warm``) while the driver goes on: the first generation's are created before
    the coordinator starts, so the two overlap. They learn the step log's endpoints with their
    first ``run``."""
    actors = [trainer._actor_class(spec).remote(rank, spec) for rank in ranks]
    for actor in actors:
        actor.warm.remote(trainer._loop_blob)
    return actors


def _kill(actor: Any) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001, S110 - already gone
        pass


def _wait_all(refs: list[Any], timeout_s: float = 30.0) -> None:
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)


class _RanksLost(WorkerDiedError):
    """Ranks lost while a generation was being set up (``lost``); ``earlier``: failure
    handles (and when each was detected) whose recovery this generation was to complete.
    Uncaught (the job's first generation) it is the WorkerDiedError of the first rank lost."""

    def __init__(self, failures: list[Failure]) -> None:
        first = failures[0]
        super().__init__(first.rank, f"{first.kind}: {first.detail}")
        self.lost = failures
        self.earlier: list[tuple[int, float]] = []
