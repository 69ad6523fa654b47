"""The DNS server: UDP and TCP listeners around the pure zone and the forwarder.

A ``mesh.`` query is answered inside the packet callback (from the answer
cache when the view has not changed); any other name is forwarded in its own
task, so one slow upstream holds up nothing else. At most ``max_inflight``
forwards run at once: beyond that queries are dropped and counted, and the
clients retry. Bad packets never raise: those with a readable header get
FORMERR, the rest are dropped; both are counted.

Each listener answers ``<svc>.mesh`` with its own address, which is why a
wildcard address is refused: a UDP socket bound to 0.0.0.0 cannot tell which
address a query came to.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
from collections.abc import Coroutine, Sequence
from typing import Any, cast

import dns.flags
import dns.message
import dns.opcode
import dns.rcode

from .cache import AnswerCache, Recorder
from .forward import RESOLV_CONF, Forwarder, read_resolv_conf
from .zone import ZoneView, answer, error, error_from_header, render, udp_limit

__all__ = ["DnsServer"]

log = logging.getLogger(__name__)

TCP_MAX = 65535
_BIND_ATTEMPTS = 20
"""Port 0 binds UDP first and then TCP on the same port, which may be taken."""

STATS = (
    "queries",  # every packet or TCP message received
    "answered",  # mesh. answers sent (cached ones included)
    "cached",  # answers sent from the cache
    "forwarded",  # queries relayed upstream
    "servfail",  # forwards no upstream answered
    "refused",  # names outside mesh. with no upstream to ask
    "nxdomain",  # mesh. names that do not exist
    "truncated",  # UDP answers cut to the client's size (TC set)
    "notimp",  # opcodes other than QUERY
    "malformed",  # unreadable messages (FORMERR sent if the header was readable)
    "dropped",  # unanswered: responses sent to us, over the forward or connection bound
    "errors",  # unexpected failures while answering (a bug: logged)
    "tcp_connections",
)


def _format(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_address(host: str, port: int) -> tuple[str, int]:
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        raise ValueError(f"DNS listen address {host!r} is not an IP address") from None
    if ip.is_unspecified:
        raise ValueError(
            f"DNS listen address {_format(host, port)} names every interface; give one "
            "address (answers name the address a query came to)"
        )
    if not 0 <= port <= 65535:
        raise ValueError(f"DNS listen port {port} is not 0..65535")
    return host, port


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None
        self.local = ""
        self.closed = asyncio.get_running_loop().create_future()
        """Done when the socket is really closed (``close()`` only schedules it)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.local = transport.get_extra_info("sockname")[0]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.server._on_datagram(self, data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("DNS UDP socket %s: %s", self.local, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class DnsServer:
    """Answers ``mesh.`` from ``view`` and forwards other names, on UDP and TCP.

    ``addresses`` are (ip, port) pairs to listen on, port 0 for any; after
    ``start`` they hold the ports really bound. ``upstreams`` None means the
    ``nameserver`` lines of ``resolv_conf`` (less this server's own
    addresses); an empty list means names outside the mesh are REFUSED.
    ``view`` may be replaced at any time.
    """

    def __init__(
        self,
        view: ZoneView,
        addresses: Sequence[tuple[str, int]],
        upstreams: Sequence[tuple[str, int]] | None = None,
        *,
        resolv_conf: str = RESOLV_CONF,
        timeout: float = 2.0,
        max_inflight: int = 256,
        max_connections: int = 64,
        idle_timeout: float = 10.0,
        cache_size: int = 4096,
    ) -> None:
        if not addresses:
            raise ValueError("the DNS server needs at least one address to listen on")
        self.view = view
        self.addresses: list[tuple[str, int]] = [_check_address(h, p) for h, p in addresses]
        self.upstreams = None if upstreams is None else list(upstreams)
        self.resolv_conf = resolv_conf
        self.timeout = timeout
        self.max_inflight = max_inflight
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.forwarder: Forwarder | None = None
        self.stats: dict[str, int] = dict.fromkeys(STATS, 0)
        self._cache = AnswerCache(cache_size)
        self._udp: list[_Udp] = []
        self._tcp: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._connections: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._logged_error = False

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on every address; OSError naming the address when one cannot be bound."""
        self._loop = asyncio.get_running_loop()
        self._cache.clear()
        bound: list[tuple[str, int]] = []
        try:
            for host, port in self.addresses:
                bound.append(await self._listen(host, port))
        except BaseException:
            await self._close_listeners()
            raise
        self.addresses = bound
        upstreams = self.upstreams
        if upstreams is None:
            own = [h for h, p in bound if p == 53]
            upstreams = [(a, 53) for a in read_resolv_conf(self.resolv_conf, exclude=own)]
        self.forwarder = Forwarder(upstreams, self.timeout) if upstreams else None
        log.info(
            "DNS on %s, forwarding to %s",
            ", ".join(_format(h, p) for h, p in bound),
            ", ".join(_format(h, p) for h, p in upstreams) or "nobody",
        )

    async def _listen(self, host: str, port: int) -> tuple[str, int]:
        assert self._loop is not None
        for attempt in range(_BIND_ATTEMPTS if port == 0 else 1):
            try:
                _, udp = await self._loop.create_datagram_endpoint(
                    lambda: _Udp(self), local_addr=(host, port)
                )
            except OSError as exc:
                raise _bind_error(exc, host, port, "udp") from exc
            self._udp.append(udp)
            assert udp.transport is not None
            real_port = udp.transport.get_extra_info("sockname")[1]
            try:
                server = await asyncio.start_server(self._on_connection, host, real_port)
            except OSError as exc:
                if port == 0 and exc.errno == errno.EADDRINUSE and attempt + 1 < _BIND_ATTEMPTS:
                    udp.transport.close()
                    self._udp.remove(udp)
                    await udp.closed
                    continue
                raise _bind_error(exc, host, real_port, "tcp") from exc
            self._tcp.append(server)
            return host, real_port
        raise AssertionError("unreachable")  # pragma: no cover

    async def stop(self) -> None:
        """Stop listening, end connections and cancel forwards in flight."""
        await self._close_listeners()
        for writer in list(self._writers):
            writer.close()
        pending = [*self._tasks, *self._connections]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for server in self._tcp:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._tcp.clear()

    async def _close_listeners(self) -> None:
        udps, self._udp = self._udp, []
        for udp in udps:
            if udp.transport is not None:
                udp.transport.close()
        for server in self._tcp:
            server.close()
        # Returns with the UDP ports free again (a restart may bind them at once).
        await asyncio.gather(*(u.closed for u in udps if u.transport is not None))

    async def __aenter__(self) -> DnsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- answering -------------------------------------------------------------------

    def _respond(self, wire: bytes, local: str, tcp: bool) -> bytes | dns.message.Message | None:
        """The reply to send now, or the parsed query to forward, or None to drop."""
        stats = self.stats
        stats["queries"] += 1
        key = (tcp, local, wire[2:])
        cached = self._cache.get(key, self.view)
        if cached is not None:
            stats["answered"] += 1
            stats["cached"] += 1
            return wire[:2] + cached
        if len(wire) < 12:
            stats["malformed"] += 1
            return None
        flags = int.from_bytes(wire[2:4], "big")
        if flags & dns.flags.QR:
            stats["dropped"] += 1
            return None
        if dns.opcode.from_flags(flags) != dns.opcode.QUERY:
            # Other opcodes may not even parse (UPDATE's sections follow other rules).
            stats["notimp"] += 1
            return error_from_header(wire, dns.rcode.NOTIMP)
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            stats["malformed"] += 1
            return error_from_header(wire, dns.rcode.FORMERR)
        view = Recorder(self.view)
        response = answer(query, view, local, recursion=self.forwarder is not None)
        if response is None:
            if self.forwarder is not None:
                return query
            stats["refused"] += 1
            refused = error(query, dns.rcode.REFUSED, recursion=False)
            return render(refused, TCP_MAX if tcp else udp_limit(query))
        reply = render(response, TCP_MAX if tcp else udp_limit(query))
        rcode = response.rcode()
        if rcode == dns.rcode.NXDOMAIN:
            stats["nxdomain"] += 1
        elif rcode == dns.rcode.FORMERR:
            stats["malformed"] += 1
        if int.from_bytes(reply[2:4], "big") & dns.flags.TC:
            stats["truncated"] += 1
        stats["answered"] += 1
        self._cache.put(key, reply[2:], view.deps)
        return reply

    def _safe_respond(
        self, wire: bytes, local: str, tcp: bool
    ) -> bytes | dns.message.Message | None:
        try:
            return self._respond(wire, local, tcp)
        except Exception:
            self.stats["errors"] += 1
            if not self._logged_error:
                self._logged_error = True
                log.exception("DNS query could not be answered (further ones logged at debug)")
            else:
                log.debug("DNS query could not be answered", exc_info=True)
            return error_from_header(wire, dns.rcode.SERVFAIL)

    async def _forward(self, wire: bytes, query: dns.message.Message, tcp: bool) -> bytes:
        assert self.forwarder is not None
        self.stats["forwarded"] += 1
        reply = await self.forwarder.exchange(wire, tcp=tcp)
        if reply is None:
            self.stats["servfail"] += 1
            reply = render(error(query, dns.rcode.SERVFAIL))
        if not tcp and len(reply) > udp_limit(query):
            # The client's size (capped at ours) is all it takes over UDP: an
            # empty truncated answer sends it to TCP.
            self.stats["truncated"] += 1
            truncated = error(query, dns.rcode.NOERROR)
            truncated.flags |= dns.flags.TC
            reply = render(truncated)
        return reply

    def _spawn(self, make: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        assert self._loop is not None
        task = self._loop.create_task(make)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _room(self) -> bool:
        if len(self._tasks) < self.max_inflight:
            return True
        self.stats["dropped"] += 1
        return False

    # -- UDP -------------------------------------------------------------------------------

    def _on_datagram(self, udp: _Udp, data: bytes, addr: Any) -> None:
        result = self._safe_respond(data, udp.local, False)
        if isinstance(result, bytes):
            assert udp.transport is not None
            udp.transport.sendto(result, addr)
        elif result is not None and self._room():
            self._spawn(self._forward_udp(udp, data, result, addr))

    async def _forward_udp(
        self, udp: _Udp, data: bytes, query: dns.message.Message, addr: Any
    ) -> None:
        try:
            reply = await self._forward(data, query, False)
        except Exception:
            self.stats["errors"] += 1
            log.debug("DNS forward failed", exc_info=True)
            return
        if udp.transport is not None and not udp.transport.is_closing():
            udp.transport.sendto(reply, addr)

    # -- TCP ---------------------------------------------------------------------------------

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if len(self._connections) >= self.max_connections:
            self.stats["dropped"] += 1
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)  # type: ignore[arg-type]
        self._writers.add(writer)
        self.stats["tcp_connections"] += 1
        local = writer.get_extra_info("sockname")[0]
        pending: set[asyncio.Task[None]] = set()
        try:
            while True:
                try:
                    async with asyncio.timeout(self.idle_timeout):
                        size = int.from_bytes(await reader.readexactly(2), "big")
                        data = await reader.readexactly(size)
                except (TimeoutError, EOFError, OSError):
                    break
                result = self._safe_respond(data, local, True)
                if isinstance(result, bytes):
                    writer.write(len(result).to_bytes(2, "big") + result)
                    await writer.drain()
                elif result is not None and self._room():
                    forward = self._spawn(self._forward_tcp(writer, data, result))
                    pending.add(forward)
                    forward.add_done_callback(pending.discard)
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            self._writers.discard(writer)
            self._connections.discard(task)  # type: ignore[arg-type]

    async def _forward_tcp(
        self, writer: asyncio.StreamWriter, data: bytes, query: dns.message.Message
    ) -> None:
        try:
            reply = await self._forward(data, query, True)
        except Exception:
            self.stats["errors"] += 1
            log.debug("DNS forward failed", exc_info=True)
            return
        if not writer.is_closing():
            # One write per reply: replies may go out in any order (RFC 7766).
            writer.write(len(reply).to_bytes(2, "big") + reply)


def _bind_error(exc: OSError, host: str, port: int, transport: str) -> OSError:
    return OSError(
        exc.errno,
        f"DNS server cannot listen on {_format(host, port)} ({transport}): {exc.strerror or exc}",
    )
