"""A local cluster of real dtfd processes on loopback: for `dtfctl dev up`, demos and tests.

It writes a complete config set (cluster file, secret, tokens; files 0600) into a
directory, starts one dtfd process per node and stops them all, without root or systemd.
"""

from __future__ import annotations

import functools
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import tomli_w

ADMIN_TOKEN_NAME = "admin"


_handed_out: set[int] = set()
_handing_out = threading.Lock()


def free_ports(count: int) -> list[int]:
    """Ports the kernel hands out now, never one this process handed out before: a port picked
    for one cluster and not yet bound must not be picked again for a proxy or a second cluster."""
    with _handing_out:
        held: list[socket.socket] = []
        ports: list[int] = []
        try:
            while len(ports) < count:
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
                if port not in _handed_out:
                    ports.append(port)
            _handed_out.update(ports)
            return ports
        finally:
            for s in held:
                s.close()


def _write_private(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o600)


@dataclass
class ClusterFiles:
    directory: Path
    config: Path
    node_ids: list[str]
    api: dict[str, str]
    admin_token: str
    reader_token: str
    worker_token: str
    ca_file: str = ""  # set when the cluster serves TLS

    @property
    def scheme(self) -> str:
        return "https" if self.ca_file else "http"


def write_configs(
    directory: Path,
    nodes: int = 3,
    raft: dict | None = None,
    storage: dict | None = None,
    tls: dict | None = None,
    workload: dict | None = None,
) -> ClusterFiles:
    """A working config set for `nodes` nodes on free loopback ports (TLS if `tls` names cert, key, CA)."""
    directory.mkdir(parents=True, exist_ok=True)
    ids = [f"node{n + 1}" for n in range(nodes)]
    ports = free_ports(2 * nodes)
    api = {node: f"127.0.0.1:{ports[2 * n]}" for n, node in enumerate(ids)}
    admin, reader, worker = (secrets.token_urlsafe(24) for _ in range(3))
    _write_private(directory / "cluster.secret", secrets.token_urlsafe(32) + "\n")
    tokens = {
        "tokens": [
            {"name": ADMIN_TOKEN_NAME, "role": "admin", "token": admin},
            {"name": "reader", "role": "reader", "token": reader},
            {"name": "worker", "role": "worker", "token": worker},
        ]
    }
    _write_private(directory / "tokens.toml", tomli_w.dumps(tokens))
    cluster = {
        "cluster": {
            "secret_file": str(directory / "cluster.secret"),
            "nodes": [{"id": node, "peer": f"127.0.0.1:{ports[2 * n + 1]}", "api": api[node]} for n, node in enumerate(ids)],
        },
        "storage": {"data_dir": str(directory / "data" / "{node}"), **(storage or {})},
        "api": {"tokens_file": str(directory / "tokens.toml")},
    }
    if raft:
        cluster["raft"] = raft
    if tls:
        cluster["tls"] = tls
    if workload:
        cluster["workload"] = workload
    config = directory / "dtfd.toml"
    _write_private(config, tomli_w.dumps(cluster))
    return ClusterFiles(directory, config, ids, api, admin, reader, worker, (tls or {}).get("ca_file", ""))


def write_worker_config(files: ClusterFiles, worker_id: str, labels: dict[str, str] | None = None, slots: int = 2) -> Path:
    """A dtf-worker config pointing at every node of `files`, with its own work dir."""
    config = {
        "coordinator": {"urls": [f"{files.scheme}://{a}" for a in files.api.values()], "token": files.worker_token},
        "worker": {"id": worker_id, "labels": labels or {"os": "linux"}, "slots": slots, "work_dir": str(files.directory / "work" / worker_id)},
    }
    if files.ca_file:
        config["coordinator"]["ca_file"] = files.ca_file
    path = files.directory / f"{worker_id}.toml"
    _write_private(path, tomli_w.dumps(config))
    return path


@dataclass
class LocalCluster:
    files: ClusterFiles
    env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, node: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.files.directory / f"{node}.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "dtfd.cli", "--config", str(self.files.config), "--node", node],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env, **(extra_env or {})},
        )
        log.close()
        self.procs[node] = proc
        return proc

    def start_all(self) -> None:
        for node in self.files.node_ids:
            self.start(node)

    def start_worker(self, config: Path) -> subprocess.Popen:
        """A dtf-worker process for `config` (written by write_worker_config), named after its file."""
        name = config.stem
        log = open(self.files.directory / f"{name}.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "dtfd.worker", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
        )
        log.close()
        self.procs[name] = proc
        return proc

    def signal(self, node: str, signum: int) -> None:
        self.procs[node].send_signal(signum)

    def kill(self, node: str) -> None:
        self.procs[node].kill()
        self.procs[node].wait(timeout=10)

    def stop(self, node: str, timeout: float = 15) -> int:
        proc = self.procs[node]
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
        return proc.wait(timeout=timeout)

    def stop_all(self) -> None:
        """Workers first (they drain and deregister while the nodes still answer), then nodes."""
        order = [n for n in self.procs if n not in self.files.node_ids] + [n for n in self.procs if n in self.files.node_ids]
        for name in order:
            if self.procs[name].poll() is None:
                self.procs[name].send_signal(signal.SIGCONT)
                self.procs[name].terminate()
        for name in order:
            try:
                self.procs[name].wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.procs[name].kill()
                self.procs[name].wait(timeout=10)

    @functools.cached_property
    def _tls(self) -> ssl.SSLContext:
        """One context for every client: building one (what httpx does per client) costs ~25 ms of CPU."""
        return ssl.create_default_context(cafile=self.files.ca_file) if self.files.ca_file else ssl.create_default_context()

    def client(self, node: str, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token or self.files.admin_token}"}
        return httpx.Client(base_url=f"{self.files.scheme}://{self.files.api[node]}", headers=headers, timeout=5.0, verify=self._tls)

    def status(self, node: str) -> dict | None:
        try:
            with self.client(node) as c:
                reply = c.get("/v1/status", timeout=1.0)
            return reply.json() if reply.status_code == 200 else None
        except httpx.HTTPError:
            return None

    def wait_leader(self, timeout: float = 20, among: list[str] | None = None) -> str:
        """The leader every live node in `among` agrees on, waiting up to `timeout`."""
        nodes = among or [n for n in self.files.node_ids if n in self.procs and self.procs[n].poll() is None]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            views = [self.status(n) for n in nodes]
            leaders = {v["leader"] for v in views if v}
            if all(views) and len(leaders) == 1 and "" not in leaders:
                leader = leaders.pop()
                if any(v["id"] == leader and v["role"] == "leader" for v in views):
                    return leader
            time.sleep(0.02)
        raise TimeoutError(f"no agreed leader among {nodes} within {timeout}s\n{self.describe(nodes)}")

    def describe(self, nodes: list[str], lines: int = 15) -> str:
        """What each node says and the end of its log: the context a failed wait needs."""
        parts = []
        for node in nodes:
            proc = self.procs.get(node)
            state = "not started" if proc is None else ("running" if proc.poll() is None else f"exited {proc.returncode}")
            log = self.files.directory / f"{node}.log"
            tail = log.read_text(errors="replace").splitlines()[-lines:] if log.exists() else []
            parts.append(f"--- {node}: {state}, status {self.status(node)}\n" + "\n".join(tail))
        return "\n".join(parts)
