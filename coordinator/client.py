"""Clients of a coordinator cluster: :class:`Client` (blocking) and :class:`AsyncClient`.

Theory of operation
-------------------
A client knows a list of endpoints (every node listens for peers and clients on one address).
It talks to the node it believes is the leader; a follower answers ``not_leader`` with the
leader's endpoint, which the client follows. A node that cannot be reached is skipped and the
next endpoint tried, with a short growing backoff while no leader is known (an election).

Exactly-once writes (Raft thesis §6.3): before its first write a client commits a
``register`` command and receives a session id. Every write then carries ``(session, seq,
ack)``: a new ``seq`` per operation, reused unchanged by every retry of that operation, and
``ack``, the lowest ``seq`` whose answer the client has not received yet. The state machine
answers a retried ``seq`` from its cache, so a write applies once however often it is sent.

Errors say whether a write may have happened:

- :class:`Unavailable` — the operation certainly did not take effect (no node accepted it
  before the deadline), so retrying it later is always safe;
- :class:`OutcomeUnknown` — a request may have reached a leader's log before the client lost
  track of it (connection dropped after sending, timeout, leader change); it may or may not
  have applied. (Within one call this never happens twice: the client keeps retrying the
  same ``seq`` until the deadline, so most leader changes are invisible.)
- :class:`RequestRejected` — the cluster refused the request itself (a bad key, a value over
  the limit); nothing changed.

Beside the key-value ops, ``command(name, *args)`` proposes any registered session command
by name (the step log's ``steplog.*`` ops, :mod:`coordinator.steplog`) with the same
exactly-once retries as ``put``, and ``query(ext, name, *args)`` asks a state-machine
extension a read-only question with the same consistency choice as ``get``. ``range`` reads
keys in order (a prefix, an interval; paged) and ``txn`` runs an etcd-style transaction
(compare, then one of two branches, atomically and exactly once): :mod:`coordinator.kvrange`.

Reads are idempotent: ``get`` retries freely and fails with :class:`Unavailable` only.
``consistency="linearizable"`` (default) goes to the leader, which confirms its leadership
with a ReadIndex round before answering; ``consistency="stale"`` is answered from the local
state of the first node that answers, which may lag but is never ahead of what was committed.

The retry policy is one small pure object (:class:`_Attempts`); the blocking and the asyncio
clients only differ in how they wait for the network.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

from coordinator.statemachine import MAX_VALUE_BYTES
from coordinator.transport import (
    AuthenticationError,
    BlockingClientConnection,
    ClientConnection,
    ConnectionClosed,
    FrameTooLarge,
    RequestTimeout,
    TransportError,
    load_token,
)

DEFAULT_TIMEOUT_S = 10.0
MAX_ATTEMPT_TIMEOUT_S = 1.0  # one request to one node; a stalled node is abandoned after it
BACKOFF_INITIAL_S = 0.005
BACKOFF_MAX_S = 0.02  # while electing: poll often, a new leader is usually ~200 ms away
MAX_INFLIGHT_WRITES = 256  # per AsyncClient; must stay below the server's answer cache (1024)


class CoordinatorError(Exception):
    """Base class of every error the coordinator client raises."""


class Unavailable(CoordinatorError):
    """The operation certainly did not take effect; no node could serve it in time."""


class OutcomeUnknown(CoordinatorError):
    """The operation may or may not have taken effect (the client lost track of it)."""


class RequestRejected(CoordinatorError):
    """The cluster refused the request (bad key/value, quota, a fenced or out-of-order step
    log write); nothing changed. ``code`` is the stable error name, ``answer`` the whole
    answer (e.g. a step log ``gap`` carries the expected ``last_step`` and ``report_seq``)."""

    def __init__(self, code: str, detail: str, answer: dict | None = None) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.answer = answer if answer is not None else {"ok": False, "error": code,
                                                         "detail": detail}


class AuthenticationFailed(Unavailable):
    """A node refused the handshake: the client's token is not the cluster's. Raised at
    once (every node would refuse it alike); nothing was sent."""


def _refused(exc: TransportError, addr: tuple[str, int], token_source: str) -> CoordinatorError:
    """The error for a failure no retry can mend: a refused handshake, or a request too large
    for any frame. Both surface at once instead of after the whole timeout."""
    if isinstance(exc, FrameTooLarge):
        return RequestRejected("too_large", f"{exc}; nothing was sent (a value is limited to "
                                            f"{MAX_VALUE_BYTES} bytes, 1 MiB)")
    return AuthenticationFailed(
        f"{addr[0]}:{addr[1]} refused the handshake: {token_source} is not this cluster's "
        f"token ({exc}). Use the token file the cluster was started with (--token-file or "
        "COORDINATOR_TOKEN_FILE; `coordinator local` prints it)")


def _token_source(token_file: str | os.PathLike | None) -> str:
    if token_file is not None:
        return f"the token in {os.fspath(token_file)!r}"
    return "the token passed to the client"


def parse_endpoints(endpoints: str | Iterable[str | tuple[str, int]]) -> list[tuple[str, int]]:
    """``"h:p,h:p"`` or a list of ``"h:p"`` / ``(h, p)`` -> list of (host, port)."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    out = []
    for item in items:
        if isinstance(item, tuple):
            out.append((str(item[0]), int(item[1])))
            continue
        host, sep, port = item.strip().rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"endpoint {item!r} is not host:port")
        out.append((host or "127.0.0.1", int(port)))
    if not out:
        raise ValueError("need at least one endpoint")
    return out


def _token_bytes(token: bytes | str | None, token_file: str | os.PathLike | None) -> bytes:
    if token_file is not None:
        return load_token(token_file)
    if token is None:
        raise ValueError("pass token=... or token_file=... (the cluster's shared secret)")
    return token.encode() if isinstance(token, str) else token


def _key_bytes(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else key


def _value_bytes(value: str | bytes | None) -> bytes | None:
    raw = value.encode() if isinstance(value, str) else value
    if raw is not None and len(raw) > MAX_VALUE_BYTES:  # refused here: no round trip
        raise RequestRejected("bad_value", f"the value is {len(raw)} bytes; a value is limited "
                                           f"to {MAX_VALUE_BYTES} bytes (1 MiB): store large "
                                           "data elsewhere and keep its name here")
    return raw


class _Next(enum.Enum):
    DONE = "done"
    RETRY = "retry"  # try again now (the endpoint was changed)
    BACKOFF = "backoff"  # wait, then try again


@dataclasses.dataclass
class _Attempts:
    """The retry policy of one operation: which endpoint next, how long to wait, and whether
    a failure leaves the outcome unknown. Pure: no I/O, no sleeping."""

    endpoints: list[tuple[str, int]]
    current: int
    deadline: float
    is_write: bool
    maybe_sent: bool = False
    backoff_s: float = BACKOFF_INITIAL_S
    last_error: str = "no attempt"
    answer: dict | None = None
    max_attempt_s: float = MAX_ATTEMPT_TIMEOUT_S

    def attempt_timeout(self, now: float) -> float:
        return max(0.001, min(self.deadline - now, self.max_attempt_s))

    def expired(self, now: float) -> bool:
        return now >= self.deadline

    def _rotate(self) -> _Next:
        self.current = (self.current + 1) % len(self.endpoints)
        # After a full round of unreachable nodes, back off (an election is likely running).
        return _Next.BACKOFF if self.current == 0 else _Next.RETRY

    def on_transport_error(self, exc: Exception) -> _Next:
        self.last_error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, ConnectionClosed) and exc.request_sent:
            self.maybe_sent = True
        elif isinstance(exc, RequestTimeout):
            self.maybe_sent = True
        return self._rotate()

    def on_answer(self, answer: dict) -> _Next:
        if answer.get("ok"):
            self.answer = answer
            return _Next.DONE
        code = answer.get("error", "unknown")
        self.last_error = f"{code}: {answer.get('detail', '')}"
        if answer.get("maybe_applied"):
            self.maybe_sent = True
        if code in ("not_leader", "leader_changed", "timeout", "unavailable", "overloaded",
                    "shutting_down"):
            hint = answer.get("endpoint")
            if hint:
                addr = parse_endpoints([hint])[0]
                if addr not in self.endpoints:
                    self.endpoints.append(addr)
                new = self.endpoints.index(addr)
                if new != self.current:
                    self.current = new
                    return _Next.RETRY
            return _Next.BACKOFF if code != "not_leader" else self._rotate()
        if code == "session_expired" and self.maybe_sent:
            answer = dict(answer, error="outcome_unknown", detail=(
                "the session expired while this write was being retried; an earlier attempt "
                "may have applied"))
        self.answer = answer
        return _Next.DONE

    def next_backoff(self) -> float:
        delay, self.backoff_s = self.backoff_s, min(BACKOFF_MAX_S, self.backoff_s * 2)
        return delay

    def failure(self, what: str) -> CoordinatorError:
        detail = f"{what} failed before its deadline; last error: {self.last_error}"
        if self.is_write and self.maybe_sent:
            return OutcomeUnknown(detail + " (a request may have reached the leader's log)")
        return Unavailable(detail)


def _rejected_or(answer: dict) -> dict:
    if answer.get("ok"):
        return answer
    if answer.get("error") == "outcome_unknown":
        raise OutcomeUnknown(answer.get("detail", ""))
    raise RequestRejected(answer.get("error", "unknown"), answer.get("detail", ""), answer)


class _SessionState:
    """Sequence numbers of one client session (thread-safe: shared by sync callers)."""

    def __init__(self) -> None:
        self.session = 0
        self.next_seq = 1
        self.inflight: set[int] = set()
        self.lock = threading.Lock()

    def begin(self) -> tuple[int, int]:
        with self.lock:
            seq = self.next_seq
            self.next_seq += 1
            self.inflight.add(seq)
            return seq, min(self.inflight)

    def end(self, seq: int) -> None:
        with self.lock:
            self.inflight.discard(seq)

    def ack(self) -> int:
        with self.lock:
            return min(self.inflight) if self.inflight else self.next_seq

    def reset(self, session: int) -> None:
        with self.lock:
            self.session = session


def _write_body(op: str, session: _SessionState, seq: int, args: list,
                name: str | None = None) -> dict:
    body = {"op": op, "session": session.session, "seq": seq, "ack": session.ack(), "args": args}
    if name is not None:  # op "command": the registered command to run
        body["name"] = name
    return body


@dataclasses.dataclass(frozen=True)
class KeyValue:
    """One key as a range returns it (etcd's mvccpb.KeyValue; ``value`` None with keys_only)."""

    key: bytes
    value: bytes | None
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


@dataclasses.dataclass(frozen=True)
class RangeResult:
    """``kvs`` sorted by key; ``count`` keys matched in all; ``more``: some were left out
    (by ``limit`` or the answer's size): ask again from ``next_start``."""

    kvs: list[KeyValue]
    count: int
    more: bool
    revision: int

    @property
    def next_start(self) -> bytes | None:
        """Where the next page starts (the last key returned plus a zero byte), if ``more``."""
        return self.kvs[-1].key + b"\0" if self.more and self.kvs else None


@dataclasses.dataclass(frozen=True)
class Compare:
    """A transaction's comparison: ``target`` in value | version | create | mod, ``op`` in
    == != < >; ``value`` is bytes (or str) for value, an int for the others."""

    key: str | bytes
    target: str
    op: str
    value: str | bytes | int

    def wire(self) -> list[Any]:
        operand = self.value if isinstance(self.value, int) else _value_bytes(self.value)
        return [_key_bytes(self.key), self.target, self.op, operand]


@dataclasses.dataclass(frozen=True)
class Put:
    """Write ``key`` (attached to ``lease`` when not 0)."""

    key: str | bytes
    value: str | bytes
    lease: int = 0

    def wire(self) -> list[Any]:
        if self.lease:
            return ["put", _key_bytes(self.key), _value_bytes(self.value), self.lease]
        return ["put", _key_bytes(self.key), _value_bytes(self.value)]


@dataclasses.dataclass(frozen=True)
class Delete:
    """Delete ``key``, or ``[key, end)``, or every key starting with ``key`` (``prefix``)."""

    key: str | bytes
    end: str | bytes | None = None
    prefix: bool = False

    def wire(self) -> list[Any]:
        return ["delete", _key_bytes(self.key) if self.key else b"", _opt_bytes(self.end), self.prefix]


@dataclasses.dataclass(frozen=True)
class Get:
    """A range read inside a transaction (the arguments of :meth:`Client.range`)."""

    key: str | bytes
    end: str | bytes | None = None
    prefix: bool = False
    limit: int = 0
    keys_only: bool = False
    count_only: bool = False

    def wire(self) -> list[Any]:
        return ["get", _key_bytes(self.key) if self.key else b"", _opt_bytes(self.end), self.prefix,
                self.limit, self.keys_only, self.count_only]


@dataclasses.dataclass(frozen=True)
class TxnResult:
    """Which branch ran, each of its ops' answers (a get's as a :class:`RangeResult`), and
    the revision after the transaction."""

    succeeded: bool
    responses: list[Any]
    revision: int


def _opt_bytes(value: str | bytes | None) -> bytes | None:
    return None if value is None else value.encode() if isinstance(value, str) else value


def _range_args(key: str | bytes, end: str | bytes | None, prefix: bool, limit: int, keys_only: bool,
                count_only: bool, revision: int | None) -> tuple:
    return (key.encode() if isinstance(key, str) else key, _opt_bytes(end), prefix, limit, keys_only,
            count_only, revision)


def _range_result(answer: dict) -> RangeResult:
    return RangeResult([KeyValue(*kv) for kv in answer["kvs"]], answer["count"], answer["more"],
                       answer["revision"])


def _txn_args(compare: Iterable[Compare], success: Iterable[Any], failure: Iterable[Any]) -> list:
    return [[c.wire() for c in compare], [op.wire() for op in success], [op.wire() for op in failure]]


def _txn_result(answer: dict) -> TxnResult:
    responses = [_range_result(r) if r.get("op") == "get" else r for r in answer["responses"]]
    return TxnResult(answer["succeeded"], responses, answer["revision"])


#: Entries a node may have committed but not applied yet and still be called healthy.
ENDPOINT_MAX_APPLY_LAG = 1_000


def _endpoint_row(endpoint: str, st: dict, took_s: float) -> dict:
    return {"endpoint": endpoint, "id": st.get("id"), "role": st.get("role"), "leader": st.get("leader"),
            "is_leader": st.get("role") == "leader", "term": st.get("term"), "commit": st.get("commit"),
            "applied": st.get("applied"), "revision": st.get("revision"), "keys": st.get("keys"),
            "log_size": st.get("log_size"), "snapshot_index": st.get("snapshot_index"),
            "recovering": bool(st.get("recovering")), "took_ms": round(1e3 * took_s, 2)}


def _health(row: dict, max_lag: int) -> dict:
    out = {"endpoint": row["endpoint"], "health": False, "took_ms": row.get("took_ms")}
    if "error" in row:
        out["error"] = row["error"]
    elif not row.get("leader"):
        out["error"] = "knows no leader (an election, or cut off from a majority)"
    elif row.get("recovering"):
        out["error"] = "repairing a lost disk: it does not vote until the leader has caught it up"
    elif (row.get("commit") or 0) - (row.get("applied") or 0) > max_lag:
        out["error"] = f"applied {row['applied']} of {row['commit']} committed entries"
    else:
        out["health"] = True
    return out


def _put_args(key: str | bytes, value: str | bytes, lease: int) -> list:
    if not isinstance(lease, int) or isinstance(lease, bool) or lease < 0:
        raise ValueError(f"lease must be a lease id (an int > 0) or 0, got {lease!r}")
    return [_key_bytes(key), _value_bytes(value), lease]


def _grant_args(ttl: float, lease_id: int) -> list:
    if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or not ttl > 0:
        raise ValueError(f"a lease's ttl is a number of seconds > 0, got {ttl!r}")
    if not isinstance(lease_id, int) or isinstance(lease_id, bool) or lease_id < 0:
        raise ValueError(f"lease_id must be an int >= 0 (0: the cluster picks), got {lease_id!r}")
    return [int(round(ttl * 1000)), lease_id]


def _ttl_result(answer: dict) -> dict:
    out = {"id": answer["id"], "ttl": answer["ttl_ms"] / 1000,
           "remaining": answer["remaining_ms"] / 1000, "keys_count": answer["keys_count"]}
    if "keys" in answer:
        out["keys"] = answer["keys"]
    return out


class LeaseKeeper:
    """Keeps one lease alive from a daemon thread: a keepalive every third of its TTL, and
    after a failed one (an election, a dead node) again every ``retry_s`` until one succeeds.
    ``lost`` is set (and the thread ends) if the cluster says the lease is gone. Its own
    connection; ``stop()`` (or leaving the ``with`` block) ends it; it never revokes."""

    def __init__(self, client: Client, lease_id: int, ttl: float, retry_s: float = 0.1) -> None:
        self.lease_id = lease_id
        self.interval_s = max(0.05, ttl / 3)
        self.retry_s = retry_s
        self.keepalives = 0
        self.failures = 0
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._client = Client(client.endpoints, client.token, timeout_s=max(0.5, ttl / 3))
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"lease-keeper-{lease_id}")
        self._thread.start()

    def __enter__(self) -> LeaseKeeper:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + self._client.timeout_s + 1)
        self._client.close()

    def _run(self) -> None:
        wait = 0.0
        while not self._stop.wait(wait):
            try:
                self._client.keepalive(self.lease_id)
            except RequestRejected as exc:
                if exc.code == "lease_not_found":
                    self.lost.set()
                    return
                self.failures += 1
                wait = self.retry_s
            except CoordinatorError:
                self.failures += 1
                wait = self.retry_s
            else:
                self.keepalives += 1
                wait = self.interval_s


class WatchCancelled(CoordinatorError):
    """The cluster ended a watch: ``reason`` (``compacted``: the watcher fell behind the kept
    history, whose oldest revision is ``compact_revision``; read the state again and watch from
    a later revision)."""

    def __init__(self, reason: str, detail: str, compact_revision: int = 0) -> None:
        super().__init__(f"watch cancelled ({reason}): {detail}")
        self.reason = reason
        self.compact_revision = compact_revision


@dataclasses.dataclass(frozen=True)
class WatchEvent:
    """One change: ``type`` "put" or "delete", the key as it is after it (a delete's ``kv``
    has the key, no value and the delete's revision as ``mod_revision``) and before it."""

    type: str
    kv: KeyValue
    prev_kv: KeyValue | None

    @property
    def revision(self) -> int:
        return self.kv.mod_revision


#: A watch's long poll: the server holds it this long with no change before answering empty.
WATCH_POLL_S = 2.0
#: Events one answer carries at most (whole revisions: a bigger transaction comes whole).
WATCH_MAX_EVENTS = 1000


def _watch_args(key: str | bytes, end: str | bytes | None, prefix: bool,
                start_revision: int | None) -> dict:
    if start_revision is not None and (not isinstance(start_revision, int) or start_revision < 1):
        raise ValueError(f"start_revision must be a revision >= 1 or None (from now), got {start_revision!r}")
    return {"op": "watch", "key": key.encode() if isinstance(key, str) else key, "end": _opt_bytes(end),
            "prefix": prefix, "start_revision": start_revision or 0, "max_events": WATCH_MAX_EVENTS,
            "wait_s": WATCH_POLL_S}


def _watch_events(answer: dict) -> list[WatchEvent]:
    out = []
    for kind, key, value, create, mod, version, lease, prev in answer["events"]:
        kv = KeyValue(key, value if value is not None else b"", create, mod, version, lease)
        prev_kv = None if prev is None else KeyValue(key, prev[0], prev[1], prev[2], prev[3])
        out.append(WatchEvent(kind, kv, prev_kv))
    return out


class _WatchState:
    """What a watch keeps between polls (shared by the blocking and asyncio iterators)."""

    def __init__(self, body: dict) -> None:
        self.body = body
        self.buffer: deque[WatchEvent] = deque()
        self.cancelled = False
        self.polls = 0

    @property
    def next_revision(self) -> int:
        return self.body["start_revision"]

    def take(self, answer: dict) -> None:
        self.polls += 1
        if not answer.get("ok"):
            if answer.get("error") == "compacted":
                self.cancelled = True
                raise WatchCancelled("compacted", answer.get("detail", ""),
                                     answer.get("compact_revision", 0))
            _rejected_or(answer)
        events = _watch_events(answer)
        if events and events[0].revision < self.body["start_revision"]:
            raise CoordinatorError(f"a watch answer went back from revision "
                                   f"{self.body['start_revision']} to {events[0].revision}")
        self.buffer.extend(events)
        self.body = dict(self.body, start_revision=answer["next"], skip=answer.get("skip", 0))


class Watch:
    """An iterator of :class:`WatchEvent` (see :meth:`Client.watch`). ``cancel()`` may be
    called from another thread: iteration ends within one poll. Memory is bounded: the
    cluster keeps no per-watcher queue; a watcher asks for what it has not seen, one bounded
    answer at a time, and one that falls behind the kept history gets :class:`WatchCancelled`."""

    def __init__(self, client: Client, body: dict) -> None:
        self._client = client
        self._state = _WatchState(body)

    @property
    def next_revision(self) -> int:
        """The revision the next event will be at or after (resume from here)."""
        return self._state.next_revision

    def __iter__(self) -> Watch:
        return self

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cancel()

    def __next__(self) -> WatchEvent:
        state = self._state
        while not state.buffer:
            if state.cancelled:
                self._client.close()
                raise StopIteration
            try:
                answer = self._client._call(dict(state.body), is_write=False, what="watch",
                                            attempt_s=WATCH_POLL_S + MAX_ATTEMPT_TIMEOUT_S)
            except Unavailable:
                continue  # no node answered in time: keep trying (as etcd's watchers do)
            state.take(answer)
        return state.buffer.popleft()

    def cancel(self) -> None:
        self._state.cancelled = True


class AsyncWatch:
    """The asyncio flavour of :class:`Watch`: ``async for event in watch``."""

    def __init__(self, client: AsyncClient, body: dict) -> None:
        self._client = client
        self._state = _WatchState(body)

    @property
    def next_revision(self) -> int:
        return self._state.next_revision

    def __aiter__(self) -> AsyncWatch:
        return self

    async def __anext__(self) -> WatchEvent:
        state = self._state
        while not state.buffer:
            if state.cancelled:
                raise StopAsyncIteration
            try:
                answer = await self._client._call(dict(state.body), is_write=False, what="watch",
                                                  attempt_s=WATCH_POLL_S + MAX_ATTEMPT_TIMEOUT_S)
            except Unavailable:
                continue
            state.take(answer)
        return state.buffer.popleft()

    def cancel(self) -> None:
        self._state.cancelled = True


def _query_body(ext: str, name: str, args: tuple, consistency: str) -> dict:
    if consistency not in ("linearizable", "stale"):
        raise ValueError("consistency must be 'linearizable' or 'stale'")
    return {"op": "query", "ext": ext, "name": name, "args": list(args),
            "consistency": consistency}


class Client:
    """A blocking client. Thread-safe, but it sends one request at a time: give each thread
    its own Client for concurrency. ``endpoints``: ``"h:p,h:p"`` or a list. A context manager."""

    def __init__(self, endpoints: str | Sequence[str | tuple[str, int]], token: bytes | str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, *,
                 token_file: str | os.PathLike | None = None) -> None:
        self.endpoints = parse_endpoints(endpoints)
        self.token = _token_bytes(token, token_file)
        self.token_source = _token_source(token_file)  # names the token in a refusal
        self.timeout_s = timeout_s
        self._leader = 0
        self._conns: dict[tuple[str, int], BlockingClientConnection] = {}
        self._lock = threading.Lock()  # one request at a time (the blocking wire is serial)
        self._session = _SessionState()
        self._closed = False

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()

    # ------------------------------------------------------------ public API
    def put(self, key: str | bytes, value: str | bytes, lease: int = 0) -> int:
        """Store ``value`` under ``key``; returns the new revision. ``lease``: attach the key
        to that lease (:meth:`grant`), deleted with it; 0 (a plain put) detaches it."""
        if lease:
            return self._write("command", _put_args(key, value, lease), name="put")["revision"]
        return self._write("put", [_key_bytes(key), _value_bytes(value)])["revision"]

    def delete(self, key: str | bytes) -> bool:
        """Delete ``key``; True if it existed."""
        return self._write("delete", [_key_bytes(key)])["deleted"]

    def cas(self, key: str | bytes, expected: str | bytes | None, new: str | bytes | None) -> bool:
        """Set ``key`` to ``new`` iff it holds ``expected`` (None: absent); None ``new`` deletes."""
        args = [_key_bytes(key), _value_bytes(expected), _value_bytes(new)]
        return self._write("cas", args)["succeeded"]

    def get(self, key: str | bytes, consistency: str = "linearizable") -> bytes | None:
        """The value of ``key`` or None. ``consistency``: "linearizable" or "stale"."""
        return self.get_record(key, consistency)["value"]

    def get_record(self, key: str | bytes, consistency: str = "linearizable") -> dict:
        """The full read answer (value, revisions, the answering node for stale reads)."""
        if consistency not in ("linearizable", "stale"):
            raise ValueError("consistency must be 'linearizable' or 'stale'")
        body = {"op": "get", "key": _key_bytes(key), "consistency": consistency}
        return _rejected_or(self._call(body, is_write=False, what="get",
                                       follow=consistency == "linearizable"))

    def command(self, name: str, *args: Any) -> dict:
        """Run the registered session command ``name`` (e.g. ``"steplog.steps"``) with
        ``args`` (msgpack values) exactly once; returns its answer. RequestRejected if the
        answer is not ok (``.code``, ``.answer``), OutcomeUnknown / Unavailable as for put."""
        return self._write("command", list(args), name=name)

    def query(self, ext: str, name: str, *args: Any, consistency: str = "linearizable") -> dict:
        """Ask extension ``ext`` (e.g. ``"steplog"``) the read-only query ``name(*args)``;
        ``consistency`` as for :meth:`get`. RequestRejected if the answer is not ok."""
        body = _query_body(ext, name, args, consistency)
        return _rejected_or(self._call(body, is_write=False, what=f"query {ext}.{name}",
                                       follow=consistency == "linearizable"))

    def range(self, key: str | bytes, end: str | bytes | None = None, *, prefix: bool = False,
              limit: int = 0, revision: int | None = None, keys_only: bool = False,
              count_only: bool = False, consistency: str = "linearizable") -> RangeResult:
        """The keys in ``[key, end)`` (``end`` None: the key alone; ``end=b"\\0"``: every key
        from ``key`` on), or every key starting with ``key`` (``prefix=True``; ``""``: all),
        sorted, at most ``limit`` (0: up to the answer's bound; ``more`` says the rest).
        ``revision``: as the keys were then (within the kept history; older: ``compacted``)."""
        answer = self.query("kv", "range", *_range_args(key, end, prefix, limit, keys_only, count_only,
                                                          revision), consistency=consistency)
        return _range_result(answer)

    def txn(self, compare: Iterable[Compare] = (), success: Iterable[Any] = (),
            failure: Iterable[Any] = ()) -> TxnResult:
        """If every ``compare`` holds, run ``success`` (:class:`Put`, :class:`Delete`,
        :class:`Get`), else ``failure``: atomically, one revision, exactly once."""
        return _txn_result(self._write("command", _txn_args(compare, success, failure), name="txn"))

    def compact(self, revision: int) -> int:
        """Forget the history before ``revision`` (reads at older revisions then fail with
        ``compacted``); returns the revision the history now starts at."""
        return self._write("command", [revision], name="compact")["compacted"]

    # ------------------------------------------------------------ leases
    def grant(self, ttl: float, lease_id: int = 0) -> int:
        """A new lease of ``ttl`` seconds (``lease_id`` 0: the cluster picks the id); keys put
        with it are deleted when it expires (no :meth:`keepalive` for ``ttl``) or is revoked."""
        return self._write("command", _grant_args(ttl, lease_id), name="lease.grant")["id"]

    def keepalive(self, lease_id: int) -> float:
        """Renew the lease for its whole TTL once; returns the TTL in seconds.
        RequestRejected ``lease_not_found`` if it is gone."""
        return self._write("command", [lease_id], name="lease.keepalive")["ttl_ms"] / 1000

    def lease_keeper(self, lease_id: int, ttl: float | None = None) -> LeaseKeeper:
        """Keep the lease alive from a background thread (a keepalive every third of its TTL,
        retried through elections) until ``.stop()``; a context manager."""
        if ttl is None:
            ttl = self.time_to_live(lease_id)["ttl"]
        return LeaseKeeper(self, lease_id, ttl)

    def revoke(self, lease_id: int) -> int:
        """Revoke the lease now; returns the number of its keys deleted (in one revision)."""
        return self._write("command", [lease_id], name="lease.revoke")["deleted"]

    def time_to_live(self, lease_id: int, keys: bool = False) -> dict:
        """``{"id", "ttl", "remaining", "keys_count"[, "keys"]}`` (seconds) of a live lease."""
        return _ttl_result(self.query("kv", "lease", lease_id, keys))

    def leases(self) -> list[int]:
        """The ids of the live leases, in grant order."""
        return self.query("kv", "leases")["leases"]

    # ------------------------------------------------------------ membership
    def member_list(self) -> list[dict]:
        """Every member as the leader sees it: ``ID``, ``peerURLs``, ``isLearner``,
        ``isLeader`` (etcdctl's member list fields) and ``match`` (entries it holds)."""
        return self._member({"action": "list"})["members"]

    def member_add(self, node_id: int, address: str, *, learner: bool = False) -> list[dict]:
        """Add node ``node_id`` listening on ``address`` ("host:port"), as a learner (then
        :meth:`member_promote` it once caught up) or a voter; start it afterwards with
        ``coordinator serve --join``. Returns the new member list."""
        return self._member({"action": "add", "id": node_id, "address": address,
                             "learner": learner})["members"]

    def member_promote(self, node_id: int) -> list[dict]:
        """Make learner ``node_id`` a voter (refused with ``learner_not_ready`` until it holds
        90 % of the leader's log)."""
        return self._member({"action": "promote", "id": node_id})["members"]

    def member_remove(self, node_id: int) -> list[dict]:
        """Remove ``node_id`` (a voter, the leader included, or a learner); it stops itself."""
        return self._member({"action": "remove", "id": node_id})["members"]

    def _member(self, body: dict) -> dict:
        what = f"member {body['action']}"
        return _rejected_or(self._call(dict(body, op="member"), is_write=body["action"] != "list",
                                       what=what, attempt_s=self.timeout_s))

    # ------------------------------------------------------------ watches
    def watch(self, key: str | bytes, end: str | bytes | None = None, *, prefix: bool = False,
              start_revision: int | None = None) -> Watch:
        """Every change to ``key`` (or ``[key, end)``, or keys starting with ``key``) from
        ``start_revision`` (None: from now), as an iterator of :class:`WatchEvent` in revision
        order; ``.cancel()`` ends it. It follows the cluster through failures and reconnects
        without a gap or a repeat, and raises :class:`WatchCancelled` if it fell behind the
        kept history (``compacted``). It holds a connection of its own."""
        return Watch(Client(self.endpoints, self.token, self.timeout_s),
                     _watch_args(key, end, prefix, start_revision))

    def status(self, endpoint: str | tuple[str, int] | None = None) -> dict:
        """Status of one node: ``endpoint``, or the first node that answers."""
        if endpoint is not None:
            return self._call_one(parse_endpoints([endpoint])[0], {"op": "status"})
        return self._call({"op": "status"}, is_write=False, what="status", follow=False)

    def endpoint_status(self) -> list[dict]:
        """Every endpoint's status (etcdctl's ``endpoint status``), in endpoint order: id,
        role, leader, term, commit and applied index, revision, keys, log size, the answer's
        latency; ``error`` instead for one that does not answer."""
        out = []
        for host, port in list(self.endpoints):
            started = time.monotonic()
            try:
                st = self.status(f"{host}:{port}")
            except CoordinatorError as exc:
                if isinstance(exc, AuthenticationFailed):
                    raise
                out.append({"endpoint": f"{host}:{port}", "error": str(exc)[:300]})
                continue
            out.append(_endpoint_row(f"{host}:{port}", st, time.monotonic() - started))
        return out

    def endpoint_health(self, max_lag: int = ENDPOINT_MAX_APPLY_LAG) -> list[dict]:
        """Every endpoint's health (etcdctl's ``endpoint health``): healthy when it answers,
        knows a leader, is not repairing a lost disk and has applied all but at most
        ``max_lag`` of the entries it knows committed; ``took_ms`` and ``error`` say more."""
        return [_health(row, max_lag) for row in self.endpoint_status()]

    def admin_partition(self, endpoint: str | tuple[str, int], block: Iterable[int]) -> dict:
        """Make one node drop all traffic to/from the node ids ``block`` (fault injection)."""
        return self._call_one(parse_endpoints([endpoint])[0],
                              {"op": "admin_partition", "block": list(block)})

    def admin_stall_disk(self, endpoint: str | tuple[str, int], seconds: float) -> dict:
        """Hold one node's disk thread for ``seconds`` (fault injection: a slow disk; at most
        30 s). Its saves wait meanwhile; its event loop does not. RequestRejected on a bad
        ``seconds``."""
        answer = self._call_one(parse_endpoints([endpoint])[0],
                                {"op": "admin_stall_disk", "seconds": seconds})
        if not answer.get("ok"):
            raise RequestRejected(answer.get("error", "unknown"), answer.get("detail", ""), answer)
        return answer

    def admin_stop(self, endpoint: str | tuple[str, int]) -> dict:
        """Ask one node to stop as on SIGTERM (a node started with ``remote_stop`` only: one
        hosted by a Ray actor). The node answers first, then stops; RequestRejected if it
        does not take the request."""
        answer = self._call_one(parse_endpoints([endpoint])[0], {"op": "admin_stop"})
        if not answer.get("ok"):
            raise RequestRejected(answer.get("error", "unknown"), answer.get("detail", ""), answer)
        return answer

    # ------------------------------------------------------------ internals
    def _write(self, op: str, args: list, name: str | None = None) -> dict:
        if not self._session.session:
            self._register()
        seq, _ = self._session.begin()
        try:
            while True:
                body = _write_body(op, self._session, seq, args, name)
                answer = self._call(body, is_write=True, what=name or op)
                if answer.get("error") != "session_expired":
                    return _rejected_or(answer)
                self._register()  # not applied: the command was refused by the session check
        finally:
            self._session.end(seq)

    def _register(self) -> None:
        body = {"op": "register", "args": [os.urandom(16)]}
        answer = _rejected_or(self._call(body, is_write=False, what="register"))
        self._session.reset(answer["session"])

    def _call(self, body: dict, *, is_write: bool, what: str, follow: bool = True,
              attempt_s: float = MAX_ATTEMPT_TIMEOUT_S) -> dict:
        with self._lock:
            return self._call_locked(body, is_write=is_write, what=what, follow=follow,
                                     attempt_s=attempt_s)

    def _call_locked(self, body: dict, *, is_write: bool, what: str, follow: bool,
                     attempt_s: float = MAX_ATTEMPT_TIMEOUT_S) -> dict:
        now = time.monotonic()
        att = _Attempts(self.endpoints, self._leader, now + self.timeout_s, is_write,
                        max_attempt_s=attempt_s)
        while not att.expired(now):
            addr = att.endpoints[att.current]
            try:
                answer = self._conn(addr).request(body, timeout_s=att.attempt_timeout(now))
                if follow:
                    step = att.on_answer(answer)
                else:  # any answer will do (status, stale reads)
                    att.answer, step = answer, _Next.DONE
            except (AuthenticationError, FrameTooLarge) as exc:
                raise _refused(exc, addr, self.token_source) from exc
            except TransportError as exc:
                self._drop(addr)
                step = att.on_transport_error(exc)
            if step is _Next.DONE:
                self._leader = att.current
                assert att.answer is not None
                return att.answer
            if step is _Next.BACKOFF:
                time.sleep(min(att.next_backoff(), max(0.0, att.deadline - time.monotonic())))
            now = time.monotonic()
        raise att.failure(what)

    def _call_one(self, addr: tuple[str, int], body: dict) -> dict:
        try:
            with self._lock:
                return self._conn(addr).request(body, timeout_s=self.timeout_s)
        except (AuthenticationError, FrameTooLarge) as exc:
            raise _refused(exc, addr, self.token_source) from exc
        except TransportError as exc:
            self._drop(addr)
            raise Unavailable(f"{body['op']} on {addr[0]}:{addr[1]} failed: {exc}") from exc

    def _conn(self, addr: tuple[str, int]) -> BlockingClientConnection:
        if self._closed:
            raise Unavailable("the client is closed")
        conn = self._conns.get(addr)
        if conn is None or conn.closed:
            conn = BlockingClientConnection(addr[0], addr[1], self.token,
                                            timeout_s=MAX_ATTEMPT_TIMEOUT_S)
            self._conns[addr] = conn
        return conn

    def _drop(self, addr: tuple[str, int]) -> None:
        conn = self._conns.pop(addr, None)
        if conn is not None:
            conn.close()


class AsyncClient:
    """The asyncio flavour of :class:`Client`: the same methods, as coroutines. Many
    operations may run concurrently on one AsyncClient (up to ``MAX_INFLIGHT_WRITES`` writes)."""

    def __init__(self, endpoints: str | Sequence[str | tuple[str, int]], token: bytes | str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, *,
                 token_file: str | os.PathLike | None = None) -> None:
        self.endpoints = parse_endpoints(endpoints)
        self.token = _token_bytes(token, token_file)
        self.token_source = _token_source(token_file)  # names the token in a refusal
        self.timeout_s = timeout_s
        self._leader = 0
        self._conns: dict[tuple[str, int], ClientConnection] = {}
        self._connecting: dict[tuple[str, int], asyncio.Lock] = {}
        self._session = _SessionState()
        self._register_lock = asyncio.Lock()
        self._write_slots = asyncio.Semaphore(MAX_INFLIGHT_WRITES)
        self._closed = False

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        for conn in list(self._conns.values()):
            await conn.close()
        self._conns.clear()

    async def put(self, key: str | bytes, value: str | bytes, lease: int = 0) -> int:
        if lease:
            return (await self._write("command", _put_args(key, value, lease), name="put"))["revision"]
        return (await self._write("put", [_key_bytes(key), _value_bytes(value)]))["revision"]

    async def delete(self, key: str | bytes) -> bool:
        return (await self._write("delete", [_key_bytes(key)]))["deleted"]

    async def cas(self, key: str | bytes, expected: str | bytes | None,
                  new: str | bytes | None) -> bool:
        args = [_key_bytes(key), _value_bytes(expected), _value_bytes(new)]
        return (await self._write("cas", args))["succeeded"]

    async def get(self, key: str | bytes, consistency: str = "linearizable") -> bytes | None:
        return (await self.get_record(key, consistency))["value"]

    async def get_record(self, key: str | bytes, consistency: str = "linearizable") -> dict:
        if consistency not in ("linearizable", "stale"):
            raise ValueError("consistency must be 'linearizable' or 'stale'")
        body = {"op": "get", "key": _key_bytes(key), "consistency": consistency}
        return _rejected_or(await self._call(body, is_write=False, what="get",
                                             follow=consistency == "linearizable"))

    async def command(self, name: str, *args: Any) -> dict:
        """See :meth:`Client.command`."""
        return await self._write("command", list(args), name=name)

    async def query(self, ext: str, name: str, *args: Any,
                    consistency: str = "linearizable") -> dict:
        """See :meth:`Client.query`."""
        body = _query_body(ext, name, args, consistency)
        return _rejected_or(await self._call(body, is_write=False, what=f"query {ext}.{name}",
                                             follow=consistency == "linearizable"))

    async def range(self, key: str | bytes, end: str | bytes | None = None, *, prefix: bool = False,
                    limit: int = 0, revision: int | None = None, keys_only: bool = False,
                    count_only: bool = False, consistency: str = "linearizable") -> RangeResult:
        """See :meth:`Client.range`."""
        answer = await self.query("kv", "range", *_range_args(key, end, prefix, limit, keys_only,
                                                                count_only, revision), consistency=consistency)
        return _range_result(answer)

    async def txn(self, compare: Iterable[Compare] = (), success: Iterable[Any] = (),
                  failure: Iterable[Any] = ()) -> TxnResult:
        """See :meth:`Client.txn`."""
        return _txn_result(await self._write("command", _txn_args(compare, success, failure), name="txn"))

    async def compact(self, revision: int) -> int:
        """See :meth:`Client.compact`."""
        return (await self._write("command", [revision], name="compact"))["compacted"]

    async def grant(self, ttl: float, lease_id: int = 0) -> int:
        """See :meth:`Client.grant`."""
        return (await self._write("command", _grant_args(ttl, lease_id), name="lease.grant"))["id"]

    async def keepalive(self, lease_id: int) -> float:
        """See :meth:`Client.keepalive`."""
        return (await self._write("command", [lease_id], name="lease.keepalive"))["ttl_ms"] / 1000

    async def revoke(self, lease_id: int) -> int:
        """See :meth:`Client.revoke`."""
        return (await self._write("command", [lease_id], name="lease.revoke"))["deleted"]

    async def time_to_live(self, lease_id: int, keys: bool = False) -> dict:
        """See :meth:`Client.time_to_live`."""
        return _ttl_result(await self.query("kv", "lease", lease_id, keys))

    def watch(self, key: str | bytes, end: str | bytes | None = None, *, prefix: bool = False,
              start_revision: int | None = None) -> AsyncWatch:
        """See :meth:`Client.watch`: ``async for event in client.watch(...)``."""
        return AsyncWatch(self, _watch_args(key, end, prefix, start_revision))

    async def status(self, endpoint: str | tuple[str, int] | None = None) -> dict:
        if endpoint is not None:
            addr = parse_endpoints([endpoint])[0]
            try:
                conn = await self._conn(addr)
                return await conn.request({"op": "status"}, timeout_s=self.timeout_s)
            except (AuthenticationError, FrameTooLarge) as exc:
                raise _refused(exc, addr, self.token_source) from exc
            except TransportError as exc:
                await self._drop(addr)
                raise Unavailable(f"status of {addr[0]}:{addr[1]} failed: {exc}") from exc
        return await self._call({"op": "status"}, is_write=False, what="status", follow=False)

    async def _write(self, op: str, args: list, name: str | None = None) -> dict:
        async with self._write_slots:
            if not self._session.session:
                await self._register(0)
            seq, _ = self._session.begin()
            try:
                while True:
                    session = self._session.session
                    body = _write_body(op, self._session, seq, args, name)
                    answer = await self._call(body, is_write=True, what=name or op)
                    if answer.get("error") != "session_expired":
                        return _rejected_or(answer)
                    await self._register(session)
            finally:
                self._session.end(seq)

    async def _register(self, expired: int) -> None:
        async with self._register_lock:
            if self._session.session != expired:
                return  # another task registered meanwhile
            body = {"op": "register", "args": [os.urandom(16)]}
            answer = _rejected_or(await self._call(body, is_write=False, what="register"))
            self._session.reset(answer["session"])

    async def _call(self, body: dict, *, is_write: bool, what: str, follow: bool = True,
                    attempt_s: float = MAX_ATTEMPT_TIMEOUT_S) -> dict:
        now = time.monotonic()
        att = _Attempts(list(self.endpoints), self._leader, now + self.timeout_s, is_write,
                        max_attempt_s=attempt_s)
        while not att.expired(now):
            addr = att.endpoints[att.current]
            try:
                conn = await self._conn(addr)
                answer = await conn.request(body, timeout_s=att.attempt_timeout(now))
                if follow:
                    step = att.on_answer(answer)
                else:  # any answer will do (status, stale reads)
                    att.answer, step = answer, _Next.DONE
            except (AuthenticationError, FrameTooLarge) as exc:
                raise _refused(exc, addr, self.token_source) from exc
            except TransportError as exc:
                await self._drop(addr)
                step = att.on_transport_error(exc)
            if step is _Next.DONE:
                if att.current < len(self.endpoints):
                    self._leader = att.current
                assert att.answer is not None
                return att.answer
            if step is _Next.BACKOFF:
                await asyncio.sleep(min(att.next_backoff(),
                                        max(0.0, att.deadline - time.monotonic())))
            now = time.monotonic()
        raise att.failure(what)

    async def _conn(self, addr: tuple[str, int]) -> ClientConnection:
        if self._closed:
            raise Unavailable("the client is closed")
        conn = self._conns.get(addr)
        if conn is not None and not conn.closed:
            return conn
        lock = self._connecting.setdefault(addr, asyncio.Lock())
        async with lock:  # many tasks, one connection per node
            conn = self._conns.get(addr)
            if conn is None or conn.closed:
                conn = await ClientConnection.connect(addr[0], addr[1], self.token,
                                                      timeout_s=MAX_ATTEMPT_TIMEOUT_S)
                self._conns[addr] = conn
            return conn

    async def _drop(self, addr: tuple[str, int]) -> None:
        conn = self._conns.pop(addr, None)
        if conn is not None:
            await conn.close()
