"""Step-log overhead, the two jobs interleaved: alive at once, run in turns of a few seconds.

    python benchmarks/steplog_interleaved.py [--rounds 5] [--slice-s 4] [--cells mlp-sync,conv-async] [--out DIR]
    python benchmarks/steplog_interleaved.py --cells conv-async --logged-options '{"checkpoint_every": 0}' --name N
    python benchmarks/steplog_interleaved.py --cells mlp-sync --logged-variant idle-coordinator --name N
    python benchmarks/steplog_interleaved.py --quick [--out DIR]
    python benchmarks/steplog_interleaved.py --render benchmarks/results/steplog_interleaved.json
    python benchmarks/steplog_interleaved.py --pool RUN.json RUN.json [...] [--same-code] [--out DIR]

``steplog_overhead.py`` runs the job without the log and the job with it one after the other,
each in a window of 15-25 s. On this machine (a virtual machine shared with other work) the
speed of the same process drifts by 10-20% over such windows (``machine_noise.py``), so the two
runs of a round meet different machines, and a difference of a few percent takes dozens of
rounds to show. This script takes the drift out instead of averaging it away:

* the two jobs of a cell -- ``step_log=False`` and the default K, the pair the target is about,
  the same training as ``steplog_overhead.py`` (2 workers x batch 32 on digits, SGD with
  momentum, the MLP or the convnet, sync or async with staleness 2) -- run at the same time,
  each in a process of its own with a Ray of its own (``ray.init`` in the child: its GCS,
  raylet, workers, and the embedded coordinator's nodes are all the child's descendants), each
  in a cgroup of its own with the kernel's freezer;
* both start, one at a time, and are frozen the moment their loop's timed window begins (rank 0
  writes a mark file); then they take turns: one is thawed for ``--slice-s`` seconds (4 s: a
  multiple of the log's 2-s flush interval, so a thawed job commits as often per second of its
  own as when it runs alone) while every process of the other is frozen, then the other;
* each rank records when each of its steps ended (``time.monotonic()``) and the samples done by
  then; a job's samples/s is the samples its ranks did over the seconds it was thawed, counted
  over the period both jobs were timing (the first job to finish ends it), summed over ranks.

So both jobs meet the same machine, second by second, and a round's overhead, 1 - samples/s with
the log / samples/s without, is a paired difference over a few dozen alternating slices rather
than over two windows half a minute apart. What it leaves out, and which way:

* work a job's processes do is charged to that job's slices only: the log's writer threads and
  coordinator nodes are frozen with their job. Time-driven work is charged at least at its rate
  when a job runs alone (a thawed job's clocks have run on while it was frozen: a flush due
  during the freeze comes at the start of its slice; the Raft ticker drops the ticks it slept
  through, as it does for any stopped process).
* the kernel's writeback of files a job wrote but did not fsync could land in the other job's
  slice: after each freeze the script calls ``sync()`` and ends the frozen job's slice only
  then, so that time is charged to the job that left the dirty pages, while neither runs.
* each slice starts with caches the other job used: both jobs pay it alike.

Per cell, the rounds' overheads, their median and its 90% interval (the same seeded bootstrap
as ``steplog_overhead.py``); a cell meets the 3% target when the interval's upper end is within
it, misses it when the lower end is past it, and is *not shown* between. Beside it, the step
log's direct cost measured inside the job (its own CPU as a share of the machine, plus its time
on the loops' own threads), over the seconds the job was thawed. The loops' time is wall-clock,
so it is taken over the steps that began and ended inside one turn: a freeze that stops a
loop inside the log's code would otherwise count the whole frozen turn as the log's.

Needs the kernel's cgroup freezer (v1 ``/sys/fs/cgroup/freezer``, or cgroup v2 with
``cgroup.freeze``) and the right to make cgroups (root). Writes
benchmarks/results/steplog_interleaved.{json,md,png} (``--name``) after every pair; ``--pool``
judges the rounds of several stored runs together (``steplog_interleaved_pooled.{json,md}``),
refusing runs of different code or training unless ``--same-code`` vouches for them.
``--logged-options`` (a JSON object of Trainer keywords) changes the logged job, e.g. to switch
one of the log's parts off (``{"checkpoint_every": 0}``): a split of where the cost goes,
measured as precisely as the overhead itself; its results say so and judge no target.
``--logged-variant idle-coordinator`` is another split: the "logged" job runs without the log
(``step_log=False``) but with an idle three-node coordinator, configured as the embedded one,
started in its own Ray (so frozen and thawed with it): what the nodes cost while no record
reaches them (heartbeats, their processes' own threads); ``idle-local-coordinator`` the same
with the nodes as plain processes (``LocalCluster``), not Ray actors; ``idle-priority`` runs
the log at its defaults with its nodes under SCHED_IDLE; ``actor-nodes`` with its nodes each in
a Ray actor (the default before they became plain processes). ``--quick`` (the smoke
test): one pair, the MLP in sync mode, short windows and 0.5-s slices, into a temp directory
unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from _common import code_version, machine

from coordinator.testing.freezer import Freezer

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
NAME = "steplog_interleaved"
BASE, LOGGED = "step_log=False", "default K"
VARIANTS = (BASE, LOGGED)
CELLS = [(m, mode) for m in ("mlp", "conv") for mode in ("sync", "async")]
#: The flush interval of the log's writers (``synctrain.worker.step.FLUSH_INTERVAL_S``, 2 s):
#: a slice that is a multiple of it commits as often per thawed second as a job running alone.
SLICE_S = 4.0
#: The smoke run's turns and epochs. Its jobs must each train for several turns while both are
#: timing, or no turn has one of the other job's on both sides to be compared with: 40 MLP epochs
#: (about 1 s of training at the 52k samples/s of a fast hour here) left the quick test with
#: none; 200 leave it about ten turns a job when fast, at most ~12 s a job when slow.
QUICK_SLICE_S, QUICK_EPOCHS = 0.5, {"mlp": 200, "conv": 20}
#: ``--logged-variant``: what the logged job is -> (its samples/s column's words, the markdown's
#: note on it). "default": the log at its defaults (or with ``--logged-options``); the others
#: are splits: "idle-coordinator", no log but an idle embedded-style coordinator (Ray actors)
#: beside it; "idle-local-coordinator", the same nodes as plain processes (``LocalCluster``);
#: "idle-priority", the log with its embedded nodes under SCHED_IDLE; "actor-nodes", the log
#: with its embedded nodes each in a Ray actor (``STEPLOG_NODE_PROCESSES=False``, the default
#: before the nodes became plain processes).
LOGGED_VARIANTS: dict[str, tuple[str, str]] = {
    "default": ("at the default K", ""),
    "idle-coordinator": (
        "with an idle coordinator, no log",
        "**The \"logged\" job has no log**: it ran with `step_log=False` beside an idle three-node coordinator "
        "configured as the embedded one, in its own Ray (`--logged-variant idle-coordinator`), so this is a split: "
        "what the nodes cost while no record reaches them. Its direct cost is the idle nodes' CPU (every `_RayNode` "
        "process is counted)."),
    "idle-local-coordinator": (
        "with idle plain-process nodes, no log",
        "**The \"logged\" job has no log**: it ran with `step_log=False` beside an idle three-node coordinator whose "
        "nodes are plain processes (`LocalCluster`, the embedded one's Raft clock), not Ray actors "
        "(`--logged-variant idle-local-coordinator`): beside `idle-coordinator`, what hosting the nodes in Ray costs. "
        "Its direct cost counts none of the nodes' CPU."),
    "idle-priority": (
        "with the nodes at idle priority",
        "**The logged job's coordinator nodes ran under SCHED_IDLE** (`--logged-variant idle-priority`), the log "
        "otherwise at its defaults: a split, not the overhead the target is about."),
    "actor-nodes": (
        "with each node in a Ray actor",
        "**The logged job's coordinator nodes were Ray actors** (`--logged-variant actor-nodes`: "
        "`STEPLOG_NODE_PROCESSES=False`, the default until the nodes became plain processes), the log otherwise at "
        "its defaults: a split, not the overhead the target is about."),
}
#: How long a child may take to reach its timed window, and to finish after it.
START_TIMEOUT_S, RUN_TIMEOUT_S = 300.0, 1800.0


# ---- the arithmetic (pure; tests/train/test_steplog_interleaved.py) ------------------------
def overlap(intervals: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Seconds of ``intervals`` (a job's thawed slices) within [lo, hi]."""
    return sum(max(0.0, min(b, hi) - max(a, lo)) for a, b in intervals)


def samples_at(stamps: list[tuple[float, int]], t: float) -> int:
    """Samples a rank had done at time ``t``: those of its last step that ended by then."""
    i = bisect.bisect_right([s[0] for s in stamps], t)
    return stamps[i - 1][1] if i else 0


def common_period(jobs: list[list[list[tuple[float, int]]]], alternation_start: float) -> tuple[float, float]:
    """The period every rank of both jobs was timing, from the start of the turns: the latest
    window start to the earliest last step. Each job: its ranks' stamps."""
    lo = max([alternation_start] + [stamps[0][0] for job in jobs for stamps in job])
    hi = min(stamps[-1][0] for job in jobs for stamps in job)
    return lo, hi


def full_slices(ranks: list[list[tuple[float, int]]], intervals: list[tuple[float, float]], lo: float,
                hi: float) -> list[tuple[float, float, int]]:
    """(start, end, samples of all ranks) of each thawed slice wholly in [lo, hi]: the slices a
    round is judged on (the one in which a job's window began or ended is partial: left out)."""
    return [(a, b, sum(samples_at(s, b) - samples_at(s, a) for s in ranks))
            for a, b in intervals if a >= lo and b <= hi and b > a]


def job_rate(slices: list[tuple[float, float, int]]) -> float:
    """A job's samples/s over its slices: their samples over their seconds."""
    seconds = sum(b - a for a, b, _ in slices)
    return sum(n for _, _, n in slices) / seconds if seconds > 0 else 0.0


def sandwich_ratios(base: list[tuple[float, float, int]], logged: list[tuple[float, float, int]]) -> list[float]:
    """Samples/s with the log over samples/s without, once for every slice that has a slice of
    the other job right before and right after it: the other job's speed then is the mean of
    those two, so a machine whose speed drifts steadily over the three slices meets both alike
    (an ABAB comparison of whole runs would hand the drift of half a turn to one of them)."""
    turns = sorted([(a, b, n, True) for a, b, n in logged] + [(a, b, n, False) for a, b, n in base])
    ratios = []
    for before, this, after in zip(turns, turns[1:], turns[2:], strict=False):
        if before[3] == after[3] != this[3]:
            rate = this[2] / (this[1] - this[0])
            around = (before[2] / (before[1] - before[0]) + after[2] / (after[1] - after[0])) / 2
            if rate > 0 and around > 0:
                ratios.append(rate / around if this[3] else around / rate)
    return ratios


def steps_while_frozen(ranks: list[list[tuple[float, int]]], intervals: list[tuple[float, float]], lo: float,
                       hi: float) -> int:
    """Steps that ended while their job was frozen, between two of its slices within [lo, hi]:
    0 when the freezer held every process of the job (the smoke test asserts it)."""
    gaps = [(a_end, b_start) for (_, a_end), (b_start, _) in zip(intervals, intervals[1:], strict=False)]
    return sum(1 for stamps in ranks for t, _ in stamps
               if lo <= t <= hi and any(a < t < b for a, b in gaps))


def pair_result(children: dict[str, dict[str, Any]], intervals: dict[str, list[tuple[float, float]]],
                alternation_start: float, cpus: int) -> dict[str, Any]:
    """One round of one cell: each job's samples/s over its whole slices in the period both were
    timing, the overhead (from :func:`sandwich_ratios`), and the logged job's direct cost over
    its thawed seconds."""
    stamps = {v: [[(float(s[0]), int(s[1])) for s in r["stamps"]] for r in children[v]["ranks"]] for v in VARIANTS}
    lo, hi = common_period([stamps[v] for v in VARIANTS], alternation_start)
    if hi <= lo:
        raise RuntimeError("the two jobs were never timing at once: give them more epochs")
    out: dict[str, Any] = {"period_s": hi - lo}
    slices = {v: full_slices(stamps[v], intervals[v], lo, hi) for v in VARIANTS}
    for v in VARIANTS:
        out[v] = {"samples_per_s": job_rate(slices[v]), "thawed_s": sum(b - a for a, b, _ in slices[v]),
                  "slices": len(slices[v]),
                  # each judged slice: start and end (s since the turns began) and its samples
                  "turns": [(a - alternation_start, b - alternation_start, n) for a, b, n in slices[v]],
                  "steps_while_frozen": steps_while_frozen(stamps[v], intervals[v], lo, hi),
                  "failures": children[v].get("failures", 0), "generations": children[v].get("generations", 1)}
    ratios = sandwich_ratios(slices[BASE], slices[LOGGED])
    if not ratios:
        raise RuntimeError("too few turns while both jobs were timing: give them more epochs or shorter turns")
    # the round's overhead: 1 - the geometric mean of its slices' ratios
    out["slice_ratios"] = ratios
    out["overhead"] = 1 - math.exp(statistics.fmean(math.log(r) for r in ratios))
    # The direct cost over each rank's own window (its CPU figures span it), thawed seconds only.
    ranks = children[LOGGED]["ranks"]
    thawed = [overlap(intervals[LOGGED], r["stamps"][0][0], r["stamps"][-1][0]) for r in ranks]
    own = sum(r["steplog_cpu_s"] for r in ranks) / (cpus * max(thawed)) if max(thawed) > 0 else 0.0
    # The loop's share: of the steps inside one thawed slice (see thawed_loop_share), else (an
    # older child, no loop seconds in its stamps) of the rank's whole loop seconds.
    shares = [thawed_loop_share(r["stamps"], intervals[LOGGED]) for r in ranks]
    wall = max((r["steplog_loop_s"] / s for r, s in zip(ranks, thawed, strict=True) if s > 0), default=0.0)
    loop = wall if None in shares else max(shares, default=0.0)
    out.update(steplog_cpu_share=own, steplog_loop_share=loop, direct_cost=own + loop,
               steplog_loop_share_wall=wall)
    return out


def thawed_loop_share(stamps: list[list[Any]], intervals: list[tuple[float, float]]) -> float | None:
    """The step log's share of a rank's loop: the loop seconds it took (the third field of each
    stamp) over the seconds of the steps that began and ended inside one thawed slice. A step
    the freezer stopped in the middle is left out: the loop seconds are wall-clock seconds, and
    a freeze that lands inside the step log's code (a few percent of a step) would count the
    whole frozen turn, seconds, as its cost. None for stamps without loop seconds."""
    if not stamps or len(stamps[0]) < 3:
        return None
    took = spent = 0.0
    j = 0
    for (t0, _, l0), (t1, _, l1) in zip(stamps, stamps[1:], strict=False):
        while j < len(intervals) and intervals[j][1] < t0:
            j += 1
        if j < len(intervals) and intervals[j][0] <= t0 and t1 <= intervals[j][1]:
            took, spent = took + (l1 - l0), spent + (t1 - t0)
    return took / spent if spent > 0 else 0.0


# ---- the child: one job, in its own Ray ----------------------------------------------------
def run_child(args: argparse.Namespace) -> int:
    os.environ.pop("RAY_ADDRESS", None)  # a Ray of its own, inside this child's cgroup
    import ray
    import steplog_overhead as so
    from _common import init_ray

    init_ray(args.num_cpus)
    import convergence
    import digits

    for module in (convergence, digits):  # the workers cannot import benchmarks/ or examples/
        ray.cloudpickle.register_pickle_by_value(module)
    options: dict[str, Any] = {"step_log": False} if args.variant == BASE else json.loads(args.options or "{}")
    from synctrain.driver import coord

    variant = args.logged_variant if args.variant == LOGGED else "default"
    cluster: Any = None
    if variant == "idle-priority":  # read by the driver as the job starts
        coord.STEPLOG_IDLE_PRIORITY = True
    elif variant == "actor-nodes":
        coord.STEPLOG_NODE_PROCESSES = False
    elif variant in ("idle-coordinator", "idle-local-coordinator"):  # no log; idle nodes beside the job
        from coordinator.cluster import LocalCluster, RayCluster

        options = {"step_log": False}
        if variant == "idle-coordinator":
            cluster = RayCluster(nodes=coord.EMBEDDED_NODES, num_cpus_per_node=0.0, tick_ms=coord.EMBEDDED_TICK_MS,
                                 heartbeat_tick=coord.EMBEDDED_HEARTBEAT_TICK,
                                 election_tick=coord.EMBEDDED_ELECTION_TICK, nice=coord.STEPLOG_NICE,
                                 node_processes=False)
        else:  # the same nodes as plain processes: beside the above, what hosting them in Ray costs
            cluster = LocalCluster(nodes=coord.EMBEDDED_NODES, tick_ms=coord.EMBEDDED_TICK_MS,
                                   election_tick=coord.EMBEDDED_ELECTION_TICK, warm_start=False,
                                   extra_args=["--heartbeat-tick", str(coord.EMBEDDED_HEARTBEAT_TICK)])
        cluster.start()
    label = f"{args.model}-{args.mode}-{'nolog' if args.variant == BASE else 'log'}"
    try:
        result, _ = so.fit(Path(args.storage), label, args.model, args.mode, args.epochs, options,
                           extra_config={"stamps": True, "mark": args.mark})
    finally:
        if cluster is not None:
            cluster.stop()
    ranks = [{"rank": o["rank"], "stamps": o["stamps"], "steplog_cpu_s": o["steplog_cpu_s"],
              "steplog_loop_s": o["steplog_loop_s"], "samples": o["samples"], "elapsed_s": o["elapsed_s"]}
             for o in sorted(result.outputs, key=lambda o: o["rank"])]
    Path(args.result).write_text(json.dumps({"ranks": ranks, "failures": len(result.failures),
                                             "generations": len(result.generations),
                                             "committed_steps": len(result.steps)}))
    return 0


# ---- the parent: a pair of jobs in turns ---------------------------------------------------
def run_pair(storage: Path, model: str, mode: str, epochs: int, slice_s: float, first: str,
             num_cpus: int, logged_options: dict[str, Any] | None = None,
             logged_variant: str = "default") -> dict[str, Any]:
    """Both jobs of a cell: each started alone and frozen when its timing begins, then thawed in
    turns of ``slice_s`` (``first`` first) until one ends; the other then runs out alone.
    ``logged_options``: Trainer keywords the logged job adds (``--logged-options``);
    ``logged_variant``: see ``--logged-variant``."""
    tag = uuid.uuid4().hex[:8]
    groups: dict[str, Freezer] = {}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    files: dict[str, dict[str, Path]] = {}
    try:
        for v in VARIANTS:
            groups[v] = Freezer(f"synctrain-bench-{tag}-{'log' if v == LOGGED else 'nolog'}")
            name = f"{tag}-{'log' if v == LOGGED else 'nolog'}"
            files[v] = {k: storage / f"{name}.{k}" for k in ("mark", "json", "log")}
        order = [first] + [v for v in VARIANTS if v != first]
        for v in order:  # one at a time, alone on the machine, up to its timed window
            with open(files[v]["log"], "wb") as log:
                # the shell joins the cgroup before it becomes the child: all it starts is inside
                procs[v] = subprocess.Popen(
                    ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(groups[v].procs), sys.executable, __file__,
                     "--child", "--model", model, "--mode", mode, "--variant", v, "--epochs", str(epochs),
                     "--storage", str(storage), "--mark", str(files[v]["mark"]), "--result",
                     str(files[v]["json"]), "--num-cpus", str(num_cpus),
                     "--options", json.dumps((logged_options or {}) if v == LOGGED else {}),
                     "--logged-variant", logged_variant],
                    stdout=log, stderr=subprocess.STDOUT, cwd=HERE)
            deadline = time.monotonic() + START_TIMEOUT_S
            while not files[v]["mark"].exists():
                if procs[v].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the {v} job ended or hung before its timed window:\n{_tail(files[v]['log'])}")
                time.sleep(0.01)
            groups[v].freeze()
        alternation_start = time.monotonic()
        intervals: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
        # per turn: seconds the freeze took (until every process was stopped), then the sync()
        stops: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
        alive, turn = list(order), 0
        ends = time.monotonic() + RUN_TIMEOUT_S
        while alive:
            v = alive[turn % len(alive)] if len(alive) == 2 else alive[0]
            t0 = time.monotonic()
            groups[v].thaw()
            try:
                procs[v].wait(timeout=slice_s if len(alive) == 2 else max(1.0, ends - time.monotonic()))
                done = True
            except subprocess.TimeoutExpired:
                if len(alive) == 1:
                    raise RuntimeError(f"the {v} job did not finish in {RUN_TIMEOUT_S:.0f} s") from None
                done = False
            if done:
                intervals[v].append((t0, time.monotonic()))
                groups[v].kill()  # its Ray instance's leftovers, before the other runs again
                alive.remove(v)
                if procs[v].returncode != 0:
                    raise RuntimeError(f"the {v} job failed:\n{_tail(files[v]['log'])}")
            else:
                t1 = time.monotonic()
                groups[v].freeze()
                t2 = time.monotonic()
                os.sync()  # writeback of what it wrote, charged to its own slice (see the docstring)
                t3 = time.monotonic()
                intervals[v].append((t0, t3))
                stops[v].append((t2 - t1, t3 - t2))
            turn += 1
            if time.monotonic() > ends:
                raise RuntimeError(f"the pair did not finish in {RUN_TIMEOUT_S:.0f} s")
        children = {v: json.loads(files[v]["json"].read_text()) for v in VARIANTS}
    finally:
        for v, g in groups.items():
            g.remove()
            if v in procs and procs[v].poll() is None:
                procs[v].kill()
    out = pair_result(children, intervals, alternation_start, os.cpu_count() or 1)
    for v in VARIANTS:  # what ending a turn took: an artefact of the design, charged to the job
        if stops[v]:
            out[v]["freeze_s"] = statistics.median(f for f, _ in stops[v])
            out[v]["sync_s"] = statistics.median(x for _, x in stops[v])
    out.update(model=model, mode=mode, first=first, slice_s=slice_s, epochs=epochs)
    return out


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no output)"


# ---- the summary ---------------------------------------------------------------------------
def summarize(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from steplog_overhead import median_interval

    table = []
    for model, mode in CELLS:
        rows = [p for p in pairs if (p["model"], p["mode"]) == (model, mode)]
        if not rows:
            continue
        overheads = [p["overhead"] for p in rows]
        low, high = median_interval(overheads)
        direct = [p["direct_cost"] for p in rows]
        d_low, d_high = median_interval(direct)
        table.append({"model": model, "mode": mode, "rounds": len(rows), "overhead_rounds": overheads,
                      "median_overhead": statistics.median(overheads), "overhead_low": low, "overhead_high": high,
                      "samples_per_s": {v: statistics.median(p[v]["samples_per_s"] for p in rows) for v in VARIANTS},
                      "thawed_s": statistics.median(p[LOGGED]["thawed_s"] for p in rows),
                      "slices": statistics.median(p[LOGGED]["slices"] for p in rows),
                      "direct_cost": statistics.median(direct), "direct_cost_low": d_low, "direct_cost_high": d_high,
                      "steplog_cpu_share": statistics.median(p["steplog_cpu_share"] for p in rows),
                      "steplog_loop_share": statistics.median(p["steplog_loop_share"] for p in rows)})
    return table


def verdict(table: list[dict[str, Any]]) -> dict[str, Any]:
    from steplog_overhead import TARGET_OVERHEAD, overhead_verdict

    if not table:
        return {"status": "not shown", "met": None, "target": TARGET_OVERHEAD, "cells": {}}
    return overhead_verdict(table)


def write(pairs: list[dict[str, Any]], out_dir: Path, meta: dict[str, Any], name: str = NAME) -> None:
    from _common import write_results

    table = summarize(pairs)
    data = {"meta": meta, "table": table, "verdict": verdict(table), "pairs": pairs}
    write_results(name, data, markdown(data), out_dir)
    plot(data, str(out_dir / f"{name}.png"))


def markdown(data: dict[str, Any]) -> str:
    meta, table, v = data["meta"], data["table"], data["verdict"]
    logged = ("with the log (the options above)" if meta.get("logged_options") else
              LOGGED_VARIANTS[meta.get("logged_variant", "default")][0])
    lines = [
        "# Step-log overhead, the two jobs interleaved", "",
        f"The job without the log and the job at the default K (K={meta['default_K']}) run at the same time, each in "
        f"its own process with its own Ray and cgroup, and take turns of {meta['slice_s']:g} s while every process of "
        "the other is frozen (the kernel's cgroup freezer), from the moment both are timing. Samples/s: each job's "
        "samples over its whole turns while both were timing, summed over ranks. A round's overhead: for each turn "
        "with a turn of the other job right before and after it, samples/s with the log over without (the other "
        "job's speed taken as the mean of its two turns, so a steady drift of the machine meets both alike); 1 - "
        "the geometric mean of those ratios. 2 workers x batch 32 on digits, SGD momentum 0.9; async: staleness 2. "
        f"{meta['rounds_done']} round(s); {meta['cpus']} CPUs; load average {_load(meta['load_avg_start'])} at the "
        f"start; {meta.get('minutes', 0):.1f} minutes. Command: `{meta['command']}`.", "",
        *_options_lines(meta),
        f"| model | mode | samples/s without the log | samples/s {logged} | overhead: median of the rounds "
        f"[{100 * v.get('confidence', 0.9):.0f}% interval] | each round | thawed s per job (median) | turns per job | "
        "direct cost (median [interval]) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in table:
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['samples_per_s'][BASE]:,.0f} | {r['samples_per_s'][LOGGED]:,.0f} | "
            f"{100 * r['median_overhead']:+.1f}% [{100 * r['overhead_low']:+.1f}, {100 * r['overhead_high']:+.1f}] | "
            f"{' / '.join(f'{100 * x:+.1f}' for x in r['overhead_rounds'])} | {r['thawed_s']:.1f} | {r['slices']:g} | "
            f"{100 * r['direct_cost']:.2f}% [{100 * r['direct_cost_low']:.2f}, {100 * r['direct_cost_high']:.2f}] |")
    if meta.get("logged_options") or meta.get("logged_variant"):
        lines += ["", "Not a verdict on the target: the logged job ran as said above, not at the defaults."]
    lines += ["", "Targets (issue 11): overhead at the default K <= 3%, judged per cell on its interval (met: the "
              "upper end within it; not met: the lower end past it; not shown: the interval holds it):", ""]
    for cell, c in v.get("cells", {}).items():
        lines.append(f"- {cell}: {100 * c['median']:+.1f}% [{100 * c['low']:+.1f}, {100 * c['high']:+.1f}] over "
                     f"{c['rounds']} round(s): **{c['status']}**")
    lines += ["", f"All cells: **{v['status']}**.", "",
              "Direct cost: the log's own CPU (each rank's writer thread and the coordinator's three node processes, a "
              "share of the machine) plus its time on the loops' own threads, over the seconds the job was thawed (the "
              "loops' time: over the steps inside one turn, none the freezer stopped). "
              "Turns: the thawed slices of the logged job that fell in the period both were timing. Every pair's "
              "slices, and each slice's samples/s, are in the JSON; the plot shows them for the first pair of each "
              "cell."]
    return "\n".join(lines) + "\n"


def _options_lines(meta: dict[str, Any]) -> list[str]:
    """The markdown's note on ``--logged-options`` (none for a run at the defaults)."""
    options = meta.get("logged_options")
    note = LOGGED_VARIANTS[meta.get("logged_variant", "default")][1]
    if note:
        return [note, ""]
    if not options:
        return []
    return [f"**The logged job is not at the defaults**: it ran with `{json.dumps(options)}` (`--logged-options`), "
            "so this is a split of the log's cost, not the overhead the target is about.", ""]


def _load(values: list[float]) -> str:
    return ", ".join(f"{x:.1f}" for x in values)


def plot(data: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table, pairs = data["table"], data["pairs"]
    if not table:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [2, 3]})
    for i, r in enumerate(table):
        left.scatter([i] * len(r["overhead_rounds"]), [100 * x for x in r["overhead_rounds"]], color="tab:gray", s=14,
                     zorder=3, label="a round" if i == 0 else None)
        med = 100 * r["median_overhead"]
        left.errorbar([i], [med], yerr=[[med - 100 * r["overhead_low"]], [100 * r["overhead_high"] - med]],
                      fmt="o", color="tab:blue", capsize=5, label="median, 90% interval" if i == 0 else None)
        left.scatter([i], [100 * r["direct_cost"]], marker="x", color="tab:green",
                     label="direct cost (median)" if i == 0 else None)
    left.axhline(100 * data["verdict"].get("target", 0.03), color="red", ls="--", lw=0.8, label="target")
    left.axhline(0, color="black", lw=0.5)
    left.set_xticks(range(len(table)), [f"{r['model']} {r['mode']}" for r in table])
    left.set(ylabel="samples/s lost at the default K vs step_log=False (%)", title="overhead, jobs interleaved")
    left.legend(fontsize=8)
    firsts = {}
    for p in pairs:
        firsts.setdefault((p["model"], p["mode"]), p)
    for (model, mode), p in firsts.items():
        fastest = max((n / (b - a) for a, b, n in p[BASE]["turns"]), default=1.0)
        for v, style in ((BASE, "-"), (LOGGED, "--")):
            pts = [((a + b) / 2, n / (b - a) / fastest) for a, b, n in p[v]["turns"]]
            right.plot([t for t, _ in pts], [r for _, r in pts], style, marker=".", label=f"{model} {mode}, {v}")
    right.set(xlabel="seconds since the turns began", ylabel="samples/s in the slice / the fastest step_log=False slice",
              title="each thawed slice (first round): the machine's drift meets both jobs")
    right.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---- pooling stored runs -------------------------------------------------------------------
#: What a run measures besides the product's code: the training loop and this script's turns.
POOL_MEASURED = ("benchmarks/steplog_overhead.py", "benchmarks/steplog_interleaved.py")


def pool(specs: list[str], same_code: bool) -> dict[str, Any]:
    """One judgement over the rounds of several stored runs (results JSONs) of the same code and
    training: each round keeps its own overhead, and the rounds of all the runs are resampled
    together. Refused when the runs trained differently (epochs, default K), when one measured
    uncommitted code, or when the measured code differs between their commits, unless
    ``same_code`` vouches for the difference (the result names the files)."""
    import steplog_overhead as so

    if len(specs) < 2:
        raise so.PoolError("pooling needs at least two runs")
    runs = []
    for spec in specs:
        try:
            data = json.loads(Path(spec).read_text())
            meta, pairs = data["meta"], data["pairs"]
        except (OSError, ValueError, KeyError, TypeError):
            raise so.PoolError(f"{spec}: not a readable steplog_interleaved results JSON (meta and pairs)") from None
        code = meta.get("code") or {}
        if not code.get("commit") or code.get("dirty"):
            raise so.PoolError(f"{spec}: measured uncommitted or unknown code (meta.code): what it measured is not known")
        if any(r["pairs"] == pairs for r in runs):
            raise so.PoolError(f"{spec}: the same run as one already given: each run pools once")
        runs.append({"spec": spec, "meta": meta, "pairs": pairs, "commit": code["commit"]})
    for run in runs[1:]:
        for key in ("epochs", "default_K", "logged_options", "logged_variant"):
            if run["meta"].get(key) != runs[0]["meta"].get(key):
                raise so.PoolError(f"{run['spec']} trained differently from {runs[0]['spec']}: {key} is "
                                   f"{run['meta'].get(key)!r}, not {runs[0]['meta'].get(key)!r}")
    changed = sorted({f for run in runs[1:] if run["commit"] != runs[0]["commit"]
                      for f in so._git("diff", "--name-only", runs[0]["commit"], run["commit"], "--",
                                       *so.MEASURED_CODE, *POOL_MEASURED).split()})
    if changed and not same_code:
        raise so.PoolError(f"not pooled: the measured code differs between their commits: {', '.join(changed)}; "
                           "pass --same-code to pool them anyway, if those changes cannot change what was measured "
                           "(the result names them)")
    # Each round's figures only: the turns themselves stay in the runs' own files.
    pairs = [{"source": run["spec"], "round": p.get("round"), "model": p["model"], "mode": p["mode"],
              **{k: p[k] for k in ("overhead", "direct_cost", "steplog_cpu_share", "steplog_loop_share")},
              **{v: {k: p[v][k] for k in ("samples_per_s", "thawed_s", "slices")} for v in VARIANTS}}
             for run in runs for p in run["pairs"]]
    table = summarize(pairs)
    return {"meta": {"runs": [{"spec": r["spec"], "commit": r["commit"], "command": r["meta"].get("command"),
                               "slice_s": r["meta"].get("slice_s"), "rounds": r["meta"].get("rounds_done")}
                              for r in runs],
                     "changed_files": changed, "same_code_vouched": bool(changed),
                     "epochs": runs[0]["meta"].get("epochs"), "default_K": runs[0]["meta"].get("default_K")},
            "table": table, "verdict": verdict(table), "pairs": pairs}


def pooled_markdown(data: dict[str, Any], command: str) -> str:
    meta, v = data["meta"], data["verdict"]
    lines = ["# Step-log overhead, the two jobs interleaved: stored runs pooled", "",
             f"Command: `{command}`. Each round keeps its own overhead (its turns against the other job's turns "
             "around them); the rounds of all the runs are resampled together for the 90% interval of their median.",
             ""]
    for r in meta["runs"]:
        lines.append(f"- `{r['spec']}`: {r['rounds']} round(s), turns of {r['slice_s']:g} s, at {r['commit'][:7]} "
                     f"(`{r['command']}`)")
    if meta["changed_files"]:
        lines.append(f"- vouched the same (`--same-code`): {', '.join(meta['changed_files'])} differ between the "
                     "runs' commits")
    lines += ["", "| model | mode | rounds | overhead: median [90% interval] | verdict | direct cost (median) |",
              "|---|---|---:|---:|---|---:|"]
    for r in data["table"]:
        cell = v["cells"][f"{r['model']} {r['mode']}"]
        lines.append(f"| {r['model']} | {r['mode']} | {r['rounds']} | {100 * r['median_overhead']:+.1f}% "
                     f"[{100 * r['overhead_low']:+.1f}, {100 * r['overhead_high']:+.1f}] | {cell['status']} | "
                     f"{100 * r['direct_cost']:.2f}% |")
    lines += ["", f"All cells (target: overhead at the default K <= 3%): **{v['status']}**."]
    return "\n".join(lines) + "\n"


def parse_logged_options(parser: argparse.ArgumentParser, text: str | None, modes: set[str]) -> dict[str, Any]:
    """``--logged-options``: a JSON object of Trainer keywords (not ``step_log``: the logged job
    keeps its log), checked by building a Trainer with them in each of ``modes`` before any job
    starts."""
    if not text:
        return {}
    try:
        options = json.loads(text)
    except ValueError as exc:
        parser.error(f"--logged-options is not JSON ({exc}): give an object, e.g. '{{\"checkpoint_every\": 0}}'")
    if not isinstance(options, dict):
        parser.error(f"--logged-options must be a JSON object of Trainer keywords, not {type(options).__name__}")
    if "step_log" in options:
        parser.error("--logged-options cannot set step_log: the logged job is the one with the log")
    fixed = sorted(set(options) & {"staleness", "num_workers", "mode", "config", "job_name", "storage_path"})
    if fixed:
        parser.error(f"--logged-options cannot set {', '.join(fixed)}: both jobs train alike (steplog_overhead.fit)")
    import synctrain

    for mode in sorted(modes):
        extra = {"staleness": 2} if mode == "async" else {}  # as the child's jobs run
        try:
            synctrain.Trainer(lambda config: None, num_workers=2, mode=mode, **{**extra, **options})
        except (TypeError, ValueError) as exc:
            parser.error(f"--logged-options ({mode} mode): {exc}")
    return options


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="pairs per cell, the cells in a rotated order")
    parser.add_argument("--slice-s", type=float, default=SLICE_S, help="seconds each job runs in its turn")
    parser.add_argument("--cells", default=",".join(f"{m}-{mode}" for m, mode in CELLS),
                        help="model-mode cells, comma-separated (mlp-sync, mlp-async, conv-sync, conv-async)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: one pair, the MLP in sync mode, short")
    parser.add_argument("--out", default=None, help="results directory")
    parser.add_argument("--name", default=NAME, help="results file name (NAME.json, .md, .png)")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of each job's own Ray")
    parser.add_argument("--render", metavar="JSON", default=None,
                        help="measure nothing: write the markdown and the plot again from a stored JSON")
    parser.add_argument("--pool", nargs="+", metavar="JSON", default=None,
                        help=f"measure nothing: judge the rounds of several stored runs together into {NAME}_pooled "
                             "(or --name)")
    parser.add_argument("--same-code", action="store_true",
                        help="with --pool: pool runs whose measured code differs, vouching that it measures the same")
    parser.add_argument("--logged-options", default=None, metavar="JSON",
                        help='Trainer keywords for the logged job, a JSON object (e.g. \'{"checkpoint_every": 0}\'): '
                             "a split of the cost, judged against no target")
    parser.add_argument("--logged-variant", default="default", choices=list(LOGGED_VARIANTS),
                        help="a split of the cost, judged against no target: idle-coordinator (no log, idle Ray-hosted "
                             "nodes beside the job), idle-local-coordinator (the same as plain processes), "
                             "idle-priority (the log with its nodes under SCHED_IDLE), actor-nodes (the log with "
                             "each node in a Ray actor, the earlier default)")
    for internal in ("--model", "--mode", "--variant", "--storage", "--mark", "--result", "--options"):  # the child's
        parser.add_argument(internal, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(args)
    # SIGTERM unwinds like Ctrl-C: run_pair's cleanup thaws and kills the jobs, removes the cgroups
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.pool:
        from _common import write_results
        from steplog_overhead import PoolError

        try:
            data = pool(args.pool, args.same_code)
        except PoolError as exc:
            parser.error(str(exc))
        command = " ".join(["python benchmarks/steplog_interleaved.py", *sys.argv[1:]])
        data["meta"]["command"] = command
        text = pooled_markdown(data, command)
        name = f"{NAME}_pooled" if args.name == NAME else args.name  # --name: keep other pools
        write_results(name, data, text, Path(args.out) if args.out else RESULTS)
        print(text)
        return 0
    if args.same_code:
        parser.error("--same-code goes with --pool")
    if args.render:
        with open(args.render) as f:
            data = json.load(f)
        out = Path(args.out or os.path.dirname(os.path.abspath(args.render)))
        name = Path(args.render).stem
        (out / f"{name}.md").write_text(markdown(data))
        plot(data, str(out / f"{name}.png"))
        return 0
    from steplog_overhead import EPOCHS

    from synctrain.trainer import DEFAULT_MAX_UNCOMMITTED_STEPS

    cells = [tuple(c.split("-", 1)) for c in args.cells.split(",")]
    unknown = [c for c in cells if c not in CELLS]
    if unknown:
        parser.error(f"unknown cell(s) {', '.join('-'.join(c) for c in unknown)}: choose from "
                     f"{', '.join(f'{m}-{mode}' for m, mode in CELLS)}")
    epochs, slice_s, rounds = (QUICK_EPOCHS, QUICK_SLICE_S, 1) if args.quick else (EPOCHS, args.slice_s, args.rounds)
    if args.quick:
        cells = [("mlp", "sync")]
    logged_options = parse_logged_options(parser, args.logged_options, {mode for _, mode in cells})
    if logged_options and args.logged_variant != "default":
        parser.error(f"--logged-options goes with the default --logged-variant, not {args.logged_variant} "
                     "(whose logged job has no log to set options on)")
    out_dir = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix=f"{NAME}_")) if args.quick else RESULTS)
    started = time.monotonic()
    meta = {"command": " ".join(["benchmarks/steplog_interleaved.py", *sys.argv[1:]]), "slice_s": slice_s,
            "rounds_asked": rounds, "rounds_done": 0, "epochs": epochs, "default_K": DEFAULT_MAX_UNCOMMITTED_STEPS,
            "cpus": os.cpu_count(), "load_avg_start": list(os.getloadavg()), "machine": machine(),
            "code": code_version(), **({"logged_options": logged_options} if logged_options else {}),
            **({"logged_variant": args.logged_variant} if args.logged_variant != "default" else {})}
    pairs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="steplog_interleaved_jobs_") as storage:
        for i in range(rounds):
            shift = i % len(cells)
            for model, mode in cells[shift:] + cells[:shift]:
                first = VARIANTS[(i + CELLS.index((model, mode))) % 2]
                print(f"-- round {i + 1}/{rounds}: {model} {mode}, {first} first", flush=True)
                pair = run_pair(Path(storage), model, mode, epochs[model], slice_s, first, args.num_cpus,
                                logged_options, args.logged_variant)
                pair["round"] = i + 1
                pairs.append(pair)
                print(f"   {BASE} {pair[BASE]['samples_per_s']:,.0f} samples/s, {LOGGED} "
                      f"{pair[LOGGED]['samples_per_s']:,.0f}: overhead {100 * pair['overhead']:+.1f}% over "
                      f"{pair[LOGGED]['thawed_s']:.1f} thawed s each ({pair[LOGGED]['slices']} turns); direct cost "
                      f"{100 * pair['direct_cost']:.2f}%", flush=True)
                meta.update(rounds_done=i + (len(pairs) % len(cells) == 0), minutes=(time.monotonic() - started) / 60,
                            load_avg_end=list(os.getloadavg()))
                write(pairs, out_dir, meta, args.name)  # after every pair: a run cut short keeps what it measured
    print(markdown({"meta": meta, "table": summarize(pairs), "verdict": verdict(summarize(pairs)), "pairs": pairs}))
    print(f"results in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
