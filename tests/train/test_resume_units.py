"""Resuming without Ray: sampler positions, report replay, checkpoint files, RNG states."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from synctrain import checkpoint as ckpt
from synctrain.context import Session, TrainContext
from synctrain.data import ShardedBatchSampler, shard_data_loader


def _epochs(sampler: ShardedBatchSampler, n: int, pinned: bool = False) -> list[list[list[int]]]:
    out = []
    for e in range(n):
        if pinned:
            sampler.set_epoch(e)
        out.append(list(iter(sampler)))
    return out


@pytest.mark.parametrize("pinned", [False, True])
@pytest.mark.parametrize("epoch, done", [(0, 0), (0, 3), (1, 5), (2, 0), (1, 7)])
def test_resumed_sampler_yields_exactly_what_remained(pinned, epoch, done):
    full = _epochs(ShardedBatchSampler(70, 2, 1, 5, seed=3), 3)  # 7 batches per epoch
    resumed = ShardedBatchSampler(70, 2, 1, 5, seed=3)
    resumed.resume_at(epoch, done)
    got = _epochs(resumed, 3, pinned)
    for e in range(3):
        expect = [] if e < epoch else full[e][done:] if e == epoch else full[e]
        assert got[e] == expect, (e, epoch, done)


def test_resume_past_the_epoch_length_is_a_clear_error():
    s = ShardedBatchSampler(70, 2, 0, 5)
    with pytest.raises(ValueError, match="worker count changed"):
        s.resume_at(0, 8)


def test_loader_counts_batches_handed_out():
    ds = TensorDataset(torch.arange(40.0))
    loader = shard_data_loader(DataLoader(ds, batch_size=4, shuffle=True), 2, 0, 0, torch.device("cpu"))
    it = iter(loader)
    next(it), next(it)
    assert loader.batch_sampler.position() == (0, 2)
    list(it)
    assert loader.batch_sampler.position() == (0, 5)


def test_replayed_reports_are_dropped_until_the_loader_reaches_its_resume_point():
    ctx = TrainContext(mode="sync")
    session = Session(ctx, strategy=None, restore={"step": 12, "report_seq": 2, "loaders": [[2, 3]]})
    sampler = ShardedBatchSampler(40, 1, 0, 4)  # 10 batches per epoch
    session.add_sampler(sampler)
    for epoch in range(4):
        batches = list(iter(sampler))
        session.add_report({"epoch": epoch, "n": len(batches)})
    # epochs 0 and 1 were finished before the checkpoint: their reports were committed then
    assert session.replayed_reports == 2
    reports, _ = session.drain_reports(0)
    assert [r["epoch"] for r in reports] == [2, 3]
    assert [r["n"] for r in reports] == [7, 10]
    assert session.report_seq == 4  # job-wide numbering continues from the restored 2


def test_rng_is_restored_right_before_the_first_batch_after_the_resume_point():
    torch.manual_seed(5)
    state = ckpt.capture_rng()
    expect = torch.rand(3)
    session = Session(TrainContext(mode="sync"), None,
                      restore={"step": 1, "report_seq": 0, "loaders": [[0, 1]], "rng": state})
    ds = TensorDataset(torch.arange(8.0))
    loader = shard_data_loader(DataLoader(ds, batch_size=2), 1, 0, 0, torch.device("cpu"))
    session.add_sampler(loader.batch_sampler)
    torch.rand(10)  # the loop's model init draws from the RNG: must not matter
    for _ in loader:
        assert torch.equal(torch.rand(3), expect)
        break


def test_rng_states_of_older_checkpoints_still_restore():
    """Python's RNG state is a tensor since 2026-12-03 (cheaper to encode); checkpoints
    written before hold it as a list of ints, and restore the same."""
    random.seed(3)
    state = ckpt.capture_rng()
    assert isinstance(state["python"][1], torch.Tensor)
    expect = [random.random() for _ in range(3)]
    version, internal, gauss = state["python"]
    older = {**state, "python": [version, internal.tolist(), gauss]}
    for s in (state, older):
        random.seed(99)
        ckpt.restore_rng(s)
        assert [random.random() for _ in range(3)] == expect


def test_checkpoint_roundtrip_and_corruption(tmp_path):
    torch.manual_seed(0)
    np.random.seed(1)
    random.seed(2)
    doc = {"step": 7, "report_seq": 1, "models": [{"w": torch.randn(3)}], "rng": ckpt.capture_rng(),
           "loaders": [[0, 7]], "registered": {"sched": {"last_epoch": 3}}}
    ref = ckpt.write(tmp_path, ckpt.checkpoint_name(7, 1), ckpt.encode(doc))
    back = ckpt.read_verified(ref)
    assert torch.equal(back["models"][0]["w"], doc["models"][0]["w"]) and back["step"] == 7
    a = (torch.rand(2), np.random.rand(), random.random())
    ckpt.restore_rng(back["rng"])
    b = (torch.rand(2), np.random.rand(), random.random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    data = bytearray(open(ref["path"], "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(ref["path"], "wb").write(bytes(data))
    with pytest.raises(ckpt.CheckpointCorruptError, match="checksum"):
        ckpt.read_verified(ref)


def test_a_checkpoint_written_over_a_pruned_ones_file_holds_exactly_its_own_bytes(tmp_path):
    """A pruned checkpoint becomes a spare (never a ckpt-*.pt again) and the next checkpoint is
    written over it, in its pages: shorter data than the spare held leaves none of its tail, the
    spare's name is gone, and a spare swept away meanwhile just means a new file."""
    big = {"step": 1, "models": [{"w": torch.randn(5000)}]}
    old = ckpt.write(tmp_path, ckpt.checkpoint_name(1, 1), ckpt.encode(big))
    spare = ckpt.make_spare(old["path"])
    assert spare is not None and spare.name.endswith(".tmp") and not list(tmp_path.glob("ckpt-*.pt"))
    inode = spare.stat().st_ino
    small = {"step": 2, "models": [{"w": torch.randn(10)}]}
    ref = ckpt.write(tmp_path, ckpt.checkpoint_name(2, 1), ckpt.encode(small), spare)
    path = tmp_path / ckpt.checkpoint_name(2, 1)
    assert path.stat().st_ino == inode, "written over the spare, not a new file"
    assert ref["size"] == path.stat().st_size < old["size"]
    assert torch.equal(ckpt.read_verified(ref)["models"][0]["w"], small["models"][0]["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert ckpt.make_spare(old["path"]) is None  # already gone: nothing to reuse
    gone = tmp_path / "swept.spare.tmp"  # a resumed job swept it: a new file, no error
    ref3 = ckpt.write(tmp_path, ckpt.checkpoint_name(3, 1), ckpt.encode(big), gone)
    assert ckpt.read_verified(ref3)["step"] == 1


def test_a_checkpoint_file_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    import hashlib
    import io
    buf = io.BytesIO()
    torch.save({"format": ckpt.FORMAT_VERSION, "x": Evil()}, buf)
    data = buf.getvalue()
    path = tmp_path / "evil.pt"
    path.write_bytes(data)
    ref = {"path": str(path), "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    with pytest.raises(ckpt.CheckpointCorruptError, match="cannot be decoded"):
        ckpt.read_verified(ref)


def test_a_model_of_other_shapes_than_its_checkpoint_is_a_model_mismatch():
    """Resuming a job with a changed model fails at once (ModelMismatchError is never retried)
    and names the tensors that differ; the same shapes load."""
    from torch import nn

    from synctrain.errors import ModelMismatchError

    saved = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)).state_dict()
    session = Session(TrainContext(mode="sync"), None, restore={"step": 3, "models": [saved]})
    with pytest.raises(ModelMismatchError, match=r"0.weight: \(8, 4\) saved, \(16, 4\) now"):
        session.add_model(nn.Sequential(nn.Linear(4, 16), nn.Linear(16, 2)))
    same = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    Session(TrainContext(mode="sync"), None, restore={"step": 3, "models": [saved]}).add_model(same)
    assert torch.equal(same[0].weight, saved["0.weight"])


def test_the_container_format_round_trips_every_value_a_checkpoint_holds():
    """Every dtype it holds, empty and 0-d tensors, a non-contiguous one, tuples (Adam's betas),
    int keys (an optimizer's state), an OrderedDict's order (a state_dict), None and bools."""
    import collections
    tensors = {name: (torch.arange(6) % 2).to(dt).reshape(2, 3) for name, dt in ckpt._DTYPES.items()}
    doc = {"step": 3, "tensors": tensors, "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5),
           "strided": torch.arange(12.0).reshape(3, 4).t(), "betas": (0.9, 0.999), "nested": [(1, (2, "x"))],
           "state": {0: {"momentum_buffer": torch.randn(5)}, 1: {}},
           "ordered": collections.OrderedDict([("z", 1), ("a", None), ("m", True)]), "big": 2**63 - 1}
    data = ckpt.encode(doc)
    assert data.startswith(ckpt.MAGIC), "a plain document is written as a container"
    back = ckpt.decode(data)
    for name, t in tensors.items():
        assert back["tensors"][name].dtype == t.dtype and torch.equal(back["tensors"][name], t), name
    assert back["empty"].shape == (0, 4) and back["scalar"].shape == () and back["scalar"].item() == 2.5
    assert torch.equal(back["strided"], doc["strided"])
    assert back["betas"] == (0.9, 0.999) and back["nested"] == [(1, (2, "x"))]
    assert list(back["state"]) == [0, 1] and torch.equal(back["state"][0]["momentum_buffer"],
                                                         doc["state"][0]["momentum_buffer"])
    assert list(back["ordered"].items()) == [("z", 1), ("a", None), ("m", True)] and back["big"] == 2**63 - 1


def test_numpy_values_round_trip_as_numpy_and_other_values_in_the_torch_save_format():
    """torch.save's files cannot hold a numpy scalar for torch.load(weights_only=True): a
    registered object whose state held one was saved but never restored. The container keeps
    numpy arrays and scalars as such; what it cannot hold (a sparse tensor) is format 1."""
    doc = {"step": 1, "registered": {"ema": {"decay": np.float64(0.99), "n": np.int32(7), "hist": np.arange(5.0)}}}
    data = ckpt.encode(doc)
    assert data.startswith(ckpt.MAGIC)
    ema = ckpt.decode(data)["registered"]["ema"]
    assert type(ema["decay"]) is np.float64 and ema["decay"] == 0.99 and type(ema["n"]) is np.int32
    assert ema["hist"].dtype == np.float64 and ema["hist"].tolist() == [0, 1, 2, 3, 4]
    sparse = {"step": 2, "w": torch.eye(3).to_sparse()}
    data = ckpt.encode(sparse)
    assert not data.startswith(ckpt.MAGIC)
    assert torch.equal(ckpt.decode(data)["w"].to_dense(), torch.eye(3))


@pytest.mark.parametrize("damage", ["truncate", "header_len", "ref_offset", "ref_dtype", "ref_list_dtype", "ext_code",
                                    "np_dtype", "np_scalar_shape"])
def test_a_damaged_container_is_a_corrupt_checkpoint_never_another_error(damage):
    import msgpack
    data = bytearray(ckpt.encode({"step": 1, "w": torch.arange(64.0)}))
    start = len(ckpt.MAGIC) + 8
    header = msgpack.unpackb(bytes(data[start:start + int.from_bytes(data[8:16], "little")]), raw=False)
    assert header["step"] == 1
    if damage == "truncate":
        data = data[:len(data) - 100]
    elif damage == "header_len":
        data[8:16] = (len(data) * 2).to_bytes(8, "little")
    else:
        ref = msgpack.ExtType(1, msgpack.packb(["float32", [64], 1 << 20, 256])) if damage == "ref_offset" else \
            msgpack.ExtType(1, msgpack.packb(["object", [64], 0, 256])) if damage == "ref_dtype" else \
            msgpack.ExtType(1, msgpack.packb([[1], [64], 0, 256])) if damage == "ref_list_dtype" else \
            msgpack.ExtType(3, msgpack.packb(["<f8", [32], 0, 256, True])) if damage == "np_scalar_shape" else \
            msgpack.ExtType(3, msgpack.packb(["|O", [32], 0, 256, False])) if damage == "np_dtype" else \
            msgpack.ExtType(9, b"")
        head = msgpack.packb({"format": 2, "step": 1, "w": ref}, use_bin_type=True)
        lead = start + len(head)
        data = bytearray(ckpt.MAGIC + len(head).to_bytes(8, "little") + head + bytes(-lead % 64) + bytes(256))
    with pytest.raises(ckpt.CheckpointCorruptError):
        ckpt.decode(bytes(data))


def test_load_checkpoint_reads_both_formats_and_names_a_bad_file(tmp_path):
    import synctrain
    doc = {"step": 5, "models": [{"w": torch.randn(4)}]}
    for container in (True, False):
        ref = ckpt.write(tmp_path, ckpt.checkpoint_name(5, int(container)), ckpt.encode(doc, container=container))
        back = synctrain.load_checkpoint(ref["path"])
        assert back["step"] == 5 and torch.equal(back["models"][0]["w"], doc["models"][0]["w"])
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointCorruptError, match="junk.pt"):
        synctrain.load_checkpoint(junk)
    with pytest.raises(ckpt.CheckpointCorruptError, match="cannot be read"):
        synctrain.load_checkpoint(tmp_path / "missing.pt")
