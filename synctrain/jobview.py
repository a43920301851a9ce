"""What ``synctrain status`` and ``synctrain log`` print: the data comes from
:mod:`synctrain.jobs` (read-only), this module only lays it out.

* :func:`show_jobs`: one line per job under the storage path.
* :func:`show_job`: one job's detail, its coordinator's nodes included.
* :func:`show_log`: the committed step log as a table, or JSON Lines (``--json``: one object
  per record, ``"type"`` first, the fields of :func:`synctrain.jobs.typed_record`); with
  ``follow``, as it is committed, until the job ends.

Every function returns the command's exit status and writes to ``out`` (default: stdout).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO

from synctrain.jobs import (
    JobNotFoundError,
    JobRecord,
    follow_batches,
    list_jobs,
    log_records,
    read_job,
    storage_dir,
)

#: A failure's detail (a traceback's last line, say) is cut to this many characters.
MAX_DETAIL_CHARS = 200


def show_jobs(storage_path: str | None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    jobs = list_jobs(storage_path)
    if not jobs:
        print(f"no jobs in {str(storage_dir(storage_path))!r} (pass --storage-path, or set "
              "SYNCTRAIN_STORAGE_PATH, to look elsewhere)", file=out)
        return 0
    now = time.time()
    rows = [["NAME", "STATE", "MODE", "WORKERS", "GEN", "STEP", "LOSS", "AGE"]]
    for job in jobs:
        rows.append([job.name, job.state, str(job.spec.get("mode", "?")), str(job.world_size),
                     str(job.generation), str(job.last_step), _number(job.last_loss),
                     _ago(now - float(job.status.get("created") or now))])
    _table(rows, out)
    return 0


def show_job(name: str, storage_path: str | None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        job = read_job(name, storage_path)
    except JobNotFoundError as exc:
        print(f"synctrain status: {exc}", file=sys.stderr)
        return 1
    now = time.time()
    spec = job.spec
    lines = [("job", job.name), ("directory", str(job.job_dir)), ("state", _state_line(job)),
             ("mode", f"{spec.get('mode', '?')}, {job.world_size} workers" + (
                 f" (started with {spec['num_workers']})"
                 if spec.get("num_workers") not in (None, job.world_size) else ""))]
    last = job.steps[-1]["time"] if job.steps else None
    lines.append(("progress", f"generation {job.generation}, last committed step {job.last_step}"
                  + (f" ({_ago(now - last)} ago)" if last else "")
                  + f", {len(job.metrics)} reports, last loss {_number(job.last_loss)}"))
    live = [c for c in job.checkpoints if not c.get("superseded") and not c.get("pruned")]
    lines.append(("checkpoints", ", ".join(f"step {c['step']}: {os.path.basename(c['path'])}"
                                           for c in reversed(live)) or "none"))
    lines.append(("failures", _failures_line(job)))
    if job.redone_steps:
        lines.append(("redone", f"{job.redone_steps} committed steps were rolled back and trained again"))
    if job.end is not None:
        lines.append(("ended", f"{job.end.get('state')} at {_clock(job.end.get('time'))}"
                      + (f": {job.end['reason']}" if job.end.get("reason") else "")))
    for key, text in lines:
        print(f"{key + ':':<13}{text}", file=out)
    _coordinator_lines(job, out)
    return 0


def show_log(name: str, storage_path: str | None, *, follow: bool = False, as_json: bool = False,
             poll_s: float = 1.0, max_wait_s: float | None = None,
             out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        if follow:
            batches: Iterable[list[dict[str, Any]]] = follow_batches(
                name, storage_path, poll_s=poll_s, max_wait_s=max_wait_s)
        else:
            batches = [log_records(read_job(name, storage_path))]
        writer = _JsonLines(out) if as_json else _LogTable(out)
        for batch in batches:
            writer.write(batch)
    except JobNotFoundError as exc:
        print(f"synctrain log: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


# ---------------------------------------------------------------- pieces
class _JsonLines:
    def __init__(self, out: TextIO) -> None:
        self.out = out

    def write(self, batch: list[dict[str, Any]]) -> None:
        for rec in batch:
            self.out.write(json.dumps(rec, default=str, allow_nan=True) + "\n")
        self.out.flush()


class _LogTable:
    """The log as lines of TIME GEN STEP EVENT DETAIL; a step's reports join its line."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.header = False

    def write(self, batch: list[dict[str, Any]]) -> None:
        if not self.header:
            self._line("TIME", "GEN", "STEP", "EVENT", "DETAIL")
            self.header = True
        pending: list[Any] | None = None  # a step's line, waiting for its reports
        for rec in batch:
            kind = rec["type"]
            if kind == "report" and pending is not None and pending[5] == (
                    rec["generation"], rec["step"], bool(rec.get("superseded"))):
                pending[4] = _join(pending[4], _metrics(rec["metrics"]))
                continue
            if pending is not None:
                self._line(*pending[:5])
                pending = None
            cells = self._cells(rec)
            if kind == "step":
                pending = [*cells, (rec["generation"], rec["step"], bool(rec.get("superseded")))]
            else:
                self._line(*cells)
        if pending is not None:
            self._line(*pending[:5])
        self.out.flush()

    @staticmethod
    def _cells(rec: dict[str, Any]) -> list[str]:
        kind, gen = rec["type"], str(rec.get("generation", ""))
        step = "" if rec.get("step") is None else str(rec["step"])
        flags = " (rolled back)" if rec.get("superseded") else ""
        if kind == "generation":
            detail = (f"start_step {rec['start_step']}, {len(rec['members'])} workers, "
                      f"reason: {rec['reason']}")
            return [_clock(rec.get("time")), gen, str(rec["start_step"]), "generation", detail]
        if kind == "step":
            detail = "lost (no record: a replacement started ahead)" if rec.get("lost") else ""
            return [_clock(rec.get("time")), gen, step, "step", _join(detail, flags.strip())]
        if kind == "report":
            return ["", gen, step, "report", _join(_metrics(rec["metrics"]), flags.strip())]
        if kind == "checkpoint":
            state = " (pruned)" if rec.get("pruned") else ""
            return [_clock(rec.get("time")), gen, step, "checkpoint",
                    f"{os.path.basename(rec['path'])}, {_bytes(rec['size'])}{state}{flags}"]
        if kind == "failure":
            return [_clock(rec.get("time")), gen, step, "failure", _failure(rec)]
        assert kind == "end", kind
        return [_clock(rec.get("time")), gen, str(rec.get("last_step", "")), "end",
                f"{rec['state']}" + (f": {rec['reason']}" if rec.get("reason") else "")]

    def _line(self, *cells: str) -> None:
        clock, gen, step, event, detail = cells
        self.out.write(f"{clock:<9} {gen:>3} {step:>7}  {event:<10} {detail}".rstrip() + "\n")


def _state_line(job: JobRecord) -> str:
    driver = job.status.get("driver") or {}
    who = f"driver pid {driver.get('pid', '?')} on {driver.get('host', '?')}"
    text = {"running": f"running ({who})",
            "interrupted": f"interrupted ({who} is gone)" if job.status.get("state") == "running"
            else "interrupted"}.get(job.state, job.state)
    if job.status.get("elapsed_s") is not None and job.state != "running":
        text += f", ran {float(job.status['elapsed_s']):.1f} s"
    if job.status.get("resumes"):
        text += f", resumed {job.status['resumes']} time(s)"
    return text


def _failures_line(job: JobRecord) -> str:
    if not job.failures:
        return "none"
    return f"{len(job.failures)}; last: {_failure(job.failures[-1])}"


def _failure(rec: dict[str, Any]) -> str:
    who = "the driver" if rec.get("rank") is None else f"rank {rec['rank']}"
    text = f"{who} {rec.get('kind')}" + (f" at step {rec['step']}" if rec.get("step") is not None else "")
    if rec.get("recovery"):
        text += f" -> {rec['recovery']}"
        if rec.get("recovery_s") is not None:
            text += f" ({float(rec['recovery_s']):.1f} s)"
    detail = str(rec.get("detail") or "").strip().splitlines()
    if detail:
        text += f": {detail[-1][:MAX_DETAIL_CHARS]}"
    return text


def _coordinator_lines(job: JobRecord, out: TextIO) -> None:
    coord = job.coordinator
    if job.source == "job.json":
        print(f"{'coordinator:':<13}{job.note}", file=out)
        return
    if job.source == "coordinator":
        leader = f"leader node {coord['leader']} (term {coord['term']})" if coord.get("leader") \
            else "no leader right now"
        print(f"{'coordinator:':<13}running: {leader}, commit index {coord['commit_index']}, "
              f"commit lag {coord['lag']} entries (most behind node)", file=out)
        for n in coord["nodes"]:
            if "error" in n:
                print(f"  node at {n['endpoint']}: no answer ({n['error']})", file=out)
                continue
            print(f"  node {n['id']}  {n['endpoint']}  {n['role']:<9} term {n['term']}  "
                  f"commit {n['commit']}  applied {n['applied']}  lag {n['lag']}", file=out)
        return
    elected = (f"; last elected leader node {coord['elected']} (term {coord['elected_term']})"
               if coord.get("elected") else "")
    note = job.note.removeprefix("coordinator ")  # "not running (read from disk)..."
    print(f"{'coordinator:':<13}{note}; committed index {coord.get('commit_index')}{elected}",
          file=out)
    for n in coord.get("nodes", []):
        if "error" in n:
            print(f"  node {n['id']}: unreadable ({n['error']})", file=out)
            continue
        torn = f"  (torn tail: {n['torn_tail']})" if n.get("torn_tail") else ""
        print(f"  node {n['id']}  term {n['term']}  commit {n['commit']} (persisted)  "
              f"last index {n['last_index']}  snapshot {n['snapshot_index']}{torn}", file=out)


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip(), file=out)


def _metrics(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={_number(v) if isinstance(v, float) else v}"
                    for k, v in metrics.items() if k != "step")


def _join(*parts: str) -> str:
    return "  ".join(p for p in parts if p)


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _clock(t: Any) -> str:
    return time.strftime("%H:%M:%S", time.localtime(float(t))) if isinstance(t, (int, float)) else ""


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


__all__ = ["show_job", "show_jobs", "show_log"]
