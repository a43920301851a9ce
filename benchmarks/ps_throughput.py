"""Parameter-server throughput: synctrain's async mode vs the naive Ray parameter server.

    python benchmarks/ps_throughput.py [--steps 60] [--rounds 1] [--quick] [--num-cpus 4]

A ~1M-parameter MLP (784-1024-256-10, 1,068,810 float32 parameters: 4.3 MB of gradient per
push), 2 workers, each pushing gradients of random batches as fast as it can. Measured side
by side in one run (same Ray instance, same machine):

* ``naive``: the parameter server of Ray's documentation: one actor holding the model and an
  SGD optimizer; each worker step is one ``ray.get(ps.apply_gradients.remote(grads))`` with the
  gradients as a list of numpy arrays, answered with the new weights (a state_dict).
* ``synctrain``: ``Trainer(mode="async", staleness=None, num_ps_shards=k)`` with the defaults
  (parameters fetched with every push, like the naive server) for k = 1..4, then the opt-in
  throughput knobs: ``pipeline=True`` (the reply is collected at the next step, overlapping
  the server with compute) and ``pull_every=4`` (parameters fetched every 4th push only,
  DistBelief's n_fetch; the other pushes are acknowledged at once).
  The workers and the shards share this machine, so by default every push goes through a
  shared-memory channel rung over a Unix socket (``transport="auto"``); the rows marked ``via Ray`` use
  ``transport="ray"`` (Ray's object store, as between machines) to show what that buys.

Both use plain SGD and the same compute per step, so the difference is the parameter
server. Reported: pushes/s (all workers together, after warm-up) and gradient GB/s ingested
by the server(s), and the CPU cost of a push: busy CPU seconds of the whole machine (all
processes, from /proc/stat) over rank 0's timed window, per push made in it. Once every core is
busy, throughput is cores / CPU per push, whatever the design. Writes benchmarks/results/ps_throughput.{json,md} (with --quick: to a temp
directory unless --out is given).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from typing import Any

import numpy as np
import ray
import torch
import torch.nn.functional as F
from _common import init_ray
from torch import nn

import synctrain

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
WARMUP_STEPS = 5
BATCH = 32


def busy_cpu_s() -> float | None:
    """CPU seconds the whole machine spent busy so far (all processes: workers, shards, Ray's
    own daemons), from /proc/stat; None where there is no /proc. Sampled by rank 0 around its
    timed steps, it gives the CPU cost of a push, which is what caps throughput once every
    core is busy."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 256), nn.ReLU(),
                         nn.Linear(256, 10))


def _batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(BATCH, 784, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen)


# ---- synctrain ---------------------------------------------------------------------------
def synctrain_loop(config: dict[str, Any]) -> dict[str, float]:
    """Push as fast as possible; time the steps after warm-up."""
    ctx = synctrain.get_context()
    model = synctrain.prepare_model(make_model())
    opt = synctrain.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=0.01))
    gen = torch.Generator().manual_seed(ctx.rank)
    started, cpu0 = 0.0, None
    for step in range(WARMUP_STEPS + config["steps"]):
        if step == WARMUP_STEPS:
            started, cpu0 = time.monotonic(), busy_cpu_s()
        x, y = _batch(gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return {"steps": config["steps"], "elapsed_s": time.monotonic() - started, **_cpu(cpu0),
            "push_ms_p50": synctrain.strategy_metrics()["push_latency_ms_p50"]}


def _cpu(cpu0: float | None) -> dict[str, float]:
    cpu1 = busy_cpu_s()
    return {} if cpu0 is None or cpu1 is None else {"busy_cpu_s": cpu1 - cpu0}


#: (shards, pull_every, pipeline, transport) measured for synctrain; the first four are the
#: defaults.
VARIANTS = [(1, 1, False, "auto"), (2, 1, False, "auto"), (3, 1, False, "auto"), (4, 1, False, "auto"),
            (1, 1, True, "auto"), (2, 1, True, "auto"), (1, 4, True, "auto"), (2, 4, True, "auto"),
            (1, 1, False, "ray"), (1, 4, True, "ray")]


def run_synctrain(shards: int, steps: int, pull_every: int, pipeline: bool, transport: str) -> dict[str, Any]:
    result = synctrain.Trainer(synctrain_loop, num_workers=2, mode="async", staleness=None,
                               num_ps_shards=shards, pull_every=pull_every, pipeline=pipeline,
                               transport=transport, use_gpu=False, progress=False,
                               config={"steps": steps}, step_log=False).fit()
    name = "synctrain async" + (", pipeline" if pipeline else "") + (
        f", pull_every={pull_every}" if pull_every > 1 else "") + (", via Ray" if transport == "ray" else "")
    return summarize(name, result.outputs,
                     extra={"shards": shards, "pull_every": pull_every, "pipeline": pipeline,
                            "transport": transport,
                            "push_transport": result.worker_metrics[0]["push_transport"],
                            "push_ms_p50": float(np.mean([o["push_ms_p50"] for o in result.outputs])),
                            "updates_applied": result.strategy_info["updates_applied"],
                            "pushes_received": result.strategy_info["pushes_received"]})


# ---- the naive parameter server of Ray's documentation -----------------------------------
class NaiveParameterServer:
    def __init__(self) -> None:
        torch.set_num_threads(1)
        self.model = make_model()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01)

    def apply_gradients(self, *gradients: list[np.ndarray]) -> dict[str, torch.Tensor]:
        summed = [np.stack(g).sum(axis=0) for g in zip(*gradients, strict=True)]
        self.optimizer.zero_grad()
        for p, g in zip(self.model.parameters(), summed, strict=True):
            p.grad = torch.from_numpy(g)
        self.optimizer.step()
        return self.get_weights()

    def get_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.model.state_dict().items()}


class NaiveWorker:
    def __init__(self, rank: int) -> None:
        torch.set_num_threads(1)
        self.model = make_model()
        self.gen = torch.Generator().manual_seed(rank)

    def run(self, ps: Any, steps: int) -> dict[str, float]:
        weights = ray.get(ps.get_weights.remote())
        started, cpu0 = 0.0, None
        for step in range(WARMUP_STEPS + steps):
            if step == WARMUP_STEPS:
                started, cpu0 = time.monotonic(), busy_cpu_s()
            self.model.load_state_dict(weights)
            x, y = _batch(self.gen)
            self.model.zero_grad()
            F.cross_entropy(self.model(x), y).backward()
            grads = [p.grad.data.cpu().numpy() for p in self.model.parameters()]
            weights = ray.get(ps.apply_gradients.remote(grads))  # one ray.get per step
        return {"steps": steps, "elapsed_s": time.monotonic() - started, **_cpu(cpu0)}


def run_naive(steps: int) -> dict[str, Any]:
    ps = ray.remote(NaiveParameterServer).options(num_cpus=0).remote()
    workers = [ray.remote(NaiveWorker).options(num_cpus=1).remote(r) for r in range(2)]
    try:
        outputs = ray.get([w.run.remote(ps, steps) for w in workers], timeout=1800)
    finally:
        for actor in (ps, *workers):
            ray.kill(actor)
    return summarize("naive Ray PS (docs)", outputs, extra={"shards": 1, "pull_every": 1})


# ---- reporting ---------------------------------------------------------------------------
GRAD_BYTES = sum(p.numel() for p in make_model().parameters()) * 4


def summarize(name: str, outputs: list[dict[str, float]], extra: dict[str, Any]) -> dict[str, Any]:
    pushes_per_s = sum(o["steps"] / o["elapsed_s"] for o in outputs)
    # Machine-wide busy CPU over rank 0's window, per push made in that window by everyone.
    first = outputs[0]
    cpu_ms = (1e3 * first["busy_cpu_s"] / (pushes_per_s * first["elapsed_s"])
              if "busy_cpu_s" in first else None)
    return {"name": name, "workers": len(outputs), "pushes_per_s": pushes_per_s,
            "grad_gb_per_s": pushes_per_s * GRAD_BYTES / 1e9, "cpu_ms_per_push": cpu_ms, **extra}


def median_rows(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per variant, the round with the median pushes/s, every round's figure kept beside it."""
    rows = []
    for runs in zip(*rounds, strict=True):
        ordered = sorted(runs, key=lambda r: r["pushes_per_s"])
        row = dict(ordered[(len(ordered) - 1) // 2])
        row["pushes_per_s_rounds"] = [r["pushes_per_s"] for r in runs]
        row["cpu_ms_per_push_rounds"] = [r["cpu_ms_per_push"] for r in runs]
        rows.append(row)
    return rows


def write(rows: list[dict[str, Any]], out_dir: str, args: argparse.Namespace) -> None:
    naive = next(r for r in rows if r["name"].startswith("naive"))
    for r in rows:
        r["speedup_vs_naive"] = r["pushes_per_s"] / naive["pushes_per_s"]
        r["speedup_rounds"] = [a / b for a, b in zip(r["pushes_per_s_rounds"], naive["pushes_per_s_rounds"],
                                                     strict=True)]
    meta = {"rounds": args.rounds, "parameters": GRAD_BYTES // 4, "grad_mb": GRAD_BYTES / 1e6, "workers": 2, "batch": BATCH,
            "steps_per_worker": args.steps, "cpus": os.cpu_count(), "machine": platform.platform(),
            "torch": torch.__version__, "ray": ray.__version__,
            "load_avg_1m": os.getloadavg()[0], "command": " ".join(sys.argv)}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "ps_throughput.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    lines = ["# Parameter-server throughput", "",
             f"{meta['parameters']:,}-parameter MLP ({meta['grad_mb']:.1f} MB of float32 gradient per "
             f"push), 2 workers, batch {BATCH}, {args.steps} timed steps per worker after "
             f"{WARMUP_STEPS} warm-up steps, {args.rounds} interleaved round(s) (median round shown; "
             f"each round's ratio in brackets); {meta['cpus']} CPUs, load average "
             f"{meta['load_avg_1m']:.1f} at the end. Command: `{meta['command']}`.", "",
             "| server | shards | pushes/s | gradient GB/s | vs naive | CPU ms per push |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        cpu = "-" if r.get("cpu_ms_per_push") is None else f"{r['cpu_ms_per_push']:.1f}"
        lines.append(f"| {r['name']} | {r['shards']} | {r['pushes_per_s']:.1f} | "
                     f"{r['grad_gb_per_s']:.3f} | {r['speedup_vs_naive']:.2f}x{_each(r['speedup_rounds'])} | {cpu} |")
    with open(os.path.join(out_dir, "ps_throughput.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def _each(values: list[float]) -> str:
    return " (" + " / ".join(f"{v:.2f}" for v in values) + ")" if len(values) > 1 else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per worker")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 5 steps, 2 variants")
    parser.add_argument("--out", default=None, help="results directory")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure everything this many times, interleaved; report the median of each")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray instance")
    args = parser.parse_args()
    if args.quick:
        args.steps = 5
    out_dir = args.out or (tempfile.mkdtemp(prefix="ps_throughput_") if args.quick else RESULTS)
    init_ray(args.num_cpus)
    variants = (VARIANTS[:1] + VARIANTS[-1:]) if args.quick else VARIANTS
    rounds: list[list[dict[str, Any]]] = []
    for i in range(args.rounds):  # naive, then every variant; again: drift hits all alike
        print(f"-- round {i + 1}/{args.rounds}", flush=True)
        rounds.append([run_naive(args.steps)] + [
            run_synctrain(shards, args.steps, pull_every, pipeline, transport)
            for shards, pull_every, pipeline, transport in variants])
    write(median_rows(rounds), out_dir, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
