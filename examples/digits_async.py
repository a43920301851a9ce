"""Train a small MLP on scikit-learn's digits with 2 workers in async (parameter-server) mode.

    python examples/digits_async.py [--workers 2] [--epochs 15] [--staleness none|0|2|...] [--shards 2]

The same training loop as ``digits_sync.py`` (``examples/digits.py``); only the Trainer's mode
changes. Starts a local Ray instance by itself (or joins the cluster in RAY_ADDRESS), and
prints the test accuracy (>= 93% expected) and the parameter server's counters.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from digits import train_loop  # noqa: E402

import synctrain  # noqa: E402


def staleness_arg(text: str) -> int | None:
    return None if text.lower() in ("none", "inf", "async") else int(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--staleness", type=staleness_arg, default=None, help="none, or an integer >= 0")
    parser.add_argument("--shards", type=int, default=2)
    args = parser.parse_args()
    trainer = synctrain.Trainer(
        train_loop,
        num_workers=args.workers,
        mode="async",
        staleness=args.staleness,
        num_ps_shards=args.shards,
        use_gpu="auto",
        config={"lr": args.lr, "epochs": args.epochs, "batch_size": 32},
    )
    result = trainer.fit()
    acc = result.outputs[0]["test_acc"]
    info = result.strategy_info
    print(f"async (staleness={args.staleness}), {args.workers} workers, {args.shards} shards, "
          f"{args.epochs} epochs: test accuracy {acc:.3f} ({result.elapsed_s:.1f} s)")
    for m in result.metrics[-3:]:
        print(f"  epoch {m['epoch']:2d}  step {m['step']:4d}  loss {m['loss']:.4f}  test_acc {m['test_acc']:.3f}")
    print(f"  parameter server: {info['pushes_received']} pushes received, {info['updates_applied']} "
          f"updates applied, {info['pushes_per_s']:.0f} pushes/s per shard")
    for rank, m in enumerate(result.worker_metrics):
        print(f"  rank {rank}: staleness histogram {m['staleness_hist']}, push {m['push_latency_ms_p50']:.1f} ms "
              f"p50 / {m['push_latency_ms_p99']:.1f} ms p99, staleness wait {m['pull_wait_ms_mean']:.1f} ms mean")
    return 0 if acc >= 0.93 else 1


if __name__ == "__main__":
    sys.exit(main())
