"""The Ray actor that runs one copy of the user's training loop.

The actor is threaded (``max_concurrency=3``): ``run`` occupies one thread for a whole
generation while the driver polls progress and drains reports through ``poll`` on another,
so progress shows while the loop runs and a loop that stops making progress is seen; the
third is for ``warm``, sent as the worker is created, which ``run`` waits for: polls are
answered meanwhile, so a rank still importing is not taken for a silent one. A failure
inside the loop is caught and returned as data (rank, exception type, formatted traceback,
the step it reached and whether its state is consistent) so the driver can decide.

An actor outlives a generation: after a peer failed, a surviving worker's ``run`` returns, and
the driver calls ``run`` again for the next generation, with the state to continue from — its
own (``restore="self"``: the objects of the run that just ended), a live peer's
(``export_state`` of that peer, sent through Ray's object store), or a checkpoint's.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import ray
import torch

from synctrain import checkpoint as ckpt
from synctrain import context as _context
from synctrain.context import Session, TrainContext
from synctrain.errors import ResultNotPicklableError
from synctrain.spec import JobSpec
from synctrain.strategies.allreduce import listen_store
from synctrain.strategies.base import get_strategy_class
from synctrain.worker.step import StepBoundary, StepLogConfig, capture

log = logging.getLogger(__name__)

#: A warm spare's imports of the modules a live rank's loop imported: at most this many, within
#: this long (an import that fails is skipped: the loop would import it itself, or not need it).
MAX_PREIMPORTS, PREIMPORT_BUDGET_S = 4000, 120.0


class TrainWorker:
    """One rank. Created by the Trainer with the job's resources; see module doc."""

    def __init__(self, rank: int, spec: JobSpec, steplog: StepLogConfig | None = None) -> None:
        self.rank = rank
        self.spec = spec
        self.steplog = steplog
        self.session: Session | None = None
        self.generation = 0
        # the process-group store this worker holds open for its next run as rank 0:
        # ((address, port), store), see rendezvous_address
        self._rendezvous: tuple[tuple[str, int], Any] | None = None
        threads = max(1, int(spec.cpus_per_worker))
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        self._modules_at_start = frozenset(sys.modules)
        # held by ``warm``; ``run`` waits for it, so the two never import at once (a module two
        # threads import at the same time can be seen half-initialised by one of them)
        self._warming = threading.Lock()

    def warm(self, train_fn: Callable[..., Any] | bytes) -> dict[str, Any]:
        """Import now what the loop's first lines would: torch.distributed, torch._dynamo
        (``torch.optim.Optimizer()`` and ``DistributedDataParallel()`` import it: ~1.5-3 s of
        a fresh process on 2 cores), the strategy and the loop's own modules (unpickling the
        loop imports them). Called on every new worker as it is created, so this overlaps
        what the driver does meanwhile (starting the coordinator, the next generation's
        set-up); a warm spare (``Trainer(spare_workers=k)``) taking a dead rank's place then
        costs no process start and no imports. A loop that cannot be unpickled here fails
        again, and is reported, in ``run``."""
        with self._warming:
            import torch._dynamo  # noqa: F401 - imported for its cost, now
            import torch.distributed  # noqa: F401

            get_strategy_class(self.spec.mode)
            try:
                _load_from_driver(train_fn, "training loop", self.rank)
            except Exception:  # noqa: BLE001 - ``run`` reports it, where the job expects it
                log.debug("rank %d: the loop did not load while warming", self.rank, exc_info=True)
        return self.node_info()

    def loop_modules(self) -> list[str]:
        """The modules imported in this process since it started (its loop's own, and what
        torch imports lazily), for a warm spare to import ahead (``preimport``)."""
        return sorted(name for name in list(sys.modules)
                      if name not in self._modules_at_start and not name.startswith("__"))[:MAX_PREIMPORTS]

    def preimport(self, names: list[str]) -> None:
        """Import ``names`` (a live rank's ``loop_modules``) in a background thread: the data
        libraries a loop imports inside its body (sklearn, say) cost seconds in a fresh
        process, which a spare that takes a rank would otherwise pay before its first step.
        Returns at once, so the actor's threads stay free for ``take_rank``, ``run`` and polls."""
        def run() -> None:
            deadline = time.monotonic() + PREIMPORT_BUDGET_S
            for name in names[:MAX_PREIMPORTS]:
                if time.monotonic() > deadline:
                    return
                try:
                    importlib.import_module(name)
                except BaseException:  # noqa: BLE001, S112 - not importable by name: the loop's business
                    continue

        threading.Thread(target=run, name="preimport", daemon=True).start()

    def take_rank(self, rank: int) -> dict[str, Any]:
        """This spare becomes ``rank`` (before its first ``run``)."""
        if self.session is not None:
            raise RuntimeError(f"a worker that ran as rank {self.rank} cannot take rank {rank}'s place")
        self.rank = rank
        return self.node_info()

    def node_info(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    def rendezvous_address(self) -> tuple[str, int]:
        """Address and port of the process-group store for this worker's next run, as rank 0.

        The store listens from now on, on a port the kernel picked as it bound it, and this
        worker's next run forms its group on it: a port merely found free and released could be
        taken by any other process before the group formed (its rendezvous then fails, and the
        other ranks wait in theirs)."""
        ip = ray.util.get_node_ip_address()
        store = listen_store(ip, self.spec.collective_timeout_s)
        self._rendezvous = ((ip, int(store.port)), store)
        return ip, int(store.port)

    def poll_reports(self, since: int) -> tuple[list[dict[str, Any]], int]:
        if self.session is None:
            return [], since
        return self.session.drain_reports(since)

    def poll(self, since: int) -> dict[str, Any]:
        """Progress (for stall detection and the progress bar) and rank 0's new reports."""
        if self.session is None:
            return {"generation": self.generation, "step": None, "idle_s": 0.0, "reports": [],
                    "next": since}
        reports, nxt = self.session.drain_reports(since)
        return {"generation": self.generation, **self.session.progress(), "reports": reports,
                "next": nxt}

    def set_generation(self, generation: int) -> None:
        """The job moved on to ``generation`` and this worker is part of it (async survivors)."""
        self.generation = generation
        if self.session is not None and self.session.stepper is not None:
            self.session.stepper.set_generation(generation)

    def request_stop(self, reason: str) -> bool:
        """End the running loop at its next step boundary (``RunStopped``), this process kept
        for the next generation: the job rolls back and no process is at fault. False when no
        step-logged run is under way."""
        stepper = self.session.stepper if self.session is not None else None
        if stepper is None:
            return False
        stepper.request_stop(reason)
        return True

    def export_state(self) -> bytes:
        """The state of the last run's final step boundary, encoded like a checkpoint."""
        if self.session is None:
            raise RuntimeError(f"rank {self.rank} has no state to export: it has not run")
        return ckpt.encode(capture(self.session, self.generation))

    def run(
        self,
        train_fn: Callable[..., Any] | bytes,
        config: dict[str, Any] | bytes,
        handles: dict[str, Any],
        local_rank: int,
        generation: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Run the loop; ``train_fn`` and ``config`` may come cloudpickled (the Trainer sends
        them so), and are then loaded here, where a failure is reported like any other.
        ``generation``: ``{"generation": g, "restore": None | "self" | bytes | dict,
        "start_step": s, "rank": r, "world_size": w, "batch_workers": b}`` for a step-logged
        job (see the module doc): a generation of an elastic job may give this worker another
        rank in another world size (a sync job that shrank renumbers its ranks)."""
        gen = generation or {}
        if gen.get("steplog") is not None:
            self.steplog = gen["steplog"]
        with self._warming:  # a ``warm`` under way finishes its imports first
            pass
        session: Session | None = None
        held = self._rendezvous
        if held is not None and tuple(handles.get("rendezvous") or ()) == held[0]:
            handles = {**handles, "rendezvous_store": held[1]}  # the store it listens on
        try:
            loop: Callable[..., Any] = _load_from_driver(train_fn, "training loop", self.rank)
            loop_config: dict[str, Any] = _load_from_driver(config, "config", self.rank)
            restore = self._restore_doc(gen.get("restore"))
            self.generation = int(gen.get("generation", 0))
            self.rank = int(gen.get("rank", self.rank))
            context = self._make_context(local_rank, restore, int(gen.get("world_size", self.spec.num_workers)),
                                         loop_config)
            strategy = get_strategy_class(self.spec.mode)(context, self.spec, handles)
            session = Session(context, strategy, restore)
            session.batch_workers = gen.get("batch_workers")  # keep_global_batch on fewer workers
            if self.steplog is not None and self.generation:
                session.stepper = StepBoundary(self.steplog, self.rank, self.generation, self.spec.mode)
                session.stepper.start_at(int(gen.get("committed_step", session.optimizer_steps)))
            self.session = session
            _context.set_session(session)
            self._export_env(context, handles)
            strategy.on_start()
            try:
                value = _call(loop, loop_config)
            finally:
                strategy.on_shutdown()
            _check_picklable(value, self.rank)
            if session.stepper is not None:
                session.stepper.at_loop_end(session)  # the last step's digest, if one is due
            if session.stepper is not None and not session.stepper.flush(timeout_s=120.0):
                raise RuntimeError(f"rank {self.rank} could not commit its last steps to the step log")
            log_metrics = session.stepper.metrics() if session.stepper is not None else {}
            return {"ok": True, "rank": self.rank, "value": value, "step": session.optimizer_steps,
                    "progress": session.progress(),  # the display's last answer: the loop's end
                    "metrics": {**strategy.metrics(), "dropped_reports": session.dropped_reports,
                                "replayed_reports": session.replayed_reports, **log_metrics}}
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the driver
            return {"ok": False, "rank": self.rank, "exc_type": type(exc).__name__,
                    "traceback": traceback.format_exc(), **self._end_state(session)}
        finally:
            if session is not None and session.stepper is not None:
                session.stepper.close()

    def _end_state(self, session: Session | None) -> dict[str, Any]:
        """Where a failed run stopped: its step, and whether its state is whole (not torn
        inside an optimizer step). A survivor also commits its queued records (under its own
        generation) so the next generation starts from a log that holds them."""
        if session is None:
            return {"step": None, "consistent": False, "fenced": False}
        fenced = False
        if session.stepper is not None:
            session.stepper.flush(timeout_s=10.0)
            fenced = bool(session.stepper.writer.fenced)
        return {"step": session.optimizer_steps, "consistent": not session.in_step, "fenced": fenced,
                "report_seq": session.step_report_seq}

    def _restore_doc(self, restore: Any) -> dict[str, Any] | None:
        if restore is None:
            return None
        if isinstance(restore, ray.ObjectRef):  # a peer's exported state, via the object store
            restore = ray.get(restore)
        if isinstance(restore, str) and restore == "self":
            if self.session is None:
                raise RuntimeError(f"rank {self.rank} was asked to continue from its own state but has none")
            return capture(self.session, self.generation)
        if isinstance(restore, bytes):
            return ckpt.decode(restore)
        if isinstance(restore, dict) and "checkpoint" in restore:
            return ckpt.read_verified(restore["checkpoint"])
        if isinstance(restore, dict):
            return restore
        raise TypeError(f"unknown restore value {type(restore).__name__}")

    def _make_context(self, local_rank: int, restore: dict[str, Any] | None = None,
                      world_size: int | None = None, config: dict[str, Any] | None = None) -> TrainContext:
        if self.spec.use_gpu:
            if not torch.cuda.is_available():
                raise RuntimeError(f"rank {self.rank} was given a GPU by Ray but torch sees no CUDA device")
            torch.cuda.set_device(0)  # Ray sets CUDA_VISIBLE_DEVICES to this worker's GPU
            device = torch.device("cuda", 0)
        else:
            device = torch.device("cpu")
        start_step = int(restore["step"]) if restore else 0
        positions = (restore or {}).get("loaders") or []
        start_epoch = int(positions[0][0]) if positions and positions[0][0] >= 0 else 0
        world_size = self.spec.num_workers if world_size is None else world_size
        return TrainContext(rank=self.rank, world_size=world_size, local_rank=local_rank,
                            device=device, mode=self.spec.mode, seed=self.spec.seed,
                            generation=self.generation, resumed=restore is not None,
                            start_step=start_step, start_epoch=start_epoch,
                            config=dict(config) if isinstance(config, dict) else {})

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
        raise ResultNotPicklableError(
            f"the training loop on rank {rank} returned a {type(value).__name__} that cannot be "
            f"pickled ({exc}); return plain values (numbers, dicts, tensors, state_dicts)"
        ) from exc
