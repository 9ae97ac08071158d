"""Every decoder that reads bytes from outside fails only with its own error, whatever it is fed.

Hostile or damaged input (a peer frame, a disk file, a config, a test report, an HTTP
request, a log entry) must be refused cleanly: never an unexpected exception, never a
crash of the node that reads it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from dtfd import config
from dtfd.raft.messages import Entry, Message, MessageType
from dtfd.server import http, transport
from dtfd.server.api import BadRequest, decode_body
from dtfd.server.bodies import PutBody
from dtfd.state.machine import StateMachine
from dtfd.storage import hardstate, snapshots, wal
from dtfd.storage.interface import StorageCorrupt
from dtfd.worker import config as worker_config
from dtfd.worker import junit

FUZZ = settings(max_examples=150, deadline=None)


def _valid_frame() -> bytes:
    message = Message(type=MessageType.APPEND, src="a", dst="b", term=1, entries=(Entry(1, 1, data=b"x"),))
    return msgspec.msgpack.encode([message])


@FUZZ
@given(st.one_of(st.binary(max_size=512), st.builds(lambda b, n: b[:n], st.just(_valid_frame()), st.integers(0, 40))))
def test_peer_frames_decode_or_raise_link_errors(data):
    try:
        for message in transport.decode_batch(data):
            assert isinstance(message, Message)
    except transport.LinkError:
        pass


def test_bad_utf8_in_a_string_is_refused_as_bad_input_not_raised():
    """msgspec raises UnicodeDecodeError, not DecodeError, for it: a regression found by the fuzzers below."""
    frame = msgspec.msgpack.encode([{"type": 1, "src": "a", "dst": "b", "term": 1}]).replace(b"\xa1a", b"\xa1\x80")
    with pytest.raises(transport.LinkError):
        transport.decode_batch(frame)
    hello = msgspec.msgpack.encode(transport.Hello(1, "a", "b", b"n" * 16)).replace(b"\xa1a", b"\xa1\x80")
    with pytest.raises(transport.LinkError):
        transport._decode(transport.Hello, hello)
    machine = StateMachine()
    entry = msgspec.msgpack.encode(["c", 1, 1.0, {"type": "put", "key": "k", "value": "v"}]).replace(b"\xa1k", b"\xa1\x80")
    assert machine.apply(1, entry).error == "undecodable"
    with pytest.raises(BadRequest) as refused:
        decode_body(b'{"value": "\x80"}', PutBody)
    assert refused.value.status == 400


@FUZZ
@given(st.binary(max_size=300))
def test_framing_rejects_garbage_streams_with_link_errors(data):
    async def feed() -> None:
        stream, end = trio.testing.memory_stream_pair()
        framed = transport._Framed(end)
        framed.key = b"k" * 32  # after the handshake: every frame must carry a valid MAC
        await stream.send_all(data)
        await stream.aclose()
        try:
            while await framed.receive() is not None:
                raise AssertionError("an unauthenticated frame was accepted")
        except transport.LinkError:
            pass

    trio.run(feed)


@FUZZ
@given(st.binary(max_size=400), st.integers(0, 3))
def test_wal_segments_scan_or_report_corruption(noise, keep):
    with tempfile.TemporaryDirectory() as directory:
        good = wal.encode_records([Entry(1, i) for i in range(1, 4)])
        segment = Path(directory) / wal.segment_name(0, 1)
        # A real segment with fuzz appended, and fuzz before valid records under the next segment's name.
        log, _ = wal.Wal.open(directory, 1, wal.scan(directory))
        log.append([Entry(1, i, data=b"d%d" % i) for i in range(1, 1 + keep)])
        log.sync()
        log.close()
        with open(segment, "ab") as f:
            f.write(noise)
        (Path(directory) / wal.segment_name(1, 99)).write_bytes(noise + good)
        try:
            result = wal.scan(directory)
            assert result is not None
        except StorageCorrupt:
            pass


@FUZZ
@given(st.binary(max_size=600))
def test_snapshot_and_hard_state_files_load_or_report_corruption(data):
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, snapshots.file_name(5, 1))
        Path(path).write_bytes(data)
        try:
            snapshots.read(path)
        except StorageCorrupt:
            pass
        Path(directory, hardstate.FILENAME).write_bytes(data)
        try:
            hardstate.read(directory)
        except StorageCorrupt:
            pass


@FUZZ
@given(st.text(max_size=300))
def test_config_files_load_or_raise_config_error(text):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory, "x.toml")
        path.write_text(text)
        for load in (lambda: config.load(path, "n1"), lambda: worker_config.load(path)):
            try:
                load()
            except config.ConfigError as exc:
                assert "\n" not in str(exc)


@FUZZ
@given(st.one_of(st.binary(max_size=400), st.text(max_size=400).map(str.encode)))
def test_junit_reports_parse_or_raise_a_clear_error(data):
    try:
        cases = junit.parse(data)
        assert isinstance(cases, list)
    except junit.JunitError:
        pass


def test_junit_billion_laughs_is_refused():
    bomb = b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa">' + b"".join(
        b'<!ENTITY %c "&%c;&%c;&%c;&%c;&%c;&%c;&%c;&%c;&%c;&%c;">' % ((98 + i,) + (97 + i,) * 10) for i in range(8)
    ) + b']><testsuite><testcase name="&i;"/></testsuite>'
    try:
        junit.parse(bomb)
        raise AssertionError("entity expansion was not refused")
    except junit.JunitError:
        pass


@FUZZ
@given(st.binary(max_size=600))
def test_http_parser_answers_or_closes_on_any_bytes(data):
    async def handler(request: http.Request) -> http.Response:
        return http.json_response(200, {"ok": True})

    async def feed() -> None:
        client, server = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(http.serve_connection, server, handler, http.Limits(header_timeout_s=0.5, idle_timeout_s=0.5, body_timeout_s=0.5))
            await client.send_all(data)
            await client.send_eof()
            with trio.fail_after(5):
                reply = b""
                while chunk := await client.receive_some(65536):
                    reply += chunk
            assert reply == b"" or reply.startswith(b"HTTP/1.1 ")
            assert b" 500 " not in reply.split(b"\r\n", 1)[0]

    trio.run(feed)


@FUZZ
@given(st.binary(max_size=200))
def test_log_entries_that_do_not_decode_are_recorded_failures(data):
    machine = StateMachine()
    result = machine.apply(1, data)
    assert machine.applied == 1 and (result.ok or result.error)

