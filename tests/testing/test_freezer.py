"""coordinator.testing.freezer: the kernel's cgroup freezer stops and continues a real process
and what it starts, with no signal, and cleans up after itself."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from coordinator.testing.freezer import Freezer, FreezerUnavailable


def test_the_freezer_stops_and_resumes_every_process_it_holds(tmp_path):
    try:
        group = Freezer(f"synctrain-test-{time.monotonic_ns()}")
    except FreezerUnavailable as exc:
        pytest.skip(str(exc))  # not root, or no cgroup freezer on this kernel
    counter = tmp_path / "count"
    # the shell joins the group, then a child process it starts counts into a file
    script = ("import time, pathlib, subprocess, sys\n"
              "p = pathlib.Path(sys.argv[1]); n = 0\n"
              "while True:\n    n += 1; p.write_text(str(n)); time.sleep(0.002)\n")
    proc = subprocess.Popen(["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(group.procs), sys.executable, "-c",
                             script, str(counter)])
    try:
        deadline = time.monotonic() + 30
        while not counter.exists() or not counter.read_text():
            assert time.monotonic() < deadline, "the counter never started"
            time.sleep(0.01)
        assert group.pids() == [proc.pid]
        group.freeze()
        frozen_at = int(counter.read_text())
        time.sleep(0.3)
        assert int(counter.read_text()) == frozen_at  # nothing ran while frozen
        group.thaw()
        deadline = time.monotonic() + 30
        while int(counter.read_text() or 0) <= frozen_at:
            assert time.monotonic() < deadline, "the counter never resumed"
            time.sleep(0.01)
    finally:
        group.remove()
        proc.wait(timeout=30)
    assert proc.returncode == -9 and not group.path.exists()  # killed with the group, the group gone
