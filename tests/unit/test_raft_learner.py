"""Learners (non-voters): they follow the log but never decide anything (thesis §4.2.1)."""

from dtfd.raft import Refused, Role

from tests.unit.raft_net import MT, Net, drain, make_raft, sent


def test_learner_receives_and_applies_the_log():
    """A learner (e.g. a node rejoining after a reset) gets every committed entry."""
    net = Net(3, learners=["n4"])
    net.elect("n1")
    net.propose("n1", b"a", b"b")
    assert net.nodes["n4"].applied_data() == [b"a", b"b"]
    assert net.raft("n1").status().progress["n4"].learner


def test_learner_is_not_counted_in_quorum():
    """Leader plus learner is not a majority of three voters: nothing may commit."""
    net = Net(3, learners=["n4"])
    net.elect("n1")
    commit = net.raft("n1").log.committed
    net.partition(["n1", "n4"], ["n2", "n3"])
    net.propose("n1", b"a")
    net.tick(5)
    assert net.raft("n4").log.last_index == net.raft("n1").log.last_index
    assert net.raft("n1").log.committed == commit
    assert net.nodes["n1"].applied_data() == net.nodes["n4"].applied_data() == []


def test_learner_never_campaigns():
    """However long a learner hears nothing, it neither asks for votes nor raises its term."""
    net = Net(3, learners=["n4"])
    term = net.elect("n1")
    net.isolate("n4")
    net.tick(10 * net.nodes["n4"].config.election_max)
    learner = net.raft("n4")
    assert (learner.role, learner.term) == (Role.FOLLOWER, term)
    assert net.messages(MT.PRE_VOTE, "n4") == net.messages(MT.VOTE, "n4") == []


def test_fresh_learner_that_never_heard_a_leader_stays_silent():
    """A learner with no leader at all still waits instead of campaigning."""
    learner = make_raft("n4", learners=("n4",))
    for _ in range(200):
        learner.tick()
    assert sent(drain(learner)) == []
    assert (learner.role, learner.term) == (Role.FOLLOWER, 0)


def test_leadership_cannot_be_transferred_to_a_learner():
    """A learner may not even be handed leadership: it has no vote to count."""
    net = Net(3, learners=["n4"])
    net.elect("n1")
    assert isinstance(net.raft("n1").transfer_leadership("n4"), Refused)
