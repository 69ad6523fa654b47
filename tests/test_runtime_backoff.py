"""Crash-loop restart backoff on virtual time."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.runtime.backoff import RestartBackoff


def crash_loop(b: RestartBackoff, exits: int, run_for: float = 0.5) -> list[float]:
    """Start, run ``run_for`` seconds, exit, wait the delay; ``exits`` times."""
    now = 0.0
    delays = []
    for _ in range(exits):
        b.on_running(now)
        now += run_for
        delay = b.on_exit(now)
        delays.append(delay)
        now += delay
    return delays


def test_defaults_double_from_first_up_to_max() -> None:
    b = RestartBackoff()
    assert (b.first, b.factor, b.max, b.reset_after) == (0.1, 2.0, 30.0, 60.0)
    assert b.delay == 0.0 and b.restarts == 0
    delays = crash_loop(b, 12)
    expected = [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0, 30.0]
    assert delays == pytest.approx(expected)
    assert b.delay == 30.0
    assert b.restarts == 12 and b.streak == 12


def test_long_healthy_run_resets_to_first() -> None:
    b = RestartBackoff()
    crash_loop(b, 8)
    assert b.delay == pytest.approx(12.8)
    b.on_running(1000.0)
    assert b.on_exit(1060.0) == 0.1  # ran exactly reset_after
    assert b.on_exit(1060.5) == pytest.approx(0.2)  # never came up again
    assert b.restarts == 10  # the count of restarts is never reset


def test_run_just_short_of_reset_keeps_growing() -> None:
    b = RestartBackoff(reset_after=60.0)
    b.on_running(0.0)
    assert b.on_exit(1.0) == 0.1
    b.on_running(2.0)
    assert b.on_exit(61.9) == pytest.approx(0.2)


def test_on_running_keeps_the_first_time() -> None:
    """The controller may report running on every healthy check."""
    b = RestartBackoff(reset_after=60.0)
    b.on_exit(0.0)
    b.on_exit(1.0)
    for t in range(10, 80, 5):
        b.on_running(float(t))
    assert b.running_since == 10.0
    assert b.on_exit(75.0) == 0.1


def test_exit_without_running_counts_as_short() -> None:
    b = RestartBackoff(first=1.0, factor=3.0, max=10.0)
    assert [b.on_exit(float(t)) for t in range(4)] == [1.0, 3.0, 9.0, 10.0]


def test_restart_at_and_reset() -> None:
    b = RestartBackoff(first=2.0)
    assert b.restart_at is None
    b.on_exit(10.0)
    assert b.restart_at == 12.0
    b.on_exit(13.0)
    assert b.restart_at == 17.0
    b.reset()
    assert b.delay == 0.0 and b.restart_at is None
    assert b.on_exit(20.0) == 2.0
    assert b.restarts == 3


def test_zero_first_restarts_at_once() -> None:
    b = RestartBackoff(first=0.0, max=0.0)
    assert crash_loop(b, 3) == [0.0, 0.0, 0.0]


def test_jitter_is_bounded_and_reproducible() -> None:
    a = RestartBackoff(jitter=0.2, rng=random.Random(7))
    b = RestartBackoff(jitter=0.2, rng=random.Random(7))
    da, db = crash_loop(a, 15), crash_loop(b, 15)
    assert da == db
    plain = crash_loop(RestartBackoff(), 15)
    assert da != plain
    for got, base in zip(da, plain, strict=True):
        assert base * 0.8 - 1e-9 <= got <= min(30.0, base * 1.2) + 1e-9


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"first": -1}, "first"),
        ({"max": math.inf}, "max"),
        ({"reset_after": math.nan}, "reset_after"),
        ({"factor": 0.5}, "factor"),
        ({"first": 5.0, "max": 1.0}, "must not be below first"),
        ({"jitter": 1.5}, "jitter"),
        ({"first": "1"}, "first"),
    ],
)
def test_bad_parameters_are_clear_errors(kwargs: dict[str, object], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        RestartBackoff(**kwargs)  # type: ignore[arg-type]


@given(
    runs=st.lists(st.floats(min_value=0.0, max_value=200.0), min_size=1, max_size=40),
    jitter=st.floats(min_value=0.0, max_value=1.0),
    seed=st.integers(0, 2**32),
)
def test_delays_always_within_bounds(runs: list[float], jitter: float, seed: int) -> None:
    b = RestartBackoff(jitter=jitter, rng=random.Random(seed))
    now = 0.0
    for i, ran in enumerate(runs, 1):
        b.on_running(now)
        now += ran
        delay = b.on_exit(now)
        assert 0.0 <= delay <= b.max
        if ran >= b.reset_after + 1e-6:  # clear of float rounding in now - running_since
            assert b.streak == 1
            assert delay <= b.first * (1 + jitter) + 1e-9
        assert b.restarts == i
        now += delay
