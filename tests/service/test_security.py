"""Attacks on a live transport server over raw sockets: each is rejected, counted, costs only
its own connection, and the server keeps serving a good client afterwards.

The server runs in a background thread with its own event loop, as in a real node; the
attacker speaks bytes through plain sockets.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.transport import (
    AuthenticationError,
    BlockingClientConnection,
    InitiatorHandshake,
    Role,
    SecureChannel,
    Server,
    TransportStats,
)

TOKEN = b"security-test-token-0123456789abcdef"
WRONG = b"an-attacker-guess-0123456789abcdefgh"
MAX_FRAME = 64 << 10
pytestmark = [pytest.mark.timeout(60)]


class RunningServer:
    """A transport Server on 127.0.0.1 in a background event-loop thread."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.peer_messages: list[tuple[int, bytes]] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = Server(node_id=1, token=TOKEN, on_client_request=self._handle,
                             on_peer_message=lambda f, p: self.peer_messages.append((f, p)),
                             max_frame_bytes=MAX_FRAME, handshake_timeout_s=0.5)
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(5)
        self.address = self.server.address

    async def _handle(self, body: dict) -> dict:
        self.requests.append(body)
        return {"ok": True, "echo": body}

    @property
    def stats(self) -> TransportStats:
        return self.server.stats

    def assert_serving(self) -> None:
        """A good client still gets answers, and no attack reached a handler or a bug path."""
        with BlockingClientConnection(*self.address, TOKEN) as c:
            assert c.request({"op": "get", "key": b"k"}) == {
                "ok": True, "echo": {"op": "get", "key": b"k"}}
        assert self.stats.handler_errors == 0

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def srv() -> Iterator[RunningServer]:
    s = RunningServer()
    yield s
    s.close()


def wait_until(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.002)


def connect(srv: RunningServer) -> socket.socket:
    return socket.create_connection(srv.address, timeout=5)


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed its end (anything it sent first is skipped)."""
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    finally:
        sock.close()


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def recv_body(sock: socket.socket) -> bytes:
    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            assert chunk, "server closed the connection"
            buf += chunk
        return buf

    return exactly(struct.unpack(">I", exactly(4))[0])


def handshake(sock: socket.socket, token: bytes = TOKEN, role: Role = Role.CLIENT,
              node_id: int = 0, transcript: list[bytes] | None = None) -> SecureChannel:
    """Do the initiator's handshake by hand; ``transcript`` collects what was sent."""
    hs = InitiatorHandshake(token, role, node_id, max_frame_bytes=MAX_FRAME)
    sent = [hs.hello()]
    sock.sendall(sent[0])
    sent.append(hs.on_challenge(recv_body(sock)))
    sock.sendall(sent[1])
    chan = hs.on_verdict(recv_body(sock))
    if transcript is not None:
        transcript.extend(sent)
    return chan


def rpc(req_id: int, body: dict) -> bytes:
    return msgpack.packb([req_id, body], use_bin_type=True)


# ---- the attacks ----------------------------------------------------------------------


def test_wrong_token_is_refused_for_clients_and_peers(srv: RunningServer) -> None:
    with pytest.raises(AuthenticationError, match="wrong cluster token"):
        BlockingClientConnection(*srv.address, WRONG)
    sock = connect(srv)
    with pytest.raises(AuthenticationError):
        handshake(sock, token=WRONG, role=Role.PEER, node_id=2)
    sock.close()
    wait_until(lambda: srv.stats.auth_failures == 2)
    assert srv.requests == [] and srv.peer_messages == []
    srv.assert_serving()


def test_no_token_a_request_without_handshake_is_refused(srv: RunningServer) -> None:
    sock = connect(srv)
    sock.sendall(frame(rpc(1, {"op": "put", "key": b"k", "value": b"v"})))
    assert closed_by_server(sock)
    wait_until(lambda: srv.stats.auth_failures == 1)
    sock = connect(srv)  # a frame shaped like a sealed one, but no session: not a hello
    sock.sendall(frame(struct.pack(">Q", 1) + b"\x00" * 32 + rpc(1, {"op": "get"})))
    assert closed_by_server(sock)
    wait_until(lambda: srv.stats.malformed_frames == 1)
    assert srv.requests == []
    srv.assert_serving()


@pytest.mark.parametrize("garbage, counter", [
    (b"GET / HTTP/1.1\r\nHost: coordinator\r\n\r\n", "oversize_frames"),  # 'GET ' = 1.2 GB
    (b"\x00\x00\x00\x05hello", "malformed_frames"),
    (b"\x00\x00\x00\x03\xc1\xc1\xc1", "malformed_frames"),  # 0xc1: never valid msgpack
    (b"\x00\x00\x00\x01\x07", "auth_failures"),  # valid msgpack (7), but no handshake
])
def test_garbage_bytes_close_the_connection(srv: RunningServer, garbage: bytes,
                                            counter: str) -> None:
    sock = connect(srv)
    sock.sendall(garbage)
    assert closed_by_server(sock)
    wait_until(lambda: getattr(srv.stats, counter) == 1)
    srv.assert_serving()


def test_garbage_after_the_handshake_fails_the_mac(srv: RunningServer) -> None:
    sock = connect(srv)
    handshake(sock)
    sock.sendall(frame(os.urandom(200)))
    assert closed_by_server(sock)
    wait_until(lambda: srv.stats.auth_failures == 1)
    assert srv.requests == []
    srv.assert_serving()


def test_oversize_frame_is_rejected_before_its_body_is_read(srv: RunningServer) -> None:
    sock = connect(srv)
    sock.sendall(struct.pack(">I", 0xFFFFFFFF))  # 4 GiB announced, nothing else sent
    assert closed_by_server(sock)  # closed at once: the server did not wait for (or
    # allocate) the announced body
    sock = connect(srv)
    chan = handshake(sock)
    sock.sendall(chan.seal(rpc(1, {"op": "get"})))
    assert msgpack.unpackb(chan.open(recv_body(sock)))[0] == 1
    sock.sendall(struct.pack(">I", MAX_FRAME + 1))
    assert closed_by_server(sock)
    wait_until(lambda: srv.stats.oversize_frames == 2)
    srv.assert_serving()


def test_replayed_frame_is_rejected(srv: RunningServer) -> None:
    sock = connect(srv)
    chan = handshake(sock)
    put = chan.seal(rpc(1, {"op": "put", "key": b"k", "value": b"1"}))
    sock.sendall(put)
    recv_body(sock)
    sock.sendall(put)  # the same bytes again: a replayed write
    assert closed_by_server(sock)
    wait_until(lambda: srv.stats.replayed_frames == 1)
    assert len(srv.requests) == 1  # applied once, not twice
    srv.assert_serving()


def test_reordered_frames_are_rejected(srv: RunningServer) -> None:
    sock = connect(srv)
    chan = handshake(sock)
    first, second = chan.seal(rpc(1, {"n": 1})), chan.seal(rpc(2, {"n": 2}))
    sock.sendall(second + first)
    assert closed_by_server(sock)
    wait_until(lambda: srv.stats.replayed_frames == 1)
    assert srv.requests == []
    srv.assert_serving()


def test_frame_from_another_connection_is_rejected(srv: RunningServer) -> None:
    victim = connect(srv)
    stolen = handshake(victim).seal(rpc(1, {"op": "delete", "key": b"k"}))
    attacker = connect(srv)
    handshake(attacker)  # a connection of its own (say with a leaked old session)...
    attacker.sendall(stolen)  # ...cannot inject the victim's frame: other session key
    assert closed_by_server(attacker)
    wait_until(lambda: srv.stats.auth_failures == 1)
    victim.close()
    assert srv.requests == []
    srv.assert_serving()


def test_replayed_handshake_is_rejected(srv: RunningServer) -> None:
    recorded: list[bytes] = []
    sock = connect(srv)
    handshake(sock, transcript=recorded)
    sock.close()
    replay = connect(srv)  # the server picks a fresh nonce, so the old proof is worthless
    replay.sendall(recorded[0])
    recv_body(replay)
    replay.sendall(recorded[1])
    assert closed_by_server(replay)
    wait_until(lambda: srv.stats.auth_failures == 1)
    srv.assert_serving()


def test_truncated_frames_are_counted(srv: RunningServer) -> None:
    sock = connect(srv)
    handshake(sock)
    sock.sendall(struct.pack(">I", 100) + b"only ten b")
    sock.shutdown(socket.SHUT_WR)  # the connection ends inside the frame
    assert closed_by_server(sock)
    wait_until(lambda: srv.stats.truncated_frames == 1)
    stalled = connect(srv)  # half a hello, then silence: the handshake deadline ends it
    stalled.sendall(struct.pack(">I", 60) + b"\x84")
    assert closed_by_server(stalled)
    wait_until(lambda: srv.stats.handshake_timeouts == 1)
    srv.assert_serving()


def test_peer_role_needs_a_node_id(srv: RunningServer) -> None:
    sock = connect(srv)
    with pytest.raises(AssertionError, match="closed"):
        handshake(sock, role=Role.PEER, node_id=0)
    sock.close()
    wait_until(lambda: srv.stats.auth_failures == 1)
    srv.assert_serving()


def test_nothing_from_the_network_is_unpickled(srv: RunningServer, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    sock = connect(srv)
    chan = handshake(sock)
    sock.sendall(chan.seal(pickle.dumps(Exploit())))  # authentic frame, pickle payload
    assert closed_by_server(sock)
    wait_until(lambda: srv.stats.malformed_frames == 1)
    assert not marker.exists() and srv.requests == []
    srv.assert_serving()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(min_size=0, max_size=300), after_handshake=st.booleans())
def test_random_bytes_never_crash_the_server(srv: RunningServer, blob: bytes,
                                             after_handshake: bool) -> None:
    sock = connect(srv)
    if after_handshake:
        handshake(sock)
    sock.sendall(blob)
    sock.shutdown(socket.SHUT_WR)
    assert closed_by_server(sock)
    srv.assert_serving()


def test_server_config_repr_keeps_the_token_out_and_short_tokens_are_refused(tmp_path) -> None:
    from coordinator.server import ServerConfig

    config = ServerConfig(node_id=1, peers={1: ("127.0.0.1", 1)}, data_dir=tmp_path,
                          token=TOKEN)
    assert TOKEN.decode() not in repr(config) and str(TOKEN) not in repr(config)
    assert "node_id=1" in repr(config)
    with pytest.raises(ValueError, match="at least 32.*coordinator token"):
        ServerConfig(node_id=1, peers={1: ("127.0.0.1", 1)}, data_dir=tmp_path,
                     token=b"sixteen-byte-tok")
