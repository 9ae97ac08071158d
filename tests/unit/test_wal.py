"""WAL framing, recovery rules (torn tail vs corruption), tail replacement, faults, group commit."""

from __future__ import annotations

import errno
import logging
import os
import random
import threading
import time

import pytest
import trio
import trio.testing

from dtfd.raft.messages import Entry, EntryKind, HardState
from dtfd.storage import wal as walmod
from dtfd.storage.datadir import DiskStorage
from dtfd.storage.groupcommit import GroupCommit, GroupCommitClosed, PersistPlacement
from dtfd.storage.interface import StorageCorrupt, StorageFailed
from dtfd.storage.memory import MemoryStorage
from dtfd.storage.wal import RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE, Wal, encode_records, scan

SMALL = 512  # segment size that makes a few dozen entries span several segments


def make_entries(first: int, n: int, term: int = 1, seed: int = 0) -> list[Entry]:
    rng = random.Random(seed * 7919 + first)
    return [Entry(term, i, EntryKind(i % 3), rng.randbytes(rng.randint(0, 90))) for i in range(first, first + n)]


def open_wal(path, **options) -> tuple[Wal, list[Entry]]:
    return Wal.open(str(path), 1, segment_size=options.pop("segment_size", SMALL), **options)


def written(path, entries: list[Entry], **options) -> list[str]:
    """Write entries in batches of 3, sync, close; return the segment paths."""
    w, _ = open_wal(path, **options)
    for i in range(0, len(entries), 3):
        w.append(entries[i : i + 3])
    w.sync()
    w.close()
    return [p for _, _, p in walmod.list_segments(str(path))[0]]


def record_offsets(path: str) -> list[int]:
    s = scan(os.path.dirname(path))
    return list(next(seg for seg in s.segments if seg.path == path).offsets)


def flip(path: str, offset: int, bit: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def test_roundtrip_across_segments(tmp_path):
    entries = make_entries(1, 40)
    segments = written(tmp_path, entries)
    assert len(segments) > 3
    w, got = open_wal(tmp_path)
    assert got == entries
    assert (w.first_index, w.last_index, w.last_term) == (1, 40, 1)


def test_conflicting_append_replaces_tail_across_segments(tmp_path):
    entries = make_entries(1, 40)
    written(tmp_path, entries)
    w, _ = open_wal(tmp_path)
    replacement = make_entries(12, 5, term=2, seed=1)
    w.append(replacement)
    w.sync()
    assert w.last_index == 16 and w.term_at(16) == 2 and w.term_at(11) == 1
    w.append(make_entries(17, 1, term=2, seed=2))
    w.close()
    _, got = open_wal(tmp_path)
    assert got == entries[:11] + replacement + make_entries(17, 1, term=2, seed=2)


@pytest.mark.parametrize(
    "batch, problem",
    [
        ([Entry(1, 5)], "outside the log"),
        ([Entry(1, 1), Entry(1, 3)], "not contiguous"),
        ([Entry(2, 1), Entry(1, 2)], "not contiguous"),
    ],
)
def test_append_refuses_gaps_and_terms_going_backwards(tmp_path, batch, problem):
    w, _ = open_wal(tmp_path)
    with pytest.raises(ValueError, match=problem):
        w.append(batch)


def test_append_refuses_lower_term_than_the_entry_before(tmp_path):
    w, _ = open_wal(tmp_path)
    w.append(make_entries(1, 3, term=3))
    with pytest.raises(ValueError, match="term 2 at 3 after term 3"):
        w.append([Entry(2, 3)])


def test_compact_removes_only_whole_segments_at_or_below(tmp_path):
    entries = make_entries(1, 40)
    segments = written(tmp_path, entries)
    w, _ = open_wal(tmp_path)
    second_first = int(os.path.basename(segments[2])[17:33], 16)
    w.compact(second_first - 1)
    assert w.first_index == second_first
    w.compact(10**9)
    assert len(walmod.list_segments(str(tmp_path))[0]) == 1  # the open segment stays
    w.close()
    _, got = open_wal(tmp_path)
    assert got == [e for e in entries if e.index >= got[0].index]


def test_reset_restarts_the_log(tmp_path):
    written(tmp_path, make_entries(1, 40))
    w, _ = open_wal(tmp_path)
    w.reset(100)
    w.append(make_entries(100, 2, term=4))
    w.close()
    w, got = open_wal(tmp_path)
    assert [e.index for e in got] == [100, 101] and w.first_index == 100


def _tear_partial_header(path, last):
    os.truncate(path, last + 10)


def _tear_partial_payload(path, last):
    os.truncate(path, os.path.getsize(path) - 1)


def _tear_zero_fill(path, last):
    with open(path, "ab") as f:
        f.write(bytes(8192))


def _tear_zero_final_record(path, last):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(last)
        f.write(bytes(size - last))


def _tear_bad_crc(path, last):
    flip(path, os.path.getsize(path) - 1, 3)


def _tear_length_past_eof(path, last):
    flip(path, last + 3, 6)  # the length's top byte: the record now runs past the end


@pytest.mark.parametrize(
    "tear, lost",
    [
        (_tear_partial_header, 1),
        (_tear_partial_payload, 1),
        (_tear_zero_fill, 0),
        (_tear_zero_final_record, 1),
        (_tear_bad_crc, 1),
        (_tear_length_past_eof, 1),
    ],
)
def test_torn_tail_is_truncated_with_a_warning(tmp_path, caplog, tear, lost):
    entries = make_entries(1, 40)
    last_segment = written(tmp_path, entries)[-1]
    last_record = record_offsets(last_segment)[-1]
    tear(last_segment, last_record)
    before = scan(str(tmp_path))
    assert before.torn is not None and before.corrupt is None
    with caplog.at_level(logging.WARNING, logger="dtf.storage"):
        w, got = open_wal(tmp_path)
    assert got == entries[: len(entries) - lost]
    assert f"wal torn tail truncated path={last_segment}" in caplog.text
    w.append(make_entries(w.last_index + 1, 2, seed=9))
    w.close()
    _, again = open_wal(tmp_path)
    assert again[: len(got)] == got and len(again) == len(got) + 2


def test_bad_record_with_valid_data_after_it_is_corruption(tmp_path):
    last_segment = written(tmp_path, make_entries(1, 40))[-1]
    offsets = record_offsets(last_segment)
    assert len(offsets) >= 2
    flip(last_segment, offsets[-2] + RECORD_HEADER_SIZE - 1)  # the crc of the next-to-last record
    with pytest.raises(StorageCorrupt) as err:
        open_wal(tmp_path)
    assert (err.value.path, err.value.offset) == (last_segment, offsets[-2])
    assert "valid data follows" in err.value.problem


def test_length_bitflip_in_non_final_record_is_corruption(tmp_path):
    """A grown length field makes a record swallow the ones after it and run past EOF."""
    last_segment = written(tmp_path, make_entries(1, 40))[-1]
    offsets = record_offsets(last_segment)
    flip(last_segment, offsets[0] + 2, 7)
    with pytest.raises(StorageCorrupt, match="runs past end of segment"):
        open_wal(tmp_path)


def test_damage_at_the_end_of_a_non_last_segment_is_corruption(tmp_path):
    segments = written(tmp_path, make_entries(1, 40))
    last_record = record_offsets(segments[1])[-1]
    os.truncate(segments[1], os.path.getsize(segments[1]) - 1)
    with pytest.raises(StorageCorrupt) as err:
        open_wal(tmp_path)
    assert (err.value.path, err.value.offset) == (segments[1], last_record)


def test_missing_middle_segment_is_corruption(tmp_path):
    segments = written(tmp_path, make_entries(1, 40))
    os.unlink(segments[1])
    with pytest.raises(StorageCorrupt, match="missing segment"):
        open_wal(tmp_path)


def test_out_of_order_segment_is_corruption(tmp_path):
    segments = written(tmp_path, make_entries(1, 40))
    name = os.path.basename(segments[2])
    shifted = walmod.segment_name(int(name[:16], 16), int(name[17:33], 16) + 1)
    os.rename(segments[2], os.path.join(tmp_path, shifted))
    with pytest.raises(StorageCorrupt, match="expected"):
        open_wal(tmp_path)


@pytest.mark.parametrize("offset", range(0, SEGMENT_HEADER_SIZE, 3))
def test_bad_segment_header_is_corruption(tmp_path, offset):
    segments = written(tmp_path, make_entries(1, 40))
    flip(segments[-1], offset, offset % 8)
    with pytest.raises(StorageCorrupt) as err:
        open_wal(tmp_path)
    assert err.value.path == segments[-1] and err.value.offset == 0


def test_truncated_segment_header_is_corruption(tmp_path):
    segments = written(tmp_path, make_entries(1, 40))
    os.truncate(segments[-1], 10)
    with pytest.raises(StorageCorrupt, match="segment header truncated"):
        open_wal(tmp_path)


def test_malformed_segment_name_is_corruption(tmp_path):
    written(tmp_path, make_entries(1, 5))
    (tmp_path / "zz.wal").write_bytes(b"")
    with pytest.raises(StorageCorrupt, match="malformed name"):
        open_wal(tmp_path)


@pytest.mark.parametrize(
    "bad, problem",
    [(Entry(1, 3), "record index 3 where 5 expected"), (Entry(1, 5), "record term 1 after term 2")],
)
def test_index_or_term_going_backwards_is_corruption(tmp_path, bad, problem):
    """Well-formed records (good CRC) whose index or term goes backwards: written by a bug, not a crash."""
    w, _ = open_wal(tmp_path)
    w.append(make_entries(1, 4, term=2))
    w.close()
    segment = walmod.list_segments(str(tmp_path))[0][0][2]
    with open(segment, "ab") as f:
        f.write(encode_records([bad]))
    with pytest.raises(StorageCorrupt, match=problem):
        open_wal(tmp_path)


def test_every_single_bit_flip_is_repaired_as_torn_tail_or_reported(tmp_path):
    """Flip one bit at every byte of every segment: only the final record may be cut off."""
    entries = make_entries(1, 24)
    segments = written(tmp_path, entries)
    final_record = record_offsets(segments[-1])[-1]
    rng = random.Random(1)
    for seg_no, segment in enumerate(segments):
        for offset in range(os.path.getsize(segment)):
            bit = rng.randrange(8)
            flip(segment, offset, bit)
            result = scan(str(tmp_path))
            flip(segment, offset, bit)
            if result.corrupt:
                continue
            in_final_record = seg_no == len(segments) - 1 and offset >= final_record
            assert in_final_record, f"flip in {segment} at {offset} accepted"
            assert result.torn is not None and result.entries == entries[:-1]


def _enospc_after(limit: int):
    """A write() that lets `limit` bytes through, then writes half a buffer and fails like a full disk."""
    budget = [limit]

    def write(fd: int, data) -> int:
        if budget[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = min(len(data), budget[0], max(1, len(data) // 2) if len(data) > budget[0] else len(data))
        budget[0] -= n
        return os.write(fd, data[:n])

    return write


def test_write_failure_rolls_back_and_leaves_no_partial_record(tmp_path):
    w, _ = open_wal(tmp_path, segment_size=1 << 20, write=_enospc_after(600))
    good = make_entries(1, 3)
    w.append(good)
    w.sync()
    with pytest.raises(StorageFailed, match="No space left"):
        w.append(make_entries(4, 20))
    assert not w.failed
    w.close()
    result = scan(str(tmp_path))
    assert result.torn is None and result.corrupt is None
    assert result.entries == good


def test_fsync_failure_makes_the_wal_refuse_further_writes(tmp_path):
    armed = [False]

    def failing_fsync(fd: int) -> None:
        if armed[0]:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        os.fsync(fd)

    w, _ = Wal.open(str(tmp_path), 1, fsync=failing_fsync)
    armed[0] = True
    w.append(make_entries(1, 2))
    with pytest.raises(StorageFailed, match="fsync failed"):
        w.sync()
    with pytest.raises(StorageFailed):
        w.append(make_entries(3, 1))
    w.close()
    _, got = open_wal(tmp_path)
    assert got == make_entries(1, 2)


class CountingFsync:
    """An fsync that counts calls and records how far the log was durable at each."""

    def __init__(self) -> None:
        self.calls = 0
        self.durable = 0
        self.storage: DiskStorage | None = None

    def __call__(self, fd: int) -> None:
        os.fdatasync(fd)
        self.calls += 1
        if self.storage is not None:
            self.durable = self.storage.last_index


async def _propose_concurrently(tmp_path, n: int, enabled: bool) -> tuple[int, int]:
    fsync = CountingFsync()
    storage = DiskStorage(str(tmp_path), fsync=fsync)
    storage.set_hard_state(HardState(term=1))
    storage.sync()
    fsync.storage, base = storage, fsync.calls
    commit = GroupCommit(storage, enabled=enabled)
    next_index = [1]
    late: list[int] = []

    async def proposer() -> None:
        for _ in range(4):
            index, next_index[0] = next_index[0], next_index[0] + 1
            await commit.append([Entry(1, index, data=index.to_bytes(8, "little"))])
            if fsync.durable < index:
                late.append(index)

    async with trio.open_nursery() as nursery:
        await nursery.start(commit.run)
        async with trio.open_nursery() as proposers:
            for _ in range(n):
                proposers.start_soon(proposer)
        nursery.cancel_scope.cancel()
    assert late == []
    fsyncs = fsync.calls - base
    storage.close()
    assert [e.index for e in DiskStorage(str(tmp_path)).load().entries] == list(range(1, 4 * n + 1))
    return fsyncs, commit.flushes


async def test_group_commit_shares_fsyncs_among_concurrent_proposers(tmp_path):
    fsyncs, flushes = await _propose_concurrently(tmp_path, 64, enabled=True)
    assert fsyncs == flushes
    assert fsyncs <= 16, f"{fsyncs} fsyncs for 256 appends from 64 proposers"


async def test_group_commit_off_costs_one_fsync_per_append(tmp_path):
    fsyncs, flushes = await _propose_concurrently(tmp_path, 8, enabled=False)
    assert fsyncs == flushes == 32


class RecordingDisk(MemoryStorage):
    """Memory storage noting on which thread each sync ran; a sync sleeps while `slow`."""

    def __init__(self) -> None:
        super().__init__()
        self.slow = False
        self.on_loop: list[bool] = []

    def sync(self) -> None:
        self.on_loop.append(threading.current_thread() is threading.main_thread())
        if self.slow:
            time.sleep(0.1)
        super().sync()


async def test_group_commit_syncs_small_appends_on_the_loop_until_the_disk_is_slow():
    disk = RecordingDisk()
    commit = GroupCommit(disk, placement=PersistPlacement(fast_s=0.05))
    async with trio.open_nursery() as nursery:
        await nursery.start(commit.run)
        await commit.append([Entry(1, 1)])
        assert disk.on_loop == [True], "a small append on a fast disk skips the thread hop"
        await commit.append([Entry(1, i) for i in range(2, 8)])
        assert disk.on_loop == [True, False], "a big batch goes to a thread"
        disk.slow = True
        await commit.append([Entry(1, 8)])
        disk.slow = False
        await commit.append([Entry(1, 9)])
        assert disk.on_loop[-1] is False, "after a slow sync, even a small append goes to a thread"
        nursery.cancel_scope.cancel()


async def test_group_commit_reports_write_errors_to_every_waiter(tmp_path):
    storage = DiskStorage(str(tmp_path), write=_enospc_after(400))
    commit = GroupCommit(storage)
    next_index = [1]
    outcome: dict[int, str] = {}

    async def proposer() -> None:
        for _ in range(8):
            index, next_index[0] = next_index[0], next_index[0] + 1
            try:
                await commit.append([Entry(0, index, data=bytes(64))])
                outcome[index] = "durable"
            except StorageFailed:
                outcome[index] = "failed"

    async with trio.open_nursery() as nursery:
        await nursery.start(commit.run)
        async with trio.open_nursery() as proposers:
            for _ in range(8):
                proposers.start_soon(proposer)
        nursery.cancel_scope.cancel()
    storage.close()
    durable = sorted(i for i, o in outcome.items() if o == "durable")
    assert "failed" in outcome.values() and durable == list(range(1, len(durable) + 1))
    assert [e.index for e in DiskStorage(str(tmp_path)).load().entries] == durable


async def test_group_commit_fails_queued_appends_when_the_flusher_stops(tmp_path):
    storage = DiskStorage(str(tmp_path))
    commit = GroupCommit(storage)
    outcome: list[str] = []

    next_index = [1]

    async def proposer() -> None:
        index, next_index[0] = next_index[0], next_index[0] + 1
        try:
            await commit.append([Entry(0, index)])
            outcome.append("durable")
        except GroupCommitClosed:
            outcome.append("closed")

    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as flusher:
            await flusher.start(commit.run)
            for _ in range(3):
                outer.start_soon(proposer)
            await trio.testing.wait_all_tasks_blocked()
            flusher.cancel_scope.cancel()
    assert len(outcome) == 3 and set(outcome) <= {"durable", "closed"}
    with pytest.raises(GroupCommitClosed):
        await commit.append([Entry(1, 4)])
    storage.close()
