"""The embedded coordinator's liveness checks, against real nodes killed for real."""

from __future__ import annotations

import os
import signal

import ray

from synctrain.driver.coord import EmbeddedCoordinator


def test_a_node_killed_after_its_ping_was_answered_is_found_dead_by_the_last_look(ray_session, tmp_path):
    """The driver pings each node about once a second without waiting; at the job's end it
    looks once more, waiting. A ping answered just before the node was killed must not be
    taken for that last look's answer (a leader killed near a job's end went unrecorded)."""
    coordinator = EmbeddedCoordinator(tmp_path / "coordinator")
    coordinator.start()
    try:
        assert coordinator.dead_nodes() == []  # the pings go out
        pending = list(coordinator._pings.values())
        assert len(pending) == len(coordinator.cluster.actors)
        ray.wait(pending, num_returns=len(pending), timeout=60)  # ... and are answered
        victim = sorted(coordinator.cluster.actors)[1]
        os.kill(coordinator.cluster.actor_pid(victim), signal.SIGKILL)
        assert coordinator.dead_nodes(wait_s=60.0) == [victim]
        coordinator.restart(victim)
        assert coordinator.dead_nodes(wait_s=60.0) == []
    finally:
        coordinator.stop()
