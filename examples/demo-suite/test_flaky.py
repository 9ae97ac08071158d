"""Fails on its first attempt and passes on the retry: what max_retries is for."""

import os
from pathlib import Path


def test_eventually_consistent():
    marker = Path(os.environ.get("DTF_DEMO_STATE", "/tmp")) / f"flaky-{os.environ.get('DTF_DEMO_RUN', 'run')}"
    if not marker.exists():
        marker.write_text("first attempt failed")
        raise AssertionError("first attempt fails; the retry passes")
