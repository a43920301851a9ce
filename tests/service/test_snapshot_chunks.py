"""Snapshots larger than one transport frame travel as chunk frames and are reassembled.

The unit tests drive :class:`SnapshotReassembler` (and a CoordinatorServer's send and receive
paths, not started) with hand-made frames: chunks in order rebuild the exact message; a
missing or out-of-order chunk, a newer snapshot, the byte bound, a bad checksum and malformed
fields each discard or refuse, are counted, and never raise. The cluster test runs real
processes with a small frame limit: a follower that was down while the log was compacted past
it catches up through a snapshot many frames long.
"""

from __future__ import annotations

import dataclasses
import os

import msgpack
import pytest

from coordinator.raft import (
    ConfState,
    Message,
    MessageType,
    Snapshot,
    SnapshotMetadata,
    encode_message,
)
from coordinator.server import (
    MIN_SNAPSHOT_CHUNK_BYTES,
    SNAPSHOT_CHUNK_MAGIC,
    CoordinatorServer,
    ServerConfig,
    SnapshotReassembler,
    encode_snapshot_chunks,
)

CHUNK = MIN_SNAPSHOT_CHUNK_BYTES  # smallest legal chunk: a few KiB make several chunks
ME, LEADER, OTHER = 2, 1, 3


def snapshot_msg(size: int = 5 * CHUNK + 123, index: int = 100, snap_term: int = 3,
                 term: int = 4, frm: int = LEADER, to: int = ME, seed: int = 0) -> Message:
    data = (seed.to_bytes(4, "big") + os.urandom(16)) * (size // 20 + 1)
    md = SnapshotMetadata(index, snap_term, ConfState(voters=(1, 2, 3)))
    return Message(MessageType.SNAPSHOT, to, frm, term, snapshot=Snapshot(md, data[:size]))


def raw_chunk(fields: list) -> bytes:
    return SNAPSHOT_CHUNK_MAGIC + msgpack.packb(fields, use_bin_type=True)


def fields_of(frame: bytes) -> list:
    return msgpack.unpackb(frame[len(SNAPSHOT_CHUNK_MAGIC):], raw=False)


@pytest.fixture
def stats() -> dict[str, int]:
    return {}


@pytest.fixture
def reasm(stats) -> SnapshotReassembler:
    return SnapshotReassembler(ME, max_bytes=1 << 20, stats=stats)


def feed(reasm: SnapshotReassembler, frames: list[bytes], frm: int = LEADER) -> list[Message]:
    return [m for f in frames if (m := reasm.add(frm, f)) is not None]


def test_chunks_in_order_rebuild_the_exact_message(reasm, stats) -> None:
    m = snapshot_msg()
    frames = encode_snapshot_chunks(m, CHUNK)
    assert len(frames) == 6 and all(f[:2] == SNAPSHOT_CHUNK_MAGIC for f in frames)
    assert encode_message(m)[:1] != SNAPSHOT_CHUNK_MAGIC[:1]  # the discriminator holds
    assert all(len(f) < 2 * CHUNK for f in frames)
    assert feed(reasm, frames) == [m]
    assert stats["snapshot_chunks_in"] == 6 and stats["snapshots_reassembled"] == 1
    assert reasm.buffered_bytes == 0 and reasm.in_flight(LEADER) is None
    # A snapshot of exactly one chunk is legal too.
    one = snapshot_msg(size=CHUNK, index=101)
    assert feed(reasm, encode_snapshot_chunks(one, CHUNK)) == [one]
    assert stats["snapshot_reassemblies_discarded"] == 0
    assert stats["snapshot_chunks_malformed"] == 0


def test_a_missing_chunk_discards_the_partial_snapshot_until_it_is_resent(reasm, stats) -> None:
    m = snapshot_msg()
    frames = encode_snapshot_chunks(m, CHUNK)
    assert feed(reasm, frames[:2] + frames[3:]) == []  # chunk 2 lost
    assert stats["snapshot_reassemblies_discarded"] == 1
    assert stats["snapshot_chunks_out_of_order"] == 3  # chunk 3 (the gap), then 4 and 5
    assert reasm.buffered_bytes == 0
    # Out of order and repeated chunks are gaps as well.
    assert feed(reasm, [frames[0], frames[2]]) == []
    assert feed(reasm, [frames[0], frames[1], frames[1]]) == []
    assert stats["snapshot_reassemblies_discarded"] == 3
    # The leader sends it again from chunk 0: it goes through.
    assert feed(reasm, frames) == [m]
    assert stats["snapshots_reassembled"] == 1


def test_a_new_snapshot_from_the_same_sender_replaces_a_partial_one(reasm, stats) -> None:
    old, new = snapshot_msg(index=100), snapshot_msg(index=150, seed=1)
    old_frames, new_frames = encode_snapshot_chunks(old, CHUNK), encode_snapshot_chunks(new, CHUNK)
    assert feed(reasm, old_frames[:3]) == []
    assert reasm.in_flight(LEADER) == (100, 3, 3)
    assert feed(reasm, new_frames[:1]) == []  # chunk 0 of another snapshot: starts over
    assert stats["snapshot_reassemblies_discarded"] == 1
    assert reasm.in_flight(LEADER) == (150, 3, 1)
    assert feed(reasm, old_frames[3:4]) == []  # a late chunk of the old one: dropped...
    assert reasm.in_flight(LEADER) is None  # ...and the new partial with it (a gap)
    assert feed(reasm, new_frames) == [new]
    # The same snapshot restarted from chunk 0 (a resend) also starts over.
    assert feed(reasm, new_frames[:2] + new_frames) == [new]
    assert stats["snapshots_reassembled"] == 2
    # Senders are independent: interleaved snapshots from two nodes both complete.
    a, b = snapshot_msg(frm=LEADER), snapshot_msg(frm=OTHER, seed=2, term=5)
    fa, fb = encode_snapshot_chunks(a, CHUNK), encode_snapshot_chunks(b, CHUNK)
    got = []
    for x, y in zip(fa, fb, strict=True):
        got += feed(reasm, [x], LEADER) + feed(reasm, [y], OTHER)
    assert got == [a, b]


def test_the_byte_bound_is_enforced(stats) -> None:
    m = snapshot_msg(size=4 * CHUNK)
    frames = encode_snapshot_chunks(m, CHUNK)
    small = SnapshotReassembler(ME, max_bytes=4 * CHUNK - 1, stats=stats)
    assert feed(small, frames) == []
    assert stats["snapshot_reassemblies_refused"] == 1
    assert stats["snapshot_chunks_out_of_order"] == 3  # the rest have nothing to extend
    assert small.buffered_bytes == 0

    room_for_one = SnapshotReassembler(ME, max_bytes=6 * CHUNK, stats=stats)
    assert feed(room_for_one, frames[:2], LEADER) == []
    assert room_for_one.buffered_bytes == 4 * CHUNK
    same_term = snapshot_msg(size=4 * CHUNK, frm=OTHER, term=m.term)
    assert feed(room_for_one, encode_snapshot_chunks(same_term, CHUNK)[:1], OTHER) == []
    assert stats["snapshot_reassemblies_refused"] == 2
    assert room_for_one.in_flight(LEADER) == (100, 3, 2)  # a leader of the same term keeps it
    # A snapshot from a newer leader evicts the older leader's partial snapshot.
    newer = snapshot_msg(size=4 * CHUNK, frm=OTHER, term=m.term + 1)
    assert feed(room_for_one, encode_snapshot_chunks(newer, CHUNK), OTHER) == [newer]
    assert room_for_one.in_flight(LEADER) is None
    assert stats["snapshot_reassemblies_discarded"] == 1


def test_a_bad_checksum_is_refused(reasm, stats) -> None:
    m = snapshot_msg()
    frames = [fields_of(f) for f in encode_snapshot_chunks(m, CHUNK)]
    for f in frames:  # a consistent but wrong checksum on every chunk
        f[5] ^= 1
    assert feed(reasm, [raw_chunk(f) for f in frames]) == []
    assert stats["snapshot_checksum_failures"] == 1
    assert stats["snapshot_reassemblies_discarded"] == 1
    # Right checksum, corrupted data: refused too.
    frames = [fields_of(f) for f in encode_snapshot_chunks(m, CHUNK)]
    frames[3][6] = bytes([frames[3][6][0] ^ 0xFF]) + frames[3][6][1:]
    assert feed(reasm, [raw_chunk(f) for f in frames]) == []
    assert stats["snapshot_checksum_failures"] == 2
    assert stats["snapshots_reassembled"] == 0 and reasm.buffered_bytes == 0


def _malformed_frames() -> dict[str, bytes]:
    m = snapshot_msg()
    good = [fields_of(f) for f in encode_snapshot_chunks(m, CHUNK)]
    c0 = good[0]

    def c0_with(**changes) -> list:
        head = encode_message(dataclasses.replace(m, **changes))
        return c0[:7] + [head]

    not_snap = dataclasses.replace(m, snapshot=Snapshot(m.snapshot.metadata, b""))
    cases = {
        "not msgpack": SNAPSHOT_CHUNK_MAGIC + b"\xc1\xc1",
        "truncated": SNAPSHOT_CHUNK_MAGIC + msgpack.packb(c0, use_bin_type=True)[:100],
        "unknown version": b"\xc1\x02" + msgpack.packb(c0, use_bin_type=True),
        "magic only": b"\xc1",
        "not an array": raw_chunk({"index": 1}),  # type: ignore[arg-type]
        "seven fields": raw_chunk(c0[:7]),
        "nine fields": raw_chunk(c0 + [0]),
        "negative index": raw_chunk([-1] + c0[1:]),
        "index 0": raw_chunk([0] + c0[1:]),
        "str term": raw_chunk([c0[0], "3"] + c0[2:]),
        "bool seq": raw_chunk(c0[:2] + [False] + c0[3:]),
        "seq >= total": raw_chunk(c0[:2] + [6, 6] + c0[4:]),
        "total 0": raw_chunk(c0[:3] + [0] + c0[4:]),
        "crc over 32 bits": raw_chunk(c0[:5] + [1 << 32] + c0[6:]),
        "str data": raw_chunk(c0[:6] + ["x" * CHUNK, c0[7]]),
        "empty data": raw_chunk(c0[:6] + [b"", c0[7]]),
        "data over total": raw_chunk(c0[:4] + [10, c0[5], b"x" * 11, c0[7]]),
        "chunk 0 without head": raw_chunk(c0[:7] + [None]),
        "head on chunk 1": raw_chunk(good[1][:7] + [c0[7]]),
        "head not msgpack": raw_chunk(c0[:7] + [b"\xc1"]),
        "head not a snapshot": raw_chunk(c0[:7] + [encode_message(
            Message(MessageType.HEARTBEAT, ME, LEADER, 4))]),
        "head with data": raw_chunk(c0[:7] + [encode_message(m)]),
        "head for another index": raw_chunk([99] + c0[1:7] + [encode_message(not_snap)]),
        "head to another node": raw_chunk(c0_with(to=OTHER, snapshot=not_snap.snapshot)),
        "head from another node": raw_chunk(c0_with(frm=OTHER, snapshot=not_snap.snapshot)),
        "total does not match sizes": raw_chunk(c0[:3] + [7] + c0[4:]),
        "tiny chunks": raw_chunk(c0[:3] + [c0[4] // 10 + 1, c0[4], c0[5],
                                           c0[6][:10], c0[7]]),
    }
    return cases


@pytest.mark.parametrize("case", sorted(_malformed_frames()))
def test_malformed_chunk_frames_are_refused_and_counted(reasm, stats, case) -> None:
    assert reasm.add(LEADER, _malformed_frames()[case]) is None
    assert stats["snapshot_chunks_malformed"] == 1, stats
    assert reasm.in_flight(LEADER) is None and reasm.buffered_bytes == 0


def test_a_malformed_chunk_mid_snapshot_discards_it(reasm, stats) -> None:
    m = snapshot_msg()
    frames = encode_snapshot_chunks(m, CHUNK)
    for mutate in (lambda f: f.__setitem__(4, f[4] + 1),  # total_bytes differs from chunk 0
                   lambda f: f.__setitem__(6, f[6][:-1])):  # a short middle chunk
        bad = fields_of(frames[2])
        mutate(bad)
        assert feed(reasm, [frames[0], frames[1], raw_chunk(bad)] + frames[3:]) == []
    assert stats["snapshot_chunks_malformed"] == 2
    assert stats["snapshot_reassemblies_discarded"] == 2
    last = fields_of(frames[-1])
    last[6] += b"x"  # a long last chunk
    assert feed(reasm, frames[:-1] + [raw_chunk(last)]) == []
    assert stats["snapshot_chunks_malformed"] == 3
    assert feed(reasm, frames) == [m]


# ---------------------------------------------------------------- CoordinatorServer paths
@pytest.fixture
def server(tmp_path):
    config = ServerConfig(node_id=ME, peers={i: ("127.0.0.1", 1) for i in (1, 2, 3)},
                          data_dir=tmp_path / "node", token=b"t" * 32, fsync=False,
                          max_frame_bytes=8 * CHUNK)
    srv = CoordinatorServer(config)
    try:
        yield srv
    finally:
        srv._disk.shutdown(wait=True)
        srv.storage.close()


def test_server_sends_large_snapshots_in_chunks_and_small_ones_in_one_frame(server) -> None:
    sent: list[tuple[int, bytes]] = []
    reports: list[tuple[int, bool]] = []
    server.peer_transport.send = lambda to, payload: sent.append((to, payload))
    server.node.report_snapshot = lambda peer, ok: reports.append((peer, ok))
    assert server._chunk_bytes == 4 * CHUNK  # half the frame limit
    big = snapshot_msg(size=10 * CHUNK, frm=ME, to=OTHER)
    small = snapshot_msg(size=4 * CHUNK, frm=ME, to=LEADER)
    heartbeat = Message(MessageType.HEARTBEAT, OTHER, ME, 4)
    server._send([big, small, heartbeat])
    assert [to for to, _ in sent] == [OTHER] * 3 + [LEADER, OTHER]  # order kept per peer
    assert sent[3][1] == encode_message(small) and sent[4][1] == encode_message(heartbeat)
    assert all(len(p) <= 8 * CHUNK for _, p in sent)
    assert reports == [(OTHER, True), (LEADER, True)]
    assert server.stats["snapshots_sent_chunked"] == 1
    assert server.stats["snapshot_chunks_out"] == 3
    receiver = SnapshotReassembler(OTHER, 1 << 20, {})
    assert feed(receiver, [p for _, p in sent[:3]], ME) == [big]


def test_server_reports_a_snapshot_it_cannot_send(server) -> None:
    reports: list[tuple[int, bool]] = []
    server.node.report_snapshot = lambda peer, ok: reports.append((peer, ok))
    # A head alone (its conf state) over the frame limit: nothing can carry it.
    md = SnapshotMetadata(100, 3, ConfState(voters=tuple(range(1, 5 * CHUNK))))
    m = Message(MessageType.SNAPSHOT, OTHER, ME, 4, snapshot=Snapshot(md, b"x" * 5 * CHUNK))
    server._send([m])
    assert reports == [(OTHER, False)]
    assert server.stats["snapshot_send_failures"] == 1


def test_server_steps_a_reassembled_snapshot_and_survives_garbage(server) -> None:
    stepped: list[Message] = []
    server.node.step = stepped.append
    server._schedule_drive = lambda: None
    m = snapshot_msg(size=10 * CHUNK)
    for case in _malformed_frames().values():
        server._on_peer_message(LEADER, case)
    frames = encode_snapshot_chunks(m, 4 * CHUNK)
    server._on_peer_message(OTHER, frames[0])  # chunks claiming the leader, on another link
    for f in frames:
        server._on_peer_message(LEADER, f)
    server._on_peer_message(LEADER, encode_message(Message(MessageType.HEARTBEAT, ME, LEADER, 4)))
    # The data was spooled to a file in the storage's format (not kept in memory): the
    # stepped message carries the metadata, and the file the data, for the storage to adopt.
    md = m.snapshot.metadata
    assert stepped[0] == dataclasses.replace(m, snapshot=Snapshot(md, b""))
    assert stepped[1].type == MessageType.HEARTBEAT and len(stepped) == 2
    spooled = server._reassembler.take_file(md.index, md.term)
    assert spooled is not None and server._reassembler.take_file(md.index, md.term) is None
    server.storage.save(None, [], stepped[0].snapshot, snapshot_file=spooled)
    assert server.storage.snapshot_data() == m.snapshot.data and not spooled.exists()
    st = server.stats
    assert st["snapshots_reassembled"] == 1
    assert st["snapshot_chunks_malformed"] == len(_malformed_frames()) + 1
    assert st["snapshot_chunks_in"] == len(_malformed_frames()) + 4
    assert st["peer_messages_dropped"] == 0
    status_stats = server.status()["stats"]
    assert status_stats["snapshot_chunks_in"] == st["snapshot_chunks_in"]


def test_server_config_validates_chunk_settings(tmp_path) -> None:
    base = dict(node_id=1, peers={1: ("127.0.0.1", 1)}, data_dir=tmp_path, token=b"t" * 32)
    assert ServerConfig(**base).effective_snapshot_chunk_bytes == 4 << 20
    assert ServerConfig(**base, max_frame_bytes=1 << 20).effective_snapshot_chunk_bytes == 1 << 19
    for bad in ({"max_frame_bytes": CHUNK}, {"snapshot_chunk_bytes": 10},
                {"max_snapshot_reassembly_bytes": 0}):
        with pytest.raises(ValueError):
            ServerConfig(**base, **bad)


# ---------------------------------------------------------------- a real cluster
FRAME = 128 << 10  # chunks of 64 KiB
VALUE = 8 << 10


@pytest.mark.slow
def test_follower_behind_a_compaction_catches_up_through_a_chunked_snapshot(
        make_cluster, wait_for) -> None:
    cluster = make_cluster(snapshot_every=40, extra_args=["--max-frame-bytes", str(FRAME)])
    leader = cluster.leader()
    follower = next(i for i in cluster.node_ids if i != leader)
    values: dict[str, bytes] = {}
    with cluster.client() as client:
        client.put("before", b"1")
        target = cluster.status(leader)["commit"]
        wait_for(lambda: (cluster.status(follower) or {}).get("applied", 0) >= target,
                 "the follower to apply the first write")
        behind = cluster.status(follower)["applied"]
        cluster.kill(follower)
        for i in range(250):  # about 2 MiB of state: 16 frames' worth
            values[f"big-{i:03d}"] = os.urandom(VALUE)
            client.put(f"big-{i:03d}", values[f"big-{i:03d}"])
        assert sum(map(len, values.values())) > 8 * FRAME
        status = cluster.status(cluster.leader())
        assert status["log_first"] > behind + 1, "the log was not compacted past the follower"

        cluster.restart(follower)
        for i in range(0, 250, 5):  # keep writing while it catches up
            values[f"big-{i:03d}"] = b"new %d" % i
            client.put(f"big-{i:03d}", values[f"big-{i:03d}"])
        leader = cluster.leader()
        target = cluster.status(leader)["commit"]
    wait_for(lambda: (cluster.status(follower) or {}).get("applied", 0) >= target,
             f"node {follower} to catch up to index {target}", timeout_s=30)
    with cluster.client(endpoints=[cluster.endpoint(follower)]) as at_follower:
        for key, value in values.items():
            assert at_follower.get(key, consistency="stale") == value, key
    sent = cluster.status(leader)["stats"]
    got = cluster.status(follower)["stats"]
    print(f"leader {leader}: {sent['snapshots_sent_chunked']} snapshots in "
          f"{sent['snapshot_chunks_out']} chunks; follower {follower}: "
          f"{got['snapshot_chunks_in']} chunks in, {got['snapshots_reassembled']} reassembled, "
          f"{got['snapshot_reassemblies_discarded']} discarded")
    assert sent["snapshots_sent_chunked"] >= 1 and sent["snapshot_chunks_out"] >= 16
    assert got["snapshots_reassembled"] >= 1 and got["snapshot_chunks_in"] >= 16
    assert got["snapshot_chunks_malformed"] == 0 and got["snapshot_checksum_failures"] == 0
    assert cluster.status(follower)["snapshot_index"] > 0


@pytest.mark.parametrize("taken_first", [False, True], ids=["both-before-take", "take-between"])
def test_the_same_snapshot_received_twice_keeps_a_whole_file_for_the_storage(
        server, taken_first) -> None:
    # A leader may stream one snapshot twice in a row (seen in CI: a stale rejection made it
    # probe again). The second copy must not truncate or unlink the file of the first, which
    # the disk thread may be placing: with one file name per snapshot the storage's open of
    # the taken file failed (FileNotFoundError), and the node shut down.
    stepped: list[Message] = []
    server.node.step = stepped.append
    server._schedule_drive = lambda: None
    m = snapshot_msg(size=3 * CHUNK)
    md = m.snapshot.metadata
    frames = encode_snapshot_chunks(m, 4 * CHUNK)
    assert len(frames) == 1  # as in CI: one chunk each
    server._on_peer_message(LEADER, frames[0])
    taken = server._reassembler.take_file(md.index, md.term) if taken_first else None
    server._on_peer_message(LEADER, frames[0])
    if taken is None:
        taken = server._reassembler.take_file(md.index, md.term)
    assert taken is not None and taken.exists()
    assert len(stepped) == 2 and stepped[0] == stepped[1]
    server.storage.save(None, [], stepped[0].snapshot, snapshot_file=taken)
    assert server.storage.snapshot_data() == m.snapshot.data
    # A copy nobody took is removed at shutdown, not left behind.
    server._reassembler.discard_files()
    assert sorted(p.name for p in server.config.data_dir.glob("*.tmp")) == []
