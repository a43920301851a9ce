"""The newcomer's path: `coordinator local --nodes 3` in one terminal, `coordinator put/get`
in another (found through the local cluster's state file), plus `serve` argument errors."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow


def _coordinator() -> list[str]:
    script = pathlib.Path(sys.executable).with_name("coordinator")
    if script.exists():
        return [str(script)]
    found = shutil.which("coordinator")
    return [found] if found else [sys.executable, "-m", "coordinator.cli"]


def test_local_cluster_then_put_and_get_from_another_terminal(tmp_path, wait_for) -> None:
    env = dict(os.environ, COORDINATOR_STATE_FILE=str(tmp_path / "state.json"))
    out = open(tmp_path / "local.out", "w+")  # noqa: SIM115 - read back below
    local = subprocess.Popen(_coordinator() + ["local", "--nodes", "3"], stdout=out,
                             stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_for(lambda: "Ctrl-C" in (tmp_path / "local.out").read_text() or local.poll() is not None,
                 "`coordinator local` to report the cluster")
        text = (tmp_path / "local.out").read_text()
        assert local.poll() is None, text
        assert "endpoints:" in text and "token file:" in text
        run = lambda *args: subprocess.run(_coordinator() + list(args), env=env,  # noqa: E731
                                           capture_output=True, text=True, timeout=120)
        put = run("put", "hello", "world")
        assert put.returncode == 0, put.stderr
        get = run("get", "hello")
        assert get.returncode == 0 and get.stdout.strip() == "world", get.stderr
        assert run("get", "missing").returncode == 3
        assert run("cas", "hello", "world", "there").returncode == 0
        assert run("get", "hello", "--stale").returncode == 0
        status = run("status", "--all")
        assert status.returncode == 0 and status.stdout.count('"role"') == 3, status.stderr
    finally:
        local.send_signal(signal.SIGINT)
        try:
            local.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(local.pid, signal.SIGKILL)
            local.wait()
        out.close()
    assert local.returncode == 0, (tmp_path / "local.out").read_text()
    assert not (tmp_path / "state.json").exists(), "the state file is removed on exit"


def test_client_command_without_a_cluster_says_what_to_do(tmp_path) -> None:
    env = dict(os.environ, COORDINATOR_STATE_FILE=str(tmp_path / "none.json"))
    env.pop("COORDINATOR_ENDPOINTS", None)
    result = subprocess.run(_coordinator() + ["get", "k"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "coordinator local" in result.stderr


def test_serve_refuses_a_data_dir_in_use(tmp_path) -> None:
    from coordinator import LocalCluster

    with LocalCluster(nodes=1, data_dir=tmp_path / "c") as cluster:
        cmd = cluster._command(1)
        started = time.monotonic()
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert result.returncode == 1 and "lock" in result.stderr.lower(), result.stderr
        assert time.monotonic() - started < 60


def test_sim_subcommand_runs_the_simulator() -> None:
    result = subprocess.run(_coordinator() + ["sim", "--seeds", "1"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "failed: 0" in result.stdout + result.stderr
