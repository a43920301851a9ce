"""``metrics.jsonl``: a step-logged job's committed reports, in its job directory.

Theory of operation
-------------------
What a job reported is what its step log committed: each report is tied to the step it
followed, and a recovery that rolls back marks the reports beyond its restart point
``superseded`` (they are redone). So the file is written from the log, never from what the
workers sent: one JSON object a line per live (not superseded) report, in report order,

    {"step": 40, "generation": 1, "time": 12.375, "loss": 0.21, ...every reported value}

``time`` is seconds since the job's first generation started (both from the log: the step
record's wall-clock time, which the log keeps with each report, or for a report before the
first step its generation's time). A
reported key that clashes with ``step``/``generation``/``time`` is kept as ``<key>_reported``.

Two writers, one result:

* :class:`LiveMetrics`, a driver thread while the job runs: every :data:`POLL_S` it reads the
  generations and reports committed since its last look (stale reads: whatever node it asks
  answers from what it has applied, with no round to the others; a poll that sees less sees the
  rest at the next) and appends the new rows. Each report carries its step's time, so the
  steps (one record per optimizer step: hundreds a second for a fast model) are not read at
  all, except for reports of a log written before reports carried it. A new generation may supersede rows
  already written, so then it rewrites the whole file from the log (a generation is rare:
  bounded by the step log's ``MAX_GENERATIONS``). Between a rollback and the next poll the file
  may hold rows about to be superseded; a reader wanting the final word waits for the end.
* :func:`write_final_metrics`, when the job ends however it ends: the whole file again from
  the whole committed log (atomically: a temp file renamed over it), and TensorBoard event
  files under ``tensorboard/`` when ``torch.utils.tensorboard`` can be imported (the
  ``tensorboard`` package: an optional extra, never needed).

:func:`metric_rows` is the one pure function both use, and :func:`synctrain.plots.plot_job`
too (it reads the log through :func:`synctrain.read_job`, so a job without the file plots).
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import shutil
import threading
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
#: How often the live writer reads what was committed since its last look.
POLL_S = 2.0
#: Records of one kind read per query by the live writer (the rest at the next poll).
MAX_ITEMS_PER_POLL = 10_000
#: Row keys of our own; a reported value of that name is kept as ``<key>_reported``.
RESERVED = ("step", "generation", "time")


def metric_rows(reports: list[dict[str, Any]], steps: list[dict[str, Any]],
                generations: list[dict[str, Any]], t0: float | None = None) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl`` for these step-log records (superseded ones left out).
    ``t0``: the job's start (default: its first generation's time)."""
    if t0 is None:
        t0 = float(generations[0]["time"]) if generations else None
    step_time = {int(s["step"]): float(s["time"]) for s in steps if not s.get("superseded")}
    generation_time = {int(g["generation"]): float(g["time"]) for g in generations}
    rows = []
    for report in sorted((r for r in reports if not r.get("superseded")), key=lambda r: r["seq"]):
        step, generation = int(report["step"]), int(report["generation"])
        when = report.get("time")  # its step's time, which the log keeps with each report
        if when is None:  # a report before the first step, or a log from before that
            when = step_time.get(step) if step > 0 else None
        if when is None:
            when = generation_time.get(generation)
        if t0 is None and when is not None:
            t0 = when
        row: dict[str, Any] = {"step": step, "generation": generation,
                               "time": round(when - t0, 3) if when is not None and t0 is not None else None}
        for key, value in (report.get("metrics") or {}).items():
            if key == "step":
                continue
            row[f"{key}_reported" if key in RESERVED else key] = value
        rows.append(row)
    return rows


def numeric_keys(rows: list[dict[str, Any]]) -> list[str]:
    """Reported keys with a number in some row, in the order first seen (not ours, not
    ``total_steps``)."""
    keys: dict[str, None] = {}
    for row in rows:
        for key, value in row.items():
            if key not in RESERVED and key != "total_steps" and is_number(value):
                keys.setdefault(key)
    return list(keys)


def read_metrics(job_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a job directory's ``metrics.jsonl`` ([] when it has none)."""
    path = pathlib.Path(job_dir) / METRICS_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def write_rows(job_dir: pathlib.Path, rows: list[dict[str, Any]]) -> pathlib.Path:
    """Replace ``metrics.jsonl`` with ``rows``, atomically (a reader sees old or new)."""
    path = job_dir / METRICS_FILE
    tmp = job_dir / (METRICS_FILE + ".tmp")  # *.tmp: swept by a resumed job
    with open(tmp, "w") as f:
        f.writelines(_line(row) for row in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def append_rows(job_dir: pathlib.Path, rows: list[dict[str, Any]]) -> None:
    if rows:
        with open(job_dir / METRICS_FILE, "a") as f:
            f.writelines(_line(row) for row in rows)


def write_final_metrics(job_dir: pathlib.Path, steplog: Any) -> list[dict[str, Any]]:
    """``metrics.jsonl`` (and TensorBoard files, when possible) from the whole committed log.
    Never raises: the job's own outcome matters more; returns the rows written."""
    try:
        generations = steplog.records("generations")
        rows = metric_rows(steplog.records("reports"), steplog.records("steps"), generations)
        write_rows(job_dir, rows)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not write %s in %s: %s", METRICS_FILE, job_dir, exc)
        return []
    try:
        write_tensorboard(job_dir, rows, float(generations[0]["time"]) if generations else None)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not write TensorBoard files in %s: %s", job_dir, exc)
    return rows


def write_tensorboard(job_dir: pathlib.Path, rows: list[dict[str, Any]],
                      t0: float | None = None) -> pathlib.Path | None:
    """Every numeric value against its step as TensorBoard scalars in ``job_dir/tensorboard``
    (rewritten whole), at wall time ``t0 + time`` (``t0``: the job's start, seconds since the
    epoch); None, and nothing written, when TensorBoard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    out = job_dir / TENSORBOARD_DIR
    shutil.rmtree(out, ignore_errors=True)
    writer = SummaryWriter(log_dir=str(out))
    try:
        for row in rows:
            for key in numeric_keys([row]):
                when = t0 + row["time"] if t0 is not None and row["time"] is not None else None
                writer.add_scalar(key, float(row[key]), global_step=row["step"], walltime=when)
    finally:
        writer.close()
    return out


class LiveMetrics(threading.Thread):
    """Appends committed reports to ``metrics.jsonl`` while the job runs (module doc).
    ``steplog``: a :class:`~synctrain.steplog.StepLog` of its own (a slow read then never
    holds up the driver), closed by ``stop()``. ``start()`` starts it."""

    def __init__(self, job_dir: pathlib.Path, steplog: Any, poll_s: float = POLL_S) -> None:
        super().__init__(name="metrics-jsonl", daemon=True)
        self.job_dir = job_dir
        self.log = steplog
        self.poll_s = poll_s
        self._stopping = threading.Event()
        self._seen = {"generations": 0, "reports": 0, "steps": 0}
        self._generations: list[dict[str, Any]] = []
        self._step_time: dict[int, float] = {}  # live steps at or after the last row's step
        self.rows_written = 0

    def stop(self) -> None:
        self._stopping.set()
        if self.is_alive():
            self.join(10)
        self.log.close()

    def run(self) -> None:
        while not self._stopping.wait(self.poll_s):
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001 - the coordinator may be busy: next time
                log.debug("metrics.jsonl: no new records this time (%s)", exc)

    def poll(self) -> None:
        """One look at the log: append what is new, or rewrite after a new generation."""
        generations = self._read("generations")
        if generations or not self._generations:
            # a new generation may supersede rows; and the first look rewrites what a run of
            # this job before a resume left
            self._generations += generations
            self._rewrite()
            return
        reports = self._read("reports")
        if any(r.get("time") is None and int(r["step"]) > 0 for r in reports):
            # a log from before reports carried their step's time: read the steps (after the
            # reports, so every report's step is among them)
            for s in self._read("steps"):
                if not s.get("superseded"):
                    self._step_time[int(s["step"])] = float(s["time"])
        rows = metric_rows(reports, [{"step": k, "time": t} for k, t in self._step_time.items()],
                           self._generations)
        append_rows(self.job_dir, rows)
        self.rows_written += len(rows)
        if rows:  # later reports follow later steps (a rollback rewrites): drop older times
            last = rows[-1]["step"]
            self._step_time = {k: t for k, t in self._step_time.items() if k >= last}

    def _read(self, kind: str) -> list[dict[str, Any]]:
        items = self.log.records(kind, consistency="stale", start=self._seen[kind],
                                 max_items=MAX_ITEMS_PER_POLL)
        self._seen[kind] += len(items)
        return items

    def _rewrite(self) -> None:
        reports = self.log.records("reports")
        self._seen["reports"] = len(reports)
        steps: list[dict[str, Any]] = []
        if any(r.get("time") is None and int(r["step"]) > 0 for r in reports):  # an older log
            steps = self.log.records("steps")
            self._seen["steps"] = len(steps)
        rows = metric_rows(reports, steps, self._generations)
        write_rows(self.job_dir, rows)
        self.rows_written = len(rows)
        last = rows[-1]["step"] if rows else 0
        self._step_time = {int(s["step"]): float(s["time"]) for s in steps
                           if not s.get("superseded") and int(s["step"]) >= last}


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _line(row: dict[str, Any]) -> str:
    return json.dumps(row, default=str) + "\n"


__all__ = ["METRICS_FILE", "LiveMetrics", "is_number", "metric_rows", "numeric_keys", "read_metrics",
           "write_final_metrics", "write_rows"]
