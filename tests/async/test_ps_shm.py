"""The shared-memory channel between a worker and a shard on one machine (synctrain.ps.shm).

Real files in /dev/shm, real mappings, a real second process killed with SIGKILL; the shard
is driven in-process as in test_ps_shard.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import ray
import torch
from torch import nn

from synctrain.ps import NonFiniteGradientError, OptimizerRecipe, ParameterServerError, ipc, shm
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


# ---- the doorbell: a Unix socket per shard (synctrain.ps.ipc) -----------------------------
class LoopThread:
    """An asyncio loop in a thread, as a Ray async actor runs its methods; the test's own
    thread plays the worker with a blocking ShardLink."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, shard) -> None:
        async def shutdown():  # close the server and end its connections' tasks, then stop
            if shard._server is not None:
                shard._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def served():
    """An in-process shard on its loop thread, a channel of worker 0 attached to it."""
    loop = LoopThread()

    async def make():
        shard = ParameterShard(config(None))
        await setup(shard)
        return shard

    shard = loop.run(make())
    channel = shm.Channel.create(JOB, 0, 0, N, np.float32)
    assert channel is not None
    try:
        address = loop.run(shard.attach_channel(JOB, 0, channel.path, channel.token))
    finally:
        channel.unlink()
    assert address is not None and address.startswith("\0")  # abstract: no file to leak
    yield shard, channel, address, loop
    loop.stop(shard)


def request(clock, *, has=True, min_clock=0, want=True, lrs=None):
    return {"clock": clock, "has": has, "min": min_clock, "ver": 0, "lrs": lrs, "want": want}


def test_a_push_rung_on_the_socket_is_a_push_through_shared_memory(served):
    shard, channel, address, loop = served
    reference = ParameterShard(config(None))
    expected = loop.run(_setup_and_push(reference, np.array([1, 2, 3, 4], dtype=np.float32)))
    link = ipc.ShardLink.connect(0, address, JOB, 0, channel.token, 10)
    channel.grad[:] = [1, 2, 3, 4]
    link.send(request(0))
    answer = link.receive()
    assert np.array_equal(channel.params, expected.params)
    assert (answer["version"], tuple(answer["clocks"])) == (expected.version, expected.clocks)
    # A new learning rate travels with the push (as through Ray).
    link.send(request(1, lrs=[0.0]))
    link.receive()
    assert np.array_equal(channel.params, expected.params)  # lr 0: nothing moved
    link.close()


async def _setup_and_push(shard, grads):
    await setup(shard)
    return await shard.push(JOB, 0, 0, grads, 0, 0)


def test_the_shards_errors_arrive_as_themselves_and_the_link_stays_usable(served):
    shard, channel, address, _ = served
    link = ipc.ShardLink.connect(0, address, JOB, 0, channel.token, 10)
    before = shard.params()
    channel.grad[:] = [np.inf, 0, 0, 0]
    link.send(request(0))
    with pytest.raises(NonFiniteGradientError, match="worker 0 pushed a gradient with 1 NaN/Inf"):
        link.receive()
    assert np.array_equal(shard.params(), before)
    link.send(request(5))  # out of order
    with pytest.raises(ParameterServerError, match="expected clock 0"):
        link.receive()
    link.send({"clock": 0})  # malformed: named, not a hang
    with pytest.raises(ParameterServerError, match="KeyError on the shard"):
        link.receive()
    channel.grad[:] = [1, 1, 1, 1]
    link.send(request(0))
    assert link.receive()["clocks"] == [1, 0]
    link.close()


def test_a_connection_without_the_workers_token_is_refused(served):
    _, channel, address, _ = served
    for job, worker, token in ((JOB, 0, b"\0" * 16), ("another-job", 0, channel.token),
                               (JOB, 1, channel.token), (JOB, "0", channel.token)):
        with pytest.raises(ParameterServerError, match="connection refused"):
            ipc.ShardLink.connect(0, address, job, worker, token, 10)


@pytest.mark.parametrize("garbage", [
    struct.pack("<I", ipc.MAX_FRAME_BYTES + 1),  # an oversized frame announced
    struct.pack("<I", 3) + b"\xc1\xc1\xc1",  # not msgpack
    struct.pack("<I", 1) + b"\x01",  # msgpack, but not a map
])
def test_bad_frames_close_the_connection_and_leave_the_shard_serving(served, garbage):
    shard, channel, address, _ = served
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.settimeout(10)
    raw.connect(address)
    raw.sendall(garbage)
    assert raw.recv(100) == b""  # the shard hung up
    raw.close()
    link = ipc.ShardLink.connect(0, address, JOB, 0, channel.token, 10)  # and still serves
    channel.grad[:] = 0
    link.send(request(0, want=False))
    assert link.receive()["clocks"] == [1, 0]
    link.close()


def test_frames_are_bounded_on_the_way_out():
    with pytest.raises(ParameterServerError, match="over the"):
        ipc.encode({"lrs": [0.5] * (ipc.MAX_FRAME_BYTES // 8)})


@pytest.mark.ray
@pytest.mark.fault
def test_a_shard_killed_mid_push_is_reported_at_once_not_after_the_timeout(ray_session):
    actor = ray.remote(ParameterShard).options(num_cpus=0).remote(config(0))
    p = nn.Parameter(torch.zeros(N))
    ray.get(actor.init_params.remote(JOB, "digest", np.arange(N, dtype=np.float32)))
    ray.get(actor.set_optimizer.remote(JOB, 0, OptimizerRecipe.of(torch.optim.SGD([p], lr=1.0), [p]),
                                       (Segment(0, N, 0),)))
    channel = shm.Channel.create(JOB, 0, 0, N, np.float32)
    assert channel is not None
    address = ray.get(actor.attach_channel.remote(JOB, 0, channel.path, channel.token))
    channel.unlink()
    link = ipc.ShardLink.connect(0, address, JOB, 0, channel.token, 600)
    channel.grad[:] = 1
    link.send(request(0, min_clock=1))  # waits for worker 1's clock 0, which never comes
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ParameterServerError, match="closed the connection"):
        link.receive()  # end of file at once; the 600 s timeout would fail the test's own limit


def test_a_snapshot_asked_for_on_the_socket_holds_the_pushes_before_it_and_none_after(served):
    """``{"snap": tag}`` between two pushes: the shard takes the snapshot then (no answer on
    the socket), and ``take_snapshot`` hands over exactly that, even after later pushes and
    even when it is called before the frame arrives; unknown tags time out clearly."""
    shard, channel, address, loop = served
    link = ipc.ShardLink.connect(0, address, JOB, 0, channel.token, 10)
    channel.grad[:] = [1, 1, 1, 1]
    link.send(request(0))
    link.receive()
    early = asyncio.run_coroutine_threadsafe(shard.take_snapshot(JOB, "second", 10), loop.loop)
    link.send({"snap": "first"})
    channel.grad[:] = [2, 2, 2, 2]
    link.send(request(1))
    after_push = link.receive()  # the socket's next frame is the push's answer: snap has none
    link.send({"snap": "second"})
    link.send(request(2, has=False))
    link.receive()
    first = loop.run(shard.take_snapshot(JOB, "first", 10))
    second = early.result(10)
    # lr 1, update scale 0.5: 0..3 - 0.5 after the first push, - 1 more after the second
    assert first["params"].tolist() == [-0.5, 0.5, 1.5, 2.5] and first["clocks"][0] == 1
    assert second["params"].tolist() == [-1.5, -0.5, 0.5, 1.5] and second["clocks"][0] == 2
    assert after_push["clocks"][0] == 2 and second["version"] == first["version"] + 1
    with pytest.raises(ParameterServerError, match="holds no snapshot 'first' after 0.2 s"):
        loop.run(shard.take_snapshot(JOB, "first", 0.2))  # fetched once: gone
    link.close()


def test_a_snapshot_taken_on_a_second_socket_is_what_ray_would_hand_over(served):
    """The step-log writer fetches a snapshot on a connection of its own (``{"take": tag}``):
    the same state ``take_snapshot`` returns through Ray, tensors and all; a take that comes
    before its ``snap`` frame waits for it; a tag of another worker, or one never asked for, is
    a clear error and the connection goes on serving."""
    shard, channel, address, loop = served
    link = ipc.ShardLink.connect(0, address, JOB, 0, channel.token, 10)
    taker = ipc.ShardLink.connect(0, address, JOB, 0, channel.token, 10)
    channel.grad[:] = [1, 1, 1, 1]
    link.send(request(0))
    link.receive()
    early: dict = {}
    waiting = threading.Thread(target=lambda: early.update(state=taker.take_snapshot("0:b")))
    waiting.start()  # asks before the loop's connection sends the frame
    link.send({"snap": "0:a"})
    link.send({"snap": "0:b"})
    waiting.join(10)
    via_ray = loop.run(shard.take_snapshot(JOB, "0:a", 10))
    via_socket = early["state"]
    assert set(via_socket) == set(via_ray)
    for key in via_ray:
        if isinstance(via_ray[key], torch.Tensor):
            assert via_socket[key].dtype == via_ray[key].dtype and torch.equal(via_socket[key], via_ray[key])
        elif key != "optimizer":
            assert via_socket[key] == via_ray[key], key
    assert via_socket["params"].tolist() == [-0.5, 0.5, 1.5, 2.5] and via_socket["clocks"][0] == 1
    assert str(via_socket["optimizer"]) == str(via_ray["optimizer"])
    with pytest.raises(ParameterServerError, match="only its own snapshots"):
        taker.take_snapshot("1:x")
    taker.timeout_s = 1.5  # the shard waits 0.5 s, then answers with an error
    with pytest.raises(ParameterServerError, match="holds no snapshot '0:a' after 0.5 s"):
        taker.take_snapshot("0:a")  # fetched through Ray above: gone
    link.send({"snap": "0:c"})
    assert taker.take_snapshot("0:c")["clocks"][0] == 1  # still serving
    taker.close()
    link.close()


def test_a_snapshot_the_socket_cannot_carry_stays_for_ray(served, monkeypatch):
    """Too large for one socket frame, or holding a type the frame refuses: the shard says so
    and keeps it, and Ray's fetch gets it."""
    shard, channel, address, loop = served
    link = ipc.ShardLink.connect(0, address, JOB, 0, channel.token, 10)
    taker = ipc.ShardLink.connect(0, address, JOB, 0, channel.token, 10)
    export = shard._export
    monkeypatch.setattr(shard, "_export", lambda: {**export(), "odd": {1, 2}})
    link.send({"snap": "0:odd"})
    with pytest.raises(ipc.SnapshotViaRayError, match="does not travel on the socket: set cannot travel"):
        taker.take_snapshot("0:odd")
    assert loop.run(shard.take_snapshot(JOB, "0:odd", 10))["odd"] == {1, 2}
    monkeypatch.setattr(shard, "_export", export)
    monkeypatch.setattr(ipc, "MAX_SNAPSHOT_BYTES", 64)
    link.send({"snap": "0:big"})
    with pytest.raises(ipc.SnapshotViaRayError, match="over the 64-byte limit"):
        taker.take_snapshot("0:big")
    assert loop.run(shard.take_snapshot(JOB, "0:big", 10))["params"].tolist() == [0, 1, 2, 3]
    taker.close()
    link.close()


def test_a_tree_of_tensors_travels_as_itself_and_nothing_else_does():
    """pack_tree / unpack_tree: tensors of every kind keep dtype, shape and values (raw bytes,
    never a pickle); tuples, OrderedDicts and int keys stay themselves; anything else refuses."""
    import collections

    opt = torch.optim.Adam([nn.Parameter(torch.randn(3))])
    opt.param_groups[0]["params"][0].grad = torch.randn(3)
    opt.step()
    tree = {"f": torch.randn(2, 3), "bf": torch.randn(4).to(torch.bfloat16), "b": torch.tensor([True, False]),
            "i": torch.arange(6, dtype=torch.int64)[::2], "empty": torch.empty(0, 3), "scalar": torch.tensor(3.5),
            "opt": opt.state_dict(), "t": (1, (2.5, "x"), None), "od": collections.OrderedDict(z=1, a=2),
            "n": np.float32(1.5), "raw": b"\x00\x01"}
    back = ipc.unpack_tree(ipc.pack_tree(tree))
    for key in ("f", "bf", "b", "i", "empty", "scalar"):
        assert back[key].dtype == tree[key].dtype and back[key].shape == tree[key].shape, key
        assert torch.equal(back[key], tree[key]), key
    assert back["t"] == (1, (2.5, "x"), None) and isinstance(back["t"][1], tuple)
    assert type(back["od"]) is collections.OrderedDict and list(back["od"]) == ["z", "a"]
    assert back["n"] == 1.5 and back["raw"] == b"\x00\x01"
    state = back["opt"]["state"][0]
    assert set(state) == {"step", "exp_avg", "exp_avg_sq"} and back["opt"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(state["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    back["f"].add_(1)  # its own memory
    assert not torch.equal(back["f"], tree["f"])
    with pytest.raises(TypeError, match="set cannot travel"):
        ipc.pack_tree({"s": {1, 2}})
    bad = ipc.pack_tree({"x": torch.ones(1)}).replace(b"float32", b"float99")
    with pytest.raises(ParameterServerError, match="no torch dtype 'float99'"):
        ipc.unpack_tree(bad)


def test_snapshots_never_fetched_are_bounded(served):
    """A worker that died before fetching leaves its snapshots behind: the shard keeps the
    newest MAX_SNAPSHOTS, and a fetch of a dropped one says so."""
    from synctrain.ps.shard import MAX_SNAPSHOTS

    shard, channel, address, loop = served
    link = ipc.ShardLink.connect(0, address, JOB, 0, channel.token, 10)
    for i in range(MAX_SNAPSHOTS + 1):
        link.send({"snap": f"s{i}"})
    last = loop.run(shard.take_snapshot(JOB, f"s{MAX_SNAPSHOTS}", 10))  # all frames served by now
    assert last["clocks"] == [0, 0] and len(shard._snapshots) == MAX_SNAPSHOTS - 1
    with pytest.raises(ParameterServerError, match=r"never arrived, or it was dropped \(more than 16"):
        loop.run(shard.take_snapshot(JOB, "s0", 0.2))
    assert loop.run(shard.take_snapshot(JOB, "s1", 1))["version"] == 0
    link.close()
