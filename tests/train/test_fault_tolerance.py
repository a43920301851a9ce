"""Fault tolerance on real runs: real Ray workers, a real embedded coordinator, faults injected
for real (kill -9, SIGSTOP, a loop that raises, the coordinator leader killed, a torn
checkpoint file). Every run must then finish, and each test checks the same things:

* the committed step log holds every step exactly once, with no gap;
* ``Result.metrics`` agrees with it (one report per epoch, each once);
* the job did exactly its configured amount of training (epochs x batches steps);
* the digits accuracy meets the example's target (95% sync, 93% async), and in sync mode is
  within 1 point of a fault-free run with the same seed;
* ``Result.redone_steps`` (sync peer healing: at most 1; async: 0).

The fault is injected by the loop itself, on one rank, at one step of the first generation,
so a run is reproducible; each test prints what it injected and where.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import synctrain

pytestmark = [pytest.mark.ray, pytest.mark.fault, pytest.mark.slow]

#: Epochs of a run: the fewest that meet the example's accuracy target with margin (measured:
#: sync 8 epochs -> 0.967; async 8 -> 0.930-0.939, too close to 0.93, 12 -> ~0.95).
EPOCHS_BY_MODE = {"sync": 8, "async": 12}
EPOCHS = max(EPOCHS_BY_MODE.values())
BATCH = 32
TRAIN_SAMPLES = 1797 - 359


def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    test, train = order[:359], order[359:]
    return x[train], y[train], x[test], y[test]


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def inject(config, ctx, step) -> None:
    """The configured fault, on its rank, at its step, in the first generation only."""
    fault = config.get("fault")
    if fault and fault["kind"] == "raise_always" and ctx.rank == fault["rank"] and step >= fault["step"]:
        raise RuntimeError(f"a persistent failure injected at step {step}")
    if ctx.generation > 1 and ctx.rank == 0 and step == ctx.start_step + 3:
        (Path(config["marks"]) / f"generation-{ctx.generation}-running").touch()
    if not fault or ctx.generation != 1 or ctx.rank != fault["rank"] or step != fault["step"]:
        return
    marks = Path(config["marks"])
    kind = fault["kind"]
    print(f"INJECT {kind} on rank {ctx.rank} at step {step}", flush=True)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "stop":
        (marks / f"stopped-{ctx.rank}.pid").write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGSTOP)
    elif kind == "raise":
        raise RuntimeError(f"a transient failure injected at step {step}")
    elif kind == "block":  # the driver is killed meanwhile (test_driver_death.py)
        (marks / "blocked").write_text(str(step))
        time.sleep(600)
    elif kind == "kill_leader":
        kill_coordinator_leader()
    elif kind == "kill_majority":
        kill_coordinator_leader(also_followers=1)
    elif kind == "kill_shard":
        import ray

        if "after_checkpoint" in fault:  # its file written: the shards' state was fetched from them
            job_dir = Path(synctrain.context.current_session().stepper.cfg.job_dir)
            want = job_dir / f"ckpt-{fault['after_checkpoint']:09d}-g1.pt"
            deadline = time.monotonic() + 60
            while not want.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        shard = synctrain.context.current_session().strategy.shards[fault.get("shard", 0)]
        os.kill(ray.get(shard.__ray_call__.remote(lambda self: os.getpid())), signal.SIGKILL)
    elif kind == "corrupt_newest_then_kill":
        job_dir = Path(synctrain.context.current_session().stepper.cfg.job_dir)
        deadline = time.monotonic() + 60
        want = f"ckpt-{fault['newest']:09d}-g1.pt"  # written by rank 0's writer, asynchronously
        while not (job_dir / want).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        newest = job_dir / want
        data = bytearray(newest.read_bytes())
        data[len(data) // 2] ^= 0xFF
        newest.write_bytes(bytes(data))
        (marks / "corrupted").write_text(newest.name)
        os.kill(os.getpid(), signal.SIGKILL)


def kill_coordinator_leader(also_followers: int = 0) -> None:
    """SIGKILL the process of the embedded coordinator's leader (found through the log's
    client), and of ``also_followers`` followers."""
    from coordinator.client import Client

    stepper = synctrain.context.current_session().stepper
    statuses = []
    for endpoint in stepper.cfg.endpoints:
        with Client([endpoint], token=stepper.cfg.token, timeout_s=2.0) as client:
            statuses.append(client.status(endpoint))
    leaders = [st for st in statuses if st["role"] == "leader"]
    assert leaders, "no coordinator leader found"
    followers = [st for st in statuses if st["role"] != "leader"][:also_followers]
    for st in leaders[:1] + followers:
        os.kill(st["pid"], signal.SIGKILL)


def ft_loop(config):
    ctx = synctrain.get_context()
    tx, ty, vx, vy = digits()
    torch.manual_seed(0)
    model = synctrain.prepare_model(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)))
    if config.get("optimizer") == "adam":
        base = torch.optim.Adam(model.parameters(), lr=config.get("lr", 2e-3))
    else:
        base = torch.optim.SGD(model.parameters(), lr=config.get("lr", 0.05), momentum=0.9)
    opt = synctrain.prepare_optimizer(base)
    sched = None
    if config.get("scheduler"):
        sched = synctrain.register_state("sched", torch.optim.lr_scheduler.StepLR(opt, 40, gamma=0.7))
    loader = synctrain.prepare_data_loader(
        DataLoader(TensorDataset(tx, ty), batch_size=BATCH, shuffle=True))
    step = ctx.start_step
    for epoch in range(config.get("epochs", EPOCHS)):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            if sched is not None:
                sched.step()
            step += 1
            inject(config, ctx, step)
            if config.get("report_every_step"):
                synctrain.report({"step_loss": 1.0})
        synctrain.report({"epoch": epoch, "acc": accuracy(model, vx, vy)})
    params = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    return {"acc": accuracy(model, vx, vy), "params": params, "rank": ctx.rank}


def steps_per_epoch(workers: int) -> int:
    return -(-TRAIN_SAMPLES // (BATCH * workers))


def run(tmp_path, mode="sync", fault=None, name="job", workers=2, **kw):
    marks = tmp_path / f"marks-{name}"
    marks.mkdir(exist_ok=True)
    config = {"marks": str(marks), "fault": fault, "epochs": EPOCHS_BY_MODE[mode], **kw.pop("config", {})}
    print(f"running {name}: mode={mode} fault={fault}", flush=True)
    opts = dict(num_workers=workers, mode=mode, use_gpu=False, progress=False, config=config,
                storage_path=str(tmp_path), job_name=name, checkpoint_every=20,
                stall_timeout_s=6.0, collective_timeout_s=30.0)
    if mode == "async":
        opts["staleness"] = 2
    opts.update(kw)
    return synctrain.Trainer(ft_loop, **opts).fit()


def check_complete(result, mode, workers=2, epochs=None, baseline=None, max_redone=0):
    epochs = epochs or EPOCHS_BY_MODE[mode]
    total = epochs * steps_per_epoch(workers)
    steps = [s["step"] for s in result.steps]
    assert steps == list(range(1, total + 1)), "every step exactly once, no gap"
    per_step = [m["step"] for m in result.metrics if "step_loss" in m]
    assert per_step in ([], list(range(1, total + 1))), "a report each step: every step once"
    epochs_seen = [m for m in result.metrics if "epoch" in m]
    assert [m["epoch"] for m in epochs_seen] == list(range(epochs)), "each report once"
    assert [m["step"] for m in epochs_seen] == [
        (e + 1) * steps_per_epoch(workers) for e in range(epochs)], "reports agree with the steps"
    acc = result.outputs[0]["acc"]
    assert acc >= (0.95 if mode == "sync" else 0.93), acc
    if baseline is not None:
        assert abs(acc - baseline.outputs[0]["acc"]) <= 0.01
    assert result.redone_steps <= max_redone, result.redone_steps
    lost = [s for s in result.steps if s.get("lost")]
    assert not lost, lost


@pytest.fixture(scope="module")
def sync_baseline(ray_session, tmp_path_factory):
    return run(tmp_path_factory.mktemp("baseline"), name="baseline")


# ---------------------------------------------------------------------------- sync
def test_sync_kill_worker_heals_from_a_live_peer(ray_session, tmp_path, sync_baseline):
    check_complete(sync_baseline, "sync")
    assert len(sync_baseline.generations) == 1 and not sync_baseline.failures
    result = run(tmp_path, fault={"kind": "kill", "rank": 1, "step": 30}, name="kill1")
    check_complete(result, "sync", baseline=sync_baseline, max_redone=1)
    [failure] = result.failures
    assert failure["kind"] == "died" and failure["rank"] == 1 and failure["recovery"] == "peer"
    assert [g["generation"] for g in result.generations] == [1, 2]
    assert result.generations[1]["start_step"] >= 29
    # the healed job is the fault-free job: same data order, same state handed on
    assert torch.allclose(result.outputs[0]["params"], sync_baseline.outputs[0]["params"], atol=1e-5)


def test_sync_kill_worker_with_a_warm_spare(ray_session, tmp_path, sync_baseline):
    """A warm spare (process up, torch and the loop imported) takes the dead rank's place."""
    result = run(tmp_path, fault={"kind": "kill", "rank": 1, "step": 30}, spare_workers=1)
    check_complete(result, "sync", baseline=sync_baseline, max_redone=1)
    assert len(result.generations) == 2
    assert "a warm spare took the place of rank 1" in result.generations[1]["reason"], result.generations


def test_sync_stopped_worker_is_declared_stalled_and_replaced(ray_session, tmp_path, sync_baseline):
    result = run(tmp_path, fault={"kind": "stop", "rank": 1, "step": 25}, name="stop1",
                 config={"report_every_step": True})
    check_complete(result, "sync", baseline=sync_baseline, max_redone=1)
    [failure] = result.failures
    assert failure["kind"] == "stalled" and failure["rank"] == 1 and failure["recovery"] == "peer"
    assert failure["recovery_s"] is not None


def test_a_survivor_that_freezes_while_the_new_generation_is_set_up_is_one_more_failure(
        ray_session, tmp_path, sync_baseline):
    """Rank 1 dies; while the driver sets up generation 2, rank 0 (the survivor that handed
    its state on) is stopped for real (SIGSTOP). The job does not hang on it or give up: the
    frozen rank is a second failure, both ranks are replaced, and the job completes from its
    checkpoint with the fault-free result."""
    result = run(tmp_path, fault={"kind": "kill", "rank": 1, "step": 30}, name="setupstop",
                 _fault_hooks={"stop_in_setup": 0})
    check_complete(result, "sync", baseline=sync_baseline, max_redone=30)
    kinds = [(f["kind"], f["rank"]) for f in result.failures]
    assert kinds == [("died", 1), ("stalled", 0)], result.failures
    assert "stopped (SIGSTOP) when generation 2 was set up" in result.failures[1]["detail"]
    assert all(f["recovery_s"] is not None for f in result.failures), result.failures
    assert [g["generation"] for g in result.generations] == [1, 2]


def test_sync_loop_that_raises_once_is_retried(ray_session, tmp_path, sync_baseline):
    result = run(tmp_path, fault={"kind": "raise", "rank": 1, "step": 40}, name="raise1")
    check_complete(result, "sync", baseline=sync_baseline, max_redone=1)
    [failure] = result.failures
    assert failure["kind"] == "raised" and failure["rank"] == 1


def test_sync_leader_kill_needs_no_new_generation(ray_session, tmp_path, sync_baseline):
    result = run(tmp_path, fault={"kind": "kill_leader", "rank": 0, "step": 30}, name="leader")
    check_complete(result, "sync", baseline=sync_baseline)
    assert len(result.generations) == 1, "a coordinator failure does not touch the workers"
    [failure] = result.failures
    assert failure["kind"] == "coordinator_node_died" and failure["recovery"] == "continue"
    assert failure["recovery_s"] is not None, "the node was restarted from its WAL"


def test_sync_corrupt_newest_checkpoint_falls_back_to_the_previous(ray_session, tmp_path, sync_baseline):
    result = run(tmp_path, fault={"kind": "corrupt_newest_then_kill", "rank": 1, "step": 65, "newest": 60},
                 name="corrupt", recovery="checkpoint")
    check_complete(result, "sync", baseline=sync_baseline, max_redone=65)
    corrupted = (tmp_path / "marks-corrupt" / "corrupted").read_text()
    [failure] = result.failures
    assert failure["recovery"] == "checkpoint"
    start = result.generations[1]["start_step"]
    assert start == 40 and "ckpt-000000060" in corrupted, (start, corrupted)
    assert "checksum" in result.generations[1]["reason"]
    assert result.redone_steps == 65 - 40


def test_coordinator_majority_loss_stops_training_then_it_resumes(ray_session, tmp_path):
    """Two of three coordinator nodes killed: commits stop, workers wait at K uncommitted
    steps; the driver restarts the nodes from their WALs and the job goes on, nothing lost."""
    result = run(tmp_path, fault={"kind": "kill_majority", "rank": 0, "step": 30}, name="majority",
                 max_uncommitted_steps=4)
    check_complete(result, "sync")
    assert len(result.generations) == 1
    assert [f["kind"] for f in result.failures] == ["coordinator_node_died"] * 2
    assert all(f["recovery_s"] is not None for f in result.failures)


def test_the_failure_after_max_failures_raises_with_the_history(ray_session, tmp_path):
    with pytest.raises(synctrain.TrainingFailedError) as info:
        run(tmp_path, fault={"kind": "raise_always", "rank": 1, "step": 5}, name="twice",
            max_failures=1)
    assert [f["kind"] for f in info.value.failures] == ["raised", "raised"]
    assert [f["recovery"] for f in info.value.failures] == ["peer", "none"]
    assert "max_failures=1" in str(info.value) and "persistent failure" in str(info.value)


def test_too_many_failures_raise_with_the_history(ray_session, tmp_path):
    with pytest.raises(synctrain.TrainingFailedError) as info:
        run(tmp_path, fault={"kind": "raise", "rank": 0, "step": 5}, name="toomany", max_failures=0)
    assert info.value.rank == 0 and "transient failure" in str(info.value)
    assert [f["kind"] for f in info.value.failures] == ["raised"]
    assert info.value.failures[0]["recovery"] == "none"


def test_zombie_is_fenced_and_does_not_affect_the_result(ray_session, tmp_path, sync_baseline):
    """SIGSTOP a worker; it is declared stalled and replaced, but (test hook) not killed, as
    when its node cannot be reached. SIGCONT it once the new generation runs: its late
    records are refused by the log, it stops, and the job's result is the fault-free one."""
    marks = tmp_path / "marks-zombie"
    marks.mkdir()
    stopped = marks / "stopped-1.pid"

    def resume_zombie() -> None:
        deadline = time.monotonic() + 240
        while not stopped.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        while not (marks / "generation-2-running").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        print(f"SIGCONT zombie {stopped.read_text()}", flush=True)
        os.kill(int(stopped.read_text()), signal.SIGCONT)

    thread = threading.Thread(target=resume_zombie, daemon=True)
    thread.start()
    result = run(tmp_path, fault={"kind": "stop", "rank": 1, "step": 25}, name="zombie",
                 config={"epochs": EPOCHS_BY_MODE["sync"] + 4}, collective_timeout_s=10.0,
                 _fault_hooks={"no_kill_ranks": [1]})
    thread.join(10)
    check_complete(result, "sync", epochs=EPOCHS_BY_MODE["sync"] + 4, max_redone=1)
    assert result.fenced, "the zombie's late records were refused by the step log"
    assert all(f["generation"] == 1 and f["current"] >= 2 for f in result.fenced)


# ---------------------------------------------------------------------------- async
def test_async_kill_worker_survivors_continue(ray_session, tmp_path):
    result = run(tmp_path, "async", fault={"kind": "kill", "rank": 1, "step": 30}, name="akill")
    check_complete(result, "async")
    [failure] = result.failures
    assert failure["kind"] == "died" and failure["recovery"] == "continue"
    assert result.generations[1]["start_step"] >= 1 and len(result.generations) == 2


def test_async_stopped_worker_is_replaced(ray_session, tmp_path):
    result = run(tmp_path, "async", fault={"kind": "stop", "rank": 1, "step": 30}, name="astop")
    check_complete(result, "async")
    [failure] = result.failures
    assert failure["kind"] == "stalled" and failure["rank"] == 1


def test_async_leader_kill_needs_no_new_generation(ray_session, tmp_path):
    result = run(tmp_path, "async", fault={"kind": "kill_leader", "rank": 0, "step": 30}, name="aleader")
    check_complete(result, "async")
    assert len(result.generations) == 1
    assert [f["kind"] for f in result.failures] == ["coordinator_node_died"]


def test_async_shard_kill_restores_the_checkpoint(ray_session, tmp_path):
    # a checkpoint's shard state travels after its step (rank 0's writer fetches it from the
    # shards at once): the shard dies once the checkpoint of step 40 is written
    result = run(tmp_path, "async", fault={"kind": "kill_shard", "rank": 0, "step": 50, "after_checkpoint": 40},
                 name="ashard")
    check_complete(result, "async", max_redone=50)
    assert [f["kind"] for f in result.failures] == ["shard_died"]
    assert result.failures[0]["recovery"] == "checkpoint"
    assert result.generations[1]["start_step"] == 40


# ---------------------------------------------------------------------------- exact resume
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "sgd-zero1"])
def test_resume_from_a_checkpoint_is_exact(ray_session, tmp_path, optimizer):
    """A run interrupted by a worker death and restored from its checkpoint ends with the
    parameters of an uninterrupted run (SGD with momentum; Adam with a registered LR
    scheduler; SGD with ZeRO-1, whose checkpoint consolidates the optimizer shards): model,
    optimizer, scheduler, data position and RNG all come back."""
    kw = {"config": {"optimizer": optimizer.split("-")[0], "scheduler": optimizer == "adam",
                     "epochs": 4}, "recovery": "checkpoint"}
    if optimizer.endswith("zero1"):
        kw["shard_optimizer"] = True
    clean = run(tmp_path, name=f"clean-{optimizer}", step_log=False, **kw)  # the same numbers, no log
    hurt = run(tmp_path, fault={"kind": "kill", "rank": 1, "step": 50}, name=f"hurt-{optimizer}", **kw)
    assert [s["step"] for s in hurt.steps] == list(range(1, 4 * steps_per_epoch(2) + 1))
    assert hurt.failures[0]["recovery"] == "checkpoint"
    assert hurt.generations[1]["start_step"] == 40 and hurt.redone_steps == 10
    diff = (hurt.outputs[0]["params"] - clean.outputs[0]["params"]).abs().max().item()
    assert diff <= 1e-6, diff
    assert [m["acc"] for m in hurt.metrics] == pytest.approx([m["acc"] for m in clean.metrics], abs=1e-6)
