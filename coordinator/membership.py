"""Membership changes through the client API: member list / add / remove / promote (issue 16).

Theory of operation
-------------------
The Raft core already changes membership safely (:mod:`coordinator.raft.confchange`: one
voter at a time, learners, a leader that removes itself hands over first). What a running
cluster also needs is *where* each member listens, on every node and after every restart. So
adding a member is two log entries, both proposed by the leader:

1. ``members.addr(id, "host:port")`` (a state-machine command of the ``members`` extension,
   :class:`coordinator.server.MembersSeen`, snapshotted): every node that applies it dials the
   new member at that address (``CoordinatorServer._refresh_peers``), including a node that
   restarts with an old ``--peers`` list or restores a snapshot;
2. the configuration change itself (``ADD_LEARNER``, or ``ADD_VOTER``).

Then the new node is started with ``coordinator serve --join``: it asks the cluster for the
current membership (:func:`fetch_membership`), starts from it (its storage's bootstrap
configuration, so replaying the log from the start or installing a snapshot ends in the
cluster's configuration), and, being new, neither votes nor campaigns until the leader has
caught it up (the RECOVERING marker, as for a node that lost its disk).

``promote`` turns a learner into a voter only once it holds at least 90 % of the leader's log
(etcd's rule: a voter that is far behind would weaken the quorum until it catches up).
``remove`` works for voters and learners; a removed node stops itself once it has applied its
removal and an election timeout has passed (its last answers go out first). A leader that
removes itself keeps leading, taking no proposals, until the remaining voters hold its whole
log, then steps down (the core's rule), and the others elect a leader.

Every change is answered once it is *applied* on the leader, with the new member list. A
second change while one is in flight is refused (``busy``): the core allows one at a time.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from coordinator.raft import (
    ConfChange,
    ConfChangeType,
    ConfState,
    LocalProtocolError,
    ProposalDropped,
    Role,
)
from coordinator.statemachine import encode_command

if TYPE_CHECKING:  # pragma: no cover
    from coordinator.server import CoordinatorServer, ServerConfig

#: A learner is promoted only once it holds this share of the leader's log (etcd: 90 %).
PROMOTE_MIN_MATCH = 0.9
MAX_MEMBER_ID = 1 << 31
ACTIONS = ("list", "add", "remove", "promote")


def _err(code: str, detail: str) -> dict:
    return {"ok": False, "error": code, "detail": detail}


def members_of(cs: ConfState) -> set[int]:
    return set(cs.voters) | set(cs.learners) | set(cs.voters_outgoing) | set(cs.learners_next)


def parse_address(text: Any) -> tuple[str, int] | None:
    """``"host:port"`` -> (host, port), or None if it is not one."""
    if not isinstance(text, str) or ":" not in text:
        return None
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host.strip("[]"), int(port)


def member_list(server: CoordinatorServer) -> dict:
    """This node's view: every member with its address, role in the configuration and (on the
    leader) how much of the log it holds."""
    cs = server.conf_state
    addrs = server.peer_addresses()
    status = server.node.status()
    progress = getattr(status, "progress", None) or {}
    rows = []
    for nid in sorted(members_of(cs)):
        host, port = addrs.get(nid, ("", 0))
        row: dict[str, Any] = {"ID": nid, "name": f"node-{nid}", "peerURLs": [f"{host}:{port}"] if host else [],
                               "isLearner": nid in cs.learners, "isLeader": nid == server.node.leader_id}
        if nid in progress:
            row["match"] = progress[nid].match
        rows.append(row)
    return {"ok": True, "members": rows, "leader": server.node.leader_id, "node": server.id,
            "joint": bool(cs.voters_outgoing), "commit": status.commit}


def check_request(body: dict) -> tuple[str, int, str | None, bool] | dict:
    """(action, id, address, learner) from a ``member`` request, or the error answer."""
    action = body.get("action")
    if action not in ACTIONS:
        return _err("bad_request", f"a member action is one of {ACTIONS}, got {action!r}")
    if action == "list":
        return action, 0, None, False
    nid = body.get("id")
    if not isinstance(nid, int) or isinstance(nid, bool) or not 0 < nid < MAX_MEMBER_ID:
        return _err("bad_request", f"a member id is an integer in 1..{MAX_MEMBER_ID - 1}, got {nid!r}")
    addr = body.get("address")
    if action == "add" and parse_address(addr) is None:
        return _err("bad_request", f"member add needs the new node's address as host:port, got {addr!r}")
    learner = body.get("learner", False)
    if not isinstance(learner, bool):
        return _err("bad_request", "learner must be true or false")
    return action, nid, addr, learner


async def change(server: CoordinatorServer, action: str, nid: int, addr: str | None,
                 learner: bool) -> dict:
    """Run one membership change on the leader and answer once it is applied."""
    deadline = time.monotonic() + server.config.request_timeout_s * 2
    cs = server.conf_state
    members = members_of(cs)
    if action == "add":
        if nid in members:
            if server.peer_addresses().get(nid) == parse_address(addr) and (nid in cs.learners) == learner:
                return member_list(server)  # a retried add: already done
            return _err("member_exists", f"node {nid} is already a member; remove it first or pick "
                                         "another id")
        answer = await _propose_address(server, nid, addr, deadline)
        if answer is not None:
            return answer
        cc = ConfChange(((ConfChangeType.ADD_LEARNER if learner else ConfChangeType.ADD_VOTER, nid),))
    elif action == "promote":
        if nid in cs.voters:
            return member_list(server)  # a retried promote: already a voter
        if nid not in cs.learners:
            return _err("member_not_found", f"node {nid} is not a learner of this cluster "
                                            "(member add ID HOST:PORT --learner first)")
        progress = getattr(server.node.status(), "progress", None) or {}
        match, mine = (progress[nid].match if nid in progress else 0), server.node.status().last_index
        if match < PROMOTE_MIN_MATCH * mine:
            return _err("learner_not_ready", f"learner {nid} holds {match} of the leader's {mine} "
                                             "entries; it can be promoted once it holds 90 % "
                                             "(retry shortly)")
        cc = ConfChange(((ConfChangeType.ADD_VOTER, nid),))
    else:  # remove
        if nid not in members:
            return _err("member_not_found", f"node {nid} is not a member of this cluster")
        if set(cs.voters) == {nid}:
            return _err("bad_member_change", f"node {nid} is the only voter; add another first")
        cc = ConfChange(((ConfChangeType.REMOVE_VOTER, nid),))
    while True:
        if server.role != Role.LEADER:
            return server.redirect_answer("leader_changed")
        try:
            server.node.propose_conf_change(cc)
            break
        except ProposalDropped as exc:  # one change at a time, or no entry of this term yet
            if time.monotonic() > deadline:
                return _err("timeout", f"the change could not be proposed: {exc}")
        except LocalProtocolError as exc:
            return _err("bad_member_change", str(exc))
        await asyncio.sleep(server.config.tick_s)
    index = server.node.pending_conf_index
    server.schedule_drive()
    while server.sm.applied_index < index:
        if time.monotonic() > deadline:
            return dict(server.redirect_answer("timeout"), maybe_applied=True)
        await asyncio.sleep(server.config.tick_s)
    return member_list(server)


async def _propose_address(server: CoordinatorServer, nid: int, addr: Any, deadline: float) -> dict | None:
    """Commit ``members.addr(nid, addr)``; None once applied, else the error answer."""
    want = parse_address(addr)
    proposed_at = -1e9
    while server.peer_addresses().get(nid) != want or nid not in server.members_ext().addrs:
        if server.role != Role.LEADER:
            return server.redirect_answer("leader_changed")
        if time.monotonic() > deadline:
            return _err("timeout", f"the address of node {nid} was not committed in time")
        if time.monotonic() - proposed_at > 1.0:
            try:
                server.node.propose_batch([encode_command("members.addr", 0, 0, 0, int(time.time() * 1000),
                                                          nid, addr)])
                proposed_at = time.monotonic()
                server.schedule_drive()
            except ProposalDropped:
                pass
        await asyncio.sleep(server.config.tick_s)
    return None


async def fetch_membership(config: ServerConfig, timeout_s: float = 2.0) -> dict | None:
    """For ``serve --join``: the membership as the cluster's leader (or, failing that, any
    member) sees it, asked of the nodes in ``--peers``; None when no peer answers."""
    from coordinator.transport import ClientConnection, TransportError

    async def ask(addr: tuple[str, int]) -> dict | None:
        try:
            conn = await ClientConnection.connect(addr[0], addr[1], config.token, timeout_s=timeout_s)
        except (OSError, asyncio.TimeoutError, TransportError):
            return None
        try:
            answer = await conn.request({"op": "member", "action": "list"}, timeout_s=timeout_s)
        except (OSError, asyncio.TimeoutError, TransportError):
            return None
        finally:
            await conn.close()
        return answer if isinstance(answer, dict) and answer.get("ok") else None

    peers = [a for i, a in sorted(config.peers.items()) if i != config.node_id]
    answers = [a for a in await asyncio.gather(*map(ask, peers)) if a is not None]
    if not answers:
        return None
    from_leader = [a for a in answers if a.get("leader") == a.get("node")]
    return (from_leader or answers)[0]


def bootstrap_from(answer: dict, node_id: int) -> tuple[ConfState, dict[int, tuple[str, int]]]:
    """The ConfState and addresses a joining node starts from (see the module doc);
    ValueError if the cluster does not list ``node_id`` as a member."""
    voters: list[int] = []
    learners: list[int] = []
    addrs: dict[int, tuple[str, int]] = {}
    for row in answer.get("members", []):
        nid = row.get("ID")
        if not isinstance(nid, int):
            continue
        (learners if row.get("isLearner") else voters).append(nid)
        urls = row.get("peerURLs") or []
        parsed = parse_address(urls[0]) if urls else None
        if parsed is not None:
            addrs[nid] = parsed
    if node_id not in voters and node_id not in learners:
        raise ValueError(
            f"node {node_id} is not a member of the cluster (members: {sorted(voters + learners)}): "
            f"add it first with `coordinator member add {node_id} HOST:PORT --learner`, then start it "
            "with serve --join")
    return ConfState(voters=tuple(sorted(voters)), learners=tuple(sorted(learners))), addrs
