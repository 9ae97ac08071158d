"""Leadership transfer with TimeoutNow, for graceful stop and `dtfctl switchover` (thesis §3.10)."""

import pytest

from dtfd.raft import NotLeader, Proposed, Refused, Role

from tests.unit.raft_net import MT, Net


def test_lagging_target_is_caught_up_before_timeout_now():
    """TimeoutNow goes out only once the target holds the leader's whole log, so it can win."""
    net = Net(3)
    net.elect("n1")
    net.isolate("n3")
    for i in range(5):
        net.propose("n1", b"%d" % i)
    net.heal()
    leader = net.raft("n1")
    assert leader.status().progress["n3"].match < leader.log.last_index
    seen = []
    net.on_send.append(lambda m: m.type == MT.TIMEOUT_NOW and seen.append((leader.status().progress["n3"].match, leader.log.last_index)))
    assert leader.transfer_leadership("n3") is None
    net.process("n1")
    net.deliver()
    net.tick(2)
    assert seen and all(match == last for match, last in seen)
    assert net.leaders() == ["n3"]
    assert net.nodes["n3"].applied_data() == [b"%d" % i for i in range(5)]


def test_target_wins_next_term_despite_leader_lease():
    """The transfer's vote request overrides the lease the other followers hold for the old leader."""
    net = Net(3)
    term = net.elect("n1")
    assert net.raft("n1").transfer_leadership("n2") is None
    net.process("n1")
    net.deliver()
    assert net.leaders() == ["n2"]
    assert [net.raft(id).term for id in net.nodes] == [term + 1] * 3
    assert net.raft("n1").role == Role.FOLLOWER


def test_proposals_refused_while_transfer_pending_and_transfer_aborts_after_election_timeout():
    """A transfer to a dead target must not stall the cluster for longer than an election timeout."""
    net = Net(3)
    term = net.elect("n1")
    net.isolate("n3")
    leader = net.raft("n1")
    assert leader.transfer_leadership("n3") is None
    net.tick(2)
    assert leader.status().transferee == "n3"
    assert isinstance(net.propose("n1", b"during"), Refused)
    net.tick(net.nodes["n1"].config.election_max)
    assert (leader.role, leader.term, leader.status().transferee) == (Role.LEADER, term, "")
    assert isinstance(net.propose("n1", b"after"), Proposed)
    assert net.nodes["n2"].applied_data() == [b"after"]


@pytest.mark.parametrize("target", ["n1", "n9", ""])
def test_transfer_to_self_or_unknown_node_is_refused(target):
    """Nonsense targets are answered with a reason, not an exception or a silent no-op."""
    net = Net(3)
    net.elect("n1")
    assert isinstance(net.raft("n1").transfer_leadership(target), Refused)
    assert net.raft("n1").status().transferee == ""


def test_transfer_on_follower_names_the_leader():
    """Only the leader can hand over leadership; the caller is told whom to ask."""
    net = Net(3)
    net.elect("n1")
    assert net.raft("n2").transfer_leadership("n3") == NotLeader("n1")
