"""Hard state file, and the data-dir rules that involve it (fresh start, missing file, commit, term)."""

from __future__ import annotations

import os

import pytest

from dtfd.raft.messages import Entry, HardState
from dtfd.storage import hardstate
from dtfd.storage.datadir import COMMIT_WRITE_INTERVAL_S, DiskStorage, inspect
from dtfd.storage.interface import StorageCorrupt


def test_roundtrip_and_atomic_replace(tmp_path):
    assert hardstate.read(str(tmp_path)) is None
    hardstate.write(str(tmp_path), HardState(3, "n2", 7))
    hardstate.write(str(tmp_path), HardState(4, "", 9))
    assert hardstate.read(str(tmp_path)) == HardState(4, "", 9)
    assert sorted(os.listdir(tmp_path)) == ["hardstate"]


def test_every_bit_flip_is_reported(tmp_path):
    hardstate.write(str(tmp_path), HardState(123, "node-a", 456))
    path = tmp_path / "hardstate"
    clean = path.read_bytes()
    for offset in range(len(clean)):
        for bit in range(8):
            damaged = bytearray(clean)
            damaged[offset] ^= 1 << bit
            path.write_bytes(damaged)
            with pytest.raises(StorageCorrupt) as err:
                hardstate.read(str(tmp_path))
            assert err.value.path == str(path)


@pytest.mark.parametrize("size", [0, 3, 8, 12])
def test_truncated_file_is_reported(tmp_path, size):
    hardstate.write(str(tmp_path), HardState(1, "a", 1))
    os.truncate(tmp_path / "hardstate", size)
    with pytest.raises(StorageCorrupt, match="hard state"):
        hardstate.read(str(tmp_path))


def test_fresh_empty_dir_is_a_fresh_start(tmp_path):
    storage = DiskStorage(str(tmp_path / "new"))
    state = storage.load()
    assert state.hard_state == HardState() and state.snapshot is None and state.entries == ()
    storage.close()
    assert hardstate.read(str(tmp_path / "new")) == HardState()


def test_missing_hard_state_beside_a_log_is_corruption(tmp_path):
    storage = DiskStorage(str(tmp_path))
    storage.set_hard_state(HardState(1, "a", 0))
    storage.append([Entry(1, 1)])
    storage.close()
    os.unlink(tmp_path / "hardstate")
    with pytest.raises(StorageCorrupt, match="hard state file missing"):
        DiskStorage(str(tmp_path))


def test_hard_state_is_written_at_sync_after_the_log(tmp_path):
    """Term and vote are durable at sync(); a commit-only change waits for the interval or close()."""
    now = [0.0]
    storage = DiskStorage(str(tmp_path), clock=lambda: now[0])
    storage.set_hard_state(HardState(1, "a", 0))
    storage.append([Entry(1, 1), Entry(1, 2)])
    storage.set_hard_state(HardState(1, "a", 2))
    assert hardstate.read(str(tmp_path)).commit == 0
    storage.sync()
    assert hardstate.read(str(tmp_path)) == HardState(1, "a", 0)  # commit alone is volatile state: not yet
    now[0] += COMMIT_WRITE_INTERVAL_S
    storage.sync()
    assert hardstate.read(str(tmp_path)) == HardState(1, "a", 2)
    storage.set_hard_state(HardState(1, "a", 3))
    storage.append([Entry(1, 3)])
    storage.sync()
    storage.set_hard_state(HardState(2, "b", 3))
    storage.sync()
    assert hardstate.read(str(tmp_path)) == HardState(2, "b", 3)  # a vote is written at once, with the commit
    storage.set_hard_state(HardState(2, "b", 3))
    storage.close()
    assert hardstate.read(str(tmp_path)) == HardState(2, "b", 3)


def test_close_writes_a_pending_commit(tmp_path):
    storage = DiskStorage(str(tmp_path), clock=lambda: 0.0)
    storage.set_hard_state(HardState(1, "a", 0))
    storage.append([Entry(1, 1)])
    storage.sync()
    storage.set_hard_state(HardState(1, "a", 1))
    storage.sync()
    storage.close()
    assert hardstate.read(str(tmp_path)) == HardState(1, "a", 1)


def test_a_new_term_is_stored_before_entries_of_that_term(tmp_path):
    """Whatever order the driver calls in, no entry on disk has a term above the stored term."""
    storage = DiskStorage(str(tmp_path))
    storage.append([Entry(2, 1)])
    assert hardstate.read(str(tmp_path)) == HardState(2, "", 0)
    storage.set_hard_state(HardState(5, "b", 1))
    storage.append([Entry(5, 2)])
    assert hardstate.read(str(tmp_path)) == HardState(5, "b", 0)
    storage.close()
    assert DiskStorage(str(tmp_path)).load().hard_state == HardState(5, "b", 1)


def test_commit_beyond_the_log_is_corruption(tmp_path):
    storage = DiskStorage(str(tmp_path))
    storage.set_hard_state(HardState(1, "a", 1))
    storage.append([Entry(1, 1), Entry(1, 2)])
    storage.close()
    hardstate.write(str(tmp_path), HardState(1, "a", 3))
    with pytest.raises(StorageCorrupt, match="commit 3 beyond the last index 2"):
        DiskStorage(str(tmp_path))


def test_term_below_the_log_is_corruption(tmp_path):
    storage = DiskStorage(str(tmp_path))
    storage.append([Entry(4, 1)])
    storage.close()
    hardstate.write(str(tmp_path), HardState(3, "a", 0))
    problems = inspect(str(tmp_path)).problems
    assert [p.problem for p in problems] == ["term 3 below the log's term 4"]
