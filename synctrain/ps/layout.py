"""Where each parameter lives in the flat vector, and how that vector is cut into shards.

Every worker builds the same :class:`FlatLayout` from its model: the parameters in
``model.parameters()`` order, each flattened and laid end to end. Shard ``i`` of ``k`` owns the
contiguous element range ``bounds[i]``; the cuts are at ``round(i * total / k)``, so shards
differ by at most one element and, since all parameters share one dtype, are balanced by
bytes. A cut may fall inside a parameter: shards work on element ranges, never on tensors.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FlatLayout:
    """Names, shapes and offsets of a model's parameters in the flat vector (picklable)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]  # start element of each parameter
    dtype: str  # e.g. "float32"; one dtype for all parameters

    @classmethod
    def of(cls, model: torch.nn.Module) -> FlatLayout:
        """The layout of ``model``; raise ValueError for no parameters or mixed dtypes."""
        named = list(model.named_parameters())
        if not named:
            raise ValueError("the model has no parameters: there is nothing for a parameter server to hold")
        dtypes = {p.dtype for _, p in named}
        if len(dtypes) != 1:
            raise ValueError(
                f"mode='async' needs all parameters in one dtype, the model mixes {sorted(map(str, dtypes))}; "
                "cast the model (model.float()) before prepare_model"
            )
        dtype = dtypes.pop()
        if not dtype.is_floating_point:
            raise ValueError(f"parameters must be floating point for training, got {dtype}")
        offsets, total = [], 0
        for _, p in named:
            offsets.append(total)
            total += p.numel()
        return cls(names=tuple(n for n, _ in named), shapes=tuple(tuple(p.shape) for _, p in named),
                   offsets=tuple(offsets), dtype=str(dtype).removeprefix("torch."))

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(_numel(s) for s in self.shapes)

    @property
    def total(self) -> int:
        return self.offsets[-1] + _numel(self.shapes[-1]) if self.shapes else 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def digest(self) -> str:
        """A short hash of names, shapes and dtype: equal on every rank that built the same model."""
        text = repr((self.names, self.shapes, self.dtype))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def shard_bounds(self, num_shards: int) -> tuple[tuple[int, int], ...]:
        """Element range ``[start, end)`` of each shard; raise ValueError if shards > elements."""
        total = self.total
        if num_shards < 1:
            raise ValueError(f"num_ps_shards must be >= 1, got {num_shards}")
        if num_shards > total:
            raise ValueError(
                f"num_ps_shards={num_shards} is larger than the model's {total} parameter elements, so "
                f"some shard would hold nothing; use num_ps_shards <= {total}"
            )
        cuts = [round(i * total / num_shards) for i in range(num_shards + 1)]
        return tuple((cuts[i], cuts[i + 1]) for i in range(num_shards))

    def segments(self, start: int, end: int, group_of: tuple[int | None, ...]) -> tuple[Segment, ...]:
        """The pieces of ``[start, end)`` that belong to one parameter each, with its group.

        ``group_of[i]`` is the optimizer param-group index of parameter ``i`` (None: not
        optimized). Offsets in the result are relative to ``start``.
        """
        assert len(group_of) == len(self.names), (len(group_of), len(self.names))
        out = []
        for i, (offset, n) in enumerate(zip(self.offsets, self.numels, strict=True)):
            lo, hi = max(start, offset), min(end, offset + n)
            if lo < hi:
                out.append(Segment(lo - start, hi - start, group_of[i]))
        return tuple(out)


@dataclass(frozen=True)
class Segment:
    """Elements ``[start, end)`` of a shard (relative offsets) that one param group updates."""

    start: int
    end: int
    group: int | None


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
