"""Names outside ``mesh.`` go to the host's resolvers, relayed as they came.

The query's bytes are relayed unchanged but for the ID: each exchange gets a
fresh random ID and its own ephemeral socket, so a forged reply must guess
both (the client's own ID may be predictable, some stub resolvers count).
A reply counts only if it answers the question asked; anything else on the
socket is ignored. Upstreams are tried in turn, starting with the last one
that answered; a truncated UDP reply is asked again over TCP.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
from collections.abc import Iterable, Sequence

import dns.flags
import dns.message
import dns.rcode

from .zone import error, render

__all__ = ["Forwarder", "parse_address", "read_resolv_conf"]

log = logging.getLogger(__name__)

RESOLV_CONF = "/etc/resolv.conf"
DNS_PORT = 53


def parse_address(text: str, default_port: int = DNS_PORT) -> tuple[str, int]:
    """``addr``, ``addr:port``, ``[v6]:port`` or a bare IPv6 address -> (addr, port).

    Addresses only, never host names: a resolver cannot ask itself where its
    upstream is.
    """
    text = text.strip()
    host, port = text, default_port
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad address {text!r} (use [v6addr]:port)")
        if rest:
            port = _port(rest[1:], text)
    elif text.count(":") == 1:
        host, _, rest = text.partition(":")
        port = _port(rest, text)
    try:
        ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        raise ValueError(f"bad address {text!r}: {host!r} is not an IP address") from None
    return host, port


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise ValueError(f"bad port in {whole!r} (use 0..65535)")
    return int(text)


def read_resolv_conf(path: str = RESOLV_CONF, exclude: Iterable[str] = ()) -> list[str]:
    """The ``nameserver`` addresses of a resolv.conf, in order, duplicates dropped.

    ``exclude`` lists addresses to leave out: the ones this server answers on
    at port 53, which would otherwise forward to themselves. A missing or
    unreadable file gives no upstreams.
    """
    skip = {_normal(a) for a in exclude}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        log.warning("cannot read %s: %s; names outside the mesh will be refused", path, exc)
        return []
    out: list[str] = []
    for line in lines:
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) < 2 or words[0] != "nameserver":
            continue
        address = _normal(words[1])
        if address is not None and address not in skip and address not in out:
            out.append(address)
    return out


def _normal(address: str) -> str | None:
    """The canonical text of an IP address (keeping an IPv6 scope), None if not one."""
    ip, sep, scope = address.partition("%")
    try:
        text = str(ipaddress.ip_address(ip))
    except ValueError:
        return None
    return f"{text}%{scope}" if sep else text


class _Exchange(asyncio.DatagramProtocol):
    """One UDP exchange: the first datagram that answers ``query`` wins."""

    def __init__(self, query: dns.message.Message, reply: asyncio.Future[bytes]) -> None:
        self.query = query
        self.reply = reply
        self.ignored = 0

    def datagram_received(self, data: bytes, addr: object) -> None:
        if not self.reply.done() and answers(self.query, data):
            self.reply.set_result(data)
        else:
            self.ignored += 1

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and friends: this upstream is not there.
        if not self.reply.done():
            self.reply.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.reply.done():
            self.reply.set_exception(exc or ConnectionError("socket closed"))


def answers(query: dns.message.Message, data: bytes) -> bool:
    """Whether ``data`` is a response to ``query`` (ID, opcode and question)."""
    try:
        reply = dns.message.from_wire(data, question_only=True)
    except Exception:
        return False
    return query.is_response(reply)


class Forwarder:
    """Relays queries to upstream resolvers.

    ``upstreams`` are ``(addr, port)`` pairs or ``"addr[:port]"`` texts;
    ``timeout`` bounds each attempt (one upstream, one transport).
    """

    def __init__(self, upstreams: Sequence[str | tuple[str, int]], timeout: float = 2.0) -> None:
        self.upstreams: list[tuple[str, int]] = [
            parse_address(u) if isinstance(u, str) else (u[0], int(u[1])) for u in upstreams
        ]
        if not self.upstreams:
            raise ValueError("a forwarder needs at least one upstream")
        self.timeout = timeout
        self.stats = {"exchanges": 0, "timeouts": 0, "errors": 0, "tcp": 0, "failed": 0}
        self._first = 0

    async def forward(self, query: bytes, *, tcp: bool = False) -> bytes:
        """The upstream's reply to ``query``, or SERVFAIL when none replies.

        ``tcp`` goes straight to TCP (the client asked over TCP, most likely
        after a truncated answer). Raises ValueError when ``query`` is not a
        DNS message.
        """
        reply = await self.exchange(query, tcp=tcp)
        if reply is None:
            return render(error(dns.message.from_wire(query), dns.rcode.SERVFAIL))
        return reply

    async def exchange(self, query: bytes, *, tcp: bool = False) -> bytes | None:
        """The upstream's reply to ``query``, None when every upstream failed."""
        try:
            message = dns.message.from_wire(query)
        except Exception as exc:
            raise ValueError(f"not a DNS query: {exc}") from None
        count = len(self.upstreams)
        for i in range(count):
            index = (self._first + i) % count
            upstream = self.upstreams[index]
            ident = secrets.randbits(16)
            message.id = ident
            wire = ident.to_bytes(2, "big") + query[2:]
            try:
                reply = None if tcp else await self._udp(wire, message, upstream)
                if reply is None or _truncated(reply):
                    self.stats["tcp"] += 1
                    reply = await self._tcp(wire, message, upstream)
            except TimeoutError:
                self.stats["timeouts"] += 1
                log.debug("upstream %s timed out", upstream)
                continue
            except (OSError, EOFError) as exc:
                self.stats["errors"] += 1
                log.debug("upstream %s failed: %s", upstream, exc)
                continue
            self._first = index
            return query[:2] + reply[2:]
        self.stats["failed"] += 1
        return None

    async def _udp(
        self, wire: bytes, message: dns.message.Message, upstream: tuple[str, int]
    ) -> bytes:
        self.stats["exchanges"] += 1
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[bytes] = loop.create_future()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Exchange(message, reply), remote_addr=upstream
        )
        try:
            transport.sendto(wire)
            async with asyncio.timeout(self.timeout):
                return await reply
        finally:
            transport.close()
            if reply.done() and not reply.cancelled():
                reply.exception()  # retrieved: no "never retrieved" warning

    async def _tcp(
        self, wire: bytes, message: dns.message.Message, upstream: tuple[str, int]
    ) -> bytes:
        self.stats["exchanges"] += 1
        writer = None
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(*upstream)
                writer.write(len(wire).to_bytes(2, "big") + wire)
                while True:
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    data = await reader.readexactly(size)
                    if answers(message, data):
                        return data
        finally:
            if writer is not None:
                writer.close()


def _truncated(reply: bytes) -> bool:
    return len(reply) >= 4 and bool(int.from_bytes(reply[2:4], "big") & dns.flags.TC)
