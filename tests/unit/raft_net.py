"""A tiny in-memory network that drives several Raft cores, for the unit tests.

Each node is driven exactly as the `dtfd.raft` docstring's driver loop says: a Ready is
persisted into the node's small in-test record (hard state, entries, snapshot) before its
messages are queued, then the committed entries are applied and `advance` is called.
Messages travel through one FIFO queue, so a run is a pure function of the seed. Links can
be cut, messages dropped by predicate, and nodes crashed and restarted from their record.
"""

from __future__ import annotations

import dataclasses
import random
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from hypothesis import strategies as st

from dtfd.raft import (
    Config,
    ConfState,
    Entry,
    EntryKind,
    HardState,
    Message,
    MessageType,
    NotLeader,
    PersistedState,
    Proposed,
    Raft,
    ReadState,
    Ready,
    Refused,
    Role,
    Snapshot,
    SnapshotMeta,
)
from dtfd.raft.messages import SnapshotChunk

MT = MessageType
MAX_DELIVERIES = 100_000


def make_config(id: str = "n1", voters: Iterable[str] = ("n1", "n2", "n3"), seed: object = 0, **overrides) -> Config:
    """A Config with the documented defaults and a per-node rng derived from `seed`."""
    return Config(id=id, voters=tuple(voters), rng=random.Random(f"{seed}/{id}"), **overrides)


def make_raft(id: str = "n1", voters: Iterable[str] = ("n1", "n2", "n3"), persisted: PersistedState | None = None, **overrides) -> Raft:
    return Raft(make_config(id, voters, **overrides), persisted)


def drain(raft: Raft) -> list[Ready]:
    """Acknowledge every pending Ready of a lone core, as a driver with perfect storage would."""
    readys = []
    while raft.has_ready():
        rd = raft.ready()
        readys.append(rd)
        raft.advance(rd)
    return readys


def sent(readys: Iterable[Ready]) -> list[Message]:
    return [m for rd in readys for m in rd.messages]


def stored_log(terms: Iterable[int], term: int, vote: str = "", commit: int = 0) -> PersistedState:
    """Persisted state of a node whose log holds one entry per item of `terms`, from index 1."""
    entries = tuple(Entry(term=t, index=i, data=b"e%d" % i) for i, t in enumerate(terms, start=1))
    return PersistedState(hard_state=HardState(term=term, vote=vote, commit=commit), entries=entries)


def dropped_total(raft: Raft) -> int:
    return sum(raft.status().dropped.values())


def assert_progress_sane(leader: Raft) -> None:
    """The leader never believes a peer holds, or wants, entries it does not have."""
    last = leader.log.last_index
    for peer, pr in leader.status().progress.items():
        assert pr.match <= last, (peer, pr, last)
        assert pr.next <= last + 1, (peer, pr, last)
        assert pr.match < pr.next, (peer, pr)


@dataclass
class Node:
    """One node: its core (None while crashed), its durable record and its applied state."""

    config: Config
    raft: Raft | None
    hard_state: HardState = HardState()
    entries: list[Entry] = field(default_factory=list)
    snapshot: Snapshot | None = None
    applied: list[Entry] = field(default_factory=list)
    restored: list[Snapshot] = field(default_factory=list)
    read_states: list[ReadState] = field(default_factory=list)
    restarts: int = 0

    def persisted(self) -> PersistedState:
        return PersistedState(hard_state=self.hard_state, snapshot=self.snapshot, entries=tuple(self.entries))

    def applied_data(self) -> list[bytes]:
        return [e.data for e in self.applied if e.kind == EntryKind.NORMAL]

    def persist(self, rd: Ready) -> None:
        if rd.snapshot is not None:
            self.snapshot, self.entries = rd.snapshot, []
        if rd.entries:
            first = rd.entries[0].index
            self.entries = [e for e in self.entries if e.index < first] + list(rd.entries)
        if rd.hard_state is not None:
            self.hard_state = rd.hard_state

    def check_durable(self, m: Message) -> None:
        """What a message promises must already be in the record (persist before send)."""
        if m.type == MT.VOTE_RESP and not m.reject:
            assert (self.hard_state.term, self.hard_state.vote) == (m.term, m.dst), (m, self.hard_state)
        if m.type == MT.APPEND_RESP and not m.reject and m.index:
            snap = self.snapshot.meta.index if self.snapshot else 0
            held = snap if not self.entries else max(snap, self.entries[-1].index)
            assert m.index <= held, (m, held)


class Net:
    """Nodes `n1..nN` (voters) plus learners, connected by a lossless FIFO queue unless cut."""

    def __init__(self, voters: int = 3, learners: Iterable[str] = (), seed: object = 0, **overrides) -> None:
        ids = tuple(f"n{i}" for i in range(1, voters + 1))
        self.seed = seed
        self.nodes: dict[str, Node] = {}
        for id in ids + tuple(learners):
            cfg = make_config(id, ids, seed, learners=tuple(learners), **overrides)
            self.nodes[id] = Node(cfg, Raft(cfg, None))
        self.queue: deque[Message] = deque()
        self.cut_links: set[tuple[str, str]] = set()
        self.drops: list[Callable[[Message], bool]] = []
        self.sent: list[Message] = []
        self.delivered: list[Message] = []
        self.on_send: list[Callable[[Message], None]] = []

    # -- access -----------------------------------------------------------------------
    def raft(self, id: str) -> Raft:
        raft = self.nodes[id].raft
        assert raft is not None, f"{id} is crashed"
        return raft

    def alive(self) -> list[str]:
        return [id for id, n in self.nodes.items() if n.raft is not None]

    def leaders(self) -> list[str]:
        return [id for id in self.alive() if self.raft(id).role == Role.LEADER]

    def leader(self) -> str:
        (leader,) = self.leaders()
        return leader

    def messages(self, type: MessageType, src: str | None = None, dst: str | None = None) -> list[Message]:
        """Messages of `type` sent so far (whether delivered or not), optionally by link."""
        return [m for m in self.sent if m.type == type and src in (None, m.src) and dst in (None, m.dst)]

    # -- faults -----------------------------------------------------------------------
    def cut(self, a: str, b: str) -> None:
        self.cut_links |= {(a, b), (b, a)}

    def isolate(self, id: str) -> None:
        for other in self.nodes:
            if other != id:
                self.cut(id, other)

    def partition(self, *groups: Iterable[str]) -> None:
        side = {id: i for i, group in enumerate(groups) for id in group}
        for a in self.nodes:
            for b in self.nodes:
                if side.get(a) != side.get(b):
                    self.cut_links.add((a, b))

    def drop_if(self, pred: Callable[[Message], bool]) -> Callable[[Message], bool]:
        """Drop every message for which `pred` is true at delivery time."""
        self.drops.append(pred)
        return pred

    def drop_first(self, pred: Callable[[Message], bool], n: int = 1) -> list[Message]:
        """Drop the first `n` messages matching `pred`; returns the list of those lost."""
        lost: list[Message] = []

        def lose(m: Message) -> bool:
            if len(lost) < n and pred(m):
                lost.append(m)
                return True
            return False

        self.drop_if(lose)
        return lost

    def heal(self) -> None:
        self.cut_links.clear()
        self.drops.clear()

    def crash(self, id: str) -> None:
        self.nodes[id].raft = None

    def restart(self, id: str, **overrides) -> Raft:
        """Start `id` again from its record (config `overrides` apply); the app restores from the snapshot."""
        node = self.nodes[id]
        node.restarts += 1
        node.config = dataclasses.replace(node.config, rng=random.Random(f"{self.seed}/{id}/{node.restarts}"), **overrides)
        node.raft = Raft(node.config, node.persisted())
        node.applied, node.restored = [], [node.snapshot] if node.snapshot else []
        self.process(id)
        return node.raft

    # -- driving ----------------------------------------------------------------------
    def process(self, id: str) -> None:
        """Run the documented driver loop on `id` until it has nothing ready."""
        node = self.nodes[id]
        raft = node.raft
        while raft is not None and raft.has_ready():
            rd = raft.ready()
            node.persist(rd)
            for m in rd.messages:
                node.check_durable(m)
                self.sent.append(m)
                self.queue.append(m)
                for hook in self.on_send:
                    hook(m)
            if rd.snapshot is not None:
                node.restored.append(rd.snapshot)
            node.applied.extend(rd.committed)
            node.read_states.extend(rd.read_states)
            raft.advance(rd)

    def deliver_one(self) -> None:
        """Hand the oldest queued message to its destination, unless the link loses it."""
        m = self.queue.popleft()
        node = self.nodes.get(m.dst)
        if node is None or node.raft is None or (m.src, m.dst) in self.cut_links or any(p(m) for p in self.drops):
            return
        node.raft.step(m)
        self.delivered.append(m)
        self.process(m.dst)

    def deliver(self) -> None:
        for _ in range(MAX_DELIVERIES):
            if not self.queue:
                return
            self.deliver_one()
        raise AssertionError("messages never stopped flowing")

    def tick(self, n: int = 1) -> None:
        """`n` rounds of: one tick on each live node, then deliver everything in flight."""
        for _ in range(n):
            for id in self.alive():
                self.raft(id).tick()
                self.process(id)
            self.deliver()

    def tick_until(self, pred: Callable[[], bool], limit: int = 500) -> int:
        """Tick until `pred()` holds; returns how many rounds it took."""
        for ticks in range(limit + 1):
            if pred():
                return ticks
            self.tick()
        raise AssertionError(f"condition not reached in {limit} ticks")

    def propose(self, id: str, *data: bytes) -> Proposed | NotLeader | Refused:
        """Propose on `id` (one entry, or a batch) and let the cluster settle: a leader's
        followers learn the new commit index at its next tick, which this gives it."""
        result = self.raft(id).propose_batch(list(data)) if len(data) != 1 else self.raft(id).propose(data[0])
        self.process(id)
        self.deliver()
        if self.raft(id).role is Role.LEADER:
            self.raft(id).tick()
            self.process(id)
            self.deliver()
        return result

    def elect(self, id: str, limit: int = 500) -> int:
        """Tick everyone until `id` leads (others' campaigns are muted); returns its term."""
        muted = self.drop_if(lambda m: m.src != id and m.type in (MT.PRE_VOTE, MT.VOTE))
        try:
            self.tick_until(lambda: self.raft(id).role == Role.LEADER, limit)
        finally:
            self.drops.remove(muted)
        return self.raft(id).term

    def compact(self, id: str, index: int, data: bytes) -> Snapshot:
        """The app snapshots `id` at `index`; its record drops the entries the snapshot covers."""
        node = self.nodes[id]
        snap = self.raft(id).compact(index, data)
        node.snapshot = snap
        node.entries = [e for e in node.entries if e.index > index]
        self.process(id)
        return snap


def first_campaign_tick(seed: object, **overrides) -> int:
    """Ticks a fresh follower of a 3-node cluster waits before it first asks for votes."""
    raft = make_raft(seed=seed, **overrides)
    for ticks in range(1, 10_000):
        raft.tick()
        if any(m.type in (MT.PRE_VOTE, MT.VOTE) for m in sent(drain(raft))):
            return ticks
    raise AssertionError("never campaigned")


def arbitrary_messages(ints: st.SearchStrategy[int], names: st.SearchStrategy[str]) -> st.SearchStrategy[Message]:
    """Arbitrary well-typed messages: every field drawn independently, so most make no sense."""
    blobs = st.binary(max_size=48)
    entries = st.builds(Entry, term=ints, index=ints, kind=st.sampled_from(EntryKind), data=blobs)
    conf = st.builds(ConfState, st.lists(names, max_size=3).map(tuple), st.lists(names, max_size=1).map(tuple))
    metas = st.builds(SnapshotMeta, index=ints, term=ints, conf=conf, digest=st.text(max_size=64), size=ints)
    chunks = st.none() | st.builds(SnapshotChunk, meta=metas, offset=ints, data=blobs, done=st.booleans())
    return st.builds(
        Message, type=st.sampled_from(MT), src=names, dst=names, term=ints, log_term=ints, index=ints,
        entries=st.lists(entries, max_size=4).map(tuple), commit=ints, reject=st.booleans(), hint_index=ints,
        hint_term=ints, context=blobs, snapshot=chunks, rejoining=st.booleans(),
    )
