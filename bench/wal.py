"""WAL throughput: appends/s and fsyncs/s with group commit on and off.

    .venv/bin/python bench/wal.py [--quick] [--dir DIR]

Runs 1, 8 and 64 concurrent trio proposers appending 256-byte and 4-KiB entries
through GroupCommit over DiskStorage, beside the raw write+fdatasync rate of the
same disk measured in the same run. Prints a table; nothing here fails on timing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import trio

from dtfd.raft.messages import Entry, HardState
from dtfd.storage.datadir import DiskStorage
from dtfd.storage.groupcommit import GroupCommit


def raw_fsync_rate(directory: str, seconds: float) -> tuple[float, float]:
    """(fsyncs/s, mean latency in ms) of a 256-byte write + fdatasync loop."""
    path = os.path.join(directory, "raw-fsync")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    block, count = os.urandom(256), 0
    start = time.perf_counter()
    try:
        while time.perf_counter() - start < seconds:
            os.write(fd, block)
            os.fdatasync(fd)
            count += 1
    finally:
        os.close(fd)
        os.unlink(path)
    elapsed = time.perf_counter() - start
    return count / elapsed, elapsed / count * 1000


class CountingFsync:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, fd: int) -> None:
        os.fdatasync(fd)
        self.calls += 1


async def proposers(directory: str, n: int, size: int, group: bool, seconds: float) -> dict[str, float]:
    data_dir = tempfile.mkdtemp(dir=directory)
    fsync = CountingFsync()
    storage = DiskStorage(data_dir, fsync=fsync)
    storage.set_hard_state(HardState(term=1))
    storage.sync()
    commit = GroupCommit(storage, enabled=group)
    payload, next_index, appended = os.urandom(size), [1], [0]
    latencies: list[float] = []
    base = fsync.calls

    async def proposer(deadline: float) -> None:
        while time.perf_counter() < deadline:
            index, next_index[0] = next_index[0], next_index[0] + 1
            t0 = time.perf_counter()
            await commit.append([Entry(1, index, data=payload)])
            latencies.append(time.perf_counter() - t0)
            appended[0] += 1

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        await nursery.start(commit.run)
        async with trio.open_nursery() as workers:
            for _ in range(n):
                workers.start_soon(proposer, start + seconds)
        nursery.cancel_scope.cancel()
    elapsed = time.perf_counter() - start
    fsyncs = fsync.calls - base
    storage.close()
    shutil.rmtree(data_dir)
    return {
        "appends/s": appended[0] / elapsed,
        "fsyncs/s": fsyncs / elapsed,
        "per fsync": appended[0] / max(fsyncs, 1),
        "fsyncs/batch": fsyncs / max(commit.flushes, 1),
        "latency ms": sum(latencies) / max(len(latencies), 1) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (about 5 s in all)")
    parser.add_argument("--dir", default=None, help="where to write (default: the system temp dir)")
    args = parser.parse_args()
    seconds = 0.2 if args.quick else 1.5
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
    directory = tempfile.mkdtemp(prefix="dtf-bench-", dir=args.dir)
    try:
        rate, latency = raw_fsync_rate(directory, seconds)
        print(f"raw write+fdatasync: {rate:,.0f} fsyncs/s, {latency:.3f} ms each ({directory})")
        header = f"{'proposers':>9} {'entry':>6} {'group':>5} {'appends/s':>10} {'fsyncs/s':>9} {'per fsync':>9} {'fsyncs/batch':>12} {'latency ms':>10}"
        print(header)
        print("-" * len(header))
        for size in (256, 4096):
            for n in (1, 8, 64):
                for group in (True, False):
                    r = trio.run(proposers, directory, n, size, group, seconds)
                    print(
                        f"{n:>9} {size:>6} {'on' if group else 'off':>5} {r['appends/s']:>10,.0f} {r['fsyncs/s']:>9,.0f}"
                        f" {r['per fsync']:>9.1f} {r['fsyncs/batch']:>12.2f} {r['latency ms']:>10.3f}"
                    )
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
