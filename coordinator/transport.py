"""Authenticated, size-bounded framing over asyncio TCP (and plain sockets for sync clients).

Theory of operation
-------------------
Everything on the wire is a *frame*: ``length u32 BE | body``. The length is checked against
a limit before a single body byte is read or allocated, so a hostile length prefix costs
nothing. Payloads are msgpack; nothing from the network is ever unpickled.

A connection starts with a handshake that proves both sides know the cluster token without
sending it (both send a fresh 32-byte nonce; each answers with an HMAC-SHA256 over both
nonces, the announced role and ids, and a label saying which side it is). From the same
transcript both derive a per-connection session key. After that every frame body is
``seq u64 | mac | payload`` with ``mac = HMAC(session_key, direction | seq | payload)``
and ``seq`` counting 1, 2, 3 … per direction. A frame from another connection fails the
MAC; a replayed or reordered one has the wrong ``seq``. MACs are compared in constant time.

The pure pieces -- :class:`InitiatorHandshake`, :class:`AcceptorHandshake` and
:class:`SecureChannel` -- do no I/O; :class:`Server`, :class:`PeerTransport`,
:class:`ClientConnection` (asyncio) and :class:`BlockingClientConnection` (sockets) drive
them. Any bad input closes only the connection it came on and bumps a
:class:`TransportStats` counter; a server task never lets an exception escape.

Connection limits keep strangers from locking out members. A connection that has not
finished its handshake (2 s at most) waits in a :class:`HandshakePool` of its own, apart
from the authenticated connections' slots; when the pool is full a newcomer evicts the
oldest stranger that has not even sent its hello (a real client sends it at once), and each
non-loopback address has a smaller cap of its own. An idle flood, even from the host the
real clients run on, therefore only evicts itself (``tests/service/test_preauth_flood.py``).

Connections carry a role. ``peer``: Raft traffic, one direction only -- every node dials
each peer for its own outgoing messages, so the dialler's node id (authenticated by the
handshake) tags each inbound message. ``client``: request/response, ``[id, dict]`` frames,
answered in any order.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import functools
import hmac
import ipaddress
import logging
import os
import random
import secrets
import socket
import struct
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Generic, TypeVar

import msgpack

__all__ = [
    "Role", "TransportStats", "TransportError", "ConnectError", "AuthenticationError",
    "ConnectionClosed", "RequestTimeout", "FrameTooLarge", "RemoteProtocolError",
    "SecureChannel", "InitiatorHandshake", "AcceptorHandshake", "HandshakePool", "Server",
    "PeerTransport", "ClientConnection", "BlockingClientConnection", "load_token",
    "generate_token", "check_token", "DEFAULT_MAX_FRAME_BYTES", "MAX_HANDSHAKE_FRAME_BYTES", "MIN_TOKEN_BYTES",
]

log = logging.getLogger(__name__)

PROTOCOL = b"synctrain-transport-v1"
DEFAULT_MAX_FRAME_BYTES = 16 << 20
MAX_HANDSHAKE_FRAME_BYTES = 4096
# A fake endpoint sees the client's proof (an HMAC keyed by the token) and could test
# guesses against it offline: a token must be long enough that guessing is hopeless.
MIN_TOKEN_BYTES = 32
DEFAULT_HANDSHAKE_TIMEOUT_S = 2.0
DEFAULT_MAX_HANDSHAKES = 256  # unauthenticated connections at once (a pool of their own)
DEFAULT_MAX_HANDSHAKES_PER_ADDRESS = 16  # from one non-loopback address
NONCE_BYTES = 32
MAC_BYTES = 32
_LEN = struct.Struct(">I")
_SEQ = struct.Struct(">Q")
_SEALED_OVERHEAD = _SEQ.size + MAC_BYTES
_DIRECT_WRITE_MAX_BUFFERED = 1 << 16  # above it, send queues and the pump waits on drain()


class Role(str, enum.Enum):
    PEER = "peer"
    CLIENT = "client"


class _Direction(enum.IntEnum):
    INITIATOR_TO_ACCEPTOR = 1
    ACCEPTOR_TO_INITIATOR = 2


# ---------------------------------------------------------------------------------------
# errors (h11-style: who is at fault decides the class)


class TransportError(Exception):
    """Base of every transport error."""


class ConnectError(TransportError):
    """Connecting or the handshake failed: a request was certainly NOT sent."""


class AuthenticationError(ConnectError):
    """The other side failed (or refused) the handshake: wrong token or unexpected node id."""


class ConnectionClosed(TransportError):
    """The connection is gone. ``request_sent`` True means the outcome is unknown."""

    def __init__(self, message: str, request_sent: bool) -> None:
        super().__init__(message)
        self.request_sent = request_sent


class RequestTimeout(TransportError, TimeoutError):
    """A request was sent but no answer came in time: the outcome is unknown."""


class FrameTooLarge(TransportError):
    """A local payload exceeds ``max_frame_bytes``; nothing was sent. Raise the limit on
    every node, or send less at once."""


class RemoteProtocolError(TransportError):
    """The other side broke the protocol; ``kind`` names the TransportStats counter."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(slots=True)
class TransportStats:
    """Counters for one node's transport (a Server and a PeerTransport may share one)."""

    connections_accepted: int = 0
    connections_rejected: int = 0  # authenticated, but all max_connections slots were taken
    handshake_timeouts: int = 0
    handshakes_evicted: int = 0  # unauthenticated, pushed out of a full handshake pool
    auth_failures: int = 0  # bad proof or MAC, or an unauthenticated first frame
    oversize_frames: int = 0
    malformed_frames: int = 0
    replayed_frames: int = 0  # seq not the next one: replayed or reordered
    truncated_frames: int = 0  # the connection ended inside a frame
    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    peer_frames_dropped: int = 0  # a peer's send queue was full: the oldest was dropped
    peer_frames_blocked: int = 0  # dropped by set_blocked_peers (a simulated partition)
    reconnects: int = 0
    connect_failures: int = 0
    handler_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def count(self, kind: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)


# ---------------------------------------------------------------------------------------
# tokens


HOW_TO_GENERATE_TOKEN = ("generate one with `coordinator token --out FILE` (or `python -c "
                         "'import secrets; print(secrets.token_hex(32))'`)")


def check_token(token: bytes | str, where: str = "the cluster token") -> bytes:
    """``token`` as bytes; ValueError, saying how to make a good one, if it is too short."""
    raw = token.encode() if isinstance(token, str) else bytes(token)
    if len(raw) < MIN_TOKEN_BYTES:
        raise ValueError(f"{where} is {len(raw)} characters long; a cluster token needs at "
                         f"least {MIN_TOKEN_BYTES}: {HOW_TO_GENERATE_TOKEN}")
    return raw


def load_token(path: str | os.PathLike[str]) -> bytes:
    """Read a token file (surrounding whitespace stripped); ValueError if it is too short."""
    with open(path, "rb") as f:
        token = f.read(4096).strip()
    return check_token(token, f"the token in {os.fspath(path)!r}")


def generate_token() -> str:
    """A fresh random token: 64 hex characters (256 bits)."""
    return secrets.token_hex(32)


# ---------------------------------------------------------------------------------------
# the pure protocol: handshake and sealed frames


def _frame(body: bytes) -> bytes:
    return _LEN.pack(len(body)) + body


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.digest(key, b"".join(parts), "sha256")


class SecureChannel:
    """Seals outgoing and opens incoming frame bodies of one authenticated connection."""

    def __init__(self, key: bytes, initiator: bool, max_frame_bytes: int) -> None:
        self._key = key
        out = _Direction.INITIATOR_TO_ACCEPTOR if initiator else _Direction.ACCEPTOR_TO_INITIATOR
        self._out_dir = bytes((out,))
        self._in_dir = bytes((3 - out,))
        self._out_seq = 0
        self._in_seq = 0
        self.max_frame_bytes = max_frame_bytes

    def seal(self, payload: bytes) -> bytes:
        """The whole frame (length prefix included) carrying ``payload``."""
        if len(payload) + _SEALED_OVERHEAD > self.max_frame_bytes:
            raise FrameTooLarge(f"a {len(payload)}-byte payload exceeds the "
                                f"{self.max_frame_bytes}-byte frame limit")
        self._out_seq += 1
        seq = _SEQ.pack(self._out_seq)
        body = seq + _mac(self._key, self._out_dir, seq, payload) + payload
        return _LEN.pack(len(body)) + body

    def open(self, body: bytes) -> bytes:
        """The payload of an incoming body; RemoteProtocolError if it is not the next
        authentic frame of this connection."""
        if len(body) < _SEALED_OVERHEAD:
            raise RemoteProtocolError("malformed_frames", f"a {len(body)}-byte frame is too "
                                      "short to carry a sequence number and a MAC")
        seq, mac, payload = body[:8], body[8:_SEALED_OVERHEAD], body[_SEALED_OVERHEAD:]
        if not hmac.compare_digest(mac, _mac(self._key, self._in_dir, seq, payload)):
            raise RemoteProtocolError("auth_failures", "frame MAC does not verify")
        n = _SEQ.unpack(seq)[0]
        if n != self._in_seq + 1:
            raise RemoteProtocolError("replayed_frames", f"frame sequence {n} where "
                                      f"{self._in_seq + 1} was due (replayed or reordered)")
        self._in_seq = n
        return payload


def _transcript(role: str, initiator_id: int, acceptor_id: int, i_nonce: bytes,
                a_nonce: bytes) -> bytes:
    return b"|".join([PROTOCOL, role.encode(), b"%d" % initiator_id, b"%d" % acceptor_id,
                      i_nonce, a_nonce])


def _decode_handshake(body: bytes, want: dict[str, type], *, first: bool = False,
                      refusal_ok: bool = False) -> dict:
    """A handshake map with fields of the wanted types, or RemoteProtocolError.

    A first frame that is msgpack but not a hello is an unauthenticated request
    (``auth_failures``); bytes that are not msgpack at all are ``malformed_frames``."""
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:
        raise RemoteProtocolError("malformed_frames", f"handshake frame is not msgpack "
                                  f"({exc.__class__.__name__})") from None
    if refusal_ok and isinstance(msg, dict) and isinstance(msg.get("error"), str):
        if msg.get("retry") is True:  # busy, not a wrong token: another try may succeed
            raise ConnectError(f"the other side turned the connection away: {msg['error']:.200}")
        raise AuthenticationError(f"the other side refused the handshake: {msg['error']:.200}")
    ok = isinstance(msg, dict) and all(type(msg.get(k)) is t for k, t in want.items())
    if not ok:
        kind = "auth_failures" if first else "malformed_frames"
        raise RemoteProtocolError(kind, f"expected a handshake message with {sorted(want)}, "
                                  f"got {str(msg)[:80]!r}")
    return msg


class InitiatorHandshake:
    """The dialling side: ``hello()``, then ``on_challenge(body)`` -> proof frame, then
    ``on_verdict(body)`` -> SecureChannel. ``expected_id`` (if given) must be the
    acceptor's announced node id."""

    def __init__(self, token: bytes, role: Role, node_id: int, *,
                 expected_id: int | None = None,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self._token, self._role, self._id = token, role, node_id
        self._expected_id = expected_id
        self._nonce = secrets.token_bytes(NONCE_BYTES)
        self._max = max_frame_bytes
        self._transcript = b""
        self.acceptor_id = 0

    def hello(self) -> bytes:
        return _frame(msgpack.packb({"v": 1, "role": self._role.value, "id": self._id,
                                     "nonce": self._nonce}))

    def on_challenge(self, body: bytes) -> bytes:
        msg = _decode_handshake(body, {"v": int, "id": int, "nonce": bytes}, refusal_ok=True)
        if msg["v"] != 1 or len(msg["nonce"]) != NONCE_BYTES:
            raise RemoteProtocolError("malformed_frames", "bad handshake challenge")
        if self._expected_id is not None and msg["id"] != self._expected_id:
            raise AuthenticationError(f"expected node {self._expected_id}, but node "
                                      f"{msg['id']} answered: check the peer addresses")
        self.acceptor_id = msg["id"]
        self._transcript = _transcript(self._role.value, self._id, msg["id"], self._nonce,
                                       msg["nonce"])
        return _frame(msgpack.packb({"proof": _mac(self._token, b"initiator", self._transcript)}))

    def on_verdict(self, body: bytes) -> SecureChannel:
        msg = _decode_handshake(body, {"proof": bytes}, refusal_ok=True)
        if not hmac.compare_digest(msg["proof"], _mac(self._token, b"acceptor", self._transcript)):
            raise AuthenticationError("the server failed to prove it knows the cluster token: "
                                      "it is not part of this cluster (or uses another token)")
        return SecureChannel(_mac(self._token, b"session", self._transcript), True, self._max)


class AcceptorHandshake:
    """The listening side: ``on_hello(body)`` -> challenge frame, then ``on_proof(body)``
    -> (verdict frame, SecureChannel). ``role`` and ``peer_id`` are set by ``on_hello``."""

    def __init__(self, token: bytes, node_id: int, *,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self._token, self._id, self._max = token, node_id, max_frame_bytes
        self._nonce = secrets.token_bytes(NONCE_BYTES)
        self._transcript = b""
        self.role = Role.CLIENT
        self.peer_id = 0

    def on_hello(self, body: bytes) -> bytes:
        msg = _decode_handshake(body, {"v": int, "role": str, "id": int, "nonce": bytes},
                                first=True)
        if (msg["v"] != 1 or msg["role"] not in ("peer", "client") or msg["id"] < 0
                or (msg["role"] == "peer" and msg["id"] == 0) or len(msg["nonce"]) != NONCE_BYTES):
            raise RemoteProtocolError("auth_failures", f"unsupported handshake hello "
                                      f"{str(msg)[:80]!r}")
        self.role, self.peer_id = Role(msg["role"]), msg["id"]
        self._transcript = _transcript(self.role.value, self.peer_id, self._id, msg["nonce"],
                                       self._nonce)
        return _frame(msgpack.packb({"v": 1, "id": self._id, "nonce": self._nonce}))

    def on_proof(self, body: bytes) -> tuple[bytes, SecureChannel]:
        msg = _decode_handshake(body, {"proof": bytes})
        if not hmac.compare_digest(msg["proof"], _mac(self._token, b"initiator",
                                                       self._transcript)):
            raise RemoteProtocolError("auth_failures", "handshake proof does not verify "
                                      "(wrong cluster token)")
        verdict = _frame(msgpack.packb({"proof": _mac(self._token, b"acceptor",
                                                       self._transcript)}))
        return verdict, SecureChannel(_mac(self._token, b"session", self._transcript), False,
                                      self._max)


_REFUSAL = _frame(msgpack.packb({"error": "authentication failed: wrong cluster token"}))


def _encode_rpc(req_id: int, body: dict) -> bytes:
    return msgpack.packb([req_id, body], use_bin_type=True)


def _decode_rpc(payload: bytes) -> tuple[int, dict]:
    try:
        v = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:
        raise RemoteProtocolError("malformed_frames", f"RPC payload is not msgpack "
                                  f"({exc.__class__.__name__})") from None
    if (type(v) is not list or len(v) != 2 or type(v[0]) is not int
            or type(v[1]) is not dict):
        raise RemoteProtocolError("malformed_frames", "an RPC frame must be [id, map]")
    return v[0], v[1]


# ---------------------------------------------------------------------------------------
# asyncio I/O


async def _read_body(reader: asyncio.StreamReader, max_bytes: int,
                     stats: TransportStats) -> bytes:
    """One frame body. The length is checked before the body is read or allocated."""
    try:
        head = await reader.readexactly(_LEN.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise RemoteProtocolError("truncated_frames", "connection ended inside a frame "
                                      "length prefix") from None
        raise ConnectionClosed("the other side closed the connection", request_sent=True) from None
    (n,) = _LEN.unpack(head)
    if n > max_bytes:
        raise RemoteProtocolError("oversize_frames", f"a frame of {n} bytes announced, the "
                                  f"limit is {max_bytes}")
    try:
        body = await reader.readexactly(n)
    except asyncio.IncompleteReadError as exc:
        raise RemoteProtocolError("truncated_frames", f"connection ended {len(exc.partial)} "
                                  f"bytes into a {n}-byte frame") from None
    stats.frames_in += 1
    stats.bytes_in += _LEN.size + n
    return body


async def _initiate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    hs: InitiatorHandshake, stats: TransportStats) -> SecureChannel:
    """Run the dialling side of the handshake; ConnectError if it fails."""
    try:
        writer.write(hs.hello())
        writer.write(hs.on_challenge(await _read_body(reader, MAX_HANDSHAKE_FRAME_BYTES, stats)))
        return hs.on_verdict(await _read_body(reader, MAX_HANDSHAKE_FRAME_BYTES, stats))
    except AuthenticationError:
        raise
    except (RemoteProtocolError, ConnectionClosed, ConnectionError) as exc:
        raise ConnectError(f"handshake failed: {exc}") from exc


async def _write_quietly(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Best effort: a last word before closing (the connection may already be gone)."""
    writer.write(data)
    try:
        await writer.drain()
    except ConnectionError:
        pass


def _close_quietly(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
    except Exception:  # the transport may already be gone; nothing left to release
        pass


def _internal_error(message: str) -> dict:
    return {"ok": False, "error": "internal", "message": message[:500]}


# answers a client request: a dict at once, a Future of one, or a coroutine
ClientHandler = Callable[[dict], Any]
PeerHandler = Callable[[int, bytes], None]

K = TypeVar("K", bound=Hashable)


def _is_loopback(host: str) -> bool:
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


class HandshakePool(Generic[K]):
    """Which unauthenticated connections a Server keeps: pure bookkeeping, no I/O.

    Connections still in their handshake live in this pool, apart from the authenticated
    ones, so however many strangers connect they never take an authenticated slot. At most
    ``max_total`` are admitted at once, and at most ``max_per_address`` from one non-loopback
    address (loopback is exempt: every local cluster and benchmark lives there, so the cap
    would only hurt them). Admitting one over a limit evicts an older one: first the oldest
    that has not sent its hello yet (an idle socket -- a real client sends its hello at
    once), else the oldest of all. So a flood of idle sockets only ever evicts itself, and a
    newcomer can only be pushed out once ``max_total`` newer connections arrived during
    its own handshake.
    """

    def __init__(self, max_total: int, max_per_address: int) -> None:
        if max_total < 1 or max_per_address < 1:
            raise ValueError("need max_total >= 1 and max_per_address >= 1")
        self.max_total, self.max_per_address = max_total, max_per_address
        self._silent: collections.OrderedDict[K, str] = collections.OrderedDict()
        self._heard: collections.OrderedDict[K, str] = collections.OrderedDict()
        self._by_remote: dict[str, collections.OrderedDict[K, None]] = {}

    def __len__(self) -> int:
        return len(self._silent) + len(self._heard)

    def __contains__(self, key: object) -> bool:
        return key in self._silent or key in self._heard

    def admit(self, key: K, host: str) -> list[K]:
        """Add a new connection from ``host``; returns the older ones to evict (and forgets
        them). The newcomer itself is never among them."""
        assert key not in self, "a connection is admitted once"
        evict: list[K] = []
        if not _is_loopback(host):
            same = self._by_remote.setdefault(host, collections.OrderedDict())
            if len(same) >= self.max_per_address:
                evict.append(next((k for k in same if k in self._silent), next(iter(same))))
                self.discard(evict[-1])
            self._by_remote.setdefault(host, collections.OrderedDict())[key] = None
        if len(self) >= self.max_total:
            evict.append(next(iter(self._silent or self._heard)))
            self.discard(evict[-1])
        self._silent[key] = host
        return evict

    def heard_hello(self, key: K) -> None:
        """``key`` sent a valid hello: it is a real handshake in progress, evicted last."""
        host = self._silent.pop(key, None)
        if host is not None:
            self._heard[key] = host

    def discard(self, key: K) -> None:
        """``key`` finished its handshake, failed it, or was evicted (unknown keys: no-op)."""
        host = self._silent.pop(key, None)
        if host is None:
            host = self._heard.pop(key, None)
        same = self._by_remote.get(host) if host is not None else None
        if same is not None:
            same.pop(key, None)
            if not same:
                del self._by_remote[host]  # type: ignore[arg-type]


class Server:
    """Accepts authenticated peer and client connections on ``host:port``.

    ``on_peer_message(from_id, payload)`` is called in the event loop for each frame from a
    peer (it must not block); ``on_client_request(body)`` answers each client request with a
    dict, a Future of one, or a coroutine returning one; ``on_peer_connected(peer_id)``, if
    given, hears of each peer that has just connected and authenticated (a node that is back
    up: see :meth:`PeerTransport.redial`); ``on_peer_disconnected(peer_id)``, if given, of
    each peer whose connection the other side closed or reset (its process may have died:
    the kernel closes a killed process's sockets), never of one this server closed itself.
    Binds to loopback unless another ``host`` is given explicitly.

    Limits: at most ``max_connections`` authenticated connections; connections still in
    their handshake (at most ``handshake_timeout_s`` each) wait in a :class:`HandshakePool`
    of their own (``max_handshakes``, ``max_handshakes_per_address`` for each non-loopback
    address), where a newcomer evicts an idle stranger rather than being turned away.
    """

    def __init__(self, *, node_id: int, token: bytes | str, on_peer_message: PeerHandler,
                 on_client_request: ClientHandler, host: str = "127.0.0.1", port: int = 0,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, max_connections: int = 1024,
                 max_inflight_per_client: int = 256,
                 handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S,
                 max_handshakes: int = DEFAULT_MAX_HANDSHAKES,
                 max_handshakes_per_address: int = DEFAULT_MAX_HANDSHAKES_PER_ADDRESS,
                 stats: TransportStats | None = None,
                 on_peer_connected: Callable[[int], None] | None = None,
                 on_peer_disconnected: Callable[[int], None] | None = None) -> None:
        self._token = check_token(token)
        self.node_id = node_id
        self._on_peer_message = on_peer_message
        self._on_peer_connected = on_peer_connected
        self._on_peer_disconnected = on_peer_disconnected
        self._on_client_request = on_client_request
        self._host, self._port = host, port
        self._max_frame = max_frame_bytes
        self._max_connections = max_connections
        self._max_inflight = max_inflight_per_client
        self._handshake_timeout_s = handshake_timeout_s
        self.stats = stats if stats is not None else TransportStats()
        self.address: tuple[str, int] = (host, port)
        self._server: asyncio.AbstractServer | None = None
        self._conn_tasks: set[asyncio.Task[None]] = set()
        self._authenticated: set[asyncio.Task[None]] = set()
        self._handshakes: HandshakePool[asyncio.Task[None]] = HandshakePool(
            max_handshakes, max_handshakes_per_address)
        self._handshake_writers: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._blocked: frozenset[int] = frozenset()
        self._peer_links: collections.Counter[int] = collections.Counter()  # open links per peer

    async def start(self) -> None:
        # A listen backlog as deep as the handshake pool: under a burst of connects the
        # kernel queues a real client's SYN instead of dropping it (a 1 s retransmit).
        self._server = await asyncio.start_server(
            self._on_connection, self._host, self._port,
            backlog=max(128, self._handshakes.max_total))
        sockname = self._server.sockets[0].getsockname()
        self.address = (sockname[0], sockname[1])

    def set_blocked_peers(self, ids: Iterable[int]) -> None:
        """Drop (and count) every frame from these peers: one half of a partition."""
        self._blocked = frozenset(ids)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = list(self._conn_tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _on_connection(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        for victim in self._handshakes.admit(task, host):
            self._evict(victim)
        self._handshake_writers[task] = writer
        self._conn_tasks.add(task)
        self.stats.connections_accepted += 1
        try:
            await self._serve_connection(reader, writer, task)
        except RemoteProtocolError as exc:
            self.stats.count(exc.kind)
            log.info("node %d: closing connection from %s: %s", self.node_id, peer, exc)
        except asyncio.TimeoutError:
            self.stats.handshake_timeouts += 1
            log.info("node %d: %s did not finish the handshake in time", self.node_id, peer)
        except (ConnectionClosed, ConnectionError):
            pass
        except asyncio.CancelledError:
            pass  # close() cancelled us; finishing normally keeps asyncio's streams callback quiet
        except Exception:  # a bug here must cost one connection, never the server
            self.stats.handler_errors += 1
            log.exception("node %d: unexpected error on connection from %s", self.node_id, peer)
        finally:
            self._forget_handshake(task)
            self._authenticated.discard(task)
            self._conn_tasks.discard(task)
            _close_quietly(writer)

    def _forget_handshake(self, task: asyncio.Task[None]) -> None:
        self._handshakes.discard(task)
        self._handshake_writers.pop(task, None)

    def _evict(self, task: asyncio.Task[None]) -> None:
        """Drop an unauthenticated connection the pool chose: free its socket now."""
        writer = self._handshake_writers.pop(task, None)
        if writer is not None:
            writer.transport.abort()
        task.cancel()
        self.stats.handshakes_evicted += 1

    async def _serve_connection(self, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter, task: asyncio.Task[None]) -> None:
        hs = AcceptorHandshake(self._token, self.node_id, max_frame_bytes=self._max_frame)
        chan = await asyncio.wait_for(self._accept(reader, writer, hs, task),
                                      self._handshake_timeout_s)
        if hs.role is Role.PEER:
            await self._serve_peer(reader, chan, hs.peer_id)
        else:
            await self._serve_client(reader, writer, chan)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      hs: AcceptorHandshake, task: asyncio.Task[None]) -> SecureChannel:
        writer.write(hs.on_hello(await _read_body(reader, MAX_HANDSHAKE_FRAME_BYTES, self.stats)))
        self._handshakes.heard_hello(task)
        body = await _read_body(reader, MAX_HANDSHAKE_FRAME_BYTES, self.stats)
        try:
            verdict, chan = hs.on_proof(body)
        except RemoteProtocolError as exc:
            if exc.kind == "auth_failures":  # tell an honest misconfiguration what is wrong
                await _write_quietly(writer, _REFUSAL)
            raise
        self._forget_handshake(task)  # authenticated: out of the pool, into a slot
        if len(self._authenticated) >= self._max_connections:
            self.stats.connections_rejected += 1
            log.warning("node %d: refusing an authenticated %s connection: all %d connection "
                        "slots are taken", self.node_id, hs.role.value, self._max_connections)
            await _write_quietly(writer, _frame(msgpack.packb({
                "error": f"node {self.node_id} is at its limit of {self._max_connections} "
                         "connections; try another node or later", "retry": True})))
            raise ConnectionClosed("connection limit reached", request_sent=False)
        self._authenticated.add(task)
        writer.write(verdict)
        await writer.drain()
        return chan

    async def _serve_peer(self, reader: asyncio.StreamReader, chan: SecureChannel,
                          peer_id: int) -> None:
        self._peer_links[peer_id] += 1
        try:
            await self._read_peer(reader, chan, peer_id)
        finally:
            self._peer_links[peer_id] -= 1

    async def _read_peer(self, reader: asyncio.StreamReader, chan: SecureChannel,
                         peer_id: int) -> None:
        if self._on_peer_connected is not None and peer_id not in self._blocked:
            try:
                self._on_peer_connected(peer_id)
            except Exception:
                self.stats.handler_errors += 1
                log.exception("node %d: on_peer_connected(%d) failed", self.node_id, peer_id)
        while True:
            try:
                body = await _read_body(reader, self._max_frame, self.stats)
            except (ConnectionClosed, ConnectionError):
                self._peer_disconnected(peer_id)
                raise
            payload = chan.open(body)
            if peer_id in self._blocked:
                self.stats.peer_frames_blocked += 1
                continue
            try:
                self._on_peer_message(peer_id, payload)
            except Exception:
                self.stats.handler_errors += 1
                log.exception("node %d: on_peer_message failed for a frame from node %d",
                              self.node_id, peer_id)

    def _peer_disconnected(self, peer_id: int) -> None:
        # Only the peer's last link: an old connection that ends after the peer dialled a new
        # one (a redial) is no sign of its death.
        if (self._on_peer_disconnected is None or peer_id in self._blocked
                or self._peer_links[peer_id] > 1):
            return
        try:
            self._on_peer_disconnected(peer_id)
        except Exception:
            self.stats.handler_errors += 1
            log.exception("node %d: on_peer_disconnected(%d) failed", self.node_id, peer_id)

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            chan: SecureChannel) -> None:
        """Read requests and answer each one; answers may go out in any order (by id).

        A handler that answers at once (a dict) or hands back a Future is served without a
        task of its own: the answer is written right away or from the Future's callback (a
        put then costs one event-loop turn less). A coroutine gets a task. A client that
        does not read its answers stops having its requests read once its answers pile up.
        """
        inflight = asyncio.Semaphore(self._max_inflight)
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                req_id, body = _decode_rpc(
                    chan.open(await _read_body(reader, self._max_frame, self.stats)))
                await inflight.acquire()
                try:
                    result: Any = self._on_client_request(body)
                except Exception as exc:
                    self._reply(writer, chan, req_id, body, error=exc)
                    inflight.release()
                    continue
                if isinstance(result, dict):
                    self._reply(writer, chan, req_id, body, result)
                    inflight.release()
                elif asyncio.isfuture(result):
                    result.add_done_callback(functools.partial(
                        self._reply_when_done, writer, chan, req_id, body, inflight))
                else:
                    t = asyncio.create_task(
                        self._answer(writer, chan, req_id, body, result, inflight))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                if writer.transport.get_write_buffer_size() > _DIRECT_WRITE_MAX_BUFFERED:
                    await writer.drain()
        finally:
            for t in tasks:
                t.cancel()

    def _reply(self, writer: asyncio.StreamWriter, chan: SecureChannel, req_id: int,
               body: dict, resp: Any = None, error: BaseException | None = None) -> None:
        if error is None and not isinstance(resp, dict):
            error = TypeError(f"the request handler returned {type(resp).__name__}")
        if error is not None:
            self.stats.handler_errors += 1
            log.error("node %d: client request %r failed", self.node_id, body.get("op"),
                      exc_info=error)
            resp = _internal_error(f"{error.__class__.__name__}: {error}")
        if writer.transport.is_closing():
            return  # the client left; nothing to answer
        frame = chan.seal(_encode_rpc(req_id, resp))
        writer.write(frame)
        self.stats.frames_out += 1
        self.stats.bytes_out += len(frame)

    def _reply_when_done(self, writer: asyncio.StreamWriter, chan: SecureChannel, req_id: int,
                         body: dict, inflight: asyncio.Semaphore, fut: asyncio.Future) -> None:
        inflight.release()
        if fut.cancelled():
            return  # the server is shutting down; the connection closes with it
        exc = fut.exception()
        self._reply(writer, chan, req_id, body, None if exc is not None else fut.result(), exc)

    async def _answer(self, writer: asyncio.StreamWriter, chan: SecureChannel, req_id: int,
                      body: dict, pending: Awaitable[dict], inflight: asyncio.Semaphore) -> None:
        try:
            try:
                resp = await pending
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._reply(writer, chan, req_id, body, error=exc)
            else:
                self._reply(writer, chan, req_id, body, resp)
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            inflight.release()


# ---------------------------------------------------------------------------------------
# outbound peer links


@dataclass(eq=False, slots=True)
class _PeerLink:
    peer_id: int
    address: tuple[str, int]
    queue: collections.deque[bytes]
    wakeup: asyncio.Event
    queued_bytes: int = 0  # payload bytes in ``queue``
    task: asyncio.Task[None] | None = None
    redial_now: asyncio.Event = field(default_factory=asyncio.Event)  # cuts a backoff short
    connected: bool = False
    broken: bool = False
    # While connected: the open stream and channel, so ``send`` can write at once when
    # nothing is queued (saving the pump's wake-up, one event-loop turn per message).
    writer: asyncio.StreamWriter | None = None
    chan: SecureChannel | None = None


class PeerTransport:
    """One outbound authenticated connection per peer, for this node's Raft messages.

    ``send`` never blocks: it queues the payload (at most ``max_queue_frames`` frames and
    ``max_queue_bytes`` bytes per peer; the oldest are dropped and counted when full -- Raft
    retransmits what matters; :meth:`backlog_bytes` lets a bulk sender wait instead) and the
    peer's sender task writes queued frames in batches. A lost connection is redialled with
    exponential backoff and jitter, bounded by ``backoff_max_s`` (a fraction of an election
    timeout: a restarted node must hear its peers' votes soon), and at once when
    :meth:`redial` says the peer is back. Loop thread only.
    """

    def __init__(self, *, node_id: int, token: bytes | str, peers: dict[int, tuple[str, int]],
                 max_queue_frames: int = 4096, max_queue_bytes: int = 64 << 20,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 backoff_initial_s: float = 0.02, backoff_max_s: float = 0.1,
                 connect_timeout_s: float = 1.0,
                 on_unreachable: Callable[[int], None] | None = None,
                 rng: random.Random | None = None, stats: TransportStats | None = None) -> None:
        if max_queue_frames < 1 or not 0 < backoff_initial_s <= backoff_max_s:
            raise ValueError("need max_queue_frames >= 1 and 0 < backoff_initial_s <= "
                             "backoff_max_s")
        self._token = check_token(token)
        self.node_id = node_id
        self._max_queue = max_queue_frames
        self._max_queue_bytes = max(max_queue_bytes, max_frame_bytes)  # one frame always fits
        self._max_frame = max_frame_bytes
        self._backoff_initial_s, self._backoff_max_s = backoff_initial_s, backoff_max_s
        self._connect_timeout_s = connect_timeout_s
        self._on_unreachable = on_unreachable
        self._rng = rng or random.Random()
        self.stats = stats if stats is not None else TransportStats()
        self._links: dict[int, _PeerLink] = {}
        self._blocked: frozenset[int] = frozenset()
        self._started = False
        self.set_peers(peers)

    async def start(self) -> None:
        self._started = True
        for link in self._links.values():
            self._spawn(link)

    def send(self, to: int, payload: bytes) -> None:
        """Queue ``payload`` for peer ``to`` (KeyError for an unknown peer; FrameTooLarge if
        it can never fit in a frame -- raise max_frame_bytes on every node)."""
        link = self._links[to]
        if to in self._blocked:
            self.stats.peer_frames_blocked += 1
            return
        if len(payload) + _SEALED_OVERHEAD > self._max_frame:
            raise FrameTooLarge(f"a {len(payload)}-byte message to node {to} exceeds the "
                                f"{self._max_frame}-byte frame limit")
        writer = link.writer
        if (writer is not None and link.chan is not None and not link.queue and not link.broken
                and writer.transport.get_write_buffer_size() < _DIRECT_WRITE_MAX_BUFFERED
                and not writer.transport.is_closing()):
            frame = link.chan.seal(payload)  # nothing queued: earlier frames are all written
            writer.write(frame)
            self.stats.frames_out += 1
            self.stats.bytes_out += len(frame)
            return
        while link.queue and (len(link.queue) >= self._max_queue
                              or link.queued_bytes + len(payload) > self._max_queue_bytes):
            link.queued_bytes -= len(link.queue.popleft())
            self.stats.peer_frames_dropped += 1
        link.queue.append(payload)
        link.queued_bytes += len(payload)
        link.wakeup.set()

    def backlog_bytes(self, to: int) -> int:
        """Bytes queued for peer ``to`` and not yet handed to the kernel (our queue plus the
        connection's write buffer); 0 for an unknown peer."""
        link = self._links.get(to)
        if link is None:
            return 0
        writer = link.writer
        buffered = writer.transport.get_write_buffer_size() if writer is not None else 0
        return link.queued_bytes + buffered

    def set_peers(self, peers: dict[int, tuple[str, int]]) -> None:
        """Replace the peer set (membership change); a changed address redials."""
        for pid in list(self._links):
            if pid not in peers or tuple(peers[pid]) != self._links[pid].address:
                link = self._links.pop(pid)
                if link.task is not None:
                    link.task.cancel()
        for pid, addr in peers.items():
            if pid not in self._links and pid != self.node_id:
                link = _PeerLink(pid, (addr[0], addr[1]), collections.deque(), asyncio.Event())
                self._links[pid] = link
                if self._started:
                    self._spawn(link)

    def set_blocked_peers(self, ids: Iterable[int]) -> None:
        """Drop (and count) every message to these peers: one half of a partition."""
        self._blocked = frozenset(ids)

    def connected(self, to: int) -> bool:
        link = self._links.get(to)
        return link is not None and link.connected

    async def close(self) -> None:
        self._started = False
        tasks = [link.task for link in self._links.values() if link.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def redial(self, peer_id: int) -> None:
        """``peer_id`` is reachable again (it just connected to us): if our link to it is
        waiting out a backoff, dial now. Without this, a node restarted after a crash may not
        hear its peers' vote requests for a whole backoff period."""
        link = self._links.get(peer_id)
        if link is not None and not link.connected:
            link.redial_now.set()

    async def _backoff(self, link: _PeerLink, delay_s: float) -> None:
        link.redial_now.clear()
        try:
            await asyncio.wait_for(link.redial_now.wait(), delay_s)
        except asyncio.TimeoutError:
            pass

    def _spawn(self, link: _PeerLink) -> None:
        link.task = asyncio.get_running_loop().create_task(
            self._run_link(link), name=f"peer-link-{self.node_id}-to-{link.peer_id}")

    def _unreachable(self, peer_id: int) -> None:
        if self._on_unreachable is not None:
            try:
                self._on_unreachable(peer_id)
            except Exception:
                log.exception("on_unreachable(%d) failed", peer_id)

    async def _run_link(self, link: _PeerLink) -> None:
        backoff, ever_connected = self._backoff_initial_s, False
        # Not `while True`: on Python 3.11 a cancel() landing while wait_for(open_connection)
        # completes with a refused connection can surface as that OSError, which the loop
        # below would swallow and redial forever (a node's stop() then hung for 30 s);
        # close() clears _started, so the loop ends whatever became of the cancellation.
        while self._started:
            try:
                reader, writer, chan = await self._dial(link)
            except (OSError, asyncio.TimeoutError, TransportError) as exc:
                self.stats.connect_failures += 1
                log.debug("node %d: cannot reach node %d at %s: %s", self.node_id,
                          link.peer_id, link.address, exc)
                self._unreachable(link.peer_id)
                await self._backoff(link, backoff / 2 + self._rng.uniform(0, backoff / 2))
                backoff = min(backoff * 2, self._backoff_max_s)
                continue
            self.stats.reconnects += ever_connected
            ever_connected, backoff = True, self._backoff_initial_s
            try:
                await self._pump(link, reader, writer, chan)
            except (OSError, TransportError) as exc:
                log.debug("node %d: link to node %d lost: %s", self.node_id, link.peer_id, exc)
            finally:
                link.connected = False
                _close_quietly(writer)
            self._unreachable(link.peer_id)
            await asyncio.sleep(self._rng.uniform(0, self._backoff_initial_s))

    async def _dial(self, link: _PeerLink) -> tuple[asyncio.StreamReader, asyncio.StreamWriter,
                                                   SecureChannel]:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*link.address),
                                                self._connect_timeout_s)
        hs = InitiatorHandshake(self._token, Role.PEER, self.node_id, expected_id=link.peer_id,
                                max_frame_bytes=self._max_frame)
        try:
            chan = await asyncio.wait_for(_initiate(reader, writer, hs, self.stats),
                                          self._connect_timeout_s)
        except BaseException:
            _close_quietly(writer)
            raise
        return reader, writer, chan

    async def _pump(self, link: _PeerLink, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter, chan: SecureChannel) -> None:
        """Write queued messages in batches until the connection breaks."""
        link.connected, link.broken = True, False
        watcher = asyncio.get_running_loop().create_task(self._watch_eof(link, reader))
        link.writer, link.chan = writer, chan
        try:
            while True:
                if not link.queue and not link.broken:
                    link.wakeup.clear()
                    await link.wakeup.wait()
                if link.broken:
                    raise ConnectionClosed(f"node {link.peer_id} closed the connection", False)
                frames = [chan.seal(link.queue.popleft()) for _ in range(len(link.queue))]
                link.queued_bytes = 0
                data = b"".join(frames)
                writer.write(data)
                self.stats.frames_out += len(frames)
                self.stats.bytes_out += len(data)
                await writer.drain()
        finally:
            link.writer = link.chan = None
            watcher.cancel()

    @staticmethod
    async def _watch_eof(link: _PeerLink, reader: asyncio.StreamReader) -> None:
        """Peer links are one-way: any byte or EOF from the acceptor ends the connection."""
        try:
            await reader.read(1)
        except (OSError, ConnectionError):
            pass
        link.broken = True
        link.wakeup.set()


# ---------------------------------------------------------------------------------------
# clients


class ClientConnection:
    """An asyncio client connection: many concurrent ``request`` calls, matched by id.

    Create it with ``await ClientConnection.connect(...)``. Errors tell a request that was
    certainly not sent (ConnectError, ``ConnectionClosed(request_sent=False)``,
    FrameTooLarge) from one whose outcome is unknown (RequestTimeout,
    ``ConnectionClosed(request_sent=True)``).
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 chan: SecureChannel, server_id: int, address: tuple[str, int],
                 max_inflight: int) -> None:
        self._reader, self._writer, self._chan = reader, writer, chan
        self.server_id = server_id
        self.address = address
        self.stats = TransportStats()
        self.closed = False
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[dict]] = {}
        self._inflight = asyncio.Semaphore(max_inflight)
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def connect(cls, host: str, port: int, token: bytes | str, *, timeout_s: float = 5.0,
                      max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                      max_inflight: int = 1024) -> ClientConnection:
        tok = check_token(token)
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                                    timeout_s)
        except (OSError, asyncio.TimeoutError) as exc:
            raise ConnectError(f"cannot connect to {host}:{port}: {exc!r}") from exc
        hs = InitiatorHandshake(tok, Role.CLIENT, 0, max_frame_bytes=max_frame_bytes)
        try:
            chan = await asyncio.wait_for(_initiate(reader, writer, hs, TransportStats()),
                                          timeout_s)
        except asyncio.TimeoutError:
            _close_quietly(writer)
            raise ConnectError(f"{host}:{port} did not complete the handshake in "
                               f"{timeout_s}s") from None
        except BaseException:
            _close_quietly(writer)
            raise
        return cls(reader, writer, chan, hs.acceptor_id, (host, port), max_inflight)

    async def request(self, body: dict, timeout_s: float = 5.0) -> dict:
        """Send ``body`` and await the answer (a dict), at most ``timeout_s`` seconds."""
        if self.closed:
            raise ConnectionClosed(f"connection to {self._where()} is closed", request_sent=False)
        async with self._inflight:
            self._next_id += 1
            rid = self._next_id
            frame = self._chan.seal(_encode_rpc(rid, body))  # FrameTooLarge: nothing sent
            fut: asyncio.Future[dict] = asyncio.get_running_loop().create_future()
            self._pending[rid] = fut
            try:
                self._writer.write(frame)
                await asyncio.wait_for(self._drain_then(fut), timeout_s)
                return fut.result()
            except asyncio.TimeoutError:
                raise RequestTimeout(f"no answer from {self._where()} within {timeout_s}s "
                                     "(the request may or may not have been applied)") from None
            except (ConnectionError, OSError) as exc:
                self._fail_all(f"write failed: {exc}")
                raise ConnectionClosed(f"connection to {self._where()} lost: {exc}",
                                       request_sent=True) from exc
            finally:
                self._pending.pop(rid, None)

    async def close(self) -> None:
        self._fail_all("closed by the client")
        self._reader_task.cancel()
        try:
            await self._writer.wait_closed()
        except (OSError, ConnectionError):
            pass

    def _where(self) -> str:
        return f"node {self.server_id} at {self.address[0]}:{self.address[1]}"

    async def _drain_then(self, fut: asyncio.Future[dict]) -> None:
        await self._writer.drain()
        await asyncio.shield(fut)

    async def _read_loop(self) -> None:
        reason = "closed by the server"
        try:
            while True:
                body = await _read_body(self._reader, self._chan.max_frame_bytes, self.stats)
                rid, resp = _decode_rpc(self._chan.open(body))
                fut = self._pending.get(rid)
                if fut is not None and not fut.done():
                    fut.set_result(resp)
        except asyncio.CancelledError:
            reason = "closed by the client"
        except (TransportError, ConnectionError, OSError) as exc:
            reason = str(exc)
        finally:
            self._fail_all(reason)

    def _fail_all(self, reason: str) -> None:
        self.closed = True
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionClosed(
                    f"connection to {self._where()} lost before the answer ({reason}); the "
                    "request may or may not have been applied", request_sent=True))
        _close_quietly(self._writer)


class BlockingClientConnection:
    """The same wire over a plain blocking socket: one request at a time, not thread-safe.

    A timeout closes the connection (a late answer could otherwise be read as the next
    one's); the caller reconnects.
    """

    def __init__(self, host: str, port: int, token: bytes | str, *, timeout_s: float = 5.0,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        tok = check_token(token)
        self.address = (host, port)
        self.closed = False
        self._max = max_frame_bytes
        self._next_id = 0
        try:
            self._sock = socket.create_connection((host, port), timeout=timeout_s)
        except OSError as exc:
            self.closed = True
            raise ConnectError(f"cannot connect to {host}:{port}: {exc!r}") from exc
        try:
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            hs = InitiatorHandshake(tok, Role.CLIENT, 0, max_frame_bytes=max_frame_bytes)
            self._sock.sendall(hs.hello())
            self._sock.sendall(hs.on_challenge(self._recv_body(MAX_HANDSHAKE_FRAME_BYTES)))
            self._chan = hs.on_verdict(self._recv_body(MAX_HANDSHAKE_FRAME_BYTES))
            self.server_id = hs.acceptor_id
        except AuthenticationError:
            self.close()
            raise
        except (OSError, TransportError) as exc:
            self.close()
            raise ConnectError(f"handshake with {host}:{port} failed: {exc!r}") from exc

    def request(self, body: dict, timeout_s: float = 5.0) -> dict:
        """Send ``body`` and wait for its answer, at most ``timeout_s`` seconds."""
        if self.closed:
            raise ConnectionClosed(f"connection to {self._where()} is closed", request_sent=False)
        self._next_id += 1
        rid = self._next_id
        frame = self._chan.seal(_encode_rpc(rid, body))  # FrameTooLarge: nothing sent
        try:
            self._sock.settimeout(timeout_s)
            self._sock.sendall(frame)
            while True:
                got, resp = _decode_rpc(self._chan.open(self._recv_body(self._max)))
                if got == rid:
                    return resp
        except TimeoutError:
            self.close()
            raise RequestTimeout(f"no answer from {self._where()} within {timeout_s}s (the "
                                 "request may or may not have been applied)") from None
        except (OSError, TransportError) as exc:
            self.close()
            raise ConnectionClosed(f"connection to {self._where()} lost: {exc}; the request "
                                   "may or may not have been applied", request_sent=True) from exc

    def close(self) -> None:
        self.closed = True
        sock = getattr(self, "_sock", None)
        if sock is not None:
            sock.close()

    def __enter__(self) -> BlockingClientConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _where(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def _recv_exactly(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self._sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise ConnectionClosed("the server closed the connection", request_sent=True)
            buf += chunk
        return bytes(buf)

    def _recv_body(self, max_bytes: int) -> bytes:
        (n,) = _LEN.unpack(self._recv_exactly(_LEN.size))
        if n > max_bytes:
            raise RemoteProtocolError("oversize_frames", f"the server announced a {n}-byte "
                                      f"frame, over the {max_bytes}-byte limit")
        return self._recv_exactly(n)
