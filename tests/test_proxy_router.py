"""Router: the policy over the replicas not ejected, picks that skip tried ones, begin/end."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from meshd.proxy.balancing import Endpoint
from meshd.proxy.outlier import OutlierConfig
from meshd.proxy.router import Router
from meshd.spec import Balance

OUTLIER = OutlierConfig(consecutive=3, base_s=10.0, max_s=60.0, max_percent=50)


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def eps(*ids: str, node: str = "n1") -> tuple[Endpoint, ...]:
    return tuple(Endpoint(i, node, "10.0.0.1", 8000 + n) for n, i in enumerate(ids))


def router(
    ids: tuple[str, ...] = ("a", "b", "c"),
    policy: str = "round_robin",
    clock: Clock | None = None,
    **kwargs: object,
) -> Router:
    r = Router(
        "web",
        "http",
        Balance(policy, kwargs.pop("hash_on", "client")),  # type: ignore[arg-type]
        clock=clock or Clock(),
        rng=random.Random(3),
        outlier=OUTLIER,
        **kwargs,  # type: ignore[arg-type]
    )
    r.set_endpoints(eps(*ids))
    return r


def picks(r: Router, n: int, **kwargs: object) -> list[str]:
    out = []
    for _ in range(n):
        ep = r.pick("192.0.2.9", **kwargs)  # type: ignore[arg-type]
        assert ep is not None
        out.append(ep.id)
    return out


def fail(r: Router, ep_id: str, n: int) -> None:
    ep = next(e for e in r.endpoints if e.id == ep_id)
    for _ in range(n):
        r.begin(ep)
        r.end(ep, 0.01, False)


def test_empty_router_picks_nothing() -> None:
    r = Router("web", "http", Balance())
    assert r.pick("c") is None
    assert r.active == ()
    r.set_endpoints(eps("a"))
    r.set_endpoints(())
    assert r.pick("c") is None


def test_round_robin_spreads_evenly() -> None:
    r = router()
    assert Counter(picks(r, 300)) == {"a": 100, "b": 100, "c": 100}


def test_same_endpoints_again_leave_the_policy_alone() -> None:
    r = router()
    calls = []
    update = r.policy.update
    r.policy.update = lambda e: (calls.append(e), update(e))  # type: ignore[method-assign]
    r.set_endpoints(eps("a", "b", "c"))
    assert calls == []
    r.set_endpoints(eps("a", "b"))
    assert [tuple(ep.id for ep in c) for c in calls] == [("a", "b")]


@pytest.mark.parametrize(
    "policy", ["round_robin", "least_conn", "random", "p2c", "ewma", "hash", "weighted"]
)
def test_pick_never_returns_an_excluded_replica(policy: str) -> None:
    r = router(("a", "b", "c", "d"), policy)
    for i in range(200):
        exclude = {"a", "b", "c", "d"} - {"abcd"[i % 4]}
        ep = r.pick(f"client-{i}", f"key-{i}", exclude)
        assert ep is not None and ep.id == "abcd"[i % 4]
    assert r.pick("x", "k", {"a", "b", "c", "d"}) is None


def test_hash_pick_is_stable_and_falls_back_deterministically() -> None:
    r = router(("a", "b", "c"), "hash", hash_on="header:x-user")
    owner = r.pick("client", "user-42")
    assert owner is not None
    assert {r.pick("other-client", "user-42").id for _ in range(20)} == {owner.id}  # type: ignore[union-attr]
    fallback = r.pick("client", "user-42", {owner.id})
    assert fallback is not None and fallback.id != owner.id
    first_other = next(e for e in r.active if e.id != owner.id)
    assert fallback == first_other
    # every router with the same replicas agrees, on the key and on the fallback
    other = router(("a", "b", "c"), "hash", hash_on="header:x-user")
    assert other.pick("x", "user-42") == owner
    assert other.pick("x", "user-42", {owner.id}) == fallback


def test_begin_and_end_drive_least_conn() -> None:
    r = router(("a", "b"), "least_conn")
    a = r.pick("c")
    assert a is not None
    r.begin(a)
    assert r.policy.outstanding(a.id) == 1
    b = r.pick("c")
    assert b is not None and b.id != a.id
    r.end(a, 0.01, True)
    assert r.policy.outstanding(a.id) == 0


def test_consecutive_failures_eject_until_their_time_is_up() -> None:
    clock = Clock(100.0)
    r = router(clock=clock)
    fail(r, "b", 3)
    assert [ep.id for ep in r.active] == ["a", "c"]
    assert set(picks(r, 50)) == {"a", "c"}
    clock.now = 109.9
    assert "b" not in picks(r, 10)
    clock.now = 110.0
    assert [ep.id for ep in r.active] == ["a", "c"]  # put back lazily, on the next pick
    assert "b" in picks(r, 3)
    assert [ep.id for ep in r.active] == ["a", "b", "c"]


def test_successes_between_failures_keep_a_replica_in() -> None:
    r = router()
    b = r.endpoints[1]
    for _ in range(10):
        r.end(b, 0.01, False)
        r.end(b, 0.01, False)
        r.end(b, 0.01, True)
    assert len(r.active) == 3


def test_ejection_never_takes_more_than_the_cap() -> None:
    r = router(("a", "b", "c", "d"))  # 50%: two of four
    for ep_id in ("a", "b", "c", "d"):
        fail(r, ep_id, 3)
    assert [ep.id for ep in r.active] == ["c", "d"]
    assert set(picks(r, 20)) == {"c", "d"}


def test_a_failed_lone_replica_is_still_tried() -> None:
    """Ejected, but the only one: trying it beats refusing every request."""
    r = router(("only",))
    fail(r, "only", 3)
    assert r.outliers.ejected(r.clock()) == {"only"}
    assert [ep.id for ep in r.active] == ["only"]
    assert r.pick("c").id == "only"  # type: ignore[union-attr]


def test_an_ejected_replica_stays_out_across_an_update_it_survives() -> None:
    clock = Clock(100.0)
    r = router(clock=clock)
    fail(r, "b", 3)
    r.set_endpoints(eps("a", "b", "c", "d"))
    assert [ep.id for ep in r.active] == ["a", "c", "d"]
    clock.now = 111.0
    assert "b" in picks(r, 4)


def test_a_replica_that_leaves_and_returns_comes_back_in() -> None:
    r = router()
    fail(r, "b", 3)
    r.set_endpoints(eps("a", "c"))
    r.set_endpoints(eps("a", "b", "c"))
    assert [ep.id for ep in r.active] == ["a", "b", "c"]


def test_reports_about_replicas_no_longer_routed_are_ignored() -> None:
    r = router()
    gone = r.endpoints[0]
    r.begin(gone)
    r.set_endpoints(eps("b", "c"))
    for _ in range(5):
        r.end(gone, 0.01, False)
    assert [ep.id for ep in r.active] == ["b", "c"]
    assert r.outliers.ejections_total == 0


def test_local_first_prefers_this_node_then_the_nearest() -> None:
    endpoints = (
        Endpoint("a", "n1", "10.0.0.1", 80),
        Endpoint("b", "n2", "10.0.0.2", 80),
        Endpoint("c", "n3", "10.0.0.3", 80),
    )
    rtts = {"n2": 0.005, "n3": 0.001}
    r = Router("web", "http", Balance("local_first"), local_node="n1", rtt=rtts.get)
    r.set_endpoints(endpoints)
    assert {r.pick("c").id for _ in range(5)} == {"a"}  # type: ignore[union-attr]
    far = Router("web", "http", Balance("local_first"), local_node="n9", rtt=rtts.get)
    far.set_endpoints(endpoints)
    assert {far.pick("c").id for _ in range(5)} == {"c"}  # type: ignore[union-attr]
    assert far.pick("c", exclude={"c"}) is not None


def test_unknown_policy_is_refused_when_the_router_is_built() -> None:
    with pytest.raises(ValueError, match="unknown balancing policy"):
        Router("web", "http", Balance("fastest"))
