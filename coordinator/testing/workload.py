"""Simulated clients: what they ask for, and the small protocol they speak to the cluster.

Theory of operation
-------------------
Each client performs one operation at a time (read, write or cas on one of a few keys) and
records it in the history: *called* when it decides to perform it, *returned* when the first
definitive answer arrives. Until then it sends *attempts*: a request to one node, then after
``retry`` time units without an answer (or at once after a redirect) another attempt to
another node. Every attempt of one operation carries the same (client, seq), so the state
machine's session table applies a retried write once. In the safety phase a client that
waited ``timeout`` units gives up and records the outcome as unknown; in the liveness phase it
never gives up.

Writes go to the node the client believes leads (redirect hints update the belief); reads go
to a random node, which serves them through ReadIndex (a follower forwards it to the leader),
so follower reads are exercised as well.

Values written are unique (``client * 1_000_000 + seq``), which makes a history far more
constrained, and hence a check far more sensitive, than reusing small values.

Lease clients (:class:`LeaseClient`, ``SimParams.lease_clients``) are apart from the history:
each grants a lease of its own (ids ``client * 1_000_000 + generation``), attaches its key
``L<client>`` to it and then, by role, a *keeper* keeps it alive every TTL/3, a *lapser* sends
a few keepalives and stops (the lease must then expire, and its key vanish), a *racer* keeps it
alive about once per TTL, so its keepalives race the leader's expiry. A client that learns its
lease is gone grants a new one. Their operations retry like the others and never give up.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field
from typing import Any

from .history import OpKind

__all__ = [
    "ClientReply",
    "ClientRequest",
    "LeaseClient",
    "LeaseOp",
    "SimClient",
    "choose_operation",
]

LEASE_ROLES = ("keeper", "lapser", "racer")


class LeaseOp(enum.Enum):
    """A lease client's operations (the server side turns them into the commands of
    :mod:`.kv`)."""

    GRANT = "grant"  # args (lease id, ttl)
    KEEPALIVE = "keepalive"  # args lease id
    PUT = "lease_put"  # args (value, lease id)


@dataclass(frozen=True, slots=True)
class ClientRequest:
    client: int
    seq: int
    attempt: int
    kind: OpKind | LeaseOp
    key: str
    args: Any  # write: value; cas: (expected, new); read: None; lease ops: see LeaseOp


@dataclass(frozen=True, slots=True)
class ClientReply:
    client: int
    seq: int
    attempt: int
    ok: bool  # False: not served here, retry (leader_hint may help)
    value: Any = None  # read: the value; cas: swapped?; write: None
    leader_hint: int = 0


@dataclass
class SimClient:
    """One client's state. ``op_id`` is its open history operation (None when idle)."""

    id: int
    seq: int = 0
    op_id: int | None = None
    kind: OpKind = OpKind.READ
    key: str = ""
    args: Any = None
    attempt: int = 0
    started: int = 0
    leader_hint: int = 0
    timer_token: int = 0
    known: dict[str, Any] = field(default_factory=dict)  # last value seen per key
    final_op_done: bool = False  # liveness phase: its one post-heal operation finished

    @property
    def busy(self) -> bool:
        return self.op_id is not None

    def request(self) -> ClientRequest:
        return ClientRequest(self.id, self.seq, self.attempt, self.kind, self.key, self.args)


def choose_operation(
    rng: random.Random, client: SimClient, keys: list[str]
) -> tuple[OpKind, str, Any]:
    """Pick the client's next operation: 40% reads, 35% writes, 25% cas."""
    key = rng.choice(keys)
    roll = rng.random()
    unique = client.id * 1_000_000 + client.seq
    if roll < 0.40:
        return OpKind.READ, key, None
    if roll < 0.75:
        return OpKind.WRITE, key, unique
    # Mostly expect the value last seen (a cas that can win), sometimes a stale guess.
    expected = client.known.get(key) if rng.random() < 0.8 else rng.choice([None, unique - 1])
    return OpKind.CAS, key, (expected, unique)


@dataclass
class LeaseClient:
    """One lease client's state (see the module doc). ``state``: ``grant`` (next: grant a new
    lease), ``attach`` (put its key with the lease), ``keep`` (keep it alive), ``lapsed``
    (stopped keeping it alive). ``op`` is the outstanding operation (None when idle),
    ``started`` when it was invoked."""

    id: int
    role: str
    keepalives: int = 0  # a lapser: keepalives left before it stops
    seq: int = 0
    gen: int = 0
    lease: int = 0  # the current lease id (0: none yet)
    granted: list[int] = field(default_factory=list)  # every lease id it asked for
    state: str = "grant"
    op: LeaseOp | None = None
    args: Any = None
    started: int = 0
    attempt: int = 0
    leader_hint: int = 0
    timer_token: int = 0
    acked_after_heal: bool = False  # liveness phase: an operation invoked after healing succeeded
    lost: int = 0  # leases it learned were gone while it meant to keep them

    @property
    def key(self) -> str:
        return f"L{self.id}"

    def request(self) -> ClientRequest:
        assert self.op is not None
        return ClientRequest(self.id, self.seq, self.attempt, self.op, self.key, self.args)
