"""The system_health partition: facts about the cluster itself, replicated like the rest.

A new leader records its election here, so every node (and dtfctl history) sees one
agreed list of leader changes; later, recovery actions reported by recoveryd.
"""

from __future__ import annotations

import msgspec

MAX_EVENTS = 1000


class LeaderChange(msgspec.Struct, frozen=True):
    node: str
    term: int
    at: float


class RecordLeader(msgspec.Struct, tag="health.leader", frozen=True):
    node: str
    term: int


HealthCommand = RecordLeader


class Health(msgspec.Struct):
    leaders: list[LeaderChange] = []

    def apply(self, command: HealthCommand, at: float) -> tuple[bool, object, str]:
        if self.leaders and self.leaders[-1].term >= command.term:
            return False, None, "stale_term"  # one record per term, in term order
        self.leaders.append(LeaderChange(command.node, command.term, at))
        del self.leaders[:-MAX_EVENTS]
        return True, {"node": command.node, "term": command.term}, ""
