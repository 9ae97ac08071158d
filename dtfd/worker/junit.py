"""JUnit XML reports turned into per-case rows, safely.

The file is written by the task, so it is untrusted input: defusedxml refuses entity
declarations (billion laughs, external entities) and a size cap refuses a file too big
to hold, each as a JunitError with a message fit for the result's `reason`.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring

from dtfd.state.tasks import JUnitCase

MAX_MESSAGE_CHARS = 1000  # per case: results travel in request bodies with a size limit
OUTCOMES = {"failure": "failed", "error": "error", "skipped": "skipped"}


class JunitError(Exception):
    """The report cannot be used; the message says why."""


def parse_file(path: Path, max_bytes: int) -> list[JUnitCase]:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise JunitError(f"junit: {path.name} is {size} bytes, over the {max_bytes}-byte cap")
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)  # the file may grow between stat and read
    except FileNotFoundError:
        raise JunitError(f"junit: {path.name} was not written") from None
    except OSError as exc:
        raise JunitError(f"junit: cannot read {path.name}: {exc.strerror}") from None
    if len(data) > max_bytes:
        raise JunitError(f"junit: {path.name} is over the {max_bytes}-byte cap")
    return parse(data)


def parse(data: bytes) -> list[JUnitCase]:
    try:
        root = fromstring(data)
    except DefusedXmlException as exc:
        raise JunitError(f"junit: refused unsafe XML ({type(exc).__name__})") from None
    except ET.ParseError as exc:
        raise JunitError(f"junit: malformed XML: {exc}") from None
    if root.tag not in ("testsuites", "testsuite"):
        raise JunitError(f"junit: root element is <{root.tag}>, not <testsuites> or <testsuite>")
    return [_case(element) for element in root.iter("testcase")]


def _case(element: ET.Element) -> JUnitCase:
    status, message = "passed", ""
    for child in element:
        if child.tag in OUTCOMES:
            status = OUTCOMES[child.tag]
            message = child.get("message") or (child.text or "").strip()
            break
    return JUnitCase(
        name=element.get("name", ""),
        classname=element.get("classname", ""),
        status=status,
        duration_s=_seconds(element.get("time", "")),
        message=message[:MAX_MESSAGE_CHARS],
    )


def _seconds(text: str) -> float:
    """Reporters write '1.5', '1,234.5' or nothing; an unusable value counts as 0."""
    try:
        value = float(text.replace(",", ""))
    except ValueError:
        return 0.0
    return value if math.isfinite(value) and value >= 0 else 0.0
