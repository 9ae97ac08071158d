"""State checkpoints: the state is encoded once per applied index, however many ask for it."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import trio

from dtfd.raft import Config as RaftConfig
from dtfd.server.node import Node, Timing
from dtfd.state import machine as machine_module
from dtfd.state.machine import Envelope, Image, Put
from dtfd.storage.memory import MemoryStorage

EVERY = 10


class CountingEncoder:
    """The state machine's encoder, counting how often the whole image was encoded at each applied index."""

    def __init__(self, encoder) -> None:
        self.encoder = encoder
        self.images: Counter[int] = Counter()

    def encode(self, obj: object) -> bytes:
        if isinstance(obj, Image):
            self.images[obj.applied] += 1
        return self.encoder.encode(obj)


@pytest.fixture
def encodes(monkeypatch) -> CountingEncoder:
    counting = CountingEncoder(machine_module._encoder)
    monkeypatch.setattr(machine_module, "_encoder", counting)
    return counting


async def test_a_checkpoint_a_compaction_and_the_status_at_one_index_encode_the_state_once(encodes) -> None:
    config = RaftConfig(id="n1", voters=("n1",), rng=random.Random(1), election_min=3, election_max=6, heartbeat=1)
    node = Node(config, MemoryStorage(), Timing(tick_s=0.01, snapshot_every=EVERY, checksum_every=EVERY), send=lambda m: None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.run)
        with trio.fail_after(10):
            while not node.is_leader:
                await trio.sleep(0.01)
            seq = 0
            while node.machine.applied < 3 * EVERY:
                seq += 1
                await node.propose(Envelope("c", seq, 0.0, Put(f"k{seq}", "v")))
            assert await node.checksum() == (node.machine.applied, node.machine.checksum())
            while len(node.checkpoints) < 3:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    compacted = node.core.log.snapshot_index
    assert compacted >= 2 * EVERY and compacted % EVERY == 0, "compactions fell on checkpoints"
    assert [index for index, _ in node.checkpoints] == [EVERY, 2 * EVERY, 3 * EVERY]
    assert encodes.images[compacted] == 1 and encodes.images[3 * EVERY] == 1
    assert max(encodes.images.values()) == 1, f"encoded more than once at an index: {encodes.images}"

