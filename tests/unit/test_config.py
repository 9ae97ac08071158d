"""A bad config must be refused with one line naming the key, never half-used."""

from pathlib import Path

import pytest

from dtfd import config

EXAMPLE = Path(__file__).resolve().parents[2] / "etc" / "dtf" / "dtfd.toml"
NODES = """
[[cluster.nodes]]
id = "a"
peer = "127.0.0.1:7101"
api = "127.0.0.1:7001"
[[cluster.nodes]]
id = "b"
peer = "127.0.0.1:7102"
api = "127.0.0.1:7002"
"""


def _load(tmp_path: Path, text: str, node: str = "a") -> config.NodeConfig:
    path = tmp_path / "dtfd.toml"
    path.write_text(text)
    return config.load(path, node)


def test_example_config_loads_for_every_node():
    for node in ("node1", "node2", "node3"):
        loaded = config.load(EXAMPLE, node)
        assert loaded.node.id == node
        assert loaded.data_dir == Path(f"/var/lib/dtf/{node}")
        assert [p.id for p in loaded.peers] == [n for n in ("node1", "node2", "node3") if n != node]


def test_example_config_shows_every_option_with_its_default():
    """The example must document every option; its values must be the defaults."""
    loaded = config.load(EXAMPLE, "node1").config
    defaults = config.Config()
    for section in ("raft", "storage", "api", "workload", "tls", "log"):
        assert getattr(loaded, section) == getattr(defaults, section), section
    text = EXAMPLE.read_text()
    for section in ("raft", "storage", "api", "workload", "tls", "log"):
        for key in config.msgspec.structs.asdict(getattr(defaults, section)):
            assert f"\n{key} = " in text, f"{section}.{key} missing from the example"


def test_timing_converts_to_ticks(tmp_path):
    loaded = _load(tmp_path, NODES + "[raft]\ntick_ms = 10\nheartbeat_ms = 50\n")
    assert loaded.ticks(loaded.config.raft.heartbeat_ms) == 5
    assert loaded.ticks(loaded.config.raft.election_min_ms) == 15


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ("[raft]\nheartbeat_ms = 60\n", "raft.election_min_ms"),
        ("[raft]\nelection_min_ms = 300\nelection_max_ms = 300\n", "raft.election_max_ms"),
        ("[raft]\ntick_ms = 0\n", "raft.tick_ms"),
        ("[raft]\ntick_ms = \"ten\"\n", "raft.tick_ms"),
        ("[raft]\nbogus = 1\n", "bogus"),
        ("[storage]\nsegment_bytes = -1\n", "storage.segment_bytes"),
        ("[log]\nlevel = \"loud\"\n", "log.level"),
        ("[tls]\ncert_file = \"/x.pem\"\n", "tls"),
    ],
)
def test_bad_values_name_the_key(tmp_path, extra, named):
    with pytest.raises(config.ConfigError) as err:
        _load(tmp_path, NODES + extra)
    assert named in str(err.value)
    assert "\n" not in str(err.value)


def test_duplicate_nodes_and_bad_addresses_are_refused(tmp_path):
    dup = NODES.replace('id = "b"', 'id = "a"')
    with pytest.raises(config.ConfigError, match="cluster.nodes.id: duplicate a"):
        _load(tmp_path, dup)
    same_port = NODES.replace("127.0.0.1:7102", "127.0.0.1:7101")
    with pytest.raises(config.ConfigError, match="cluster.nodes.peer: duplicate"):
        _load(tmp_path, same_port)
    with pytest.raises(config.ConfigError, match=r"cluster.nodes\[0\].api"):
        _load(tmp_path, NODES.replace("127.0.0.1:7001", "localhost"))


def test_unknown_node_missing_file_and_broken_toml(tmp_path):
    with pytest.raises(config.ConfigError, match="node 'z' is not in cluster.nodes"):
        _load(tmp_path, NODES, node="z")
    with pytest.raises(config.ConfigError, match="no such file"):
        config.load(tmp_path / "absent.toml", "a")
    with pytest.raises(config.ConfigError, match="invalid TOML"):
        _load(tmp_path, "[raft\n")
