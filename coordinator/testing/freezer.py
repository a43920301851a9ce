"""The kernel's cgroup freezer: a group of processes (and every process they start) stopped
and continued as one, with no signal sent -- as a virtual machine paused by its host, or a
container frozen by its runtime, sees it. Used by ``benchmarks/steplog_interleaved.py`` (two
jobs in turns) and by tests of what a node does after such a pause. Linux, as root."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

#: How long a freeze may take before it is given up (a task stuck in the kernel).
FREEZE_TIMEOUT_S = 30.0


class FreezerUnavailable(RuntimeError):
    """No cgroup freezer here, or no right to make a cgroup: the message says which."""


def freezer_root() -> tuple[Path, int]:
    """The cgroup hierarchy with a freezer: v1's ``freezer`` controller, else a cgroup v2 mount
    (whose cgroups have ``cgroup.freeze``)."""
    v2 = None
    try:
        with open("/proc/mounts") as f:
            for line in f:
                _, where, kind, opts = line.split()[:4]
                if kind == "cgroup" and "freezer" in opts.split(","):
                    return Path(where), 1
                if kind == "cgroup2" and v2 is None:
                    v2 = Path(where)
    except OSError:
        pass
    if v2 is not None:
        return v2, 2
    raise FreezerUnavailable("no cgroup freezer is mounted: freezing processes needs the kernel's cgroup "
                             "freezer (v1 /sys/fs/cgroup/freezer, or cgroup v2), on Linux")


class Freezer:
    """One cgroup whose processes (and every process they start) are frozen and thawed as one."""

    def __init__(self, name: str) -> None:
        root, self.version = freezer_root()
        self.path = root / name
        try:
            self.path.mkdir()
        except OSError as exc:
            raise FreezerUnavailable(f"cannot make the cgroup {self.path} ({exc}): freezing processes needs the "
                                     "right to make cgroups (run as root)") from exc
        if self.version == 2 and not (self.path / "cgroup.freeze").exists():
            self.path.rmdir()
            raise FreezerUnavailable(f"{self.path} has no cgroup.freeze: the kernel's cgroup v2 freezer needs Linux 5.2")

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in self.procs.read_text().split()]
        except OSError:
            return []

    def frozen(self) -> bool:
        if self.version == 1:
            return (self.path / "freezer.state").read_text().strip() == "FROZEN"
        return "frozen 1" in (self.path / "cgroup.events").read_text()

    def freeze(self) -> None:
        self._write("FROZEN" if self.version == 1 else "1")
        deadline = time.monotonic() + FREEZE_TIMEOUT_S
        while not self.frozen():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.path} did not freeze in {FREEZE_TIMEOUT_S:.0f} s")
            time.sleep(0.0005)

    def thaw(self) -> None:
        self._write("THAWED" if self.version == 1 else "0")

    def _write(self, value: str) -> None:
        (self.path / ("freezer.state" if self.version == 1 else "cgroup.freeze")).write_text(value)

    def kill(self) -> None:
        """Thaw and SIGKILL whatever is left (a child's Ray instance after the child exited)."""
        self.thaw()
        for _ in range(100):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)

    def remove(self) -> None:
        self.kill()
        for _ in range(100):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.05)
