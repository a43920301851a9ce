"""Small helpers shared by the benchmark scripts: result files and markdown tables."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


#: What a benchmark's result depends on: a run of one commit with none of these changed can be
#: compared, or pooled, with another of the same (see ``code_version``).
MEASURED_PATHS = ("synctrain", "coordinator", "benchmarks", "examples")


def code_version() -> dict[str, Any] | None:
    """The commit this checkout is at and whether the measured code differs from it (uncommitted
    changes under :data:`MEASURED_PATHS`, results files left out); None outside a git checkout."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True, timeout=30).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--", *MEASURED_PATHS,
                                 ":(exclude)benchmarks/results"], cwd=root, capture_output=True,
                                text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def best_of(fn: Any, repeat: int, clock: Any = time.perf_counter) -> float:
    """The shortest of ``repeat`` timed calls of ``fn``, in seconds of ``clock``: other work on a
    shared machine only ever adds to a time."""
    best = float("inf")
    for _ in range(repeat):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(name: str, data: dict[str, Any], markdown: str, out_dir: Path | None = None) -> Path:
    out = Path(out_dir or RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    (out / f"{name}.md").write_text(markdown)
    return out


def init_ray(num_cpus: int) -> None:
    """Join the cluster in ``RAY_ADDRESS`` when set (the test suite's own Ray, a real cluster),
    else start a local Ray with ``num_cpus`` logical CPUs."""
    import logging

    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level=logging.WARNING)
    else:
        # address="local": a Ray of its own, never a test cluster that happens to be running
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 logging_level=logging.WARNING)
