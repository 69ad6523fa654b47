"""Forwarding names outside the mesh: resolv.conf, addresses, and a fake upstream on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from meshd.dns.forward import Forwarder, parse_address, read_resolv_conf

# -- a fake upstream resolver ---------------------------------------------------------

EXAMPLE = "192.0.2.1"
BIG_TXT = [f"{i:02}" + "x" * 198 for i in range(12)]  # ~2.5 kB: too big for 512-byte UDP


class FakeUpstream:
    """A resolver on 127.0.0.1 (UDP and TCP, one port) that knows a few names:

    - ``example.org`` A: ``EXAMPLE``;
    - ``big.example.org`` TXT: ``BIG_TXT``, truncated over UDP as a real one would;
    - ``spoof.example.org`` A: a reply with the wrong ID first, then the right one;
    - ``silent.example.org``: never answered; anything else is NXDOMAIN.

    ``silent=True`` answers nothing at all. Every query is kept in ``queries``
    as (transport, message).
    """

    def __init__(self, *, silent: bool = False) -> None:
        self.silent = silent
        self.queries: list[tuple[str, dns.message.Message]] = []
        self.address: tuple[str, int] = ("127.0.0.1", 0)
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    async def start(self) -> FakeUpstream:
        loop = asyncio.get_running_loop()
        for _ in range(20):
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UpstreamUdp(self), local_addr=("127.0.0.1", 0)
            )
            port = transport.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._on_tcp, "127.0.0.1", port)
            except OSError:
                transport.close()
                continue
            self._udp = transport  # type: ignore[assignment]
            self.address = ("127.0.0.1", port)
            return self
        raise AssertionError("no free port for the fake upstream")

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._tcp.wait_closed(), 2)

    def replies(self, transport: str, wire: bytes) -> list[bytes]:
        query = dns.message.from_wire(wire)
        self.queries.append((transport, query))
        if self.silent:
            return []
        q = query.question[0]
        name = q.name.to_text().lower()
        response = dns.message.make_response(query, recursion_available=True)
        limit = 65535
        if transport == "udp":
            limit = max(512, query.payload) if query.edns >= 0 else 512
        if name == "silent.example.org.":
            return []
        if name in ("example.org.", "spoof.example.org.") and q.rdtype == dns.rdatatype.A:
            response.answer.append(dns.rrset.from_text(q.name, 60, "IN", "A", EXAMPLE))
        elif name == "big.example.org." and q.rdtype == dns.rdatatype.TXT:
            texts = [f'"{t}"' for t in BIG_TXT]
            response.answer.append(dns.rrset.from_text_list(q.name, 60, "IN", "TXT", texts))
        else:
            response.set_rcode(dns.rcode.NXDOMAIN)
        out = [response.to_wire(max_size=limit, prefer_truncation=True)]
        if name == "spoof.example.org.":
            forged = dns.message.make_response(query)
            forged.id = (query.id + 1) % 65536
            forged.answer.append(dns.rrset.from_text(q.name, 60, "IN", "A", "203.0.113.66"))
            out.insert(0, forged.to_wire())
        return out

    async def _on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                for reply in self.replies("tcp", await reader.readexactly(size)):
                    writer.write(len(reply).to_bytes(2, "big") + reply)
                await writer.drain()
        except (EOFError, OSError):
            pass
        finally:
            writer.close()


class _UpstreamUdp(asyncio.DatagramProtocol):
    def __init__(self, upstream: FakeUpstream) -> None:
        self.upstream = upstream
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        for reply in self.upstream.replies("udp", data):
            self.transport.sendto(reply, addr)


@contextlib.asynccontextmanager
async def fake_upstream(*, silent: bool = False) -> AsyncIterator[FakeUpstream]:
    upstream = await FakeUpstream(silent=silent).start()
    try:
        yield upstream
    finally:
        await upstream.stop()


def closed_port() -> tuple[str, int]:
    """A loopback UDP port with nobody on it (queries there are refused at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()


def query(name: str, rdtype: str = "A", **kw: Any) -> dns.message.Message:
    return dns.message.make_query(name, rdtype, **kw)


# -- parse_address ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.53", ("192.0.2.53", 53)),
        (" 127.0.0.1:5353 ", ("127.0.0.1", 5353)),
        ("::1", ("::1", 53)),
        ("[::1]:5353", ("::1", 5353)),
        ("[fd00::53]", ("fd00::53", 53)),
        ("fe80::1%eth0", ("fe80::1%eth0", 53)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    "text", ["", "resolver.example", "1.2.3.4:x", "1.2.3.4:70000", "[::1", "[::1]x", "1.2.3:53"]
)
def test_parse_address_rejects_what_is_not_an_address(text: str) -> None:
    with pytest.raises(ValueError, match="bad"):
        parse_address(text)


# -- read_resolv_conf -------------------------------------------------------------------


def test_read_resolv_conf(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text(
        "# generated\n"
        "search example.com\n"
        "options ndots:2 timeout:1\n"
        "nameserver 192.0.2.53  # primary\n"
        "nameserver\n"
        "nameserver not-an-address\n"
        "nameserver 127.0.0.1\n"
        ";nameserver 192.0.2.99\n"
        "  nameserver   2001:db8::53\n"
        "nameserver 192.0.2.53\n"
        "nameserver fe80::1%eth0\n"
    )
    assert read_resolv_conf(str(conf)) == [
        "192.0.2.53",
        "127.0.0.1",
        "2001:db8::53",
        "fe80::1%eth0",
    ]
    # This server's own addresses are skipped, however they are spelled.
    assert read_resolv_conf(str(conf), exclude=["127.0.0.1", "2001:DB8:0::53"]) == [
        "192.0.2.53",
        "fe80::1%eth0",
    ]


def test_read_resolv_conf_missing_file_gives_no_upstreams(tmp_path: Path) -> None:
    assert read_resolv_conf(str(tmp_path / "nope")) == []


# -- Forwarder ---------------------------------------------------------------------------


def test_forwarder_needs_upstreams() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Forwarder([])
    with pytest.raises(ValueError, match="bad address"):
        Forwarder(["resolver.example"])
    assert Forwarder(["127.0.0.1:5353", ("::1", 53)]).upstreams == [
        ("127.0.0.1", 5353),
        ("::1", 53),
    ]


@pytest.mark.integration
async def test_forward_relays_the_upstream_reply_under_the_client_id() -> None:
    async with fake_upstream() as up:
        forwarder = Forwarder([up.address], timeout=2)
        q = query("example.org.", use_edns=0, payload=1232, want_dnssec=True)
        reply = dns.message.from_wire(await forwarder.forward(q.to_wire()))
        assert reply.id == q.id
        assert q.is_response(reply)
        assert [rd.to_text() for rd in reply.answer[0]] == [EXAMPLE]
        [(transport, seen)] = up.queries
        assert transport == "udp"
        # Relayed as it came, but for the ID: EDNS and the DO bit reach the upstream.
        assert seen.question == q.question
        assert seen.edns == 0 and seen.payload == 1232 and seen.ednsflags & dns.flags.DO


@pytest.mark.integration
async def test_truncated_udp_reply_is_asked_again_over_tcp() -> None:
    async with fake_upstream() as up:
        forwarder = Forwarder([up.address], timeout=2)
        q = query("big.example.org.", "TXT")
        reply = dns.message.from_wire(await forwarder.forward(q.to_wire()))
        assert not reply.flags & dns.flags.TC
        assert sorted(rd.strings[0].decode() for rd in reply.answer[0]) == BIG_TXT
        assert [t for t, _ in up.queries] == ["udp", "tcp"]
        assert forwarder.stats["tcp"] == 1


@pytest.mark.integration
async def test_tcp_goes_straight_to_tcp() -> None:
    async with fake_upstream() as up:
        forwarder = Forwarder([up.address], timeout=2)
        q = query("example.org.")
        reply = dns.message.from_wire(await forwarder.forward(q.to_wire(), tcp=True))
        assert q.is_response(reply)
        assert [t for t, _ in up.queries] == ["tcp"]


@pytest.mark.integration
async def test_a_reply_to_another_query_is_ignored() -> None:
    async with fake_upstream() as up:
        forwarder = Forwarder([up.address], timeout=2)
        q = query("spoof.example.org.")
        reply = dns.message.from_wire(await forwarder.forward(q.to_wire()))
        assert [rd.to_text() for rd in reply.answer[0]] == [EXAMPLE]


@pytest.mark.integration
async def test_next_upstream_when_one_refuses_and_the_good_one_is_tried_first_after() -> None:
    async with fake_upstream() as up:
        forwarder = Forwarder([closed_port(), up.address], timeout=2)
        for _ in range(2):
            q = query("example.org.")
            reply = dns.message.from_wire(await forwarder.forward(q.to_wire()))
            assert reply.rcode() == dns.rcode.NOERROR
        assert forwarder.stats["errors"] == 1  # the closed port, once
        assert len(up.queries) == 2


@pytest.mark.integration
async def test_servfail_when_every_upstream_times_out() -> None:
    async with fake_upstream(silent=True) as a, fake_upstream(silent=True) as b:
        forwarder = Forwarder([a.address, b.address], timeout=0.2)
        q = query("example.org.", use_edns=0)
        assert await forwarder.exchange(q.to_wire()) is None
        reply = dns.message.from_wire(await forwarder.forward(q.to_wire()))
        assert q.is_response(reply)
        assert reply.rcode() == dns.rcode.SERVFAIL
        assert reply.flags & dns.flags.RA
        assert forwarder.stats["timeouts"] == 4
        assert forwarder.stats["failed"] == 2
        assert len(a.queries) == len(b.queries) == 2


async def test_forwarding_something_that_is_not_a_query_is_a_value_error() -> None:
    forwarder = Forwarder([closed_port()], timeout=0.2)
    with pytest.raises(ValueError, match="not a DNS query"):
        await forwarder.forward(b"\x00\x01garbage")
