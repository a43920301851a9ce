"""Linearizability checking of register histories (Wing & Gong search, memoized, per key).

Theory of operation
-------------------
A history is linearizable if every operation can be given a single instant between its call
and its return such that performing the operations one by one, in the order of those
instants, on a sequential register gives every operation the output its client saw.

The search (Wing & Gong 1993, with Lowe's memoization, as in porcupine):

* Each operation becomes two entries, its call and its return, in one time-ordered linked
  list. At equal times calls come first, so touching operations count as concurrent (the
  permissive reading: it never reports a false violation).
* Walking the list from its head, any *call* entry met before the first *return* entry is an
  operation that may be linearized next. Try it on the model; if the model accepts it, push
  it on a stack, unlink its call and return entries, and restart from the head. Meeting a
  return entry means that operation had to be linearized already: backtrack by popping the
  stack, relinking, and trying the next candidate.
* Memoization: the pair (bitset of linearized operations, model state) determines the rest
  of the search, so a pair seen before is not explored again. This turns an exponential
  search into one bounded by the number of distinct reachable pairs.
* Unknown outcomes: an operation whose client gave up returns at +infinity and the model
  accepts any output for it. The search succeeds once every *known* operation is
  linearized; the unknown ones left over are those that never took effect (or took effect
  after everything else, which no one observed).
* Per-key partitioning (P-compositionality): a register per key is independent of the
  others, so each key's sub-history is checked on its own, which is exponentially cheaper.
* Bounds: the memo table size (``max_states``) and, optionally, a wall-clock limit. When a
  bound is hit the answer is ``UNKNOWN``, never a guess.

The ILLEGAL explanation shows the longest linearizable prefix the search found and the
operations that could have come next, each with the reason the register rejected it.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .history import Operation, OpKind

__all__ = ["CheckReport", "CheckResult", "MultiKeyModel", "RegisterModel", "check_history",
           "check_key", "check_multikey"]

DEFAULT_MAX_STATES = 1_000_000


class CheckResult(enum.Enum):
    OK = "ok"
    ILLEGAL = "illegal"
    UNKNOWN = "unknown"  # a search bound was hit before an answer was found


@dataclass(frozen=True)
class CheckReport:
    """The checker's answer.

    ``explanation`` is non-empty for ILLEGAL (why) and UNKNOWN (which bound was hit).
    ``per_key`` maps every key to its own result; ``states_explored`` sums memo table sizes.
    """

    result: CheckResult
    explanation: str = ""
    per_key: dict[Hashable, CheckResult] = field(default_factory=dict)
    states_explored: int = 0

    @property
    def ok(self) -> bool:
        return self.result is CheckResult.OK


class RegisterModel:
    """A sequential register, initially ``init`` (None = never written).

    ``step(state, op)`` returns ``(accepted, new_state)``: whether the register could have
    produced ``op.output`` in ``state``, and the state after it. For an operation with an
    unknown outcome any output is accepted; the state change still follows the register.
    """

    def __init__(self, init: Any = None) -> None:
        self.init = init

    def step(self, state: Any, op: Operation) -> tuple[bool, Any]:
        if op.kind is OpKind.READ:
            return (op.unknown or op.output == state), state
        if op.kind is OpKind.WRITE:
            return True, op.input
        expected, new = op.input
        swapped = state == expected
        after = new if swapped else state
        if op.unknown:
            return True, after
        return op.output == swapped, after

    def why_rejected(self, state: Any, op: Operation) -> str:
        if op.kind is OpKind.READ:
            return f"the register holds {state!r}, the read returned {op.output!r}"
        return f"the register holds {state!r}, so the cas would return {state == op.input[0]!r}"


class MultiKeyModel:
    """A sequential key-value store over a fixed set of ``keys`` (each initially absent), for
    histories that mix single-key operations with ones that span keys (etcd's Range and Txn):

    - READ / WRITE / CAS on ``op.key``, as :class:`RegisterModel`;
    - RANGE, input ``(start, end)``: output the ``(key, value)`` pairs of the present keys in
      ``[start, end)``, sorted by key (a range must see one instant: never half a transaction);
    - TXN, input ``(compares, success, failure)``: every compare ``("value", key, v)`` (the key
      holds ``v``; a missing key never matches, as in etcd) or ``("absent", key)`` holds ->
      run ``success``, else ``failure``, atomically; ops ``("put", key, v)``, ``("delete",
      key)``, ``("get", key)``; output ``(succeeded, (value of each get, in order))``.

    The state is a tuple of the keys' values in sorted key order (hashable, for the memo).
    Check such a history whole with :func:`check_multikey` (it cannot be split per key)."""

    def __init__(self, keys: Iterable[Hashable]) -> None:
        self.keys = sorted(set(keys), key=repr)
        self.slot = {k: i for i, k in enumerate(self.keys)}
        self.init: tuple = (None,) * len(self.keys)

    def _set(self, state: tuple, key: Hashable, value: Any) -> tuple:
        i = self.slot[key]
        return state[:i] + (value,) + state[i + 1:]

    def _txn(self, state: tuple, txn_input: Any) -> tuple[tuple, tuple]:
        compares, success, failure = txn_input
        ok = all(state[self.slot[c[1]]] is None if c[0] == "absent"
                 else state[self.slot[c[1]]] is not None and state[self.slot[c[1]]] == c[2]
                 for c in compares)
        got = []
        for op in success if ok else failure:
            if op[0] == "put":
                state = self._set(state, op[1], op[2])
            elif op[0] == "delete":
                state = self._set(state, op[1], None)
            else:
                got.append(state[self.slot[op[1]]])
        return state, (ok, tuple(got))

    def _range(self, state: tuple, start: Any, end: Any) -> tuple:
        return tuple((k, state[i]) for i, k in enumerate(self.keys)
                     if state[i] is not None and start <= k < end)

    def step(self, state: tuple, op: Operation) -> tuple[bool, tuple]:
        if op.kind is OpKind.RANGE:
            return (op.unknown or op.output == self._range(state, *op.input)), state
        if op.kind is OpKind.TXN:
            after, output = self._txn(state, op.input)
            return (op.unknown or op.output == output), after
        i = self.slot[op.key]
        accepted, value = RegisterModel().step(state[i], op)
        return accepted, self._set(state, op.key, value)

    def why_rejected(self, state: tuple, op: Operation) -> str:
        held = dict(zip(self.keys, state, strict=True))
        if op.kind is OpKind.RANGE:
            return f"the store holds {held!r}, so the range would return {self._range(state, *op.input)!r}"
        if op.kind is OpKind.TXN:
            return f"the store holds {held!r}, so the txn would return {self._txn(state, op.input)[1]!r}"
        return f"the store holds {held!r}: " + RegisterModel().why_rejected(state[self.slot[op.key]], op)


def check_multikey(
    ops: Iterable[Operation],
    model: MultiKeyModel,
    max_states: int = DEFAULT_MAX_STATES,
    time_limit_s: float | None = None,
) -> CheckReport:
    """Check a history of single- and multi-key operations against ``model`` as one whole
    (no per-key split: a range or a transaction ties keys together). Reads, ranges and
    transactions made only of gets whose outcome is unknown constrain nothing and are dropped."""
    kept = []
    for op in ops:
        if op.unknown and (op.kind in (OpKind.READ, OpKind.RANGE) or (
                op.kind is OpKind.TXN and all(o[0] == "get" for o in (*op.input[1], *op.input[2])))):
            continue
        if op.ret is None:
            raise ValueError(f"operation {op.op_id} has no return time; finish the history first")
        if op.ret < op.call:
            raise ValueError(f"operation {op.op_id} returns at {op.ret}, before its call {op.call}")
        kept.append(op)
    deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
    return _Search(kept, model, max_states, deadline, "(every key)").run()


def check_history(
    ops: Iterable[Operation],
    model: RegisterModel | None = None,
    max_states: int = DEFAULT_MAX_STATES,
    time_limit_s: float | None = None,
) -> CheckReport:
    """Check a multi-key history, one key at a time.

    ILLEGAL if any key is illegal (the first such key, in a deterministic key order, explains);
    otherwise UNKNOWN if any key hit a bound; otherwise OK. ``max_states`` bounds each key's
    memo table; ``time_limit_s`` bounds the whole call.
    """
    model = model or RegisterModel()
    by_key: dict[Hashable, list[Operation]] = {}
    for op in ops:
        by_key.setdefault(op.key, []).append(op)
    deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
    per_key: dict[Hashable, CheckResult] = {}
    explored = 0
    first_unknown = ""
    for key in sorted(by_key, key=repr):
        report = check_key(by_key[key], model, max_states, deadline)
        per_key[key] = report.result
        explored += report.states_explored
        if report.result is CheckResult.ILLEGAL:
            return CheckReport(CheckResult.ILLEGAL, report.explanation, per_key, explored)
        if report.result is CheckResult.UNKNOWN and not first_unknown:
            first_unknown = report.explanation
    result = CheckResult.UNKNOWN if first_unknown else CheckResult.OK
    return CheckReport(result, first_unknown, per_key, explored)


def check_key(
    ops: Sequence[Operation],
    model: RegisterModel | None = None,
    max_states: int = DEFAULT_MAX_STATES,
    deadline: float | None = None,
) -> CheckReport:
    """Check the history of one key (all ``ops`` must share it)."""
    model = model or RegisterModel()
    # A read whose outcome is unknown constrains nothing: drop it.
    ops = [op for op in ops if not (op.unknown and op.kind is OpKind.READ)]
    for op in ops:
        if op.ret is None:
            raise ValueError(f"operation {op.op_id} has no return time; finish the history first")
        if op.ret < op.call:
            raise ValueError(f"operation {op.op_id} returns at {op.ret}, before its call {op.call}")
    key = ops[0].key if ops else None
    return _Search(ops, model, max_states, deadline, key).run()


class _Search:
    """One key's Wing & Gong search over an array-based doubly linked list of entries.

    Entry numbering: 0 is the head sentinel, 1..2n the call/return entries in time order,
    2n+1 the tail sentinel. ``_op_of[e]`` is the operation index of entry e, ``_match[e]``
    the return entry of a call entry.
    """

    def __init__(self, ops, model, max_states, deadline, key) -> None:
        self.ops: list[Operation] = list(ops)
        self.model = model
        self.max_states = max_states
        self.deadline = deadline
        self.key = key
        n = len(self.ops)
        inf = float("inf")
        events: list[tuple[float, int, int]] = []
        for i, op in enumerate(self.ops):
            assert op.ret is not None
            events.append((op.call, 0, i))
            events.append((inf if op.unknown else op.ret, 1, i))
        events.sort()
        size = 2 * n + 2
        self.tail = size - 1
        self.nxt = list(range(1, size + 1))
        self.prv = list(range(-1, size - 1))
        self.is_call = [False] * size
        self.op_of = [-1] * size
        self.match = [0] * size
        call_entry: dict[int, int] = {}
        for pos, (_, is_ret, i) in enumerate(events, start=1):
            self.op_of[pos] = i
            self.is_call[pos] = not is_ret
            if is_ret:
                self.match[call_entry[i]] = pos
            else:
                call_entry[i] = pos
        self.known_mask = sum(1 << i for i, op in enumerate(self.ops) if not op.unknown)
        self.best: list[tuple[int, Any]] = []  # longest prefix found: (op index, state after)
        self.best_state: Any = model.init
        self.best_candidates: list[int] = []

    def _lift(self, e: int) -> None:
        for x in (e, self.match[e]):
            self.nxt[self.prv[x]] = self.nxt[x]
            self.prv[self.nxt[x]] = self.prv[x]

    def _unlift(self, e: int) -> None:
        for x in (self.match[e], e):
            self.nxt[self.prv[x]] = x
            self.prv[self.nxt[x]] = x

    def run(self) -> CheckReport:
        if self.known_mask == 0:
            return CheckReport(CheckResult.OK, per_key={self.key: CheckResult.OK})
        model, nxt, op_of, ops = self.model, self.nxt, self.op_of, self.ops
        cache: set[tuple[int, Any]] = set()
        stack: list[tuple[int, Any]] = []
        linearized, state = 0, model.init
        entry, steps = nxt[0], 0
        while True:
            steps += 1
            if self.deadline is not None and steps % 4096 == 0 and time.monotonic() > self.deadline:
                return self._unknown(f"the time limit ran out after {len(cache)} states")
            i = op_of[entry]
            if self.is_call[entry]:
                accepted, new_state = model.step(state, ops[i])
                if accepted:
                    new_lin = linearized | (1 << i)
                    memo = (new_lin, new_state)
                    if memo not in cache:
                        if len(cache) >= self.max_states:
                            return self._unknown(f"the memo table reached {self.max_states} states")
                        cache.add(memo)
                        stack.append((entry, state))
                        linearized, state = new_lin, new_state
                        self._lift(entry)
                        if linearized & self.known_mask == self.known_mask:
                            return CheckReport(
                                CheckResult.OK, "", {self.key: CheckResult.OK}, len(cache)
                            )
                        if len(stack) > len(self.best):
                            self._remember(stack, state)
                        entry = nxt[0]
                        continue
                entry = nxt[entry]
            else:
                if not stack:
                    return CheckReport(
                        CheckResult.ILLEGAL,
                        self._explain(),
                        {self.key: CheckResult.ILLEGAL},
                        len(cache),
                    )
                entry, state = stack.pop()
                linearized &= ~(1 << op_of[entry])
                self._unlift(entry)
                entry = nxt[entry]

    def _unknown(self, why: str) -> CheckReport:
        text = f"key {self.key!r}: gave up ({why}) on {len(self.ops)} operations"
        return CheckReport(CheckResult.UNKNOWN, text, {self.key: CheckResult.UNKNOWN})

    def _remember(self, stack: list[tuple[int, Any]], state: Any) -> None:
        """Keep the longest linearizable prefix and the operations that could follow it."""
        order = [self.op_of[e] for e, _ in stack]
        states_after = [s for _, s in stack[1:]] + ([state] if stack else [])
        self.best = list(zip(order, states_after, strict=True))
        self.best_state = state
        cands, e = [], self.nxt[0]
        while e != self.tail and self.is_call[e]:
            cands.append(self.op_of[e])
            e = self.nxt[e]
        self.best_candidates = cands

    def _explain(self, limit: int = 30) -> str:
        ops = self.ops
        lines = [f"key {self.key!r}: no linearization of its {len(ops)} operations exists."]
        if not self.best:
            # The stack is empty, so the list is whole again: its leading calls are the
            # operations that could have been first.
            self._remember([], self.model.init)
            lines.append(f"Not even a first operation fits the initial value {self.model.init!r}:")
        else:
            lines.append(f"Longest linearizable prefix ({len(self.best)} operations):")
            shown = self.best[-limit:]
            if len(self.best) > limit:
                lines.append(f"  ... {len(self.best) - limit} earlier operations ...")
            for i, after in shown:
                lines.append(f"  {ops[i].describe()}   => {after!r}")
            lines.append(
                f"after which no next operation fits the register value {self.best_state!r}:"
            )
        for i in self.best_candidates[:limit]:
            op = ops[i]
            ok, _ = self.model.step(self.best_state, op)
            reason = (
                "fits, but every continuation after it failed"
                if ok
                else self.model.why_rejected(self.best_state, op)
            )
            lines.append(f"  {op.describe()}: {reason}")
        return "\n".join(lines)
