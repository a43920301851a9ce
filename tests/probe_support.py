"""What the multi-node probes share (``tests/*_probe.py``, ``tests/train/*_probe.py``: scripts
a test runs in a subprocess, since each builds its own ``ray.cluster_utils.Cluster`` and
``ray.init`` runs once per process). Not collected by pytest.

:func:`run_probe` starts the cluster's head node, joins it, runs the probe's body, and prints
exactly one line ``MARKER {json}`` — what the body put in ``out``, plus ``ok`` and, on an
exception, ``error`` and ``traceback`` — then shuts the cluster down whatever happened.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Callable
from typing import Any

NODE_MEMORY = {"object_store_memory": 80 * 1024 * 1024}


def wait_for(what: str, cond: Callable[[], Any], timeout_s: float) -> Any:
    """``cond()``'s first truthy value, checked every 0.1 s; TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"gave up waiting for {what} after {timeout_s:g} s")


def run_probe(marker: str, head_cpus: int, body: Callable[[Any, dict[str, Any]], bool | None]) -> int:
    """Run ``body(cluster, out)`` on a fresh cluster whose head has ``head_cpus`` CPUs;
    ``out["ok"]`` is True unless it raised or returned False."""
    import ray
    from ray.cluster_utils import Cluster

    out: dict[str, Any] = {"ok": False}
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": head_cpus, "include_dashboard": False, **NODE_MEMORY})
        ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
        out["ok"] = body(cluster, out) is not False
    except BaseException as exc:  # noqa: BLE001 - reported in the JSON line
        out["ok"] = False
        out["error"] = f"{type(exc).__name__}: {exc}"[:3000]
        out["traceback"] = traceback.format_exc()[-4000:]
    finally:
        try:
            ray.shutdown()
            if cluster is not None:
                cluster.shutdown()
        except Exception as exc:  # noqa: BLE001 - the result line matters more
            out["shutdown_error"] = str(exc)[:500]
    print(marker + json.dumps(out, default=str), flush=True)
    return 0
