"""recoveryd's decision rules, without processes: verdicts, confirmation over probes, limits and quorum."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from recoveryd.config import Config
from recoveryd.executors import ProcessState
from recoveryd.policy import (
    CATCH_UP, CORRUPTION, CRASH, DIVERGENCE, EXHAUSTION, HANG, SLOW_FOLLOWER, SPLIT_BRAIN, STEP_DOWN, TERM_DIVERGENCE,
    Diagnosis, Planner, Tracker, verdicts,
)
from recoveryd.probes import Health, Observation, Resources, Verify

NAMES = ("node1", "node2", "node3")


def config(**policy) -> Config:
    nodes = [{"name": n, "url": f"http://127.0.0.1:{7001 + i}", "data_dir": f"/d/{n}"} for i, n in enumerate(NAMES)]
    return msgspec.convert({"nodes": nodes, "policy": {"restart_cooldown_s": 10.0, "max_restart_attempts": 3, **policy}}, Config)


def status(name: str, role: str = "follower", term: int = 2, applied: int = 10, checksum: str = "aa", peers: dict | None = None,
           rejoining: bool = False) -> dict:
    return {"id": name, "role": role, "term": term, "leader": "node1", "applied_index": applied, "commit_index": applied,
            "checksum": checksum, "peers": peers or {}, "rejoining": rejoining}


def up(name: str, at: float = 0.0, **kw) -> Observation:
    return Observation(name, at, ProcessState(True, 100, None, 0, "active/running"), Health("ok"), status(name, **kw),
                       Resources(10 << 30, 50.0, 100 << 20, 50, 5.0))


def down(name: str, at: float = 0.0, exit_code: int | None = 137, verify: Verify | None = None) -> Observation:
    return Observation(name, at, ProcessState(False, 0, exit_code, 0, "failed/exit-code"), Health("refused"), None, None, verify)


def healthy(at: float = 0.0) -> dict[str, Observation]:
    return {"node1": up("node1", at, role="leader"), "node2": up("node2", at), "node3": up("node3", at)}


def test_config_helper_builds_three_nodes():
    assert len(config().nodes) == 3 and config().max_parallel == 1


def test_a_healthy_cluster_has_no_verdicts():
    assert verdicts(healthy(), config()) == {}


@pytest.mark.parametrize(("obs", "failure"), [
    (down("node2"), CRASH),
    (down("node2", exit_code=65), CORRUPTION),
    (down("node2", exit_code=None, verify=Verify("corrupt", 65, ["bad record"])), CORRUPTION),
    (msgspec.structs.replace(up("node2"), health=Health("timeout", detail="no answer")), HANG),
    (msgspec.structs.replace(up("node2"), resources=Resources(10, 50.0)), EXHAUSTION),
    (up("node2", checksum="bb"), DIVERGENCE),
    (up("node2", role="leader", term=1), SPLIT_BRAIN),
    (up("node2", term=40), TERM_DIVERGENCE),
])
def test_each_failure_is_recognised_from_its_evidence(obs, failure):
    cycle = {**healthy(), "node2": obs}
    found = verdicts(cycle, config())
    assert set(found) == {"node2"} and found["node2"].failure == failure, found


def test_a_slow_follower_is_seen_in_the_leaders_view():
    cycle = {**healthy(), "node1": up("node1", role="leader", peers={"node3": {"lag": 50_000, "match_index": 3}})}
    assert verdicts(cycle, config())["node3"].failure == SLOW_FOLLOWER


def test_a_refused_health_while_the_process_starts_is_not_a_hang():
    cycle = {**healthy(), "node2": msgspec.structs.replace(up("node2"), health=Health("refused"), status=None)}
    assert verdicts(cycle, config()) == {}


def run(tracker: Tracker, cfg: Config, cycles: list[dict[str, Observation]]) -> list[list[Diagnosis]]:
    return [tracker.update(c, verdicts(c, cfg)) for c in cycles]


def test_one_failed_probe_is_never_enough():
    cfg = config()
    out = run(Tracker(cfg), cfg, [{**healthy(0), "node2": down("node2", 0)}, healthy(1), {**healthy(2), "node2": down("node2", 2)}])
    assert out == [[], [], []]


def test_two_consecutive_probes_confirm_with_both_as_evidence():
    cfg = config()
    out = run(Tracker(cfg), cfg, [{**healthy(0), "node2": down("node2", 0)}, {**healthy(1), "node2": down("node2", 1)}])
    assert out[0] == [] and [(d.node, d.failure) for d in out[1]] == [("node2", CRASH)]
    assert [o.at for o in out[1][0].evidence] == [0, 1]


def test_a_hang_needs_hang_probes():
    cfg = config()
    hung = msgspec.structs.replace(up("node2"), health=Health("timeout"))
    out = run(Tracker(cfg), cfg, [{**healthy(), "node2": hung}] * cfg.thresholds.hang_probes)
    assert [len(o) for o in out] == [0] * (cfg.thresholds.hang_probes - 1) + [1]


@given(st.lists(st.booleans(), max_size=30))
def test_never_confirmed_without_two_consecutive_failures(pattern):
    cfg = config()
    tracker = Tracker(cfg)
    for n, failing in enumerate(pattern):
        confirmed = tracker.update({"node2": down("node2", n)} if failing else {"node2": up("node2", n)},
                                   {"node2": verdicts({"node2": down("node2", n)}, cfg)["node2"]} if failing else {})
        if confirmed:
            assert n >= 1 and pattern[n] and pattern[n - 1]


def test_a_report_is_made_once_per_episode():
    cfg = config()
    tracker = Tracker(cfg)
    split = {**healthy(), "node2": up("node2", role="leader", term=1)}
    assert run(tracker, cfg, [split]) == [[]]
    (first,) = tracker.update(split, verdicts(split, cfg))
    tracker.acted("node2")
    assert tracker.update(split, verdicts(split, cfg)) == []
    tracker.update(healthy(), {})
    assert run(tracker, cfg, [split, split])[1][0].failure == SPLIT_BRAIN


def diagnosis(node: str, failure: str = CRASH) -> Diagnosis:
    return Diagnosis(node, failure, "why", [])


def test_one_action_per_node_and_at_most_n_minus_1_over_2_nodes():
    planner = Planner(config())
    latest = {**healthy(), "node2": down("node2"), "node3": down("node3")}
    assert planner.decide(diagnosis("node2"), 0, latest).verdict == "act"
    planner.begin("node2", "restart", 0)
    assert planner.decide(diagnosis("node2"), 1, latest).verdict == "skip"
    decision = planner.decide(diagnosis("node3"), 1, latest)
    assert decision.verdict == "wait" and "at most 1 node" in decision.reason
    planner.end("node2")
    assert planner.decide(diagnosis("node3"), 1, latest).verdict == "act"


def test_cool_down_then_give_up_past_max_restarts_in_the_window():
    planner = Planner(config(max_restart_attempts=2, restart_cooldown_s=10.0, restart_window_s=100.0))
    latest = {**healthy(), "node2": down("node2")}
    for now in (0, 20):
        assert planner.decide(diagnosis("node2"), now, latest).verdict == "act"
        planner.begin("node2", "restart", now)
        planner.end("node2")
        assert planner.decide(diagnosis("node2"), now + 5, latest).verdict in ("wait", "give_up")
    decision = planner.decide(diagnosis("node2"), 30, latest)
    assert decision.verdict == "give_up" and "max_restart_attempts 2" in decision.reason
    assert planner.decide(diagnosis("node2"), 200, latest).verdict == "act"  # the window moved on


def test_reseed_refused_when_the_node_is_needed_for_a_quorum():
    planner = Planner(config())
    alone = {**healthy(), "node2": down("node2", exit_code=65), "node3": down("node3")}
    decision = planner.decide(diagnosis("node2", CORRUPTION), 0, alone)
    assert decision.verdict == "refuse" and "needed for a quorum" in decision.reason
    rejoining = {**healthy(), "node2": down("node2", exit_code=65), "node3": up("node3", rejoining=True)}
    assert planner.decide(diagnosis("node2", CORRUPTION), 0, rejoining).verdict == "refuse"
    assert planner.decide(diagnosis("node2", CORRUPTION), 0, {**healthy(), "node2": down("node2", exit_code=65)}).verdict == "act"


def test_reports_are_not_bounded_by_restart_limits():
    planner = Planner(config())
    planner.begin("node3", "restart", 0)
    assert planner.decide(diagnosis("node2", SPLIT_BRAIN), 0, healthy()).verdict == "act"


def test_divergence_is_seen_at_a_shared_checkpoint_when_no_two_nodes_are_at_the_same_index():
    """Under load the nodes' applied indexes differ; their checkpoints (every raft.checksum_every_entries) still meet."""
    def loaded(name: str, applied: int, sums: dict[int, str], **kw) -> Observation:
        obs = up(name, applied=applied, checksum=f"now-{name}", **kw)
        points = [{"index": i, "checksum": c} for i, c in sums.items()]
        return msgspec.structs.replace(obs, status={**obs.status, "checkpoints": points})

    cycle = {"node1": loaded("node1", 130, {100: "good", 120: "good"}, role="leader"),
             "node2": loaded("node2", 127, {100: "good", 120: "odd"}),
             "node3": loaded("node3", 124, {100: "good", 120: "good"})}
    found = verdicts(cycle, config())
    assert set(found) == {"node2"} and found["node2"].failure == DIVERGENCE
    assert "index 120" in found["node2"].reason and "(node1, node3)" in found["node2"].reason


def test_a_diverged_leader_is_the_odd_one_out():
    cycle = {"node1": up("node1", role="leader", checksum="odd"), "node2": up("node2"), "node3": up("node3")}
    found = verdicts(cycle, config())
    assert set(found) == {"node1"} and found["node1"].failure == DIVERGENCE


def test_no_majority_for_any_checksum_names_no_one():
    cycle = {"node1": up("node1", role="leader", checksum="a"), "node2": up("node2", checksum="b"), "node3": up("node3", checksum="c")}
    assert verdicts(cycle, config()) == {}


def test_split_brain_asks_the_stale_leader_to_step_down_with_every_nodes_view():
    cfg = config()
    split = {**healthy(), "node2": up("node2", role="leader", term=1)}
    (diagnosis,) = run(Tracker(cfg), cfg, [split, split])[1]
    assert (diagnosis.node, diagnosis.failure, diagnosis.action) == ("node2", SPLIT_BRAIN, STEP_DOWN)
    assert set(diagnosis.views) == set(NAMES) and diagnosis.views["node2"]["role"] == "leader"
    assert diagnosis.views["node1"]["term"] == 2 and diagnosis.views["node2"]["term"] == 1


def test_a_slow_follower_is_confirmed_only_once_it_lasted_slow_follower_s():
    cfg = msgspec.structs.replace(config(), thresholds=msgspec.structs.replace(config().thresholds, slow_follower_s=1.0))
    lagging = [{**healthy(t / 5), "node1": up("node1", t / 5, role="leader", peers={"node3": {"lag": 50_000, "match_index": 3}})}
               for t in range(12)]
    out = run(Tracker(cfg), cfg, lagging)
    first = next(n for n, found in enumerate(out) if found)
    assert first == 5 and out[first][0].action == CATCH_UP and out[first][0].reason.endswith("for 1.0s")


def test_step_downs_and_catch_ups_neither_stop_a_process_nor_count_against_restarts_or_the_quorum():
    planner = Planner(config())
    planner.begin("node1", STEP_DOWN, 0)
    planner.begin("node3", CATCH_UP, 0)
    assert planner.restarts == {}
    decision = planner.decide(diagnosis("node2", CORRUPTION), 0, {**healthy(), "node2": down("node2", exit_code=65)})
    assert decision.verdict == "act", decision
