"""Raft's safety properties, checked as the simulation runs; the first breach raises.

Most checks are incremental so they can run after every step without slowing the
run: global ledgers record each (index, term) entry ever written and each index
ever applied, and every new observation is compared with them. A full pairwise
log comparison runs every few steps as well, against the nodes' actual logs.

Invariant names (what a failing run reports):
  election_safety      at most one leader per term, over the whole run
  log_matching         two logs with an entry at the same index and term hold the same
                       entries up to it (same entry, same predecessor term)
  leader_completeness  a committed entry is in the log of every leader of a later term,
                       unless compacted into that leader's snapshot
  state_machine_safety no two nodes apply different entries, or reach different states,
                       at one index (also across restarts: a restarted node re-applies
                       from its persisted snapshot and must retrace the same sequence)
  applied_order        a node applies index i+1 after i; a snapshot never moves it back
                       (a restart goes back to the persisted snapshot, no further)
  commit_monotonic     a node's commit index never decreases, nor falls below its last
                       synced hard state across a restart
  persist_before_send  a message never depends on state that is not yet durable
                       (a granted vote, a term, an acknowledged append)
  proposal_integrity   a proposal's index and term, once applied, hold the client's data
  eventual_delivery    after healing, every acknowledged proposal is applied on every node
  liveness             after healing, a leader is elected and pending proposals commit
                       within the bound
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dtfd.raft import Entry, EntryKind, Message, MessageType, Role

if TYPE_CHECKING:
    from tests.sim.node import SimNode

SAFETY = (
    "election_safety",
    "log_matching",
    "leader_completeness",
    "state_machine_safety",
    "applied_order",
    "commit_monotonic",
    "persist_before_send",
    "proposal_integrity",
    "eventual_delivery",
)
INVARIANTS = (*SAFETY, "liveness")
UNPERSISTED_TYPES = (MessageType.PRE_VOTE, MessageType.PRE_VOTE_RESP)


class InvariantViolation(Exception):
    def __init__(self, invariant: str, detail: str) -> None:
        self.invariant, self.detail = invariant, detail
        super().__init__(f"{invariant}: {detail}")


@dataclass(frozen=True)
class Applied:
    """The first application of an index anywhere; every later one must match."""

    term: int
    kind: EntryKind
    data: bytes
    digest: bytes
    bound: int  # the applier's term: the entry was committed in this term or earlier


class Checker:
    def __init__(self, nodes: dict[str, SimNode], full_check_every: int = 20, durability: bool = True) -> None:
        self.nodes = nodes
        self.full_check_every = full_check_every
        self.durability = durability
        self.leaders: dict[int, str] = {}
        self.written: dict[tuple[int, int], tuple[int | None, EntryKind, bytes]] = {}
        self.applied: dict[int, Applied] = {}
        self.applied_hi = 0
        self._fresh: list[int] = []

    def fail(self, invariant: str, detail: str) -> None:
        raise InvariantViolation(invariant, detail)

    def entries_written(self, node: SimNode, entries: tuple[Entry, ...]) -> None:
        """Log matching, incrementally: an (index, term) names one entry with one predecessor term."""
        prev_term = node.raft.log.term(entries[0].index - 1)
        for e in entries:
            key = (e.index, e.term)
            known = self.written.get(key)
            if known is None:
                self.written[key] = (prev_term, e.kind, e.data)
            else:
                if known[1] != e.kind or known[2] != e.data:
                    self.fail("log_matching", f"{node.id} wrote index {e.index} term {e.term} data {e.data!r}, elsewhere {known[2]!r}")
                if prev_term is not None and known[0] is not None and known[0] != prev_term:
                    self.fail(
                        "log_matching",
                        f"{node.id} has index {e.index} term {e.term} after term {prev_term}, elsewhere after term {known[0]}",
                    )
                if known[0] is None and prev_term is not None:
                    self.written[key] = (prev_term, e.kind, e.data)
            prev_term = e.term

    def applied_entry(self, node: SimNode, entry: Entry, digest: bytes) -> None:
        known = self.applied.get(entry.index)
        if known is None:
            self.applied[entry.index] = Applied(entry.term, entry.kind, entry.data, digest, node.raft.term)
            self.applied_hi = max(self.applied_hi, entry.index)
            self._fresh.append(entry.index)
        elif (known.term, known.kind, known.data) != (entry.term, entry.kind, entry.data):
            self.fail(
                "state_machine_safety",
                f"{node.id} applied index {entry.index} term {entry.term} {entry.data!r}; "
                f"earlier applied term {known.term} {known.data!r}",
            )
        elif known.digest != digest:
            self.fail("state_machine_safety", f"{node.id} reached a different state at index {entry.index}")

    def restored(self, node: SimNode, index: int, state_index: int, digest: bytes) -> None:
        """A snapshot (from the leader, or from disk at restart) must hold the state at its index."""
        if state_index != index:
            self.fail("state_machine_safety", f"{node.id} snapshot at index {index} holds state of index {state_index}")
        known = self.applied.get(index)
        if known is not None and known.digest != digest:
            self.fail("state_machine_safety", f"{node.id} restored a snapshot at {index} whose state differs from the applied one")

    def sent(self, node: SimNode, msg: Message) -> None:
        if not self.durability or msg.type in UNPERSISTED_TYPES:
            return
        hard = node.storage.durable_hard_state
        if msg.term > hard.term:
            self.fail("persist_before_send", f"{node.id} sent {msg.type.name} in term {msg.term}, durable term is {hard.term}")
        granted = msg.type == MessageType.VOTE_RESP and not msg.reject
        if granted and hard.term == msg.term and hard.vote != msg.dst:  # a later durable term supersedes the vote
            self.fail(
                "persist_before_send",
                f"{node.id} granted its term-{msg.term} vote to {msg.dst}; durable vote is {hard.vote!r} in term {hard.term}",
            )
        # An ack from an older term may name entries a newer leader has since truncated (Raft's
        # leader completeness means those could never commit); in the durable term it must hold.
        acked = msg.type == MessageType.APPEND_RESP and not msg.reject and msg.term == hard.term
        if acked and msg.index > node.storage.durable_last_index:
            self.fail(
                "persist_before_send",
                f"{node.id} acknowledged index {msg.index}, durable log ends at {node.storage.durable_last_index}",
            )

    def after_step(self, now: int) -> None:
        leaders = []
        for node in self.nodes.values():
            if not node.up:
                continue
            r = node.raft
            log = r.log
            committed = log.committed
            if committed < node.max_commit:
                self.fail("commit_monotonic", f"{node.id} commit went from {node.max_commit} to {committed}")
            node.max_commit = committed
            if committed > log.last_index:
                self.fail("commit_monotonic", f"{node.id} commit {committed} is past its last index {log.last_index}")
            if r.role is Role.LEADER:
                leaders.append(node)
                term = r.term
                holder = self.leaders.get(term)
                if holder is None:
                    self.leaders[term] = node.id
                    self._check_new_leader(node)
                elif holder != node.id:
                    self.fail("election_safety", f"{holder} and {node.id} both lead term {term}")
        if self._fresh:
            for node in leaders:
                for index in self._fresh:
                    self._check_leader_has(node, index)
            self._fresh.clear()
        if now % self.full_check_every == 0:
            self.check_logs_match()

    def _check_new_leader(self, node: SimNode) -> None:
        start = node.raft.log.snapshot_index + 1
        for index in range(start, self.applied_hi + 1):
            self._check_leader_has(node, index)

    def _check_leader_has(self, node: SimNode, index: int) -> None:
        known = self.applied[index]
        r = node.raft
        if known.bound >= r.term or index <= r.log.snapshot_index:
            return
        term = r.log.term(index)
        if term != known.term:
            self.fail(
                "leader_completeness",
                f"{node.id} leads term {r.term} but has term {term} at index {index}, where a term-{known.term} entry was committed",
            )

    def check_logs_match(self) -> None:
        """Pairwise over the nodes' real logs: the highest shared (index, term) implies equal prefixes."""
        up = [n for n in self.nodes.values() if n.up]
        for i, a in enumerate(up):
            for b in up[i + 1 :]:
                la, lb = a.raft.log, b.raft.log
                lo = max(la.snapshot_index, lb.snapshot_index) + 1
                hi = min(la.last_index, lb.last_index)
                while hi >= lo and la.term(hi) != lb.term(hi):
                    hi -= 1
                if hi >= lo and la.entries(lo, hi + 1) != lb.entries(lo, hi + 1):
                    self.fail("log_matching", f"{a.id} and {b.id} share index {hi} term {la.term(hi)} but differ before it")

    def check_delivered(self, acked: list[tuple[str, int, int, int, bytes]]) -> None:
        """After healing: every acknowledged proposal is applied, with its data, on every node."""
        for client, seq, index, term, data in acked:
            known = self.applied.get(index)
            if known is None or (known.term, known.data) != (term, data):
                self.fail("eventual_delivery", f"{client}#{seq} acknowledged at index {index} is not what was applied there")
            for node in self.nodes.values():
                if node.app.index < index or node.app.last_seq.get(client, 0) < seq:
                    self.fail("eventual_delivery", f"{client}#{seq} at index {index} not applied on {node.id} (applied {node.app.index})")
        states = {(n.app.index, n.app.digest) for n in self.nodes.values()}
        if len(states) != 1:
            self.fail("state_machine_safety", f"nodes ended in different states: {sorted(states)}")
        self.check_logs_match()
