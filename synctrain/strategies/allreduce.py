"""Sync mode: strict synchronous data parallelism with bucketed all-reduce.

Theory of operation. Every worker holds a full replica. ``prepare_model`` moves the model to
the worker's device, checks that every rank built the same parameter shapes (a mismatch is a
clear :class:`ModelMismatchError` on every rank, not a hang inside a collective), and wraps it
in PyTorch's DistributedDataParallel: rank 0's parameters and buffers are broadcast at
construction, and during ``backward`` gradients are averaged in buckets while the rest of the
backward pass still runs (communication overlaps compute). After ``opt.step()`` every rank
has applied the same averaged gradient, so N workers with batch b are numerically one process
with batch N*b.

Knobs (``Trainer(..., mode="sync", ...)``):

* ``grad_accum_steps=k``: the prepared optimizer takes a real step every k-th ``step()`` call;
  the k-1 micro-steps before it skip gradient synchronisation (DDP's ``no_sync``) and
  ``zero_grad()`` on them keeps the accumulated gradients. The applied gradient is the mean
  over micro-steps and ranks, so the learning rate needs no change.
* ``shard_optimizer=True``: ZeRO-1. Optimizer state is partitioned over ranks with
  ``ZeroRedundancyOptimizer``; each rank updates its shard and broadcasts it. The update is the
  same computation, so results equal the unsharded run.
* ``grad_compression="fp16" | "bf16"``: buckets travel in half precision (a DDP comm hook),
  halving the bytes on the wire at a small cost in precision.
* ``grad_transport="auto" | "shm" | "gloo" | "nccl"``: how buckets (and ``all_reduce``,
  ``broadcast``, ``barrier``) travel. ``"shm"``: through shared memory among the ranks of a host
  (a DDP comm hook, :mod:`.shm_hook`), hierarchical with gloo between hosts; ``"auto"`` picks it
  for CPU ranks and NCCL for GPU ranks. ``strategy_metrics()["grad_transport"]`` says which ran.
"""

from __future__ import annotations

import datetime
import hashlib
import inspect
import logging
import types
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from synctrain import context as _context
from synctrain.context import TrainContext
from synctrain.errors import ConfigError, ModelMismatchError
from synctrain.spec import JobSpec
from synctrain.strategies import shm_allreduce as _shm
from synctrain.strategies import shm_hook as _shm_hook
from synctrain.strategies.base import Strategy, register
from synctrain.strategies.comm_hooks import HOOKS as _COMPRESSION_HOOKS

log = logging.getLogger(__name__)
#: torch >= 2.13 names DDP's buffer broadcast ``forward_sync_buffers``; older ones only
#: know ``broadcast_buffers`` (2.11 on a GPU machine refused the new name).
_BUFFER_SYNC_KWARG = ("forward_sync_buffers" if "forward_sync_buffers" in
                      inspect.signature(DistributedDataParallel.__init__).parameters else "broadcast_buffers")

DEFAULT_OPTIONS: dict[str, Any] = {
    "grad_accum_steps": 1,
    "shard_optimizer": False,
    "grad_compression": None,
    "bucket_cap_mb": 25.0,
    "broadcast_buffers": True,
    "find_unused_parameters": False,
    "grad_transport": "auto",
}


class _AccumulationState:
    """Which micro-step we are on; shared by the prepared model and optimizer."""

    def __init__(self, accum_steps: int) -> None:
        self.accum_steps = accum_steps
        self.micro_step = 0  # step() calls so far
        self.last_call_stepped = True  # did the latest step() call update parameters?

    def syncs_this_micro_step(self) -> bool:
        return (self.micro_step + 1) % self.accum_steps == 0


class SyncDistributedDataParallel(DistributedDataParallel):
    """DDP that skips gradient sync on accumulation micro-steps, as the optimizer dictates."""

    _synctrain_accum: _AccumulationState | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        accum = self._synctrain_accum
        if accum is not None:
            self.require_backward_grad_sync = accum.syncs_this_micro_step()
        try:
            return super().forward(*args, **kwargs)
        except RuntimeError as exc:  # DistBackendError too
            explained = _explained_forward_timeout(exc)
            if explained is exc:
                raise
            raise explained from exc


#: Says why a collective inside the prepared model's forward timed out (issue 15, point 14).
FORWARD_TIMEOUT_HINT = (
    "synctrain: this timed out inside the forward of the model prepare_model returned, where DDP "
    "broadcasts rank 0's buffers (BatchNorm's running statistics, say) to every rank: each forward "
    "through the prepared model of a model with buffers is a collective that every rank must join. "
    "The likely cause: evaluating on some ranks only (rank 0's validation, say) through the prepared "
    "model; the others never join and this rank waits until collective_timeout_s. Evaluate through "
    "the unwrapped model, model.module(x), or on every rank.")


def _explained_forward_timeout(exc: RuntimeError) -> RuntimeError:
    """``exc`` itself, or for a collective timeout the same error type with the likely cause."""
    text = str(exc)
    if "timed out" not in text.lower() and "timeout" not in text.lower():
        return exc
    try:
        return type(exc)(f"{text}\n{FORWARD_TIMEOUT_HINT}")
    except Exception:  # noqa: BLE001 - a type that takes other arguments: a plain RuntimeError
        return RuntimeError(f"{text}\n{FORWARD_TIMEOUT_HINT}")


def listen_store(host: str, timeout_s: float) -> dist.TCPStore:
    """A process-group store server on ``host``, on a port the kernel picks as it binds
    (``.port``); the other ranks join it as :class:`~torch.distributed.TCPStore` clients."""
    return dist.TCPStore(host, 0, None, True, datetime.timedelta(seconds=timeout_s), wait_for_workers=False)


@register
class AllReduceStrategy(Strategy):
    name = "sync"

    @classmethod
    def validate_options(cls, options: dict[str, Any], num_workers: int) -> dict[str, Any]:
        unknown = set(options) - set(DEFAULT_OPTIONS)
        if unknown:
            raise ValueError(
                f"mode='sync' does not take {sorted(unknown)}; its options are {sorted(DEFAULT_OPTIONS)}"
            )
        merged = {**DEFAULT_OPTIONS, **options}
        k = merged["grad_accum_steps"]
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"grad_accum_steps must be an integer >= 1, got {k!r}")
        if merged["grad_compression"] not in (None, *_COMPRESSION_HOOKS):
            raise ValueError(
                f"grad_compression must be None, 'fp16' or 'bf16', got {merged['grad_compression']!r}"
            )
        if not float(merged["bucket_cap_mb"]) > 0:
            raise ValueError(f"bucket_cap_mb must be > 0, got {merged['bucket_cap_mb']!r}")
        if merged["grad_transport"] not in _shm_hook.TRANSPORTS:
            raise ValueError(f"grad_transport must be one of {', '.join(map(repr, _shm_hook.TRANSPORTS))}, "
                             f"got {merged['grad_transport']!r}")
        return merged

    @classmethod
    def on_driver_start(cls, spec: JobSpec) -> dict[str, Any]:
        transport = spec.strategy_options.get("grad_transport", "auto")
        if transport == "nccl" and not spec.use_gpu:
            raise ConfigError("grad_transport='nccl' needs GPU ranks (use_gpu=True); CPU ranks use 'auto', "
                              "'shm' or 'gloo'")
        if transport == "shm" and spec.use_gpu:
            raise ConfigError("grad_transport='shm' moves CPU tensors; GPU ranks use 'auto' or 'nccl' (or "
                              "'gloo', through host memory)")
        return {}

    @classmethod
    def on_driver_finish(cls, spec: JobSpec, handles: dict[str, Any], ok: bool) -> dict[str, Any]:
        _shm.remove_leftovers(spec.job_id)  # segments of a rank killed before every rank mapped them
        return {}

    def __init__(self, context: TrainContext, spec: JobSpec, handles: dict[str, Any]) -> None:
        super().__init__(context, spec, handles)
        self.options = spec.strategy_options
        self._models: list[SyncDistributedDataParallel] = []
        self._accum_states: list[_AccumulationState] = []
        self._transport: _shm_hook.ShmTransport | None = None  # None: the process group's backend
        self.grad_transport = "gloo"  # what carries the gradients: "shm", "shm+gloo", "gloo", "nccl"

    # ---- lifecycle ---------------------------------------------------------------------
    def on_start(self) -> None:
        addr, port = self.handles["rendezvous"]
        backend = "nccl" if self.context.device.type == "cuda" else "gloo"
        if backend == "nccl" and self.options["grad_transport"] == "gloo":
            backend = "gloo"
        if backend == "nccl" and self.handles.get("gpus_shared"):
            # NCCL refuses two ranks on one GPU ("Duplicate GPU detected"); gloo all-reduces
            # CUDA tensors through host memory, slower but correct.
            backend = "gloo"
            if self.context.rank == 0:
                log.warning("ranks share a GPU (fractional 'GPU' in resources_per_worker): sync mode "
                            "uses the gloo backend instead of NCCL, which needs one GPU per rank")
        timeout = datetime.timedelta(seconds=self.spec.collective_timeout_s)
        store = self.handles.get("rendezvous_store") if self.context.rank == 0 else None
        if store is None:  # a client of rank 0's store (rank 0 without one binds the port itself)
            store = dist.TCPStore(str(addr), int(port), self.context.world_size, self.context.rank == 0,
                                  timeout, wait_for_workers=False)
        store.set_timeout(timeout)
        dist.init_process_group(backend, store=store, rank=self.context.rank,
                                world_size=self.context.world_size, timeout=timeout)
        if backend == "gloo" and self.context.device.type == "cpu" and self.context.world_size > 1 \
                and self.options["grad_transport"] in ("auto", "shm"):
            try:
                self._transport = _shm_hook.connect(
                    self.options["grad_transport"], rank=self.context.rank, world_size=self.context.world_size,
                    job_id=self.spec.job_id, generation=self.context.generation, rendezvous_port=int(port),
                    timeout_s=self.spec.collective_timeout_s)
            except BaseException:
                dist.destroy_process_group()  # on_shutdown does not run when on_start raised
                raise
        self.grad_transport = self._transport.name if self._transport is not None else backend

    def on_shutdown(self) -> None:
        if self._transport is not None:
            self._transport.close()  # a peer still waiting in a collective fails now, not at the timeout
        if dist.is_initialized():
            dist.destroy_process_group()

    # ---- the user's objects ------------------------------------------------------------
    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if isinstance(model, DistributedDataParallel):
            raise ConfigError(
                "prepare_model was given a DistributedDataParallel: prepare_model wraps the model in DDP "
                "itself, and DDP inside DDP would synchronise twice. Pass the plain model (ddp.module)")
        model = model.to(self.context.device)
        check_same_model(model, self.context.rank, self.context.world_size)
        buffer_sync: dict[str, Any] = {_BUFFER_SYNC_KWARG: bool(self.options["broadcast_buffers"])}
        ddp = SyncDistributedDataParallel(
            model,
            device_ids=[self.context.device.index] if self.context.device.type == "cuda" else None,
            bucket_cap_mb=float(self.options["bucket_cap_mb"]),
            find_unused_parameters=bool(self.options["find_unused_parameters"]),
            **buffer_sync,
        )
        ddp._synctrain_accum = _AccumulationState(int(self.options["grad_accum_steps"]))
        compression = self.options["grad_compression"]
        if compression is not None:
            ddp.register_comm_hook(state=self._transport, hook=_COMPRESSION_HOOKS[compression])
        elif self._transport is not None:
            _shm_hook.register_before_first_forward(ddp, self._transport)
        self._models.append(ddp)
        return ddp

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Patch ``optimizer`` (or its ZeRO-sharded twin) to step per the accumulation schedule.

        The micro-step counter is the one of the prepared model that owns the optimizer's
        parameters, so several model/optimizer pairs (a GAN, say) each keep their own.
        """
        accum = self._accumulation_state_for(optimizer)
        if self.options["shard_optimizer"]:
            optimizer = _shard(optimizer)
        _patch_optimizer(optimizer, accum)
        self._accum_states.append(accum)
        return optimizer

    def _accumulation_state_for(self, optimizer: torch.optim.Optimizer) -> _AccumulationState:
        params = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for ddp in self._models:
            if any(id(p) in params for p in ddp.parameters()):
                assert ddp._synctrain_accum is not None
                return ddp._synctrain_accum
        if self.options["grad_accum_steps"] > 1:
            raise ValueError(
                "grad_accum_steps > 1 needs the optimizer's parameters to belong to a model passed to "
                "prepare_model first (call prepare_model, then build the optimizer on its parameters)"
            )
        return _AccumulationState(1)

    # ---- collectives -------------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        if op not in ("mean", "sum"):
            raise ValueError(f"op must be 'mean' or 'sum', got {op!r}")
        if self._transport is not None and tensor.device.type == "cpu":
            self._transport.all_reduce_sum_(tensor)
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        if op == "mean":
            tensor.div_(self.context.world_size)
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self._transport is not None and tensor.device.type == "cpu":
            return self._transport.broadcast_(tensor, src)
        dist.broadcast(tensor, src=src)
        return tensor

    def barrier(self) -> None:
        if self._transport is not None:
            self._transport.barrier()
        elif dist.get_backend() == "nccl":
            dist.barrier(device_ids=[self.context.device.index])
        else:
            dist.barrier()

    def metrics(self) -> dict[str, Any]:
        session = _context.current_session()
        return {"optimizer_steps": session.optimizer_steps if session else 0,
                "micro_steps": sum(a.micro_step for a in self._accum_states),
                "grad_transport": self.grad_transport}


def _shard(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """ZeRO-1: the same optimizer class and param-group settings, state partitioned by rank."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if optimizer.state:
        raise ValueError("shard_optimizer=True needs a fresh optimizer (this one already has state)")
    groups = [dict(g) for g in optimizer.param_groups]
    return ZeroRedundancyOptimizer(groups, optimizer_class=type(optimizer), **optimizer.defaults)


def _patch_optimizer(optimizer: torch.optim.Optimizer, accum: _AccumulationState) -> None:
    """Make ``step``/``zero_grad`` honour gradient accumulation, keeping the object's type.

    The instance stays a ``torch.optim.Optimizer`` (LR schedulers check that); only its bound
    ``step`` and ``zero_grad`` are replaced.
    """
    original_step = optimizer.step
    original_zero_grad = optimizer.zero_grad
    k = accum.accum_steps

    def step(self: torch.optim.Optimizer, closure: Any = None) -> Any:
        boundary = accum.syncs_this_micro_step()
        accum.micro_step += 1
        accum.last_call_stepped = boundary
        if not boundary:
            return None
        if k > 1:  # the gradients hold a sum over k micro-steps: apply their mean
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.div_(k)
        session = _context.current_session()
        if session is not None:
            session.before_optimizer_step()  # a checkpoint of the previous step, when due
            session.in_step = True  # a failure inside may leave this rank's state half-updated
        out = original_step() if closure is None else original_step(closure)
        if session is not None:
            session.in_step = False
            session.on_optimizer_step()
        return out

    def zero_grad(self: torch.optim.Optimizer, set_to_none: bool = True) -> None:
        if accum.last_call_stepped:  # keep gradients that are still being accumulated
            original_zero_grad(set_to_none=set_to_none)

    optimizer.step = types.MethodType(step, optimizer)  # type: ignore[method-assign]
    optimizer.zero_grad = types.MethodType(zero_grad, optimizer)  # type: ignore[method-assign]


def _model_signature(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


def check_same_model(model: torch.nn.Module, rank: int, world_size: int) -> None:
    """Raise ModelMismatchError on every rank if any rank's parameter names/shapes differ.

    Only fixed-size integer digests cross the wire (nothing is pickled): each rank gathers every
    rank's (parameter count, digest) and compares; the error names the first differing rank.
    """
    if world_size == 1:
        return
    signature = _model_signature(model)
    digest = int.from_bytes(hashlib.sha256(repr(signature).encode()).digest()[:7], "big")
    mine = torch.tensor([len(signature), digest], dtype=torch.int64)
    device = next(iter(model.parameters()), torch.empty(0)).device
    if dist.get_backend() == "nccl":
        mine = mine.to(device)
    gathered = [torch.zeros_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine)
    table = [(int(t[0]), int(t[1])) for t in gathered]
    odd = [r for r, entry in enumerate(table) if entry != table[0]]
    if odd:
        shapes = ", ".join(f"{n}{list(s)}" for n, s in signature[:6])
        raise ModelMismatchError(
            f"ranks built different models: rank 0 has {table[0][0]} parameters, rank {odd[0]} has "
            f"{table[odd[0]][0]} (or the same count with other names/shapes). This is rank {rank}: "
            f"{len(signature)} parameters, first ones {shapes}. Every rank must build the same model "
            "(same architecture and sizes) before prepare_model."
        )
