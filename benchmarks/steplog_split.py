"""Where the step log's cost goes: one cell of ``steplog_overhead.py`` (the digits MLP in
async mode by default), with the log's parts switched off one at a time through public knobs.

    python benchmarks/steplog_split.py [--model mlp|conv] [--mode async|sync] [--rounds 8]
                                       [--epochs N] [--load 0.024] [--load-period-ms 10]
                                       [--variants default,niced] [--out DIR]
                                       [--quick] [--render JSON]

Variants, each round in a rotated order, every run a fresh job (``steplog_overhead.fit``,
after waiting for a quiet machine):

* ``step_log=False``: the baseline, no log;
* ``step_log=False + idle coordinator``: no log, but an idle three-node coordinator with the
  embedded one's Raft clock runs beside the job (what its mere presence costs);
* ``default``: the step log with every default (a checkpoint and a digest every 100 steps);
* ``no checkpoints``: ``checkpoint_every=0`` with digests kept (``digest_every=100``);
* ``default, job dir on tmpfs``: the default with the job directory (checkpoint files and
  the coordinator's WALs) in ``/dev/shm``, where fsync costs nothing;
* ``default, log at nice 10``: the default with the log's background work (the embedded
  nodes' processes, the writer threads) 10 below the training's CPU priority
  (``synctrain.driver.coord.STEPLOG_NICE`` for the run; 0 by default): what a lower priority
  for that work buys the loop;
* ``step_log=False + CPU load``: no log, but a stand-in process that burns ``--load`` of the
  machine's CPUs (default 2.4%: the sync MLP's measured direct cost at the default K) in short
  bursts, one every ``--load-period-ms``: what any work of that size beside the job costs its
  samples/s. Where it costs about what the ``default`` does, the log costs the job what its
  CPU costs and no more; the samples/s target then asks for that much less CPU, not for less
  waiting. Its CPU is reported as the step log's own (``steplog_overhead.LOAD_PROCESS``);
* ``step_log=False + CPU load, idle priority``: the same load at the lowest CPU priority there
  is (``SCHED_IDLE`` on Linux, else nice 19): it runs only on a core nothing else wants, and a
  rank that wakes takes the core back at once. What is left of its cost is what no scheduling
  of the log's background work could take away (caches, the switches themselves).

``--variants`` runs only the named ones (by the short names of ``SHORT_NAMES``) beside the
two every other variant is read against, the baseline and the defaults, and stores the
results under a name of their own, beside the full split's (``..._<variants>``).

Each round's variants are compared with that round's ``step_log=False`` run; per variant, the
median of those overheads with a 90% bootstrap interval (``steplog_overhead.median_interval``),
the median samples/s, the machine's CPU ms per 1000 samples and the step log's own CPU (its
writer threads and coordinator nodes, a share of the machine: a within-run measure the
machine's noise moves little). Results:
``benchmarks/results/steplog_split.{json,md,png}`` for the async MLP,
``steplog_split_<model>_<mode>.*`` for another cell.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import steplog_overhead as so  # noqa: E402
from _common import RESULTS_DIR, init_ray, machine, markdown_table, write_results  # noqa: E402

NAME = "steplog_split"


def result_name(model: str, mode: str, only: list[str] | None = None) -> str:
    """``steplog_split`` for the default cell (the async MLP), ``steplog_split_<model>_<mode>``
    for another, so that each cell's results stand beside the others'; a run of some variants
    only (``only``) ends in their short names, so it never overwrites a full split."""
    name = NAME if (model, mode) == ("mlp", "async") and not only else f"{NAME}_{model}_{mode}"
    return name if not only else name + "_" + "_".join(only)
BASE = "step_log=False"
WITH_COORDINATOR = "step_log=False + idle coordinator"
TMPFS = "default, job dir on tmpfs"
NICED = "default, log at nice 10"
NICED_NICE = 10
TMPFS_DIR = "/dev/shm"
LOAD = "step_log=False + CPU load"
LOAD_IDLE = "step_log=False + CPU load, idle priority"
DEFAULT_LOAD = 0.024
#: ``--quick``: about a second's window of the MLP; with 2 epochs (50 ms) the idle-priority
#: load could go without a CPU for the whole window on a busy machine, and count 0.
QUICK_EPOCHS = 40
DEFAULT_LOAD_PERIOD_MS = 10.0
#: The stand-in load: every period, a burst of CPU time (``time.thread_time``, so a burst cut
#: short by preemption is finished, not skipped); one that falls behind does not catch up.
BURNER = """
import os, sys, time
burst, period = float(sys.argv[1]), float(sys.argv[2])
if sys.argv[3] == "idle":
    if hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    else:
        os.nice(19)
due = time.monotonic()
while True:
    start = time.thread_time()
    while time.thread_time() - start < burst:
        pass
    due = max(due + period, time.monotonic() - period)
    time.sleep(max(0.0, due - time.monotonic()))
"""
#: (name, Trainer keywords) in the order the table shows them.
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    (BASE, {"step_log": False}),
    (WITH_COORDINATOR, {"step_log": False}),
    ("default", {}),
    ("no checkpoints", {"checkpoint_every": 0, "digest_every": 100}),
    (TMPFS, {}),
    (NICED, {}),
    (LOAD, {"step_log": False}),
    (LOAD_IDLE, {"step_log": False}),
]
#: ``--variants``' names for them.
SHORT_NAMES = {"coordinator": WITH_COORDINATOR, "default": "default", "no-checkpoints": "no checkpoints",
               "tmpfs": TMPFS, "niced": NICED, "load": LOAD, "load-idle": LOAD_IDLE}


def variants(only: list[str] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """The variants this machine can run (tmpfs only where ``/dev/shm`` is); ``only``: those
    of these short names (:data:`SHORT_NAMES`), the baseline and the defaults."""
    chosen = None if only is None else {BASE, "default", *(SHORT_NAMES[name] for name in only)}
    return [v for v in VARIANTS if (v[0] != TMPFS or os.path.isdir(TMPFS_DIR)) and (chosen is None or v[0] in chosen)]


def parse_variants(text: str) -> list[str]:
    """``--variants``' comma-separated short names, checked; ValueError naming the unknown ones."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SHORT_NAMES]
    if not names or unknown:
        raise ValueError(f"unknown variant(s) {unknown or [text]}: choose from {', '.join(SHORT_NAMES)} "
                         "(the baseline and the defaults always run)")
    return names


def load_burst_s(share: float, period_s: float) -> float:
    """CPU seconds per period of a load of ``share`` of all the machine's CPUs; ValueError
    unless that is between none and one CPU's worth, with a positive period."""
    burst_s = share * (os.cpu_count() or 1) * period_s
    if not 0 < burst_s < period_s:
        raise ValueError(f"a load of {share!r} of the machine ({os.cpu_count()} CPUs) is not between none "
                         f"and one CPU's worth, or its period {period_s!r} s is not positive")
    return burst_s


def start_load(share: float, period_s: float, idle: bool = False) -> subprocess.Popen:
    """The stand-in load process: ``share`` of all the machine's CPUs, in bursts every
    ``period_s`` (its process title is ``steplog_overhead.LOAD_PROCESS``); ``idle``: at the
    lowest CPU priority (``SCHED_IDLE``, else nice 19), set before its first burst."""
    burst_s = load_burst_s(share, period_s)
    return subprocess.Popen([so.LOAD_PROCESS, "-c", BURNER, repr(burst_s), repr(period_s),
                             "idle" if idle else "normal"], executable=sys.executable)


def run_variant(name: str, options: dict[str, Any], storage: Path, tmpfs: Path | None, model: str,
                mode: str, epochs: int, settle_max_s: float, load: float = DEFAULT_LOAD,
                load_period_s: float = DEFAULT_LOAD_PERIOD_MS / 1000) -> dict[str, Any]:
    """One fresh job of the variant ``name``; its ``steplog_overhead.throughput`` row."""
    from synctrain.driver import coord

    cluster = None
    burner = None
    nice = coord.STEPLOG_NICE
    if name == WITH_COORDINATOR:
        from coordinator.cluster import RayCluster

        cluster = RayCluster(nodes=coord.EMBEDDED_NODES, num_cpus_per_node=0.0,
                             tick_ms=coord.EMBEDDED_TICK_MS, heartbeat_tick=coord.EMBEDDED_HEARTBEAT_TICK,
                             election_tick=coord.EMBEDDED_ELECTION_TICK, nice=nice)
        cluster.start()
    if name == NICED:
        coord.STEPLOG_NICE = NICED_NICE  # read by the driver as the job starts
    try:
        if name in (LOAD, LOAD_IDLE):
            burner = start_load(load, load_period_s, idle=name == LOAD_IDLE)
        where = tmpfs if name == TMPFS and tmpfs is not None else storage
        label = name.replace("+", "and").replace(",", "")
        return so.throughput(where, model, mode, epochs, label, options, settle_max_s)
    finally:
        if burner is not None:
            burner.kill()
            burner.wait()
        if cluster is not None:
            cluster.stop()
        coord.STEPLOG_NICE = nice


def summarize(rounds: list[dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per variant: median samples/s and CPU, and each round's overhead against that round's
    ``step_log=False`` run, with the median of those and its interval."""
    table = []
    names = [n for n, _ in VARIANTS if any(n in r for r in rounds)]
    for name in names:
        runs = [(r[name], r[BASE]) for r in rounds if name in r and BASE in r]
        overheads = [1 - run["samples_per_s"] / base["samples_per_s"] for run, base in runs]
        cpu = [run["cpu_ms_per_1k"] for run, _ in runs if run.get("cpu_ms_per_1k") is not None]
        cpu_base = [base["cpu_ms_per_1k"] for _, base in runs if base.get("cpu_ms_per_1k") is not None]
        row: dict[str, Any] = {
            "variant": name, "runs": len(runs),
            "samples_per_s": statistics.median(run["samples_per_s"] for run, _ in runs),
            "cpu_ms_per_1k": statistics.median(cpu) if cpu else None,
            "cpu_overhead": (statistics.median(cpu) / statistics.median(cpu_base) - 1) if cpu and cpu_base else None,
        }
        if name != BASE:
            low, high = so.median_interval(overheads)
            row.update(overheads=overheads, overhead=statistics.median(overheads), interval=[low, high])
        own = [run["steplog_cpu_share"] for run, _ in runs if run.get("steplog_cpu_share") is not None]
        if name != BASE and own:
            low, high = so.median_interval(own)
            row.update(own_cpu=statistics.median(own), own_cpu_interval=[low, high])
        direct = so.direct_costs([run for run, _ in runs])
        if name != BASE and direct:
            low, high = so.median_interval(direct)
            row.update(loop_share=statistics.median(run["steplog_loop_share"] for run, _ in runs),
                       direct=statistics.median(direct), direct_interval=[low, high])
        table.append(row)
    return table


def render(data: dict[str, Any], out_dir: str) -> None:
    meta = data["meta"]
    rows = []
    for r in data["table"]:
        if r["variant"] == BASE:
            overhead = "-"
        else:
            low, high = r["interval"]
            overhead = f"{100 * r['overhead']:+.1f}% [{100 * low:+.1f}, {100 * high:+.1f}]"
        cpu = "-" if r.get("cpu_ms_per_1k") is None else f"{r['cpu_ms_per_1k']:.1f}"
        cpu_vs = "-" if r["variant"] == BASE or r.get("cpu_overhead") is None else f"{100 * r['cpu_overhead']:+.1f}%"
        own = ("-" if r.get("own_cpu") is None else
               "{:.2f}% [{:.2f}, {:.2f}]".format(100 * r["own_cpu"], *(100 * x for x in r["own_cpu_interval"])))
        on_loop = "-" if r.get("loop_share") is None else f"{100 * r['loop_share']:.2f}%"
        direct = ("-" if r.get("direct") is None else
                  "{:.2f}% [{:.2f}, {:.2f}]".format(100 * r["direct"], *(100 * x for x in r["direct_interval"])))
        rows.append([r["variant"], r["runs"], f"{r['samples_per_s']:,.0f}", overhead, cpu, cpu_vs, own, on_loop,
                     direct])
    md = [f"# Where the step log's cost goes: {meta['model']}, {meta['mode']} mode", "",
          f"{meta['rounds_done']} round(s) of every variant in a rotated order, {meta['epochs']} epochs each, "
          f"{so.WORKERS} workers x batch {so.BATCH}; overhead: each round's run against that round's "
          f"step_log=False run, the median of the rounds and its {int(100 * so.CONFIDENCE)}% bootstrap interval. "
          f"Load average {', '.join(f'{x:.1f}' for x in meta['load_avg_start'])} at the start; "
          f"{meta['wall_s'] / 60:.1f} minutes. Command: `{meta['command']}`.", "",
          markdown_table(["variant", "runs", "median samples/s", "overhead vs step_log=False [interval]",
                          "CPU ms per 1k samples", "CPU vs step_log=False",
                          "step log's own CPU, % of the machine [interval]",
                          "step log on the loop's thread, % of its window", "direct cost [interval]"], rows), "",
          "A variant whose interval holds 0 cannot be told from the baseline by these rounds; the "
          "machine's own noise (`benchmarks/machine_noise.py`) is tens of percent between fresh "
          "processes, so read the medians and the intervals, not single runs.", "",
          "The step log's own CPU: what its parts ran during rank 0's timed window (each rank's "
          "writer thread: records, digests, checkpoint files; the coordinator's three node "
          "processes, the idle ones too), as a share of all the machine's CPUs "
          "(`steplog_overhead.steplog_cpu_s`). Measured inside each run against that run's own "
          "window, it moves little with the machine's noise: where the samples/s intervals cannot "
          "tell the variants apart, this column can. The step log on the loop's thread: the time the "
          "slowest rank's loop spent in the step boundary (queueing records, capturing checkpoints, "
          "copying digests, waiting on the K bound), a share of its window. Direct cost: the two "
          "added, per run (`steplog_overhead.direct_costs`): what the log's work takes on a machine "
          "the training keeps busy. Not in it: in async mode the shards' side of a snapshot, and "
          "effects on caches.", ""]
    if any(r["variant"] == LOAD for r in data["table"]):
        share, period = meta.get("load", DEFAULT_LOAD), meta.get("load_period_ms", DEFAULT_LOAD_PERIOD_MS)
        burst = share * meta.get("cpus", 1) * period
        md += [f"{LOAD}: no step log, and beside the job a process that burns {100 * share:.1f}% of the "
               f"machine's CPUs, a burst of {burst:.2g} ms of CPU time every {period:g} ms; its CPU as "
               "measured is in the own-CPU column. It is no step log: it shows what any work of that size "
               "costs this job's samples/s. Where it costs about what the default does, the log costs "
               "what its CPU does and no more; where it costs more, the log's work interrupts the "
               "training less than a plain load of its size.", ""]
    if any(r["variant"] == LOAD_IDLE for r in data["table"]):
        md += [f"{LOAD_IDLE}: the same load at the lowest CPU priority (SCHED_IDLE; nice 19 where there is "
               "none): it runs only on a "
               "core nothing else wants and gives it up at once to a rank that wakes. What it still costs "
               "is what no priority given to the log's background work could save.", ""]
    if any(r["variant"] == NICED for r in data["table"]):
        md += [f"{NICED}: the defaults with the step log's background work (the embedded coordinator's "
               f"node processes, each rank's writer thread) {NICED_NICE} below the training's CPU priority "
               "(`synctrain.driver.coord.STEPLOG_NICE`, 0 by default). Its overhead beside the default's is "
               "what that lower priority buys.", ""]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = result_name(meta["model"], meta["mode"], meta.get("variants"))
    (out / f"{name}.md").write_text("\n".join(md))
    plot(data, out / f"{name}.png")


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["table"] if r["variant"] != BASE]
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.35 * len(rows)))
    y = list(range(len(rows)))
    medians = [100 * r["overhead"] for r in rows]
    low = [100 * (r["overhead"] - r["interval"][0]) for r in rows]
    high = [100 * (r["interval"][1] - r["overhead"]) for r in rows]
    ax.barh(y, medians, xerr=[low, high], color="tab:blue", alpha=0.7, capsize=4)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.axvline(100 * so.TARGET_OVERHEAD, color="tab:red", linestyle="--", linewidth=0.8, label="3% target")
    ax.set_yticks(y, [r["variant"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("samples/s lost vs step_log=False, % (median of the rounds, 90% interval)", fontsize=8)
    ax.set_title(f"{data['meta']['model']}, {data['meta']['mode']} mode")
    # below the axes, where no row's bar or interval can be under it
    ax.legend(loc="upper right", bbox_to_anchor=(1.0, -0.18), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("mlp", "conv"), default="mlp")
    parser.add_argument("--mode", choices=("async", "sync"), default="async")
    parser.add_argument("--rounds", type=int, default=8, help="rounds of every variant")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per run (default: steplog_overhead's for the model, timed windows of 12-20 s)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: one round of QUICK_EPOCHS epochs")
    parser.add_argument("--out", default=None, help="results directory")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray instance")
    parser.add_argument("--load", type=float, default=DEFAULT_LOAD,
                        help=f"the stand-in CPU load's share of the machine ({LOAD!r})")
    parser.add_argument("--load-period-ms", type=float, default=DEFAULT_LOAD_PERIOD_MS,
                        help="one burst of the stand-in load every this many ms")
    parser.add_argument("--variants", default=None,
                        help="run only these variants, comma-separated (and the baseline and the defaults): "
                             f"{', '.join(SHORT_NAMES)}")
    parser.add_argument("--render", metavar="JSON", default=None,
                        help="measure nothing: write the markdown and the plot again from a stored JSON")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = so.EPOCHS[args.model]
    if args.rounds < 1 or args.epochs < 1:
        parser.error("--rounds and --epochs must be at least 1")
    only = None
    if args.variants is not None:
        try:
            only = parse_variants(args.variants)
        except ValueError as exc:
            parser.error(f"--variants: {exc}")
    try:
        load_burst_s(args.load, args.load_period_ms / 1000)
    except ValueError as exc:
        parser.error(f"--load / --load-period-ms: {exc}")
    out_dir = args.out or str(RESULTS_DIR)
    if args.render:
        with open(args.render) as f:
            data = json.load(f)
        data["table"] = summarize(data["rounds"])  # a stored run gets today's columns too
        render(data, args.out or os.path.dirname(os.path.abspath(args.render)))
        return 0
    if args.quick:
        args.rounds, args.epochs = 1, QUICK_EPOCHS
    started, load_avg = time.monotonic(), os.getloadavg()
    init_ray(args.num_cpus)
    import convergence
    import digits
    import ray

    for module in (convergence, digits, so):  # the workers cannot import benchmarks/ or examples/
        ray.cloudpickle.register_pickle_by_value(module)
    vs = variants(only)
    rounds: list[dict[str, dict[str, Any]]] = []
    settle_max_s = 0.0 if args.quick else so.SETTLE_MAX_S
    with tempfile.TemporaryDirectory(prefix="steplog_split_") as storage, \
            tempfile.TemporaryDirectory(prefix="steplog_split_", dir=TMPFS_DIR if os.path.isdir(TMPFS_DIR)
                                        else None) as tmpfs:
        for i in range(args.rounds):
            shift = i % len(vs)
            order = vs[shift:] + vs[:shift]
            print(f"-- round {i + 1}/{args.rounds}", flush=True)
            runs = {name: run_variant(name, options, Path(storage), Path(tmpfs), args.model, args.mode,
                                      args.epochs, settle_max_s, args.load, args.load_period_ms / 1000)
                    for name, options in order}
            rounds.append(runs)
            data = {"meta": {"model": args.model, "mode": args.mode, "epochs": args.epochs,
                             "load": args.load, "load_period_ms": args.load_period_ms,
                             "rounds_asked": args.rounds, "rounds_done": len(rounds), "variants": only,
                             "load_avg_start": list(load_avg), "load_avg_end": list(os.getloadavg()),
                             "wall_s": time.monotonic() - started, **machine(),
                             "platform": platform.platform(), "ray": ray.__version__,
                             "command": " ".join(["benchmarks/steplog_split.py", *(argv or sys.argv[1:])])},
                    "table": summarize(rounds), "rounds": rounds}
            write_results(result_name(args.model, args.mode, only), data, "", Path(out_dir))
            render(data, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
