"""Reading a cluster's state from its nodes' disks, read-only (coordinator/offline.py and
storage.read_log): nothing on disk changes, a torn tail is read around, only committed
entries count (Raft's figure 8), and the result answers like the live state machine -- on
hand-built logs, then on a real 3-node cluster whose nodes all die by SIGKILL."""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import pytest

from coordinator.offline import committed_index, node_dirs, read_state
from coordinator.raft.messages import ConfState, Entry, HardState
from coordinator.statemachine import StateMachine, encode_command
from coordinator.storage import DiskStorage, read_log

VOTERS = ConfState(voters=(1, 2, 3))


def fingerprint(d: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``d``: size, mtime and content hash (what "nothing written" means)."""
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns,
                                    hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(d.rglob("*")) if p.is_file()}


def commands(n: int) -> list[bytes]:
    """A session and ``n`` step-log commands: create job "j", a generation, then steps."""
    out = [encode_command("register", 0, 0, 0, 0, b"r")]
    session = 1  # the register entry's index
    out.append(encode_command("steplog.create", session, 1, 1, 0, "j", {"mode": "sync"}, False))
    out.append(encode_command("steplog.generation", session, 2, 1, 0, "j", 1,
                              [{"rank": 0, "node_id": "a"}], None, 0, 0, "start", 1.0))
    for k in range(n):
        step = {"step": k + 1, "time": 2.0 + k, "reports": [{"seq": k, "metrics": {"loss": 1 / (k + 1)}}]}
        out.append(encode_command("steplog.steps", session, 3 + k, 1, 0, "j", 1, 0, [step]))
    return out


def node(tmp_path: Path, node_id: int, entries: list[Entry], commit: int, term: int | None = None,
         snapshot_at: int = 0) -> Path:
    d = tmp_path / f"node-{node_id}"
    with DiskStorage(d, conf_state=VOTERS, fsync=False) as s:
        last_term = entries[-1].term if entries else 0
        s.save(HardState(term or last_term, 0, commit), entries)
        if snapshot_at:
            sm = StateMachine()
            for e in entries[:snapshot_at]:
                sm.apply(e.index, e.data)
            s.create_snapshot(snapshot_at, None, sm.snapshot())
            s.compact(snapshot_at)
    return d


def as_entries(datas: list[bytes], term: int = 1) -> list[Entry]:
    return [Entry(term, i + 1, data=d) for i, d in enumerate(datas)]


def reference(datas: list[bytes], upto: int) -> StateMachine:
    sm = StateMachine()
    for i, d in enumerate(datas[:upto]):
        sm.apply(i + 1, d)
    return sm


# ---- read_log: read-only -----------------------------------------------------------------
def test_read_log_writes_nothing_and_reads_a_running_node(tmp_path: Path) -> None:
    d = tmp_path / "node-1"
    with DiskStorage(d, conf_state=VOTERS, fsync=False, preallocate_bytes=1 << 16) as s:
        entries = as_entries(commands(5))
        s.save(HardState(1, 1, 4), entries[:4])
        s.save(HardState(1, 1, 6), entries[4:])
        before = fingerprint(d)
        view = read_log(d)  # the storage holds the LOCK meanwhile: not taken, not needed
        assert fingerprint(d) == before
        assert view.entries == tuple(s.entries(1, s.last_index() + 1))
        assert view.hard_state == HardState(1, 1, 6) and view.torn_tail is None
        assert view.conf_state == VOTERS


def test_a_torn_tail_ends_the_read_and_stays_on_disk(tmp_path: Path) -> None:
    d = tmp_path / "node-1"
    with DiskStorage(d, conf_state=VOTERS, fsync=False) as s:
        entries = as_entries(commands(4))
        s.save(HardState(1, 1, 3), entries[:3])
        s.save(HardState(1, 1, 7), entries[3:])
    (segment,) = sorted(d.glob("wal-*.log"))
    os.truncate(segment, segment.stat().st_size - 5)  # the last save, torn
    before = fingerprint(d)
    view = read_log(d)
    assert fingerprint(d) == before, "a reader never cuts the tail"
    assert view.last_index == 3 and view.hard_state.commit == 3
    assert view.torn_tail is not None and "incomplete frame" in view.torn_tail
    with DiskStorage(d, fsync=False) as s:  # the node itself cuts it and agrees
        assert s.last_index() == 3


# ---- the committed prefix ------------------------------------------------------------------
def test_figure_8_an_older_term_on_a_majority_is_not_committed(tmp_path: Path) -> None:
    """Raft paper figure 8 (c): the term-2 entry at index 2 is on a majority, but node 3's
    newer term-3 entry can win an election and replace it, so only index 1 is committed."""
    e1 = Entry(1, 1)
    dirs = [node(tmp_path, 1, [e1, Entry(2, 2)], commit=1),
            node(tmp_path, 2, [e1, Entry(2, 2)], commit=1),
            node(tmp_path, 3, [e1, Entry(3, 2)], commit=1)]
    assert read_state(dirs).commit_index == 1
    logs = {k + 1: read_log(d) for k, d in enumerate(dirs)}
    assert committed_index(logs, (1, 2, 3)) == (1, 1)
    # (d): the newest term's entry on a majority is committed, though no commit index says so
    for k in (1, 2):
        logs[k] = read_log(node(tmp_path / "d", k, [e1, Entry(3, 2)], commit=1))
    logs[3] = read_log(node(tmp_path / "d", 3, [e1, Entry(2, 2)], commit=1))
    assert committed_index(logs, (1, 2, 3)) == (2, 3)
    # ... but not when a voter could not be read: it might hold a newer term
    assert committed_index({1: logs[1], 2: logs[2]}, (1, 2, 3)) == (1, 1)


def test_a_persisted_commit_index_counts_alone(tmp_path: Path) -> None:
    e = [Entry(1, 1), Entry(1, 2), Entry(1, 3)]
    logs = {1: read_log(node(tmp_path, 1, e, commit=3))}
    assert committed_index(logs, (1, 2, 3)) == (3, 1)


def test_offline_state_answers_like_the_live_state_machine(tmp_path: Path) -> None:
    datas = commands(30)
    entries = as_entries(datas)
    n = len(entries)
    # node 1: everything, a snapshot in the middle; node 2: everything, commit persisted
    # only up to n - 2; node 3: behind. The last two entries are on a majority: committed.
    dirs = [node(tmp_path, 1, entries, commit=n - 5, snapshot_at=10),
            node(tmp_path, 2, entries, commit=n - 2),
            node(tmp_path, 3, entries[:-6], commit=n - 8)]
    state = read_state(dirs)
    assert state.commit_index == n
    assert state.state_machine.snapshot() == reference(datas, n).snapshot()
    job = state.state_machine.query("steplog", "job", ("j",))["job"]
    assert job["last_step"] == 30 and job["report_seq"] == 30
    assert [n.commit for n in state.nodes] == [n - 5, n - 2, n - 8]


def test_node_dirs_are_found_by_id(tmp_path: Path) -> None:
    for name in ("node-10", "node-2", "node-1.log", "token"):
        (tmp_path / name).mkdir() if not name.endswith((".log", "token")) else (tmp_path / name).touch()
    assert [p.name for p in node_dirs(tmp_path)] == ["node-2", "node-10"]
    assert node_dirs(tmp_path / "absent") == []


# ---- a real cluster, every node killed --------------------------------------------------------
def test_every_acknowledged_write_is_read_back_after_all_nodes_are_killed(tmp_path: Path) -> None:
    from coordinator.cluster import LocalCluster

    cluster = LocalCluster(nodes=3, data_dir=tmp_path / "c", tick_ms=10.0, snapshot_every=16)
    try:
        cluster.start()
        with cluster.client() as client:
            client.command("steplog.create", "j", {"mode": "sync"}, False)
            client.command("steplog.generation", "j", 1, [{"rank": 0, "node_id": "a"}], None, 0, 0,
                           "start", 1.0)
            for k in range(40):
                client.command("steplog.steps", "j", 1, 0,
                               [{"step": k + 1, "time": float(k), "reports": [{"seq": k, "metrics": {"k": k}}]}])
            live = client.query("steplog", "records", "j", "reports", 0, 2000)["items"]
            before_kill = read_state(node_dirs(cluster.data_dir))  # nodes running: LOCKs held
        for i in cluster.node_ids:
            os.kill(cluster.pid(i), signal.SIGKILL)
        for i in cluster.node_ids:
            cluster.procs[i].wait(10)
    finally:
        cluster.stop()
    for state in (before_kill, read_state(node_dirs(tmp_path / "c"))):
        ext = state.state_machine.query("steplog", "records", ("j", "reports", 0, 2000))
        assert ext["items"] == live, "every acknowledged report is committed on disk"
    assert state.voters == (1, 2, 3)
    assert state.elected in (1, 2, 3)
    assert max(n.snapshot_index for n in state.nodes) > 0, "snapshots and compaction were read too"


@pytest.mark.parametrize("what", ["empty", "garbage"])
def test_unreadable_nodes_are_named(tmp_path: Path, what: str) -> None:
    d = tmp_path / "node-1"
    d.mkdir()
    if what == "garbage":
        (d / "wal-00000000-0000000000000000.log").write_bytes(b"\x01" * 40)
        (d / "wal-00000001-0000000000000000.log").write_bytes(b"\x01" * 40)
        from coordinator.storage import StorageError

        with pytest.raises(StorageError, match="node 1: CorruptLogError"):
            read_state([d])
    else:  # an empty directory is a node that never wrote: an empty state
        assert read_state([d]).commit_index == 0
