"""The driver persists small Readys on the event loop while the disk is fast, and in a
worker thread once it has been slow, so a stalled disk never freezes the node's API."""

from __future__ import annotations

import threading
import time

import trio

from dtfd.server.node import Node
from dtfd.state.machine import Envelope, Put
from dtfd.storage.memory import MemoryStorage
from tests.unit.nodes import single_node

STALL_S = 0.3


class StallingDisk(MemoryStorage):
    """Memory storage whose fsync stalls while `stalling` is set; it notes which thread synced."""

    def __init__(self) -> None:
        super().__init__()
        self.stalling = False
        self.sync_threads: list[bool] = []  # True: the sync ran on the event loop's thread

    def sync(self) -> None:
        self.sync_threads.append(threading.current_thread() is threading.main_thread())
        if self.stalling:
            time.sleep(STALL_S)
        super().sync()


async def longest_gap(stop: trio.Event) -> float:
    """The longest this task waited to be scheduled, ticking every 10 ms until `stop`."""
    worst = 0.0
    while not stop.is_set():
        before = trio.current_time()
        await trio.sleep(0.01)
        worst = max(worst, trio.current_time() - before - 0.01)
    return worst


async def write(node: Node, seq: int) -> None:
    await node.propose(Envelope("c", seq, 0.0, Put(f"k{seq}", "v")))
    assert node.machine.image.kv[f"k{seq}"] == "v"


async def test_fast_disk_persists_on_the_loop_and_a_stalled_one_moves_to_a_thread() -> None:
    disk = StallingDisk()
    node = single_node(disk)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.run)
        with trio.fail_after(10):
            while not node.is_leader:
                await trio.sleep(0.01)
            for seq in range(1, 6):
                await write(node, seq)
        assert disk.sync_threads and all(disk.sync_threads), "fast small persists run on the loop"

        disk.stalling = True
        disk.sync_threads.clear()
        with trio.fail_after(10):
            await write(node, 6)  # the first stall is met on the loop: nothing has warned of it
            stop, gaps = trio.Event(), []

            async def watch() -> None:
                gaps.append(await longest_gap(stop))

            nursery.start_soon(watch)
            for seq in range(7, 10):
                await write(node, seq)
            stop.set()
        assert disk.sync_threads[0] is True
        assert disk.sync_threads[1:] and not any(disk.sync_threads[1:]), "after a stall, persists go to a thread"
        with trio.fail_after(5):
            while not gaps:
                await trio.sleep(0.01)
        assert gaps[0] < STALL_S / 2, f"the loop was blocked {gaps[0]:.3f}s while the disk stalled"
        nursery.cancel_scope.cancel()
