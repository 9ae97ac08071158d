"""The Raft protocol as one deterministic state machine (Raft thesis; etcd's raft.go).

Inputs are `tick()`, `step(message)` and the local requests (`propose`, `read_index`,
`transfer_leadership`, `compact`); outputs are collected into a `Ready`. Bad or stale
input from the network is counted and dropped, never raised: a peer cannot crash us.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from collections.abc import Sequence

from dtfd.raft import quorum
from dtfd.raft.config import Config
from dtfd.raft.log import RaftLog
from dtfd.raft.messages import (
    NONE,
    ConfState,
    Entry,
    EntryKind,
    HardState,
    Message,
    MessageType,
    NodeId,
    PersistedState,
    Snapshot,
    SnapshotChunk,
    SnapshotMeta,
)
from dtfd.raft.progress import Progress, ProgressState
from dtfd.raft.read_only import ReadOnly, ReadRequest
from dtfd.raft.ready import NotLeader, PeerProgress, Proposed, ReadState, Ready, Refused, Role, Status

T = MessageType
TRANSFER_CONTEXT = b"transfer"  # on VOTE: the leader asked for this election, ignore leases
LEADER_MESSAGES = frozenset({T.APPEND, T.HEARTBEAT, T.SNAPSHOT})
EARLY = LEADER_MESSAGES | {T.TIMEOUT_NOW}  # a leader's messages that do not depend on its own disk
RESPONSES = frozenset({T.VOTE_RESP, T.PRE_VOTE_RESP, T.APPEND_RESP, T.HEARTBEAT_RESP, T.SNAPSHOT_RESP})


class Raft:
    def __init__(self, config: Config, persisted: PersistedState | None = None) -> None:
        self.config = config
        self.id = config.id
        self._bugs = config.planted_bugs
        persisted = persisted or PersistedState()
        snapshot = persisted.snapshot
        conf = snapshot.meta.conf if snapshot else ConfState(config.voters, config.learners)
        self.voters: tuple[NodeId, ...] = conf.voters
        self.learners: tuple[NodeId, ...] = conf.learners
        self._members = frozenset(self.voters + self.learners)
        self.log = RaftLog(snapshot.meta if snapshot else None, persisted.entries, persisted.hard_state.commit)
        self.snapshot: Snapshot | None = snapshot
        self.term = persisted.hard_state.term
        self.vote = persisted.hard_state.vote
        self._persisted_hs = persisted.hard_state
        self.leader: NodeId = NONE
        self.role = Role.FOLLOWER
        self.transferee: NodeId = NONE
        self.progress: dict[NodeId, Progress] = {}
        self.dropped: Counter[str] = Counter()
        self._votes: dict[NodeId, bool] = {}
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._timeout = config.election_min
        self._msgs: list[Message] = []
        self._read_states: list[ReadState] = []
        self._read_only = ReadOnly()
        self._reads_waiting: list[tuple[bytes, NodeId]] = []
        self._incoming: tuple[SnapshotMeta, bytearray] | None = None
        self._append_due = False
        self._commit_due = False  # followers have not been sent the commit index yet
        self._outstanding = False
        self.rejoining = config.rejoin_term > 0
        self._become_follower(self.term, NONE)

    # ---- local requests -------------------------------------------------

    def tick(self) -> None:
        if self.role is Role.LEADER:
            self._tick_leader()
        else:
            self._tick_election()

    def propose(self, data: bytes) -> Proposed | NotLeader | Refused:
        return self.propose_batch((data,))

    def propose_batch(self, items: Sequence[bytes]) -> Proposed | NotLeader | Refused:
        """Append commands at the leader; they are sent to followers with the next Ready."""
        if self.role is not Role.LEADER:
            return NotLeader(self.leader)
        if self.transferee:
            return Refused(f"leadership transfer to {self.transferee} in progress")
        if not items:
            return Refused("empty proposal")
        first = self.log.last_index + 1
        self._append([Entry(self.term, first + n, EntryKind.NORMAL, data) for n, data in enumerate(items)])
        return Proposed(first, self.log.last_index, self.term)

    def read_index(self, context: bytes) -> NotLeader | None:
        """Ask for a linearizable read point; it arrives as a ReadState in a later Ready."""
        if self.role is Role.LEADER:
            self._leader_read(context, self.id)
            return None
        if not self.leader:
            return NotLeader(NONE)
        self._send(T.READ_INDEX, self.leader, context=context)
        return None

    def transfer_leadership(self, to: NodeId) -> NotLeader | Refused | None:
        if self.role is not Role.LEADER:
            return NotLeader(self.leader)
        if to == self.id:
            return Refused(f"{to} already leads")
        if to not in self.voters:
            return Refused(f"{to} is not a voting member")
        if self.transferee == to:
            return None
        self.transferee = to
        self._election_elapsed = 0  # the transfer gets one election timeout
        if self.progress[to].match == self.log.last_index:
            self._send(T.TIMEOUT_NOW, to)
        else:
            self._send_append(to)
        return None

    def step_down(self) -> NotLeader | None:
        """Stop leading, staying in this term: for a stale leader that cannot see the newer one.

        Always safe: a leader may become a follower at any time; it only costs availability.
        """
        if self.role is not Role.LEADER:
            return NotLeader(self.leader)
        self._become_follower(self.term, NONE)
        return None

    def send_snapshot(self, to: NodeId) -> NotLeader | Refused | None:
        """Catch a follower up from the latest snapshot instead of entry by entry (a slow follower).

        Its unpersisted backlog is replaced by the snapshot, which holds only committed state.
        """
        if self.role is not Role.LEADER:
            return NotLeader(self.leader)
        pr = self.progress.get(to)
        if pr is None or to == self.id:
            return Refused(f"{to} is not a follower of this leader")
        if self.snapshot is None or self.snapshot.meta.index <= pr.match:
            return Refused(f"no snapshot beyond {to}'s match index {pr.match}: compact first")
        pr.become_snapshot(self.snapshot.meta.index)
        self._send_snapshot_chunk(to, pr)
        return None

    def set_timing(self, heartbeat: int, election_min: int, election_max: int) -> None:
        """Change timeouts (in ticks) at run time; they apply from the next timer reset."""
        self.config = dataclasses.replace(
            self.config, heartbeat=heartbeat, election_min=election_min, election_max=election_max
        )

    def compact(self, index: int, data: bytes, digest: str = "") -> Snapshot:
        """Take the state machine's image at an applied index and drop the log behind it.

        `digest` is the image's SHA-256 if the driver has it (hashed off its event loop).
        """
        term = self.log.term(index)
        self.log.compact(index)
        meta = SnapshotMeta(
            index=index,
            term=term or 0,
            conf=ConfState(self.voters, self.learners),
            digest=digest or hashlib.sha256(data).hexdigest(),
            size=len(data),
        )
        self.snapshot = Snapshot(meta, data)
        return self.snapshot

    # ---- Ready ------------------------------------------------------------

    def has_ready(self) -> bool:
        self._flush_appends()
        log = self.log
        return bool(
            self._msgs
            or self._read_states
            or log.pending_snapshot
            or log.stable < log.last_index
            or log.committed > max(log.applying, log.snapshot_index)
            or self._hard_state_changed()
        )

    def ready(self) -> Ready:
        if self._outstanding:
            raise RuntimeError("advance() the previous Ready before asking for the next")
        self._flush_appends()
        log = self.log
        hard_state = self._hard_state()
        snapshot = log.pending_snapshot
        messages, early = self._msgs, 0
        durable = self._persisted_hs
        if self.role is Role.LEADER and (durable.term, durable.vote) == (hard_state.term, hard_state.vote):
            # Raft thesis 10.2.1: with term and vote already durable (a candidate's votes go out
            # only after they are, so a leader's always are, but this is the condition that
            # makes it safe), the leader may replicate while it writes its own log: it counts
            # itself toward commit only once that log is stable.
            first = [m for m in messages if m.type in EARLY]
            messages, early = first + [m for m in messages if m.type not in EARLY], len(first)
        rd = Ready(
            hard_state=hard_state if hard_state != self._persisted_hs else None,
            entries=log.unstable_entries(),
            snapshot=snapshot,
            messages=tuple(messages),
            early=early,
            committed=log.next_committed(),
            read_states=tuple(self._read_states),
            leader=self.leader,
            role=self.role,
        )
        self._msgs = []
        self._read_states = []
        self._persisted_hs = hard_state
        log.pending_snapshot = None
        if rd.committed:
            log.applying = rd.committed[-1].index
        self._outstanding = True
        return rd

    def advance(self, rd: Ready) -> None:
        log = self.log
        if rd.snapshot:
            log.applied = max(log.applied, rd.snapshot.meta.index)
        if rd.entries:
            last = rd.entries[-1]
            log.stable_to(last.index, last.term)
        if rd.committed:
            log.applied = max(log.applied, rd.committed[-1].index)
        self._outstanding = False
        if self.role is Role.LEADER and self.progress[self.id].maybe_update(min(log.stable, log.last_index)):
            self._maybe_commit()

    def status(self) -> Status:
        progress = {}
        if self.role is Role.LEADER:
            progress = {
                peer: PeerProgress(pr.match, pr.next, pr.state.value, pr.recent_active, pr.learner)
                for peer, pr in self.progress.items()
            }
        return Status(
            id=self.id,
            role=self.role,
            term=self.term,
            vote=self.vote,
            leader=self.leader,
            commit=self.log.committed,
            applied=self.log.applied,
            first_index=self.log.first_index,
            last_index=self.log.last_index,
            snapshot_index=self.log.snapshot_index,
            transferee=self.transferee,
            rejoining=self.rejoining,
            progress=progress,
            dropped=dict(self.dropped),
        )

    # ---- messages ---------------------------------------------------------

    def step(self, m: Message) -> None:
        if not self._well_formed(m):
            return
        if m.term > self.term:
            if m.type in (T.VOTE, T.PRE_VOTE) and m.context != TRANSFER_CONTEXT and self._in_lease():
                self.dropped["vote_in_lease"] += 1
                return
            if m.type is T.PRE_VOTE or (m.type is T.PRE_VOTE_RESP and not m.reject):
                pass  # a pre-vote is about a future term; it must not move ours
            else:
                self._become_follower(m.term, m.src if m.type in LEADER_MESSAGES else NONE)
        elif m.term < self.term:
            if m.type in (T.APPEND, T.HEARTBEAT):
                self._send(T.APPEND_RESP, m.src)  # tell a stale leader about the newer term
            elif m.type is T.PRE_VOTE:
                self._send(T.PRE_VOTE_RESP, m.src, reject=True)
            elif not (m.type is T.VOTE_RESP and "accept_stale_vote" in self._bugs):
                self.dropped["stale_term"] += 1
                return
            if m.type is not T.VOTE_RESP:
                return
        if m.type in (T.VOTE, T.PRE_VOTE):
            self._handle_vote_request(m)
        elif self.role is Role.LEADER:
            self._step_leader(m)
        elif self.role is Role.FOLLOWER:
            self._step_follower(m)
        else:
            self._step_candidate(m)

    def _well_formed(self, m: Message) -> bool:
        if m.dst != self.id:
            reason = "wrong_dst"
        elif m.src not in self._members or m.src == self.id:
            reason = "unknown_src"
        elif min(m.term, m.index, m.log_term, m.commit, m.hint_index, m.hint_term) < 0:
            reason = "malformed"
        elif m.type is T.APPEND and not _entries_fit(m):
            reason = "malformed"
        elif m.type is T.SNAPSHOT and not _chunk_fits(m.snapshot):
            reason = "malformed"
        else:
            return True
        self.dropped[reason] += 1
        return False

    def _in_lease(self) -> bool:
        """A follower that heard from a live leader recently refuses to help depose it.

        A live leader is heard every heartbeat, so a lease one heartbeat shorter than the
        election timeout still stops a disruptive rejoining node, while a candidate whose
        timeout fell near election_min is not refused by a peer whose timer runs a tick
        behind (which cost a whole second election round).
        """
        return (
            self.config.check_quorum
            and bool(self.leader)
            and self._election_elapsed < self.config.election_min - self.config.heartbeat
        )

    def _handle_vote_request(self, m: Message) -> None:
        pre = m.type is T.PRE_VOTE
        can_vote = (
            self.vote == m.src
            or (not self.vote and not self.leader)
            or (pre and m.term > self.term)
        )
        up_to_date = "vote_any_log" in self._bugs or self.log.is_up_to_date(m.index, m.log_term)
        response = T.PRE_VOTE_RESP if pre else T.VOTE_RESP
        if can_vote and up_to_date and m.src in self.voters and not self.rejoining:
            self._send(response, m.src, term=m.term)
            if not pre:
                self._election_elapsed = 0
                self.vote = m.src
            return
        self._send(response, m.src, reject=True)
        if (
            pre
            and not up_to_date
            and self.role is Role.FOLLOWER
            and self._promotable()
            and self._election_elapsed >= self.config.election_min
        ):
            # Someone timed out on the leader and we, too, have not heard from it for a whole
            # election timeout, but we hold more of the log: stand now rather than after our
            # own randomized timeout, which costs a second election round.
            self._campaign(pre=True, transfer=False)

    def _step_follower(self, m: Message) -> None:
        if m.type in LEADER_MESSAGES:
            self._election_elapsed = 0
            self.leader = m.src
            if m.type is T.APPEND:
                self._handle_append(m)
                if self.rejoining and m.term > self.config.rejoin_term and self.log.committed >= m.commit:
                    self.rejoining = False  # caught up with a leader of a term we never voted in
            elif m.type is T.HEARTBEAT:
                self.log.commit_to(min(m.commit, self.log.last_index))
                self._send(T.HEARTBEAT_RESP, m.src, context=m.context)
            else:
                self._handle_snapshot(m)
        elif m.type is T.TIMEOUT_NOW:
            if self._promotable():
                self._campaign(pre=False, transfer=True)
        elif m.type is T.READ_INDEX_RESP:
            self._read_states.append(ReadState(m.index, m.context))
        else:
            self.dropped["unexpected"] += 1

    def _step_candidate(self, m: Message) -> None:
        expected = T.PRE_VOTE_RESP if self.role is Role.PRE_CANDIDATE else T.VOTE_RESP
        if m.type in LEADER_MESSAGES:
            self._become_follower(m.term, m.src)
            self._step_follower(m)
        elif m.type is expected:
            self._votes[m.src] = not m.reject
            result = quorum.vote_result(self.voters, self._votes)
            if result is quorum.VoteResult.WON:
                if self.role is Role.PRE_CANDIDATE:
                    self._campaign(pre=False, transfer=False)
                else:
                    self._become_leader()
            elif result is quorum.VoteResult.LOST:
                self._become_follower(self.term, NONE)
        else:
            self.dropped["unexpected"] += 1

    def _step_leader(self, m: Message) -> None:
        pr = self.progress.get(m.src)
        if pr is None:
            self.dropped["unexpected"] += 1
            return
        if m.type in RESPONSES:
            pr.recent_active = True
        if m.rejoining and self._lost_entries(m, pr):
            pr.forget(m.commit, m.index if m.type is T.HEARTBEAT_RESP else m.hint_index)
            if m.type is T.APPEND_RESP:
                self._send_append(m.src)
                return
        if m.type is T.APPEND_RESP:
            self._handle_append_response(m, pr)
        elif m.type is T.HEARTBEAT_RESP:
            pr.probe_sent = False
            pr.free_one_if_full(self.config.max_inflight)  # appends may have been lost: let one more out
            if pr.state is ProgressState.SNAPSHOT:
                # Resend only a chunk unanswered for a whole heartbeat: resending on every one
                # doubled a busy link's load with duplicates of a chunk still on its way.
                if pr.chunk_unanswered:
                    self._send_snapshot_chunk(m.src, pr)
                else:
                    pr.chunk_unanswered = True
            elif pr.match < self.log.last_index:
                self._send_append(m.src)
            elif m.src == self.transferee:
                self._send(T.TIMEOUT_NOW, m.src)  # the first one may have been lost
            if m.context:
                self._confirm_read(m.context, m.src)
        elif m.type is T.SNAPSHOT_RESP:
            if pr.state is ProgressState.SNAPSHOT and m.hint_index == pr.pending_snapshot:
                pr.snapshot_offset = m.index
                self._send_snapshot_chunk(m.src, pr)
            else:
                self.dropped["stale_response"] += 1
        elif m.type is T.READ_INDEX:
            self._leader_read(m.context, m.src)
        elif m.type not in (T.VOTE_RESP, T.PRE_VOTE_RESP):  # late votes after winning are normal
            self.dropped["unexpected"] += 1

    @staticmethod
    def _lost_entries(m: Message, pr: Progress) -> bool:
        """A rejoining follower's log ends before the match index held for it (Raft assumes match never falls).

        From any other follower such a response is only a stale one, overtaken by a later acknowledgement.
        """
        if m.type is T.HEARTBEAT_RESP:
            return m.index < pr.match
        return m.type is T.APPEND_RESP and m.reject and m.index <= pr.match

    # ---- replication --------------------------------------------------------

    def _append(self, entries: list[Entry]) -> None:
        """The leader counts its own copy toward commit only once it is stable (see advance)."""
        self.log.append(entries)
        self._append_due = True

    def _flush_appends(self) -> None:
        """Send what proposals appended, once per Ready rather than once per proposal."""
        if self._append_due:
            self._append_due = False
            if self.role is Role.LEADER:
                self._broadcast_append()

    def _broadcast_append(self) -> None:
        self._commit_due = False
        for peer in self.progress:
            if peer != self.id:
                self._send_append(peer)

    def _send_append(self, to: NodeId) -> bool:
        pr = self.progress[to]
        if pr.paused(self.config.max_inflight):
            return False
        log = self.log
        prev = pr.next - 1
        prev_term = log.term(prev)
        if prev_term is None:
            if self.snapshot is None:
                self.dropped["no_snapshot_for_lagging_peer"] += 1
                return False
            pr.become_snapshot(self.snapshot.meta.index)
            self._send_snapshot_chunk(to, pr)
            return True
        entries = log.entries(pr.next, log.last_index + 1, self.config.max_entries_per_msg, self.config.max_bytes_per_msg)
        self._send(
            T.APPEND,
            to,
            index=prev,
            log_term=prev_term,
            entries=tuple(entries),
            commit=log.committed,
        )
        pr.sent(entries[-1].index if entries else prev)
        return True

    def _send_snapshot_chunk(self, to: NodeId, pr: Progress) -> None:
        snapshot = self.snapshot
        assert snapshot is not None
        meta = snapshot.meta
        if pr.pending_snapshot != meta.index:
            pr.become_snapshot(meta.index)  # a newer snapshot replaced the one in flight
        pr.chunk_unanswered = False
        offset = min(pr.snapshot_offset, meta.size)
        data = snapshot.data[offset : offset + self.config.snapshot_chunk]
        chunk = SnapshotChunk(meta, offset, data, offset + len(data) >= meta.size)
        self._send(T.SNAPSHOT, to, snapshot=chunk)

    def _handle_append(self, m: Message) -> None:
        log = self.log
        if m.index < log.committed:
            self._send(T.APPEND_RESP, m.src, index=log.committed)
            return
        last_new = log.maybe_append(m.index, m.log_term, m.commit, m.entries)
        if last_new is not None:
            self._send(T.APPEND_RESP, m.src, index=last_new)
            return
        hint = log.find_conflict_by_term(min(m.index, log.last_index), m.log_term)
        self._send(
            T.APPEND_RESP,
            m.src,
            index=m.index,
            reject=True,
            hint_index=hint,
            hint_term=log.term(hint) or 0,
        )

    def _handle_append_response(self, m: Message, pr: Progress) -> None:
        log = self.log
        if m.reject:
            match_hint = m.hint_index
            if m.hint_term > 0:
                match_hint = log.find_conflict_by_term(m.hint_index, m.hint_term)
            if pr.maybe_decr_to(m.index, min(match_hint, log.last_index)):
                if pr.state is ProgressState.REPLICATE:
                    pr.become_probe()
                self._send_append(m.src)
            else:
                self.dropped["stale_response"] += 1
            return
        if m.index > log.last_index:
            self.dropped["ack_beyond_last"] += 1
            return
        was_paused = pr.paused(self.config.max_inflight)
        if not pr.maybe_update(m.index):
            return
        if pr.state is ProgressState.PROBE:
            pr.become_replicate()
        elif pr.state is ProgressState.SNAPSHOT:
            if pr.match + 1 >= log.first_index:
                pr.become_probe()
        else:
            pr.free_to(m.index)
        self._maybe_commit()
        if was_paused:
            self._send_append(m.src)
        while pr.match < log.last_index and pr.state is ProgressState.REPLICATE and self._has_unsent(pr):
            if not self._send_append(m.src):
                break
        if m.src == self.transferee and pr.match == log.last_index:
            self._send(T.TIMEOUT_NOW, m.src)

    def _has_unsent(self, pr: Progress) -> bool:
        return pr.next <= self.log.last_index

    def _maybe_commit(self) -> None:
        """Advance the commit index by the quorum's match indexes.

        Followers learn a new commit index from the next append (the next proposal's, as a
        rule), or else at the next tick: not from appends of their own, which would put two
        sends (and two acknowledgements to read back) in front of every answer the leader
        gives: ~0.3 ms a sequential write here."""
        match = {v: self.progress[v].match for v in self.voters}
        index = quorum.committed_index(self.voters, match)
        if index <= self.log.committed:
            return
        if self.log.term(index) != self.term and "commit_old_term" not in self._bugs:
            return  # Raft Fig. 8: only entries of our own term commit by counting
        had_term_commit = self._committed_in_term()
        self.log.commit_to(index)
        self._commit_due = True
        if not had_term_commit and self._committed_in_term():
            waiting, self._reads_waiting = self._reads_waiting, []
            for context, origin in waiting:
                self._leader_read(context, origin)

    def _handle_snapshot(self, m: Message) -> None:
        chunk = m.snapshot
        assert chunk is not None
        meta = chunk.meta
        log = self.log
        if meta.index <= log.committed:
            self._incoming = None
            self._send(T.APPEND_RESP, m.src, index=log.committed)
            return
        if self._incoming is None or self._incoming[0] != meta:
            self._incoming = (meta, bytearray()) if chunk.offset == 0 else None
        if self._incoming is None or chunk.offset != len(self._incoming[1]):
            wanted = len(self._incoming[1]) if self._incoming else 0
            self._send(T.SNAPSHOT_RESP, m.src, index=wanted, hint_index=meta.index, reject=True)
            return
        buffer = self._incoming[1]
        buffer += chunk.data
        if not chunk.done:
            self._send(T.SNAPSHOT_RESP, m.src, index=len(buffer), hint_index=meta.index)
            return
        self._incoming = None
        data = bytes(buffer)
        if len(data) != meta.size or hashlib.sha256(data).hexdigest() != meta.digest:
            self.dropped["snapshot_digest"] += 1
            self._send(T.SNAPSHOT_RESP, m.src, index=0, hint_index=meta.index, reject=True)
            return
        restored = self._restore(Snapshot(meta, data))
        self._send(T.APPEND_RESP, m.src, index=log.last_index if restored else log.committed)

    def _restore(self, snapshot: Snapshot) -> bool:
        meta = snapshot.meta
        if self.log.term(meta.index) == meta.term:
            self.log.commit_to(meta.index)  # we already hold it: just move commit
            return False
        self.log.restore(snapshot)
        self.snapshot = snapshot
        self.voters, self.learners = meta.conf.voters, meta.conf.learners
        return True

    # ---- reads ------------------------------------------------------------

    def _committed_in_term(self) -> bool:
        return self.log.term(self.log.committed) == self.term

    def _leader_read(self, context: bytes, origin: NodeId) -> None:
        if not self._committed_in_term():
            self._reads_waiting.append((context, origin))
            return
        request = ReadRequest(self.log.committed, context, origin, {self.id})
        if quorum.has_quorum(self.voters, request.acks):
            self._deliver_read(request)
            return
        self._broadcast_heartbeat(self._read_only.add(request))

    def _confirm_read(self, context: bytes, voter: NodeId) -> None:
        acks = self._read_only.ack(context, voter)
        if acks is not None and quorum.has_quorum(self.voters, acks):
            for request in self._read_only.release_through(context):
                self._deliver_read(request)

    def _deliver_read(self, request: ReadRequest) -> None:
        if request.origin == self.id:
            self._read_states.append(ReadState(request.index, request.context))
        else:
            self._send(T.READ_INDEX_RESP, request.origin, index=request.index, context=request.context)

    def _broadcast_heartbeat(self, context: bytes) -> None:
        for peer, pr in self.progress.items():
            if peer != self.id:
                self._send(T.HEARTBEAT, peer, commit=min(pr.match, self.log.committed), context=context)

    # ---- roles and time ---------------------------------------------------

    def _promotable(self) -> bool:
        return self.id in self.voters and not self.rejoining

    def _tick_election(self) -> None:
        self._election_elapsed += 1
        if self._promotable() and self._election_elapsed >= self._timeout:
            self._election_elapsed = 0
            self._campaign(pre=self.config.pre_vote, transfer=False)

    def _tick_leader(self) -> None:
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        if self._election_elapsed >= self.config.election_min:
            self._election_elapsed = 0
            if self.config.check_quorum:
                active = {peer for peer, pr in self.progress.items() if pr.recent_active}
                if not quorum.has_quorum(self.voters, active | {self.id}):
                    self._become_follower(self.term, NONE)
                    return
                for peer, pr in self.progress.items():
                    pr.recent_active = peer == self.id
            self.transferee = NONE  # a transfer that did not finish in time is abandoned
        if self._commit_due:
            self._broadcast_append()
        if self._heartbeat_elapsed >= self.config.heartbeat:
            self._heartbeat_elapsed = 0
            self._broadcast_heartbeat(self._read_only.last_key())

    def _campaign(self, pre: bool, transfer: bool) -> None:
        if pre:
            self._reset(self.term)
            self.role = Role.PRE_CANDIDATE
            vote_type, vote_term = T.PRE_VOTE, self.term + 1
        else:
            self._reset(self.term + 1)
            self.role = Role.CANDIDATE
            self.vote = self.id
            vote_type, vote_term = T.VOTE, self.term
        self._votes = {self.id: True}
        if quorum.vote_result(self.voters, self._votes) is quorum.VoteResult.WON:
            if pre:
                self._campaign(pre=False, transfer=transfer)
            else:
                self._become_leader()
            return
        context = TRANSFER_CONTEXT if transfer else b""
        for voter in self.voters:
            if voter != self.id:
                self._send(
                    vote_type,
                    voter,
                    term=vote_term,
                    index=self.log.last_index,
                    log_term=self.log.last_term,
                    context=context,
                )

    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self.vote = NONE
        self.leader = NONE
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._timeout = self.config.rng.randrange(self.config.election_min, self.config.election_max)
        self.transferee = NONE
        self._votes = {}
        self.progress = {}
        self._read_only.clear()
        self._reads_waiting = []
        self._append_due = False
        self._commit_due = False

    def _become_follower(self, term: int, leader: NodeId) -> None:
        self._reset(term)
        self.role = Role.FOLLOWER
        self.leader = leader

    def _become_leader(self) -> None:
        self._reset(self.term)
        self.role = Role.LEADER
        self.leader = self.id
        last = self.log.last_index
        for member in self.voters + self.learners:
            self.progress[member] = Progress(last + 1, learner=member in self.learners)
            self.progress[member].recent_active = True
        self.progress[self.id].match = min(self.log.stable, last)
        self._append([Entry(self.term, last + 1, EntryKind.NOOP)])

    def _vote_to_persist(self) -> NodeId:
        if "forget_vote_persist" in self._bugs:
            return self._persisted_hs.vote if self._persisted_hs.term == self.term else NONE
        return self.vote

    def _hard_state(self) -> HardState:
        return HardState(self.term, self._vote_to_persist(), self.log.committed)

    def _hard_state_changed(self) -> bool:
        """Cheaper than building a HardState: has_ready() runs on every driver wake-up."""
        persisted = self._persisted_hs
        return (
            self.term != persisted.term
            or self.log.committed != persisted.commit
            or self._vote_to_persist() != persisted.vote
        )

    def _send(self, kind: MessageType, to: NodeId, **fields: object) -> None:
        fields.setdefault("term", self.term)
        if self.rejoining and kind in (T.APPEND_RESP, T.HEARTBEAT_RESP):
            fields.update(rejoining=True, commit=self.log.committed)
            if kind is T.HEARTBEAT_RESP:
                fields["index"] = self.log.last_index
        self._msgs.append(Message(type=kind, src=self.id, dst=to, **fields))  # type: ignore[arg-type]


def _entries_fit(m: Message) -> bool:
    """Entries of an APPEND must follow its prev index, in order, within its term."""
    previous_term = m.log_term
    for offset, entry in enumerate(m.entries):
        if entry.index != m.index + 1 + offset or not previous_term <= entry.term <= m.term:
            return False
        previous_term = entry.term
    return True


def _chunk_fits(chunk: SnapshotChunk | None) -> bool:
    if chunk is None:
        return False
    meta = chunk.meta
    return min(meta.index, meta.term, meta.size, chunk.offset) >= 0 and chunk.offset + len(chunk.data) <= meta.size
