"""A coordinator cluster hosted in Ray actors (SPREAD placement) keeps serving when one of
its actors is killed."""

from __future__ import annotations

import pytest

from coordinator import RayCluster

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_ray_hosted_cluster_survives_losing_an_actor(ray_session) -> None:
    with RayCluster(nodes=3) as cluster:
        assert len(cluster.endpoints) == 3
        with cluster.client(timeout_s=30) as client:
            client.put("k", b"v")
            assert client.get("k") == b"v"
            cluster.kill(1)  # leader or not: two of three remain, a majority
            client.put("k2", b"v2")
            assert client.get("k2") == b"v2" and client.get("k") == b"v"
