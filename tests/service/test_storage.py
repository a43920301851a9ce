"""DiskStorage on real files: round trips, recovery rules, the data-dir lock, kill -9.

Each test reopens the directory with a fresh DiskStorage (what a restarted server does) and
checks what came back against what was saved.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import stat
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import msgpack
import pytest

from coordinator.raft.messages import ConfState, Entry, HardState, Snapshot, SnapshotMetadata
from coordinator.raft.storage import MemoryStorage
from coordinator.storage import (
    Compacted,
    CorruptLogError,
    CorruptSnapshotError,
    DataDirLocked,
    DiskStorage,
    SnapshotOutOfDate,
    StorageClosed,
    StorageError,
    Unavailable,
)

VOTERS = ConfState(voters=(1, 2, 3))


def ents(lo: int, hi: int, term: int = 1, size: int = 8) -> list[Entry]:
    """Entries ``[lo, hi]`` whose data names their index and term."""
    return [Entry(term, i, data=f"{term}:{i}:".encode().ljust(size, b".")) for i in range(lo, hi + 1)]


def segments(d: Path) -> list[Path]:
    return sorted(d.glob("wal-*.log"))


def record_offsets(blob: bytes) -> list[int]:
    """Byte offsets of the WAL frames in one segment (``length u32 | type u8 | crc u32``):
    the segment header, then one batch frame per save."""
    out, off = [], 0
    while off < len(blob):
        out.append(off)
        off += 9 + int.from_bytes(blob[off:off + 4], "big")
    return out


def open_storage(d: Path, **kw) -> DiskStorage:
    return DiskStorage(d, conf_state=VOTERS, fsync=kw.pop("fsync", False), **kw)


# ---- round trips ------------------------------------------------------------------------


def test_round_trip_and_restart_recover_hard_state_entries_and_snapshot(tmp_path: Path) -> None:
    with open_storage(tmp_path) as s:
        assert s.initial_state() == (HardState(), VOTERS)
        assert (s.first_index(), s.last_index(), s.term(0)) == (1, 0, 0)
        s.save(HardState(1, 1, 0), ents(1, 10))
        s.save(HardState(1, 1, 8), [])
        snap = s.create_snapshot(5, None, b"state@5")
        assert snap.metadata == SnapshotMetadata(5, 1, VOTERS)
    with DiskStorage(tmp_path, fsync=False) as s:  # no conf_state needed on restart
        assert s.initial_state() == (HardState(1, 1, 8), VOTERS)
        assert s.entries(1, 11) == ents(1, 10)
        assert s.snapshot() == Snapshot(SnapshotMetadata(5, 1, VOTERS), b"state@5")
        assert s.entries(3, 11, max_bytes=20) == ents(3, 4)  # byte budget, at least one
        with pytest.raises(Unavailable):
            s.entries(1, 12)
        with pytest.raises(Unavailable):
            s.term(11)


def test_group_commit_is_one_wal_fsync_per_save(tmp_path: Path) -> None:
    with open_storage(tmp_path, fsync=True) as s:
        before = s.stats.wal_fsyncs
        s.save(HardState(1, 1, 0), ents(1, 200))
        s.save(HardState(1, 1, 200), ents(201, 210))
        assert s.stats.wal_fsyncs - before == 2
        assert s.stats.saves == 2
        assert s.stats.records_written >= 210


def test_conflicting_suffix_truncation_survives_restart(tmp_path: Path) -> None:
    with open_storage(tmp_path) as s:
        s.save(HardState(1, 1, 3), ents(1, 10, term=1))
        s.save(HardState(2, 2, 3), ents(6, 7, term=2))  # a new leader overwrites 6..10
        assert s.last_index() == 7
    with DiskStorage(tmp_path, fsync=False) as s:
        assert s.entries(1, 8) == ents(1, 5, term=1) + ents(6, 7, term=2)
        assert s.term(7) == 2
        s.append(ents(8, 9, term=2))
        assert s.last_index() == 9
        with pytest.raises(Unavailable):
            s.append(ents(11, 12, term=2))  # a gap is a caller bug


def test_compaction_deletes_covered_segments_and_survives_restart(tmp_path: Path) -> None:
    with open_storage(tmp_path, segment_bytes=512) as s:
        for i in range(1, 101, 10):
            s.save(HardState(1, 1, i), ents(i, i + 9))
        n_before = len(segments(tmp_path))
        assert n_before >= 4
        with pytest.raises(ValueError, match="create_snapshot first"):
            s.compact(50)
        s.create_snapshot(80, None, b"kv@80")
        s.compact(70)
        assert s.stats.segments_deleted > 0
        assert len(segments(tmp_path)) < n_before
        assert (s.first_index(), s.term(70)) == (71, 1)
        with pytest.raises(Compacted):
            s.term(69)
        with pytest.raises(Compacted):
            s.entries(70, 80)
        with pytest.raises(Compacted):
            s.compact(60)
    with DiskStorage(tmp_path, fsync=False, segment_bytes=512) as s:
        assert (s.first_index(), s.last_index(), s.term(70)) == (71, 100, 1)
        assert s.entries(71, 101) == ents(71, 100)
        assert s.snapshot().data == b"kv@80"
        assert s.initial_state()[0] == HardState(1, 1, 91)
        s.save(None, ents(101, 105))
    with DiskStorage(tmp_path, fsync=False) as s:
        assert s.last_index() == 105


def test_apply_snapshot_replaces_the_log(tmp_path: Path) -> None:
    leader_snap = Snapshot(SnapshotMetadata(50, 3, ConfState(voters=(1, 2, 3, 4))), b"kv@50")
    with open_storage(tmp_path) as s:
        s.save(HardState(1, 1, 5), ents(1, 20))
        s.save(HardState(3, 0, 50), [], leader_snap)  # a follower installs a leader's snapshot
        assert (s.first_index(), s.last_index(), s.term(50)) == (51, 50, 3)
        s.append(ents(51, 52, term=3))
        with pytest.raises(SnapshotOutOfDate):
            s.apply_snapshot(Snapshot(SnapshotMetadata(10, 1, VOTERS), b"old"))
    with DiskStorage(tmp_path, fsync=False) as s:
        assert s.initial_state() == (HardState(3, 0, 50), ConfState(voters=(1, 2, 3, 4)))
        assert s.snapshot() == leader_snap
        assert s.entries(51, 53) == ents(51, 52, term=3)
        assert sorted(p.name for p in tmp_path.glob("snap-*")) == [
            "snap-0000000000000050-0000000000000003.snap"]


def test_matches_memory_storage_under_random_operations_and_restarts(tmp_path: Path) -> None:
    """A model check: random appends (with conflicts), hard states, snapshots, compactions
    and restarts leave DiskStorage answering exactly like MemoryStorage."""
    rng = random.Random(5)
    mem = MemoryStorage(VOTERS)
    disk = open_storage(tmp_path, segment_bytes=700)
    term = 1
    for step in range(300):
        op = rng.random()
        last = mem.last_index()
        if op < 0.55:
            lo = rng.randint(max(mem.first_index(), last - 3), last + 1)
            term += rng.random() < 0.3
            batch = ents(lo, lo + rng.randint(0, 5), term=term, size=rng.randint(1, 40))
            hs = HardState(term, rng.randint(0, 3), mem.first_index() - 1)
            mem.append(batch)
            mem.set_hard_state(hs)
            disk.save(hs, batch)
        elif op < 0.65 and last > mem.snapshot().metadata.index:
            i = rng.randint(mem.snapshot().metadata.index + 1, last)
            assert disk.create_snapshot(i, None, b"s%d" % i) == mem.create_snapshot(
                i, None, b"s%d" % i)
        elif op < 0.75 and mem.snapshot().metadata.index >= mem.first_index():
            i = rng.randint(mem.first_index(), mem.snapshot().metadata.index)
            mem.compact(i)
            disk.compact(i)
        elif op < 0.8:
            disk.close()
            disk = DiskStorage(tmp_path, fsync=False, segment_bytes=700)
        lo, hi = mem.first_index(), mem.last_index()
        assert (disk.first_index(), disk.last_index()) == (lo, hi), step
        assert disk.entries(lo, hi + 1) == mem.entries(lo, hi + 1), step
        assert disk.term(lo - 1) == mem.term(lo - 1)
        assert disk.initial_state() == mem.initial_state()
        assert disk.snapshot() == mem.snapshot()
    assert disk.stats.segments_deleted > 0
    disk.close()


# ---- recovery: torn tails are cut, the middle is never guessed -------------------------


def _write_log(d: Path, n: int = 20) -> None:
    with open_storage(d) as s:
        for i in range(1, n + 1):
            s.save(HardState(1, 1, i - 1), ents(i, i))


@pytest.mark.fault
def test_torn_tail_mid_record_is_cut_with_a_warning(tmp_path: Path, caplog) -> None:
    _write_log(tmp_path)
    (seg,) = segments(tmp_path)
    size = seg.stat().st_size
    os.truncate(seg, size - 7)  # the last save (entry 20 and a hard state) lost its end
    with caplog.at_level(logging.WARNING, logger="coordinator.storage"):
        s = DiskStorage(tmp_path, fsync=False)
    warning = caplog.records[-1].getMessage()
    assert str(seg) in warning and "offset" in warning
    assert s.stats.torn_tails_cut == 1
    assert s.entries(1, 20) == ents(1, 19) and s.last_index() == 19  # the whole save is gone
    assert s.initial_state()[0] == HardState(1, 1, 18)
    s.save(HardState(1, 1, 20), ents(20, 21))  # and the log is writable again
    s.close()
    with DiskStorage(tmp_path, fsync=False) as s:
        assert s.last_index() == 21 and s.stats.torn_tails_cut == 0


@pytest.mark.fault
@pytest.mark.parametrize("tail", [b"\x00" * 4096, b"garbage after the last record \xff\x02",
                                  os.urandom(3000)])
def test_trailing_zeros_or_garbage_are_cut(tmp_path: Path, caplog, tail: bytes) -> None:
    _write_log(tmp_path)
    (seg,) = segments(tmp_path)
    good = seg.stat().st_size
    with open(seg, "ab") as f:
        f.write(tail)
    with caplog.at_level(logging.WARNING, logger="coordinator.storage"):
        s = DiskStorage(tmp_path, fsync=False)
    assert f"offset {good}" in caplog.records[-1].getMessage()
    assert s.entries(1, 21) == ents(1, 20)
    assert seg.stat().st_size == good
    s.close()


@pytest.mark.fault
def test_flipped_byte_in_the_middle_is_refused_naming_file_and_offset(tmp_path: Path) -> None:
    _write_log(tmp_path)
    (seg,) = segments(tmp_path)
    blob = bytearray(seg.read_bytes())
    middle = len(blob) // 2
    blob[middle] ^= 0x40
    seg.write_bytes(bytes(blob))
    with pytest.raises(CorruptLogError) as err:
        DiskStorage(tmp_path, fsync=False)
    assert err.value.path == str(seg)
    assert 0 < err.value.offset <= middle
    msg = str(err.value)
    assert str(seg) in msg and f"offset {err.value.offset}" in msg and "refusing to start" in msg
    # the refusal released the lock: fixing the file lets the node start
    blob[middle] ^= 0x40
    seg.write_bytes(bytes(blob))
    DiskStorage(tmp_path, fsync=False).close()


@pytest.mark.fault
def test_damaged_length_field_in_the_middle_is_refused(tmp_path: Path) -> None:
    _write_log(tmp_path)
    (seg,) = segments(tmp_path)
    blob = bytearray(seg.read_bytes())
    offsets = record_offsets(blob)
    blob[offsets[len(offsets) // 2]] ^= 0x10  # the length field's high byte: 1 MiB too long
    seg.write_bytes(bytes(blob))
    with pytest.raises(CorruptLogError, match="valid frame follows"):
        DiskStorage(tmp_path, fsync=False)


@pytest.mark.fault
def test_bad_record_in_an_older_segment_is_refused(tmp_path: Path) -> None:
    with open_storage(tmp_path, segment_bytes=256) as s:
        for i in range(1, 41):
            s.save(None, ents(i, i))
    older = segments(tmp_path)[0]
    os.truncate(older, older.stat().st_size - 3)  # even a "torn" end is damage here
    with pytest.raises(CorruptLogError, match="not the last") as err:
        DiskStorage(tmp_path, fsync=False)
    assert err.value.path == str(older)


@pytest.mark.fault
def test_missing_segment_is_refused(tmp_path: Path) -> None:
    with open_storage(tmp_path, segment_bytes=256) as s:
        s.save(None, ents(1, 40))
        for i in range(41, 60):
            s.save(None, ents(i, i))
    segments(tmp_path)[1].unlink()
    with pytest.raises(CorruptLogError, match="missing"):
        DiskStorage(tmp_path, fsync=False)


@pytest.mark.fault
def test_missing_or_corrupt_snapshot_is_a_loud_error(tmp_path: Path) -> None:
    with open_storage(tmp_path) as s:
        s.save(HardState(1, 1, 10), ents(1, 10))
        s.create_snapshot(10, None, b"precious state")
    (snap,) = tmp_path.glob("snap-*.snap")
    blob = bytearray(snap.read_bytes())
    blob[-3] ^= 1
    snap.write_bytes(bytes(blob))
    with pytest.raises(CorruptSnapshotError, match="checksum") as err:
        DiskStorage(tmp_path, fsync=False)
    assert err.value.path == str(snap)
    snap.unlink()
    with pytest.raises(CorruptSnapshotError, match="missing"):
        DiskStorage(tmp_path, fsync=False)


@pytest.mark.fault
def test_unreferenced_snapshot_from_an_interrupted_write_is_removed(tmp_path: Path, caplog) -> None:
    with open_storage(tmp_path) as s:
        s.save(HardState(1, 1, 10), ents(1, 10))
    orphan = tmp_path / "snap-0000000000000009-0000000000000001.snap"
    orphan.write_bytes(b"written, renamed, but the WAL record never made it")
    (tmp_path / "snap-0000000000000010-0000000000000001.snap.tmp").write_bytes(b"half")
    with caplog.at_level(logging.WARNING, logger="coordinator.storage"):
        with DiskStorage(tmp_path, fsync=False) as s:
            assert s.snapshot().metadata.index == 0
    assert not orphan.exists() and not list(tmp_path.glob("*.tmp"))
    assert "never referenced" in caplog.text


# ---- a save torn in any page order: the last batch is all or nothing -------------------

PAGE = 4096


def logical_end(seg: Path) -> int:
    """Where the frames end and any zero fill begins (a zero type byte ends the records)."""
    blob, off = seg.read_bytes(), 0
    while off + 9 <= len(blob) and blob[off + 4] != 0:
        off += 9 + int.from_bytes(blob[off:off + 4], "big")
    return off


def _write_then_a_big_save(d: Path, **kw) -> tuple[Path, int, int]:
    """Ten acknowledged saves, then a save of 30 entries spanning three 4 KiB pages; returns
    the segment and where the last save's bytes begin and end."""
    with open_storage(d, **kw) as s:
        for i in range(1, 11):
            s.save(HardState(1, 1, i - 1), ents(i, i))
        (seg,) = segments(d)
        last = logical_end(seg)
        s.save(HardState(1, 1, 10), ents(11, 40, size=300))
    end = logical_end(seg)
    assert end - last > 2 * PAGE
    return seg, last, end


def _lose(seg: Path, lo: int, hi: int) -> None:
    """What a power loss leaves when the pages ``[lo, hi)`` of an unsynced write never
    reached the disk: zeros (preallocated or newly extended space)."""
    blob = bytearray(seg.read_bytes())
    blob[lo:hi] = bytes(hi - lo)
    seg.write_bytes(bytes(blob))


@pytest.mark.fault
@pytest.mark.parametrize("preallocate", [0, 16384])
@pytest.mark.parametrize("lost", ["first page", "middle page"])
def test_a_save_torn_with_an_earlier_page_lost_and_a_later_one_kept_is_a_torn_tail(
        tmp_path: Path, caplog, preallocate: int, lost: str) -> None:
    """Issue 15, point 1: before a save's fdatasync returns, the disk may keep a later page
    of its one pwrite but not an earlier one. That save was never acknowledged, so recovery
    must drop it whole -- not refuse to start because a valid record follows the zeros."""
    seg, last, end = _write_then_a_big_save(tmp_path, preallocate_bytes=preallocate)
    first_boundary = (last // PAGE + 1) * PAGE
    if lost == "first page":
        _lose(seg, last, first_boundary)
    else:
        _lose(seg, first_boundary, first_boundary + PAGE)
    with caplog.at_level(logging.WARNING, logger="coordinator.storage"):
        s = open_storage(tmp_path, preallocate_bytes=preallocate)
    assert f"offset {last}" in caplog.text
    assert s.stats.torn_tails_cut == 1
    assert (s.last_index(), s.initial_state()[0]) == (10, HardState(1, 1, 9))
    assert s.entries(1, 11) == ents(1, 10)
    s.save(HardState(1, 1, 10), ents(11, 12))
    s.close()
    with open_storage(tmp_path, preallocate_bytes=preallocate) as s:
        assert s.entries(1, 13) == ents(1, 12) and s.stats.torn_tails_cut == 0


@pytest.mark.fault
def test_a_lost_page_before_the_last_batch_is_still_refused(tmp_path: Path) -> None:
    """The other half of the rule: the batch before the last was acknowledged (its
    fdatasync returned before the last one was written), so damage in it is damage."""
    seg, last, end = _write_then_a_big_save(tmp_path)
    with open_storage(tmp_path) as s:
        s.save(HardState(1, 1, 40), ents(41, 41))  # the big save is no longer the last
    _lose(seg, last + PAGE, last + 2 * PAGE)
    with pytest.raises(CorruptLogError, match="valid frame follows") as err:
        open_storage(tmp_path)
    assert err.value.offset == last


# ---- format 1 (written by earlier versions) ---------------------------------------------

FORMAT1 = Path(__file__).parent / "data" / "wal_format1.json"


def unpack_format1(name: str, dest: Path) -> dict:
    """Lay out one of the format 1 data directories an earlier version wrote (see the JSON
    file); returns what it holds."""
    spec = json.loads(FORMAT1.read_text())["dirs"][name]
    dest.mkdir(mode=0o700, exist_ok=True)
    for fname, b64 in spec["files"].items():
        (dest / fname).write_bytes(base64.b64decode(b64))
    return spec["expect"]


def format1_view_matches(s: DiskStorage, expect: dict) -> None:
    first, last = expect["first"], expect["last"]
    assert (s.first_index(), s.last_index()) == (first, last)
    assert s.initial_state() == (HardState(*expect["hard_state"]), VOTERS)
    assert s.entries(first, last + 1) == [
        Entry(expect["terms"][str(i)], i, data=b"e%d" % i) for i in range(first, last + 1)]
    index, term, data = expect["snapshot"]
    assert (s.snapshot().metadata.index, s.snapshot().metadata.term) == (index, term)
    assert s.snapshot().data == data.encode()


@pytest.mark.parametrize("name", ["rotated_snapshot_compacted", "preallocated"])
def test_a_format_1_directory_is_read_and_continued_in_a_new_format_2_segment(
        tmp_path: Path, name: str) -> None:
    expect = unpack_format1(name, tmp_path)
    before = {p.name: p.read_bytes() for p in segments(tmp_path)}
    with DiskStorage(tmp_path, fsync=False, preallocate_bytes=4096) as s:
        format1_view_matches(s, expect)
        last, hs = expect["last"], HardState(*expect["hard_state"])
        s.save(hs, [Entry(3, last + 1, data=b"format 2")])
    segs = segments(tmp_path)
    assert len(segs) == len(before) + 1  # format 1 and 2 never share a segment
    for seg in segs[:-1]:  # format 1 records untouched (a zero tail may have been trimmed)
        old = before[seg.name]
        assert seg.read_bytes() == old[:seg.stat().st_size] and not any(
            old[seg.stat().st_size:])
    header = segs[-1].read_bytes()
    length = int.from_bytes(header[:4], "big")
    assert header[4] == 1 and zlib.crc32(header[9:9 + length], zlib.crc32(b"\x01")) == (
        int.from_bytes(header[5:9], "big"))  # a format 1 reader parses the header frame...
    assert msgpack.unpackb(header[9:9 + length])["format"] == 2  # ...and refuses the map
    with DiskStorage(tmp_path, fsync=False) as s:
        assert s.last_index() == last + 1 and s.entries(last + 1, last + 2) == [
            Entry(3, last + 1, data=b"format 2")]
        assert s.entries(expect["first"], last + 1) == [
            Entry(expect["terms"][str(i)], i, data=b"e%d" % i)
            for i in range(expect["first"], last + 1)]


def test_a_wal_from_a_newer_format_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    with open_storage(tmp_path) as s:
        s.save(HardState(1, 1, 0), ents(1, 3))
    (seg,) = segments(tmp_path)
    blob = seg.read_bytes()
    length = int.from_bytes(blob[:4], "big")
    header = msgpack.unpackb(blob[9:9 + length])
    header["format"] = 3
    payload = msgpack.packb(header)
    frame = (len(payload).to_bytes(4, "big") + b"\x01"
             + zlib.crc32(payload, zlib.crc32(b"\x01")).to_bytes(4, "big") + payload)
    seg.write_bytes(frame + blob[9 + length:])
    with pytest.raises(StorageError, match="format 3.*newer version"):
        open_storage(tmp_path)


# ---- file modes -------------------------------------------------------------------------


def test_the_data_directory_and_its_files_are_private_to_the_user(tmp_path: Path) -> None:
    """Issue 15, point 6: directories 0700 and files 0600, as etcd does -- whatever the
    umask, since the log holds every value."""
    d = tmp_path / "missing parent" / "data"
    old_umask = os.umask(0)
    try:
        with DiskStorage(d, conf_state=VOTERS, segment_bytes=512) as s:
            for i in range(1, 41):
                s.save(HardState(1, 1, i - 1), ents(i, i))
            s.create_snapshot(20, None, b"a secret value")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(d.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    names = sorted(p.name for p in d.iterdir())
    assert "LOCK" in names and any(n.endswith(".snap") for n in names)
    assert sum(n.startswith("wal-") for n in names) >= 2
    assert {n: stat.S_IMODE((d / n).stat().st_mode) for n in names} == dict.fromkeys(
        names, 0o600)


def test_an_existing_data_directory_open_to_others_is_named_in_a_warning(tmp_path: Path,
                                                                         caplog) -> None:
    d = tmp_path / "data"
    d.mkdir()
    d.chmod(0o755)
    with caplog.at_level(logging.WARNING, logger="coordinator.storage"):
        open_storage(d).close()
    assert f"{d} has mode 755" in caplog.text and f"chmod 700 {d}" in caplog.text
    assert stat.S_IMODE(d.stat().st_mode) == 0o755  # the user's directory is left alone
    d.chmod(0o700)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="coordinator.storage"):
        open_storage(d).close()
    assert "chmod" not in caplog.text


# ---- the lock ---------------------------------------------------------------------------


def test_second_storage_on_the_same_dir_is_refused_in_process(tmp_path: Path) -> None:
    s = open_storage(tmp_path)
    with pytest.raises(DataDirLocked) as err:
        DiskStorage(tmp_path)
    assert err.value.holder_pid == os.getpid()
    s.close()
    with pytest.raises(StorageClosed):
        s.save(HardState(1, 0, 0), [])
    DiskStorage(tmp_path).close()  # released on close


@pytest.mark.fault
def test_second_server_process_on_the_same_dir_is_refused(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from coordinator.storage import DiskStorage
            s = DiskStorage({str(tmp_path)!r}, fsync=False)
            print("locked", flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DataDirLocked) as err:
            DiskStorage(tmp_path)
        assert err.value.holder_pid == holder.pid
        assert str(tmp_path) in str(err.value) and str(holder.pid) in str(err.value)
    finally:
        holder.kill()
        holder.wait()
    DiskStorage(tmp_path).close()  # a SIGKILLed holder's lock dies with it


# ---- kill -9 in the middle of saving ------------------------------------------------------


@pytest.mark.fault
@pytest.mark.slow
def test_kill_9_during_saves_recovers_a_prefix_with_every_acknowledged_entry(
        tmp_path: Path, kill9_rounds) -> None:
    kill9_rounds(tmp_path, "segment_bytes=4096", rounds=4, spacing=17)


@pytest.mark.fault
def test_a_crash_at_any_byte_of_the_last_records_recovers_a_prefix(tmp_path: Path) -> None:
    """Cut the segment at every byte offset inside its last three records: each cut must
    recover (never refuse) and yield exactly the records that were complete."""
    _write_log(tmp_path, n=6)
    (seg,) = segments(tmp_path)
    full = seg.read_bytes()
    offsets = record_offsets(full)
    for cut in range(offsets[-6], len(full)):
        seg.write_bytes(full[:cut])
        with DiskStorage(tmp_path, fsync=False) as s:
            complete = [o for o in offsets if o < cut and o + 9 <= cut]
            assert s.last_index() <= 6
            assert s.entries(1, s.last_index() + 1) == ents(1, s.last_index())
            assert s.stats.torn_tails_cut == (0 if cut in offsets else 1), (cut, complete)


# ---- a real RaftNode on DiskStorage, crashed and restarted --------------------------------


class DiskCluster:
    """Three in-process RaftNodes, each on its own DiskStorage, messages through the codec.

    A node's "state machine" is the list of applied entry data; its snapshot is that list,
    msgpacked. ``crash(i)`` drops the node and everything in flight to it without closing
    anything cleanly; ``restart(i)`` rebuilds it from its data directory alone."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.storage: dict[int, DiskStorage] = {}
        self.nodes: dict = {}
        self.applied: dict[int, list[bytes]] = {}
        self.inbox: list = []
        for i in (1, 2, 3):
            self.restart(i)

    def restart(self, i: int) -> None:
        from coordinator.raft import Config, RaftNode
        s = DiskStorage(self.root / f"n{i}", conf_state=VOTERS, fsync=False, segment_bytes=2048)
        snap = s.snapshot()
        self.applied[i] = list(msgpack.unpackb(snap.data)) if snap.metadata.index else []
        self.storage[i] = s
        self.nodes[i] = RaftNode(Config(id=i, applied=snap.metadata.index), s, random.Random(i))

    def crash(self, i: int) -> None:
        self.storage.pop(i).close()  # the lock dies with the process; nothing else is flushed
        del self.nodes[i]

    def stabilize(self, ticks: int = 0) -> None:
        from coordinator.raft import EntryType, decode_message, encode_message
        for _ in range(200):
            if ticks:
                for n in self.nodes.values():
                    n.tick()
                ticks -= 1
            busy = False
            for i, n in list(self.nodes.items()):
                if not n.has_ready():
                    continue
                busy = True
                rd = n.ready()
                self.storage[i].save(rd.hard_state, rd.entries, rd.snapshot)  # durable first
                if rd.snapshot is not None:
                    self.applied[i] = list(msgpack.unpackb(rd.snapshot.data))
                self.inbox += [encode_message(m) for m in rd.messages]
                self.applied[i] += [e.data for e in rd.committed_entries
                                    if e.type == EntryType.NORMAL and e.data]
                n.advance(rd)
            inbox, self.inbox = self.inbox, []
            for raw in inbox:
                m = decode_message(raw)
                if m.to in self.nodes:
                    self.nodes[m.to].step(m)
            if not busy and not inbox and not ticks:
                return
        raise AssertionError("the cluster did not stabilize")

    def leader(self):
        from coordinator.raft import Role
        (lead,) = [n for n in self.nodes.values() if n.role is Role.LEADER]
        return lead

    def close(self) -> None:
        for s in self.storage.values():
            s.close()


@pytest.mark.fault
def test_raft_nodes_on_disk_storage_survive_crashes_restarts_and_snapshots(
        tmp_path: Path) -> None:
    c = DiskCluster(tmp_path)
    c.nodes[1].campaign()
    c.stabilize()
    for k in range(30):
        c.leader().propose(b"a%d" % k)
    c.stabilize(ticks=3)
    assert all(c.applied[i] == [b"a%d" % k for k in range(30)] for i in (1, 2, 3))

    c.crash(2)  # a follower dies; the cluster moves on without it
    for k in range(20):
        c.leader().propose(b"b%d" % k)
    c.stabilize(ticks=3)
    c.restart(2)  # ...and comes back from its WAL alone
    assert c.nodes[2].term == c.nodes[1].term and c.storage[2].last_index() >= 31
    c.stabilize(ticks=3)
    assert c.applied[2] == c.applied[1] and len(c.applied[1]) == 50

    c.crash(3)  # while node 3 is down the leader snapshots and compacts past its log
    for k in range(20):
        c.leader().propose(b"c%d" % k)
    c.stabilize(ticks=3)
    lead_id = c.leader().id
    ls = c.storage[lead_id]
    applied_index = c.leader().status().applied
    ls.create_snapshot(applied_index, None, msgpack.packb(c.applied[lead_id]))
    ls.compact(applied_index)
    c.restart(3)
    c.stabilize(ticks=5)  # node 3 can only catch up by InstallSnapshot -> apply_snapshot
    assert c.storage[3].snapshot().metadata.index == applied_index
    assert c.applied[3] == c.applied[lead_id] and len(c.applied[3]) == 70

    for i in (1, 2, 3):  # the whole cluster restarts at once
        c.crash(i)
    for i in (1, 2, 3):
        c.restart(i)
    assert all(c.applied[i] == [] or len(c.applied[i]) == 70 for i in (1, 2, 3))
    c.nodes[2].campaign()
    c.stabilize(ticks=3)
    c.leader().propose(b"after full restart")
    c.stabilize(ticks=3)
    for i in (1, 2, 3):
        assert c.applied[i][-1] == b"after full restart"
        assert len(c.applied[i]) == 71, i
    c.close()


@pytest.mark.fault
def test_a_failed_fsync_is_never_retried_and_restart_recovers(tmp_path: Path, monkeypatch) -> None:
    """After a failed fsync the page cache may have dropped the data ("fsyncgate"), so the
    storage refuses further writes; a restart recovers from what is really on disk."""
    s = open_storage(tmp_path, fsync=True)
    s.save(HardState(1, 1, 5), ents(1, 5))

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("coordinator.storage.os.fsync", broken_fsync)
    monkeypatch.setattr("coordinator.storage.os.fdatasync", broken_fsync)  # the WAL's sync
    with pytest.raises(StorageClosed, match="restart the node"):
        s.save(HardState(1, 1, 5), ents(6, 6))
    with pytest.raises(StorageClosed):
        s.save(HardState(1, 1, 5), ents(6, 6))
    assert s.last_index() == 5  # memory never ran ahead of the disk
    monkeypatch.undo()
    s.close()
    with DiskStorage(tmp_path, fsync=True) as s:
        assert s.last_index() in (5, 6)  # the write reached the file; durability unknown
        assert s.entries(1, 6) == ents(1, 5)


@pytest.mark.fault
def test_a_crash_during_bootstrap_bootstraps_again(tmp_path: Path) -> None:
    DiskStorage(tmp_path, conf_state=VOTERS, fsync=False).close()
    (seg,) = segments(tmp_path)
    os.truncate(seg, 5)  # the very first header never made it to disk
    with DiskStorage(tmp_path, conf_state=VOTERS, fsync=False) as s:
        assert s.initial_state() == (HardState(), VOTERS)
    with DiskStorage(tmp_path, fsync=False) as s:
        assert s.initial_state() == (HardState(), VOTERS)


@pytest.mark.fault
def test_any_flipped_bit_is_refused_unless_it_is_in_the_last_batch(tmp_path: Path) -> None:
    """Flip one random bit anywhere: inside any frame but the last, the node must refuse to
    start (never silently drop acknowledged data); inside the last save's batch it is
    indistinguishable from a torn write and is cut with a warning."""
    rng = random.Random(11)
    _write_log(tmp_path, n=12)
    (seg,) = segments(tmp_path)
    pristine = seg.read_bytes()
    offsets = record_offsets(pristine)
    for _ in range(80):
        blob = bytearray(pristine)
        pos = rng.randrange(len(blob))
        blob[pos] ^= 1 << rng.randrange(8)
        seg.write_bytes(bytes(blob))
        if pos < offsets[-1]:
            with pytest.raises(CorruptLogError) as err:
                DiskStorage(tmp_path, fsync=False)
            assert err.value.path == str(seg) and err.value.offset <= pos
        else:
            with DiskStorage(tmp_path, fsync=False) as s:
                assert s.stats.torn_tails_cut == 1
                assert s.last_index() == 11  # only the last save (entry 12 + hard state) lost
                assert s.entries(1, 12) == ents(1, 11)


@pytest.mark.parametrize("seed", range(6))
def test_replay_fast_path_rebuilds_exactly_what_the_general_path_does(tmp_path, seed, monkeypatch):
    """Recovery's fast path for plain batches (entries and hard states) must leave the same
    log state as applying every record one by one: random saves with conflicting suffixes,
    hard states alone, snapshots, compactions and conf-change entries, reopened both ways."""
    import coordinator.storage as storage_mod
    from coordinator.raft.messages import EntryType

    rng = random.Random(seed)
    s = DiskStorage(tmp_path / "d", conf_state=VOTERS, fsync=False)
    term, last = 1, 0
    for _ in range(300):
        roll = rng.random()
        if roll < 0.1 and last > 3:  # a new leader overwrites a suffix
            term += 1
            start = rng.randint(max(s.first_index(), last - 3), last)
            ents = [Entry(term, i, EntryType.NORMAL, rng.randbytes(rng.randint(0, 40)))
                    for i in range(start, start + rng.randint(1, 4))]
        elif roll < 0.15:
            ents = []
        else:
            etype = EntryType.CONF_CHANGE if rng.random() < 0.05 else EntryType.NORMAL
            ents = [Entry(term, i, etype, rng.randbytes(rng.randint(0, 40)))
                    for i in range(last + 1, last + 1 + rng.randint(1, 3))]
        if ents:
            last = ents[-1].index
        s.save(HardState(term, rng.choice([0, 1, 2]), max(0, last - rng.randint(0, 2))), ents)
        if rng.random() < 0.03 and last > s.first_index() + 2:
            at = rng.randint(s.first_index(), last - 1)
            s.create_snapshot(at, VOTERS, b"state")
            s.compact(at)
    s.close()

    def state_of() -> tuple:
        d = DiskStorage(tmp_path / "d", fsync=False)
        try:
            st = d._state
            return (st.hard_state, st.bootstrap, st.snap_index, st.snap_term, st.base,
                    st.base_term, list(st.entries), st.data_bytes,
                    [seg.max_entry_index for seg in d._segments])
        finally:
            d.close()

    fast = state_of()
    monkeypatch.setattr(storage_mod, "_replay_plain_batches", lambda buf, off, seg, state: off)
    general = state_of()
    assert fast == general
    assert fast[6] and fast[6][-1].index == last
