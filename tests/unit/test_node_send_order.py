"""A leader's peer links send a Ready's appends before the leader's own fsync blocks the loop.

The follower's round trip and the leader's fsync then overlap; when the links sent only
after the fsync (trio had run the ready loop first, half the time), every write paid both
one after the other."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import trio

from dtfd.raft import Config as RaftConfig
from dtfd.raft import Message
from dtfd.raft.messages import MessageType as MT
from dtfd.server.node import Node, Timing
from dtfd.state.machine import Envelope, Put
from dtfd.storage.memory import MemoryStorage
from tests.unit.nodes import until_leader

FOLLOWERS = ("n2", "n3")
ANSWERS = {MT.PRE_VOTE: MT.PRE_VOTE_RESP, MT.VOTE: MT.VOTE_RESP, MT.HEARTBEAT: MT.HEARTBEAT_RESP}


class Followers:
    """Two followers that grant every vote and take every append, each behind a link task
    that, like Transport's pumps, is woken by its queue and sends in its first step."""

    def __init__(self) -> None:
        self.node: Node | None = None
        self.sent: dict[str, set[int]] = {peer: set() for peer in FOLLOWERS}  # last entry index of each append a link sent
        self._queues = {peer: trio.open_memory_channel[Message](math.inf) for peer in FOLLOWERS}

    def send(self, messages: Sequence[Message]) -> None:
        for m in messages:
            self._queues[m.dst][0].send_nowait(m)

    async def link(self, peer: str) -> None:
        async for m in self._queues[peer][1]:
            assert self.node is not None
            if m.type == MT.APPEND:
                if m.entries:
                    self.sent[peer].add(m.entries[-1].index)
                last = m.entries[-1].index if m.entries else m.index
                self.node.step(Message(type=MT.APPEND_RESP, src=peer, dst=m.src, term=m.term, index=last))
            elif m.type in ANSWERS:
                self.node.step(Message(type=ANSWERS[m.type], src=peer, dst=m.src, term=m.term, context=m.context))


class WatchedStorage(MemoryStorage):
    def __init__(self, followers: Followers) -> None:
        super().__init__()
        self.followers = followers
        self.appended = 0
        self.synced_unsent: list[int] = []  # entries fsynced before both links had sent them

    def append(self, entries: Sequence) -> None:
        super().append(entries)
        if entries:
            self.appended = entries[-1].index

    def sync(self) -> None:
        if self.appended and any(self.appended not in sent for sent in self.followers.sent.values()):
            self.synced_unsent.append(self.appended)
        super().sync()


async def test_the_links_send_a_leaders_appends_before_it_fsyncs_them():
    followers = Followers()
    storage = WatchedStorage(followers)
    config = RaftConfig(id="n1", voters=("n1", *FOLLOWERS), rng=random.Random(1), election_min=3, election_max=6, heartbeat=1)
    node = followers.node = Node(config, storage, Timing(tick_s=0.01, snapshot_every=10_000), send=followers.send)
    async with trio.open_nursery() as nursery:
        for peer in FOLLOWERS:
            nursery.start_soon(followers.link, peer)
        nursery.start_soon(node.run)
        await until_leader(node)
        await node.propose(Envelope("c", 1, 0.0, Put("k1", "v")))
        storage.synced_unsent.clear()  # until the followers answer a probe, a new leader holds its appends back
        for seq in range(2, 42):
            await node.propose(Envelope("c", seq, 0.0, Put(f"k{seq}", "v")))
        assert storage.synced_unsent == []
        nursery.cancel_scope.cancel()
