"""Sync-mode throughput: synctrain vs raw PyTorch DDP in Ray actors, side by side in one run.

    python benchmarks/throughput.py [--workers 2] [--steps 60] [--rounds 3] [--quick]

For a small MLP and a small convnet, the same model, world size, per-worker batch and
synthetic data are trained (a) by ``synctrain.Trainer(mode="sync")`` and (b) by hand-written
Ray actors that call ``init_process_group`` and wrap the model in ``DistributedDataParallel``.
Runs alternate (A, B, A, B, ...) so drift in the machine's load hits both; each run times its
steady-state steps inside the workers (after warm-up), and the median over rounds is reported.

Then, inside one synctrain job, all-reduce bus bandwidth of ``synctrain.all_reduce`` against
raw ``torch.distributed.all_reduce`` on 1, 16 and 64 MB float32 tensors, blocks alternating.
Bus bandwidth = bytes * 2 (n-1) / n / time (the NCCL-tests convention).

Writes benchmarks/results/throughput.{json,md}. Targets: samples/s ratio >= 0.95, bus
bandwidth ratio >= 0.9.
"""

from __future__ import annotations

import argparse
import datetime
import os
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


def build_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "mlp":
        return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                             nn.Linear(512, 10))
    return nn.Sequential(  # a small CIFAR-sized convnet
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10))


def make_batch(name: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shape = (784,) if name == "mlp" else (3, 32, 32)
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
        from synctrain.worker import _free_port

        ip = ray.util.get_node_ip_address()
        return ip, _free_port(ip)

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


def run_synctrain(workers: int, config: dict[str, Any]) -> float:
    result = synctrain.Trainer(synctrain_loop, num_workers=workers, mode="sync", use_gpu=False,
                               progress=False, config=config).fit()
    return max(result.outputs)


def bandwidth_loop(config: dict[str, Any]) -> dict[str, Any]:
    world = synctrain.get_context().world_size
    out = {}
    for mb in config["sizes_mb"]:
        t = torch.ones(mb * (1 << 20) // 4)
        calls = {"synctrain": lambda t=t: synctrain.all_reduce(t, op="sum"),
                 "raw": lambda t=t: dist.all_reduce(t)}
        seconds: dict[str, list[float]] = {"synctrain": [], "raw": []}
        for _ in range(2):
            calls["raw"]()  # warm-up
        iters = max(config["iters"], config["iters"] * 16 // mb)  # small tensors: more calls
        for _ in range(config["blocks"]):
            for name, call in calls.items():
                synctrain.barrier()
                started = time.perf_counter()
                for _ in range(iters):
                    call()
                seconds[name].append((time.perf_counter() - started) / iters)
        nbytes = t.numel() * 4
        out[mb] = {name: nbytes * 2 * (world - 1) / world / median(s) / 1e9 for name, s in seconds.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="a fast smoke run (few steps, small tensors)")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.rounds = 5, 1
    sizes = [1] if args.quick else [1, 16, 64]
    init_ray(max(os.cpu_count() or 1, args.workers))

    rows, data = [], {"machine": machine(), "workers": args.workers, "batch_per_worker": args.batch,
                      "steps": args.steps, "rounds": args.rounds, "models": {}, "allreduce": {}}
    for model in ("mlp", "convnet"):
        cfg = {"model": model, "batch": args.batch, "steps": args.steps}
        rates: dict[str, list[float]] = {"synctrain": [], "raw_ddp": []}
        for r in range(args.rounds):
            for name, fn in (("synctrain", run_synctrain), ("raw_ddp", run_raw)):
                secs = fn(args.workers, cfg)
                rates[name].append(args.steps * args.batch * args.workers / secs)
                print(f"[{model} round {r + 1}/{args.rounds}] {name}: {rates[name][-1]:,.0f} samples/s",
                      flush=True)
        s, b = median(rates["synctrain"]), median(rates["raw_ddp"])
        data["models"][model] = {"synctrain_samples_s": s, "raw_ddp_samples_s": b, "ratio": s / b,
                                 "all_rounds": rates}
        rows.append([model, s, b, s / b])

    bw = synctrain.Trainer(bandwidth_loop, num_workers=args.workers, use_gpu=False, progress=False,
                           config={"sizes_mb": sizes, "blocks": 5 if not args.quick else 1,
                                   "iters": 5 if not args.quick else 2}).fit().outputs[0]
    bw_rows = []
    for mb in sizes:
        s, r = bw[mb]["synctrain"], bw[mb]["raw"]
        data["allreduce"][f"{mb}MB"] = {"synctrain_busbw_GBs": s, "raw_busbw_GBs": r, "ratio": s / r}
        bw_rows.append([f"{mb} MB", s, r, s / r])

    md = (f"# Sync throughput: synctrain vs raw DDP in Ray actors\n\n{args.workers} workers (gloo, CPU), "
          f"batch {args.batch}/worker, {args.steps} timed steps, median of {args.rounds} alternating rounds.\n"
          f"Command: `python benchmarks/throughput.py`  ({data['machine']['when']}, "
          f"{data['machine']['cpus']} CPUs)\n\n"
          + markdown_table(["model", "synctrain samples/s", "raw DDP samples/s", "ratio"], rows)
          + "\n## All-reduce bus bandwidth\n\n"
          + markdown_table(["tensor", "synctrain.all_reduce GB/s", "dist.all_reduce GB/s", "ratio"], bw_rows))
    out = write_results("throughput", data, md, args.out_dir)
    print(md)
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
