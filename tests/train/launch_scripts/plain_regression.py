"""A plain single-process training script, as a user writes one: no Trainer, no train_loop.

    python plain_regression.py --out params.json            # one process
    synctrain run --workers 2 --set lr=0.05 plain_regression.py --out params.json

It reads its settings from ``synctrain.get_context().config`` (``--config``/``--set``) with
its own flags as defaults, and rank 0 writes the trained parameters to ``--out``.
``--raise-on-rank R --at-step S``: that rank raises there (a failing job);
``--step-sleep-s T``: each step takes at least T seconds (a job slow enough to watch).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import synctrain


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(96, 1, generator=g)
    return TensorDataset(x, y)


def train(epochs: int, lr: float, raise_on_rank: int | None = None, at_step: int = 0,
          step_sleep_s: float = 0.0) -> dict:
    ctx = synctrain.get_context()
    torch.manual_seed(ctx.seed)
    model = synctrain.prepare_model(nn.Linear(4, 1))
    opt = synctrain.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=lr))
    loader = synctrain.prepare_data_loader(DataLoader(dataset(), batch_size=8, shuffle=True))
    synctrain.report({"total_steps": epochs * len(loader)})
    step = 0
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            step += 1
            synctrain.report({"loss": loss.item()})
            time.sleep(step_sleep_s)
            if ctx.rank == raise_on_rank and step == at_step:
                print(f"rank {ctx.rank} is about to fail at step {step}", file=sys.stderr)
                raise RuntimeError(f"failing on purpose on rank {ctx.rank} at step {step}")
    module = getattr(model, "module", model)
    return {k: v.detach().cpu().flatten().tolist() for k, v in module.state_dict().items()}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--raise-on-rank", type=int)
    parser.add_argument("--at-step", type=int, default=0)
    parser.add_argument("--step-sleep-s", type=float, default=0.0)
    args = parser.parse_args()
    config = synctrain.get_context().config
    params = train(int(config.get("epochs", args.epochs)), float(config.get("lr", args.lr)),
                   args.raise_on_rank, args.at_step, args.step_sleep_s)
    ctx = synctrain.get_context()
    print(f"rank {ctx.rank} of {ctx.world_size} done: mode {ctx.mode}, config {json.dumps(config)}")
    if ctx.rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump({"params": params, "config": config, "argv": sys.argv[1:]}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())  # sys.exit(0) counts as finished
