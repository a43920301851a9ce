"""Convergence on digits: single process vs sync vs async (staleness 0, 2, 8, None).

    python benchmarks/convergence.py [--epochs 12] [--quick] [--out DIR] [--model mlp|conv]
        [--straggler own-step|compute] [--optimizer sgd|adam] [--repeats N] [--num-cpus N]

Every distributed run has 2 workers with batch 32 (global batch 64), SGD with momentum 0.9
and lr 0.05 (``--optimizer adam``: Adam, lr 0.002); the single process uses batch 64 and the
same optimizer (the computation sync mode distributes). Async uses the default ``update_rule="mean"``: each push moves the
parameters by half its gradient, so a sample moves the model as much as in sync mode and the
comparison is about consistency, not about a larger step size.

Each distributed configuration runs twice: without and with a straggler. The straggler is
rank 1 sleeping after each step for as long as that configuration's median step took without
a straggler, so it runs about 2x slower than its peer in the same mode (``--straggler
compute``: it sleeps one worker-batch of compute, the same in every mode). ``--repeats N``
runs every configuration N times and keeps the median run. Rank 0 evaluates the
test accuracy of the parameters it holds every few steps and records the wall time since its
loop started and the samples those parameters have seen (sync: steps x 64; async: pushes the
shards had applied, x 32).

Writes benchmarks/results/convergence.{json,md,png}: accuracy against wall time and against
samples seen, and a table with time-to-95%-accuracy (with --quick: a few steps, into a temp
directory unless --out is given).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

import ray
import torch
import torch.nn.functional as F
from _common import init_ray
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

from digits import DigitsNet, evaluate, load_digits_split  # noqa: E402

import synctrain  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TARGET_ACC = 0.95
BATCH = 32
LR = 0.05  # SGD, momentum 0.9
ADAM_LR = 0.002


class DigitsConvNet(torch.nn.Module):
    """A compute-heavy, parameter-light convnet for the 8x8 digits (``--model conv``).

    About 48k parameters (190 KB of gradient) but ~30x the FLOPs of the MLP per sample, so a
    step's compute outweighs its communication, as in most real training.
    """

    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        c = channels
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(1, c, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(c * 16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.view(-1, 1, 8, 8))


def build_model(name: str, channels: int = 64) -> torch.nn.Module:
    return DigitsConvNet(channels) if name == "conv" else DigitsNet()


def bench_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Train digits; rank 0 records (wall_s, samples, test_acc) every ``eval_every`` steps."""
    ctx = synctrain.get_context()
    train_x, train_y, test_x, test_y = load_digits_split()
    torch.manual_seed(0)
    model = synctrain.prepare_model(build_model(config.get("model", "mlp"), config.get("channels", 64)))
    if config.get("optimizer", "sgd") == "adam":
        opt = synctrain.prepare_optimizer(torch.optim.Adam(model.parameters(), lr=ADAM_LR))
    else:
        opt = synctrain.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9))
    batch = config["batch"]
    loader = synctrain.prepare_data_loader(
        DataLoader(TensorDataset(train_x, train_y), batch_size=batch, shuffle=True))
    slow_s = config["slow_s"] if config.get("slow_rank") == ctx.rank else 0.0
    curve: list[tuple[float, int, float]] = []
    step_s: list[float] = []
    started = time.monotonic()
    steps = 0
    for _ in range(config["epochs"]):
        for x, y in loader:
            t0 = time.monotonic()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            step_s.append(time.monotonic() - t0)
            if slow_s:
                time.sleep(slow_s)  # the straggler
            steps += 1
            if ctx.rank == 0 and steps % config["eval_every"] == 0:
                curve.append((time.monotonic() - started, _samples(ctx, steps, batch),
                              evaluate(model, test_x, test_y)))
    if ctx.rank == 0:
        curve.append((time.monotonic() - started, _samples(ctx, steps, batch), evaluate(model, test_x, test_y)))
    return {"curve": curve, "median_step_s": statistics.median(step_s), "steps": steps}


def _samples(ctx: synctrain.TrainContext, steps: int, batch: int) -> int:
    """Samples the parameters held now have seen (all workers together)."""
    if ctx.mode == "async":
        return int(synctrain.strategy_metrics()["server_pushes_applied"]) * batch
    return steps * batch * ctx.world_size


def run(name: str, mode: str | None, config: dict[str, Any], **options: Any) -> dict[str, Any]:
    print(f"-- {name}", flush=True)
    if mode is None:  # one plain process: the helpers are no-ops; one thread, like a worker
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            out = bench_loop(config)
        finally:
            torch.set_num_threads(threads)
        elapsed = out["curve"][-1][0]
        outputs, info = [out], {}
    else:
        # step_log=False: this compares the consistency modes; the step log's own cost is
        # benchmarks/steplog_overhead.py's subject
        result = synctrain.Trainer(bench_loop, num_workers=2, mode=mode, use_gpu=False, progress=False,
                                   config=config, step_log=False, **options).fit()
        outputs, info, elapsed = result.outputs, result.strategy_info, result.elapsed_s
    curve = outputs[0]["curve"]
    hit = next(((t, n) for t, n, acc in curve if acc >= TARGET_ACC), (None, None))
    return {"name": name, "mode": mode or "single", "options": options,
            "straggler": bool(config.get("slow_rank") is not None), "slow_s": config.get("slow_s", 0.0),
            "curve": curve, "final_acc": curve[-1][2], "time_to_95_s": hit[0], "samples_to_95": hit[1],
            "median_step_s": [o["median_step_s"] for o in outputs], "steps": [o["steps"] for o in outputs],
            "fit_s": elapsed, "pushes": info.get("pushes_received")}


def configurations(quick: bool, only: str | None = None) -> list[tuple[str, str, dict[str, Any]]]:
    """sync, async with staleness 0, 2, 8, None, and the pipelined variants of 2 and None
    (the push's reply collected at the next step, overlapping the shard with compute)."""
    runs = [("sync", "sync", {})]
    for s in ((2,) if quick else (0, 2, 8, None)):
        runs.append((f"async s={s}", "async", {"staleness": s}))
    for s in (() if quick else (2, None)):
        runs.append((f"async s={s} pipelined", "async", {"staleness": s, "pipeline": True}))
    if only:
        wanted = [w.strip() for w in only.split(",")]
        names = [r[0] for r in runs]
        unknown = [w for w in wanted if w not in names]
        if unknown or "sync" not in wanted:
            raise SystemExit(f"--only: {', '.join(unknown) or 'sync missing'}; choose from {', '.join(names)} "
                             "(sync is needed: every ratio is against it)")
        runs = [r for r in runs if r[0] in wanted]
    return runs


def run_all(epochs: int, eval_every: int, quick: bool, model: str = "mlp",
            straggler: str = "own-step", optimizer: str = "sgd", repeats: int = 1,
            only: str | None = None, channels: int = 64) -> list[dict[str, Any]]:
    base = {"epochs": epochs, "eval_every": eval_every, "batch": BATCH, "model": model, "optimizer": optimizer,
            "channels": channels}
    rows = [run("single process", None, {**base, "batch": 2 * BATCH})]
    # "compute": the straggler's machine computes 2x slower: it sleeps one worker-batch of
    # compute (half the single process's step), the same in every mode.
    compute_s = rows[0]["median_step_s"][0] / 2
    for name, mode, options in configurations(quick, only):
        plain = repeated(repeats, name, mode, base, **options)
        slow_s = compute_s if straggler == "compute" else max(plain["median_step_s"])
        strag = repeated(repeats, f"{name} + straggler", mode, {**base, "slow_rank": 1, "slow_s": slow_s},
                         **options)
        rows += [plain, strag]
    return rows


def repeated(repeats: int, name: str, mode: str | None, config: dict[str, Any], **options: Any) -> dict[str, Any]:
    """``run`` ``repeats`` times; the row of the run with the median time to 95% (a run that
    never got there counts as slowest), with every run's time listed in ``times_to_95_s``."""
    runs = [run(name, mode, config, **options) for _ in range(repeats)]
    runs.sort(key=lambda r: float("inf") if r["time_to_95_s"] is None else r["time_to_95_s"])
    row = runs[(len(runs) - 1) // 2]
    row["times_to_95_s"] = [r["time_to_95_s"] for r in runs]
    return row


def write(rows: list[dict[str, Any]], out_dir: str, args: argparse.Namespace) -> None:
    os.makedirs(out_dir, exist_ok=True)
    meta = {"repeats": args.repeats, "model": args.model, "channels": args.channels, "straggler": args.straggler, "optimizer": args.optimizer, "epochs_per_worker": args.epochs, "eval_every": args.eval_every, "batch_per_worker": BATCH,
            "lr": ADAM_LR if args.optimizer == "adam" else LR, "target_acc": TARGET_ACC, "cpus": os.cpu_count(), "machine": platform.platform(),
            "torch": torch.__version__, "ray": ray.__version__, "load_avg_1m": os.getloadavg()[0],
            "command": " ".join(sys.argv)}
    with open(os.path.join(out_dir, f"{args.name}.json"), "w") as f:
        json.dump({"meta": meta, "runs": rows}, f, indent=2)
    sync_strag = next(r for r in rows if r["name"] == "sync + straggler")["time_to_95_s"]
    opt = f"SGD momentum 0.9, lr {LR}" if args.optimizer == "sgd" else f"Adam, lr {ADAM_LR}"
    model = f"conv, {args.channels} channels" if args.model == "conv" else args.model
    lines = [f"# Convergence on digits ({model}, {args.optimizer}, straggler sleeps: {args.straggler})", "",
             f"2 workers x batch {BATCH} (single process: batch {2 * BATCH}), {opt}, "
             f"{args.epochs} epochs per worker, rank 0 evaluates every {args.eval_every} steps"
             + (f"; each configuration ran {args.repeats} times, the row is the median run (all "
                "runs' times in brackets). " if args.repeats > 1 else ". ") +
             f"{meta['cpus']} CPUs (shared), load average {meta['load_avg_1m']:.1f} at the end. "
             f"Command: `{meta['command']}`.", "",
             "| run | straggler sleep ms | time to 95% (s) | vs sync+straggler | samples to 95% | "
             "final acc | median step ms (r0, r1) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        t = r["time_to_95_s"]
        ratio = f"{t / sync_strag:.2f}x" if t is not None and sync_strag and r["straggler"] else ""
        steps_ms = ", ".join(f"{1e3 * s:.1f}" for s in r["median_step_s"])
        every = r.get("times_to_95_s") or []
        runs = " (" + " / ".join("-" if x is None else f"{x:.2f}" for x in every) + ")" if len(every) > 1 else ""
        lines.append(f"| {r['name']} | {1e3 * r['slow_s']:.1f} | {'-' if t is None else f'{t:.2f}'}{runs} | {ratio} | "
                     f"{'-' if r['samples_to_95'] is None else r['samples_to_95']} | {r['final_acc']:.3f} | "
                     f"{steps_ms} |")
    with open(os.path.join(out_dir, f"{args.name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, os.path.join(out_dir, f"{args.name}.png"))


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9), sharey=True)
    for col, straggler in enumerate((False, True)):
        for r in rows:
            if r["straggler"] != straggler and r["mode"] != "single":
                continue
            t, n, acc = zip(*r["curve"], strict=True)
            style = "--" if r["mode"] == "single" else "-"
            axes[0][col].plot(t, acc, style, label=r["name"])
            axes[1][col].plot(n, acc, style, label=r["name"])
        title = "with a straggler (rank 1 ~2x slower)" if straggler else "no straggler"
        axes[0][col].set(title=title, xlabel="wall time (s)", ylabel="test accuracy")
        axes[1][col].set(xlabel="samples seen by the evaluated parameters", ylabel="test accuracy")
        for ax in (axes[0][col], axes[1][col]):
            ax.axhline(TARGET_ACC, color="grey", lw=0.8, ls=":")
            ax.set_ylim(0.5, 1.0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("digits, 2 workers: sync vs async (staleness 0, 2, 8, None)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 epoch, sync and s=2 only")
    parser.add_argument("--out", default=None)
    parser.add_argument("--model", choices=("mlp", "conv"), default="mlp",
                        help="mlp: examples/digits.py's MLP; conv: a compute-heavy convnet")
    parser.add_argument("--straggler", choices=("own-step", "compute"), default="own-step",
                        help="own-step: sleep that mode's own median step; compute: sleep one "
                             "worker-batch of compute (the same in every mode)")
    parser.add_argument("--channels", type=int, default=64,
                        help="--model conv: channels per conv layer (compute grows with the square)")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd",
                        help=f"sgd: momentum 0.9, lr {LR}; adam: lr {ADAM_LR}")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per configuration; the table shows the one with the median time to 95%%")
    parser.add_argument("--only", default=None,
                        help='comma-separated configurations to run (e.g. "sync,async s=None"); sync is needed for the ratio')
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray instance")
    parser.add_argument("--name", default="convergence", help="result file name stem")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.eval_every = 1, 10
    out_dir = args.out or (tempfile.mkdtemp(prefix="convergence_") if args.quick else RESULTS)
    init_ray(args.num_cpus)
    import digits

    ray.cloudpickle.register_pickle_by_value(digits)  # the workers cannot import examples/
    rows = run_all(args.epochs, args.eval_every, args.quick, args.model, args.straggler, args.optimizer,
                   args.repeats, args.only, args.channels)
    write(rows, out_dir, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
