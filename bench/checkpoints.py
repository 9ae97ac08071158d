"""Event-loop stalls from encoding a big state: checkpoints, compactions and /v1/status.

    .venv/bin/python bench/checkpoints.py [--state-mb 100] [--value-bytes 1000] [--seconds 20] [--status-s 1]

One in-process node (memory storage, the default raft timing: 10 ms ticks, a checkpoint
every 1000 entries, a compaction every 10000) is filled with --state-mb of key/values,
then 8 concurrent clients write small keys for --seconds while /v1/status's checksum is
asked for every --status-s (recoveryd's probe; 0: never). A task that sleeps 5 ms measures how late the
loop wakes it. Prints writes/s, the whole-state encodes and their total time, and the loop's
stalls: the longest, how many exceeded 100 ms (half the 150-300 ms election timeout) and
their sum. Numbers only; nothing here fails on a timing.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dtfd.raft import Config as RaftConfig  # noqa: E402
from dtfd.server.node import Node, Timing  # noqa: E402
from dtfd.state import machine as machine_module  # noqa: E402
from dtfd.state.machine import Batch, Envelope, Image, Put  # noqa: E402
from dtfd.storage.memory import MemoryStorage  # noqa: E402

WRITERS = 8
STALL_PROBE_S = 0.005


class TimedEncoder:
    """The state machine's encoder, timing each encode of the whole image."""

    def __init__(self, encoder) -> None:
        self.encoder = encoder
        self.seconds: list[float] = []

    def encode(self, obj: object) -> bytes:
        if not isinstance(obj, Image):
            return self.encoder.encode(obj)
        started = time.perf_counter()
        data = self.encoder.encode(obj)
        self.seconds.append(time.perf_counter() - started)
        return data


async def fill(node: Node, megabytes: int, value_bytes: int) -> None:
    value, per_entry = "s" * value_bytes, max(1, 100_000 // value_bytes)
    keys = megabytes * 1_000_000 // value_bytes
    for seq, first in enumerate(range(0, keys, per_entry), start=1):
        puts = [Put(f"state-{k:09d}", value) for k in range(first, min(keys, first + per_entry))]
        await node.propose(Envelope("fill", seq, 0.0, Batch(puts)), timeout=60)


async def measure(args: argparse.Namespace) -> None:
    config = RaftConfig(id="n1", voters=("n1",), rng=random.Random(1), election_min=15, election_max=30, heartbeat=5)
    node = Node(config, MemoryStorage(), Timing(tick_s=0.01, snapshot_every=10_000, checksum_every=1000), send=lambda m: None)
    encoder = TimedEncoder(machine_module._encoder)
    machine_module._encoder = encoder
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.run)
        while not node.is_leader:
            await trio.sleep(0.01)
        started = time.perf_counter()
        await fill(node, args.state_mb, args.value_bytes)
        size = len(node.machine.snapshot())
        print(f"filled {size / 1e6:.0f} MB ({args.value_bytes}-byte values) in {time.perf_counter() - started:.1f}s")

        encoder.seconds.clear()
        stalls: list[float] = []
        written = [0]
        deadline = trio.current_time() + args.seconds

        async def writer(client: str) -> None:
            seq = 0
            while trio.current_time() < deadline:
                seq += 1
                await node.propose(Envelope(client, seq, 0.0, Put(f"{client}-{seq}", "v" * 100)))
                written[0] += 1

        async def probe_stalls() -> None:
            while trio.current_time() < deadline:
                before = trio.current_time()
                await trio.sleep(STALL_PROBE_S)
                stalls.append(trio.current_time() - before - STALL_PROBE_S)

        async def status_poll() -> None:
            while trio.current_time() < deadline:
                await node.checksum()
                await trio.sleep(args.status_s)

        first_index = node.machine.applied
        async with trio.open_nursery() as load:
            for w in range(WRITERS):
                load.start_soon(writer, f"w{w}")
            load.start_soon(probe_stalls)
            if args.status_s:
                load.start_soon(status_poll)
        nursery.cancel_scope.cancel()
    entries = node.machine.applied - first_index
    long = [s for s in stalls if s > 0.1]
    print(f"load {args.seconds:g}s: {written[0] / args.seconds:.0f} writes/s, {entries} entries applied")
    print(f"whole-state encodes: {len(encoder.seconds)}, {sum(encoder.seconds):.2f}s in all "
          f"({sum(encoder.seconds) / args.seconds:.0%} of the time), longest {max(encoder.seconds, default=0):.3f}s")
    print(f"loop stalls: longest {max(stalls):.3f}s, {len(long)} over 100 ms summing {sum(long):.2f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-mb", type=int, default=100)
    parser.add_argument("--value-bytes", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--status-s", type=float, default=1.0)
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}")
    trio.run(measure, args)
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
