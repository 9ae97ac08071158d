"""recoveryd's process: one nursery with the decision loop, its HTTP endpoints and one task per action.

Each cycle probes every node, turns the observations into verdicts, confirms them over
consecutive probes and decides, logging every decision with its reason and evidence.
Actions run as their own named tasks so probing goes on meanwhile; actions interrupted
by a restart of recoveryd are resumed from their journal before the first cycle.
"""

from __future__ import annotations

import logging
import signal
import ssl
import time
import uuid

import httpx
import trio

from dtfd import journal
from dtfd.config import EX_CONFIG, ConfigError, parse_address
from dtfd.journal import fields
from dtfd.server import http
from dtfd.server.notify import Notifier
from recoveryd import config as recovery_config
from recoveryd.actions import ActionFailed, Actions, InFlight, Journal
from recoveryd.config import Config
from recoveryd.executors import make
from recoveryd.policy import ACTIONS, PROCESS_ACTIONS, REPORT, RESEED, Diagnosis, Planner, Tracker, verdicts
from recoveryd.probes import Observation, Prober
from recoveryd.records import Metrics, Record, Records

log = logging.getLogger("dtf.recoveryd")

EX_UNAVAILABLE = 69
REPORT_TIMEOUT_S = 5.0


class Recoveryd:
    def __init__(self, config: Config, client: httpx.AsyncClient) -> None:
        self.config, self.client = config, client
        self.metrics = Metrics()
        self.records = Records(config.recoveryd.state_dir, config.recovery_log, self.metrics)
        self.executor = make(config)
        self.prober = Prober(config, self.executor, client)
        self.journal = Journal(config.recoveryd.state_dir)
        self.actions = Actions(config, self.executor, client, self.journal, self.prober)
        self.tracker = Tracker(config)
        self.planner = Planner(config, restarts=self.records.restarts_since(time.time() - config.policy.restart_window_s, PROCESS_ACTIONS))
        self.notifier = Notifier()
        self.latest: dict[str, Observation] = {}
        self.last_cycle = 0.0  # trio clock
        self._waiting: dict[str, str] = {}  # node -> last wait/refusal said, so each is logged once

    async def run(self, listeners: list[trio.SocketListener]) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(http.serve, self.handle, listeners, http.Limits(), name="http")
            for flight in self.journal.pending():
                log.warning("resuming action interrupted by a restart %s", fields(
                    node=flight.record.node, action=flight.record.action, done=",".join(flight.done) or "-", id=flight.record.id))
                self.planner.begin(flight.record.node, flight.record.action, flight.record.started, count=False)
                nursery.start_soon(self.act, flight, name=f"action {flight.record.node} {flight.record.action}")
            nursery.start_soon(self.loop, nursery, name="decision loop")
            self.notifier.ready()
            log.info("recoveryd started %s", fields(mode=self.config.recoveryd.mode, nodes=",".join(n.name for n in self.config.nodes),
                                                     interval_s=self.config.probes.interval_s, listen=self.config.recoveryd.listen))
            await _until_signalled()
            self.notifier.stopping()
            log.info("recoveryd stopping; actions in flight resume at the next start")
            nursery.cancel_scope.cancel()

    async def loop(self, nursery: trio.Nursery) -> None:
        watchdog = self.notifier.watchdog_interval()
        while True:
            started = trio.current_time()
            cycle = await self.prober.cycle()
            self.latest = cycle
            self.decide(cycle, nursery)
            self.last_cycle = trio.current_time()
            self.metrics.cycles.inc()
            if watchdog is not None:
                self.notifier.watchdog()  # only from a loop that completes its cycles
            self.notifier.status(self._status_line())
            await trio.sleep_until(started + self.config.probes.interval_s)

    def decide(self, cycle: dict[str, Observation], nursery: trio.Nursery) -> None:
        """One decision per confirmed diagnosis, each logged with its reason."""
        for name, obs in cycle.items():
            if name in self.planner.failed and obs.up:
                log.warning("node answers again; no longer marked failed %s", fields(node=name, was=self.planner.failed.pop(name)))
                self.metrics.failed.labels(name).set(0)
        now = time.time()
        for diagnosis in self.tracker.update(cycle, verdicts(cycle, self.config)):
            decision = self.planner.decide(diagnosis, now, cycle)
            if decision.verdict == "skip":
                continue
            context = fields(node=diagnosis.node, failure=diagnosis.failure, action=diagnosis.action, reason=decision.reason)
            if decision.verdict == "wait":
                if self._waiting.get(diagnosis.node) != decision.reason:
                    log.info("recovery deferred %s", context)
                self._waiting[diagnosis.node] = decision.reason
                continue
            self._waiting.pop(diagnosis.node, None)
            if decision.verdict == "refuse":
                if self.planner.refused.get(diagnosis.node) != decision.reason:
                    self.planner.refused[diagnosis.node] = decision.reason
                    nursery.start_soon(self.finish, self._record(diagnosis, now), "refused", decision.reason)
                continue
            self.planner.refused.pop(diagnosis.node, None)
            if decision.verdict == "give_up":
                self.planner.failed[diagnosis.node] = decision.reason
                self.metrics.failed.labels(diagnosis.node).set(1)
                log.error("giving up on node; it needs an operator %s", context)
                nursery.start_soon(self.finish, self._record(diagnosis, now), "gave_up", decision.reason)
                continue
            self.tracker.acted(diagnosis.node)
            if diagnosis.action == REPORT:
                log.warning("detected %s", context)
                nursery.start_soon(self.finish, self._record(diagnosis, now), "reported", "")
                continue
            flight = InFlight(record=self._record(diagnosis, now))
            if diagnosis.action == RESEED:
                flight.data["cluster_term"] = _cluster_term(cycle)  # the rejoin term, should the old hard state be unreadable
            self.journal.save(flight)
            self.planner.begin(diagnosis.node, diagnosis.action, now)
            log.warning("recovery started %s", context)
            nursery.start_soon(self.act, flight, name=f"action {diagnosis.node} {diagnosis.action}")

    def _record(self, diagnosis: Diagnosis, now: float) -> Record:
        self.metrics.detections.labels(diagnosis.failure).inc()
        return Record(id=uuid.uuid4().hex[:16], node=diagnosis.node, failure=diagnosis.failure, action=ACTIONS[diagnosis.failure],
                      reason=diagnosis.reason, evidence=list(diagnosis.evidence), views=diagnosis.views, started=now)

    async def act(self, flight: InFlight) -> None:
        self.metrics.in_flight.inc()
        try:
            result, detail = "ok", await self.actions.run(flight)
        except ActionFailed as exc:
            result, detail = "failed", str(exc)
        finally:
            self.metrics.in_flight.dec()
        node = flight.record.node
        await self.finish(flight.record, result, detail)
        self.journal.remove(node)
        self.planner.end(node)
        self.tracker.forget(node)

    async def finish(self, record: Record, result: str, detail: str) -> None:
        """Write the record everywhere, then report it to the cluster's replicated history (best effort)."""
        record.result, record.detail, record.finished = result, detail, time.time()
        self.records.write(record)
        if self.config.recoveryd.report_to_cluster:
            await self.report(record)

    async def report(self, record: Record) -> None:
        body = {"node": record.node, "failure": record.failure, "action": record.action, "result": record.result,
                "reason": record.reason, "started": record.started, "finished": record.finished,
                "client": f"recoveryd-{record.id}", "seq": 1}  # a retried report is applied once
        for name in sorted(self.latest, key=lambda n: not self.latest[n].up):
            node = self.actions.nodes[name]
            try:
                with trio.fail_after(REPORT_TIMEOUT_S):
                    reply = await self.client.post(f"{node.url}/v1/recovery", json=body, timeout=REPORT_TIMEOUT_S)
                if reply.status_code == 200:
                    return
            except (trio.TooSlowError, httpx.HTTPError):
                continue
        log.warning("could not report to the cluster; kept locally %s", fields(node=record.node, id=record.id))

    def _status_line(self) -> str:
        up = sum(1 for o in self.latest.values() if o.up)
        acting = ", ".join(f"{n} {a}" for n, a in sorted(self.planner.in_flight.items())) or "-"
        failed = ", ".join(sorted(self.planner.failed)) or "-"
        return f"{up}/{len(self.config.nodes)} nodes up; acting: {acting}; failed: {failed}"

    # ---- recoveryd's own HTTP endpoints ------------------------------------------------------

    async def handle(self, request: http.Request) -> http.Response:
        if request.method != "GET":
            return http.error_response(405, "method_not_allowed", f"no route {request.method} {request.path}")
        if request.path == "/health":
            age = trio.current_time() - self.last_cycle
            if not self.last_cycle or age > 3 * self.config.probes.interval_s + self.config.probes.timeout_s:
                return http.error_response(503, "stalled", f"no probe cycle completed for {age:.1f}s")
            return http.json_response(200, {"status": "ok", "in_flight": self.planner.in_flight, "failed": self.planner.failed})
        if request.path == "/metrics":
            return http.Response(200, self.metrics.render(), content_type="text/plain; version=0.0.4; charset=utf-8")
        if request.path == "/v1/history":
            try:
                limit = int(request.query.get("limit", "100"))
            except ValueError:
                return http.error_response(422, "invalid", "limit: must be a number")
            return http.json_response(200, {"actions": self.records.history(request.query.get("node", ""), limit)})
        return http.error_response(404, "not_found", f"no route GET {request.path}")


def _cluster_term(cycle: dict[str, Observation]) -> int:
    return max((o.status["term"] for o in cycle.values() if o.status), default=0)


async def _until_signalled() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            return


async def serve(loaded: recovery_config.Loaded) -> int:
    config = loaded.config
    host, port = parse_address(config.recoveryd.listen, "recoveryd.listen")
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        log.critical("cannot listen on %s (recoveryd.listen): %s", config.recoveryd.listen, exc.strerror)
        return EX_UNAVAILABLE
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=config.recoveryd.ca_file) if config.recoveryd.ca_file else True
    headers = {"Authorization": f"Bearer {loaded.token}"}  # an admin token: status, leadership transfer, reports
    async with httpx.AsyncClient(verify=verify, timeout=config.probes.timeout_s, headers=headers) as client:
        daemon = Recoveryd(config, client)
        try:
            await daemon.run(listeners)
        finally:
            daemon.records.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="recoveryd", description="probes dtfd nodes and repairs them")
    parser.add_argument("--config", default=recovery_config.DEFAULT_PATH, help="(default: %(default)s)")
    args = parser.parse_args(argv)
    journal.setup("info")
    try:
        loaded = recovery_config.load(args.config)
    except ConfigError as exc:
        log.critical("configuration error: %s", exc)
        return EX_CONFIG
    journal.setup(loaded.config.log.level)
    return trio.run(serve, loaded)
