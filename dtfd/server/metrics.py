"""Prometheus metrics: node state mirrored at scrape time, events counted as they happen."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from dtfd.raft import Role
from dtfd.server.node import Node
from dtfd.server.transport import Transport

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _NodeCollector(Collector):
    def __init__(self, node: Node, transport: Transport) -> None:
        self.node, self.transport = node, transport

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        node, status = self.node, self.node.core.status()
        yield GaugeMetricFamily("dtf_raft_term", "Current Raft term.", value=status.term)
        yield GaugeMetricFamily("dtf_raft_is_leader", "1 if this node leads.", value=int(status.role is Role.LEADER))
        yield GaugeMetricFamily("dtf_raft_commit_index", "Highest log index known committed.", value=status.commit)
        yield GaugeMetricFamily("dtf_raft_applied_index", "Highest log index applied to the state machine.", value=node.machine.applied)
        yield GaugeMetricFamily("dtf_raft_snapshot_index", "Log index of the newest snapshot.", value=status.snapshot_index)
        yield CounterMetricFamily("dtf_raft_leader_changes", "Leaders this node has seen take over.", value=node.leader_changes)
        dropped = CounterMetricFamily("dtf_raft_messages_dropped", "Raft messages ignored as stale or malformed.", labels=["reason"])
        for reason, count in sorted(status.dropped.items()):
            dropped.add_metric([reason], count)
        yield dropped
        up = GaugeMetricFamily("dtf_peer_up", "1 while the outgoing link to a peer is connected.", labels=["peer"])
        queue_drops = CounterMetricFamily("dtf_peer_messages_dropped", "Messages dropped for a peer that was unreachable or slow.", labels=["peer"])
        queued = GaugeMetricFamily("dtf_peer_queued_bytes", "Payload bytes (entries, snapshot chunks) queued for a peer.", labels=["peer"])
        for peer, stats in sorted(self.transport.stats.items()):
            up.add_metric([peer], int(stats.up))
            queue_drops.add_metric([peer], stats.dropped)
            queued.add_metric([peer], stats.queued_bytes)
        yield up
        yield queue_drops
        yield queued


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.proposals = Counter("dtf_raft_proposals", "Commands proposed through this node, by outcome.", ["result"], registry=self.registry)
        self.http_requests = Counter("dtf_http_requests", "HTTP requests served, by route and status code.", ["route", "code"], registry=self.registry)
        self.fsync_seconds = Histogram(
            "dtf_wal_fsync_duration_seconds",
            "Time to make one Ready durable (WAL write, fsync, hard state).",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )

    def watch(self, node: Node, transport: Transport) -> None:
        self.registry.register(_NodeCollector(node, transport))

    def render(self) -> bytes:
        return generate_latest(self.registry)
