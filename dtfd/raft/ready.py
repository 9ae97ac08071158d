"""What the core hands back to its driver: Ready batches, proposal outcomes, status."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from dtfd.raft.messages import Entry, HardState, Message, NodeId, Snapshot


class Role(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre-candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass(frozen=True)
class ReadState:
    """A linearizable read may be served once the local applied index reaches `index`."""

    index: int
    context: bytes


@dataclass(frozen=True)
class Ready:
    """One batch of work for the driver, in this order:

    1. persist `snapshot` (replacing the whole log), `entries` (replacing any tail they
       overlap) and `hard_state`, and make them durable;
    2. send `messages`;
    3. restore the state machine from `snapshot`, then apply `committed`;
    4. serve `read_states` once applied; then call `advance(ready)`.

    The first `early` messages (a leader's appends and heartbeats) may instead be sent
    before step 1, overlapping the leader's disk write with its followers' (Raft thesis
    10.2.1); the leader counts its own entries toward commit only after `advance`.
    """

    hard_state: HardState | None
    entries: tuple[Entry, ...]
    snapshot: Snapshot | None
    messages: tuple[Message, ...]
    committed: tuple[Entry, ...]
    read_states: tuple[ReadState, ...]
    leader: NodeId
    role: Role
    early: int = 0

    @property
    def must_sync(self) -> bool:
        return bool(self.entries) or self.hard_state is not None or self.snapshot is not None


@dataclass(frozen=True)
class Proposed:
    """Accepted by the leader: the data will be at these indexes if it commits in `term`."""

    first_index: int
    last_index: int
    term: int


@dataclass(frozen=True)
class NotLeader:
    """Refused because this node does not lead; `leader` is the one it knows of, if any."""

    leader: NodeId


@dataclass(frozen=True)
class Refused:
    """Refused for a reason the caller can act on (transfer in progress, unknown node, ...)."""

    reason: str


@dataclass(frozen=True)
class PeerProgress:
    match: int
    next: int
    state: str
    recent_active: bool
    learner: bool


@dataclass(frozen=True)
class Status:
    id: NodeId
    role: Role
    term: int
    vote: NodeId
    leader: NodeId
    commit: int
    applied: int
    first_index: int
    last_index: int
    snapshot_index: int
    transferee: NodeId
    rejoining: bool = False
    progress: dict[NodeId, PeerProgress] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
