"""The digits task shared by the examples and benchmarks: data, model, loop and command line.

    python examples/digits.py [--mode sync|async|local] [--workers 2] [--epochs 15]
                              [--kill-worker-at STEP [--kill-rank 1]] [--staleness S] [--shards N]

scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download). The loop is an
ordinary PyTorch loop with the four synctrain helpers; it runs unchanged in one plain
process (``--mode local``), under ``mode="sync"`` or under ``mode="async"``.

``--kill-worker-at STEP`` lets you watch a recovery: rank 1 (``--kill-rank``) kills its own
process with SIGKILL right after its optimizer step STEP of the job's first generation (it
prints ``INJECT`` first, and a replacement never repeats it). The job goes on — sync: the
survivor hands its state to a new worker; async: the survivor never stops — and the script
prints each failure and the generation that followed. ``digits_sync.py`` and
``digits_async.py`` are this command line with the mode set.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import synctrain


def load_digits_split(test_fraction: float = 0.2, seed: int = 0):
    """(train_x, train_y, test_x, test_y) as tensors; pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


class DigitsNet(nn.Module):
    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                 nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(dim=1) == y).float().mean().item()
    model.train()
    return acc


def inject_fault(config: dict[str, Any], step: int) -> None:
    """SIGKILL this process after optimizer step ``kill_worker_at`` when this is rank
    ``kill_rank`` of the first generation (a replacement, generation 2 on, never repeats it)."""
    ctx = synctrain.get_context()
    if config.get("kill_worker_at") != step or ctx.generation != 1 or ctx.rank != config.get("kill_rank", 1):
        return
    print(f"INJECT: rank {ctx.rank} (pid {os.getpid()}) kills itself with SIGKILL after step {step} "
          f"of generation {ctx.generation}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Config: lr, epochs, batch_size, optimizer ("sgd"|"adam"), slow_rank/slow_s (a straggler),
    kill_worker_at/kill_rank (a fault, see :func:`inject_fault`)."""
    ctx = synctrain.get_context()
    train_x, train_y, test_x, test_y = load_digits_split()
    torch.manual_seed(config.get("model_seed", 0))
    model = synctrain.prepare_model(DigitsNet(config.get("hidden", 128)))
    if config.get("optimizer", "sgd") == "adam":
        base: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=config.get("lr", 1e-3))
    else:
        base = torch.optim.SGD(model.parameters(), lr=config.get("lr", 0.1), momentum=0.9)
    opt = synctrain.prepare_optimizer(base)
    loader = synctrain.prepare_data_loader(
        DataLoader(TensorDataset(train_x, train_y), batch_size=config.get("batch_size", 32), shuffle=True))
    slow = config.get("slow_rank") == ctx.rank
    samples, started = 0, time.monotonic()
    step = ctx.start_step  # optimizer steps done (> 0 when this run continues a recovered job)
    for epoch in range(config.get("epochs", 10)):
        loss_sum, batches = 0.0, 0  # the epoch's mean loss (a resumed run replays finished
        for x, y in loader:          # epochs as empty ones: nothing read from a batch after it)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            step += 1
            inject_fault(config, step)
            if slow:
                time.sleep(config.get("slow_s", 0.0))
            samples += len(x) * ctx.world_size
            loss_sum, batches = loss_sum + loss.item(), batches + 1
        acc = evaluate(model, test_x.to(ctx.device), test_y.to(ctx.device))
        synctrain.report({"epoch": epoch, "loss": loss_sum / max(1, batches), "test_acc": acc,
                          "samples": samples, "wall_s": time.monotonic() - started})
    return {"test_acc": evaluate(model, test_x.to(ctx.device), test_y.to(ctx.device)), "rank": ctx.rank}


# ---------------------------------------------------------------------------- command line
TARGET_ACC = {"sync": 0.95, "async": 0.93, "local": 0.95}  # main() exits 1 below it


def staleness_arg(text: str) -> int | None:
    return None if text.lower() in ("none", "inf", "async") else int(text)


def parse_args(argv: list[str] | None = None, mode: str = "sync", doc: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(doc or __doc__).splitlines()[0])
    parser.add_argument("--mode", choices=("sync", "async", "local"), default=mode,
                        help="local: this process only, no Ray")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--staleness", type=staleness_arg, default=None, help="async: none, or an integer >= 0")
    parser.add_argument("--shards", type=int, default=2, help="async: parameter-server shards")
    parser.add_argument("--kill-worker-at", type=int, default=None, metavar="STEP",
                        help="rank --kill-rank SIGKILLs itself after this optimizer step (first generation)")
    parser.add_argument("--kill-rank", type=int, default=1)
    parser.add_argument("--max-failures", type=int, default=3)
    parser.add_argument("--job-name", default=None, help="default: a fresh name")
    args = parser.parse_args(argv)
    if args.kill_worker_at is not None and not (args.mode != "local" and 0 <= args.kill_rank < args.workers):
        parser.error(f"--kill-worker-at needs --mode sync or async and --kill-rank below --workers "
                     f"({args.workers}); got --mode {args.mode} --kill-rank {args.kill_rank}")
    return args


def run(args: argparse.Namespace) -> synctrain.Result:
    """Train on Ray workers as ``args`` say; print the accuracy, the failures and recoveries."""
    config = {"lr": args.lr, "epochs": args.epochs, "batch_size": 32,
              "kill_worker_at": args.kill_worker_at, "kill_rank": args.kill_rank}
    options: dict[str, Any] = {"staleness": args.staleness, "num_ps_shards": args.shards} \
        if args.mode == "async" else {}
    result = synctrain.Trainer(train_loop, num_workers=args.workers, mode=args.mode, use_gpu="auto",
                               config=config, job_name=args.job_name, max_failures=args.max_failures,
                               **options).fit()
    acc = result.outputs[0]["test_acc"]
    extra = f" (staleness={args.staleness}, {args.shards} shards)" if args.mode == "async" else ""
    print(f"{args.mode}{extra}, {args.workers} workers, {args.epochs} epochs: test accuracy {acc:.3f} "
          f"({result.elapsed_s:.1f} s)")
    for m in result.metrics[-3:]:
        print(f"  epoch {m['epoch']:2d}  step {m['step']:4d}  loss {m['loss']:.4f}  test_acc {m['test_acc']:.3f}")
    for f in result.failures:
        print(f"  failure: rank {f['rank']} {f['kind']} at step {f['step']} of generation {f['generation']}; "
              f"recovery: {f['recovery']}")
    if len(result.generations) > 1:
        for g in result.generations[1:]:
            print(f"  generation {g['generation']} from step {g['start_step']}: {g['reason']}")
        print(f"  {len(result.failures)} failure(s) survived, {result.redone_steps} step(s) redone")
    if args.mode == "async":
        print_ps_counters(result)
    return result


def print_ps_counters(result: synctrain.Result) -> None:
    info = result.strategy_info
    print(f"  parameter server: {info['pushes_received']} pushes received, {info['updates_applied']} "
          f"updates applied, {info['pushes_per_s']:.0f} pushes/s per shard")
    for rank, m in enumerate(result.worker_metrics):
        if m:
            print(f"  rank {rank}: staleness histogram {m['staleness_hist']}, push {m['push_latency_ms_p50']:.1f} "
                  f"ms p50 / {m['push_latency_ms_p99']:.1f} ms p99, staleness wait {m['pull_wait_ms_mean']:.1f} ms mean")


def main(argv: list[str] | None = None, mode: str = "sync", doc: str | None = None) -> int:
    """The command line; exit status 1 when the test accuracy misses the mode's target."""
    args = parse_args(argv, mode, doc)
    if args.mode == "local":  # one plain process, no Ray: the helpers are no-ops
        acc = train_loop({"lr": args.lr, "epochs": args.epochs, "batch_size": 32})["test_acc"]
        print(f"single process, {args.epochs} epochs: test accuracy {acc:.3f}")
    else:
        acc = run(args).outputs[0]["test_acc"]
    return 0 if acc >= TARGET_ACC[args.mode] else 1


if __name__ == "__main__":
    import sys

    sys.exit(main())
