"""Sync mode's gradient transport: shared memory within a host, gloo between hosts.

Theory of operation. Every sync job starts a gloo (or NCCL) process group as before; it
stays the control plane (DDP's initial broadcast, ZeRO-1, the model check) and the
between-hosts path. :func:`connect` is then a collective over that group that decides, the
same way on every rank, whether gradients travel through shared memory:

1. each rank contributes a key of its host (its Ray node), so every rank learns which ranks
   share a host: a *host group*, whose lowest rank is its *leader*;
2. each rank says whether it can run the shared-memory path (x86-64 Linux, a writable
   ``/dev/shm``); one "no" anywhere makes ``"auto"`` fall back to gloo on every rank and
   makes an explicit ``"shm"`` fail on every rank, naming the rank and the reason;
3. each leader creates its host's segment (:class:`~synctrain.strategies.shm_allreduce.Segment`)
   and hands the name's random part and the header token to the ranks through the process
   group; they map it and check it; once all did, the name is unlinked;
4. each rank opens a watch on its host peers' processes (to fail fast when one dies);
5. with more than one host, the leaders get a gloo group of their own.

The result, a :class:`ShmTransport`, all-reduces a tensor within each host through shared
memory; across hosts the leaders all-reduce the host sums over their gloo group and hand the
total back through shared memory ("shm+gloo"). It backs a DDP comm hook
(:func:`shm_allreduce_hook`; the fp16/bf16 hooks of :mod:`.comm_hooks` take it as their state)
and the strategy's ``all_reduce``, ``broadcast`` and ``barrier``. The hook runs the all-reduce
in the backward pass's thread, as DDP hands it each bucket, and returns a completed future:
the copies and sums are CPU work on the rank's own core, so there is nothing to overlap with
but the same core's backward pass.
"""

# No `from __future__ import annotations`: DDP inspects the hook's real annotations.

import hashlib
import logging
import os
import queue
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch
import torch.distributed as dist
from torch.autograd import Variable
from torch.nn.parallel import DistributedDataParallel

from synctrain.errors import CollectiveError, ConfigError
from synctrain.strategies import shm_allreduce as shm

log = logging.getLogger(__name__)

TRANSPORTS = ("auto", "shm", "gloo", "nccl")
#: Collectives waiting for the transport's thread (DDP submits one per bucket per step).
MAX_QUEUED_COLLECTIVES = 1024
#: How long closing waits for the thread to finish the collective it is in.
CLOSE_WAIT_S = 5.0


def host_key() -> int:
    """A 63-bit key of this rank's host: its Ray node (two Ray nodes on one machine are two
    hosts, as Ray schedules them), else the machine's hostname and boot."""
    ident = ""
    try:
        import ray

        if ray.is_initialized():
            ident = "ray:" + ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray: the machine is the host
        ident = ""
    if not ident:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                boot = f.read().strip()
        except OSError:
            boot = ""
        ident = f"host:{socket.gethostname()}:{boot}"
    return int.from_bytes(hashlib.sha256(ident.encode()).digest()[:8], "big") >> 1


class _CommThread:
    """Runs one transport's collectives one at a time, in the order they were submitted, on a
    thread of their own. Every rank submits the same collectives in the same order (DDP hands
    buckets over in bucket order), so the order is the same on every rank.

    :meth:`call` (a collective the caller waits for) runs on the caller's thread when nothing
    is queued or running: the hand-off to the thread and back costs two wake-ups (measured on
    the busy 2-core host, back-to-back 4 KB sums: 0.42 ms through the thread, 0.18 ms inline).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.Queue[tuple[Callable[[], Any], Future[Any]] | None] = queue.Queue(MAX_QUEUED_COLLECTIVES)
        self._thread: threading.Thread | None = None
        self._running = threading.Lock()  # held while a collective runs, on either thread
        self._count_lock = threading.Lock()
        self._unfinished = 0  # submitted to the thread and not finished

    def submit(self, fn: Callable[[], Any]) -> Future[Any]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        job: Future[Any] = Future()
        with self._count_lock:
            self._unfinished += 1
        self._jobs.put((fn, job))  # blocks while MAX_QUEUED_COLLECTIVES are waiting
        return job

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` after everything submitted before it; its exception is raised here."""
        if self._running.acquire(blocking=False):
            try:
                if self._unfinished == 0:  # nothing ahead of it: no hand-off
                    return fn()
            finally:
                self._running.release()
        return self.submit(fn).result()

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            fn, job = item
            with self._running:
                if job.set_running_or_notify_cancel():
                    try:
                        job.set_result(fn())
                    except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the job
                        job.set_exception(exc)
                with self._count_lock:
                    self._unfinished -= 1

    def close(self, timeout_s: float) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout_s)
            self._thread = None


class ShmTransport:
    """Sum, broadcast and barrier over all ranks: shared memory within each host, the host
    leaders' gloo group between hosts. ``name`` is ``"shm"`` (one host) or ``"shm+gloo"``.

    The collectives run on the transport's own thread (see the module doc), or on the caller's
    when none is queued; the methods here wait for theirs, :meth:`all_reduce_future` does not.
    """

    def __init__(self, comm: Any, rank: int, world_size: int, host_of: list[int],
                 leaders: list[int], leaders_group: Any) -> None:
        self.comm = comm  # ShmCommunicator of this host, or None where this rank is alone on it
        self.rank = rank
        self.world_size = world_size
        self.host_of = host_of  # rank -> index of its host group
        self.leaders = leaders  # the lowest rank of each host group, by host index
        self.leaders_group = leaders_group  # None with one host
        self.name = "shm" if leaders_group is None else "shm+gloo"
        self._thread = _CommThread(f"synctrain-{self.name}-rank{rank}")

    @property
    def is_leader(self) -> bool:
        return self.leaders[self.host_of[self.rank]] == self.rank

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` (on the CPU, any shape) over all ranks, in place; returns it."""
        flat, writeback = _flat(tensor)
        self._thread.call(lambda: self._sum_now(flat))
        if writeback:
            tensor.copy_(flat.view_as(tensor))
        return tensor

    def all_reduce_future(self, flat: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
        """Start summing the flat contiguous ``flat`` in place; the future resolves to it.

        For DDP comm hooks, inside the backward pass. A failure must reach the loop as itself
        (a CollectiveError naming the vanished peer): DDP would turn an exception set on the
        future into an anonymous RuntimeError, so the future always completes, and a callback
        queued on the backward pass raises the job's exception before ``backward()`` returns
        (before the optimizer could apply an unreduced gradient).
        """
        job = self._thread.submit(lambda: self._sum_now(flat))
        done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        job.add_done_callback(lambda _job: done.set_result(flat))
        try:
            Variable._execution_engine.queue_callback(job.result)
        except RuntimeError:  # not inside a backward pass: wait here
            job.result()
        return done

    def broadcast_(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Overwrite ``tensor`` on every rank with rank ``src``'s, in place; returns it."""
        flat, writeback = _flat(tensor)
        self._thread.call(lambda: self._broadcast_now(flat, src))
        if writeback:
            tensor.copy_(flat.view_as(tensor))
        return tensor

    def barrier(self) -> None:
        self._thread.call(self._barrier_now)

    def close(self) -> None:
        """Stop the thread and leave the segment (peers still waiting on this rank fail now)."""
        self._thread.close(CLOSE_WAIT_S)
        if self.comm is not None:
            self.comm.close()

    # ---- on the transport's thread --------------------------------------------------------
    def _sum_now(self, flat: torch.Tensor) -> None:
        between = None
        if self.leaders_group is not None:
            group = self.leaders_group

            def between(t: torch.Tensor) -> None:
                dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)

        if self.comm is not None:
            self.comm.all_reduce_(flat, between)
        elif between is not None:  # alone on this host: only the hosts' sum
            between(flat)

    def _broadcast_now(self, flat: torch.Tensor, src: int) -> None:
        src_host = self.host_of[src]
        on_src_host = self.host_of[self.rank] == src_host
        src_local = self._local_index(src)
        if self.comm is not None and on_src_host and src_local != 0:
            self.comm.broadcast_(flat, src_local)  # src's host, its leader included
        if self.leaders_group is not None and self.is_leader:
            dist.broadcast(flat, src=self.leaders[src_host], group=self.leaders_group)
        if self.comm is not None and not (on_src_host and src_local != 0):
            self.comm.broadcast_(flat, 0)  # from the leader, who has it now

    def _barrier_now(self) -> None:
        if self.comm is not None:
            self.comm.barrier()
        if self.leaders_group is not None:
            if self.is_leader:
                dist.barrier(group=self.leaders_group)
            if self.comm is not None:
                self.comm.barrier()

    def _local_index(self, rank: int) -> int:
        host = self.host_of[rank]
        return sum(1 for r in range(rank) if self.host_of[r] == host)


def _flat(tensor: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if tensor.device.type != "cpu":
        raise ValueError(f"the shared-memory transport moves CPU tensors; got one on {tensor.device}")
    if tensor.is_contiguous():
        return tensor.view(-1), False
    return tensor.contiguous().view(-1), True


def shm_allreduce_hook(state: ShmTransport, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: average ``bucket`` over all ranks through ``state`` (a ShmTransport).

    Like DDP's default hook, it divides by the world size first and then sums, so the result
    is the mean; it is bit-identical on every rank. The sum runs on the transport's thread
    while the backward pass goes on.
    """
    buffer = bucket.buffer()
    buffer.div_(state.world_size)
    return state.all_reduce_future(buffer)


def register_before_first_forward(ddp: DistributedDataParallel, transport: ShmTransport) -> None:
    """Make :func:`shm_allreduce_hook` ``ddp``'s comm hook just before its first forward,
    unless the loop registered one of its own on the prepared model by then: DDP takes one
    hook, and a loop that brings its own (PowerSGD, say) keeps it."""

    def register(module: DistributedDataParallel, _args: Any) -> None:
        handle.remove()
        if not getattr(module, "_comm_hooks", None):
            module.register_comm_hook(state=transport, hook=shm_allreduce_hook)

    handle = ddp.register_forward_pre_hook(register)


def connect(requested: str, *, rank: int, world_size: int, job_id: str, generation: int,
            rendezvous_port: int, timeout_s: float,
            chunk_bytes: int = shm.DEFAULT_CHUNK_BYTES) -> ShmTransport | None:
    """Set up the shared-memory transport; every rank of the default process group calls it.

    ``requested`` is ``"auto"`` or ``"shm"``. Returns None where gloo stays the transport:
    ``"auto"`` on a host that cannot (every rank gets None), or no host with two ranks.
    Raises ConfigError on every rank when ``"shm"`` cannot be had.
    """
    assert requested in ("auto", "shm"), requested
    keys = _all_gather_int(host_key())
    hosts = sorted(set(keys), key=keys.index)  # host index by first rank
    host_of = [hosts.index(k) for k in keys]
    members = [r for r in range(world_size) if host_of[r] == host_of[rank]]
    leaders = [keys.index(k) for k in hosts]
    problem = shm.supported()
    can = _all_gather_int(0 if problem else 1)
    if 0 in can:
        bad = can.index(0)
        if requested == "shm":
            raise ConfigError(f"grad_transport='shm' cannot run on rank {bad}'s host: "
                              f"{problem if bad == rank else 'see that rank'}; use 'auto' or 'gloo'")
        log.info("grad_transport='auto' uses gloo: rank %d cannot share memory (%s)", bad, problem)
        return None
    if all(host_of.count(h) == 1 for h in range(len(hosts))):
        return None  # one rank per host: nothing to share
    comm = _map_segment(rank, members, job_id, generation, rendezvous_port, timeout_s, chunk_bytes)
    if 0 in _all_gather_int(1 if comm is not None or len(members) == 1 else 0):
        if comm is not None:
            comm.close()
        if requested == "shm":
            raise ConfigError("grad_transport='shm': a host's ranks could not share a segment (see the log "
                              "of the rank named there); use 'auto' or 'gloo'")
        return None
    group = None
    if len(hosts) > 1:  # every rank takes part in creating it, members or not
        group = dist.new_group(leaders, backend="gloo")
    return ShmTransport(comm, rank, world_size, host_of, leaders, group)


def _map_segment(rank: int, members: list[int], job_id: str, generation: int, port: int,
                 timeout_s: float, chunk_bytes: int) -> Any:
    """Steps 3-4 of the module doc. Every rank calls it (the gathers span all ranks); a rank
    alone on its host contributes nothing and gets None, as does one whose host's ranks could
    not all map the segment. Returns this rank's ShmCommunicator."""
    local_rank = members.index(rank)
    leader = members[0]
    alone = len(members) == 1
    segment = None
    offer = torch.zeros(1 + shm.NONCE_BYTES + shm.TOKEN_BYTES, dtype=torch.uint8)
    if local_rank == 0 and not alone:
        nonce = os.urandom(shm.NONCE_BYTES)
        path = os.path.join(shm.SHM_DIR, shm.file_name(job_id, generation, port, leader, nonce))
        try:
            segment = shm.Segment.create(path, len(members), chunk_bytes)
            offer = torch.tensor([1, *nonce, *segment.token], dtype=torch.uint8)
        except OSError as exc:
            log.warning("rank %d could not create its host's all-reduce segment %s: %s", rank, path, exc)
    comm = None
    try:
        theirs = _all_gather_bytes(offer)[leader]
        if segment is None and not alone and theirs[0] == 1:
            nonce, token = theirs[1:1 + shm.NONCE_BYTES], theirs[1 + shm.NONCE_BYTES:]
            path = os.path.join(shm.SHM_DIR, shm.file_name(job_id, generation, port, leader, nonce))
            try:
                segment = shm.Segment.attach(path, token, job_id, len(members), chunk_bytes)
            except (OSError, CollectiveError) as exc:
                log.warning("rank %d could not map its host's all-reduce segment %s: %s", rank, path, exc)
        if segment is not None:
            comm = shm.ShmCommunicator(segment, local_rank, members, timeout_s)
        mapped = _all_gather_int(1 if comm is not None else 0)  # and now every pid is written
    finally:
        if segment is not None:
            segment.unlink()  # every rank mapped it (or gave up): the memory lives as long as they do
    if comm is None or any(mapped[r] == 0 for r in members):
        if comm is not None:
            comm.close()
        return None
    if not comm.watch_peers():
        log.warning("rank %d cannot see its host peers' processes (another pid namespace?): a peer that "
                    "dies is found only after collective_timeout_s=%gs", rank, timeout_s)
    return comm


def _all_gather_int(value: int) -> list[int]:
    mine = torch.tensor([value], dtype=torch.int64)
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [int(t[0]) for t in out]


def _all_gather_bytes(value: torch.Tensor) -> list[bytes]:
    out = [torch.zeros_like(value) for _ in range(dist.get_world_size())]
    dist.all_gather(out, value)
    return [bytes(t.tolist()) for t in out]
