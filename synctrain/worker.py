"""The Ray actor that runs one copy of the user's training loop.

The actor is threaded (``max_concurrency=2``): ``run`` occupies one thread for the whole job
while the driver drains reports through ``poll_reports`` on the other, so progress shows while
the loop runs. A failure inside the loop is caught and returned as data (rank, exception type,
formatted traceback) so the driver can raise it with the rank attached.
"""

from __future__ import annotations

import inspect
import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

import ray
import torch

from synctrain import context as _context
from synctrain.context import Session, TrainContext
from synctrain.spec import JobSpec
from synctrain.strategies.base import get_strategy_class


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class TrainWorker:
    """One rank. Created by the Trainer with the job's resources; see module doc."""

    def __init__(self, rank: int, spec: JobSpec) -> None:
        self.rank = rank
        self.spec = spec
        self.session: Session | None = None
        threads = max(1, int(spec.cpus_per_worker))
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))

    def node_info(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    def rendezvous_address(self) -> tuple[str, int]:
        """Address and a free port on this worker's node for the process-group store."""
        ip = ray.util.get_node_ip_address()
        return ip, _free_port(ip)

    def poll_reports(self, since: int) -> tuple[list[dict[str, Any]], int]:
        if self.session is None:
            return [], since
        return self.session.drain_reports(since)

    def run(
        self,
        train_fn: Callable[..., Any] | bytes,
        config: dict[str, Any] | bytes,
        handles: dict[str, Any],
        local_rank: int,
    ) -> dict[str, Any]:
        """Run the loop; ``train_fn`` and ``config`` may come cloudpickled (the Trainer sends
        them so), and are then loaded here, where a failure is reported like any other."""
        try:
            loop: Callable[..., Any] = _load_from_driver(train_fn, "training loop", self.rank)
            loop_config: dict[str, Any] = _load_from_driver(config, "config", self.rank)
            context = self._make_context(local_rank)
            strategy = get_strategy_class(self.spec.mode)(context, self.spec, handles)
            self.session = Session(context, strategy)
            _context.set_session(self.session)
            self._export_env(context, handles)
            strategy.on_start()
            try:
                value = _call(loop, loop_config)
            finally:
                strategy.on_shutdown()
            _check_picklable(value, self.rank)
            return {"ok": True, "rank": self.rank, "value": value,
                    "metrics": {**strategy.metrics(), "dropped_reports": self.session.dropped_reports}}
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the driver
            return {"ok": False, "rank": self.rank, "exc_type": type(exc).__name__,
                    "traceback": traceback.format_exc()}

    def _make_context(self, local_rank: int) -> TrainContext:
        if self.spec.use_gpu:
            if not torch.cuda.is_available():
                raise RuntimeError(f"rank {self.rank} was given a GPU by Ray but torch sees no CUDA device")
            torch.cuda.set_device(0)  # Ray sets CUDA_VISIBLE_DEVICES to this worker's GPU
            device = torch.device("cuda", 0)
        else:
            device = torch.device("cpu")
        return TrainContext(rank=self.rank, world_size=self.spec.num_workers, local_rank=local_rank,
                            device=device, mode=self.spec.mode, seed=self.spec.seed)

    def _export_env(self, ctx: TrainContext, handles: dict[str, Any]) -> None:
        """torchrun-style variables, so code written for torchrun finds its rank."""
        os.environ.update({"RANK": str(ctx.rank), "WORLD_SIZE": str(ctx.world_size),
                           "LOCAL_RANK": str(ctx.local_rank)})
        if "rendezvous" in handles:
            addr, port = handles["rendezvous"]
            os.environ.update({"MASTER_ADDR": str(addr), "MASTER_PORT": str(port)})


class DriverObjectLoadError(RuntimeError):
    """The worker could not unpickle the training loop or config the driver sent."""


def _load_from_driver(value: Any, what: str, rank: int) -> Any:
    if not isinstance(value, bytes):
        return value
    try:
        return ray.cloudpickle.loads(value)
    except ModuleNotFoundError as exc:
        raise DriverObjectLoadError(
            f"rank {rank} cannot load the {what}: {exc}. Its module is importable where the "
            f"driver runs but not in the Ray workers. Define the loop in the script you run, "
            f"install the module (pip install -e .), or make its directory importable before "
            f"Ray starts (PYTHONPATH, or ray.init(runtime_env={{'py_modules': [...]}}))") from exc
    except Exception as exc:
        raise DriverObjectLoadError(
            f"rank {rank} cannot load the {what} the driver sent: {type(exc).__name__}: "
            f"{exc}") from exc


def _call(train_fn: Callable[..., Any], config: dict[str, Any]) -> Any:
    try:
        takes_config = len(inspect.signature(train_fn).parameters) > 0
    except (TypeError, ValueError):
        takes_config = True
    return train_fn(config) if takes_config else train_fn()


def _check_picklable(value: Any, rank: int) -> None:
    try:
        ray.cloudpickle.dumps(value)
    except Exception as exc:
        raise TypeError(
            f"the training loop on rank {rank} returned a {type(value).__name__} that cannot be "
            f"pickled ({exc}); return plain values (numbers, dicts, tensors, state_dicts)"
        ) from exc
