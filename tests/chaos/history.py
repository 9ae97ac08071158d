"""The history of a chaos run, and the clients that write it.

Every client operation is recorded with its client, its invocation and completion times
(seconds on the monotonic clock since the run began) and its outcome: ok, fail (it
definitely did not take effect) or unknown (the client gave up: it may take effect at any
time later, or never). Faults and leader samples go in the same file, one JSON object a
line, so a failed run leaves everything the checkers and a person need in one artifact.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

from dtfd.state.tasks import TERMINAL
from tests.chaos.linearizability import Op

ATTEMPT_TIMEOUT_S = 1.0  # one HTTP attempt; a paused node costs this much before the client moves on
OP_DEADLINE_S = 4.0  # after this an operation's outcome is unknown
RETRY_PAUSE_S = 0.02  # between attempts after a 503 or a refused connection


class History:
    """Records, in memory and appended to a JSON-lines file as they happen."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.origin = time.monotonic()
        self.records: list[dict[str, Any]] = []
        self._file = path.open("a", buffering=1)

    def now(self) -> float:
        return round(time.monotonic() - self.origin, 6)

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self._file.write(json.dumps(record, sort_keys=True) + "\n")

    def close(self) -> None:
        self._file.close()

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["type"] == kind]

    def kv_ops(self) -> list[Op]:
        return [kv_op(r) for r in self.of_type("kv")]


def load(path: Path) -> list[dict[str, Any]]:
    """The records of a history file, for re-checking an artifact."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def kv_op(record: dict[str, Any]) -> Op:
    return Op(
        client=record["client"],
        key=record["key"],
        kind=record["f"],
        invoke=record["invoke"],
        complete=record["complete"],
        outcome=record["outcome"],
        value=record.get("value"),
        expected=record.get("expected"),
        observed=record.get("observed"),
        ok=record.get("ok", True),
    )


@dataclass
class Endpoint:
    """Where a client sends requests: every node's base URL and a bearer token."""

    urls: list[str]
    token: str


class KvClient:
    """One client process: writes, compare-and-sets and reads on a few keys, back to back.

    Writes carry (client, seq), so retrying one after a timeout or a failover applies it at
    most once; values are `client:seq`, unique, so a read names the write it saw. With
    `stale_url` set (a node's URL), reads go to that node with ?stale=ok (a local read without ReadIndex):
    a deliberately wrong client, for showing that the checker catches stale reads.
    """

    def __init__(
        self, name: str, endpoint: Endpoint, keys: list[str], history: History, rng: random.Random, stale_url: str | None = None
    ) -> None:
        self.name, self.endpoint, self.keys, self.history, self.rng = name, endpoint, keys, history, rng
        self.stale_url = stale_url
        self.seq = 0
        self.seen: dict[str, str | None] = {}

    async def run(self, http: httpx.AsyncClient, stop: trio.Event) -> None:
        """Operations back to back until `stop` is set (a cancelled operation is recorded as unknown)."""
        while not stop.is_set():
            key = self.rng.choice(self.keys)
            roll = self.rng.random()
            if roll < 0.4:
                await self.read(http, key)
            elif roll < 0.8:
                await self.write(http, key)
            else:
                await self.cas(http, key)

    async def read(self, http: httpx.AsyncClient, key: str) -> None:
        record = {"type": "kv", "client": self.name, "key": key, "f": "read"}
        if self.stale_url is not None:
            record["stale"] = self.stale_url
        reply = await call(http, self.endpoint, self.history, self.rng, "GET", f"/v1/kv/{key}", None, record, self.stale_url)
        if reply is None:
            return
        if reply.status_code == 200:
            record.update(outcome="ok", observed=reply.json()["value"])
        elif reply.status_code == 404 and reply.json()["error"]["code"] == "not_found":
            record.update(outcome="ok", observed=None)
        else:
            record.update(outcome="fail", error=reply.text[:200])
        self._finish(record)
        if record["outcome"] == "ok":
            self.seen[key] = record["observed"]

    async def write(self, http: httpx.AsyncClient, key: str) -> None:
        self.seq += 1
        value = f"{self.name}:{self.seq}"
        record = {"type": "kv", "client": self.name, "key": key, "f": "write", "value": value, "seq": self.seq}
        body = {"value": value, "client": self.name, "seq": self.seq}
        reply = await call(http, self.endpoint, self.history, self.rng, "PUT", f"/v1/kv/{key}", body, record)
        if reply is None:
            return
        record.update(outcome="ok" if reply.status_code == 200 else "fail")
        if reply.status_code != 200:
            record["error"] = reply.text[:200]
        self._finish(record)

    async def cas(self, http: httpx.AsyncClient, key: str) -> None:
        self.seq += 1
        expected, value = self.seen.get(key), f"{self.name}:{self.seq}"
        record = {"type": "kv", "client": self.name, "key": key, "f": "cas", "expected": expected, "value": value, "seq": self.seq}
        body = {"expected": expected, "value": value, "client": self.name, "seq": self.seq}
        reply = await call(http, self.endpoint, self.history, self.rng, "POST", f"/v1/kv/{key}/cas", body, record)
        if reply is None:
            return
        answer = reply.json()
        if reply.status_code == 200:
            record.update(outcome="ok", ok=True)
            self.seen[key] = value
        elif reply.status_code == 409 and answer.get("error") == "cas_failed":
            record.update(outcome="ok", ok=False, observed=answer["value"])
            self.seen[key] = answer["value"]
        else:
            record.update(outcome="fail", error=reply.text[:200])
        self._finish(record)

    def _finish(self, record: dict) -> None:
        record["complete"] = self.history.now()
        self.history.add(record)


async def call(
    http: httpx.AsyncClient,
    endpoint: Endpoint,
    history: History,
    rng: random.Random,
    method: str,
    path: str,
    body: dict | None,
    record: dict,
    stale_url: str | None = None,
) -> httpx.Response | None:
    """The first definite answer, or None once `record` is added to `history` as unknown.

    Nodes are tried in a random order (followers forward writes and reads), so a dead or
    paused node only costs an attempt; 503 and transport errors are retried until the
    deadline. A stale read (`stale_url`) always asks that node, which answers locally."""
    record["invoke"] = history.now()
    reply: httpx.Response | None = None
    attempts = 0
    try:
        with trio.move_on_after(OP_DEADLINE_S):
            while reply is None:
                attempts += 1
                try:
                    answer = await http.request(
                        method,
                        (stale_url or rng.choice(endpoint.urls)) + path,
                        json=body,
                        params={"stale": "ok"} if stale_url else None,
                        headers={"Authorization": f"Bearer {endpoint.token}"},
                        timeout=ATTEMPT_TIMEOUT_S,
                    )
                except httpx.HTTPError:
                    answer = None
                if answer is not None and answer.status_code < 500:
                    reply = answer
                else:
                    await trio.sleep(RETRY_PAUSE_S)
    finally:
        record["attempts"] = attempts
        if reply is None:
            record.update(outcome="unknown", complete=None)
            history.add(record)
    return reply


LEADER_PROBE_S = 0.5  # a loaded leader may take a few hundred ms to answer; that is not "no leader"


async def sample_leader(http: httpx.AsyncClient, endpoint: Endpoint, history: History, interval_s: float = 0.05) -> None:
    """Record every change of leader ("" when no node answers as leader within LEADER_PROBE_S), until cancelled."""
    last: str | None = None
    while True:
        leaders: list[str] = []

        async def ask(url: str) -> None:
            try:
                reply = await http.get(url + "/leader", timeout=LEADER_PROBE_S)
            except httpx.HTTPError:
                return
            if reply.status_code == 200:
                leaders.append(reply.json()["leader"])

        async with trio.open_nursery() as nursery:
            for url in endpoint.urls:
                nursery.start_soon(ask, url)
        leader = min(leaders) if leaders else ""
        if leader != last:
            history.add({"type": "leader", "t": history.now(), "leader": leader, "claimants": sorted(leaders)})
            last = leader
        await trio.sleep(interval_s)


class TaskClient:
    """Submits small shell tasks through any node, to be run by real dtf-workers.

    Each task appends `task lease attempt` to `runlog` when it starts (what really ran)
    and prints its lease and attempt (what the recorded result says ran), then fails its
    first attempts on purpose so that retries happen, and with faults, requeues."""

    def __init__(self, name: str, endpoint: Endpoint, history: History, rng: random.Random, runlog: Path, run_id: str) -> None:
        self.name, self.endpoint, self.history, self.rng = name, endpoint, history, rng
        self.runlog, self.run_id = runlog, run_id
        self.seq = 0

    def spec(self, name: str) -> dict[str, Any]:
        retries = self.rng.randint(0, 2)
        passes_from = self.rng.randint(1, retries + 2)  # above retries + 1: every attempt fails
        script = (
            f'echo "$DTF_TASK_ID $DTF_LEASE_ID $DTF_ATTEMPT" >> {self.runlog}; '
            f'echo "lease=$DTF_LEASE_ID attempt=$DTF_ATTEMPT"; sleep {self.rng.uniform(0.05, 1.0):.2f}; '
            f'[ "$DTF_ATTEMPT" -ge {passes_from} ]'
        )
        return {
            "argv": [script],
            "shell": True,
            "timeout_s": 5,
            "max_retries": retries,
            "backoff": {"base_s": 0.05, "max_s": 0.2},
            "idempotency_key": name,
            "name": name,
        }

    async def run(self, http: httpx.AsyncClient, count: int, pace_s: float, stop: trio.Event) -> None:
        """Submit `count` tasks in batches of one to three, `pace_s` apart on average, until `stop`."""
        while count > 0 and not stop.is_set():
            self.seq += 1
            batch = [self.spec(f"{self.name}:{self.seq}:{n}") for n in range(min(count, self.rng.randint(1, 3)))]
            count -= len(batch)
            record = {"type": "task_submit", "client": self.name, "seq": self.seq, "names": [s["name"] for s in batch]}
            body = {"tasks": batch, "run_id": self.run_id, "client": self.name, "seq": self.seq}
            reply = await call(http, self.endpoint, self.history, self.rng, "POST", "/v1/tasks", body, record)
            if reply is not None:
                record["complete"] = self.history.now()
                if reply.status_code == 201:
                    record.update(outcome="ok", ids=[t["id"] for t in reply.json()["tasks"]])
                else:
                    record.update(outcome="fail", error=reply.text[:200])
                self.history.add(record)
            with trio.move_on_after(self.rng.expovariate(1 / pace_s)):
                await stop.wait()

    async def collect(self, http: httpx.AsyncClient, deadline_s: float) -> bool:
        """Wait up to `deadline_s` for every task of the run to end, then record each in full,
        and the workers as the coordinator sees them. Returns whether they all ended."""
        tasks: list[dict[str, Any]] = []
        with trio.move_on_after(deadline_s):
            while True:
                tasks = await self._list(http)
                if all(t["state"] in TERMINAL for t in tasks):
                    break
                await trio.sleep(0.2)
        with trio.fail_after(60):
            for brief in tasks:
                reply = await call(http, self.endpoint, self.history, self.rng, "GET", f"/v1/tasks/{brief['id']}", None, {"type": "task_fetch"})
                assert reply is not None and reply.status_code == 200, f"task {brief['id']} vanished"
                self.history.add({"type": "task_final", "task": reply.json()})
            reply = await call(http, self.endpoint, self.history, self.rng, "GET", "/v1/workers", None, {"type": "workers_fetch"})
            if reply is not None and reply.status_code == 200:
                self.history.add({"type": "workers", "t": self.history.now(), "workers": reply.json()["workers"]})
        return all(t["state"] in TERMINAL for t in tasks)

    async def _list(self, http: httpx.AsyncClient) -> list[dict[str, Any]]:
        tasks: list[dict[str, Any]] = []
        after = ""
        while True:
            path = f"/v1/tasks?run={self.run_id}&limit=500" + (f"&after={after}" if after else "")
            reply = await call(http, self.endpoint, self.history, self.rng, "GET", path, None, {"type": "task_list"})
            if reply is None or reply.status_code != 200:
                await trio.sleep(RETRY_PAUSE_S)
                continue
            page = reply.json()
            tasks += page["tasks"]
            after = page["next"]
            if not after:
                return tasks
