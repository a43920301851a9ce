"""Job start-up: every new worker imports what its loop's first lines would while the driver
does the rest (``TrainWorker.warm``, sent as each worker is created; for a step-logged job the
first generation's workers and a new job's shards start before the embedded coordinator)."""

from __future__ import annotations

import pytest
import torch

import synctrain


def _loop(config):
    import sys

    first = {name: name in sys.modules for name in ("torch._dynamo", "torch.distributed")}
    model = synctrain.prepare_model(torch.nn.Linear(4, 2))
    opt = synctrain.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(3):
        opt.zero_grad()
        model(torch.ones(2, 4)).sum().backward()
        opt.step()
    return first


@pytest.mark.ray
@pytest.mark.parametrize("mode, step_log", [("sync", True), ("async", False)])
def test_the_loop_finds_the_imports_its_first_lines_need_done(ray_session, tmp_path, mode, step_log):
    # torch.optim.Optimizer() and DistributedDataParallel() import torch._dynamo lazily: ~1.5 s
    # of a fresh process on 2 cores, which warm overlaps with the driver's own start-up.
    result = synctrain.Trainer(_loop, num_workers=2, mode=mode, use_gpu=False, progress=False,
                               step_log=step_log, storage_path=str(tmp_path)).fit()
    assert result.outputs == [{"torch._dynamo": True, "torch.distributed": True}] * 2
    if step_log:
        assert [s["step"] for s in result.steps] == [1, 2, 3]


class _SlowToLoad:
    """Unpickles as ``None`` after ``seconds``: a loop whose loading takes long (a heavy import)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __reduce__(self):
        import time

        return time.sleep, (self.seconds,)


def _slow_loop(config, slow=None):
    return _loop(config)


@pytest.mark.ray
def test_a_worker_still_loading_its_loop_answers_polls_and_is_not_taken_for_stalled(ray_session, tmp_path):
    # warm (on every new worker) and then run each load the loop: 4 s here, longer than the
    # stall timeout. Polls must still be answered meanwhile, or the silent rank loses its
    # start-up grace and is declared stalled (and so is its replacement, and the job fails).
    import functools

    loop = functools.partial(_slow_loop, slow=_SlowToLoad(4.0))
    result = synctrain.Trainer(loop, num_workers=2, mode="sync", use_gpu=False, progress=False,
                               stall_timeout_s=2.5, max_failures=0, storage_path=str(tmp_path)).fit()
    assert result.failures == [] and len(result.generations) == 1
    assert [s["step"] for s in result.steps] == [1, 2, 3]
