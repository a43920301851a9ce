"""coordinator — synctrain's control plane: a Raft-replicated key-value store and step log.

The pure consensus core lives in :mod:`coordinator.raft`; the networked service around it
(storage, transport, server, client, clusters, CLI) sits beside it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from coordinator.client import (
        AsyncClient,
        Client,
        Compare,
        Delete,
        Get,
        KeyValue,
        OutcomeUnknown,
        Put,
        RangeResult,
        RequestRejected,
        TxnResult,
        Unavailable,
    )
    from coordinator.cluster import LocalCluster, RayCluster

# Lazy: ``import coordinator.raft`` (the pure core, used by the simulator) must not pull in
# the service's asyncio/transport/Ray modules.
_LAZY = {
    "AsyncClient": "coordinator.client",
    "Client": "coordinator.client",
    "OutcomeUnknown": "coordinator.client",
    "RequestRejected": "coordinator.client",
    "Unavailable": "coordinator.client",
    "Compare": "coordinator.client",
    "Delete": "coordinator.client",
    "Get": "coordinator.client",
    "KeyValue": "coordinator.client",
    "Put": "coordinator.client",
    "RangeResult": "coordinator.client",
    "TxnResult": "coordinator.client",
    "LeaseKeeper": "coordinator.client",
    "Watch": "coordinator.client",
    "WatchCancelled": "coordinator.client",
    "WatchEvent": "coordinator.client",
    "LocalCluster": "coordinator.cluster",
    "RayCluster": "coordinator.cluster",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'coordinator' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = ["AsyncClient", "Client", "Compare", "Delete", "Get", "KeyValue", "LeaseKeeper",
           "LocalCluster", "OutcomeUnknown", "Put", "RangeResult", "RayCluster", "RequestRejected",
           "TxnResult", "Unavailable", "Watch", "WatchCancelled", "WatchEvent"]
