"""Which Ray cluster the driver joins, decided and checked before Ray is asked.

Theory of operation. ``ray.init`` has three traps for a newcomer, each met on a first try:

* an address that does not answer (a typo, a stopped cluster, the dashboard's port instead of
  the GCS's) makes it retry for ever;
* a cluster started with ``ray start --head`` leaves its address in
  ``<ray temp dir>/ray_current_cluster``, and ``ray.init(num_cpus=...)`` then refuses to start
  a local Ray ("num_cpus and num_gpus must not be provided") instead of joining that cluster;
* the file outlives its cluster (a reboot, ``kill -9``), and the same refusal follows.

So :func:`plan` decides first, from the address given (``ray_address``, else ``RAY_ADDRESS``)
and that file, and probes every address it would join with :func:`probe_gcs`: a TCP connect
and an HTTP/2 greeting, both within ``PROBE_TIMEOUT_S``. Ray's GCS and its client server
(``ray://``) speak gRPC, so they answer the greeting with an HTTP/2 SETTINGS frame; a dead
address is refused or times out and anything else answers something else. Then:

* an address that was given is joined if it answers, else :class:`ConfigError` says why, at
  once; ``"auto"`` means the file's cluster (which must answer); ``"local"`` starts a new one;
* no address: the file's cluster is joined if it answers; a stale file is ignored (logged)
  and a private local Ray starts, with enough logical CPUs for the workers — and a warning
  when that is more than the machine's cores, since the workers then share them.

:func:`connect` carries the plan out; only it touches Ray. The probe is skipped under
``RAY_USE_TLS=1`` (the greeting would have to be TLS), where only the TCP connect is checked.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import sys
import time
import warnings
from pathlib import Path

from synctrain.errors import ConfigError

log = logging.getLogger(__name__)

#: Bound of the whole probe of one address (connect, greeting, answer).
PROBE_TIMEOUT_S = 5.0
#: The HTTP/2 client preface and an empty SETTINGS frame: a gRPC server answers with SETTINGS.
_H2_GREETING = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_H2_SETTINGS = 4
#: Bytes of an address file read at most (a file of another program is not read whole).
_MAX_ADDRESS_FILE_BYTES = 4096


@dataclasses.dataclass(frozen=True)
class Plan:
    """What :func:`connect` does: join ``address``, or start a local Ray (``address`` None)."""

    address: str | None
    source: str  # where the address came from, for messages: "ray_address", "RAY_ADDRESS", the file
    note: str = ""  # said when connecting (a stale file ignored, a running cluster joined)
    recorded: bool = False  # the address is the one `ray start` recorded (see connect)


def ray_address_file() -> Path:
    """``<ray temp dir>/ray_current_cluster``, where ``ray start --head`` writes its address
    (Ray's rule: ``RAY_TMPDIR``, else ``TMPDIR`` on Linux, else /tmp; then ``ray``)."""
    root = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith("linux")
                                            else None) or "/tmp"  # noqa: S108 - Ray's own default
    return Path(root) / "ray" / "ray_current_cluster"


def _read_address_file(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            text = f.read(_MAX_ADDRESS_FILE_BYTES).decode("utf-8", "replace").strip()
    except OSError:
        return None
    return text or None


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``host:port``, ``ray://host:port`` or ``[v6]:port``; None if none."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    return host.strip("[]"), int(port)


def probe_gcs(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None when a gRPC server (Ray's GCS, or its client server for ``ray://``) answers at
    ``address`` within ``timeout_s``; otherwise what went wrong, in words."""
    hp = _host_port(address)
    if hp is None:
        return f"{address!r} is not host:port"
    deadline = time.monotonic() + timeout_s
    try:
        with socket.create_connection(hp, timeout=timeout_s) as sock:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
                return None
            sock.sendall(_H2_GREETING)
            answer = b""
            while len(answer) < 9:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(9 - len(answer))
                if not chunk:
                    break
                answer += chunk
    except TimeoutError:
        return f"no answer within {timeout_s:g} s"
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    if len(answer) == 9 and answer[3] == _H2_SETTINGS:
        return None
    return ("it answers, but not as Ray does (a dashboard or another service on that port?); Ray's "
            "GCS port is the one `ray start --head` printed (default 6379), ray:// uses the client "
            "server's (default 10001)")


def plan(address: str | None, source: str = "ray_address", timeout_s: float = PROBE_TIMEOUT_S) -> Plan:
    """Decide which cluster to use (see the module doc); raise ConfigError for one that was
    named but does not answer. ``address``: the Trainer's ``ray_address`` (None: use
    ``RAY_ADDRESS``, else the file, else a local Ray)."""
    if not address and os.environ.get("RAY_ADDRESS"):
        address, source = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    if address == "local":
        return Plan(None, source)
    path = ray_address_file()
    if address and address != "auto":
        problem = probe_gcs(address, timeout_s)
        if problem is not None:
            raise ConfigError(
                f"cannot reach the Ray cluster at {address} (from {source}): {problem}. Check that it is "
                f"running (`ray status --address {address}`) and the address; leave {source} unset to "
                "start a local Ray instead")
        return Plan(address, source)
    recorded = _read_address_file(path)
    if address == "auto":
        if recorded is None:
            raise ConfigError(f"{source}='auto' joins the cluster `ray start --head` started on this "
                              f"machine, but there is none ({path} does not exist); start one, or leave "
                              f"{source} unset to start a local Ray")
        problem = probe_gcs(recorded, timeout_s)
        if problem is not None:
            raise ConfigError(f"{source}='auto': the cluster recorded in {path} ({recorded}) does not "
                              f"answer: {problem}. It was stopped; start it again with `ray start --head`, "
                              f"or leave {source} unset to start a local Ray")
        return Plan(recorded, str(path), recorded=True)
    if recorded is None:
        return Plan(None, "")
    problem = probe_gcs(recorded, timeout_s)
    if problem is None:
        return Plan(recorded, str(path), recorded=True, note=(
            f"joining the running Ray cluster at {recorded} (started with `ray start`, recorded in "
            f"{path}); pass ray_address='local' to start a private one"))
    return Plan(None, "", note=f"ignoring {path}: the cluster it names ({recorded}) does not answer "
                               f"({problem}); starting a local Ray")


def local_cpus(num_workers: int, cpus_per_worker: float, cores: int | None) -> tuple[int, str | None]:
    """Logical CPUs for a local Ray that fits ``num_workers``, and a warning when that is more
    than the machine's ``cores`` (the workers then share cores: slower, and timing-sensitive
    code such as collective timeouts may trip)."""
    cores = max(1, cores or 1)
    needed = math.ceil(num_workers * cpus_per_worker)
    if needed <= cores:
        return cores, None
    return needed, (f"{num_workers} workers x {cpus_per_worker:g} CPUs need {needed} CPUs but this machine "
                    f"has {cores} cores: the local Ray is started with {needed} logical CPUs so they fit, "
                    "but they share the cores and each runs slower than it could. Use "
                    f"num_workers <= {max(1, int(cores // max(cpus_per_worker, 1e-9)))}, or join a larger "
                    "cluster (ray_address=...)")


def connect(address: str | None, num_workers: int, cpus_per_worker: float,
            logging_level: int = logging.WARNING) -> Plan | None:
    """Connect this process to Ray per :func:`plan`; nothing if it is connected already (the
    caller's own ``ray.init`` wins). Returns the plan carried out."""
    import ray

    if ray.is_initialized():
        return None
    chosen = plan(address)
    if chosen.note:
        log.warning("synctrain: %s", chosen.note)
    if chosen.address is not None:
        # A recorded cluster is joined as "auto" (Ray reads the same file): only for a cluster it
        # found itself does Ray use the token `ray start` keeps in ~/.ray/auth_token.
        ray.init(address="auto" if chosen.recorded else chosen.address, logging_level=logging_level)
        return chosen
    num_cpus, oversubscribed = local_cpus(num_workers, cpus_per_worker, os.cpu_count())
    if oversubscribed:
        warnings.warn(f"synctrain: {oversubscribed}", UserWarning, stacklevel=3)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging_level)
    return chosen
