"""The shared-memory channel between a worker and a shard on one machine (synctrain.ps.shm).

Real files in /dev/shm, real mappings, a real second process killed with SIGKILL; the shard
is driven in-process as in test_ps_shard.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from synctrain.ps import OptimizerRecipe, ParameterServerError, shm
from synctrain.ps.layout import Segment
from synctrain.ps.shard import ParameterShard, ShardConfig

pytestmark = pytest.mark.skipif(not shm.available(), reason="this machine has no writable /dev/shm")
JOB = "job-shm"
N = 4


def config(staleness):
    return ShardConfig(job_id=JOB, shard_index=0, num_shards=1, num_workers=2, staleness=staleness,
                       skip_nonfinite=False, update_scale=0.5, wait_timeout_s=60.0, torch_threads=None)


async def setup(shard):
    """Rank 0's part: parameters 0..N-1 and plain SGD with lr 1."""
    await shard.init_params(JOB, "digest", np.arange(N, dtype=np.float32))
    p = nn.Parameter(torch.zeros(N))
    await shard.set_optimizer(JOB, 0, OptimizerRecipe.of(torch.optim.SGD([p], lr=1.0), [p]),
                              (Segment(0, N, 0),))


def leftovers(job: str = JOB) -> list[str]:
    return sorted(f for f in os.listdir(shm.SHM_DIR) if f.startswith(f"{shm.PREFIX}{job}-"))


def test_a_channel_is_shared_by_both_mappings_and_survives_the_unlink():
    mine = shm.Channel.create(JOB, 0, 0, N, np.float32)
    assert mine is not None and os.path.exists(mine.path)
    assert os.stat(mine.path).st_mode & 0o777 == 0o600
    theirs = shm.Channel.attach(mine.path, mine.token, JOB, N, np.float32)
    assert theirs is not None
    mine.unlink()
    assert leftovers() == []
    mine.grad[:] = [1, 2, 3, 4]
    theirs.params[:] = [5, 6, 7, 8]
    assert theirs.grad.tolist() == [1, 2, 3, 4] and mine.params.tolist() == [5, 6, 7, 8]
    assert not np.shares_memory(mine.grad, mine.params)
    mine.close()
    theirs.close()


def test_attach_tells_another_machines_file_from_a_wrong_one():
    mine = shm.Channel.create(JOB, 1, 0, N, np.float32)
    assert mine is not None
    try:
        # Not on this machine (no such file) or another process's file of that name: None.
        assert shm.Channel.attach(mine.path + "x", mine.token, JOB, N, np.float32) is None
        assert shm.Channel.attach(mine.path, b"\0" * 16, JOB, N, np.float32) is None
        # The right file, but the shard holds another layout: an error naming both.
        with pytest.raises(ParameterServerError, match="disagree on the layout"):
            shm.Channel.attach(mine.path, mine.token, JOB, N + 1, np.float32)
        with pytest.raises(ParameterServerError, match="disagree on the layout"):
            shm.Channel.attach(mine.path, mine.token, JOB, N, np.float64)
        # Only this job's channel files in /dev/shm are ever mapped.
        with pytest.raises(ParameterServerError, match="refused to map"):
            shm.Channel.attach("/etc/passwd", mine.token, JOB, N, np.float32)
        with pytest.raises(ParameterServerError, match="refused to map"):
            shm.Channel.attach(mine.path, mine.token, "another-job", N, np.float32)
    finally:
        mine.unlink()
        mine.close()


def test_no_channel_when_shared_memory_is_short(monkeypatch):
    monkeypatch.setattr(shm, "MAX_SHARE_OF_FREE", 0.0)  # as if /dev/shm were full
    assert shm.Channel.create(JOB, 0, 0, N, np.float32) is None
    assert leftovers() == []


def test_the_driver_removes_only_its_jobs_leftovers():
    ours = shm.Channel.create(JOB, 0, 0, N, np.float32)
    other = shm.Channel.create("another-job", 0, 0, N, np.float32)
    assert ours is not None and other is not None
    try:
        assert shm.remove_leftovers(JOB) == 1
        assert leftovers() == [] and os.path.exists(other.path)
    finally:
        other.unlink()


WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    from synctrain.ps import shm
    channel = shm.Channel.create(sys.argv[1], 0, 0, 4, np.float32)
    print(channel.path, channel.token.hex(), flush=True)
    sys.stdin.readline()  # the shard has attached
    channel.unlink()
    channel.grad[:] = [10, 20, 30, 40]
    print("pushed", flush=True)
    sys.stdin.readline()  # never comes: killed here
""")


def test_a_worker_killed_with_sigkill_leaks_no_file_and_the_shard_keeps_its_mapping():
    child = subprocess.Popen([sys.executable, "-c", WORKER, JOB], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        assert child.stdout is not None and child.stdin is not None
        path, token = child.stdout.readline().split()
        theirs = shm.Channel.attach(path, bytes.fromhex(token), JOB, 4, np.float32)
        assert theirs is not None
        child.stdin.write("attached\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "pushed"
        assert theirs.grad.tolist() == [10, 20, 30, 40]  # written by the other process
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
        assert leftovers() == []
        assert theirs.grad.tolist() == [10, 20, 30, 40]
    finally:
        if child.poll() is None:
            child.kill()


def test_push_shm_reads_the_gradient_in_place_and_writes_the_parameters_back():
    async def main():
        through_ray, through_shm = ParameterShard(config(None)), ParameterShard(config(None))
        await setup(through_ray)
        await setup(through_shm)
        channel = shm.Channel.create(JOB, 0, 0, N, np.float32)
        assert channel is not None
        try:
            assert await through_shm.attach_channel(JOB, 0, channel.path, channel.token)
        finally:
            channel.unlink()
        g = np.array([1, 2, 3, 4], dtype=np.float32)
        expected = await through_ray.push(JOB, 0, 0, g, 0, 0)
        channel.grad[:] = g
        reply = await through_shm.push_shm(JOB, 0, 0, True, 0, 0)
        assert reply.params is None  # the parameters are in the channel, not in the reply
        assert np.array_equal(channel.params, expected.params)
        assert (reply.version, reply.clocks) == (expected.version, expected.clocks)
        # No parameters asked for: the channel's parameters are left alone.
        channel.params[:] = -1
        channel.grad[:] = g
        reply = await through_shm.push_shm(JOB, 0, 1, True, 0, 0, None, False)
        assert reply.version == 2 and channel.params.tolist() == [-1] * N
        # A skipped step: the clock advances, nothing applied.
        before = through_shm.params()
        reply = await through_shm.push_shm(JOB, 0, 2, False, 0, 0)
        assert reply.clocks == (3, 0) and np.array_equal(channel.params, before)
        # A worker without a channel, a bad worker index, another job: clear errors.
        with pytest.raises(ParameterServerError, match="no channel of that worker"):
            await through_shm.push_shm(JOB, 1, 0, True, 0, 0)
        with pytest.raises(ParameterServerError, match="the job has 2 workers"):
            await through_shm.attach_channel(JOB, 5, channel.path, channel.token)
        # A file that is not there: not attached (the worker falls back to Ray).
        assert not await through_shm.attach_channel(JOB, 1, channel.path, channel.token)
        # NaN through the channel is refused like any other push; nothing changes.
        channel.grad[:] = [np.nan, 0, 0, 0]
        before = through_shm.params()
        with pytest.raises(ParameterServerError, match="NaN/Inf"):
            await through_shm.push_shm(JOB, 0, 3, True, 0, 0)
        assert np.array_equal(through_shm.params(), before)
        # leave drops the mapping: a later push through it is refused.
        await through_shm.leave(JOB, 0)
        with pytest.raises(ParameterServerError, match="no channel"):
            await through_shm.push_shm(JOB, 0, 3, True, 0, 0)

    asyncio.run(main())


def test_attach_before_the_parameters_is_refused():
    async def main():
        shard = ParameterShard(config(None))
        with pytest.raises(ParameterServerError, match="before the shard holds parameters"):
            await shard.attach_channel(JOB, 0, "/dev/shm/x", b"0" * 16)

    asyncio.run(main())
