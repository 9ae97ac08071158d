"""The leader's view of one follower: how far it matches and how to send it more.

PROBE sends one append at a time until the match point is found; REPLICATE streams
appends optimistically within an in-flight window; SNAPSHOT sends a snapshot in
chunks, one outstanding at a time, and falls back to PROBE once it is installed.
"""

from __future__ import annotations

import enum
from collections import deque


class ProgressState(enum.Enum):
    PROBE = "probe"
    REPLICATE = "replicate"
    SNAPSHOT = "snapshot"


class Progress:
    __slots__ = (
        "match",
        "next",
        "state",
        "probe_sent",
        "inflight",
        "pending_snapshot",
        "snapshot_offset",
        "chunk_unanswered",
        "recent_active",
        "learner",
    )

    def __init__(self, next_index: int, learner: bool = False) -> None:
        self.match = 0
        self.next = next_index
        self.state = ProgressState.PROBE
        self.probe_sent = False
        self.inflight: deque[int] = deque()
        self.pending_snapshot = 0
        self.snapshot_offset = 0
        self.chunk_unanswered = False  # a snapshot chunk is out and no answer came since
        self.recent_active = False
        self.learner = learner

    def become_probe(self) -> None:
        if self.state is ProgressState.SNAPSHOT:
            self.next = max(self.match + 1, self.pending_snapshot + 1)
        else:
            self.next = self.match + 1
        self.state = ProgressState.PROBE
        self.probe_sent = False
        self.inflight.clear()
        self.pending_snapshot = 0

    def become_replicate(self) -> None:
        self.state = ProgressState.REPLICATE
        self.next = self.match + 1
        self.inflight.clear()

    def become_snapshot(self, index: int) -> None:
        self.state = ProgressState.SNAPSHOT
        self.pending_snapshot = index
        self.snapshot_offset = 0
        self.chunk_unanswered = False
        self.inflight.clear()

    def forget(self, committed: int, held: int) -> None:
        """The follower lost entries it had acknowledged (its log was reset): trust only its
        `committed` prefix, which every later leader's log holds too, and probe from there.

        A snapshot on its way is still sent, unless the follower already holds up to `held`.
        """
        self.match = min(self.match, committed)
        if self.state is not ProgressState.SNAPSHOT or self.pending_snapshot <= held:
            self.become_probe()

    def maybe_update(self, index: int) -> bool:
        """An acknowledgement up to `index`; False if it tells nothing new."""
        updated = index > self.match
        if updated:
            self.match = index
            self.probe_sent = False
        if index + 1 > self.next:
            self.next = index + 1
        return updated

    def maybe_decr_to(self, rejected: int, match_hint: int) -> bool:
        """A rejection of the append after `rejected`; False if it is stale."""
        if self.state is ProgressState.REPLICATE:
            if rejected <= self.match:
                return False
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False
        self.next = max(min(rejected, match_hint + 1), self.match + 1)
        self.probe_sent = False
        return True

    def sent(self, last_index: int) -> None:
        """An append was sent; `last_index` is its last entry's index (or its prev index if empty)."""
        if self.state is ProgressState.REPLICATE:
            if last_index >= self.next:
                self.next = last_index + 1
                self.inflight.append(last_index)
        elif self.state is ProgressState.PROBE:
            self.probe_sent = True

    def free_to(self, index: int) -> None:
        while self.inflight and self.inflight[0] <= index:
            self.inflight.popleft()

    def free_one_if_full(self, max_inflight: int) -> None:
        """A lost window would otherwise never be acked; the next append exposes the gap."""
        if self.state is ProgressState.REPLICATE and len(self.inflight) >= max_inflight:
            self.inflight.popleft()

    def paused(self, max_inflight: int) -> bool:
        if self.state is ProgressState.PROBE:
            return self.probe_sent
        if self.state is ProgressState.REPLICATE:
            return len(self.inflight) >= max_inflight
        return True
