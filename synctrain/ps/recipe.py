"""Recreating the user's optimizer on the shards: the recipe and the supported classes.

The worker reads the optimizer the user built (class, defaults, every param group's
settings, which parameter is in which group) into an :class:`OptimizerRecipe` of plain
values. Each shard turns it back into a real torch optimizer of the same class over its own
element ranges, so the update math is torch's own, element by element: an SGD or Adam step
on a shard's slice is exactly the slice of the step a single process would take.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from synctrain.ps.errors import UnsupportedOptimizerError

#: Optimizer classes the shards can recreate. Their updates are element-wise, which is what
#: lets a shard update any element range on its own.
SUPPORTED: dict[str, type[torch.optim.Optimizer]] = {
    "SGD": torch.optim.SGD,
    "Adam": torch.optim.Adam,
    "AdamW": torch.optim.AdamW,
}

#: Implementation switches that describe the worker's device, not the math; the shard
#: (CPU, plain tensors) picks its own.
_IMPLEMENTATION_KEYS = {"foreach": None, "fused": None, "capturable": False, "differentiable": False}


@dataclass(frozen=True)
class OptimizerRecipe:
    """Plain-value description of an optimizer: enough to rebuild it on a shard."""

    kind: str  # a key of SUPPORTED
    groups: tuple[tuple[tuple[str, Any], ...], ...]  # each group's settings, sorted, no "params"
    group_of: tuple[int | None, ...]  # param-group index of each layout parameter

    @classmethod
    def of(cls, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> OptimizerRecipe:
        """Read ``optimizer``, whose parameters must all be among ``params`` (layout order)."""
        kind = type(optimizer).__name__
        if type(optimizer) is not SUPPORTED.get(kind):
            raise UnsupportedOptimizerError(
                f"mode='async' recreates the optimizer on the parameter-server shards and supports "
                f"{', '.join(f'torch.optim.{k}' for k in SUPPORTED)}; got {type(optimizer).__module__}."
                f"{type(optimizer).__qualname__}. Use one of those, or mode='sync'."
            )
        if optimizer.state:
            raise ValueError("prepare_optimizer needs a fresh optimizer: this one already has state "
                             "(it has stepped or loaded a state_dict); create it right before the call")
        index_of = {id(p): i for i, p in enumerate(params)}
        group_of: list[int | None] = [None] * len(params)
        groups = []
        for g, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if id(p) not in index_of:
                    raise ValueError(
                        "the optimizer holds a parameter that is not in the prepared model; build the "
                        "optimizer from the model prepare_model returned (model.parameters())"
                    )
                group_of[index_of[id(p)]] = g
            groups.append(tuple(sorted((k, _plain(k, v)) for k, v in group.items() if k != "params")))
        return cls(kind=kind, groups=tuple(groups), group_of=tuple(group_of))

    def build(self, tensors_by_group: dict[int, list[torch.Tensor]]) -> torch.optim.Optimizer | None:
        """A real optimizer over ``tensors_by_group`` (group index -> tensors); None if empty."""
        param_groups = []
        for g, tensors in sorted(tensors_by_group.items()):
            settings = {**dict(self.groups[g]), **_IMPLEMENTATION_KEYS}
            param_groups.append({"params": tensors, **settings})
        if not param_groups:
            return None
        cls: Any = SUPPORTED[self.kind]  # each takes (params, **defaults)
        return cls(param_groups)

    def lrs(self) -> tuple[float, ...]:
        return tuple(float(dict(g)["lr"]) for g in self.groups)


def _plain(key: str, value: Any) -> Any:
    if key in _IMPLEMENTATION_KEYS:
        return _IMPLEMENTATION_KEYS[key]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else tuple(value.tolist())
    if isinstance(value, (tuple, list)):
        return tuple(_plain(key, v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise UnsupportedOptimizerError(
        f"param-group setting {key!r} has a value of type {type(value).__name__} that cannot be sent "
        "to the parameter-server shards; use plain numbers"
    )
