"""Static configuration of one Raft node. Time is counted in ticks, never in seconds."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from dtfd.raft.messages import NodeId

PLANTED_BUGS = frozenset(
    {
        # Each breaks one safety rule on purpose, so the simulator's tests can show it
        # catches the class of bug the original design shipped. Test-only.
        "commit_old_term",  # commit an earlier-term entry by counting replicas (Raft Fig. 8)
        "forget_vote_persist",  # grant a vote without persisting it
        "accept_stale_vote",  # count a vote response from an earlier term
        "vote_any_log",  # grant votes without the up-to-date log check
    }
)


@dataclass(frozen=True)
class Config:
    id: NodeId
    voters: tuple[NodeId, ...]
    rng: random.Random
    learners: tuple[NodeId, ...] = ()
    election_min: int = 10
    election_max: int = 20
    heartbeat: int = 2
    pre_vote: bool = True
    check_quorum: bool = True
    max_entries_per_msg: int = 512
    max_bytes_per_msg: int = 1 << 20
    max_inflight: int = 64
    snapshot_chunk: int = 1 << 20
    # > 0: this node's data was reset (state transfer). It may have voted in any term up to
    # this one, so it neither votes nor campaigns until it has caught up with a leader of a
    # later term.
    rejoin_term: int = 0
    planted_bugs: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        members = self.voters + self.learners
        if not self.voters:
            raise ValueError("voters: at least one voter is required")
        if len(set(members)) != len(members):
            raise ValueError("voters/learners: node ids must be unique and disjoint")
        if self.id not in members:
            raise ValueError(f"id: {self.id!r} is neither a voter nor a learner")
        if not 0 < self.heartbeat < self.election_min < self.election_max:
            raise ValueError("timing: need 0 < heartbeat < election_min < election_max ticks")
        for name in ("max_entries_per_msg", "max_bytes_per_msg", "max_inflight", "snapshot_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be positive")
        unknown = self.planted_bugs - PLANTED_BUGS
        if unknown:
            raise ValueError(f"planted_bugs: unknown {sorted(unknown)}")
