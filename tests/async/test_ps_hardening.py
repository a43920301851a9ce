"""Issue 15, points 4 and 7: what another local user can do to a shard's socket and files.

The shard's Unix socket is abstract: no file permission guards it and its name is listed in
/proc/net/unix. Before a connection says hello it must cost the shard little and briefly:
a peer of another uid is refused (``SO_PEERCRED``), a hello is a few hundred bytes at most
and comes within ``HELLO_TIMEOUT_S``, and the connections are bounded. /dev/shm is shared
too: the driver's cleanup touches only its own user's files and never raises.

Real sockets, real files, a real process of another uid (the tests run as root, so they can
make one); the shard runs in-process on the test's asyncio loop, and the blocking client side
in a thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time

import msgpack
import numpy as np
import pytest
import torch
from torch import nn

from synctrain.ps import OptimizerRecipe, ParameterServerError, ipc, shm
from synctrain.ps import shard as shard_module
from synctrain.ps.layout import Segment
from synctrain.ps.shard import ParameterShard, ShardConfig

pytestmark = pytest.mark.skipif(not (shm.available() and ipc.available()),
                                reason="needs /dev/shm and abstract Unix sockets (Linux)")
JOB = "job-hardening"
N = 4
WORKERS = 2
OTHER_UID = 65534  # nobody
needs_root = pytest.mark.skipif(os.getuid() != 0, reason="making a file or process of another uid needs root")


async def serve():
    """A shard with its parameters and worker 0's channel attached: (shard, channel, address)."""
    shard = ParameterShard(ShardConfig(job_id=JOB, shard_index=0, num_shards=1, num_workers=WORKERS,
                                       staleness=None, skip_nonfinite=False, update_scale=1.0,
                                       wait_timeout_s=30.0, torch_threads=None))
    await shard.init_params(JOB, "digest", np.arange(N, dtype=np.float32))
    p = nn.Parameter(torch.zeros(N))
    await shard.set_optimizer(JOB, 0, OptimizerRecipe.of(torch.optim.SGD([p], lr=1.0), [p]), (Segment(0, N, 0),))
    channel = shm.Channel.create(JOB, 0, 0, N, np.float32)
    assert channel is not None
    try:
        address = await shard.attach_channel(JOB, 0, channel.path, channel.token)
    finally:
        channel.unlink()
    assert address is not None
    return shard, channel, address


async def stop(shard):
    if shard._server is not None:
        shard._server.close()
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def hello_frame(channel) -> bytes:
    return ipc.encode({"hello": JOB, "worker": 0, "token": channel.token})


def read_to_end(sock: socket.socket) -> bytes:
    """Everything until the shard hangs up. A shard that closes with our bytes unread makes
    the kernel report a reset once its frames are read: that is a hang-up too."""
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def decode_frames(data: bytes) -> list[dict]:
    frames = []
    while data:
        (length,) = struct.unpack("<I", data[:4])
        frames.append(msgpack.unpackb(data[4:4 + length], raw=False))
        data = data[4 + length:]
    return frames


def connect_as(uid: int, address: str, payload: bytes) -> bytes:
    """In a forked child running as ``uid``: connect, send ``payload``, return all it got back."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only raw syscalls, then _exit
        code = 1
        try:
            os.close(read_end)
            os.setgid(uid)
            os.setuid(uid)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(10)
            sock.connect(address)
            try:
                sock.sendall(payload)
            except BrokenPipeError:
                pass  # refused before the hello: the refusal is still there to read
            os.write(write_end, read_to_end(sock))
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        got = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return got


def run(scenario):
    async def main():
        shard, channel, address = await serve()
        try:
            await scenario(shard, channel, address)
        finally:
            await stop(shard)
            channel.close()

    asyncio.run(main())


# ---- point 4: the socket --------------------------------------------------------------------
@needs_root
def test_a_peer_of_another_uid_is_refused_even_with_the_token():
    async def scenario(shard, channel, address):
        got = await asyncio.to_thread(connect_as, OTHER_UID, address, hello_frame(channel))
        [frame] = decode_frames(got)
        assert frame["error"] == "ParameterServerError"
        assert f"connection refused: the peer runs as uid {OTHER_UID}, the shard as uid {os.getuid()}" in frame["message"]
        # The shard's own user, same hello: admitted.
        link = await asyncio.to_thread(ipc.ShardLink.connect, 0, address, JOB, 0, channel.token, 10)
        link.close()

    run(scenario)


def test_an_oversized_hello_is_cut_off_before_its_body_is_read():
    """Announcing a 64 KiB hello (well under the 1 MiB frame limit, which let each connection
    make the shard buffer up to 1 MiB for 30 s) ends the connection at once."""
    async def scenario(shard, channel, address):
        def probe():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(address)
                sock.sendall(struct.pack("<I", 64 * 1024) + b"\x80" * 1024)
                started = time.monotonic()
                return read_to_end(sock), time.monotonic() - started

        data, waited_s = await asyncio.to_thread(probe)
        assert data == b"" and waited_s < 1.0
        assert ipc.MAX_HELLO_BYTES <= 1024 and len(hello_frame(channel)) <= ipc.MAX_HELLO_BYTES

    run(scenario)


def test_a_silent_connection_is_dropped_at_the_hello_deadline():
    async def scenario(shard, channel, address):
        def probe():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(shard_module.HELLO_TIMEOUT_S + 5)
                sock.connect(address)
                started = time.monotonic()
                return read_to_end(sock), time.monotonic() - started

        data, waited_s = await asyncio.to_thread(probe)
        assert data == b""
        assert shard_module.HELLO_TIMEOUT_S <= 2.0
        assert shard_module.HELLO_TIMEOUT_S - 0.5 <= waited_s <= shard_module.HELLO_TIMEOUT_S + 3.0

    run(scenario)


def test_connections_beyond_the_bound_are_refused_and_a_worker_connects_once_they_are_gone(monkeypatch):
    monkeypatch.setattr(shard_module, "HELLO_TIMEOUT_S", 60.0)  # the idle ones stay while we look

    async def scenario(shard, channel, address):
        limit = shard_module.CONNECTIONS_PER_WORKER * WORKERS + shard_module.CONNECTION_SLACK
        idle = []
        for _ in range(limit):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, address)
            idle.append(sock)
        await until(lambda: shard._connections == limit)

        def one_more():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(address)
                return read_to_end(sock)

        [frame] = decode_frames(await asyncio.to_thread(one_more))
        assert f"serves {limit} connections already" in frame["message"]
        assert shard._connections == limit
        for sock in idle:
            sock.close()
        await until(lambda: shard._connections == 0)
        link = await asyncio.to_thread(ipc.ShardLink.connect, 0, address, JOB, 0, channel.token, 10)
        link.close()

    run(scenario)


def test_the_connection_of_a_replaced_worker_is_cut_at_its_next_push():
    async def scenario(shard, channel, address):
        link = await asyncio.to_thread(ipc.ShardLink.connect, 0, address, JOB, 0, channel.token, 10)
        assert await shard.join(JOB, 0) == 0  # a replacement took worker 0's slot

        def push():
            link.send({"clock": 0, "has": True, "min": 0, "ver": 0, "lrs": None, "want": True})
            return link.receive()

        with pytest.raises(ParameterServerError, match="worker 0 was replaced.*stop that process"):
            await asyncio.to_thread(push)
        np.testing.assert_array_equal(shard.params(), np.arange(N))
        link.close()

    run(scenario)


async def until(predicate, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# ---- point 7: files in /dev/shm -----------------------------------------------------------
def planted(name_suffix: str) -> str:
    return os.path.join(shm.SHM_DIR, f"{shm.PREFIX}{JOB}-{name_suffix}")


@needs_root
def test_cleanup_leaves_another_users_file_alone_and_never_raises():
    others = planted("w0-s0-0123456789abcdef")
    directory = planted("w1-s0-fedcba9876543210")  # unlink() of a directory raised IsADirectoryError
    ours = shm.Channel.create(JOB, 0, 0, N, np.float32)  # a worker killed before it unlinked
    assert ours is not None
    with open(others, "wb") as f:
        f.write(b"not yours")
    os.chown(others, OTHER_UID, OTHER_UID)
    os.mkdir(directory)
    try:
        assert shm.remove_leftovers(JOB) == 1
        assert not os.path.exists(ours.path)
        assert os.path.exists(others) and os.path.isdir(directory)
        with open(others, "rb") as f:
            assert f.read() == b"not yours"
    finally:
        ours.close()
        os.unlink(others)
        os.rmdir(directory)


@needs_root
def test_channel_names_are_unguessable_and_the_shard_maps_only_its_users_file():
    names = {shm.file_name(JOB, 0, 0) for _ in range(2)}
    assert len(names) == 2
    assert all(len(name.rsplit("-", 1)[1]) >= 16 for name in names)  # 64 random bits
    channel = shm.Channel.create(JOB, 0, 0, N, np.float32)
    assert channel is not None
    try:
        os.chown(channel.path, OTHER_UID, OTHER_UID)  # as if another user had made it
        assert shm.Channel.attach(channel.path, channel.token, JOB, N, np.float32) is None
    finally:
        channel.unlink()
        channel.close()
