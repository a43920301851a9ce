"""The strategy interface: one small class per consistency mode, chosen by name.

A strategy has two halves, like Ray Train's backends and Lightning Fabric's strategies:

* driver side (classmethods): ``validate_options`` checks the mode's knobs before anything
  starts; ``on_driver_start`` creates what the workers share (parameter-server actors, say)
  and returns picklable *handles* given to every worker; ``on_driver_finish`` gathers
  driver-side results and tears those down.
* worker side (an instance per worker): ``on_start``/``on_shutdown`` bracket the user's loop
  (process groups, connections); ``prepare_model`` and ``prepare_optimizer`` wire gradient
  exchange into the user's objects; ``all_reduce``, ``broadcast`` and ``barrier`` are the
  collectives the user and the framework may call; ``metrics`` returns the worker's counters.

The user's loop never changes between modes: only the strategy behind the helpers does.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch

from synctrain.context import TrainContext
from synctrain.spec import JobSpec

_REGISTRY: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a strategy selectable by ``Trainer(mode=cls.name)``."""
    assert cls.name and cls.name not in _REGISTRY, cls.name
    _REGISTRY[cls.name] = cls
    return cls


def get_strategy_class(mode: str) -> type[Strategy]:
    from synctrain import strategies  # noqa: F401  (imports register the built-in modes)

    try:
        return _REGISTRY[mode]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown mode {mode!r}: choose one of {known}") from None


def registered_modes() -> list[str]:
    from synctrain import strategies  # noqa: F401

    return sorted(_REGISTRY)


class Strategy(abc.ABC):
    name: ClassVar[str] = ""

    # ---- driver side -------------------------------------------------------------------
    @classmethod
    def validate_options(cls, options: dict[str, Any], num_workers: int) -> dict[str, Any]:
        """Return the options with defaults filled in; raise ValueError naming a bad one."""
        return dict(options)

    @classmethod
    def on_driver_start(cls, spec: JobSpec) -> dict[str, Any]:
        """Create shared resources; the returned dict reaches every worker's constructor."""
        return {}

    @classmethod
    def on_driver_finish(cls, spec: JobSpec, handles: dict[str, Any], ok: bool) -> dict[str, Any]:
        """Collect driver-side results (put in ``Result.strategy_info``) and release resources."""
        return {}

    # ---- worker side -------------------------------------------------------------------
    def __init__(self, context: TrainContext, spec: JobSpec, handles: dict[str, Any]) -> None:
        self.context = context
        self.spec = spec
        self.handles = handles

    def on_start(self) -> None:
        """Called in the worker before the user's loop runs."""

    def on_shutdown(self) -> None:
        """Called in the worker after the user's loop, also when it raised."""

    @abc.abstractmethod
    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module: ...

    @abc.abstractmethod
    def prepare_optimizer(self, optimizer: torch.optim.Optimizer) -> Any: ...

    @abc.abstractmethod
    def all_reduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        """Reduce ``tensor`` in place over all workers ("sum" or "mean"); return it."""

    @abc.abstractmethod
    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor: ...

    @abc.abstractmethod
    def barrier(self) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """Strategy state a checkpoint must carry (e.g. parameter-server clocks)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""

    def progress(self) -> dict[str, Any]:
        """A few cheap figures for the driver's progress bar, asked for about once a second
        (async: the observed staleness); keep it O(1)."""
        return {}

    def metrics(self) -> dict[str, Any]:
        """The worker's counters (latencies, staleness...), returned in ``Result.worker_metrics``."""
        return {}
