"""The replicated state: a revisioned key-value store with exactly-once client sessions.

Theory of operation
-------------------
Every replica applies the same committed log entries in the same order, so everything this
module computes must be a pure function of the entries: no wall clock, no randomness, no
iteration over unordered containers whose order could differ between replicas.

A *command* is one msgpack array ``[op, session, seq, ack, ts_ms, *args]`` carried as the data
of a NORMAL log entry (see :func:`encode_command`):

- ``op`` names a handler in a registry (:func:`register_command`). The key-value ops live here;
  the training step log (:mod:`coordinator.steplog`) registers its own ops the same way
  without touching the apply loop.
- ``session``/``seq``/``ack`` give exactly-once application of retried commands (Raft thesis
  §6.3). A client first commits a ``register`` command; the log index of that entry becomes its
  session id. Each write then carries a fresh sequence number ``seq`` and ``ack``, the lowest
  sequence number whose answer the client has not yet received. The session keeps the answers
  for ``seq >= floor`` (``floor`` rises to ``ack``), so a retried command is answered from the
  cache instead of being applied again, and a sequence number below ``floor`` is refused
  (``stale_sequence``): it was answered or given up long ago and must not run twice.
- ``ts_ms`` is the leader's wall clock when it proposed the command. Replicas never read their
  own clock; they advance ``clock_ms = max(clock_ms, ts_ms)`` from the log, which makes session
  expiry (idle longer than ``session_ttl_ms``) deterministic across replicas. The session table
  is also bounded (``max_sessions``, least recently used evicted first) and so is each
  session's answer cache (``max_cached_answers``). A command from an unknown or expired
  session is refused with ``session_expired`` and not applied, so a client whose session was
  evicted can never have a retry applied twice.

Revisions follow etcd: a global ``revision`` increases by one on each mutation that changed the
store; each key remembers ``create_revision``, ``mod_revision`` and ``version``.

Answers are small msgpack-able dicts, e.g. ``{"ok": True, "revision": 7}`` or
``{"ok": False, "error": "session_expired", "detail": "..."}``: the server sends them to the
client verbatim.

Other command families keep their state in *extensions* (:func:`register_extension`): every
``StateMachine`` holds one fresh instance per registered factory in ``extensions[name]``. An
extension object has ``snapshot_state()`` (a msgpack-able document), ``restore_state(doc)`` and
``query(name, args) -> answer`` (read-only; :meth:`StateMachine.query` routes client queries
to it). Its commands are ordinary session commands, so they are exactly-once too.

Snapshots are a msgpack document of the whole state (:meth:`StateMachine.snapshot`), restored
with :meth:`StateMachine.restore`; both are deterministic. Keys are kept in the key-value
dict's order, which is itself a function of the log (insertion order; a restore rebuilds the
dict in snapshot order), so no replica sorts anything. Format 2 stores the keys in flat
chunks of at most :data:`SNAPSHOT_KV_CHUNK` records and about
:data:`SNAPSHOT_KV_CHUNK_BYTES`, so :meth:`restore` decodes one chunk per msgpack call, from
bytes or streamed from a file: a server restores in a worker thread, and each chunk is a
point where the thread lets the event loop run (one ``unpackb`` of a 300k-key document holds
the GIL for ~0.3 s), and memory holds one chunk beside the state being built. Format 1
(one record per key, sorted) is still read. A server builds the restored state in a fresh
:class:`StateMachine` off its event loop and swaps it in with :meth:`StateMachine.replace_with`.
Restoring (or resetting with :meth:`StateMachine.restore_empty`) starts every extension from a
fresh instance, so nothing from before the snapshot survives it.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, BinaryIO, Protocol

import msgpack

from coordinator import kvrange, leases

SNAPSHOT_FORMAT_VERSION = 2  # restore also reads format 1
SNAPSHOT_KV_CHUNK = 4096  # key records per msgpack array in a format 2 snapshot, at most...
SNAPSHOT_KV_CHUNK_BYTES = 4 << 20  # ...and about this many bytes of keys and values
_RESTORE_READ_BYTES = 1 << 20  # a snapshot restored from a file is read this much at a time
_RESTORE_MAX_OBJECT_BYTES = 1 << 31  # the largest single msgpack object a restore accepts

# Limits. Everything that can grow is bounded; breaking a bound is refused with an error
# answer (never an exception that could make replicas diverge).
MAX_KEY_BYTES = 4096
MAX_VALUE_BYTES = 1 << 20
MAX_KEYS = 1_000_000
#: The change history kept for reads at a past revision (``kv.range(revision=)``), bounded in
#: events and bytes of the values it holds; the oldest revisions go first (auto-compaction).
MAX_HISTORY_EVENTS = 10_000
MAX_HISTORY_BYTES = 16 << 20
KV_QUERIES = "kv"  # the store's own read-only queries (``kv.range``), beside the extensions'
DEFAULT_MAX_SESSIONS = 10_000
DEFAULT_SESSION_TTL_MS = 10 * 60 * 1000
DEFAULT_MAX_CACHED_ANSWERS = 1024

Answer = dict[str, Any]


class CommandError(Exception):
    """A command that is well-formed msgpack but not a valid command (a bug in the proposer)."""


@dataclasses.dataclass(slots=True)
class KeyRecord:
    """One key's value and its revisions (as in etcd's mvccpb.KeyValue)."""

    value: bytes
    create_revision: int
    mod_revision: int
    version: int


@dataclasses.dataclass(slots=True)
class Session:
    """A client's exactly-once state: answers kept for sequence numbers >= ``floor``."""

    floor: int = 1
    last_active_ms: int = 0
    answers: dict[int, Answer] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, slots=True)
class Command:
    """A decoded command; ``args`` are op-specific."""

    op: str
    session: int
    seq: int
    ack: int
    ts_ms: int
    args: tuple[Any, ...]


class Extension(Protocol):
    """The state of one command family beside the key-value store (see the module doc)."""

    def snapshot_state(self) -> Any: ...

    def restore_state(self, state: Any) -> None: ...

    def query(self, name: str, args: tuple[Any, ...]) -> dict[str, Any]: ...


# A handler applies one command's args to the state machine and returns its answer. Handlers
# must be deterministic and must validate their arguments (returning an error answer).
Handler = Callable[["StateMachine", Command, int], Answer]
_COMMANDS: dict[str, Handler] = {}
# Ops that do not need a session (registration itself, and the leader's internal ops).
_SESSIONLESS: set[str] = set()


# Extension name -> factory of a fresh, empty instance (see register_extension).
_EXTENSIONS: dict[str, Callable[[], Extension]] = {}


def register_extension(name: str, factory: Callable[[], Extension]) -> None:
    """Give every :class:`StateMachine` an ``extensions[name] = factory()`` (a fresh one on
    creation, restore and reset). Register at import time, before state machines are made."""
    if name in _EXTENSIONS:
        raise ValueError(f"extension {name!r} is already registered")
    _EXTENSIONS[name] = factory


def is_session_command(op: str) -> bool:
    """Whether ``op`` is a registered command that runs in a client session (exactly-once);
    the ops a client may propose by name."""
    return op in _COMMANDS and op not in _SESSIONLESS


def register_command(op: str, *, sessionless: bool = False) -> Callable[[Handler], Handler]:
    """Register ``handler(sm, command, index) -> answer`` for the op name ``op``."""

    def deco(handler: Handler) -> Handler:
        if op in _COMMANDS:
            raise ValueError(f"command {op!r} is already registered")
        _COMMANDS[op] = handler
        if sessionless:
            _SESSIONLESS.add(op)
        return handler

    return deco


def encode_command(op: str, session: int, seq: int, ack: int, ts_ms: int, *args: Any) -> bytes:
    """The log-entry bytes of one command (msgpack array, bytes kept as bin)."""
    return msgpack.packb([op, session, seq, ack, ts_ms, *args], use_bin_type=True)


def decode_command(data: bytes) -> Command:
    """Parse entry bytes into a :class:`Command`; raise :class:`CommandError` if malformed."""
    try:
        raw = msgpack.unpackb(data, raw=False, use_list=False)
    except Exception as exc:  # msgpack raises several types for bad input
        raise CommandError(f"entry is not msgpack: {exc}") from exc
    if not isinstance(raw, tuple) or len(raw) < 5 or not isinstance(raw[0], str):
        raise CommandError("entry is not a command array [op, session, seq, ack, ts_ms, ...]")
    op, session, seq, ack, ts_ms = raw[:5]
    # spelled out, not all(...) over a generator: this runs for every entry applied
    if not (isinstance(session, int) and isinstance(seq, int) and isinstance(ack, int)
            and isinstance(ts_ms, int)):
        raise CommandError("command header fields session/seq/ack/ts_ms must be integers")
    return Command(op, session, seq, ack, ts_ms, raw[5:])


def error(code: str, detail: str) -> Answer:
    """An error answer; ``code`` is a stable identifier, ``detail`` is for humans."""
    return {"ok": False, "error": code, "detail": detail}


class StateMachine:
    """Revisioned key-value store plus the client-session table; see the module docstring."""

    def __init__(
        self,
        *,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        session_ttl_ms: int = DEFAULT_SESSION_TTL_MS,
        max_cached_answers: int = DEFAULT_MAX_CACHED_ANSWERS,
    ) -> None:
        assert max_sessions > 0 and session_ttl_ms > 0 and max_cached_answers > 0
        self.max_sessions = max_sessions
        self.session_ttl_ms = session_ttl_ms
        self.max_cached_answers = max_cached_answers
        self.applied_index = 0
        self.revision = 0
        self.clock_ms = 0
        self.kv: dict[bytes, KeyRecord] = {}
        self._sorted: list[bytes] | None = None  # sorted keys, for ranges (sorted_keys)
        # The change history, oldest first: (revision, key, the key's record before that
        # revision or None); reads at revision >= compacted can be answered from it.
        self.history: deque[tuple[int, bytes, KeyRecord | None]] = deque()
        self.history_bytes = 0
        self.compacted = 0
        # Leases (coordinator.leases): id -> Lease in grant order, and key -> its lease id.
        self.leases: dict[int, leases.Lease] = {}
        # The leader's expiry index over ``leases`` (leases.due), not part of the state.
        self.lease_heap: list[tuple[int, int]] | None = None
        self.lease_heap_of: dict[int, leases.Lease] | None = None
        self.key_lease: dict[bytes, int] = {}
        # Least recently active first; the order is a function of the log only.
        self.sessions: OrderedDict[int, Session] = OrderedDict()
        # Extension state for other command families (e.g. the step log): name -> object
        # exposing snapshot_state() / restore_state(obj) / query(). See register_extension.
        self.extensions: dict[str, Extension] = {}
        self._reset_extensions()

    def _reset_extensions(self) -> None:
        self.extensions = {name: factory() for name, factory in sorted(_EXTENSIONS.items())}

    # ----------------------------------------------------------------- apply
    def apply(self, index: int, data: bytes) -> Answer | None:
        """Apply the committed entry at ``index``; return its answer (None for a no-op).

        Entries must be applied in order, each exactly once per replica; an empty entry is a
        leader's no-op and only advances ``applied_index``.
        """
        return self.apply_entry(index, data)[1]

    def apply_entry(self, index: int, data: bytes) -> tuple[Command | None, Answer | None]:
        """Like :meth:`apply`, also returning the decoded command (None for a no-op or garbage),
        so a server can route the answer to the waiting client without decoding twice."""
        assert index == self.applied_index + 1, (index, self.applied_index)
        self.applied_index = index
        if not data:
            return None, None
        try:
            cmd = decode_command(data)
        except CommandError as exc:
            return None, error("bad_command", str(exc))
        return cmd, self._apply_command(cmd, index)

    def _apply_command(self, cmd: Command, index: int) -> Answer:
        self.clock_ms = max(self.clock_ms, cmd.ts_ms)
        self._expire_sessions()
        handler = _COMMANDS.get(cmd.op)
        if handler is None:
            return error("unknown_command", f"no handler registered for op {cmd.op!r}")
        if cmd.op in _SESSIONLESS:
            return handler(self, cmd, index)
        return self._apply_in_session(handler, cmd, index)

    def _apply_in_session(self, handler: Handler, cmd: Command, index: int) -> Answer:
        session = self.sessions.get(cmd.session)
        if session is None:
            return error(
                "session_expired",
                f"client session {cmd.session} is unknown or expired; the command was not "
                "applied — register a new session and retry",
            )
        self.sessions.move_to_end(cmd.session)
        session.last_active_ms = self.clock_ms
        if cmd.ack > session.floor:
            for seq in [s for s in session.answers if s < cmd.ack]:
                del session.answers[seq]
            session.floor = cmd.ack
        cached = session.answers.get(cmd.seq)
        if cached is not None:
            return cached
        if cmd.seq < session.floor:
            return error(
                "stale_sequence",
                f"sequence number {cmd.seq} of session {cmd.session} is below {session.floor}: "
                "its answer was already delivered or discarded; the command was not applied",
            )
        answer = handler(self, cmd, index)
        session.answers[cmd.seq] = answer
        while len(session.answers) > self.max_cached_answers:
            oldest = min(session.answers)
            del session.answers[oldest]
            session.floor = max(session.floor, oldest + 1)
        return answer

    def _expire_sessions(self) -> None:
        deadline = self.clock_ms - self.session_ttl_ms
        while self.sessions:
            sid, session = next(iter(self.sessions.items()))
            if session.last_active_ms >= deadline and len(self.sessions) <= self.max_sessions:
                break
            del self.sessions[sid]

    # ----------------------------------------------------------------- reads
    def get(self, key: bytes) -> KeyRecord | None:
        """The current record of ``key`` (local state; the caller decides on consistency)."""
        return self.kv.get(key)

    def read_answer(self, key: bytes) -> Answer:
        """The answer to a client ``get``: value (or None) with its revisions."""
        rec = self.kv.get(key)
        if rec is None:
            return {"ok": True, "value": None, "revision": self.revision,
                    "applied": self.applied_index}
        return {"ok": True, "value": rec.value, "revision": self.revision,
                "mod_revision": rec.mod_revision, "create_revision": rec.create_revision,
                "version": rec.version, "applied": self.applied_index}

    def query(self, ext: str, name: str, args: tuple[Any, ...]) -> Answer:
        """The answer to a client query ``name(*args)`` of extension ``ext`` (local state; the
        caller decides on consistency). Never raises: a bad query is an error answer. The
        store's own queries are ``kv.range`` (:mod:`coordinator.kvrange`)."""
        if ext == KV_QUERIES:
            return dict(self._kv_query(name, args), applied=self.applied_index)
        extension = self.extensions.get(ext) if isinstance(ext, str) else None
        if extension is None:
            return error("unknown_extension", f"no extension {ext!r} is registered on this "
                         f"server (known: {sorted(self.extensions)})")
        if not isinstance(name, str) or not isinstance(args, tuple):
            return error("bad_query", "a query is a name (str) and a tuple of arguments")
        try:
            answer = extension.query(name, args)
        except Exception as exc:  # a bug in the extension; reads change nothing, so report it
            return error("query_failed", f"{ext}.{name} raised {type(exc).__name__}: {exc}")
        return dict(answer, applied=self.applied_index)

    _KV_QUERY_HELP = ("the kv queries are range(start, end, prefix, limit, keys_only, count_only, "
                      "revision), events(start, end, prefix, from_revision, max_events[, skip]), "
                      "lease(id, with_keys) and leases()")

    def _kv_query(self, name: str, args: Any) -> Answer:
        if not isinstance(args, tuple):
            return error("bad_query", self._KV_QUERY_HELP)
        if name == "range" and len(args) <= 7:
            return kvrange.range_answer(self, *args)
        if name == "events" and len(args) in (5, 6):
            return kvrange.events_answer(self, *args)
        if name == "lease" and 1 <= len(args) <= 2:
            return leases.time_to_live(self, *args)
        if name == "leases" and not args:
            return leases.lease_list(self)
        return error("bad_query", self._KV_QUERY_HELP)

    # ------------------------------------------------------------- mutations
    def _put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        self.revision += 1
        self._put_at(key, value, self.revision, lease)
        return self.revision

    def _put_at(self, key: bytes, value: bytes, revision: int, lease: int = 0) -> None:
        """Write ``key`` at ``revision`` (the caller advances ``self.revision``), attached to
        ``lease`` (0: none; the caller checked it exists)."""
        rec = self.kv.get(key)
        self._remember(revision, key, rec)
        if rec is None:
            self.kv[key] = KeyRecord(value, revision, revision, 1)
            self._sorted = None
        else:
            rec.value, rec.mod_revision, rec.version = value, revision, rec.version + 1
        if lease or self.key_lease:
            leases.attach(self, key, lease)

    def _delete(self, key: bytes) -> bool:
        if key not in self.kv:
            return False
        self._delete_at(key, self.revision + 1)
        self.revision += 1
        return True

    def _delete_at(self, key: bytes, revision: int | None = None) -> None:
        self._remember(self.revision + 1 if revision is None else revision, key, self.kv[key])
        del self.kv[key]
        self._sorted = None
        leases.detach(self, key)

    def _remember(self, revision: int, key: bytes, prev: KeyRecord | None) -> None:
        """Keep what ``key`` held before ``revision`` changed it; drop the oldest revisions
        beyond the history's bounds (they can no longer be read: ``compacted`` moves up)."""
        if prev is not None:
            prev = KeyRecord(prev.value, prev.create_revision, prev.mod_revision, prev.version)
        self.history.append((revision, key, prev))
        self.history_bytes += len(key) + (len(prev.value) if prev is not None else 0)
        while len(self.history) > MAX_HISTORY_EVENTS or self.history_bytes > MAX_HISTORY_BYTES:
            self.compact_history(self.history[0][0])

    def compact_history(self, revision: int) -> None:
        """Forget the changes at or before ``revision``: reads at ``revision`` and later stay
        possible, older ones fail with ``compacted`` (etcd's compaction)."""
        while self.history and self.history[0][0] <= revision:
            _, key, prev = self.history.popleft()
            self.history_bytes -= len(key) + (len(prev.value) if prev is not None else 0)
        self.compacted = max(self.compacted, revision)

    @staticmethod
    def max_keys() -> int:
        return MAX_KEYS

    def sorted_keys(self) -> list[bytes]:
        """Every key, sorted: a cache rebuilt after a key was created or deleted (ranges)."""
        if self._sorted is None:
            self._sorted = sorted(self.kv)
        return self._sorted

    def _check_key_value(self, key: Any, value: Any) -> Answer | None:
        if not isinstance(key, bytes) or not key or len(key) > MAX_KEY_BYTES:
            return error("bad_key", f"a key must be 1..{MAX_KEY_BYTES} bytes")
        if value is not None and (not isinstance(value, bytes) or len(value) > MAX_VALUE_BYTES):
            return error("bad_value", f"a value must be bytes of at most {MAX_VALUE_BYTES} bytes")
        if value is not None and key not in self.kv and len(self.kv) >= MAX_KEYS:
            return error("quota_exceeded", f"the store holds its limit of {MAX_KEYS} keys; "
                         "delete keys before adding new ones")
        return None

    # -------------------------------------------------------------- snapshot
    def snapshot(self) -> bytes:
        """The whole state as msgpack bytes (format 2; deterministic, see the module doc)."""
        doc = {
            "format": SNAPSHOT_FORMAT_VERSION,
            "applied_index": self.applied_index,
            "revision": self.revision,
            "clock_ms": self.clock_ms,
            "keys": len(self.kv),
            "kv": self._kv_chunks(),
            # Session order is LRU order, which is part of the replicated state.
            "sessions": [[sid, s.floor, s.last_active_ms, sorted(s.answers.items())]
                         for sid, s in self.sessions.items()],
            "extensions": {name: ext.snapshot_state()
                           for name, ext in sorted(self.extensions.items())},
            # the change history (reads at a past revision); readers that predate it skip it
            "compacted": self.compacted,
            "history": [[rev, key] + ([] if prev is None else
                                      [prev.value, prev.create_revision, prev.mod_revision, prev.version])
                        for rev, key, prev in self.history],
            "leases": leases.snapshot_state(self),
        }
        return msgpack.packb(doc, use_bin_type=True)

    def _kv_chunks(self) -> list[list[Any]]:
        """The key records, flat, in chunks bounded in records and bytes (see module doc)."""
        chunks: list[list[Any]] = []
        chunk: list[Any] = []
        size = 0
        for k, r in self.kv.items():
            if len(chunk) >= SNAPSHOT_KV_CHUNK * 5 or size >= SNAPSHOT_KV_CHUNK_BYTES:
                chunks.append(chunk)
                chunk, size = [], 0
            chunk += (k, r.value, r.create_revision, r.mod_revision, r.version)
            size += len(k) + len(r.value)
        if chunk:
            chunks.append(chunk)
        return chunks

    def restore(self, data: bytes | BinaryIO) -> None:
        """Replace the whole state with a :meth:`snapshot` document (format 1 or 2), given as
        bytes or as a binary file positioned at its start (read as it is decoded)."""
        if isinstance(data, (bytes, bytearray, memoryview)):
            up = msgpack.Unpacker(raw=False, strict_map_key=False,
                                  max_buffer_size=len(data) + 1)
            up.feed(data)
        else:
            up = msgpack.Unpacker(data, raw=False, strict_map_key=False,
                                  read_size=_RESTORE_READ_BYTES,
                                  max_buffer_size=_RESTORE_MAX_OBJECT_BYTES)
        doc: dict[str, Any] = {}
        kv: dict[bytes, KeyRecord] = {}
        for _ in range(up.read_map_header()):
            field = up.unpack()
            if field == "kv" and doc.get("format") == 2:
                for _ in range(up.read_array_header()):  # one chunk per call (see module doc)
                    it = iter(up.unpack())
                    kv.update((k, KeyRecord(v, c, m, ver))
                              for k, v, c, m, ver in zip(it, it, it, it, it, strict=True))
            else:
                doc[field] = up.unpack()
        if doc.get("format") not in (1, SNAPSHOT_FORMAT_VERSION):
            raise ValueError(f"unsupported state-machine snapshot format {doc.get('format')!r}")
        if doc["format"] == 1:
            kv = {k: KeyRecord(v, c, m, ver) for k, v, c, m, ver in doc["kv"]}
        elif "kv" in doc:  # "kv" came before "format" (not how snapshot() writes it)
            for chunk in doc["kv"]:
                it = iter(chunk)
                kv.update((k, KeyRecord(v, c, m, ver))
                          for k, v, c, m, ver in zip(it, it, it, it, it, strict=True))
        self.applied_index = doc["applied_index"]
        self.revision = doc["revision"]
        self.clock_ms = doc["clock_ms"]
        self.kv, self._sorted = kv, None
        self.history, self.history_bytes = deque(), 0
        for event in doc.get("history", []):
            prev = KeyRecord(*event[2:]) if len(event) > 2 else None
            self.history.append((event[0], event[1], prev))
            self.history_bytes += len(event[1]) + (len(prev.value) if prev is not None else 0)
        self.compacted = doc.get("compacted", self.revision)  # no history: from the restored state on
        leases.restore_state(self, doc.get("leases", []))
        self.sessions = OrderedDict(
            (sid, Session(floor, active, {seq: ans for seq, ans in answers}))
            for sid, floor, active, answers in doc["sessions"]
        )
        self._reset_extensions()
        for name, state in doc.get("extensions", {}).items():
            if name in self.extensions:
                self.extensions[name].restore_state(state)

    def replace_with(self, other: StateMachine) -> None:
        """Take over ``other``'s whole state (a server restores into a fresh machine off its
        event loop, then swaps the result in here, where its references point)."""
        self.applied_index, self.revision, self.clock_ms = (
            other.applied_index, other.revision, other.clock_ms)
        self.kv, self.sessions, self.extensions = other.kv, other.sessions, other.extensions
        self._sorted = None
        self.history, self.history_bytes, self.compacted = other.history, other.history_bytes, other.compacted
        self.leases, self.key_lease = other.leases, other.key_lease

    def restore_empty(self, applied_index: int = 0) -> None:
        """Reset to the empty state positioned at ``applied_index`` (a snapshot with no data)."""
        self.applied_index = applied_index
        self.revision = 0
        self.clock_ms = 0
        self.kv, self._sorted = {}, None
        self.history, self.history_bytes, self.compacted = deque(), 0, 0
        self.leases, self.key_lease = {}, {}
        self.sessions = OrderedDict()
        self._reset_extensions()


# ------------------------------------------------------------------ key-value ops
@register_command("register", sessionless=True)
def _register(sm: StateMachine, cmd: Command, index: int) -> Answer:
    """Open a session whose id is this entry's log index (unique across the cluster)."""
    sm.sessions[index] = Session(floor=1, last_active_ms=sm.clock_ms)
    sm._expire_sessions()  # enforce max_sessions, evicting the least recently active
    return {"ok": True, "session": index}


@register_command("put")
def _put_cmd(sm: StateMachine, cmd: Command, index: int) -> Answer:
    if len(cmd.args) not in (2, 3):
        return error("bad_command", "put takes (key, value[, lease])")
    key, value = cmd.args[:2]
    lease = cmd.args[2] if len(cmd.args) == 3 else 0
    bad = sm._check_key_value(key, value)
    if bad is not None or value is None:
        return bad or error("bad_value", "put needs a value")
    bad = leases.check_lease(sm, lease)
    if bad is not None:
        return bad
    return {"ok": True, "revision": sm._put(key, value, lease)}


@register_command("delete")
def _delete_cmd(sm: StateMachine, cmd: Command, index: int) -> Answer:
    if len(cmd.args) != 1:
        return error("bad_command", "delete takes (key,)")
    bad = sm._check_key_value(cmd.args[0], None)
    if bad is not None:
        return bad
    deleted = sm._delete(cmd.args[0])
    return {"ok": True, "deleted": deleted, "revision": sm.revision}


@register_command("txn")
def _txn_cmd(sm: StateMachine, cmd: Command, index: int) -> Answer:
    """etcd-style transaction: see :mod:`coordinator.kvrange`."""
    return kvrange.txn(sm, cmd, index)


@register_command("compact")
def _compact_cmd(sm: StateMachine, cmd: Command, index: int) -> Answer:
    """Forget the history up to ``revision`` (etcd's compaction): reads at an older one fail."""
    if len(cmd.args) != 1 or not isinstance(cmd.args[0], int) or isinstance(cmd.args[0], bool) \
            or not 0 < cmd.args[0] <= sm.revision:
        return error("bad_command", f"compact takes a revision in 1..{sm.revision} (the current one)")
    sm.compact_history(cmd.args[0])
    return {"ok": True, "compacted": sm.compacted, "revision": sm.revision}


@register_command("lease.grant")
def _lease_grant_cmd(sm: StateMachine, cmd: Command, index: int) -> Answer:
    return leases.grant(sm, cmd, index)


@register_command("lease.keepalive")
def _lease_keepalive_cmd(sm: StateMachine, cmd: Command, index: int) -> Answer:
    return leases.keepalive(sm, cmd, index)


@register_command("lease.revoke")
def _lease_revoke_cmd(sm: StateMachine, cmd: Command, index: int) -> Answer:
    return leases.revoke(sm, cmd, index)


@register_command("lease.expire", sessionless=True)
def _lease_expire_cmd(sm: StateMachine, cmd: Command, index: int) -> Answer:
    """The leader's expiry of due leases (see :mod:`coordinator.leases`)."""
    return leases.expire(sm, cmd, index)


@register_command("cas")
def _cas_cmd(sm: StateMachine, cmd: Command, index: int) -> Answer:
    """Compare-and-swap: set ``new`` iff the value is ``expected`` (None = key absent).

    ``new`` None deletes the key on success.
    """
    if len(cmd.args) != 3:
        return error("bad_command", "cas takes (key, expected, new)")
    key, expected, new = cmd.args
    bad = sm._check_key_value(key, new)
    if bad is not None:
        return bad
    if expected is not None and not isinstance(expected, bytes):
        return error("bad_value", "cas expected value must be bytes or None")
    rec = sm.kv.get(key)
    current = None if rec is None else rec.value
    if current != expected:
        return {"ok": True, "succeeded": False, "revision": sm.revision}
    if new is None:
        sm._delete(key)
    else:
        sm._put(key, new)
    return {"ok": True, "succeeded": True, "revision": sm.revision}
