"""The warm node launcher (coordinator.launcher): nodes forked from a process that has
imported the server behave as cold-started ones do — exit statuses, signals, restarts on
their WAL — and a launcher that is gone costs only speed, never a node."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from coordinator import LocalCluster
from coordinator.launcher import UNKNOWN_EXIT, LaunchedProcess, Launcher, LauncherGone


@pytest.fixture
def launcher():
    launcher = Launcher()
    yield launcher
    launcher.close()


def test_a_launched_command_runs_the_cli_with_its_output_in_the_log(launcher, tmp_path):
    log = tmp_path / "token.log"
    proc = launcher.launch(["token"], str(log))
    assert proc.wait(30) == 0
    token = log.read_text().strip()
    assert len(token) >= 32 and all(c in "0123456789abcdef" for c in token), token
    assert (log.stat().st_mode & 0o777) == 0o600


def test_a_failing_command_reports_its_exit_status(launcher, tmp_path):
    log = tmp_path / "bad.log"
    proc = launcher.launch(["serve", "--id", "not-a-number"], str(log))
    assert proc.wait(30) == 2  # argparse's usage error, as a cold start gives
    assert "invalid int value" in log.read_text()


PROBE = """
import os, random, sys, time

def main(argv):
    if argv[0] == "sleep":
        time.sleep(float(argv[1]))
    print(os.getsid(0), os.getpid(), random.random(), flush=True)
    return int(argv[-1]) if argv[-1].isdigit() else 0
"""


@pytest.fixture
def probe_launcher(tmp_path):
    """A launcher that can also run a tiny probe module (``launcher_probe:main``)."""
    (tmp_path / "launcher_probe.py").write_text(PROBE)
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    launcher = Launcher(env=dict(os.environ, PYTHONPATH=path))
    yield launcher
    launcher.close()


def test_each_child_is_its_own_session_and_draws_its_own_randomness(probe_launcher, tmp_path):
    """Forked siblings share the launcher's memory; a node's election timeout must not be
    the same draw in every node (that would split votes forever)."""
    outs = []
    for k in range(2):
        log = tmp_path / f"child{k}.log"
        proc = probe_launcher.launch(["draw", "7"], str(log), main="launcher_probe:main")
        assert proc.wait(30) == 7, log.read_text()
        sid, pid, draw = log.read_text().split()
        assert int(sid) == int(pid) == proc.pid
        outs.append(draw)
    assert outs[0] != outs[1]


def test_a_killed_child_reports_minus_nine_and_signals_reach_it(probe_launcher, tmp_path):
    proc = probe_launcher.launch(["sleep", "60"], str(tmp_path / "s.log"), main="launcher_probe:main")
    assert proc.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(0.2)
    proc.kill()
    assert proc.wait(30) == -signal.SIGKILL
    assert proc.poll() == -signal.SIGKILL


def test_children_outlive_the_launcher_and_their_end_is_still_noticed(probe_launcher, tmp_path, wait_for):
    launcher = probe_launcher
    proc = launcher.launch(["sleep", "60"], str(tmp_path / "s.log"), main="launcher_probe:main")
    os.kill(launcher.pid, signal.SIGKILL)
    wait_for(lambda: not launcher.alive, "the launcher's end to be seen")
    assert proc.poll() is None  # still running: it is not the launcher's to take along
    with pytest.raises(LauncherGone):
        launcher.launch(["token"], str(tmp_path / "t.log"))
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(30) == UNKNOWN_EXIT  # nobody reaped it for us: the status is lost


def test_local_cluster_nodes_are_forked_and_behave_as_cold_ones(tmp_path, wait_for):
    with LocalCluster(nodes=3, data_dir=tmp_path / "c", fsync=False) as cluster:
        assert all(isinstance(cluster.procs[i], LaunchedProcess) for i in cluster.node_ids)
        with cluster.client() as c:
            c.put("k", b"v1")
        leader = cluster.leader()
        follower = next(i for i in cluster.node_ids if i != leader)
        cluster.kill(follower)
        assert cluster.exit_code(follower) == -signal.SIGKILL
        with cluster.client() as c:
            c.put("k", b"v2")
        cluster.restart(follower)  # forked again: recovers from its WAL, catches up
        wait_for(lambda: (cluster.status(follower) or {}).get("applied", 0)
                 >= cluster.status(leader)["commit"], "the restarted follower to catch up")
        with cluster.client(endpoints=[cluster.endpoint(follower)]) as c:
            assert c.get("k", consistency="linearizable") == b"v2"
        cluster.pause(leader)
        new = cluster.leader(exclude=(leader,))
        cluster.resume(leader)
        assert new != leader


def test_a_cluster_whose_launcher_died_starts_nodes_cold(tmp_path, wait_for):
    with LocalCluster(nodes=3, data_dir=tmp_path / "c", fsync=False) as cluster:
        os.kill(cluster._launcher.pid, signal.SIGKILL)
        wait_for(lambda: not cluster._launcher.alive, "the launcher's end to be seen")
        leader = cluster.leader()
        follower = next(i for i in cluster.node_ids if i != leader)
        cluster.kill(follower)
        cluster.restart(follower)
        assert isinstance(cluster.procs[follower], subprocess.Popen)
        with cluster.client() as c:
            c.put("after", b"x")


def test_warm_start_off_starts_every_node_cold(tmp_path):
    with LocalCluster(nodes=1, data_dir=tmp_path / "c", fsync=False, warm_start=False) as cluster:
        assert isinstance(cluster.procs[1], subprocess.Popen)
        with cluster.client() as c:
            c.put("k", b"v")
