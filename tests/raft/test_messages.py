"""The wire codec (the RPCs of Raft paper Figure 2 and §7, as frozen dataclasses): every value
round-trips; anything malformed raises DecodeError and nothing else; never pickle."""

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.raft import (
    ConfChange,
    ConfChangeType,
    ConfState,
    DecodeError,
    Entry,
    EntryType,
    Message,
    MessageType,
    Snapshot,
    SnapshotMetadata,
    decode_conf_change,
    decode_entry,
    decode_message,
    decode_snapshot,
    encode_conf_change,
    encode_entry,
    encode_message,
    encode_snapshot,
)

u63 = st.integers(0, (1 << 63) - 1)
small = st.integers(0, 1000)
ids = st.tuples(*[small] * 0) | st.lists(small, max_size=5).map(tuple)
entries = st.builds(Entry, u63, u63, st.sampled_from(EntryType), st.binary(max_size=64))
conf_states = st.builds(ConfState, ids, ids, ids, st.booleans(), ids)
snapshots = st.builds(Snapshot, st.builds(SnapshotMetadata, u63, u63, conf_states),
                      st.binary(max_size=64))
messages = st.builds(
    Message, st.sampled_from(MessageType), u63, u63, u63, u63, u63,
    st.lists(entries, max_size=4).map(tuple), u63, st.booleans(), u63,
    st.none() | snapshots, st.binary(max_size=16))


@given(messages)
def test_message_round_trip(m):
    assert decode_message(encode_message(m)) == m


@given(entries)
def test_entry_round_trip(e):
    assert decode_entry(encode_entry(e)) == e


@given(snapshots)
def test_snapshot_round_trip(s):
    assert decode_snapshot(encode_snapshot(s)) == s


@given(st.lists(st.tuples(st.sampled_from(ConfChangeType), small), max_size=4).map(tuple))
def test_conf_change_round_trip(changes):
    cc = ConfChange(changes)
    assert decode_conf_change(encode_conf_change(cc)) == cc


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_random_bytes_raise_decode_error_only(b):
    for decode in (decode_message, decode_entry, decode_snapshot, decode_conf_change):
        try:
            decode(b)
        except DecodeError:
            pass


@settings(max_examples=100)
@given(messages, st.data())
def test_truncated_or_corrupted_message_raises_decode_error_only(m, data):
    raw = encode_message(m)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(DecodeError):
        decode_message(raw[:cut])
    pos = data.draw(st.integers(0, len(raw) - 1))
    flipped = raw[:pos] + bytes([raw[pos] ^ data.draw(st.integers(1, 255))]) + raw[pos + 1:]
    try:
        decode_message(flipped)  # may still be a valid message: then it must be a Message
    except DecodeError:
        pass


@pytest.mark.parametrize("obj", [
    None, 1, "x", {}, [], {"type": 5}, [5] * 11, [5] * 13,
    [99, 1, 2, 1, 0, 0, [], 0, False, 0, None, b""],        # unknown message type
    [5, -1, 2, 1, 0, 0, [], 0, False, 0, None, b""],        # negative id
    [5, 1, 2, 1, 0, 0, [[1, 1, 7, b""]], 0, False, 0, None, b""],  # unknown entry type
    [5, 1, 2, 1, 0, 0, [[1, 1, 0]], 0, False, 0, None, b""],  # short entry
    [5, 1, 2, 1, 0, 0, [], 0, 1, 0, None, b""],             # reject is not a bool
    [5, 1, 2, 1, 0, 0, [], 0, False, 0, [1, 1, [[], [], [], False, []], "s"], b""],  # str data
    [5, 1, 2, 1.5, 0, 0, [], 0, False, 0, None, b""],       # float term
    [5, 1, 2, (1 << 64) - 1, 0, 0, [], 0, False, 0, None, b""],   # huge
])
def test_malformed_shapes(obj):
    with pytest.raises(DecodeError):
        decode_message(msgpack.packb(obj, use_bin_type=True))


def test_non_bytes_input_and_trailing_garbage():
    with pytest.raises(DecodeError):
        decode_message("not bytes")  # type: ignore[arg-type]
    raw = encode_message(Message(MessageType.HEARTBEAT, 1, 2, 3))
    with pytest.raises(DecodeError):
        decode_message(raw + b"\x00")


def test_never_pickle():
    import pickle

    raw = pickle.dumps(Message(MessageType.HEARTBEAT, 1, 2, 3))
    with pytest.raises(DecodeError):
        decode_message(raw)
