"""MemoryStorage: the LogStorage contract, and a crash that loses exactly the unsynced writes."""

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dtfd.raft.messages import ConfState, Entry, HardState, PersistedState, Snapshot, SnapshotMeta
from dtfd.storage.memory import MemoryStorage


def entries(lo: int, hi: int, term: int = 1) -> list[Entry]:
    return [Entry(term, i, data=f"{term}.{i}".encode()) for i in range(lo, hi + 1)]


def snapshot(index: int, term: int = 1) -> Snapshot:
    return Snapshot(SnapshotMeta(index, term, ConfState(("a", "b", "c"))), f"state@{index}".encode())


def test_empty_storage_loads_empty_state() -> None:
    assert MemoryStorage().load() == PersistedState()


def test_append_replaces_the_overlapping_tail() -> None:
    s = MemoryStorage()
    s.append(entries(1, 5, term=1))
    s.append(entries(4, 6, term=2))
    assert [(e.index, e.term) for e in s.load().entries] == [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 2)]


def test_append_with_a_gap_is_refused() -> None:
    s = MemoryStorage()
    s.append(entries(1, 2))
    with pytest.raises(ValueError, match="gap"):
        s.append(entries(4, 5))


def test_compact_keeps_the_snapshot_and_drops_entries_up_to_it() -> None:
    s = MemoryStorage()
    s.append(entries(1, 10))
    s.compact(snapshot(6))
    state = s.load()
    assert state.snapshot == snapshot(6)
    assert [e.index for e in state.entries] == [7, 8, 9, 10]
    s.compact(snapshot(4))  # older than the one kept: ignored
    assert s.load().snapshot == snapshot(6)


def test_append_after_compaction_ignores_entries_inside_the_snapshot() -> None:
    s = MemoryStorage()
    s.append(entries(1, 10))
    s.compact(snapshot(6))
    s.append(entries(5, 12, term=1))
    assert [e.index for e in s.load().entries] == [7, 8, 9, 10, 11, 12]


def test_install_snapshot_replaces_the_whole_log() -> None:
    s = MemoryStorage()
    s.append(entries(1, 10))
    s.install_snapshot(snapshot(20, term=3))
    s.append(entries(21, 22, term=3))
    state = s.load()
    assert state.snapshot == snapshot(20, term=3)
    assert [e.index for e in state.entries] == [21, 22]


def test_everything_synced_survives_a_crash() -> None:
    s = MemoryStorage()
    s.append(entries(1, 3))
    s.set_hard_state(HardState(2, "a", 3))
    s.compact(snapshot(2))
    s.sync()
    before = s.load()
    for seed in range(50):
        s.crash(random.Random(seed))
        assert s.load() == before


def test_a_crash_can_lose_every_unsynced_write() -> None:
    s = MemoryStorage()
    s.append(entries(1, 3))
    s.set_hard_state(HardState(1, "a", 1))
    s.sync()
    synced = s.load()
    s.append(entries(4, 6))
    s.set_hard_state(HardState(2, "b", 6))
    outcomes = set()
    lost_counts = set()
    for seed in range(200):
        copy = MemoryStorage()
        copy.append(synced.entries)
        copy.set_hard_state(synced.hard_state)
        copy.sync()
        copy.append(entries(4, 6))
        copy.set_hard_state(HardState(2, "b", 6))
        lost_counts.add(copy.crash(random.Random(seed)))
        state = copy.load()
        outcomes.add((state.entries[-1].index, state.hard_state))
    assert outcomes == {
        (3, HardState(1, "a", 1)),  # both writes lost
        (4, HardState(1, "a", 1)),  # append torn after one entry
        (5, HardState(1, "a", 1)),  # torn after two
        (6, HardState(1, "a", 1)),  # append survived, hard state lost
        (6, HardState(2, "b", 6)),  # both survived
    }
    assert lost_counts == {0, 1, 2}
    assert s.unsynced == 2
    assert s.durable() == synced


def test_crash_keeps_writes_in_order_so_a_surviving_hard_state_has_its_entries() -> None:
    for seed in range(300):
        s = MemoryStorage()
        s.append(entries(1, 4))
        s.set_hard_state(HardState(1, "a", 4))
        s.crash(random.Random(seed))
        state = s.load()
        last = state.entries[-1].index if state.entries else 0
        assert state.hard_state.commit <= last


def test_storage_is_usable_after_a_crash() -> None:
    s = MemoryStorage()
    s.append(entries(1, 5))
    s.crash(random.Random(1))
    last = len(s.load().entries)
    s.append(entries(last + 1, last + 2, term=2))
    s.sync()
    s.crash(random.Random(2))
    assert [e.index for e in s.load().entries] == list(range(1, last + 3))


@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("append"), st.integers(0, 3), st.integers(1, 4), st.integers(1, 5)),
            st.tuples(st.just("hard"), st.integers(1, 9)),
            st.tuples(st.just("compact"), st.integers(0, 20)),
            st.tuples(st.just("sync")),
        ),
        max_size=30,
    ),
    seed=st.integers(0, 2**32),
)
def test_crash_result_lies_between_the_durable_and_the_current_state(ops: list[tuple], seed: int) -> None:
    """Whatever a crash keeps is a prefix of the write history: at least the synced part, at most all."""
    s = MemoryStorage()
    written_since_sync: list[HardState] = []
    for op in ops:
        last = (s.load().snapshot.meta.index if s.load().snapshot else 0) + len(s.load().entries)
        if op[0] == "append":
            first = max(1, last + 1 - op[1])
            s.append(entries(first, first + op[2] - 1, term=op[3]))
        elif op[0] == "hard":
            s.set_hard_state(HardState(op[1], "", 0))
            written_since_sync.append(HardState(op[1], "", 0))
        elif op[0] == "compact" and 0 < op[1] <= last:
            s.compact(snapshot(op[1]))
        elif op[0] == "sync":
            s.sync()
            written_since_sync.clear()
    durable = s.durable()
    s.crash(random.Random(seed))
    after = s.load()
    assert s.unsynced == 0
    assert after.hard_state in [durable.hard_state, *written_since_sync]
    snap_index = after.snapshot.meta.index if after.snapshot else 0
    indexes = [e.index for e in after.entries]
    assert indexes == list(range(snap_index + 1, snap_index + 1 + len(indexes)))
    assert snap_index >= (durable.snapshot.meta.index if durable.snapshot else 0)
