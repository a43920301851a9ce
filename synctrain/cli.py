"""`synctrain run | status | bench` — the command-line face of the framework.

* ``synctrain run SCRIPT [ARGS...]`` runs a training script (one that calls ``Trainer.fit``)
  with ``RAY_ADDRESS`` set from ``--address`` if given; without it the script starts a local Ray.
* ``synctrain status [--address ADDR]`` shows the Ray cluster's nodes, CPUs and GPUs, and the
  modes synctrain offers.
* ``synctrain bench NAME [ARGS...]`` runs one of the benchmark scripts in ``benchmarks/``.
"""

from __future__ import annotations

import argparse
import logging
import os
import runpy
import subprocess
import sys
from pathlib import Path

BENCHMARKS = {
    "throughput": "throughput.py",
    "convergence": "convergence.py",
    "ps": "ps_throughput.py",
    "raft": "raft_core.py",
    "coordinator": "coordinator_bench.py",
}


def _benchmarks_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "benchmarks"


def cmd_run(args: argparse.Namespace) -> int:
    script = Path(args.script)
    if not script.is_file():
        print(f"synctrain run: no such script: {script}", file=sys.stderr)
        return 2
    if args.address:
        os.environ["RAY_ADDRESS"] = args.address
    sys.argv = [str(script), *args.script_args]
    sys.path.insert(0, str(script.resolve().parent))
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import ray

    from synctrain.strategies.base import registered_modes

    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address:
        print("no Ray cluster named (use --address or RAY_ADDRESS); Trainer would start a local one")
        print(f"local CPUs: {os.cpu_count()}; modes: {', '.join(registered_modes())}")
        return 0
    ray.init(address=address, logging_level=logging.ERROR)
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


def cmd_bench(args: argparse.Namespace) -> int:
    script = _benchmarks_dir() / BENCHMARKS[args.name]
    if not script.is_file():
        print(f"synctrain bench: {script} is not present in this installation", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(script), *args.bench_args])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synctrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a training script")
    run.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else local)")
    run.add_argument("script")
    run.add_argument("script_args", nargs=argparse.REMAINDER)
    run.set_defaults(func=cmd_run)
    status = sub.add_parser("status", help="show the Ray cluster synctrain would use")
    status.add_argument("--address")
    status.set_defaults(func=cmd_status)
    bench = sub.add_parser("bench", help="run a benchmark script")
    bench.add_argument("name", choices=sorted(BENCHMARKS))
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
