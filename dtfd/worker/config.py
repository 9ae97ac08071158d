"""dtf-worker configuration: one TOML file per worker, strict like dtfd's.

Unknown keys, wrong types and impossible values are refused with one line naming the
key (exit EX_CONFIG, 78), so a typo never silently falls back to a default. Resources
left at 0 are detected with psutil; the worker id defaults to the hostname.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
import psutil

from dtfd.config import ConfigError, Log, Strict, parse_address, read_strict, read_token

DEFAULT_PATH = "/etc/dtf/worker.toml"


class Coordinator(Strict):
    urls: tuple[str, ...] = ("http://127.0.0.1:7001", "http://127.0.0.1:7002", "http://127.0.0.1:7003")
    token: str = ""  # inline token; when set, token_file is not read
    token_file: str = "/etc/dtf/worker.token"
    ca_file: str = ""  # CA bundle for https:// URLs (empty: the system's)
    request_timeout_s: float = 5.0
    lease_wait_s: float = 10.0  # long-poll wait sent with each lease request


class Worker(Strict):
    id: str = ""  # empty: the hostname
    labels: dict[str, str] = {}
    slots: int = 1  # tasks run at once
    cpus: int = 0  # 0: detected
    memory_mb: int = 0  # 0: detected
    work_dir: str = "/var/lib/dtf-worker"


class Tasks(Strict):
    output_cap_bytes: int = 262_144  # stdout+stderr kept per task (the tail)
    kill_grace_s: float = 10.0  # SIGTERM to SIGKILL
    drain_timeout_s: float = 60.0  # on SIGTERM, how long running tasks may finish
    junit_max_bytes: int = 16 << 20
    spool: bool = True  # keep unacknowledged results in work_dir across restarts


class Config(Strict):
    coordinator: Coordinator = Coordinator()
    worker: Worker = Worker()
    tasks: Tasks = Tasks()
    log: Log = Log()


class WorkerConfig(msgspec.Struct, frozen=True):
    """The file with every default resolved: id, token, detected resources."""

    config: Config
    id: str
    token: str
    cpus: int
    memory_mb: int
    work_dir: Path


def load(path: str | Path) -> WorkerConfig:
    config = read_strict(path, Config)
    try:
        return _resolve(config)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _resolve(config: Config) -> WorkerConfig:
    coordinator, worker, tasks = config.coordinator, config.worker, config.tasks
    if not coordinator.urls:
        raise ConfigError("coordinator.urls: at least one coordinator URL is required")
    for n, url in enumerate(coordinator.urls):
        _check_url(url, f"coordinator.urls[{n}]")
    for key in ("request_timeout_s", "lease_wait_s"):
        if getattr(coordinator, key) <= 0:
            raise ConfigError(f"coordinator.{key}: must be positive")
    for key in ("output_cap_bytes", "junit_max_bytes"):
        if getattr(tasks, key) < 1024:
            raise ConfigError(f"tasks.{key}: must be at least 1024")
    for key in ("kill_grace_s", "drain_timeout_s"):
        if getattr(tasks, key) <= 0:
            raise ConfigError(f"tasks.{key}: must be positive")
    if worker.slots < 1:
        raise ConfigError("worker.slots: must be at least 1")
    for key in ("cpus", "memory_mb"):
        if getattr(worker, key) < 0:
            raise ConfigError(f"worker.{key}: must be 0 (detect) or positive")
    if config.log.level.lower() not in ("debug", "info", "warning", "error", "critical"):
        raise ConfigError(f"log.level: {config.log.level!r} is not debug, info, warning, error or critical")
    worker_id = worker.id or socket.gethostname()
    if not worker_id.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ConfigError(f"worker.id: {worker_id!r} must be letters, digits, '-', '_' or '.'")
    if not worker.work_dir:
        raise ConfigError("worker.work_dir: must not be empty")
    return WorkerConfig(
        config=config,
        id=worker_id,
        token=_token(coordinator),
        cpus=worker.cpus or len(os.sched_getaffinity(0)),
        memory_mb=worker.memory_mb or psutil.virtual_memory().total >> 20,
        work_dir=Path(worker.work_dir),
    )


def _check_url(url: str, key: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"{key}: {url!r} must start with http:// or https://")
    if parts.path.strip("/") or parts.query or parts.fragment:
        raise ConfigError(f"{key}: {url!r} must be scheme://host:port with no path")
    parse_address(parts.netloc, key)


def _token(coordinator: Coordinator) -> str:
    return read_token(coordinator.token, coordinator.token_file, "coordinator")
