"""The placement planner: which node runs each replica.

Modelled on Nomad's scheduler: placement is a chain of feasibility filters
(ready, constraints, resources fit, host ports free) followed by rankers
(spread across the spread key, avoid nodes with recent failures, prefer
emptier nodes or, with ``strategy="binpack"``, fuller ones). Everything here
is pure: no IO, and the same inputs (and seed) give the same plan.

Why it is fast: a naive plan scans every node for every replica
(5,000 x 100,000 = 5e8 checks). Instead requests are grouped into *classes*
(same service, resources, constraints, spread key and ports). Each class
keeps a lazily refreshed heap of its statically feasible nodes keyed by rank.
Within one plan usage only grows, so a node that lacks resources or ports for
a class can never fit it again and is dropped from that class for good, and a
stale heap key can only be better than the truth under the spread strategy;
popping re-checks the key and pushes the node back when it went stale. Under
binpack keys can also improve (a node gets fuller), so a class first
refreshes the nodes that changed since it last ran. Placement is therefore
exact (always the best-ranked feasible node), never approximate, and a
replica is never put on an infeasible node: every pick is re-checked
against the live working usage before it is taken.

Cost: building a class's heap is O(feasible nodes), paid once per class, and
each placement is O(log nodes) heap work. A plan with C classes over N nodes
costs about C*N + R*log N; it is fast while classes are much fewer than
replicas (services usually have many interchangeable replicas).
A class that runs out of nodes stays out (usage only grows), so its reason is
computed once and later requests of the class are pending at once.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Strategy = Literal["spread", "binpack"]
OPS = ("==", "!=", "in")


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
    """Working copy of node usage as flat integer arrays (fast, and exact)."""

    __slots__ = ("alloc", "fail", "log", "nodes", "ports", "ready", "used", "utils")

    def __init__(self, nodes: Sequence[NodeInfo]) -> None:
        self.nodes = list(nodes)
        seen: set[str] = set()
        for n in self.nodes:
            if n.name in seen:
                raise ValueError(f"duplicate node name {n.name!r}")
            seen.add(n.name)
        self.alloc = [_vec(n.allocatable) for n in self.nodes]
        self.used = [list(_vec(n.used)) for n in self.nodes]
        self.ports: list[set[int] | frozenset[int]] = [n.ports_used for n in self.nodes]
        self.fail = [max(0, n.recent_failures) for n in self.nodes]
        self.log: list[int] = []  # node indices in placement order (binpack refresh)
        self.utils = [self.util(i) for i in range(len(self.nodes))]
        self.ready = [i for i, n in enumerate(self.nodes) if n.ready]

    def util(self, i: int) -> float:
        """Mean used fraction of cpu and memory: the emptier/fuller ranker input."""
        a, u = self.alloc[i], self.used[i]
        total, dims = 0.0, 0
        for d in (0, 1):
            if a[d] > 0:
                total += u[d] / a[d]
                dims += 1
        return total / dims if dims else 0.0

    def fits(self, i: int, need: tuple[int, int, int, int], ports: tuple[int, ...]) -> bool:
        a, u = self.alloc[i], self.used[i]
        if (
            u[0] + need[0] > a[0]
            or u[1] + need[1] > a[1]
            or u[2] + need[2] > a[2]
            or u[3] + need[3] > a[3]
        ):
            return False
        if ports:
            used = self.ports[i]
            return not any(p in used for p in ports)
        return True

    def take(self, i: int, need: tuple[int, int, int, int], ports: tuple[int, ...]) -> None:
        u = self.used[i]
        for d in range(4):
            u[d] += need[d]
        if ports:
            self.ports[i] = set(self.ports[i]) | set(ports)
        self.utils[i] = self.util(i)
        self.log.append(i)


def _vec(r: Resources) -> tuple[int, int, int, int]:
    return (_milli(r.cpu), r.memory_mb, r.disk_mb, r.gpus)


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class _Class:
    """Requests that are interchangeable for placement share one ranked index."""

    __slots__ = (
        "binpack",
        "cluster",
        "counts",
        "groups",
        "heaps",
        "live",
        "log_pos",
        "need",
        "node_hash",
        "ports",
        "service",
        "spread_label",
        "static",
        "zone_counts",
    )

    def __init__(
        self,
        req: ReplicaRequest,
        cluster: _Cluster,
        counts: list[int],
        zone_counts: Counter[str | None],
        node_hash: list[int],
        service_hash: int,
        binpack: bool,
        static: list[int],
    ) -> None:
        self.cluster = cluster
        self.service = req.service
        self.need = _vec(req.resources)
        self.ports = tuple(req.ports)
        self.counts = counts
        self.zone_counts = zone_counts
        self.binpack = binpack
        key = req.spread_key
        self.spread_label = None if binpack or key in (None, "node") else key
        # Rendezvous tie-break: XOR with the service's hash reorders nodes per service.
        self.node_hash = [service_hash ^ h for h in node_hash]
        self.static = static
        self.live: dict[int, tuple] = {}
        self.groups: dict[int, str | None] = {}
        self.heaps: dict[str | None, list[tuple]] = {}
        label = self.spread_label
        if binpack:
            fail, utils, nh = cluster.fail, cluster.utils, self.node_hash
            entries = [(fail[i], -utils[i], counts[i], nh[i], i) for i in static]
        else:
            fail, utils, nh = cluster.fail, cluster.utils, self.node_hash
            entries = [(counts[i], fail[i], utils[i], nh[i], i) for i in static]
        # Entries are (rank..., node); live holds each node's current entry object.
        self.live = {e[4]: e for e in entries}
        if label is None:
            self.groups = dict.fromkeys(static)
            self.heaps[None] = entries
        else:
            nodes = cluster.nodes
            for e in entries:
                g = nodes[e[4]].labels.get(label)
                self.groups[e[4]] = g
                self.heaps.setdefault(g, []).append(e)
        for h in self.heaps.values():
            heapq.heapify(h)
        self.log_pos = len(cluster.log)

    def key(self, i: int) -> tuple:
        c = self.cluster
        if self.binpack:
            return (c.fail[i], -c.utils[i], self.counts[i], self.node_hash[i], i)
        return (self.counts[i], c.fail[i], c.utils[i], self.node_hash[i], i)

    def _peek(self, heap: list[tuple]) -> tuple | None:
        """Best entry of a group that is current and feasible, or None."""
        c = self.cluster
        live = self.live
        while heap:
            k = heap[0]
            i = k[4]
            if live.get(i) is not k:  # superseded by a newer entry, or dropped
                heapq.heappop(heap)
                continue
            if not c.fits(i, self.need, self.ports):
                # Usage only grows within a plan: this node can never fit this class again.
                heapq.heappop(heap)
                del live[i]
                continue
            fresh = self.key(i)
            if fresh != k:
                heapq.heapreplace(heap, fresh)
                live[i] = fresh
                continue
            return k
        return None

    def _refresh(self) -> None:
        """Binpack keys improve when other classes fill a node: re-key those nodes."""
        log = self.cluster.log
        if self.log_pos == len(log):
            return
        for i in set(log[self.log_pos :]):
            if i in self.live:
                k = self.key(i)
                if k != self.live[i]:
                    self.live[i] = k
                    heapq.heappush(self.heaps[self.groups[i]], k)
        self.log_pos = len(log)

    def pick(self) -> int | None:
        if self.binpack:
            self._refresh()
        best: tuple | None = None
        best_group: str | None = None
        zc = self.zone_counts
        for g, heap in self.heaps.items():
            top = self._peek(heap)
            if top is None:
                continue
            cand = (zc[g], top)
            if best is None or cand < best:
                best, best_group = cand, g
        if best is None:
            return None
        i = best[1][4]
        self.cluster.take(i, self.need, self.ports)
        self.counts[i] += 1
        zc[best_group] += 1
        k = self.key(i)
        self.live[i] = k
        heapq.heappush(self.heaps[best_group], k)
        return i


def _mib(n: int) -> str:
    return f"{n} MiB"


def explain(req: ReplicaRequest, cluster: _Cluster) -> str:
    """Why no node fits: counts per limiting filter, in filter order.

    A node is charged to the first filter stage that rejects it; within the
    resources stage it is counted once per dimension it lacks.
    """
    if not cluster.nodes:
        return "no node fits: the cluster has no nodes"
    need = _vec(req.resources)
    not_ready = 0
    by_constraint: Counter[str] = Counter()
    lack = [0, 0, 0, 0]
    best_free = [None, None, None, None]
    ports_busy = 0
    for i, n in enumerate(cluster.nodes):
        if not n.ready:
            not_ready += 1
            continue
        failed = next((c for c in req.constraints if not c.matches(n)), None)
        if failed is not None:
            by_constraint[str(failed)] += 1
            continue
        a, u = cluster.alloc[i], cluster.used[i]
        short = False
        for d in range(4):
            free = a[d] - u[d]
            if need[d] > free:
                lack[d] += 1
                short = True
                if best_free[d] is None or free > best_free[d]:
                    best_free[d] = free
        if short:
            continue
        if req.ports and any(p in cluster.ports[i] for p in req.ports):
            ports_busy += 1
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
    index = {n.name: i for i, n in enumerate(cluster.nodes)}
    node_hash = [_hash64(f"{seed}\0{n.name}") for n in cluster.nodes]
    binpack = strategy == "binpack"

    counts: dict[str, list[int]] = {}
    zone_counts: dict[tuple[str, str | None], Counter[str | None]] = {}

    def service_counts(service: str) -> list[int]:
        got = counts.get(service)
        if got is None:
            got = [0] * len(cluster.nodes)
            for name, k in (existing or {}).get(service, Counter()).items():
                i = index.get(name)
                if i is not None:
                    got[i] += k
            counts[service] = got
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

    static: dict[tuple[Constraint, ...], list[int]] = {}

    def feasible(cons: tuple[Constraint, ...]) -> list[int]:
        """Nodes passing the static filters (ready, constraints), shared by classes."""
        got = static.get(cons)
        if got is None:
            nodes = cluster.nodes
            got = [i for i in cluster.ready if all(c.matches(nodes[i]) for c in cons)]
            static[cons] = got
        return got

    keys = [class_key(r) for r in requests]
    remaining = Counter(keys)
    classes: dict[tuple, _Class] = {}
    exhausted: dict[tuple, str] = {}
    placements: list[Placement] = []
    pending: list[Pending] = []
    for req, ck in zip(requests, keys, strict=True):
        remaining[ck] -= 1
        if ck in exhausted:
            pending.append(Pending(req.service, req.index, exhausted[ck]))
            continue
        cls = classes.get(ck)
        if cls is None:
            cls = _Class(
                req,
                cluster,
                service_counts(req.service),
                service_zones(req.service, ck[3]),
                node_hash,
                _hash64(f"{seed}\0{req.service}"),
                binpack,
                feasible(ck[2]),
            )
            classes[ck] = cls
        i = cls.pick()
        if i is None:
            reason = explain(req, cluster)
            exhausted[ck] = reason
            del classes[ck]
            pending.append(Pending(req.service, req.index, reason))
            continue
        placements.append(Placement(req.service, req.index, cluster.nodes[i].name))
        if not remaining[ck]:
            del classes[ck]  # free its index: no more requests of this class
    return PlanResult(placements, pending)
