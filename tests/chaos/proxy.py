"""Partitions on loopback: a fault-injecting TCP proxy on every peer link.

dtfd nodes read one cluster file and dial each peer at the `peer` address it lists. Here
each node gets its own copy of the file in which its peers' addresses are proxies, one per
directed link (node A dialling B goes through the A->B proxy), while its own entry keeps
the real address it listens on. Cutting both proxies of a pair partitions the pair, and
only that pair: client traffic (the API addresses) is untouched, as in a network where
the Raft links fail but clients still reach every node.
"""

from __future__ import annotations

import enum
import os
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w
import trio

from dtfd.devcluster import ClusterFiles, LocalCluster, free_ports
from dtfd.storage import failpoints

CHUNK = 65536


class Mode(enum.Enum):
    PASS = "pass"
    DROP = "drop"  # connections are reset and new ones closed at once: the peer sees a dead link
    BLACKHOLE = "blackhole"  # connections stay open, bytes vanish: the peer sees silence and times out


@dataclass
class LinkProxy:
    """One directed link: listens on `port`, forwards to `target`, optionally delayed."""

    port: int
    target: tuple[str, int]
    mode: Mode = Mode.PASS
    delay_s: float = 0.0
    connections: set[trio.CancelScope] = field(default_factory=set)

    def set(self, mode: Mode, delay_s: float = 0.0) -> None:
        """Change the link. Cutting it (DROP) closes every connection it carries now; so does
        healing a BLACKHOLE, whose connections lost bytes mid-stream and must start afresh."""
        if mode is Mode.DROP or (self.mode is Mode.BLACKHOLE and mode is not Mode.BLACKHOLE):
            for scope in self.connections:
                scope.cancel()
        self.mode, self.delay_s = mode, delay_s

    async def serve(self, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, downstream: trio.SocketStream) -> None:
        if self.mode is Mode.DROP:
            await downstream.aclose()
            return
        with trio.CancelScope() as scope:
            self.connections.add(scope)
            try:
                with trio.move_on_after(1.0) as connecting:
                    upstream = await trio.open_tcp_stream(*self.target)
                if connecting.cancelled_caught:
                    return
                async with downstream, upstream, trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, downstream, upstream, nursery.cancel_scope)
                    nursery.start_soon(self._pump, upstream, downstream, nursery.cancel_scope)
            except OSError:
                pass  # the target is down: the dialling node sees a closed link
            finally:
                self.connections.discard(scope)
        await downstream.aclose()

    async def _pump(self, source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope) -> None:
        """Copy one direction; chunks are held `delay_s` from their arrival, keeping their order.

        Either end breaking ends the whole connection (`done`), as a real link would."""
        send, receive = trio.open_memory_channel[tuple[float, bytes]](256)

        async def deliver() -> None:
            try:
                async for arrived, chunk in receive:
                    await trio.sleep_until(arrived + self.delay_s)
                    if self.mode is Mode.PASS:
                        await sink.send_all(chunk)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            done.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(deliver)
            async with send:
                try:
                    while chunk := await source.receive_some(CHUNK):
                        await send.send((trio.current_time(), chunk))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    done.cancel()


@dataclass
class Mesh:
    """A proxy for every directed link between the nodes of a cluster, and the partitions they make."""

    files: ClusterFiles
    links: dict[tuple[str, str], LinkProxy] = field(default_factory=dict)
    configs: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        document = tomllib.loads(self.files.config.read_text())
        peers = {n["id"]: n["peer"] for n in document["cluster"]["nodes"]}
        pairs = [(a, b) for a in peers for b in peers if a != b]
        for (a, b), port in zip(pairs, free_ports(len(pairs)), strict=True):
            host, target = peers[b].rsplit(":", 1)
            self.links[a, b] = LinkProxy(port, (host, int(target)))
        for node in peers:
            own = dict(document)
            own["cluster"] = {
                **document["cluster"],
                "nodes": [
                    {**n, "peer": n["peer"] if n["id"] == node else f"127.0.0.1:{self.links[node, n['id']].port}"}
                    for n in document["cluster"]["nodes"]
                ],
            }
            path = self.files.directory / f"dtfd-{node}.toml"
            path.write_text(tomli_w.dumps(own))
            path.chmod(0o600)
            self.configs[node] = path

    async def serve(self, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for link in self.links.values():
                await nursery.start(link.serve)
            task_status.started()

    def isolate(self, node: str, mode: Mode = Mode.DROP) -> None:
        """Cut `node` off from every other node, both directions."""
        for (a, b), link in self.links.items():
            if node in (a, b):
                link.set(mode)

    def heal(self) -> None:
        for link in self.links.values():
            link.set(Mode.PASS)


class ProxiedCluster(LocalCluster):
    """A LocalCluster whose nodes each read their own config from a Mesh, so peer traffic crosses
    the proxies, and each watch their own storage failpoint file, so a nemesis can break their disk."""

    def __init__(self, files: ClusterFiles, mesh: Mesh) -> None:
        super().__init__(files)
        self.mesh = mesh

    def failpoints(self, node: str) -> Path:
        return self.files.directory / f"failpoints-{node}"

    def start(self, node: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(self.files.directory / f"{node}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "dtfd.cli", "--config", str(self.mesh.configs[node]), "--node", node],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env, failpoints.FAILPOINTS_ENV: str(self.failpoints(node)), **(extra_env or {})},
            )
        self.procs[node] = proc
        return proc
