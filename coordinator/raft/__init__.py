"""coordinator.raft — the pure Raft consensus core (sans-I/O, deterministic).

See docs/raft-core-api.md for the contract and :mod:`coordinator.raft.node` for the theory
of operation. Everything a driver needs is re-exported here.
"""

from .confchange import ConfChangeError
from .log import LogInvariantError, RaftLog
from .messages import (
    ConfChange,
    ConfChangeType,
    ConfState,
    DecodeError,
    Entry,
    EntryType,
    HardState,
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
from .node import TRANSFER_CONTEXT, RaftNode
from .progress import ProgressState
from .quorum import VoteResult
from .storage import Compacted, MemoryStorage, SnapshotOutOfDate, StorageError, Unavailable
from .types import (
    Config,
    LocalProtocolError,
    PeerStatus,
    ProposalDropped,
    RaftError,
    ReadState,
    Ready,
    Role,
    SoftState,
    Status,
)

__all__ = [
    "ConfChange", "ConfChangeError", "ConfChangeType", "ConfState", "Config", "Compacted",
    "DecodeError", "Entry", "EntryType", "HardState", "LocalProtocolError", "LogInvariantError",
    "MemoryStorage", "Message", "MessageType", "PeerStatus", "ProgressState", "ProposalDropped",
    "RaftError", "RaftLog", "RaftNode", "ReadState", "Ready", "Role", "Snapshot",
    "SnapshotMetadata", "SnapshotOutOfDate", "SoftState", "Status", "StorageError",
    "TRANSFER_CONTEXT", "Unavailable", "VoteResult", "decode_conf_change", "decode_entry",
    "decode_message", "decode_snapshot", "encode_conf_change", "encode_entry", "encode_message",
    "encode_snapshot",
]
