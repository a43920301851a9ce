"""The shared-memory all-reduce between real processes (issue 13).

Each test starts the ranks as separate Python processes (``shm_peer.py``) that join a gloo
process group and set up the transport through ``shm_hook.connect``, the path the sync
strategy takes. What they show:

* sums of every size (empty, fewer elements than ranks, odd, a hundred chunks) and dtype
  equal the fixed-order sum ``((x0 + x1) + x2) + ...`` bit for bit and are bit-identical on
  every rank, for 2, 3 and 4 ranks; broadcast from every rank; no segment name is left in
  /dev/shm once the ranks are set up;
* a rank SIGKILLed in the middle of an all-reduce fails every survivor within seconds with a
  CollectiveError naming it (the timeout is 60 s); a rank whose loop raised (it leaves, alive)
  fails them too; a live rank that never arrives fails them after the timeout;
* the segment file: O_EXCL, 0600, refused when its token, size or place is wrong; the
  driver's leftover sweep removes only this job's regular files.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch

from synctrain.errors import CollectiveError
from synctrain.strategies import shm_allreduce as shm

pytestmark = pytest.mark.skipif(shm.supported() is not None, reason=str(shm.supported()))

PEER = pathlib.Path(__file__).with_name("shm_peer.py")
MARKER = "SHM_PEER "
REPO = pathlib.Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_peers(scenario: str, world: int, *, job: str, timeout_s: float = 60.0, victim: int = -1,
              wall_s: float = 120.0) -> dict[int, dict]:
    """Start ``world`` peer processes and return each rank's result. The victim's is not
    waited for: it died (``kill``) or waits to be killed once the others reported."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(PEER), scenario, "--rank", str(r), "--world", str(world),
                               "--port", str(port), "--job", job, "--timeout-s", str(timeout_s),
                               "--victim", str(victim)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for r in range(world)]
    results: dict[int, dict] = {}
    try:
        for rank, proc in enumerate(procs):
            if rank == victim:
                continue
            out, err = proc.communicate(timeout=wall_s)
            lines = [ln for ln in out.splitlines() if ln.startswith(MARKER)]
            assert lines, f"rank {rank} printed no result (rc {proc.returncode}):\n{err[-3000:]}"
            results[rank] = json.loads(lines[-1][len(MARKER):])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    return results


def job_files(job: str) -> list[str]:
    return sorted(pathlib.Path(shm.SHM_DIR).glob(f"{shm.PREFIX}{job}-*"))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_sums_are_the_fixed_order_sum_and_identical_on_every_rank(world):
    job = f"t{os.getpid()}w{world}"
    results = run_peers("reduce", world, job=job)
    for rank, res in results.items():
        assert res["ok"], res.get("traceback")
        assert res["transport"] == "shm"
        assert res["left_in_dev_shm"] == [], "the segment's name must be gone once every rank mapped it"
        wrong = [case for case, c in res["cases"].items() if not c["equal"]]
        assert not wrong, f"rank {rank}: not the fixed-order sum: {wrong}"
        assert all(res["broadcast"]), res["broadcast"]
    digests = [{case: c["digest"] for case, c in res["cases"].items()} for res in results.values()]
    assert all(d == digests[0] for d in digests), "ranks hold different bits"
    assert job_files(job) == []


def test_a_peer_killed_mid_all_reduce_fails_the_survivors_within_seconds():
    job = f"t{os.getpid()}kill"
    results = run_peers("kill", 3, job=job, timeout_s=60.0, victim=2)
    assert set(results) == {0, 1}
    for rank, res in results.items():
        assert res["ok"], res.get("traceback")
        assert res["exc_type"] == "CollectiveError", res
        assert "rank 2" in res["message"] and "exited" in res["message"], res["message"]
        assert res["after_s"] < 5.0, f"rank {rank} waited {res['after_s']:.1f}s for a dead peer"
    assert job_files(job) == [], "kill -9 of a rank must leave no file in /dev/shm"


def test_a_peer_that_left_fails_the_survivors_at_once():
    job = f"t{os.getpid()}raise"
    results = run_peers("raise", 3, job=job, timeout_s=60.0, victim=1)
    for rank in (0, 2):
        res = results[rank]
        assert res["exc_type"] == "CollectiveError", res
        assert "rank 1 left" in res["message"], res["message"]
        assert res["after_s"] < 5.0, res


def test_a_live_peer_that_never_arrives_times_out_with_a_clear_error():
    job = f"t{os.getpid()}stuck"
    results = run_peers("stuck", 2, job=job, timeout_s=1.0, victim=1)
    res = results[0]
    assert res["exc_type"] == "CollectiveError", res
    assert "rank 1 did not reach" in res["message"] and "within 1 s" in res["message"], res["message"]
    assert 0.9 < res["after_s"] < 4.0, res


# ---- the segment file ------------------------------------------------------------------------
def test_segment_is_private_exclusive_and_checked_on_attach(tmp_path):
    job = f"t{os.getpid()}seg"
    path = os.path.join(shm.SHM_DIR, shm.file_name(job, 3, 1234, 0, os.urandom(shm.NONCE_BYTES)))
    assert f"{shm.PREFIX}{job}-g3-p1234-r0-" in path  # job, generation and rendezvous in the name
    seg = shm.Segment.create(path, 2, 4096)
    try:
        info = os.stat(path)
        assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_size == shm.segment_bytes(2, 4096)
        with pytest.raises(FileExistsError):
            shm.Segment.create(path, 2, 4096)  # O_EXCL: nobody can plant the name first
        with pytest.raises(CollectiveError, match="wrong token"):
            shm.Segment.attach(path, bytes(shm.TOKEN_BYTES), job, 2, 4096)
        with pytest.raises(CollectiveError, match="bytes"):
            shm.Segment.attach(path, seg.token, job, 3, 4096)  # another layout
        with pytest.raises(CollectiveError, match="refused to map"):
            shm.Segment.attach(path, seg.token, "otherjob", 2, 4096)
        other = shm.Segment.attach(path, seg.token, job, 2, 4096)
        other.close()
    finally:
        seg.unlink()
        seg.close()
    assert not os.path.exists(path)


def test_leftover_sweep_removes_only_this_jobs_files(tmp_path):
    job = f"t{os.getpid()}left"
    mine = pathlib.Path(shm.SHM_DIR, f"{shm.PREFIX}{job}-g1-p1-r0-00")
    other_job = pathlib.Path(shm.SHM_DIR, f"{shm.PREFIX}{job}x-g1-p1-r0-00")
    link = pathlib.Path(shm.SHM_DIR, f"{shm.PREFIX}{job}-link")
    try:
        mine.write_bytes(b"x")
        other_job.write_bytes(b"x")
        link.symlink_to(other_job)
        assert shm.remove_leftovers(job) == 1
        assert not mine.exists() and other_job.exists() and link.is_symlink()
    finally:
        for p in (mine, other_job, link):
            p.unlink(missing_ok=True)


def test_a_waiting_rank_wakes_within_the_liveness_poll_when_its_peer_leaves():
    """One process, two communicators on one segment: close() of one makes the other's wait
    fail at once (the futex wake and the closed line), not after the 30 s timeout."""
    job = f"t{os.getpid()}wake"
    path = os.path.join(shm.SHM_DIR, shm.file_name(job, 1, 1, 0, os.urandom(shm.NONCE_BYTES)))
    seg = shm.Segment.create(path, 2, 4096)
    peer_seg = shm.Segment.attach(path, seg.token, job, 2, 4096)
    seg.unlink()
    a = shm.ShmCommunicator(seg, 0, [0, 1], timeout_s=30)
    b = shm.ShmCommunicator(peer_seg, 1, [0, 1], timeout_s=30)
    threading.Timer(0.2, b.close).start()
    started = time.monotonic()
    with pytest.raises(CollectiveError, match="rank 1 left"):
        a.barrier()
    assert time.monotonic() - started < 2.0
    with pytest.raises(CollectiveError, match="failed before"):
        a.barrier()  # a broken communicator stays broken
    a.close()


@pytest.mark.parametrize("world,nbytes,barriers", [(2, 1 << 20, 1), (2, (1 << 20) + 4, 3), (3, 512 << 10, 2),
                                                   (3, 256 << 10, 1)])
def test_how_many_barriers_an_all_reduce_takes(world, nbytes, barriers):
    """One barrier up to 1 MiB with two ranks (each rank sums the whole tensor; cheaper than a
    second barrier's wake-up), up to 256 KiB with more; beyond, two per chunk pipelined plus
    one. Ranks run as threads of this process on one segment; every rank gets the rank-order
    sum, bit for bit, either way."""
    job = f"t{os.getpid()}b{world}x{nbytes}"
    path = os.path.join(shm.SHM_DIR, shm.file_name(job, 1, 1, 0, os.urandom(shm.NONCE_BYTES)))
    chunk = 1 << 20
    seg = shm.Segment.create(path, world, chunk)
    segs = [seg] + [shm.Segment.attach(path, seg.token, job, world, chunk) for _ in range(world - 1)]
    seg.unlink()
    comms = [shm.ShmCommunicator(s, r, list(range(world)), timeout_s=30) for r, s in enumerate(segs)]
    g = torch.Generator().manual_seed(nbytes)
    inputs = [torch.randn(nbytes // 4, generator=g) for _ in range(world)]
    expected = inputs[0].clone()
    for x in inputs[1:]:
        expected = expected + x
    outputs = [x.clone() for x in inputs]
    errors: list[BaseException] = []

    def reduce(rank: int) -> None:
        try:
            comms[rank].all_reduce_(outputs[rank])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reduce, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not errors, errors
        assert all(torch.equal(out, expected) for out in outputs)
        assert [int(s.control[r, shm._ARRIVALS]) for r, s in enumerate(segs)] == [barriers] * world
    finally:
        for c in comms:
            c.close()
