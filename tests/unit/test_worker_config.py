"""A bad worker config must be refused with one line naming the key, never half-used."""

import socket
import tomllib
from pathlib import Path

import msgspec
import pytest

from dtfd.config import ConfigError
from dtfd.worker import config

EXAMPLE = Path(__file__).resolve().parents[2] / "etc" / "dtf" / "worker.toml"
TOKEN = 'token = "worker-token-0123456789"\n'


def _load(tmp_path: Path, text: str) -> config.WorkerConfig:
    path = tmp_path / "worker.toml"
    path.write_text(text)
    return config.load(path)


def test_example_shows_every_option_with_its_default():
    example = msgspec.convert(tomllib.loads(EXAMPLE.read_text()), config.Config)
    assert example == config.Config()
    raw = tomllib.loads(EXAMPLE.read_text())
    for section, values in msgspec.structs.asdict(config.Config()).items():
        assert set(raw[section]) == set(msgspec.structs.asdict(values)), section


def test_defaults_detect_id_and_resources(tmp_path):
    loaded = _load(tmp_path, "[coordinator]\n" + TOKEN)
    assert loaded.id == socket.gethostname()
    assert loaded.cpus >= 1 and loaded.memory_mb >= 1
    assert loaded.token == "worker-token-0123456789"
    assert loaded.work_dir == Path("/var/lib/dtf-worker")


def test_overrides_and_token_file(tmp_path):
    (tmp_path / "token").write_text("file-token-0123456789\n")
    loaded = _load(
        tmp_path,
        f'[coordinator]\ntoken_file = "{tmp_path / "token"}"\n'
        '[worker]\nid = "gpu-1"\ncpus = 3\nmemory_mb = 2048\nslots = 4\nlabels = { gpu = "webgpu" }\n',
    )
    assert (loaded.id, loaded.cpus, loaded.memory_mb, loaded.token) == ("gpu-1", 3, 2048, "file-token-0123456789")
    assert loaded.config.worker.labels == {"gpu": "webgpu"} and loaded.config.worker.slots == 4


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[worker]\nslotz = 2\n", "worker: Object contains unknown field `slotz`"),
        ("[nope]\n", "Object contains unknown field `nope`"),
        ("[worker]\nslots = 'two'\n", "worker.slots: Expected `int`, got `str`"),
        ("[worker]\nslots = 0\n", "worker.slots: must be at least 1"),
        ("[worker]\ncpus = -1\n", "worker.cpus: must be 0 (detect) or positive"),
        ("[worker]\nid = 'a b'\n", "worker.id: 'a b' must be letters"),
        ("[worker]\nlabels = { gpu = 1 }\n", "worker.labels[...]: Expected `str`, got `int`"),
        ("[coordinator]\nurls = []\n", "coordinator.urls: at least one coordinator URL is required"),
        ("[coordinator]\nurls = ['127.0.0.1:7001']\n", "coordinator.urls[0]: '127.0.0.1:7001' must start with http:// or https://"),
        ("[coordinator]\nurls = ['http://a:1', 'http://b']\n", "coordinator.urls[1]: 'b' is not host:port"),
        ("[coordinator]\nurls = ['http://a:1/v1']\n", "coordinator.urls[0]: 'http://a:1/v1' must be scheme://host:port with no path"),
        ("[coordinator]\nrequest_timeout_s = 0\n", "coordinator.request_timeout_s: must be positive"),
        ("[coordinator]\ntoken = 'short'\n", "coordinator.token: the token must be at least 16 characters"),
        ("[coordinator]\ntoken_file = '/nonexistent/token'\n", "coordinator.token_file: cannot read /nonexistent/token"),
        ("[tasks]\noutput_cap_bytes = 10\n", "tasks.output_cap_bytes: must be at least 1024"),
        ("[tasks]\nkill_grace_s = -1\n", "tasks.kill_grace_s: must be positive"),
        ("[log]\nlevel = 'loud'\n", "log.level: 'loud' is not debug"),
        ("[worker\n", "invalid TOML"),
    ],
)
def test_bad_values_are_refused_naming_the_key(tmp_path, text, message):
    if "token" not in text:
        text = "[coordinator]\n" + TOKEN + text.replace("[coordinator]\n", "")
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, text)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        config.load(tmp_path / "absent.toml")


def test_the_client_moves_to_the_leader_an_answer_names():
    from dtfd.worker.client import Client

    client = Client(["http://127.0.0.1:7001", "http://127.0.0.1:7002", "http://127.0.0.1:7003"], "t" * 16)
    client._prefer_leader("127.0.0.1:7003")
    assert client.current == 2
    client._prefer_leader("10.0.0.9:7001")  # not one of ours: stay
    assert client.current == 2
