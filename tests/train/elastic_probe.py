"""Elastic membership probe, run by ``tests/train/test_elastic.py`` in a subprocess (not
collected by pytest: it builds its own Ray cluster, and ``ray.init`` runs once per process).

Starts a ``ray.cluster_utils.Cluster`` on this machine: a head node (the driver, the
coordinator) and, once the job's coordinator runs there, 3 worker nodes with one ``slot``
each; every rank asks for a slot, so each lands on its own node (and no coordinator node on
one: the embedded coordinator and the parameter-server shards pin themselves to the Ray
nodes alive when they start). A job of 3 workers with ``min_workers=2`` (``sync``, or the
mode given as the first argument) runs, in a thread, a loop over a ``TensorDataset`` of
sample ids that appends, per rank and optimizer step, the ids it trains on to a file. The
main thread (Ray starts nodes from there only) drives the faults, each at a point the loop
waits at (with ``heartbeat()``), so the run cannot end before they happen:

1. every rank of generation 1 waits after step ``GATE_A``: the node of rank 1 is removed —
   its replacement finds no slot within ``placement_timeout_s``, so the job goes on with 2
   (seen in the step log);
2. the ranks of the shrunk job wait after step ``GATE_B`` (sync: the 2-worker generation;
   async: the survivors, which never stopped): a node with a slot is added, and once the
   queued worker is up there (Ray's actor table says so) the loop goes on, sync at ``PACE_S``
   a step (the driver checks once a second; unpaced, the rest of the run took under a second and
   ended before it looked) — the job grows back to 3 (sync: at the next checkpoint; async: at
   once, the new worker joins; there the survivors wait at gate B until the step log shows it).

Prints one line ``ELASTIC {json}``: the generations, the committed steps and the id records,
which the test checks (every sample of every epoch once, across the ranks that committed
each step). What it injected and when is printed as ``INJECT`` lines on stderr.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import tempfile
import threading
import time
import traceback
from typing import Any

import ray
import torch
from torch.utils.data import DataLoader, TensorDataset

import synctrain

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/: probe_support
from probe_support import NODE_MEMORY, run_probe, wait_for  # noqa: E402

MARKER = "ELASTIC "
JOB = "elastic-probe"
SAMPLES = 600
BATCH = 4  # per rank: global batches of 12 (3 ranks) or 8 (2 ranks)
EPOCHS = 3
GATE_A = 10  # generation 1 waits after this step for the node removal
GATE_B = 30  # the 2-worker generation waits after this step for the new node's worker
CHECKPOINT_EVERY = 10
PLACEMENT_TIMEOUT_S = 5.0
WAIT_S = 150.0  # longest wait for any one event
PACE_S = 0.1  # a step's time once the shrunk job may grow back (until it has)


def _wait_for(what: str, cond: Any, timeout_s: float = WAIT_S) -> Any:
    return wait_for(what, cond, timeout_s)


def _gate(path: pathlib.Path) -> None:
    """Wait (telling the driver this rank is alive) until ``path`` exists."""
    deadline = time.monotonic() + WAIT_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the probe never wrote {path.name}")
        synctrain.heartbeat()
        time.sleep(0.05)


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    ctx = synctrain.get_context()
    out = pathlib.Path(config["dir"])
    (out / f"start-g{ctx.generation}-r{ctx.rank}.json").write_text(json.dumps(
        {"node": ray.get_runtime_context().get_node_id(), "world": ctx.world_size}))
    torch.manual_seed(0)
    model = synctrain.prepare_model(torch.nn.Linear(1, 1))
    opt = synctrain.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=0.01))
    loader = synctrain.prepare_data_loader(
        DataLoader(TensorDataset(torch.arange(SAMPLES)), batch_size=BATCH, shuffle=True))
    step = ctx.start_step
    with open(out / f"ids-g{ctx.generation}-r{ctx.rank}.jsonl", "a") as ids_file:
        for epoch in range(EPOCHS):
            for (ids,) in loader:
                # recorded before the step: a step a rank attempted is on file whether or not
                # it is committed; the test keeps the records of the generation that committed it
                ids_file.write(json.dumps({"g": ctx.generation, "rank": ctx.rank, "world": ctx.world_size,
                                           "step": step + 1, "epoch": epoch, "ids": ids.tolist()}) + "\n")
                ids_file.flush()
                opt.zero_grad()
                model(ids.float().unsqueeze(1) / SAMPLES).pow(2).mean().backward()
                opt.step()
                step += 1
                if ctx.generation == 1 and step == GATE_A:
                    (out / f"at-a-r{ctx.rank}").write_text("")
                    _gate(out / "removed")
                shrunk = ctx.world_size == 2 or (ctx.mode == "async" and ctx.generation == 1)
                if shrunk and step == GATE_B:
                    _gate(out / "placed")
                if ctx.world_size == 2 and step > GATE_B:
                    # sync: from here the job runs at the pace of real training (this loop alone does
                    # ~200 steps/s): the driver sees the new worker placed and, sync, a checkpoint
                    # after that (its checks are a second apart) before the epochs run out
                    time.sleep(PACE_S)
    return {"rank": ctx.rank, "step": step}


_T0 = time.monotonic()


def _inject(what: str) -> None:
    print(f"INJECT +{time.monotonic() - _T0:.1f}s {what}", file=sys.stderr, flush=True)


def _alive(class_name: str) -> int:
    return sum(1 for a in ray._private.state.actors().values()
               if a.get("ActorClassName") == class_name and a.get("State") == "ALIVE")


def _add_slot_node(cluster: Any, wait: bool = True) -> Any:
    return cluster.add_node(wait=wait, num_cpus=1, resources={"slot": 1}, **NODE_MEMORY)


def _sizes(out: pathlib.Path) -> list[int]:
    """The member counts of the job's generations, from its step log."""
    from synctrain.steplog import StepLog

    coord = out / "jobs" / JOB / "coordinator"
    steplog = StepLog((coord / "endpoints").read_text().strip(), (coord / "token").read_bytes().strip(), JOB)
    try:
        return [len(g["members"]) for g in steplog.records("generations")]
    finally:
        steplog.close()


def _faults(cluster: Any, out: pathlib.Path, report: dict[str, Any], fit: threading.Thread, mode: str) -> None:
    try:
        endpoints = out / "jobs" / JOB / "coordinator" / "endpoints"  # written once every node serves
        _wait_for("the job's coordinator (and shards)", lambda: not fit.is_alive() or (
            endpoints.exists() and (mode == "sync" or _alive("ParameterShard") >= 1)))
        _inject("the coordinator runs on the head: adding 3 nodes with a slot each")
        nodes = [_add_slot_node(cluster, wait=False) for _ in range(3)]  # started side by side
        cluster.wait_for_nodes()
        _inject("3 nodes added")
        _wait_for("every rank at gate A", lambda: all((out / f"at-a-r{r}").exists() for r in range(3))
                  or not fit.is_alive())
        _inject("every rank at gate A")
        victim_id = json.loads((out / "start-g1-r1.json").read_text())["node"]
        victim = next(n for n in nodes if n.node_id == victim_id)
        _inject(f"removing the node of rank 1 ({victim_id[:12]})")
        cluster.remove_node(victim)
        report["removed_node"] = victim_id
        (out / "removed").write_text("")
        _wait_for("a 2-worker generation", lambda: 2 in _sizes(out))
        _inject("adding a node with a slot")
        _add_slot_node(cluster)
        _wait_for("the queued worker up on the new node", lambda: _alive("TrainWorker") >= 3)
        _inject("the new node's worker is up")
        if mode == "async":
            # async grows at once, whatever the survivors do: they wait at gate B until the step
            # log shows it (let go when the actor is up, they ran the rest of the run, unpaced, in
            # less time than the driver takes to look, and the job ended before it grew)
            def grown(sizes: list[int]) -> bool:
                return sizes[-1] == 3 and 2 in sizes

            _wait_for("a 3-worker generation after the 2-worker one",
                      lambda: not fit.is_alive() or grown(_sizes(out)))
            _inject("the job grew back to 3")
        (out / "placed").write_text("")
    except BaseException as exc:  # noqa: BLE001 - reported in the JSON line
        report["fault_error"] = f"{type(exc).__name__}: {exc}"
        for name in ("removed", "placed"):  # let the loop end rather than wait
            (out / name).write_text("")


def _fit(trainer: Any, outcome: dict[str, Any]) -> None:
    try:
        outcome["result"] = trainer.fit()
    except BaseException as exc:  # noqa: BLE001 - reported by main
        outcome["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"


def _body(cluster: Any, out: dict[str, Any]) -> bool:
    started = time.monotonic()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="elastic-probe-"))
    _inject("Ray cluster up")
    mode = sys.argv[1] if len(sys.argv) > 1 else "sync"
    # the head's CPUs count for the Trainer's check that 3 workers fit; they ask for a slot
    trainer = synctrain.Trainer(
        train_loop, num_workers=3, min_workers=2, mode=mode, use_gpu=False, progress=False, job_name=JOB,
        resources_per_worker={"CPU": 1, "slot": 1}, config={"dir": str(tmp)},
        storage_path=str(tmp / "jobs"), checkpoint_every=CHECKPOINT_EVERY,
        placement_timeout_s=PLACEMENT_TIMEOUT_S, collective_timeout_s=60, stall_timeout_s=60)
    outcome: dict[str, Any] = {}
    fit = threading.Thread(target=_fit, args=(trainer, outcome), daemon=True)
    fit.start()
    _faults(cluster, tmp, out, fit, mode)
    fit.join(WAIT_S * 2)
    _inject("fit returned")
    if "error" in outcome or "result" not in outcome:
        raise RuntimeError(outcome.get("error", "fit() did not return"))
    result = outcome["result"]
    out["generations"] = result.generations
    out["steps"] = result.steps
    out["failures"] = [{k: f.get(k) for k in ("kind", "rank", "step", "recovery")} for f in result.failures]
    out["redone_steps"] = result.redone_steps
    out["records"] = [json.loads(line) for p in sorted(tmp.glob("ids-*.jsonl"))
                      for line in p.read_text().splitlines()]
    out["loop_starts"] = sorted(p.name for p in tmp.glob("start-*.json"))
    out["elapsed_s"] = round(time.monotonic() - started, 1)
    return "fault_error" not in out


def main() -> int:
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    return run_probe(MARKER, 3, _body)


if __name__ == "__main__":
    sys.exit(main())
