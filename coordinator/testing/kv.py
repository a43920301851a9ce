"""The simulator's replicated state machine: a tiny key-value register store with sessions.

Theory of operation
-------------------
Every simulated node applies the committed log to its own :class:`SimKV`. A command is the
msgpack array ``[client, seq, op, key, a, b]`` (``op`` ``"w"``: write ``a``; ``"c"``: compare
``a`` and swap in ``b``). Client sessions make a retried command apply once (Raft thesis
§6.3): each client numbers its commands, has at most one outstanding, and the store keeps per
client the last sequence number applied and its result. A command with that number again is
answered from the cache; one with a lower number is stale (its client gave up on it long ago)
and is ignored. The session table is bounded by the simulator's number of clients.

Leases mirror the server's (:mod:`coordinator.leases`), in simulated time units. A command
may carry a seventh element, ``ts``: the proposing node's clock when it proposed it; the
*log clock* ``clock`` is the largest ``ts`` applied so far, read from the log alone, so every
replica has the same one. The lease commands:

- ``"g"``: grant lease ``a`` (an id the client picks) with TTL ``b``; it expires at
  ``clock + b``. Answers True, or :data:`LEASE_EXISTS`.
- ``"k"``: keepalive lease ``a``: its expiry becomes ``clock + ttl``. True or
  :data:`LEASE_NOT_FOUND`.
- ``"W"``: write ``a`` to ``key`` and attach the key to lease ``b`` (a plain write detaches
  it). True or :data:`LEASE_NOT_FOUND`.
- ``"x"``: the leader's expire of the leases listed in ``a`` (client 0, outside any session):
  each one whose expiry is at or before the log clock *at this entry* is revoked with its keys;
  one that a keepalive committed earlier moved on stays. Answers the list revoked.

Empty entries (a leader's no-op) and entries of another format change nothing.

``SimKV(dedup=False)`` (applies retries again), ``SimKV(lossy_snapshot=True)`` (its
snapshots forget a key) and ``SimKV(expire_check=False)`` (an expire revokes what it names
without checking the log clock) are deliberately broken variants that prove the checkers
catch a broken state machine.
"""

from __future__ import annotations

from typing import Any

import msgpack

__all__ = [
    "LEASE_EXISTS",
    "LEASE_NOT_FOUND",
    "LEASE_OPS",
    "STALE",
    "SimKV",
    "decode_command",
    "encode_command",
]

STALE = "stale"  # the answer for a command older than the client's last one
LEASE_NOT_FOUND = "lease_not_found"
LEASE_EXISTS = "lease_exists"
LEASE_OPS = ("g", "k", "W", "x")
MAX_SESSIONS = 10_000
_OPS = ("w", "c", *LEASE_OPS)


def encode_command(
    client: int, seq: int, op: str, key: str, a: Any = None, b: Any = None, ts: int | None = None
) -> bytes:
    """The entry data of a command; ``ts`` (the proposer's clock) is left out when None, which
    keeps the bytes of lease-less runs what they always were."""
    cmd = [client, seq, op, key, a, b]
    if ts is not None:
        cmd.append(ts)
    return msgpack.packb(cmd)


def decode_command(data: bytes) -> tuple[int, int, str, str, Any, Any, int | None] | None:
    """The command in ``data`` (``ts`` None if it carries none), or None for a no-op or
    anything not a command."""
    if not data:
        return None
    try:
        cmd = msgpack.unpackb(data)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        return None
    if not (isinstance(cmd, list) and len(cmd) in (6, 7) and cmd[2] in _OPS):
        return None
    if len(cmd) == 6:
        cmd.append(None)
    elif not isinstance(cmd[6], int):
        return None
    return tuple(cmd)


class SimKV:
    """A deterministic KV store of registers with exactly-once client sessions and leases."""

    def __init__(
        self, dedup: bool = True, lossy_snapshot: bool = False, expire_check: bool = True
    ) -> None:
        self.dedup = dedup
        self.lossy_snapshot = lossy_snapshot
        self.expire_check = expire_check
        self.kv: dict[str, Any] = {}
        self.sessions: dict[int, tuple[int, Any]] = {}  # client -> (last seq, its result)
        self.applied = 0
        self.clock = 0  # the log clock: the largest ts applied
        # lease id -> [ttl, expiry on the log clock, {key: None} in attach order], grant order
        self.leases: dict[int, list[Any]] = {}
        self.key_lease: dict[str, int] = {}

    def read(self, key: str) -> Any:
        return self.kv.get(key)

    def apply(self, index: int, data: bytes) -> tuple[int, int, Any] | None:
        """Apply the entry at ``index``; returns ``(client, seq, result)`` for a command.

        ``result`` is True for a write, the swap outcome for a cas, :data:`STALE` for a
        command older than its client's last one, and for lease commands what the module doc
        says (an expire: ``(0, 0, [revoked ids])``). Indexes must arrive in order.
        """
        assert index == self.applied + 1, f"apply index {index} after {self.applied}"
        self.applied = index
        cmd = decode_command(data)
        if cmd is None:
            return None
        client, seq, op, key, a, b, ts = cmd
        if ts is not None and ts > self.clock:
            self.clock = ts
        if op == "x":
            return 0, 0, self._expire(a)
        last = self.sessions.get(client)
        if self.dedup and last is not None and seq <= last[0]:
            return client, seq, (last[1] if seq == last[0] else STALE)
        result: Any = True
        if op == "w":
            self.kv[key] = a
            self._attach(key, 0)
        elif op == "c":
            result = self.kv.get(key) == a
            if result:
                self.kv[key] = b
                self._attach(key, 0)
        elif op == "g":
            if a in self.leases:
                result = LEASE_EXISTS
            else:
                self.leases[a] = [b, self.clock + b, {}]
        elif op == "k":
            lease = self.leases.get(a)
            if lease is None:
                result = LEASE_NOT_FOUND
            else:
                lease[1] = self.clock + lease[0]
        elif b not in self.leases:  # "W"
            result = LEASE_NOT_FOUND
        else:
            self.kv[key] = a
            self._attach(key, b)
        if len(self.sessions) >= MAX_SESSIONS and client not in self.sessions:
            raise RuntimeError(f"more than {MAX_SESSIONS} client sessions in the simulator")
        self.sessions[client] = (seq, result)
        return client, seq, result

    def _attach(self, key: str, lease_id: int) -> None:
        old = self.key_lease.pop(key, 0) if self.key_lease else 0
        if old:
            self.leases[old][2].pop(key, None)
        if lease_id:
            self.key_lease[key] = lease_id
            self.leases[lease_id][2][key] = None

    def _expire(self, ids: Any) -> list[int]:
        revoked = []
        for lid in ids if isinstance(ids, list) else ():
            lease = self.leases.get(lid)
            # BUG on purpose with expire_check=False: a keepalive committed first no longer saves it
            if lease is not None and (lease[1] <= self.clock or not self.expire_check):
                for key in self.leases.pop(lid)[2]:
                    self.key_lease.pop(key, None)
                    self.kv.pop(key, None)
                revoked.append(lid)
        return revoked

    def due(self, now: int) -> list[int]:
        """The leases whose expiry is at or before ``now`` (a leader's scan, on its clock)."""
        return [lid for lid, lease in self.leases.items() if lease[1] <= now]

    def snapshot(self) -> bytes:
        kv = sorted(self.kv.items())
        if self.lossy_snapshot:
            kv = kv[1:]  # BUG on purpose
        sessions = sorted([c, s, r] for c, (s, r) in self.sessions.items())
        if not self.clock and not self.leases:  # the lease-less format, byte for byte
            return msgpack.packb([self.applied, kv, sessions])
        leases = [[lid, ttl, expiry, list(keys)] for lid, (ttl, expiry, keys) in self.leases.items()]
        return msgpack.packb([self.applied, kv, sessions, self.clock, leases])

    def restore(self, data: bytes, index: int) -> None:
        """Replace the state with a snapshot taken at ``index`` (empty data = empty store)."""
        self.kv, self.sessions, self.leases, self.key_lease = {}, {}, {}, {}
        self.applied, self.clock = index, 0
        if not data:
            return
        doc = msgpack.unpackb(data)
        applied, kv, sessions = doc[:3]
        assert applied == index, f"snapshot data at {applied} labelled as index {index}"
        self.kv = {k: v for k, v in kv}
        self.sessions = {c: (s, r) for c, s, r in sessions}
        if len(doc) == 5:
            self.clock = doc[3]
            for lid, ttl, expiry, keys in doc[4]:
                self.leases[lid] = [ttl, expiry, dict.fromkeys(keys)]
                for key in keys:
                    self.key_lease[key] = lid
