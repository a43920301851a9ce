"""`synctrain bench all`: run every benchmark in turn, then write ``docs/benchmarks.md``.

Theory of operation. :data:`PLAN` is the one table of what ``bench all`` runs: one row per
*result* (the ``NAME`` of the ``NAME.json``/``NAME.md``/``NAME*.png`` a script writes), in the
order the doc shows them, each with its script, a line saying what it measures, the arguments
of the published (full) run and of the smoke (``--quick``) run. A script may own several rows
(``convergence.py`` writes three published variants). ``"{out}"`` in the arguments is the
results directory; a script without an output flag names the module global that holds its
results directory (``results_global``) and is run through a shim that points it at ``{out}``,
so a ``--quick`` run never writes into ``benchmarks/results``. A script that writes no
``NAME.md`` at all (``gpu_checks.sh``) has its output kept as one.

:func:`run_benchmarks` runs the selected rows one after another as subprocesses (their output
shown live, the last lines kept), each under a time limit, goes on past a failure, and records
the run in ``OUT/_bench_all.json`` after every benchmark (an interrupted run still leaves its
record). A benchmark has failed when it exits non-zero, runs out of time, or exits 0 without
writing a fresh ``NAME.md`` (the plan's arguments no longer match the script).

:func:`write_benchmarks_doc` is pure composition (no Ray, no torch import): it reads the results
directory (every ``NAME.md``, its ``NAME.json`` for when and where it ran, its plots) and that
run record if present, and writes one markdown page: how it was generated, when, on what
machine, then one section per result. tests/test_benchdoc.py holds it, and holds the plan to
cover every script in ``benchmarks/`` (a new benchmark cannot be forgotten).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import IO, Any

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_DIR = REPO_ROOT / "benchmarks"
RUN_RECORD = "_bench_all.json"  # in the results directory; "_": not a result

QUICK_TIMEOUT_S = 15 * 60  # one smoke run
FULL_TIMEOUT_S = 4 * 3600  # one published run (steplog_overhead's rounds take the longest)
OUTPUT_TAIL_LINES = 200  # of a benchmark's output kept in memory (all of it is shown live)
OUTPUT_LINE_CHARS = 500  # of one output line kept
DOC_TAIL_LINES = 30  # of a failed benchmark's output, in the run record and the doc
MAX_TABLE_CHARS = 100_000  # of one NAME.md inlined into the doc


@dataclass(frozen=True)
class BenchRun:
    """One result of the plan: how ``bench all`` makes ``NAME.{json,md}``."""

    script: str  # a file in benchmarks/
    what: str  # one line: what it measures
    full: tuple[str, ...]  # arguments of the published run; "{out}" is the results directory,
    #                        and a "{out}/DIR" argument is a directory made before the run
    quick: tuple[str, ...] | None  # smoke-size arguments; None: full runs only
    results_global: str | None = None  # no output flag: the module global naming its results dir
    needs_cuda: bool = False
    output_is_result: bool = False  # writes no NAME.md: its output becomes one
    quick_env: tuple[tuple[str, str], ...] = ()


_CONV = ("--model", "conv", "--straggler", "compute", "--epochs", "6")

#: What `synctrain bench all` runs, in the order docs/benchmarks.md shows it.
PLAN: dict[str, BenchRun] = {
    "throughput": BenchRun(
        "throughput.py", "sync samples/s of synctrain's transports vs raw PyTorch DDP in Ray actors, "
        "and all-reduce bus bandwidth vs `dist.all_reduce`",
        ("--workers", "2", "--steps", "40", "--rounds", "3", "--blocks", "15", "--block-steps", "20",
         "--out-dir", "{out}"),
        ("--quick", "--out-dir", "{out}")),
    "convergence": BenchRun(
        "convergence.py", "accuracy against time and samples: single process vs sync vs async "
        "(staleness 0/2/8/None), with and without a straggler (digits MLP, SGD)",
        ("--repeats", "3", "--out", "{out}"), ("--quick", "--out", "{out}")),
    "convergence_conv": BenchRun(
        "convergence.py", "the same on the compute-bound convnet with SGD and a compute straggler",
        (*_CONV, "--optimizer", "sgd", "--repeats", "3", "--name", "convergence_conv", "--out", "{out}"),
        None),
    "convergence_conv_adam": BenchRun(
        "convergence.py", "the same on the convnet with Adam (the async target: <= 0.7x sync's time)",
        (*_CONV, "--optimizer", "adam", "--repeats", "5", "--name", "convergence_conv_adam",
         "--out", "{out}"),
        None),
    "ps_throughput": BenchRun(
        "ps_throughput.py", "async parameter-server pushes/s and CPU per push vs Ray's naive "
        "parameter server", ("--steps", "200", "--rounds", "3", "--out", "{out}"),
        ("--quick", "--out", "{out}")),
    "steplog_overhead": BenchRun(
        "steplog_overhead.py", "what the quorum-committed step log costs in samples/s, and recovery "
        "times after worker, leader and driver kills", ("--out", "{out}"), ("--quick", "--out", "{out}")),
    "steplog_split": BenchRun(
        "steplog_split.py", "where the step log's cost goes in one cell (the async MLP unless "
        "--model/--mode say otherwise): no log, an idle "
        "coordinator beside the job, the defaults, no checkpoints, the job directory on tmpfs, the log "
        "at a lower CPU priority, and a stand-in CPU load the size of the log's cost (at normal and at idle "
        "priority); --variants runs some of them alone",
        ("--out", "{out}"), ("--quick", "--out", "{out}")),
    "steplog_interleaved": BenchRun(
        "steplog_interleaved.py", "the step log's samples/s overhead with the machine's drift taken out: "
        "the job without the log and the job at the default K alive at once, in turns of 4 s under the "
        "kernel's cgroup freezer (needs root)", ("--out", "{out}"), ("--quick", "--out", "{out}")),
    "machine_noise": BenchRun(
        "machine_noise.py", "the same small training step in fresh processes on an idle machine: the "
        "noise floor of the samples/s comparisons above", ("--out", "{out}"),
        ("--processes", "2", "--windows", "2", "--steps", "100", "--out", "{out}")),
    "digest_cost": BenchRun(
        "digest_cost.py", "a parameter digest's copy and hash against 100 optimizer steps",
        (), ("--steps", "5"), results_global="RESULTS_DIR"),
    "checkpoint_cost": BenchRun(
        "checkpoint_cost.py", "a checkpoint's encoding and decoding: the container format against torch.save",
        ("--out", "{out}"), ("--repeat", "3", "--out", "{out}")),
    "raft_core": BenchRun(
        "raft_core.py", "entries/s committed by the pure Raft core (3 nodes in memory, one core)",
        (), ("--entries", "20000", "--repeat", "1"), results_global="RESULTS"),
    "coordinator_bench": BenchRun(
        "coordinator_bench.py", "coordinator put latency, throughput, watch, failover and rejoin vs etcd and "
        "PySyncObj (the full run installs both)", ("--out", "{out}"),
        ("--quick", "--systems", "coordinator", "--out", "{out}")),
    "coordinator_growth": BenchRun(
        "coordinator_growth.py", "the coordinator and etcd as the state grows: puts/s, latency, "
        "elections, memory, disk, restarts", ("--steps", "10000,30000", "--out", "{out}"),
        ("--steps", "2000", "--systems", "coordinator", "--out", "{out}")),
    "lease_expiry": BenchRun(
        "lease_expiry.py", "a coordinator leader's look for due leases: the expiry heap vs a scan "
        "of every lease, 1k-100k leases", ("--out", "{out}"),
        ("--leases", "1000,10000", "--looks", "20", "--out", "{out}")),
    "gpu_checks": BenchRun(
        "gpu_checks.sh", "the checks that need a GPU: NCCL, GPU sharing, CUDA async mode, and the "
        "CPU benchmarks on that machine's cores", ("{out}/gpu_checks",), ("{out}/gpu_checks",),
        needs_cuda=True, output_is_result=True, quick_env=(("GPU_CHECKS_QUICK", "1"),)),
}

# Run through the shim: load the script as a module (its __main__ block does not run), point
# its results-directory global at OUT, then call its main() with the arguments.
_REDIRECT_SHIM = """\
import importlib.util, sys
from pathlib import Path
script, attribute, out, *args = sys.argv[1:]
sys.path.insert(0, str(Path(script).parent))
spec = importlib.util.spec_from_file_location("bench_all_target", script)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
if not hasattr(module, attribute):
    sys.exit(f"{script} has no {attribute}: update results_global in synctrain/benchdoc.py PLAN")
setattr(module, attribute, Path(out))
sys.argv = [script, *args]
sys.exit(module.main() or 0)
"""


class UsageError(Exception):
    """A mistake in the ``bench all`` command line (exit status 2)."""


# ----------------------------------------------------------------------------------- the runner
def _command(run: BenchRun, script: Path, out_dir: Path, quick: bool) -> list[str]:
    args = run.quick if quick else run.full
    assert args is not None, "a full-runs-only benchmark has no quick command"
    args = tuple(a.replace("{out}", str(out_dir)) for a in args)
    if script.suffix == ".sh":
        return ["bash", str(script), *args]
    if run.results_global:
        return [sys.executable, "-c", _REDIRECT_SHIM, str(script), run.results_global, str(out_dir), *args]
    return [sys.executable, str(script), *args]


def _shown(run: BenchRun, quick: bool, out_dir: Path | str = "{out}") -> str:
    """The command a reader would type for this row (the shim left out)."""
    args = run.quick if quick else run.full
    text = " ".join(a.replace("{out}", str(out_dir)) for a in (args or ()))
    head = ("bash " if run.script.endswith(".sh") else "python ") + f"benchmarks/{run.script}"
    env = " ".join(f"{k}={v}" for k, v in run.quick_env) + " " if quick and run.quick_env else ""
    return f"{env}{head} {text}".rstrip()


def _redirect_note(run: BenchRun, out_dir: Path | str) -> str:
    return f" (its {run.results_global} pointed at {out_dir}: it has no output flag)" if run.results_global else ""


def _pump(stream: IO[str], tail: deque[str]) -> None:
    for line in stream:
        sys.stdout.write(line)
        sys.stdout.flush()
        tail.append(line.rstrip("\n")[:OUTPUT_LINE_CHARS])


def _run_process(command: list[str], cwd: Path, env: dict[str, str], timeout_s: float,
                 tail: deque[str]) -> int | None:
    """Exit status, or None when it ran out of time (its whole process group is then killed)."""
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    assert proc.stdout is not None
    reader = threading.Thread(target=_pump, args=(proc.stdout, tail), daemon=True)
    reader.start()
    try:
        code: int | None = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        code = None
    except BaseException:  # Ctrl-C: the benchmark runs in its own session, so stop it too
        _kill_group(proc.pid)
        raise
    if code is None:
        _kill_group(proc.pid)
        proc.wait()
    reader.join(timeout=10)
    return code


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:  # it had just ended
        pass


def run_one(name: str, *, out_dir: Path, quick: bool, benchmarks_dir: Path,
            timeout_s: float | None = None) -> dict[str, Any]:
    """Run one row of the plan; returns its entry of the run record."""
    run = PLAN[name]
    script = benchmarks_dir / run.script
    shown = _shown(run, quick, out_dir)
    if not script.is_file():
        return {"status": "failed", "reason": f"{script} is missing", "command": shown}
    for arg in (run.quick if quick else run.full) or ():
        if arg.startswith("{out}/"):
            Path(arg.replace("{out}", str(out_dir))).mkdir(parents=True, exist_ok=True)
    started = time.time()
    tail: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(dict(run.quick_env) if quick else {}))
    timeout_s = timeout_s or (QUICK_TIMEOUT_S if quick else FULL_TIMEOUT_S)
    code = _run_process(_command(run, script, out_dir, quick), benchmarks_dir.parent, env, timeout_s, tail)
    seconds = round(time.time() - started, 1)
    result = out_dir / f"{name}.md"
    if run.output_is_result:
        stamp = _utc(time.time())
        result.write_text(f"# {name} ({stamp}, `synctrain bench all`)\n\nCommand: `{shown}`; exit "
                          f"status {code}.\n\n```\n" + "\n".join(tail) + "\n```\n")
    fresh = result.is_file() and result.stat().st_mtime >= started - 1
    if code is None:
        reason = f"ran out of its {timeout_s:.0f} s"
    elif code != 0:
        reason = f"exit status {code}"
    elif not fresh:
        reason = f"exited 0 but wrote no {result.name} (does PLAN in synctrain/benchdoc.py match the script?)"
    else:
        reason = ""
    return {"status": "failed" if reason else "ok", "reason": reason, "exit_code": code,
            "seconds": seconds, "command": shown, "output_tail": list(tail)[-DOC_TAIL_LINES:]}


def _skip_reason(name: str, quick: bool, cuda: bool | None) -> str:
    run = PLAN[name]
    if quick and run.quick is None:
        return "full runs only"
    if run.needs_cuda and cuda is not True:  # None: not looked for (the doc without a run)
        return "needs a CUDA GPU" + ("; none here" if cuda is False else "")
    return ""


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def run_benchmarks(names: list[str], out_dir: Path, *, quick: bool, benchmarks_dir: Path,
                   command: str) -> dict[str, Any]:
    """Run the rows ``names`` in turn, showing progress; the run record (also in OUT)."""
    out_dir, benchmarks_dir = out_dir.resolve(), benchmarks_dir.resolve()  # they run in the repo root
    out_dir.mkdir(parents=True, exist_ok=True)
    cuda = cuda_available() if any(PLAN[n].needs_cuda for n in names) else None
    record: dict[str, Any] = {"quick": quick, "command": command, "started": time.time(), "runs": {}}
    t0 = time.monotonic()
    for i, name in enumerate(names, 1):
        elapsed = time.strftime("%H:%M:%S", time.gmtime(time.monotonic() - t0))
        skip = _skip_reason(name, quick, cuda)
        print(f"[bench all] ({i}/{len(names)}, {elapsed} elapsed) {name}: "
              f"{'skipped: ' + skip if skip else _shown(PLAN[name], quick, out_dir)}"
              f"{'' if skip else _redirect_note(PLAN[name], out_dir)}", file=sys.stderr, flush=True)
        entry = {"status": "skipped", "reason": skip} if skip else run_one(
            name, out_dir=out_dir, quick=quick, benchmarks_dir=benchmarks_dir)
        record["runs"][name] = entry
        if not skip:
            how = "ok" if entry["status"] == "ok" else f"FAILED ({entry['reason']})"
            print(f"[bench all] {name}: {how} after {entry.get('seconds', 0):.1f} s", file=sys.stderr, flush=True)
        record["finished"] = time.time()
        _write_atomically(out_dir / RUN_RECORD, json.dumps(record, indent=2) + "\n")
    return record


# ---------------------------------------------------------------------------- the machine
def _utc(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(epoch_s))


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _gpus() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    # "GPU 0: NVIDIA H200 (UUID: GPU-...)" -> "NVIDIA H200"
    return [re.sub(r"\s*\(UUID.*\)$", "", line.split(":", 1)[1]).strip()
            for line in out.splitlines() if line.startswith("GPU ") and ":" in line]


def this_machine() -> dict[str, str]:
    """Where the doc is generated: CPU, cores, memory, OS and the versions that matter."""
    model = re.search(r"^model name\s*:\s*(.+)$", _read("/proc/cpuinfo"), re.M)
    mem_kb = re.search(r"^MemTotal:\s*(\d+)\s*kB", _read("/proc/meminfo"), re.M)
    os_name = re.search(r'^PRETTY_NAME="?([^"\n]+)"?', _read("/etc/os-release"), re.M)
    gpus = _gpus()
    return {
        "cpu": (model.group(1).strip() if model else platform.processor() or "unknown CPU")
        + f" ({platform.machine()})",
        "cores": str(os.cpu_count()),
        "memory": f"{int(mem_kb.group(1)) / 2**20:.1f} GiB" if mem_kb else "unknown",
        "os": f"{os_name.group(1) if os_name else platform.system()} ({platform.system()} {platform.release()})",
        "python": platform.python_version(), "torch": _version("torch"), "ray": _version("ray"),
        "gpu": ", ".join(gpus) if gpus else "none",
    }


def machine_line(info: dict[str, str]) -> str:
    return (f"{info['cpu']}, {info['cores']} cores, {info['memory']} memory; {info['os']}; "
            f"Python {info['python']}, torch {info['torch']}, ray {info['ray']}; GPU: {info['gpu']}")


# ----------------------------------------------------------------------- what a result records
_LOAD_KEYS = ("load_avg_1m", "load_average_1m", "load_avg_start", "loadavg_start")


def _machine_parts(d: dict[str, Any]) -> list[str]:
    parts = [str(d[k]) for k in ("machine", "platform") if isinstance(d.get(k), str)]
    if d.get("processor") not in (None, "", "unknown"):
        parts.append(str(d["processor"]))
    if d.get("cpus"):
        parts.append(f"{d['cpus']} CPUs")
    parts += [f"{label} {d[k]}" for k, label in (("python", "Python"), ("torch", "torch"), ("ray", "ray"))
              if d.get(k)]
    if "gpu" in d:
        parts.append(f"GPU {d['gpu']}" if d["gpu"] else "no GPU")
    for key in _LOAD_KEYS:
        load = d.get(key)
        load = load[0] if isinstance(load, list) and load else load
        if isinstance(load, (int, float)):
            parts.append(f"load average {load:.1f}")
            break
    return parts


def recorded_run(data: Any) -> tuple[str | None, str | None]:
    """(when, where) as a result's JSON records them: a ``meta`` or ``machine`` entry (a string,
    or a dict with ``when``, ``machine``, ``cpus``, versions, load average), or a top-level ``when``."""
    if not isinstance(data, dict):
        return None, None
    when = data.get("when") if isinstance(data.get("when"), str) else None
    parts: list[str] = []
    for key in ("meta", "machine"):
        value = data.get(key)
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, dict):
            when = when or next((str(value[k]) for k in ("when", "date") if value.get(k)), None)
            parts += _machine_parts(value)
    unique = list(dict.fromkeys(parts))
    return when, ", ".join(unique) if unique else None


def _file_date(path: Path) -> str:
    """The commit date of a tracked, unmodified file, else its modification time."""
    try:
        git = ["git", "-C", str(path.parent)]
        dirty = subprocess.run([*git, "status", "--porcelain", "--", path.name], capture_output=True,
                               text=True, timeout=10)
        log = subprocess.run([*git, "log", "-1", "--format=%cd", "--date=format-local:%Y-%m-%d %H:%M UTC",
                              "--", path.name], capture_output=True, text=True, timeout=10,
                             env=dict(os.environ, TZ="UTC"))
        if dirty.returncode == 0 and not dirty.stdout.strip() and log.stdout.strip():
            return f"{log.stdout.strip()} (commit date)"
    except (OSError, subprocess.SubprocessError):
        pass
    return _utc(path.stat().st_mtime) + " (file time)"


# ----------------------------------------------------------------------------------- the doc
def _demote_headings(markdown: str, levels: int = 2) -> str:
    """``# T`` -> ``### T`` outside code fences, so a result's title sits under its section."""
    lines, fenced = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            line = "#" * min(6, line.index(" ") + levels) + line[line.index(" "):]
        lines.append(line)
    return "\n".join(lines)


def _owner(stem: str, names: Iterable[str]) -> str | None:
    """The result a file stem belongs to: the longest name it equals or extends with _ - ."""
    owners = [n for n in names if stem == n or any(stem.startswith(n + c) for c in "_-.")]
    return max(owners, key=len) if owners else None


def _what(name: str) -> str:
    if name in PLAN:
        return PLAN[name].what
    base = _owner(name, PLAN)
    if base is None:
        return "not in the plan of `synctrain bench all`: see its table"
    return f"a variant of `{base}` (not rerun by `bench all`): {PLAN[base].what}"


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def _shown_path(path: Path) -> str:
    try:
        return path.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(path)


def _status_line(name: str, md: Path, entry: dict[str, Any] | None, run_started: float) -> str:
    if not entry or entry.get("status") == "ok":
        return ""
    if entry["status"] == "skipped":
        return f"**Not run in the last `bench all`** ({entry['reason']}): the figures below are older."
    if md.is_file() and md.stat().st_mtime < run_started:
        return f"**The last run failed** ({entry['reason']}): the figures below are from an earlier run."
    return f"**The last run failed** ({entry['reason']})."


def _section(name: str, results_dir: Path, doc_dir: Path, plots: list[Path], quick: bool,
             record: dict[str, Any]) -> str:
    md, js = results_dir / f"{name}.md", results_dir / f"{name}.json"
    entry = record.get("runs", {}).get(name)
    out = [f"## {name}", "", f"*{_what(name)}*", ""]
    status = _status_line(name, md, entry, float(record.get("started", 0)))
    if status:
        out += [status, ""]
    if not md.is_file():  # a failure that left no table
        tail = "\n".join((entry or {}).get("output_tail") or ["(no output)"])
        return "\n".join(out + ["Its last lines of output:", "", "```", tail, "```", ""])
    when: str | None = None
    where: str | None = None
    if js.is_file():
        try:
            when, where = recorded_run(json.loads(js.read_text()))
        except (OSError, ValueError):
            where = f"({js.name} does not parse)"
    out.append(f"- Ran: {when or _file_date(js if js.is_file() else md)}"
               + (f" on {where}" if where else " (its machine is not recorded in a JSON; see below)"))
    if name in PLAN and (PLAN[name].quick is not None or not quick):
        shown = _shown(PLAN[name], quick, _shown_path(results_dir))
        out.append(f"- `bench all{' --quick' if quick else ''}` runs: `{shown}`"
                   + _redirect_note(PLAN[name], _shown_path(results_dir)))
    out += [f"- Plot: ![{p.stem}]({_rel(p, doc_dir)})" for p in plots]
    table = md.read_text(errors="replace")
    if len(table) > MAX_TABLE_CHARS:
        table = table[:MAX_TABLE_CHARS] + f"\n\n(cut at {MAX_TABLE_CHARS:,} characters: see {md.name})"
    return "\n".join(out + ["", _demote_headings(table).strip(), ""])


def _header(results_dir: Path, quick: bool, command: str, record: dict[str, Any]) -> list[str]:
    lines = ["# Benchmarks", "",
             "<!-- Generated by `synctrain bench all` (synctrain/benchdoc.py): edit that, not this "
             "page. -->", "",
             f"The latest figures of every benchmark in `benchmarks/`, from `{_shown_path(results_dir)}/`.",
             "",
             f"- Generated: {_utc(time.time())} by `{command}`",
             f"- Generated on: {machine_line(this_machine())}",
             "- Each section says when and on what machine its benchmark ran (from its JSON, else the "
             "file's commit date); that is the machine the figures belong to.",
             "- Regenerate this page from the stored results: "
             + ("`synctrain bench all --quick --no-run`; run the smoke benchmarks again first: "
                "`make bench-all-quick`." if quick else
                "`make benchmarks-doc`; run every benchmark again first: `synctrain bench all` "
                "(hours); a smoke run instead: `make bench-all-quick`."),
             ""]
    if quick:
        lines += ["> **Smoke-size figures** (`--quick`): a few steps of each benchmark, to show that "
                  "each one runs. They are **not** the published figures (those are in "
                  "`docs/benchmarks.md`, from `benchmarks/results/`).", ""]
    runs = record.get("runs") or {}
    if runs:
        started = _utc(float(record.get("started", 0)))
        by = {s: [n for n, e in runs.items() if e.get("status") == s] for s in ("ok", "failed", "skipped")}
        lines += [f"Last `bench all` run into this directory: `{record.get('command', '?')}`, started "
                  f"{started}: {len(by['ok'])} ok"
                  + (f", **failed: {', '.join(by['failed'])}**" if by["failed"] else "")
                  + (f", skipped: {', '.join(by['skipped'])}" if by["skipped"] else "") + ".", ""]
    return lines


def _not_run_line(missing: list[str], quick: bool, record: dict[str, Any]) -> str:
    reasons = []
    for name in missing:
        runs = record.get("runs") or {}
        why = (runs.get(name) or {}).get("reason") or _skip_reason(name, quick, cuda=None)
        why = why or ("not selected in the last run" if runs and name not in runs else "")
        reasons.append(f"`{name}`" + (f" ({why})" if why else ""))
    return f"Not run (no result in this directory): {', '.join(reasons)}."


def write_benchmarks_doc(results_dir: Path, doc_path: Path, *, quick: bool = False,
                         command: str | None = None) -> Path:
    """Compose ``doc_path`` from every ``NAME.md`` in ``results_dir`` (plan order, then the
    others by name), with each one's plots, when and where it ran, and the run record if any."""
    results_dir, doc_path = Path(results_dir), Path(doc_path)
    try:
        record = json.loads((results_dir / RUN_RECORD).read_text())
    except (OSError, ValueError):
        record = {}
    quick = quick or bool(record.get("quick"))
    found = {p.stem for p in results_dir.glob("*.md")
             if not p.name.startswith("_") and p.resolve() != doc_path.resolve()}  # not the doc itself
    failed = {n for n, e in (record.get("runs") or {}).items() if e.get("status") == "failed"}
    names = [n for n in PLAN if n in found or n in failed] + sorted(found - set(PLAN))
    plots: dict[str, list[Path]] = {n: [] for n in names}
    strays: list[Path] = []
    for png in sorted(results_dir.glob("*.png")):
        owner = _owner(png.stem, names)
        (plots[owner] if owner else strays).append(png)
    command = command or "synctrain bench all --no-run" + (" --quick" if quick else "")
    lines = _header(results_dir, quick, command, record)
    missing = [n for n in PLAN if n not in names]
    if missing:
        lines += [_not_run_line(missing, quick, record), ""]
    lines += ["Contents:", ""] + [f"- [{n}](#{n}): {_what(n)}" for n in names] + [""]
    for name in names:
        lines.append(_section(name, results_dir, doc_path.parent, plots[name], quick, record))
    if strays:
        lines += ["## Other plots", ""] + [f"![{p.stem}]({_rel(p, doc_path.parent)})" for p in strays] + [""]
    _write_atomically(doc_path, "\n".join(lines).rstrip() + "\n")
    return doc_path


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ------------------------------------------------------------------------------ the command
def select(only: str | None) -> list[str]:
    """The plan rows ``--only`` names (a result, a script's name or an old short name), in plan
    order; all of them without ``--only``."""
    if not only:
        return list(PLAN)
    from synctrain.cli import BENCHMARK_ALIASES

    wanted = set()
    for raw in (w.strip() for w in only.split(",") if w.strip()):
        word = BENCHMARK_ALIASES.get(raw, raw)
        rows = [n for n, r in PLAN.items() if n == word or r.script.rsplit(".", 1)[0] == word]
        if not rows:
            raise UsageError(f"--only: no benchmark {raw!r} (known: {', '.join(PLAN)})")
        wanted.update(rows)
    return [n for n in PLAN if n in wanted]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="synctrain bench all", description="Run every benchmark in benchmarks/ in turn (the table "
        "PLAN in synctrain/benchdoc.py says how), then write docs/benchmarks.md from the results.")
    p.add_argument("--quick", action="store_true", help="smoke sizes: a few steps of each, results into "
                   "benchmarks/results/quick and the doc into that directory (never the published ones)")
    p.add_argument("--out", type=Path, help="results directory (default: benchmarks/results; with "
                   "--quick benchmarks/results/quick)")
    p.add_argument("--doc", type=Path, help="the page to write (default: docs/benchmarks.md; with "
                   "--quick OUT/benchmarks.md)")
    p.add_argument("--only", metavar="A,B", help=f"run only these (of: {', '.join(PLAN)}; a script's "
                   "name selects all its rows)")
    p.add_argument("--no-run", action="store_true", help="run nothing: write the doc from the results "
                   "already in OUT")
    p.add_argument("--benchmarks-dir", type=Path, default=BENCHMARKS_DIR, help=argparse.SUPPRESS)
    return p


def bench_all_main(argv: list[str]) -> int:
    """``synctrain bench all``: 0 when every benchmark run succeeded, 1 when one failed, 2 for
    a usage error."""
    args = _parser().parse_args(argv)
    bench_dir: Path = args.benchmarks_dir
    out = args.out or (bench_dir / "results" / "quick" if args.quick else bench_dir / "results")
    doc = args.doc or (out / "benchmarks.md" if args.quick else bench_dir.parent / "docs" / "benchmarks.md")
    command = " ".join(["synctrain bench all", *argv])
    try:
        if args.no_run and args.only:
            raise UsageError("--only chooses what runs, and --no-run runs nothing")
        if args.no_run and not out.is_dir():
            raise UsageError(f"no results directory {out}: run `synctrain bench all` first, or name one with --out")
        names = select(args.only)
    except UsageError as exc:
        print(f"synctrain bench all: {exc}", file=sys.stderr)
        return 2
    failed: list[str] = []
    if not args.no_run:
        record = run_benchmarks(names, out, quick=args.quick, benchmarks_dir=bench_dir, command=command)
        failed = [n for n, e in record["runs"].items() if e["status"] == "failed"]
    write_benchmarks_doc(out, doc, quick=args.quick, command=command)
    print(f"[bench all] wrote {doc}" + (f"; FAILED: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0
