"""Sync-mode throughput: synctrain's gradient transports vs raw PyTorch DDP, side by side in one run.

    python benchmarks/throughput.py [--workers 2] [--steps 60] [--rounds 3] [--quick]
                                    [--models digits,mlp,convnet] [--name throughput]

For the digits MLP (64-128-128-10, the example's), a larger MLP and a small convnet, the same
model, world size, per-worker batch and synthetic data are trained by

* ``synctrain`` with ``grad_transport="shm"`` (shared memory within the host) and ``"gloo"``,
  both with ``step_log=False`` (the transport alone; ``steplog_overhead.py`` measures the log);
* hand-written Ray actors that call ``init_process_group("gloo")`` and wrap the model in
  ``DistributedDataParallel`` (``raw_ddp``);
* one plain process with all the job's cores (``torch.set_num_threads(workers)``) and the
  global batch (``single``): how close data parallelism on one host gets to it.

Variants run in a rotating order within each round so drift in the machine's load hits all;
each run times its steady-state steps (after warm-up) and the median over rounds is reported.

Then, inside one synctrain job on the shared-memory transport, all-reduce bus bandwidth of
``synctrain.all_reduce`` (shared memory) against ``torch.distributed.all_reduce`` (gloo, the
same process group) on 4 KB, 1 MB, 16 MB and 64 MB float32 tensors, blocks alternating.
Bus bandwidth = bytes * 2 (n-1) / n / time (the NCCL-tests convention).

The machine's load average is recorded before and after (this machine is shared).
Writes benchmarks/results/NAME.{json,md}. Targets on a 2-core machine (issue 13): bus
bandwidth >= 2x gloo's at 16 MB and >= 3x at 1 MB; MLP samples/s >= 1.2x raw DDP; convnet
not slower.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import time
from typing import Any

import ray
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import init_ray, machine, markdown_table, median, write_results  # noqa: E402

import synctrain  # noqa: E402

WARMUP_STEPS = 5
MODELS = ("digits", "mlp", "convnet")
VARIANTS = ("shm", "gloo", "raw_ddp", "single")
SIZES_BYTES = {"4KB": 4 << 10, "1MB": 1 << 20, "16MB": 16 << 20, "64MB": 64 << 20}


def build_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "digits":  # examples/digits.py's DigitsNet
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                             nn.Linear(128, 10))
    if name == "mlp":
        return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                             nn.Linear(512, 10))
    return nn.Sequential(  # a small CIFAR-sized convnet
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10))


def make_batch(name: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shape = {"digits": (64,), "mlp": (784,), "convnet": (3, 32, 32)}[name]
    return torch.randn(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g)


def timed_steps(model: nn.Module, opt: Any, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Seconds for ``steps`` steady-state steps (after warm-up)."""
    for i in range(WARMUP_STEPS + steps):
        if i == WARMUP_STEPS:
            started = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return time.perf_counter() - started


def synctrain_loop(config: dict[str, Any]) -> float:
    model = synctrain.prepare_model(build_model(config["model"]))
    opt = synctrain.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    x, y = make_batch(config["model"], config["batch"])
    return timed_steps(model, opt, x, y, config["steps"])


class RawDDPWorker:
    """The baseline: what a user writes by hand with Ray actors and DDP."""

    def address(self) -> tuple[str, int]:
        ip = ray.util.get_node_ip_address()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # a free port, as users find one
            s.bind((ip, 0))
            return ip, int(s.getsockname()[1])

    def run(self, rank: int, world: int, addr: tuple[str, int], config: dict[str, Any]) -> float:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://{addr[0]}:{addr[1]}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=300))
        try:
            model = DistributedDataParallel(build_model(config["model"]))
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            x, y = make_batch(config["model"], config["batch"])
            return timed_steps(model, opt, x, y, config["steps"])
        finally:
            dist.destroy_process_group()


def run_raw(workers: int, config: dict[str, Any]) -> float:
    actor = ray.remote(RawDDPWorker).options(num_cpus=1)
    actors = [actor.remote() for _ in range(workers)]
    try:
        addr = ray.get(actors[0].address.remote())
        times = ray.get([a.run.remote(r, workers, addr, config) for r, a in enumerate(actors)])
    finally:
        for a in actors:
            ray.kill(a)
    return max(times)


def run_synctrain(workers: int, config: dict[str, Any], transport: str) -> float:
    result = synctrain.Trainer(synctrain_loop, num_workers=workers, mode="sync", use_gpu=False,
                               progress=False, step_log=False, grad_transport=transport,
                               config=config).fit()
    return max(result.outputs)


def single_process(workers: int, config: dict[str, Any]) -> float:
    """One process, the global batch, as many threads as the job has workers."""
    torch.set_num_threads(workers)
    model = build_model(config["model"])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = make_batch(config["model"], config["batch"] * workers)
    return timed_steps(model, opt, x, y, config["steps"])


def run_single(workers: int, config: dict[str, Any]) -> float:
    """The single-process baseline in a fresh Ray worker holding all the job's CPUs."""
    task = ray.remote(single_process).options(num_cpus=workers, max_retries=0)
    return float(ray.get(task.remote(workers, config)))


def interleaved_loop(config: dict[str, Any]) -> dict[str, list[float]]:
    """Inside one job on the shared-memory transport, short blocks of steps that rotate over
    the variants, so that the machine's load (shared, drifting) hits each alike:

    * ``shm``: the prepared model (synctrain's DDP, its buckets through shared memory);
    * ``gloo``: a twin wrapped in plain ``DistributedDataParallel`` on the job's gloo group
      (DDP's own all-reduce: what raw DDP and ``grad_transport="gloo"`` do);
    * ``single``: rank 0 alone trains a plain copy on the global batch with all the job's
      threads while the other ranks wait in a barrier (asleep).

    Returns rank 0's seconds per step, per variant and block.
    """
    ctx = synctrain.get_context()
    world = ctx.world_size
    shm_model = synctrain.prepare_model(build_model(config["model"]))
    shm_opt = synctrain.prepare_optimizer(torch.optim.SGD(shm_model.parameters(), lr=0.01, momentum=0.9))
    twin = DistributedDataParallel(build_model(config["model"]), bucket_cap_mb=25.0)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.01, momentum=0.9)
    plain = build_model(config["model"])
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9)
    x, y = make_batch(config["model"], config["batch"])
    gx, gy = make_batch(config["model"], config["batch"] * world)
    threads = torch.get_num_threads()

    def single(steps: int) -> float:
        if ctx.rank != 0:
            return 0.0
        torch.set_num_threads(world)
        try:
            return timed_steps(plain, plain_opt, gx, gy, steps)
        finally:
            torch.set_num_threads(threads)

    variants = {"shm": lambda n: timed_steps(shm_model, shm_opt, x, y, n),
                "gloo": lambda n: timed_steps(twin, twin_opt, x, y, n), "single": single}
    names = list(variants)
    out: dict[str, list[float]] = {name: [] for name in names}
    for block in range(config["blocks"]):
        for name in names[block % len(names):] + names[:block % len(names)]:
            synctrain.barrier()
            out[name].append(variants[name](config["steps"]) / config["steps"])
    synctrain.barrier()
    return out


def measure_interleaved(args: argparse.Namespace, models: list[str]) -> tuple[dict[str, Any], list[list[Any]]]:
    data: dict[str, Any] = {}
    rows = []
    for model in models:
        cfg = {"model": model, "batch": args.batch, "steps": args.block_steps, "blocks": args.blocks}
        blocks = synctrain.Trainer(interleaved_loop, num_workers=args.workers, mode="sync", use_gpu=False,
                                   progress=False, step_log=False, grad_transport="shm",
                                   config=cfg).fit().outputs[0]
        global_batch = args.batch * args.workers
        rate = {name: global_batch / median(secs) for name, secs in blocks.items()}
        data[model] = {"samples_s": rate, "shm_vs_gloo": rate["shm"] / rate["gloo"],
                       "shm_vs_single": rate["shm"] / rate["single"], "block_s_per_step": blocks}
        rows.append([model, rate["shm"], rate["gloo"], rate["single"], rate["shm"] / rate["gloo"],
                     rate["shm"] / rate["single"], rate["gloo"] / rate["single"]])
        print(f"[{model} interleaved] " + ", ".join(f"{k}: {v:,.0f} samples/s" for k, v in rate.items()),
              flush=True)
    return data, rows


RUNNERS = {"shm": lambda w, c: run_synctrain(w, c, "shm"), "gloo": lambda w, c: run_synctrain(w, c, "gloo"),
           "raw_ddp": run_raw, "single": run_single}


def bandwidth_loop(config: dict[str, Any]) -> dict[str, Any]:
    world = synctrain.get_context().world_size
    transport = synctrain.strategy_metrics()["grad_transport"]
    out: dict[str, Any] = {"transport": transport}
    for label, nbytes in config["sizes"].items():
        t = torch.ones(nbytes // 4)
        calls = {"shm": lambda t=t: synctrain.all_reduce(t, op="sum"), "gloo": lambda t=t: dist.all_reduce(t)}
        seconds: dict[str, list[float]] = {name: [] for name in calls}
        for call in calls.values():
            call()  # warm-up
        iters = max(config["iters"], min(2000, config["iters"] * (16 << 20) // nbytes))  # small: more calls
        for _ in range(config["blocks"]):
            for name, call in calls.items():
                synctrain.barrier()
                started = time.perf_counter()
                for _ in range(iters):
                    call()
                seconds[name].append((time.perf_counter() - started) / iters)
        out[label] = {name: nbytes * 2 * (world - 1) / world / median(s) / 1e9 for name, s in seconds.items()}
    return out


def measure_models(args: argparse.Namespace, models: list[str]) -> tuple[dict[str, Any], list[list[Any]]]:
    data: dict[str, Any] = {}
    rows = []
    for model in models:
        cfg = {"model": model, "batch": args.batch, "steps": args.steps}
        rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
        variants = ("shm", "raw_ddp") if args.quick else VARIANTS  # the others: NaN
        for r in range(args.rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for name in order:
                secs = RUNNERS[name](args.workers, cfg)
                rates[name].append(args.steps * args.batch * args.workers / secs)
                print(f"[{model} round {r + 1}/{args.rounds}] {name}: {rates[name][-1]:,.0f} samples/s",
                      flush=True)
        med = {v: median(rates[v]) for v in VARIANTS}
        data[model] = {"samples_s": med, "ratio": med["shm"] / med["raw_ddp"],
                       "shm_vs_gloo": med["shm"] / med["gloo"], "gloo_vs_raw": med["gloo"] / med["raw_ddp"],
                       "shm_vs_single": med["shm"] / med["single"], "all_rounds": rates}
        rows.append([model, med["shm"], med["gloo"], med["raw_ddp"], med["single"], med["shm"] / med["raw_ddp"],
                     med["shm"] / med["gloo"], med["shm"] / med["single"]])
    return data, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--blocks", type=int, default=15, help="interleaved blocks per variant")
    p.add_argument("--block-steps", type=int, default=20, help="steps per interleaved block")
    p.add_argument("--quick", action="store_true", help="a fast smoke run (few steps, small tensors)")
    p.add_argument("--name", default="throughput", help="results file name (NAME.json, NAME.md)")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    if set(models) - set(MODELS):
        p.error(f"--models: choose from {','.join(MODELS)}")
    if args.quick:
        args.steps, args.rounds, args.blocks, args.block_steps = 5, 1, 2, 3
        models = [m for m in models if m != "digits"]
    sizes = {k: v for k, v in SIZES_BYTES.items() if not args.quick or v <= 1 << 20}
    init_ray(max(os.cpu_count() or 1, args.workers))
    load_start = os.getloadavg()
    data: dict[str, Any] = {"machine": machine(), "workers": args.workers, "batch_per_worker": args.batch,
                            "steps": args.steps, "rounds": args.rounds, "allreduce": {}}
    data["interleaved"], inter_rows = measure_interleaved(args, models)
    data["models"], rows = measure_models(args, models)
    bw = synctrain.Trainer(bandwidth_loop, num_workers=args.workers, use_gpu=False, progress=False,
                           step_log=False, grad_transport="shm",
                           config={"sizes": sizes, "blocks": 5 if not args.quick else 1,
                                   "iters": 5 if not args.quick else 2}).fit().outputs[0]
    bw_rows = []
    for label in sizes:
        s, g = bw[label]["shm"], bw[label]["gloo"]
        data["allreduce"][label] = {"shm_busbw_GBs": s, "gloo_busbw_GBs": g, "ratio": s / g}
        bw_rows.append([label, s, g, s / g])
    data["allreduce_transport"] = bw["transport"]
    data["machine"]["loadavg_start"] = [round(x, 2) for x in load_start]
    data["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    md = render(args, data, inter_rows, rows, bw_rows)
    out = write_results(args.name, data, md, args.out_dir)
    print(md)
    print(f"results in {out}")
    return 0


def render(args: argparse.Namespace, data: dict[str, Any], inter_rows: list[list[Any]], rows: list[list[Any]],
           bw_rows: list[list[Any]]) -> str:
    m = data["machine"]
    return (f"# Sync throughput: synctrain's transports vs raw DDP\n\n{args.workers} workers (CPU), "
            f"batch {args.batch}/worker. Command: `python benchmarks/throughput.py --workers {args.workers} "
            f"--steps {args.steps} --rounds {args.rounds} --blocks {args.blocks} --block-steps {args.block_steps}`"
            f"  ({m['when']}, {m['cpus']} CPUs, load average {m['loadavg_start'][0]:.1f} at the start, "
            f"{m['loadavg_end'][0]:.1f} at the end)\n\n"
            f"## Interleaved in one job (median of {args.blocks} blocks of {args.block_steps} steps each)\n\n"
            "`shm`: the prepared model, buckets through shared memory; `gloo`: a twin in plain DDP on the "
            "job's gloo group (raw DDP's all-reduce); `single`: one process, all the job's threads, the "
            "global batch.\n\n"
            + markdown_table(["model", "shm samples/s", "gloo DDP samples/s", "single process", "shm / gloo",
                              "shm / single", "gloo / single"], inter_rows)
            + f"\n## Whole runs ({args.steps} timed steps, median of {args.rounds} rotating rounds)\n\n"
              "Separate jobs: synctrain with each transport, raw DDP in Ray actors, one process with "
              f"{args.workers} threads.\n\n"
            + markdown_table(["model", "shm samples/s", "gloo samples/s", "raw DDP samples/s", "single process",
                              "shm / raw DDP", "shm / gloo", "shm / single"], rows)
            + "\n## All-reduce bus bandwidth (one job: synctrain.all_reduce on shared memory, "
              "dist.all_reduce on gloo)\n\n"
            + markdown_table(["tensor", "shm GB/s", "gloo GB/s", "shm / gloo"], bw_rows))


if __name__ == "__main__":
    sys.exit(main())
