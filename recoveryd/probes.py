"""Probes: what recoveryd looks at each cycle, returned as evidence kept with every action.

One Observation per node per cycle: process state from the executor, /health (ok,
refused, timed out, unhealthy; slow is noted), /v1/status (the node's Raft view and
state checksum), resources from psutil, and `dtfd verify` of the data dir when the node
is down with an exit status that does not already explain it.
"""

from __future__ import annotations

import json
import os
import sys
import time

import httpx
import msgspec
import psutil
import trio

from recoveryd.config import Config, Node
from recoveryd.executors import Executor, ExecutorError, ProcessState

EX_DATAERR = 65


class Health(msgspec.Struct, frozen=True):
    outcome: str  # ok | refused | timeout | unhealthy | error
    latency_ms: float = 0.0
    slow: bool = False
    detail: str = ""


class Resources(msgspec.Struct, frozen=True):
    disk_free_bytes: int
    inodes_free_pct: float
    rss_bytes: int = 0
    open_fds: int = 0
    cpu_pct: float = 0.0


class Verify(msgspec.Struct, frozen=True):
    status: str  # ok | corrupt | missing | error
    exit_code: int
    problems: list[str] = []


class Observation(msgspec.Struct, frozen=True):
    node: str
    at: float  # wall clock, seconds
    process: ProcessState
    health: Health
    status: dict | None = None  # /v1/status, None when it did not answer
    resources: Resources | None = None
    verify: Verify | None = None

    @property
    def up(self) -> bool:
        return self.process.active and self.health.outcome == "ok"


class Prober:
    def __init__(self, config: Config, executor: Executor, client: httpx.AsyncClient) -> None:
        self.config, self.executor, self.client = config, executor, client
        self._procs: dict[str, psutil.Process] = {}  # kept so cpu_percent() measures since the last probe
        self._verified: dict[str, Verify] = {}  # per node while it stays down: the data dir does not change

    async def cycle(self) -> dict[str, Observation]:
        """Every node probed concurrently; each probe bounded by its own deadlines."""
        results: dict[str, Observation] = {}

        async def one(node: Node) -> None:
            results[node.name] = await self.observe(node)

        async with trio.open_nursery() as nursery:
            for node in self.config.nodes:
                nursery.start_soon(one, node, name=f"probe {node.name}")
        return results

    async def observe(self, node: Node) -> Observation:
        at = time.time()
        try:
            process = await self.executor.state(node)
        except (ExecutorError, trio.TooSlowError, OSError) as exc:
            process = ProcessState(False, 0, None, 0, f"unknown: {exc}")
        health, status = await self.health(node), None
        if health.outcome == "ok":
            status = await self.status(node)
        verify = None
        if process.active:
            self._verified.pop(node.name, None)
        elif process.exit_code in (None, EX_DATAERR) or health.outcome == "unhealthy":
            verify = self._verified.get(node.name) or await self.verify(node)
            self._verified[node.name] = verify
        return Observation(node.name, at, process, health, status, self.resources(node, process.pid), verify)

    async def health(self, node: Node) -> Health:
        timeout = self.config.probes.timeout_s
        started = time.monotonic()
        try:
            with trio.fail_after(timeout):
                reply = await self.client.get(f"{node.url}/health", timeout=timeout)
        except (trio.TooSlowError, httpx.TimeoutException):
            return Health("timeout", timeout * 1000, detail=f"no answer within {timeout}s")
        except httpx.ConnectError as exc:
            return Health("refused", detail=str(exc) or "connection refused")
        except httpx.HTTPError as exc:
            return Health("error", detail=f"{type(exc).__name__}: {exc}")
        latency = time.monotonic() - started
        outcome = "ok" if reply.status_code == 200 else "unhealthy"
        detail = "" if outcome == "ok" else f"{reply.status_code} {reply.text[:200]}"
        return Health(outcome, round(latency * 1000, 1), latency > self.config.probes.slow_s, detail)

    async def status(self, node: Node) -> dict | None:
        return await fetch_status(self.client, node, self.config.probes.timeout_s)

    def resources(self, node: Node, pid: int) -> Resources | None:
        try:
            fs = os.statvfs(node.data_dir)
        except OSError:
            return None
        inodes = 100.0 * fs.f_favail / fs.f_files if fs.f_files else 100.0
        found = Resources(fs.f_bavail * fs.f_frsize, round(inodes, 2))
        if not pid:
            return found
        proc = self._procs.get(node.name)
        try:
            if proc is None or proc.pid != pid:
                proc = self._procs[node.name] = psutil.Process(pid)
                proc.cpu_percent(None)  # the first call only starts the measurement
            found = msgspec.structs.replace(found, rss_bytes=proc.memory_info().rss, cpu_pct=proc.cpu_percent(None))
            return msgspec.structs.replace(found, open_fds=proc.num_fds())  # needs ptrace rights over another user's process
        except psutil.Error:
            return found

    async def verify(self, node: Node) -> Verify:
        """`dtfd verify --json`: offline check of a stopped node's data dir (exit 0 ok, 65 corrupt, 66 missing)."""
        command = [sys.executable, "-m", "dtfd.cli", "verify", "--data-dir", node.data_dir, "--json"]
        try:
            with trio.fail_after(self.config.probes.verify_timeout_s):
                done = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)
            report = json.loads(done.stdout or b"{}")
        except (trio.TooSlowError, OSError, ValueError) as exc:
            return Verify("error", -1, [f"dtfd verify: {exc}"])
        problems = [str(p.get("problem", p)) if isinstance(p, dict) else str(p) for p in report.get("problems", [])]
        return Verify(report.get("status", "error"), done.returncode, problems)



async def fetch_status(client: httpx.AsyncClient, node: Node, timeout: float) -> dict | None:
    """The node's /v1/status (its Raft view), or None if it does not answer in time."""
    try:
        with trio.fail_after(timeout):
            reply = await client.get(f"{node.url}/v1/status", timeout=timeout)
        return reply.json() if reply.status_code == 200 else None
    except (trio.TooSlowError, httpx.HTTPError, ValueError):
        return None
