"""Logging for every dtf daemon: one event a line, key=value context, journald priorities.

When stderr is the journal stream systemd gave us (JOURNAL_STREAM names its device and
inode), each line starts with a `<N>` syslog priority so `journalctl -p err` works and
journald adds its own timestamp; elsewhere lines carry a local timestamp and level name.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

PRIORITIES = {  # syslog priorities, sd-daemon(3)
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def fields(**context: object) -> str:
    """Render key=value pairs, quoting values that contain spaces, quotes or '='."""
    parts = []
    for key, value in context.items():
        text = str(value)
        if not text or any(c in text for c in ' "=\n'):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


def _priority(levelno: int) -> int:
    for level, priority in PRIORITIES.items():
        if levelno >= level:
            return priority
    return 7


class EventFormatter(logging.Formatter):
    def __init__(self, journald: bool) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        line = f"{record.name}: {record.getMessage()}"
        if record.exc_info:
            line += " " + fields(exception=self.formatException(record.exc_info))
        line = line.replace("\n", "\\n")  # one event, one line: journald splits on newlines
        if self.journald:
            return f"<{_priority(record.levelno)}>{line}"
        return f"{self.formatTime(record, '%Y-%m-%dT%H:%M:%S')} {record.levelname.lower()} {line}"


def stderr_is_journal(stream: TextIO = sys.stderr) -> bool:
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def setup(level: str = "info", stream: TextIO = sys.stderr) -> None:
    """Route the `dtf` logger tree to `stream`; safe to call again on reload."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(EventFormatter(journald=stderr_is_journal(stream)))
    root = logging.getLogger("dtf")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
