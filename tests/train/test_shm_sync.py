"""Sync mode on the shared-memory transport, through the Trainer (issue 13, "must show" 1).

* 2 workers with ``grad_transport="shm"`` are one process with twice the batch (<= 1e-5) for an
  MLP and a convnet with SGD+momentum and Adam, replicated and with ZeRO-1; with gradient
  accumulation; with fp16/bf16 compression (as close as the gloo tests allow); and after every
  step the parameters are bit-identical on every rank;
* in the same jobs, a twin model wrapped in plain DDP (gloo's all-reduce on the same process
  group) ends with the same parameters (<= 1e-6), also with 3 and 4 ranks and one bucket per
  parameter (a bucket of 1 and of 3 elements: fewer than the ranks);
* ``synctrain.all_reduce``/``broadcast``/``barrier`` take the same path, and
  ``strategy_metrics()["grad_transport"]`` says "shm" (also for "auto" on CPU ranks);
* a rank SIGKILLed mid-training fails the job within seconds (not the 300 s collective timeout)
  naming that rank, and nothing is left in /dev/shm; nor after kill -9 of the driver;
* ``grad_transport="nccl"`` on CPU ranks is a ConfigError before any worker starts.

Every Trainer here runs with ``step_log=False`` (no coordinator to start).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

import synctrain
from synctrain.errors import ConfigError, WorkerDiedError
from synctrain.strategies import shm_allreduce as shm

pytestmark = [pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(shm.supported() is not None, reason=str(shm.supported()))]

STEPS = 12
PER_WORKER_BATCH = 8


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 5))

    def forward(self, x):
        return self.net(x)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 2 * 2, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


class Tiny(nn.Module):
    """Odd sizes, and a 1-element parameter: with one bucket per parameter, buckets of 1 and 3."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(7, 5)
        self.b = nn.Linear(5, 3)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))) * self.scale


MODELS = {"mlp": (MLP, (20,)), "conv": (ConvNet, (1, 8, 8)), "tiny": (Tiny, (7,))}
OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
}


def make_data(model_name: str, steps: int, global_batch: int):
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(steps, global_batch, *MODELS[model_name][1], generator=g)
    y = torch.randint(0, 5 if model_name != "tiny" else 3, (steps, global_batch), generator=g)
    return x, y


def digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in getattr(model, "module", model).parameters()]


def train_case(model_name: str, opt_name: str, accum: int = 1, twin: bool = False) -> dict:
    """Rank r trains on slice r of each step's global batch; ``twin``: a second copy in plain
    DDP (gloo's all-reduce, no hook) takes the same steps."""
    ctx = synctrain.get_context()
    rank, world = ctx.rank, ctx.world_size
    torch.manual_seed(100 + rank)  # different init per rank: the broadcast must fix it
    model = synctrain.prepare_model(MODELS[model_name][0]())
    opt = synctrain.prepare_optimizer(OPTIMIZERS[opt_name](model.parameters()))
    plain = plain_opt = None
    if twin:
        torch.manual_seed(100 + rank)
        plain = DistributedDataParallel(MODELS[model_name][0](), bucket_cap_mb=1e-6)
        plain_opt = OPTIMIZERS[opt_name](plain.parameters())
    x, y = make_data(model_name, STEPS * accum, world * PER_WORKER_BATCH // accum)
    b = PER_WORKER_BATCH // accum
    digests = []
    for t in range(STEPS * accum):
        xb, yb = x[t, rank * b:(rank + 1) * b], y[t, rank * b:(rank + 1) * b]
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        digests.append(digest(model))
        if plain is not None and plain_opt is not None:
            plain_opt.zero_grad()
            F.cross_entropy(plain(xb), yb).backward()
            plain_opt.step()
    return {"params": params(model), "digests": digests, "twin": params(plain) if plain else None}


def reference(model_name: str, opt_name: str, world: int, accum: int = 1) -> list[torch.Tensor]:
    """One plain process, the whole global batch, rank 0's initial parameters."""
    torch.manual_seed(100)
    model = MODELS[model_name][0]()
    opt = OPTIMIZERS[opt_name](model.parameters())
    x, y = make_data(model_name, STEPS * accum, world * PER_WORKER_BATCH // accum)
    for t in range(0, STEPS * accum, accum):
        opt.zero_grad()
        F.cross_entropy(model(torch.cat(list(x[t:t + accum]))), torch.cat(list(y[t:t + accum]))).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def max_abs_diff(a, b) -> float:
    return max(float((u - v).abs().max()) for u, v in zip(a, b, strict=True))


def fit(loop, workers: int = 2, **options) -> synctrain.Result:
    return synctrain.Trainer(loop, num_workers=workers, mode="sync", use_gpu=False, progress=False,
                             step_log=False, **options).fit()


def check_ranks_identical(result: synctrain.Result, key: str) -> None:
    first = result.outputs[0][key]["digests"]
    for rank, out in enumerate(result.outputs):
        assert out[key]["digests"] == first, f"{key}: rank {rank} diverged from rank 0 at some step"


# ---- equivalence ---------------------------------------------------------------------------
def cases_loop(config):
    out = {f"{m}/{o}": train_case(m, o, twin=config["twin"]) for m, o in config["cases"]}
    t = torch.arange(10, dtype=torch.float32) * (synctrain.get_context().rank + 1)
    synctrain.all_reduce(t, op="mean")
    b = torch.full((5, 3), float(synctrain.get_context().rank)).t()  # not contiguous
    synctrain.broadcast(b, src=1)
    synctrain.barrier()
    return {**out, "mean": t, "broadcast": b, "metrics": synctrain.strategy_metrics()}


@pytest.mark.parametrize("shard_optimizer", [False, True], ids=["replicated", "zero1"])
def test_shm_equals_one_big_batch_process_and_gloo(ray_session, shard_optimizer):
    cases = [("mlp", "sgd_momentum"), ("mlp", "adam"), ("conv", "sgd_momentum"), ("conv", "adam")]
    result = fit(cases_loop, grad_transport="shm", shard_optimizer=shard_optimizer,
                 config={"cases": cases, "twin": not shard_optimizer})
    for model_name, opt_name in cases:
        key = f"{model_name}/{opt_name}"
        check_ranks_identical(result, key)
        out = result.outputs[0][key]
        diff = max_abs_diff(out["params"], reference(model_name, opt_name, 2))
        assert diff <= 1e-5, f"{key}: max abs diff {diff:.3g} from the single-process run"
        if out["twin"] is not None:
            assert max_abs_diff(out["params"], out["twin"]) <= 1e-6, f"{key}: differs from gloo's DDP"
    for out in result.outputs:
        assert out["metrics"]["grad_transport"] == "shm"
        assert torch.equal(out["mean"], torch.arange(10, dtype=torch.float32) * 1.5)
        assert torch.equal(out["broadcast"], torch.ones(3, 5))


def accum_loop(config):
    return {"mlp": train_case("mlp", "sgd_momentum", accum=2)}


def test_shm_with_gradient_accumulation_equals_big_batch(ray_session):
    result = fit(accum_loop, grad_transport="shm", grad_accum_steps=2)
    check_ranks_identical(result, "mlp")
    diff = max_abs_diff(result.outputs[0]["mlp"]["params"], reference("mlp", "sgd_momentum", 2, accum=2))
    assert diff <= 1e-5, diff


@pytest.mark.parametrize("compression", ["fp16", "bf16"])
def test_shm_with_compression_keeps_ranks_identical_and_close(ray_session, compression):
    result = fit(compression_loop, grad_transport="shm", grad_compression=compression)
    check_ranks_identical(result, "mlp")
    diff = max_abs_diff(result.outputs[0]["mlp"]["params"], reference("mlp", "sgd_momentum", 2))
    assert 0 < diff <= (5e-3 if compression == "fp16" else 3e-2), diff


def compression_loop(config):
    return {"mlp": train_case("mlp", "sgd_momentum")}


def many_ranks_loop(config):
    return {"tiny": train_case("tiny", "sgd_momentum", twin=True),
            "mlp": train_case("mlp", "adam", twin=True), "metrics": synctrain.strategy_metrics()}


@pytest.mark.parametrize("workers", [3, 4])
def test_three_and_four_ranks_match_gloo(ray_session, workers):
    """Odd slice sizes, and buckets of 1 and 3 elements (one bucket per parameter)."""
    result = fit(many_ranks_loop, workers=workers, grad_transport="auto", bucket_cap_mb=1e-6)
    for key in ("tiny", "mlp"):
        check_ranks_identical(result, key)
        for out in result.outputs:
            assert max_abs_diff(out[key]["params"], out[key]["twin"]) <= 1e-6, key
    assert {out["metrics"]["grad_transport"] for out in result.outputs} == {"shm"}


# ---- faults --------------------------------------------------------------------------------
def dying_loop(config):
    ctx = synctrain.get_context()
    model = synctrain.prepare_model(MLP())
    opt = synctrain.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=0.01))
    for step in range(10_000):
        if ctx.rank == config["victim"] and step == config["step"]:
            os.kill(os.getpid(), signal.SIGKILL)
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(8, 20)), torch.randint(0, 5, (8,))).backward()
        opt.step()


def shm_files() -> set[str]:
    return {p.name for p in pathlib.Path(shm.SHM_DIR).glob(f"{shm.PREFIX}*")}


def test_a_rank_killed_mid_training_fails_the_job_naming_it(ray_session):
    before = shm_files()
    with pytest.raises(WorkerDiedError) as info:
        fit(dying_loop, workers=3, grad_transport="shm", config={"victim": 1, "step": 20})
    assert info.value.rank == 1, info.value  # the survivors' CollectiveErrors are secondary
    assert shm_files() - before == set(), "kill -9 of a rank left a segment in /dev/shm"


def healing_loop(config):
    ctx = synctrain.get_context()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(512, 20, generator=g), torch.randint(0, 5, (512,), generator=g)
    torch.manual_seed(0)
    model = synctrain.prepare_model(MLP())
    opt = synctrain.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    loader = synctrain.prepare_data_loader(DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True))
    step = ctx.start_step
    for _epoch in range(HEAL_EPOCHS):
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            step += 1
            if ctx.rank == 1 and ctx.generation == 1 and step == 20:
                os.kill(os.getpid(), signal.SIGKILL)
    return {"transport": synctrain.strategy_metrics()["grad_transport"], "generation": ctx.generation}


HEAL_EPOCHS = 3


def test_survivors_stop_at_once_and_heal_the_job_in_a_new_generation(ray_session, tmp_path):
    """With the step log: rank 1 is killed at step 20; rank 0, inside a shared-memory
    collective, must end its run within seconds (a CollectiveError, secondary) so that it can
    hand its state to the replacement. Were it to wait for the 300 s collective timeout, the
    driver would give up on it after 60 s and count a second failure (a stalled survivor)."""
    before = shm_files()
    result = synctrain.Trainer(healing_loop, num_workers=2, mode="sync", use_gpu=False, progress=False,
                               grad_transport="shm", storage_path=str(tmp_path), job_name="heal",
                               checkpoint_every=10, collective_timeout_s=300.0).fit()
    [failure] = result.failures
    assert failure["kind"] == "died" and failure["rank"] == 1 and failure["recovery"] == "peer", failure
    assert [s["step"] for s in result.steps] == list(range(1, HEAL_EPOCHS * 16 + 1))
    assert [g["generation"] for g in result.generations] == [1, 2]
    assert [o["transport"] for o in result.outputs] == ["shm", "shm"]
    assert [o["generation"] for o in result.outputs] == [2, 2]  # a fresh segment for generation 2
    assert shm_files() - before == set()


DRIVER = textwrap.dedent("""
    import os, torch, ray, synctrain
    import torch.nn.functional as F

    def loop(config):
        model = synctrain.prepare_model(torch.nn.Linear(20, 5))
        opt = synctrain.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=0.01))
        for step in range(1_000_000):
            opt.zero_grad()
            F.cross_entropy(model(torch.randn(8, 20)), torch.randint(0, 5, (8,))).backward()
            opt.step()
            if step == 5 and synctrain.get_context().rank == 0:
                print("TRAINING", flush=True)

    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    synctrain.Trainer(loop, num_workers=2, use_gpu=False, progress=False, step_log=False,
                      grad_transport="shm").fit()
""")


def test_kill_9_of_the_driver_leaves_nothing_in_dev_shm(ray_session, tmp_path):
    before = shm_files()
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    address = ray_session.get_runtime_context().gcs_address
    env = dict(os.environ, RAY_ADDRESS=address, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 180
        for line in proc.stdout:
            if "TRAINING" in line or time.monotonic() > deadline:
                break
        assert "TRAINING" in line, "the driver's job never started training"
        assert shm_files() - before == set(), "a mapped segment must have no name"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert shm_files() - before == set()


# ---- configuration -------------------------------------------------------------------------
def test_nccl_on_cpu_ranks_is_a_config_error(ray_session):
    with pytest.raises(ConfigError, match="grad_transport='nccl' needs GPU ranks"):
        fit(compression_loop, grad_transport="nccl")


def test_unknown_transport_is_refused_before_anything_starts():
    with pytest.raises(ConfigError, match="grad_transport must be one of"):
        synctrain.Trainer(compression_loop, grad_transport="tcp", step_log=False)


def own_hook_loop(config):
    import torch.distributed as dist

    model = synctrain.prepare_model(MLP())
    calls = []

    def hook(state, bucket):
        calls.append(bucket.index())
        buf = bucket.buffer().div_(dist.get_world_size())
        return dist.all_reduce(buf, async_op=True).get_future().then(lambda f: f.value()[0])

    model.register_comm_hook(None, hook)  # after prepare_model: the loop's own hook wins
    opt = synctrain.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=0.05))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(8, 20)), torch.randint(0, 5, (8,))).backward()
        opt.step()
    return {"calls": len(calls), "digest": digest(model.module)}


def test_a_comm_hook_of_the_loops_own_replaces_the_shared_memory_one(ray_session):
    result = fit(own_hook_loop, grad_transport="shm")
    assert all(out["calls"] >= 3 for out in result.outputs), result.outputs
    assert result.outputs[0]["digest"] == result.outputs[1]["digest"]


def gpu_loop(config):
    model = synctrain.prepare_model(MLP())
    opt = synctrain.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=0.05))
    device = synctrain.get_context().device
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(8, 20, device=device)), torch.randint(0, 5, (8,), device=device)).backward()
        opt.step()
    return {"transport": synctrain.strategy_metrics()["grad_transport"], "device": str(device)}


@pytest.mark.gpu
def test_a_gpu_rank_keeps_nccl(ray_session):
    """The GPU path is unchanged: "auto" on a GPU rank is NCCL (one GPU holds one NCCL rank)."""
    if ray_session.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the Ray cluster has no GPU")
    result = synctrain.Trainer(gpu_loop, num_workers=1, use_gpu=True, progress=False, step_log=False).fit()
    assert result.outputs[0] == {"transport": "nccl", "device": "cuda:0"}
    with pytest.raises(ConfigError, match="grad_transport='shm' moves CPU tensors"):
        synctrain.Trainer(gpu_loop, num_workers=1, use_gpu=True, progress=False, step_log=False,
                          grad_transport="shm").fit()
