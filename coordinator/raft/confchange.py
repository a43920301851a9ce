"""Membership changes: the pure function from (config, ConfChange) to the next config.

Theory of operation
-------------------
Three kinds of transition (Raft §6 and Ongaro's thesis §4):

* *simple* -- a ConfChange with one change (or several that touch at most one voter):
  incoming voters change by at most one server, so any old and new majority overlap.
* *enter joint* -- several changes: the old voters become ``outgoing``, the changes apply to
  ``incoming``; decisions then need majorities of both until the joint config is left.
  A voter demoted to learner while still in ``outgoing`` waits in ``learners_next``.
* *leave joint* -- the empty ConfChange: drop ``outgoing``, promote ``learners_next``.

Every node applies a committed CONF_CHANGE entry with the same function, so invalid
changes are rejected identically everywhere (``ConfChangeError``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .messages import ConfChange, ConfChangeType

__all__ = ["ConfChangeError", "Config", "apply_change"]


class ConfChangeError(ValueError):
    """The change is not valid against the current configuration."""


@dataclass(frozen=True)
class Config:
    voters: frozenset[int]
    voters_outgoing: frozenset[int] = frozenset()
    learners: frozenset[int] = frozenset()
    learners_next: frozenset[int] = frozenset()
    auto_leave: bool = False

    @property
    def joint(self) -> bool:
        return bool(self.voters_outgoing)


def _apply_one(kind: ConfChangeType, nid: int, inc: set[int], outgoing: frozenset[int],
               learners: set[int], learners_next: set[int]) -> None:
    if nid <= 0:
        raise ConfChangeError(f"node id must be positive, got {nid}")
    if kind is ConfChangeType.ADD_VOTER:
        inc.add(nid)
        learners.discard(nid)
        learners_next.discard(nid)
    elif kind is ConfChangeType.ADD_LEARNER:
        inc.discard(nid)
        if nid in outgoing:
            learners_next.add(nid)
        else:
            learners.add(nid)
    elif kind is ConfChangeType.REMOVE_VOTER:
        inc.discard(nid)
        learners.discard(nid)
        learners_next.discard(nid)
    else:  # pragma: no cover - enum is closed
        raise ConfChangeError(f"unknown change type {kind!r}")


def apply_change(cfg: Config, cc: ConfChange) -> Config:
    """Return the configuration after ``cc``; raise ConfChangeError if it is not allowed."""
    if not cc.changes:
        if not cfg.joint:
            raise ConfChangeError("cannot leave a joint configuration: not in one")
        return Config(voters=cfg.voters, learners=cfg.learners | cfg.learners_next)
    if cfg.joint:
        raise ConfChangeError("a joint configuration is in effect: leave it first")
    inc, learners, lnext = set(cfg.voters), set(cfg.learners), set(cfg.learners_next)
    joint = len(cc.changes) > 1
    outgoing = cfg.voters if joint else frozenset()
    for kind, nid in cc.changes:
        _apply_one(ConfChangeType(kind), nid, inc, outgoing, learners, lnext)
    if not inc:
        raise ConfChangeError("the change would remove every voter")
    if not joint and len(inc ^ cfg.voters) > 1:
        raise ConfChangeError("a single change may alter at most one voter")
    if joint and inc == cfg.voters and not lnext:
        # a joint config that changes no voter is just a learner update: apply it directly
        return Config(voters=frozenset(inc), learners=frozenset(learners))
    return Config(voters=frozenset(inc), voters_outgoing=outgoing, learners=frozenset(learners),
                  learners_next=frozenset(lnext), auto_leave=joint)
