"""Leases: keys that live only while a client keeps them alive (etcd's leases, issue 16).

Theory of operation
-------------------
A lease is ``(id, ttl_ms, expiry_ms, keys)`` in the replicated state
(:class:`coordinator.statemachine.StateMachine` ``leases``). Every change to it is a command
in the log, so every replica holds the same leases:

- ``lease.grant(ttl_ms, id)`` creates one (``id`` 0: the grant entry's log index, unique);
  it expires at ``clock_ms + ttl_ms``, where ``clock_ms`` is the replicated clock (the
  proposing leader's wall clock, never read by a replica itself; see the state machine).
- ``lease.keepalive(id)`` moves the expiry to ``clock_ms + ttl_ms``; ``put(key, value,
  lease)`` attaches a key (a put without a lease detaches it; a delete drops it).
- ``lease.revoke(id)`` deletes the lease and every key attached to it, in one revision
  (a watcher sees the deletes together).
- ``lease.expire(*ids)`` is the leader's: it revokes each named lease whose expiry is at or
  before the command's clock, and leaves alone one a keepalive committed before it moved on.

Expiry is *decided* by the leader (:meth:`coordinator.server.CoordinatorServer._expire_leases`):
it proposes ``lease.expire`` for leases whose expiry has passed on its own clock, and the
check above runs again at apply, from the log alone, so a replica never expires a lease on its
own and two replicas never disagree. A new leader first waits one election timeout past its
election before it expires anything (etcd's rule): keepalives could reach no leader during the
election, so a client that keeps its lease alive never loses it to a leader change.

The leader finds due leases in an expiry heap of ``(expiry_ms, id)`` (:func:`due`), not by a
scan of every lease: it is built from ``sm.leases`` on the first look (and again whenever that
dict was replaced by a restore), grants and keepalives push to it once it exists, and an entry
whose lease is gone or has a later expiry is dropped when it reaches the top. The heap is an
index only, never snapshotted or replicated; a replica that never led never builds one.

Clocks: expiry compares leaders' wall clocks. On one machine, or with synchronized clocks,
that is exact; a new leader whose clock runs ahead of the old one's expires leases early by the
difference (etcd has the same limit).
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from coordinator.statemachine import Answer, Command, StateMachine

MIN_TTL_MS = 500
MAX_TTL_MS = 10 * 365 * 24 * 3600 * 1000
MAX_LEASES = 100_000
MAX_EXPIRE_BATCH = 1024  # leases one lease.expire command names at most
MAX_LEASE_ID = (1 << 63) - 1


@dataclasses.dataclass(slots=True)
class Lease:
    """One lease: its TTL, when it expires on the replicated clock, the keys attached (a dict
    for its deterministic insertion order)."""

    ttl_ms: int
    expiry_ms: int
    keys: dict[bytes, None] = dataclasses.field(default_factory=dict)


def _err(code: str, detail: str) -> Answer:
    return {"ok": False, "error": code, "detail": detail}


def _lease_id(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_LEASE_ID:
        return value
    return None


def not_found(lease_id: Any) -> Answer:
    return _err("lease_not_found", f"lease {lease_id!r} does not exist (it expired, was revoked "
                                   "or never granted); grant a new one")


def grant(sm: StateMachine, cmd: Command, index: int) -> Answer:
    if len(cmd.args) != 2:
        return _err("bad_command", "lease.grant takes (ttl_ms, id)")
    ttl_ms, wanted = cmd.args
    if not isinstance(ttl_ms, int) or isinstance(ttl_ms, bool) or not MIN_TTL_MS <= ttl_ms <= MAX_TTL_MS:
        return _err("bad_ttl", f"a lease's TTL must be {MIN_TTL_MS / 1000:g} s .. "
                               f"{MAX_TTL_MS // 1000} s, got {ttl_ms!r} ms")
    lease_id = index if wanted == 0 else _lease_id(wanted)
    if lease_id is None:
        return _err("bad_lease", f"a lease id is an integer in 1..{MAX_LEASE_ID} (0: pick one)")
    if lease_id in sm.leases:
        return _err("lease_exists", f"lease {lease_id} already exists; pick another id or 0")
    if len(sm.leases) >= MAX_LEASES:
        return _err("quota_exceeded", f"the store holds its limit of {MAX_LEASES} leases; "
                                      "revoke some first")
    sm.leases[lease_id] = Lease(ttl_ms, sm.clock_ms + ttl_ms)
    _index(sm, lease_id, sm.clock_ms + ttl_ms)
    return {"ok": True, "id": lease_id, "ttl_ms": ttl_ms}


def keepalive(sm: StateMachine, cmd: Command, index: int) -> Answer:
    if len(cmd.args) != 1:
        return _err("bad_command", "lease.keepalive takes (id,)")
    lease = sm.leases.get(cmd.args[0]) if _lease_id(cmd.args[0]) else None
    if lease is None:
        return not_found(cmd.args[0])
    lease.expiry_ms = sm.clock_ms + lease.ttl_ms
    _index(sm, cmd.args[0], lease.expiry_ms)
    return {"ok": True, "id": cmd.args[0], "ttl_ms": lease.ttl_ms}


def revoke_now(sm: StateMachine, lease_id: int) -> int:
    """Delete the lease and its keys, all at one new revision; the number of keys deleted."""
    lease = sm.leases.pop(lease_id)
    keys = list(lease.keys)
    if keys:
        sm.revision += 1
        for key in keys:
            sm.key_lease.pop(key, None)
            sm._delete_at(key, sm.revision)
    return len(keys)


def revoke(sm: StateMachine, cmd: Command, index: int) -> Answer:
    if len(cmd.args) != 1:
        return _err("bad_command", "lease.revoke takes (id,)")
    if not _lease_id(cmd.args[0]) or cmd.args[0] not in sm.leases:
        return not_found(cmd.args[0])
    deleted = revoke_now(sm, cmd.args[0])
    return {"ok": True, "deleted": deleted, "revision": sm.revision}


def expire(sm: StateMachine, cmd: Command, index: int) -> Answer:
    """The leader's ``lease.expire``: revoke the named leases that are due on the log's clock."""
    expired = []
    for lease_id in cmd.args[:MAX_EXPIRE_BATCH]:
        lease = sm.leases.get(lease_id) if _lease_id(lease_id) else None
        if lease is not None and lease.expiry_ms <= sm.clock_ms:
            revoke_now(sm, lease_id)
            expired.append(lease_id)
    return {"ok": True, "expired": expired, "revision": sm.revision}


def attach(sm: StateMachine, key: bytes, lease_id: int) -> None:
    """After a put: ``key`` belongs to ``lease_id`` (0: to no lease)."""
    old = sm.key_lease.pop(key, 0) if sm.key_lease else 0
    if old:
        sm.leases[old].keys.pop(key, None)
    if lease_id:
        sm.key_lease[key] = lease_id
        sm.leases[lease_id].keys[key] = None


def detach(sm: StateMachine, key: bytes) -> None:
    """After a delete: ``key`` belongs to no lease."""
    if sm.key_lease:
        old = sm.key_lease.pop(key, 0)
        if old and old in sm.leases:
            sm.leases[old].keys.pop(key, None)


def check_lease(sm: StateMachine, lease_id: Any) -> Answer | None:
    """None if ``lease_id`` may be given to a put (0 or a live lease), else the error."""
    if lease_id == 0 and not isinstance(lease_id, bool):
        return None
    if _lease_id(lease_id) is None or lease_id not in sm.leases:
        return not_found(lease_id)
    return None


def time_to_live(sm: StateMachine, lease_id: Any, with_keys: Any = False) -> Answer:
    """The ``kv.lease`` query: a lease's TTL, what is left of it on the replicated clock (the
    last applied command's time; it can lag real time when the store is idle) and its keys."""
    lease = sm.leases.get(lease_id) if _lease_id(lease_id) else None
    if lease is None:
        return not_found(lease_id)
    answer: dict[str, Any] = {"ok": True, "id": lease_id, "ttl_ms": lease.ttl_ms,
                              "remaining_ms": max(0, lease.expiry_ms - sm.clock_ms),
                              "keys_count": len(lease.keys)}
    if with_keys:
        answer["keys"] = list(lease.keys)[:10_000]
    return answer


def lease_list(sm: StateMachine) -> Answer:
    return {"ok": True, "leases": list(sm.leases)[:10_000], "count": len(sm.leases)}


def snapshot_state(sm: StateMachine) -> list[list[Any]]:
    return [[lid, lease.ttl_ms, lease.expiry_ms, list(lease.keys)] for lid, lease in sm.leases.items()]


def restore_state(sm: StateMachine, state: list[list[Any]]) -> None:
    sm.leases, sm.key_lease = {}, {}
    for lid, ttl_ms, expiry_ms, keys in state:
        sm.leases[lid] = Lease(ttl_ms, expiry_ms, dict.fromkeys(keys))
        for key in keys:
            sm.key_lease[key] = lid


def due(sm: StateMachine, now_ms: int, limit: int = MAX_EXPIRE_BATCH) -> list[int]:
    """The ids of up to ``limit`` leases whose expiry is at or before ``now_ms``, earliest
    first (the leader's look): O(due * log n) from the expiry heap, not a scan of every lease.
    They stay in the heap (a proposal to expire them may be lost) until applied."""
    heap = _heap(sm)
    out: list[int] = []
    live: list[tuple[int, int]] = []
    while heap and heap[0][0] <= now_ms and len(out) < limit:
        expiry_ms, lid = heapq.heappop(heap)
        lease = sm.leases.get(lid)
        if lease is None or lease.expiry_ms != expiry_ms or (live and live[-1] == (expiry_ms, lid)):
            continue  # revoked, expired, kept alive since, or a duplicate: let it go
        out.append(lid)
        live.append((expiry_ms, lid))
    for entry in live:
        heapq.heappush(heap, entry)
    return out


def _heap(sm: StateMachine) -> list[tuple[int, int]]:
    """``sm``'s expiry heap, (re)built if there is none, ``sm.leases`` was replaced (a
    restore), or stale entries outnumber the live ones."""
    heap = sm.lease_heap
    if heap is None or sm.lease_heap_of is not sm.leases or len(heap) > 2 * len(sm.leases) + 1024:
        heap = [(lease.expiry_ms, lid) for lid, lease in sm.leases.items()]
        heapq.heapify(heap)
        sm.lease_heap, sm.lease_heap_of = heap, sm.leases
    return heap


def _index(sm: StateMachine, lease_id: int, expiry_ms: int) -> None:
    """A lease's new expiry into the heap, if one is kept (built by :func:`due`)."""
    if sm.lease_heap is not None and sm.lease_heap_of is sm.leases:
        heapq.heappush(sm.lease_heap, (expiry_ms, lease_id))
