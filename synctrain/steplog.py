"""The training side of the step log: typed calls on a job's records in the coordinator.

The records themselves (and the fencing rule) live in the coordinator's replicated state
machine (:mod:`coordinator.steplog`); this is the thin client both the driver and the workers
use. Every write is a Raft-committed command: when a call returns, a majority of coordinator
nodes has it durable. A write from a generation that is no longer current raises
:class:`Fenced`.
"""

from __future__ import annotations

import time
from typing import Any

from coordinator.client import Client, CoordinatorError, RequestRejected, Unavailable

#: Items fetched per page when reading a record list back.
PAGE = 2000


class Fenced(Exception):
    """The step log refused a write from a generation that is no longer current."""


class StepLog:
    """One job's step log on a coordinator cluster."""

    def __init__(self, endpoints: list[str] | str, token: bytes, job: str, *,
                 timeout_s: float = 10.0) -> None:
        self.job = job
        self.client = Client(endpoints, token=token, timeout_s=timeout_s)

    def __repr__(self) -> str:  # endpoints and token stay out of logs
        return f"StepLog(job={self.job!r})"

    def close(self) -> None:
        self.client.close()

    def _command(self, name: str, *args: Any) -> dict[str, Any]:
        try:
            return self.client.command(name, self.job, *args)
        except RequestRejected as exc:
            if exc.code == "fenced":
                raise Fenced(str(exc)) from None
            raise

    # ---- writes ------------------------------------------------------------------------
    def create(self, spec: dict[str, Any], resume: bool = False) -> dict[str, Any]:
        return self._command("steplog.create", spec, resume)

    def generation(self, generation: int, members: list[dict[str, Any]], rendezvous: str | None,
                   start_step: int, start_report: int, reason: str) -> None:
        self._command("steplog.generation", generation, members, rendezvous, start_step,
                      start_report, reason, time.time())

    def steps(self, generation: int, rank: int, records: list[dict[str, Any]],
              checkpoints: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Commit a rank's records, and (rank 0) written checkpoints after them (each ``ref``
        as for :meth:`checkpoint`, with its ``step`` and ``time``): one Raft commit for all.
        The answer's ``prune`` lists the checkpoint paths the new ones let go."""
        if not checkpoints:
            return self._command("steplog.steps", generation, rank, records)
        refs = [[ref["step"], *_ref_args(ref, ref["time"])] for ref in checkpoints]
        return self._command("steplog.steps", generation, rank, records, refs)

    def checkpoint(self, generation: int, step: int, ref: dict[str, Any]) -> list[str]:
        """Commit a written checkpoint (``ref``: path, size, sha256[, digest]); returns the
        paths of the checkpoints this one lets go."""
        answer = self._command("steplog.checkpoint", generation, step, *_ref_args(ref, time.time()))
        return list(answer.get("prune", []))

    def failure(self, record: dict[str, Any]) -> int:
        return int(self._command("steplog.failure", record)["index"])

    def annotate_failure(self, index: int, fields: dict[str, Any]) -> None:
        self._command("steplog.annotate_failure", index, fields)

    def end(self, state: str, reason: str) -> None:
        self._command("steplog.end", state, reason, time.time())

    # ---- reads -------------------------------------------------------------------------
    def job_info(self, consistency: str = "linearizable") -> dict[str, Any]:
        return self.client.query("steplog", "job", self.job, consistency=consistency)["job"]

    def records(self, kind: str, consistency: str = "linearizable", *, start: int = 0,
                max_items: int | None = None) -> list[dict[str, Any]]:
        """The job's ``kind`` records from index ``start`` on (at most ``max_items``)."""
        out: list[dict[str, Any]] = []
        while max_items is None or len(out) < max_items:
            limit = PAGE if max_items is None else min(PAGE, max_items - len(out))
            answer = self.client.query("steplog", "records", self.job, kind, start, limit,
                                       consistency=consistency)
            out.extend(answer["items"])
            start = answer["next"]
            if start >= answer["total"] or not answer["items"]:
                break
        return out


def _ref_args(ref: dict[str, Any], at: float) -> list[Any]:
    """A checkpoint reference as the step log's commands take it: path, size, sha256, time[,
    digest]."""
    return [ref["path"], ref["size"], ref["sha256"], at] + ([ref["digest"]] if ref.get("digest") else [])


__all__ = ["StepLog", "Fenced", "CoordinatorError", "Unavailable", "RequestRejected"]
