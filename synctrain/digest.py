"""Digests of replicated state, and the test hook that corrupts it.

A digest is a SHA-256 hash (its first 128 bits) of a nested structure of tensors and plain
values, fed in a fixed order: dicts in their own order (a ``state_dict``'s order is the
module's registration order, the same on every rank), every tensor as its dtype, shape and
raw bytes (on the CPU, contiguous). Two ranks get the same digest exactly when they hold the
same names, shapes, dtypes and bits; a single flipped bit changes it. Hashing releases the
GIL, so the step boundary hashes on its writer thread (:mod:`synctrain.worker.step`), off the
training loop. SHA-256 because CPUs with the SHA extensions (x86 since Ice Lake and Zen,
ARMv8) hash it at ~1.5 GB/s a core, 2.3x BLAKE2b on the development machine
(``benchmarks/digest_cost.py``).

Which state is meant to be the same on every rank, and so is compared: in sync mode every
prepared model's parameters, never the optimizer state (ZeRO-1 shards it by design) and not
the buffers: DDP re-sends rank 0's buffers at each forward and every rank then updates its own
copy from its own batch (BatchNorm's running statistics), so between two forwards they differ
by design — a corrupted buffer on another rank is overwritten, one on rank 0 reaches every
rank alike. In async mode no rank holds a replica of another, so the digest covers *what each
worker pulled at a given clock*: a push can ask each shard to hash the parameters it serves
(:func:`array_digest`, keyed by the shard's version, i.e. its clock), and at its next push the
worker hashes what it holds of each range before sending gradients computed from it
(:mod:`synctrain.strategies.paramserver`); the step log compares the two, and the served
digests of one shard version across workers (:mod:`coordinator.steplog`). A checkpoint's
digest covers what the checkpoint holds: the models' whole ``state_dict`` (sync) or the
parameter-server shards' state (async), so a restore can check what it read against what was
committed.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

DIGEST_HEX_CHARS = 32  # 128 bits


def state_digest(value: Any) -> str:
    """The hex digest of ``value`` (tensors, dicts, lists, tuples and plain scalars)."""
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()[:DIGEST_HEX_CHARS]


def array_digest(array: Any) -> str:
    """The hex digest of a flat numpy array's raw bytes (what a parameter-server shard served,
    or a worker holds, of one shard's range): the same hash and length as :func:`state_digest`."""
    return hashlib.sha256(memoryview(array).cast("B")).hexdigest()[:DIGEST_HEX_CHARS]


def _feed(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        h.update(b"{%d|" % len(value))
        for key, item in value.items():
            _feed(h, key)
            _feed(h, item)
    elif isinstance(value, (list, tuple)):
        h.update(b"[%d|" % len(value))
        for item in value:
            _feed(h, item)
    else:
        h.update(f"{type(value).__name__}:{value!r}|".encode())


def replicated_state(models: list[Any], saved: list[dict[str, Any]] | None = None,
                     ) -> list[dict[str, torch.Tensor]]:
    """What a sync rank holds as a replica: every prepared model's parameters by name (a
    wrapper's ``module`` unwrapped, as a checkpoint names them), copied to the CPU — or taken
    from ``saved``, a checkpoint's copies of the same models' ``state_dict``."""
    out = []
    for i, m in enumerate(models):
        module = getattr(m, "module", m)
        if saved is not None:
            out.append({name: saved[i][name] for name, _ in module.named_parameters()})
        else:
            out.append({name: p.detach().to("cpu", copy=True) for name, p in module.named_parameters()})
    return out


def flip_bit(models: list[Any], bit: int = 22) -> str:
    """Test hook: flip ``bit`` of the first element of the first floating-point parameter, in
    place (bit 22 of a float32 is the top bit of its mantissa). Returns what it flipped."""
    for m in models:
        for name, p in getattr(m, "module", m).named_parameters():
            if not p.is_floating_point() or p.numel() == 0:
                continue
            size = p.element_size()
            if not 0 <= bit < 8 * size:
                raise ValueError(f"bit must be in [0, {8 * size}) for {p.dtype}, got {bit}")
            with torch.no_grad():
                raw = p.data.view(-1)[:1].view(torch.uint8)
                raw[bit // 8] ^= 1 << (bit % 8)
            return f"bit {bit} of {name}[0] (now {p.data.view(-1)[0].item():.6g})"
    raise ValueError("no floating-point parameter to flip a bit in")
