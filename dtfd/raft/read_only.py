"""ReadIndex bookkeeping: reads wait for a heartbeat round that proves leadership."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from dtfd.raft.messages import NodeId


@dataclass
class ReadRequest:
    index: int
    context: bytes
    origin: NodeId
    acks: set[NodeId] = field(default_factory=set)


class ReadOnly:
    """Pending reads in arrival order, keyed by a leader-local request id."""

    def __init__(self) -> None:
        self._pending: OrderedDict[int, ReadRequest] = OrderedDict()
        self._next_id = 0

    def add(self, request: ReadRequest) -> bytes:
        self._next_id += 1
        self._pending[self._next_id] = request
        return self.key(self._next_id)

    @staticmethod
    def key(request_id: int) -> bytes:
        return request_id.to_bytes(8, "big")

    def last_key(self) -> bytes:
        return self.key(next(reversed(self._pending))) if self._pending else b""

    def ack(self, context: bytes, voter: NodeId) -> set[NodeId] | None:
        if len(context) != 8:
            return None
        request = self._pending.get(int.from_bytes(context, "big"))
        if request is None:
            return None
        request.acks.add(voter)
        return request.acks

    def release_through(self, context: bytes) -> list[ReadRequest]:
        """A quorum acked `context`: it and every request before it are confirmed."""
        last = int.from_bytes(context, "big")
        released = []
        while self._pending:
            request_id = next(iter(self._pending))
            if request_id > last:
                break
            released.append(self._pending.pop(request_id))
        return released

    def clear(self) -> None:
        self._pending.clear()
