"""`coordinator local` / LocalCluster and the files it trusts (issue 15, point 5): a token
file someone else planted in its data directory is refused, never adopted, and what it
creates is private to its user (directories 0700, token and logs 0600)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from coordinator.cluster import LocalCluster, read_own_token_file, write_token_file

pytestmark = pytest.mark.timeout(120)


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_token_file_others_can_read_is_refused_and_no_node_starts(tmp_path, mode) -> None:
    data = tmp_path / "data"
    data.mkdir()
    planted = data / "token"
    planted.write_text("p" * 64 + "\n")  # e.g. left by someone who wants to join the cluster
    planted.chmod(mode)
    cluster = LocalCluster(nodes=1, data_dir=data)
    with pytest.raises(PermissionError, match=r"refusing the token file.*readable by you alone"):
        cluster.start()
    assert cluster.procs == {}
    cluster.stop()


@pytest.mark.skipif(os.getuid() != 0, reason="chown to another user needs root")
def test_a_token_file_of_another_user_is_refused(tmp_path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    planted = data / "token"
    planted.write_text("p" * 64 + "\n")
    planted.chmod(0o600)
    os.chown(planted, 65534, 65534)  # nobody: private, but not ours
    with pytest.raises(PermissionError, match="owned by uid 65534"):
        read_own_token_file(planted)
    other_dir = tmp_path / "theirs"
    other_dir.mkdir(mode=0o777)
    os.chown(other_dir, 65534, 65534)
    with pytest.raises(PermissionError, match="belongs to uid 65534"):
        LocalCluster(nodes=1, data_dir=other_dir).start()


def test_a_planted_symlink_is_neither_read_nor_written_through(tmp_path) -> None:
    target = tmp_path / "attacker-owned"
    target.write_text("a" * 64 + "\n")
    target.chmod(0o600)
    link = tmp_path / "token"
    link.symlink_to(target)
    with pytest.raises(PermissionError, match="symlink"):
        read_own_token_file(link)
    with pytest.raises(FileExistsError):
        write_token_file(link)
    assert target.read_text() == "a" * 64 + "\n"


def test_what_local_creates_is_private(tmp_path) -> None:
    data = tmp_path / "fresh" / "data"
    with LocalCluster(nodes=1, data_dir=data) as cluster:
        assert _mode(data) == 0o700
        assert _mode(cluster.token_file) == 0o600
        assert _mode(cluster.log_path(1)) == 0o600
        assert read_own_token_file(cluster.token_file) == cluster.token
        token = cluster.token
    with LocalCluster(nodes=1, data_dir=data) as again:  # its own token file: adopted
        assert again.token == token


def test_coordinator_local_reports_a_planted_token_file(tmp_path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "token").write_text("p" * 64 + "\n")
    (data / "token").chmod(0o644)
    env = dict(os.environ, COORDINATOR_STATE_FILE=str(tmp_path / "state.json"))
    result = subprocess.run([sys.executable, "-m", "coordinator.cli", "local", "--nodes", "1",
                             "--data-dir", str(data)], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "refusing the token file" in result.stderr and "0644" in result.stderr


def test_a_port_taken_after_it_was_picked_gets_a_new_one(make_cluster, monkeypatch) -> None:
    """CI saw a node exit with 'address already in use': another process took the port that
    was free when the cluster picked it. A new cluster then starts again on new ports."""
    import socket

    from coordinator import cluster as cluster_module

    with socket.socket() as blocker:  # holds the first port the cluster will pick
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        picks = iter([taken])
        real = cluster_module.free_port
        monkeypatch.setattr(cluster_module, "free_port", lambda host="127.0.0.1": next(picks, None) or real(host))
        cluster = make_cluster()
        assert taken not in {port for _, port in cluster.addresses.values()}
        with cluster.client(timeout_s=10.0) as client:
            client.put("k", b"v")
            assert client.get("k") == b"v"


_FORGETFUL = """
import os, sys
from coordinator import LocalCluster
cluster = LocalCluster(nodes=3, data_dir=sys.argv[1], fsync=False, warm_start=sys.argv[2] == "warm")
cluster.start()
child = os.fork()
if child == 0:
    sys.exit(0)  # a forked child's exit runs atexit too: it must leave its parent's nodes be
os.waitpid(child, 0)
assert all(p.poll() is None for p in cluster.procs.values()), "the child stopped the nodes"
with cluster.client() as c:
    c.put("k", b"v")
print(" ".join(str(p.pid) for p in cluster.procs.values()), flush=True)
# no stop(): the program just ends
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not reaped yet) is gone
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize("start", ["warm", "cold"])
def test_nodes_of_a_cluster_never_stopped_stop_when_its_program_ends(tmp_path, start, wait_for) -> None:
    out = subprocess.run([sys.executable, "-c", _FORGETFUL, str(tmp_path / "data"), start],
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 3
    assert "was never stopped: stopping its nodes at exit" in out.stderr
    wait_for(lambda: not any(_alive(p) for p in pids), "the forgotten nodes to stop",
             timeout_s=30)
