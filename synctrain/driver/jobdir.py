"""The job directory ``storage_path/job_name/``: checkpoints, the embedded coordinator's WALs,
and ``job.json`` (name, mode, state — never the coordinator token, which sits alone in
``coordinator/token``, mode 0600).

Names: a job name is 1-100 characters of letters, digits, ``.``, ``_`` and ``-`` (it becomes
a directory and a step-log key); by default a readable unique one is made from the loop's
name, the time and a few random characters.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import re
import secrets
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
        try:
            self.path.mkdir(mode=0o700)
        except FileExistsError:
            status = self.read_status() or {}
            state = status.get("state", "unknown")
            hint = ("its result stays readable there; pick another job_name" if state == "finished"
                    else "resuming a job by name is not supported yet; pick another job_name")
            raise JobExistsError(f"a job named {self.name!r} already exists in {str(self.storage)!r} "
                                 f"(state: {state}): {hint}") from None
        self.write_status({**info, "state": "running"})

    def write_status(self, info: dict[str, Any]) -> None:
        tmp = self.path / "job.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"name": self.name, **info}, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / "job.json")

    def update_status(self, **fields: Any) -> None:
        self.write_status({**(self.read_status() or {}), **fields})
