"""The system_health partition: facts about the cluster itself, replicated like the rest.

A new leader records its election here, so every node (and dtfctl history) sees one
agreed list of leader changes; recoveryd reports each recovery action here too, so
`dtfctl history` shows them from any node whichever recoveryd host wrote them.
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


class RecordRecovery(msgspec.Struct, tag="health.recovery", frozen=True, kw_only=True):
    node: str
    failure: str
    action: str
    result: str
    reason: str = ""
    started: float = 0.0  # recoveryd's clock: when it began acting
    finished: float = 0.0


class RecoveryEvent(msgspec.Struct, frozen=True, kw_only=True):
    node: str
    failure: str
    action: str
    result: str
    reason: str
    started: float
    finished: float
    at: float  # the leader's clock when recorded


HealthCommand = RecordLeader | RecordRecovery


class Health(msgspec.Struct):
    leaders: list[LeaderChange] = []
    recoveries: list[RecoveryEvent] = []

    def apply(self, command: HealthCommand, at: float) -> tuple[bool, object, str]:
        if isinstance(command, RecordRecovery):
            self.recoveries.append(RecoveryEvent(**msgspec.structs.asdict(command), at=at))
            del self.recoveries[:-MAX_EVENTS]
            return True, {"node": command.node, "action": command.action, "result": command.result}, ""
        if self.leaders and self.leaders[-1].term >= command.term:
            return False, None, "stale_term"  # one record per term, in term order
        self.leaders.append(LeaderChange(command.node, command.term, at))
        del self.leaders[:-MAX_EVENTS]
        return True, {"node": command.node, "term": command.term}, ""
