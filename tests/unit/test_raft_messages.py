"""The wire and disk format: lossless round trips, validation on decode, and bytes that do not drift."""

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dtfd.raft import ConfState, Entry, EntryKind, HardState, Message, MessageType, PersistedState, Snapshot, SnapshotMeta
from dtfd.raft.messages import SnapshotChunk, decode_message, encode

from tests.unit.raft_net import arbitrary_messages

META = SnapshotMeta(index=9, term=2, conf=ConfState(("n1", "n2", "n3"), ("n4",)), digest="ab" * 32, size=5)
ENTRIES = (Entry(term=2, index=10, kind=EntryKind.NOOP), Entry(term=3, index=11, data=b"\x00cmd\xff"))


@pytest.mark.parametrize("type", list(MessageType), ids=lambda t: t.name)
def test_every_message_type_round_trips(type):
    """Whatever a peer sends arrives field for field, entries and snapshot chunks included."""
    m = Message(
        type=type, src="n1", dst="n2", term=3, log_term=2, index=9, entries=ENTRIES, commit=8, reject=True,
        hint_index=7, hint_term=1, context=b"ctx", snapshot=SnapshotChunk(META, offset=16, data=b"chunk", done=True),
    )
    data = encode(m)
    assert decode_message(data) == m
    assert encode(decode_message(data)) == data


def test_encoding_is_stable():
    """Peers of different versions and WALs on disk rely on these exact bytes; change them on purpose only."""
    m = Message(type=MessageType.APPEND, src="n1", dst="n2", term=3, log_term=2, index=4, entries=(Entry(term=3, index=5, data=b"x"),), commit=4)
    assert encode(m).hex() == (
        "88a47479706505a3737263a26e31a3647374a26e32a47465726d03a86c6f675f7465726d02a5696e64657804"
        "a7656e74726965739194030500c40178a6636f6d6d697404"
    )
    assert encode(Entry(term=3, index=5, kind=EntryKind.NOOP)).hex() == "94030501c400"
    assert encode(HardState(term=3, vote="n1", commit=7)).hex() == "9303a26e3107"


def test_durable_records_round_trip():
    """What storage writes is what a restarted node reads."""
    state = PersistedState(hard_state=HardState(3, "n2", 11), snapshot=Snapshot(META, b"state"), entries=ENTRIES)
    assert msgspec.msgpack.decode(encode(state), type=PersistedState) == state


NAMES = st.sampled_from(["n1", "n2", "n3", "", "ü"])


@settings(derandomize=True)
@given(arbitrary_messages(st.integers(min_value=0, max_value=2**63 - 1), NAMES))
def test_any_message_round_trips(m):
    """Round trips hold for any field values, not only the hand-picked ones above."""
    assert decode_message(encode(m)) == m


GOOD = encode(Message(type=MessageType.HEARTBEAT, src="n1", dst="n2", term=1))


@pytest.mark.parametrize(
    ("frame", "error"),
    [
        (b"", msgspec.DecodeError),
        (b"\xc1", msgspec.DecodeError),
        (GOOD[:-1], msgspec.DecodeError),
        (b"\x92\x01\x02", msgspec.ValidationError),
        (msgspec.msgpack.encode({"type": 99, "src": "n1", "dst": "n2", "term": 1}), msgspec.ValidationError),
        (msgspec.msgpack.encode({"type": 7, "dst": "n2", "term": 1}), msgspec.ValidationError),
        (msgspec.msgpack.encode({"type": 7, "src": "n1", "dst": "n2", "term": "1"}), msgspec.ValidationError),
        (msgspec.msgpack.encode({"type": 5, "src": "n1", "dst": "n2", "term": 1, "entries": [[1]]}), msgspec.ValidationError),
    ],
    ids=["empty", "reserved-byte", "truncated", "array", "unknown-type", "missing-src", "term-as-string", "short-entry"],
)
def test_garbage_frames_raise_msgspec_errors(frame, error):
    """The transport catches exactly these and drops the frame; nothing malformed reaches the core."""
    with pytest.raises(error):
        decode_message(frame)
