"""DiskStorage under a crash-consistency checker (ALICE's idea: Pillai et al., OSDI 2014).

A seeded random workload (saves with conflicting suffixes, small and page-spanning batches,
hard states, snapshots, leader snapshots, compactions, restarts, segment rotation, with and
without preallocation; every fourth one starts from a format 1 directory an earlier version
wrote) runs on DiskStorage with fsync on, under
:class:`coordinator.testing.crashfs.CrashRecorder`. After every recorded file-system call
the model of what is durable is frozen, and crash images are built from it: the durable
state alone, everything pending, and random mixes (pending pages torn in any order, size
changes as a prefix, each directory operation on its own). Every distinct image is
recovered by a fresh DiskStorage, which must

* open: no image comes from real damage, so none may be refused;
* read back exactly the state after the last acknowledged operation, or after the one in
  flight -- hard state, membership, first and last index, every entry, the snapshot: no
  acknowledged entry lost, nothing truncated, compacted or replaced brought back;
* take a new write and read it back after another restart.

A sample of the images whose recovery itself writes (cutting a torn tail, writing a header,
closing a segment) is recovered again under the recorder and crashed during that recovery.

CI checks ``CRASH_IMAGES`` distinct images (3000 by default; ``CRASH_IMAGES=50000`` runs
more) from workloads seeded ``CRASH_SEED`` (0), ``CRASH_SEED + 1``, ... A failure names the
workload seed, the event and the image, and replays exactly. The count is printed on the
terminal in every run (and in the captured output ``-rA`` shows) and recorded as the test's
``crash_images`` property (junit XML).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import coordinator.storage as storage_module
from coordinator.raft.messages import ConfState, Entry, HardState, Snapshot, SnapshotMetadata
from coordinator.storage import DiskStorage
from coordinator.testing.crashfs import (
    CrashPoint,
    CrashRecorder,
    ImageSpec,
    crash_image,
    image_key,
    write_image,
)

VOTERS = ConfState(voters=(1, 2, 3))
DEFAULT_IMAGES = 3000
RANDOM_IMAGES_PER_POINT = 6
NESTED_FRACTION = 0.2  # of the images whose recovery writes, crashed again during it
PAGE_BYTES = 512  # smaller than the real 4 KiB: more tears in small files, a superset of images
FORMAT1 = Path(__file__).parent / "data" / "wal_format1.json"  # written by an earlier version


@dataclass(frozen=True)
class Config:
    segment_bytes: int
    preallocate_bytes: int

    def open(self, data_dir: Path, fsync: bool = False) -> DiskStorage:
        return DiskStorage(data_dir, conf_state=VOTERS, fsync=fsync,
                           segment_bytes=self.segment_bytes,
                           preallocate_bytes=self.preallocate_bytes)


@dataclass(frozen=True)
class View:
    """What a restarted node reads back."""

    hard_state: HardState
    conf_state: ConfState
    first: int
    last: int
    base_term: int
    entries: tuple[Entry, ...]
    snapshot: Snapshot

    def brief(self) -> str:
        return (f"hs={self.hard_state} first={self.first} last={self.last} "
                f"snapshot@{self.snapshot.metadata.index}")


def view(s: DiskStorage) -> View:
    hs, cs = s.initial_state()
    first, last = s.first_index(), s.last_index()
    return View(hs, cs, first, last, s.term(first - 1),
                tuple(s.entries(first, last + 1)) if last >= first else (), s.snapshot())


# ---- the workload ---------------------------------------------------------------------


def run_workload(root: Path, seed: int, n_ops: int = 30,
                 ) -> tuple[Config, list[CrashPoint], list[View], list[str]]:
    """Run one seeded workload under the recorder; ``views[k]`` is the state once operation
    ``k`` was acknowledged (0: the bootstrap), ``ops[k]`` what it was."""
    rng = random.Random(seed)
    cfg = Config(segment_bytes=rng.choice([1500, 3000, 6000]),
                 preallocate_bytes=rng.choice([0, 1024, 4096]))
    if seed % 4 == 3:  # durable before the recording starts, as if the node had just upgraded
        dirs = json.loads(FORMAT1.read_text())["dirs"]
        files = dirs[sorted(dirs)[seed // 4 % len(dirs)]]["files"]
        (root / "data").mkdir(mode=0o700)
        for name, b64 in files.items():
            (root / "data" / name).write_bytes(base64.b64decode(b64))
    rec = CrashRecorder(root)
    views: list[View] = []
    ops = ["bootstrap"]
    with rec.recording(storage_module):
        rec.tag = 0
        s = cfg.open(root / "data", fsync=True)
        views.append(view(s))
        term = 1
        for k in range(1, n_ops + 1):
            rec.tag = k
            term += rng.random() < 0.15
            s, what = _random_op(s, rng, term, cfg, root / "data")
            ops.append(what)
            views.append(view(s))
        s.close()
    rec.check_mirrors_disk()
    return cfg, rec.points, views, ops


def _random_op(s: DiskStorage, rng: random.Random, term: int, cfg: Config,
               data_dir: Path) -> tuple[DiskStorage, str]:
    first, last = s.first_index(), s.last_index()
    snap_index = s.snapshot().metadata.index
    hs = HardState(term, rng.randint(0, 3), max(0, min(last, rng.randint(last - 5, last))))
    op = rng.random()
    if op < 0.12 and last > snap_index:
        i = rng.randint(snap_index + 1, last)
        s.create_snapshot(i, None, b"state@%d:" % i + rng.randbytes(rng.randint(0, 1500)))
        return s, f"create_snapshot({i})"
    if op < 0.2 and snap_index >= first:
        i = rng.randint(first, snap_index)
        s.compact(i)
        return s, f"compact({i})"
    if op < 0.25:
        i = last + rng.randint(1, 5)
        snap = Snapshot(SnapshotMetadata(i, term, VOTERS), b"leader@%d" % i)
        s.save(HardState(term, 0, i), [], snap)
        return s, f"install leader snapshot at {i}"
    if op < 0.32:
        s.close()
        return cfg.open(data_dir, fsync=True), "restart"
    if op < 0.4:
        s.save(hs, [])
        return s, f"save({hs})"
    # may overwrite a conflicting suffix, never what a snapshot covers (Raft never does)
    lo = rng.randint(max(first, last - 3, snap_index + 1), last + 1)
    big = rng.random() < 0.3  # a batch spanning several pages
    n = rng.randint(4, 16) if big else rng.randint(1, 4)
    batch = [Entry(term, i, data=b"%d:%d:" % (term, i) + rng.randbytes(
        rng.randint(100, 400) if big else rng.randint(0, 40))) for i in range(lo, lo + n)]
    s.save(hs, batch)
    return s, f"save({hs}, entries {lo}..{lo + n - 1})"


# ---- checking crash images ------------------------------------------------------------


@dataclass
class Tally:
    images: int = 0
    points: int = 0
    workloads: int = 0
    torn_tails_cut: int = 0
    nested_recoveries: int = 0
    nested_images: int = 0
    seen: set[tuple[int, int, bytes]] = field(default_factory=set)


class Checker:
    """Checks the crash images of one workload; ``views``/``ops`` as from run_workload."""

    def __init__(self, work: Path, tally: Tally, seed: int, cfg: Config, views: list[View],
                 ops: list[str]) -> None:
        self.work, self.tally, self.seed, self.cfg = work, tally, seed, cfg
        self.views, self.ops = views, ops
        self.rng = random.Random(seed)

    def acceptable(self, op: int) -> list[View]:
        """A crash during operation ``op``: it may or may not have happened, but every
        operation before it was acknowledged."""
        return [self.views[max(0, op - 1)], self.views[op]]

    def images_at(self, point: CrashPoint) -> list[tuple[str, ImageSpec]]:
        out = [("durable", crash_image(point.frozen, "none", page_bytes=PAGE_BYTES)),
               ("all", crash_image(point.frozen, "all", page_bytes=PAGE_BYTES))]
        for j in range(RANDOM_IMAGES_PER_POINT):
            out.append((f"random#{j}",
                        crash_image(point.frozen, "random", self.rng, PAGE_BYTES)))
        return out

    def check_points(self, points: list[CrashPoint], during_recovery_of: int | None = None,
                     where: str = "") -> None:
        """Check every distinct image of ``points`` (the workload's, or those of a recovery
        crashed during operation ``during_recovery_of``'s image)."""
        for point in points:
            self.tally.points += 1
            op = point.tag if during_recovery_of is None else during_recovery_of
            for label, spec in self.images_at(point):
                # the same disk can be fine after one operation and wrong after the next
                key = (self.seed, op, image_key(spec, ignore_contents=("LOCK",)))
                if key in self.tally.seen:
                    continue
                self.tally.seen.add(key)
                self.tally.images += 1
                self.tally.nested_images += during_recovery_of is not None
                here = (f"CRASH_SEED={self.seed} ({self.cfg}), {where}event {point.index} "
                        f"({point.what}) during operation {op} ({self.ops[op]}), image {label}")
                wrote = self.check_image(spec, self.acceptable(op), here)
                if (wrote and during_recovery_of is None
                        and self.rng.random() < NESTED_FRACTION):
                    self.crash_during_recovery(spec, op, here)

    def check_image(self, spec: ImageSpec, acceptable: list[View], where: str) -> bool:
        """Recover ``spec``; returns whether the recovery itself wrote to the log."""
        img = self.work / "image"
        write_image(spec, img)
        try:
            s = self.cfg.open(img / "data")
        except Exception as exc:  # noqa: BLE001 - any refusal is the failure reported
            pytest.fail(f"{where}: the crash image did not open: {exc!r}\n"
                        f"{describe(spec)}", pytrace=False)
        got = view(s)
        if got not in acceptable:
            s.close()
            pytest.fail(f"{where}: recovered {got.brief()}, but only "
                        f"{' or '.join(v.brief() for v in acceptable)} may be: "
                        f"{diff(got, acceptable)}\n{describe(spec)}", pytrace=False)
        self.tally.torn_tails_cut += s.stats.torn_tails_cut
        wrote = s.stats.torn_tails_cut > 0 or s.stats.bytes_written > 0
        last_term = s.term(got.last)
        s.save(got.hard_state, [Entry(last_term, got.last + 1, data=b"after the crash")])
        expect = view(s)
        s.close()
        with self.cfg.open(img / "data") as again:
            assert view(again) == expect, f"{where}: a write after recovery was not read back"
        return wrote

    def crash_during_recovery(self, spec: ImageSpec, op: int, where: str) -> None:
        img = self.work / "recovering"
        write_image(spec, img)
        rec = CrashRecorder(img)
        with rec.recording(storage_module):
            self.cfg.open(img / "data", fsync=True).close()
        self.tally.nested_recoveries += 1
        self.check_points(rec.points, during_recovery_of=op,
                          where=f"recovering from [{where}], ")


def describe(spec: ImageSpec) -> str:
    return "image: " + (", ".join(f"{p} ({'dir' if d is None else f'{len(d)} bytes'})"
                                  for p, d in sorted(spec.items())) or "(empty)")


def diff(got: View, acceptable: list[View]) -> str:
    near = acceptable[-1]
    fields = [f for f in View.__dataclass_fields__ if getattr(got, f) != getattr(near, f)]
    return f"differs from the in-flight state in {', '.join(fields) or 'nothing'}"


@contextlib.contextmanager
def quiet_recoveries() -> Iterator[None]:
    """Thousands of recoveries each warn about the torn tail they cut, as they should; keep
    those warnings out of the test report."""
    logger = logging.getLogger("coordinator.storage")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_crash_images(work: Path, target_images: int, first_seed: int,
                       time_budget_s: float | None = None) -> Tally:
    with quiet_recoveries():
        return _check_crash_images(work, target_images, first_seed, time_budget_s)


def _check_crash_images(work: Path, target_images: int, first_seed: int,
                        time_budget_s: float | None) -> Tally:
    tally = Tally()
    seed = first_seed
    started = time.monotonic()
    while tally.images < target_images:
        if time_budget_s is not None and time.monotonic() - started > time_budget_s:
            break
        root = work / f"workload{seed}"
        root.mkdir(mode=0o700)
        cfg, points, views, ops = run_workload(root, seed)
        shutil.rmtree(root)
        tally.workloads += 1
        Checker(work, tally, seed, cfg, views, ops).check_points(points)
        seed += 1
    return tally


# ---- the tests --------------------------------------------------------------------------


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """Where images are written: tmpfs when there is one (several times faster than a disk,
    and the model, not the file system, decides what is durable), else ``tmp_path``."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="crash-images-", dir=shm))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.fault
def test_every_crash_image_recovers_exactly_the_acknowledged_state(workdir: Path, capsys,
                                                                    record_property) -> None:
    target = int(os.environ.get("CRASH_IMAGES", DEFAULT_IMAGES))
    first_seed = int(os.environ.get("CRASH_SEED", 0))
    started = time.monotonic()
    tally = check_crash_images(workdir, target, first_seed)
    took_s = time.monotonic() - started
    summary = (f"crash-consistency: {tally.images} distinct crash images checked "
               f"({tally.nested_images} of them crashed during a recovery) from "
               f"{tally.points} crash points of {tally.workloads} workloads "
               f"(CRASH_SEED={first_seed}..{first_seed + tally.workloads - 1}); "
               f"{tally.torn_tails_cut} torn tails cut, "
               f"{tally.nested_recoveries} recoveries crashed; {took_s:.1f} s")
    with capsys.disabled():  # on the terminal in every run, not only with -s
        print(f"\n{summary}")
    print(summary)  # and in the captured output that -rA and junit reports show
    record_property("crash_images", tally.images)
    record_property("crash_summary", summary)
    assert tally.images >= target
    assert tally.torn_tails_cut > 0 and tally.nested_images > 0


@pytest.mark.fault
@pytest.mark.parametrize("skipped", ["wal", "snapshot", "dir"])
def test_the_checker_catches_a_missing_sync(workdir: Path, monkeypatch, skipped: str) -> None:
    """The checker can fail: with the WAL's fdatasync, the snapshot file's fsync or the
    directory fsyncs left out, some crash image loses acknowledged state or cannot open."""
    real = DiskStorage._fsync_fd

    def leaky(self: DiskStorage, fd: int, kind: str) -> None:
        if kind != skipped:
            real(self, fd, kind)

    monkeypatch.setattr(DiskStorage, "_fsync_fd", leaky)
    with pytest.raises(pytest.fail.Exception) as failure:
        check_crash_images(workdir, 20_000, 0, time_budget_s=60)
    assert "CRASH_SEED=" in str(failure.value) and "event" in str(failure.value)
