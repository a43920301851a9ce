"""coordinator — synctrain's control plane: a Raft-replicated key-value store and step log.

The pure consensus core lives in :mod:`coordinator.raft`; the networked service around it
(storage, transport, server, client, clusters, CLI) sits beside it.
"""

from coordinator.client import AsyncClient, Client, OutcomeUnknown, RequestRejected, Unavailable
from coordinator.cluster import LocalCluster, RayCluster

__all__ = ["AsyncClient", "Client", "LocalCluster", "OutcomeUnknown", "RayCluster",
           "RequestRejected", "Unavailable"]
