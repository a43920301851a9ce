"""The transport on real loopback sockets: delivery, RPCs, reconnects, bounds, errors.

Each test runs its own event loop (``asyncio.run``) and waits on conditions, never on
fixed sleeps.
"""

from __future__ import annotations

import asyncio
import random
import socket
import threading
from collections.abc import Callable

import pytest

from coordinator.transport import (
    AuthenticationError,
    BlockingClientConnection,
    ClientConnection,
    ConnectError,
    ConnectionClosed,
    FrameTooLarge,
    PeerTransport,
    RequestTimeout,
    Server,
    check_token,
    generate_token,
    load_token,
)

TOKEN = b"test-cluster-token-0123456789abcdef"
pytestmark = pytest.mark.timeout(60)


async def until(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait for ``cond()`` (polling the loop); fail the test if it never holds."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.005)


async def echo(body: dict) -> dict:
    return {"ok": True, "echo": body}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_peer_messages_arrive_in_order_tagged_with_the_authenticated_sender() -> None:
    async def main() -> None:
        got: list[tuple[int, bytes]] = []
        server = Server(node_id=1, token=TOKEN, on_peer_message=lambda f, p: got.append((f, p)),
                        on_client_request=echo)
        await server.start()
        assert server.address[0] == "127.0.0.1"  # loopback unless told otherwise
        links = [PeerTransport(node_id=n, token=TOKEN, peers={1: server.address}) for n in (2, 3)]
        for pt in links:
            await pt.start()
        for i in range(300):
            links[i % 2].send(1, b"%d" % i)
        await until(lambda: len(got) == 300)
        for sender in (2, 3):
            mine = [int(p) for f, p in got if f == sender]
            assert mine == sorted(mine) and len(mine) == 150
        assert links[0].connected(1) and server.stats.auth_failures == 0
        for pt in links:
            await pt.close()
        await server.close()

    asyncio.run(main())


def test_client_requests_run_concurrently_and_are_matched_by_id() -> None:
    async def slow_echo(body: dict) -> dict:
        await asyncio.sleep(random.Random(body["i"]).uniform(0, 0.02))  # answers reorder
        return {"i": body["i"], "data": body["data"]}

    async def main() -> None:
        server = Server(node_id=7, token=TOKEN, on_peer_message=lambda f, p: None,
                        on_client_request=slow_echo)
        await server.start()
        conn = await ClientConnection.connect(*server.address, TOKEN)
        assert conn.server_id == 7
        answers = await asyncio.gather(*[conn.request({"i": i, "data": b"\x00" * i})
                                         for i in range(200)])
        assert answers == [{"i": i, "data": b"\x00" * i} for i in range(200)]
        await conn.close()
        with pytest.raises(ConnectionClosed) as err:
            await conn.request({"i": 0})
        assert err.value.request_sent is False
        await server.close()

    asyncio.run(main())


def test_blocking_client_speaks_the_same_wire() -> None:
    async def main() -> None:
        server = Server(node_id=4, token=TOKEN, on_peer_message=lambda f, p: None,
                        on_client_request=echo)
        await server.start()

        def client() -> list[dict]:
            with BlockingClientConnection(*server.address, TOKEN.decode()) as c:
                assert c.server_id == 4
                return [c.request({"op": "put", "key": b"k%d" % i}) for i in range(50)]

        answers = await asyncio.to_thread(client)
        assert answers[7] == {"ok": True, "echo": {"op": "put", "key": b"k7"}}
        await server.close()

    asyncio.run(main())


def test_handler_failure_is_answered_and_the_connection_survives() -> None:
    async def picky(body: dict) -> dict:
        if body.get("boom"):
            raise RuntimeError("handler bug")
        return {"ok": True}

    async def main() -> None:
        server = Server(node_id=1, token=TOKEN, on_peer_message=lambda f, p: None,
                        on_client_request=picky)
        await server.start()
        conn = await ClientConnection.connect(*server.address, TOKEN)
        bad = await conn.request({"boom": True})
        assert bad["ok"] is False and bad["error"] == "internal" and "handler bug" in bad["message"]
        assert await conn.request({}) == {"ok": True}
        assert server.stats.handler_errors == 1
        await conn.close()
        await server.close()

    asyncio.run(main())


def test_timeouts_and_lost_connections_say_the_outcome_is_unknown() -> None:
    release = asyncio.Event()

    async def stuck(body: dict) -> dict:
        await release.wait()
        return {"ok": True}

    async def main() -> None:
        server = Server(node_id=1, token=TOKEN, on_peer_message=lambda f, p: None,
                        on_client_request=stuck)
        await server.start()
        conn = await ClientConnection.connect(*server.address, TOKEN)
        with pytest.raises(RequestTimeout):
            await conn.request({"op": "put"}, timeout_s=0.05)
        pending = asyncio.ensure_future(conn.request({"op": "put"}, timeout_s=10))
        await until(lambda: server.stats.frames_in >= 4)  # hello, proof, 2 requests
        await server.close()
        with pytest.raises(ConnectionClosed) as err:
            await pending
        assert err.value.request_sent is True
        with pytest.raises(ConnectError):
            await ClientConnection.connect(*server.address, TOKEN, timeout_s=1)
        with pytest.raises(ConnectError):
            BlockingClientConnection(*server.address, TOKEN, timeout_s=1)

    asyncio.run(main())


def test_blocking_timeout_closes_the_connection() -> None:
    async def main() -> None:
        never = asyncio.Event()

        async def stuck(body: dict) -> dict:
            await never.wait()
            return {}

        server = Server(node_id=1, token=TOKEN, on_peer_message=lambda f, p: None,
                        on_client_request=stuck)
        await server.start()

        def client() -> None:
            c = BlockingClientConnection(*server.address, TOKEN)
            with pytest.raises(RequestTimeout):
                c.request({"op": "get"}, timeout_s=0.05)
            assert c.closed
            with pytest.raises(ConnectionClosed) as err:
                c.request({"op": "get"})
            assert err.value.request_sent is False

        await asyncio.to_thread(client)
        await server.close()

    asyncio.run(main())


def test_peer_link_reconnects_with_backoff_after_the_server_restarts() -> None:
    async def main() -> None:
        port = free_port()
        got: list[bytes] = []
        unreachable: list[int] = []
        pt = PeerTransport(node_id=2, token=TOKEN, peers={1: ("127.0.0.1", port)},
                           backoff_initial_s=0.01, backoff_max_s=0.05,
                           on_unreachable=unreachable.append)
        await pt.start()
        pt.send(1, b"early")  # queued while node 1 is down
        await until(lambda: pt.stats.connect_failures >= 3 and unreachable)

        def make() -> Server:
            return Server(node_id=1, token=TOKEN, on_peer_message=lambda f, p: got.append(p),
                          on_client_request=echo, port=port)

        server = make()
        await server.start()
        await until(lambda: got == [b"early"])
        await server.close()
        await until(lambda: not pt.connected(1))
        server = make()
        await server.start()
        await until(lambda: pt.connected(1))
        pt.send(1, b"after restart")
        await until(lambda: got[-1:] == [b"after restart"])
        assert pt.stats.reconnects >= 1
        await pt.close()
        await server.close()

    asyncio.run(main())


def test_send_queue_is_bounded_and_drops_the_oldest() -> None:
    async def main() -> None:
        port = free_port()
        got: list[bytes] = []
        pt = PeerTransport(node_id=2, token=TOKEN, peers={1: ("127.0.0.1", port)},
                           max_queue_frames=4, backoff_initial_s=0.01, backoff_max_s=0.02)
        await pt.start()
        for i in range(10):
            pt.send(1, b"%d" % i)
        assert pt.stats.peer_frames_dropped == 6
        server = Server(node_id=1, token=TOKEN, on_peer_message=lambda f, p: got.append(p),
                        on_client_request=echo, port=port)
        await server.start()
        await until(lambda: len(got) == 4)
        assert got == [b"6", b"7", b"8", b"9"]
        with pytest.raises(KeyError):
            pt.send(9, b"nobody")
        with pytest.raises(FrameTooLarge):
            pt.send(1, b"x" * (16 << 20))
        await pt.close()
        await server.close()

    asyncio.run(main())


def test_blocked_peers_are_dropped_both_ways() -> None:
    async def main() -> None:
        got: list[tuple[int, bytes]] = []
        server = Server(node_id=1, token=TOKEN, on_peer_message=lambda f, p: got.append((f, p)),
                        on_client_request=echo)
        await server.start()
        pt2 = PeerTransport(node_id=2, token=TOKEN, peers={1: server.address})
        pt3 = PeerTransport(node_id=3, token=TOKEN, peers={1: server.address})
        await pt2.start()
        await pt3.start()
        server.set_blocked_peers({2})  # node 1 no longer hears node 2
        pt3.set_blocked_peers({1})  # node 3 no longer talks to node 1
        pt2.send(1, b"lost")
        pt3.send(1, b"lost too")
        assert pt3.stats.peer_frames_blocked == 1
        await until(lambda: server.stats.peer_frames_blocked == 1)
        server.set_blocked_peers(())
        pt3.set_blocked_peers(())
        pt2.send(1, b"healed")
        pt3.send(1, b"healed")
        await until(lambda: len(got) == 2)
        assert sorted(got) == [(2, b"healed"), (3, b"healed")]
        for t in (pt2, pt3, server):
            await t.close()

    asyncio.run(main())


def test_peer_link_refuses_a_server_with_another_node_id() -> None:
    async def main() -> None:
        got: list[bytes] = []
        server = Server(node_id=5, token=TOKEN, on_peer_message=lambda f, p: got.append(p),
                        on_client_request=echo)
        await server.start()
        pt = PeerTransport(node_id=2, token=TOKEN, peers={1: server.address},
                           backoff_initial_s=0.01, backoff_max_s=0.02)
        await pt.start()
        pt.send(1, b"for node 1 only")
        await until(lambda: pt.stats.connect_failures >= 2)
        assert got == [] and not pt.connected(1)
        await pt.close()
        await server.close()

    asyncio.run(main())


def test_membership_change_adds_and_removes_links() -> None:
    async def main() -> None:
        got: list[tuple[int, bytes]] = []
        a = Server(node_id=1, token=TOKEN, on_peer_message=lambda f, p: got.append((1, p)),
                   on_client_request=echo)
        b = Server(node_id=3, token=TOKEN, on_peer_message=lambda f, p: got.append((3, p)),
                   on_client_request=echo)
        await a.start()
        await b.start()
        pt = PeerTransport(node_id=2, token=TOKEN, peers={1: a.address})
        await pt.start()
        pt.set_peers({1: a.address, 2: ("127.0.0.1", 1), 3: b.address})  # own id is skipped
        pt.send(3, b"hi 3")
        await until(lambda: got == [(3, b"hi 3")])
        pt.set_peers({3: b.address})
        with pytest.raises(KeyError):
            pt.send(1, b"gone")
        for t in (pt, a, b):
            await t.close()

    asyncio.run(main())


def test_connection_limit_rejects_extra_connections() -> None:
    async def main() -> None:
        server = Server(node_id=1, token=TOKEN, on_peer_message=lambda f, p: None,
                        on_client_request=echo, max_connections=2)
        await server.start()
        c1 = await ClientConnection.connect(*server.address, TOKEN)
        c2 = await ClientConnection.connect(*server.address, TOKEN)
        with pytest.raises(ConnectError, match="limit of 2 connections") as busy:
            await ClientConnection.connect(*server.address, TOKEN, timeout_s=2)
        assert not isinstance(busy.value, AuthenticationError)  # busy, not a wrong token
        assert server.stats.connections_rejected == 1
        await c1.close()
        await until(lambda: server.stats.connections_accepted == 3 and len(server._conn_tasks) == 1)
        c3 = await ClientConnection.connect(*server.address, TOKEN)
        assert (await c3.request({"x": 1}))["ok"]
        for c in (c2, c3):
            await c.close()
        await server.close()

    asyncio.run(main())


def test_wrong_token_on_the_client_side_is_an_authentication_error() -> None:
    async def main() -> None:
        server = Server(node_id=1, token=TOKEN, on_peer_message=lambda f, p: None,
                        on_client_request=echo)
        await server.start()
        with pytest.raises(AuthenticationError, match="token"):
            await ClientConnection.connect(*server.address,
                                           b"another-cluster-token-0123456789abcdef")
        await server.close()

    asyncio.run(main())


def test_tokens(tmp_path) -> None:
    tok = generate_token()
    assert len(tok) == 64 and tok != generate_token()
    (tmp_path / "token").write_text(tok + "\n")
    assert load_token(tmp_path / "token") == tok.encode()
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(ValueError, match="at least"):
        load_token(tmp_path / "short")
    with pytest.raises(ValueError, match="at least"):
        Server(node_id=1, token=b"short", on_peer_message=lambda f, p: None,
               on_client_request=echo)


def test_a_token_needs_32_characters_and_the_error_says_how_to_make_one(tmp_path) -> None:
    """A fake endpoint can test guesses offline against a client's proof: 16-byte user
    tokens (the old minimum) are refused, with the way to generate a good one."""
    (tmp_path / "token").write_text("x" * 31 + "\n")
    for attempt in (lambda: load_token(tmp_path / "token"),
                    lambda: check_token("correct-horse-battery-staple"),
                    lambda: BlockingClientConnection("127.0.0.1", 1, b"y" * 16),
                    lambda: PeerTransport(node_id=2, token="z" * 24, peers={})):
        with pytest.raises(ValueError, match=r"at least 32.*coordinator token.*token_hex\(32\)"):
            attempt()
    assert check_token("x" * 32) == b"x" * 32


def test_request_over_the_frame_limit_is_refused_locally() -> None:
    async def main() -> None:
        server = Server(node_id=1, token=TOKEN, on_peer_message=lambda f, p: None,
                        on_client_request=echo)
        await server.start()
        conn = await ClientConnection.connect(*server.address, TOKEN, max_frame_bytes=1024)
        with pytest.raises(FrameTooLarge):
            await conn.request({"v": b"x" * 2000})
        assert (await conn.request({"v": b"small"}))["ok"]
        await conn.close()
        await server.close()

    asyncio.run(main())


def test_server_runs_in_a_thread_beside_blocking_clients() -> None:
    """The shape a test or tool uses: the server's loop in a thread, clients in others."""
    loop = asyncio.new_event_loop()
    server = Server(node_id=1, token=TOKEN, on_peer_message=lambda f, p: None,
                    on_client_request=echo)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(5)

    def client(k: int) -> int:
        with BlockingClientConnection(*server.address, TOKEN) as c:
            return sum(c.request({"k": k})["echo"]["k"] for _ in range(20))

    threads_out: list[int] = []
    workers = [threading.Thread(target=lambda k=k: threads_out.append(client(k)))
               for k in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    assert sorted(threads_out) == [0, 20, 40, 60]
    asyncio.run_coroutine_threadsafe(server.close(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def test_handlers_may_answer_at_once_or_with_a_future() -> None:
    """A dict is answered right away and a Future when it resolves (in any order); a sync
    handler that raises, or resolves its Future with an error, gets an internal-error answer
    and the connection keeps serving."""
    waiting: dict[int, asyncio.Future] = {}

    def handler(body: dict):
        if body.get("boom"):
            raise RuntimeError("sync handler bug")
        if body.get("now"):
            return {"now": body["i"]}
        fut = asyncio.get_running_loop().create_future()
        waiting[body["i"]] = fut
        return fut

    async def main() -> None:
        server = Server(node_id=1, token=TOKEN, on_peer_message=lambda f, p: None,
                        on_client_request=handler)
        await server.start()
        conn = await ClientConnection.connect(*server.address, TOKEN)
        later = [asyncio.ensure_future(conn.request({"i": i})) for i in range(5)]
        assert await conn.request({"now": True, "i": 9}) == {"now": 9}
        await until(lambda: len(waiting) == 5)
        for i in reversed(range(5)):  # resolved in reverse: answers still match their ids
            if i == 2:
                waiting[i].set_exception(ValueError("future failed"))
            else:
                waiting[i].set_result({"later": i})
        answers = await asyncio.gather(*later)
        assert [a.get("later") for a in answers] == [0, 1, None, 3, 4]
        assert answers[2]["error"] == "internal" and "future failed" in answers[2]["message"]
        bad = await conn.request({"boom": True})
        assert bad["error"] == "internal" and "sync handler bug" in bad["message"]
        assert await conn.request({"now": True, "i": 1}) == {"now": 1}
        assert server.stats.handler_errors == 2
        await conn.close()
        await server.close()

    asyncio.run(main())


def test_peer_frames_keep_their_order_across_queued_and_direct_writes() -> None:
    """Frames sent before the link is up are queued; once it is up, a send with nothing
    queued writes at once, and large bursts that fill the socket buffer queue again: every
    frame must arrive once, in order."""
    async def main() -> None:
        got: list[bytes] = []
        port = free_port()
        pt = PeerTransport(node_id=2, token=TOKEN, peers={1: ("127.0.0.1", port)})
        await pt.start()
        big = b"x" * 200_000  # bigger than the direct-write limit: the next sends queue
        sent = [b"%d" % i for i in range(20)]  # before the server exists: queued
        for p in sent:
            pt.send(1, p)
        server = Server(node_id=1, token=TOKEN, on_peer_message=lambda f, p: got.append(p),
                        on_client_request=echo, port=port)
        await server.start()
        await until(lambda: len(got) == len(sent))
        for i in range(20, 400):
            p = (b"%d:" % i) + (big if i % 50 == 0 else b"")
            sent.append(p)
            pt.send(1, p)
            if i % 7 == 0:
                await asyncio.sleep(0)  # let some writes complete between sends
        await until(lambda: len(got) == len(sent))
        assert got == sent
        await pt.close()
        await server.close()

    asyncio.run(main())


def test_a_peer_that_connects_to_us_is_redialled_at_once() -> None:
    """Node 1's link to node 2 waits out a long backoff while 2 is down; when 2 comes back and
    connects to 1, 1 dials 2 at once (on_peer_connected -> redial), not after the backoff."""
    async def main() -> None:
        port2 = free_port()
        got2: list[bytes] = []
        p1 = PeerTransport(node_id=1, token=TOKEN, peers={2: ("127.0.0.1", port2)},
                           backoff_initial_s=60.0, backoff_max_s=60.0)
        s1 = Server(node_id=1, token=TOKEN, on_peer_message=lambda f, p: None,
                    on_client_request=echo, on_peer_connected=p1.redial)
        await s1.start()
        await p1.start()
        p1.send(2, b"hello 2")
        await until(lambda: p1.stats.connect_failures >= 1)  # 2 is down: 1 backs off (30-60 s)
        s2 = Server(node_id=2, token=TOKEN, on_peer_message=lambda f, p: got2.append(p),
                    on_client_request=echo, port=port2)
        await s2.start()
        p2 = PeerTransport(node_id=2, token=TOKEN, peers={1: s1.address})
        await p2.start()
        p2.send(1, b"I am back")  # 2 dials 1
        await until(lambda: got2 == [b"hello 2"], timeout_s=10.0)
        for t in (p1, p2):
            await t.close()
        for s in (s1, s2):
            await s.close()

    asyncio.run(main())


def test_a_peer_is_reported_disconnected_when_its_last_link_ends_and_never_on_our_own_close() -> None:
    """``on_peer_disconnected`` hears of a peer whose connection the other side closed, but
    only when no other link from that peer is open (an old connection ending after a redial
    is no sign of death), and never when this server closes its own connections."""
    async def main() -> None:
        got: list[bytes] = []
        gone: list[int] = []
        server = Server(node_id=1, token=TOKEN, on_peer_message=lambda f, p: got.append(p),
                        on_client_request=echo, on_peer_disconnected=gone.append)
        await server.start()
        old, new = (PeerTransport(node_id=2, token=TOKEN, peers={1: server.address}) for _ in range(2))
        for i, pt in enumerate((old, new)):
            await pt.start()
            pt.send(1, b"%d" % i)
        await until(lambda: len(got) == 2)
        await old.close()  # node 2's other link is still up
        await asyncio.sleep(0.2)  # a report would come at once: give it the chance
        assert gone == []
        await new.close()
        await until(lambda: gone == [2])
        third = PeerTransport(node_id=3, token=TOKEN, peers={1: server.address})
        await third.start()
        third.send(1, b"x")
        await until(lambda: len(got) == 3)
        await server.close()  # our own close: node 3 is not reported
        await third.close()
        assert gone == [2]

    asyncio.run(main())
