"""A flood of idle, unauthenticated connections from the same host as the real clients
(issue 15, point 3): real clients and a restarted peer must still get in.

The attacker is a separate process that keeps ``FLOOD`` idle connections open to a transport
Server (re-opening each one the server closes, up to a bounded number of opens); the
server runs with its default limits in a background event-loop thread, as in a real node.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest

from coordinator.transport import (
    BlockingClientConnection,
    HandshakePool,
    PeerTransport,
    Server,
    TransportError,
)

TOKEN = b"preauth-flood-test-token-0123456789abcdef"
FLOOD = 1000
REAL_CLIENTS = 41
pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

_ATTACKER = textwrap.dedent("""
    import selectors, socket, sys, time
    host, port, count, max_opens, max_s = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
                                           int(sys.argv[4]), float(sys.argv[5]))
    sel = selectors.DefaultSelector()
    opened, held, told, end = 0, 0, False, time.monotonic() + max_s
    while opened < max_opens and time.monotonic() < end:
        while held < count and opened < max_opens:
            opened += 1
            try:
                s = socket.create_connection((host, port), timeout=2)
            except OSError:
                break
            sel.register(s, selectors.EVENT_READ)
            held += 1
        if held >= count and not told:
            print("ready", flush=True)
            told = True
        for key, _ in sel.select(timeout=0.05):  # the server closed one: open another
            sel.unregister(key.fileobj)
            key.fileobj.close()
            held -= 1
    print("opened", opened, flush=True)
""")


class FloodedServer:
    """A transport Server with default limits on loopback, in its own event-loop thread."""

    def __init__(self) -> None:
        self.peer_messages: list[tuple[int, bytes]] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = Server(node_id=1, token=TOKEN, on_client_request=self._echo,
                             on_peer_message=lambda f, p: self.peer_messages.append((f, p)))
        self.run(self.server.start())
        self.address = self.server.address

    @staticmethod
    def _echo(body: dict) -> dict:
        return {"ok": True, "echo": body}

    def run(self, coro, timeout_s: float = 10.0):  # noqa: ANN001, ANN201
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.run(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def flooded() -> Iterator[tuple[FloodedServer, subprocess.Popen]]:
    srv = FloodedServer()
    attacker = subprocess.Popen(
        [sys.executable, "-c", _ATTACKER, srv.address[0], str(srv.address[1]), str(FLOOD),
         "200000", "90"], stdout=subprocess.PIPE, text=True)
    try:
        assert attacker.stdout is not None
        assert attacker.stdout.readline().strip() == "ready", "the attacker never got going"
        yield srv, attacker
    finally:
        attacker.kill()
        attacker.wait()
        srv.close()


def _connect_and_ask(address: tuple[str, int], i: int) -> BlockingClientConnection | None:
    try:
        conn = BlockingClientConnection(*address, TOKEN, timeout_s=2.0)
        assert conn.request({"i": i}, timeout_s=2.0) == {"ok": True, "echo": {"i": i}}
        return conn
    except TransportError:
        return None


def test_real_clients_and_a_restarted_peer_get_in_during_an_idle_flood(flooded) -> None:
    srv, attacker = flooded
    assert attacker.poll() is None
    conns = [_connect_and_ask(srv.address, i) for i in range(REAL_CLIENTS)]
    ok = [c for c in conns if c is not None]
    try:
        evicted = srv.server.stats.handshakes_evicted
        print(f"{len(ok)} of {REAL_CLIENTS} real client connects succeeded under a flood of "
              f"{FLOOD} idle connections ({evicted} idle connections evicted)")
        assert len(ok) >= 0.9 * REAL_CLIENTS
        # A peer that restarts (a new PeerTransport, as after a crash) re-dials and delivers.
        for incarnation in range(2):
            payload = b"hello from incarnation %d" % incarnation
            pt = PeerTransport(node_id=2, token=TOKEN, peers={1: srv.address})
            srv.run(pt.start())
            srv.loop.call_soon_threadsafe(pt.send, 1, payload)
            deadline = time.monotonic() + 10
            while (2, payload) not in srv.peer_messages:
                assert time.monotonic() < deadline, (
                    f"restarted peer (incarnation {incarnation}) could not reconnect")
                time.sleep(0.01)
            srv.run(pt.close())
        assert attacker.poll() is None, "the flood must last the whole test"
    finally:
        for c in ok:
            c.close()


def test_handshake_pool_evicts_silent_connections_first() -> None:
    pool: HandshakePool[str] = HandshakePool(max_total=3, max_per_address=2)
    assert pool.admit("a", "127.0.0.1") == []
    pool.heard_hello("a")  # "a" is a real client mid-handshake
    assert pool.admit("b", "127.0.0.1") == [] and pool.admit("c", "127.0.0.1") == []
    assert pool.admit("d", "127.0.0.1") == ["b"]  # the oldest *silent* one, not "a"
    pool.heard_hello("c")
    pool.heard_hello("d")
    assert pool.admit("e", "127.0.0.1") == ["a"]  # all said hello: the oldest of all
    pool.discard("e")
    assert len(pool) == 2


def test_handshake_pool_caps_each_remote_address_but_not_loopback() -> None:
    pool: HandshakePool[int] = HandshakePool(max_total=100, max_per_address=2)
    for k in range(5):  # loopback: only the total bounds it
        assert pool.admit(k, "127.0.0.1") == []
    for k in (10, 11):
        assert pool.admit(k, "::1") == []
    assert pool.admit(20, "192.0.2.7") == [] and pool.admit(21, "192.0.2.7") == []
    assert pool.admit(22, "192.0.2.7") == [20]  # a third from one remote address
    pool.heard_hello(21)
    assert pool.admit(23, "192.0.2.7") == [22]  # its oldest silent one goes first
    assert pool.admit(30, "::ffff:127.0.0.1") == []  # IPv4-mapped loopback is loopback
    assert pool.admit(40, "198.51.100.1") == []  # another address: its own cap
    assert len(pool) == 11  # 7 on loopback, 2 from 192.0.2.7, 1 mapped, 1 from 198.51.100.1
