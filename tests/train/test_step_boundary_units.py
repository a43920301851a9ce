"""The step boundary's commit cadence, without Ray or a coordinator.

The writer thread is real; only its step-log client is replaced (the network edge), by one
that holds each commit until the test lets it go, so what the loop does *during* a commit is
seen deterministically.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import types

import pytest

from synctrain.worker import step as st


class HeldLog:
    """Stands in for :class:`synctrain.steplog.StepLog`: records each commit's steps and holds
    it until :meth:`release`."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.entered = threading.Semaphore(0)
        self.go = threading.Semaphore(0)

    def steps(self, generation, rank, records, checkpoints=None):
        steps: list[int] = []
        for r in records:
            steps.extend(range(r["run"], r["run"] + len(r["times"])) if "run" in r else [r["step"]])
        self.batches.append(steps)
        self.entered.release()
        assert self.go.acquire(timeout=30), "the test never released the commit"
        return {"ok": True}

    def release(self) -> None:
        self.go.release()

    def close(self) -> None:
        pass


def boundary(k: int) -> tuple[st.StepBoundary, HeldLog, types.SimpleNamespace]:
    cfg = st.StepLogConfig(endpoints=("127.0.0.1:9",), token=b"t" * 32, job="j", job_dir="/nonexistent",
                           max_uncommitted_steps=k, checkpoint_every=0)
    b = st.StepBoundary(cfg, rank=0, generation=1, mode="sync")
    held = HeldLog()
    b.writer.steplog = held
    b.start_at(0)
    return b, held, types.SimpleNamespace(optimizer_steps=0, strategy=None)


def run_steps(b: st.StepBoundary, session: types.SimpleNamespace, last: int) -> None:
    while session.optimizer_steps < last:
        session.optimizer_steps += 1
        b.after_step(session)


def wait_committed(b: st.StepBoundary, step: int) -> None:
    with b.writer.cond:
        assert b.writer.cond.wait_for(lambda: b.committed_step >= step, timeout=30), b.committed_step


def test_steps_during_a_commit_do_not_urge_another_one(monkeypatch):
    """K = 16 urges a commit at 12 uncommitted steps. The steps the loop makes while that commit
    is in flight count from the batch it took, not from the last committed step: no second,
    tiny commit right behind the first (a fast loop made two where one would do), and the next
    urge comes 12 steps after the batch."""
    monkeypatch.setattr(st, "FLUSH_INTERVAL_S", 600.0)  # only urges commit here
    b, held, session = boundary(16)
    try:
        assert b.urge_at == 12
        run_steps(b, session, 12)  # the 12th urges
        assert held.entered.acquire(timeout=30), "the urged commit was never made"
        assert held.batches == [list(range(1, 13))] and b.sent_step == 12 and b.committed_step == 0
        run_steps(b, session, 16)  # during the commit: 16 - 0 uncommitted, but only 4 since the batch
        assert not b.writer.urgent, "a step during the commit urged another one"
        held.release()
        wait_committed(b, 12)
        run_steps(b, session, 23)
        assert not b.writer.urgent and len(held.batches) == 1 and b.committed_step == 12
        run_steps(b, session, 24)  # 12 steps since the batch
        assert held.entered.acquire(timeout=30)
        assert held.batches == [list(range(1, 13)), list(range(13, 25))]
        held.release()
    finally:
        held.go.release(10)
        b.close(5.0)


def test_a_failed_commit_gives_its_steps_back_to_the_urge():
    """A commit that fails puts its batch back in the queue: the urge counts from the last
    committed step again, so the retry is not held back as if those steps were sent."""
    b, held, session = boundary(16)

    def failing(generation, rank, records, checkpoints=None):
        held.entered.release()
        assert held.go.acquire(timeout=30)
        raise ConnectionError("no leader")

    b.writer.steplog = types.SimpleNamespace(steps=failing, close=lambda: None)
    try:
        run_steps(b, session, 12)
        assert held.entered.acquire(timeout=30)
        assert b.sent_step == 12
        b.writer.steplog = held  # the retry succeeds
        held.go.release()
        assert held.entered.acquire(timeout=30), "the failed batch was never retried"
        assert held.batches[0][:12] == list(range(1, 13))
        held.release()
        assert b.flush(30) and b.committed_step == b.sent_step == held.batches[-1][-1]
    finally:
        held.go.release(10)
        b.close(5.0)


class RecordingLog:
    """Stands in for the step log: keeps each commit's checkpoint references."""

    def __init__(self) -> None:
        self.refs: list[list[dict]] = []

    def steps(self, generation, rank, records, checkpoints=None):
        self.refs.append(list(checkpoints or []))
        return {"ok": True}

    def close(self) -> None:
        pass


def written_in_one_commit(tmp_path, mode: str, digest_every: int) -> tuple[st.StepBoundary, RecordingLog]:
    import torch

    cfg = st.StepLogConfig(endpoints=("127.0.0.1:9",), token=b"t" * 32, job="j", job_dir=str(tmp_path),
                           max_uncommitted_steps=1024, checkpoint_every=1, digest_every=digest_every)
    b = st.StepBoundary(cfg, rank=0, generation=1, mode=mode)
    b.writer.steplog = log = RecordingLog()
    batch: list[tuple] = []
    for step in range(1, 5):
        batch.append(("step", step, 0.0, None))
        doc = {"step": step, "generation": 1, "mode": mode, "models": [{"w": torch.full((3,), float(step))}],
               "strategy": {"w": torch.full((3,), float(step))}}
        batch.append(("checkpoint", step, doc))
    assert b.writer._commit(batch, 1)
    b.close()
    return b, log


@pytest.mark.parametrize("mode, digest_every", [("async", 0), ("sync", 0), ("sync", 1)])
def test_only_the_newest_two_checkpoints_of_a_commit_are_written(tmp_path, mode, digest_every):
    """Four checkpoints in one commit: the log keeps the newest two live, so without replica
    digests it would prune the others in that same commit; with them (sync, digest_every=1) a
    rollback takes the newest written one the digests vouch for, a commit's worth of steps
    earlier at most. Either way only the newest two are written and committed."""
    b, log = written_in_one_commit(tmp_path, mode, digest_every=digest_every)
    assert [[r["step"] for r in refs] for refs in log.refs] == [[3, 4]]
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-000000003-g1.pt", "ckpt-000000004-g1.pt"]
    assert b.metrics()["steplog_skipped_checkpoints"] == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own nice value is Linux's")
def test_the_writer_thread_runs_below_the_loops_priority_and_the_loop_keeps_its_own():

    cfg = st.StepLogConfig(endpoints=("127.0.0.1:9",), token=b"t" * 32, job="j", job_dir="/nonexistent",
                           checkpoint_every=0, writer_nice=5)
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    b = st.StepBoundary(cfg, rank=0, generation=1, mode="sync")
    try:
        tid = b.writer.native_id
        assert tid is not None
        deadline = time.monotonic() + 30
        while os.getpriority(os.PRIO_PROCESS, tid) != min(19, mine + 5):
            assert time.monotonic() < deadline, "the writer never lowered its priority"
            time.sleep(0.01)
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine
    finally:
        b.writer.stop(10)
