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
shape, NaN/Inf (unless ``skip_nonfinite``), a push before initialisation or from a worker
that left is refused with the parameters untouched. Everything that grows is bounded: one
accumulator, histograms of ``LAG_BUCKETS`` buckets, at most ``MAX_OPEN_COLLECTIVES``
collectives in flight, at most ``CONNECTIONS_PER_WORKER`` per worker (plus
``CONNECTION_SLACK``) connections on the socket, whose peers must run as the shard's user
and say hello in at most ``ipc.MAX_HELLO_BYTES`` within ``HELLO_TIMEOUT_S``.

Recovery. ``export_state`` is an atomic snapshot (taken with no await inside): parameters,
the optimizer's state, clocks, version, all as torch tensors and plain values, so that
``torch.save``/``torch.load(weights_only=True)`` round-trips it; a bulk-synchronous round
still being collected is left out (none of its pushes has been answered; they are pushed
again after a restore). A worker on the shard's machine asks for one over its socket
instead (``{"snap": tag}``, no answer): the shard takes it when the frame arrives, so it holds
exactly that worker's pushes sent before, and keeps it (at most ``MAX_SNAPSHOTS``) until
``take_snapshot`` fetches it through Ray — the worker's loop never waits for the copy to
travel. ``import_state`` loads one into a fresh shard, which then counts as
initialised; the optimizer's state waits for ``set_optimizer`` to rebuild the optimizer.
``join`` lets a replacement take over a worker's slot: it is active again at the clock
``max(its own, the other active workers' minimum)``, so it neither holds the others back nor
waits for them. A push from the replaced process (a zombie) no longer matches the clock the
shard expects and is refused, naming the join; one from a worker that left and has not
joined again is refused outright, and the socket connection of a replaced process is cut at
its next push (its channel is no longer the worker's).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import hmac
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch

from synctrain.digest import array_digest
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

log = logging.getLogger(__name__)

#: Histogram buckets for version lag: 0 .. LAG_BUCKETS-2, and one overflow bucket.
LAG_BUCKETS = 65
#: Collectives (all_reduce/barrier/broadcast) that may be open at once on shard 0.
MAX_OPEN_COLLECTIVES = 64
#: Seconds a new same-machine connection has to present its hello (a worker sends it at once).
HELLO_TIMEOUT_S = 2.0
#: Snapshots asked for over the socket and not yet fetched, kept at most (a worker has at
#: most synctrain.strategies.paramserver.MAX_PENDING_SNAPSHOTS out; more are orphans of a
#: worker that died before fetching them).
MAX_SNAPSHOTS = 16
#: Longest a ``{"take": tag}`` on the socket waits for its snapshot (the request says how long).
MAX_TAKE_WAIT_S = 3600.0
#: Socket connections a shard serves at once: a worker holds one per shard, a replacement one
#: more while the old one drains; the slack covers joins. Any connection beyond is refused.
CONNECTIONS_PER_WORKER = 4
CONNECTION_SLACK = 8


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
    digest: str | None = None  # of the parameters served, when the push asked (``digest=True``)


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
        self.worker_clocks = [0] * n  # pushes of each worker reflected in the parameters (clocks())
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
        self._connections = 0  # open on the socket (bounded by _max_connections)
        # Recovery: an imported optimizer state waiting for set_optimizer, the digest of the
        # state last loaded (every rank loads the same checkpoint: only the first applies),
        # and the clock each replaced worker joined at (names a zombie's push in the error).
        self._pending_optimizer_state: dict[str, Any] | None = None
        self._loaded_optimizer_digest: str | None = None
        self._flip_at_version: tuple[int, int] | None = None  # test hook (inject_flip): version, bit
        self._joined_at: dict[int, int] = {}
        # Snapshots a worker asked for over its socket (``{"snap": tag}``), kept until
        # ``take_snapshot`` fetches them (at most MAX_SNAPSHOTS: the oldest go first)
        self._snapshots: collections.OrderedDict[str, dict[str, Any] | Exception] = collections.OrderedDict()

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
        optimizer = recipe.build(by_group)
        pending = self._pending_optimizer_state
        if pending is not None:  # imported from a checkpoint before the optimizer existed
            self._load_optimizer(optimizer, pending)  # raises before anything is kept
        self._optimizer = optimizer
        self._group_pos = {g: i for i, g in enumerate(sorted(by_group))}
        self._recipe = recipe
        self._pending_optimizer_state = None

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
        """One connection: admitted (same user, under the bound), then served until it closes."""
        refusal = self._admit(writer)
        if refusal is not None:
            with contextlib.suppress(OSError):
                writer.write(ipc.encode({"error": "ParameterServerError", "message": f"connection refused: {refusal}"}))
            writer.close()
            return
        self._connections += 1
        try:
            await self._serve_worker(reader, writer)
        except (ParameterServerError, ConnectionError, ValueError, TimeoutError):
            pass  # a malformed or oversized frame, a slow hello, or the worker went away: drop it
        finally:
            self._connections -= 1
            writer.close()

    def _admit(self, writer: asyncio.StreamWriter) -> str | None:
        """Why a new connection is refused before it may send a byte, or None to admit it.

        The socket is abstract, so any local user can connect: only the shard's own user may
        (``SO_PEERCRED``), and never more than ``_max_connections`` at once."""
        uid = ipc.peer_uid(writer.get_extra_info("socket"))
        if uid != os.getuid():
            return f"the peer runs as uid {uid}, the shard as uid {os.getuid()}"
        limit = self._max_connections()
        if self._connections >= limit:
            return (f"shard {self.config.shard_index} serves {limit} connections already "
                    f"({CONNECTIONS_PER_WORKER} per worker + {CONNECTION_SLACK})")
        return None

    def _max_connections(self) -> int:
        return CONNECTIONS_PER_WORKER * self.config.num_workers + CONNECTION_SLACK

    async def _serve_worker(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """``hello`` with the worker's channel token, then one push per frame while the
        channel the hello named is still the worker's (a replacement's attach ends it)."""
        greeted = await self._greet(reader)
        if greeted is None:
            writer.write(ipc.encode({"error": "ParameterServerError",
                                     "message": "connection refused: not a worker of this job"}))
            return
        worker, channel = greeted
        writer.write(ipc.encode({"ok": True}))
        while (request := await ipc.read_frame(reader)) is not None:
            if self._channels.get(worker) is not channel:
                writer.write(ipc.encode(ipc.error_frame(ParameterServerError(
                    f"worker {worker} was replaced (a new process joined in its place) or left: this "
                    "connection of its old process is closed and its push refused; stop that process"))))
                return
            if "snap" in request:  # a snapshot for a checkpoint: taken now, fetched later, no answer
                self._stash(str(request["snap"]))
                async with self._cond:
                    self._cond.notify_all()
                continue
            if "take" in request:  # the worker's step-log writer fetches one (its own connection)
                writer.write(await self._take_frame(worker, request))
                await writer.drain()
                continue
            try:
                lrs = request.get("lrs")
                reply = await self.push_shm(
                    self.config.job_id, worker, int(request["clock"]), bool(request["has"]),
                    int(request["min"]), int(request["ver"]),
                    None if lrs is None else tuple(float(x) for x in lrs), bool(request["want"]),
                    bool(request.get("dig", False)))
                frame: dict[str, Any] = {"version": reply.version, "min_clock": reply.min_clock,
                                         "clocks": list(reply.clocks), "wait_s": reply.wait_s}
                if reply.digest is not None:
                    frame["digest"] = reply.digest
            except Exception as exc:  # noqa: BLE001 - every failure goes back to the worker
                frame = ipc.error_frame(exc)
            writer.write(ipc.encode(frame))
            await writer.drain()

    async def _greet(self, reader: asyncio.StreamReader) -> tuple[int, Channel] | None:
        """The worker (and its channel) a connection's hello authenticates, or None. The hello
        is a few dozen bytes: a longer one, or one slower than HELLO_TIMEOUT_S, ends it."""
        hello = await asyncio.wait_for(ipc.read_frame(reader, ipc.MAX_HELLO_BYTES), HELLO_TIMEOUT_S)
        if not hello or hello.get("hello") != self.config.job_id:
            return None
        worker, token = hello.get("worker"), hello.get("token")
        channel = self._channels.get(worker) if isinstance(worker, int) else None
        if channel is None or not isinstance(token, bytes) or not hmac.compare_digest(token, channel.token):
            return None
        return int(worker), channel  # type: ignore[arg-type]

    def node_id(self) -> str:
        """The Ray node this shard runs on (workers on it may attach a shared-memory channel)."""
        return str(ray.get_runtime_context().get_node_id())

    # ---- the data plane ----------------------------------------------------------------
    async def push(self, job_id: str, worker: int, clock: int, grads: np.ndarray | None,
                   min_clock: int, based_on_version: int,
                   lrs: tuple[float, ...] | None = None, want_params: bool = True,
                   digest: bool = False) -> PushReply:
        """Apply (or accumulate) worker's gradient for ``clock``; answer per the staleness bound.

        ``grads is None`` is a skipped step (the worker found NaN/Inf and opted into skipping,
        or found its parameters corrupted): the clock advances, nothing is applied.
        ``want_params=False``: answer at once, without parameters (the worker's cached ones
        still meet its bound). ``digest=True`` (with parameters): the reply carries the digest
        of the parameters it serves (:func:`synctrain.digest.array_digest`).
        """
        wait_s = await self._serve(job_id, worker, clock, grads, min_clock, based_on_version, lrs, want_params)
        return self._ack() if wait_s is None else self._reply(wait_s, digest)

    async def push_shm(self, job_id: str, worker: int, clock: int, has_grads: bool, min_clock: int,
                       based_on_version: int, lrs: tuple[float, ...] | None = None,
                       want_params: bool = True, digest: bool = False) -> PushReply:
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
        reply = dataclasses.replace(self._ack(), wait_s=wait_s,
                                    digest=array_digest(channel.params) if digest else None)
        self._maybe_flip()
        return reply

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
                           reply_chunks: int, *grad_chunks: np.ndarray, digest: bool = False,
                           ) -> tuple[Any, ...]:
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
        reply = await self.push(job_id, worker, clock, grads, min_clock, based_on_version, lrs, want_params,
                                digest)
        if not isinstance(reply.params, np.ndarray):
            return (reply, *([None] * reply_chunks))
        pieces = np.array_split(reply.params, reply_chunks)
        return (dataclasses.replace(reply, params=None), *pieces)

    async def leave(self, job_id: str, worker: int) -> None:
        """Worker's loop ended, or it died (the driver calls this for a dead rank): stop
        counting it in the staleness bound and the quorum, so its clock holds nobody back and
        any later push from it is refused until a replacement ``join``s."""
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
            return max(self.worker_clocks)
        return min(self.worker_clocks[w] for w in self.active)

    # ---- recovery: snapshots, restore, replacement workers ----------------------------
    async def export_state(self, job_id: str) -> dict[str, Any]:
        """An atomic snapshot of the shard (nothing awaits inside) for a checkpoint.

        Only torch CPU tensors and plain values: ``torch.load(weights_only=True)`` reads it
        back. A bulk-synchronous round still being collected is left out: its pushes were
        answered to nobody, so ``received`` is ``clocks`` for the workers that sent one.
        """
        self._fence(job_id)
        return self._export()

    async def take_snapshot(self, job_id: str, tag: str, timeout_s: float) -> dict[str, Any]:
        """The snapshot a worker asked for over its socket with ``{"snap": tag}`` (see
        ``export_state``), taken when that frame arrived: before any push the worker sent
        after it. Waits up to ``timeout_s`` for the frame (this call may overtake it)."""
        self._fence(job_id)
        state = await self._await_snapshot(tag, timeout_s)
        del self._snapshots[tag]
        return state

    async def _take_frame(self, worker: int, request: dict[str, Any]) -> bytes:
        """The answer to ``{"take": tag, "wait": seconds}`` on a worker's socket: the snapshot
        as one frame (:func:`ipc.snapshot_frame`), or an error frame."""
        try:
            tag, wait_s = str(request["take"]), float(request.get("wait", 0.0))
            if not tag.startswith(f"{worker}:"):
                raise ParameterServerError(f"worker {worker} may fetch only its own snapshots, not {tag!r}")
            frame = ipc.snapshot_frame(await self._await_snapshot(tag, min(max(wait_s, 0.0), MAX_TAKE_WAIT_S)))
        except ipc.SnapshotViaRayError as exc:  # kept: the worker fetches it through Ray instead
            return ipc.encode({**ipc.error_frame(exc), "via_ray": True})
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the worker
            self._snapshots.pop(str(request.get("take")), None)
            return ipc.encode(ipc.error_frame(exc))
        del self._snapshots[tag]
        return frame

    async def _await_snapshot(self, tag: str, timeout_s: float) -> dict[str, Any]:
        """The snapshot ``tag`` once it is here (its ``snap`` frame may still be on the way),
        left in place for the caller to remove; raises the error it was taken with (removed),
        or after ``timeout_s``."""
        try:
            async with self._cond:
                await asyncio.wait_for(self._cond.wait_for(lambda: tag in self._snapshots), timeout_s)
        except TimeoutError:
            raise ParameterServerError(
                f"shard {self.config.shard_index} holds no snapshot {tag!r} after {timeout_s:g} s: the "
                f"worker's request never arrived, or it was dropped (more than {MAX_SNAPSHOTS} waited)") from None
        state = self._snapshots[tag]
        if isinstance(state, Exception):
            del self._snapshots[tag]
            raise state
        return state

    def _stash(self, tag: str) -> None:
        """Take a snapshot for ``take_snapshot`` (an error is kept, to be raised there)."""
        try:
            state: dict[str, Any] | Exception = self._export()
        except ParameterServerError as exc:
            state = exc
        self._snapshots[tag] = state
        while len(self._snapshots) > MAX_SNAPSHOTS:
            dropped, _ = self._snapshots.popitem(last=False)
            log.warning("shard %d: dropped snapshot %s, never fetched", self.config.shard_index, dropped)

    def _export(self) -> dict[str, Any]:
        if self._flat is None or self._digest is None:
            raise ParameterServerError(f"shard {self.config.shard_index} holds no parameters yet, so there "
                                       "is nothing to export: call it after prepare_model")
        received = list(self.received)
        for w in self._acc_arrived:
            received[w] = self.worker_clocks[w]
        return {"shard_index": self.config.shard_index, "num_shards": self.config.num_shards,
                "params": self._flat.detach().clone(), "optimizer": self._optimizer_state(),
                "clocks": list(self.worker_clocks), "received": received, "active": sorted(self.active),
                "version": self.version, "digest": self._digest}

    async def import_state(self, job_id: str, state: dict[str, Any]) -> None:
        """Load ``export_state``'s snapshot into this fresh shard (restore from a checkpoint).

        The shard then counts as initialised (``get_params`` answers at once; rank 0 must not
        ``init_params``), every worker is active again (each ``join``s), and the optimizer's
        state is loaded when ``set_optimizer`` builds the optimizer.
        """
        self._fence(job_id)
        if self._flat is not None:
            raise ParameterServerError(
                f"import_state on shard {self.config.shard_index}, which already holds parameters: a "
                "checkpoint is imported only into fresh shards, created for the restore")
        params = _check_state(state, self.config)
        self._flat = params.detach().to("cpu").contiguous().clone()
        self._grad = torch.zeros_like(self._flat)
        self._digest = str(state["digest"])
        self.worker_clocks = [int(c) for c in state["clocks"]]
        self.received = [int(r) for r in state["received"]]
        self.active = set(range(self.config.num_workers))
        self.version = int(state["version"])
        self._pending_optimizer_state = _copy_tree(state["optimizer"])
        async with self._cond:
            self._cond.notify_all()

    async def optimizer_state(self, job_id: str) -> dict[str, Any] | None:
        """The shard optimizer's ``state_dict`` (tensors copied); None without one."""
        self._fence(job_id)
        return self._optimizer_state()

    async def load_optimizer_state(self, job_id: str, state: dict[str, Any] | None) -> None:
        """Replace the optimizer's state with ``optimizer_state``'s output (a checkpoint).

        Every rank loads the same checkpoint, at its own pace: only the first load of a given
        state applies, so a rank that loads late does not undo the steps others took since.
        Before ``set_optimizer`` the state waits for it.
        """
        self._fence(job_id)
        if self._recipe is None:
            self._pending_optimizer_state = _copy_tree(state)
            return
        digest = _tree_digest(state)
        if digest == self._loaded_optimizer_digest:
            return
        self._load_optimizer(self._optimizer, state)

    async def join(self, job_id: str, worker: int) -> int:
        """A replacement takes over ``worker``'s slot; returns the clock it must push next.

        The clock is ``max(the worker's own, the other active workers' minimum)``: under a
        finite staleness bound the replacement neither holds the others back nor waits for
        them. The replaced process's channel is dropped. A bulk-synchronous round that
        holds a push of the replaced process is awaited first (the replacement's first push
        belongs to the next round).
        """
        self._fence(job_id)
        self._check_worker(worker, "join")
        if self._flat is None:
            raise ParameterServerError(f"worker {worker} joined shard {self.config.shard_index} before it "
                                       "holds parameters (init_params or import_state first)")
        others = [self.worker_clocks[w] for w in self.active if w != worker]
        clock = max(self.received[worker], min(others, default=self.worker_clocks[worker]))
        pending = self.config.staleness == 0 and worker in self._acc_arrived
        if not pending:  # else its round's apply advances clocks[worker] to clock
            self.worker_clocks[worker] = clock
        self.received[worker] = clock
        self.active.add(worker)
        self._joined_at[worker] = clock
        channel = self._channels.pop(worker, None)
        if channel is not None:
            channel.close()
        async with self._cond:
            self._cond.notify_all()
        if pending:
            await self._wait(lambda: worker not in self._acc_arrived, worker,
                             f"the bulk-synchronous round {clock - 1} its predecessor pushed to")
        return clock

    async def clocks(self, job_id: str) -> list[int]:
        """Each worker's pushes reflected in the parameters."""
        self._fence(job_id)
        return list(self.worker_clocks)

    def _optimizer_state(self) -> dict[str, Any] | None:
        if self._optimizer is None:
            return _copy_tree(self._pending_optimizer_state)
        return _copy_tree(self._optimizer.state_dict())

    def _load_optimizer(self, optimizer: torch.optim.Optimizer | None, state: dict[str, Any] | None) -> None:
        """Load ``state`` into ``optimizer`` (this shard's); a mismatch is a clear error and
        leaves the optimizer as it was."""
        where = f"shard {self.config.shard_index}"
        if optimizer is None or state is None:
            if optimizer is state:  # both None: no parameter of this range is trained
                return
            raise ParameterServerError(
                f"{where} {'has no' if optimizer is None else 'has an'} optimizer but the state to load "
                f"{'has one' if optimizer is None else 'has none'}: it was saved from another model or "
                "optimizer (or another num_ps_shards)")
        _check_optimizer_shapes(optimizer, state, where)
        try:
            optimizer.load_state_dict(_copy_tree(state))
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise ParameterServerError(f"{where} cannot load this optimizer state ({exc}): it was saved "
                                       "from another optimizer, model or num_ps_shards") from None
        self._loaded_optimizer_digest = _tree_digest(state)

    # ---- helpers of push ---------------------------------------------------------------
    def _check_push(self, job_id: str, worker: int, clock: int, grads: np.ndarray | None) -> None:
        self._fence(job_id)
        self._check_worker(worker, "push")
        # A skipped push (no gradient) needs no optimizer: a joining worker catches up an
        # imported shard with them before prepare_optimizer.
        if self._flat is None or (self._recipe is None and grads is not None):
            raise ParameterServerError(
                f"worker {worker} pushed before the shard was set up: call prepare_model and "
                "prepare_optimizer before opt.step()")
        if worker not in self.active:
            self.stats_.pushes_rejected += 1
            raise ParameterServerError(
                f"worker {worker} pushed clock {clock} to shard {self.config.shard_index} after it left "
                "(its loop ended, or it was declared dead and has not joined again): refused. A "
                "process that was replaced must stop")
        if clock != self.received[worker]:
            self.stats_.pushes_rejected += 1
            joined = self._joined_at.get(worker)
            why = (f"worker {worker} was replaced at clock {joined}: this push comes from its old process "
                   "(a zombie) and is refused; stop that process" if joined is not None and clock < joined
                   else "pushes must arrive once each, in order")
            raise ParameterServerError(
                f"worker {worker} pushed clock {clock} but shard {self.config.shard_index} expected "
                f"clock {self.received[worker]}: {why}")
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
            self.worker_clocks[w] += 1
        self._acc.fill(0)
        self._acc_arrived.clear()
        self._acc_contributors = 0

    def _apply_one(self, worker: int, grads: np.ndarray | None) -> None:
        if grads is not None:
            self._step(grads)
            self.stats_.gradients_applied += 1
        self.worker_clocks[worker] += 1

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
                         clocks=tuple(self.worker_clocks), wait_s=0.0)

    def _reply(self, wait_s: float, digest: bool = False) -> PushReply:
        assert self._flat is not None
        live = self._flat.numpy()
        snapshot: Any = ray.put(live) if self.config.reply_by_reference else live.copy()
        reply = PushReply(params=snapshot, version=self.version,
                          min_clock=self.min_clock(), clocks=tuple(self.worker_clocks), wait_s=wait_s,
                          digest=array_digest(live) if digest else None)
        self._maybe_flip()
        return reply

    def inject_flip(self, job_id: str, version: int, bit: int = 22) -> None:
        """Test hook: right after serving parameters at ``version``, flip ``bit`` of the first
        one in place, with no update applied and the version unchanged (a silent corruption of
        the shard's memory); a later serve of the same version then differs."""
        self._fence(job_id)
        size = 8 * (self._flat.element_size() if self._flat is not None else 4)
        if not 0 <= bit < size:
            raise ValueError(f"bit must be in [0, {size}), got {bit}")
        self._flip_at_version = (int(version), int(bit))

    def _maybe_flip(self) -> None:
        if self._flip_at_version is None or self._flip_at_version[0] != self.version or self._flat is None:
            return
        bit = self._flip_at_version[1]
        self._flip_at_version = None
        raw = self._flat.view(-1)[:1].view(torch.uint8)
        raw[bit // 8] ^= 1 << (bit % 8)
        log.warning("INJECT flip_shard_bits on shard %d at version %d: bit %d of parameter 0 (now %.6g)",
                    self.config.shard_index, self.version, bit, float(self._flat.view(-1)[0]))

    # ---- shared helpers ----------------------------------------------------------------
    def _check_worker(self, worker: int, what: str) -> None:
        if not (isinstance(worker, int) and 0 <= worker < self.config.num_workers):
            raise ParameterServerError(f"{what} from worker {worker}, but the job has "
                                       f"{self.config.num_workers} workers")

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
            "clocks": list(self.worker_clocks),
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


# ---- recovery helpers ----------------------------------------------------------------------
#: What export_state returns and import_state needs.
STATE_KEYS = ("shard_index", "num_shards", "params", "optimizer", "clocks", "received", "active",
              "version", "digest")
_PARAM_DTYPES = (torch.float16, torch.float32, torch.float64)


def _check_state(state: Any, config: ShardConfig) -> torch.Tensor:
    """The parameters of a snapshot that fits this shard; anything else is a clear error."""
    if not isinstance(state, dict) or set(STATE_KEYS) - set(state):
        missing = sorted(set(STATE_KEYS) - set(state)) if isinstance(state, dict) else list(STATE_KEYS)
        raise ParameterServerError(f"not a parameter-server shard snapshot (export_state): missing {missing}")
    here = f"shard {config.shard_index} of {config.num_shards}"
    if (state["shard_index"], state["num_shards"]) != (config.shard_index, config.num_shards):
        raise ParameterServerError(
            f"the snapshot of shard {state['shard_index']} of {state['num_shards']} was imported into {here}: "
            "restore with the same num_ps_shards, each shard from its own snapshot")
    n = config.num_workers
    clocks, received = state["clocks"], state["received"]
    if not (isinstance(clocks, list) and isinstance(received, list) and len(clocks) == len(received) == n):
        raise ParameterServerError(
            f"the snapshot holds clocks of {len(clocks) if isinstance(clocks, list) else '?'} workers, {here} "
            f"serves {n}: restore with the same num_workers")
    if not all(isinstance(c, int) and isinstance(r, int) and 0 <= c <= r for c, r in zip(clocks, received, strict=True)):
        raise ParameterServerError(f"the snapshot's clocks {clocks} and received {received} are inconsistent "
                                   "(each clock an int >= 0, at most the pushes received)")
    params = state["params"]
    if not (isinstance(params, torch.Tensor) and params.dim() == 1 and params.numel() > 0
            and params.dtype in _PARAM_DTYPES):
        raise ParameterServerError(f"the snapshot's parameters must be a non-empty 1-D float tensor, got "
                                   f"{type(params).__name__} {getattr(params, 'shape', '')}")
    if not (isinstance(state["version"], int) and state["version"] >= 0 and isinstance(state["digest"], str)):
        raise ParameterServerError("the snapshot's version (an int >= 0) or digest (a str) is malformed")
    return params


def _check_optimizer_shapes(optimizer: torch.optim.Optimizer, state: dict[str, Any], where: str) -> None:
    """torch's load_state_dict checks the group sizes, not the tensors' shapes: check those."""
    pieces = [p for group in optimizer.param_groups for p in group["params"]]
    saved = state.get("state") if isinstance(state, dict) else None
    if not isinstance(saved, dict):
        raise ParameterServerError(f"{where}: not an optimizer state_dict (no 'state' map)")
    for index, entry in saved.items():
        if not (isinstance(index, int) and 0 <= index < len(pieces)) or not isinstance(entry, dict):
            raise ParameterServerError(f"{where}: the optimizer state names piece {index!r}, but the shard's "
                                       f"optimizer has {len(pieces)}: saved from another model or num_ps_shards")
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != pieces[index].shape:
                raise ParameterServerError(
                    f"{where}: the optimizer state's {key!r} of piece {index} has shape {tuple(value.shape)}, "
                    f"the shard's piece {tuple(pieces[index].shape)}: saved from another model or num_ps_shards")


def _copy_tree(obj: Any) -> Any:
    """A copy of nested dicts, lists and tuples whose tensors are cloned (no shared storage)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _copy_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy_tree(v) for v in obj)
    return obj


def _tree_digest(obj: Any) -> str:
    """A content hash of nested dicts, lists, tuples, tensors and plain values."""
    h = hashlib.blake2b(digest_size=16)

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(x.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            h.update(f"D{len(x)}".encode())
            for k in sorted(x, key=repr):
                h.update(repr(k).encode())
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}".encode())
            for v in x:
                feed(v)
        else:
            h.update(f"V{x!r}".encode())

    feed(obj)
    return h.hexdigest()
