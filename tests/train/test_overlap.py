"""Gradient all-reduce overlaps the backward pass: buckets launch before backward ends."""

# (no __future__ annotations: DDP checks the comm hook's real annotations)

import pytest
import torch
import torch.distributed as dist
from torch import nn

import synctrain

pytestmark = [pytest.mark.ray]


def overlap_loop(config):
    events: list[str] = []
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Linear(256, 256) for _ in range(6)])
    model = synctrain.prepare_model(net)

    def recording_hook(state, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        events.append(f"bucket{bucket.index()}")
        buf = bucket.buffer().div_(dist.get_world_size())
        return dist.all_reduce(buf, async_op=True).get_future().then(lambda f: f.value()[0])

    model.register_comm_hook(None, recording_hook)
    for i, p in enumerate(net.parameters()):
        p.register_post_accumulate_grad_hook(lambda _p, i=i: events.append(f"grad{i}"))
    opt = synctrain.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=0.01))
    for _ in range(3):  # DDP rebuilds buckets after the first iteration
        events.clear()
        opt.zero_grad()
        model(torch.randn(8, 256)).sum().backward()
        opt.step()
    return events


def test_buckets_are_reduced_while_backward_still_runs(ray_session):
    result = synctrain.Trainer(overlap_loop, num_workers=2, use_gpu=False, progress=False,
                               bucket_cap_mb=0.3).fit()
    events = result.outputs[0]
    buckets = [i for i, e in enumerate(events) if e.startswith("bucket")]
    grads = [i for i, e in enumerate(events) if e.startswith("grad")]
    assert len(buckets) >= 3, events  # several buckets: 6 layers of 0.25 MB, cap 0.3 MB
    # the first bucket is launched before the last gradient (layer 0's) has been computed
    assert buckets[0] < grads[-1], events
