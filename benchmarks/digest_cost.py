"""What the majority check of parameters costs: a digest against the training it checks.

    python benchmarks/digest_cost.py [--steps 40] [--device cpu|cuda] [--name digest_cost]

For each model (the digits MLP, the benchmarks' convnet, a 25M-parameter MLP, and on a GPU a
100M-parameter one), in one process: the best time (of many: other work on a shared machine
only ever adds to a time) of an optimizer step (batch 32, SGD
with momentum) and of the two parts of a digest (:mod:`synctrain.digest`): the copy of the
parameters to the CPU, which the training thread pays at the step's capture point, and the
SHA-256 hash, which the step log's writer thread pays (it releases the GIL). The cost is
reported per digest interval: ``digest_every`` steps (100, the default: every checkpoint)
against the time of that many steps. Results in ``benchmarks/results/<name>.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from _common import RESULTS_DIR, machine, markdown_table  # noqa: E402
from convergence import DigitsConvNet  # noqa: E402
from digits import DigitsNet  # noqa: E402

from synctrain.digest import replicated_state, state_digest  # noqa: E402

BATCH = 32
DEFAULT_INTERVAL = 100  # Trainer's checkpoint_every, hence digest_every's default
ROUNDS = 12


def models(device: str) -> list[tuple[str, nn.Module, int]]:
    """(name, model, input features): small to large."""
    out = [("digits MLP", DigitsNet(), 64), ("digits convnet", DigitsConvNet(), 64),
           ("MLP 25M", nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                                     nn.Linear(4096, 1024), nn.ReLU(), nn.Linear(1024, 10)), 1024)]
    if device == "cuda":
        out.append(("MLP 100M", nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(4096, 4096), nn.ReLU())],
                                              nn.Linear(4096, 10)), 4096))
    return out


def timed(fn: Any, repeat: int, device: str) -> list[float]:
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def measure(name: str, model: nn.Module, features: int, steps: int, device: str) -> dict[str, Any]:
    model = model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(BATCH, features, device=device)
    y = torch.randint(0, 10, (BATCH,), device=device)

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    timed(step, 3, device)  # warm-up
    copies: list[Any] = []

    def copy() -> None:  # one copy alive at a time, as at a capture point
        copies[:] = [replicated_state([model])]

    step_t, copy_t, hash_t = [], [], []
    for _ in range(ROUNDS):  # interleaved: each part gets its share of quiet moments
        step_t += timed(step, max(1, steps // ROUNDS), device)
        copy_t += timed(copy, 1, device)
        hash_t += timed(lambda: state_digest(copies[0]), 1, "cpu")
    step_s, copy_s, hash_s = min(step_t), min(copy_t), min(hash_t)
    interval_s = DEFAULT_INTERVAL * step_s
    params = sum(p.numel() for p in model.parameters())
    return {"model": name, "params": params, "mb": params * 4 / 2**20, "step_ms": step_s * 1e3,
            "copy_ms": copy_s * 1e3, "hash_ms": hash_s * 1e3,
            "loop_pct": 100 * copy_s / interval_s, "total_pct": 100 * (copy_s + hash_s) / interval_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="timed optimizer steps per model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--name", default="digest_cost")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [measure(name, model, features, args.steps, args.device)
            for name, model, features in models(args.device)]
    table = markdown_table(
        ["model", "parameters", "MB", "step ms", "copy ms (loop)", "hash ms (writer)",
         f"loop % of {DEFAULT_INTERVAL} steps", f"loop+writer % of {DEFAULT_INTERVAL} steps"],
        [[r["model"], r["params"], r["mb"], r["step_ms"], r["copy_ms"], r["hash_ms"], r["loop_pct"],
          r["total_pct"]] for r in rows])
    info = {**machine(), "device": args.device, "batch": BATCH, "interval_steps": DEFAULT_INTERVAL}
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"{args.name}.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    (RESULTS_DIR / f"{args.name}.md").write_text(
        f"# Digest cost ({args.device})\n\n{json.dumps(info)}\n\n{table}")
    print(table)


if __name__ == "__main__":
    main()
