"""`synctrain run | resume | status | log | plot | cluster | bench` — the command-line face of
the framework.

* ``synctrain run SCRIPT [ARGS...]`` runs a training script (one that calls ``Trainer.fit``)
  with ``RAY_ADDRESS`` set from ``--address`` if given; without it the script starts a local Ray.
  ``synctrain run --workers N [FLAGS] SCRIPT [ARGS...]`` runs a plain single-process script as
  every worker's training loop, as torchrun does (:mod:`synctrain.launch`: a flag per Trainer
  keyword and mode option, ``--config``/``--set`` as ``get_context().config``; exit status 0
  finished, 1 training failed, 2 usage error). ``synctrain resume JOB`` runs either again.
* ``synctrain plot JOB`` writes PNG figures of the job's reported values against step and
  wall time into its directory's ``plots/`` (:mod:`synctrain.plots`; needs matplotlib).
* ``synctrain status [JOB] [--storage-path P]``: without a name, the jobs under the storage
  path (name, state, mode, world size, generation, last committed step, last loss, age); with
  one, that job's detail, its coordinator's nodes included. ``synctrain log JOB [--follow]
  [--json]``: the job's committed step log (see :mod:`synctrain.jobs`: both read the job's
  coordinator if it runs, else its WALs on disk, read-only).
* ``synctrain cluster [--address ADDR]`` shows the Ray cluster's nodes, CPUs and GPUs, and the
  modes synctrain offers; without an address, the cluster a Trainer would use (a running
  ``ray start`` cluster, else a local Ray it would start). An address that does not answer
  fails within seconds (exit 1), like ``Trainer.fit`` (see :mod:`synctrain.raycluster`).
* ``synctrain bench NAME [ARGS...]`` runs ``benchmarks/NAME.py``: NAME is the file's name as
  the README lists it (``ps_throughput``, ``raft_core``, ...); the short names of earlier
  versions (``ps``, ``raft``, ``coordinator``) still work. ``synctrain bench all [--quick]
  [--only A,B] [--no-run]`` runs every benchmark in turn and writes ``docs/benchmarks.md`` from
  the results (:mod:`synctrain.benchdoc`, whose ``PLAN`` says what runs and how).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import runpy
import subprocess
import sys
from pathlib import Path

#: Short names of earlier versions, kept working; the names are the scripts' file names.
BENCHMARK_ALIASES = {"ps": "ps_throughput", "raft": "raft_core", "coordinator": "coordinator_bench"}


RUN_DESCRIPTION = """\
synctrain run [FLAGS] SCRIPT [ARGS...]: flags before the script are synctrain's, everything
after it is the script's own (its sys.argv[1:]).

  synctrain run train.py ARGS
      runs the script once, here, as `python train.py ARGS` would (a script that builds
      its own Trainer, like the examples).
  synctrain run --workers 4 --mode async --staleness 4 train.py ARGS
      runs a plain single-process script (one that calls synctrain.prepare_model,
      prepare_optimizer and prepare_data_loader) as the training loop of every worker, as
      torchrun does; no Trainer call in the script. Rank 0's output is shown, the others'
      are in the job directory's output/. Exit status: 0 when every rank's script finished
      (sys.exit(0) included), 1 when training failed, 2 for a usage error.
"""


def _benchmarks_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "benchmarks"


def benchmark_names() -> list[str]:
    """Every ``benchmarks/NAME.py`` (helpers start with ``_``), so the names match the files."""
    directory = _benchmarks_dir()
    if not directory.is_dir():
        return []
    return sorted(p.stem for p in directory.glob("*.py") if not p.name.startswith("_"))


def cmd_run(args: argparse.Namespace) -> int:
    from synctrain import launch

    script = Path(args.script)
    if not script.is_file():
        print(f"synctrain run: no such script: {script}", file=sys.stderr)
        return 2
    # what `synctrain resume JOB` runs again, recorded in the job's job.json by Trainer.fit
    record = {"script": str(script.resolve()), "args": list(args.script_args), "cwd": os.getcwd(),
              "address": args.ray_address}
    if args.num_workers is not None:  # the script is every worker's loop
        record["launcher"] = list(getattr(args, "launcher_flags", None) or [])
        os.environ["SYNCTRAIN_LAUNCH"] = json.dumps(record)
        return launch.launch(args, script)
    given = sorted(f"--{k.replace('_', '-')}" for k in launch.trainer_kwargs(args) if k != "ray_address")
    if given:
        print(f"synctrain run: {', '.join(given)} configure the workers the script runs on: add "
              f"--workers N (without it the script runs once, here, and builds its own Trainer)",
              file=sys.stderr)
        return 2
    try:
        from synctrain.context import set_local_config

        set_local_config(launch.load_config(args.config, args.set))
    except launch.UsageError as exc:
        print(f"synctrain run: {exc}", file=sys.stderr)
        return 2
    if args.ray_address:
        os.environ["RAY_ADDRESS"] = args.ray_address
    os.environ["SYNCTRAIN_LAUNCH"] = json.dumps(record)
    sys.argv = [str(script), *args.script_args]
    sys.path.insert(0, str(script.resolve().parent))
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from synctrain.jobview import show_job, show_jobs

    if args.address is not None:  # what `status` did before `cluster` took it over
        print(f"synctrain status: shows jobs now; the Ray cluster view moved to "
              f"`synctrain cluster --address {args.address}`", file=sys.stderr)
        return 2
    if args.job:
        return show_job(args.job, args.storage_path)
    return show_jobs(args.storage_path)


def cmd_log(args: argparse.Namespace) -> int:
    from synctrain.jobview import show_log

    if args.max_wait_s is not None and args.max_wait_s <= 0:
        print("synctrain log: --max-wait-s must be positive", file=sys.stderr)
        return 2
    return show_log(args.job, args.storage_path, follow=args.follow, as_json=args.json,
                    max_wait_s=args.max_wait_s)


def cmd_cluster(args: argparse.Namespace) -> int:
    import ray

    from synctrain import raycluster
    from synctrain.errors import ConfigError
    from synctrain.strategies.base import registered_modes

    try:
        plan = raycluster.plan(args.address, "--address")
    except ConfigError as exc:
        print(f"synctrain cluster: {exc}", file=sys.stderr)
        return 1
    if plan.address is None:
        print("no Ray cluster named (use --address or RAY_ADDRESS) and none running here (`ray start`): "
              "Trainer would start a local one")
        if plan.note:
            print(plan.note)
        print(f"local CPUs: {os.cpu_count()}; modes: {', '.join(registered_modes())}")
        return 0
    address = plan.address
    if plan.note:
        print(plan.note)
    ray.init(address="auto" if plan.recorded else address, logging_level=logging.ERROR)  # see raycluster
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    free = ray.available_resources()
    print(f"Ray cluster at {address}: {len(nodes)} node(s) alive")
    for res in ("CPU", "GPU"):
        print(f"  {res}: {free.get(res, 0):g} free of {total.get(res, 0):g}")
    for n in nodes:
        print(f"  node {n['NodeManagerAddress']}: CPU {n['Resources'].get('CPU', 0):g} "
              f"GPU {n['Resources'].get('GPU', 0):g}")
    print(f"modes: {', '.join(registered_modes())}")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    """Run an interrupted job's script again (as ``synctrain run`` started it) under the job's
    name: its Trainer.fit takes the job over from the step log."""
    from synctrain.driver import jobdir

    storage = Path(os.path.expanduser(args.storage_path or jobdir.default_storage()))
    job = jobdir.JobDir(storage, args.job)
    status = job.read_status()
    if status is None:
        print(f"synctrain resume: no job {args.job!r} in {storage} (synctrain status lists the jobs there; "
              "--storage-path names another directory)", file=sys.stderr)
        return 2
    state = jobdir.job_state(job.path, status)
    if state in ("finished", "running"):
        why = ("it finished; its result stays readable (synctrain log " + args.job + ")" if state == "finished"
               else f"it is running (driver pid {(status.get('driver') or {}).get('pid', '?')})")
        print(f"synctrain resume: job {args.job!r} cannot be resumed: {why}", file=sys.stderr)
        return 2
    launch = status.get("launch")
    if not isinstance(launch, dict) or not launch.get("script"):
        print(f"synctrain resume: job {args.job!r} was not started by `synctrain run`, so there is no script "
              f"to run again; run your script again with Trainer(job_name={args.job!r}, storage_path="
              f"{str(storage)!r}): it resumes the job", file=sys.stderr)
        return 2
    os.environ["SYNCTRAIN_JOB_NAME"] = args.job
    os.environ["SYNCTRAIN_STORAGE_PATH"] = str(storage)
    if launch.get("cwd") and os.path.isdir(launch["cwd"]):
        os.chdir(launch["cwd"])
    print(f"synctrain resume: job {args.job!r} ({state}): running {launch['script']} again", file=sys.stderr)
    argv = ["run", *(launch.get("launcher") or []), "--job-name", args.job]
    if args.address or launch.get("address"):
        argv += ["--address", args.address or launch["address"]]
    if "launcher" not in launch:  # the script ran once on the driver and built its own Trainer
        argv = ["run"] + (["--address", args.address or launch["address"]]
                          if args.address or launch.get("address") else [])
    return main([*argv, launch["script"], *(launch.get("args") or [])])


def cmd_plot(args: argparse.Namespace) -> int:
    from synctrain.jobs import JobNotFoundError
    from synctrain.plots import PlotDependencyError, plot_job

    try:
        result = plot_job(args.job, args.storage_path)
    except JobNotFoundError as exc:
        print(f"synctrain plot: {exc}", file=sys.stderr)
        return 2
    except PlotDependencyError as exc:
        print(f"synctrain plot: {exc}", file=sys.stderr)
        return 1
    if not result.figures:
        print(f"synctrain plot: job {args.job!r} has no numeric reported values yet: nothing to plot",
              file=sys.stderr)
        return 0
    for path in result.files:
        print(path)
    if result.left_out:
        print(f"synctrain plot: {len(result.left_out)} more value(s) not plotted: {', '.join(result.left_out)}",
              file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.name == "all":  # every benchmark, then docs/benchmarks.md
        from synctrain.benchdoc import bench_all_main

        return bench_all_main(list(args.bench_args))
    name = BENCHMARK_ALIASES.get(args.name, args.name)
    script = _benchmarks_dir() / f"{name}.py"
    if not script.is_file():
        known = ", ".join(benchmark_names()) or "none: benchmarks/ is not present in this installation"
        print(f"synctrain bench: no benchmark {args.name!r} (benchmarks: {known})", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(script), *args.bench_args])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synctrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a training script (on N workers with --workers N)",
                         description=RUN_DESCRIPTION, allow_abbrev=False,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--config", metavar="FILE", help="the script's config, a .json (or .yaml with "
                     "PyYAML) file: synctrain.get_context().config")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="a config value (repeat; "
                     "a dotted key nests; the value is read as JSON when it parses, else as text)")
    from synctrain.launch import add_trainer_flags

    add_trainer_flags(run)
    run.add_argument("script", help="the Python script to run")
    run.add_argument("script_args", nargs=argparse.REMAINDER, help="the script's own arguments")
    run.set_defaults(func=cmd_run)
    storage_help = "the jobs' storage_path (default: $SYNCTRAIN_STORAGE_PATH, else ~/synctrain_results)"
    status = sub.add_parser("status", help="list the jobs under the storage path, or show one job")
    status.add_argument("job", nargs="?", help="a job's name: show its detail")
    status.add_argument("--storage-path", help=storage_help)
    status.add_argument("--address", help=argparse.SUPPRESS)  # moved to `cluster`: says so
    status.set_defaults(func=cmd_status)
    log_ = sub.add_parser("log", help="show a job's committed step log")
    log_.add_argument("job")
    log_.add_argument("--storage-path", help=storage_help)
    log_.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    log_.add_argument("--json", action="store_true", help="JSON Lines, one object per record")
    log_.add_argument("--max-wait-s", type=float, help="with --follow: stop after this long")
    log_.set_defaults(func=cmd_log)
    cluster = sub.add_parser("cluster", help="show the Ray cluster synctrain would use")
    cluster.add_argument("--address")
    cluster.set_defaults(func=cmd_cluster)
    resume = sub.add_parser("resume", help="resume an interrupted job that `synctrain run` started")
    resume.add_argument("job", help="the job's name (synctrain status lists them)")
    resume.add_argument("--storage-path", help="where the job's directory is (default: "
                        "SYNCTRAIN_STORAGE_PATH, else ~/synctrain_results)")
    resume.add_argument("--address", help="Ray cluster address (default: the one the job was run with)")
    resume.set_defaults(func=cmd_resume)
    plot = sub.add_parser("plot", help="write PNG figures of a job's reported values into its plots/")
    plot.add_argument("job")
    plot.add_argument("--storage-path", help=storage_help)
    plot.set_defaults(func=cmd_plot)
    bench = sub.add_parser("bench", help="run a benchmark script: benchmarks/NAME.py (all: every one, "
                           "then docs/benchmarks.md; `synctrain bench all --help`)")
    bench.add_argument("name", help=f"all, or one of: {', '.join(benchmark_names()) or '(none installed)'}")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "run":  # the launcher's own flags, for `synctrain resume`
        args.launcher_flags = argv[1:len(argv) - len(args.script_args) - 1]
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
