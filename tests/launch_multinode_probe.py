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

import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any

import ray
from probe_support import NODE_MEMORY, run_probe, wait_for

MARKER = "LAUNCH_MULTINODE "
JOB = "multinode-launch"
ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "train" / "launch_scripts" / "plain_gated.py"
WAIT_S = 180.0
_T0 = time.monotonic()


def _note(what: str) -> None:
    print(f"INJECT +{time.monotonic() - _T0:.1f}s {what}", file=sys.stderr, flush=True)


def _placement(driver_pid: int, head: str) -> dict[str, list[str]]:
    """Ray node of every live actor of the job's classes, from the GCS actor table, and of
    every coordinator node: a ``coordinator serve`` process whose parent is the driver (on the
    head: a driver joins its host's head node) or a ``NodeProcessHost`` actor."""
    out: dict[str, list[str]] = {"coordinator_node": [], "ParameterShard": [], "TrainWorker": []}
    hosts = {driver_pid: head}
    for actor in ray._private.state.actors().values():
        name, node = actor.get("ActorClassName"), actor.get("Address", {}).get("NodeID")
        if actor.get("State") != "ALIVE":
            continue
        if name in out:
            out[name].append(node)
        elif name == "NodeProcessHost":
            hosts[int(actor["Pid"])] = node
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
            parent = int(pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if b"\0coordinator.cli\0serve\0" in argv and parent in hosts:
            out["coordinator_node"].append(hosts[parent])
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
    nodes = [cluster.add_node(num_cpus=1, **NODE_MEMORY) for _ in range(2)]
    cluster.wait_for_nodes()
    out["ray_nodes"] = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))
    out["head"] = head
    proc = _launch(tmp, cluster.address)
    try:
        wait_for("every rank at the gate", lambda: proc.poll() is not None
                 or all((tmp / f"at-gate-r{r}").exists() for r in range(3)), WAIT_S)
        if proc.poll() is not None:
            raise RuntimeError(f"synctrain run exited early ({proc.returncode})")
        out["placement"] = placement = _placement(proc.pid, head)
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


def _body(cluster: Any, out: dict[str, Any]) -> None:
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="launch-multinode-"))
    _run(cluster, tmp, out)
    from synctrain.jobs import read_job

    job = read_job(JOB, tmp / "jobs")
    out["job"] = {"state": job.state, "generations": job.generations, "failures": job.failures,
                  "steps": [{"step": s["step"], "lost": bool(s.get("lost"))} for s in job.steps]}
    out["loop_starts"] = sorted(p.name for p in tmp.glob("start-*.json"))


def main() -> int:
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    return run_probe(MARKER, 1, _body)


if __name__ == "__main__":
    sys.exit(main())
