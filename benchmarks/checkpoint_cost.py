"""What a checkpoint's encoding costs: the container format against ``torch.save``.

    python benchmarks/checkpoint_cost.py [--repeat 200] [--out DIR]

For each checkpoint document the step log writes — the digits MLP and the benchmarks' convnet
in sync mode (models, SGD momentum, RNG states, positions) and in async mode (the
parameter-server shard's parameters and optimizer state instead), and a 25M-parameter MLP in
sync mode — in one process, side by side: the CPU time of the writer thread to encode it
(``time.thread_time``; the best of many, since other work only ever adds to a time) and to
decode it from the file's bytes in memory, and the file's size, for both formats of :mod:`synctrain.checkpoint`. The encode
runs on rank 0's writer thread, under the GIL the training loop needs between its kernels:
its Python time is time the loop can be kept waiting. Results in
``benchmarks/results/checkpoint_cost.{md,json}``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from _common import best_of, machine, markdown_table, write_results  # noqa: E402
from convergence import DigitsConvNet  # noqa: E402
from digits import DigitsNet  # noqa: E402

from synctrain import checkpoint as ckpt  # noqa: E402


def document(model: nn.Module, features: int, mode: str) -> dict[str, Any]:
    """A checkpoint document as the step boundary captures it, after one optimizer step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model(torch.randn(4, features)).sum().backward()
    opt.step()
    doc: dict[str, Any] = {"step": 100, "generation": 1, "mode": mode, "report_seq": 3,
                           "loaders": [[1, 37]], "rng": ckpt.capture_rng(), "registered": {},
                           "models": [{k: v.clone() for k, v in model.state_dict().items()}],
                           "optimizers": [], "strategy": {}}
    if mode == "sync":
        doc["optimizers"] = [opt.state_dict()]
    else:  # one shard holding every parameter, as the async MLP's
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        doc["strategy"] = {"mode": "async", "clock": 100, "shards": [{
            "shard_index": 0, "num_shards": 1, "params": flat, "version": 200, "digest": "0" * 32,
            "optimizer": {"state": {0: {"momentum_buffer": torch.randn_like(flat)}},
                          "param_groups": [{"lr": 0.05, "momentum": 0.9, "dampening": 0, "weight_decay": 0,
                                            "nesterov": False, "maximize": False, "foreach": None,
                                            "differentiable": False, "fused": None, "params": [0]}]},
            "clocks": [100, 99], "received": [100, 99], "active": [0, 1]}]}
    return doc


def cases() -> list[tuple[str, dict[str, Any]]]:
    big = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                        nn.Linear(4096, 1024), nn.ReLU(), nn.Linear(1024, 10))
    return [("digits MLP, sync", document(DigitsNet(), 64, "sync")),
            ("digits MLP, async", document(DigitsNet(), 64, "async")),
            ("digits convnet, sync", document(DigitsConvNet(), 64, "sync")),
            ("digits convnet, async", document(DigitsConvNet(), 64, "async")),
            ("MLP 25M, sync", document(big, 1024, "sync"))]


def best_ms(fn: Any, repeat: int) -> float:
    fn()  # warm
    return best_of(fn, repeat, time.thread_time) * 1e3


def measure(name: str, doc: dict[str, Any], repeat: int) -> dict[str, Any]:
    params = sum(t.numel() for t in doc["models"][0].values())
    reps = max(3, repeat if params < 1_000_000 else repeat // 20)
    row: dict[str, Any] = {"case": name, "params": params}
    for fmt, container in (("torch_save", False), ("container", True)):
        data = ckpt.encode(doc, container=container)
        assert data.startswith(ckpt.MAGIC) == container
        back = ckpt.decode(data)
        assert torch.equal(back["models"][0][next(iter(doc["models"][0]))], next(iter(doc["models"][0].values())))
        row[f"{fmt}_bytes"] = len(data)
        row[f"{fmt}_encode_ms"] = round(best_ms(lambda c=container: ckpt.encode(doc, container=c), reps), 4)
        held = bytearray(data)  # as a restore reads a file (synctrain.checkpoint._read)
        row[f"{fmt}_decode_ms"] = round(best_ms(lambda d=held: ckpt.decode(d), reps), 4)
    row["encode_ratio"] = round(row["torch_save_encode_ms"] / row["container_encode_ms"], 2)
    row["decode_ratio"] = round(row["torch_save_decode_ms"] / row["container_decode_ms"], 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=200, help="timed encodes and decodes per case and format")
    parser.add_argument("--out", default=None, help="results directory")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [measure(name, doc, args.repeat) for name, doc in cases()]
    headers = ["checkpoint of", "parameters", "torch.save encode ms", "container encode ms", "encode x",
               "torch.load decode ms", "container decode ms", "decode x", "torch.save bytes", "container bytes"]
    table = markdown_table(headers, [[r["case"], r["params"], r["torch_save_encode_ms"], r["container_encode_ms"],
                                      r["encode_ratio"], r["torch_save_decode_ms"], r["container_decode_ms"],
                                      r["decode_ratio"], r["torch_save_bytes"], r["container_bytes"]] for r in rows])
    info = {**machine(), "repeat": args.repeat,
            "command": "benchmarks/checkpoint_cost.py " + " ".join(sys.argv[1:])}
    markdown = ("# Checkpoint encoding: the container format against torch.save\n\n"
                "CPU time of one thread (`time.thread_time`), the best of the repeats; decode: "
                "`torch.load(weights_only=True)` for torch.save's bytes. Command: "
                f"`{info['command'].strip()}`.\n\n{table}")
    out = write_results("checkpoint_cost", {"machine": info, "rows": rows}, markdown,
                        Path(args.out) if args.out else None)
    print(table)
    print(f"results in {out}")


if __name__ == "__main__":
    main()
