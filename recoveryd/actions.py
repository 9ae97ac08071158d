"""Repairs as named steps, each idempotent, with progress written down so a restarted recoveryd resumes.

STATE_DIR/actions/NODE.json holds the one action in flight for a node: its record
(failure, reason, evidence), the steps done and what they learned (backup path, rejoin
term). A step re-run after a crash must be harmless: stopping a stopped node, starting a
running one, `dtfd reseed` of a dir already reseeded (or reseeded halfway) all finish the
job or do nothing, and the Raft operations look at the cluster again before they act.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Awaitable, Callable
from glob import glob
from pathlib import Path

import httpx
import msgspec
import trio

from dtfd.journal import fields
from dtfd.storage.files import write_atomically
from recoveryd.config import Config, Node
from recoveryd.executors import Executor, ExecutorError
from recoveryd.policy import CATCH_UP, RELIEVE, RESEED, RESTART, STEP_DOWN, resource_verdict
from recoveryd.probes import Prober, fetch_status
from recoveryd.records import Record

log = logging.getLogger("dtf.recoveryd")

POLL_S = 0.1
TRANSFER_WAIT_S = 10.0
ADMIN_TIMEOUT_S = 60.0  # a compaction snapshots the whole state
RESTART_HELPS = ("RSS", "open fds", "CPU")  # what a restart gives back; disk and inodes it does not


class ActionFailed(Exception):
    """A step could not be completed; the message is the record's detail."""


class InFlight(msgspec.Struct, kw_only=True):
    record: Record
    done: list[str] = []
    data: dict = {}


class Journal:
    """In-flight actions on disk, one file per node, replaced atomically after every step."""

    def __init__(self, state_dir: str) -> None:
        self.dir = Path(state_dir) / "actions"
        self.dir.mkdir(parents=True, exist_ok=True)

    def save(self, flight: InFlight) -> None:
        write_atomically(str(self.dir / f"{flight.record.node}.json"), msgspec.json.encode(flight))

    def remove(self, node: str) -> None:
        (self.dir / f"{node}.json").unlink(missing_ok=True)

    def pending(self) -> list[InFlight]:
        return [msgspec.json.decode(p.read_bytes(), type=InFlight) for p in sorted(self.dir.glob("*.json"))]


Step = Callable[[Node, InFlight], Awaitable[None]]


class Actions:
    def __init__(self, config: Config, executor: Executor, client: httpx.AsyncClient, journal: Journal, prober: Prober) -> None:
        """`client` carries recoveryd's admin token; `prober` looks again after the cheap steps of a relief."""
        self.config, self.executor, self.client, self.journal, self.prober = config, executor, client, journal, prober
        self.nodes = {n.name: n for n in config.nodes}
        self.plans: dict[str, list[tuple[str, Step]]] = {
            RESTART: [("restart", self.restart), ("healthy", self.healthy)],
            RESEED: [("stop", self.stop), ("reseed", self.reseed), ("start", self.start), ("healthy", self.healthy),
                     ("leader_above", self.leader_above), ("caught_up", self.caught_up)],
            RELIEVE: [("clean_backups", self.clean_backups), ("compact", self.compact), ("transfer_away", self.transfer_away),
                      ("restart_if_needed", self.restart_if_needed)],
            STEP_DOWN: [("step_down", self.step_down), ("stepped_down", self.stepped_down)],
            CATCH_UP: [("catch_up", self.catch_up), ("lag_closed", self.lag_closed)],
        }

    async def run(self, flight: InFlight) -> str:
        """Every step not yet done, in order; returns a summary of what was done."""
        node = self.nodes[flight.record.node]
        for name, step in self.plans[flight.record.action]:
            if name in flight.done:
                continue
            log.info("step %s", fields(node=node.name, action=flight.record.action, step=name, id=flight.record.id))
            try:
                await step(node, flight)
            except (ExecutorError, trio.TooSlowError, OSError, httpx.HTTPError) as exc:
                raise ActionFailed(f"step {name}: {exc or type(exc).__name__}") from None
            flight.done.append(name)
            self.journal.save(flight)
        return "; ".join(f"{k}={v}" for k, v in flight.data.items())

    # ---- HTTP to the nodes, every call under a deadline ---------------------------------

    async def status(self, node: Node) -> dict | None:
        return await fetch_status(self.client, node, self.config.probes.timeout_s)

    async def leader(self, exclude: str = "") -> dict | None:
        """The status of the node that leads, as it says itself (of the latest term, should two say so)."""
        found = None
        for node in self.config.nodes:
            if node.name != exclude:
                view = await self.status(node)
                if view and view["role"] == "leader" and (found is None or view["term"] > found["term"]):
                    found = view
        return found

    async def post(self, node: Node, path: str, body: dict, timeout: float = ADMIN_TIMEOUT_S) -> httpx.Response:
        with trio.fail_after(timeout):
            return await self.client.post(f"{node.url}{path}", json=body, timeout=timeout)

    async def transfer(self, leader: dict, avoid: str) -> str:
        """Ask the leader to hand over to its most caught-up voting follower other than `avoid`."""
        peers = sorted((-p["match_index"], name) for name, p in leader.get("peers", {}).items() if name != avoid)
        if not peers:
            raise ActionFailed("no follower to transfer leadership to")
        target = peers[0][1]
        timeout = self.config.probes.timeout_s
        with trio.fail_after(timeout):
            reply = await self.client.post(f"{self.nodes[leader['id']].url}/v1/leadership/transfer",
                                           json={"to": target}, timeout=timeout)
        if reply.status_code != 202:
            raise ActionFailed(f"leadership transfer refused by {leader['id']}: {reply.status_code} {reply.text[:200]}")
        log.info("leadership transfer requested %s", fields(leader=leader["id"], to=target, term=leader["term"]))
        return target

    # ---- steps --------------------------------------------------------------------------

    async def restart(self, node: Node, flight: InFlight) -> None:
        await self.executor.restart(node)

    async def stop(self, node: Node, flight: InFlight) -> None:
        await self.executor.stop(node)

    async def start(self, node: Node, flight: InFlight) -> None:
        await self.executor.start(node)

    async def healthy(self, node: Node, flight: InFlight) -> None:
        """The started node answers /health; a process that exits meanwhile fails the step at once."""
        with trio.move_on_after(self.config.policy.start_timeout_s):
            while True:
                if (await self.status(node)) is not None:
                    return
                state = await self.executor.state(node)
                if not state.active and state.exit_code is not None:
                    raise ActionFailed(f"{node.name} exited {state.exit_code} after the start ({state.detail})")
                await trio.sleep(POLL_S)
        raise ActionFailed(f"{node.name} did not answer within {self.config.policy.start_timeout_s:g}s (policy.start_timeout_s)")

    async def reseed(self, node: Node, flight: InFlight) -> None:
        """`dtfd reseed`: the damaged dir becomes DIR.backup-<time>; an empty dir with a REJOIN marker replaces it.

        Run again after recoveryd died during it, `dtfd reseed` finishes the swap it began,
        or reports the reseed already done, so the node never starts on an unmarked empty dir.
        """
        term = flight.data.get("cluster_term", 0)
        command = [sys.executable, "-m", "dtfd.cli", "reseed", "--data-dir", node.data_dir, "--term", str(term)]
        with trio.fail_after(60):
            done = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)
        if done.returncode != 0:
            raise ActionFailed(f"dtfd reseed exit {done.returncode}: {done.stderr.decode(errors='replace').strip()}")
        report = json.loads(done.stdout)
        flight.data.update(backup=report["backup"], rejoin_term=report["rejoin_term"])

    async def leader_above(self, node: Node, flight: InFlight) -> None:
        """The node catches up only from a leader of a term above its rejoin term: hand leadership over if needed."""
        rejoin_term = flight.data.get("rejoin_term", 0)
        asked_in_term = 0
        with trio.move_on_after(self.config.policy.catch_up_timeout_s):
            while True:
                leader = await self.leader(exclude=node.name)
                if leader and leader["term"] > rejoin_term:
                    flight.data["leader"] = leader["id"]
                    return
                if leader and asked_in_term != leader["term"]:
                    asked_in_term = leader["term"]
                    flight.data["transfer"] = f"{leader['id']}->{await self.transfer(leader, avoid=node.name)}"
                    self.journal.save(flight)
                await trio.sleep(POLL_S)
        raise ActionFailed(f"no leader above term {rejoin_term} within {self.config.policy.catch_up_timeout_s:g}s")

    async def caught_up(self, node: Node, flight: InFlight) -> None:
        """Rejoined: voting again (REJOIN cleared by dtfd) and applied up to the leader's commit index."""
        target = 0
        with trio.move_on_after(self.config.policy.catch_up_timeout_s):
            while True:
                leader = await self.leader(exclude=node.name)
                target = target or (leader["commit_index"] if leader else 0)
                view = await self.status(node)
                if target and view and not view["rejoining"] and view["applied_index"] >= target:
                    flight.data["applied_index"] = view["applied_index"]
                    return
                await trio.sleep(POLL_S)
        raise ActionFailed(f"{node.name} not caught up to index {target} within {self.config.policy.catch_up_timeout_s:g}s")

    async def clean_backups(self, node: Node, flight: InFlight) -> None:
        """Old reseed backups of this node beyond policy.backups_keep: the first thing to give back to the disk."""
        backups = sorted(glob(f"{node.data_dir}.backup-*"))
        stale = backups[: max(0, len(backups) - self.config.policy.backups_keep)]
        for path in stale:
            await trio.to_thread.run_sync(shutil.rmtree, path)
        flight.data["removed_backups"] = len(stale)

    async def compact(self, node: Node, flight: InFlight) -> None:
        """Snapshot and truncate the node's log: gives back the disk the log held. Best effort: a node out of fds may not answer."""
        try:
            reply = await self.post(node, "/v1/admin/compact", {})
        except (trio.TooSlowError, httpx.HTTPError) as exc:
            flight.data["compact"] = f"no answer: {exc or type(exc).__name__}"
            return
        flight.data["compact"] = f"snapshot at {reply.json()['snapshot_index']}" if reply.status_code == 200 else f"{reply.status_code} {reply.text[:200]}"

    async def still_exhausted(self, node: Node) -> str:
        verdict = resource_verdict(await self.prober.observe(node), self.config)
        return verdict.reason if verdict else ""

    async def transfer_away(self, node: Node, flight: InFlight) -> None:
        """If cleaning and compacting were not enough, a leader hands over before a restart or an operator comes."""
        still = await self.still_exhausted(node)
        flight.data["after_compaction"] = still or "within thresholds"
        view = await self.status(node) if still else None
        if not view or view["role"] != "leader":
            return
        flight.data["transfer"] = f"{node.name}->{await self.transfer(view, avoid=node.name)}"
        with trio.move_on_after(TRANSFER_WAIT_S):
            while (v := await self.status(node)) and v["role"] == "leader":
                await trio.sleep(POLL_S)

    async def restart_if_needed(self, node: Node, flight: InFlight) -> None:
        """Restart last, only if still exhausted, and only for what a restart gives back (memory, fds, CPU)."""
        still = await self.still_exhausted(node)
        if not still:
            flight.data["restart"] = "not needed"
            return
        if not any(word in still for word in RESTART_HELPS):
            raise ActionFailed(f"still {still} after cleaning and compacting; a restart would not help: needs an operator")
        await self.executor.restart(node)
        await self.healthy(node, flight)
        flight.data["restart"] = "done"

    async def step_down(self, node: Node, flight: InFlight) -> None:
        """Ask a stale leader to step down, if it still leads and another node leads too."""
        view = await self.status(node)
        newer = await self.leader(exclude=node.name)
        if not view or view["role"] != "leader" or newer is None:
            flight.data["step_down"] = "not needed: no longer two leaders"
            return
        reply = await self.post(node, "/v1/admin/step-down", {}, timeout=self.config.probes.timeout_s)
        if reply.status_code == 409:
            flight.data["step_down"] = "not needed: no longer leads"
            return
        if reply.status_code != 200:
            raise ActionFailed(f"step-down refused by {node.name}: {reply.status_code} {reply.text[:200]}")
        flight.data["step_down"] = f"{node.name} (term {view['term']}) stepped down; {newer['id']} leads in term {newer['term']}"
        log.info("stale leader asked to step down %s", fields(node=node.name, term=view["term"], leader=newer["id"], leader_term=newer["term"]))

    async def stepped_down(self, node: Node, flight: InFlight) -> None:
        with trio.move_on_after(TRANSFER_WAIT_S):
            while (view := await self.status(node)) and view["role"] == "leader":
                await trio.sleep(POLL_S)
            return
        raise ActionFailed(f"{node.name} still claims leadership {TRANSFER_WAIT_S:g}s after the step-down")

    async def catch_up(self, node: Node, flight: InFlight) -> None:
        """The leader sends the follower a snapshot (taken now if needed) instead of the entries it is behind by."""
        leader = await self.leader(exclude=node.name)
        if leader is None:
            raise ActionFailed("no leader to catch up from")
        reply = await self.post(self.nodes[leader["id"]], "/v1/admin/catch-up", {"to": node.name})
        if reply.status_code == 409:
            flight.data["catch_up"] = f"not needed: {reply.json()['error']['message']}"
        elif reply.status_code == 200:
            answer = reply.json()
            flight.data["catch_up"] = f"snapshot at {answer['snapshot_index']} from {answer['leader']} (match index was {answer['match_index']})"
        else:
            raise ActionFailed(f"catch-up refused by {leader['id']}: {reply.status_code} {reply.text[:200]}")

    async def lag_closed(self, node: Node, flight: InFlight) -> None:
        """The gap must close within thresholds.slow_follower_s; if it persists, the action fails and says so."""
        limit, lag = self.config.thresholds.slow_follower_lag, None
        with trio.move_on_after(self.config.thresholds.slow_follower_s):
            while True:
                leader = await self.leader(exclude=node.name)
                peer = leader.get("peers", {}).get(node.name) if leader else None
                if peer is not None:
                    lag = peer["lag"]
                    if lag <= limit:
                        flight.data["lag"] = lag
                        return
                await trio.sleep(POLL_S)
        raise ActionFailed(f"persists: {node.name} still {lag} entries behind the leader "
                           f"{self.config.thresholds.slow_follower_s:g}s after the snapshot catch-up (slow_follower_lag {limit})")
