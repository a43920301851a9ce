"""The hierarchical all-reduce on two Ray nodes (issue 13, "must show" 3).

``shm_multinode_probe.py`` (a subprocess: it starts its own 2-node ``ray.cluster_utils``
cluster) runs 4 ranks, 2 per Ray node, with ``grad_transport="auto"``. Every rank must report
``"shm+gloo"``, parameters equal to a twin trained with plain DDP on gloo (<= 1e-6) and
identical on every rank, an exact integer-valued all-reduce, and broadcasts from a node's
lowest rank and from another rank.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from synctrain.strategies import shm_allreduce as shm

pytestmark = [pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(shm.supported() is not None, reason=str(shm.supported()))]

PROBE = pathlib.Path(__file__).with_name("shm_multinode_probe.py")
MARKER = "SHM_MULTINODE "
PROBE_TIMEOUT_S = 400


@pytest.mark.timeout(PROBE_TIMEOUT_S + 30)
def test_two_ray_nodes_use_shared_memory_within_and_gloo_between():
    env = dict(os.environ, RAY_DEDUP_LOGS="1", PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[2]))
    env.pop("RAY_ADDRESS", None)  # the probe starts its own cluster
    proc = subprocess.run([sys.executable, str(PROBE)], capture_output=True, text=True,
                          timeout=PROBE_TIMEOUT_S, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARKER)]
    tail = f"rc={proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert lines, f"the probe printed no result line\n{tail}"
    result = json.loads(lines[-1][len(MARKER):])
    assert result["ok"], f"probe failed: {result.get('error')}\n{result.get('traceback', '')}\n{tail}"
    outputs = result["outputs"]
    assert len(result["ray_nodes"]) == 2
    nodes = [o["node"] for o in outputs]
    assert sorted(nodes.count(n) for n in set(nodes)) == [2, 2], f"not 2 ranks per node: {nodes}"
    for o in outputs:
        assert o["grad_transport"] == "shm+gloo", o
        assert o["twin_diff"] <= 1e-6, o
        assert o["all_reduce_exact"], o
        assert all(o["broadcasts"]), o
        assert o["digest"] == outputs[0]["digest"], "ranks hold different parameters"
