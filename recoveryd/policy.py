"""The decision rules: what a cycle's observations mean, when evidence is enough, what may be done.

Pure functions and small state, no I/O, so every rule has a unit test. Three steps, as in
Patroni's ha.py one cycle at a time:
  verdicts()       one cycle of observations -> at most one suspected failure per node
  Tracker.update() consecutive agreeing verdicts -> a confirmed Diagnosis (never one probe)
  Planner.decide() a Diagnosis -> act, wait, refuse or give up, with the reason said
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from recoveryd.config import Config
from recoveryd.probes import EX_DATAERR, Observation

CRASH = "crash"
HANG = "hang"
CORRUPTION = "corruption"
EXHAUSTION = "exhaustion"
SPLIT_BRAIN = "split_brain"
TERM_DIVERGENCE = "term_divergence"
DIVERGENCE = "divergence"
SLOW_FOLLOWER = "slow_follower"

RESTART, RESEED, RELIEVE, REPORT = "restart", "reseed", "relieve", "report"
STEP_DOWN, CATCH_UP = "step_down", "catch_up"
ACTIONS = {
    CRASH: RESTART,
    HANG: RESTART,
    CORRUPTION: RESEED,
    DIVERGENCE: RESEED,  # state transfer from the leader, as for a damaged log
    EXHAUSTION: RELIEVE,
    SPLIT_BRAIN: STEP_DOWN,  # a safe Raft operation on the stale leader; a restart would only hide the evidence
    TERM_DIVERGENCE: REPORT,  # the node's next message makes the others adopt its term: Raft resolves it
    SLOW_FOLLOWER: CATCH_UP,  # the leader sends it a snapshot instead of the entries it is behind by
}
PROCESS_ACTIONS = frozenset({RESTART, RESEED, RELIEVE})  # may stop the process: bounded by limits
CLUSTER_FAILURES = frozenset({SPLIT_BRAIN, TERM_DIVERGENCE, DIVERGENCE, SLOW_FOLLOWER})  # seen by comparing the nodes' views
MAX_EVIDENCE = 5  # observations kept with a diagnosis


class Verdict(NamedTuple):
    failure: str
    reason: str


def verdicts(cycle: dict[str, Observation], config: Config) -> dict[str, Verdict]:
    """At most one suspected failure per node for this cycle, the most urgent first."""
    found: dict[str, Verdict] = {}
    for name, obs in cycle.items():
        verdict = _process_verdict(obs) or resource_verdict(obs, config)
        if verdict:
            found[name] = verdict
    for name, verdict in _cluster_verdicts(cycle, config).items():
        found.setdefault(name, verdict)
    return found


def _process_verdict(obs: Observation) -> Verdict | None:
    p, h = obs.process, obs.health
    if not p.active:
        if p.exit_code == EX_DATAERR:
            return Verdict(CORRUPTION, f"exited {EX_DATAERR}: refuses to start on corrupt data")
        if obs.verify and obs.verify.status == "corrupt":
            return Verdict(CORRUPTION, f"dtfd verify: {'; '.join(obs.verify.problems[:2]) or 'corrupt'}")
        return Verdict(CRASH, f"process {p.detail}, last exit {p.exit_code}, /health {h.outcome}")
    if h.outcome in ("timeout", "unhealthy"):
        return Verdict(HANG, f"process {p.pid} alive but /health {h.outcome}: {h.detail}")
    return None


def resource_verdict(obs: Observation, config: Config) -> Verdict | None:
    r, t = obs.resources, config.thresholds
    if r is None:
        return None
    over = [
        text
        for bad, text in (
            (r.disk_free_bytes < t.disk_free_min_bytes, f"disk free {r.disk_free_bytes} < {t.disk_free_min_bytes} bytes"),
            (r.inodes_free_pct < t.inodes_free_min_pct, f"inodes free {r.inodes_free_pct}% < {t.inodes_free_min_pct}%"),
            (r.rss_bytes > t.rss_max_bytes, f"RSS {r.rss_bytes} > {t.rss_max_bytes} bytes"),
            (r.open_fds > t.open_fds_max, f"open fds {r.open_fds} > {t.open_fds_max}"),
            (r.cpu_pct > t.cpu_max_pct, f"CPU {r.cpu_pct}% > {t.cpu_max_pct}%"),
        )
        if bad
    ]
    return Verdict(EXHAUSTION, "; ".join(over)) if over else None


def _cluster_verdicts(cycle: dict[str, Observation], config: Config) -> dict[str, Verdict]:
    """Compare the nodes' own views: leaders, terms, state checksums at the same index, follower lag."""
    views = {name: obs.status for name, obs in cycle.items() if obs.status}
    found: dict[str, Verdict] = {}
    leaders = sorted((v["term"], name) for name, v in views.items() if v["role"] == "leader")
    if len(leaders) > 1:
        claims = ", ".join(f"{name} (term {term})" for term, name in leaders)
        top_term = leaders[-1][0]
        for term, name in leaders:
            if term < top_term or sum(1 for t, _ in leaders if t == term) > 1:
                found[name] = Verdict(SPLIT_BRAIN, f"several nodes claim leadership: {claims}")
    if not leaders:
        return found
    leader_term, leader = leaders[-1]
    for name, view in views.items():
        if view["term"] > leader_term + config.thresholds.term_gap:
            found.setdefault(name, Verdict(TERM_DIVERGENCE, f"term {view['term']}, leader {leader} at term {leader_term}"))
    lead = views[leader]
    for name, verdict in _odd_states(views, len(config.nodes)).items():
        found.setdefault(name, verdict)
    for name, peer in lead.get("peers", {}).items():
        if name in cycle and cycle[name].up and peer["lag"] > config.thresholds.slow_follower_lag:
            found.setdefault(name, Verdict(SLOW_FOLLOWER, f"{peer['lag']} entries behind leader {leader} (match index {peer['match_index']})"))
    return found


def _odd_states(views: dict[str, dict], cluster_size: int) -> dict[str, Verdict]:
    """Nodes whose state checksum differs from a majority's at the same index (the newest index that shows one).

    Each node reports its checksum at its applied index and at recent checkpoints (multiples
    of raft.checksum_every_entries, sparser for a big state but alike on every node), so
    under load, when no two nodes are at the same applied index, they still share a checkpoint.
    """
    points: dict[int, dict[str, str]] = {}
    for name, view in views.items():
        for point in [*view.get("checkpoints", []), {"index": view["applied_index"], "checksum": view["checksum"]}]:
            points.setdefault(point["index"], {})[name] = point["checksum"]
    majority = cluster_size // 2 + 1
    for index in sorted(points, reverse=True):
        sums = points[index]
        agreed = [c for c in set(sums.values()) if sum(1 for v in sums.values() if v == c) >= majority]
        if agreed and len(set(sums.values())) > 1:
            (good,) = agreed
            holders = ", ".join(sorted(n for n, c in sums.items() if c == good))
            return {name: Verdict(DIVERGENCE, f"checksum {c[:12]} at index {index}, the majority ({holders}) has {good[:12]}")
                    for name, c in sums.items() if c != good}
    return {}


def views_of(cycle: dict[str, Observation]) -> dict[str, dict]:
    """Every node's own view in one cycle, as evidence for a failure seen by comparing them."""
    keys = ("role", "term", "leader", "commit_index", "applied_index", "checksum", "rejoining")
    out = {}
    for name, obs in sorted(cycle.items()):
        view = {"health": obs.health.outcome}
        if obs.status:
            view.update({k: obs.status.get(k) for k in keys})
            view["lag"] = {peer: p["lag"] for peer, p in obs.status.get("peers", {}).items()} if obs.status["role"] == "leader" else {}
        out[name] = view
    return out


@dataclass
class Diagnosis:
    node: str
    failure: str
    reason: str
    evidence: list[Observation]
    views: dict = field(default_factory=dict)  # every node's view, for failures seen by comparing them

    @property
    def action(self) -> str:
        return ACTIONS[self.failure]


@dataclass
class _Streak:
    failure: str
    reason: str
    observations: list[Observation] = field(default_factory=list)  # the latest MAX_EVIDENCE
    since: float = 0.0  # when the first of the streak was made
    count: int = 0
    acted: bool = False  # a decision was taken on this streak: a report is not repeated


class Tracker:
    """Consecutive agreeing verdicts per node; a different verdict or none breaks the streak."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.streaks: dict[str, _Streak] = {}

    def needed(self, failure: str) -> int:
        t = self.config.thresholds
        return t.hang_probes if failure == HANG else t.confirm_probes

    def update(self, cycle: dict[str, Observation], found: dict[str, Verdict]) -> list[Diagnosis]:
        confirmed = []
        for name, obs in cycle.items():
            verdict = found.get(name)
            streak = self.streaks.get(name)
            if verdict is None:
                self.streaks.pop(name, None)
                continue
            if streak is None or streak.failure != verdict.failure:
                streak = self.streaks[name] = _Streak(verdict.failure, verdict.reason, since=obs.at)
            streak.count += 1
            streak.reason = verdict.reason
            streak.observations = [*streak.observations, obs][-MAX_EVIDENCE:]
            if streak.acted or streak.count < self.needed(streak.failure):
                continue
            reason = streak.reason
            if streak.failure == SLOW_FOLLOWER:
                if obs.at - streak.since < self.config.thresholds.slow_follower_s:
                    continue
                reason += f" for {obs.at - streak.since:.1f}s"
            views = views_of(cycle) if streak.failure in CLUSTER_FAILURES else {}
            confirmed.append(Diagnosis(name, streak.failure, reason, list(streak.observations), views))
        return confirmed

    def acted(self, node: str) -> None:
        if node in self.streaks:
            self.streaks[node].acted = True

    def forget(self, node: str) -> None:
        """After an action: only fresh evidence may start another."""
        self.streaks.pop(node, None)


class Decision(NamedTuple):
    verdict: str  # act | wait | refuse | give_up | skip
    reason: str


@dataclass
class Planner:
    """Limits across actions: one per node, at most (n-1)/2 nodes at once, restarts per window, cool-down, quorum."""

    config: Config
    in_flight: dict[str, str] = field(default_factory=dict)  # node -> action
    failed: dict[str, str] = field(default_factory=dict)  # node -> why recoveryd gave up
    restarts: dict[str, list[float]] = field(default_factory=dict)  # node -> process restarts (wall clock)
    refused: dict[str, str] = field(default_factory=dict)  # node -> the refusal last recorded

    def decide(self, diagnosis: Diagnosis, now: float, latest: dict[str, Observation]) -> Decision:
        node, action, policy = diagnosis.node, diagnosis.action, self.config.policy
        if node in self.in_flight:
            return Decision("skip", f"{self.in_flight[node]} already in progress")
        if node in self.failed:
            return Decision("skip", f"marked failed: {self.failed[node]}")
        if action == REPORT:
            return Decision("act", "report only: no safe automatic repair")
        if action not in PROCESS_ACTIONS:
            return Decision("act", diagnosis.reason)  # a Raft operation that stops no process: not bounded by restart limits
        recent = [t for t in self.restarts.get(node, []) if now - t < policy.restart_window_s]
        self.restarts[node] = recent
        if len(recent) >= policy.max_restart_attempts:
            return Decision("give_up", f"{len(recent)} restarts within {policy.restart_window_s:g}s (max_restart_attempts {policy.max_restart_attempts})")
        if recent and now - recent[-1] < policy.restart_cooldown_s:
            return Decision("wait", f"cool-down: last restart {now - recent[-1]:.1f}s ago (restart_cooldown_s {policy.restart_cooldown_s:g})")
        stopping = {n: a for n, a in self.in_flight.items() if a in PROCESS_ACTIONS}
        if len(stopping) >= self.config.max_parallel:
            busy = ", ".join(f"{n} ({a})" for n, a in sorted(stopping.items()))
            return Decision("wait", f"already acting on {busy}; at most {self.config.max_parallel} node(s) at once")
        if action == RESEED or (action == RELIEVE and latest[node].up):
            blocked = self.quorum_without(node, latest)
            if blocked:
                return Decision("refuse", blocked)
        return Decision("act", diagnosis.reason)

    def quorum_without(self, node: str, latest: dict[str, Observation]) -> str:
        """Why the cluster would lose its quorum while `node` is stopped or not voting; empty if it would not."""
        names = [n.name for n in self.config.nodes]
        need = len(names) // 2 + 1
        voting = [
            n for n in names
            if n != node and self.in_flight.get(n) not in PROCESS_ACTIONS and n not in self.failed
            and n in latest and latest[n].up and latest[n].status is not None and not latest[n].status.get("rejoining")
        ]
        if len(voting) >= need:
            return ""
        return (f"{node}'s data is needed for a quorum: {need} of {len(names)} voters are needed without it, "
                f"only {len(voting)} ({', '.join(voting) or 'none'}) are up and voting")

    def begin(self, node: str, action: str, now: float, count: bool = True) -> None:
        """`count=False` for an action resumed after a restart: it was counted when it began."""
        self.in_flight[node] = action
        if count and action in PROCESS_ACTIONS:
            self.restarts.setdefault(node, []).append(now)

    def end(self, node: str) -> None:
        self.in_flight.pop(node, None)
