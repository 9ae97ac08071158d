"""State checkpoints: the state is encoded once per applied index, however many ask for it, and
checkpoints of a big state are spaced so that encoding it stays a small share of the loop, at
indexes every node picks alike."""

from __future__ import annotations

from collections import Counter

import pytest
import trio

from dtfd.server import node as node_module
from dtfd.server.node import ENCODE_BYTES_PER_ENTRY, checkpoint_stride
from dtfd.state import machine as machine_module
from dtfd.state.machine import Image
from dtfd.storage.memory import MemoryStorage
from tests.unit.nodes import single_node, until_leader, write_until

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
    node = single_node(MemoryStorage(), snapshot_every=EVERY, checksum_every=EVERY)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.run)
        with trio.fail_after(10):
            await until_leader(node)
            await write_until(node, lambda: node.machine.applied >= 3 * EVERY)
            assert await node.checksum() == (node.machine.applied, node.machine.checksum())
            while len(node.checkpoints) < 3:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    compacted = node.core.log.snapshot_index
    assert compacted >= 2 * EVERY and compacted % EVERY == 0, "compactions fell on checkpoints"
    assert [index for index, _ in node.checkpoints] == [EVERY, 2 * EVERY, 3 * EVERY]
    assert encodes.images[compacted] == 1 and encodes.images[3 * EVERY] == 1
    assert max(encodes.images.values()) == 1, f"encoded more than once at an index: {encodes.images}"


async def test_the_status_at_a_hashed_checkpoint_answers_its_digest_without_hashing_again(monkeypatch) -> None:
    node = single_node(MemoryStorage(), snapshot_every=10 * EVERY, checksum_every=EVERY)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.run)
        with trio.fail_after(10):
            await until_leader(node)
            await write_until(node, lambda: node.machine.applied >= EVERY)
            while not node.checkpoints:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert node.machine.applied == EVERY, "the writes stopped at the checkpoint"
    hashed: list[int] = []
    monkeypatch.setattr(node_module, "image_digest", lambda data: hashed.append(len(data)) or "")
    assert await node.checksum() == (EVERY, node.machine.checksum())
    assert hashed == []


def test_a_small_state_is_checkpointed_at_every_multiple_and_a_big_one_at_a_bounded_cost_per_entry() -> None:
    assert checkpoint_stride(1000, 0) == 1000
    assert checkpoint_stride(1000, 1000 * ENCODE_BYTES_PER_ENTRY) == 1000
    for size in (10**6, 10**7, 10**8, 10**9):
        stride = checkpoint_stride(1000, size)
        assert stride % 1000 == 0 and (stride // 1000).bit_count() == 1
        assert size / stride <= ENCODE_BYTES_PER_ENTRY
        assert stride == 1000 or size / (stride // 2) > ENCODE_BYTES_PER_ENTRY, "no sparser than it needs to be"


def checkpoints(start: int, stride: int, size_at, until: int) -> list[int]:
    """The checkpoint indexes a node picks from `start` on (as Node._checkpoint does), with the state size at each index."""
    taken = []
    for index in range(start, until + 1):
        if index % stride == 0:
            taken.append(index)
            stride = checkpoint_stride(EVERY, size_at(index))
    return taken


@pytest.mark.parametrize("restored_at", [1, 137, 480, 1234, 2999])
def test_a_node_that_restored_a_snapshot_meets_the_others_at_a_shared_checkpoint_and_stays_in_step(restored_at) -> None:
    def size_at(index: int) -> int:  # a state growing under writes, past several stride doublings
        return 3_000 * index

    last = 20_000
    old = checkpoints(1, EVERY, size_at, last)
    new = checkpoints(restored_at + 1, checkpoint_stride(EVERY, size_at(restored_at)), size_at, last)
    shared = sorted(set(old) & set(new))
    assert shared, "they never checkpoint at the same index"
    assert [i for i in old if i >= shared[0]] == [i for i in new if i >= shared[0]]
    assert len(old) < last // EVERY / 10, "a big state is not encoded at every multiple"


class RecordingStorage(MemoryStorage):
    """Memory storage that notes the index of every compaction."""

    def __init__(self) -> None:
        super().__init__()
        self.compacted: list[int] = []

    def compact(self, snapshot) -> None:
        self.compacted.append(snapshot.meta.index)
        super().compact(snapshot)


async def test_a_big_state_is_compacted_at_its_checkpoints_and_encoded_once_for_both(encodes, monkeypatch) -> None:
    """With a budget of 16 bytes an entry, a few hundred bytes of state are a big state."""
    monkeypatch.setattr(node_module, "ENCODE_BYTES_PER_ENTRY", 16)
    storage = RecordingStorage()
    node = single_node(storage, snapshot_every=EVERY, checksum_every=EVERY)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.run)
        with trio.fail_after(20):
            await until_leader(node)
            await write_until(node, lambda: len(storage.compacted) >= 3, "v" * 20)
            while not node.checkpoints or node.checkpoints[-1][0] < storage.compacted[-1]:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    checkpointed = {index for index, _ in node.checkpoints}
    assert set(storage.compacted[-3:]) <= checkpointed, f"compacted at {storage.compacted}, checkpoints {checkpointed}"
    assert max(encodes.images.values()) == 1
    strides = [b - a for a, b in zip(storage.compacted, storage.compacted[1:])]
    assert strides[-1] > EVERY, "a big state is encoded less often than every checksum_every entries"
