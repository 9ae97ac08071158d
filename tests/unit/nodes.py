"""A one-node cluster of the real driver on memory storage, for tests of what runs on a leader."""

from __future__ import annotations

import random
from collections.abc import Callable

import trio

from dtfd.raft import Config as RaftConfig
from dtfd.server.node import Node, Timing
from dtfd.state.machine import Envelope, Put
from dtfd.storage.interface import LogStorage


def single_node(storage: LogStorage, snapshot_every: int = 10_000, checksum_every: int = 1000) -> Node:
    config = RaftConfig(id="n1", voters=("n1",), rng=random.Random(1), election_min=3, election_max=6, heartbeat=1)
    return Node(config, storage, Timing(tick_s=0.01, snapshot_every=snapshot_every, checksum_every=checksum_every), send=lambda messages: None)


async def until_leader(node: Node, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not node.is_leader:
            await trio.sleep(0.01)


async def write_until(node: Node, done: Callable[[], bool], value: str = "v") -> None:
    """Put distinct keys, one acknowledged write after another, until `done()`."""
    seq = 0
    while not done():
        seq += 1
        await node.propose(Envelope("c", seq, 0.0, Put(f"k{seq}", value)))
