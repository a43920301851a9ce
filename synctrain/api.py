"""The helpers a training loop calls. Outside a Trainer they are no-ops (see context.py)."""

from __future__ import annotations

import numbers
import types
from typing import Any

import torch

from synctrain import context as _context
from synctrain import loopchecks as _checks
from synctrain.context import TrainContext, get_context
from synctrain.data import shard_data_loader

__all__ = [
    "get_context",
    "prepare_model",
    "prepare_optimizer",
    "prepare_data_loader",
    "report",
    "all_reduce",
    "broadcast",
    "barrier",
    "strategy_metrics",
    "register_state",
    "heartbeat",
    "TrainContext",
]


def prepare_model(model: torch.nn.Module) -> torch.nn.Module:
    """Move ``model`` to this worker's device and wire its gradient exchange.

    Sync mode returns a DistributedDataParallel wrapper (the original is ``.module``);
    async mode returns the model with parameter-server pulls wired in. Outside a Trainer the
    model is returned unchanged. Each model is prepared once (a second time is a ConfigError);
    several different models may be prepared in sync mode.
    """
    session = _context.current_session()
    if session is None or session.strategy is None:
        return model
    checks = _checks.for_session(session)
    checks.before_prepare_model(model)
    prepared = session.strategy.prepare_model(model)
    session.add_model(prepared)  # loads restored state when the job resumes
    checks.after_prepare_model(model, prepared)
    return prepared


def prepare_optimizer(optimizer: torch.optim.Optimizer) -> Any:
    """Make ``optimizer.step()`` apply the mode's update (averaged gradient, or a PS push)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"prepare_optimizer takes a torch.optim.Optimizer, got {type(optimizer).__name__}")
    session = _context.current_session()
    if session is None or session.strategy is None:
        return optimizer
    checks = _checks.for_session(session)
    checks.before_prepare_optimizer(optimizer)
    prepared = session.strategy.prepare_optimizer(optimizer)
    session.add_optimizer(prepared)  # loads restored state when the job resumes
    checks.after_prepare_optimizer(optimizer, prepared)
    _check_before_step(prepared, checks)
    return prepared


def _check_before_step(optimizer: Any, checks: _checks.LoopChecks) -> None:
    """Have ``optimizer.step`` run the loop checks first (they act on the job's first step
    only). The instance keeps its type; LR schedulers wrap this ``step`` in turn."""
    inner = optimizer.step

    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        checks.before_step()
        return inner(*args, **kwargs)

    optimizer.step = types.MethodType(step, optimizer)


def prepare_data_loader(loader: torch.utils.data.DataLoader) -> Any:
    """Shard ``loader`` over the workers: each sample once per epoch, reshuffled per epoch.

    Shuffling follows the loader: a loader built with ``shuffle=True`` is reshuffled every
    epoch with a seed shared by all ranks. Outside a Trainer the loader is returned unchanged.
    """
    session = _context.current_session()
    if session is None:
        return loader
    ctx = session.context
    global_batch = None
    if session.batch_workers is not None and isinstance(loader.batch_size, int):
        global_batch = session.batch_workers * loader.batch_size  # keep_global_batch on fewer ranks
    sharded = shard_data_loader(loader, ctx.world_size, ctx.rank, ctx.seed, ctx.device,
                                global_batch_size=global_batch)
    session.add_sampler(sharded.batch_sampler)  # positions for checkpoints; resumes when restored
    return sharded


def register_state(name: str, obj: Any) -> Any:
    """Checkpoint ``obj`` (anything with ``state_dict``/``load_state_dict``: an LR scheduler, a
    GradScaler, an EMA) with the job, under ``name``; when the job resumes, its state is loaded
    here. Returns ``obj``. A no-op outside a Trainer."""
    session = _context.current_session()
    if session is not None:
        session.register(name, obj)
    return obj


def heartbeat() -> None:
    """Tell the driver this worker is alive though it takes no optimizer step for a while (a
    long evaluation, say), so it is not taken for a stalled worker. A no-op outside a Trainer."""
    session = _context.current_session()
    if session is not None:
        session.touch()


def report(metrics: dict[str, Any]) -> None:
    """Record metrics for this step. Rank 0's reports become ``Result.metrics``.

    Values must be plain numbers or strings (tensors of one element are converted). Each
    record gets ``"step"``: the number of optimizer steps taken so far, unless given. A
    ``"total_steps"`` value (the optimizer steps the loop will take, e.g. ``epochs *
    len(loader)``) gives the driver's progress bar its total and ETA.
    """
    if not isinstance(metrics, dict):
        raise TypeError(f"report takes a dict of metrics, got {type(metrics).__name__}")
    clean = {str(k): _plain(k, v) for k, v in metrics.items()}
    session = _context.current_session()
    if session is None:
        _context.local_reports().append(clean)
        return
    if session.strategy is not None:
        _checks.for_session(session).on_report()  # a model trained without a prepared optimizer
    session.add_report(clean)


def all_reduce(tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
    """Reduce ``tensor`` in place over all workers ("mean" or "sum"); identity outside a Trainer."""
    session = _context.current_session()
    if session is None or session.strategy is None or session.context.world_size == 1:
        return tensor
    return session.strategy.all_reduce(tensor, op)


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` in place with rank ``src``'s value; identity outside a Trainer."""
    session = _context.current_session()
    if session is None or session.strategy is None or session.context.world_size == 1:
        return tensor
    return session.strategy.broadcast(tensor, src)


def strategy_metrics() -> dict[str, Any]:
    """This worker's strategy counters (e.g. async staleness and latencies) so far; {} outside."""
    session = _context.current_session()
    if session is None or session.strategy is None:
        return {}
    return session.strategy.metrics()


def barrier() -> None:
    """Wait until every worker gets here; no-op outside a Trainer."""
    session = _context.current_session()
    if session is not None and session.strategy is not None:
        session.strategy.barrier()


def _plain(key: Any, value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"report: metric {key!r} is a tensor of {value.numel()} elements; report scalars")
        return value.item()
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"report: metric {key!r} has type {type(value).__name__}; use numbers or strings")
