"""Async mode: sharded parameter-server actors with a Stale Synchronous Parallel bound.

Theory of operation. The driver (``on_driver_start``) creates ``num_ps_shards`` shard actors
(:mod:`synctrain.ps.shard`; ``num_cpus=0`` by default so they fit beside the workers, spread
over nodes when there are several). They start empty: only the workers know the model.

* ``prepare_model`` moves the model to the device and lays its parameters end to end in one
  flat buffer (:class:`~synctrain.ps.layout.FlatLayout`); the parameters become views of that
  buffer, so a pull is one copy per shard straight into the model. The flat vector is cut
  into contiguous ranges balanced by bytes. Rank 0 sends each shard its range; every other
  rank pulls the ranges, which is the initial broadcast (and checks it built the same model).
* ``prepare_optimizer`` reads the optimizer (class, param-group settings, which parameter is
  in which group) into a recipe; each shard rebuilds a real torch optimizer of that class
  over its range (SGD, Adam, AdamW), so the update math is torch's. The returned object is
  the user's optimizer with ``step`` replaced (it stays a ``torch.optim.Optimizer``).
* ``step()`` has the gradients in one flat host buffer and pushes each shard its slice, to
  all shards in parallel. A shard on the worker's machine (``transport="auto"``, the
  default) gets it through a shared-memory channel (:mod:`synctrain.ps.shm`): one copy into
  a /dev/shm region the shard reads in place, and a few numbers over the shard's Unix socket
  (:mod:`synctrain.ps.ipc`) instead of a Ray call; the parameters come back through the
  channel. That skips the object store's put, seal and fetch each way, the raylet's
  bookkeeping and Ray's ~1.5 ms of CPU per actor call: the machine's CPU per push of a
  4.3 MB gradient fell from ~21 to ~7 ms on 2 cores.
  Other shards (other nodes, or ``transport="ray"``): the slice is ``ray.put`` once (one
  copy into the object store, the shard reads only its bytes) and sent to ``push``. A shard
  range of 100-384 KB instead travels
  as inline pieces both ways (``push_chunked``): Ray passes values under 100 KB inside the
  call, and for such sizes that beats the object store's put, seal and fetch (measured 2.4 vs
  4.3 ms per round trip for 190 KB). A push carries the worker's clock c (its
  step count) and the staleness bound: the shard answers with its parameters once every
  active worker's clock is at least ``c + 1 - s``. So when ``step()`` returns, the model holds
  every worker's updates up to clock ``c + 1 - s``; with ``s = 0`` that is every update of
  every clock so far, exactly the parameters sync mode holds. ``staleness=None`` never waits.
* The shard applies the pushes per :mod:`synctrain.ps.shard`: bulk-synchronous for
  ``staleness=0`` (average of all workers' gradients for a clock, one optimizer step),
  on arrival otherwise (each push one step of ``gradient / num_workers`` with
  ``update_rule="mean"``, or of the raw gradient with ``update_rule="sum"``, Downpour-style).
* Pipelining (``pipeline=True``, opt-in, ignored when staleness == 0): ``step()`` returns as
  soon as the push is sent and collects its reply at the next ``step()``, so the shards work
  while the worker computes its next gradient. Each push then asks for ``c + 2 - s`` so the
  parameters loaded one step later still meet the bound; the price is that a worker sees its
  own latest update one step late. That extra delay destabilises SGD with high momentum
  (measured on digits with momentum 0.9: ~50% accuracy instead of ~95%), hence off by default.
* ``pull_every=n`` (default 1): fetch parameters on every n-th push only (DistBelief's
  n_fetch), and always when the held ones would otherwise break the staleness bound. A push
  that fetches nothing is answered at once with an acknowledgement.
* A changed learning rate (an LR scheduler on the worker) travels with the next push.
* When the loop ends the worker ``leave``s, so its final clock holds nobody back.
* Pulled digests (a step-logged job with ``digest_every`` = n): every push at a clock that is
  a multiple of n fetches parameters and asks each shard for the digest of what it serves; at
  the worker's next push, before gradients computed from those parameters are sent, it hashes
  what it holds of each range and compares. A mismatch drops that step's gradients (a skipped
  push) and forces the next pull; either way the check goes to the step log
  (``StepBoundary.note_pulled``), which judges it and names the worker.
* Recovery. ``state_dict()`` is every shard's atomic ``export_state`` (parameters, optimizer
  state, clocks; read in parallel, so another worker's push may be on one shard and not yet
  on the next) and this worker's clock; the driver restores it into fresh shards with
  :func:`restore_shards`. When ``handles["ps_initialised"]`` says the shards already hold the
  parameters (restored, or live while the survivors train on), ``prepare_model`` has every
  rank, rank 0 included, ``join`` every shard instead of ``init_params``, agree on one start
  clock (a shard behind gets skipped pushes, which apply nothing, up to the highest), and
  pull the parameters; ``start_clock`` is that clock. ``opt.state_dict()`` holds the shards'
  optimizer states, and ``opt.load_state_dict`` sends them back.

Observed staleness: before each push the worker records ``lag = c - m``, where m is the clock
its current parameters are known to include; SSP guarantees ``lag <= s``. Shards also count
version lag (optimizer steps applied since the pusher's last pull) per worker.

Knobs (``Trainer(..., mode="async", ...)``): ``staleness`` (None or int >= 0, default None),
``num_ps_shards`` (default 1), ``update_rule`` ("mean" or "sum"), ``transport`` ("auto" or "ray"), ``skip_nonfinite`` (drop a
step whose gradient has NaN/Inf instead of failing), ``wait_timeout_s`` (bound of every wait;
default the Trainer's ``collective_timeout_s``), ``shard_num_cpus`` (default 0), ``pipeline``
and ``pull_every`` (above).

Not synchronised: buffers (e.g. BatchNorm running stats) stay per worker. ``all_reduce``,
``broadcast`` and ``barrier`` run through shard 0 (numpy arrays via Ray, for small tensors).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import secrets
import threading
import time
import types
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import ray
import torch
from ray.exceptions import GetTimeoutError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from synctrain import context as _context
from synctrain.digest import array_digest
from synctrain.errors import ConfigError, ModelMismatchError
from synctrain.ps import ipc, shm
from synctrain.ps.errors import NonFiniteGradientError, ParameterServerError, StalenessTimeoutError
from synctrain.ps.layout import FlatLayout
from synctrain.ps.recipe import OptimizerRecipe
from synctrain.ps.shard import LAG_BUCKETS, ParameterShard, PushReply, ShardConfig
from synctrain.strategies.allreduce import DEFAULT_OPTIONS as SYNC_OPTIONS
from synctrain.strategies.base import Strategy, register

log = logging.getLogger(__name__)

DEFAULT_OPTIONS: dict[str, Any] = {
    "staleness": None,
    "num_ps_shards": 1,
    "update_rule": "mean",
    "skip_nonfinite": False,
    "wait_timeout_s": None,
    "shard_num_cpus": 0.0,
    "pipeline": False,
    "pull_every": 1,
    "transport": "auto",
}
#: ``transport`` values: "auto" pushes through shared memory to every shard on the worker's
#: machine and through Ray to the others; "ray" always goes through Ray.
TRANSPORTS = ("auto", "ray")
#: Gradient slices at least this big go through ray.put (the object store); smaller ones inline.
INLINE_BYTES = 100 * 1024
#: Shard ranges between INLINE_BYTES and this travel as inline pieces of at most
#: INLINE_PIECE_BYTES, both ways (measured: the object store wins above ~300 KB on 2 cores).
CHUNKED_MAX_BYTES = 384 * 1024
INLINE_PIECE_BYTES = 96 * 1024
#: Extra seconds a worker's ray.get allows beyond the shard-side wait bound.
RPC_MARGIN_S = 60.0
#: Snapshots a worker asks for over its sockets (``state_dict_later``) and has not fetched yet,
#: at most; past that ``state_dict_later`` answers None and the caller reads them at once.
MAX_PENDING_SNAPSHOTS = 8
#: Latency samples kept per worker for the percentiles (a ring buffer).
LATENCY_SAMPLES = 4096
#: More shards than this is a configuration mistake, not a tuning choice.
MAX_SHARDS = 256
#: A joining worker's clock may differ between shards by a push in flight; by more than this
#: the shards come from different checkpoints, which is refused.
MAX_CATCH_UP_CLOCKS = 64
#: Marks (and versions) the dict ``opt.state_dict()`` returns in async mode.
OPTIMIZER_STATE_FORMAT = 1
_NUMPY_DTYPES = ("float16", "float32", "float64")


@register
class ParameterServerStrategy(Strategy):
    name = "async"

    # ---- driver side -------------------------------------------------------------------
    @classmethod
    def validate_options(cls, options: dict[str, Any], num_workers: int) -> dict[str, Any]:
        sync_only = sorted(set(options) & set(SYNC_OPTIONS))
        if sync_only:
            raise ValueError(f"{sync_only} only apply to mode='sync'; mode='async' takes "
                             f"{sorted(DEFAULT_OPTIONS)}")
        unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
        if unknown:
            raise ValueError(f"mode='async' does not take {unknown}; its options are {sorted(DEFAULT_OPTIONS)}")
        merged = {**DEFAULT_OPTIONS, **options}
        s = merged["staleness"]
        if s is not None and (not isinstance(s, int) or isinstance(s, bool) or s < 0):
            raise ValueError(f"staleness must be None (fully asynchronous) or an integer >= 0, got {s!r}")
        k = merged["num_ps_shards"]
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_SHARDS:
            raise ValueError(f"num_ps_shards must be an integer in 1..{MAX_SHARDS}, got {k!r}")
        if merged["update_rule"] not in ("mean", "sum"):
            raise ValueError(f"update_rule must be 'mean' or 'sum', got {merged['update_rule']!r}")
        for flag in ("skip_nonfinite", "pipeline"):
            if not isinstance(merged[flag], bool):
                raise ValueError(f"{flag} must be True or False, got {merged[flag]!r}")
        n = merged["pull_every"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"pull_every must be an integer >= 1, got {n!r}")
        if merged["transport"] not in TRANSPORTS:
            raise ValueError(f"transport must be one of {list(TRANSPORTS)}, got {merged['transport']!r}")
        t = merged["wait_timeout_s"]
        if t is not None and not (isinstance(t, (int, float)) and t > 0):
            raise ValueError(f"wait_timeout_s must be a number of seconds > 0, got {t!r}")
        if not (isinstance(merged["shard_num_cpus"], (int, float)) and merged["shard_num_cpus"] >= 0):
            raise ValueError(f"shard_num_cpus must be a number >= 0, got {merged['shard_num_cpus']!r}")
        return merged

    @classmethod
    def on_driver_start(cls, spec: Any) -> dict[str, Any]:
        opts = spec.strategy_options
        k, n = int(opts["num_ps_shards"]), spec.num_workers
        scale = 1.0 / n if opts["update_rule"] == "mean" else 1.0
        alive = sorted(node["NodeID"] for node in ray.nodes() if node.get("Alive"))
        cpus = float(opts["shard_num_cpus"])
        first = zlib.crc32(spec.job_id.encode()) % max(1, len(alive))  # per job: shard 0s of jobs differ

        def placement(i: int) -> dict[str, Any]:
            if len(alive) <= 1:
                return {}
            if cpus > 0:
                return {"scheduling_strategy": "SPREAD"}
            # Ray puts an actor that requests no resources on a random node whatever its
            # strategy (only hard node affinity is honoured), so SPREAD alone can stack the
            # shards on one node: pin them round-robin over the alive nodes instead.
            return {"scheduling_strategy": NodeAffinitySchedulingStrategy(
                alive[(first + i) % len(alive)], soft=False)}

        actor_cls = ray.remote(ParameterShard)
        shards = [actor_cls.options(
            num_cpus=cpus, max_concurrency=max(64, 4 * n + 8), max_restarts=0, **placement(i),
        ).remote(ShardConfig(
            job_id=spec.job_id, shard_index=i, num_shards=k, num_workers=n,
            staleness=opts["staleness"], skip_nonfinite=bool(opts["skip_nonfinite"]),
            update_scale=scale, wait_timeout_s=_wait_timeout(spec))) for i in range(k)]
        return {"ps_shards": shards}

    @classmethod
    def on_driver_finish(cls, spec: Any, handles: dict[str, Any], ok: bool) -> dict[str, Any]:
        shards = handles.get("ps_shards", [])
        try:
            stats = ray.get([s.stats.remote() for s in shards], timeout=30)
        except Exception as exc:  # noqa: BLE001 - a dead shard must not hide the job's own error
            stats = [{"error": f"{type(exc).__name__}: {exc}"[:300]}]
        finally:
            for s in shards:
                ray.kill(s, no_restart=True)
        shm.remove_leftovers(spec.job_id)  # channel files of a worker killed while creating them
        good = [s for s in stats if "error" not in s]
        return {"mode": "async", "staleness": spec.strategy_options["staleness"],
                "num_ps_shards": len(shards), "shards": stats,
                "pushes_received": sum(s["pushes_received"] for s in good),
                "updates_applied": sum(s["updates_applied"] for s in good),
                "pushes_per_s": max((s["pushes_per_s"] for s in good), default=0.0)}

    # ---- worker side: setup ------------------------------------------------------------
    def __init__(self, context: Any, spec: Any, handles: dict[str, Any]) -> None:
        super().__init__(context, spec, handles)
        self.options = spec.strategy_options
        self.shards: list[Any] = list(handles["ps_shards"])
        self.staleness: int | None = self.options["staleness"]
        self.wait_timeout_s = _wait_timeout(spec)
        self.model: torch.nn.Module | None = None
        self.layout: FlatLayout | None = None
        self.bounds: tuple[tuple[int, int], ...] = ()
        self.clock = 0  # pushes made
        self.start_clock = 0  # the clock prepare_model started at (a joined worker: the shards')
        self.included = 0  # every worker's pushes below this clock are in our parameters
        self.versions = [0] * len(self.shards)  # per shard: version our parameters came from
        self.server_pushes_applied = 0
        self._params: list[torch.nn.Parameter] = []
        self._pieces: tuple[int, ...] = ()  # per shard: inline pieces a push travels in (1: whole)
        self._flat: torch.Tensor | None = None  # the model's parameters live here (views)
        self._host: torch.Tensor | None = None  # CPU staging for pulls (is _flat on CPU)
        self._grad_host: torch.Tensor | None = None
        self._grad_flat: torch.Tensor | None = None  # the .grad of every parameter is a view
        self._lrs: tuple[float, ...] = ()
        self._collective_seq = 0
        self.pipelined = self.options["pipeline"] and self.staleness != 0
        self._inflight: list[Any] | None = None  # ObjectRefs of the push awaiting its reply
        self._inflight_wants = False  # whether that push asked for parameters
        # Per shard on this machine: the shared memory its pushes travel through and the
        # socket they ring on (None: through Ray). Set by prepare_model.
        self._local: list[_Local | None] = []
        self._steps_since_pull = 0
        self._lag_hist = [0] * LAG_BUCKETS
        self._push_ms: collections.deque[float] = collections.deque(maxlen=LATENCY_SAMPLES)
        self._wait_ms: collections.deque[float] = collections.deque(maxlen=LATENCY_SAMPLES)
        self._copy_ms: collections.deque[float] = collections.deque(maxlen=LATENCY_SAMPLES)
        self.nonfinite_skipped = 0
        self.bytes_pushed = 0
        # Pulled digests (see synctrain.digest): the push in flight asked for them; the
        # shards' digests of the parameters held now (None: the last load carried none, or
        # they were checked); held parameters that differ from what was served (until a load).
        self._inflight_digest = False
        self._served: list[str] | None = None
        self._tainted = False
        self._good_buffers: list[torch.Tensor] | None = None  # the buffers at the last check passed
        self.digest_checks = 0
        self.digest_mismatches = 0
        self._pending_snapshots = 0  # asked for by state_dict_later, not fetched yet
        self.snapshots_later = 0  # ... asked for in all
        self.snapshots_by_socket = 0  # shard snapshots fetched on the writer's own socket (not Ray)
        self._snapshot_lock = threading.Lock()
        # The step-log writer's own sockets to the shards on this machine, for fetching snapshots
        # (opened at the first fetch; False: could not be opened, Ray it is)
        self._take_links: dict[int, ipc.ShardLink | bool] = {}
        self._take_lock = threading.Lock()

    def on_shutdown(self) -> None:
        job, rank = self.spec.job_id, self.context.rank
        self._collect()  # the last pipelined push: surface its errors before leaving
        try:
            ray.get([s.leave.remote(job, rank) for s in self.shards], timeout=30)
        except Exception:  # noqa: BLE001, S110 - shards may already be gone when the job fails
            pass
        self._close_links()

    def _close_links(self) -> None:
        """Close every same-machine socket; a later push through one is a clear error."""
        for local in self._local:
            if local is not None:
                local.link.close()
        with self._take_lock:  # a fetch still to come (the writer's last) goes through Ray
            for link in self._take_links.values():
                if isinstance(link, ipc.ShardLink):
                    link.close()
            self._take_links = {i: False for i in range(len(self.shards))}

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.model is not None:
            raise ConfigError("mode='async' trains one model per worker, and prepare_model was called a "
                              "second time: prepare the model once (to train several models together, "
                              "such as a GAN's two, use mode='sync')")
        model = model.to(self.context.device)
        layout = FlatLayout.of(model)
        if layout.dtype not in _NUMPY_DTYPES:
            raise ValueError(f"mode='async' holds parameters as numpy arrays, which have no {layout.dtype}; "
                             "use float32 (model.float()) or mode='sync'")
        self.bounds = layout.shard_bounds(len(self.shards))
        self.layout, self.model = layout, model
        self._params = list(model.parameters())
        itemsize = torch.empty(0, dtype=layout.torch_dtype).element_size()
        self._pieces = tuple(_inline_pieces((b - a) * itemsize) for a, b in self.bounds)
        self._make_flat(layout)
        if self.handles.get("ps_initialised"):  # restored or live shards: take this rank's slot
            self.clock = self.included = self.start_clock = self._join()
            self._pull_initial(layout)
        elif self.context.rank == 0:
            assert self._host is not None
            _get([s.init_params.remote(self.spec.job_id, layout.digest(), self._host[a:b].numpy())
                  for s, (a, b) in zip(self.shards, self.bounds, strict=True)],
                 self.wait_timeout_s + RPC_MARGIN_S, "sending the initial parameters")
        else:
            self._pull_initial(layout)
        self._open_channels()
        return model

    def _pull_initial(self, layout: FlatLayout) -> None:
        """Load the shards' parameters into the model, checking it is the model they hold."""
        try:
            replies = _get([s.get_params.remote(self.spec.job_id, self.context.rank, layout.digest())
                            for s in self.shards], self.wait_timeout_s + RPC_MARGIN_S,
                           "pulling the initial parameters")
        except ParameterServerError as exc:
            if "different model" in str(exc):
                raise ModelMismatchError(str(exc)) from None
            raise
        self._load(replies)  # also sets self.included: the clock those parameters include

    def _join(self) -> int:
        """Take this rank's slot on every shard; the clock its next push carries.

        Each shard answers its own clock for the rank; they may differ by a push in flight
        (another worker's, or the replaced process's last one reached only some shards). The
        shards behind get skipped pushes up to the highest, which apply nothing: bulk-
        synchronously each joins its round and waits for it, so the first real push belongs
        to the same round everywhere.
        """
        job, rank, timeout = self.spec.job_id, self.context.rank, self.wait_timeout_s + RPC_MARGIN_S
        clocks = _get([s.join.remote(job, rank) for s in self.shards], timeout, "joining the shards")
        target = max(clocks)
        if target - min(clocks) > MAX_CATCH_UP_CLOCKS:
            raise ParameterServerError(
                f"worker {rank}'s clock differs between the shards by {target - min(clocks)} ({clocks}): "
                "they hold different points of training; restore every shard from the same checkpoint")
        bulk = self.staleness == 0
        for clock in range(min(clocks), target):
            behind = [s for s, c in zip(self.shards, clocks, strict=True) if c <= clock]
            _get([s.push.remote(job, rank, clock, None, clock + 1 if bulk else 0, 0, None, bulk)
                  for s in behind], timeout, f"catching up to clock {target} after joining")
        return target

    def _open_channels(self) -> None:
        """A shared-memory channel and a socket to every shard on this machine (``transport="auto"``).

        Only where the shard's Ray node is this worker's; the shard attaches to the file and
        checks its token, and the name is unlinked right after, so nothing outlives the two
        processes; then the worker connects to the shard's socket with that token. A shard
        that could not attach (or /dev/shm too full) is reached through Ray.
        """
        self._local = [None] * len(self.shards)
        if self.options["transport"] != "auto" or not shm.available() or not ipc.available():
            return
        assert self._host is not None
        job, rank, timeout = self.spec.job_id, self.context.rank, self.wait_timeout_s + RPC_MARGIN_S
        here = ray.get_runtime_context().get_node_id()
        nodes = _get([s.node_id.remote() for s in self.shards], timeout, "locating the shards")
        created: dict[int, shm.Channel] = {}
        for i, ((a, b), node) in enumerate(zip(self.bounds, nodes, strict=True)):
            if node == here:
                channel = shm.Channel.create(job, rank, i, b - a, self._host.numpy().dtype)
                if channel is not None:
                    created[i] = channel
        try:
            attached = _get([self.shards[i].attach_channel.remote(job, rank, c.path, c.token)
                             for i, c in created.items()], timeout, "attaching shared memory")
        finally:
            for channel in created.values():
                channel.unlink()
        for (i, channel), address in zip(created.items(), attached, strict=True):
            if address is None:
                channel.close()
                continue
            try:
                link = ipc.ShardLink.connect(i, address, job, rank, channel.token, timeout)
            except (OSError, ParameterServerError):  # no reaching the socket (a sandbox may forbid
                channel.close()  # it) or refused (its connection bound is reached): through Ray
                continue
            self._local[i] = _Local(channel, link, address)

    def _make_flat(self, layout: FlatLayout) -> None:
        """Move the parameters into one flat buffer; each parameter becomes a view of it."""
        device = self.context.device
        flat = torch.empty(layout.total, dtype=layout.torch_dtype, device=device)
        with torch.no_grad():
            for p, offset, n in zip(self._params, layout.offsets, layout.numels, strict=True):
                flat[offset:offset + n].copy_(p.reshape(-1))
                p.data = flat[offset:offset + n].view_as(p)
        self._flat = flat
        self._host = flat if device.type == "cpu" else flat.detach().to("cpu")  # rank 0 sends it
        # Gradients too live in one flat buffer (each .grad a view of it, as DDP's
        # gradient_as_bucket_view): backward accumulates straight into what is pushed, so a
        # step copies no gradient on CPU (one device-to-host copy on GPU).
        self._grad_flat = torch.zeros(layout.total, dtype=layout.torch_dtype, device=device)
        self._grad_host = self._grad_flat if device.type == "cpu" else torch.zeros(
            layout.total, dtype=layout.torch_dtype)
        self._bind_grads()

    def _bind_grads(self, keep_values: bool = False) -> None:
        """Make every parameter's ``.grad`` a view of its slice of the flat gradient buffer.

        Gradients that are views already are left alone (the common case: a cheap pointer
        check); one that is None or was replaced (``model.zero_grad()`` sets None, and the next
        backward makes a new tensor) is re-bound, its values first copied in when
        ``keep_values``, else its slice is left as it is (zeroed by the caller)."""
        assert self.layout is not None and self._grad_flat is not None
        flat = self._grad_flat
        base, size = flat.data_ptr(), flat.element_size()
        for p, offset, n in zip(self._params, self.layout.offsets, self.layout.numels, strict=True):
            g = p.grad
            if g is not None and g.data_ptr() == base + offset * size and g.is_contiguous():
                continue
            view = flat[offset:offset + n]
            if keep_values:
                if g is None:
                    view.zero_()
                else:
                    view.copy_(g.reshape(-1))
            p.grad = view.view_as(p)

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        if self.layout is None:
            raise ConfigError("mode='async': call prepare_model before prepare_optimizer (the optimizer is "
                              "rebuilt on the parameter server over the prepared model's parameters)")
        recipe = OptimizerRecipe.of(optimizer, self._params)
        _get([s.set_optimizer.remote(self.spec.job_id, self.context.rank, recipe,
                                     self.layout.segments(a, b, recipe.group_of))
              for s, (a, b) in zip(self.shards, self.bounds, strict=True)],
             self.wait_timeout_s + RPC_MARGIN_S, "setting up the shards' optimizer")
        self._lrs = recipe.lrs()
        strategy = self

        def step(self: torch.optim.Optimizer, closure: Any = None) -> Any:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            strategy.push_and_pull(self)
            return loss

        def zero_grad(self: torch.optim.Optimizer, set_to_none: bool = True) -> None:
            # Zeroed in place, never set to None: the .grad views of the flat buffer stay, so
            # the next backward accumulates into it (a parameter that gets no gradient pushes
            # zeros either way).
            assert strategy._grad_flat is not None
            strategy._grad_flat.zero_()
            strategy._bind_grads()

        # The worker's optimizer never steps (the shards do), so its own state_dict would be
        # empty: the shards' optimizer states are saved and loaded instead.
        def state_dict(self: torch.optim.Optimizer) -> dict[str, Any]:
            return strategy.optimizer_state_dict(self)

        def load_state_dict(self: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
            strategy.load_optimizer_state_dict(self, state_dict)

        optimizer.step = types.MethodType(step, optimizer)  # type: ignore[method-assign]
        optimizer.zero_grad = types.MethodType(zero_grad, optimizer)  # type: ignore[method-assign]
        optimizer.state_dict = types.MethodType(state_dict, optimizer)  # type: ignore[method-assign]
        optimizer.load_state_dict = types.MethodType(load_state_dict, optimizer)  # type: ignore[method-assign]
        return optimizer

    # ---- worker side: checkpoints --------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``{"mode": "async", "clock": this worker's clock, "shards": [each shard's
        export_state]}``: torch tensors and plain values only (``torch.load(weights_only=True)``).

        Each shard's snapshot is atomic; the shards are read in parallel, so another worker's
        push may be in one and not yet in the next (``join`` reconciles that on restore). This
        worker's own pipelined push is collected first, so it is in every shard's snapshot.
        """
        self._collect()
        states = _get([s.export_state.remote(self.spec.job_id) for s in self.shards],
                      self.wait_timeout_s + RPC_MARGIN_S, "exporting the shards' state")
        return {"mode": "async", "clock": self.clock, "shards": states}

    def state_dict_later(self) -> Callable[[], dict[str, Any]] | None:
        """``state_dict()`` as of now, fetched later: a function (call it on any thread) that
        returns what ``state_dict()`` returns now, or None where that cannot be had (a shard not
        on this machine, or too many snapshots not fetched yet): then call ``state_dict()``.

        Each shard is asked over this worker's socket, between two pushes, so its snapshot
        holds exactly this worker's pushes so far, as ``export_state`` would; the copy travels
        when the function is called. The loop goes on at once: a checkpoint costs it one
        frame per shard instead of a round trip carrying the parameters and optimizer state.
        The function fetches over a second socket of its own (:meth:`_take_snapshots`).
        """
        if not self._local or any(local is None for local in self._local):
            return None
        with self._snapshot_lock:
            if self._pending_snapshots >= MAX_PENDING_SNAPSHOTS:
                return None
            self._pending_snapshots += 1
            self.snapshots_later += 1
        try:
            self._collect()  # this worker's pipelined push is in the snapshot
            tag = f"{self.context.rank}:{self.clock}:{secrets.token_hex(4)}"
            for local in self._local:
                assert local is not None
                local.link.send({"snap": tag})
        except BaseException:
            self._snapshot_done()
            raise
        clock, shards, job_id = self.clock, list(self.shards), self.spec.job_id
        timeout_s = self.wait_timeout_s + RPC_MARGIN_S

        def fetch() -> dict[str, Any]:
            try:
                states = self._take_snapshots(tag, shards, job_id, timeout_s)
            finally:
                self._snapshot_done()
            return {"mode": "async", "clock": clock, "shards": states}

        return fetch

    def _take_snapshots(self, tag: str, shards: list[Any], job_id: str, timeout_s: float) -> list[dict[str, Any]]:
        """Each shard's snapshot ``tag``: over a socket of the caller's own (``{"take": tag}``,
        one frame back: ~0.1 ms of CPU at each end for the digits MLP, where a Ray call costs
        ~1.5 ms at each end, the shard's taken from the pushes it serves), or through Ray where
        no socket can be had or the shard cannot send it so (over :data:`ipc.MAX_SNAPSHOT_BYTES`,
        or a type :func:`ipc.pack_tree` refuses in its optimizer's state). A link
        that fails is closed and the error raised (the checkpoint is lost, as through Ray)."""
        states: list[dict[str, Any] | None] = []
        with self._take_lock:
            for i in range(len(shards)):
                link = self._take_link(i, job_id, timeout_s)
                state = None
                if link is not None:
                    try:
                        state = link.take_snapshot(tag)
                        self.snapshots_by_socket += 1
                    except ipc.SnapshotViaRayError:
                        pass  # still on the shard: through Ray
                    except BaseException:
                        link.close()
                        self._take_links.pop(i, None)
                        raise
                states.append(state)
        missing = [i for i, state in enumerate(states) if state is None]
        if missing:
            fetched = _get([shards[i].take_snapshot.remote(job_id, tag, timeout_s) for i in missing],
                           timeout_s + RPC_MARGIN_S, "fetching the shards' snapshots")
            for i, state in zip(missing, fetched, strict=True):
                states[i] = state
        return states  # type: ignore[return-value]

    def _take_link(self, i: int, job_id: str, timeout_s: float) -> ipc.ShardLink | None:
        """The snapshot socket to shard ``i`` (under ``_take_lock``), opened now if need be."""
        link = self._take_links.get(i)
        if link is None:
            local = self._local[i] if i < len(self._local) else None
            link = False
            if local is not None:
                try:
                    link = ipc.ShardLink.connect(i, local.address, job_id, self.context.rank, local.channel.token,
                                                 timeout_s)
                except (OSError, ParameterServerError) as exc:
                    log.info("rank %d: no snapshot socket to shard %d (%s); fetching through Ray",
                             self.context.rank, i, exc)
            self._take_links[i] = link
        return link if isinstance(link, ipc.ShardLink) else None

    def _snapshot_done(self) -> None:
        with self._snapshot_lock:
            self._pending_snapshots -= 1

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The driver-side restore path only: load ``state`` into this job's shards, which must
        be fresh (created for the restore; nothing prepared yet). The workers then start with
        ``handles["ps_initialised"] = True`` and join. A driver without a strategy instance
        calls :func:`restore_shards` directly; the shards of a running job cannot be reset."""
        if self.model is not None:
            raise RuntimeError("load_state_dict after prepare_model: the shards of a running job cannot be "
                               "reset; restore a checkpoint into fresh shards (restore_shards, on the driver)")
        restore_shards(self.shards, self.spec.job_id, state, self.wait_timeout_s + RPC_MARGIN_S)

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """What ``opt.state_dict()`` returns in async mode: ``{"synctrain_async": 1, "shards":
        [each shard optimizer's state_dict], "param_groups": the settings of the user's groups}``."""
        self._collect()  # this worker's pipelined push is in the state
        states = _get([s.optimizer_state.remote(self.spec.job_id) for s in self.shards],
                      self.wait_timeout_s + RPC_MARGIN_S, "reading the shards' optimizer state")
        groups = [{k: _copy_setting(v) for k, v in group.items() if k != "params"}
                  for group in optimizer.param_groups]
        return {"synctrain_async": OPTIMIZER_STATE_FORMAT, "shards": states, "param_groups": groups}

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """``opt.load_state_dict`` in async mode: each shard gets its optimizer state back (the
        first rank's load applies; the same state from the other ranks is ignored, so a rank
        that loads late undoes nothing), the user's groups their settings."""
        if not (isinstance(state, dict) and state.get("synctrain_async") == OPTIMIZER_STATE_FORMAT):
            raise ValueError("not an async-mode optimizer state_dict: in mode='async' load what "
                             "opt.state_dict() returned in mode='async' (a plain torch or sync-mode "
                             "state_dict holds no parameter-server state)")
        shards, groups = state.get("shards"), state.get("param_groups")
        if not isinstance(shards, list) or len(shards) != len(self.shards):
            saved = len(shards) if isinstance(shards, list) else "?"
            raise ParameterServerError(f"this optimizer state was saved with num_ps_shards={saved}, this job "
                                       f"has {len(self.shards)}: restore with num_ps_shards={saved}")
        if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
            raise ValueError(f"this optimizer state has {len(groups) if isinstance(groups, list) else '?'} "
                             f"param groups, the optimizer {len(optimizer.param_groups)}: build the same "
                             "optimizer as when it was saved")
        self._collect()
        _get([s.load_optimizer_state.remote(self.spec.job_id, st) for s, st in zip(self.shards, shards, strict=True)],
             self.wait_timeout_s + RPC_MARGIN_S, "loading the shards' optimizer state")
        for group, saved in zip(optimizer.param_groups, groups, strict=True):
            group.update({k: _copy_setting(v) for k, v in saved.items() if k != "params"})
        self._lrs = ()  # the next push sends the learning rates, whatever the shards hold

    # ---- worker side: the step ---------------------------------------------------------
    def push_and_pull(self, optimizer: torch.optim.Optimizer) -> None:
        """Push this step's gradients to every shard; hold parameters within the bound on return.

        Pipelined (the default when staleness != 0), the push's reply is collected at the next
        step, so the shards' work overlaps this worker's next forward/backward; each push then
        asks for one clock more than the bound needs, so the parameters loaded from it still
        satisfy the bound one step later.
        """
        session = _context.current_session()
        if session is not None:
            session.before_optimizer_step()  # a checkpoint of the previous step, when due
        stepper = getattr(session, "stepper", None)
        self._check_pulled(stepper, session)  # before any gradient computed from them is sent
        suspect = self._tainted  # this step's gradients come from corrupted parameters
        grads_ok = False if suspect else self._gather_grads()
        self._lag_hist[min(self.clock - self.included, LAG_BUCKETS - 1)] += 1
        self._collect()  # the previous push's reply (pipelined), before sending the next
        lrs = tuple(float(g["lr"]) for g in optimizer.param_groups)
        changed_lrs = lrs if lrs != self._lrs else None
        self._lrs = lrs
        want_params, min_clock = self._pull_plan()
        every = getattr(getattr(stepper, "cfg", None), "digest_every", 0) or 0
        want_digest = bool(every) and self.clock % every == 0
        if want_digest or self._tainted:  # a digest needs parameters; corrupted ones are replaced
            want_params = True
        assert self._grad_host is not None
        grad_np = self._grad_host.numpy()
        calls: list[Any] = []
        assert self._inflight is None  # a channel's regions are only touched with no push in flight
        try:  # a shard that got this push while a later one failed must not answer into the next
            for i, (shard, (a, b), pieces) in enumerate(zip(self.shards, self.bounds, self._pieces, strict=True)):
                x = grad_np[a:b] if grads_ok else None
                local = self._local[i]
                if local is not None:  # same machine: shared memory, a socket
                    if x is not None:
                        np.copyto(local.channel.grad, x)
                    local.link.send({"clock": self.clock, "has": x is not None, "min": min_clock,
                                     "ver": self.versions[i], "lrs": changed_lrs, "want": want_params,
                                     "dig": want_digest})
                    calls.append(local.link)
                    continue
                if pieces > 1:  # a few hundred KB: inline pieces both ways (see ParameterShard.push_chunked)
                    grad_pieces = np.array_split(x, pieces) if x is not None else ()
                    calls.append(shard.push_chunked.options(num_returns=1 + pieces).remote(
                        self.spec.job_id, self.context.rank, self.clock, min_clock, self.versions[i],
                        changed_lrs, want_params, pieces, *grad_pieces, digest=want_digest))
                    continue
                # Bigger: one copy into the object store, which the shard reads in place (under
                # 100 KB Ray passes the array inline by itself).
                arg = ray.put(x) if x is not None and x.nbytes >= INLINE_BYTES else x
                calls.append(shard.push.remote(self.spec.job_id, self.context.rank, self.clock, arg, min_clock,
                                               self.versions[i], changed_lrs, want_params, want_digest))
        except BaseException:
            self._close_links()
            raise
        self._inflight, self._inflight_wants, self._inflight_digest = calls, want_params, want_digest
        self.bytes_pushed += grad_np.nbytes if grads_ok else 0
        self.clock += 1
        if not self.pipelined:
            self._collect()
        session = _context.current_session()
        if session is not None:
            session.on_optimizer_step()

    def _check_pulled(self, stepper: Any, session: Any) -> None:
        """Compare what this worker holds of each shard's range with the digest the shard gave
        of what it served (the last load asked for them), before the gradients computed from
        it are sent: a mismatch (the copy was corrupted on the way or in this process's memory)
        drops this step's gradients, puts back the buffers (this worker's own, e.g. BatchNorm
        statistics, which the corrupted forward updated) as of the last check passed, and
        replaces the parameters at the next load. The check goes to the step log, which judges
        it and compares shards' digests of one version."""
        served, self._served = self._served, None
        if served is None or self._host is None:
            return
        # what the model holds (on a GPU: a copy of it, not the staging buffer it was loaded from)
        held_flat = self._host if self._flat is None or self._flat is self._host else self._flat.cpu()
        host = held_flat.numpy()
        held = [array_digest(host[a:b]) for a, b in self.bounds]
        self.digest_checks += 1
        bad = [i for i, (s, h) in enumerate(zip(served, held, strict=True)) if s != h]
        buffers = list(self.model.buffers()) if self.model is not None else []
        if bad:
            self.digest_mismatches += 1
            self._tainted = True
            if self._good_buffers is not None and len(self._good_buffers) == len(buffers):
                with torch.no_grad():
                    for live, good in zip(buffers, self._good_buffers, strict=True):
                        live.copy_(good)
            log.warning("worker %d: its parameters of shard(s) %s (versions %s) differ from what the "
                        "shards served; this step's gradients are dropped, its buffers put back and "
                        "the parameters pulled again", self.context.rank, bad, [self.versions[i] for i in bad])
        else:
            self._good_buffers = [b.detach().clone() for b in buffers]
        if stepper is not None and session is not None:
            stepper.note_pulled(session.optimizer_steps + 1, list(self.versions), served, held)

    def _pull_plan(self) -> tuple[bool, int]:
        """(does this push fetch parameters, the clock they must include).

        Parameters are fetched every ``pull_every`` steps, and whenever the ones held would
        break the staleness bound by the time they are next replaced (Downpour's n_fetch,
        bounded by SSP as in Ho et al.'s worker cache).
        """
        self._steps_since_pull += 1
        if self.staleness is None:
            needed = 0
        else:
            needed = self.clock + 1 - self.staleness + (1 if self.pipelined else 0)
        if self._steps_since_pull >= self.options["pull_every"] or self.included < needed:
            self._steps_since_pull = 0
            return True, needed
        return False, 0

    def _collect(self) -> None:
        """Wait for the in-flight push's replies (if any) and load their parameters."""
        if self._inflight is None:
            return
        calls, self._inflight = self._inflight, None
        started = time.monotonic()
        try:
            replies = self._replies(calls)
        except BaseException:
            self._close_links()  # an answer may still be on its way: never read it as the next
            raise
        blocked_s = time.monotonic() - started
        wait_s = max(r.wait_s for r in replies)
        self._push_ms.append(1e3 * max(blocked_s - wait_s, 0.0))
        self._wait_ms.append(1e3 * min(wait_s, blocked_s))
        if self._inflight_wants:
            self._load(replies, from_channels=True)
            digests = [r.digest for r in replies]
            self._served = digests if self._inflight_digest and all(digests) else None  # type: ignore[assignment]
            self._tainted = False

    def _replies(self, calls: list[Any]) -> list[PushReply]:
        """Every shard's answer to the push in flight, in shard order."""
        flat_refs = [ref for call in calls if not isinstance(call, ipc.ShardLink)
                     for ref in (call if isinstance(call, list) else [call])]
        got = iter(_get(flat_refs, self.wait_timeout_s + RPC_MARGIN_S, f"pushing clock {self.clock - 1}")
                   if flat_refs else [])
        replies: list[PushReply] = []
        for call in calls:
            if isinstance(call, ipc.ShardLink):  # the parameters, if any, are in the channel
                m = call.receive()
                digest = m.get("digest")
                replies.append(PushReply(params=None, version=int(m["version"]), min_clock=int(m["min_clock"]),
                                         clocks=tuple(m["clocks"]), wait_s=float(m["wait_s"]),
                                         digest=digest if isinstance(digest, str) else None))
                continue
            reply = next(got)
            if isinstance(call, list):  # push_chunked: the reply, then the parameters in pieces
                pieces = [next(got) for _ in call[1:]]
                if pieces[0] is not None:
                    reply = dataclasses.replace(reply, params=pieces)
            replies.append(reply)
        return replies

    def _gather_grads(self) -> bool:
        """Have this step's gradients in the flat host buffer (zeros where None); False to
        skip the step. Gradients that are still views of the flat buffer are there already;
        one replaced (``model.zero_grad()`` sets them to None) is copied in and re-bound."""
        assert self.layout is not None and self._grad_host is not None
        assert self._grad_flat is not None
        self._bind_grads(keep_values=True)
        flat = self._grad_flat
        buf = self._grad_host
        if buf is not flat:
            buf.copy_(flat)
        if bool(torch.isfinite(buf.sum())):  # one reduction; a NaN/Inf anywhere makes it non-finite
            return True
        if bool(torch.isfinite(buf).all()):  # the sum overflowed on large finite values
            return True
        if self.options["skip_nonfinite"]:
            self.nonfinite_skipped += 1
            return False
        bad = [name for name, p in zip(self.layout.names, self._params, strict=True)
               if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        raise NonFiniteGradientError(
            f"worker {self.context.rank} computed a gradient with NaN/Inf at step {self.clock} (in "
            f"{', '.join(bad[:5])}); nothing was pushed and the parameters are unchanged. Lower the "
            "learning rate, clip gradients, or pass skip_nonfinite=True to drop such steps")

    def _load(self, replies: list[PushReply], from_channels: bool = False) -> None:
        """Copy the shards' parameters into the model (one copy per shard on CPU): from the
        replies, or (``from_channels``) from the shared-memory channel of a shard that has one."""
        assert self._host is not None and self._flat is not None
        started = time.monotonic()
        host = self._host.numpy()
        local = self._local if from_channels else [None] * len(replies)
        refs = [r.params for r in replies if isinstance(r.params, ray.ObjectRef)]
        fetched = iter(ray.get(refs, timeout=self.wait_timeout_s + RPC_MARGIN_S) if refs else [])
        arrays = [c.channel.params if c is not None else next(fetched) if isinstance(r.params, ray.ObjectRef)
                  else r.params for r, c in zip(replies, local, strict=True)]
        for i, ((a, b), reply, array) in enumerate(zip(self.bounds, replies, arrays, strict=True)):
            if isinstance(array, list):  # pieces of push_chunked, in order
                for piece in array:
                    np.copyto(host[a:a + piece.size], piece)
                    a += piece.size
                if a != b:
                    raise ParameterServerError(f"shard {i} answered {a - self.bounds[i][0]} parameters, "
                                               f"expected {b - self.bounds[i][0]}")
            else:
                np.copyto(host[a:b], array)  # the only copy: object store -> the model's buffer
            self.versions[i] = reply.version
        if self._flat is not self._host:
            self._flat.copy_(self._host, non_blocking=False)
        self.included = min(r.min_clock for r in replies)
        self.server_pushes_applied = sum(replies[0].clocks)
        self._copy_ms.append(1e3 * (time.monotonic() - started))

    # ---- collectives through shard 0 ---------------------------------------------------
    def _collective(self, array: np.ndarray | None) -> np.ndarray | None:
        seq = self._collective_seq
        self._collective_seq += 1
        return _get([self.shards[0].collective.remote(self.spec.job_id, seq, self.context.rank, array,
                                                      self.context.world_size)],
                    self.wait_timeout_s + RPC_MARGIN_S, f"collective #{seq}")[0]

    def all_reduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        if op not in ("mean", "sum"):
            raise ValueError(f"op must be 'mean' or 'sum', got {op!r}")
        total = self._collective(tensor.detach().cpu().numpy())
        assert total is not None
        with torch.no_grad():
            tensor.copy_(torch.as_tensor(np.array(total)))
            if op == "mean":
                tensor.div_(self.context.world_size)
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        mine = tensor.detach().cpu().numpy() if self.context.rank == src else None
        value = self._collective(mine)
        assert value is not None
        with torch.no_grad():
            tensor.copy_(torch.as_tensor(np.array(value)))
        return tensor

    def barrier(self) -> None:
        self._collective(None)

    # ---- observability -----------------------------------------------------------------
    def progress(self) -> dict[str, Any]:
        """The staleness this worker observes: how many clocks its parameters lag its own
        (now, and the mean over its steps so far)."""
        hist = self._lag_hist
        steps = sum(hist)
        return {"staleness": self.clock - self.included,
                "staleness_mean": sum(i * v for i, v in enumerate(hist)) / steps if steps else 0.0}

    def metrics(self) -> dict[str, Any]:
        hist = self._lag_hist
        steps = sum(hist)
        return {
            "optimizer_steps": self.clock,
            "staleness_hist": hist[: max((i for i, v in enumerate(hist) if v), default=-1) + 1],
            "staleness_max": max((i for i, v in enumerate(hist) if v), default=0),
            "staleness_mean": sum(i * v for i, v in enumerate(hist)) / steps if steps else 0.0,
            "push_latency_ms_mean": _mean(self._push_ms),
            "push_latency_ms_p50": _percentile(self._push_ms, 50),
            "push_latency_ms_p99": _percentile(self._push_ms, 99),
            "pull_wait_ms_mean": _mean(self._wait_ms),
            "pull_wait_ms_p99": _percentile(self._wait_ms, 99),
            "pull_copy_ms_mean": _mean(self._copy_ms),
            "included_clock": self.included,
            "server_pushes_applied": self.server_pushes_applied,
            "nonfinite_skipped": self.nonfinite_skipped,
            "digest_checks": self.digest_checks,  # pulled parameters checked against the shards' digests
            "digest_mismatches": self.digest_mismatches,  # ... that differed (their gradients dropped)
            "snapshots_later": self.snapshots_later,  # checkpoints whose shard state was fetched off the loop
            "snapshots_by_socket": self.snapshots_by_socket,  # ... shard snapshots of them fetched on a socket
            "bytes_pushed": self.bytes_pushed,
            "push_pieces": list(self._pieces),  # per shard: inline pieces (1: sent whole)
            "push_transport": [_transport_name(c, p) for c, p in
                               zip(self._local or [None] * len(self._pieces), self._pieces, strict=True)],
        }


class _Local(NamedTuple):
    """How a worker reaches a shard on its own machine."""

    channel: shm.Channel
    link: ipc.ShardLink
    address: str  # the shard's socket (the step-log writer opens its own connection to it)


def _transport_name(local: _Local | None, pieces: int) -> str:
    if local is not None:
        return "shared_memory"
    return "inline_pieces" if pieces > 1 else "ray"


def _inline_pieces(nbytes: int) -> int:
    """How many inline pieces a shard range of ``nbytes`` travels in (1: sent whole)."""
    if nbytes < INLINE_BYTES or nbytes > CHUNKED_MAX_BYTES:
        return 1
    return -(-nbytes // INLINE_PIECE_BYTES)


def restore_shards(shards: list[Any], job_id: str, state: dict[str, Any], timeout_s: float) -> None:
    """Driver side: load a ``ParameterServerStrategy.state_dict()`` into fresh shard actors
    (``on_driver_start``'s, before any worker prepared a model). The workers must then start
    with ``handles["ps_initialised"] = True`` so that they join instead of sending parameters."""
    if not (isinstance(state, dict) and state.get("mode") == "async" and isinstance(state.get("shards"), list)):
        raise ParameterServerError("not an async-mode strategy state (ParameterServerStrategy.state_dict())")
    saved = state["shards"]
    if len(saved) != len(shards):
        raise ParameterServerError(f"the checkpoint holds {len(saved)} parameter-server shards, the job has "
                                   f"{len(shards)}: restore with num_ps_shards={len(saved)}")
    _get([s.import_state.remote(job_id, st) for s, st in zip(shards, saved, strict=True)], timeout_s,
         "restoring the parameter-server shards")


def _copy_setting(value: Any) -> Any:
    """A param-group setting, copied (a tensor learning rate is cloned, not shared)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_copy_setting(v) for v in value)
    return value


def _wait_timeout(spec: Any) -> float:
    t = spec.strategy_options.get("wait_timeout_s")
    return float(t if t is not None else spec.collective_timeout_s)


def _get(refs: list[Any], timeout_s: float, what: str) -> list[Any]:
    """``ray.get`` that re-raises a shard's own error as itself and bounds the wait."""
    try:
        return ray.get(refs, timeout=timeout_s)
    except GetTimeoutError:
        raise StalenessTimeoutError(
            f"no answer from the parameter-server shards after {timeout_s:g} s while {what}; a shard "
            "may have died or be overloaded") from None
    except RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, ParameterServerError):
            raise cause from None
        raise


def _mean(values: collections.deque[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _percentile(values: collections.deque[float], q: float) -> float:
    return float(np.percentile(np.fromiter(values, dtype=float), q)) if values else 0.0
