"""Slow tests, to show up in the run's slowest-tests table."""

import time

import pytest


@pytest.mark.parametrize("seconds", [0.6, 1.2])
def test_takes_a_while(seconds):
    time.sleep(seconds)
