"""A sync generation's rendezvous, and a rank left behind by a broken collective.

Found by CI (one run in about a dozen full suites): after a peer heal, the survivor's run of the
new generation ended at once on a broken collective while the replacement waited in the
rendezvous, and the driver waited 180 s (startup grace and stall timeout) before acting. Two
causes, two tests: rank 0 picked a free port and let it go before its store bound it (any
process could take it meanwhile), and the driver ignored a rank whose run ended on a broken
collective while its peers went on waiting.
"""

from __future__ import annotations

import datetime
import errno
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import synctrain
from synctrain.driver import shell
from synctrain.worker.actor import TrainWorker

pytestmark = pytest.mark.ray


def noop_loop(config):
    return config


def test_the_rendezvous_port_is_held_by_rank_0s_store_from_the_moment_it_is_named(ray_session):
    spec = synctrain.Trainer(noop_loop, num_workers=2, use_gpu=False, step_log=False)._make_spec()
    worker = ray_session.remote(TrainWorker).options(num_cpus=0).remote(0, spec)
    try:
        host, port = ray_session.get(worker.rendezvous_address.remote())
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other, pytest.raises(OSError) as info:
            other.bind((host, port))  # another process cannot take it before the group forms
        assert info.value.errno == errno.EADDRINUSE
        client = dist.TCPStore(host, port, None, False, datetime.timedelta(seconds=30))
        client.set("probe", b"1")  # and it is a live store, there to join
        assert client.get("probe") == b"1"
    finally:
        ray_session.kill(worker)


SLEEP_AT_STEP = 6


def sleeping_loop(config):
    """Rank 1 of generation 1 sleeps in its own code (no collective, no heartbeat) at a step;
    rank 0's next all-reduce times out (``collective_timeout_s``) and its run ends."""
    ctx = synctrain.get_context()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 8, generator=g), torch.randint(0, 3, (256,), generator=g)
    torch.manual_seed(0)
    model = synctrain.prepare_model(nn.Linear(8, 3))
    opt = synctrain.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=0.05))
    loader = synctrain.prepare_data_loader(DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True))
    step = ctx.start_step
    for xb, yb in loader:
        if ctx.generation == 1 and ctx.rank == 1 and step == SLEEP_AT_STEP:
            time.sleep(3600)
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        step += 1
    return step


def test_a_rank_still_running_after_its_peers_collective_broke_is_stalled_without_waiting_out_the_timeout(
        ray_session, tmp_path, monkeypatch):
    # the stall timeout is far off: the failure below comes from the broken collective, PEER_END_S
    # after rank 0's run ended on it (the driver runs in this process; 4 s instead of 15 keeps
    # the test short, and the sleeping rank would not end in either)
    monkeypatch.setattr(shell, "PEER_END_S", 4.0)
    result = synctrain.Trainer(sleeping_loop, num_workers=2, mode="sync", use_gpu=False, progress=False,
                               storage_path=str(tmp_path), job_name="left-behind", checkpoint_every=4,
                               collective_timeout_s=5.0, stall_timeout_s=300.0).fit()
    [failure] = result.failures
    assert failure["kind"] == "stalled" and failure["rank"] == 1 and failure["recovery"] == "peer", failure
    assert "still running 4 s after rank 0's run ended on a broken collective" in failure["detail"], failure
    assert failure["step"] == SLEEP_AT_STEP or failure["step"] is None, failure
    assert [s["step"] for s in result.steps] == list(range(1, 256 // 32 + 1))
    assert [g["generation"] for g in result.generations] == [1, 2]
    assert result.outputs == [256 // 32, 256 // 32]
