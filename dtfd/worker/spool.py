"""The result spool: results no coordinator has answered yet, kept in work_dir across a worker restart.

An append-only file of JSON lines, each a finished (or shrunk) result or the lease ids done
with (acknowledged, or refused and dropped); replaying it gives the results still owed. A
change costs one write(2). Rewriting the whole file per change, as the worker did before,
also cost a rename and an unlink per task: metadata operations that queue on the ext4
journal behind the nodes' fsyncs, on the event loop. The file is rewritten with only the
owed results when it is over COMPACT_BYTES and more than twice their size, and on load
(which also drops a line torn by a killed worker).

No fsync: like the spool before it, it outlives a crash of the worker, not of the machine,
whose leases the coordinator requeues once the worker is declared lost.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import msgspec

from dtfd.journal import fields
from dtfd.worker.runner import Result

log = logging.getLogger("dtf.worker.spool")

COMPACT_BYTES = 1 << 20


class Record(msgspec.Struct, omit_defaults=True):
    result: Result | None = None
    done: list[str] = []


_encode = msgspec.json.Encoder().encode
_decoder = msgspec.json.Decoder(Record | list[Result])  # a list: the one-document spool of older workers


class Spool:
    def __init__(self, path: Path, legacy: Path | None = None) -> None:
        self.path = path
        self.legacy = legacy  # written by older workers: read once on load, then removed
        self._fd: int | None = None
        self._size = 0  # bytes in the file
        self._lines: dict[str, bytes] = {}  # lease id -> the line of its owed result
        self._live = 0  # bytes of those lines
        self._broken = False  # a write failed: the file may end in a partial line until rewritten

    def load(self) -> list[Result]:
        """The results still owed; the file is rewritten with only them."""
        owed: dict[str, Result] = {}
        for path in filter(None, (self.legacy, self.path)):
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.error("spooled results unreadable; ignored %s", fields(path=path, error=exc.strerror))
                continue
            for number, line in enumerate(data.splitlines(), 1):
                try:
                    record = _decoder.decode(line)
                except msgspec.DecodeError as exc:
                    log.warning("spool line unreadable; skipped %s", fields(path=path, line=number, error=exc))
                    continue
                if isinstance(record, list):
                    owed.update((result.lease_id, result) for result in record)
                    continue
                if record.result is not None:
                    owed[record.result.lease_id] = record.result
                for lease_id in record.done:
                    owed.pop(lease_id, None)
        for result in owed.values():
            self._keep(result)
        self._rewrite()
        if self.legacy is not None and not self._broken:
            self.legacy.unlink(missing_ok=True)
        return list(owed.values())

    def add(self, result: Result) -> None:
        """Owe `result` (in place of an earlier one for its lease)."""
        self._append(self._keep(result))

    def done(self, lease_ids: Iterable[str]) -> None:
        """No longer owe the results of these leases."""
        ended = [lease_id for lease_id in lease_ids if lease_id in self._lines]
        if not ended:
            return
        for lease_id in ended:
            self._live -= len(self._lines.pop(lease_id))
        if self._size > COMPACT_BYTES and self._size > 2 * self._live:
            self._rewrite()
        else:
            self._append(_encode(Record(done=ended)) + b"\n")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _keep(self, result: Result) -> bytes:
        line = _encode(Record(result=result)) + b"\n"
        self._live += len(line) - len(self._lines.get(result.lease_id, b""))
        self._lines[result.lease_id] = line
        return line

    def _append(self, line: bytes) -> None:
        if self._broken or self._fd is None:
            self._rewrite()
            return
        try:
            written = os.write(self._fd, line)
        except OSError as exc:
            written = 0
            log.error("cannot write the result spool %s", fields(path=self.path, error=exc.strerror))
        self._size += written
        self._broken = written != len(line)

    def _rewrite(self) -> None:
        """The file with only the owed results (an empty one when none), replaced atomically."""
        self.close()
        data = b"".join(self._lines.values())
        tmp = self.path.with_suffix(".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb", opener=lambda path, flags: os.open(path, flags, 0o600)) as out:
                out.write(data)
            os.replace(tmp, self.path)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            log.error("cannot write the result spool %s", fields(path=self.path, error=exc.strerror))
            self._broken = True
            return
        self._size, self._broken = len(data), False
