"""Leader election: randomized timeouts, PreVote, CheckQuorum and the voting rules (Raft §5.2, §5.4.1, thesis §9.6)."""

import pytest

from dtfd.raft import HardState, Message, Raft, Role

from tests.unit.raft_net import MT, Net, drain, first_campaign_tick, make_config, make_raft, sent, stored_log


def test_first_election_timeout_is_randomized_within_bounds():
    """Split votes are broken only if nodes time out at different, bounded moments."""
    cfg = make_config()
    timeouts = [first_campaign_tick(seed) for seed in range(30)]
    assert all(cfg.election_min <= t < cfg.election_max for t in timeouts), timeouts
    assert len(set(timeouts)) > 3, timeouts


def test_single_node_cluster_elects_itself():
    """A cluster of one must make progress alone."""
    net = Net(1)
    net.tick_until(lambda: net.raft("n1").role == Role.LEADER, limit=20)
    assert net.propose("n1", b"x").first_index == 2
    assert net.nodes["n1"].applied_data() == [b"x"]


@pytest.mark.parametrize("size", [3, 5])
@pytest.mark.parametrize("seed", range(3))
def test_cluster_elects_exactly_one_leader(size, seed):
    """Every node ends up following the same single leader of the same term."""
    net = Net(size, seed=seed)
    net.tick_until(lambda: len(net.leaders()) == 1, limit=200)
    net.tick(50)
    leader = net.leader()
    assert {net.raft(id).leader for id in net.nodes} == {leader}
    assert len({net.raft(id).term for id in net.nodes}) == 1


def test_prevote_rejoining_follower_does_not_disrupt_leader():
    """PreVote: a node back from a partition must not force a needless election (thesis §9.6)."""
    net = Net(3)
    term = net.elect("n1")
    net.isolate("n3")
    net.tick(100)
    assert net.messages(MT.PRE_VOTE, "n3")
    assert net.raft("n3").term == term
    net.heal()
    net.tick(100)
    assert net.leaders() == ["n1"]
    assert [net.raft(id).term for id in net.nodes] == [term] * 3
    assert net.raft("n3").leader == "n1"


@pytest.mark.parametrize("isolated_after", range(0, 12, 3))
def test_checkquorum_isolated_leader_steps_down_within_election_timeout(isolated_after):
    """CheckQuorum: a leader cut off from the majority stops claiming leadership (thesis §6.2)."""
    net = Net(3)
    net.elect("n1")
    net.tick(isolated_after)
    net.isolate("n1")
    ticks = net.tick_until(lambda: net.raft("n1").role != Role.LEADER, limit=100)
    assert ticks <= net.nodes["n1"].config.election_max
    net.tick_until(lambda: net.raft("n2").role == Role.LEADER or net.raft("n3").role == Role.LEADER)


def test_follower_in_leader_lease_ignores_vote_requests():
    """A follower that just heard from its leader must not help depose it (thesis §4.2.3)."""
    net = Net(3)
    term = net.elect("n1")
    n2 = net.raft("n2")
    last = n2.log.last_index
    for type in (MT.PRE_VOTE, MT.VOTE):
        n2.step(Message(type=type, src="n3", dst="n2", term=term + 1, log_term=term, index=last))
    net.process("n2")
    assert [m for m in net.queue if m.type in (MT.PRE_VOTE_RESP, MT.VOTE_RESP) and not m.reject] == []
    assert (n2.term, n2.leader, n2.role) == (term, "n1", Role.FOLLOWER)


@pytest.mark.parametrize(
    ("log_term", "index", "granted"),
    [
        (1, 9, False),  # lower last term loses even with a longer log
        (2, 2, False),  # same last term, shorter log
        (2, 3, True),  # identical log
        (2, 7, True),  # same last term, longer log
        (3, 1, True),  # higher last term wins even with a shorter log
    ],
)
def test_votes_only_for_logs_at_least_as_up_to_date(log_term, index, granted):
    """Election restriction (§5.4.1): compare last term first, then last index."""
    raft = make_raft("n1", persisted=stored_log([1, 2, 2], term=2))
    raft.step(Message(type=MT.VOTE, src="n2", dst="n1", term=3, log_term=log_term, index=index))
    (resp,) = [m for m in sent(drain(raft)) if m.type == MT.VOTE_RESP]
    assert (resp.reject, resp.term) == (not granted, 3)


def test_one_vote_per_term():
    """A second candidate in the same term is refused; the first may ask again."""
    raft = make_raft("n1", persisted=stored_log([1], term=1))
    replies = []
    for candidate in ("n2", "n3", "n2"):
        raft.step(Message(type=MT.VOTE, src=candidate, dst="n1", term=2, log_term=1, index=1))
        replies += [m.reject for m in sent(drain(raft)) if m.type == MT.VOTE_RESP]
    assert replies == [False, True, False]
    assert raft.status().vote == "n2"


def test_vote_is_persisted_in_the_ready_that_grants_it():
    """The hard state with the vote is synced before the reply leaves, so a crash cannot vote twice."""
    raft = make_raft("n1", persisted=stored_log([1], term=1))
    raft.step(Message(type=MT.VOTE, src="n2", dst="n1", term=2, log_term=1, index=1))
    (rd,) = [rd for rd in drain(raft) if any(m.type == MT.VOTE_RESP for m in rd.messages)]
    assert not next(m for m in rd.messages if m.type == MT.VOTE_RESP).reject
    assert rd.hard_state is not None and (rd.hard_state.term, rd.hard_state.vote) == (2, "n2")
    assert rd.must_sync


def test_set_timing_changes_the_election_timeout_range_at_the_next_reset():
    """A SIGHUP reload can change timing without restarting the node."""
    node = make_raft("n1")
    node.set_timing(heartbeat=3, election_min=40, election_max=41)
    node.step(Message(type=MT.HEARTBEAT, src="n2", dst="n1", term=1))  # a new term resets the timer
    ticks = 0
    while node.role is Role.FOLLOWER:
        node.tick()
        ticks += 1
        assert ticks <= 41
    assert ticks == 40
    with pytest.raises(ValueError, match="timing"):
        node.set_timing(heartbeat=5, election_min=5, election_max=6)


def _follower_of(leader: str, persisted=None, elapsed: int = 0, election_max: int = 11) -> Raft:
    """n2, following `leader` in term 1, that last heard from it `elapsed` ticks ago."""
    node = make_raft("n2", persisted=persisted, election_min=10, election_max=election_max, heartbeat=2)
    node.step(Message(type=MT.HEARTBEAT, src=leader, dst="n2", term=1))
    drain(node)
    for _ in range(elapsed):
        node.tick()
    return node


def _pre_vote(src: str, last_index: int, last_term: int) -> Message:
    return Message(type=MT.PRE_VOTE, src=src, dst="n2", term=2, index=last_index, log_term=last_term)


def test_lease_leaves_one_heartbeat_of_slack_for_timer_skew():
    """A candidate that timed out at election_min is answered by a peer whose timer runs a little behind."""
    in_lease = _follower_of("n1", elapsed=7)  # election_min - heartbeat - 1
    in_lease.step(_pre_vote("n3", 0, 0))
    assert sent(drain(in_lease)) == [] and in_lease.status().dropped == {"vote_in_lease": 1}
    skewed = _follower_of("n1", elapsed=8)  # election_min - heartbeat: a tick or two behind the candidate
    skewed.step(_pre_vote("n3", 0, 0))
    (reply,) = sent(drain(skewed))
    assert reply.type == MT.PRE_VOTE_RESP and not reply.reject


def test_follower_ahead_of_a_timed_out_candidate_stands_itself_at_once():
    """Refusing a behind candidate after a full election timeout of silence, the fuller log campaigns now."""
    node = _follower_of("n1", persisted=stored_log([1, 1, 1], term=1), elapsed=10, election_max=40)
    assert node.role is Role.FOLLOWER  # silent for a full election_min; its own randomized timeout not yet due
    node.step(_pre_vote("n3", 1, 1))
    messages = sent(drain(node))
    assert [m.reject for m in messages if m.type == MT.PRE_VOTE_RESP] == [True]
    assert node.role is Role.PRE_CANDIDATE and {m.dst for m in messages if m.type == MT.PRE_VOTE} == {"n1", "n3"}


def test_follower_that_heard_from_the_leader_recently_does_not_stand_on_a_behind_candidate():
    """Within a full election timeout it refuses but does not campaign: the leader may be alive."""
    node = _follower_of("n1", persisted=stored_log([1, 1, 1], term=1), elapsed=9)
    node.step(_pre_vote("n3", 1, 1))
    messages = sent(drain(node))
    assert [m.type for m in messages] == [MT.PRE_VOTE_RESP] and messages[0].reject
    assert node.role is Role.FOLLOWER


def test_a_reseeded_node_neither_votes_nor_campaigns_until_caught_up_with_a_later_leader():
    """After a state transfer the node may already have voted in terms up to rejoin_term: no double votes."""
    net = Net(3)
    net.elect("n1")
    net.propose("n1", b"before")
    old_term = net.raft("n1").term
    net.crash("n3")
    wiped = net.nodes["n3"]
    wiped.hard_state, wiped.entries, wiped.snapshot = HardState(), [], None  # data dir moved aside: empty, term 0
    net.restart("n3", rejoin_term=old_term)
    n3 = net.raft("n3")
    assert n3.rejoining
    n3.step(Message(type=MT.VOTE, src="n2", dst="n3", term=old_term, index=10, log_term=old_term))
    (reply,) = [m for m in sent(drain(n3)) if m.type == MT.VOTE_RESP]
    assert reply.reject  # it might have voted in this term before the reset
    for _ in range(100):
        n3.tick()
    assert n3.role is Role.FOLLOWER  # and it does not stand either
    net.tick(5)
    assert n3.rejoining  # a leader of the old term is not enough
    # A leader of a later term brings it up to date. (Not with n1 down as well: without n3's
    # vote, n2 and n1 are the only quorum, which is why recoveryd never reseeds a needed vote.)
    net.raft("n1").transfer_leadership("n2")
    net.tick_until(lambda: net.raft("n2").role is Role.LEADER)
    net.propose("n2", b"after")
    net.tick(10)
    assert not n3.rejoining and n3.log.committed == net.raft("n2").log.committed
