"""The placement planner: which node runs each replica.

Modelled on Nomad's scheduler: placement is a chain of feasibility filters
(ready, constraints, resources fit, host ports free) followed by rankers
(spread across the spread key, avoid nodes with recent failures, prefer
emptier nodes or, with ``strategy="binpack"``, fuller ones). Everything here
is pure: no IO, and the same inputs (and seed) give the same plan.

Why it is fast: a naive plan scans every node for every replica
(5,000 x 100,000 = 5e8 checks). Instead requests are grouped into *classes*
(same service, resources, constraints, spread key and ports). Each class
keeps a heap of its feasible nodes keyed by rank, checked lazily. Within one
plan usage only grows, so a node that lacks resources or ports for a class
can never fit it again and leaves that class for good, and under spread a
stale heap key can only be better than the truth; popping re-checks the key
and pushes the node back when it went stale. Placement is therefore exact
(always the best-ranked feasible node), never approximate, and a replica is
never put on an infeasible node: every pick is re-checked against the live
working usage before it is taken.

Under spread a class does not rank every node up front. All classes share
one order of the ready nodes by (failures, utilisation) as of some moment;
utilisation only grows, so a node's place in it bounds its spread key from
below for every service, and a class pulls nodes into its heap only while
the next one in the order could still beat the heap's top. A class placing
k replicas thus touches about k nodes plus those filled since the order was
sorted, and the order is re-sorted (cheaply: it is nearly sorted still) after
every ready/16 placements. Under binpack keys improve as nodes fill, so a
class ranks all its feasible nodes when created and, before each pick,
re-keys the nodes that changed since its last one.

Cost: a spread plan placing R replicas over N nodes costs about R*log N heap
work, R*16/N sorts of N, and per class its replicas plus up to N/16 stale
nodes; a binpack plan costs a pass over the nodes per class on top of the
heap work. A class that runs out of nodes stays out (usage only grows), and
so does a later class with the same constraints asking for at least as much
of every resource and at least the same host ports; the reason is computed
once per class and later requests of the class are pending at once.

Figures (``scripts/bench/placement.py``, 5,000 nodes, 100,000 replicas, one
core, median of 3 on a shared machine, 2026-11-27): spread ~57,500
placements/s with 200 services and ~43,200/s with 1,000 (ranking every
feasible node per class: ~34,800 and ~14,700); binpack ~41,600/s.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Literal

Strategy = Literal["spread", "binpack"]
OPS = ("==", "!=", "in")
# Re-sort the spread order after max(RESORT_MIN, ready nodes // RESORT_DIV) placements.
RESORT_MIN = 64
RESORT_DIV = 16


@dataclass(slots=True, frozen=True)
class Resources:
    """A bundle of capacity. CPU in cores; memory and disk in MiB."""

    cpu: float = 0.0
    memory_mb: int = 0
    disk_mb: int = 0
    gpus: int = 0

    def add(self, other: Resources) -> Resources:
        return Resources(
            self.cpu + other.cpu,
            self.memory_mb + other.memory_mb,
            self.disk_mb + other.disk_mb,
            self.gpus + other.gpus,
        )

    def sub(self, other: Resources) -> Resources:
        return Resources(
            self.cpu - other.cpu,
            self.memory_mb - other.memory_mb,
            self.disk_mb - other.disk_mb,
            self.gpus - other.gpus,
        )

    def fits(self, free: Resources) -> bool:
        """True when this demand fits within ``free``.

        CPU is compared in millicores so that 0.1 + 0.2 fits in 0.3.
        """
        return (
            _milli(self.cpu) <= _milli(free.cpu)
            and self.memory_mb <= free.memory_mb
            and self.disk_mb <= free.disk_mb
            and self.gpus <= free.gpus
        )


def _milli(cores: float) -> int:
    return round(cores * 1000)


@dataclass(slots=True, frozen=True)
class Constraint:
    """``attr op value`` on a node: attr is ``node.name`` or ``label.<key>``.

    A node lacking the label fails ``==`` and ``in`` and passes ``!=``.
    """

    attr: str
    op: str
    value: Any

    def __post_init__(self) -> None:
        if self.attr != "node.name" and not (
            self.attr.startswith("label.") and len(self.attr) > len("label.")
        ):
            raise ValueError(f"constraint attr must be node.name or label.<key>, not {self.attr!r}")
        if self.op not in OPS:
            raise ValueError(f"constraint op must be one of {', '.join(OPS)}, not {self.op!r}")
        if self.op == "in":
            if isinstance(self.value, str | bytes) or not isinstance(
                self.value, list | tuple | set | frozenset
            ):
                raise ValueError(f"constraint {self.attr} in needs a list of values")
            # Sorted tuple: hashable and order-free, so equal constraints group together.
            object.__setattr__(self, "value", tuple(sorted(str(v) for v in self.value)))
        elif not isinstance(self.value, str):
            object.__setattr__(self, "value", str(self.value))

    def matches(self, node: NodeInfo) -> bool:
        got = node.name if self.attr == "node.name" else node.labels.get(self.attr[6:])
        if self.op == "==":
            return got == self.value
        if self.op == "!=":
            return got != self.value
        return got in self.value

    def __str__(self) -> str:
        if self.op == "in":
            return f"{self.attr} in [{', '.join(self.value)}]"
        return f"{self.attr} {self.op} {self.value}"


@dataclass(slots=True)
class NodeInfo:
    name: str
    labels: dict[str, str]
    allocatable: Resources
    used: Resources
    ports_used: frozenset[int] = frozenset()
    recent_failures: int = 0
    ready: bool = True


@dataclass(slots=True)
class ReplicaRequest:
    """One replica to place. ``spread_key`` is "node" or a label key such as "zone"."""

    service: str
    index: int
    resources: Resources
    constraints: list[Constraint] = field(default_factory=list)
    spread_key: str | None = "node"
    ports: tuple[int, ...] = ()


@dataclass(slots=True, frozen=True)
class Placement:
    service: str
    index: int
    node: str


@dataclass(slots=True, frozen=True)
class Pending:
    service: str
    index: int
    reason: str


@dataclass(slots=True)
class PlanResult:
    placements: list[Placement]
    pending: list[Pending]


class _Cluster:
    """Working copy of node usage as flat per-dimension integer arrays (fast, and exact)."""

    __slots__ = ("alloc", "bound", "fail", "free", "log", "nodes", "ports", "ready", "utils")

    def __init__(self, nodes: Sequence[NodeInfo]) -> None:
        self.nodes = list(nodes)
        seen: set[str] = set()
        for n in self.nodes:
            if n.name in seen:
                raise ValueError(f"duplicate node name {n.name!r}")
            seen.add(n.name)
        alloc = [_vec(n.allocatable) for n in self.nodes]
        used = [_vec(n.used) for n in self.nodes]
        # alloc[d][i] and free[d][i]: dimension d (cpu, memory, disk, gpus) of node i.
        self.alloc = tuple([a[d] for a in alloc] for d in range(4))
        self.free = tuple([a[d] - u[d] for a, u in zip(alloc, used, strict=True)] for d in range(4))
        self.ports: list[set[int] | frozenset[int]] = [n.ports_used for n in self.nodes]
        self.fail = [max(0, n.recent_failures) for n in self.nodes]
        self.log: list[int] = []  # node indices in placement order
        self.utils = [self.util(i) for i in range(len(self.nodes))]
        self.ready = [i for i, n in enumerate(self.nodes) if n.ready]
        # Per node, a lower bound on its spread key for any service: see _Order.
        self.bound = [(0, self.fail[i], self.utils[i], -1, i) for i in range(len(self.nodes))]

    def util(self, i: int) -> float:
        """Mean used fraction of cpu and memory: the emptier/fuller ranker input."""
        total, dims = 0.0, 0
        a = self.alloc[0][i]
        if a > 0:
            total += (a - self.free[0][i]) / a
            dims += 1
        a = self.alloc[1][i]
        if a > 0:
            total += (a - self.free[1][i]) / a
            dims += 1
        return total / dims if dims else 0.0

    def take(self, i: int, need: tuple[int, int, int, int], ports: tuple[int, ...]) -> None:
        f0, f1, f2, f3 = self.free
        f0[i] -= need[0]
        f1[i] -= need[1]
        f2[i] -= need[2]
        f3[i] -= need[3]
        if ports:
            self.ports[i] = set(self.ports[i]) | set(ports)
        u = self.utils[i] = self.util(i)
        self.bound[i] = (0, self.fail[i], u, -1, i)
        self.log.append(i)

    def fits(self, i: int, need: tuple[int, int, int, int], ports: tuple[int, ...]) -> bool:
        f = self.free
        if need[0] > f[0][i] or need[1] > f[1][i] or need[2] > f[2][i] or need[3] > f[3][i]:
            return False
        return not (ports and any(p in self.ports[i] for p in ports))


def _vec(r: Resources) -> tuple[int, int, int, int]:
    return (_milli(r.cpu), r.memory_mb, r.disk_mb, r.gpus)


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class _Order:
    """Ready nodes sorted by (failures, utilisation) as they stood at one moment.

    ``bound[node]`` is ``(0, failures, utilisation, -1, node)`` from that
    moment. Utilisation only grows within a plan, so it is a lower bound on
    the node's spread key ``(replicas, failures, utilisation, hash, node)``
    from then on, for every service (replica counts and hashes are never
    negative): a class walks this order and stops once the next node's bound
    is above its best known key. Shared by every spread class created while
    it is fresh.
    """

    __slots__ = ("at", "bound", "hints", "levels", "order", "parts", "utils")

    def __init__(self, cluster: _Cluster, prev: _Order | None = None) -> None:
        self.utils = cluster.utils
        if prev is None:
            by_fail: dict[int, list[int]] = {}
            for i in cluster.ready:
                by_fail.setdefault(cluster.fail[i], []).append(i)
            levels = [by_fail[f] for f in sorted(by_fail)]
            self.hints: dict[str, dict[str | None, list[list[int]]]] = {}
        else:
            levels = prev.levels
            self.hints = prev.hints | {label: got[0] for label, got in prev.parts.items()}
        # Failures never change, so sort each failure level by utilisation alone
        # (a float key: fast), starting from the last order, which is nearly
        # sorted still: only nodes placed on since have moved.
        self.levels = [sorted(level, key=self.utils.__getitem__) for level in levels]
        self.order = _flat(self.levels)
        self.bound = cluster.bound[:]  # the tuples are immutable: a copy is a snapshot
        self.at = len(cluster.log)
        self.parts: dict[
            str, tuple[dict[str | None, list[list[int]]], dict[str | None, list[int]]]
        ] = {}

    def part(self, label: str, values: list[str | None]) -> dict[str | None, list[int]]:
        """The order split by a label (``values[node]``), to spread across it.

        Sorted later than the bounds were taken, which only makes them looser.
        """
        got = self.parts.get(label)
        if got is None:
            hint = self.hints.get(label)
            if hint is None:
                split: dict[str | None, list[list[int]]] = {}
                for k, level in enumerate(self.levels):
                    for i in level:
                        g = values[i]
                        lv = split.get(g)
                        if lv is None:
                            lv = split[g] = [[] for _ in self.levels]
                        lv[k].append(i)
            else:
                util = self.utils.__getitem__
                split = {g: [sorted(lv, key=util) for lv in lvs] for g, lvs in hint.items()}
            got = self.parts[label] = (split, {g: _flat(lvs) for g, lvs in split.items()})
        return got[1]


def _flat(levels: list[list[int]]) -> list[int]:
    return levels[0] if len(levels) == 1 else list(chain.from_iterable(levels))


class _Group:
    """One spread group of a class: a heap of ranked nodes, fed from an order."""

    __slots__ = ("heap", "label", "order", "pos")

    def __init__(self, label: str | None, heap: list[tuple], order: list[int]) -> None:
        self.label = label
        self.heap = heap
        self.order = order
        self.pos = 0


class _Class:
    """Requests that are interchangeable for placement share one ranked index.

    Under spread the index is lazy: nodes enter the heap from a shared order
    only when they could beat its top. Under binpack every feasible node is
    ranked up front.
    """

    __slots__ = (
        "binpack",
        "bound",
        "cluster",
        "counts",
        "groups",
        "live",
        "log_pos",
        "mask",
        "need",
        "node_hash",
        "ports",
        "service_hash",
        "single",
        "zone_counts",
    )

    def __init__(
        self,
        need: tuple[int, int, int, int],
        ports: tuple[int, ...],
        cluster: _Cluster,
        counts: list[int],
        zone_counts: Counter[str | None],
        node_hash: list[int],
        service_hash: int,
        feasible: tuple[list[int], bytearray],
        order: _Order | None,
        parts: Mapping[str | None, list[int]],
        early: Sequence[tuple[str | None, int]] = (),
    ) -> None:
        self.cluster = cluster
        self.need = need
        self.ports = ports
        self.counts = counts
        self.zone_counts = zone_counts
        # Rendezvous tie-break: XOR with the service's hash reorders nodes per service.
        self.node_hash = node_hash
        self.service_hash = service_hash
        self.mask = feasible[1]
        self.live: dict[int, tuple] = {}  # node -> its current heap entry
        self.log_pos = len(cluster.log)
        self.binpack = order is None
        self.bound: list[tuple] = [] if order is None else order.bound
        if order is None:
            # Binpack keys improve as nodes fill, so no earlier order bounds them:
            # rank every feasible node up front (and re-key changed ones in _refresh).
            fail, utils, sh = cluster.fail, cluster.utils, service_hash
            entries = [(fail[i], -utils[i], counts[i], sh ^ node_hash[i], i) for i in feasible[0]]
            self.live = {e[4]: e for e in entries}
            heapq.heapify(entries)
            self.groups = [_Group(None, entries, [])]
        else:
            self.groups = [_Group(g, [], sub) for g, sub in parts.items()]
            # The order bounds keys from below only for replica counts of at
            # least zero: rank nodes with a negative count up front.
            by_label = {g.label: g for g in self.groups}
            for label, i in early:
                grp = by_label.get(label)
                if grp is not None and self.mask[i] and cluster.fits(i, need, ports):
                    k = self.live[i] = self.key(i)
                    heapq.heappush(grp.heap, k)
        self.single = self.groups[0] if len(self.groups) == 1 else None

    def key(self, i: int) -> tuple:
        c = self.cluster
        h = self.service_hash ^ self.node_hash[i]
        if self.binpack:
            return (c.fail[i], -c.utils[i], self.counts[i], h, i)
        return (self.counts[i], c.fail[i], c.utils[i], h, i)

    def _top(self, grp: _Group) -> tuple | None:
        """Best entry of a group that is current and feasible, or None.

        Heap keys are exact or optimistic (usage and replica counts only grow),
        and nodes not yet pulled from the order rank no better than the next
        bound, so the top is checked against the live usage and pulling stops
        once the next bound is above the top.
        """
        c = self.cluster
        f0, f1, f2, f3 = c.free
        n0, n1, n2, n3 = self.need
        ports, cports = self.ports, c.ports
        fail, utils, counts = c.fail, c.utils, self.counts
        nh, sh, binpack = self.node_hash, self.service_hash, self.binpack
        live, heap, mask = self.live, grp.heap, self.mask
        order, bound, pos = grp.order, self.bound, grp.pos
        end = len(order)
        while True:
            if pos < end:
                i = order[pos]
                if not heap or bound[i] <= heap[0]:
                    pos += 1
                    if (
                        mask[i]
                        and n0 <= f0[i]
                        and n1 <= f1[i]
                        and n2 <= f2[i]
                        and n3 <= f3[i]
                        and not (ports and any(p in cports[i] for p in ports))
                    ):
                        k = live[i] = (counts[i], fail[i], utils[i], sh ^ nh[i], i)
                        heapq.heappush(heap, k)
                    # Else it cannot take this class, now or later in this plan.
                    continue
            if not heap:
                grp.pos = pos
                return None
            k = heap[0]
            i = k[4]
            if live.get(i) is not k:  # superseded by a newer entry, or dropped
                heapq.heappop(heap)
                continue
            if (
                n0 > f0[i]
                or n1 > f1[i]
                or n2 > f2[i]
                or n3 > f3[i]
                or (ports and any(p in cports[i] for p in ports))
            ):
                # Usage only grows within a plan: this node can never fit this class again.
                heapq.heappop(heap)
                del live[i]
                continue
            if binpack:
                fresh = (fail[i], -utils[i], counts[i], sh ^ nh[i], i)
            else:
                fresh = (counts[i], fail[i], utils[i], sh ^ nh[i], i)
            if fresh != k:
                heapq.heapreplace(heap, fresh)
                live[i] = fresh
                continue
            grp.pos = pos
            return k

    def _refresh(self) -> None:
        """Binpack keys improve when other classes fill a node: re-key those nodes."""
        log = self.cluster.log
        if self.log_pos == len(log):
            return
        heap = self.groups[0].heap
        for i in set(log[self.log_pos :]):
            if i in self.live:
                k = self.key(i)
                if k != self.live[i]:
                    self.live[i] = k
                    heapq.heappush(heap, k)
        self.log_pos = len(log)

    def pick(self) -> int | None:
        if self.binpack:
            self._refresh()
        grp = self.single
        if grp is not None:
            top = self._top(grp)
            if top is None:
                return None
        else:
            best: tuple | None = None
            zc = self.zone_counts
            for g in self.groups:
                top = self._top(g)
                if top is None:
                    continue
                cand = (zc[g.label], top)
                if best is None or cand < best:
                    best, grp = cand, g
            if best is None or grp is None:
                return None
            top = best[1]
        i = top[4]
        self.cluster.take(i, self.need, self.ports)
        self.counts[i] += 1
        self.zone_counts[grp.label] += 1
        k = self.live[i] = self.key(i)
        heapq.heappush(grp.heap, k)
        return i


class _Static:
    """What depends only on constraints and readiness, computed once per plan."""

    __slots__ = ("cluster", "feasible_by", "screen_by")

    def __init__(self, cluster: _Cluster) -> None:
        self.cluster = cluster
        self.feasible_by: dict[tuple[Constraint, ...], tuple[list[int], bytearray]] = {}
        self.screen_by: dict[tuple[Constraint, ...], tuple[int, Counter[str], list[int]]] = {}

    def feasible(self, cons: tuple[Constraint, ...]) -> tuple[list[int], bytearray]:
        """Nodes passing the static filters (ready, constraints), as a list and a mask."""
        got = self.feasible_by.get(cons)
        if got is None:
            nodes = self.cluster.nodes
            ok = [i for i in self.cluster.ready if all(c.matches(nodes[i]) for c in cons)]
            mask = bytearray(len(nodes))
            for i in ok:
                mask[i] = 1
            got = self.feasible_by[cons] = (ok, mask)
        return got

    def screen(self, cons: tuple[Constraint, ...]) -> tuple[int, Counter[str], list[int]]:
        """The static stages of ``explain``: not ready, first failing constraint, passed.

        Keyed by the constraints in request order: a node is charged to the
        first one it fails.
        """
        got = self.screen_by.get(cons)
        if got is None:
            not_ready = 0
            by_constraint: Counter[str] = Counter()
            passed: list[int] = []
            for i, n in enumerate(self.cluster.nodes):
                if not n.ready:
                    not_ready += 1
                    continue
                failed = next((c for c in cons if not c.matches(n)), None)
                if failed is not None:
                    by_constraint[str(failed)] += 1
                    continue
                passed.append(i)
            got = self.screen_by[cons] = (not_ready, by_constraint, passed)
        return got


def _mib(n: int) -> str:
    return f"{n} MiB"


def explain(req: ReplicaRequest, cluster: _Cluster, static: _Static | None = None) -> str:
    """Why no node fits: counts per limiting filter, in filter order.

    A node is charged to the first filter stage that rejects it; within the
    resources stage it is counted once per dimension it lacks.
    """
    if not cluster.nodes:
        return "no node fits: the cluster has no nodes"
    need = _vec(req.resources)
    not_ready, by_constraint, passed = (static or _Static(cluster)).screen(tuple(req.constraints))
    lack = [0, 0, 0, 0]
    best_free: list[int | None] = [None, None, None, None]
    short: set[int] = set()
    for d in range(4):
        free, nd = cluster.free[d], need[d]
        lacking = [i for i in passed if nd > free[i]]
        if lacking:
            lack[d] = len(lacking)
            best_free[d] = max(free[i] for i in lacking)
            short.update(lacking)
    ports_busy = 0
    if req.ports:
        cports = cluster.ports
        ports_busy = sum(
            1 for i in passed if i not in short and any(p in cports[i] for p in req.ports)
        )
    parts: list[str] = []
    if not_ready:
        parts.append(f"{_nodes(not_ready)} not ready")
    names = ("cpu", "memory", "disk", "gpus")
    shows = (
        lambda v: f"{v / 1000:g} cores",
        _mib,
        _mib,
        lambda v: f"{v} GPUs",
    )
    for d in range(4):
        if lack[d]:
            most = max(0, best_free[d] or 0)
            parts.append(
                f"{_nodes(lack[d])} lack {names[d]} (need {shows[d](need[d])}, "
                f"most free {shows[d](most)})"
            )
    if ports_busy:
        ports = ", ".join(str(p) for p in req.ports)
        parts.append(f"{_nodes(ports_busy)} have host port {ports} in use")
    for text, count in sorted(by_constraint.items()):
        parts.append(f"{count} excluded by constraint {text}")
    return "no node fits: " + ", ".join(parts)


def _nodes(n: int) -> str:
    return f"{n} node" if n == 1 else f"{n} nodes"


def _dominates(
    need: tuple[int, int, int, int],
    ports: frozenset[int],
    dead: Iterable[tuple[tuple[int, int, int, int], frozenset[int]]],
) -> bool:
    """True when some exhausted demand asks no more than this one in every way.

    Usage and ports only grow within a plan, so a demand at least as big as
    one that fits nowhere (same constraints) fits nowhere either.
    """
    return any(
        need[0] >= d[0] and need[1] >= d[1] and need[2] >= d[2] and need[3] >= d[3] and p <= ports
        for d, p in dead
    )


def plan(
    requests: Sequence[ReplicaRequest],
    nodes: Sequence[NodeInfo],
    existing: Mapping[str, Counter[str]] | None = None,
    strategy: Strategy = "spread",
    seed: int = 0,
) -> PlanResult:
    """Place each request in order; later requests see earlier placements.

    ``existing`` maps a service to a Counter of node name -> replicas of it
    already running there (their usage is expected in ``NodeInfo.used``); it
    feeds the spread ranker. Rank, best first: under "spread", fewest replicas
    of the service in the node's spread-key group, then on the node, then
    fewest recent failures, then the emptiest node; under "binpack", fewest
    recent failures, then the fullest node, then fewest replicas on it. Ties
    fall to a rendezvous hash of (seed, service, node), so the plan is
    deterministic and different services prefer different nodes.
    """
    if strategy not in ("spread", "binpack"):
        raise ValueError(f"strategy must be spread or binpack, not {strategy!r}")
    cluster = _Cluster(nodes)
    static = _Static(cluster)
    names = [n.name for n in cluster.nodes]
    index = {name: i for i, name in enumerate(names)}
    node_hash = [_hash64(f"{seed}\0{name}") for name in names]
    binpack = strategy == "binpack"
    # The spread order goes stale as nodes fill, and a class walks the stale
    # part for nothing: re-sort once that would cost more than the sort.
    resort = max(RESORT_MIN, len(cluster.ready) // RESORT_DIV)
    order: _Order | None = None
    label_values: dict[str, list[str | None]] = {}

    counts: dict[str, list[int]] = {}
    negative: dict[str, list[int]] = {}  # per service, nodes with a count below zero
    zone_counts: dict[tuple[str, str | None], Counter[str | None]] = {}

    def service_counts(service: str) -> list[int]:
        got = counts.get(service)
        if got is None:
            got = [0] * len(cluster.nodes)
            seen: list[int] = []
            for name, k in (existing or {}).get(service, Counter()).items():
                i = index.get(name)
                if i is not None:
                    got[i] += k
                    seen.append(i)
            counts[service] = got
            negative[service] = [i for i in seen if got[i] < 0]
        return got

    def service_zones(service: str, label: str | None) -> Counter[str | None]:
        got = zone_counts.get((service, label))
        if got is None:
            got = Counter()
            if label is not None:
                per_node = service_counts(service)
                for i, k in enumerate(per_node):
                    if k:
                        got[cluster.nodes[i].labels.get(label)] += k
            zone_counts[(service, label)] = got
        return got

    def class_key(r: ReplicaRequest) -> tuple:
        spread = None if binpack or r.spread_key in (None, "node") else r.spread_key
        cons = r.constraints
        cons_key = tuple(cons) if len(cons) < 2 else tuple(sorted(cons, key=str))
        return (r.service, r.resources, cons_key, spread, tuple(r.ports))

    # Number the classes once. Requests of one service usually share their
    # resources, constraints and ports objects, so a key on their identities
    # (alive for the whole plan) skips most of the by-value keying.
    ids: dict[tuple, int] = {}
    by_identity: dict[tuple, int] = {}
    cids: list[int] = []
    for r in requests:
        alias = (r.service, r.spread_key, id(r.resources), id(r.constraints), id(r.ports))
        cid = by_identity.get(alias)
        if cid is None:
            cid = by_identity[alias] = ids.setdefault(class_key(r), len(ids))
        cids.append(cid)
    class_keys = list(ids)
    remaining = [0] * len(class_keys)
    for cid in cids:
        remaining[cid] += 1
    classes: list[_Class | None] = [None] * len(class_keys)
    exhausted: list[str | None] = [None] * len(class_keys)
    # Per constraints: demands (need, ports) that fit nowhere any more.
    dead: dict[tuple[Constraint, ...], list[tuple[tuple[int, int, int, int], frozenset[int]]]] = {}
    placements: list[Placement] = []
    pending: list[Pending] = []
    for req, cid in zip(requests, cids, strict=True):
        remaining[cid] -= 1
        reason = exhausted[cid]
        if reason is not None:
            pending.append(Pending(req.service, req.index, reason))
            continue
        cls = classes[cid]
        if cls is None:
            _, _, cons, label, ports = class_keys[cid]
            need = _vec(req.resources)
            if _dominates(need, frozenset(ports), dead.get(cons, ())):
                reason = exhausted[cid] = explain(req, cluster, static)
                pending.append(Pending(req.service, req.index, reason))
                continue
            per_node = service_counts(req.service)
            parts: Mapping[str | None, list[int]] = {}
            early: list[tuple[str | None, int]] = []
            if not binpack:
                if order is None or len(cluster.log) - order.at > resort:
                    order = _Order(cluster, order)
                values: list[str | None] | None = None
                if label is None:
                    parts = {None: order.order}
                else:
                    values = label_values.get(label)
                    if values is None:
                        values = label_values[label] = [n.labels.get(label) for n in cluster.nodes]
                    parts = order.part(label, values)
                for i in negative[req.service]:
                    if per_node[i] < 0:
                        early.append((None if values is None else values[i], i))
            cls = classes[cid] = _Class(
                need,
                ports,
                cluster,
                per_node,
                service_zones(req.service, label),
                node_hash,
                _hash64(f"{seed}\0{req.service}"),
                static.feasible(cons),
                None if binpack else order,
                parts,
                early,
            )
        i = cls.pick()
        if i is None:
            reason = exhausted[cid] = explain(req, cluster, static)
            classes[cid] = None
            pending.append(Pending(req.service, req.index, reason))
            dead.setdefault(class_keys[cid][2], []).append((cls.need, frozenset(cls.ports)))
            continue
        placements.append(Placement(req.service, req.index, names[i]))
        if not remaining[cid]:
            classes[cid] = None  # free its index: no more requests of this class
    return PlanResult(placements, pending)
