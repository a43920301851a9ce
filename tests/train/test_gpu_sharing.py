"""Which jobs share a GPU between ranks (sync mode then uses gloo): a pure check, no GPU needed."""

from __future__ import annotations

from synctrain.trainer import _gpus_shared


def test_one_gpu_per_rank_is_not_shared():
    infos = [{"node_id": "a", "gpu_ids": ["0"]}, {"node_id": "a", "gpu_ids": ["1"]},
             {"node_id": "b", "gpu_ids": ["0"]}]
    assert not _gpus_shared(infos)


def test_two_ranks_on_one_gpu_of_a_node_are_shared():
    assert _gpus_shared([{"node_id": "a", "gpu_ids": ["0"]}, {"node_id": "b", "gpu_ids": ["0"]},
                         {"node_id": "a", "gpu_ids": ["0"]}])


def test_cpu_workers_share_nothing():
    assert not _gpus_shared([{"node_id": "a", "gpu_ids": []}, {"node_id": "a"}])
