"""Load-balancing policies: distributions, churn and the empty set."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.proxy.balancing import (
    POLICIES,
    Endpoint,
    PickContext,
    Policy,
    make_policy,
)


def ep(i: str, node: str = "n1", weight: int = 1) -> Endpoint:
    return Endpoint(id=i, node=node, address="10.0.0.1", port=8000, weight=weight)


def policy(name: str, eps: list[Endpoint], seed: int = 7) -> Policy:
    p = make_policy(name, random.Random(seed))
    p.update(eps)
    return p


CTX = PickContext(client="192.0.2.1:5000")


def picks(p: Policy, n: int, ctx: PickContext = CTX) -> list[str]:
    out = []
    for _ in range(n):
        e = p.pick(ctx)
        assert e is not None
        out.append(e.id)
    return out


def test_factory_lists_valid_names_on_unknown() -> None:
    assert set(POLICIES) == {
        "round_robin",
        "least_conn",
        "random",
        "p2c",
        "ewma",
        "hash",
        "weighted",
        "local_first",
    }
    with pytest.raises(ValueError, match=r"round_robin.*local_first"):
        make_policy("fastest", random.Random(0))


def test_endpoint_and_update_validate() -> None:
    with pytest.raises(ValueError, match="weight"):
        Endpoint("a", "n", "10.0.0.1", 80, weight=0)
    with pytest.raises(ValueError, match="port"):
        Endpoint("a", "n", "10.0.0.1", 0)
    p = make_policy("round_robin", random.Random(0))
    with pytest.raises(ValueError, match="duplicate endpoint ids: a"):
        p.update([ep("a"), ep("a")])


@pytest.mark.parametrize("name", POLICIES)
def test_empty_set_picks_none(name: str) -> None:
    p = make_policy(name, random.Random(0))
    assert p.pick(CTX) is None
    p.update([ep("a")])
    assert p.pick(CTX) == ep("a")
    p.update([])
    assert p.pick(CTX) is None


def test_round_robin_exact_cycle() -> None:
    p = policy("round_robin", [ep("a"), ep("b"), ep("c")])
    assert picks(p, 9) == ["a", "b", "c"] * 3


@pytest.mark.parametrize("name", ["random", "p2c"])
def test_random_and_p2c_roughly_uniform(name: str) -> None:
    p = policy(name, [ep(x) for x in "abcde"], seed=42)
    counts = Counter(picks(p, 5000))
    assert set(counts) == set("abcde")
    for c in counts.values():
        assert 800 < c < 1200


def test_same_seed_same_sequence() -> None:
    for name in POLICIES:
        a = policy(name, [ep(x) for x in "abcd"], seed=3)
        b = policy(name, [ep(x) for x in "abcd"], seed=3)
        assert picks(a, 50) == picks(b, 50)


def test_p2c_balances_outstanding() -> None:
    eps = [ep(x) for x in "abcd"]
    p = policy("p2c", eps)
    for _ in range(400):  # requests that never finish: load must stay level
        e = p.pick(CTX)
        assert e is not None
        p.on_start(e)
    loads = [p.outstanding(x.id) for x in eps]
    assert max(loads) - min(loads) <= 3


def test_least_conn_prefers_idle_and_ties_round_robin() -> None:
    a, b, c = ep("a"), ep("b"), ep("c")
    p = policy("least_conn", [a, b, c])
    assert picks(p, 3) == ["a", "b", "c"]  # all idle: round robin
    p.on_start(a)
    p.on_start(a)
    p.on_start(b)
    assert picks(p, 3) == ["c", "c", "c"]
    p.on_start(c)
    p.on_finish(a, 0.01, True, 1.0)
    p.on_finish(a, 0.01, True, 1.0)
    assert p.pick(CTX) == a


def test_ewma_avoids_slow_endpoint() -> None:
    eps = [ep("fast1"), ep("fast2"), ep("slow")]
    latency = {"fast1": 0.01, "fast2": 0.012, "slow": 0.5}
    p = policy("ewma", eps, seed=11)
    now = 0.0
    counts: Counter[str] = Counter()
    for _ in range(3000):
        e = p.pick(PickContext(client="c", now=now))
        assert e is not None
        counts[e.id] += 1
        p.on_start(e)
        p.on_finish(e, latency[e.id], True, now + latency[e.id])
        now += 0.005
    assert counts["slow"] < 0.05 * 3000
    assert counts["fast1"] > 0.3 * 3000 and counts["fast2"] > 0.3 * 3000


def test_ewma_counts_outstanding_and_failures() -> None:
    a, b = ep("a"), ep("b")
    p = policy("ewma", [a, b])
    for e in (a, b):
        p.on_start(e)
        p.on_finish(e, 0.02, True, 0.0)
    for _ in range(3):
        p.on_start(a)  # a now has 3 in flight: cost x4
    assert picks(p, 20, PickContext(client="c", now=0.1)) == ["b"] * 20
    # A replica that fails fast must not look fast.
    p2 = policy("ewma", [a, b])
    p2.on_start(a)
    p2.on_finish(a, 0.001, False, 0.0)
    p2.on_start(b)
    p2.on_finish(b, 0.05, True, 0.0)
    assert picks(p2, 20, PickContext(client="c", now=0.1)) == ["b"] * 20


def test_ewma_new_endpoint_gets_neutral_prior() -> None:
    a, b = ep("a"), ep("b")
    p = policy("ewma", [a, b], seed=5)
    for e, lat in ((a, 0.01), (b, 0.1)):
        p.on_start(e)
        p.on_finish(e, lat, True, 0.0)
    c = ep("c")
    p.update([a, b, c])
    counts = Counter(picks(p, 3000, PickContext(client="x", now=0.0)))
    # Prior is the peers' mean: better than the slow one, worse than the fast one.
    assert counts["a"] > counts["c"] > counts["b"]


def test_ewma_drops_bad_samples() -> None:
    a = ep("a")
    p = policy("ewma", [a])
    p.on_start(a)
    p.on_finish(a, float("nan"), True, 0.0)
    p.on_finish(a, -1.0, True, 0.0)
    assert p.dropped_samples == 2
    assert p.pick(CTX) == a


def test_weighted_follows_weights_exactly() -> None:
    p = policy("weighted", [ep("a", weight=5), ep("b", weight=1), ep("c", weight=1)])
    assert picks(p, 7) == ["a", "a", "b", "a", "c", "a", "a"]  # nginx's smooth sequence
    p = policy("weighted", [ep("a", weight=3), ep("b", weight=2), ep("c", weight=1)])
    for _ in range(5):
        assert Counter(picks(p, 6)) == {"a": 3, "b": 2, "c": 1}


def _owners(p: Policy, keys: list[str]) -> dict[str, str]:
    out = {}
    for k in keys:
        e = p.pick(PickContext(client="198.51.100.9:1", hash_key=k))
        assert e is not None
        out[k] = e.id
    return out


def test_hash_stable_and_spread() -> None:
    eps = [ep(f"r{i}") for i in range(10)]
    p = policy("hash", eps)
    keys = [f"user-{i}" for i in range(5000)]
    first = _owners(p, keys)
    assert _owners(p, keys) == first
    # Another proxy with another seed agrees: the mapping depends only on the set.
    assert _owners(policy("hash", list(reversed(eps)), seed=99), keys) == first
    counts = Counter(first.values())
    assert len(counts) == 10 and min(counts.values()) > 250
    # Without a hash key the client address is the key.
    a = p.pick(PickContext(client="203.0.113.5"))
    assert all(p.pick(PickContext(client="203.0.113.5")) == a for _ in range(10))


def test_hash_minimal_movement() -> None:
    eps = [ep(f"r{i}") for i in range(10)]
    p = policy("hash", eps)
    keys = [f"session-{i}" for i in range(5000)]
    before = _owners(p, keys)
    p.update([e for e in eps if e.id != "r3"])
    after = _owners(p, keys)
    moved = [k for k in keys if before[k] != after[k]]
    assert all(before[k] == "r3" for k in moved)
    assert 0.05 < len(moved) / len(keys) < 0.15  # ~1/N
    p.update([*eps, ep("r10")])
    grown = _owners(p, keys)
    moved = [k for k in keys if grown[k] != before[k]]
    assert all(grown[k] == "r10" for k in moved)
    assert 0.04 < len(moved) / len(keys) < 0.14  # ~1/(N+1)


def test_local_first_local_then_nearest() -> None:
    eps = [ep("a", "n1"), ep("b", "n2"), ep("c", "n2"), ep("d", "n3"), ep("e", "n1")]
    p = policy("local_first", eps)
    rtt = {"n2": 0.004, "n3": 0.001}.get
    local = PickContext(client="c", local_node="n1", rtt=rtt)
    assert picks(p, 4, local) == ["a", "e", "a", "e"]
    remote = PickContext(client="c", local_node="n9", rtt=rtt)
    assert picks(p, 3, remote) == ["d", "d", "d"]
    p.update([e for e in eps if e.id != "d"])
    assert sorted(picks(p, 4, remote)) == ["b", "b", "c", "c"]
    unknown = PickContext(client="c", local_node="n9")
    assert Counter(picks(p, 8, unknown)) == {"a": 2, "b": 2, "c": 2, "e": 2}
    bad = PickContext(client="c", local_node="n9", rtt=lambda n: float("nan"))
    assert Counter(picks(p, 4, bad)) == {"a": 1, "b": 1, "c": 1, "e": 1}


@pytest.mark.parametrize("name", POLICIES)
def test_churn_keeps_state_for_stayers_and_drops_leavers(name: str) -> None:
    a, b, c, d = ep("a"), ep("b"), ep("c"), ep("d")
    p = policy(name, [a, b, c])
    for e in (a, a, b):
        p.on_start(e)
    p.update([b, c, d])
    assert p.tracked_ids() == {"b", "c", "d"}
    assert p.outstanding("b") == 1
    p.on_finish(a, 0.01, True, 1.0)  # a left mid-request: ignored
    p.on_start(a)
    assert p.outstanding("a") == 0
    p.update([a, b, c, d])
    assert p.outstanding("a") == 0  # came back fresh
    seen: set[str] = set()
    for i in range(400):
        e = p.pick(PickContext(client=f"198.51.100.{i % 250}", hash_key=f"k{i}", now=2.0))
        assert e is not None
        seen.add(e.id)
    assert seen >= ({"a", "d"} if name != "local_first" else {"a"})
    assert seen <= {"a", "b", "c", "d"}


def test_weighted_weight_change_keeps_cycle() -> None:
    p = policy("weighted", [ep("a", weight=1), ep("b", weight=1)])
    picks(p, 3)
    p.update([ep("a", weight=2), ep("b", weight=1)])
    assert Counter(picks(p, 30)) == {"a": 20, "b": 10}


POOL = [ep(f"e{i}", node=f"n{i % 3}", weight=1 + i % 3) for i in range(6)]

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("update"), st.sets(st.integers(0, len(POOL) - 1))),
        st.tuples(st.just("pick"), st.integers(0, 50)),
        st.tuples(st.just("start"), st.integers(0, len(POOL) - 1)),
        st.tuples(st.just("finish"), st.integers(0, len(POOL) - 1)),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(POLICIES), seed=st.integers(0, 2**32), ops=_ops)
def test_pick_always_returns_a_current_member(name: str, seed: int, ops: list) -> None:
    rng = random.Random(seed)
    p = make_policy(name, rng)
    current: list[Endpoint] = []
    now = 0.0
    for op, arg in ops:
        now += 0.1
        if op == "update":
            current = [POOL[i] for i in sorted(arg)]
            p.update(current)
        elif op == "pick":
            rtt = {"n1": 0.002, "n2": None}.get
            e = p.pick(
                PickContext(
                    client=f"c{arg}",
                    hash_key=None if arg % 2 else f"k{arg}",
                    local_node=f"n{arg % 4}",
                    rtt=rtt,
                    now=now,
                )
            )
            if current:
                assert e in current
            else:
                assert e is None
        elif op == "start":
            p.on_start(POOL[arg])
        else:
            p.on_finish(POOL[arg], rng.random(), rng.random() < 0.8, now)
