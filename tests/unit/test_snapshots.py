"""Snapshot files, retention and fallback, and how install/compact reshape the log."""

from __future__ import annotations

import os

import pytest

from dtfd.raft.messages import ConfState, Entry, HardState, Snapshot, SnapshotMeta
from dtfd.storage import snapshots
from dtfd.storage.datadir import DiskStorage, inspect
from dtfd.storage.interface import StorageCorrupt

CONF = ConfState(("n1", "n2", "n3"), ("n4",))


def snap(index: int, term: int = 1, data: bytes | None = None) -> Snapshot:
    return Snapshot(SnapshotMeta(index, term, CONF), data if data is not None else b"image-%d" % index * 20)


def log_of(n: int, term: int = 1) -> list[Entry]:
    return [Entry(term, i, data=b"e%03d" % i * 10) for i in range(1, n + 1)]


def filled(path, n: int = 60, segment_size: int = 512) -> DiskStorage:
    storage = DiskStorage(str(path), segment_size=segment_size)
    storage.set_hard_state(HardState(1, "n1", n))
    entries = log_of(n)
    for i in range(0, n, 5):
        storage.append(entries[i : i + 5])
    storage.sync()
    return storage


def segment_count(path) -> int:
    return len(os.listdir(path / "wal"))


def test_file_roundtrip_fills_digest_and_size(tmp_path):
    written = snapshots.write(str(tmp_path), snap(10, 2))
    assert written.meta.size == len(written.data) and len(written.meta.digest) == 64
    assert snapshots.read(str(tmp_path / snapshots.file_name(10, 2))) == written


def test_a_wrong_digest_from_the_leader_is_refused(tmp_path):
    bad = Snapshot(SnapshotMeta(3, 1, CONF, digest="00" * 32), b"data")
    with pytest.raises(ValueError, match="digest"):
        snapshots.write(str(tmp_path), bad)


def test_every_bit_flip_is_reported(tmp_path):
    snapshots.write(str(tmp_path), snap(10, 2, b"x" * 40))
    path = tmp_path / snapshots.file_name(10, 2)
    clean = path.read_bytes()
    for offset in range(len(clean)):
        damaged = bytearray(clean)
        damaged[offset] ^= 1 << (offset % 8)
        path.write_bytes(damaged)
        with pytest.raises(StorageCorrupt):
            snapshots.read(str(path))


def test_truncated_snapshot_is_reported(tmp_path):
    snapshots.write(str(tmp_path), snap(10))
    path = tmp_path / snapshots.file_name(10, 1)
    for size in (0, 5, 20, os.path.getsize(path) - 1):
        os.truncate(path, size)
        with pytest.raises(StorageCorrupt):
            snapshots.read(str(path))


def test_compact_keeps_two_snapshots_and_the_log_back_to_the_older(tmp_path):
    storage = filled(tmp_path)
    before = segment_count(tmp_path)
    storage.compact(snap(20))
    storage.compact(snap(40))
    storage.compact(snap(50))
    assert [i for i, _, _ in snapshots.list_files(str(tmp_path / "snap"))[0]] == [50, 40]
    assert segment_count(tmp_path) < before
    storage.close()
    reopened = DiskStorage(str(tmp_path), segment_size=512)
    state = reopened.load()
    assert state.snapshot.meta.index == 50 and state.entries == tuple(log_of(60)[50:])
    reopened.close()
    first = int(sorted(os.listdir(tmp_path / "wal"))[0][17:33], 16)
    assert 20 < first <= 41


def test_damaged_newest_snapshot_falls_back_to_the_previous(tmp_path, caplog):
    storage = filled(tmp_path)
    storage.compact(snap(20))
    storage.compact(snap(40))
    storage.close()
    newest = tmp_path / "snap" / snapshots.file_name(40, 1)
    data = bytearray(newest.read_bytes())
    data[-1] ^= 0x10
    newest.write_bytes(data)
    state = DiskStorage(str(tmp_path), segment_size=512).load()
    assert state.snapshot.meta.index == 20 and state.entries == tuple(log_of(60)[20:])
    assert "snapshot skipped for an older one" in caplog.text


def test_damaged_only_snapshot_is_corruption(tmp_path):
    storage = filled(tmp_path)
    storage.compact(snap(40))
    storage.close()
    only = tmp_path / "snap" / snapshots.file_name(40, 1)
    os.truncate(only, os.path.getsize(only) - 3)
    with pytest.raises(StorageCorrupt, match="digest"):
        DiskStorage(str(tmp_path))


def test_fallback_that_the_log_no_longer_covers_is_corruption(tmp_path):
    storage = filled(tmp_path)
    storage.compact(snap(20))
    storage.install_snapshot(snap(80, 2))
    storage.close()
    newest = tmp_path / "snap" / snapshots.file_name(80, 2)
    os.truncate(newest, os.path.getsize(newest) - 1)
    problems = inspect(str(tmp_path)).problems
    assert any("log starts at index 81" in p.problem for p in problems)
    assert any(p.path == str(newest) for p in problems)


def test_install_snapshot_replaces_the_whole_log(tmp_path):
    storage = filled(tmp_path)
    storage.set_hard_state(HardState(2, "n2", 60))
    storage.install_snapshot(snap(100, 2))
    assert segment_count(tmp_path) == 1
    storage.append([Entry(2, 101), Entry(2, 102)])
    storage.close()
    state = DiskStorage(str(tmp_path)).load()
    assert state.snapshot.meta.index == 100 and [e.index for e in state.entries] == [101, 102]
    assert state.hard_state.term == 2


@pytest.mark.parametrize("index", [30, 70], ids=["term-mismatch", "log-ends-below"])
def test_interrupted_install_is_finished_on_open(tmp_path, index):
    """Crash after the leader's snapshot was written but before the old log was removed."""
    storage = filled(tmp_path)
    storage.set_hard_state(HardState(3, "n2", 10))
    storage.sync()
    storage.close()
    snapshots.write(str(tmp_path / "snap"), snap(index, 3))  # the old log has term 1 throughout
    assert inspect(str(tmp_path)).reset_log_to == index + 1
    storage = DiskStorage(str(tmp_path))
    assert storage.load().entries == ()
    storage.append([Entry(3, index + 1)])
    storage.close()
    assert [e.index for e in DiskStorage(str(tmp_path)).load().entries] == [index + 1]


def test_snapshot_that_the_log_continues_keeps_the_entries_after_it(tmp_path):
    storage = filled(tmp_path)
    storage.close()
    snapshots.write(str(tmp_path / "snap"), snap(30, 1))
    state = DiskStorage(str(tmp_path)).load()
    assert state.entries == tuple(log_of(60)[30:])


def test_leftover_temp_files_are_removed_on_open(tmp_path):
    filled(tmp_path).close()
    (tmp_path / "snap" / "snap-0000000000000005-0000000000000001.snap.tmp").write_bytes(b"half")
    (tmp_path / "hardstate.tmp").write_bytes(b"half")
    assert len(inspect(str(tmp_path)).warnings) == 2
    DiskStorage(str(tmp_path)).close()
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("index, term", [(61, 1), (30, 2)])
def test_compact_refuses_a_snapshot_the_log_does_not_hold(tmp_path, index, term):
    storage = filled(tmp_path)
    with pytest.raises(ValueError):
        storage.compact(snap(index, term))
    storage.close()
