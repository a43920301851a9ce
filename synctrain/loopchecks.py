"""Checks for the mistakes a training loop makes silently (issue 15, points 11-13).

Theory of operation. The helpers in :mod:`synctrain.api` tell the :class:`LoopChecks` of the
running :class:`~synctrain.context.Session` what the loop prepared. It watches, as cheaply as
it can, for three mistakes that would otherwise train wrongly without a word:

* **A prepared model trained with an optimizer that was not prepared** (the loop steps its own
  optimizer). In async mode every worker then trains alone: nothing reaches the parameter
  server, the ranks end with different weights and every report says ``step: 0`` — so it is a
  :class:`~synctrain.errors.ConfigError` (a configuration error: the driver does not retry
  it). In sync mode DDP still averages the gradients, so training is right, but no optimizer
  step is counted (reports say ``step: 0``; a step log records nothing and never checkpoints)
  — a warning, once. Seen by a post-accumulate-grad hook on each parameter of the model (it
  sets a counter; AccumulateGrad runs once per parameter per backward), checked at each
  ``report`` and at the second backward; the hooks are removed as soon as a prepared
  optimizer covers the model, which a correct loop does before its first backward, so a
  correct loop pays nothing once set up.
* **The same model prepared twice** (sync mode would nest DDP in DDP): refused at once;
  preparing several different models (a GAN's two) stays allowed where the mode allows it.
  The same optimizer prepared twice (its step would count twice) is refused too.
* **A DataLoader not passed through** ``prepare_data_loader`` (each rank reads the whole
  dataset). At the job's first optimizer step — the loop is inside its training ``for``, so
  the iterator it draws batches from is alive — rank 0 of a job of several workers that
  prepared no loader looks for live DataLoader iterators (``gc.get_referrers`` on their
  classes: one scan of the heap, some 50 ms, once, and only in such a job) and warns if one
  does not draw from a :class:`~synctrain.data.ShardedBatchSampler`. No collective is
  involved, so it works the same in both modes. (Comparing the ranks' first batches would
  miss the usual case: torch 2.13 seeds each process differently, so the ranks' shuffled
  loaders differ while each still reads everything.)

Every warning is a :class:`UserWarning`, given once per worker process (Ray shows a worker's
warnings on the driver's console).
"""

from __future__ import annotations

import gc
import warnings
import weakref
from collections.abc import Callable, Sized
from typing import TYPE_CHECKING, Any

import torch

from synctrain.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from synctrain.context import Session

_warned: set[str] = set()  # per process: each warning once
_checks: weakref.WeakKeyDictionary[Session, LoopChecks] = weakref.WeakKeyDictionary()


def for_session(session: Session) -> LoopChecks:
    """The checks of ``session`` (created on first use)."""
    checks = _checks.get(session)
    if checks is None:
        checks = _checks[session] = LoopChecks(session)
    return checks


def warn_once(key: str, message: str) -> None:
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, UserWarning, stacklevel=4)


class _GradWatch:
    """Counts the backward passes that reach one prepared model's parameters."""

    def __init__(self, model: torch.nn.Module, on_grad: Callable[[int], None]) -> None:
        self.params = {id(p) for p in model.parameters()}
        self.most_backwards = 0
        counts: dict[int, int] = {}

        def hook(param: torch.Tensor) -> None:
            n = counts[id(param)] = counts.get(id(param), 0) + 1
            if n > self.most_backwards:
                self.most_backwards = n
                on_grad(n)

        self.handles = [p.register_post_accumulate_grad_hook(hook) for p in model.parameters()
                        if p.requires_grad]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class LoopChecks:
    """One per session; see the module doc."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.prepared: weakref.WeakSet[Any] = weakref.WeakSet()  # models/optimizers, given and returned
        self.covered: set[int] = set()  # ids of parameters some prepared optimizer steps
        self.watches: list[_GradWatch] = []
        self._first_step_seen = False

    # ---- prepare_model / prepare_optimizer -------------------------------------------
    def before_prepare_model(self, model: torch.nn.Module) -> None:
        if model in self.prepared:
            raise ConfigError(
                f"prepare_model was given a model that is already prepared ({type(model).__name__}); "
                "prepare each model once and keep using what prepare_model returned (in sync mode its "
                ".module is the unwrapped model). Several different models may each be prepared once")

    def after_prepare_model(self, model: torch.nn.Module, prepared: torch.nn.Module) -> None:
        self.prepared.add(model)
        self.prepared.add(prepared)
        if not {id(p) for p in prepared.parameters()} <= self.covered:
            self.watches.append(_GradWatch(prepared, self._on_backward))

    def before_prepare_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        if optimizer in self.prepared:
            raise ConfigError("prepare_optimizer was given an optimizer that is already prepared; prepare "
                              "each optimizer once (a second time would count each of its steps twice)")

    def after_prepare_optimizer(self, optimizer: torch.optim.Optimizer, prepared: Any) -> None:
        self.prepared.add(optimizer)
        self.prepared.add(prepared)
        self.covered |= {id(p) for group in optimizer.param_groups for p in group["params"]}
        for watch in [w for w in self.watches if w.params & self.covered]:
            watch.remove()
            self.watches.remove(watch)

    # ---- a model trained without a prepared optimizer (point 11) ---------------------
    def _on_backward(self, backwards: int) -> None:
        if backwards >= 2:
            self.check_optimizer("a second backward")

    def on_report(self) -> None:
        if self.watches:
            self.check_optimizer("a report")

    def check_optimizer(self, seen_at: str) -> None:
        """Raise (async) or warn (sync) if a prepared model got gradients but no prepared
        optimizer steps it; see the module doc."""
        if not any(w.most_backwards for w in self.watches):
            return
        ctx = self.session.context
        if ctx.mode == "async":
            raise ConfigError(
                f"mode='async': a model passed to prepare_model got gradients (seen at {seen_at}) but no "
                "optimizer over its parameters was passed to synctrain.prepare_optimizer, so its updates never "
                "reach the parameter server: every worker would train alone and each report say step 0. "
                "Prepare the optimizer: opt = synctrain.prepare_optimizer(torch.optim.SGD(model.parameters(), "
                "lr=...))")
        for watch in self.watches:
            watch.remove()
        self.watches = []
        if ctx.rank == 0:
            warn_once("optimizer", (
                "synctrain: a model passed to prepare_model got gradients but no optimizer over its "
                "parameters was passed to synctrain.prepare_optimizer. DDP still averages the gradients, "
                "but synctrain cannot count optimizer steps: every report says step 0 and a step-logged job "
                "records no step and takes no checkpoint. Prepare the optimizer: "
                "opt = synctrain.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=...))"))

    # ---- a DataLoader not passed through prepare_data_loader (point 13) ----------------
    def before_step(self) -> None:
        """Called at every prepared optimizer's ``step``; acts on the job's first one."""
        if self._first_step_seen:
            return
        self._first_step_seen = True
        ctx = self.session.context
        if ctx.world_size < 2 or ctx.rank != 0 or self.session.samplers:
            return
        unsharded = unprepared_loaders()
        if unsharded:
            warn_once("unsharded_data", (
                f"synctrain: the training loop iterates a DataLoader ({unsharded[0]}) that was not passed "
                f"through synctrain.prepare_data_loader, so each of the {ctx.world_size} ranks reads the whole "
                f"dataset every epoch: {ctx.world_size} times the work, and the ranks' batches overlap. Wrap "
                "it: loader = synctrain.prepare_data_loader(DataLoader(dataset, batch_size=..., shuffle=True)) "
                "(or give each rank its own part of the data yourself, by get_context().rank)"))


def unprepared_loaders() -> list[str]:
    """The live DataLoader iterators of this process that do not draw from a sharded sampler,
    described (dataset type and size, batch size). One scan of the heap (see module doc)."""
    from torch.utils.data import dataloader

    from synctrain.data import ShardedBatchSampler

    classes = [c for c in (getattr(dataloader, "_SingleProcessDataLoaderIter", None),
                           getattr(dataloader, "_MultiProcessingDataLoaderIter", None)) if c is not None]
    found = []
    for obj in gc.get_referrers(*classes):
        if not isinstance(obj, tuple(classes)):
            continue
        sampler = getattr(obj, "_index_sampler", None)
        if sampler is None or isinstance(sampler, ShardedBatchSampler):
            continue
        dataset = getattr(obj, "_dataset", None)
        size = f"{len(dataset)} samples" if isinstance(dataset, Sized) else "no length"
        found.append(f"over a {type(dataset).__name__} of {size}, batch_size="
                     f"{getattr(sampler, 'batch_size', '?')}")
    return found
