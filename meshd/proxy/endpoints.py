"""Where each service can be reached: routes built from the replicated store, pure.

A ``Route`` is what every proxy and DNS server in the mesh needs to know about
one service: its ports (with their ``service_port`` and protocol), its
balancing policy, and the replicas that may take traffic now. Replicas come
from the ``status/<node>/<service>`` entries each node writes about itself;
only ``ready`` ones on nodes that gossip does not report dead or gone count,
because a dead node cannot retract its own status.

``build_routes`` is a pure function of decoded specs, statuses and a liveness
predicate, so the watcher that feeds it (``meshd.proxy.routes``) stays thin.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from meshd.scheduler.assignment import ServiceStatus
from meshd.spec import Balance, Port, ServiceSpec

from .balancing import Endpoint

__all__ = ["Backend", "Route", "build_routes"]


@dataclass(frozen=True, slots=True)
class Backend:
    """One ready replica: ``ports`` maps the spec's port names to ports on ``address``."""

    id: str
    node: str
    address: str
    ports: Mapping[str, int] = field(default_factory=dict)
    weight: int = 1

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "node": self.node,
            "address": self.address,
            "ports": dict(self.ports),
            "weight": self.weight,
        }


@dataclass(frozen=True, slots=True)
class Route:
    """One service as the proxies and the DNS server see it."""

    service: str
    ports: tuple[Port, ...]
    balance: Balance
    backends: tuple[Backend, ...]
    """Sorted by id, so every node builds the same sequence from the same state."""

    def port(self, name: str) -> Port | None:
        return next((p for p in self.ports if p.name == name), None)

    def endpoints(self, port: str) -> tuple[Endpoint, ...]:
        """The replicas serving ``port``, as the balancing policies take them."""
        out = []
        for b in self.backends:
            number = b.ports.get(port)
            if number is not None and 0 < number < 65536:
                out.append(Endpoint(b.id, b.node, b.address, number, b.weight))
        return tuple(out)

    def to_json(self) -> dict[str, object]:
        return {
            "service": self.service,
            "balance": self.balance.to_dict(),
            "ports": [p.to_dict() for p in self.ports],
            "endpoints": [b.to_json() for b in self.backends],
        }


def build_routes(
    specs: Mapping[str, ServiceSpec],
    statuses: Iterable[ServiceStatus],
    reachable: Callable[[str], bool],
    weight: Callable[[str], int] = lambda node: 1,
) -> dict[str, Route]:
    """Routes of every service (jobs included: they may serve while they run).

    ``reachable(node)`` says whether a node's replicas may get traffic (gossip
    does not consider it dead or gone); ``weight(node)`` is the node's share
    for the ``weighted`` policy (its CPU count, by the agent's choice).
    """
    backends: dict[str, list[Backend]] = {name: [] for name in specs}
    seen: set[str] = set()
    for status in statuses:
        group = backends.get(status.service)
        if group is None or not reachable(status.node):
            continue
        w = max(1, int(weight(status.node)))
        for r in status.replicas:
            if not r.ready or not r.address or r.id in seen:
                continue
            seen.add(r.id)
            group.append(Backend(r.id, status.node, r.address, dict(r.ports), w))
    return {
        name: Route(
            service=name,
            ports=spec.ports,
            balance=spec.balance,
            backends=tuple(sorted(backends[name], key=lambda b: b.id)),
        )
        for name, spec in specs.items()
    }
