"""dtfd configuration: one TOML file shared by every node, `--node ID` picks the identity.

The same file on every machine means a cluster is described once; the node's own
section is found by id. Every option has a default and a unit in its name; unknown
keys, wrong types and impossible timing are refused with one line naming the key,
and the daemon exits with EX_CONFIG (78).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import TypeVar

import msgspec

EX_CONFIG = 78
DEFAULT_PATH = "/etc/dtf/dtfd.toml"


S = TypeVar("S", bound=msgspec.Struct)


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and key."""


class Strict(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class Node(Strict):
    id: str
    peer: str  # host:port for Raft traffic between nodes
    api: str  # host:port for the HTTP API


class Raft(Strict):
    tick_ms: int = 10
    heartbeat_ms: int = 50
    election_min_ms: int = 150
    election_max_ms: int = 300
    pre_vote: bool = True
    check_quorum: bool = True
    max_inflight: int = 64
    max_entries_per_msg: int = 512
    max_bytes_per_msg: int = 1 << 20
    snapshot_chunk_bytes: int = 1 << 20
    snapshot_every_entries: int = 10_000
    checksum_every_entries: int = 1000  # state checksum at multiples of this index (fewer for a state over 4 MB), compared across nodes


class Storage(Strict):
    data_dir: str = "/var/lib/dtf/{node}"  # {node} is replaced by the node id
    fsync: bool = True
    segment_bytes: int = 64 << 20


class Api(Strict):
    max_body_bytes: int = 1 << 20
    tokens_file: str = "/etc/dtf/tokens.toml"


class Workload(Strict):
    heartbeat_s: float = 2.0  # how often workers are told to heartbeat
    lost_after_s: float = 10.0  # a worker silent this long is lost; its tasks are requeued
    lease_grace_s: float = 60.0  # a lease expires at timeout_s + this without a result
    max_queued_tasks: int = 100_000  # submissions past this get 429
    submit_rate_per_s: float = 200.0  # tasks per second per client (token), sustained
    submit_burst: int = 2000  # tasks a client may submit at once above its rate


class Tls(Strict):
    cert_file: str = ""  # TLS on the API and peer links when both are set
    key_file: str = ""
    ca_file: str = ""


class Log(Strict):
    """[log], the same section in dtfd's, dtf-worker's and recoveryd's files."""

    level: str = "info"


class Cluster(Strict):
    secret_file: str = "/etc/dtf/cluster.secret"  # HMAC key shared by peers and recoveryd
    nodes: tuple[Node, ...] = ()


class Config(Strict):
    cluster: Cluster = Cluster()
    raft: Raft = Raft()
    storage: Storage = Storage()
    api: Api = Api()
    workload: Workload = Workload()
    tls: Tls = Tls()
    log: Log = Log()


class NodeConfig(msgspec.Struct, frozen=True):
    """The whole file, resolved for one node."""

    config: Config
    node: Node
    data_dir: Path

    @property
    def peers(self) -> tuple[Node, ...]:
        return tuple(n for n in self.config.cluster.nodes if n.id != self.node.id)

    def ticks(self, ms: int) -> int:
        return max(1, round(ms / self.config.raft.tick_ms))


def parse_address(text: str, key: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: {text!r} is not host:port")
    return host, int(port)


def read_strict(path: str | Path, kind: type[S]) -> S:
    """A TOML file as `kind`; every problem is a ConfigError naming the file and the key."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    try:
        return msgspec.convert(raw, kind)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {_readable(str(exc))}") from None


MIN_TOKEN_CHARS = 16  # what dtfd's tokens file demands


def read_token(inline: str, token_file: str, section: str) -> str:
    """A bearer token given inline or in a file (`section`.token / `section`.token_file)."""
    if inline:
        token, key = inline.strip(), f"{section}.token"
    else:
        key = f"{section}.token_file"
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{key}: cannot read {token_file}: {exc.strerror}") from None
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"{key}: the token must be at least {MIN_TOKEN_CHARS} characters")
    return token


def load(path: str | Path, node_id: str) -> NodeConfig:
    config = read_strict(path, Config)
    try:
        return _resolve(config, node_id)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _readable(message: str) -> str:
    """msgspec says '... - at `$.raft.tick_ms`'; operators think in 'raft.tick_ms: ...'."""
    text, _, where = message.rpartition(" - at `$.")
    if not text:
        return message
    return f"{where.rstrip('`')}: {text}"


def _resolve(config: Config, node_id: str) -> NodeConfig:
    nodes = config.cluster.nodes
    if not nodes:
        raise ConfigError("cluster.nodes: at least one node is required")
    for key, values in (("id", [n.id for n in nodes]), ("peer", [n.peer for n in nodes]), ("api", [n.api for n in nodes])):
        duplicates = sorted({v for v in values if values.count(v) > 1})
        if duplicates:
            raise ConfigError(f"cluster.nodes.{key}: duplicate {', '.join(duplicates)}")
    for n, node in enumerate(nodes):
        if not node.id or not node.id.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"cluster.nodes[{n}].id: {node.id!r} must be letters, digits, '-' or '_'")
        parse_address(node.peer, f"cluster.nodes[{n}].peer")
        parse_address(node.api, f"cluster.nodes[{n}].api")
    _check_raft(config.raft)
    if config.workload.lost_after_s < 2 * config.workload.heartbeat_s:
        raise ConfigError("workload.lost_after_s: must be at least 2 heartbeats (workload.heartbeat_s * 2)")
    _check_positive(config)
    if config.log.level.lower() not in ("debug", "info", "warning", "error", "critical"):
        raise ConfigError(f"log.level: {config.log.level!r} is not debug, info, warning, error or critical")
    if bool(config.tls.cert_file) != bool(config.tls.key_file):
        raise ConfigError("tls: cert_file and key_file go together")
    node = next((n for n in nodes if n.id == node_id), None)
    if node is None:
        raise ConfigError(f"node {node_id!r} is not in cluster.nodes ({', '.join(n.id for n in nodes)})")
    return NodeConfig(config, node, Path(config.storage.data_dir.replace("{node}", node_id)))


def _check_raft(raft: Raft) -> None:
    if raft.tick_ms < 1:
        raise ConfigError("raft.tick_ms: must be at least 1")
    if raft.heartbeat_ms < raft.tick_ms:
        raise ConfigError("raft.heartbeat_ms: must be at least one tick (raft.tick_ms)")
    if raft.heartbeat_ms * 3 > raft.election_min_ms:
        raise ConfigError("raft.election_min_ms: must be at least 3 heartbeats (raft.heartbeat_ms * 3)")
    if raft.election_min_ms >= raft.election_max_ms:
        raise ConfigError("raft.election_max_ms: must be greater than raft.election_min_ms")


def _check_positive(config: Config) -> None:
    for section in ("raft", "storage", "api", "workload"):
        for key, value in msgspec.structs.asdict(getattr(config, section)).items():
            if type(value) in (int, float) and value <= 0:
                raise ConfigError(f"{section}.{key}: must be positive, got {value}")
