"""Recovery reads about the log since the last snapshot, not a whole WAL segment of
compacted entries (issue 17, point 5): after a compaction a segment of 4 MiB or more is
closed at the next write, and the compaction after that deletes it."""

from __future__ import annotations

import time

from coordinator.raft.messages import ConfState, Entry
from coordinator.storage import DiskStorage

VOTERS = ConfState(voters=(1, 2, 3))


def _write(s: DiskStorage, lo: int, hi: int) -> None:
    for start in range(lo, hi, 500):
        s.save(None, [Entry(1, i, data=b"x" * 1000) for i in range(start, min(hi, start + 500))])


def test_a_large_segment_is_closed_after_a_compaction_and_then_deleted(tmp_path) -> None:
    with DiskStorage(tmp_path, conf_state=VOTERS, fsync=False) as s:
        _write(s, 1, 6001)  # ~6 MB in the first segment
        assert len(list(tmp_path.glob("wal-*.log"))) == 1
        s.create_snapshot(5000, None, b"state@5000")
        s.compact(4000)
        _write(s, 6001, 6101)  # the first write after it opens a new segment
        assert len(list(tmp_path.glob("wal-*.log"))) == 2
        s.create_snapshot(6100, None, b"state@6100")
        s.compact(6050)  # covers everything in the first segment: deleted
        segs = sorted(tmp_path.glob("wal-*.log"))
        assert len(segs) == 1 and segs[0].name.startswith("wal-00000002")
    started = time.perf_counter()
    with DiskStorage(tmp_path, fsync=False) as s:  # recovery reads the small segment only
        assert (s.first_index(), s.last_index()) == (6051, 6100)
        assert s.snapshot().metadata.index == 6100
        assert s.entries(6051, 6101)[-1].data == b"x" * 1000
    print(f"reopened in {(time.perf_counter() - started) * 1e3:.1f} ms")


def test_a_small_segment_is_kept_after_a_compaction(tmp_path) -> None:
    with DiskStorage(tmp_path, conf_state=VOTERS, fsync=False) as s:
        _write(s, 1, 1001)  # ~1 MB: not worth a segment of its own
        s.create_snapshot(900, None, b"s")
        s.compact(800)
        _write(s, 1001, 1101)
        assert len(list(tmp_path.glob("wal-*.log"))) == 1
