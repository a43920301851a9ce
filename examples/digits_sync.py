"""Train a small MLP on scikit-learn's digits with 2 workers in sync (all-reduce) mode.

    python examples/digits_sync.py [--workers 2] [--epochs 15]

Starts a local Ray instance by itself (or joins the cluster in RAY_ADDRESS), shows a progress
bar while it trains, and prints the test accuracy (>= 95% expected).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from digits import train_loop  # noqa: E402

import synctrain  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()
    trainer = synctrain.Trainer(
        train_loop,
        num_workers=args.workers,
        mode="sync",
        use_gpu="auto",
        config={"lr": args.lr, "epochs": args.epochs, "batch_size": 32},
    )
    result = trainer.fit()
    acc = result.outputs[0]["test_acc"]
    print(f"sync, {args.workers} workers, {args.epochs} epochs: test accuracy {acc:.3f} "
          f"({result.elapsed_s:.1f} s)")
    for m in result.metrics[-3:]:
        print(f"  epoch {m['epoch']:2d}  step {m['step']:4d}  loss {m['loss']:.4f}  test_acc {m['test_acc']:.3f}")
    return 0 if acc >= 0.95 else 1


if __name__ == "__main__":
    sys.exit(main())
