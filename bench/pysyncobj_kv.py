"""A PySyncObj key/value node with a small HTTP front, so the benches drive it like dtfd.

    python bench/pysyncobj_kv.py --self 127.0.0.1:P --partners A,B --http PORT --journal FILE

PySyncObj has no client protocol of its own: an application embeds a cluster member and
calls its replicated methods. This process is that application. Over HTTP it answers
`PUT /kv/{key}` (200 once the command is applied here; a follower's command goes to the
leader inside PySyncObj), `GET /leader` (200 on the leader), `GET /status` and
`GET /health`; `POST /bench?clients=N&seconds=S` runs the in-process load of the
throughput bench (N commands outstanding through callbacks, the way PySyncObj is used)
and answers its counts and latencies. The journal is PySyncObj's mmap file, which it
never fsyncs: that is its durability, weaker than dtfd's and etcd's fsync per batch.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated

COMMAND_TIMEOUT_S = 1.0


class KV(SyncObj):
    def __init__(self, self_node: str, partners: list[str], conf: SyncObjConf) -> None:
        super().__init__(self_node, partners, conf)
        self.data: dict[str, str] = {}

    @replicated
    def set(self, key: str, value: str) -> None:
        self.data[key] = value

    def load(self, clients: int, seconds: float) -> dict[str, float]:
        """Keep `clients` commands outstanding for `seconds`; count and time the applied ones."""
        latencies: list[float] = []
        failed = [0]
        lock = threading.Lock()
        idle = threading.Semaphore(0)
        stop_at = time.monotonic() + seconds
        counter = iter(range(1 << 62))

        def send() -> None:
            with lock:
                key = f"bench-{next(counter)}"
            started = time.monotonic()

            def done(result: object, error: int) -> None:
                now = time.monotonic()
                with lock:
                    if error == FAIL_REASON.SUCCESS:
                        latencies.append(now - started)
                    else:
                        failed[0] += 1
                if now < stop_at:
                    send()
                else:
                    idle.release()

            self.set(key, "x", callback=done)

        began = time.monotonic()
        for _ in range(clients):
            send()
        for _ in range(clients):
            idle.acquire(timeout=seconds + 10)
        elapsed = time.monotonic() - began
        latencies.sort()

        def rank(q: float) -> float:
            return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")

        return {"writes": len(latencies), "failed": failed[0], "seconds": elapsed, "p50_ms": rank(0.5), "p99_ms": rank(0.99)}


def handler_for(kv: KV) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def reply(self, status: int, payload: object) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/health":
                self.reply(200, {"status": "ok"})
            elif self.path == "/leader":
                self.reply(200 if kv._isLeader() else 503, {"leader": str(kv._getLeader() or "")})
            elif self.path == "/status":
                status = kv.getStatus()
                self.reply(200, {k: str(v) for k, v in status.items()})
            else:
                self.reply(404, {"error": "no route"})

        def do_PUT(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if not self.path.startswith("/kv/"):
                self.reply(404, {"error": "no route"})
                return
            try:
                kv.set(self.path[4:], body.decode(), sync=True, timeout=COMMAND_TIMEOUT_S)
            except Exception as exc:  # SyncObjException: timeout, no leader, discarded
                self.reply(503, {"error": str(exc)})
                return
            self.reply(200, {"ok": True})

        def do_POST(self) -> None:
            url = urlsplit(self.path)
            if url.path != "/bench":
                self.reply(404, {"error": "no route"})
                return
            query = parse_qs(url.query)
            self.reply(200, kv.load(int(query["clients"][0]), float(query["seconds"][0])))

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--self", required=True, dest="self_node")
    parser.add_argument("--partners", required=True, help="comma-separated host:port of the other nodes")
    parser.add_argument("--http", type=int, required=True, help="loopback port of the HTTP front")
    parser.add_argument("--journal", required=True, help="PySyncObj journal file")
    parser.add_argument("--election-min-ms", type=int, default=150)
    parser.add_argument("--election-max-ms", type=int, default=300)
    parser.add_argument("--heartbeat-ms", type=int, default=50)
    args = parser.parse_args()
    conf = SyncObjConf(
        raftMinTimeout=args.election_min_ms / 1000,
        raftMaxTimeout=args.election_max_ms / 1000,
        # PySyncObj insists on min timeout > 3 heartbeats, strictly: 150 ms / 50 ms needs a hair off the heartbeat
        appendEntriesPeriod=min(args.heartbeat_ms, args.election_min_ms / 3 - 0.1) / 1000,
        autoTickPeriod=0.01,
        journalFile=args.journal,
        connectionRetryTime=0.5,  # reconnect to a restarted node soon; no effect on elections
    )
    kv = KV(args.self_node, args.partners.split(","), conf)
    server = ThreadingHTTPServer(("127.0.0.1", args.http), handler_for(kv))
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
