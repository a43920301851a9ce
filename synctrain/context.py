"""The per-worker training context and the session that backs the public helpers.

Inside a synctrain worker, :func:`synctrain.get_context` returns the worker's
:class:`TrainContext`; in a plain Python process (no Trainer) it returns a single-process
context, and every ``prepare_*`` helper becomes a no-op, so a training loop can be debugged
locally without Ray.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from synctrain.strategies.base import Strategy

#: Reports a worker keeps before the driver collects them; older ones are dropped (and counted).
MAX_PENDING_REPORTS = 100_000


@dataclass(frozen=True)
class TrainContext:
    """Where this copy of the training loop runs. ``mode`` is "sync", "async" or "local"."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mode: str = "local"
    seed: int = 0


class Session:
    """A running worker's state: its context, strategy, reports and step counter.

    ``report`` is called from the training thread while the driver drains reports through
    the actor's second thread, hence the lock.
    """

    def __init__(self, context: TrainContext, strategy: Strategy | None) -> None:
        self.context = context
        self.strategy = strategy
        self.optimizer_steps = 0
        self._lock = threading.Lock()
        # bounded: when the driver falls behind, the oldest reports go (and are counted)
        self._reports: deque[dict[str, Any]] = deque(maxlen=MAX_PENDING_REPORTS)
        self._first_pending = 0  # global index of self._reports[0]
        self.dropped_reports = 0
        self.report_count = 0

    def add_report(self, metrics: dict[str, Any]) -> None:
        record = dict(metrics)
        record.setdefault("step", self.optimizer_steps if self.strategy else self.report_count)
        with self._lock:
            if len(self._reports) == MAX_PENDING_REPORTS:
                self._first_pending += 1
                self.dropped_reports += 1
            self._reports.append(record)  # O(1); the deque drops the oldest when full
            self.report_count += 1

    def drain_reports(self, since: int) -> tuple[list[dict[str, Any]], int]:
        """Reports with global index >= ``since``; frees those before it. Returns (reports, next)."""
        with self._lock:
            for _ in range(max(0, min(since - self._first_pending, len(self._reports)))):
                self._reports.popleft()
                self._first_pending += 1
            start = max(0, since - self._first_pending)
            out = list(itertools.islice(self._reports, start, None))
            return out, self._first_pending + len(self._reports)


_LOCAL = TrainContext()
_session: Session | None = None
_local_reports: list[dict[str, Any]] = []


def current_session() -> Session | None:
    return _session


def set_session(session: Session | None) -> None:
    global _session
    _session = session


def local_reports() -> list[dict[str, Any]]:
    """What ``report`` recorded in a plain process (no Trainer), for debugging."""
    return _local_reports


def get_context() -> TrainContext:
    """The context of the calling worker, or a single-process context outside a Trainer."""
    return _session.context if _session is not None else _LOCAL
