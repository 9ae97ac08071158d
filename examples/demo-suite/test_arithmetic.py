"""Passing tests: the bulk of a healthy suite."""

import pytest


@pytest.mark.parametrize("n", range(6))
def test_squares_are_non_negative(n):
    assert n * n >= 0


def test_integer_division_rounds_down():
    assert 7 // 2 == 3
