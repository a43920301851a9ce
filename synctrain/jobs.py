"""Reading a step-logged job back without touching it: :func:`read_job` (``synctrain.read_job``),
:func:`list_jobs`, and the record stream behind ``synctrain log`` (:func:`log_records`,
:func:`follow`).

Theory of operation
-------------------
A job's directory (``storage_path/NAME``, see :mod:`synctrain.driver.jobdir`) holds
``job.json`` (what its driver recorded), ``driver.lock`` (held while a driver runs the job),
and the embedded coordinator's WALs (``coordinator/node-<id>/``) beside the endpoints and
token of the coordinator that last ran (``coordinator/endpoints``, ``coordinator/token``).
Nothing here writes into the directory or takes a coordinator node's LOCK; the one lock
touched is :func:`~synctrain.driver.jobdir.job_state`'s momentary shared probe of
``driver.lock``, which tells a running job from one whose driver died.

Where the records come from, in this order:

1. the job's coordinator, when a driver runs the job: every node is asked for its status in
   parallel (:data:`PING_TIMEOUT_S`), and if one answers, the step log is read through the
   leader, all within :data:`LIVE_TIMEOUT_S` (``source == "coordinator"``);
2. otherwise -- the driver is gone and took its coordinator with it, or a driver is starting
   or stopping its coordinator -- the WALs on disk, through :mod:`coordinator.offline`: the
   committed prefix of the log, queried with the step log's own code, so the answers are the
   coordinator's (``source == "disk"``);
3. a job given an external coordinator (``coordinator=``) keeps its records there, not in its
   directory: only ``job.json`` is read (``source == "job.json"``).

The fields a :class:`~synctrain.trainer.Result` also has (``metrics``, ``steps``,
``generations``, ``failures``, ``redone_steps``, ``checkpoint``, ``fenced``) are computed by
the driver's own function (:func:`synctrain.driver.run._fill_from_log`), so the keys match.

The record stream (:func:`log_records`, ``synctrain log --json``) orders the step log's
records by the job's structure, not by clocks (rank 0's, the driver's): by generation, then
by step; a generation's start first and its failures last; at one step the step, the reports
made after it, then a checkpoint taken there; the job's end last. Records a later generation
rolled back stay in the stream, marked ``"superseded": true``. :func:`follow` yields the same
records as they are committed, polling every ``poll_s`` and fetching only what is new (the
record lists only grow, so a count per kind says what was seen), at most
:data:`FOLLOW_MAX_ITEMS` per kind and poll; a failure is held back until its recovery is
recorded, a later generation starts or the job ends.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import pathlib
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

from synctrain.driver.jobdir import default_storage, job_state
from synctrain.errors import SynctrainError

#: Each coordinator node's status answer is waited for this long (all nodes in parallel).
PING_TIMEOUT_S = 0.5
#: The whole read from a live coordinator (pings included) gives up after this long.
LIVE_TIMEOUT_S = 2.0
#: Records of one kind fetched per poll by :func:`follow` (the rest come at the next poll).
FOLLOW_MAX_ITEMS = 10_000
#: The record kinds of the stream, and those a :class:`JobRecord` also holds.
STREAM_KINDS = ("generations", "steps", "reports", "checkpoints", "failures")
JOB_KINDS = STREAM_KINDS + ("fenced",)
RECORD_TYPES = ("generation", "step", "report", "checkpoint", "failure", "end")
_LAST = 1 << 62  # orders a generation's failures after its steps


class JobNotFoundError(SynctrainError, LookupError):
    """No job of that name under the storage path."""


@dataclasses.dataclass
class JobRecord:
    """A step-logged job as its directory and step log tell it (:func:`read_job`).

    ``state``: ``running | finished | failed | interrupted`` (``job.json`` and the driver's
    lock: a driver that died leaves ``interrupted``). ``checkpoints``: every committed
    checkpoint record, oldest first (``pruned``: its file was deleted; ``superseded``: rolled
    back). ``end``: how the job ended (the step log's record, or for a driver that died
    without recording one, ``job.json``'s), None while it runs."""

    name: str
    state: str
    spec: dict[str, Any]
    generations: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    steps: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    metrics: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    checkpoints: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    failures: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    job_dir: pathlib.Path | None = None
    coordinator_running: bool = False
    source: str = "disk"  # coordinator | disk | job.json
    end: dict[str, Any] | None = None
    generation: int = 0
    last_step: int = 0
    redone_steps: int = 0
    checkpoint: str | None = None
    fenced: list[dict[str, Any]] = dataclasses.field(default_factory=list, repr=False)
    note: str = ""  # why the records come from where they do, when it is not the coordinator
    status: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)  # job.json
    #: Coordinator nodes: live status (role, term, commit, applied, lag) or what the disk says.
    coordinator: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)
    info: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)  # log summary
    records: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def world_size(self) -> int:
        """Workers of the current generation (the spec's ``num_workers`` before the first)."""
        if self.generations:
            return len(self.generations[-1]["members"])
        return int(self.spec.get("num_workers") or self.status.get("num_workers") or 0)

    @property
    def last_loss(self) -> float | None:
        for metrics in reversed(self.metrics):
            if isinstance(metrics.get("loss"), (int, float)):
                return float(metrics["loss"])
        return None


@dataclasses.dataclass
class _Observation:
    """One look at a job: its directory's state and the records read from ``source``."""

    status: dict[str, Any]
    state: str
    source: str
    coordinator: dict[str, Any]
    note: str = ""
    info: dict[str, Any] | None = None  # None: the step log has no such job (yet)
    records: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)

    @property
    def ended(self) -> bool:
        return self.state != "running" or bool(self.info and self.info.get("end"))


def storage_dir(storage_path: str | os.PathLike[str] | None) -> pathlib.Path:
    """The storage directory (never created here)."""
    return pathlib.Path(os.path.expanduser(os.fspath(storage_path or default_storage())))


def job_names(storage_path: str | os.PathLike[str] | None = None) -> list[str]:
    """Names of the jobs under the storage path (directories with a ``job.json``), sorted."""
    storage = storage_dir(storage_path)
    try:
        return sorted(p.name for p in storage.iterdir() if (p / "job.json").is_file())
    except OSError:
        return []


def read_job(name: str, storage_path: str | os.PathLike[str] | None = None) -> JobRecord:
    """The job ``name`` under ``storage_path`` (default: ``$SYNCTRAIN_STORAGE_PATH``, else
    ~/synctrain_results), read from its coordinator if it runs, else from the WALs on disk,
    read-only. JobNotFoundError if there is no such job."""
    obs = _observe(_job_dir(name, storage_path), name, dict.fromkeys(JOB_KINDS, 0), None)
    return _record(name, _job_dir(name, storage_path), obs)


def list_jobs(storage_path: str | os.PathLike[str] | None = None) -> list[JobRecord]:
    """Every job under the storage path, by name (one that vanished meanwhile is left out)."""
    out = []
    for name in job_names(storage_path):
        try:
            out.append(read_job(name, storage_path))
        except JobNotFoundError:
            continue
    return out


def _job_dir(name: str, storage_path: str | os.PathLike[str] | None) -> pathlib.Path:
    storage = storage_dir(storage_path)
    job_dir = storage / name
    if os.sep in name or name in ("", ".", "..") or not (job_dir / "job.json").is_file():
        known = job_names(storage)
        listed = ", ".join(known[:20]) + (" ..." if len(known) > 20 else "") if known else "none"
        raise JobNotFoundError(f"no job named {name!r} in {str(storage)!r} (jobs there: {listed}); "
                               "pass --storage-path / storage_path= the directory the job was "
                               "started with")
    return job_dir


def _record(name: str, job_dir: pathlib.Path, obs: _Observation) -> JobRecord:
    from synctrain.driver.run import _fill_from_log

    info = obs.info or {}
    spec = dict(info.get("spec") or {k: obs.status[k] for k in ("mode", "num_workers")
                                      if k in obs.status})
    job = JobRecord(name=name, state=obs.state, spec=spec, job_dir=job_dir,
                    coordinator_running=obs.source == "coordinator", source=obs.source,
                    end=_end(obs), generation=int(info.get("generation", 0)),
                    last_step=int(info.get("last_step", 0)), note=obs.note, status=obs.status,
                    coordinator=obs.coordinator, info=info, records=obs.records,
                    checkpoints=list(obs.records.get("checkpoints", [])))
    if obs.info is not None:
        source = types.SimpleNamespace(records=lambda kind: obs.records.get(kind, []))
        result = types.SimpleNamespace()
        _fill_from_log(result, source, name)  # type: ignore[arg-type]
        for key in ("metrics", "steps", "generations", "failures", "redone_steps", "checkpoint",
                    "fenced"):
            setattr(job, key, getattr(result, key))
    return job


def _end(obs: _Observation) -> dict[str, Any] | None:
    """The job's end: the step log's record; for a job that ended without one (its driver
    died, or failed before the log had the job), what ``job.json`` says."""
    if obs.info and obs.info.get("end"):
        return dict(obs.info["end"])
    if obs.state == "running":
        return None
    reason = str(obs.status.get("reason") or "")
    if obs.state == "interrupted" and obs.status.get("state") == "running":
        driver = obs.status.get("driver") or {}
        reason = (f"the driver (pid {driver.get('pid', '?')} on {driver.get('host', '?')}) is gone "
                  "and recorded no end: it was killed, or its host failed; run the same script "
                  "again with this job_name (or `synctrain resume`) to continue the job")
    info = obs.info or {}
    return {"state": obs.state, "reason": reason, "time": obs.status.get("updated"),
            "generation": info.get("generation", 0), "last_step": info.get("last_step", 0)}


# ---------------------------------------------------------------- reading the step log
def _observe(job_dir: pathlib.Path, name: str, starts: dict[str, int],
             max_items: int | None) -> _Observation:
    status = _read_status(job_dir)
    state = job_state(job_dir, status)
    if status.get("coordinator") == "external":
        return _Observation(status, state, "job.json", {}, note=(
            "the step log is kept by the external coordinator given as coordinator=; read it "
            "there (coordinator status --all, steplog queries)"))
    note = ""
    if state == "running":
        live = _read_live(job_dir, name, starts, max_items)
        if isinstance(live, _Observation):
            live.status, live.state = status, state
            return live
        note = f"coordinator not running (read from disk): {live}"
    return _read_disk(job_dir, name, starts, status, state,
                      note or "coordinator not running (read from disk)")


def _read_status(job_dir: pathlib.Path) -> dict[str, Any]:
    try:
        status = json.loads((job_dir / "job.json").read_text())
    except (OSError, ValueError) as exc:
        raise JobNotFoundError(f"{str(job_dir)!r} is not a readable job directory: its job.json "
                               f"could not be read ({exc})") from None
    return status if isinstance(status, dict) else {}


def _read_live(job_dir: pathlib.Path, name: str, starts: dict[str, int],
               max_items: int | None) -> _Observation | str:
    """The records from the running coordinator, or why not (a short text)."""
    from coordinator.client import CoordinatorError, RequestRejected
    from synctrain.driver.coord import read_job_coordinator
    from synctrain.steplog import StepLog

    try:
        endpoints, token = read_job_coordinator(job_dir)
    except OSError:
        return "its endpoints are not recorded yet"
    deadline = time.monotonic() + LIVE_TIMEOUT_S
    nodes = _node_statuses(endpoints, token)
    if not any("error" not in n for n in nodes):
        return "no node answered"
    steplog = StepLog(endpoints, token, name, timeout_s=LIVE_TIMEOUT_S)
    try:
        def remaining() -> float:
            steplog.client.timeout_s = max(0.05, deadline - time.monotonic())
            return steplog.client.timeout_s

        remaining()
        try:
            info: dict[str, Any] | None = steplog.job_info()
        except RequestRejected as exc:
            if exc.code != "no_such_job":
                raise
            info = None
        records = {}
        for kind in starts if info is not None else ():
            remaining()
            records[kind] = steplog.records(kind, start=starts[kind], max_items=max_items)
    except CoordinatorError as exc:
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    finally:
        steplog.close()
    return _Observation({}, "running", "coordinator", _live_summary(nodes), info=info,
                        records=records)


def _node_statuses(endpoints: list[str], token: bytes) -> list[dict[str, Any]]:
    from coordinator.client import Client, CoordinatorError

    def ask(endpoint: str) -> dict[str, Any]:
        try:
            with Client([endpoint], token=token, timeout_s=PING_TIMEOUT_S) as client:
                st = client.status(endpoint)
        except (CoordinatorError, OSError, ValueError) as exc:
            return {"endpoint": endpoint, "error": f"{type(exc).__name__}: {str(exc)[:120]}"}
        return {"endpoint": endpoint, **{k: st.get(k) for k in ("id", "role", "term", "leader",
                                                                 "commit", "applied")}}

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(len(endpoints), 9))) as pool:
        return list(pool.map(ask, endpoints))


def _live_summary(nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """Which node leads (the leader of the highest term any node answered with) and each
    node's commit lag: the leader's commit index minus the entries the node has applied."""
    answered = [n for n in nodes if "error" not in n]
    leaders = [n for n in answered if n.get("role") == "leader"]
    leader = max(leaders, key=lambda n: n.get("term") or 0) if leaders else None
    commit = leader["commit"] if leader else max((n.get("commit") or 0 for n in answered), default=0)
    for n in answered:
        n["lag"] = max(0, commit - int(n.get("applied") or 0))
    return {"nodes": nodes, "leader": leader["id"] if leader else None,
            "term": leader["term"] if leader else None, "commit_index": commit,
            "lag": max((n["lag"] for n in answered), default=0)}


def _read_disk(job_dir: pathlib.Path, name: str, starts: dict[str, int], status: dict[str, Any],
               state: str, note: str) -> _Observation:
    from coordinator.offline import node_dirs, read_state
    from coordinator.storage import StorageError

    dirs = node_dirs(job_dir / "coordinator")
    if not dirs:
        return _Observation(status, state, "job.json", {}, note="no coordinator data in the job "
                            "directory (the job stopped before its coordinator started)")
    try:
        offline = read_state(dirs)
    except StorageError as exc:
        return _Observation(status, state, "job.json", {}, note=f"the coordinator's WALs could "
                            f"not be read: {exc}")
    nodes = [{"id": n.node_id, "term": n.term, "vote": n.vote, "commit": n.commit,
              "last_index": n.last_index, "snapshot_index": n.snapshot_index,
              **({"torn_tail": n.torn_tail} if n.torn_tail else {}),
              **({"error": n.error} if n.error else {})} for n in offline.nodes]
    coordinator = {"nodes": nodes, "commit_index": offline.commit_index,
                   "elected": offline.elected, "elected_term": offline.elected_term}
    sm = offline.state_machine
    answer = sm.query("steplog", "job", (name,))
    if not answer.get("ok"):
        return _Observation(status, state, "disk", coordinator, note=note + "; the step log has "
                            "no record of this job (it stopped before recording it)")
    records = {kind: _disk_records(sm, name, kind, start) for kind, start in starts.items()}
    return _Observation(status, state, "disk", coordinator, note, answer["job"], records)


def _disk_records(sm: Any, name: str, kind: str, start: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while True:
        answer = sm.query("steplog", "records", (name, kind, start, 2000))
        assert answer.get("ok"), answer
        out.extend(answer["items"])
        start = answer["next"]
        if start >= answer["total"] or not answer["items"]:
            return out


# ---------------------------------------------------------------- the record stream
def typed_record(kind: str, raw: dict[str, Any]) -> dict[str, Any]:
    """One step-log record as a stream record: ``{"type": ..., fields}`` with the keys of the
    matching Result field (a generation also has its ``time``), plus ``"superseded": true``
    for one a later generation rolled back."""
    from synctrain.driver.run import _step

    if kind == "generations":
        out = {"type": "generation", **{k: raw[k] for k in ("generation", "members", "start_step",
                                                           "reason", "time")}}
    elif kind == "steps":
        out = {"type": "step", **_step(raw)}
    elif kind == "reports":
        out = {"type": "report", **{k: raw[k] for k in ("seq", "step", "generation", "metrics")}}
    elif kind == "checkpoints":
        out = {"type": "checkpoint", **{k: v for k, v in raw.items() if k != "superseded_by"}}
    elif kind == "failures":
        out = {"type": "failure", **raw}
    else:
        raise ValueError(f"no stream record for kind {kind!r}")
    if raw.get("superseded"):
        out["superseded"] = True
    return out


def _order(rec: dict[str, Any]) -> tuple[int, int, int, int]:
    generation, kind = int(rec.get("generation") or 0), rec["type"]
    if kind == "generation":
        return generation, -1, 0, 0
    if kind == "failure":
        return generation, _LAST, 0, 0
    rank = {"step": 1, "report": 2, "checkpoint": 3}[kind]
    return generation, int(rec.get("step") or 0), rank, int(rec.get("seq") or 0)


def log_records(job: JobRecord) -> list[dict[str, Any]]:
    """The job's whole committed log as stream records, in job order (see the module doc)."""
    out = [typed_record(kind, raw) for kind in STREAM_KINDS for raw in job.records.get(kind, [])]
    out.sort(key=_order)  # stable: records with equal keys stay in log order
    if job.end is not None:
        out.append({"type": "end", **job.end})
    return out


def follow(name: str, storage_path: str | os.PathLike[str] | None = None, *,
           poll_s: float = 1.0, max_wait_s: float | None = None,
           sleep: Callable[[float], None] = time.sleep) -> Iterator[dict[str, Any]]:
    """Yield the job's stream records as they are committed, until the job ends (its end
    record comes last) or ``max_wait_s`` passes (then it just stops)."""
    for batch in follow_batches(name, storage_path, poll_s=poll_s, max_wait_s=max_wait_s,
                                sleep=sleep):
        yield from batch


def follow_batches(name: str, storage_path: str | os.PathLike[str] | None = None, *,
                   poll_s: float = 1.0, max_wait_s: float | None = None,
                   sleep: Callable[[float], None] = time.sleep) -> Iterator[list[dict[str, Any]]]:
    """:func:`follow`, one list per poll (what was committed since the last one)."""
    assert poll_s > 0
    job_dir = _job_dir(name, storage_path)
    seen = dict.fromkeys(STREAM_KINDS, 0)
    deadline = None if max_wait_s is None else time.monotonic() + max_wait_s
    while True:
        obs = _observe(job_dir, name, dict(seen), FOLLOW_MAX_ITEMS)
        batch = []
        for kind in STREAM_KINDS:
            items = obs.records.get(kind, [])
            if kind == "failures":
                items = _recovered_prefix(items, obs)
            seen[kind] += len(items)
            batch += [typed_record(kind, raw) for raw in items]
        batch.sort(key=_order)
        caught_up = all(len(obs.records.get(k, [])) < FOLLOW_MAX_ITEMS for k in STREAM_KINDS)
        if obs.ended and caught_up:
            end = _end(obs)
            yield batch + ([{"type": "end", **end}] if end is not None else [])
            return
        if batch:
            yield batch
        if deadline is not None and time.monotonic() >= deadline:
            return
        sleep(poll_s)


def _recovered_prefix(failures: list[dict[str, Any]], obs: _Observation) -> list[dict[str, Any]]:
    """The failures, in order, up to the first whose recovery is not known yet."""
    generation = int((obs.info or {}).get("generation", 0))
    out = []
    for f in failures:
        if f.get("recovery_s") is None and int(f.get("generation") or 0) >= generation \
                and not obs.ended:
            break
        out.append(f)
    return out


__all__ = ["JobNotFoundError", "JobRecord", "follow", "follow_batches", "job_names", "list_jobs", "log_records",
           "read_job", "typed_record"]
