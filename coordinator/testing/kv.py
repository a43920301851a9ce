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

Empty entries (a leader's no-op) and entries of another format change nothing.

``SimKV(dedup=False)`` (applies retries again) and ``SimKV(lossy_snapshot=True)`` (its
snapshots forget a key) are deliberately broken variants that prove the checkers catch a
broken state machine.
"""

from __future__ import annotations

from typing import Any

import msgpack

__all__ = ["STALE", "SimKV", "decode_command", "encode_command"]

STALE = "stale"  # the answer for a command older than the client's last one
MAX_SESSIONS = 10_000


def encode_command(client: int, seq: int, op: str, key: str, a: Any = None, b: Any = None) -> bytes:
    return msgpack.packb([client, seq, op, key, a, b])


def decode_command(data: bytes) -> tuple[int, int, str, str, Any, Any] | None:
    """The command in ``data``, or None for a no-op / anything not a command."""
    if not data:
        return None
    try:
        cmd = msgpack.unpackb(data)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        return None
    if not (isinstance(cmd, list) and len(cmd) == 6 and cmd[2] in ("w", "c")):
        return None
    return tuple(cmd)


class SimKV:
    """A deterministic KV store of registers with exactly-once client sessions."""

    def __init__(self, dedup: bool = True, lossy_snapshot: bool = False) -> None:
        self.dedup = dedup
        self.lossy_snapshot = lossy_snapshot
        self.kv: dict[str, Any] = {}
        self.sessions: dict[int, tuple[int, Any]] = {}  # client -> (last seq, its result)
        self.applied = 0

    def read(self, key: str) -> Any:
        return self.kv.get(key)

    def apply(self, index: int, data: bytes) -> tuple[int, int, Any] | None:
        """Apply the entry at ``index``; returns ``(client, seq, result)`` for a command.

        ``result`` is True for a write, the swap outcome for a cas, :data:`STALE` for a
        command older than its client's last one. Indexes must arrive in order.
        """
        assert index == self.applied + 1, f"apply index {index} after {self.applied}"
        self.applied = index
        cmd = decode_command(data)
        if cmd is None:
            return None
        client, seq, op, key, a, b = cmd
        last = self.sessions.get(client)
        if self.dedup and last is not None and seq <= last[0]:
            return client, seq, (last[1] if seq == last[0] else STALE)
        if op == "w":
            self.kv[key] = a
            result: Any = True
        else:
            result = self.kv.get(key) == a
            if result:
                self.kv[key] = b
        if len(self.sessions) >= MAX_SESSIONS and client not in self.sessions:
            raise RuntimeError(f"more than {MAX_SESSIONS} client sessions in the simulator")
        self.sessions[client] = (seq, result)
        return client, seq, result

    def snapshot(self) -> bytes:
        kv = sorted(self.kv.items())
        if self.lossy_snapshot:
            kv = kv[1:]  # BUG on purpose
        sessions = sorted([c, s, r] for c, (s, r) in self.sessions.items())
        return msgpack.packb([self.applied, kv, sessions])

    def restore(self, data: bytes, index: int) -> None:
        """Replace the state with a snapshot taken at ``index`` (empty data = empty store)."""
        self.kv, self.sessions = {}, {}
        self.applied = index
        if not data:
            return
        applied, kv, sessions = msgpack.unpackb(data)
        assert applied == index, f"snapshot data at {applied} labelled as index {index}"
        self.kv = {k: v for k, v in kv}
        self.sessions = {c: (s, r) for c, s, r in sessions}
