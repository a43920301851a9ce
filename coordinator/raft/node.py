"""RaftNode: the Raft consensus algorithm as a pure, deterministic state machine.

Theory of operation
-------------------
The node does no I/O. Its inputs are ``tick()`` (logical time), ``step(message)`` (a
message from a peer) and local requests (``campaign``, ``propose``/``propose_batch``,
``propose_conf_change``, ``read_index``, ``transfer_leadership``). Its output is a
:class:`Ready`: the hard state and entries (and maybe a snapshot) the driver must make
durable, then the messages it may send, the committed entries to apply and ReadIndex
answers. The driver hands the Ready back with ``advance(ready)``. Randomness (election
timeouts) comes only from the injected ``random.Random``; so one seed replays everything.

Roles are handlers: ``_step_leader``, ``_step_candidate`` and ``_step_follower``;
transitions are verbs (``_become_follower`` ... ``_become_leader``). Rules that hold for
every role -- term comparison, vote requests, validation of remote input -- run first in
``step``. Remote input that is malformed, stale or from an unknown node is dropped and
counted in ``status().dropped`` by reason; it never raises.

Safety notes (each has a test):
* A leader commits by counting replicas only entries of its own term (§5.4.2) and appends
  an empty entry when elected so that happens promptly.
* For itself a leader counts only its *persisted* index (etcd #14370): an entry is never
  reported committed before it has been in ``Ready.entries``.
* Vote and term changes are in the same Ready as the response that depends on them, and
  the driver persists before sending (PySyncObj #202).
* ``commit`` and each peer's ``match`` never move back (PySyncObj #166, #167) -- except
  that a leader forgets the ``match`` of a follower that, answering a probe at exactly that
  index, proves it no longer holds it (a lost disk; ``Progress.regress``). Lowering a match is
  always safe (a commit index never moves back); keeping it would re-send one entry forever
  (tests/raft/testdata/lost_disk.txt).
* A node started with ``Config.recovering`` (it lost its disk) may have voted in a term it
  forgot and held entries counted toward a commit, so it grants no vote or pre-vote and never
  campaigns until it has accepted a leader's APPEND or SNAPSHOT of its current term and
  committed up to the highest commit index that leader sent it (``_maybe_finish_recovery``;
  tests/raft/test_recovering.py, testdata/recovering.txt). This is protocol-aware recovery
  (Alagappan et al., FAST 2018) as far as a node can do it alone: if the repairing leader's
  term is below the forgotten vote's, a second vote in that term stays possible; a leader
  that no longer has a quorum behind it steps down within an election timeout (CheckQuorum),
  which keeps that window short.
* A follower never installs a snapshot whose ConfState leaves it out (etcd's ``restore``),
  and a leader never sends one (it waits for a snapshot that includes the follower).
"""

from __future__ import annotations

import random
from collections import Counter
from operator import attrgetter

from . import quorum
from .confchange import ConfChangeError, apply_change
from .confchange import Config as MemberConfig
from .log import LogInvariantError, RaftLog
from .messages import (
    ConfChange,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    decode_conf_change,
    encode_conf_change,
)
from .progress import Progress, ProgressState, ProgressTracker
from .readonly import ReadOnly
from .storage import Compacted, Unavailable
from .types import (
    Config,
    LocalProtocolError,
    PeerStatus,
    ProposalDropped,
    ReadState,
    Ready,
    Role,
    SoftState,
    Status,
)

__all__ = ["RaftNode", "TRANSFER_CONTEXT"]

MT = MessageType
NORMAL = EntryType.NORMAL
#: Context of a VOTE caused by leadership transfer: it bypasses the leader lease.
TRANSFER_CONTEXT = b"transfer-leader"
_LEADER_TRAFFIC = frozenset({MT.APPEND, MT.HEARTBEAT, MT.SNAPSHOT})
#: Accepted even from a node outside our configuration: our configuration may be older than
#: the sender's (a lagging node must still follow a new leader and vote for a new member).
_FROM_ANYONE = _LEADER_TRAFFIC | {MT.VOTE, MT.PRE_VOTE, MT.TIMEOUT_NOW, MT.READ_INDEX_RESP}
_LOCAL_ONLY = frozenset({MT.HUP, MT.PROPOSE})
_INDEX = attrgetter("index")
_TERM = attrgetter("term")
#: Heartbeat responses (x election_tick) after which an unacknowledged snapshot is presumed lost.
_SNAPSHOT_WAIT_HEARTBEATS = 2
#: Notices one Ready carries at most (more are counted as ``notices_suppressed``).
_MAX_NOTICES = 32


def _in_conf_state(cs: ConfState, node_id: int) -> bool:
    return (node_id in cs.voters or node_id in cs.learners or node_id in cs.voters_outgoing
            or node_id in cs.learners_next)


class RaftNode:
    """One Raft peer. See the module docstring and docs/raft-core-api.md."""

    def __init__(self, config: Config, storage, rng: random.Random) -> None:
        config.validate()
        if not isinstance(rng, random.Random):
            raise LocalProtocolError("rng must be a random.Random (seeded by the caller)")
        self.cfg = config
        self.id = config.id
        self._rng = rng
        self.log = RaftLog(storage, config.max_committed_size_per_ready)
        hs, cs = storage.initial_state()
        self.trk = ProgressTracker(config.max_inflight_msgs)
        self._install_conf_state(cs)
        self.term, self.vote = hs.term, hs.vote
        if hs.commit:
            if not self.log.committed <= hs.commit <= self.log.last_index():
                raise LocalProtocolError(
                    f"stored commit {hs.commit} is outside the stored log "
                    f"[{self.log.committed}, {self.log.last_index()}]: storage is corrupt")
            self.log.commit_to(hs.commit)
        if config.applied:
            self.log.applied_to(config.applied)
        self.role = Role.FOLLOWER
        self.leader_id = 0
        self.msgs: list[Message] = []
        self.read_states: list[ReadState] = []
        self._dropped_reads: list[bytes] = []
        self._notices: list[str] = []
        self.dropped: Counter[str] = Counter()
        # Lost-disk recovery (see the module docstring): the term of the leader repairing us
        # and the highest commit index it sent in an APPEND/SNAPSHOT we accepted.
        self.recovering = config.recovering
        self._recover_term = 0
        self._recover_commit = 0
        self._lost_log_noticed_term = 0
        if self.recovering and self.trk.is_singleton() and self.trk.is_voter(self.id):
            raise LocalProtocolError(
                f"node {self.id} is the only voter: there is no leader to repair it, so it "
                "cannot start with recovering=True; restore its data directory from a backup")
        self.read_only = ReadOnly(config.max_pending_read_index)
        self._deferred_reads: list[tuple[bytes, int]] = []
        self._excluded_snapshot_noticed: dict[int, int] = {}  # peer -> snapshot index noticed
        self.lead_transferee = 0
        self.pending_conf_index = 0
        self.uncommitted_size = 0
        self.leaving = False  # a leader removed from the config, handing over (see below)
        self._leaving_elapsed = 0
        self._replicate_pending = False  # new entries not yet offered to followers
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_election_timeout = config.election_tick
        self._prev_hs = HardState(hs.term, hs.vote, self.log.committed)
        self._prev_ss = SoftState(0, Role.FOLLOWER)
        self._outstanding: Ready | None = None
        self._become_follower(self.term, 0)

    # ------------------------------------------------------------------------------------
    # read-only properties

    @property
    def commit_index(self) -> int:
        return self.log.committed

    def hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.log.committed)

    def soft_state(self) -> SoftState:
        return SoftState(self.leader_id, self.role)

    def conf_state(self) -> ConfState:
        return self.trk.conf_state()

    def promotable(self) -> bool:
        """May this node campaign? Only voters of the current configuration may."""
        return self.trk.is_voter(self.id)

    def status(self) -> Status:
        prs = {}
        if self.role is Role.LEADER:
            prs = {i: PeerStatus(p.match, p.next, p.state.value, p.is_learner, p.inflights.count())
                   for i, p in sorted(self.trk.progress.items())}
        return Status(self.id, self.role, self.term, self.vote, self.leader_id, self.log.committed,
                      self.log.applied, self.log.last_index(), self.trk.conf_state(), prs,
                      dict(self.dropped), self.lead_transferee, self.recovering)

    def _notice(self, key: str, text: str) -> None:
        """Count ``key`` and hand ``text`` to the driver in the next Ready (bounded)."""
        self.dropped[key] += 1
        if len(self._notices) < _MAX_NOTICES:
            self._notices.append(f"node {self.id}: {text}")
        else:
            self.dropped["notices_suppressed"] += 1

    # ------------------------------------------------------------------------------------
    # role transitions

    def _reset(self, term: int) -> None:
        if self.term != term:
            self.term = term
            self.vote = 0
        self.leader_id = 0
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_election_timeout = (
            self.cfg.election_tick + self._rng.randrange(self.cfg.election_tick))
        self.lead_transferee = 0
        self._excluded_snapshot_noticed.clear()
        self.trk.reset_votes()
        last = self.log.last_index()
        prs = self.trk.progress
        for i, pr in list(prs.items()):
            fresh = prs[i] = Progress(last + 1, self.trk.max_inflight, pr.is_learner)
            if i == self.id:
                fresh.match = min(self.log.persisted, last)
                fresh.recent_active = True
        self.pending_conf_index = 0
        self.uncommitted_size = 0
        self.leaving = False
        self._leaving_elapsed = 0
        self._replicate_pending = False
        self._abandon_reads()

    def _abandon_reads(self) -> None:
        """Drop queued ReadIndex requests (this node is no longer a leader able to answer)."""
        pending = [(rs.context, rs.origin) for rs in self.read_only.reset()]
        pending += self._deferred_reads
        self._deferred_reads = []
        for ctx, origin in pending:
            if origin == self.id:
                self._dropped_reads.append(ctx)
            else:
                self._send(Message(MT.READ_INDEX_RESP, origin, self.id, self.term, reject=True,
                                   context=ctx))

    def _become_follower(self, term: int, lead: int) -> None:
        self._reset(term)
        self.role = Role.FOLLOWER
        self.leader_id = lead

    def _become_pre_candidate(self) -> None:
        # PreVote (thesis §9.6): ask first, without touching term or vote.
        self.trk.reset_votes()
        self.role = Role.PRE_CANDIDATE
        self.leader_id = 0
        self._abandon_reads()

    def _become_candidate(self) -> None:
        self._reset(self.term + 1)
        self.vote = self.id
        self.role = Role.CANDIDATE

    def _become_leader(self) -> None:
        self._reset(self.term)
        self.role = Role.LEADER
        self.leader_id = self.id
        me = self.trk.progress[self.id]
        me.match = min(self.log.persisted, self.log.last_index())
        me.become_replicate()
        # Conservative: a conf change may be anywhere in the uncommitted tail.
        self.pending_conf_index = self.log.last_index()
        self.leaving = self._tail_removes_self()
        # §5.4.2 / §8: commit an entry of the new term promptly, which commits the tail.
        self._append_entries([Entry(self.term, self.log.last_index() + 1)])

    # ------------------------------------------------------------------------------------
    # time

    def tick(self) -> None:
        """Advance logical time by one tick."""
        if self.role is Role.LEADER:
            self._tick_leader()
        else:
            self.election_elapsed += 1
            if self.promotable() and self.election_elapsed >= self.randomized_election_timeout:
                self.election_elapsed = 0
                self._hup(transfer=False)

    def ticks_until_due(self) -> int | None:
        """How many :meth:`tick` calls until the first one that may act (send a heartbeat,
        check the quorum, end a transfer, campaign): the ones before it only count. ``None``
        when no tick can act (a learner, or a voter removed from the configuration).

        A driver that owes the node several ticks with nothing else happening may sleep
        until this one and deliver them together (a tickless ticker): the node ends in the
        same state and says the same things as if they had come one by one. Anything else
        (a message, a proposal, a role change) may move the answer, in both directions."""
        if self.role is Role.LEADER:
            if self.leaving and not self.trk.is_voter(self.id):
                return 1
            return max(1, min(self.cfg.heartbeat_tick - self.heartbeat_elapsed,
                              self.cfg.election_tick - self.election_elapsed))
        if not self.promotable():
            return None
        return max(1, self.randomized_election_timeout - self.election_elapsed)

    def _tick_leader(self) -> None:
        if self.leaving and not self.trk.is_voter(self.id):
            self._leaving_elapsed += 1
            self._maybe_finish_leaving()
            if self.role is not Role.LEADER:
                return
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        if self.election_elapsed >= self.cfg.election_tick:
            self.election_elapsed = 0
            if self.cfg.check_quorum:
                if not self.trk.quorum_active():
                    # CheckQuorum: no majority heard from us for an election timeout.
                    self.dropped["check_quorum_step_down"] += 1
                    self._become_follower(self.term, 0)
                    return
                for i, pr in self.trk.progress.items():
                    pr.recent_active = i == self.id
            if self.lead_transferee:
                self.lead_transferee = 0  # the transfer did not finish in time: abort it
        if self.heartbeat_elapsed >= self.cfg.heartbeat_tick:
            self.heartbeat_elapsed = 0
            self._bcast_heartbeat(self.read_only.last_pending_context())

    # ------------------------------------------------------------------------------------
    # elections

    def campaign(self) -> None:
        """Start an election now (with a pre-vote first if enabled); no-op on a leader."""
        self._hup(transfer=False)

    def _hup(self, transfer: bool) -> None:
        if self.role is Role.LEADER:
            return
        if self.recovering:
            self.dropped["campaign_refused_recovering"] += 1
            return
        if not self.promotable():
            self.dropped["campaign_not_promotable"] += 1
            return
        if self.log.committed > self.log.applied:
            try:
                tail = self.log.slice(self.log.applied + 1, self.log.committed + 1)
            except (Compacted, Unavailable):
                tail = []
            if any(e.type is EntryType.CONF_CHANGE for e in tail):
                self.dropped["campaign_pending_conf_change"] += 1
                return
        if self.cfg.pre_vote and not transfer:
            self._campaign(pre=True, transfer=False)
        else:
            self._campaign(pre=False, transfer=transfer)

    def _campaign(self, pre: bool, transfer: bool) -> None:
        if pre:
            self._become_pre_candidate()
            vote_type, term = MT.PRE_VOTE, self.term + 1
        else:
            self._become_candidate()
            vote_type, term = MT.VOTE, self.term
        self.trk.record_vote(self.id, True)
        if self.trk.tally() is quorum.VoteResult.WON:
            # single voter: won at once
            if pre:
                self._campaign(pre=False, transfer=transfer)
            else:
                self._become_leader()
            return
        last, last_term = self.log.last_index(), self.log.last_term()
        ctx = TRANSFER_CONTEXT if transfer else b""
        for i in self.trk.all_voters():
            if i != self.id:
                self._send(Message(vote_type, i, self.id, term, log_term=last_term, index=last,
                                   context=ctx))

    def _handle_vote_request(self, m: Message) -> None:
        """§5.2 / §5.4.1: grant if we have not voted otherwise and the log is up to date."""
        resp = MT.PRE_VOTE_RESP if m.type is MT.PRE_VOTE else MT.VOTE_RESP
        if self.recovering:
            # We may have voted in this term before our disk was lost: vote for nobody.
            self.dropped["vote_refused_recovering"] += 1
            self._send(Message(resp, m.frm, self.id, self.term, reject=True))
            return
        can_vote = (self.vote == m.frm
                    or (self.vote == 0 and self.leader_id == 0)
                    or (m.type is MT.PRE_VOTE and m.term > self.term))
        if can_vote and self.log.is_up_to_date(m.index, m.log_term):
            # The response carries the candidate's term; for a real vote, term and vote are
            # already ours and go out in the same Ready's hard_state (persist-before-send).
            self._send(Message(resp, m.frm, self.id, m.term))
            if m.type is MT.VOTE:
                self.election_elapsed = 0
                self.vote = m.frm
        else:
            self._send(Message(resp, m.frm, self.id, self.term, reject=True))

    def _handle_vote_response(self, m: Message) -> None:
        want = MT.PRE_VOTE_RESP if self.role is Role.PRE_CANDIDATE else MT.VOTE_RESP
        if m.type is not want:
            self.dropped["unexpected_vote_response"] += 1
            return
        self.trk.record_vote(m.frm, not m.reject)
        result = self.trk.tally()
        if result is quorum.VoteResult.WON:
            if self.role is Role.PRE_CANDIDATE:
                self._campaign(pre=False, transfer=False)
            else:
                self._become_leader()
        elif result is quorum.VoteResult.LOST:
            self._become_follower(self.term, 0)

    # ------------------------------------------------------------------------------------
    # the message entry point

    def step(self, m: Message) -> None:
        """Process one message from a peer. Bad remote input is dropped and counted."""
        if not isinstance(m, Message):
            raise LocalProtocolError(f"step() takes a Message, got {type(m).__name__}")
        bad = self._validate(m)
        if bad:
            self.dropped[bad] += 1
            return
        if m.term > self.term:
            if not self._step_higher_term(m):
                return
        elif m.term < self.term:
            self._step_lower_term(m)
            return
        if m.type is MT.PRE_VOTE or m.type is MT.VOTE:
            self._handle_vote_request(m)
        elif self.role is Role.LEADER:
            self._step_leader(m)
        elif self.role is Role.FOLLOWER:
            self._step_follower(m)
        else:
            self._step_candidate(m)

    def _validate(self, m: Message) -> str:
        """Return why ``m`` must be dropped, or '' if it may be processed."""
        if m.to != self.id:
            return "misaddressed"
        if m.frm == self.id or m.frm <= 0:
            return "bad_sender"
        if m.type in _LOCAL_ONLY:
            return "local_only_type"
        if m.term <= 0:
            return "malformed_term"
        if m.frm not in self.trk.progress and m.type not in _FROM_ANYONE:
            # Responses and requests only a leader handles: from a non-member they are noise.
            return "unknown_sender"
        if m.type is MT.APPEND:
            return self._validate_append(m)
        if m.type is MT.SNAPSHOT:
            s = m.snapshot
            if s is None or s.metadata.term > m.term or s.metadata.index <= 0:
                return "malformed_snapshot"
        return ""

    @staticmethod
    def _validate_append(m: Message) -> str:
        """Entries must be consecutive after m.index, with terms non-decreasing from
        m.log_term up to at most m.term (C-level checks: this is on the hot path)."""
        ents = m.entries
        if m.log_term > m.term:
            return "malformed_append"
        if not ents:
            return ""
        if list(map(_INDEX, ents)) != list(range(m.index + 1, m.index + 1 + len(ents))):
            return "malformed_append"
        terms = list(map(_TERM, ents))
        if terms[0] < m.log_term or terms[-1] > m.term or terms != sorted(terms):
            return "malformed_append"
        return ""

    def _step_higher_term(self, m: Message) -> bool:
        """Handle ``m.term > self.term``; False if the message must be ignored."""
        if m.type is MT.PRE_VOTE or m.type is MT.VOTE:
            in_lease = (self.cfg.check_quorum and self.leader_id != 0
                        and self.election_elapsed < self.cfg.election_tick)
            if in_lease and m.context != TRANSFER_CONTEXT:
                # Leader lease: we heard from a live leader recently; don't be disrupted.
                self.dropped["vote_in_lease"] += 1
                return False
        if m.type is MT.PRE_VOTE:
            return True  # a pre-vote never changes our term
        if m.type is MT.PRE_VOTE_RESP and not m.reject:
            return True  # a granted pre-vote carries the future term we asked for
        lead = m.frm if m.type in _LEADER_TRAFFIC else 0
        if m.type is MT.VOTE:
            # Figure 2: only a *granted* vote resets the election timer. Adopting the term of a
            # vote request we may reject must not, or a fast-ticking node with a stale log keeps
            # everyone's timers reset and starves elections (simulator seed 175, PreVote off).
            elapsed = self.election_elapsed
            self._become_follower(m.term, lead)
            self.election_elapsed = elapsed
            return True
        self._become_follower(m.term, lead)
        return True

    def _step_lower_term(self, m: Message) -> None:
        if (self.cfg.check_quorum or self.cfg.pre_vote) and m.type in (MT.HEARTBEAT, MT.APPEND):
            # A stale leader: tell it our term so it steps down (a node that raised its term
            # while partitioned could otherwise never rejoin under CheckQuorum).
            self._send(Message(MT.APPEND_RESP, m.frm, self.id, self.term))
        elif m.type is MT.PRE_VOTE:
            self._send(Message(MT.PRE_VOTE_RESP, m.frm, self.id, self.term, reject=True))
        else:
            self.dropped["stale_term"] += 1

    # ------------------------------------------------------------------------------------
    # followers and candidates

    def _step_follower(self, m: Message) -> None:
        t = m.type
        if t in _LEADER_TRAFFIC:
            self.election_elapsed = 0
            self.leader_id = m.frm
            self._handle_leader_traffic(m)
        elif t is MT.TIMEOUT_NOW:
            # Leadership transfer (thesis §3.10): campaign at once, skipping the pre-vote.
            if m.frm == self.leader_id:
                self._hup(transfer=True)
            else:
                self.dropped["timeout_now_not_from_leader"] += 1
        elif t is MT.READ_INDEX_RESP:
            if m.reject:
                self._dropped_reads.append(m.context)
            else:
                self.read_states.append(ReadState(m.index, m.context))
        elif t is MT.TRANSFER_LEADER:
            self._forward_to_leader(m, "transfer_no_leader")
        elif t is MT.READ_INDEX:
            self._forward_to_leader(m, "read_index_no_leader")
        else:
            self.dropped["unexpected_" + t.name.lower()] += 1

    def _forward_to_leader(self, m: Message, reason: str) -> None:
        if self.leader_id and self.leader_id != m.frm:
            self._send(Message(m.type, self.leader_id, self.id, self.term, index=m.index,
                               context=m.context))
        else:
            self.dropped[reason] += 1

    def _step_candidate(self, m: Message) -> None:
        t = m.type
        if t in _LEADER_TRAFFIC:
            # A leader of our term exists: we lost; follow it.
            self._become_follower(m.term, m.frm)
            self._handle_leader_traffic(m)
        elif t is MT.PRE_VOTE_RESP or t is MT.VOTE_RESP:
            self._handle_vote_response(m)
        else:
            self.dropped["candidate_ignored_" + t.name.lower()] += 1

    def _handle_leader_traffic(self, m: Message) -> None:
        if m.type is MT.APPEND:
            self._handle_append(m)
        elif m.type is MT.HEARTBEAT:
            last = self.log.last_index()
            self.log.commit_to(min(m.commit, last))
            self._send(Message(MT.HEARTBEAT_RESP, m.frm, self.id, self.term, context=m.context))
            if m.commit > last:
                self._report_lost_entries(m, last)
            self._maybe_finish_recovery()
        else:
            self._handle_snapshot(m)

    def _report_lost_entries(self, m: Message, last: int) -> None:
        """A heartbeat's commit is ``min(our match, leader's commit)``: one beyond our log means
        we lost entries we acknowledged (a wiped or restored disk). etcd panics here; we tell the
        leader with a rejection at that index, which makes it probe and repair us."""
        if self._lost_log_noticed_term != self.term:
            self._lost_log_noticed_term = self.term
            what = "repair expected" if self.recovering else (
                "this node lost acknowledged entries: was its data directory wiped or restored "
                "from an old copy? It should have been started with recovering=True")
            self._notice("log_behind_leader_record",
                         f"leader {m.frm} (term {self.term}) records that we hold index "
                         f"{m.commit} but our log ends at {last}; {what}")
        else:
            self.dropped["log_behind_leader_record"] += 1
        self._send(Message(MT.APPEND_RESP, m.frm, self.id, self.term, index=m.commit, reject=True,
                           reject_hint=last, log_term=self.log.term_or_zero(last)))

    def _note_leader_commit(self, commit: int) -> None:
        """While recovering: remember the highest commit index the current term's leader sent
        us in a message we accepted (the repair target)."""
        if not self.recovering:
            return
        if self._recover_term != self.term:
            self._recover_term, self._recover_commit = self.term, 0
        self._recover_commit = max(self._recover_commit, commit)

    def _maybe_finish_recovery(self) -> None:
        if not self.recovering or self._recover_term != self.term:
            return
        if self.log.committed < self._recover_commit:
            return
        self.recovering = False
        self._notice("recovered",
                     f"repaired by leader {self.leader_id} in term {self.term}: committed up to "
                     f"{self.log.committed} (the leader's commit index was {self._recover_commit});"
                     " voting and campaigning again once this Ready is durable")

    def _handle_append(self, m: Message) -> None:
        log = self.log
        if m.index < log.committed:
            self._send(Message(MT.APPEND_RESP, m.frm, self.id, self.term, index=log.committed))
            self._note_leader_commit(m.commit)
            self._maybe_finish_recovery()
            return
        try:
            last_new = log.maybe_append(m.index, m.log_term, m.commit, m.entries)
        except LogInvariantError:
            self.dropped["append_conflicts_with_commit"] += 1
            return
        if last_new is not None:
            self._send(Message(MT.APPEND_RESP, m.frm, self.id, self.term, index=last_new))
            self._note_leader_commit(m.commit)
            self._maybe_finish_recovery()
            return
        # Fast back-off (§5.3): point the leader at the last index whose term could match.
        hint = log.find_conflict_by_term(min(m.index, log.last_index()), m.log_term)
        self._send(Message(MT.APPEND_RESP, m.frm, self.id, self.term, index=m.index, reject=True,
                           reject_hint=hint, log_term=log.term_or_zero(hint)))

    def _handle_snapshot(self, m: Message) -> None:
        snap = m.snapshot
        assert snap is not None
        idx, term = snap.metadata.index, snap.metadata.term
        cs = snap.metadata.conf_state
        if idx > self.log.committed and not _in_conf_state(cs, self.id):
            # etcd's restore: a configuration without us would leave us with no progress entry
            # and no say. Refuse, answering with our own position; the leader waits for a
            # snapshot that includes us (see _send_snapshot).
            self.dropped["snapshot_excludes_self"] += 1
            self._send(Message(MT.APPEND_RESP, m.frm, self.id, self.term, index=self.log.committed))
            return
        if idx <= self.log.committed:
            self._send(Message(MT.APPEND_RESP, m.frm, self.id, self.term, index=self.log.committed))
        elif self.log.match_term(idx, term):
            # We already hold the entries: just fast-forward commit.
            self.log.commit_to(idx)
            self._send(Message(MT.APPEND_RESP, m.frm, self.id, self.term, index=self.log.committed))
        else:
            self.log.restore(snap)
            self._install_conf_state(cs)
            self._send(Message(MT.APPEND_RESP, m.frm, self.id, self.term,
                               index=self.log.last_index()))
        # A leader's SNAPSHOT carries its commit index (``commit``), which may exceed the
        # snapshot's: a recovering node must reach that, not only the snapshot.
        self._note_leader_commit(max(m.commit, idx))
        self._maybe_finish_recovery()

    # ------------------------------------------------------------------------------------
    # the leader

    def _step_leader(self, m: Message) -> None:
        t = m.type
        if t is MT.APPEND_RESP:
            self._handle_append_response(m)
        elif t is MT.HEARTBEAT_RESP:
            self._handle_heartbeat_response(m)
        elif t is MT.READ_INDEX:
            self._leader_read(m.context, m.frm)
        elif t is MT.TRANSFER_LEADER:
            why = self._leader_transfer(m.index)
            if why:
                self.dropped["transfer_" + why] += 1
        else:
            self.dropped["leader_ignored_" + t.name.lower()] += 1

    def _handle_append_response(self, m: Message) -> None:
        pr = self.trk.progress[m.frm]
        pr.recent_active = True
        if m.index > self.log.last_index():
            self.dropped["malformed_append_resp"] += 1
            return
        if m.reject:
            self._handle_append_rejection(m, pr)
            return
        was_paused = pr.is_paused()
        if not pr.maybe_update(m.index) and not (
                pr.state is ProgressState.PROBE and pr.match == m.index):
            # (A probe answered at exactly ``match`` -- e.g. the empty APPEND a heartbeat
            # response sends to a caught-up follower in PROBE -- goes on: it restores
            # REPLICATE, as in etcd-io/raft #52.)
            return
        if pr.state is ProgressState.PROBE:
            pr.become_replicate()
        elif pr.state is ProgressState.SNAPSHOT:
            if pr.match + 1 >= self.log.first_index():
                pr.become_probe()
                pr.become_replicate()
        else:
            pr.inflights.free_le(m.index)
        if self._maybe_commit() and self.cfg.commit_broadcast:
            self._bcast_append()
        elif was_paused:
            self._send_append(m.frm)
        while self._send_append(m.frm, send_if_empty=False):
            pass
        if m.frm == self.lead_transferee and pr.match == self.log.last_index():
            self._send(Message(MT.TIMEOUT_NOW, m.frm, self.id, self.term))
        self._maybe_finish_leaving()

    def _handle_append_rejection(self, m: Message, pr: Progress) -> None:
        probe = m.reject_hint
        if m.log_term > 0:
            probe = self.log.find_conflict_by_term(m.reject_hint, m.log_term)
        if m.index <= pr.match and pr.state is not ProgressState.SNAPSHOT:
            self._follower_below_match(m, pr, probe)
            return
        if pr.maybe_decr_to(m.index, probe):
            if pr.state is ProgressState.REPLICATE:
                pr.become_probe()
            self._send_append(m.frm)

    def _follower_below_match(self, m: Message, pr: Progress, probe: int) -> None:
        """A rejection at or below what the follower acknowledged: a stale message, or a
        follower that lost its disk. One probe at ``match`` tells them apart (issue 17)."""
        if pr.state is ProgressState.REPLICATE:
            self.dropped["append_rejected_below_match"] += 1
            pr.become_probe()
            self._send_append(m.frm)
            return
        if m.index != pr.next - 1:
            return  # not an answer to the probe we are waiting for: stale
        old_match = pr.match
        pr.regress(m.index, probe)
        self._notice("follower_log_behind_match",
                     f"follower {m.frm} rejected index {m.index}, which it had acknowledged; "
                     f"its log ends at or before {m.reject_hint}: it lost entries (wiped or "
                     f"restored disk?) or this was a stale rejection. Its match {old_match} is "
                     f"forgotten; repairing it from index {pr.next} (a snapshot if compacted)")
        self._send_append(m.frm)

    def _handle_heartbeat_response(self, m: Message) -> None:
        pr = self.trk.progress[m.frm]
        pr.recent_active = True
        pr.probe_sent = False
        if pr.state is ProgressState.REPLICATE and pr.inflights.full():
            # Every APPEND in flight may have been lost: free one slot so that a message goes
            # out; if the follower lacks its predecessor it rejects and we fall back to probing.
            pr.inflights.free_first()
        elif pr.state is ProgressState.SNAPSHOT:
            pr.snapshot_wait += 1
            if pr.snapshot_wait > _SNAPSHOT_WAIT_HEARTBEATS * self.cfg.election_tick:
                # The follower is alive but never acknowledged the snapshot (lost, and the
                # driver did not report_snapshot): presume it failed and probe again.
                self.dropped["snapshot_presumed_lost"] += 1
                pr.pending_snapshot = 0
                pr.become_probe()
        if pr.match < self.log.last_index() or pr.state is ProgressState.PROBE:
            # In PROBE even a caught-up follower gets an (empty) APPEND: its answer moves it
            # back to REPLICATE (etcd-io/raft #52) instead of waiting for the next proposal.
            self._send_append(m.frm)
        if not m.context:
            return
        acks = self.read_only.recv_ack(m.frm, m.context)
        if acks is None:
            return
        votes = dict.fromkeys(acks, True)
        if quorum.joint_vote_result(self.trk.voters, self.trk.voters_outgoing,
                                    votes) is quorum.VoteResult.WON:
            for rs in self.read_only.advance(m.context):
                self._answer_read(rs.index, rs.context, rs.origin)

    def _maybe_commit(self) -> bool:
        """Commit what a quorum persisted, if it is of our term (§5.4.2)."""
        if not self.log.maybe_commit(self.trk.committed(), self.term):
            return False
        if self._deferred_reads:
            deferred, self._deferred_reads = self._deferred_reads, []
            for ctx, origin in deferred:
                self._leader_read(ctx, origin)
        return True

    def _committed_in_term(self) -> bool:
        return self.log.term_or_zero(self.log.committed) == self.term

    # ---- sending ------------------------------------------------------------------------

    def _send(self, m: Message) -> None:
        self.msgs.append(m)

    def _send_append(self, to: int, send_if_empty: bool = True) -> bool:
        """Send the next APPEND (or a snapshot) to ``to`` if flow control allows."""
        pr = self.trk.progress[to]
        if pr.is_paused():
            return False
        log = self.log
        prev = pr.next - 1
        try:
            prev_term = log.term(prev)
            ents = log.entries_from(pr.next, self.cfg.max_size_per_msg) \
                if pr.next <= log.last_index() else []
        except Compacted:
            return self._send_snapshot(to, pr)
        except Unavailable:  # cannot happen if progress is consistent; recover by probing
            self.dropped["progress_beyond_log"] += 1
            pr.become_probe()
            pr.next = min(pr.next, log.last_index() + 1)
            return False
        if not ents and not send_if_empty:
            return False
        self.msgs.append(Message(MT.APPEND, to, self.id, self.term, prev_term, prev,
                                 tuple(ents), log.committed))
        pr.sent_entries(prev + len(ents), len(ents))
        return True

    def _send_snapshot(self, to: int, pr) -> bool:
        if not pr.recent_active:
            self.dropped["snapshot_to_inactive_peer"] += 1
            return False
        try:
            snap = self.log.snapshot()
        except Unavailable:
            return False  # storage is building one; retry on the next heartbeat
        if snap.metadata.index == 0:
            return False
        if not _in_conf_state(snap.metadata.conf_state, to):
            # It would refuse it (it predates the change that added it): wait, probing on each
            # heartbeat, for the driver's next snapshot, which must include it.
            if self._excluded_snapshot_noticed.get(to) == snap.metadata.index:
                self.dropped["snapshot_excludes_peer"] += 1
            else:
                self._excluded_snapshot_noticed[to] = snap.metadata.index
                self._notice("snapshot_excludes_peer",
                             f"node {to} needs a snapshot, but the latest one (index "
                             f"{snap.metadata.index}) predates its addition and it would refuse "
                             "it: take a new snapshot (a driver that compacts its log must "
                             "snapshot after applying a change that adds a member)")
            return False
        self._send(Message(MT.SNAPSHOT, to, self.id, self.term, snapshot=snap,
                           commit=self.log.committed))
        pr.become_snapshot(snap.metadata.index)
        return True

    def _bcast_append(self) -> None:
        for i in self.trk.progress:
            if i != self.id:
                self._send_append(i)

    def _bcast_heartbeat(self, ctx: bytes) -> None:
        committed = self.log.committed
        for i, pr in self.trk.progress.items():
            if i != self.id:
                self._send(Message(MT.HEARTBEAT, i, self.id, self.term,
                                   commit=min(pr.match, committed), context=ctx))

    # ------------------------------------------------------------------------------------
    # proposals

    def _check_can_propose(self) -> None:
        if self.role is not Role.LEADER:
            raise ProposalDropped(f"node {self.id} is not the leader ({self.role.value})",
                                  self.leader_id)
        if self.lead_transferee:
            raise ProposalDropped(f"leadership is being transferred to {self.lead_transferee}",
                                  self.lead_transferee)
        if self.leaving:
            raise ProposalDropped(f"node {self.id} is leaving the configuration and hands over "
                                  "leadership", 0)

    def propose(self, data: bytes) -> None:
        """Append ``data`` as a NORMAL entry (leader only; otherwise ProposalDropped)."""
        self.propose_batch((data,))

    def propose_batch(self, datas: list[bytes] | tuple[bytes, ...]) -> None:
        """Append several NORMAL entries at once (an addition to the contract, for speed)."""
        self._check_can_propose()
        if not datas:
            return
        limit = self.cfg.max_uncommitted_entries_size
        if limit:
            size = sum(map(len, datas))
            if self.uncommitted_size and self.uncommitted_size + size > limit:
                raise ProposalDropped(f"{self.uncommitted_size} bytes are uncommitted (limit "
                                      f"{limit}); slow down", self.id)
            self.uncommitted_size += size
        term, i = self.term, self.log.last_index()
        self._append_entries([Entry(term, i + k, NORMAL, d) for k, d in enumerate(datas, 1)])

    def _append_entries(self, ents: list[Entry]) -> None:
        self.log.append(ents)
        # Replication is sent when the driver next asks for a Ready, so that many propose()
        # calls in a row share APPEND messages. Our own match advances only once the Ready
        # carrying ``ents`` is persisted (advance()).
        self._replicate_pending = True

    def _flush_replication(self) -> None:
        self._replicate_pending = False
        if self.role is not Role.LEADER:
            return
        for i in self.trk.progress:
            if i != self.id:
                while self._send_append(i, send_if_empty=False):
                    pass

    def propose_conf_change(self, cc: ConfChange) -> None:
        """Propose a membership change. One at a time; only after the leader has committed
        an entry of its own term (the single-server-change fix, Ongaro's raft-dev post)."""
        self._check_can_propose()
        if self.pending_conf_index > self.log.applied:
            raise ProposalDropped(f"a configuration change at index {self.pending_conf_index} "
                                  f"is not applied yet (applied {self.log.applied})", self.id)
        if not self._committed_in_term():
            raise ProposalDropped("the leader has not committed an entry of its term yet",
                                  self.id)
        try:
            new = apply_change(self._member_config(), cc)
        except ConfChangeError as exc:
            raise LocalProtocolError(f"invalid configuration change {cc}: {exc}") from None
        self._append_conf_change(cc)
        if self.id not in new.voters:
            # We are leaving: append nothing after this change, so that once it applies our
            # log is no longer than that of the new voters holding it (they stay electable).
            self.leaving = True

    def _append_conf_change(self, cc: ConfChange) -> None:
        idx = self.log.last_index() + 1
        self._append_entries([Entry(self.term, idx, EntryType.CONF_CHANGE, encode_conf_change(cc))])
        self.pending_conf_index = idx

    # ------------------------------------------------------------------------------------
    # membership

    def _member_config(self) -> MemberConfig:
        t = self.trk
        return MemberConfig(t.voters, t.voters_outgoing, t.learners, t.learners_next, t.auto_leave)

    def _install_conf_state(self, cs: ConfState) -> None:
        self.trk.set_config(cs.voters, cs.voters_outgoing, cs.learners, cs.learners_next,
                            cs.auto_leave, self.log.last_index() + 1)

    def apply_conf_change(self, cc: ConfChange) -> ConfState:
        """Apply a committed CONF_CHANGE entry (the driver calls this while applying it).
        An invalid change is skipped identically on every node and counted.

        Raises LocalProtocolError on a node that never had a configuration: a joining node
        must start from the cluster's bootstrap ConfState (its storage), or from a snapshot,
        else it would take a change such as "add 4" for the whole membership."""
        if not self.trk.voters and not self.trk.voters_outgoing:
            raise LocalProtocolError(
                f"node {self.id} has no base configuration to apply {cc} to: start a joining "
                "node with the cluster's bootstrap ConfState in its storage")
        try:
            new = apply_change(self._member_config(), cc)
        except ConfChangeError:
            self.dropped["conf_change_rejected"] += 1
            return self.trk.conf_state()
        self.trk.set_config(new.voters, new.voters_outgoing, new.learners, new.learners_next,
                            new.auto_leave, self.log.last_index() + 1)
        if self.role is Role.LEADER:
            if self.lead_transferee and not self.trk.is_voter(self.lead_transferee):
                self.lead_transferee = 0
            if not self.trk.is_voter(self.id):
                # Removed or demoted: keep leading (taking no proposals) until the new voters
                # hold our whole log -- else the most up-to-date log could sit on a node that
                # can no longer campaign, and no election would succeed.
                self.leaving = True
            self._maybe_commit()
            self._bcast_append()
            self._maybe_finish_leaving()
        return self.trk.conf_state()

    def _tail_removes_self(self) -> bool:
        """Does a not-yet-applied conf change in our log remove us from the voters? (Then a
        new leader must take no proposals either; see propose_conf_change.)"""
        log = self.log
        lo = max(log.applied + 1, log.first_index())
        try:
            tail = log.slice(lo, log.last_index() + 1)
        except (Compacted, Unavailable):
            return False
        cfg = self._member_config()
        for e in tail:
            if e.type is EntryType.CONF_CHANGE:
                try:
                    cfg = apply_change(cfg, decode_conf_change(e.data))
                except (ConfChangeError, ValueError):
                    continue
        return self.id not in cfg.voters

    def _maybe_finish_leaving(self) -> None:
        """Once our removal is applied: step down when every new voter has our last entry,
        or after an election timeout (safe then: nothing follows the removal in our log)."""
        if not self.leaving or self.trk.is_voter(self.id):
            return
        last = self.log.last_index()
        prs = self.trk.progress
        caught_up = all(prs[i].match >= last for i in self.trk.all_voters() if i in prs)
        if caught_up or self._leaving_elapsed >= self.cfg.election_tick:
            self._become_follower(self.term, 0)

    # ------------------------------------------------------------------------------------
    # reads and leadership transfer

    def read_index(self, context: bytes) -> None:
        """Request a linearizable read; the answer is a ReadState with this ``context``."""
        if self.role is Role.LEADER:
            self._leader_read(context, self.id)
        elif self.leader_id:
            self._send(Message(MT.READ_INDEX, self.leader_id, self.id, self.term, context=context))
        else:
            raise ProposalDropped("no leader known for a ReadIndex request", 0)

    def _leader_read(self, ctx: bytes, origin: int) -> None:
        if not self._committed_in_term():
            # Our commit index may lag until an entry of our term commits (thesis §6.4).
            if len(self._deferred_reads) >= self.cfg.max_pending_read_index:
                self._refuse_read(ctx, origin, "read_index_queue_full")
            else:
                self._deferred_reads.append((ctx, origin))
            return
        if self.trk.is_singleton():
            self._answer_read(self.log.committed, ctx, origin)
            return
        if self.read_only.full():
            self._refuse_read(ctx, origin, "read_index_queue_full")
            return
        if not self.read_only.add(self.log.committed, ctx, origin):
            self.dropped["read_index_duplicate_context"] += 1
            return
        self.read_only.recv_ack(self.id, ctx)
        self._bcast_heartbeat(ctx)

    def _refuse_read(self, ctx: bytes, origin: int, reason: str) -> None:
        self.dropped[reason] += 1
        if origin == self.id:
            raise ProposalDropped("too many ReadIndex requests are pending", self.id)
        self._send(Message(MT.READ_INDEX_RESP, origin, self.id, self.term, reject=True,
                           context=ctx))

    def _answer_read(self, index: int, ctx: bytes, origin: int) -> None:
        if origin == self.id:
            self.read_states.append(ReadState(index, ctx))
        else:
            self._send(Message(MT.READ_INDEX_RESP, origin, self.id, self.term, index=index,
                               context=ctx))

    def transfer_leadership(self, to: int) -> None:
        """Hand leadership to voter ``to`` (TimeoutNow once it is caught up). A follower
        forwards the request to its leader."""
        if self.role is not Role.LEADER:
            if not self.leader_id:
                raise ProposalDropped("no leader known to transfer leadership from", 0)
            self._send(Message(MT.TRANSFER_LEADER, self.leader_id, self.id, self.term, index=to))
            return
        why = self._leader_transfer(to)
        if why:
            raise LocalProtocolError(f"cannot transfer leadership to {to}: {why}")

    def _leader_transfer(self, to: int) -> str:
        pr = self.trk.progress.get(to)
        if pr is None:
            return "not_a_member"
        if pr.is_learner:
            return "learner"
        if to == self.id or to == self.lead_transferee:
            return ""
        self.election_elapsed = 0  # the transfer must finish within one election timeout
        self.lead_transferee = to
        if pr.match == self.log.last_index():
            self._send(Message(MT.TIMEOUT_NOW, to, self.id, self.term))
        else:
            self._send_append(to)
        return ""

    # ------------------------------------------------------------------------------------
    # driver feedback

    def report_unreachable(self, peer: int) -> None:
        """The transport failed to deliver to ``peer``: stop pipelining to it."""
        pr = self.trk.progress.get(peer)
        if self.role is Role.LEADER and pr is not None and pr.state is ProgressState.REPLICATE:
            pr.become_probe()

    def report_disconnected(self, peer: int) -> None:
        """The transport saw ``peer``'s connection to this node end: its process exited (the
        kernel closes a killed process's sockets) or it dropped the link. An addition to
        etcd's API. If ``peer`` is this follower's leader, the follower forgets it -- no
        leader lease is left to protect -- and times out within a few ticks rather than a
        whole election timeout, so a killed leader is replaced at once however long the
        timeout is (and heartbeats may be rare). Staggered by the follower's place among the
        other voters, two ticks apart, so the first one's PreVote finds the others already
        without a lease and no vote is split. Safety never rests on timing: a leader that is
        alive after all keeps the others' leases (their links are up), so the PreVote fails
        and its next heartbeat brings the follower back; at worst an election happens early."""
        if self.role is not Role.FOLLOWER or peer == self.id or peer != self.leader_id:
            return
        self.dropped["leader_disconnected"] += 1
        self.leader_id = 0
        others = [v for v in self.trk.all_voters() if v != peer]  # sorted
        place = others.index(self.id) if self.id in others else len(others)
        self.election_elapsed = max(self.election_elapsed,
                                    self.randomized_election_timeout - 1 - 2 * place)

    def report_reachable(self, peer: int) -> None:
        """The transport (re)connected with ``peer``. A leader heartbeats it now instead of at
        its next heartbeat tick, so a follower that restarted learns the leader, and answers
        with how far behind it is, one heartbeat interval sooner (an addition to etcd's API)."""
        pr = self.trk.progress.get(peer)
        if self.role is Role.LEADER and pr is not None and peer != self.id:
            self._send(Message(MT.HEARTBEAT, peer, self.id, self.term,
                               commit=min(pr.match, self.log.committed),
                               context=self.read_only.last_pending_context()))

    def report_snapshot(self, peer: int, ok: bool) -> None:
        """The snapshot sent to ``peer`` was delivered (ok) or failed."""
        pr = self.trk.progress.get(peer)
        if self.role is not Role.LEADER or pr is None or pr.state is not ProgressState.SNAPSHOT:
            return
        if not ok:
            pr.pending_snapshot = 0
        pr.become_probe()
        pr.probe_sent = True  # wait for the follower's answer or the next heartbeat

    # ------------------------------------------------------------------------------------
    # Ready / advance

    def has_ready(self) -> bool:
        if self.msgs or self.read_states or self._dropped_reads or self._notices:
            return True
        u = self.log.unstable
        if u.entries or u.snapshot is not None:
            return True
        if self.log.committed > self.log.applied and self.log.has_next_committed_entries():
            return True
        if self.term != self._prev_hs.term or self.vote != self._prev_hs.vote \
                or self.log.committed != self._prev_hs.commit:
            return True
        return self.leader_id != self._prev_ss.leader_id or self.role is not self._prev_ss.role

    def take_messages(self, types: frozenset[MT]) -> list[Message]:
        """Remove and return the pending messages of ``types``, ahead of the next Ready.

        For a driver whose previous Ready is still being persisted: heartbeats and their
        answers depend on nothing but the term (and vote) being durable, so a driver that
        knows they are may send them at once instead of after a slow fsync (an election
        timeout without them elects a new leader nobody asked for)."""
        taken = [m for m in self.msgs if m.type in types]
        if taken:
            self.msgs = [m for m in self.msgs if m.type not in types]
        return taken

    def ready(self) -> Ready:
        """The work to do now. Call ``advance(ready)`` before the next ``ready()``."""
        if self._outstanding is not None:
            raise LocalProtocolError("ready() called again before advance() of the previous Ready")
        if self._replicate_pending:
            self._flush_replication()
        ss = SoftState(self.leader_id, self.role)
        hs = HardState(self.term, self.vote, self.log.committed)
        rd = Ready(
            soft_state=ss if ss != self._prev_ss else None,
            hard_state=hs if hs != self._prev_hs else None,
            entries=self.log.unstable_entries(),
            snapshot=self.log.unstable.snapshot,
            committed_entries=self.log.next_committed_entries(),
            messages=self.msgs,
            read_states=self.read_states,
            dropped_reads=self._dropped_reads,
            notices=self._notices,
        )
        self.msgs, self.read_states, self._dropped_reads, self._notices = [], [], [], []
        self._prev_ss = ss
        self._outstanding = rd
        return rd

    def advance(self, rd: Ready) -> None:
        """The driver persisted, sent and applied ``rd``."""
        if rd is not self._outstanding:
            raise LocalProtocolError("advance() takes the Ready returned by the last ready()")
        self._outstanding = None
        if rd.hard_state is not None:
            self._prev_hs = rd.hard_state
        log = self.log
        if rd.snapshot is not None:
            idx = rd.snapshot.metadata.index
            log.stable_snap_to(idx)
            log.applied = max(log.applied, idx)
        if rd.entries:
            last = rd.entries[-1]
            log.stable_to(last.index, last.term)
        if rd.committed_entries:
            log.applied_to(rd.committed_entries[-1].index)
            if self.cfg.max_uncommitted_entries_size and self.role is Role.LEADER:
                done = sum(len(e.data) for e in rd.committed_entries)
                self.uncommitted_size = max(0, self.uncommitted_size - done)
        if self.role is Role.LEADER:
            self._leader_after_advance()

    def _leader_after_advance(self) -> None:
        pr = self.trk.progress.get(self.id)
        if pr is not None and pr.maybe_update(min(self.log.persisted, self.log.last_index())):
            if self._maybe_commit() and self.cfg.commit_broadcast:
                self._bcast_append()
        t = self.trk
        if t.joint and t.auto_leave and self.pending_conf_index <= self.log.applied \
                and not self.lead_transferee:
            # Leave the joint configuration automatically once it is applied.
            self._append_conf_change(ConfChange(()))

    # ------------------------------------------------------------------------------------
    # invariants (tests call this after every event)

    def check_invariants(self) -> None:
        log = self.log
        assert 0 <= log.applied <= log.committed <= log.last_index(), \
            (log.applied, log.committed, log.last_index())
        assert (self.role is Role.LEADER) == (self.leader_id == self.id), (self.role, self.leader_id)
        if self.role in (Role.LEADER, Role.CANDIDATE):
            assert self.vote == self.id, (self.role, self.vote)
        if self.recovering:
            assert self.role is Role.FOLLOWER, ("a recovering node campaigned", self.role)
        if self.role is Role.LEADER:
            for i, pr in self.trk.progress.items():
                assert pr.match <= log.last_index(), (i, pr)
                assert pr.match < pr.next, (i, pr)
