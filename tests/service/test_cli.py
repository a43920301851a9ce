"""The newcomer's path: `coordinator local --nodes 3` in one terminal, `coordinator put/get`
in another (found through the local cluster's state file), plus `serve` argument errors."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import time

import pytest

from coordinator.cli import invocation

pytestmark = pytest.mark.slow


class LocalProcess:
    """A `coordinator local` running in the background, its output in a file."""

    def __init__(self, tmp_path: pathlib.Path, env: dict, *args: str, name: str = "local") -> None:
        self.out_path = tmp_path / f"{name}.out"
        self._out = open(self.out_path, "w+")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(invocation() + ["local", *args], stdout=self._out,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)

    @property
    def text(self) -> str:
        return self.out_path.read_text()

    def wait_for_output(self, wait_for, needle: str, timeout_s: float = 60.0) -> str:
        wait_for(lambda: needle in self.text or self.proc.poll() is not None,
                 f"`coordinator local` to print {needle!r}", timeout_s=timeout_s)
        assert needle in self.text, self.text
        return self.text

    def banner(self, wait_for) -> dict[str, str]:
        """The banner's fields (endpoints, token file, data dir, state file)."""
        text = self.wait_for_output(wait_for, "Ctrl-C")
        assert self.proc.poll() is None, text
        fields = {}
        for line in text.splitlines():
            key, sep, value = line.strip().partition(": ")
            if sep and key in ("endpoints", "token file", "data dir", "state file"):
                fields[key] = value.strip()
        return fields

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._out.close()
        return self.proc.returncode


def _cli(env: dict, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(invocation() + list(args), env=env, input=stdin,
                            capture_output=True, timeout=120)
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result


def test_local_cluster_then_put_and_get_from_another_terminal(tmp_path, wait_for) -> None:
    env = dict(os.environ, COORDINATOR_STATE_FILE=str(tmp_path / "state.json"))
    local = LocalProcess(tmp_path, env, "--nodes", "3")
    try:
        banner = local.banner(wait_for)
        assert "endpoints" in banner and "token file" in banner
        put = _cli(env, "put", "hello", "world")
        assert put.returncode == 0, put.stderr
        get = _cli(env, "get", "hello")
        assert get.returncode == 0 and get.stdout.strip() == "world", get.stderr
        assert _cli(env, "get", "missing").returncode == 3
        assert _cli(env, "cas", "hello", "world", "there").returncode == 0
        assert _cli(env, "get", "hello", "--stale").returncode == 0
        status = _cli(env, "status", "--all")
        assert status.returncode == 0 and status.stdout.count('"role"') == 3, status.stderr
        _values_from_stdin_and_files(env, banner, tmp_path)
        _second_local_on_the_same_state_file_refuses(env, tmp_path, wait_for)
    finally:
        code = local.stop()
    assert code == 0, local.text
    assert not (tmp_path / "state.json").exists(), "the state file is removed on exit"


def _values_from_stdin_and_files(env: dict, banner: dict[str, str], tmp_path) -> None:
    """Issue 15, point 21: `-` reads stdin, --file a file (binary-safe); the connection
    flags also work before the subcommand; deleting a missing key exits 3 as documented."""
    assert _cli(env, "put", "from-stdin", "-", stdin=b"piped value\n").returncode == 0
    (tmp_path / "v.bin").write_bytes(b"from a file")
    assert _cli(env, "put", "from-file", "--file", str(tmp_path / "v.bin")).returncode == 0
    assert _cli(env, "get", "from-stdin").stdout == "piped value\n\n"
    assert _cli(env, "get", "from-file").stdout.strip() == "from a file"
    assert _cli(env, "cas", "from-file", "from a file", "-", stdin=b"swapped in").returncode == 0
    both = _cli(env, "put", "k", "v", "--file", str(tmp_path / "v.bin"))
    assert both.returncode == 2 and "exactly one" in both.stderr
    (tmp_path / "big.bin").write_bytes(b"x" * ((1 << 20) + 1))
    big = _cli(env, "put", "big", "--file", str(tmp_path / "big.bin"))
    assert big.returncode == 1 and "1048576 bytes" in big.stderr, big.stderr
    no_state = dict(env, COORDINATOR_STATE_FILE=str(tmp_path / "none.json"))
    flags = ["--endpoints", banner["endpoints"], "--token-file", banner["token file"]]
    before = _cli(no_state, *flags, "get", "from-file")
    assert before.returncode == 0 and before.stdout.strip() == "swapped in", before.stderr
    after = _cli(no_state, "get", "from-file", *flags)
    assert after.returncode == 0 and after.stdout.strip() == "swapped in", after.stderr
    assert _cli(env, "delete", "from-file").returncode == 0
    missing = _cli(env, "delete", "from-file")
    assert missing.returncode == 3 and "not found" in missing.stderr


def _second_local_on_the_same_state_file_refuses(env: dict, tmp_path, wait_for) -> None:
    """Issue 15, point 21: a second `coordinator local` on the state file of a running
    cluster refuses, naming it; another --state-file starts a second cluster."""
    second = subprocess.Popen(invocation() + ["local", "--nodes", "1"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        _, err = second.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(second.pid, signal.SIGKILL)
        second.communicate()
        pytest.fail("a second `coordinator local` started on a running cluster's state file")
    assert second.returncode == 1, err
    assert "still running" in err and str(tmp_path / "state.json") in err and "--state-file" in err
    other = dict(env, COORDINATOR_STATE_FILE=str(tmp_path / "unused.json"))
    third = LocalProcess(tmp_path, other, "--nodes", "1", "--state-file",
                         str(tmp_path / "second.json"), name="second")
    try:
        third.banner(wait_for)
        put = _cli(other, "--state-file", str(tmp_path / "second.json"), "put", "k", "second")
        assert put.returncode == 0, put.stderr
        assert _cli(env, "get", "k").returncode == 3, "the clusters are separate"
    finally:
        assert third.stop() == 0, third.text


def _node_pid(state_file: pathlib.Path, node_id: int) -> int:
    return int(json.loads(state_file.read_text())["pids"][str(node_id)])


def test_local_keeps_serving_when_a_node_dies_restarts_it_and_keeps_its_log(
        tmp_path, wait_for) -> None:
    """Issue 15, point 18: kill -9 one node of `coordinator local`: the others keep serving,
    the dead one is restarted after the delay (and says so), and its log survives exit."""
    env = dict(os.environ, COORDINATOR_STATE_FILE=str(tmp_path / "state.json"))
    local = LocalProcess(tmp_path, env, "--nodes", "3", "--restart-delay", "1")
    data_dir = None
    try:
        banner = local.banner(wait_for)
        data_dir = pathlib.Path(banner["data dir"])
        victim = _node_pid(tmp_path / "state.json", 2)
        os.kill(victim, signal.SIGKILL)
        local.wait_for_output(wait_for, "node 2 exited (killed by SIGKILL)")
        assert local.proc.poll() is None, local.text
        put = _cli(env, "put", "during", "failover")
        assert put.returncode == 0, put.stderr
        local.wait_for_output(wait_for, "restarting node 2 in 1.0 s")
        local.wait_for_output(wait_for, "node 2 is serving again")
        wait_for(lambda: _node_pid(tmp_path / "state.json", 2) != victim,
                 "the state file to record the new pid")
        status = _cli(env, "status", "--all")
        assert status.returncode == 0 and '"down"' not in status.stdout, status.stdout
    finally:
        code = local.stop()
    try:
        assert code == 0, local.text
        assert data_dir is not None and (data_dir / "node-2.log").exists(), local.text
        assert f"kept {data_dir}" in local.text
    finally:
        if data_dir is not None:
            shutil.rmtree(data_dir, ignore_errors=True)


def test_status_all_marks_a_dead_node_and_exits_by_majority(tmp_path, wait_for) -> None:
    """Issue 15, point 19 (and --no-restart from point 18): every node is listed, the dead
    one marked; the exit status is 0 while a majority answers, 1 once it does not."""
    env = dict(os.environ, COORDINATOR_STATE_FILE=str(tmp_path / "state.json"))
    local = LocalProcess(tmp_path, env, "--nodes", "3", "--no-restart", "--data-dir",
                         str(tmp_path / "data"))
    try:
        local.banner(wait_for)
        os.kill(_node_pid(tmp_path / "state.json", 3), signal.SIGKILL)
        local.wait_for_output(wait_for, "node 3 stays down (--no-restart)")
        status = _cli(env, "status", "--all")
        lines = [json.loads(line) for line in status.stdout.splitlines()]
        assert status.returncode == 0, status.stdout + status.stderr
        assert len(lines) == 3 and [x["role"] for x in lines].count("down") == 1, lines
        assert "2 of 3 nodes answer" in status.stderr
        assert _cli(env, "put", "k", "v").returncode == 0  # two of three still commit
        os.kill(_node_pid(tmp_path / "state.json", 2), signal.SIGKILL)
        local.wait_for_output(wait_for, "node 2 stays down")
        status = _cli(env, "status", "--all")
        assert status.returncode == 1 and status.stdout.count('"down"') == 2, status.stdout
        assert "no majority" in status.stderr
    finally:
        assert local.stop() == 0, local.text
    assert (tmp_path / "data" / "node-3.log").exists()


def test_token_subcommand_writes_a_private_token_file(tmp_path) -> None:
    out = tmp_path / "token"
    made = _cli(dict(os.environ), "token", "--out", str(out))
    assert made.returncode == 0, made.stderr
    assert len(out.read_text().strip()) == 64 and (out.stat().st_mode & 0o777) == 0o600
    again = _cli(dict(os.environ), "token", "--out", str(out))
    assert again.returncode == 1 and "not overwriting" in again.stderr
    printed = _cli(dict(os.environ), "token")
    assert printed.returncode == 0 and len(printed.stdout.strip()) == 64


def test_client_command_without_a_cluster_says_what_to_do(tmp_path) -> None:
    env = dict(os.environ, COORDINATOR_STATE_FILE=str(tmp_path / "none.json"))
    env.pop("COORDINATOR_ENDPOINTS", None)
    result = subprocess.run(invocation() + ["get", "k"], env=env, capture_output=True,
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
    result = subprocess.run(invocation() + ["sim", "--seeds", "1"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "failed: 0" in result.stdout + result.stderr


def test_restart_policy_backs_off_in_a_crash_loop_and_resets_once_stable() -> None:
    from coordinator.cli import RestartPolicy

    policy = RestartPolicy(delay_s=2.0, max_delay_s=10.0, stable_s=30.0)
    assert policy.restart_at(1, died_at=100.0) == 102.0
    for started, died, due in ((102.0, 103.0, 107.0),  # died 1 s after its restart: 4 s
                               (107.0, 108.0, 116.0),  # 8 s
                               (116.0, 117.0, 127.0)):  # capped at 10 s
        policy.started(1, started)
        assert policy.restart_at(1, died) == due
    policy.started(1, 127.0)
    assert policy.restart_at(1, 200.0) == 202.0  # it ran 73 s: back to the short delay
    assert policy.restart_at(2, 0.0) == 2.0  # each node has its own history
    assert RestartPolicy(restart=False).restart_at(1, 5.0) is None  # --no-restart
