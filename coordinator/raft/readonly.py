"""ReadIndex bookkeeping on the leader (Raft thesis §6.4, etcd's ReadOnlySafe).

Theory of operation
-------------------
A read request gets the leader's commit index at arrival as its *read index*. The leader
then proves it is still the leader by a heartbeat round tagged with the request's context;
once a quorum (joint-aware) acknowledged that context, the request -- and every request
queued before it, whose index is no larger -- is answered. Until the leader has committed an
entry of its own term its commit index may lag, so requests are deferred until then (the
node keeps those). A leader that steps down drops everything queued here (``reset``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

__all__ = ["ReadRequest", "ReadOnly"]


@dataclass
class ReadRequest:
    index: int
    context: bytes
    origin: int  # node that asked (this node, or a follower that forwarded it)
    acks: set[int] = field(default_factory=set)


class ReadOnly:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._pending: OrderedDict[bytes, ReadRequest] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pending)

    def full(self) -> bool:
        return len(self._pending) >= self.limit

    def add(self, index: int, context: bytes, origin: int) -> bool:
        """Queue a request; False if one with the same context is already queued."""
        if context in self._pending:
            return False
        self._pending[context] = ReadRequest(index, context, origin)
        return True

    def recv_ack(self, frm: int, context: bytes) -> set[int] | None:
        rs = self._pending.get(context)
        if rs is None:
            return None
        rs.acks.add(frm)
        return rs.acks

    def advance(self, context: bytes) -> list[ReadRequest]:
        """Pop and return every request up to and including ``context``'s."""
        if context not in self._pending:
            return []
        out = []
        while self._pending:
            ctx, rs = self._pending.popitem(last=False)
            out.append(rs)
            if ctx == context:
                break
        return out

    def last_pending_context(self) -> bytes:
        if not self._pending:
            return b""
        return next(reversed(self._pending))

    def reset(self) -> list[ReadRequest]:
        out = list(self._pending.values())
        self._pending.clear()
        return out
