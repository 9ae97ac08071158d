"""dtfd's process: wires config, storage, core, peers and API into one nursery.

Start-up failures get one clear log line and a distinct exit code, so systemd and
recoveryd can tell them apart: 78 config, 65 corrupt data, 75 data dir locked,
74 storage I/O, 69 listen address unavailable. A write or fsync that fails while running
also ends the process with 74, at once: after a failed fsync the storage refuses further
writes, and serving on could acknowledge what the disk dropped; the supervisor restarts
the node on what is durable. SIGTERM hands leadership over first; SIGHUP reloads what can
change at run time (log level, tokens).
"""

from __future__ import annotations

import logging
import os
import random
import signal
from pathlib import Path

import trio

from dtfd import config, journal
from dtfd.journal import fields
from dtfd.raft import Config as RaftConfig
from dtfd.raft import Message
from dtfd.scheduler.scheduler import Policy, Scheduler
from dtfd.scheduler.shedding import RateLimiter
from dtfd.server import auth, http, tls
from dtfd.server.api import Api
from dtfd.server.faults import Faults
from dtfd.server.metrics import Metrics
from dtfd.server.node import Node, Timing
from dtfd.server.notify import Notifier
from dtfd.server.recorder import Recorder
from dtfd.server.transport import Transport
from dtfd.server.workload_api import WorkloadApi
from dtfd.storage import failpoints
from dtfd.storage.datadir import clear_rejoin, open_or_exit, rejoin_term
from dtfd.storage.interface import EX_IOERR, LogStorage, StorageFailed

log = logging.getLogger("dtf.daemon")

EX_UNAVAILABLE = 69
STOP_GRACE_S = 3.0


class StartupError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def raft_config(cfg: config.NodeConfig, rejoin_term: int = 0) -> RaftConfig:
    raft = cfg.config.raft
    return RaftConfig(
        id=cfg.node.id,
        voters=tuple(n.id for n in cfg.config.cluster.nodes),
        rng=random.Random(),  # OS-seeded: nodes must not share election timeouts
        election_min=cfg.ticks(raft.election_min_ms),
        election_max=cfg.ticks(raft.election_max_ms),
        heartbeat=cfg.ticks(raft.heartbeat_ms),
        pre_vote=raft.pre_vote,
        check_quorum=raft.check_quorum,
        max_inflight=raft.max_inflight,
        max_entries_per_msg=raft.max_entries_per_msg,
        max_bytes_per_msg=raft.max_bytes_per_msg,
        snapshot_chunk=raft.snapshot_chunk_bytes,
        rejoin_term=rejoin_term,
    )


def read_secret(path: str) -> bytes:
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as exc:
        raise config.ConfigError(f"cluster.secret_file: cannot read {path}: {exc.strerror}") from None
    if len(secret) < 16:
        raise config.ConfigError(f"cluster.secret_file: {path} must hold at least 16 bytes")
    return secret


async def _listen(address: str, what: str) -> list[trio.SocketListener]:
    host, port = config.parse_address(address, what)
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise StartupError(EX_UNAVAILABLE, f"cannot listen on {address} for {what}: {exc.strerror}") from None


def _status_line(node: Node) -> str:
    core = node.core
    return f"{core.role.value} term={core.term} leader={core.leader or '-'} applied={node.machine.applied}"


async def serve(cfg: config.NodeConfig, config_path: str) -> int:
    secret = read_secret(cfg.config.cluster.secret_file)
    tokens = auth.load_tokens(cfg.config.api.tokens_file)
    server_ssl, client_ssl = tls.server_context(cfg.config.tls), tls.client_context(cfg.config.tls)
    write, fsync = failpoints.io(os.write, os.fdatasync if cfg.config.storage.fsync else (lambda fd: None))  # test-only faults, if asked for
    storage = failpoints.storage(open_or_exit(str(cfg.data_dir), segment_size=cfg.config.storage.segment_bytes, write=write, fsync=fsync))
    try:
        peer_listeners = await _listen(cfg.node.peer, "cluster.nodes.peer")
        api_listeners: list = await _listen(cfg.node.api, "cluster.nodes.api")
        if server_ssl is not None:
            api_listeners = [trio.SSLListener(listener, server_ssl, https_compatible=True) for listener in api_listeners]
        peers = {p.id: config.parse_address(p.peer, "cluster.nodes.peer") for p in cfg.peers}
        faults = Faults.from_env(cfg.node.id)  # test-only, None unless DTF_NODE_FAULTS is set
        transport = Transport(cfg.node.id, peers, secret, lambda m: _deliver(node, faults, m), server_ssl=server_ssl, client_ssl=client_ssl)
        timing = Timing(cfg.config.raft.tick_ms / 1000, cfg.config.raft.snapshot_every_entries, cfg.config.raft.checksum_every_entries)
        metrics = Metrics()
        send = faults.sender(transport.send) if faults else transport.send
        node = Node(raft_config(cfg, rejoin_term(str(cfg.data_dir))), storage, timing, send, metrics.fsync_seconds.observe)
        metrics.watch(node, transport)
        api = Api(node, metrics, tokens, {n.id: n.api for n in cfg.config.cluster.nodes}, client_ssl)
        w = cfg.config.workload
        scheduler = Scheduler(node, Policy(w.heartbeat_s, w.lost_after_s, w.lease_grace_s, max_queued=w.max_queued_tasks))
        WorkloadApi(api, scheduler, RateLimiter(w.submit_rate_per_s, w.submit_burst))
        recorder = Recorder(cfg.data_dir)
        node.on_apply.append(lambda index, envelope, result: recorder.observe(index, envelope.command, result, node.machine.image.workload))
        limits = http.Limits(max_body_bytes=cfg.config.api.max_body_bytes)
        notifier = Notifier()
        node.on_change.append(lambda: notifier.status(_status_line(node)))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(transport.run, peer_listeners)
                if faults:
                    nursery.start_soon(faults.run, node)
                nursery.start_soon(node.run)
                nursery.start_soon(scheduler.run)
                nursery.start_soon(recorder.run)
                server = http.Server(api.handle, limits)
                nursery.start_soon(server.serve, api_listeners)
                nursery.start_soon(_watchdog, node, notifier)
                nursery.start_soon(_until_rejoined, node, str(cfg.data_dir))
                notifier.ready()
                notifier.status(_status_line(node))
                log.info("dtfd started %s", fields(node=cfg.node.id, api=cfg.node.api, peer=cfg.node.peer, data_dir=cfg.data_dir))
                await _until_stopped(node, api, notifier, config_path)
                server.drain()  # every request taken is answered; new connections are refused
                with trio.move_on_after(STOP_GRACE_S):
                    await server.closed.wait()
                nursery.cancel_scope.cancel()
        except* StorageFailed as group:
            failure = _first(group)
        else:
            failure = None
        finally:
            await api.forwarder.aclose()
    finally:
        closing = _close(storage)
    failure = failure or closing
    if failure is not None:
        log.critical("storage failed, stopped %s", fields(node=cfg.node.id, error=failure))
        return EX_IOERR
    log.info("dtfd stopped %s", fields(node=cfg.node.id))
    return 0


def _first(error: BaseException) -> BaseException:
    """The first real exception inside (nested) exception groups: what the log line names."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def _close(storage: LogStorage) -> StorageFailed | None:
    """Close the storage; failing to write its last hard state (disk full) is a storage failure
    like any other, reported with exit 74, not a traceback."""
    try:
        storage.close()
    except StorageFailed as e:
        return e
    return None


def _deliver(node: Node, faults: Faults | None, message: Message) -> None:
    if faults is None or not faults.drops(message):
        node.step(message)


async def _until_rejoined(node: Node, data_dir: str) -> None:
    """A reseeded node drops its REJOIN marker once caught up, so a restart does not re-impose it."""
    if not node.core.rejoining:
        return
    log.warning("rejoining after a reseed: not voting until caught up %s", fields(node=node.id, rejoin_term=node.core.config.rejoin_term))
    while node.core.rejoining:
        await trio.sleep(0.2)
    await trio.to_thread.run_sync(clear_rejoin, data_dir)
    log.info("rejoined: caught up with a leader of a later term, voting again %s", fields(node=node.id, term=node.core.term))


async def _watchdog(node: Node, notifier: Notifier) -> None:
    """Pet systemd's watchdog only while the tick loop is alive: a stuck loop stops the petting."""
    interval = notifier.watchdog_interval()
    if interval is None:
        return
    while True:
        if node.last_tick_age() < max(2 * interval, 1.0):
            notifier.watchdog()
        await trio.sleep(interval)


async def _until_stopped(node: Node, api: Api, notifier: Notifier, config_path: str) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                _reload(node, api, notifier, config_path)
                continue
            log.info("stopping %s", fields(node=node.id, signal=signal.Signals(signum).name))
            notifier.stopping()
            await _hand_over(node, api)
            return


async def _hand_over(node: Node, api: Api) -> None:
    """Move leadership away and let in-flight requests finish, within a bound."""
    api.draining = True
    with trio.move_on_after(STOP_GRACE_S):
        if node.is_leader and len(node.core.voters) > 1:
            target = api.best_follower()
            if target:
                node.transfer_leadership(target)
                log.info("leadership transfer %s", fields(node=node.id, to=target))
            while node.is_leader:
                await trio.sleep(0.01)
        while api.in_flight:
            await trio.sleep(0.01)


def _reload(node: Node, api: Api, notifier: Notifier, config_path: str) -> None:
    notifier.reloading()
    try:
        fresh = config.load(config_path, node.id)
        api.tokens = auth.load_tokens(fresh.config.api.tokens_file)
        raft = fresh.config.raft
        node.timing.tick_s = raft.tick_ms / 1000
        node.core.set_timing(fresh.ticks(raft.heartbeat_ms), fresh.ticks(raft.election_min_ms), fresh.ticks(raft.election_max_ms))
        journal.setup(fresh.config.log.level)
        log.info(
            "configuration reloaded %s",
            fields(node=node.id, log_level=fresh.config.log.level, tick_ms=raft.tick_ms, heartbeat_ms=raft.heartbeat_ms),
        )
    except config.ConfigError as exc:
        log.error("reload refused, keeping the running configuration %s", fields(error=exc))
    notifier.ready()


def run(config_path: str, node_id: str) -> int:
    """Entry point behind `dtfd --config FILE --node ID`."""
    journal.setup("info")
    try:
        cfg = config.load(config_path, node_id)
        journal.setup(cfg.config.log.level)
        return trio.run(serve, cfg, config_path)
    except config.ConfigError as exc:
        log.critical("configuration error: %s", exc)
        return config.EX_CONFIG
    except StartupError as exc:
        log.critical("%s", exc)
        return exc.code
