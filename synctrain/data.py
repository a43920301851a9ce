"""Sharding a DataLoader over ranks so that every sample is seen exactly once per epoch.

:class:`ShardedBatchSampler` cuts each epoch's permutation (shared by all ranks: it is seeded
with the job seed and the epoch) into *global* batches of ``world_size * batch_size`` samples
and gives rank r the r-th slice of each. So:

* every rank yields the same number of batches (a collective step never waits for a rank that
  has run out of data), and no sample is repeated or padded: each is seen exactly once;
* the samples that step t processes across all ranks are exactly the t-th batch a single
  process with batch ``world_size * batch_size`` would see with the same seed;
* a final global batch too small to give every rank a sample is folded into the one before
  it (or dropped with ``drop_last``), so no rank ever gets an empty batch.

The epoch advances by itself each time iteration starts (``set_epoch`` pins it), so a loop
that forgets ``sampler.set_epoch`` still reshuffles every epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler


class ShardedBatchSampler(Sampler[list[int]]):
    def __init__(
        self,
        num_samples: int,
        world_size: int,
        rank: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_samples < world_size:
            raise ValueError(
                f"the dataset has {num_samples} samples, fewer than the {world_size} workers: "
                "every worker needs at least one sample; use fewer workers or more data"
            )
        self.num_samples = num_samples
        self.world_size = world_size
        self.rank = rank
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self._pinned = False
        self._started = False

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next iteration (and count on from it)."""
        self.epoch = epoch
        self._pinned = True

    def _global_batches(self) -> list[tuple[int, int]]:
        step = self.world_size * self.batch_size
        bounds = [(lo, min(lo + step, self.num_samples)) for lo in range(0, self.num_samples, step)]
        last_lo, last_hi = bounds[-1]
        if last_hi - last_lo < step and self.drop_last:
            bounds.pop()
        elif last_hi - last_lo < self.world_size and len(bounds) > 1:
            bounds.pop()
            bounds[-1] = (bounds[-1][0], last_hi)
        return bounds

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        if self._started and not self._pinned:
            self.epoch += 1
        self._started, self._pinned = True, False
        order = self._order()
        for lo, hi in self._global_batches():
            chunk = order[lo:hi]
            # split as evenly as possible: the first (len % world) ranks get one more
            base, extra = divmod(len(chunk), self.world_size)
            start = self.rank * base + min(self.rank, extra)
            yield chunk[start : start + base + (1 if self.rank < extra else 0)]

    def __len__(self) -> int:
        return len(self._global_batches())


class _DeviceLoader:
    """Iterates a DataLoader and moves tensors in each batch to ``device``."""

    def __init__(self, loader: DataLoader, device: torch.device) -> None:
        self.loader = loader
        self.device = device
        self.batch_sampler = loader.batch_sampler
        self.dataset = loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            yield _to_device(batch, self.device)

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)  # type: ignore[union-attr]


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def shard_data_loader(
    loader: DataLoader, world_size: int, rank: int, seed: int, device: torch.device
) -> Any:
    """A copy of ``loader`` reading only this rank's share of every batch (see module doc)."""
    if not isinstance(loader, DataLoader):
        raise TypeError(f"prepare_data_loader takes a torch DataLoader, got {type(loader).__name__}")
    if loader.batch_size is None:
        raise ValueError(
            "prepare_data_loader needs a DataLoader built with batch_size=...; a custom batch_sampler "
            "cannot be sharded automatically (shard the data yourself with get_context().rank)"
        )
    if not isinstance(loader.dataset, Sized):
        raise ValueError("prepare_data_loader needs a map-style dataset with a length")
    sampler = ShardedBatchSampler(
        len(loader.dataset),
        world_size,
        rank,
        loader.batch_size,
        shuffle=isinstance(loader.sampler, RandomSampler),
        seed=seed,
        drop_last=loader.drop_last,
    )
    sharded = DataLoader(
        loader.dataset,
        batch_sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        persistent_workers=loader.persistent_workers if loader.num_workers > 0 else False,
    )
    if device.type == "cpu":
        return sharded
    return _DeviceLoader(sharded, device)
