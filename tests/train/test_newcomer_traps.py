"""A newcomer's silent traps (issue 15, points 11-17 and 22): each is an error or a warning now.

Each test names its point. Training runs use 2 workers and tiny models; ``step_log=False``
where the step log is beside the point. The Ray-connection tests that need a Ray of their own
(a dead address, ``ray start --head``, a stale ``ray_current_cluster``) run in subprocesses
with their own ``RAY_TMPDIR``, so the session's shared Ray and the machine's /tmp/ray are left
alone.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import synctrain
from synctrain import ConfigError, TrainingFailedError, raycluster
from synctrain.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def isolated_env(tmp: str | os.PathLike[str]) -> dict[str, str]:
    """The environment for a subprocess with a Ray temp dir of its own and no RAY_ADDRESS."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(tmp)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def short_tmpdir() -> str:
    # Ray's socket paths (<tmp>/ray/session_<date>_<pid>/sockets/plasma_store) must fit 107 bytes
    return tempfile.mkdtemp(prefix="st", dir="/tmp")  # noqa: S108


# ---- point 11: a prepared model trained with an unprepared optimizer --------------------
def async_without_prepare_optimizer(config):
    torch.manual_seed(0)
    model = synctrain.prepare_model(nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # not prepared: trains locally only
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        synctrain.report({"loss": 1.0})
    return model.weight.detach().tolist()


@pytest.mark.ray
def test_point11_async_without_prepare_optimizer_is_a_configuration_error(ray_session):
    # The default path (step log): the error is fatal, not retried up to max_failures times.
    with pytest.raises(TrainingFailedError) as info:
        synctrain.Trainer(async_without_prepare_optimizer, num_workers=2, mode="async", use_gpu=False,
                          progress=False, max_failures=3).fit()
    assert info.value.exc_type == "ConfigError"
    assert "synctrain.prepare_optimizer" in str(info.value)
    assert len(info.value.failures) <= 2  # the first failure gave up (one record per rank at most)


def test_point11_a_loop_that_never_reports_is_stopped_at_its_second_backward():
    from synctrain.context import Session, TrainContext
    from synctrain.loopchecks import for_session

    session = Session(TrainContext(mode="async", world_size=2), strategy=None)
    model = nn.Linear(3, 1)
    for_session(session).after_prepare_model(model, model)
    model(torch.randn(2, 3)).sum().backward()  # one backward may precede prepare_optimizer
    with pytest.raises(ConfigError, match="prepare_optimizer"):
        model(torch.randn(2, 3)).sum().backward()
    covered = nn.Linear(3, 1)  # with a prepared optimizer over it, nothing is watched
    checks = for_session(Session(TrainContext(mode="async", world_size=2), strategy=None))
    checks.after_prepare_model(covered, covered)
    opt = torch.optim.SGD(covered.parameters(), lr=0.1)
    checks.after_prepare_optimizer(opt, opt)
    for _ in range(3):
        covered(torch.randn(2, 3)).sum().backward()
    assert checks.watches == [] and not covered.weight._post_accumulate_grad_hooks


def sync_without_prepare_optimizer(config):
    torch.manual_seed(synctrain.get_context().rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = synctrain.prepare_model(nn.Linear(4, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
            synctrain.report({"loss": 1.0})
    return [str(w.message) for w in caught]


@pytest.mark.ray
def test_point11_sync_without_prepare_optimizer_warns_that_steps_are_not_counted(ray_session):
    result = synctrain.Trainer(sync_without_prepare_optimizer, num_workers=2, mode="sync", use_gpu=False,
                               progress=False, step_log=False).fit()
    rank0, rank1 = result.outputs
    ours = [m for m in rank0 if "prepare_optimizer" in m]
    assert len(ours) == 1 and "cannot count optimizer steps" in ours[0], rank0  # once, on rank 0
    assert not [m for m in rank1 if "prepare_optimizer" in m]
    assert [m["step"] for m in result.metrics] == [0, 0]  # what the warning explains


# ---- point 12: preparing what is already prepared ------------------------------------------
def prepare_twice(config):
    from torch.nn.parallel import DistributedDataParallel

    errors = {}
    model = nn.Linear(4, 2)
    prepared = synctrain.prepare_model(model)
    for name, again in (("same", model), ("returned", prepared)):
        try:
            synctrain.prepare_model(again)
        except ConfigError as exc:
            errors[name] = str(exc)
    if synctrain.get_context().mode == "sync":
        own_ddp = DistributedDataParallel(nn.Linear(4, 2))  # built by the loop itself
        try:
            synctrain.prepare_model(own_ddp)
        except ConfigError as exc:
            errors["ddp"] = str(exc)
        synctrain.prepare_model(nn.Linear(4, 3))  # a second, different model: fine (a GAN's two)
        opt = torch.optim.SGD(prepared.parameters(), lr=0.1)
        synctrain.prepare_optimizer(opt)
        try:
            synctrain.prepare_optimizer(opt)
        except ConfigError as exc:
            errors["optimizer"] = str(exc)
    else:
        try:
            synctrain.prepare_model(nn.Linear(4, 3))
        except ConfigError as exc:
            errors["second_model"] = str(exc)
    return errors


@pytest.mark.ray
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_point12_preparing_a_prepared_model_is_refused_in_both_modes(ray_session, mode):
    result = synctrain.Trainer(prepare_twice, num_workers=2, mode=mode, use_gpu=False, progress=False,
                               step_log=False).fit()
    errors = result.outputs[0]
    assert "already prepared" in errors["same"] and "already prepared" in errors["returned"], errors
    if mode == "sync":
        assert "DistributedDataParallel" in errors["ddp"]
        assert "already prepared" in errors["optimizer"]
    else:
        assert "one model per worker" in errors["second_model"]


# ---- point 13: a DataLoader not passed through prepare_data_loader --------------------------
def unprepared_loader_loop(config):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = TensorDataset(torch.arange(64, dtype=torch.float32).reshape(32, 2), torch.zeros(32, 1))
        loader = DataLoader(data, batch_size=4, shuffle=True)  # the trap: not prepared
        model = synctrain.prepare_model(nn.Linear(2, 1))
        opt = synctrain.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=0.01))
        for step, (x, y) in enumerate(loader):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            if step == 2:
                break
    return [str(w.message) for w in caught if "prepare_data_loader" in str(w.message)]


@pytest.mark.ray
def test_point13_a_dataloader_not_passed_through_prepare_data_loader_warns(ray_session):
    result = synctrain.Trainer(unprepared_loader_loop, num_workers=2, mode="sync", use_gpu=False,
                               progress=False, step_log=False).fit()
    rank0, rank1 = result.outputs
    assert len(rank0) == 1, rank0  # once, by rank 0
    assert "TensorDataset of 32 samples, batch_size=4" in rank0[0] and "each of the 2 ranks" in rank0[0]
    assert rank1 == []


def test_point13_only_loaders_that_are_not_sharded_are_found():
    from synctrain.data import shard_data_loader
    from synctrain.loopchecks import unprepared_loaders

    data = TensorDataset(torch.zeros(20, 2))
    sharded = iter(shard_data_loader(DataLoader(data, batch_size=2, shuffle=True), 2, 0, 0,
                                     torch.device("cpu")))
    next(sharded)
    assert unprepared_loaders() == []  # a prepared loader draws from a ShardedBatchSampler
    plain = iter(DataLoader(data, batch_size=5))
    next(plain)
    assert unprepared_loaders() == ["over a TensorDataset of 20 samples, batch_size=5"]
    del plain, sharded


# ---- point 14: evaluating on rank 0 only through the prepared model ------------------------
def rank0_eval_loop(config):
    torch.manual_seed(0)
    model = synctrain.prepare_model(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1)))
    opt = synctrain.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    for _epoch in range(3):
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(8, 4)).sum().backward()
            opt.step()
        if synctrain.get_context().rank == 0:  # the trap: should be model.module here
            model.eval()
            with torch.no_grad():
                model(torch.randn(8, 4))
            model.train()
    return True


@pytest.mark.ray
@pytest.mark.slow
def test_point14_a_rank0_only_evaluation_timeout_names_the_likely_cause(ray_session):
    with pytest.raises(TrainingFailedError) as info:
        synctrain.Trainer(rank0_eval_loop, num_workers=2, mode="sync", use_gpu=False, progress=False,
                          step_log=False, collective_timeout_s=8).fit()
    assert "model.module" in str(info.value) and "evaluating on some ranks only" in str(info.value)


def test_point14_only_timeouts_get_the_hint():
    from synctrain.strategies.allreduce import _explained_forward_timeout

    timeout = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting 5000ms for send")
    explained = _explained_forward_timeout(timeout)
    assert type(explained) is RuntimeError and "model.module" in str(explained)
    other = RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    assert _explained_forward_timeout(other) is other


# ---- point 15: which Ray cluster, decided before Ray is asked -------------------------------
DEAD_ADDRESS_SCRIPT = """
import sys, time, synctrain
from synctrain import ConfigError
started = time.monotonic()
try:
    synctrain.Trainer(lambda: 1, num_workers=2, use_gpu=False, progress=False, step_log=False,
                      ray_address=sys.argv[1]).fit()
except ConfigError as exc:
    print("ConfigError after %.1f s: %s" % (time.monotonic() - started, exc))
"""


def test_point15_a_ray_address_that_does_not_answer_fails_within_seconds(tmp_path):
    address = f"127.0.0.1:{closed_port()}"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", DEAD_ADDRESS_SCRIPT, address], capture_output=True,
                          text=True, timeout=120, env=isolated_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"cannot reach the Ray cluster at {address} (from ray_address)" in proc.stdout, proc.stdout
    assert time.monotonic() - started < 60  # Ray itself retries for ever


def test_point15_a_port_that_answers_but_not_as_ray_is_named(monkeypatch):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]

    def answer_like_a_web_server():
        conn, _ = server.accept()
        with conn:
            conn.recv(64)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    thread = threading.Thread(target=answer_like_a_web_server, daemon=True)
    thread.start()
    try:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        with pytest.raises(ConfigError, match="not as Ray does"):
            raycluster.plan(f"127.0.0.1:{port}", timeout_s=5)
    finally:
        thread.join(10)
        server.close()


def write_address_file(tmp: Path, address: str) -> None:
    (tmp / "ray").mkdir(parents=True, exist_ok=True)
    (tmp / "ray" / "ray_current_cluster").write_text(address)


@pytest.mark.ray
def test_point15_the_plan_joins_a_running_recorded_cluster_and_ignores_a_stale_one(
        ray_session, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert raycluster.plan(None) == raycluster.Plan(None, "")  # nothing recorded: a local Ray
    live = ray_session.get_runtime_context().gcs_address
    write_address_file(tmp_path, live)
    joined = raycluster.plan(None)
    assert joined.address == live and "joining the running Ray cluster" in joined.note
    write_address_file(tmp_path, f"127.0.0.1:{closed_port()}")
    stale = raycluster.plan(None)
    assert stale.address is None and "ignoring" in stale.note
    with pytest.raises(ConfigError, match="does not answer"):
        raycluster.plan("auto")
    assert raycluster.plan("local") == raycluster.Plan(None, "ray_address")


JOIN_SCRIPT = """
import os, sys, ray, synctrain
def loop(config):
    return synctrain.get_context().world_size
result = synctrain.Trainer(loop, num_workers=int(sys.argv[1]), use_gpu=False, progress=False,
                           step_log=False).fit()
assert result.outputs == [int(sys.argv[1])] * int(sys.argv[1]), result.outputs
print("gcs", ray.get_runtime_context().gcs_address)
"""


def _stop_head(head: subprocess.Popen) -> None:
    """Stop the `ray start --block` we started, and everything in its process group."""
    if head.poll() is None:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(15)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(head.pid, signal.SIGKILL)  # its raylet and GCS, if still there
    except ProcessLookupError:
        pass
    head.wait(15)


@pytest.mark.ray
@pytest.mark.slow
def test_point15_16_joins_a_ray_start_cluster_then_survives_its_stale_file():
    tmp = Path(short_tmpdir())
    try:
        recorded = _join_a_ray_start_cluster(tmp)
        # The file now names a stopped cluster: a local Ray starts instead, and more workers
        # than cores is said with the numbers (point 16).
        workers = (os.cpu_count() or 1) + 1
        alone = subprocess.run([sys.executable, "-c", JOIN_SCRIPT, str(workers)], capture_output=True,
                               text=True, timeout=300, env=isolated_env(tmp))
        assert alone.returncode == 0, alone.stderr[-3000:]
        assert f"gcs {recorded}" not in alone.stdout
        assert f"ignoring {tmp / 'ray' / 'ray_current_cluster'}" in alone.stderr
        assert f"{workers} workers x 1 CPUs need {workers} CPUs but this machine has " \
               f"{os.cpu_count()} cores" in alone.stderr
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _join_a_ray_start_cluster(tmp: Path) -> str:
    """Start `ray start --head --block` with its own temp dir, run a job with no address (it
    must join that cluster), stop the cluster. Returns the address it recorded."""
    env = isolated_env(tmp)
    ray_cli = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen([ray_cli, "start", "--head", f"--port={closed_port()}", "--num-cpus=2",
                             "--include-dashboard=false", "--block"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address_file = tmp / "ray" / "ray_current_cluster"
    try:
        deadline = time.monotonic() + 180
        while not (address_file.exists() and raycluster.probe_gcs(address_file.read_text().strip()) is None):
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "ray start --head did not come up in 180 s"
            time.sleep(0.5)
        recorded = address_file.read_text().strip()
        joined = subprocess.run([sys.executable, "-c", JOIN_SCRIPT, "2"], capture_output=True, text=True,
                                timeout=300, env=env)
        assert joined.returncode == 0, joined.stderr[-3000:]
        assert f"gcs {recorded}" in joined.stdout  # it joined the running cluster
        return recorded
    finally:
        _stop_head(head)


# ---- point 16: more workers than cores on the auto-started local Ray ------------------------
def test_point16_more_workers_than_cores_are_counted_in_the_warning():
    assert raycluster.local_cpus(2, 1.0, 4) == (4, None)
    cpus, warning = raycluster.local_cpus(6, 1.0, 2)
    assert cpus == 6 and "6 workers x 1 CPUs need 6 CPUs but this machine has 2 cores" in warning
    assert "num_workers <= 2" in warning


# ---- point 17: a progress bar with a total and an ETA ---------------------------------------
def test_point17_the_progress_bar_shows_a_total_once_the_loop_reports_one():
    from synctrain.driver.run import _Progress

    bar = _Progress(True, "job", tty=True)  # a bar as on a terminal (pytest captures stderr)
    try:
        bar.show([{"step": 0, "total_steps": 40}])
        bar.show([{"step": 10, "loss": 0.5}])
        shown = str(bar._bar)
        assert "10/40" in shown and "<" in shown, shown  # "[elapsed<remaining, rate]"
        assert "total_steps" not in shown and "loss=0.5" in shown
        bar.show([{"step": 4}])  # a recovery redid steps: the bar goes back
        assert bar._bar.n == 4
    finally:
        bar.close()


# ---- point 22: the command line ---------------------------------------------------------------
def test_point22_bench_accepts_the_file_names_the_readme_lists():
    listed = set(re.findall(r"`benchmarks/(\w+)\.py`", (ROOT / "README.md").read_text()))
    assert {"ps_throughput", "raft_core", "coordinator_bench"} <= listed
    for name in listed:
        assert (ROOT / "benchmarks" / f"{name}.py").is_file()
        args = build_parser().parse_args(["bench", name, "--help"])
        assert args.name == name


def test_point22_cluster_to_an_address_that_does_not_answer_fails_within_seconds(tmp_path):
    address = f"127.0.0.1:{closed_port()}"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "synctrain.cli", "cluster", "--address", address],
                          capture_output=True, text=True, timeout=120, env=isolated_env(tmp_path))
    assert proc.returncode == 1, (proc.stdout, proc.stderr[-2000:])
    assert f"cannot reach the Ray cluster at {address} (from --address)" in proc.stderr
    assert time.monotonic() - started < 60
