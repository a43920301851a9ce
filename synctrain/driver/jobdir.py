"""The job directory ``storage_path/job_name/``: checkpoints, the embedded coordinator's WALs,
and ``job.json`` (name, mode, state — never the coordinator token, which sits alone in
``coordinator/token``, mode 0600).

A driver holds ``driver.lock`` (``fcntl.flock``, exclusive) for as long as it runs the job:
the lock goes with its process, so a driver killed with SIGKILL leaves it free. Hence the
states a reader sees (:func:`job_state`): ``job.json`` says ``running`` and the lock is held
(running), or it is not (``interrupted``: the driver died); ``finished``, ``failed`` and
``interrupted`` (Ctrl-C) as the driver recorded them. Running the same job name again resumes
an unfinished job (:meth:`JobDir.open`); a finished one is refused, a running one too.

``job.json`` fields: ``name``, ``mode``, ``num_workers``, ``job_id``, ``coordinator``
(``embedded | external``), ``state``, ``reason``, ``created`` and ``updated`` (Unix times),
``driver`` (``{"pid", "host", "started"}`` of the driver now or last running it), ``resumes``
(how many times a driver took the job over), ``launch`` (``{"script", "args", "cwd"}`` when
started by ``synctrain run``: what ``synctrain resume`` runs again), ``elapsed_s``.

Names: a job name is 1-100 characters of letters, digits, ``.``, ``_`` and ``-`` (it becomes
a directory and a step-log key); by default a readable unique one is made from the loop's
name, the time and a few random characters.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import pathlib
import re
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

from synctrain.errors import ConfigError, JobExistsError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
DEFAULT_STORAGE = "~/synctrain_results"


def default_storage() -> str:
    """``storage_path`` when none is given: ``$SYNCTRAIN_STORAGE_PATH``, else ~/synctrain_results."""
    return os.environ.get("SYNCTRAIN_STORAGE_PATH") or DEFAULT_STORAGE


def default_job_name(loop_name: str) -> str:
    base = re.sub(r"[^A-Za-z0-9]+", "-", loop_name).strip("-")[:40] or "job"
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{base}-{stamp}-{secrets.token_hex(2)}"


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"job_name must be 1-100 letters, digits, '.', '_' or '-' (starting with a "
                          f"letter or digit), got {name!r}")
    return name


def check_storage(storage_path: Any) -> pathlib.Path:
    """The storage directory, created if needed; a ConfigError if it cannot be written."""
    if not isinstance(storage_path, (str, os.PathLike)):
        raise ConfigError(f"storage_path must be a directory path, got {storage_path!r}")
    path = pathlib.Path(os.path.expanduser(os.fspath(storage_path)))
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".synctrain-write-test-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"storage_path {str(path)!r} is not a writable directory ({exc.strerror or exc}); "
                          "pass storage_path= a directory you can write (on a multi-node cluster, a shared "
                          "file system every node mounts)") from None
    return path


class JobDir:
    """One job's directory; ``create`` refuses a name already used under the storage path."""

    def __init__(self, storage: pathlib.Path, name: str) -> None:
        self.storage = storage
        self.name = name
        self.path = storage / name
        self._lock_fd: int | None = None  # driver.lock, while this process holds it

    @property
    def coordinator_dir(self) -> pathlib.Path:
        return self.path / "coordinator"

    def read_status(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.path / "job.json").read_text())
        except (OSError, ValueError):
            return None

    def create(self, info: dict[str, Any]) -> None:
        """Make the directory (0700); a JobExistsError if the name is taken, nothing touched."""
        if self.open(info, allow_resume=False):  # pragma: no cover - open raises instead
            raise AssertionError

    def open(self, info: dict[str, Any], *, allow_resume: bool = True,
             check: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any] | None:
        """Create the job's directory, or take over an unfinished job of this name. Returns
        None for a new job, else the job's previous ``job.json``. Raises JobExistsError for a
        finished job, one whose driver still runs, or any existing one without ``allow_resume``;
        ``check(old)`` may refuse the takeover (raising) before anything is written."""
        try:
            self.path.mkdir(mode=0o700)
            new = True
        except FileExistsError:
            new = False
        if not self.lock_driver():
            old = self.read_status() or {}
            driver = old.get("driver") or {}
            raise JobExistsError(f"job {self.name!r} in {str(self.storage)!r} is running: its driver (pid "
                                 f"{driver.get('pid', '?')} on {driver.get('host', '?')}) holds it; wait for it "
                                 "to end, or pick another job_name") from None
        now = time.time()
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": now}
        if new:
            self.write_status({**info, "state": "running", "created": now, "updated": now, "driver": me,
                               "resumes": 0})
            return None
        old = self.read_status() or {}
        state = old.get("state", "unknown")
        if state == "finished" or not allow_resume or "job_id" not in old:
            self.unlock_driver()
            hint = ("it finished; its result stays readable there (synctrain status/log); pick another "
                    "job_name" if state == "finished" else
                    "pick another job_name" if "job_id" in old else
                    "the directory is not a synctrain job's (no job.json); pick another job_name")
            raise JobExistsError(f"a job named {self.name!r} already exists in {str(self.storage)!r} "
                                 f"(state: {state}): {hint}") from None
        if check is not None:
            try:
                check(old)
            except BaseException:
                self.unlock_driver()
                raise
        taken = {k: v for k, v in info.items() if k in ("launch", "num_workers", "min_workers")}
        self.write_status({**old, **taken, "state": "running",
                           "updated": now, "driver": me, "resumes": int(old.get("resumes", 0)) + 1,
                           "previous_state": state})
        return old

    def check_reusable(self) -> dict[str, Any] | None:
        """Without touching anything: None for a new name, the ``job.json`` of an unfinished
        job that a new driver would resume; JobExistsError for a finished or running job."""
        if not self.path.exists():
            return None
        old = self.read_status()
        if old is None or "job_id" not in old:
            raise JobExistsError(f"a job named {self.name!r} already exists in {str(self.storage)!r} "
                                 "(state: unknown): the directory is not a synctrain job's (no job.json); "
                                 "pick another job_name")
        state = job_state(self.path, old)
        if state == "finished":
            raise JobExistsError(f"a job named {self.name!r} already exists in {str(self.storage)!r} "
                                 "(state: finished): it finished; its result stays readable there "
                                 "(synctrain status/log); pick another job_name")
        if state == "running":
            driver = old.get("driver") or {}
            raise JobExistsError(f"job {self.name!r} in {str(self.storage)!r} is running: its driver (pid "
                                 f"{driver.get('pid', '?')} on {driver.get('host', '?')}) holds it; wait for it "
                                 "to end, or pick another job_name")
        return old

    def lock_driver(self) -> bool:
        """Take ``driver.lock`` for this process (False: another live driver holds it)."""
        fd = os.open(self.path / "driver.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def unlock_driver(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock

    def remove_temp_files(self) -> list[str]:
        """Checkpoint and status temp files a killed driver or worker left (``*.tmp``)."""
        removed = []
        for path in self.path.rglob("*.tmp"):
            if path.is_file() and "coordinator" not in path.relative_to(self.path).parts:
                try:
                    path.unlink()
                    removed.append(str(path))
                except OSError:
                    pass
        return removed

    def write_status(self, info: dict[str, Any]) -> None:
        tmp = self.path / "job.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"name": self.name, **info}, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / "job.json")

    def update_status(self, **fields: Any) -> None:
        self.write_status({**(self.read_status() or {}), **fields, "updated": time.time()})


def driver_alive(job_path: pathlib.Path) -> bool:
    """Whether a live driver holds the job's ``driver.lock`` (a driver on this host; on a
    shared file system, one that supports flock across hosts)."""
    try:
        fd = os.open(job_path / "driver.lock", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # also releases the shared lock just taken
    return False


def job_state(job_path: pathlib.Path, status: dict[str, Any] | None = None) -> str:
    """``running | finished | failed | interrupted`` of a job directory: ``running`` in
    ``job.json`` with no live driver holding the lock is ``interrupted``."""
    if status is None:
        try:
            status = json.loads((job_path / "job.json").read_text())
        except (OSError, ValueError):
            return "unknown"
    state = str(status.get("state", "unknown"))
    if state == "running" and not driver_alive(job_path):
        return "interrupted"
    return state
