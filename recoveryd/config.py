"""recoveryd's configuration (/etc/dtf/recoveryd.toml): the nodes it watches and how it may act.

Read with dtfd's strict reader: unknown keys, wrong types and impossible values are one
line naming the key, and the daemon exits 78 (EX_CONFIG) before touching any node.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from dtfd.config import ConfigError, Log, Strict, parse_address, read_strict, read_token

DEFAULT_PATH = "/etc/dtf/recoveryd.toml"
MODES = ("systemd", "local")


class Node(Strict):
    name: str
    url: str  # the node's API, http(s)://host:port
    data_dir: str
    unit: str = ""  # empty: dtfd@NAME.service


class Daemon(Strict):
    mode: str = "systemd"  # systemd: systemctl on dtfd@ units; local: processes recoveryd starts itself
    listen: str = "127.0.0.1:7090"  # recoveryd's own /health, /metrics, /v1/history
    state_dir: str = "/var/lib/dtf-recoveryd"  # DuckDB history, in-flight actions, local pid files
    recovery_log: str = ""  # one JSON line per record; empty: STATE_DIR/recovery.jsonl
    token: str = ""  # admin token for the nodes' API; when set, token_file is not read
    token_file: str = "/etc/dtf/recoveryd.token"
    ca_file: str = ""
    report_to_cluster: bool = True  # also propose each record into the replicated history


class Probes(Strict):
    interval_s: float = 1.0
    timeout_s: float = 0.8  # each HTTP probe; a /health slower than this is "timed out"
    slow_s: float = 0.25  # a /health answered slower than this is "slow" (reported, not acted on)
    verify_timeout_s: float = 30.0  # `dtfd verify` of a stopped node's data dir


class Thresholds(Strict):
    confirm_probes: int = 2  # consecutive probes that must agree before any action
    hang_probes: int = 3  # consecutive timed-out /health probes (process alive) before a restart
    disk_free_min_bytes: int = 1 << 30
    inodes_free_min_pct: float = 5.0
    rss_max_bytes: int = 4 << 30
    open_fds_max: int = 50_000
    cpu_max_pct: float = 400.0  # of one CPU, sustained over confirm_probes
    slow_follower_lag: int = 10_000  # entries behind the leader
    slow_follower_s: float = 30.0  # for this long before a snapshot catch-up; still behind this long after it: reported
    term_gap: int = 10  # a node this many terms ahead of the leader is reported as term divergence


class Policy(Strict):
    max_restart_attempts: int = 5  # per node per restart_window_s; past it the node is marked failed
    restart_window_s: float = 600.0
    restart_cooldown_s: float = 60.0  # between two restarts of one node (the first is immediate)
    start_timeout_s: float = 30.0  # a started node must answer /health within this
    stop_timeout_s: float = 20.0  # SIGTERM, then SIGKILL (local mode; systemd has TimeoutStopSec)
    catch_up_timeout_s: float = 300.0  # a reseeded node must rejoin within this
    backups_keep: int = 2  # per node; older DIR.backup-* are removed when disk runs short


class Local(Strict):
    dtfd_config: str = "/etc/dtf/dtfd.toml"  # the cluster file the local nodes run with


class Config(Strict):
    recoveryd: Daemon = Daemon()
    probes: Probes = Probes()
    thresholds: Thresholds = Thresholds()
    policy: Policy = Policy()
    local: Local = Local()
    log: Log = Log()
    nodes: tuple[Node, ...] = ()

    @property
    def recovery_log(self) -> Path:
        return Path(self.recoveryd.recovery_log or Path(self.recoveryd.state_dir) / "recovery.jsonl")

    @property
    def max_parallel(self) -> int:
        """Never act on more than (n-1)/2 nodes at once; a lone node may still be restarted."""
        return max(1, (len(self.nodes) - 1) // 2)

    def unit(self, node: Node) -> str:
        return node.unit or f"dtfd@{node.name}.service"


class Loaded(msgspec.Struct, frozen=True):
    config: Config
    token: str


def load(path: str | Path) -> Loaded:
    config = read_strict(path, Config)
    try:
        return Loaded(config, _check(config))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _check(config: Config) -> str:
    """Refuse what cannot work, naming the key; return the admin token."""
    if not config.nodes:
        raise ConfigError("nodes: at least one [[nodes]] entry is required")
    names = [n.name for n in config.nodes]
    for n, node in enumerate(config.nodes):
        if not node.name or not node.name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"nodes[{n}].name: {node.name!r} must be letters, digits, '-' or '_'")
        if names.count(node.name) > 1:
            raise ConfigError(f"nodes[{n}].name: duplicate {node.name!r}")
        scheme, sep, rest = node.url.partition("://")
        if scheme not in ("http", "https") or not sep:
            raise ConfigError(f"nodes[{n}].url: {node.url!r} must start with http:// or https://")
        parse_address(rest.rstrip("/"), f"nodes[{n}].url")
        if not node.data_dir:
            raise ConfigError(f"nodes[{n}].data_dir: must not be empty")
    if config.recoveryd.mode not in MODES:
        raise ConfigError(f"recoveryd.mode: {config.recoveryd.mode!r} is not one of {', '.join(MODES)}")
    parse_address(config.recoveryd.listen, "recoveryd.listen")
    for section in ("probes", "thresholds", "policy"):
        for key, value in msgspec.structs.asdict(getattr(config, section)).items():
            if type(value) in (int, float) and value <= 0:
                raise ConfigError(f"{section}.{key}: must be positive, got {value}")
    if config.probes.timeout_s >= config.probes.interval_s * 2:
        raise ConfigError("probes.timeout_s: must be under two probe intervals (probes.interval_s * 2)")
    if config.thresholds.hang_probes < config.thresholds.confirm_probes:
        raise ConfigError("thresholds.hang_probes: must be at least thresholds.confirm_probes")
    if config.log.level.lower() not in ("debug", "info", "warning", "error", "critical"):
        raise ConfigError(f"log.level: {config.log.level!r} is not debug, info, warning, error or critical")
    return _token(config.recoveryd)


def _token(daemon: Daemon) -> str:
    return read_token(daemon.token, daemon.token_file, "recoveryd")
