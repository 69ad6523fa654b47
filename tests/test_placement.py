"""The placement planner: filters, rankers, pending reasons and invariants."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.scheduler import (
    Constraint,
    NodeInfo,
    ReplicaRequest,
    Resources,
    placement,
    plan,
)

ZERO = Resources()
SMALL = Resources(0.5, 256)


def node(
    name: str,
    cpu: float = 4,
    mem: int = 4096,
    disk: int = 10_000,
    gpus: int = 0,
    used: Resources = ZERO,
    ports: frozenset[int] = frozenset(),
    failures: int = 0,
    ready: bool = True,
    **labels: str,
) -> NodeInfo:
    return NodeInfo(
        name, dict(labels), Resources(cpu, mem, disk, gpus), used, ports, failures, ready
    )


def reqs(
    service: str,
    n: int,
    res: Resources = SMALL,
    constraints: list[Constraint] | None = None,
    spread: str | None = "node",
    ports: tuple[int, ...] = (),
) -> list[ReplicaRequest]:
    return [
        ReplicaRequest(service, i, res, list(constraints or []), spread, ports) for i in range(n)
    ]


def where(result) -> Counter[str]:
    return Counter(p.node for p in result.placements)


def test_resources_arithmetic_and_fit() -> None:
    a = Resources(1.5, 512, 100, 1)
    assert a.add(a) == Resources(3.0, 1024, 200, 2)
    assert a.add(a).sub(a) == a
    assert Resources(0.1).add(Resources(0.2)).fits(Resources(0.3))
    assert not Resources(1, 513).fits(Resources(1, 512))
    assert not Resources(gpus=1).fits(Resources(8, 8192))


def test_not_ready_nodes_are_filtered() -> None:
    result = plan(reqs("web", 3), [node("a", ready=False), node("b")])
    assert where(result) == Counter({"b": 3})


@pytest.mark.parametrize(
    ("constraint", "allowed"),
    [
        (Constraint("node.name", "==", "b"), {"b"}),
        (Constraint("node.name", "!=", "b"), {"a", "c"}),
        (Constraint("label.zone", "==", "x"), {"a"}),
        (Constraint("label.zone", "!=", "x"), {"b", "c"}),  # c lacks the label: passes !=
        (Constraint("label.zone", "in", ["x", "y"]), {"a", "b"}),
    ],
)
def test_constraint_ops(constraint: Constraint, allowed: set[str]) -> None:
    nodes = [node("a", zone="x"), node("b", zone="y"), node("c")]
    result = plan(reqs("web", 6, constraints=[constraint]), nodes)
    assert set(where(result)) == allowed
    assert not result.pending


@pytest.mark.parametrize(
    ("attr", "op", "value"),
    [
        ("zone", "==", "a"),
        ("label.", "==", "a"),
        ("label.zone", "~", "a"),
        ("node.name", "in", "a"),
    ],
)
def test_bad_constraints_are_clear_errors(attr: str, op: str, value: object) -> None:
    with pytest.raises(ValueError, match="constraint"):
        Constraint(attr, op, value)


@pytest.mark.parametrize(
    ("res", "word"),
    [
        (Resources(cpu=3), "cpu"),
        (Resources(memory_mb=3000), "memory"),
        (Resources(disk_mb=6000), "disk"),
        (Resources(gpus=1), "gpus"),
    ],
)
def test_each_resource_filter(res: Resources, word: str) -> None:
    nodes = [node("a", cpu=4, mem=4096, disk=10_000, gpus=1), node("b", gpus=0)]
    result = plan([ReplicaRequest("x", i, res) for i in range(3)], nodes)
    placed = len(result.placements)
    assert placed >= 1
    assert result.pending
    assert word in result.pending[0].reason


def test_exhaustion_gives_pending_with_reasons() -> None:
    nodes = [node(f"n{i}", mem=1024, zone="a") for i in range(3)] + [
        node(f"m{i}", zone="b") for i in range(2)
    ]
    con = Constraint("label.zone", "==", "a")
    result = plan(reqs("db", 10, Resources(0.1, 512), [con]), nodes)
    assert len(result.placements) == 6  # two per 1 GiB node
    assert {p.node for p in result.placements} == {"n0", "n1", "n2"}
    assert len(result.pending) == 4
    reason = result.pending[0].reason
    assert reason.startswith("no node fits:")
    assert "3 nodes lack memory (need 512 MiB" in reason
    assert "2 excluded by constraint label.zone == a" in reason


def test_empty_cluster_reason() -> None:
    result = plan(reqs("web", 1), [])
    assert "no nodes" in result.pending[0].reason


def test_ports_conflict() -> None:
    nodes = [node("a", ports=frozenset({80})), node("b"), node("c")]
    result = plan(reqs("web", 3, ports=(80,)), nodes)
    assert sorted(p.node for p in result.placements) == ["b", "c"]
    assert len(result.pending) == 1
    assert "host port 80 in use" in result.pending[0].reason
    # Another service wanting the same port finds it taken everywhere now.
    again = plan(reqs("web", 2, ports=(80,)) + reqs("api", 1, ports=(80,)), nodes)
    assert len(again.pending) == 1 and again.pending[0].service == "api"


def test_spread_across_nodes_is_even() -> None:
    nodes = [node(f"n{i}", cpu=64, mem=65536) for i in range(7)]
    result = plan(reqs("web", 30), nodes)
    counts = where(result)
    assert len(counts) == 7
    assert max(counts.values()) - min(counts.values()) <= 1


def test_spread_across_zones_is_even() -> None:
    nodes = [node(f"a{i}", cpu=64, mem=65536, zone="a") for i in range(5)]
    nodes += [node("b0", cpu=64, mem=65536, zone="b")]
    nodes += [node(f"c{i}", cpu=64, mem=65536, zone="c") for i in range(2)]
    result = plan(reqs("web", 20, spread="zone"), nodes)
    zone = Counter(p.node[0] for p in result.placements)
    assert max(zone.values()) - min(zone.values()) <= 1
    # Within a zone replicas still spread across its nodes.
    per_node = Counter(p.node for p in result.placements if p.node.startswith("a"))
    assert max(per_node.values()) - min(per_node.values()) <= 1


def test_existing_replicas_count_for_spread() -> None:
    nodes = [node("a"), node("b"), node("c")]
    result = plan(reqs("web", 2), nodes, existing={"web": Counter({"a": 2, "b": 2, "gone": 5})})
    assert where(result) == Counter({"c": 2})


def test_spread_prefers_emptier_nodes_across_services() -> None:
    nodes = [node("a", used=Resources(3, 3000)), node("b")]
    result = plan(reqs("web", 1), nodes)
    assert result.placements[0].node == "b"


def test_recent_failures_are_avoided() -> None:
    nodes = [node("a"), node("b", failures=3), node("c")]
    result = plan(reqs("web", 2), nodes)
    assert set(where(result)) == {"a", "c"}
    # The failing node still takes work once the others have more of the service.
    result = plan(reqs("web", 3), nodes)
    assert set(where(result)) == {"a", "b", "c"}


def test_binpack_packs() -> None:
    nodes = [node(f"n{i}", cpu=4, mem=4096) for i in range(4)]
    result = plan(reqs("web", 8, Resources(1, 1024)), nodes, strategy="binpack")
    assert sorted(where(result).values()) == [4, 4]
    spread = plan(reqs("web", 8, Resources(1, 1024)), nodes)
    assert sorted(where(spread).values()) == [2, 2, 2, 2]


def test_binpack_fills_the_fuller_node_first() -> None:
    nodes = [node("a", used=Resources(2, 2048)), node("b")]
    result = plan(
        reqs("web", 2, Resources(1, 1024)) + reqs("api", 1, Resources(1, 1024)),
        nodes,
        strategy="binpack",
    )
    assert where(result) == Counter({"a": 2, "b": 1})


def test_bad_strategy_and_duplicate_nodes() -> None:
    with pytest.raises(ValueError, match="strategy"):
        plan([], [], strategy="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="duplicate"):
        plan([], [node("a"), node("a")])


def test_deterministic_and_seeded() -> None:
    nodes = [node(f"n{i}") for i in range(20)]
    requests = reqs("web", 5) + reqs("api", 5)
    first = plan(requests, nodes, seed=7)
    assert plan(requests, nodes, seed=7) == first
    seeds = {tuple(p.node for p in plan(requests, nodes, seed=s).placements) for s in range(5)}
    assert len(seeds) > 1  # the seed moves ties, nothing else


def test_later_requests_see_earlier_ones() -> None:
    nodes = [node("a", cpu=1, mem=1024)]
    result = plan(reqs("web", 1, Resources(1, 512)) + reqs("api", 1, Resources(0.5, 128)), nodes)
    assert [p.service for p in result.placements] == ["web"]
    assert "cpu" in result.pending[0].reason


labels_st = st.fixed_dictionaries({}, optional={"zone": st.sampled_from("abc")})
node_st = st.builds(
    lambda i, cpu, mem, gpus, ucpu, umem, ports, fails, ready, labels: NodeInfo(
        f"n{i}",
        labels,
        Resources(cpu, mem, 1000, gpus),
        Resources(min(ucpu, cpu), min(umem, mem), 0, 0),
        frozenset(ports),
        fails,
        ready,
    ),
    st.integers(0, 10_000),
    st.sampled_from([0.5, 1, 2, 4]),
    st.sampled_from([256, 1024, 4096]),
    st.integers(0, 2),
    st.sampled_from([0, 0.25, 0.5]),
    st.sampled_from([0, 128, 512]),
    st.sets(st.sampled_from([80, 443]), max_size=1),
    st.integers(0, 2),
    st.booleans(),
    labels_st,
)
constraint_st = st.one_of(
    st.builds(
        Constraint, st.just("label.zone"), st.sampled_from(["==", "!="]), st.sampled_from("abc")
    ),
    st.builds(
        Constraint,
        st.just("label.zone"),
        st.just("in"),
        st.lists(st.sampled_from("abc"), min_size=1),
    ),
)
request_st = st.builds(
    lambda svc, n, cpu, mem, gpus, cons, spread, ports: reqs(
        svc, n, Resources(cpu, mem, 10, gpus), cons, spread, ports
    ),
    st.sampled_from(["web", "api", "db"]),
    st.integers(1, 6),
    st.sampled_from([0.1, 0.25, 0.5, 1]),
    st.sampled_from([64, 256, 1024]),
    st.integers(0, 1),
    st.lists(constraint_st, max_size=2),
    st.sampled_from(["node", "zone", None]),
    st.sampled_from([(), (80,), (8080,)]),
)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(node_st, max_size=8, unique_by=lambda n: n.name),
    st.lists(request_st, max_size=5),
    st.sampled_from(["spread", "binpack"]),
)
def test_never_overcommits_and_honours_constraints(nodes, groups, strategy) -> None:
    # Unique indices per service, as the leader numbers replicas.
    requests = [
        ReplicaRequest(r.service, k, r.resources, r.constraints, r.spread_key, r.ports)
        for k, r in enumerate(r for g in groups for r in g)
    ]
    result = plan(requests, nodes, strategy=strategy)
    assert len(result.placements) + len(result.pending) == len(requests)
    by_name = {n.name: n for n in nodes}
    by_key = {(r.service, r.index): r for r in requests}
    usage = {n.name: n.used for n in nodes}
    ports = {n.name: set(n.ports_used) for n in nodes}
    for p in result.placements:
        r = by_key[(p.service, p.index)]
        n = by_name[p.node]
        assert n.ready
        assert all(c.matches(n) for c in r.constraints)
        usage[p.node] = usage[p.node].add(r.resources)
        assert not ports[p.node] & set(r.ports)
        ports[p.node] |= set(r.ports)
    for name, used in usage.items():
        assert used.fits(by_name[name].allocatable), name
    for pend in result.pending:
        assert pend.reason.startswith("no node fits:")


def _h64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def reference_plan(
    requests: list[ReplicaRequest],
    nodes: list[NodeInfo],
    existing: dict[str, Counter[str]],
    strategy: str,
    seed: int,
) -> tuple[list[tuple[str, int, str]], list[tuple[str, int]]]:
    """The documented ranking, the slow way: every node checked for every replica."""

    def milli(r: Resources) -> list[int]:
        return [round(r.cpu * 1000), r.memory_mb, r.disk_mb, r.gpus]

    alloc = {n.name: milli(n.allocatable) for n in nodes}
    used = {n.name: milli(n.used) for n in nodes}
    ports = {n.name: set(n.ports_used) for n in nodes}
    counts: dict[str, Counter[str]] = {s: Counter(c) for s, c in existing.items()}
    placed: list[tuple[str, int, str]] = []
    pending: list[tuple[str, int]] = []

    def util(name: str) -> float:
        total, dims = 0.0, 0
        for d in (0, 1):
            if alloc[name][d] > 0:
                total += used[name][d] / alloc[name][d]
                dims += 1
        return total / dims if dims else 0.0

    for r in requests:
        need = milli(r.resources)
        label = None if strategy == "binpack" or r.spread_key in (None, "node") else r.spread_key
        mine = counts.setdefault(r.service, Counter())
        zones: Counter[str | None] = Counter()
        if label is not None:
            for n in nodes:
                zones[n.labels.get(label)] += mine[n.name]
        best = None
        for i, n in enumerate(nodes):
            if not n.ready or not all(c.matches(n) for c in r.constraints):
                continue
            if any(used[n.name][d] + need[d] > alloc[n.name][d] for d in range(4)):
                continue
            if ports[n.name] & set(r.ports):
                continue
            tie = _h64(f"{seed}\0{r.service}") ^ _h64(f"{seed}\0{n.name}")
            fails = max(0, n.recent_failures)
            if strategy == "binpack":
                key = (fails, -util(n.name), mine[n.name], tie, i)
            else:
                group = zones[n.labels.get(label)] if label is not None else 0
                key = (group, mine[n.name], fails, util(n.name), tie, i)
            if best is None or key < best[0]:
                best = (key, n.name)
        if best is None:
            pending.append((r.service, r.index))
            continue
        name = best[1]
        used[name] = [used[name][d] + need[d] for d in range(4)]
        ports[name] |= set(r.ports)
        mine[name] += 1
        placed.append((r.service, r.index, name))
    return placed, pending


existing_st = st.dictionaries(
    st.sampled_from(["web", "api"]),
    st.dictionaries(st.sampled_from([f"n{i}" for i in range(12)]), st.integers(-2, 3)).map(Counter),
    max_size=2,
)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(node_st, max_size=10, unique_by=lambda n: n.name),
    st.lists(request_st, max_size=6),
    st.sampled_from(["spread", "binpack"]),
    existing_st,
    st.randoms(use_true_random=False),
    st.sampled_from([0, 1, 3, None]),
)
def test_plan_matches_the_exhaustive_reference(
    nodes, groups, strategy, existing, rnd, resort
) -> None:
    # Interleaving keeps many classes alive at once; a tiny re-sort threshold
    # makes the shared spread order re-sort (and go stale) within the plan.
    requests = [
        ReplicaRequest(r.service, k, r.resources, r.constraints, r.spread_key, r.ports)
        for k, r in enumerate(r for g in groups for r in g)
    ]
    rnd.shuffle(requests)
    tight = (placement.RESORT_MIN, placement.RESORT_DIV) if resort is None else (resort, 10**9)
    with mock.patch.multiple(placement, RESORT_MIN=tight[0], RESORT_DIV=tight[1]):
        result = plan(requests, nodes, existing=existing, strategy=strategy, seed=3)
    placed, pending = reference_plan(requests, nodes, existing, strategy, seed=3)
    assert [(p.service, p.index, p.node) for p in result.placements] == placed
    assert [(p.service, p.index) for p in result.pending] == pending


def test_spread_order_resorts_and_stays_exact() -> None:
    # Many services over many equal nodes: the shared order re-sorts several
    # times and later classes start from a stale one.
    nodes = [node(f"n{i:02d}", cpu=64, mem=65536, zone="abc"[i % 3]) for i in range(40)]
    requests: list[ReplicaRequest] = []
    for s in range(30):
        requests += reqs(f"s{s}", 7, Resources(0.25 * (1 + s % 3), 128), spread=None)
        requests += reqs(f"z{s}", 5, Resources(0.5, 64 * (1 + s % 2)), spread="zone")
    with mock.patch.multiple(placement, RESORT_MIN=8, RESORT_DIV=10**9):
        result = plan(requests, nodes, seed=5)
    placed, pending = reference_plan(requests, nodes, {}, "spread", seed=5)
    assert [(p.service, p.index, p.node) for p in result.placements] == placed
    assert not pending and not result.pending


def test_bigger_demand_after_exhaustion_is_pending_with_a_fresh_reason() -> None:
    nodes = [node("a"), node("b"), node("c", gpus=1)]
    one_gpu = Resources(0.5, 256, gpus=1)
    bigger = Resources(1, 512, gpus=1)
    head = reqs("train", 2, one_gpu) + reqs("web", 2, Resources(2, 1024))
    result = plan([*head, *reqs("infer", 1, bigger)], nodes)
    assert [p.service for p in result.pending] == ["train", "infer"]
    # The same reason as when "infer" is found to fit nowhere the long way.
    alone = plan([head[0], *head[2:], *reqs("infer", 1, bigger)], nodes)
    assert result.pending[1].reason == alone.pending[0].reason
    assert "3 nodes lack gpus (need 1 GPUs, most free 0 GPUs)" in alone.pending[0].reason


def test_exhaustion_only_rules_out_demands_that_are_no_smaller() -> None:
    nodes = [node("a", ports=frozenset({80})), node("b", ports=frozenset({80}), zone="x")]
    requests = (
        reqs("big", 1, Resources(3, 256), ports=(80,))  # no port 80 anywhere: exhausted
        + reqs("tls", 1, Resources(1, 256), ports=(443,))  # other port: fits
        + reqs("both", 1, Resources(3, 256), ports=(80, 443))  # superset: exhausted
        + reqs("cpu", 1, Resources(1, 256))  # smaller demand, no ports: fits
        + reqs("zoned", 1, Resources(3, 256), [Constraint("label.zone", "==", "x")], ports=(8,))
    )
    result = plan(requests, nodes)
    assert [p.service for p in result.placements] == ["tls", "cpu", "zoned"]
    assert [p.service for p in result.pending] == ["big", "both"]
    assert "2 nodes have host port 80, 443 in use" in result.pending[1].reason


def test_negative_existing_counts_still_rank_first() -> None:
    # Below zero is odd input, but ranked as given: such nodes come first.
    nodes = [node(f"n{i}", zone="ab"[i % 2]) for i in range(6)]
    existing = {"web": Counter({"n4": -1, "n3": -2})}
    result = plan(reqs("web", 3), nodes, existing=existing)
    assert [p.node for p in result.placements] == ["n3", "n4", "n3"]
    zoned = plan(reqs("web", 2, spread="zone"), nodes, existing=existing)
    assert [p.node for p in zoned.placements] == ["n3", "n4"]


def test_classes_key_by_value_not_identity() -> None:
    nodes = [node(f"n{i}") for i in range(6)]
    con = [Constraint("label.zone", "!=", "q")]
    shared = [ReplicaRequest("web", i, SMALL, con) for i in range(4)]
    copies = [
        ReplicaRequest("web", i, Resources(0.5, 256), [Constraint("label.zone", "!=", "q")])
        for i in range(4)
    ]
    # The same objects under another service are another class.
    other = [ReplicaRequest("api", i, SMALL, con) for i in range(4)]
    assert plan(shared + other, nodes).placements == plan(copies + other, nodes).placements
    assert len(where(plan(shared, nodes))) == 4


def test_pending_reason_charges_each_node_once_in_filter_order() -> None:
    nodes = [
        node("down", ready=False),
        node("x1", zone="x"),
        node("tiny", cpu=0.25, mem=64),  # lacks cpu and memory: counted in both
        node("full", ports=frozenset({80}), used=Resources(3.9, 0)),  # lacks cpu only
        node("busy", ports=frozenset({80})),
        node("busy2", ports=frozenset({80}), mem=128),  # short of memory: not a port case
    ]
    cons = [Constraint("label.zone", "!=", "x"), Constraint("node.name", "!=", "x1")]
    result = plan(reqs("web", 1, Resources(0.5, 256), cons, ports=(80,)), nodes)
    assert result.pending[0].reason == (
        "no node fits: 1 node not ready, "
        "2 nodes lack cpu (need 0.5 cores, most free 0.25 cores), "
        "2 nodes lack memory (need 256 MiB, most free 128 MiB), "
        "1 node have host port 80 in use, "
        "1 excluded by constraint label.zone != x"
    )


def test_benchmark_script_prints_json() -> None:
    script = Path(__file__).resolve().parent.parent / "scripts/bench/placement.py"
    args = ["--nodes", "60", "--replicas", "600", "--services", "12", "--json"]
    out = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["placed"] + figures["pending"] == 600
    assert figures["placements_per_s"] > 0 and figures["wall_s"] >= 0
