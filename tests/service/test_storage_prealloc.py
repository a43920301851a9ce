"""DiskStorage with WAL preallocation: pwrite at the logical end, fdatasync, zero tails.

A preallocated segment is longer than its records: the rest is zeros from
``posix_fallocate``. These tests check that recovery tells that clean end from a torn write,
that appends continue at the logical end after a restart, that rotation trims closed
segments, and that every recovery guarantee of ``test_storage.py`` still holds.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import msgpack
import pytest

from coordinator.raft.messages import ConfState, Entry, HardState
from coordinator.storage import CorruptLogError, DiskStorage

VOTERS = ConfState(voters=(1, 2, 3))
ENTRY, SEGMENT_HEADER, BATCH = 2, 1, 7  # coordinator.storage.RecordType


def ents(lo: int, hi: int, term: int = 1, size: int = 8) -> list[Entry]:
    """Entries ``[lo, hi]`` whose data names their index and term."""
    return [Entry(term, i, data=f"{term}:{i}:".encode().ljust(size, b"."))
            for i in range(lo, hi + 1)]


def segments(d: Path) -> list[Path]:
    return sorted(d.glob("wal-*.log"))


def records(blob: bytes) -> tuple[list[tuple[int, int, bytes]], int]:
    """``([(offset, type, payload)], logical end)`` of the frames before the zero tail: the
    segment header, then one BATCH frame per save.

    Every real frame has a non-zero type byte, so a zero type byte is where the preallocated
    zeros (or the end of the file) begin."""
    out, off = [], 0
    while off + 9 <= len(blob) and blob[off + 4] != 0:
        length = int.from_bytes(blob[off:off + 4], "big")
        out.append((off, blob[off + 4], blob[off + 9:off + 9 + length]))
        off += 9 + length
    return out, off


def inner_records(payload: bytes) -> list[tuple[int, bytes]]:
    """The ``(type, payload)`` records inside a batch frame (``length u32 | type u8 | ...``)."""
    out, off = [], 0
    while off < len(payload):
        length = int.from_bytes(payload[off:off + 4], "big")
        out.append((payload[off + 4], payload[off + 5:off + 5 + length]))
        off += 5 + length
    return out


def entry_indexes(blob: bytes) -> list[int]:
    return [msgpack.unpackb(p)[1] for _, t, frame in records(blob)[0] if t == BATCH
            for rtype, p in inner_records(frame) if rtype == ENTRY]


def open_storage(d: Path, **kw) -> DiskStorage:
    return DiskStorage(d, conf_state=VOTERS, fsync=kw.pop("fsync", False), **kw)


def write_log(d: Path, n: int, **kw) -> None:
    with open_storage(d, **kw) as s:
        for i in range(1, n + 1):
            s.save(HardState(1, 1, i - 1), ents(i, i))


def storage_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "coordinator.storage" and r.levelno >= logging.WARNING]


# ---- configuration --------------------------------------------------------------------


def test_preallocation_defaults_follow_fsync_and_negative_is_refused(tmp_path: Path) -> None:
    with DiskStorage(tmp_path / "a", conf_state=VOTERS) as s:  # fsync=True: 4 MiB
        s.save(HardState(1, 1, 0), ents(1, 3))
    (seg,) = segments(tmp_path / "a")
    assert seg.stat().st_size == 4 << 20
    with DiskStorage(tmp_path / "b", conf_state=VOTERS, fsync=False) as s:  # off
        s.save(HardState(1, 1, 0), ents(1, 3))
    (seg,) = segments(tmp_path / "b")
    assert seg.stat().st_size == records(seg.read_bytes())[1]
    with DiskStorage(tmp_path / "c", conf_state=VOTERS, preallocate_bytes=0) as s:  # off
        s.save(HardState(1, 1, 0), ents(1, 3))
        assert s.stats.wal_preallocations == 0
    (seg,) = segments(tmp_path / "c")
    assert seg.stat().st_size == records(seg.read_bytes())[1]
    with pytest.raises(ValueError, match="preallocate_bytes"):
        DiskStorage(tmp_path / "d", preallocate_bytes=-1)


# ---- the clean end of a preallocated segment ------------------------------------------


@pytest.mark.fault
def test_preallocated_segment_restarts_without_warning_and_appends_at_the_logical_end(
        tmp_path: Path, caplog) -> None:
    write_log(tmp_path, 20, fsync=True)  # the default 4 MiB preallocation
    (seg,) = segments(tmp_path)
    blob = seg.read_bytes()
    _, end = records(blob)
    assert len(blob) == 4 << 20 and 0 < end < len(blob)
    assert blob.count(0, end) == len(blob) - end  # zeros after the records
    with caplog.at_level(logging.DEBUG, logger="coordinator.storage"):
        s = DiskStorage(tmp_path)
    assert storage_warnings(caplog) == []
    assert s.stats.torn_tails_cut == 0
    assert s.entries(1, 21) == ents(1, 20)
    assert s.initial_state()[0] == HardState(1, 1, 19)
    s.save(HardState(1, 1, 20), ents(21, 25))  # written at ``end``, not after the zeros
    s.close()
    assert seg.stat().st_size == 4 << 20
    assert entry_indexes(seg.read_bytes()) == list(range(1, 26))  # contiguous, no gap
    with caplog.at_level(logging.DEBUG, logger="coordinator.storage"):
        with DiskStorage(tmp_path) as s:
            assert s.stats.torn_tails_cut == 0
            assert s.entries(1, 26) == ents(1, 25)
            assert s.initial_state()[0] == HardState(1, 1, 20)
    assert storage_warnings(caplog) == []


def test_growth_past_a_preallocation_chunk_extends_by_whole_chunks(tmp_path: Path) -> None:
    chunk = 4096
    with open_storage(tmp_path, preallocate_bytes=chunk) as s:
        for i in range(1, 201):
            s.save(HardState(1, 1, i - 1), ents(i, i, size=40))
            size = segments(tmp_path)[0].stat().st_size
            assert size % chunk == 0 and size >= records(segments(tmp_path)[0].read_bytes())[1]
        (seg,) = segments(tmp_path)
        _, end = records(seg.read_bytes())
        assert end > 3 * chunk
        assert seg.stat().st_size == -(-end // chunk) * chunk  # the next multiple covering it
        assert s.stats.wal_preallocations == seg.stat().st_size // chunk  # not one per write
        s.save(None, ents(201, 201, size=3 * chunk))  # one write larger than a chunk
        _, end = records(seg.read_bytes())
        assert seg.stat().st_size == -(-end // chunk) * chunk
    with open_storage(tmp_path, preallocate_bytes=chunk) as s:
        assert s.stats.torn_tails_cut == 0
        assert s.entries(1, 201) == ents(1, 200, size=40)
        assert s.entries(201, 202) == ents(201, 201, size=3 * chunk)


@pytest.mark.fault
def test_zero_tail_is_cut_with_a_warning_when_preallocation_is_off(tmp_path: Path,
                                                                   caplog) -> None:
    """Without preallocation zeros are not expected, so they are treated like any tail."""
    write_log(tmp_path, 10, preallocate_bytes=8192)
    (seg,) = segments(tmp_path)
    _, end = records(seg.read_bytes())
    with caplog.at_level(logging.WARNING, logger="coordinator.storage"):
        s = open_storage(tmp_path, preallocate_bytes=0)
    assert f"offset {end}" in caplog.records[-1].getMessage()
    assert s.stats.torn_tails_cut == 1 and seg.stat().st_size == end
    assert s.entries(1, 11) == ents(1, 10)
    s.close()


# ---- torn writes and corruption inside the preallocated region --------------------------


@pytest.mark.fault
def test_torn_last_record_followed_by_zeros_is_cut_with_a_warning(tmp_path: Path,
                                                                  caplog) -> None:
    chunk = 16384
    write_log(tmp_path, 20, preallocate_bytes=chunk)
    (seg,) = segments(tmp_path)
    blob = bytearray(seg.read_bytes())
    recs, end = records(bytes(blob))
    last = recs[-1][0]  # the last save; only its first 6 bytes reached the disk
    blob[last + 6:end] = bytes(end - last - 6)
    seg.write_bytes(bytes(blob))
    assert seg.stat().st_size == chunk
    with caplog.at_level(logging.WARNING, logger="coordinator.storage"):
        s = open_storage(tmp_path, preallocate_bytes=chunk)
    (warning,) = storage_warnings(caplog)
    assert str(seg) in warning and f"offset {last}" in warning
    assert s.stats.torn_tails_cut == 1
    assert seg.stat().st_size == last  # cut; the next write preallocates again
    assert s.last_index() == 19 and s.entries(1, 20) == ents(1, 19)  # the whole save is gone
    assert s.initial_state()[0] == HardState(1, 1, 18)
    s.save(HardState(1, 1, 20), ents(20, 21))
    s.close()
    assert seg.stat().st_size == chunk
    with open_storage(tmp_path, preallocate_bytes=chunk) as s:
        assert s.stats.torn_tails_cut == 0
        assert s.entries(1, 22) == ents(1, 21)
        assert s.initial_state()[0] == HardState(1, 1, 20)


@pytest.mark.fault
def test_a_crash_at_any_byte_of_the_last_records_in_a_preallocated_segment(
        tmp_path: Path) -> None:
    """A write into preallocated space that stopped at any byte leaves zeros after it: each
    such state must recover a prefix, silently when nothing of the record got there."""
    chunk = 8192
    write_log(tmp_path, 6, preallocate_bytes=chunk)
    (seg,) = segments(tmp_path)
    full = seg.read_bytes()
    recs, end = records(full)
    offsets = [o for o, _, _ in recs]
    for cut in range(offsets[-6], end):
        seg.write_bytes(full[:cut] + bytes(len(full) - cut))
        with open_storage(tmp_path, preallocate_bytes=chunk) as s:
            k = max(k for k, o in enumerate(offsets) if o <= cut)  # the save the crash hit
            start, stop = offsets[k], offsets[k + 1] if k + 1 < len(offsets) else end
            whole = full.count(0, cut, stop) == stop - cut  # what is missing is zeros anyway
            assert s.last_index() == k - (not whole), cut  # frame k holds entry k
            assert s.entries(1, s.last_index() + 1) == ents(1, s.last_index())
            torn = full.count(0, start, cut) != cut - start  # any of it non-zero on disk
            assert s.stats.torn_tails_cut == int(torn and not whole), cut


@pytest.mark.fault
@pytest.mark.parametrize("where", ["middle", "first record"])
def test_flipped_byte_in_a_preallocated_segment_is_refused(tmp_path: Path, where: str) -> None:
    chunk = 16384
    write_log(tmp_path, 20, preallocate_bytes=chunk)
    (seg,) = segments(tmp_path)
    blob = bytearray(seg.read_bytes())
    _, end = records(bytes(blob))
    pos = end // 2 if where == "middle" else 12
    blob[pos] ^= 0x40
    seg.write_bytes(bytes(blob))
    with pytest.raises(CorruptLogError) as err:
        open_storage(tmp_path, preallocate_bytes=chunk)
    assert err.value.path == str(seg) and 0 <= err.value.offset <= pos
    msg = str(err.value)
    assert str(seg) in msg and f"offset {err.value.offset}" in msg and "refusing to start" in msg
    assert seg.stat().st_size == chunk  # nothing was cut
    blob[pos] ^= 0x40
    seg.write_bytes(bytes(blob))
    with open_storage(tmp_path, preallocate_bytes=chunk) as s:
        assert s.entries(1, 21) == ents(1, 20)


@pytest.mark.fault
def test_garbage_in_the_preallocated_zeros_is_cut_as_a_tail(tmp_path: Path, caplog) -> None:
    chunk = 16384
    write_log(tmp_path, 10, preallocate_bytes=chunk)
    (seg,) = segments(tmp_path)
    blob = bytearray(seg.read_bytes())
    _, end = records(bytes(blob))
    blob[end + 100] = 0x5A  # not a record, not zero: treated like appended garbage
    seg.write_bytes(bytes(blob))
    with caplog.at_level(logging.WARNING, logger="coordinator.storage"):
        s = open_storage(tmp_path, preallocate_bytes=chunk)
    assert f"offset {end}" in storage_warnings(caplog)[-1]
    assert s.stats.torn_tails_cut == 1 and s.entries(1, 11) == ents(1, 10)
    s.close()


# ---- rotation ---------------------------------------------------------------------------


@pytest.mark.fault
def test_rotation_trims_closed_segments_to_their_records(tmp_path: Path) -> None:
    chunk = 4096
    with open_storage(tmp_path, fsync=True, segment_bytes=512, preallocate_bytes=chunk) as s:
        for i in range(1, 61):
            s.save(HardState(1, 1, i - 1), ents(i, i))
        syncs = s.stats.wal_fsyncs
        # one per save, one per segment header, one per trim (all but the open segment)
        assert syncs == 60 + 2 * s.stats.segments_created - 1
    segs = segments(tmp_path)
    assert len(segs) >= 4
    for closed in segs[:-1]:
        blob = closed.read_bytes()
        assert records(blob)[1] == len(blob) >= 512, closed  # no zero tail
    assert segs[-1].stat().st_size == chunk  # the open one keeps its preallocation
    with open_storage(tmp_path, segment_bytes=512, preallocate_bytes=chunk) as s:
        assert s.stats.torn_tails_cut == 0
        assert s.entries(1, 61) == ents(1, 60)


@pytest.mark.fault
@pytest.mark.parametrize("preallocate", [4096, 0])
def test_untrimmed_zero_tail_in_an_older_segment_is_a_clean_end(tmp_path: Path, caplog,
                                                                 preallocate: int) -> None:
    """A closed segment with zeros after its records (an older version, or a crash between
    preallocating and trimming) holds all its records: it is accepted either way."""
    with open_storage(tmp_path, segment_bytes=256) as s:
        for i in range(1, 41):
            s.save(None, ents(i, i))
    older = segments(tmp_path)[0]
    with open(older, "ab") as f:
        f.write(bytes(5000))
    with caplog.at_level(logging.WARNING, logger="coordinator.storage"):
        with open_storage(tmp_path, segment_bytes=256, preallocate_bytes=preallocate) as s:
            assert s.entries(1, 41) == ents(1, 40) and s.stats.torn_tails_cut == 0
    assert storage_warnings(caplog) == []


@pytest.mark.fault
def test_torn_record_followed_by_zeros_in_an_older_segment_is_refused(tmp_path: Path) -> None:
    with open_storage(tmp_path, segment_bytes=256, preallocate_bytes=4096) as s:
        for i in range(1, 41):
            s.save(None, ents(i, i))
    older = segments(tmp_path)[0]
    blob = bytearray(older.read_bytes())
    recs, end = records(bytes(blob))
    blob[recs[-1][0] + 7:end] = bytes(end - recs[-1][0] - 7)
    older.write_bytes(bytes(blob) + bytes(3000))
    with pytest.raises(CorruptLogError, match="not the last") as err:
        open_storage(tmp_path, segment_bytes=256, preallocate_bytes=4096)
    assert err.value.path == str(older) and err.value.offset == recs[-1][0]


# ---- the sync calls and fallocate failures ----------------------------------------------


def test_the_wal_path_calls_fdatasync_not_fsync(tmp_path: Path, monkeypatch) -> None:
    calls = {"fsync": 0, "fdatasync": 0}
    real_fsync, real_fdatasync = os.fsync, os.fdatasync

    def counting_fsync(fd: int) -> None:
        calls["fsync"] += 1
        real_fsync(fd)

    def counting_fdatasync(fd: int) -> None:
        calls["fdatasync"] += 1
        real_fdatasync(fd)

    s = open_storage(tmp_path, fsync=True)
    s.save(HardState(1, 1, 0), ents(1, 3))
    monkeypatch.setattr("coordinator.storage.os.fsync", counting_fsync)
    monkeypatch.setattr("coordinator.storage.os.fdatasync", counting_fdatasync)
    before = s.stats.as_dict()
    for i in range(4, 14):
        s.save(HardState(1, 1, i - 1), ents(i, i))
    assert calls == {"fsync": 0, "fdatasync": 10}
    after = s.stats.as_dict()
    assert after["wal_fsyncs"] - before["wal_fsyncs"] == 10
    assert after["fsyncs"] - before["fsyncs"] == 10
    s.create_snapshot(10, None, b"kv@10")  # snapshot file + directory: full fsyncs
    assert calls == {"fsync": 2, "fdatasync": 11}
    assert s.stats.snapshot_fsyncs == 1 and s.stats.dir_fsyncs - before["dir_fsyncs"] == 1
    s.close()


def test_a_filesystem_without_fallocate_runs_without_preallocation(tmp_path: Path, caplog,
                                                                   monkeypatch) -> None:
    attempts = []

    def unsupported(fd: int, offset: int, length: int) -> None:
        attempts.append((offset, length))
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr("coordinator.storage.os.posix_fallocate", unsupported)
    with caplog.at_level(logging.DEBUG, logger="coordinator.storage"):
        with open_storage(tmp_path, fsync=True) as s:
            for i in range(1, 21):
                s.save(HardState(1, 1, i - 1), ents(i, i))
            assert s.stats.wal_preallocations == 0
    assert len(attempts) == 1  # tried once, then off for the storage's lifetime
    assert [r.levelno for r in caplog.records if "fallocate" in r.getMessage()] == [
        logging.DEBUG]
    (seg,) = segments(tmp_path)
    assert seg.stat().st_size == records(seg.read_bytes())[1]
    monkeypatch.undo()
    with open_storage(tmp_path, fsync=True) as s:
        assert s.entries(1, 21) == ents(1, 20) and s.stats.torn_tails_cut == 0


def test_a_failed_fallocate_for_lack_of_space_skips_only_that_write(tmp_path: Path,
                                                                     monkeypatch) -> None:
    real = os.posix_fallocate
    calls = []

    def flaky(fd: int, offset: int, length: int) -> None:
        calls.append(length)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, offset, length)

    monkeypatch.setattr("coordinator.storage.os.posix_fallocate", flaky)
    with open_storage(tmp_path, preallocate_bytes=4096) as s:
        s.save(HardState(1, 1, 0), ents(1, 1))  # inside the chunk the bootstrap allocated
        (seg,) = segments(tmp_path)
        assert seg.stat().st_size == 4096
        s.save(None, ents(2, 2, size=5000))  # fallocate fails: the write extends the file
        assert seg.stat().st_size == records(seg.read_bytes())[1]
        s.save(None, ents(3, 3, size=5000))  # and the next one preallocates again
        assert seg.stat().st_size % 4096 == 0
        assert s.stats.wal_preallocations == 2 and len(calls) == 3
    with open_storage(tmp_path, preallocate_bytes=4096) as s:
        assert s.last_index() == 3 and s.stats.torn_tails_cut == 0


# ---- kill -9 in the middle of saving, with preallocation --------------------------------

@pytest.mark.fault
@pytest.mark.slow
def test_kill_9_during_preallocated_saves_recovers_every_acknowledged_entry(
        tmp_path: Path, kill9_rounds) -> None:
    # fsync=True in the writer: pwrite + fdatasync into 4 KiB chunks, 16 KiB segments
    kill9_rounds(tmp_path, "segment_bytes=16384, preallocate_bytes=4096", rounds=5, spacing=23,
                 segment_bytes=16384, preallocate_bytes=4096)
    segs = segments(tmp_path)
    assert len(segs) > 2  # the writers rotated, growing and trimming segments on the way
    for closed in segs[:-1]:
        blob = closed.read_bytes()
        assert records(blob)[1] == len(blob), closed
