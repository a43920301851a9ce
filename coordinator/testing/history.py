"""Client histories: what each client asked for, what it was told, and when.

A history is the raw material of a linearizability check (see :mod:`.linearizability`).
Every operation is recorded twice by the client that performs it: once when it is *called*
(the client decides to perform it) and once when it *returns* (the client learns the
outcome). Times are the simulator's logical clock; only their order matters.

A client that gives up waiting (a timeout, a crash of everything it talked to) does not know
whether its operation took effect. Such an operation is recorded with ``unknown=True``: it
may have taken effect at any moment after its call, or never. The checker treats its return
time as +infinity and accepts any outcome for it.

The recorder puts a hard limit on the number of operations it keeps, so that a runaway
workload fails loudly instead of exhausting memory.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable
from dataclasses import dataclass, replace
from typing import Any

__all__ = ["HistoryFullError", "HistoryRecorder", "OpKind", "Operation"]


class OpKind(enum.Enum):
    """The register operations, and the multi-key ones (:class:`.linearizability.MultiKeyModel`)."""

    READ = "read"  # input None; output: the value read (None = never written)
    WRITE = "write"  # input: the value; output None
    CAS = "cas"  # input (expected, new); output: True if it swapped
    RANGE = "range"  # input (start, end): keys in [start, end); output: ((key, value), ...) sorted
    TXN = "txn"  # input (compares, success, failure); output (succeeded, (get results...))


@dataclass(frozen=True, slots=True)
class Operation:
    """One completed (or abandoned) client operation on one key.

    ``ret`` is None only while the operation is still open; a finished history has a ``ret``
    for every operation (for an ``unknown`` one, the time the client gave up).
    Contract: ``call <= ret``.
    """

    op_id: int
    client: int
    key: Hashable
    kind: OpKind
    input: Any
    output: Any
    call: int
    ret: int | None
    unknown: bool = False

    def describe(self) -> str:
        """One readable line, e.g. ``c3 cas(k1, 5->7) -> True  [t=120..164]``."""
        if self.kind is OpKind.READ:
            what = f"read({self.key})"
        elif self.kind is OpKind.WRITE:
            what = f"write({self.key}, {self.input!r})"
        elif self.kind is OpKind.RANGE:
            what = f"range({self.input[0]!r}..{self.input[1]!r})"
        elif self.kind is OpKind.TXN:
            compares, success, failure = self.input
            what = f"txn(if {list(compares)} then {list(success)} else {list(failure)})"
        else:
            expected, new = self.input
            what = f"cas({self.key}, {expected!r}->{new!r})"
        outcome = "?" if self.unknown else repr(self.output)
        if self.kind is OpKind.WRITE and not self.unknown:
            outcome = "ok"
        end = "inf (unknown outcome)" if self.unknown else str(self.ret)
        return f"op#{self.op_id} c{self.client} {what} -> {outcome}  [t={self.call}..{end}]"


class HistoryFullError(RuntimeError):
    """The recorder reached its operation limit."""


class HistoryRecorder:
    """Collects :class:`Operation` records as clients call and finish them.

    Usage: ``op = rec.invoke(client, key, kind, input, now)``, later
    ``rec.complete(op, output, now)`` or ``rec.give_up(op, now)``. ``operations()`` returns
    every operation; ones still open are returned as ``unknown`` (the run ended before the
    client heard back), which is exactly what the checker needs.
    """

    def __init__(self, max_ops: int = 100_000) -> None:
        self.max_ops = max_ops
        self._ops: list[Operation] = []
        self._open: set[int] = set()

    def __len__(self) -> int:
        return len(self._ops)

    def invoke(self, client: int, key: Hashable, kind: OpKind, input: Any, now: int) -> int:
        """Record the call of an operation; returns its id."""
        if len(self._ops) >= self.max_ops:
            raise HistoryFullError(
                f"history holds {self.max_ops} operations already; raise max_ops or run a "
                "shorter workload"
            )
        op_id = len(self._ops)
        self._ops.append(Operation(op_id, client, key, kind, input, None, now, None))
        self._open.add(op_id)
        return op_id

    def complete(self, op_id: int, output: Any, now: int) -> None:
        """Record that the client learned the outcome ``output`` at time ``now``."""
        op = self._close(op_id, now)
        self._ops[op_id] = replace(op, output=output, ret=now)

    def give_up(self, op_id: int, now: int) -> None:
        """Record that the client stopped waiting: the outcome is unknown."""
        op = self._close(op_id, now)
        self._ops[op_id] = replace(op, ret=now, unknown=True)

    def is_open(self, op_id: int) -> bool:
        return op_id in self._open

    def operations(self) -> list[Operation]:
        """All operations, in call order; still-open ones are reported as unknown."""
        out = []
        for op in self._ops:
            if op.op_id in self._open:
                op = replace(op, ret=op.call, unknown=True)
            out.append(op)
        return out

    def _close(self, op_id: int, now: int) -> Operation:
        if op_id not in self._open:
            raise ValueError(f"operation {op_id} is not open (already finished or never invoked)")
        op = self._ops[op_id]
        if now < op.call:
            raise ValueError(
                f"operation {op_id} cannot return at {now}, before its call at {op.call}"
            )
        self._open.discard(op_id)
        return op
