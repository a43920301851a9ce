"""A faulty, deterministic network between simulated Raft nodes.

Theory of operation
-------------------
The network decides, when a message is sent, whether it is dropped, duplicated and how long
each copy takes (a random delay in ``[1, max_delay]`` time units, so messages overtake one
another: reordering). Every choice comes from the simulation's one ``random.Random``.

Partitions are a set of blocked directed links ``(frm, to)``; a symmetric partition blocks
both directions of every link across the cut, a one-way partition only one. A link is
checked when the message *arrives*, so a partition also swallows what was already in flight.

Crashes: a node's *epoch* counts its restarts. A message remembers the epochs of both ends
when it was sent and is lost if either changed before it arrives: messages in flight to or
from a node that crashed are gone, as they would be with real TCP connections.

The network only computes fates; the simulator owns the clock and the event queue. It caps
the number of messages in flight (``max_in_flight``), dropping beyond it, like a full socket
buffer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["FaultNetwork", "NetworkFaults"]


@dataclass
class NetworkFaults:
    """The current fault settings; the simulator's fault schedule changes them."""

    drop: float = 0.0  # probability that a message is lost
    duplicate: float = 0.0  # probability that it is delivered twice
    max_delay: int = 3  # delays are uniform in [1, max_delay] time units
    blocked: set[tuple[int, int]] = field(default_factory=set)

    def heal(self) -> None:
        self.drop, self.duplicate, self.max_delay = 0.0, 0.0, 3
        self.blocked.clear()


class FaultNetwork:
    """Fates of node-to-node messages under the current :class:`NetworkFaults`."""

    def __init__(self, rng: random.Random, node_ids: list[int], max_in_flight: int = 20_000):
        self.rng = rng
        self.node_ids = sorted(node_ids)
        self.faults = NetworkFaults()
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.sent = self.dropped = self.duplicated = 0

    def delays(self) -> list[int]:
        """Delays of the copies of one message being sent: [] if dropped, 2 if duplicated."""
        self.sent += 1
        f, rng = self.faults, self.rng
        if self.in_flight >= self.max_in_flight or (f.drop and rng.random() < f.drop):
            self.dropped += 1
            return []
        copies = 2 if f.duplicate and rng.random() < f.duplicate else 1
        self.duplicated += copies - 1
        self.in_flight += copies
        return [rng.randint(1, f.max_delay) for _ in range(copies)]

    def arrived(self) -> None:
        """A copy left the wire (delivered or lost)."""
        self.in_flight -= 1

    def link_up(self, frm: int, to: int) -> bool:
        return (frm, to) not in self.faults.blocked

    # ---- partitions ------------------------------------------------------------------------

    def partition(self, side: set[int]) -> None:
        """Block both directions between ``side`` and everyone else."""
        other = [n for n in self.node_ids if n not in side]
        for a in sorted(side):
            for b in other:
                self.faults.blocked.add((a, b))
                self.faults.blocked.add((b, a))

    def block_one_way(self, frm: int, to: int) -> None:
        self.faults.blocked.add((frm, to))

    def heal_links(self) -> None:
        self.faults.blocked.clear()

    def describe_partition(self) -> str:
        return ", ".join(f"{a}->{b}" for a, b in sorted(self.faults.blocked)) or "none"
