"""Log lines must be machine-splittable: one event per line, journald priorities when under systemd."""

import io
import logging
import os
import subprocess
import sys

from dtfd import journal


def _capture(journald: bool) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(journal.EventFormatter(journald=journald))
    logger = logging.getLogger(f"dtf.test.{journald}")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    return logger, stream


def test_journald_lines_carry_syslog_priorities():
    logger, stream = _capture(journald=True)
    logger.error("wal corrupt %s", journal.fields(path="/var/lib/dtf/n1/wal/0001.wal", offset=4096))
    logger.warning("slow fsync")
    logger.info("elected")
    logger.debug("tick")
    lines = stream.getvalue().splitlines()
    assert [line[:3] for line in lines] == ["<3>", "<4>", "<6>", "<7>"]
    assert lines[0] == "<3>dtf.test.True: wal corrupt path=/var/lib/dtf/n1/wal/0001.wal offset=4096"


def test_exceptions_and_newlines_stay_on_one_line():
    logger, stream = _capture(journald=True)
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        logger.exception("apply failed")
    logger.info("multi\nline")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("<3>") and "ValueError" in lines[0]


def test_fields_quote_what_would_break_key_value_parsing():
    assert journal.fields(a=1, b="x y", c='q"t', d="", e="k=v") == 'a=1 b="x y" c="q\\"t" d="" e="k=v"'


def test_journal_stream_detection_needs_matching_device_and_inode(tmp_path):
    """Only the stream systemd named gets priority prefixes; a redirected stderr does not."""
    log = tmp_path / "err.log"
    code = (
        "import logging; from dtfd import journal; journal.setup('info');"
        "logging.getLogger('dtf.x').warning('hello')"
    )
    with open(log, "w") as err:
        st = os.fstat(err.fileno())
        env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
        subprocess.run([sys.executable, "-c", code], stderr=err, env=env, check=True, timeout=60)
    assert log.read_text() == "<4>dtf.x: hello\n"
    with open(log, "w") as err:
        env = dict(os.environ, JOURNAL_STREAM="1:2")
        subprocess.run([sys.executable, "-c", code], stderr=err, env=env, check=True, timeout=60)
    text = log.read_text()
    assert not text.startswith("<") and text.rstrip().endswith("warning dtf.x: hello")
