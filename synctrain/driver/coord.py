"""The job's coordinator: embedded (a 3-node Raft cluster on the job's Ray cluster, WALs in the
job directory) or external (a running ``coordinator serve`` cluster named by address).

The token and endpoints never appear in a repr or a log line.
"""

from __future__ import annotations

import logging
import os
import pathlib
import time
from typing import Any

from coordinator.client import Client, CoordinatorError
from synctrain.errors import ConfigError

log = logging.getLogger(__name__)

EMBEDDED_NODES = 3
#: The embedded nodes' Raft clock: a tick every 100 ms, a heartbeat every 3 ticks, an election
#: timeout of 10-19 ticks (1-1.9 s). The nodes share the machine with the training they log,
#: and every message and wake-up costs CPU (~0.3 ms on the 2-core development machine, a
#: virtual machine): three idle nodes took 2.8% of a core with a heartbeat every tick and a
#: 300-500 ms timeout, 1.5% now (14% with the service's defaults: 15 ms, every tick, 150-300
#: ms). A killed leader still costs well under a second of commits: its sockets close with
#: its process, and the followers elect another within a few ticks of seeing that
#: (``ServerConfig.leader_loss_on_disconnect``; ``benchmarks/steplog_overhead.py`` measures
#: it); only a stopped or cut-off leader waits out the timeout.
EMBEDDED_TICK_MS, EMBEDDED_HEARTBEAT_TICK, EMBEDDED_ELECTION_TICK = 100.0, 3, 10
#: How far below the default CPU priority the step log's background work runs: the embedded
#: nodes' processes (``RayCluster``'s ``nice``) and each worker's writer thread
#: (``StepLogConfig.writer_nice``). 0: the training's own priority. The idea was that on cores
#: the training keeps busy, work at a lower priority yields a core to a rank sooner (two ranks
#: in lockstep both wait for the one interrupted); measured, it buys nothing:
#: ``benchmarks/steplog_split.py --mode sync --rounds 12 --variants niced`` (the sync MLP, see
#: docs/steplog-cost-history.md) put the log at nice 10 at +5.3% of samples/s and at nice 0 at
#: +3.6% (a run before, with nice 10 the default: +3.9% against +4.0%), within each other's
#: noise, as SCHED_IDLE had been before. So it stays at 0, where a
#: node's heartbeats never queue behind a busy loop's threads. An external coordinator's nodes
#: are its operator's to schedule.
STEPLOG_NICE = 0
#: Whether the embedded nodes' processes run under SCHED_IDLE (``RayCluster``'s
#: ``idle_priority``): a node then gets a core only when no rank wants it, and its wake-ups
#: (heartbeats, its Ray worker's own threads: ~60 a second per node at rest) never preempt a
#: rank. Read as a job starts.
STEPLOG_IDLE_PRIORITY = False
#: Whether the embedded nodes are plain processes (``RayCluster``'s ``node_processes``: the
#: driver's children on its own Ray node, a host actor's on another) or each a Ray actor of
#: its own. A node in a Ray actor wakes ~60 times a second at rest, ~48 of them Ray's own
#: threads; beside a sync job in lockstep on few cores those wake-ups cost as much as the
#: whole log (docs/fault-tolerance.md, "Where the sync MLP's cost is"). Read as a job starts.
STEPLOG_NODE_PROCESSES = True
#: The job's last look at a node: how long its status request may take before the node is
#: suspected dead (and then waited on, see EmbeddedCoordinator.dead_nodes).
STATUS_TIMEOUT_S = 2.0


#: How long a resumed job's nodes wait for a dead driver's nodes to let go of their WAL
#: directories (Ray kills a dead driver's actors within seconds; each holds its WAL's LOCK).
RESUME_LOCK_WAIT_S = 60.0


class EmbeddedCoordinator:
    """A :class:`coordinator.cluster.RayCluster` whose nodes reserve no CPU.

    ``resume``: the job's nodes ran before (their driver died): they start again from their
    WALs with the job's token (``data_dir/token``) on new ports, once the old nodes, if Ray
    has not killed them yet, have let go of their directories."""

    def __init__(self, data_dir: pathlib.Path, resume: bool = False) -> None:
        self.data_dir = data_dir
        self.resume = resume
        self.cluster: Any = None

    def __repr__(self) -> str:
        return f"EmbeddedCoordinator(data_dir={str(self.data_dir)!r})"

    @property
    def endpoints(self) -> list[str]:
        return list(self.cluster.endpoints)

    @property
    def token(self) -> bytes:
        return bytes(self.cluster.token)

    def start(self) -> None:
        from coordinator.cluster import RayCluster

        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        token = None
        if self.resume and (self.data_dir / "token").exists():
            token = (self.data_dir / "token").read_bytes().strip()
        deadline = time.monotonic() + (RESUME_LOCK_WAIT_S if self.resume else 0.0)
        while True:
            self.cluster = RayCluster(nodes=EMBEDDED_NODES, num_cpus_per_node=0.0, data_dir=self.data_dir,
                                      token=token, tick_ms=EMBEDDED_TICK_MS,
                                      heartbeat_tick=EMBEDDED_HEARTBEAT_TICK,
                                      election_tick=EMBEDDED_ELECTION_TICK, nice=STEPLOG_NICE,
                                      idle_priority=STEPLOG_IDLE_PRIORITY,
                                      node_processes=STEPLOG_NODE_PROCESSES)
            try:
                self.cluster.start()
                break
            except Exception as exc:
                self.cluster.stop()
                locked = "DataDirLocked" in str(exc) or "is locked by" in str(exc)
                if not locked or time.monotonic() > deadline:
                    raise
                log.info("the interrupted run's coordinator still holds its WAL; waiting (%s)", _first(exc))
                time.sleep(1.0)
        # For tools that read the job later (the token and endpoints stay out of logs and reprs):
        # both files are readable by this user only.
        _private_write(self.data_dir / "token", self.token + b"\n")
        _private_write(self.data_dir / "endpoints", ",".join(self.endpoints).encode() + b"\n")

    def dead_nodes(self, wait_s: float = 0.0) -> list[int]:
        """Nodes that stopped serving: their process (or actor) died, or their server stopped
        (a fatal error). A look costs no message (``RayCluster.exited``: a child's exit status,
        or a call its host holds open). With ``wait_s`` (the job's last look), a node whose
        port answers no status request is waited on up to that long: its host may not yet have
        seen the death of a process killed a moment ago, but a dead node's port answers nothing."""
        dead = []
        for node in list(self.cluster.actors):
            if self.cluster.exited(node):
                dead.append(node)
            elif wait_s and self.cluster.status(node, timeout_s=min(STATUS_TIMEOUT_S, wait_s)) is None:
                if self.cluster.exited(node, wait_s):
                    dead.append(node)
        return dead

    def restart(self, node: int) -> None:
        self.cluster.restart(node)

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()


def _first(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[-1][:200] if lines else type(exc).__name__


def _private_write(path: pathlib.Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def read_job_coordinator(job_dir: pathlib.Path) -> tuple[list[str], bytes]:
    """(endpoints, token) of a job's embedded coordinator, from its job directory."""
    base = job_dir / "coordinator"
    endpoints = (base / "endpoints").read_text().strip().split(",")
    return endpoints, (base / "token").read_bytes().strip()


class ExternalCoordinator:
    """A coordinator cluster someone else runs (``Trainer(coordinator="h:p,h:p,...")``)."""

    def __init__(self, endpoints: str, token: bytes) -> None:
        self._endpoints = endpoints
        self._token = token

    def __repr__(self) -> str:
        return "ExternalCoordinator()"

    @property
    def endpoints(self) -> list[str]:
        return [e.strip() for e in self._endpoints.split(",") if e.strip()]

    @property
    def token(self) -> bytes:
        return self._token

    def start(self) -> None:
        """Check that the cluster answers with this token, before anything else starts."""
        try:
            with Client(self.endpoints, token=self._token, timeout_s=5.0) as client:
                client.query("steplog", "jobs", consistency="stale")
        except CoordinatorError as exc:
            raise ConfigError(
                f"cannot use the coordinator at {len(self.endpoints)} endpoint(s) given in coordinator=: "
                f"{type(exc).__name__}: {exc}. Check the addresses (host:port,host:port,...), that the "
                "cluster runs (coordinator status --all), and its token (coordinator_token= or "
                "SYNCTRAIN_COORDINATOR_TOKEN)") from None
        except ValueError as exc:
            raise ConfigError(f"coordinator= is not a list of host:port endpoints: {exc}") from None

    def dead_nodes(self, wait_s: float = 0.0) -> list[int]:
        return []  # its operator restarts its nodes

    def restart(self, node: int) -> None:  # pragma: no cover - never called (no dead nodes)
        raise NotImplementedError

    def stop(self) -> None:
        pass
