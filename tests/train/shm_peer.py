"""One rank of a shared-memory all-reduce test, run as its own process by
``tests/train/test_shm_allreduce.py`` (not collected by pytest).

    python shm_peer.py SCENARIO --rank R --world N --port P --job J [--chunk-bytes B]
                       [--timeout-s T] [--victim V]

Joins a gloo process group on 127.0.0.1:P, sets up the transport with
``shm_hook.connect("shm", ...)`` (the real set-up path), runs SCENARIO and prints one line
``SHM_PEER {json}`` with what it saw. Scenarios:

* ``reduce``: sums of many sizes and dtypes (empty, smaller than the rank count, odd, many
  chunks) against the fixed-order sum each rank computes itself, broadcasts from every rank,
  barriers; also the job's names left in /dev/shm once set up (there must be none).
* ``kill``: rank ``victim`` SIGKILLs itself in the middle of an all-reduce (between summing
  one chunk and the next); the others report the error they got and how long it took.
* ``raise``: rank ``victim`` leaves (as a loop that raised does: ``close()``) and stays alive
  (until the test kills it); the others report their error.
* ``stuck``: rank ``victim`` never comes to the all-reduce (it sleeps until the test kills it).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import hashlib
import json
import os
import signal
import sys
import time
import traceback
from typing import Any

import torch
import torch.distributed as dist

from synctrain.strategies import shm_allreduce, shm_hook

MARKER = "SHM_PEER "
SIZES = [0, 1, 2, 3, 17, 1000, 1024, 5000, 100_003]  # float32; 1024 per 4 KiB chunk
OTHER_DTYPE_SIZES = [3, 5000]
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16, "int64": torch.int64}
KILL_AT_SUM = 3  # the victim dies at its 3rd slice sum: inside the first multi-chunk all-reduce


def inputs(numel: int, dtype: torch.dtype, rank: int, case: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * case + rank)
    if dtype == torch.int64:
        return torch.randint(-1000, 1000, (numel,), generator=g)
    return torch.randn(numel, generator=g).to(dtype)


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def scenario_reduce(transport: shm_hook.ShmTransport, rank: int, world: int, job: str) -> dict[str, Any]:
    out: dict[str, Any] = {"left_in_dev_shm": glob.glob(f"{shm_allreduce.SHM_DIR}/{shm_allreduce.PREFIX}{job}-*"),
                           "cases": {}}
    case = 0
    for name, dtype in DTYPES.items():
        for numel in SIZES if name == "float32" else OTHER_DTYPE_SIZES:
            case += 1
            expected = inputs(numel, dtype, 0, case)
            for r in range(1, world):  # the fixed order: ((x0 + x1) + x2) + ...
                expected = expected + inputs(numel, dtype, r, case)
            got = transport.all_reduce_sum_(inputs(numel, dtype, rank, case))
            out["cases"][f"{name}/{numel}"] = {"equal": bool(torch.equal(got, expected)), "digest": digest(got)}
    shaped = inputs(6 * 7, torch.float32, rank, 99).view(6, 7).t()  # not contiguous
    transport.all_reduce_sum_(shaped)
    out["cases"]["transposed"] = {"equal": True, "digest": digest(shaped)}
    out["broadcast"] = []
    for src in range(world):
        t = inputs(3001, torch.float32, rank, 500 + src)
        transport.broadcast_(t, src)
        out["broadcast"].append(bool(torch.equal(t, inputs(3001, torch.float32, src, 500 + src))))
    for _ in range(3):
        transport.barrier()
    return out


def scenario_fault(kind: str, transport: shm_hook.ShmTransport, rank: int, victim: int,
                   timeout_s: float) -> dict[str, Any]:
    comm = transport.comm
    assert comm is not None
    if rank == victim and kind == "kill":
        original = comm._sum_my_slice
        calls = {"n": 0}

        def sum_then_die(*args: Any) -> None:
            calls["n"] += 1
            if calls["n"] == KILL_AT_SUM:
                os.kill(os.getpid(), signal.SIGKILL)
            original(*args)

        comm._sum_my_slice = sum_then_die  # type: ignore[method-assign]
    if rank == victim and kind == "raise":
        transport.close()  # what on_shutdown does after the loop raised
    if rank == victim and kind in ("raise", "stuck"):
        time.sleep(600)  # alive until the test kills it, once the others reported
        return {}
    t = torch.ones(200_000)
    started = time.monotonic()
    try:
        for _ in range(1000):
            transport.all_reduce_sum_(t)
    except Exception as exc:  # noqa: BLE001 - reported
        return {"exc_type": type(exc).__name__, "message": str(exc), "after_s": time.monotonic() - started}
    return {"exc_type": None, "after_s": time.monotonic() - started}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("scenario", choices=["reduce", "kill", "raise", "stuck"])
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--chunk-bytes", type=int, default=4096)
    p.add_argument("--timeout-s", type=float, default=60.0)
    p.add_argument("--victim", type=int, default=-1)
    args = p.parse_args()
    torch.set_num_threads(1)
    result: dict[str, Any] = {"rank": args.rank, "pid": os.getpid()}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
                                world_size=args.world, timeout=datetime.timedelta(seconds=60))
        transport = shm_hook.connect("shm", rank=args.rank, world_size=args.world, job_id=args.job,
                                     generation=1, rendezvous_port=args.port, timeout_s=args.timeout_s,
                                     chunk_bytes=args.chunk_bytes)
        assert transport is not None
        result["transport"] = transport.name
        if args.scenario == "reduce":
            result.update(scenario_reduce(transport, args.rank, args.world, args.job))
        else:
            result.update(scenario_fault(args.scenario, transport, args.rank, args.victim, args.timeout_s))
        transport.close()
        result["ok"] = True
    except BaseException as exc:  # noqa: BLE001 - reported
        result.update(ok=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    print(MARKER + json.dumps(result), flush=True)
    os._exit(0)  # no process-group teardown: a peer may be gone


if __name__ == "__main__":
    sys.exit(main())
