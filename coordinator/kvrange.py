"""Range reads and transactions over the key-value store (etcd's Range and Txn, issue 16).

Theory of operation
-------------------
The store (:class:`coordinator.statemachine.StateMachine`) keeps its keys in a dict in log
order. A range needs them sorted, so the state machine keeps a sorted list of the keys as a
cache: built on the first range after a key was created or deleted (a value update leaves it
valid), then searched with ``bisect``. It is derived state, never snapshotted, and the same on
every replica because the dict is.

``range`` is a read-only query (``{"op": "query", "ext": "kv", "name": "range", ...}``),
answered like a ``get``: linearizable through a ReadIndex round by default, or stale. Its
arguments follow etcd's RangeRequest: ``start`` alone is one key; ``end`` makes it the
half-open interval ``[start, end)`` (``end == b"\\0"``: every key from ``start`` on);
``prefix`` makes ``end`` the first key after every key that starts with ``start`` (an empty
``start`` with ``prefix``: every key). ``limit`` (0: none) and the answer's byte budget bound
what comes back; ``more`` says keys were left out and ``count`` how many match in all, so a
client pages by asking again from the last key returned plus a zero byte. ``keys_only`` leaves
the values out, ``count_only`` the keys. ``revision`` reads the range as it was at a past
revision: the store keeps a history of changes (what each key held before each revision that
changed it; bounded, see ``MAX_HISTORY_*`` in :mod:`coordinator.statemachine`) and undoes the
newer ones. A revision older than the history (``compact`` or the bound dropped it) is refused
with ``compacted``, one ahead of the store with ``future_revision``.

``txn`` is a session command (exactly once, like ``put``): ``compare`` is a list of
``[key, target, op, operand]`` with ``target`` in ``value | version | create | mod`` and ``op``
in ``== != < >``; if every comparison holds, the ``success`` ops run, else the ``failure`` ops,
each ``["put", key, value] | ["delete", key, end, prefix] | ["get", key, end, prefix, limit,
keys_only, count_only]``. As in etcd, a comparison on a missing key sees version, create and mod
revision 0 and fails on ``value``; the whole transaction is one revision (every key it writes
gets the same ``mod_revision``), a key may be written at most once in it, and it is checked
whole before anything is applied: a bad op or a key quota refuses it with nothing changed.
The answer holds ``succeeded``, each op's answer in order, and the revision after it.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Any

from coordinator import leases

if TYPE_CHECKING:  # pragma: no cover
    from coordinator.statemachine import Answer, Command, StateMachine

#: Keys one range answer returns at most (a limit above it is cut to it).
MAX_RANGE_KEYS = 10_000
#: Bytes of keys and values one range answer carries at most (well under a transport frame).
MAX_RANGE_ANSWER_BYTES = 512 << 10
#: Comparisons and ops (each branch) one transaction holds at most (etcd's default is 128).
MAX_TXN_OPS = 128
TARGETS = ("value", "version", "create", "mod")
OPS = ("==", "!=", "<", ">")


class BadRange(ValueError):
    """A range or transaction argument that is not valid (the answer says which)."""


def prefix_end(prefix: bytes) -> bytes:
    """The first key after every key that starts with ``prefix`` (``b"\\0"``: no end)."""
    p = bytearray(prefix)
    while p:
        if p[-1] < 0xFF:
            p[-1] += 1
            return bytes(p)
        p.pop()
    return b"\0"


def key_bounds(start: Any, end: Any, prefix: Any) -> tuple[bytes, bytes | None]:
    """(start, end): ``end`` None is the single key ``start``; ``b"\\0"`` is no upper bound."""
    if not isinstance(start, bytes) or not isinstance(prefix, bool):
        raise BadRange("a range needs start (bytes) and prefix (a bool)")
    if end is not None and not isinstance(end, bytes):
        raise BadRange("a range's end must be bytes or None")
    if prefix:
        if end is not None:
            raise BadRange("give a range either an end or prefix=True, not both")
        return start, prefix_end(start) if start else b"\0"
    if not start and end is None:
        raise BadRange("an empty key needs an end or prefix=True (every key)")
    return start, end


def matching(sm: StateMachine, start: bytes, end: bytes | None) -> list[bytes]:
    """The keys of ``[start, end)`` (or the key ``start`` when ``end`` is None), sorted."""
    if end is None:
        return [start] if start in sm.kv else []
    keys = sm.sorted_keys()
    lo = bisect.bisect_left(keys, start)
    hi = len(keys) if end == b"\0" else bisect.bisect_left(keys, end)
    return keys[lo:max(lo, hi)]


def range_answer(sm: StateMachine, start: Any, end: Any = None, prefix: Any = False, limit: Any = 0,
                 keys_only: Any = False, count_only: Any = False, revision: Any = None) -> Answer:
    """The answer to a ``range`` query (see the module doc)."""
    try:
        lo, hi = key_bounds(start, end, prefix)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise BadRange("limit must be an integer >= 0 (0: no limit)")
        if not isinstance(keys_only, bool) or not isinstance(count_only, bool):
            raise BadRange("keys_only and count_only must be bools")
    except BadRange as exc:
        return {"ok": False, "error": "bad_range", "detail": str(exc)}
    records: dict[bytes, Any] | None = None  # at a past revision: key -> its record then
    if revision is not None and revision != sm.revision:
        if not isinstance(revision, int) or isinstance(revision, bool) or revision <= 0:
            return {"ok": False, "error": "bad_range", "detail": "revision must be an integer > 0"}
        if revision > sm.revision:
            return {"ok": False, "error": "future_revision",
                    "detail": f"revision {revision} is ahead of the store's ({sm.revision})"}
        if revision < sm.compacted:
            return {"ok": False, "error": "compacted",
                    "detail": f"revision {revision} has been compacted: the history starts at "
                              f"{sm.compacted} (read at a later revision, or without revision=)"}
        records = at_revision(sm, lo, hi, revision)
        keys = sorted(records)
    else:
        keys = matching(sm, lo, hi)
    kvs: list[list[Any]] = []
    if not count_only:
        cap = min(limit or MAX_RANGE_KEYS, MAX_RANGE_KEYS)
        size = 0
        for key in keys[:cap]:
            rec = sm.kv[key] if records is None else records[key]
            value = None if keys_only else rec.value
            size += len(key) + (len(value) if value is not None else 0) + 32
            if kvs and size > MAX_RANGE_ANSWER_BYTES:
                break
            lease = sm.key_lease.get(key, 0) if records is None else 0
            kvs.append([key, value, rec.create_revision, rec.mod_revision, rec.version, lease])
    more = len(kvs) < len(keys) and not count_only
    return {"ok": True, "kvs": kvs, "count": len(keys), "more": more,
            "revision": sm.revision if revision is None else revision}


def at_revision(sm: StateMachine, start: bytes, end: bytes | None, revision: int) -> dict[bytes, Any]:
    """The records of the keys in range as they were at ``revision``: today's, with every
    change after ``revision`` undone, newest first (``sm.history``)."""
    def inside(key: bytes) -> bool:
        if end is None:
            return key == start
        return key >= start and (end == b"\0" or key < end)

    state: dict[bytes, Any] = {key: sm.kv[key] for key in matching(sm, start, end)}
    for rev, key, prev in reversed(sm.history):
        if rev <= revision:
            break
        if inside(key):
            if prev is None:
                state.pop(key, None)
            else:
                state[key] = prev
    return state


# ------------------------------------------------------------------ watches
_ABSENT = object()


def events_answer(sm: StateMachine, start: Any, end: Any, prefix: Any, from_revision: Any,
                  max_events: Any, skip: Any = 0) -> Answer:
    """The ``kv.events`` query behind watches: every change to a key in range at revision
    ``from_revision`` or later, oldest first, each ``[type, key, value, create, mod, version,
    lease, prev]`` (``prev``: the record before, ``[value, create, mod, version]`` or None), at
    most about ``max_events`` of them, in whole revisions (a transaction's or a lease
    revocation's changes come together) unless one revision holds more than an answer's byte
    budget (:data:`MAX_RANGE_ANSWER_BYTES`; a 1 MB value and its 1 MB predecessor still come in
    one event): it is then split over answers. ``next`` (and ``skip``: how many events of
    revision ``next`` were already returned) is where to ask from next time: past the last
    event returned, or past the store's revision when nothing was left out, so a watcher
    resumes (on any node, after any reconnect) with no gap and no repeat.
    ``from_revision`` 0 means "from now". A revision older than the kept history is refused
    with ``compacted`` (its ``compact_revision`` says where the history starts)."""
    try:
        lo, hi = key_bounds(start, end, prefix)
        if not isinstance(from_revision, int) or isinstance(from_revision, bool) or from_revision < 0:
            raise BadRange("from_revision must be an integer >= 0 (0: from now)")
        if not isinstance(max_events, int) or isinstance(max_events, bool) or max_events <= 0:
            raise BadRange("max_events must be an integer > 0")
        if not isinstance(skip, int) or isinstance(skip, bool) or skip < 0:
            raise BadRange("skip must be an integer >= 0")
    except BadRange as exc:
        return {"ok": False, "error": "bad_range", "detail": str(exc)}
    if from_revision == 0:
        from_revision = sm.revision + 1
    if from_revision <= sm.compacted:
        return {"ok": False, "error": "compacted", "compact_revision": sm.compacted + 1,
                "detail": f"revision {from_revision} has been compacted: the history starts at "
                          f"{sm.compacted + 1} (the watcher fell behind the kept history; watch "
                          "again from a later revision after reading the current state)"}

    def inside(key: bytes) -> bool:
        if hi is None:
            return key == lo
        return key >= lo and (hi == b"\0" or key < hi)

    found: list[tuple[int, bytes, Any, Any]] = []
    after: dict[bytes, Any] = {}  # walking back: what each key held after the newer change
    for rev, key, prev in reversed(sm.history):
        if rev < from_revision:
            break
        now = after.get(key, _ABSENT)
        if now is _ABSENT:
            now = sm.kv.get(key)
        if inside(key):
            found.append((rev, key, now, prev))
        after[key] = prev
    found.reverse()
    if skip:  # events of from_revision an earlier answer returned (a split revision)
        seen = sum(1 for event in found[:skip] if event[0] == from_revision)
        found = found[seen:]
    cap = min(max_events, MAX_RANGE_KEYS)
    out: list[list[Any]] = []
    size = 0
    for i, (rev, key, now, prev) in enumerate(found):
        boundary = i > 0 and rev != found[i - 1][0]
        weight = len(key) + (len(now.value) if now is not None else 0) + (
            len(prev.value) if prev is not None else 0) + 48
        if out and ((boundary and len(out) >= cap) or size + weight > MAX_RANGE_ANSWER_BYTES):
            if boundary:
                return {"ok": True, "events": out, "next": found[i - 1][0] + 1, "skip": 0,
                        "revision": sm.revision}
            done = sum(1 for event in out if event[4] == rev) + (skip if rev == from_revision else 0)
            return {"ok": True, "events": out, "next": rev, "skip": done, "revision": sm.revision}
        lease = sm.key_lease.get(key, 0) if now is not None and sm.kv.get(key) is now else 0
        out.append(["delete" if now is None else "put", key,
                    None if now is None else now.value,
                    0 if now is None else now.create_revision, rev,
                    0 if now is None else now.version, lease,
                    None if prev is None else [prev.value, prev.create_revision,
                                               prev.mod_revision, prev.version]])
        size += weight
    return {"ok": True, "events": out, "next": max(from_revision, sm.revision + 1), "skip": 0,
            "revision": sm.revision}


# ------------------------------------------------------------------ transactions
def _compare(sm: StateMachine, c: Any) -> bool:
    if not isinstance(c, (list, tuple)) or len(c) != 4:
        raise BadRange("a comparison is [key, target, op, operand]")
    key, target, op, operand = c
    if not isinstance(key, bytes) or not key:
        raise BadRange("a comparison's key must be non-empty bytes")
    if target not in TARGETS or op not in OPS:
        raise BadRange(f"a comparison's target is one of {TARGETS} and its op one of {OPS}, "
                       f"got {target!r} {op!r}")
    if target == "value":
        if not isinstance(operand, bytes):
            raise BadRange("a value comparison's operand must be bytes")
    elif not isinstance(operand, int) or isinstance(operand, bool):
        raise BadRange(f"a {target} comparison's operand must be an integer")
    rec = sm.kv.get(key)
    if rec is None and target == "value":
        return False  # etcd: a missing key's value compares false whatever the op
    have: Any = {"value": rec.value if rec else None, "version": rec.version if rec else 0,
                 "create": rec.create_revision if rec else 0, "mod": rec.mod_revision if rec else 0}[target]
    return {"==": have == operand, "!=": have != operand, "<": have < operand, ">": have > operand}[op]


def _check_op(sm: StateMachine, op: Any) -> None:
    if not isinstance(op, (list, tuple)) or not op or op[0] not in ("put", "delete", "get"):
        raise BadRange('a transaction op is ["put", key, value], ["delete", key, end, prefix] or '
                       '["get", key, end, prefix, limit, keys_only, count_only]')
    if op[0] == "put":
        if len(op) not in (3, 4):
            raise BadRange('put is ["put", key, value] or ["put", key, value, lease]')
        bad = sm._check_key_value(op[1], op[2])
        if bad is not None or op[2] is None:
            raise BadRange(f"put: {bad['detail'] if bad else 'a value is needed'}")
        bad = leases.check_lease(sm, op[3] if len(op) == 4 else 0)
        if bad is not None:
            raise BadRange(f"put: {bad['detail']}")
    elif op[0] == "delete":
        if len(op) != 4:
            raise BadRange('delete is ["delete", key, end, prefix]')
        key_bounds(op[1], op[2], op[3])
    else:
        if len(op) != 7:
            raise BadRange('get is ["get", key, end, prefix, limit, keys_only, count_only]')
        key_bounds(op[1], op[2], op[3])
        if not isinstance(op[4], int) or isinstance(op[4], bool) or op[4] < 0 \
                or not isinstance(op[5], bool) or not isinstance(op[6], bool):
            raise BadRange("get: limit is an integer >= 0, keys_only and count_only bools")


def _written(sm: StateMachine, ops: list[Any]) -> list[bytes]:
    """Every key the ops write, in order (a delete of a range: the keys it holds now)."""
    out: list[bytes] = []
    for op in ops:
        if op[0] == "put":
            out.append(op[1])
        elif op[0] == "delete":
            out.extend(matching(sm, *key_bounds(op[1], op[2], op[3])))
    return out


def txn(sm: StateMachine, cmd: Command, index: int) -> Answer:
    """The ``txn`` session command (see the module doc)."""
    if len(cmd.args) != 3:
        return {"ok": False, "error": "bad_command", "detail": "txn takes (compare, success, failure)"}
    compare, success, failure = cmd.args
    try:
        for name, part in (("compare", compare), ("success", success), ("failure", failure)):
            if not isinstance(part, (list, tuple)) or len(part) > MAX_TXN_OPS:
                raise BadRange(f"{name} must be a list of at most {MAX_TXN_OPS} items")
        for op in [*success, *failure]:
            _check_op(sm, op)
        succeeded = all([_compare(sm, c) for c in compare])  # every comparison checked
        ops = success if succeeded else failure
        written = _written(sm, ops)
        if len(set(written)) != len(written):
            raise BadRange("a transaction may write each key at most once")
        new_keys = {op[1] for op in ops if op[0] == "put" and op[1] not in sm.kv}
        if len(sm.kv) + len(new_keys) > sm.max_keys():
            return {"ok": False, "error": "quota_exceeded",
                    "detail": f"the store holds its limit of {sm.max_keys()} keys; delete keys first"}
    except BadRange as exc:
        return {"ok": False, "error": "bad_txn", "detail": str(exc)}
    revision = sm.revision + 1 if written else sm.revision  # one revision for the whole txn
    sm.revision = revision
    responses: list[dict[str, Any]] = []
    for op in ops:
        if op[0] == "put":
            sm._put_at(op[1], op[2], revision, op[3] if len(op) == 4 else 0)
            responses.append({"op": "put", "revision": revision})
        elif op[0] == "delete":
            keys = matching(sm, *key_bounds(op[1], op[2], op[3]))
            for key in keys:
                sm._delete_at(key, revision)
            responses.append({"op": "delete", "deleted": len(keys)})
        else:
            answer = range_answer(sm, *op[1:])
            answer.pop("ok", None)
            responses.append({"op": "get", **answer})
    return {"ok": True, "succeeded": succeeded, "responses": responses, "revision": sm.revision}
