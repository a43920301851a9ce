"""Raft wire types: frozen dataclasses for every RPC, and their msgpack codec.

Theory of operation
-------------------
Everything a Raft node exchanges with its peers or hands to its driver is a value: an
immutable ``@dataclass(frozen=True, slots=True)``. One ``Message`` type carries every RPC
(as in etcd-io/raft); the ``MessageType`` says which fields mean something.

The codec turns a value into msgpack *arrays* (positional, no field names: compact and
fast) and back. Decoding is strict: every field is type- and range-checked, and anything
malformed -- wrong shape, wrong type, unknown enum value, negative index, trailing bytes --
raises :class:`DecodeError` (a ``ValueError``) and nothing else. Nothing is ever pickled.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import msgpack

__all__ = [
    "MessageType", "EntryType", "Entry", "HardState", "ConfState", "SnapshotMetadata",
    "Snapshot", "ConfChangeType", "ConfChange", "Message", "DecodeError",
    "encode_message", "decode_message", "encode_entry", "decode_entry",
    "encode_conf_change", "decode_conf_change", "encode_snapshot", "decode_snapshot",
    "MAX_DECODE_BYTES",
]

#: Upper bound on one encoded value the decoder accepts (a frame limit for the transport).
MAX_DECODE_BYTES = 256 << 20


class MessageType(enum.IntEnum):
    HUP = 0  # local only: start an election
    PRE_VOTE = 1
    PRE_VOTE_RESP = 2
    VOTE = 3
    VOTE_RESP = 4
    APPEND = 5
    APPEND_RESP = 6
    HEARTBEAT = 7
    HEARTBEAT_RESP = 8
    SNAPSHOT = 9
    TIMEOUT_NOW = 10
    READ_INDEX = 11
    READ_INDEX_RESP = 12
    TRANSFER_LEADER = 13
    PROPOSE = 14  # local only: proposals to followers raise, they are not forwarded


class EntryType(enum.IntEnum):
    NORMAL = 0
    CONF_CHANGE = 1


@dataclass(frozen=True, slots=True)
class Entry:
    """One log entry. An empty NORMAL entry is the no-op a new leader appends in its term."""

    term: int
    index: int
    type: EntryType = EntryType.NORMAL
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class HardState:
    """What must be durable before any message that depends on it leaves the node."""

    term: int = 0
    vote: int = 0  # 0 = voted for nobody in this term
    commit: int = 0


@dataclass(frozen=True, slots=True)
class ConfState:
    """A membership configuration. ``voters_outgoing`` is non-empty only in a joint config;
    ``learners_next`` (an addition to etcd's naming contract) holds voters that become learners
    when the joint config is left."""

    voters: tuple[int, ...]
    learners: tuple[int, ...] = ()
    voters_outgoing: tuple[int, ...] = ()
    auto_leave: bool = False
    learners_next: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class SnapshotMetadata:
    index: int
    term: int
    conf_state: ConfState


@dataclass(frozen=True, slots=True)
class Snapshot:
    metadata: SnapshotMetadata
    data: bytes


class ConfChangeType(enum.IntEnum):
    ADD_VOTER = 0
    REMOVE_VOTER = 1
    ADD_LEARNER = 2


@dataclass(frozen=True, slots=True)
class ConfChange:
    """One change = a single-server change; several = joint consensus (left automatically);
    no change at all = "leave the joint configuration" (proposed by the leader itself)."""

    changes: tuple[tuple[ConfChangeType, int], ...]


@dataclass(frozen=True, slots=True)
class Message:
    type: MessageType
    to: int
    frm: int
    term: int
    log_term: int = 0
    index: int = 0
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    reject: bool = False
    reject_hint: int = 0
    snapshot: Snapshot | None = None
    context: bytes = b""


class DecodeError(ValueError):
    """Raised for any malformed input to a ``decode_*`` function; drop the frame."""


# ---------------------------------------------------------------------------------------
# encoding: values -> plain msgpack arrays


def _entry_to_list(e: Entry) -> list[Any]:
    return [e.term, e.index, int(e.type), e.data]


def _conf_state_to_list(cs: ConfState) -> list[Any]:
    return [list(cs.voters), list(cs.learners), list(cs.voters_outgoing), cs.auto_leave,
            list(cs.learners_next)]


def _snapshot_to_list(s: Snapshot) -> list[Any]:
    md = s.metadata
    return [md.index, md.term, _conf_state_to_list(md.conf_state), s.data]


def encode_entry(e: Entry) -> bytes:
    return msgpack.packb(_entry_to_list(e), use_bin_type=True)


def encode_conf_change(cc: ConfChange) -> bytes:
    return msgpack.packb([[int(t), n] for t, n in cc.changes], use_bin_type=True)


def encode_snapshot(s: Snapshot) -> bytes:
    return msgpack.packb(_snapshot_to_list(s), use_bin_type=True)


def encode_message(m: Message) -> bytes:
    snap = None if m.snapshot is None else _snapshot_to_list(m.snapshot)
    return msgpack.packb(
        [int(m.type), m.to, m.frm, m.term, m.log_term, m.index,
         [[e.term, e.index, int(e.type), e.data] for e in m.entries],
         m.commit, m.reject, m.reject_hint, snap, m.context],
        use_bin_type=True,
    )


# ---------------------------------------------------------------------------------------
# decoding: strict checks, DecodeError only


def _unpack(b: bytes) -> Any:
    if not isinstance(b, (bytes, bytearray, memoryview)):
        raise DecodeError(f"expected bytes, got {type(b).__name__}")
    if len(b) > MAX_DECODE_BYTES:
        raise DecodeError(f"value of {len(b)} bytes exceeds the {MAX_DECODE_BYTES}-byte limit")
    try:
        return msgpack.unpackb(b, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types; normalise them
        raise DecodeError(f"not a valid msgpack value: {exc.__class__.__name__}: {exc}") from None


def _uint(v: Any, what: str) -> int:
    if type(v) is not int or v < 0 or v >= 1 << 63:
        raise DecodeError(f"{what} must be an unsigned 63-bit integer, got {v!r:.40}")
    return v


def _bytes(v: Any, what: str) -> bytes:
    if type(v) is not bytes:
        raise DecodeError(f"{what} must be bytes, got {type(v).__name__}")
    return v


def _bool(v: Any, what: str) -> bool:
    if type(v) is not bool:
        raise DecodeError(f"{what} must be a bool, got {type(v).__name__}")
    return v


def _array(v: Any, what: str, n: int | None = None) -> list[Any]:
    if type(v) is not list or (n is not None and len(v) != n):
        want = "an array" if n is None else f"an array of {n}"
        raise DecodeError(f"{what} must be {want}, got {v!r:.60}")
    return v


def _enum(cls: type[enum.IntEnum], v: Any, what: str) -> Any:
    try:
        return cls(_uint(v, what))
    except ValueError:
        raise DecodeError(f"{what}: {v!r} is not a valid {cls.__name__}") from None


def _ids(v: Any, what: str) -> tuple[int, ...]:
    return tuple(_uint(x, what) for x in _array(v, what))


def _entry_from(v: Any) -> Entry:
    t, i, k, d = _array(v, "entry", 4)
    return Entry(_uint(t, "entry.term"), _uint(i, "entry.index"),
                 _enum(EntryType, k, "entry.type"), _bytes(d, "entry.data"))


def _conf_state_from(v: Any) -> ConfState:
    voters, learners, outgoing, auto_leave, learners_next = _array(v, "conf_state", 5)
    return ConfState(_ids(voters, "voters"), _ids(learners, "learners"),
                     _ids(outgoing, "voters_outgoing"), _bool(auto_leave, "auto_leave"),
                     _ids(learners_next, "learners_next"))


def _snapshot_from(v: Any) -> Snapshot:
    index, term, cs, data = _array(v, "snapshot", 4)
    md = SnapshotMetadata(_uint(index, "snapshot.index"), _uint(term, "snapshot.term"),
                          _conf_state_from(cs))
    return Snapshot(md, _bytes(data, "snapshot.data"))


def decode_entry(b: bytes) -> Entry:
    return _entry_from(_unpack(b))


def decode_snapshot(b: bytes) -> Snapshot:
    return _snapshot_from(_unpack(b))


def decode_conf_change(b: bytes) -> ConfChange:
    v = _array(_unpack(b), "conf_change")
    out = []
    for c in v:
        t, n = _array(c, "conf_change item", 2)
        out.append((_enum(ConfChangeType, t, "conf_change.type"), _uint(n, "conf_change.node")))
    return ConfChange(tuple(out))


def decode_message(b: bytes) -> Message:
    """Decode one message; raises :class:`DecodeError` on anything malformed."""
    v = _array(_unpack(b), "message", 12)
    typ, to, frm, term, log_term, index, ents, commit, reject, hint, snap, ctx = v
    return Message(
        type=_enum(MessageType, typ, "type"),
        to=_uint(to, "to"),
        frm=_uint(frm, "frm"),
        term=_uint(term, "term"),
        log_term=_uint(log_term, "log_term"),
        index=_uint(index, "index"),
        entries=tuple(_entry_from(e) for e in _array(ents, "entries")),
        commit=_uint(commit, "commit"),
        reject=_bool(reject, "reject"),
        reject_hint=_uint(hint, "reject_hint"),
        snapshot=None if snap is None else _snapshot_from(snap),
        context=_bytes(ctx, "context"),
    )
