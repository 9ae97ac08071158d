"""Three-node clusters of dtfd, PySyncObj and etcd on loopback, driven the same way by the benches.

Each cluster starts its processes, kills (SIGKILL) or stops (SIGTERM) one, restarts it on
the same data, says which node leads and how far each has applied, and builds the HTTP
request that writes one key. The benches hold every cluster in a try/finally that calls
`stop_all`, so no process outlives a run.
"""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from dtfd.devcluster import LocalCluster, free_ports, write_configs

HERE = Path(__file__).resolve().parent
PROBE_TIMEOUT_S = 0.5
STOP_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class Timing:
    heartbeat_ms: int = 50
    election_min_ms: int = 150
    election_max_ms: int = 300


@dataclass(frozen=True)
class WriteRequest:
    method: str
    path: str
    body: bytes
    headers: dict[str, str]


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return math.nan
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def machine_line() -> str:
    """Cores and load average: other work on the machine skews every number here, so print it."""
    one, five, _ = os.getloadavg()
    return f"machine: {os.cpu_count()} cores, load average {one:.2f} (1 min) {five:.2f} (5 min)"


class Cluster:
    """Processes by node name, with the operations every bench needs; subclasses say how to start one."""

    name = ""
    durability = ""

    def __init__(self, directory: Path, timing: Timing, nodes: list[str]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.timing = timing
        self.procs: dict[str, subprocess.Popen] = {}
        self.nodes = nodes
        self.http = httpx.Client(timeout=PROBE_TIMEOUT_S)

    def command(self, node: str) -> list[str]:
        raise NotImplementedError

    def base_url(self, node: str) -> str:
        raise NotImplementedError

    def write(self, key: str, client: str, seq: int) -> WriteRequest:
        raise NotImplementedError

    def is_leader(self, node: str) -> bool:
        raise NotImplementedError

    def applied(self, node: str) -> int | None:
        """How far `node` has applied, or None when it does not answer."""
        raise NotImplementedError

    def start(self, node: str) -> None:
        with open(self.directory / f"{node}.log", "ab") as log:
            self.procs[node] = subprocess.Popen(self.command(node), stdout=log, stderr=subprocess.STDOUT)

    def start_all(self) -> None:
        for node in self.nodes:
            self.start(node)

    def kill(self, node: str) -> None:
        self.procs[node].kill()
        self.procs[node].wait(timeout=STOP_TIMEOUT_S)

    def terminate(self, node: str) -> None:
        """SIGTERM, then SIGKILL if the process outlives STOP_TIMEOUT_S."""
        proc = self.procs[node]
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            proc.wait(timeout=STOP_TIMEOUT_S)
        self.http.close()

    def pid(self, node: str) -> int:
        return self.procs[node].pid

    def alive(self, node: str) -> bool:
        return node in self.procs and self.procs[node].poll() is None

    def post_mortem(self, lines: int = 8) -> str:
        """Exit codes and log tails of the nodes that are not running: what a failed run leaves to read."""
        report = []
        for node in self.nodes:
            if node in self.procs and not self.alive(node):
                tail = (self.directory / f"{node}.log").read_text(errors="replace").splitlines()[-lines:]
                report.append(f"{node} exited {self.procs[node].returncode}:\n    " + "\n    ".join(tail))
        return "\n".join(report) or "every node still runs"

    def leader(self) -> str | None:
        """The one live node that says it leads, or None (none, or more than one during a change)."""
        leaders = [n for n in self.nodes if self.alive(n) and self.is_leader(n)]
        return leaders[0] if len(leaders) == 1 else None

    def wait_whole(self, timeout: float) -> str:
        """Wait until every node runs, one leads, and every node has applied what the leader had at the start."""
        deadline = time.monotonic() + timeout
        target: int | None = None
        while time.monotonic() < deadline:
            dead = {n: self.procs[n].returncode for n in self.nodes if not self.alive(n)}
            if dead:
                raise RuntimeError(f"{self.name}: exited {dead}; logs in {self.directory}")
            leader = self.leader()
            if leader is not None:
                if target is None:
                    target = self.applied(leader)
                progress = [self.applied(n) for n in self.nodes]
                if target is not None and all(p is not None and p >= target for p in progress):
                    return leader
            time.sleep(0.02)
        raise TimeoutError(f"{self.name}: cluster not whole within {timeout}s")

    def _get(self, url: str) -> httpx.Response | None:
        try:
            return self.http.get(url)
        except httpx.HTTPError:
            return None


class Dtf(Cluster):
    name = "dtf"
    durability = "fsync per batch"

    def __init__(self, directory: Path, timing: Timing, fsync: bool = True) -> None:
        super().__init__(directory, timing, [])
        raft = {"heartbeat_ms": timing.heartbeat_ms, "election_min_ms": timing.election_min_ms, "election_max_ms": timing.election_max_ms}
        self.files = write_configs(directory, nodes=3, raft=raft, storage={"fsync": fsync})
        self.local = LocalCluster(self.files)
        self.procs = self.local.procs
        self.nodes = list(self.files.node_ids)
        self.http.headers["Authorization"] = f"Bearer {self.files.admin_token}"

    def start(self, node: str) -> None:
        self.local.start(node)

    def base_url(self, node: str) -> str:
        return f"http://{self.files.api[node]}"

    def write(self, key: str, client: str, seq: int) -> WriteRequest:
        body = json.dumps({"value": "x", "client": client, "seq": seq}).encode()
        headers = {"Authorization": f"Bearer {self.files.admin_token}", "Content-Type": "application/json"}
        return WriteRequest("PUT", f"/v1/kv/{key}", body, headers)

    def is_leader(self, node: str) -> bool:
        reply = self._get(self.base_url(node) + "/leader")
        return reply is not None and reply.status_code == 200

    def applied(self, node: str) -> int | None:
        reply = self._get(self.base_url(node) + "/v1/status")
        return reply.json()["applied_index"] if reply is not None and reply.status_code == 200 else None


class PySyncObj(Cluster):
    name = "pysyncobj"
    durability = "mmap journal, no fsync"

    def __init__(self, directory: Path, timing: Timing) -> None:
        super().__init__(directory, timing, ["p1", "p2", "p3"])
        ports = free_ports(6)
        self.raft_addr = {n: f"127.0.0.1:{ports[i]}" for i, n in enumerate(self.nodes)}
        self.http_port = {n: ports[3 + i] for i, n in enumerate(self.nodes)}

    def command(self, node: str) -> list[str]:
        partners = ",".join(self.raft_addr[n] for n in self.nodes if n != node)
        t = self.timing
        return [
            sys.executable, str(HERE / "pysyncobj_kv.py"), "--self", self.raft_addr[node], "--partners", partners,
            "--http", str(self.http_port[node]), "--journal", str(self.directory / f"{node}.journal"),
            "--heartbeat-ms", str(t.heartbeat_ms), "--election-min-ms", str(t.election_min_ms), "--election-max-ms", str(t.election_max_ms),
        ]  # fmt: skip

    def base_url(self, node: str) -> str:
        return f"http://127.0.0.1:{self.http_port[node]}"

    def write(self, key: str, client: str, seq: int) -> WriteRequest:
        return WriteRequest("PUT", f"/kv/{key}", b"x", {})

    def is_leader(self, node: str) -> bool:
        reply = self._get(self.base_url(node) + "/leader")
        return reply is not None and reply.status_code == 200

    def applied(self, node: str) -> int | None:
        reply = self._get(self.base_url(node) + "/status")
        return int(reply.json()["last_applied"]) if reply is not None and reply.status_code == 200 else None


class Etcd(Cluster):
    name = "etcd"
    durability = "fsync per batch"

    def __init__(self, directory: Path, timing: Timing) -> None:
        super().__init__(directory, timing, ["e1", "e2", "e3"])
        ports = free_ports(6)
        self.client_port = {n: ports[i] for i, n in enumerate(self.nodes)}
        self.peer_url = {n: f"http://127.0.0.1:{ports[3 + i]}" for i, n in enumerate(self.nodes)}

    @staticmethod
    def installed() -> bool:
        return shutil.which("etcd") is not None

    def command(self, node: str) -> list[str]:
        cluster = ",".join(f"{n}={self.peer_url[n]}" for n in self.nodes)
        client = self.base_url(node)
        return [
            "etcd", "--name", node, "--data-dir", str(self.directory / node),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", self.peer_url[node], "--initial-advertise-peer-urls", self.peer_url[node],
            "--initial-cluster", cluster, "--initial-cluster-state", "new", "--initial-cluster-token", "bench",
            "--heartbeat-interval", str(self.timing.heartbeat_ms), "--election-timeout", str(self.timing.election_max_ms),
            "--logger", "zap", "--log-level", "error",
        ]  # fmt: skip

    def base_url(self, node: str) -> str:
        return f"http://127.0.0.1:{self.client_port[node]}"

    def write(self, key: str, client: str, seq: int) -> WriteRequest:
        body = json.dumps({"key": base64.b64encode(key.encode()).decode(), "value": "eA=="}).encode()
        return WriteRequest("POST", "/v3/kv/put", body, {"Content-Type": "application/json"})

    def _status(self, node: str) -> dict | None:
        try:
            reply = self.http.post(self.base_url(node) + "/v3/maintenance/status", content=b"{}")
        except httpx.HTTPError:
            return None
        return reply.json() if reply.status_code == 200 else None

    def is_leader(self, node: str) -> bool:
        status = self._status(node)
        return status is not None and status.get("leader") == status["header"]["member_id"]

    def applied(self, node: str) -> int | None:
        status = self._status(node)
        return int(status.get("raftAppliedIndex", 0)) if status is not None else None

