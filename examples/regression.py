"""Tabular regression with an LR scheduler and gradient clipping, checkpointed with the job.

    python examples/regression.py [--mode sync|async|local] [--workers 2] [--epochs 30] ...

The data is scikit-learn's Friedman #1 problem (``make_friedman1``: 10 features, 5 of them
used by a nonlinear target, plus noise), generated with a fixed seed — nothing to download.
A small MLP learns it with SGD + momentum under a one-cycle learning-rate schedule, and the
gradient's norm is clipped before every step. Two things a real loop needs, shown here:

* the scheduler is registered with ``synctrain.register_state``, so a checkpoint holds its
  state and a recovered job goes on with the learning rate it had (without it, a restarted
  loop would start the schedule over);
* ``clip_grad_norm_`` goes between ``loss.backward()`` and ``opt.step()``. In sync mode the
  gradients are averaged over the ranks during ``backward()``, so every rank clips the same
  averaged gradient; in async mode each rank clips its own before pushing it.

Measured on the 2-core development machine (shared, load average 20-30) with the defaults
(2 workers, 30 epochs, 960 steps): test R² 0.982 (MSE 0.020 of the standardised target) in
sync mode in 87 s, 0.981 in async mode (staleness 2) in 122 s; the noise alone allows at most
R² ≈ 0.99. The exit status is 1 below R² 0.9.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import synctrain

TARGET_R2 = 0.9  # main() exits 1 below it


def load_friedman(samples: int = 5000, test_fraction: float = 0.2, seed: int = 0):
    """(train_x, train_y, test_x, test_y), features and target standardised with the
    training split's mean and deviation."""
    from sklearn.datasets import make_friedman1

    x_np, y_np = make_friedman1(n_samples=samples, n_features=10, noise=0.5, random_state=seed)
    x = torch.tensor(x_np, dtype=torch.float32)
    y = torch.tensor(y_np, dtype=torch.float32)[:, None]
    n_test = int(samples * test_fraction)
    tx, ty, vx, vy = x[n_test:], y[n_test:], x[:n_test], y[:n_test]
    x_mean, x_std, y_mean, y_std = tx.mean(0), tx.std(0), ty.mean(), ty.std()
    return (tx - x_mean) / x_std, (ty - y_mean) / y_std, (vx - x_mean) / x_std, (vy - y_mean) / y_std


def evaluate(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(MSE, R²) on (x, y), through the bare model (what ``model.module`` is in sync mode)."""
    net.eval()
    with torch.no_grad():
        mse = F.mse_loss(net(x), y).item()
    net.train()
    return mse, 1.0 - mse / y.var(unbiased=False).item()


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Config: see ``DEFAULTS``."""
    config = {**DEFAULTS, **config}
    ctx = synctrain.get_context()
    tx, ty, vx, vy = load_friedman()
    vx, vy = vx.to(ctx.device), vy.to(ctx.device)
    torch.manual_seed(config["seed"])
    hidden = config["hidden"]
    net = nn.Sequential(nn.Linear(10, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                        nn.Linear(hidden, 1))
    model = synctrain.prepare_model(net)  # sync: a DDP wrapper around net; async, local: net
    opt = synctrain.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9,
                                                      weight_decay=1e-4))
    loader = synctrain.prepare_data_loader(
        DataLoader(TensorDataset(tx, ty), batch_size=config["batch_size"], shuffle=True))
    epochs = config["epochs"]
    total_steps = epochs * len(loader)  # len: this rank's batches per epoch, one step each
    sched = synctrain.register_state("lr_scheduler", torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=config["lr"], total_steps=total_steps, cycle_momentum=False))
    synctrain.report({"total_steps": total_steps})
    started = time.monotonic()
    for epoch in range(epochs):
        loss_sum, norm_sum, batches = 0.0, 0.0, 0  # running values: a resumed epoch may be empty
        for x, y in loader:
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config["clip"])  # before step()
            opt.step()
            sched.step()  # after opt.step(): a checkpoint taken at the next step includes it
            loss_sum, norm_sum, batches = loss_sum + loss.item(), norm_sum + norm.item(), batches + 1
        mse, r2 = evaluate(net, vx, vy)
        synctrain.report({"epoch": epoch, "loss": loss_sum / max(1, batches), "test_mse": mse, "test_r2": r2,
                          "grad_norm": norm_sum / max(1, batches), "lr": sched.get_last_lr()[0],
                          "wall_s": time.monotonic() - started})
    mse, r2 = evaluate(net, vx, vy)
    return {"test_mse": mse, "test_r2": r2, "rank": ctx.rank}


DEFAULTS: dict[str, Any] = {"epochs": 30, "batch_size": 64, "lr": 0.05, "hidden": 64, "clip": 1.0, "seed": 0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("sync", "async", "local"), default="sync",
                        help="local: this process only, no Ray")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--staleness", type=int, default=2, help="async mode's bound")
    parser.add_argument("--job-name", default=None, help="default: a fresh name")
    parser.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    for key, value in DEFAULTS.items():
        parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train as the command line says and print the test figures. Returns rank 0's output
    and the Trainer's Result (None in local mode)."""
    args = parse_args(argv)
    config = {key: getattr(args, key) for key in DEFAULTS}
    started = time.monotonic()
    result = None
    if args.mode == "local":
        out = train_loop(config)
    else:
        options: dict[str, Any] = {"staleness": args.staleness} if args.mode == "async" else {}
        result = synctrain.Trainer(train_loop, num_workers=args.workers, mode=args.mode, use_gpu="auto",
                                   config=config, job_name=args.job_name, seed=args.seed,
                                   checkpoint_every=args.checkpoint_every, **options).fit()
        out = result.outputs[0]
        for m in result.metrics[-3:]:
            print(f"  epoch {m['epoch']:3d}  step {m['step']:5d}  loss {m['loss']:.4f}  test R² {m['test_r2']:.3f}  "
                  f"lr {m['lr']:.4f}  grad norm {m['grad_norm']:.2f}")
    print(f"{args.mode}, {args.epochs} epochs: test MSE {out['test_mse']:.4f}, R² {out['test_r2']:.3f} "
          f"({time.monotonic() - started:.0f} s)")
    return {"output": out, "result": result}


if __name__ == "__main__":
    sys.exit(0 if main()["output"]["test_r2"] >= TARGET_R2 else 1)
