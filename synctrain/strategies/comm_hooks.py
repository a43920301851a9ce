"""DDP communication hooks: gradient compression on the wire.

A hook is a plain function ``hook(state, bucket) -> Future[Tensor]`` (PyTorch's DDP comm-hook
contract): DDP hands it each gradient bucket as soon as the bucket is ready, and the future
must resolve to the bucket's averaged gradients. Compression is the standard wrapper: cast the
bucket to a 16-bit type, pre-divide by the world size (so the sum cannot overflow), all-reduce
asynchronously, and cast back into the bucket when it completes.

PyTorch ships fp16/bf16 hooks, but its bf16 one insists on NCCL; these work on gloo (CPU) and
NCCL alike, and on the shared-memory transport: the hook's state is a process group (None:
the default one) or a :class:`~synctrain.strategies.shm_hook.ShmTransport`, through which the
16-bit bucket is summed instead.
"""

# No `from __future__ import annotations`: DDP inspects the hook's real annotations.

from typing import Any

import torch
import torch.distributed as dist


def _compress_hook(dtype: torch.dtype) -> Any:
    def hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        if hasattr(state, "all_reduce_future"):  # the shared-memory transport
            compressed = bucket.buffer().to(dtype).div_(state.world_size)

            def decompress_shm(done: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
                out = bucket.buffer()
                out.copy_(done.value())
                return out

            return state.all_reduce_future(compressed).then(decompress_shm)
        group = state if state is not None else dist.group.WORLD
        world_size = dist.get_world_size(group)
        compressed = bucket.buffer().to(dtype).div_(world_size)
        fut = dist.all_reduce(compressed, group=group, async_op=True).get_future()

        def decompress(done: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
            out = bucket.buffer()
            out.copy_(done.value()[0])
            return out

        return fut.then(decompress)

    hook.__name__ = f"{str(dtype).removeprefix('torch.')}_compress_hook"
    return hook


fp16_compress_hook = _compress_hook(torch.float16)
bf16_compress_hook = _compress_hook(torch.bfloat16)

HOOKS = {"fp16": fp16_compress_hook, "bf16": bf16_compress_hook}
