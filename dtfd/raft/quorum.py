"""Majority math, in one place, for commit, elections, check-quorum and ReadIndex."""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping

from dtfd.raft.messages import NodeId


class VoteResult(enum.Enum):
    PENDING = 0
    WON = 1
    LOST = 2


def majority(voters: Collection[NodeId]) -> int:
    return len(voters) // 2 + 1


def committed_index(voters: Collection[NodeId], match: Mapping[NodeId, int]) -> int:
    """The highest index stored on a majority of voters."""
    ordered = sorted((match.get(v, 0) for v in voters), reverse=True)
    return ordered[majority(voters) - 1]


def has_quorum(voters: Collection[NodeId], acked: Collection[NodeId]) -> bool:
    return sum(1 for v in voters if v in acked) >= majority(voters)


def vote_result(voters: Collection[NodeId], votes: Mapping[NodeId, bool]) -> VoteResult:
    need = majority(voters)
    granted = sum(1 for v in voters if votes.get(v) is True)
    if granted >= need:
        return VoteResult.WON
    missing = sum(1 for v in voters if v not in votes)
    return VoteResult.PENDING if granted + missing >= need else VoteResult.LOST
