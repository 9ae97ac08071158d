"""recoveryd.toml: the example is complete and holds the defaults; bad values name their key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import msgspec
import pytest

from dtfd.config import ConfigError
from recoveryd.config import Config, load

EXAMPLE = Path(__file__).resolve().parents[2] / "etc" / "dtf" / "recoveryd.toml"


def test_the_example_lists_every_option_with_its_default():
    raw = tomllib.loads(EXAMPLE.read_text())
    defaults = msgspec.to_builtins(Config())
    for section, values in defaults.items():
        if section != "nodes":
            assert raw[section] == values, section
    node_fields = {f.name for f in msgspec.structs.fields(msgspec.convert(raw, Config).nodes[0])}
    assert all(set(n) == node_fields for n in raw["nodes"])


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recoveryd.toml"
    path.write_text(text + '\n[[nodes]]\nname = "node1"\nurl = "http://127.0.0.1:7001"\ndata_dir = "/d"\n')
    return path


@pytest.mark.parametrize(("text", "key"), [
    ('[recoveryd]\ntoken = "0123456789abcdef"\n[probes]\ninterval_s = 0\n', "probes.interval_s"),
    ('[recoveryd]\ntoken = "0123456789abcdef"\n[probes]\ninterval_s = 0.1\ntimeout_s = 0.5\n', "probes.timeout_s"),
    ('[recoveryd]\ntoken = "0123456789abcdef"\n[thresholds]\nhang_probes = 1\n', "thresholds.hang_probes"),
    ('[recoveryd]\ntoken = "0123456789abcdef"\nlisten = "nowhere"\n', "recoveryd.listen"),
    ('[recoveryd]\ntoken_file = "/nonexistent/token"\n', "recoveryd.token_file"),
])
def test_bad_values_name_their_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load(write(tmp_path, text))


def test_a_good_file_loads_with_its_token(tmp_path):
    (tmp_path / "token").write_text("0123456789abcdef\n")
    loaded = load(write(tmp_path, f'[recoveryd]\ntoken_file = "{tmp_path / "token"}"\n'))
    assert loaded.token == "0123456789abcdef" and loaded.config.unit(loaded.config.nodes[0]) == "dtfd@node1.service"
