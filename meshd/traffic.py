"""Traffic on this node: the route table, the routing mesh and the DNS server wired up.

The agent builds one ``Traffic`` after ``Workloads``. It decides the
addresses the mesh and the DNS listen on (the advertise address, loopback,
and the address replicas reach the host by, which the runtime knows), and
hands the node controller what new replicas need to find services: the DNS
server as resolver with ``mesh`` as search domain, and ``WEB_SERVICE_HOST``
style variables.
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Any

from gossip import State
from meshd.dns import DOMAIN, DnsServer
from meshd.facts import decode_meta
from meshd.proxy.endpoints import Route
from meshd.proxy.mesh import RoutingMesh
from meshd.proxy.routes import RouteTable
from meshd.runtime.base import Driver, DriverError
from meshd.runtime.node import NodeController

__all__ = ["Traffic", "service_env"]

log = logging.getLogger(__name__)

CONTAINER_DNS_PORT = 53
"""A container's resolv.conf cannot name a port."""

Addr = tuple[str, int]


class TrafficStartError(Exception):
    """A listener the operator asked for cannot be opened; one line."""


def _env_word(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def service_env(routes: dict[str, Route], host: str) -> dict[str, str]:
    """Kubernetes-style variables for every service with a service port.

    ``WEB_SERVICE_HOST`` / ``WEB_SERVICE_PORT`` (its first service port) and
    ``WEB_SERVICE_PORT_<NAME>`` for each named one. Set when a replica starts,
    so they describe the services that existed then; DNS names stay current.
    """
    env: dict[str, str] = {}
    for name in sorted(routes):
        served = [p for p in routes[name].ports if p.service_port is not None]
        if not served:
            continue
        word = _env_word(name)
        env[f"{word}_SERVICE_HOST"] = host
        env[f"{word}_SERVICE_PORT"] = str(served[0].service_port)
        for p in served:
            env[f"{word}_SERVICE_PORT_{_env_word(p.name)}"] = str(p.service_port)
    return env


class Traffic:
    def __init__(
        self,
        *,
        node: str,
        gossip: Any,
        store: Any,
        driver: Driver,
        controller: NodeController,
        advertise: str,
        proxy_addresses: tuple[str, ...] | None,
        dns: Addr | None,
        dns_upstreams: tuple[Addr, ...] | None,
    ) -> None:
        self.node = node
        self.gossip = gossip
        self.driver = driver
        self.controller = controller
        self.advertise = advertise
        self.proxy_addresses = proxy_addresses
        self.dns_addr = dns
        self.dns_upstreams = dns_upstreams
        self.host_address: str | None = None
        self._weights: dict[bytes, int] = {}
        self.routes = RouteTable(store, reachable=self.reachable, weight=self.weight)
        self.mesh: RoutingMesh | None = None
        self.dns: DnsServer | None = None

    async def start(self) -> None:
        with contextlib.suppress(DriverError):
            self.host_address = await self.driver.host_address()
        addresses = list(self.proxy_addresses or ())
        if self.proxy_addresses is None:
            addresses = [self.advertise, "127.0.0.1"]
            if self.host_address:
                addresses.append(self.host_address)
            if self.dns_addr is not None:
                addresses.append(self.dns_addr[0])  # DNS answers its own address for web.mesh
        self.mesh = RoutingMesh(
            node=self.node,
            addresses=addresses,
            reachable=self.reachable,
            rtt=lambda other: self.gossip.core.estimate_rtt(self.node, other),
        )
        await self.mesh.start()
        self.routes.listen(self.mesh.on_routes)
        self.routes.start()
        await self._start_dns()
        host = self.host_address or "127.0.0.1"
        self.controller.service_env = lambda: service_env(self.routes.routes, host)

    async def _start_dns(self) -> None:
        if self.dns_addr is None:
            return
        binds = [self.dns_addr]
        for_containers = self.host_address is not None and (
            self.host_address,
            CONTAINER_DNS_PORT,
        ) != tuple(self.dns_addr)
        if for_containers:
            binds.append((self.host_address, CONTAINER_DNS_PORT))  # type: ignore[arg-type]
        self.dns = DnsServer(self, binds, upstreams=self._upstreams())
        try:
            await self.dns.start()
        except OSError as exc:
            if not for_containers:
                raise TrafficStartError(
                    f"--dns {self.dns_addr[0]}:{self.dns_addr[1]}: {exc}"
                ) from None
            # The container listener needs port 53 (root); the host one matters more.
            log.warning("containers get no mesh DNS: %s", exc)
            self.dns = DnsServer(self, [self.dns_addr], upstreams=self._upstreams())
            try:
                await self.dns.start()
            except OSError as exc2:
                raise TrafficStartError(
                    f"--dns {self.dns_addr[0]}:{self.dns_addr[1]}: {exc2}"
                ) from None
            return
        if for_containers:
            self.controller.dns = (self.host_address,)  # type: ignore[assignment]
            self.controller.dns_search = (DOMAIN.to_text(omit_final_dot=True),)

    def _upstreams(self) -> list[Addr] | None:
        return None if self.dns_upstreams is None else list(self.dns_upstreams)

    async def stop(self) -> None:
        self.routes.stop()
        if self.dns is not None:
            with contextlib.suppress(Exception):
                await self.dns.stop()
        if self.mesh is not None:
            await self.mesh.stop()

    def on_members_changed(self) -> None:
        self.routes.mark_dirty()

    # -- views the route table and the DNS server use

    def reachable(self, node: str) -> bool:
        if node == self.node:
            return True
        m = self.gossip.core.member(node)
        return m is not None and m.state in (State.ALIVE, State.SUSPECT)

    def weight(self, node: str) -> int:
        """A node's share under the ``weighted`` policy: its CPU count."""
        m = self.gossip.core.member(node)
        if m is None:
            return 1
        w = self._weights.get(m.meta)
        if w is None:
            facts = decode_meta(m.meta)
            w = max(1, int(facts.cpu_cores)) if facts is not None else 1
            if len(self._weights) > 4096:
                self._weights.clear()
            self._weights[m.meta] = w
        return w

    def route(self, service: str) -> Route | None:
        return self.routes.get(service)

    def node_address(self, node: str) -> str | None:
        m = self.gossip.core.member(node)
        if m is None or m.state not in (State.ALIVE, State.SUSPECT):
            return None
        return m.addr[0]

    # -- answers

    def endpoints(self, service: str) -> dict[str, Any] | None:
        route = self.routes.get(service)
        if route is None:
            return None
        out = route.to_json()
        out["listeners"] = [
            lis for lis in (self.mesh.describe() if self.mesh else []) if lis["service"] == service
        ]
        out["routes_version"] = self.routes.version
        out["changed_ms"] = self.routes.changed_ms.get(service, 0)
        return out

    def stats(self) -> dict[str, Any]:
        return {
            "routes": dict(self.routes.stats),
            "mesh": dict(self.mesh.stats) if self.mesh else {},
            "listeners": self.mesh.describe() if self.mesh else [],
            "dns": dict(self.dns.stats) if self.dns else {},
        }
