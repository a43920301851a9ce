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

Resuming. The prepared loader counts the batches it has handed to the loop in the current
epoch; ``position()`` is that (epoch, batches) pair, recorded at every optimizer step and
saved in checkpoints. ``resume_at(epoch, done)`` makes a fresh sampler continue there: a loop
that runs again from its first line sees *nothing* for the epochs before ``epoch`` (each
``for batch in loader`` is empty), only the batches after the first ``done`` of ``epoch`` (in
the same order as before: the permutation is a function of seed and epoch), and everything
of later epochs. Iteration epochs are counted the same way whether the loop calls
``set_epoch(epoch)`` or not, so both styles land on the same batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
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
        self._resume: tuple[int, int] | None = None  # (epoch, global batches already done in it)
        self.on_resume_point: Callable[[], None] | None = None  # called when the resume epoch starts
        # called before each iteration's first batch is handed out (or at its end, if empty)
        self.on_first_batch: Callable[[], None] | None = None
        # called before every batch is handed out (the session's capture points)
        self.on_batch: Callable[[], None] | None = None
        self.iter_epoch = -1  # epoch of the current (or last) iteration; -1: never iterated
        self.delivered = 0  # batches of iter_epoch handed to the loop, resumed ones included

    def position(self) -> tuple[int, int]:
        """(epoch, batches done in it) of the latest iteration; (-1, 0) before the first."""
        return self.iter_epoch, self.delivered

    def resume_at(self, epoch: int, done: int) -> None:
        """Continue from ``position() == (epoch, done)`` of an earlier run (see module doc)."""
        if epoch < 0:
            self._fire_resume_point()
            return
        if not 0 <= done <= len(self):
            raise ValueError(f"cannot resume at batch {done} of an epoch of {len(self)} batches: the "
                             "dataset, batch size or worker count changed since the checkpoint")
        self._resume = (epoch, done)

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

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        # Not a generator: the epoch is decided when iteration starts, not at the first batch.
        if self._started and not self._pinned:
            self.epoch += 1
        self._started, self._pinned = True, False
        skip = 0
        if self._resume is not None:
            resume_epoch, done = self._resume
            if self.epoch < resume_epoch:
                return iter(())  # an epoch the restored state has already finished
            skip = done if self.epoch == resume_epoch else 0
            self._resume = None
            self._fire_resume_point()
        self.iter_epoch, self.delivered = self.epoch, skip
        return self._batches(self.epoch, skip)

    def _fire_resume_point(self) -> None:
        callback, self.on_resume_point = self.on_resume_point, None
        if callback is not None:
            callback()

    def _batches(self, epoch: int, skip: int) -> Iterator[list[int]]:
        order = self._order(epoch)
        for lo, hi in self._global_batches()[skip:]:
            chunk = order[lo:hi]
            # split as evenly as possible: the first (len % world) ranks get one more
            base, extra = divmod(len(chunk), self.world_size)
            start = self.rank * base + min(self.rank, extra)
            yield chunk[start : start + base + (1 if self.rank < extra else 0)]

    def __len__(self) -> int:
        return len(self._global_batches())


class ShardedDataLoader(DataLoader):
    """A DataLoader over a :class:`ShardedBatchSampler` that counts the batches it hands out
    (with worker processes the sampler runs ahead of the loop, so the sampler cannot count)."""

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler = self.batch_sampler
        assert isinstance(sampler, ShardedBatchSampler)
        inner = super().__iter__()
        return _counting(inner, sampler)


def _counting(inner: Iterator[Any], sampler: ShardedBatchSampler) -> Iterator[Any]:
    first = True
    for batch in inner:
        if first and sampler.on_first_batch is not None:
            sampler.on_first_batch()
        first = False
        if sampler.on_batch is not None:
            sampler.on_batch()
        sampler.delivered += 1
        yield batch
    if first and sampler.on_first_batch is not None:
        sampler.on_first_batch()


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
    sharded = ShardedDataLoader(
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
