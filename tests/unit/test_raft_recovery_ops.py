"""The two Raft operations recoveryd uses besides restarts: a stale leader's step-down and snapshot catch-up."""

import pytest

from dtfd.raft import HardState, Message, NotLeader, Raft, Refused, Role

from tests.unit.raft_net import MT, Net

STATE = bytes(range(64))


def test_a_stale_leader_in_a_minority_steps_down_on_request_and_the_cluster_keeps_one_leader():
    """Without CheckQuorum an isolated leader never notices the newer one; asked, it becomes a follower of its own term."""
    net = Net(3, check_quorum=False)
    old_term = net.elect("n1")
    net.isolate("n1")
    net.tick_until(lambda: any(net.raft(n).role is Role.LEADER for n in ("n2", "n3")))
    stale = net.raft("n1")
    assert stale.role is Role.LEADER and stale.term == old_term  # split brain: two claim leadership
    vote = stale.vote
    assert stale.step_down() is None
    net.process("n1")
    assert (stale.role, stale.term, stale.leader, stale.vote) == (Role.FOLLOWER, old_term, "", vote)
    net.heal()
    net.tick_until(lambda: len(net.leaders()) == 1 and net.raft("n1").leader == net.leader())
    assert net.leader() != "n1"


def test_step_down_on_a_follower_names_the_leader():
    net = Net(3)
    net.elect("n1")
    assert net.raft("n2").step_down() == NotLeader("n1")


def test_a_follower_is_caught_up_from_the_snapshot_instead_of_its_backlog():
    net = Net(3)
    net.elect("n1")
    starved = net.drop_if(lambda m: m.type is MT.APPEND and m.dst == "n3")  # n3 hears heartbeats, gets no entries
    for i in range(10):
        net.propose("n1", b"%d" % i)
    leader = net.raft("n1")
    assert leader.status().progress["n3"].match < leader.log.committed
    snap = net.compact("n1", leader.log.applied, STATE)
    assert leader.send_snapshot("n3") is None
    net.process("n1")
    net.deliver()
    assert net.nodes["n3"].restored == [snap]
    assert leader.status().progress["n3"].match == snap.meta.index
    net.drops.remove(starved)
    net.tick(net.nodes["n1"].config.heartbeat)  # the probe append sent while starved was lost; a heartbeat resends it
    net.propose("n1", b"after")
    assert net.nodes["n3"].applied_data() == [b"after"]


@pytest.mark.parametrize(("node", "to", "compact", "expected"), [
    ("n2", "n3", True, NotLeader),  # only the leader holds the progress
    ("n1", "n1", True, Refused),
    ("n1", "n9", True, Refused),
    ("n1", "n3", False, Refused),  # no snapshot yet: compact first
])
def test_snapshot_catch_up_is_refused_when_it_cannot_help(node, to, compact, expected):
    net = Net(3)
    net.elect("n1")
    net.propose("n1", b"x")
    if compact:
        net.compact("n1", net.raft("n1").log.applied, STATE)
    assert isinstance(net.raft(node).send_snapshot(to), expected)


def test_snapshot_catch_up_of_a_follower_that_already_holds_it_is_refused():
    net = Net(3)
    net.elect("n1")
    net.propose("n1", b"x")
    net.compact("n1", net.raft("n1").log.applied, STATE)
    assert isinstance(net.raft("n1").send_snapshot("n2"), Refused)  # n2's match index is the snapshot's


def reseed(net: Net, id: str) -> Raft:
    """recoveryd's state transfer: `id`'s data dir moved aside, it restarts empty and rejoining."""
    term = net.raft(id).term
    net.crash(id)
    wiped = net.nodes[id]
    wiped.hard_state, wiped.entries, wiped.snapshot = HardState(), [], None
    return net.restart(id, rejoin_term=term)


@pytest.mark.parametrize("compacted", [False, True])
@pytest.mark.parametrize("idle", [False, True])
def test_a_reseeded_follower_is_caught_up_by_the_same_leader(compacted, idle):
    """Its log now ends before the match index the leader holds for it, which Raft assumes never falls: the
    follower says it is rejoining, and the leader probes it again from what it has committed."""
    net = Net(3)
    term = net.elect("n1")
    for i in range(10):
        net.propose("n1", b"%d" % i)
    leader = net.raft("n1")
    if compacted:
        net.compact("n1", leader.log.applied, STATE)
    assert leader.status().progress["n3"].match == leader.log.last_index
    n3 = reseed(net, "n3")
    if not idle:
        net.propose("n1", b"after")
    net.tick_until(lambda: n3.log.committed == leader.log.committed, limit=50)
    assert (net.leader(), leader.term) == ("n1", term)
    assert leader.status().progress["n3"].match == leader.log.last_index
    assert net.nodes["n3"].restored == ([leader.snapshot] if compacted else [])
    expected = [b"%d" % i for i in range(10)] + ([] if idle else [b"after"])
    assert net.nodes["n3"].applied_data() == (expected[10:] if compacted else expected)
    assert n3.rejoining  # it may have voted in this term: it votes again only under a later leader


def test_the_leader_does_not_count_a_reseeded_follower_for_entries_it_lost():
    """Five nodes: the leader held n5's old match index; once n5 said it was reset, only what it acknowledges again counts."""
    net = Net(5)
    net.elect("n1")
    net.propose("n1", b"before")
    leader = net.raft("n1")
    reseed(net, "n5")
    net.tick(2 * net.nodes["n1"].config.heartbeat)  # n5 answers a heartbeat: the leader learns it was reset
    assert leader.status().progress["n5"].match <= net.raft("n5").log.committed
    net.partition(["n1", "n2"], ["n3", "n4"], ["n5"])
    net.propose("n1", b"lost")
    net.tick(5)
    assert leader.log.committed < leader.log.last_index  # n1 and n2 alone are no majority of five


def test_a_stale_rejection_from_a_follower_that_was_not_reset_changes_nothing():
    net = Net(3)
    net.elect("n1")
    net.propose("n1", b"x")
    leader = net.raft("n1")
    before = leader.status().progress["n2"]
    stale = Message(type=MT.APPEND_RESP, src="n2", dst="n1", term=leader.term, index=1, reject=True, hint_index=0)
    leader.step(stale)
    assert leader.status().progress["n2"] == before
