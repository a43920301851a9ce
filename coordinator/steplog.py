"""The training step log: the replicated record of what each training job has committed.

Theory of operation
-------------------
The step log is a state-machine extension (``"steplog"``, see
:func:`coordinator.statemachine.register_extension`) with its own session commands
(``steplog.create``, ``steplog.generation``, ``steplog.steps``, ``steplog.checkpoint``,
``steplog.failure``, ``steplog.annotate_failure``, ``steplog.end``) and read-only queries
(``job``, ``records``, ``jobs``). Like every command, each one is a pure function of the
committed log: the caller supplies the wall-clock ``time`` it wants recorded, a replica never
reads its own clock, and a bad argument is an error answer, never an exception (one that
raised on every replica would stop the whole cluster). Commands run in client sessions, so a
retried command is applied once.

Records kept, per job (a name of 1..200 characters of ``[A-Za-z0-9._-]``):

- ``spec`` (the dict given at creation), ``state`` (running | finished | failed |
  interrupted), the current ``generation`` (0 until the first one starts), ``last_step`` (the
  number of the last step record) and ``report_seq`` (the next report's sequence number).
- ``generations``: one record per generation of workers: members, rendezvous, where it
  started (``start_step``, ``start_report``), why, when.
- ``steps``: one record per optimizer step, written by rank 0: ``{step, generation, time,
  ps_clock}``. ``reports``: metrics a job reported, numbered by ``seq`` from 0, each tied to
  the step it followed and carrying that step's ``time`` (absent for a report before the
  first step, and in logs written before reports carried it), so a reader of the reports
  never needs the far longer list of steps. Other ranks only report their progress (``progress[rank]``, the
  highest step they wrote in the current generation).
- ``checkpoints``: ``{step, generation, path, size, sha256, time[, digest]}`` (by
  ``steplog.checkpoint``, or riding on rank 0's ``steplog.steps``, after its records: one
  commit for both; the same checkpoint sent again is recorded once); ``failures``:
  what failed and how the job recovered; ``fenced``: writes refused by the fencing rule.
- ``digests``: per step of the current generation that carries them, every rank's digest of
  the state it holds as a replica (see *Digests* below).

The fencing rule: a write from a worker (``steps``, ``checkpoint``) names the generation it
belongs to and is refused (``error "fenced"``, recorded in ``fenced``) unless that is the
current generation. A generation is started only as ``current + 1``, so once the driver has
started generation G + 1, nothing a worker of generation G still sends can change the log:
a replaced worker that was merely slow (paused, partitioned) cannot write over its successor.
A write that names a generation *above* the current one is answered ``"not_yet"`` (and not
recorded): the driver tells surviving workers the new number before it starts the generation,
so they retry until it is current instead of being fenced.

A "continue" generation (``start_step == -1``; async mode, where survivors never stop) rolls
nothing back: ``start_step``/``start_report`` are recorded as the log's current position, and
rank 0's next step may jump ahead (a replacement rank 0 resumes at its parameter-server clock),
the skipped steps filled with ``lost`` placeholders.

Superseding: a new generation resumes from ``start_step`` (the checkpoint it restored) and
``start_report``. Everything the log holds beyond that point belongs to a history that will
be redone, so every step record with ``step > start_step``, report with ``seq >=
start_report`` and checkpoint with ``step > start_step`` is marked ``superseded`` (and
``superseded_by`` the new generation); nothing is deleted. A survivor may be *ahead* of the
committed log (its steps were in flight when the others died): the steps between
``last_step`` and ``start_step`` are then filled with placeholders marked ``lost``. Either
way ``last_step = start_step`` and ``report_seq = start_report`` afterwards, so the live
(non-superseded) step records always run 1, 2, ..., ``last_step`` in list order.

Rank 0's step batches are checked whole before anything is applied: a record whose step is
at most ``last_step`` is a duplicate (a retried batch) and skipped, a record at ``last_step``
may carry reports only (made after that step, before the next), the next step must be
``last_step + 1``, and reports must continue at ``report_seq`` (lower: duplicate, skipped;
higher: a gap). A gap refuses the whole batch with ``error "gap"`` and the expected numbers.
A *run* ``{"run": first, "times": [...][, "ps_clocks": [...]]}`` stands for the records of
steps ``first``, ``first + 1``, ... that carry nothing but their time (and PS clock): the same
rules apply to each of its steps (those at most ``last_step`` skipped), and it is stored as
those step records. A batch holds at most :data:`MAX_RECORDS_PER_BATCH` steps, runs included.

Two checkpoints stay live (not superseded, not pruned); committing a third prunes the oldest
and answers its path so the writer can delete the file (never a path a live checkpoint
still uses). A job that commits digests keeps more (see below).

Digests. In sync mode every rank holds a replica of the same parameters; any rank's step
record may carry a ``digest`` of its replica at that step. The digests of one step and
generation form a *set*; once it holds one from every member of the generation it is judged:
``agree``, or ``mismatch`` (the first live mismatch is kept in ``digest_mismatch`` with the
digest more than half of the ranks hold, if any, and the ranks that differ from it).
``digest_trusted`` is the newest step of an agreeing set with no live mismatch before it: a
checkpoint at or before it holds state that every rank agreed on. Pruning never removes the
newest such checkpoint, nor (up to :data:`MAX_UNVERIFIED_CHECKPOINTS`) those newer than it
whose verdict is still open, so the driver can always roll back to the last checkpoint whose
digests agreed. A new generation supersedes the sets beyond its start (and a mismatch there),
like every other record.

Pulled digests. In async mode no rank holds a replica, so a worker's step record may carry a
``pulled`` check instead: per shard, the version (the shard's clock) of the parameters it
pulled, the digest the shard gave of what it served, and the digest of what the worker held
when it computed the gradients of that step. Each check is judged as it arrives (once per rank
and step): a held digest that differs from the served one names the worker (it dropped those
gradients, so nothing corrupt reached a shard); a served digest that differs from one kept
for the same shard and version in this generation (the newest :data:`MAX_SERVED_KEPT`) names
the shard, whose parameters changed with no update applied. Mismatches are kept in
``pulled_mismatches`` (the newest :data:`MAX_PULLED_MISMATCHES_KEPT`, the rest counted) and
summarised under ``digests.pulled``; the driver turns each into a failure record.

Bounds (:data:`MAX_JOBS` and the other ``MAX_*`` below) are refused with error answers, except
the fenced-refusal list, which keeps the newest :data:`MAX_FENCED_KEPT` and counts the rest.
Step and report lists grow with the job by design; each entry is small and validated. Query
answers are paged (``start``/``limit``) and cut at :data:`MAX_QUERY_ANSWER_BYTES`.

Safety notes (each has a test in ``tests/service/test_steplog.py``):

* A write of an older generation changes nothing but the ``fenced`` list
  (``test_write_from_an_older_generation_is_fenced_and_changes_nothing``).
* A batch with a gap applies nothing (``test_gap_refuses_the_whole_batch``); a retried batch
  applies once (``test_retried_batch_applies_once``).
* Superseding marks exactly what lies beyond the restart point
  (``test_new_generation_supersedes_what_lies_beyond_its_start``).
* A digest set is judged only when complete, the rank outside the majority is named, none
  with no majority (``tests/service/test_steplog_digests.py``), and the last checkpoint the
  digests vouch for is never pruned (``test_the_trusted_checkpoint_is_never_pruned``).
* Snapshot and restore round-trip every record, byte for byte
  (``test_snapshot_restore_round_trip``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import msgpack

from coordinator.statemachine import (
    Answer,
    Command,
    StateMachine,
    error,
    register_command,
    register_extension,
)

EXTENSION = "steplog"
SNAPSHOT_FORMAT = 3  # 2 added the digest fields at the end of Job, 3 the pulled ones; 1 and 2 still read

# Bounds. Breaking one is refused with an error answer (except MAX_FENCED_KEPT: oldest dropped).
MAX_JOBS = 1_000
MAX_SPEC_BYTES = 64 << 10  # a job's spec, msgpack-encoded
MAX_GENERATIONS = 10_000  # per job
MAX_MEMBERS = 4_096  # per generation
MAX_RANK = 1 << 20
MAX_RECORDS_PER_BATCH = 4_096  # step records in one steplog.steps (a run's steps count each)
MAX_REPORTS_PER_BATCH = 4_096  # reports in one steplog.steps, all records together
MAX_METRICS_PER_REPORT = 64
MAX_METRIC_KEY_CHARS = 128
MAX_METRIC_STR_CHARS = 1_024
MAX_LOST_STEPS = 100_000  # placeholders one generation may add (a survivor far ahead)
MAX_CHECKPOINTS = 100_000  # per job, pruned ones included
MAX_BATCH_CHECKPOINTS = 64  # checkpoint references riding on one steps command
MAX_FAILURES = 10_000  # per job
MAX_FENCED_KEPT = 1_000  # per job; older refusals are dropped and counted
MAX_TEXT_CHARS = 4_096  # paths, reasons, details, rendezvous
MAX_NAME_CHARS = 256  # node ids, failure kinds, recovery names, checksums
MAX_QUERY_ITEMS = 2_000
MAX_QUERY_ANSWER_BYTES = 512 << 10  # well under a transport frame
LIVE_CHECKPOINTS = 2
MAX_DIGEST_SETS_KEPT = 1_000  # per job; older sets are dropped and counted
MAX_DIGEST_CHARS = 128  # one digest, as text (a hex hash)
#: Checkpoints newer than the trusted one kept while their digests' verdict is open.
MAX_UNVERIFIED_CHECKPOINTS = 8
MAX_PULLED_SHARDS = 4_096  # shards one pulled-digest check covers
MAX_SERVED_KEPT = 1_024  # per job: the newest (shard, version) -> served digest, for the cross-check
MAX_PULLED_MISMATCHES_KEPT = 1_000  # per job; older ones are dropped and counted

JOB_STATES = ("running", "finished", "failed", "interrupted")
END_STATES = ("finished", "failed", "interrupted")
RECORD_KINDS = ("steps", "reports", "generations", "checkpoints", "failures", "fenced",
                "digests")
FAILURE_FIELDS = ("generation", "rank", "kind", "step", "time", "recovery", "recovery_s")
FAILURE_OPTIONAL = ("detail",)
ANNOTATABLE = ("recovery", "recovery_s", "detail")

_JOB_NAME = re.compile(r"[A-Za-z0-9._-]{1,200}")


class BadArgument(Exception):
    """An argument failed validation; becomes a ``bad_argument`` answer."""


# ------------------------------------------------------------------ validation
def _int(v: Any, what: str, lo: int = 0, hi: int = 1 << 62) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise BadArgument(f"{what} must be an integer in [{lo}, {hi}], got {v!r:.60}")
    return v


def _opt_int(v: Any, what: str) -> int | None:
    return None if v is None else _int(v, what, -(1 << 62))


def _time(v: Any, what: str = "time") -> float:
    if type(v) not in (int, float) or not math.isfinite(v):
        raise BadArgument(f"{what} must be a finite number (unix seconds), got {v!r:.60}")
    return float(v)


def _opt_number(v: Any, what: str) -> float | None:
    return None if v is None else _time(v, what)


def _text(v: Any, what: str, max_chars: int = MAX_TEXT_CHARS, empty: bool = True) -> str:
    if not isinstance(v, str) or len(v) > max_chars or (not empty and not v):
        raise BadArgument(f"{what} must be a string of {0 if empty else 1}..{max_chars} "
                          f"characters, got {v!r:.60}")
    return v


def _opt_text(v: Any, what: str, max_chars: int = MAX_TEXT_CHARS) -> str | None:
    return None if v is None else _text(v, what, max_chars)


def _seq(v: Any, what: str, max_len: int) -> list[Any]:
    if not isinstance(v, (list, tuple)) or len(v) > max_len:
        raise BadArgument(f"{what} must be a list of at most {max_len} items")
    return list(v)


def _job_name(v: Any) -> str:
    if not isinstance(v, str) or not _JOB_NAME.fullmatch(v):
        raise BadArgument(f"a job name is 1..200 characters of [A-Za-z0-9._-], got {v!r:.60}")
    return v


def _plain(v: Any, depth: int = 0) -> Any:
    """``v`` as plain msgpack types (tuples become lists); str keys only."""
    if depth > 32:
        raise BadArgument("a value is nested more than 32 levels deep")
    if v is None or type(v) in (bool, int, float, str, bytes):
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x, depth + 1) for x in v]
    if isinstance(v, dict):
        if not all(isinstance(k, str) for k in v):
            raise BadArgument("map keys must be strings")
        return {k: _plain(x, depth + 1) for k, x in v.items()}
    raise BadArgument(f"a value of type {type(v).__name__} is not plain msgpack")


_METRIC_SCALARS = (bool, int, float, type(None))


def _metrics(v: Any) -> dict[str, Any]:
    # On the apply path of every step batch: checks inlined (a batch holds thousands).
    if type(v) is not dict or len(v) > MAX_METRICS_PER_REPORT:
        raise BadArgument(f"metrics must be a map of at most {MAX_METRICS_PER_REPORT} keys")
    for key, value in v.items():
        if type(key) is not str or not 0 < len(key) <= MAX_METRIC_KEY_CHARS:
            raise BadArgument(f"a metric key must be 1..{MAX_METRIC_KEY_CHARS} characters, "
                              f"got {key!r:.60}")
        kind = type(value)
        if kind is str:
            if len(value) > MAX_METRIC_STR_CHARS:
                raise BadArgument(f"metric {key!r} is longer than {MAX_METRIC_STR_CHARS} "
                                  "characters")
        elif kind not in _METRIC_SCALARS:
            raise BadArgument(f"metric {key!r} must be a number, bool, string or None, "
                              f"got {kind.__name__}")
    return dict(v)


def _members(v: Any) -> list[dict[str, Any]]:
    items = _seq(v, "members", MAX_MEMBERS)
    if not items:
        raise BadArgument("a generation needs at least one member")
    out, ranks = [], set()
    for m in items:
        if not isinstance(m, dict) or set(m) != {"rank", "node_id"}:
            raise BadArgument('each member must be a map {"rank": int, "node_id": str}')
        rank = _int(m["rank"], "a member's rank", 0, MAX_RANK - 1)
        if rank in ranks:
            raise BadArgument(f"rank {rank} appears twice in the members")
        ranks.add(rank)
        out.append({"rank": rank, "node_id": _text(m["node_id"], "node_id", MAX_NAME_CHARS)})
    return out


@dataclasses.dataclass(frozen=True, slots=True)
class _Record:
    """One validated record of a ``steplog.steps`` batch."""

    step: int
    time: float
    reports: tuple[tuple[int, dict[str, Any]], ...]
    ps_clock: int | None
    digest: str | None = None
    pulled: tuple[tuple[int, str, str], ...] | None = None  # per shard: (version, served, held)


@dataclasses.dataclass(frozen=True, slots=True)
class _Run:
    """A validated *run*: consecutive steps ``first``..``step`` that carry nothing but their
    time (and PS clock), sent as one record ``{"run": first, "times": [...][, "ps_clocks":
    [...]]}``: a fast job's batch is mostly such steps, and a run costs each replica a loop
    over two lists instead of a map per step."""

    first: int
    step: int  # the last step of the run
    times: list[float]
    ps_clocks: list[int | None] | None
    reports: tuple = ()
    digest: None = None
    pulled: None = None

    @property
    def time(self) -> float:
        return self.times[-1]


_RECORD_KEYS = frozenset({"step", "time", "reports", "ps_clock", "digest", "pulled"})
_RUN_KEYS = frozenset({"run", "times", "ps_clocks"})


def _run(r: dict[str, Any]) -> _Run:
    if not _RUN_KEYS.issuperset(r) or "times" not in r:
        raise BadArgument('a run is a map {"run": first step, "times": [number][, "ps_clocks": '
                          '[int or nil]]}')
    first = _int(r["run"], "a run's first step")
    times = _seq(r["times"], "a run's times", MAX_RECORDS_PER_BATCH)
    # (a NaN or an infinity anywhere makes the sum one; so does only a sum past 1e308)
    if not times or not all(type(t) is float or type(t) is int for t in times) or not (
            math.isfinite(sum(times))):
        raise BadArgument("a run's times are one finite number (unix seconds) per step, at least one")
    clocks = r.get("ps_clocks")
    if clocks is not None:
        clocks = _seq(clocks, "a run's ps_clocks", MAX_RECORDS_PER_BATCH)
        if len(clocks) != len(times) or not all(
                c is None or (type(c) is int and -(1 << 62) <= c <= 1 << 62) for c in clocks):
            raise BadArgument("a run's ps_clocks are one integer (or nil) per step")
    return _Run(first, first + len(times) - 1, [float(t) for t in times], clocks)


def _records(v: Any) -> list[_Record | _Run]:
    items = _seq(v, "records", MAX_RECORDS_PER_BATCH)
    out: list[_Record | _Run] = []
    reports_total = steps_total = 0
    for r in items:
        if type(r) is dict and "run" in r:
            run = _run(r)
            steps_total += len(run.times)
            if steps_total > MAX_RECORDS_PER_BATCH:
                raise BadArgument(f"a batch carries at most {MAX_RECORDS_PER_BATCH} steps")
            out.append(run)
            continue
        steps_total += 1
        if steps_total > MAX_RECORDS_PER_BATCH:
            raise BadArgument(f"a batch carries at most {MAX_RECORDS_PER_BATCH} steps")
        if type(r) is not dict or "step" not in r or "time" not in r or not (
                _RECORD_KEYS.issuperset(r)):
            raise BadArgument('a record is a map {"step", "time"[, "reports", "ps_clock", '
                              '"digest", "pulled"]} or a run {"run", "times"[, "ps_clocks"]}')
        parsed: tuple[tuple[int, dict[str, Any]], ...] = ()
        if r.get("reports"):
            reports = _seq(r["reports"], "reports", MAX_REPORTS_PER_BATCH)
            reports_total += len(reports)
            if reports_total > MAX_REPORTS_PER_BATCH:
                raise BadArgument(f"a batch carries at most {MAX_REPORTS_PER_BATCH} reports")
            parsed = tuple(_report(rep) for rep in reports)
        ps_clock, digest = r.get("ps_clock"), r.get("digest")
        out.append(_Record(_int(r["step"], "step"), _time(r["time"]), parsed,
                           None if ps_clock is None else _int(ps_clock, "ps_clock", -(1 << 62)),
                           None if digest is None else _text(digest, "digest", MAX_DIGEST_CHARS,
                                                             empty=False),
                           None if r.get("pulled") is None else _pulled(r["pulled"])))
    return out


def _pulled(v: Any) -> tuple[tuple[int, str, str], ...]:
    """A pulled-digest check: ``{"versions": [int], "served": [str], "held": [str]}``, one
    entry per shard, in shard order."""
    if type(v) is not dict or set(v) != {"versions", "served", "held"}:
        raise BadArgument('"pulled" is a map {"versions": [int], "served": [str], "held": [str]}')
    versions = _seq(v["versions"], "pulled versions", MAX_PULLED_SHARDS)
    served = _seq(v["served"], "pulled served digests", MAX_PULLED_SHARDS)
    held = _seq(v["held"], "pulled held digests", MAX_PULLED_SHARDS)
    if not versions or not len(versions) == len(served) == len(held):
        raise BadArgument('"pulled" needs one version, served and held digest per shard (at least one)')
    return tuple((_int(ver, "a pulled version"), _text(a, "a pulled served digest", MAX_DIGEST_CHARS, empty=False),
                  _text(b, "a pulled held digest", MAX_DIGEST_CHARS, empty=False))
                 for ver, a, b in zip(versions, served, held, strict=True))


def _report(rep: Any) -> tuple[int, dict[str, Any]]:
    if type(rep) is not dict or len(rep) != 2 or "seq" not in rep or "metrics" not in rep:
        raise BadArgument('a report is a map {"seq": int, "metrics": map}')
    return _int(rep["seq"], "a report seq"), _metrics(rep["metrics"])


# ------------------------------------------------------------------ the log
@dataclasses.dataclass(slots=True)
class Job:
    """Everything the log holds about one job; every field is plain msgpack data."""

    name: str
    spec: dict[str, Any]
    state: str = "running"
    generation: int = 0
    last_step: int = 0
    report_seq: int = 0
    generations: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    steps: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    reports: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    checkpoints: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    failures: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    fenced: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    fenced_dropped: int = 0
    progress: dict[str, int] = dataclasses.field(default_factory=dict)
    end: dict[str, Any] | None = None
    # After a "continue" generation (start_step -1): rank 0's next step may jump ahead (a
    # replacement rank 0 resumes at its parameter-server clock); the skipped steps are lost.
    allow_jump: bool = False
    # Digests (snapshot format 2; see the module doc): the sets, oldest first, at most
    # MAX_DIGEST_SETS_KEPT; the newest step they vouch for; the first live mismatch.
    digests: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    digests_dropped: int = 0
    digest_trusted: int | None = None
    digest_mismatch: dict[str, Any] | None = None
    # Pulled digests (async; snapshot format 3; see the module doc): checks judged; the newest
    # step judged per rank of the current generation (a retried batch is skipped); the newest
    # served digests as [shard, version, digest, rank, step, generation]; the mismatches found.
    pulled_checks: int = 0
    pulled_seen: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    pulled_served: list[list[Any]] = dataclasses.field(default_factory=list)
    pulled_mismatches: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    pulled_mismatches_dropped: int = 0

    def live_checkpoints(self) -> list[dict[str, Any]]:
        return [c for c in self.checkpoints if not c.get("superseded") and not c.get("pruned")]

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "spec": self.spec, "state": self.state,
                "generation": self.generation, "last_step": self.last_step,
                "report_seq": self.report_seq, "steps": len(self.steps),
                "reports": len(self.reports),
                "checkpoints": [dict(c) for c in self.live_checkpoints()],
                "failures": len(self.failures),
                "fenced": len(self.fenced) + self.fenced_dropped,
                "fenced_dropped": self.fenced_dropped, "progress": dict(self.progress),
                "end": None if self.end is None else dict(self.end),
                "digests": self.digest_summary()}

    def digest_summary(self) -> dict[str, Any]:
        judged = [d["step"] for d in self.digests if d["verdict"] and not d.get("superseded")]
        return {"trusted_step": self.digest_trusted,
                "mismatch": None if self.digest_mismatch is None else dict(self.digest_mismatch),
                "verdict_step": judged[-1] if judged else None,
                "sets": len(self.digests) + self.digests_dropped,
                "pulled": {"checks": self.pulled_checks,
                           "mismatches": len(self.pulled_mismatches) + self.pulled_mismatches_dropped,
                           "dropped": self.pulled_mismatches_dropped,
                           "recent": [dict(m) for m in self.pulled_mismatches[-MAX_SUMMARY_MISMATCHES:]]}}


#: Pulled-digest mismatches a job summary lists (the newest; the count covers them all).
MAX_SUMMARY_MISMATCHES = 20
_JOB_FIELDS = tuple(f.name for f in dataclasses.fields(Job))
_JOB_FIELDS_FORMAT_1 = _JOB_FIELDS[:_JOB_FIELDS.index("digests")]
_JOB_FIELDS_FORMAT_2 = _JOB_FIELDS[:_JOB_FIELDS.index("pulled_checks")]


class StepLog:
    """The ``steplog`` extension: all jobs. Command methods return answers (never raise
    :class:`BadArgument` to the apply loop: :func:`_handler` turns it into an answer)."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}

    # ------------------------------------------------------------ snapshot
    def snapshot_state(self) -> dict[str, Any]:
        """Deterministic: jobs sorted by name, fields in declaration order."""
        return {"format": SNAPSHOT_FORMAT,
                "jobs": [[getattr(self.jobs[n], f) for f in _JOB_FIELDS]
                         for n in sorted(self.jobs)]}

    def restore_state(self, state: Any) -> None:
        if not isinstance(state, dict) or state.get("format") not in (1, 2, SNAPSHOT_FORMAT):
            raise ValueError(f"unsupported steplog snapshot format {state.get('format')!r}"
                             if isinstance(state, dict) else "steplog snapshot is not a map")
        fields = {1: _JOB_FIELDS_FORMAT_1, 2: _JOB_FIELDS_FORMAT_2}.get(state["format"], _JOB_FIELDS)
        self.jobs = {}
        for values in state["jobs"]:
            job = Job(**dict(zip(fields, values, strict=True)))  # older formats: newer fields at defaults
            self.jobs[job.name] = job

    def _job(self, name: Any) -> Job:
        job = self.jobs.get(_job_name(name))
        if job is None:
            raise _Refused("no_such_job", f"there is no job {name!r}; create it with "
                           "steplog.create first")
        return job

    # ------------------------------------------------------------ commands
    def create(self, name: Any, spec: Any, resume: Any) -> Answer:
        name = _job_name(name)
        if not isinstance(spec, dict):
            raise BadArgument("spec must be a map")
        spec = _plain(spec)
        if len(msgpack.packb(spec, use_bin_type=True)) > MAX_SPEC_BYTES:
            raise BadArgument(f"spec is larger than {MAX_SPEC_BYTES} bytes encoded")
        if type(resume) is not bool:
            raise BadArgument("resume must be a bool")
        job = self.jobs.get(name)
        if job is None:
            if len(self.jobs) >= MAX_JOBS:
                return error("quota_exceeded", f"the step log holds its limit of {MAX_JOBS} "
                             "jobs; no more can be created")
            self.jobs[name] = Job(name, spec)
            return {"ok": True, "created": True}
        if not resume:
            return error("job_exists", f"job {name!r} already exists (state {job.state}); "
                         "pick another name, or pass resume=True to continue it")
        if job.state == "finished":
            return error("job_finished", f"job {name!r} has finished; it cannot be resumed")
        old, job.state, job.end = job.state, "running", None
        return {"ok": True, "created": False, "state": old, "spec": job.spec}

    def generation(self, name: Any, generation: Any, members: Any, rendezvous: Any,
                   start_step: Any, start_report: Any, reason: Any, time: Any) -> Answer:
        job = self._job(name)
        generation = _int(generation, "generation", 1)
        keep_going = start_step == -1  # "continue": nothing is rolled back (async survivors)
        record = {"generation": generation, "members": _members(members),
                  "rendezvous": _opt_text(rendezvous, "rendezvous"),
                  "start_step": job.last_step if keep_going else _int(start_step, "start_step"),
                  "start_report": (job.report_seq if keep_going and start_report == -1
                                   else _int(start_report, "start_report")),
                  "reason": _text(reason, "reason"), "time": _time(time)}
        if generation != job.generation + 1:
            return error("fenced", f"generation {generation} cannot start: job {job.name!r} is "
                         f"at generation {job.generation}, the next is {job.generation + 1} "
                         "(another driver started one meanwhile?)")
        if job.state != "running":
            return error("job_not_running", f"job {job.name!r} is {job.state}; resume it with "
                         "steplog.create(..., resume=True) before starting a generation")
        if len(job.generations) >= MAX_GENERATIONS:
            return error("quota_exceeded", f"job {job.name!r} has had {MAX_GENERATIONS} "
                         "generations, the limit")
        if record["start_step"] - job.last_step > MAX_LOST_STEPS:
            raise BadArgument(f"start_step {record['start_step']} is more than "
                              f"{MAX_LOST_STEPS} steps ahead of the log ({job.last_step})")
        record["continue"] = keep_going
        job.allow_jump = keep_going
        if not keep_going:
            self._supersede(job, generation, record["start_step"], record["start_report"])
        for step in range(job.last_step + 1, record["start_step"] + 1):
            job.steps.append({"step": step, "generation": job.generation,
                              "time": record["time"], "ps_clock": None, "lost": True})
        job.generation = generation
        job.last_step, job.report_seq = record["start_step"], record["start_report"]
        job.progress = {}  # progress is per generation
        job.generations.append(record)
        return {"ok": True}

    @staticmethod
    def _supersede(job: Job, generation: int, start_step: int, start_report: int) -> None:
        """Mark what lies beyond the restart point. Live steps (and reports) are in increasing
        order in their lists, so a backward scan stops at the first live one kept."""
        for items, key, first_gone in ((job.steps, "step", start_step + 1),
                                       (job.reports, "seq", start_report)):
            for rec in reversed(items):
                if rec.get("superseded"):
                    continue
                if rec[key] < first_gone:
                    break
                rec["superseded"], rec["superseded_by"] = True, generation
        for ckpt in job.checkpoints:
            if not ckpt.get("superseded") and ckpt["step"] > start_step:
                ckpt["superseded"], ckpt["superseded_by"] = True, generation
        for entry in job.digests:
            if not entry.get("superseded") and entry["step"] > start_step:
                entry["superseded"], entry["superseded_by"] = True, generation
        _retrust(job, start_step)

    def steps(self, name: Any, generation: Any, rank: Any, records: Any,
              checkpoints: Any = None) -> Answer:
        """A rank's step records; rank 0's may carry ``checkpoints`` too (each as the
        arguments of :meth:`checkpoint` from ``step`` on: ``[step, path, size, sha256, time[,
        digest]]``), recorded after the steps, as if by that many ``steplog.checkpoint``
        commands that followed: one Raft commit instead of one more per checkpoint."""
        job = self._job(name)
        generation = _int(generation, "generation")
        rank = _int(rank, "rank", 0, MAX_RANK - 1)
        if generation != job.generation or generation == 0:
            first, last = _peek(records)
            return self._fence(job, "steps", generation, rank, first, last)
        batch = _records(records)
        refs = [] if checkpoints is None else [
            self._checkpoint_record(generation, *_ref_args(ref))
            for ref in _seq(checkpoints, "checkpoints", MAX_BATCH_CHECKPOINTS)]
        if refs and rank != 0:
            raise BadArgument("only rank 0 records checkpoints")
        if len(job.checkpoints) + len(refs) > MAX_CHECKPOINTS:
            return _quota(job)
        if rank != 0:
            if batch:
                key = str(rank)
                job.progress[key] = max(job.progress.get(key, 0), max(r.step for r in batch))
            _note_digests(job, rank, batch)
            _note_pulled(job, rank, batch)
            return {"ok": True, "last_step": job.last_step, "report_seq": job.report_seq}
        new_steps, new_reports = self._plan(job, batch)
        job.steps.extend(new_steps)
        job.reports.extend(new_reports)
        if new_steps:
            job.allow_jump = False
        job.last_step += len(new_steps)
        job.report_seq += len(new_reports)
        _note_digests(job, rank, batch)
        _note_pulled(job, rank, batch)
        answer: Answer = {"ok": True, "last_step": job.last_step, "report_seq": job.report_seq}
        if refs:
            answer["prune"] = [path for record in refs for path in self._add_checkpoint(job, record)]
        return answer

    @staticmethod
    def _plan(job: Job, batch: list[_Record | _Run]) -> tuple[list[dict], list[dict]]:
        """The records a rank-0 batch adds (duplicates skipped); _Refused on a gap."""
        step_at, seq_at, g = job.last_step, job.report_seq, job.generation
        new_steps: list[dict] = []
        new_reports: list[dict] = []
        step_time: float | None = None  # the time of step ``step_at``, once looked up
        looked_up = False
        for rec in batch:
            first = rec.first if isinstance(rec, _Run) else rec.step
            if first > step_at + 1 and job.allow_jump and first - step_at <= MAX_LOST_STEPS:
                at = rec.times[0] if isinstance(rec, _Run) else rec.time
                for lost in range(step_at + 1, first):  # a replacement rank 0 resumed ahead
                    new_steps.append({"step": lost, "generation": g, "time": at,
                                      "ps_clock": None, "lost": True})
                step_at = first - 1
            if first > step_at + 1:
                raise _gap(job, f"step {first} arrived where step {step_at + 1} was due")
            if isinstance(rec, _Run):
                if rec.step > step_at:  # its steps up to step_at are duplicates
                    times, clocks = rec.times, rec.ps_clocks
                    new_steps.extend([{"step": rec.first + i, "generation": g, "time": times[i],
                                       "ps_clock": None if clocks is None else clocks[i]}
                                      for i in range(step_at + 1 - rec.first, len(times))])
                    step_at, step_time, looked_up = rec.step, times[-1], True
                continue
            if rec.step == step_at + 1:
                new_steps.append({"step": rec.step, "generation": g, "time": rec.time,
                                  "ps_clock": rec.ps_clock})
                step_at, step_time, looked_up = rec.step, rec.time, True
            for seq, metrics in rec.reports:
                if seq > seq_at:
                    raise _gap(job, f"report {seq} arrived where report {seq_at} was due")
                if seq == seq_at:
                    report = {"seq": seq, "step": rec.step, "generation": g, "metrics": metrics}
                    if rec.step == step_at and not looked_up:  # its step came in an earlier batch
                        step_time, looked_up = _live_step_time(job, step_at), True
                    if rec.step == step_at and step_time is not None:
                        report["time"] = step_time
                    new_reports.append(report)
                    seq_at += 1
        return new_steps, new_reports

    def _fence(self, job: Job, what: str, generation: int, rank: int | None,
               step: int | None, time: float) -> Answer:
        if generation == 0 and job.generation == 0:
            return error("no_generation", f"job {job.name!r} has no generation yet; the "
                         "driver starts one with steplog.generation before workers write")
        if generation > job.generation:  # told of the next generation before it was started
            return error("not_yet", f"generation {generation} of job {job.name!r} has not started "
                         f"yet (current: {job.generation}); retry shortly")
        job.fenced.append({"generation": generation, "rank": rank, "step": step, "time": time,
                           "current": job.generation, "what": what})
        if len(job.fenced) > MAX_FENCED_KEPT:
            del job.fenced[0]
            job.fenced_dropped += 1
        answer = error("fenced", f"generation {generation} is not the current generation "
                       f"{job.generation} of job {job.name!r}; this worker was replaced by a "
                       "newer generation: stop writing and exit, do not retry")
        answer["current"] = job.generation
        return answer

    def checkpoint(self, name: Any, generation: Any, step: Any, path: Any, size: Any,
                   sha256: Any, time: Any, digest: Any = None) -> Answer:
        job = self._job(name)
        generation = _int(generation, "generation")
        if generation != job.generation or generation == 0:
            first = step if type(step) is int else None
            return self._fence(job, "checkpoint", generation, None, first,
                               float(time) if type(time) in (int, float) else 0.0)
        record = self._checkpoint_record(generation, step, path, size, sha256, time, digest)
        if len(job.checkpoints) >= MAX_CHECKPOINTS:
            return _quota(job)
        return {"ok": True, "prune": self._add_checkpoint(job, record)}

    @staticmethod
    def _checkpoint_record(generation: int, step: Any, path: Any, size: Any, sha256: Any,
                           time: Any, digest: Any = None) -> dict[str, Any]:
        record = {"step": _int(step, "step"), "generation": generation,
                  "path": _text(path, "path", empty=False), "size": _int(size, "size"),
                  "sha256": _text(sha256, "sha256", MAX_NAME_CHARS), "time": _time(time)}
        if digest is not None:
            record["digest"] = _text(digest, "digest", MAX_DIGEST_CHARS, empty=False)
        return record

    @staticmethod
    def _add_checkpoint(job: Job, record: dict[str, Any]) -> list[str]:
        """Record a checkpoint; the paths of the live ones it lets go (to delete)."""
        for earlier in reversed(job.checkpoints[-MAX_BATCH_CHECKPOINTS:]):
            if (earlier["step"] == record["step"] and earlier["path"] == record["path"]
                    and earlier["sha256"] == record["sha256"] and not earlier.get("superseded")):
                return []  # the same checkpoint again (its batch was sent again): recorded once
        job.checkpoints.append(record)
        live: list[dict] = []  # newest first; at most one more than _kept_live keeps
        most = LIVE_CHECKPOINTS + MAX_UNVERIFIED_CHECKPOINTS + 1
        for ckpt in reversed(job.checkpoints):
            if not ckpt.get("superseded") and not ckpt.get("pruned"):
                live.append(ckpt)
                if len(live) > most:
                    break
        keep = _kept_live(job, live)
        pruned = [c for c in live if id(c) not in keep]
        for ckpt in pruned:
            ckpt["pruned"] = True
        kept = {c["path"] for c in live if id(c) in keep}
        return [c["path"] for c in pruned if c["path"] not in kept]

    def failure(self, name: Any, record: Any) -> Answer:
        job = self._job(name)
        if not isinstance(record, dict):
            raise BadArgument("a failure record must be a map")
        missing = [k for k in FAILURE_FIELDS if k not in record]
        unknown = sorted(k for k in record if k not in FAILURE_FIELDS + FAILURE_OPTIONAL)
        if missing or unknown:
            raise BadArgument(f"a failure record has keys {list(FAILURE_FIELDS)} (and optional "
                              f"{list(FAILURE_OPTIONAL)}); missing {missing}, unknown {unknown}")
        stored = {"generation": _int(record["generation"], "generation"),
                  "rank": _opt_int(record["rank"], "rank"),
                  "kind": _text(record["kind"], "kind", MAX_NAME_CHARS, empty=False),
                  "step": _opt_int(record["step"], "step"), "time": _time(record["time"])}
        stored.update(_failure_fields(record, ANNOTATABLE))
        if len(job.failures) >= MAX_FAILURES:
            return error("quota_exceeded", f"job {job.name!r} has recorded {MAX_FAILURES} "
                         "failures, the limit")
        job.failures.append(stored)
        return {"ok": True, "index": len(job.failures) - 1}

    def annotate_failure(self, name: Any, index: Any, fields: Any) -> Answer:
        job = self._job(name)
        if not job.failures:
            raise BadArgument(f"job {job.name!r} has no failures to annotate")
        index = _int(index, "index", 0, len(job.failures) - 1)
        if not isinstance(fields, dict) or not set(fields) <= set(ANNOTATABLE):
            raise BadArgument(f"only {list(ANNOTATABLE)} of a failure can be annotated")
        job.failures[index].update(_failure_fields(fields, ANNOTATABLE))
        return {"ok": True}

    def end(self, name: Any, state: Any, reason: Any, time: Any) -> Answer:
        job = self._job(name)
        if state not in END_STATES:
            raise BadArgument(f"a job ends as one of {list(END_STATES)}, not {state!r:.40}")
        record = {"state": state, "reason": _text(reason, "reason"), "time": _time(time),
                  "generation": job.generation, "last_step": job.last_step}
        if job.state == "finished" and state != "finished":
            return error("job_finished", f"job {job.name!r} has already finished")
        job.state, job.end = state, record
        return {"ok": True}

    # ------------------------------------------------------------ queries
    def query(self, name: str, args: tuple[Any, ...]) -> Answer:
        entry = _QUERIES.get(name)
        if entry is None:
            return error("unknown_query", f"steplog has no query {name!r} "
                         f"(known: {sorted(_QUERIES)})")
        method, params, required = entry
        if not required <= len(args) <= len(params):
            return error("bad_query", f"steplog query {name} takes ({', '.join(params)}); "
                         f"the last {len(params) - required} are optional")
        try:
            return method(self, *args)
        except BadArgument as exc:
            return error("bad_argument", str(exc))
        except _Refused as exc:
            return exc.answer

    def _q_job(self, name: Any) -> Answer:
        return {"ok": True, "job": self._job(name).summary()}

    def _q_records(self, name: Any, kind: Any, start: Any = 0,
                   limit: Any = MAX_QUERY_ITEMS) -> Answer:
        job = self._job(name)
        if kind not in RECORD_KINDS:
            raise BadArgument(f"kind must be one of {list(RECORD_KINDS)}, not {kind!r:.40}")
        items_all: list[dict] = getattr(job, kind)
        start = _int(start, "start")
        limit = min(_int(limit, "limit", 1), MAX_QUERY_ITEMS)
        items = _budgeted(items_all[start:start + limit])
        return {"ok": True, "items": items, "next": start + len(items), "total": len(items_all)}

    def _q_jobs(self, start: Any = 0, limit: Any = MAX_QUERY_ITEMS) -> Answer:
        names = sorted(self.jobs)
        start = _int(start, "start")
        limit = min(_int(limit, "limit", 1), MAX_QUERY_ITEMS)
        rows = [{"name": j.name, "state": j.state, "generation": j.generation,
                 "last_step": j.last_step, "spec": j.spec}
                for j in (self.jobs[n] for n in names[start:start + limit])]
        rows = _budgeted(rows)
        return {"ok": True, "jobs": rows, "next": start + len(rows), "total": len(names)}


class _Refused(Exception):
    """A refusal with a specific error answer, raised from deep inside a command."""

    def __init__(self, code: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.answer = dict(error(code, detail), **extra)


def _ref_args(ref: Any) -> list[Any]:
    args = _seq(ref, "a checkpoint", 6)
    if len(args) < 5:
        raise BadArgument("a checkpoint is [step, path, size, sha256, time[, digest]]")
    return args


def _quota(job: Job) -> Answer:
    return error("quota_exceeded", f"job {job.name!r} has recorded {MAX_CHECKPOINTS} "
                 "checkpoints, the limit")


def _gap(job: Job, what: str) -> _Refused:
    return _Refused("gap", f"job {job.name!r}: {what}; nothing of this batch was applied — "
                    f"resend from step {job.last_step + 1} and report {job.report_seq}",
                    last_step=job.last_step, report_seq=job.report_seq)


#: Step records :func:`_live_step_time` looks back over at most (a rollback leaves no more
#: superseded ones after the last live step than a generation ran past its restart point).
MAX_STEP_TIME_LOOKBACK = 4_096


def _live_step_time(job: Job, step: int) -> float | None:
    """The time of live step ``step`` (the log's last), or None (no step record yet)."""
    for rec in job.steps[:-MAX_STEP_TIME_LOOKBACK - 1:-1]:
        if rec["step"] == step and not rec.get("superseded"):
            return float(rec["time"])
    return None


def _peek(records: Any) -> tuple[int | None, float]:
    """First step and last time of a batch that will not be parsed (it is fenced)."""
    if not isinstance(records, (list, tuple)) or not records:
        return None, 0.0
    first, last = records[0], records[-1]
    step: Any = (first.get("run", first.get("step"))) if isinstance(first, dict) else None
    t: Any = last.get("time") if isinstance(last, dict) else None
    if isinstance(last, dict) and "run" in last:
        times = last.get("times")
        t = times[-1] if isinstance(times, (list, tuple)) and times else None
    return (step if type(step) is int else None,
            float(t) if type(t) in (int, float) and math.isfinite(t) else 0.0)


def _kept_live(job: Job, live: list[dict]) -> set[int]:
    """Which live checkpoints (``live``: newest first) stay live, by ``id``: the newest
    LIVE_CHECKPOINTS; with digests also the newest one at or before the trusted step and, up
    to MAX_UNVERIFIED_CHECKPOINTS, those newer than it (their digests' verdict is open)."""
    keep = {id(c) for c in live[:LIVE_CHECKPOINTS]}
    if not job.digests and not job.digests_dropped:
        return keep
    trusted = job.digest_trusted
    anchor = next((i for i, c in enumerate(live) if trusted is not None and c["step"] <= trusted),
                  len(live))
    keep.update(id(c) for c in live[:anchor][:MAX_UNVERIFIED_CHECKPOINTS])
    if anchor < len(live):
        keep.add(id(live[anchor]))
    return keep


# ------------------------------------------------------------------ digests
def _note_digests(job: Job, rank: int, batch: list[_Record | _Run]) -> None:
    """Add the digests a batch carries to their sets; judge each set once it is complete."""
    members: set[int] | None = None
    for rec in batch:
        if rec.digest is None:
            continue
        if members is None:
            members = {m["rank"] for m in job.generations[-1]["members"]}
        if rank not in members:
            continue
        entry = _digest_set(job, rec.step, len(members))
        if entry["verdict"] is not None or str(rank) in entry["ranks"]:
            continue  # judged already, or a retried batch
        entry["ranks"][str(rank)] = rec.digest
        if len(entry["ranks"]) == entry["world"]:
            _judge(job, entry)


def _digest_set(job: Job, step: int, world: int) -> dict[str, Any]:
    """The current generation's set of ``step`` (created when missing)."""
    for entry in reversed(job.digests):
        if entry["generation"] != job.generation:
            break
        if entry["step"] == step and not entry.get("superseded"):
            return entry
    entry = {"step": step, "generation": job.generation, "world": world, "ranks": {},
             "verdict": None}
    job.digests.append(entry)
    if len(job.digests) > MAX_DIGEST_SETS_KEPT:
        del job.digests[0]
        job.digests_dropped += 1
    return entry


def _judge(job: Job, entry: dict[str, Any]) -> None:
    """A complete set: agree, or the first mismatch (with the majority's digest, if any)."""
    values = list(entry["ranks"].values())
    if len(set(values)) == 1:
        entry["verdict"] = "agree"
        if job.digest_mismatch is None:
            job.digest_trusted = max(entry["step"], job.digest_trusted or 0)
        return
    entry["verdict"] = "mismatch"
    if job.digest_mismatch is not None:
        return  # the first one decides where to roll back to
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    top = max(counts.values())
    majority = next((v for v, n in counts.items() if n == top), None) if top * 2 > len(values) else None
    job.digest_mismatch = {
        "step": entry["step"], "generation": entry["generation"], "world": entry["world"],
        "majority": majority, "agreeing": top if majority is not None else 0,
        "minority": sorted(int(r) for r, v in entry["ranks"].items() if v != majority)
        if majority is not None else [],
        "trusted_step": job.digest_trusted}


def _note_pulled(job: Job, rank: int, batch: list[_Record | _Run]) -> None:
    """Judge the pulled-digest checks a batch carries (async): each shard's range as held by
    the worker against the digest the shard gave of what it served (a difference names the
    worker), and each served digest against the last one kept for the same shard and version
    (a difference means the shard's parameters changed with no update applied: the shard is
    named, no worker). Each (rank, step) is judged once per generation."""
    key = str(rank)
    for rec in batch:
        if rec.pulled is None:
            continue
        seen = job.pulled_seen.get(key)
        if seen is not None and seen[0] == job.generation and rec.step <= seen[1]:
            continue  # a retried batch
        job.pulled_seen[key] = [job.generation, rec.step]
        job.pulled_checks += 1
        bad = [i for i, (_, served, held) in enumerate(rec.pulled) if served != held]
        if bad:
            _pulled_mismatch(job, {"kind": "held", "rank": rank, "step": rec.step, "shards": bad,
                                   "versions": [rec.pulled[i][0] for i in bad]})
        for shard, (version, served, _) in enumerate(rec.pulled):
            earlier = next((e for e in reversed(job.pulled_served)  # a restore reuses versions
                            if e[0] == shard and e[1] == version and e[5] == job.generation), None)
            if earlier is None:
                job.pulled_served.append([shard, version, served, rank, rec.step, job.generation])
                if len(job.pulled_served) > MAX_SERVED_KEPT:
                    del job.pulled_served[0]
            elif earlier[2] != served:
                _pulled_mismatch(job, {"kind": "served", "rank": None, "shard": shard, "version": version,
                                       "step": rec.step, "served_to": [earlier[3], rank],
                                       "steps": [earlier[4], rec.step]})


def _pulled_mismatch(job: Job, found: dict[str, Any]) -> None:
    found["generation"] = job.generation
    job.pulled_mismatches.append(found)
    if len(job.pulled_mismatches) > MAX_PULLED_MISMATCHES_KEPT:
        del job.pulled_mismatches[0]
        job.pulled_mismatches_dropped += 1


def _retrust(job: Job, start_step: int) -> None:
    """After superseding beyond ``start_step``: drop a mismatch that lay beyond it and find
    the newest agreeing set still live (the old trusted step if no kept set says otherwise)."""
    if job.digest_mismatch is not None and job.digest_mismatch["step"] > start_step:
        job.digest_mismatch = None
    if job.digest_mismatch is not None:
        return  # still pending: the trusted step stays the one before it
    agreed = [e["step"] for e in job.digests if e["verdict"] == "agree" and not e.get("superseded")]
    old = job.digest_trusted
    job.digest_trusted = max(agreed) if agreed else (old if old is not None and old <= start_step
                                                     else None)


def _failure_fields(record: dict, keys: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "recovery" in keys and "recovery" in record:
        out["recovery"] = _opt_text(record["recovery"], "recovery", MAX_NAME_CHARS)
    if "recovery_s" in keys and "recovery_s" in record:
        out["recovery_s"] = _opt_number(record["recovery_s"], "recovery_s")
    if "detail" in keys and "detail" in record:
        out["detail"] = _opt_text(record["detail"], "detail")
    return out


def _budgeted(items: list[dict]) -> list[dict]:
    """A prefix of ``items`` (at least one) whose encoding fits MAX_QUERY_ANSWER_BYTES."""
    out: list[dict] = []
    size = 0
    for item in items:
        size += len(msgpack.packb(item, use_bin_type=True))
        if out and size > MAX_QUERY_ANSWER_BYTES:
            break
        out.append(dict(item))
    return out


# name -> (method, parameter names, how many are required)
_QUERIES: dict[str, tuple[Callable[..., Answer], tuple[str, ...], int]] = {
    "job": (StepLog._q_job, ("job",), 1),
    "records": (StepLog._q_records, ("job", "kind", "start", "limit"), 2),
    "jobs": (StepLog._q_jobs, ("start", "limit"), 0),
}


# ------------------------------------------------------------------ registration
def _handler(method: Callable[..., Answer], op: str, params: tuple[str, ...]) -> Any:
    required = sum(1 for p in params if not p.endswith("?"))  # "name?": optional, at the end

    def handle(sm: StateMachine, cmd: Command, index: int) -> Answer:
        log = sm.extensions.get(EXTENSION)
        if not isinstance(log, StepLog):
            return error("unknown_command", "this state machine has no step log")
        if not required <= len(cmd.args) <= len(params):
            return error("bad_command", f"{op} takes ({', '.join(params)})")
        try:
            return method(log, *cmd.args)
        except BadArgument as exc:
            return error("bad_argument", f"{op}: {exc}")
        except _Refused as exc:
            return exc.answer
        except Exception as exc:  # a bug: answer it rather than stop every replica
            return error("internal_error", f"{op} raised {type(exc).__name__}: {exc}")

    handle.__name__ = f"_apply_{op.replace('.', '_')}"
    return handle


COMMANDS: dict[str, tuple[Callable[..., Answer], tuple[str, ...]]] = {
    "steplog.create": (StepLog.create, ("job", "spec", "resume")),
    "steplog.generation": (StepLog.generation, ("job", "generation", "members", "rendezvous",
                                                "start_step", "start_report", "reason",
                                                "time")),
    "steplog.steps": (StepLog.steps, ("job", "generation", "rank", "records", "checkpoints?")),
    "steplog.checkpoint": (StepLog.checkpoint, ("job", "generation", "step", "path", "size",
                                                "sha256", "time", "digest?")),
    "steplog.failure": (StepLog.failure, ("job", "record")),
    "steplog.annotate_failure": (StepLog.annotate_failure, ("job", "index", "fields")),
    "steplog.end": (StepLog.end, ("job", "state", "reason", "time")),
}

register_extension(EXTENSION, StepLog)
for _op, (_method, _params) in COMMANDS.items():
    register_command(_op)(_handler(_method, _op, _params))

__all__ = ["COMMANDS", "EXTENSION", "Job", "StepLog"]
