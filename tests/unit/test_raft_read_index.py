"""ReadIndex: linearizable reads without writing to the log (thesis §6.4)."""

from dtfd.raft import NotLeader, ReadState, Refused

from tests.unit.raft_net import MT, Net, make_raft


def test_leader_read_needs_a_majority_heartbeat_round():
    """A deposed leader that does not know it yet must not answer reads from its stale state."""
    net = Net(3)
    net.elect("n1")
    net.propose("n1", b"a")
    net.isolate("n1")
    assert net.raft("n1").read_index(b"ctx") is None
    net.tick(4)
    assert net.nodes["n1"].read_states == []
    net.heal()
    net.tick(2)
    assert net.nodes["n1"].read_states == [ReadState(net.raft("n1").log.committed, b"ctx")]


def test_read_state_comes_only_after_a_follower_ack():
    """The ReadState is released by a heartbeat acknowledgement, not by the request itself."""
    net = Net(3)
    net.elect("n1")
    net.raft("n1").read_index(b"r")
    net.process("n1")
    assert net.nodes["n1"].read_states == []
    while net.queue and not net.nodes["n1"].read_states:
        net.deliver_one()
    assert net.nodes["n1"].read_states == [ReadState(net.raft("n1").log.committed, b"r")]
    assert net.delivered[-1].type == MT.HEARTBEAT_RESP


def test_new_leader_serves_reads_only_after_committing_in_its_term():
    """Until its no-op commits, a new leader may not know the latest commit index (§6.4 step 1)."""
    net = Net(3)
    net.drop_if(lambda m: m.type == MT.APPEND_RESP)
    net.elect("n1")
    leader = net.raft("n1")
    assert leader.log.committed < leader.log.last_index
    result = leader.read_index(b"early")
    assert result is None or isinstance(result, Refused)
    net.tick(6)
    assert net.nodes["n1"].read_states == []
    net.heal()
    net.tick(2)
    assert leader.log.committed == leader.log.last_index
    if result is not None:
        assert leader.read_index(b"early") is None
        net.tick(2)
    assert net.nodes["n1"].read_states == [ReadState(leader.log.committed, b"early")]


def test_follower_read_is_forwarded_to_leader():
    """Any node can serve a linearizable read once it has applied up to the leader's commit index."""
    net = Net(3)
    net.elect("n1")
    net.propose("n1", b"a", b"b")
    assert net.raft("n2").read_index(b"f") is None
    net.process("n2")
    net.deliver()
    assert net.nodes["n2"].read_states == [ReadState(net.raft("n1").log.committed, b"f")]
    assert net.messages(MT.READ_INDEX, "n2", "n1") and net.messages(MT.READ_INDEX_RESP, "n1", "n2")


def test_read_without_known_leader_is_not_leader():
    """With no leader there is nobody to confirm the read; the caller must retry."""
    assert make_raft("n1").read_index(b"x") == NotLeader("")


def test_single_node_leader_serves_reads_without_a_round_trip():
    """Alone, the leader is its own majority: the read is confirmed at once."""
    net = Net(1)
    net.elect("n1")
    assert net.raft("n1").read_index(b"solo") is None
    net.process("n1")
    assert net.nodes["n1"].read_states == [ReadState(net.raft("n1").log.committed, b"solo")]
