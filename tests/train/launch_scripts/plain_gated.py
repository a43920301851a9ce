"""A plain single-process training script (no Trainer) for the multi-node launch test.

    synctrain run --workers 3 --mode async plain_gated.py --dir DIR

Each rank writes where it runs (``start-g{generation}-r{rank}.json``: its Ray node); in the
first generation every rank stops after step ``--gate-step`` (telling the driver it is alive)
until ``DIR/go`` exists, so the test can change the cluster at a known point; each step takes
at least ``--step-sleep-s``. Every rank records, per step, the sample ids it trained on.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import ray
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import synctrain

SAMPLES = 240
GATE_WAIT_S = 200.0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--gate-step", type=int, default=10)
    parser.add_argument("--step-sleep-s", type=float, default=0.05)
    args = parser.parse_args()
    out = pathlib.Path(args.dir)
    ctx = synctrain.get_context()
    (out / f"start-g{ctx.generation}-r{ctx.rank}.json").write_text(json.dumps(
        {"node": ray.get_runtime_context().get_node_id(), "world": ctx.world_size}))
    torch.manual_seed(0)
    model = synctrain.prepare_model(nn.Linear(1, 1))
    opt = synctrain.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=0.01))
    loader = synctrain.prepare_data_loader(
        DataLoader(TensorDataset(torch.arange(SAMPLES)), batch_size=4, shuffle=True))
    step = ctx.start_step
    with open(out / f"ids-g{ctx.generation}-r{ctx.rank}.jsonl", "a") as ids_file:
        for _ in range(args.epochs):
            for (ids,) in loader:
                ids_file.write(json.dumps({"rank": ctx.rank, "step": step + 1, "ids": ids.tolist()}) + "\n")
                ids_file.flush()
                opt.zero_grad()
                model(ids.float().unsqueeze(1) / SAMPLES).pow(2).mean().backward()
                opt.step()
                step += 1
                time.sleep(args.step_sleep_s)
                if ctx.generation == 1 and step == args.gate_step:
                    (out / f"at-gate-r{ctx.rank}").write_text("")
                    deadline = time.monotonic() + GATE_WAIT_S
                    while not (out / "go").exists() and time.monotonic() < deadline:
                        synctrain.heartbeat()
                        time.sleep(0.05)
    print(f"rank {ctx.rank} of {ctx.world_size} done at step {step}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
