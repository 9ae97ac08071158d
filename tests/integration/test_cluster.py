"""Three real dtfd processes on loopback: election, forwarding, failover, graceful stop, bad input."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from dtfd.devcluster import LocalCluster, write_configs
from tests.integration.support import until as _until

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(tmp_path):
    local = LocalCluster(write_configs(tmp_path, raft={"snapshot_every_entries": 50}))
    local.start_all()
    try:
        yield local
    finally:
        local.stop_all()


def _put(cluster: LocalCluster, node: str, key: str, value: str, client: str, seq: int) -> httpx.Response:
    with cluster.client(node) as c:
        return c.put(f"/v1/kv/{key}", json={"value": value, "client": client, "seq": seq})


class Writer:
    """A client that writes keys in a loop through any node, retrying each (client, seq) until acknowledged."""

    def __init__(self, cluster: LocalCluster, name: str) -> None:
        self.cluster, self.name = cluster, name
        self.acked: dict[str, str] = {}
        self.failures = 0
        self.reasons: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        seq = 0
        nodes = self.cluster.files.node_ids
        while not self._stop.is_set():
            seq += 1
            key, value = f"{self.name}-{seq}", f"v{seq}"
            attempt = 0
            while not self._stop.is_set():
                node = nodes[(seq + attempt) % len(nodes)]
                attempt += 1
                try:
                    reply = _put(self.cluster, node, key, value, self.name, seq)
                except httpx.HTTPError as exc:
                    self.failures += 1
                    self.reasons.append(f"{node}: {type(exc).__name__}")
                    continue
                if reply.status_code == 200:
                    self.acked[key] = value
                    break
                self.failures += 1
                self.reasons.append(f"{node}: {reply.status_code} {reply.text[:80]}")
                time.sleep(0.02 if reply.status_code == 503 else 0)


def test_one_leader_and_writes_through_any_node_are_read_everywhere(cluster):
    leader = cluster.wait_leader()
    follower = next(n for n in cluster.files.node_ids if n != leader)
    assert _put(cluster, leader, "a", "1", "c", 1).status_code == 200
    forwarded = _put(cluster, follower, "b", "2", "c", 2)
    assert forwarded.status_code == 200
    for node in cluster.files.node_ids:
        with cluster.client(node) as c:
            assert c.get("/v1/kv/a").json()["value"] == "1"
            assert c.get("/v1/kv/b").json()["value"] == "2"
            assert c.get("/ready").status_code == 200
            assert c.get("/leader").status_code == (200 if node == leader else 503)
            assert c.get("/health").status_code == 200
    views = [cluster.status(n) for n in cluster.files.node_ids]
    assert {v["leader"] for v in views} == {leader}
    _until(lambda: len({(v["applied_index"], v["checksum"]) for v in map(cluster.status, cluster.files.node_ids)}) == 1, what="same checksum")


def test_retried_write_is_applied_once(cluster):
    leader = cluster.wait_leader()
    first = _put(cluster, leader, "k", "x", "retrier", 7).json()
    again = _put(cluster, leader, "k", "y", "retrier", 7).json()
    assert first["ok"] and again["duplicate"] and again["index"] == first["index"]
    with cluster.client(leader) as c:
        assert c.get("/v1/kv/k").json()["value"] == "x"


def test_kill_leader_under_load_loses_nothing_and_restarted_node_catches_up(cluster):
    leader = cluster.wait_leader()
    with Writer(cluster, "w1") as writer:
        _until(lambda: len(writer.acked) >= 30, what="writes before the kill")
        cluster.kill(leader)
        survivors = [n for n in cluster.files.node_ids if n != leader]
        new_leader = cluster.wait_leader(among=survivors)
        assert new_leader != leader
        before = len(writer.acked)
        _until(lambda: len(writer.acked) >= before + 100, what="writes after failover")
    cluster.start(leader)
    acked = dict(writer.acked)
    _until(lambda: _stale_value(cluster, leader, "w1-1") == acked["w1-1"], what="restarted node catching up")
    final = _until(lambda: _agreed(cluster), what="all nodes at one applied index and checksum")
    assert final > 0
    for node in cluster.files.node_ids:
        with cluster.client(node) as c:
            for key, value in acked.items():
                assert c.get(f"/v1/kv/{key}", params={"stale": "ok"}).json()["value"] == value, (node, key)
    # It was behind the leader's compaction point, so it came back through InstallSnapshot.
    assert "snapshot installed node=" + leader in (cluster.files.directory / f"{leader}.log").read_text()


def _stale_value(cluster: LocalCluster, node: str, key: str) -> str | None:
    try:
        with cluster.client(node) as c:
            reply = c.get(f"/v1/kv/{key}", params={"stale": "ok"})
    except httpx.HTTPError:
        return None
    return reply.json()["value"] if reply.status_code == 200 else None


def _agreed(cluster: LocalCluster) -> int:
    views = [cluster.status(n) for n in cluster.files.node_ids]
    if not all(views) or len({(v["applied_index"], v["checksum"]) for v in views}) != 1:
        return 0
    return views[0]["applied_index"]


def test_sigterm_on_leader_transfers_leadership_without_failed_requests(cluster):
    leader = cluster.wait_leader()
    with Writer(cluster, "w2") as writer:
        _until(lambda: len(writer.acked) >= 20, what="writes before the stop")
        assert cluster.stop(leader) == 0
        survivors = [n for n in cluster.files.node_ids if n != leader]
        new_leader = cluster.wait_leader(among=survivors)
        before = len(writer.acked)
        _until(lambda: len(writer.acked) >= before + 20, what="writes after the handover")
    assert new_leader != leader
    log = (cluster.files.directory / f"{leader}.log").read_text()
    assert f"leadership transfer node={leader}" in log
    # Clients retry refusals (a closed port, 503 + Retry-After) elsewhere; nothing in flight may be
    # dropped or fail otherwise, and every write was acknowledged in the end (the writer moved on).
    unexpected = [r for r in writer.reasons if not (r == f"{leader}: ConnectError" or " 503 " in r)]
    assert unexpected == []


def test_paused_follower_does_not_depose_the_leader(cluster):
    leader = cluster.wait_leader()
    term = cluster.status(leader)["term"]
    follower = next(n for n in cluster.files.node_ids if n != leader)
    cluster.signal(follower, signal.SIGSTOP)
    try:
        assert _put(cluster, leader, "during", "pause", "p", 1).status_code == 200
        time.sleep(1.0)  # several election timeouts pass while the follower is stopped
    finally:
        cluster.signal(follower, signal.SIGCONT)
    _until(lambda: (cluster.status(follower) or {}).get("applied_index", 0) >= cluster.status(leader)["applied_index"], what="follower catch-up")
    assert cluster.wait_leader() == leader
    assert cluster.status(leader)["term"] == term


def test_bad_input_and_tokens_are_refused_and_nothing_is_applied(cluster):
    leader = cluster.wait_leader()
    with cluster.client(leader) as c:  # the new leader records itself in the history first: let that land
        _until(lambda: c.get("/v1/history").json()["leaders"], what="leader recorded")
    applied = cluster.status(leader)["applied_index"]
    with cluster.client(leader) as c:
        assert c.put("/v1/kv/x", content=b"{not json").status_code == 400
        wrong_type = c.put("/v1/kv/x", json={"value": 5})
        assert wrong_type.status_code == 422 and "value" in wrong_type.json()["error"]["message"]
        unknown = c.put("/v1/kv/x", json={"value": "v", "bogus": 1})
        assert unknown.status_code == 422 and "bogus" in unknown.json()["error"]["message"]
        assert c.put("/v1/kv/x", content=b'{"value":"' + b"x" * (2 << 20) + b'"}').status_code == 413
        assert c.get("/v1/nothing").status_code == 404
    with cluster.client(leader, token="wrong-token-0000000000") as c:
        assert c.put("/v1/kv/x", json={"value": "v"}).status_code == 401
    with cluster.client(leader, token=cluster.files.reader_token) as c:
        assert c.put("/v1/kv/x", json={"value": "v"}).status_code == 403
        assert c.get("/v1/status").status_code == 200
    with httpx.Client(base_url=f"http://{cluster.files.api[leader]}") as anonymous:
        assert anonymous.get("/v1/status").status_code == 401
    assert cluster.status(leader)["applied_index"] == applied


def test_tls_cluster_serves_https_and_replicates_over_encrypted_peer_links(tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "node.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    tls = {"cert_file": str(tmp_path / "node.pem"), "key_file": str(tmp_path / "node.pem"), "ca_file": str(tmp_path / "ca.pem")}
    local = LocalCluster(write_configs(tmp_path / "c", tls=tls))
    local.start_all()
    try:
        leader = local.wait_leader()
        follower = next(n for n in local.files.node_ids if n != leader)
        assert _put(local, follower, "secure", "yes", "t", 1).status_code == 200  # forwarded over HTTPS
        with local.client(leader) as c:
            assert c.get("/v1/kv/secure").json()["value"] == "yes"
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://{local.files.api[leader]}/health", timeout=2)  # plain HTTP is not served
    finally:
        local.stop_all()


def test_batch_writes_are_one_entry_and_answer_each_operation(cluster):
    leader = cluster.wait_leader()
    ops = [{"op": "put", "key": f"b{n}", "value": str(n)} for n in range(100)] + [{"op": "cas", "key": "b0", "expected": "x", "value": "y"}]
    with cluster.client(leader) as c:
        reply = c.post("/v1/kv", json={"ops": ops, "client": "batcher", "seq": 1})
        assert reply.status_code == 200
        results = reply.json()["value"]
        assert len(results) == 101 and all(r["ok"] for r in results[:100]) and results[100]["error"] == "cas_failed"
        assert {r["index"] for r in results} == {reply.json()["index"]}  # one log entry for the whole batch
        assert c.get("/v1/kv/b99").json()["value"] == "99"
        assert c.post("/v1/kv", json={"ops": [{"op": "rename", "key": "x"}]}).status_code == 422


def test_every_answer_names_the_leaders_address_so_clients_can_skip_forwarding(cluster):
    leader = cluster.wait_leader()
    for node in cluster.files.node_ids:
        with cluster.client(node) as c:
            assert c.get("/health").headers["x-dtf-leader"] == cluster.files.api[leader]
