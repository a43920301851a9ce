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

Re-sharding (elastic membership). A job that shrinks or grows continues with another world
size, so "batches done" no longer says where the epoch stands. ``resume_point()`` adds the
*sample offset*: how many samples of the epoch's permutation the job has consumed, over all
ranks, through the batches handed out. ``resume_at(epoch, done, offset)`` cuts the rest of the
permutation, from that offset, into global batches of the new world and shares them out as
above: no sample of the epoch is skipped or seen twice, whatever the world size was before
(a position without an offset, as older checkpoints hold, resumes by batch count). One edge:
if fewer samples than ranks remain at the offset, no rank can get one without another going
empty, and those few samples are skipped (with a warning). ``global_batch_size`` keeps the
global batch of the full job on fewer ranks (``Trainer(keep_global_batch=True)``): each rank
then gets a larger share of each global batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler

log = logging.getLogger(__name__)


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
        global_batch_size: int | None = None,
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
        # samples per optimizer step over all ranks: world_size * batch_size, unless the job
        # keeps its full global batch on fewer ranks
        self.global_batch_size = world_size * batch_size if global_batch_size is None else global_batch_size
        if self.global_batch_size < world_size:
            raise ValueError(f"a global batch of {self.global_batch_size} samples cannot give each of "
                             f"{world_size} ranks one")
        self.epoch = 0
        self._pinned = False
        self._started = False
        # (epoch, global batches already done in it, samples consumed in it or None)
        self._resume: tuple[int, int, int | None] | None = None
        self.on_resume_point: Callable[[], None] | None = None  # called when the resume epoch starts
        # called before each iteration's first batch is handed out (or at its end, if empty)
        self.on_first_batch: Callable[[], None] | None = None
        # called before every batch is handed out (the session's capture points)
        self.on_batch: Callable[[], None] | None = None
        self.iter_epoch = -1  # epoch of the current (or last) iteration; -1: never iterated
        self.delivered = 0  # batches of iter_epoch handed to the loop, resumed ones included
        self._iter_first = 0  # ``delivered`` when the current iteration started
        self._iter_offset = 0  # sample offset where the current iteration's first batch starts
        self._iter_bounds: list[tuple[int, int]] = []  # the current iteration's global batches

    def position(self) -> tuple[int, int]:
        """(epoch, batches done in it) of the latest iteration; (-1, 0) before the first."""
        return self.iter_epoch, self.delivered

    def sample_offset(self) -> int:
        """Samples of ``iter_epoch`` consumed over all ranks by the batches handed out."""
        handed = self.delivered - self._iter_first
        if handed <= 0 or not self._iter_bounds:
            return self._iter_offset
        return self._iter_bounds[min(handed, len(self._iter_bounds)) - 1][1]

    def resume_point(self) -> tuple[int, int, int]:
        """``position()`` and ``sample_offset()``: where a run of any world size continues."""
        return self.iter_epoch, self.delivered, self.sample_offset()

    def resume_at(self, epoch: int, done: int, offset: int | None = None) -> None:
        """Continue from ``resume_point() == (epoch, done, offset)`` of an earlier run, or from
        ``position() == (epoch, done)`` when ``offset`` is None (see module doc)."""
        if epoch < 0:
            self._fire_resume_point()
            return
        if offset is None and not 0 <= done <= len(self):
            raise ValueError(f"cannot resume at batch {done} of an epoch of {len(self)} batches: the "
                             "dataset, batch size or worker count changed since the checkpoint")
        if offset is not None and not 0 <= offset <= self.num_samples:
            raise ValueError(f"cannot resume at sample {offset} of an epoch of {self.num_samples} "
                             "samples: the dataset changed since the checkpoint")
        self._resume = (epoch, done, offset)

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next iteration (and count on from it)."""
        self.epoch = epoch
        self._pinned = True

    def _global_batches(self, offset: int = 0) -> list[tuple[int, int]]:
        """The epoch's permutation from ``offset`` on, cut into global batches (lo, hi)."""
        step = self.global_batch_size
        bounds = [(lo, min(lo + step, self.num_samples)) for lo in range(offset, self.num_samples, step)]
        if not bounds:
            return bounds
        last_lo, last_hi = bounds[-1]
        if last_hi - last_lo < step and self.drop_last:
            bounds.pop()
        elif last_hi - last_lo < self.world_size and len(bounds) > 1:
            bounds.pop()
            bounds[-1] = (bounds[-1][0], last_hi)
        elif last_hi - last_lo < self.world_size:  # only after a re-shard (offset > 0)
            log.warning("the last %d sample(s) of the epoch are skipped: re-sharded at sample %d, "
                        "fewer remain than the %d ranks", last_hi - last_lo, offset, self.world_size)
            bounds.pop()
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
        skip, offset = 0, None
        if self._resume is not None:
            resume_epoch, done, resume_offset = self._resume
            if self.epoch < resume_epoch:
                return iter(())  # an epoch the restored state has already finished
            if self.epoch == resume_epoch:
                skip, offset = done, resume_offset
            self._resume = None
            self._fire_resume_point()
        if offset is None:  # by batch count, in this world's batches
            bounds = self._global_batches()
            offset = bounds[skip - 1][1] if 0 < skip <= len(bounds) else 0
            bounds = bounds[skip:]
        else:  # by sample offset: the rest of the epoch cut for this world
            bounds = self._global_batches(offset)
        self.iter_epoch, self.delivered = self.epoch, skip
        self._iter_first, self._iter_offset, self._iter_bounds = skip, offset, bounds
        return self._batches(self.epoch, bounds)

    def _fire_resume_point(self) -> None:
        callback, self.on_resume_point = self.on_resume_point, None
        if callback is not None:
            callback()

    def _batches(self, epoch: int, bounds: list[tuple[int, int]]) -> Iterator[list[int]]:
        order = self._order(epoch)
        for lo, hi in bounds:
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
    loader: DataLoader, world_size: int, rank: int, seed: int, device: torch.device,
    global_batch_size: int | None = None,
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
        global_batch_size=global_batch_size,
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
