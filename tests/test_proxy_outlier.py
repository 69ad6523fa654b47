"""Passive outlier ejection: streaks eject, ejections grow, the cap holds, time forgives."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.proxy.outlier import OutlierConfig, OutlierDetector

CFG = OutlierConfig(consecutive=3, base_s=10.0, max_s=35.0, max_percent=50, forgive_s=100.0)


def detector(ids: list[str], config: OutlierConfig = CFG) -> OutlierDetector:
    d = OutlierDetector(config)
    d.update(ids)
    return d


def fail(d: OutlierDetector, i: str, n: int, now: float) -> list[bool]:
    return [d.on_result(i, False, now) for _ in range(n)]


def test_defaults_are_those_documented() -> None:
    c = OutlierDetector().config
    assert (c.consecutive, c.base_s, c.max_s, c.max_percent, c.forgive_s) == (
        5,
        10.0,
        300.0,
        50,
        300.0,
    )


def test_a_streak_of_failures_ejects_exactly_at_the_threshold() -> None:
    d = detector(["a", "b"])
    assert fail(d, "a", 3, now=0.0) == [False, False, True]
    assert d.ejected(0.0) == {"a"}
    assert d.ejections_total == 1


def test_a_success_breaks_the_streak() -> None:
    d = detector(["a", "b"])
    fail(d, "a", 2, now=0.0)
    assert d.on_result("a", True, 0.0) is False
    assert fail(d, "a", 2, now=0.0) == [False, False]
    assert d.ejected(0.0) == frozenset()
    assert d.on_result("a", False, 0.0) is True


def test_ejection_lasts_base_and_ends_on_time() -> None:
    d = detector(["a", "b"])
    fail(d, "a", 3, now=5.0)
    assert d.ejected(14.999) == {"a"}
    assert d.next_return(5.0) == 15.0
    assert d.ejected(15.0) == frozenset()
    assert d.next_return(15.0) is None


def test_each_new_ejection_is_longer_up_to_the_cap() -> None:
    d = detector(["a", "b"])
    now = 0.0
    lengths = []
    for _ in range(5):
        assert fail(d, "a", 3, now)[-1] is True
        back = d.next_return(now)
        assert back is not None
        lengths.append(back - now)
        now = back  # fails again the moment it returns, never forgiven
    assert lengths == [10.0, 20.0, 30.0, 35.0, 35.0]
    assert d.ejections_total == 5


def test_failures_while_ejected_do_not_extend_the_ejection() -> None:
    d = detector(["a", "b"])
    fail(d, "a", 3, now=0.0)
    assert fail(d, "a", 10, now=1.0) == [False] * 10
    assert d.next_return(1.0) == 10.0
    assert d.ejections_total == 1


def test_at_most_max_percent_are_ejected_at_once() -> None:
    d = detector(["a", "b", "c", "d"])  # 50% of 4: two may go
    assert fail(d, "a", 3, 0.0)[-1] is True
    assert fail(d, "b", 3, 0.0)[-1] is True
    assert fail(d, "c", 3, 0.0) == [False] * 3
    assert fail(d, "c", 5, 0.0) == [False] * 5
    assert d.ejected(0.0) == {"a", "b"}
    # once one is back, the next failure of c (its streak kept) ejects it
    assert d.on_result("c", False, 10.0) is True
    assert d.ejected(10.0) == {"c"}


def test_the_cap_allows_one_even_when_the_share_rounds_to_zero() -> None:
    d = detector(["a", "b", "c"], OutlierConfig(consecutive=1, max_percent=10))
    assert d.on_result("a", False, 0.0) is True
    assert d.on_result("b", False, 0.0) is False
    assert d.ejected(0.0) == {"a"}


def test_a_lone_replica_may_be_ejected() -> None:
    """ "At least one may go": the documented floor applies to a service of one too."""
    d = detector(["only"], OutlierConfig(consecutive=2))
    assert fail(d, "only", 2, 0.0) == [False, True]
    assert d.ejected(0.0) == {"only"}


def test_a_replica_healthy_long_enough_starts_again_from_one() -> None:
    d = detector(["a", "b"])
    fail(d, "a", 3, now=0.0)  # 10 s
    fail(d, "a", 3, now=10.0)  # 20 s, until 30
    d.on_result("a", True, 40.0)  # healthy, but only 40 s after the last ejection
    fail(d, "a", 3, now=41.0)
    assert d.next_return(41.0) == 71.0  # the third: 30 s
    d.on_result("a", True, 140.0)  # only 69 s after its return at 71
    fail(d, "a", 3, now=141.0)
    assert d.next_return(141.0) == 176.0  # the fourth: 40 s, capped at 35
    d.on_result("a", True, 276.0)  # 100 s after its return at 176
    fail(d, "a", 3, now=277.0)
    assert d.next_return(277.0) == 287.0  # back to the base


def test_forgiveness_needs_forgive_s_of_health_after_the_return() -> None:
    d = detector(["a", "b"], OutlierConfig(consecutive=3, base_s=10, max_s=100, forgive_s=30))
    fail(d, "a", 3, now=0.0)  # 10 s, until 10
    fail(d, "a", 3, now=10.0)  # 20 s, until 30
    fail(d, "a", 3, now=30.0)  # 30 s, until 60
    assert d.next_return(30.0) == 60.0
    d.on_result("a", True, 60.0)  # back for no time at all
    fail(d, "a", 3, now=61.0)
    assert d.next_return(61.0) == 101.0  # the fourth ejection: 40 s


def test_ok_results_never_eject_and_unknown_ids_are_ignored() -> None:
    d = detector(["a"])
    assert not any(d.on_result("a", True, float(t)) for t in range(100))
    assert d.on_result("ghost", False, 0.0) is False
    assert fail(d, "ghost", 10, 0.0) == [False] * 10
    assert d.ejected(0.0) == frozenset()


def test_update_keeps_records_of_staying_ids_and_forgets_leaving_ones() -> None:
    d = detector(["a", "b", "c"])
    fail(d, "a", 3, now=0.0)
    fail(d, "b", 2, now=0.0)
    d.update(["a", "b", "d"])
    assert d.ejected(1.0) == {"a"}
    assert d.on_result("b", False, 1.0) is False  # b kept its streak, but a is out (cap 1)
    d.update(["b", "d"])  # a leaves: its ejection goes with it
    assert d.ejected(1.0) == frozenset()
    assert d.on_result("b", False, 1.0) is True  # streak of 4 now, and room to eject
    d.update(["a", "b", "d"])
    assert fail(d, "a", 2, 2.0) == [False, False]  # a came back fresh: no streak, no history


def test_a_returning_id_starts_fresh_after_leaving() -> None:
    d = detector(["a", "b"])
    for now in (0.0, 10.0, 30.0):
        fail(d, "a", 3, now)
    d.update(["b"])
    d.update(["a", "b"])
    fail(d, "a", 3, now=100.0)
    assert d.next_return(100.0) == 110.0


def test_next_return_is_the_earliest() -> None:
    d = detector(["a", "b", "c", "d"])
    fail(d, "a", 3, now=0.0)
    fail(d, "a", 3, now=10.0)  # a until 30
    fail(d, "b", 3, now=12.0)  # b until 22
    assert d.next_return(12.0) == 22.0
    assert d.next_return(22.0) == 30.0
    assert d.next_return(30.0) is None


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(1, 8),
    pct=st.integers(0, 100),
    events=st.lists(
        st.tuples(st.integers(0, 7), st.booleans(), st.floats(0, 5, allow_nan=False)),
        max_size=100,
    ),
)
def test_cap_and_lengths_hold_for_any_history(
    n: int, pct: int, events: list[tuple[int, bool, float]]
) -> None:
    config = OutlierConfig(consecutive=2, base_s=1.0, max_s=4.0, max_percent=pct, forgive_s=3.0)
    ids = [f"r{i}" for i in range(n)]
    d = detector(ids, config)
    cap = max(1, n * pct // 100)
    now = 0.0
    for idx, ok, dt in events:
        now += dt
        before = d.ejections_total
        ejected_now = d.on_result(ids[idx % n], ok, now)
        assert d.ejections_total == before + int(ejected_now)
        out = d.ejected(now)
        assert len(out) <= cap
        if ejected_now:
            assert ids[idx % n] in out
            back = d.next_return(now)
            assert back is not None and now < back <= now + config.max_s
