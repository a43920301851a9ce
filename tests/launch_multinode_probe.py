"""Multi-node launch probe, run by ``tests/test_multinode.py`` in a subprocess (not collected
by pytest: it builds its own Ray cluster, and ``ray.init`` runs once per process).

Starts a 3-node ``ray.cluster_utils.Cluster`` on this machine (1 CPU per node, so 3 workers
that ask for a CPU each land one per node) and runs, as a user would, in its own process:

    synctrain run --workers 3 --mode async --num-ps-shards 2 --min-workers 2 \
        tests/train/launch_scripts/plain_gated.py --dir DIR

Once every rank waits at the script's gate, the probe reads from the GCS actor table where
the job's actors run (coordinator nodes, parameter-server shards, workers), removes the
non-head Ray node that holds a shard (so a worker, a coordinator node and a shard are lost at
once), opens the gate, and waits for ``synctrain run`` to exit. Then it reads the job's step
log (``synctrain.jobs.read_job``). Prints one line ``LAUNCH_MULTINODE {json}``.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

import ray

MARKER = "LAUNCH_MULTINODE "
JOB = "multinode-launch"
ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "train" / "launch_scripts" / "plain_gated.py"
WAIT_S = 180.0
_T0 = time.monotonic()


def _note(what: str) -> None:
    print(f"INJECT +{time.monotonic() - _T0:.1f}s {what}", file=sys.stderr, flush=True)


def _wait_for(what: str, cond: Any, timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"gave up waiting for {what} after {timeout_s:g} s")


def _placement() -> dict[str, list[str]]:
    """Ray node of every live actor of the job's classes, from the GCS actor table."""
    out: dict[str, list[str]] = {"_RayNode": [], "ParameterShard": [], "TrainWorker": []}
    for actor in ray._private.state.actors().values():
        name = actor.get("ActorClassName")
        if name in out and actor.get("State") == "ALIVE":
            out[name].append(actor.get("Address", {}).get("NodeID"))
    return out


def _launch(tmp: pathlib.Path, address: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_ADDRESS=address, RAY_DEDUP_LOGS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "synctrain.cli", "run", "--workers", "3", "--mode", "async",
           "--num-ps-shards", "2", "--min-workers", "2", "--placement-timeout-s", "5",
           "--checkpoint-every", "10", "--no-progress", "--job-name", JOB,
           "--storage-path", str(tmp / "jobs"), str(SCRIPT), "--dir", str(tmp), "--gate-step", "15"]
    return subprocess.Popen(cmd, stdout=(tmp / "run.out").open("w"), stderr=subprocess.STDOUT, env=env)


def _run(cluster: Any, tmp: pathlib.Path, out: dict[str, Any]) -> None:
    head = ray.get_runtime_context().get_node_id()
    nodes = [cluster.add_node(num_cpus=1, object_store_memory=80 * 1024 * 1024) for _ in range(2)]
    cluster.wait_for_nodes()
    out["ray_nodes"] = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))
    out["head"] = head
    proc = _launch(tmp, cluster.address)
    try:
        _wait_for("every rank at the gate", lambda: proc.poll() is not None
                  or all((tmp / f"at-gate-r{r}").exists() for r in range(3)))
        if proc.poll() is not None:
            raise RuntimeError(f"synctrain run exited early ({proc.returncode})")
        out["placement"] = placement = _placement()
        victim = next(n for n in nodes if n.node_id in placement["ParameterShard"])
        out["removed_node"] = victim.node_id
        _note(f"removing Ray node {victim.node_id[:12]} (a worker, a coordinator node, a shard)")
        cluster.remove_node(victim)
        (tmp / "go").write_text("")
        out["returncode"] = proc.wait(timeout=WAIT_S * 2)
        _note(f"synctrain run exited {out['returncode']}")
    finally:
        if proc.poll() is None:
            proc.kill()
        out["run_output"] = (tmp / "run.out").read_text()[-6000:]


def main() -> int:
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    from ray.cluster_utils import Cluster

    out: dict[str, Any] = {"ok": False}
    cluster = None
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="launch-multinode-"))
    try:
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "include_dashboard": False, "object_store_memory": 80 * 1024 * 1024})
        ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
        _run(cluster, tmp, out)
        from synctrain.jobs import read_job

        job = read_job(JOB, tmp / "jobs")
        out["job"] = {"state": job.state, "generations": job.generations, "failures": job.failures,
                      "steps": [{"step": s["step"], "lost": bool(s.get("lost"))} for s in job.steps]}
        out["loop_starts"] = sorted(p.name for p in tmp.glob("start-*.json"))
        out["ok"] = True
    except BaseException as exc:  # noqa: BLE001 - reported in the JSON line
        out["error"] = f"{type(exc).__name__}: {exc}"[:3000]
        out["traceback"] = traceback.format_exc()[-4000:]
    finally:
        try:
            ray.shutdown()
            if cluster is not None:
                cluster.shutdown()
        except Exception as exc:  # noqa: BLE001 - the result line matters more
            out["shutdown_error"] = str(exc)[:500]
    print(MARKER + json.dumps(out, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
