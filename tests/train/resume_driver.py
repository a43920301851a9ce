"""A training script for the driver-death tests (``test_driver_death.py``): the fault-tolerance
tests' digits loop under a given job name, run as its own process (a driver that a test can
kill with SIGKILL and start again).

    python resume_driver.py --mode sync --job NAME --storage DIR --marks DIR --out FILE
                            [--address RAY_GCS] [--block-at STEP] [--epochs N]

``--block-at``: in the first generation rank 0 blocks at that step (the test kills this
driver meanwhile). Writes the Result's fields as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import ray.cloudpickle

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

import test_fault_tolerance as ft  # noqa: E402

import synctrain  # noqa: E402

ray.cloudpickle.register_pickle_by_value(ft)  # the workers cannot import a test module by name


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", default="sync")
    p.add_argument("--job", default=None)
    p.add_argument("--storage", default=None)
    p.add_argument("--marks", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--address", default=None)
    p.add_argument("--block-at", type=int, default=0)
    p.add_argument("--epochs", type=int, default=ft.EPOCHS)
    args = p.parse_args()
    fault = {"kind": "block", "rank": 0, "step": args.block_at} if args.block_at else None
    opts = dict(num_workers=2, mode=args.mode, use_gpu=False, progress=False, checkpoint_every=20,
                stall_timeout_s=30.0, collective_timeout_s=60.0, ray_address=args.address,
                config={"marks": args.marks, "fault": fault, "epochs": args.epochs})
    if args.job:
        opts["job_name"] = args.job
    if args.storage:
        opts["storage_path"] = args.storage
    if args.mode == "async":
        opts["staleness"] = 2
    result = synctrain.Trainer(ft.ft_loop, **opts).fit()
    out = {"acc": [o["acc"] for o in result.outputs], "metrics": result.metrics, "steps": result.steps,
           "generations": result.generations, "failures": result.failures,
           "redone_steps": result.redone_steps, "job_name": result.job_name, "pid": os.getpid()}
    pathlib.Path(args.out).write_text(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
