"""One parameter-server shard: a Ray actor holding an element range of the flat parameters.

Theory of operation. A shard owns ``params[start:end]`` of the job's flat parameter vector,
a real torch optimizer over that range (rebuilt from the worker's recipe, one param group
per piece of the range that a user param group covers), a version counter (optimizer steps
applied) and one clock per worker: ``clocks[w]`` is how many of worker w's pushes are
reflected in the parameters. The actor is an asyncio actor: every method runs on one event
loop, and nothing awaits between reading a gradient and finishing the optimizer step, so
each update is atomic with respect to every other request.

Two update rules, chosen by the job's staleness:

* ``staleness=0`` (bulk-synchronous): pushes for clock c are summed into one accumulator;
  when every active worker has pushed clock c, the shard applies ``scale * sum`` as one
  optimizer step (scale = 1/num_workers: the average, as sync mode applies), and every
  worker's clock becomes c + 1.
* otherwise (SSP, or fully asynchronous with ``staleness=None``): each push is applied on
  arrival as one optimizer step of ``scale * gradient`` and only the sender's clock advances.

A push arrives as ``push`` (the gradient through Ray), ``push_chunked`` (in inline pieces)
or ``push_shm`` (read in place from the worker's shared-memory channel, the parameters
written back into it; :mod:`synctrain.ps.shm`), which a worker on the shard's machine rings
over the shard's Unix socket rather than through Ray (:mod:`synctrain.ps.ipc`; served by
``_serve_link`` on the same event loop); all of them share ``_serve``.
A push answers with a snapshot of the parameters once ``min(active clocks) >= min_clock``,
the worker's staleness bound. Waiting is an ``asyncio.Condition`` bounded by
``wait_timeout_s``; a timeout is a :class:`StalenessTimeoutError` naming the slowest worker.
A worker that leaves (its loop ended) no longer holds others back: its clock is final and
is left out of the minimum and of the bulk-synchronous quorum.

Every request carries the job id; another id is refused (:class:`StaleJobError`), which
fences off workers of an older job. Pushes must arrive in clock order per worker; a wrong
shape, NaN/Inf (unless ``skip_nonfinite``) or a push before initialisation is refused with
the parameters untouched. Everything that grows is bounded: one accumulator, histograms of
``LAG_BUCKETS`` buckets, at most ``MAX_OPEN_COLLECTIVES`` collectives in flight.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch

from synctrain.ps import ipc
from synctrain.ps.errors import (
    GradientShapeError,
    NonFiniteGradientError,
    ParameterServerError,
    StaleJobError,
    StalenessTimeoutError,
)
from synctrain.ps.layout import Segment
from synctrain.ps.recipe import OptimizerRecipe
from synctrain.ps.shm import PREFIX, Channel

#: Histogram buckets for version lag: 0 .. LAG_BUCKETS-2, and one overflow bucket.
LAG_BUCKETS = 65
#: Collectives (all_reduce/barrier/broadcast) that may be open at once on shard 0.
MAX_OPEN_COLLECTIVES = 64
#: Seconds a new same-machine connection has to present its hello.
HELLO_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ShardConfig:
    """What the driver tells a shard at creation."""

    job_id: str
    shard_index: int
    num_shards: int
    num_workers: int
    staleness: int | None
    skip_nonfinite: bool
    update_scale: float  # each push's gradient is multiplied by this
    wait_timeout_s: float
    torch_threads: int | None = 1  # shards share the workers' CPUs (num_cpus=0 by default)
    # How a reply carries the parameters. False (default): a numpy copy taken inside the event
    # loop (an atomic snapshot), which Ray then writes to the object store. True: one ray.put
    # of the live buffer, also inside the loop, and the reply holds its ObjectRef: one copy
    # fewer but one more fetch for the worker; measured no faster on a 2-core machine.
    reply_by_reference: bool = False


@dataclass(frozen=True)
class PushReply:
    """A shard's answer to a push: its parameters and what they include."""

    params: Any  # snapshot of the shard's range: ObjectRef or ndarray (None: not asked for)
    version: int  # optimizer steps applied so far
    min_clock: int  # every active worker's pushes below this clock are in ``params``
    clocks: tuple[int, ...]  # each worker's pushes reflected in ``params``
    wait_s: float  # time spent waiting for the staleness bound


@dataclass
class _Stats:
    pushes_received: int = 0
    gradients_applied: int = 0  # pushes whose gradient is in the parameters
    updates_applied: int = 0  # optimizer steps taken (one per clock when bulk-synchronous)
    pushes_skipped: int = 0  # non-finite pushes dropped under skip_nonfinite
    pushes_rejected: int = 0
    bytes_received: int = 0
    first_push_t: float | None = None
    last_push_t: float | None = None
    lag_hist: dict[int, list[int]] = field(default_factory=dict)  # worker -> histogram


class ParameterShard:
    """The actor class; see the module docstring. Create with ``ray.remote(ParameterShard)``."""

    def __init__(self, config: ShardConfig) -> None:
        if config.torch_threads is not None:
            torch.set_num_threads(config.torch_threads)
        self.config = config
        n = config.num_workers
        self.clocks = [0] * n  # pushes of each worker reflected in the parameters
        self.received = [0] * n  # pushes received from each worker (the next expected clock)
        self.active = set(range(n))
        self.version = 0
        self.stats_ = _Stats()
        self._cond = asyncio.Condition()
        self._digest: str | None = None
        self._flat: torch.Tensor | None = None
        self._grad: torch.Tensor | None = None
        self._recipe: OptimizerRecipe | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._group_pos: dict[int, int] = {}  # recipe group -> position in self._optimizer
        self._acc: np.ndarray | None = None  # bulk-synchronous accumulator
        self._acc_arrived: set[int] = set()
        self._acc_contributors = 0
        self._collectives: dict[int, dict[str, Any]] = {}
        self._channels: dict[int, Channel] = {}  # worker -> shared-memory channel (same machine)
        self._server: asyncio.Server | None = None  # the Unix socket pushes ring on (same machine)
        self._address: str | None = None

    # ---- setup -------------------------------------------------------------------------
    async def init_params(self, job_id: str, digest: str, params: np.ndarray) -> int:
        """Rank 0 hands over its initial parameters for this range. Returns the element count."""
        self._fence(job_id)
        if self._flat is not None:
            raise ParameterServerError(f"shard {self.config.shard_index} was already initialised")
        array = np.array(params, copy=True)  # own, writable memory
        if array.ndim != 1 or array.size == 0:
            raise GradientShapeError(f"initial parameters must be a non-empty 1-D array, got shape {array.shape}")
        self._flat = torch.from_numpy(array)
        self._grad = torch.zeros_like(self._flat)
        self._digest = digest
        async with self._cond:
            self._cond.notify_all()
        return int(array.size)

    async def get_params(self, job_id: str, worker: int, digest: str) -> PushReply:
        """The initial parameters (waits for rank 0's ``init_params``); checks the model matches."""
        self._fence(job_id)
        await self._wait(lambda: self._flat is not None, worker, "rank 0's initial parameters")
        if digest != self._digest:
            raise ParameterServerError(
                f"worker {worker} built a different model than rank 0 (layout digest {digest} vs "
                f"{self._digest}): every rank must build the same architecture before prepare_model"
            )
        return self._reply(0.0)

    async def set_optimizer(self, job_id: str, worker: int, recipe: OptimizerRecipe,
                            segments: tuple[Segment, ...]) -> None:
        """Build the shard's optimizer from the first worker's recipe; later ones must match."""
        self._fence(job_id)
        await self._wait(lambda: self._flat is not None, worker, "rank 0's initial parameters")
        if self._recipe is not None:
            if recipe != self._recipe:
                raise ParameterServerError(
                    f"worker {worker} built a different optimizer than another worker ({recipe.kind} "
                    f"{recipe.groups} vs {self._recipe.kind} {self._recipe.groups}); every rank must "
                    "create the same optimizer with the same settings"
                )
            return
        assert self._flat is not None and self._grad is not None
        if not segments or segments[-1].end != self._flat.numel():
            raise GradientShapeError(f"segments {segments} do not cover shard {self.config.shard_index}")
        by_group: dict[int, list[torch.Tensor]] = {}
        for seg in segments:
            if seg.group is None:
                continue  # parameter not in the optimizer: held, never updated
            view = self._flat[seg.start:seg.end]
            view.grad = self._grad[seg.start:seg.end]
            by_group.setdefault(seg.group, []).append(view)
        self._optimizer = recipe.build(by_group)
        self._group_pos = {g: i for i, g in enumerate(sorted(by_group))}
        self._recipe = recipe

    async def attach_channel(self, job_id: str, worker: int, path: str, token: bytes) -> str | None:
        """Map worker's shared-memory channel (:mod:`synctrain.ps.shm`) for ``push_shm``.

        Returns the address of the shard's Unix socket (:mod:`synctrain.ps.ipc`), on which the
        worker then rings for each push; None when the file is not on this machine (the
        worker then pushes through Ray).
        """
        self._fence(job_id)
        if not 0 <= worker < self.config.num_workers:
            raise ParameterServerError(f"channel of worker {worker}, but the job has "
                                       f"{self.config.num_workers} workers")
        if self._flat is None:
            raise ParameterServerError("attach_channel before the shard holds parameters (init_params)")
        if not ipc.available():
            return None
        channel = Channel.attach(path, token, job_id, self._flat.numel(), self._flat.numpy().dtype)
        if channel is None:
            return None
        old = self._channels.pop(worker, None)
        if old is not None:
            old.close()
        self._channels[worker] = channel
        return await self._listen()

    async def _listen(self) -> str:
        """Start the shard's Unix socket (once); its address (abstract: no file)."""
        if self._address is None:
            address = f"\0{PREFIX}{self.config.job_id}-s{self.config.shard_index}-{secrets.token_hex(8)}"
            self._server = await asyncio.start_unix_server(self._serve_link, path=address)
            self._address = address
        return self._address

    async def _serve_link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One worker's connection: ``hello`` with its channel token, then one push per frame."""
        try:
            worker = await self._greet(reader)
            if worker is None:
                writer.write(ipc.encode({"error": "ParameterServerError",
                                         "message": "connection refused: not a worker of this job"}))
                return
            writer.write(ipc.encode({"ok": True}))
            while (request := await ipc.read_frame(reader)) is not None:
                try:
                    lrs = request.get("lrs")
                    reply = await self.push_shm(
                        self.config.job_id, worker, int(request["clock"]), bool(request["has"]),
                        int(request["min"]), int(request["ver"]),
                        None if lrs is None else tuple(float(x) for x in lrs), bool(request["want"]))
                    frame: dict[str, Any] = {"version": reply.version, "min_clock": reply.min_clock,
                                             "clocks": list(reply.clocks), "wait_s": reply.wait_s}
                except Exception as exc:  # noqa: BLE001 - every failure goes back to the worker
                    frame = ipc.error_frame(exc)
                writer.write(ipc.encode(frame))
                await writer.drain()
        except (ParameterServerError, ConnectionError, ValueError, TimeoutError):
            pass  # a malformed or oversized frame, or the worker went away: drop the connection
        finally:
            writer.close()

    async def _greet(self, reader: asyncio.StreamReader) -> int | None:
        """The worker a connection's hello authenticates (its channel's token), or None."""
        hello = await asyncio.wait_for(ipc.read_frame(reader), HELLO_TIMEOUT_S)
        if not hello or hello.get("hello") != self.config.job_id:
            return None
        worker, token = hello.get("worker"), hello.get("token")
        channel = self._channels.get(worker) if isinstance(worker, int) else None
        if channel is None or not isinstance(token, bytes) or not hmac.compare_digest(token, channel.token):
            return None
        return int(worker)  # type: ignore[arg-type]

    def node_id(self) -> str:
        """The Ray node this shard runs on (workers on it may attach a shared-memory channel)."""
        return str(ray.get_runtime_context().get_node_id())

    # ---- the data plane ----------------------------------------------------------------
    async def push(self, job_id: str, worker: int, clock: int, grads: np.ndarray | None,
                   min_clock: int, based_on_version: int,
                   lrs: tuple[float, ...] | None = None, want_params: bool = True) -> PushReply:
        """Apply (or accumulate) worker's gradient for ``clock``; answer per the staleness bound.

        ``grads is None`` is a skipped step (the worker found NaN/Inf and opted into skipping):
        the clock advances, nothing is applied. ``want_params=False``: answer at once, without
        parameters (the worker's cached ones still meet its bound).
        """
        wait_s = await self._serve(job_id, worker, clock, grads, min_clock, based_on_version, lrs, want_params)
        return self._ack() if wait_s is None else self._reply(wait_s)

    async def push_shm(self, job_id: str, worker: int, clock: int, has_grads: bool, min_clock: int,
                       based_on_version: int, lrs: tuple[float, ...] | None = None,
                       want_params: bool = True) -> PushReply:
        """``push`` through the worker's shared-memory channel (:mod:`synctrain.ps.shm`).

        The gradient is read in place from the channel (``has_grads=False``: a skipped step)
        and, when asked for, the parameters are written into it: the reply itself carries no
        array. Nothing awaits between the end of the wait and that write, so the worker gets
        an atomic snapshot, as from ``push``.
        """
        self._fence(job_id)
        channel = self._channels.get(worker)
        if channel is None:
            raise ParameterServerError(
                f"worker {worker} pushed through shared memory, but shard {self.config.shard_index} has no "
                "channel of that worker (attach_channel first)")
        grads = channel.grad if has_grads else None
        wait_s = await self._serve(job_id, worker, clock, grads, min_clock, based_on_version, lrs, want_params)
        if wait_s is None:
            return self._ack()
        assert self._flat is not None
        np.copyto(channel.params, self._flat.numpy())
        return dataclasses.replace(self._ack(), wait_s=wait_s)

    async def _serve(self, job_id: str, worker: int, clock: int, grads: np.ndarray | None,
                     min_clock: int, based_on_version: int, lrs: tuple[float, ...] | None,
                     want_params: bool) -> float | None:
        """The work of every push: check, apply or accumulate, then wait for the bound when
        parameters are wanted. Returns the seconds waited (None: no parameters wanted). The
        gradient is consumed before the first await, so the caller's buffer is free after."""
        self._check_push(job_id, worker, clock, grads)
        grads = self._screen_nonfinite(worker, clock, grads)
        self._record_push(worker, grads, based_on_version)
        if lrs is not None:
            self._set_lrs(lrs)
        self.received[worker] = clock + 1
        if self.config.staleness == 0:
            self._accumulate(worker, grads)
        else:
            self._apply_one(worker, grads)
        async with self._cond:
            self._cond.notify_all()
        if not want_params:
            return None
        started = time.monotonic()
        await self._wait(lambda: self.min_clock() >= min_clock, worker,
                         f"every worker's clock to reach {min_clock}")
        return time.monotonic() - started

    async def push_chunked(self, job_id: str, worker: int, clock: int, min_clock: int,
                           based_on_version: int, lrs: tuple[float, ...] | None, want_params: bool,
                           reply_chunks: int, *grad_chunks: np.ndarray) -> tuple[Any, ...]:
        """``push`` for a range of a few hundred KB, in pieces small enough to travel inline.

        Ray passes an argument or a return value under 100 KB inside the call itself and
        anything bigger through the object store, which costs a put, a seal and a fetch each
        way: for a 190 KB range measured at 4.3 ms per round trip, against 2.4 ms for the
        same bytes in 3 inline pieces. The gradient arrives as ``grad_chunks`` (none: a
        skipped step) and the answer is ``(reply, *pieces)`` with ``reply_chunks`` pieces of
        the parameters (the caller asks for ``1 + reply_chunks`` returns); pieces are None
        when no parameters were asked for. Everything else is ``push``.
        """
        if reply_chunks < 1:
            raise ParameterServerError(f"reply_chunks must be >= 1, got {reply_chunks}")
        grads = np.concatenate(grad_chunks) if grad_chunks else None
        reply = await self.push(job_id, worker, clock, grads, min_clock, based_on_version, lrs, want_params)
        if not isinstance(reply.params, np.ndarray):
            return (reply, *([None] * reply_chunks))
        pieces = np.array_split(reply.params, reply_chunks)
        return (dataclasses.replace(reply, params=None), *pieces)

    async def leave(self, job_id: str, worker: int) -> None:
        """Worker's loop ended: stop counting it in the staleness bound and the quorum."""
        self._fence(job_id)
        self.active.discard(worker)
        channel = self._channels.pop(worker, None)
        if channel is not None:
            channel.close()
        if self.config.staleness == 0 and self._acc_arrived and self._acc_arrived >= self.active:
            self._apply_accumulated()
        async with self._cond:
            self._cond.notify_all()

    def min_clock(self) -> int:
        """The clock every active worker has reached (a left worker holds nobody back)."""
        if not self.active:
            return max(self.clocks)
        return min(self.clocks[w] for w in self.active)

    # ---- helpers of push ---------------------------------------------------------------
    def _check_push(self, job_id: str, worker: int, clock: int, grads: np.ndarray | None) -> None:
        self._fence(job_id)
        if not 0 <= worker < self.config.num_workers:
            raise ParameterServerError(f"push from worker {worker}, but the job has "
                                       f"{self.config.num_workers} workers")
        if self._flat is None or self._recipe is None:
            raise ParameterServerError(
                f"worker {worker} pushed before the shard was set up: call prepare_model and "
                "prepare_optimizer before opt.step()")
        if clock != self.received[worker]:
            self.stats_.pushes_rejected += 1
            raise ParameterServerError(
                f"worker {worker} pushed clock {clock} but shard {self.config.shard_index} expected "
                f"clock {self.received[worker]}: pushes must arrive once each, in order")
        if grads is not None and (grads.shape != tuple(self._flat.shape)
                                  or grads.dtype != self._flat.numpy().dtype):
            self.stats_.pushes_rejected += 1
            raise GradientShapeError(
                f"worker {worker} pushed a gradient of shape {grads.shape} and dtype {grads.dtype} to "
                f"shard {self.config.shard_index}, which holds {tuple(self._flat.shape)} "
                f"{self._flat.dtype}; nothing was applied. Every worker must push the full model's "
                "gradient (same model on every rank)")

    def _screen_nonfinite(self, worker: int, clock: int, grads: np.ndarray | None) -> np.ndarray | None:
        if grads is None or bool(np.isfinite(np.sum(grads))) or bool(np.isfinite(grads).all()):
            return grads  # the sum is one pass, no temporary; the full check only if it overflowed
        if self.config.skip_nonfinite:
            return None
        self.stats_.pushes_rejected += 1
        bad = int(grads.size - np.isfinite(grads).sum())
        raise NonFiniteGradientError(
            f"worker {worker} pushed a gradient with {bad} NaN/Inf values at clock {clock} (shard "
            f"{self.config.shard_index}); it was rejected and the parameters are unchanged. Lower "
            "the learning rate, clip gradients, or pass skip_nonfinite=True to drop such steps")

    def _record_push(self, worker: int, grads: np.ndarray | None, based_on_version: int) -> None:
        s = self.stats_
        now = time.monotonic()
        s.pushes_received += 1
        s.first_push_t = now if s.first_push_t is None else s.first_push_t
        s.last_push_t = now
        if grads is None:
            s.pushes_skipped += 1
        else:
            s.bytes_received += int(grads.nbytes)
        hist = s.lag_hist.setdefault(worker, [0] * LAG_BUCKETS)
        hist[min(max(self.version - based_on_version, 0), LAG_BUCKETS - 1)] += 1

    def _set_lrs(self, lrs: tuple[float, ...]) -> None:
        assert self._optimizer is not None
        for group, pos in self._group_pos.items():
            if group < len(lrs):
                self._optimizer.param_groups[pos]["lr"] = float(lrs[group])

    def _accumulate(self, worker: int, grads: np.ndarray | None) -> None:
        assert self._flat is not None
        if self._acc is None:
            self._acc = np.zeros(self._flat.numel(), dtype=self._flat.numpy().dtype)
        assert worker not in self._acc_arrived, "a worker pushed twice for one bulk-synchronous clock"
        if grads is not None:
            np.add(self._acc, grads, out=self._acc)
            self._acc_contributors += 1
        self._acc_arrived.add(worker)
        if self._acc_arrived >= self.active:
            self._apply_accumulated()

    def _apply_accumulated(self) -> None:
        assert self._acc is not None
        if self._acc_contributors:
            self._step(self._acc)
            self.stats_.gradients_applied += self._acc_contributors
        for w in self._acc_arrived:
            self.clocks[w] += 1
        self._acc.fill(0)
        self._acc_arrived.clear()
        self._acc_contributors = 0

    def _apply_one(self, worker: int, grads: np.ndarray | None) -> None:
        if grads is not None:
            self._step(grads)
            self.stats_.gradients_applied += 1
        self.clocks[worker] += 1

    def _step(self, grads: np.ndarray) -> None:
        """One optimizer step with ``update_scale * grads``; no await inside, so it is atomic."""
        assert self._grad is not None
        np.multiply(grads, self.config.update_scale, out=self._grad.numpy())
        if self._optimizer is not None:
            self._optimizer.step()
        self.version += 1
        self.stats_.updates_applied += 1

    def _ack(self) -> PushReply:
        """An answer without parameters (the clocks and version as of now)."""
        return PushReply(params=None, version=self.version, min_clock=self.min_clock(),
                         clocks=tuple(self.clocks), wait_s=0.0)

    def _reply(self, wait_s: float) -> PushReply:
        assert self._flat is not None
        live = self._flat.numpy()
        snapshot: Any = ray.put(live) if self.config.reply_by_reference else live.copy()
        return PushReply(params=snapshot, version=self.version,
                         min_clock=self.min_clock(), clocks=tuple(self.clocks), wait_s=wait_s)

    # ---- shared helpers ----------------------------------------------------------------
    def _fence(self, job_id: str) -> None:
        if job_id != self.config.job_id:
            raise StaleJobError(
                f"a request from job {job_id} reached parameter-server shard {self.config.shard_index} "
                f"of job {self.config.job_id}; it was refused (a worker of an older job is still "
                "running: stop it, its results would corrupt the new job)")

    async def _wait(self, predicate: Any, worker: int, what: str) -> None:
        timeout = self.config.wait_timeout_s
        async with self._cond:
            try:
                await asyncio.wait_for(self._cond.wait_for(predicate), timeout)
            except TimeoutError:
                behind = min((self.received[w] for w in self.active), default=0)
                slow = [w for w in sorted(self.active) if self.received[w] == behind]
                raise StalenessTimeoutError(
                    f"worker {worker} waited {timeout:g} s on shard {self.config.shard_index} for {what}; "
                    f"pushes received per worker: {self.received}, slowest active worker(s): {slow}. "
                    "A worker may have died or stalled; if it is only slow, raise wait_timeout_s") from None

    # ---- collectives for all_reduce / barrier / broadcast (shard 0 only) ----------------
    async def collective(self, job_id: str, seq: int, worker: int, array: np.ndarray | None,
                         participants: int) -> np.ndarray | None:
        """Sum of the non-None ``array``s of ``participants`` calls with the same ``seq``."""
        self._fence(job_id)
        state = self._collectives.get(seq)
        if state is None:
            if len(self._collectives) >= MAX_OPEN_COLLECTIVES:
                raise ParameterServerError(f"more than {MAX_OPEN_COLLECTIVES} collectives open at once; "
                                           "every worker must call all_reduce/barrier in the same order")
            state = self._collectives[seq] = {"sum": None, "arrived": 0, "taken": 0}
        if array is not None:
            state["sum"] = np.array(array, copy=True) if state["sum"] is None else state["sum"] + array
        state["arrived"] += 1
        async with self._cond:
            self._cond.notify_all()
        await self._wait(lambda: state["arrived"] >= participants, worker, f"collective #{seq}")
        state["taken"] += 1
        if state["taken"] >= participants:
            del self._collectives[seq]
        return state["sum"]

    # ---- observability -----------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        s = self.stats_
        span = (s.last_push_t - s.first_push_t) if s.first_push_t is not None and s.last_push_t else 0.0
        return {
            "shard": self.config.shard_index,
            "elements": int(self._flat.numel()) if self._flat is not None else 0,
            "version": self.version,
            "clocks": list(self.clocks),
            "pushes_received": s.pushes_received,
            "gradients_applied": s.gradients_applied,
            "updates_applied": s.updates_applied,
            "pushes_skipped": s.pushes_skipped,
            "pushes_rejected": s.pushes_rejected,
            "bytes_received": s.bytes_received,
            "pushes_per_s": (s.pushes_received - 1) / span if span > 0 else 0.0,
            "version_lag_hist": {int(w): _trim(h) for w, h in sorted(s.lag_hist.items())},
        }

    def params(self) -> np.ndarray | None:
        """The shard's current parameters (for tests and checkpoints)."""
        return None if self._flat is None else self._flat.numpy().copy()


def _trim(hist: list[int]) -> list[int]:
    last = max((i for i, v in enumerate(hist) if v), default=-1)
    return list(hist[: last + 1])
