"""L4 forwarding: each accepted connection is joined to a replica chosen by the router.

Plain asyncio protocols on uvloop: bytes read from one side are written to
the other as they come, and each side's write buffer filling up pauses
reading on the other (so a slow reader never makes the proxy buffer without
bound). Half-closes pass through. A replica that refuses or does not answer
within the connect timeout is reported to the router and another one is
tried, so a client connecting while a host has just died still gets through.
(``scripts/bench/splice_probe.py`` measured a zero-copy ``os.splice`` path
against this one; see docs/benchmarks.md for why this one stayed.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from .balancing import Endpoint
from .router import Router

__all__ = ["TcpProxy", "connect_upstream"]

log = logging.getLogger(__name__)

CONNECT_TRIES = 3
"""Replicas tried per connection before giving up: a retry goes to another replica."""


def _tune(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def connect_upstream(
    router: Router,
    client: str,
    factory: Callable[[], asyncio.Protocol],
    *,
    timeout: float,
    hash_key: str | None = None,
    exclude: set[str] | None = None,
    stats: dict[str, int] | None = None,
) -> tuple[Endpoint, asyncio.Transport, Any, float] | None:
    """Connect to a replica, trying others on failure; (endpoint, transport, protocol, connect s)."""
    loop = asyncio.get_running_loop()
    tried = exclude if exclude is not None else set()
    for _ in range(CONNECT_TRIES):
        ep = router.pick(client, hash_key, tried)
        if ep is None:
            return None
        tried.add(ep.id)
        started = time.monotonic()
        router.begin(ep)
        try:
            async with asyncio.timeout(timeout):
                transport, protocol = await loop.create_connection(factory, ep.address, ep.port)
        except (OSError, TimeoutError) as exc:
            router.end(ep, time.monotonic() - started, False)
            if stats is not None:
                stats["connect_failures"] = stats.get("connect_failures", 0) + 1
            log.debug("connect to %s (%s:%d) failed: %r", ep.id, ep.address, ep.port, exc)
            continue
        return ep, transport, protocol, time.monotonic() - started
    return None


class _Upstream(asyncio.Protocol):
    __slots__ = ("client", "transport")

    def __init__(self, client: _Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _tune(transport)

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)

    def eof_received(self) -> bool:
        t = self.client.transport
        if t.can_write_eof() and not t.is_closing():
            t.write_eof()
        return self.client.half_closed("upstream")

    def pause_writing(self) -> None:
        self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        self.client.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class _Client(asyncio.Protocol):
    __slots__ = (
        "client_ip",
        "closed",
        "connect_s",
        "endpoint",
        "eofs",
        "pending",
        "proxy",
        "transport",
        "upstream",
    )

    def __init__(self, proxy: TcpProxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.upstream: asyncio.Transport | None = None
        self.endpoint: Endpoint | None = None
        self.pending: list[bytes] = []
        self.eofs: set[str] = set()
        self.closed = False
        self.connect_s = 0.0
        self.client_ip = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _tune(transport)
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if peer else ""
        self.proxy.stats["connections"] += 1
        self.proxy.clients.add(self)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        router = self.proxy.router
        got = None
        if router is not None:
            got = await connect_upstream(
                router,
                self.client_ip,
                lambda: _Upstream(self),
                timeout=self.proxy.connect_timeout,
                stats=self.proxy.stats,
            )
        if got is None:
            self.proxy.stats["no_endpoint"] += 1
            self.close()
            return
        ep, transport, _, self.connect_s = got
        if self.closed:  # the client went away while we connected
            transport.close()
            router.end(ep, self.connect_s, True)  # type: ignore[union-attr]
            return
        self.endpoint, self.upstream = ep, transport
        if self.pending:
            transport.write(b"".join(self.pending))
            self.pending.clear()
            self.transport.resume_reading()  # paused if the client sent a lot meanwhile
        if "client" in self.eofs and transport.can_write_eof():
            transport.write_eof()

    def data_received(self, data: bytes) -> None:
        if self.upstream is not None:
            self.upstream.write(data)
        else:
            self.pending.append(data)
            if sum(map(len, self.pending)) > 256 * 1024:
                self.transport.pause_reading()

    def eof_received(self) -> bool:
        up = self.upstream
        if up is not None and up.can_write_eof() and not up.is_closing():
            up.write_eof()
        return self.half_closed("client")

    def half_closed(self, side: str) -> bool:
        """Keep the connection while the other direction still flows."""
        self.eofs.add(side)
        if len(self.eofs) == 2:
            self.close()
            return False
        return True

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def abort(self) -> None:
        self.transport.abort()
        if self.upstream is not None:
            self.upstream.abort()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.transport.close()
        self.proxy.clients.discard(self)
        if self.upstream is not None:
            self.upstream.close()
        ep = self.endpoint
        if ep is not None:
            router = self.proxy.router
            if router is not None:
                router.end(ep, self.connect_s, True)


class TcpProxy:
    """A listener's protocol factory: every connection forwarded to the router's pick."""

    def __init__(self, router: Router | None, *, connect_timeout: float) -> None:
        self.router = router
        """Set anew by the mesh when the service's balance changes; None: no route (refused)."""
        self.connect_timeout = connect_timeout
        self.clients: set[_Client] = set()
        self.stats: dict[str, int] = {"connections": 0, "no_endpoint": 0, "connect_failures": 0}

    def __call__(self) -> asyncio.Protocol:
        return _Client(self)

    def active(self) -> int:
        return len(self.clients)

    def drop_nodes(self, nodes: set[str]) -> int:
        """Cut connections to replicas on these nodes (gone: nothing will come back)."""
        doomed = [c for c in self.clients if c.endpoint is not None and c.endpoint.node in nodes]
        for c in doomed:
            c.abort()
        return len(doomed)

    def close_all(self) -> None:
        for c in list(self.clients):
            c.close()
