"""The DNS server on loopback: real clients, a fake upstream, garbage and limits."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.resolver
import pytest
from conftest import async_wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_dns_forward import BIG_TXT, EXAMPLE, FakeUpstream, fake_upstream
from test_dns_zone import View, backend, make_view, route

from meshd.dns import DnsServer
from meshd.proxy.endpoints import Route
from meshd.spec import Port

pytestmark = pytest.mark.integration

LOOPBACK = "127.0.0.1"


@contextlib.asynccontextmanager
async def running(
    upstreams: list[tuple[str, int]] | None = None, view: View | None = None, **kw: Any
) -> AsyncIterator[DnsServer]:
    server = DnsServer(
        make_view() if view is None else view, [(LOOPBACK, 0)], upstreams, timeout=2, **kw
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with fake_upstream() as up:
        yield up


@pytest.fixture
async def server(upstream: FakeUpstream) -> AsyncIterator[DnsServer]:
    async with running([upstream.address]) as s:
        yield s


def where(server: DnsServer) -> tuple[str, int]:
    return server.addresses[0]


async def udp(server: DnsServer, name: str, rdtype: str = "A", **kw: Any) -> dns.message.Message:
    host, port = where(server)
    q = dns.message.make_query(name, rdtype, **kw)
    r = await dns.asyncquery.udp(q, host, port=port, timeout=5)
    assert q.is_response(r)
    return r


async def tcp(server: DnsServer, name: str, rdtype: str = "A", **kw: Any) -> dns.message.Message:
    host, port = where(server)
    q = dns.message.make_query(name, rdtype, **kw)
    r = await dns.asyncquery.tcp(q, host, port=port, timeout=5)
    assert q.is_response(r)
    return r


def texts(r: dns.message.Message) -> list[str]:
    return sorted(rd.to_text() for rrset in r.answer for rd in rrset)


def resolver(server: DnsServer) -> dns.asyncresolver.Resolver:
    """A stub resolver set up the way containers are: this server, search domain mesh."""
    host, port = where(server)
    res = dns.asyncresolver.Resolver(configure=False)
    res.nameservers = [host]
    res.port = port
    res.search = [dns.name.from_text("mesh.")]
    res.use_search_by_default = True
    res.ndots = 1
    res.lifetime = 5
    res.timeout = 5
    return res


class RawUdp:
    """A plain UDP socket for sending what no DNS client would."""

    def __init__(self, server: DnsServer) -> None:
        self.peer = where(server)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.connect(self.peer)

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def recv(self, timeout: float = 5) -> bytes:
        async with asyncio.timeout(timeout):
            return await asyncio.get_running_loop().sock_recv(self.sock, 65535)

    def close(self) -> None:
        self.sock.close()


# -- answering -------------------------------------------------------------------------------


async def test_mesh_names_over_udp_and_tcp(server: DnsServer) -> None:
    host, port = where(server)
    assert host == LOOPBACK and port != 0
    r = await udp(server, "web.mesh.")
    assert texts(r) == [LOOPBACK]
    assert r.flags & dns.flags.AA and r.flags & dns.flags.RA
    assert texts(await tcp(server, "web.mesh.")) == [LOOPBACK]
    r = await udp(server, "_http._tcp.web.mesh.", "SRV", use_edns=0)
    assert len(r.answer[0]) == 3 and len(r.additional) == 3
    assert (await udp(server, "nope.mesh.")).rcode() == dns.rcode.NXDOMAIN
    assert server.stats["answered"] == 4
    assert server.stats["nxdomain"] == 1
    assert server.stats["tcp_connections"] == 1
    assert server.stats["forwarded"] == 0


async def test_a_stub_resolver_with_the_mesh_search_domain(server: DnsServer) -> None:
    res = resolver(server)
    assert [a.to_text() for a in await res.resolve("web")] == [LOOPBACK]
    assert [a.to_text() for a in await res.resolve("db")] == ["10.0.0.1", "10.0.0.2"]
    srv = await res.resolve("_http._tcp.web", "SRV")
    assert sorted(r.port for r in srv) == [31001, 31002, 31003]
    assert [a.to_text() for a in await res.resolve("n2.node")] == ["10.0.0.2"]
    # Names outside the mesh are forwarded.
    assert [a.to_text() for a in await res.resolve("example.org")] == [EXAMPLE]
    with pytest.raises(dns.resolver.NXDOMAIN):
        await res.resolve("nope")  # nope.mesh, then nope. upstream
    assert server.stats["forwarded"] >= 2


async def test_a_cached_answer_follows_the_view(server: DnsServer) -> None:
    assert texts(await udp(server, "db.mesh.")) == ["10.0.0.1", "10.0.0.2"]
    assert texts(await udp(server, "db.mesh.")) == ["10.0.0.1", "10.0.0.2"]
    assert server.stats["cached"] == 1
    view = server.view
    assert isinstance(view, View)
    view.routes["db"] = route("db", [Port("pg", 5432)], [backend("db-9", "n3", "10.0.0.3")])
    assert texts(await udp(server, "db.mesh.")) == ["10.0.0.3"]
    view.nodes["n2"] = "10.0.0.22"
    r = await udp(server, "n2.node.mesh.")
    assert texts(r) == ["10.0.0.22"]
    server.view = make_view()
    assert texts(await udp(server, "db.mesh.")) == ["10.0.0.1", "10.0.0.2"]


async def test_big_answers_are_truncated_over_udp_and_whole_over_tcp() -> None:
    many = [backend(f"r{i:03}", "n1", f"10.1.0.{i + 1}") for i in range(100)]
    view = View(routes={"many": Route("many", (), make_view().routes["db"].balance, tuple(many))})
    async with running([], view) as server:
        r = await udp(server, "many.mesh.")
        assert r.flags & dns.flags.TC and not r.answer
        assert len(texts(await tcp(server, "many.mesh."))) == 100
        host, port = where(server)
        q = dns.message.make_query("many.mesh.", "A", use_edns=0, payload=4096)
        r, used_tcp = await dns.asyncquery.udp_with_fallback(q, host, port=port, timeout=5)
        assert used_tcp and len(texts(r)) == 100
        assert server.stats["truncated"] == 2


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
async def test_ipv6_listener_answers_aaaa() -> None:
    try:
        server = DnsServer(make_view(), [("::1", 0)], [])
        await server.start()
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    try:
        host, port = server.addresses[0]
        assert host == "::1"
        q = dns.message.make_query("web.mesh.", "AAAA")
        assert texts(await dns.asyncquery.udp(q, host, port=port, timeout=5)) == ["::1"]
        q = dns.message.make_query("web.mesh.", "A")
        r = await dns.asyncquery.tcp(q, host, port=port, timeout=5)
        assert r.rcode() == dns.rcode.NOERROR and not r.answer
    finally:
        await server.stop()


# -- forwarding -------------------------------------------------------------------------------


async def test_forwarded_over_udp_and_tcp(server: DnsServer, upstream: FakeUpstream) -> None:
    r = await udp(server, "example.org.")
    assert texts(r) == [EXAMPLE]
    assert not r.flags & dns.flags.AA
    assert texts(await tcp(server, "example.org.")) == [EXAMPLE]
    assert (await udp(server, "other.example.org.")).rcode() == dns.rcode.NXDOMAIN
    assert [t for t, _ in upstream.queries] == ["udp", "tcp", "udp"]
    assert server.stats["forwarded"] == 3


async def test_a_big_forwarded_answer_sends_udp_clients_to_tcp(
    server: DnsServer, upstream: FakeUpstream
) -> None:
    r = await udp(server, "big.example.org.", "TXT", use_edns=0, payload=4096)
    assert r.flags & dns.flags.TC and not r.answer
    host, port = where(server)
    q = dns.message.make_query("big.example.org.", "TXT")
    r, used_tcp = await dns.asyncquery.udp_with_fallback(q, host, port=port, timeout=5)
    assert used_tcp
    assert sorted(rd.strings[0].decode() for rd in r.answer[0]) == BIG_TXT


async def test_upstream_timeout_is_servfail_and_mesh_names_still_answer() -> None:
    async with fake_upstream(silent=True) as silent, running([silent.address]) as server:
        server.forwarder.timeout = 0.2  # type: ignore[union-attr]
        slow = asyncio.ensure_future(udp(server, "example.org."))
        assert texts(await udp(server, "web.mesh.")) == [LOOPBACK]
        r = await slow
        assert r.rcode() == dns.rcode.SERVFAIL
        assert server.stats["servfail"] == 1


async def test_a_dead_upstream_is_skipped(upstream: FakeUpstream) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOOPBACK, 0))
        dead = s.getsockname()
    async with running([dead, upstream.address]) as server:
        assert texts(await udp(server, "example.org.")) == [EXAMPLE]


async def test_without_upstreams_other_names_are_refused() -> None:
    async with running([]) as server:
        assert server.forwarder is None
        r = await udp(server, "example.org.")
        assert r.rcode() == dns.rcode.REFUSED
        assert not r.flags & dns.flags.RA
        assert texts(await udp(server, "web.mesh.")) == [LOOPBACK]
        assert server.stats["refused"] == 1


async def test_upstreams_come_from_resolv_conf(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.1\nnameserver 192.0.2.53\n")
    async with running(None, resolv_conf=str(conf)) as server:
        # Not skipped: this server does not listen on port 53.
        assert server.forwarder is not None
        assert server.forwarder.upstreams == [("127.0.0.1", 53), ("192.0.2.53", 53)]


async def test_forwards_in_flight_are_bounded() -> None:
    async with fake_upstream(silent=True) as silent:
        async with running([silent.address], max_inflight=2) as server:
            raw = RawUdp(server)
            try:
                for i in range(5):
                    await raw.send(dns.message.make_query(f"q{i}.example.org.", "A").to_wire())
                await async_wait_for(lambda: server.stats["queries"] == 5)
                assert server.stats["dropped"] == 3
                assert server.stats["forwarded"] == 2
                assert texts(await udp(server, "web.mesh.")) == [LOOPBACK]
            finally:
                raw.close()
        # stop() cancelled the two forwards waiting on the silent upstream.
        await async_wait_for(lambda: len(silent.queries) == 2)


# -- bad input -----------------------------------------------------------------------------------


async def test_garbage_is_counted_and_the_server_keeps_answering(server: DnsServer) -> None:
    raw = RawUdp(server)
    try:
        rng = random.Random(5)
        junk = [b"", b"\x00", b"\x12" * 11]
        junk += [rng.randbytes(rng.randrange(0, 600)) for _ in range(200)]
        # In batches: a burst of hundreds of datagrams could overflow the socket buffer.
        for start in range(0, len(junk), 25):
            for data in junk[start : start + 25]:
                await raw.send(data)
            sent = min(start + 25, len(junk))
            await async_wait_for(
                lambda sent=sent: server.stats["queries"] == sent, message=f"{sent} queries"
            )
        assert server.stats["errors"] == 0
        assert server.stats["malformed"] + server.stats["dropped"] + server.stats["notimp"] >= 3

        # A readable header with a broken body gets FORMERR under its ID.
        good = dns.message.make_query("web.mesh.", "A").to_wire()
        await raw.send(good[:-3])
        while True:  # replies to the junk may still be queued
            reply = dns.message.from_wire(await raw.recv())
            if reply.id == int.from_bytes(good[:2], "big"):
                break
        assert reply.rcode() == dns.rcode.FORMERR

        # A response sent to us is dropped, not answered.
        dropped = server.stats["dropped"]
        await raw.send(dns.message.make_response(dns.message.make_query("x.mesh.", "A")).to_wire())
        await async_wait_for(lambda: server.stats["dropped"] == dropped + 1)

        # Another opcode gets NOTIMP, even one whose sections do not parse as a query.
        update = bytearray(good)
        update[2] = (update[2] & 0x87) | (dns.opcode.UPDATE << 3)
        await raw.send(bytes(update))
        reply = dns.message.from_wire(await raw.recv(), question_only=True)
        assert reply.rcode() == dns.rcode.NOTIMP
    finally:
        raw.close()
    assert texts(await udp(server, "web.mesh.")) == [LOOPBACK]
    assert server.stats["errors"] == 0


async def test_tcp_pipelined_queries_and_garbage_frames(server: DnsServer) -> None:
    host, port = where(server)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        queries = [
            dns.message.make_query("web.mesh.", "A"),
            dns.message.make_query("example.org.", "A"),
            dns.message.make_query("db.mesh.", "A"),
        ]
        frames = b"".join(q.to_wire(prepend_length=True) for q in queries)
        frames += (5).to_bytes(2, "big") + b"\x01\x02\x03\x04\x05"  # too short: dropped
        broken = dns.message.make_query("web.mesh.", "A")
        bad = broken.to_wire()[:-2]
        frames += len(bad).to_bytes(2, "big") + bad  # readable header: FORMERR
        writer.write(frames)
        replies: dict[int, dns.message.Message] = {}
        async with asyncio.timeout(5):
            for _ in range(4):
                size = int.from_bytes(await reader.readexactly(2), "big")
                reply = dns.message.from_wire(await reader.readexactly(size))
                replies[reply.id] = reply
        assert texts(replies[queries[0].id]) == [LOOPBACK]
        assert replies[broken.id].rcode() == dns.rcode.FORMERR
        assert texts(replies[queries[1].id]) == [EXAMPLE]
        assert texts(replies[queries[2].id]) == ["10.0.0.1", "10.0.0.2"]
        # The connection still takes queries.
        writer.write(dns.message.make_query("web.mesh.", "A").to_wire(prepend_length=True))
        async with asyncio.timeout(5):
            size = int.from_bytes(await reader.readexactly(2), "big")
            assert texts(dns.message.from_wire(await reader.readexactly(size))) == [LOOPBACK]
    finally:
        writer.close()
    assert server.stats["malformed"] == 2
    assert server.stats["errors"] == 0


async def test_an_idle_tcp_connection_is_closed() -> None:
    async with running([], idle_timeout=0.2) as server:
        reader, writer = await asyncio.open_connection(*where(server))
        try:
            async with asyncio.timeout(5):
                assert await reader.read() == b""
        finally:
            writer.close()


async def test_tcp_connections_are_bounded() -> None:
    async with running([], max_connections=1) as server:
        first_reader, first = await asyncio.open_connection(*where(server))
        first.write(dns.message.make_query("web.mesh.", "A").to_wire(prepend_length=True))
        await first_reader.readexactly(2)  # the first connection is being served
        second_reader, second = await asyncio.open_connection(*where(server))
        try:
            async with asyncio.timeout(5):
                assert await second_reader.read() == b""
            assert server.stats["dropped"] == 1
        finally:
            first.close()
            second.close()

        async def served() -> bool:
            return texts(await tcp(server, "web.mesh.")) == [LOOPBACK]

        # Once the first is gone there is room again.
        await async_wait_for(served, ignore=(OSError, EOFError, dns.exception.DNSException))


# -- start and stop -----------------------------------------------------------------------------


def test_addresses_must_name_one_address() -> None:
    for bad in (("0.0.0.0", 53), ("::", 53)):
        with pytest.raises(ValueError, match="every interface"):
            DnsServer(make_view(), [bad])
    with pytest.raises(ValueError, match="not an IP address"):
        DnsServer(make_view(), [("localhost", 53)])
    with pytest.raises(ValueError, match="at least one"):
        DnsServer(make_view(), [])


async def test_a_taken_port_fails_start_naming_the_address() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((LOOPBACK, 0))
        port = taken.getsockname()[1]
        server = DnsServer(make_view(), [(LOOPBACK, port)], [])
        with pytest.raises(OSError, match=rf"127\.0\.0\.1:{port} \(udp\)"):
            await server.start()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = DnsServer(make_view(), [(LOOPBACK, port)], [])
        with pytest.raises(OSError, match=rf"127\.0\.0\.1:{port} \(tcp\)"):
            await server.start()
        # The UDP socket it did bind was let go.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
            again.bind((LOOPBACK, port))


async def test_stop_frees_the_ports() -> None:
    async with running([]) as server:
        host, port = where(server)
        assert texts(await tcp(server, "web.mesh.")) == [LOOPBACK]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.bind((host, port))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
        t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        t.bind((host, port))


# -- fuzz ------------------------------------------------------------------------------------------

_QUERY = dns.message.make_query("_http._tcp.web.mesh.", "SRV", use_edns=0).to_wire()


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for at, value in edits:
        if out:
            out[at % len(out)] = value
    return bytes(out)


_packets = st.one_of(
    st.binary(max_size=600),
    st.builds(
        _mutate,
        st.just(_QUERY),
        st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    ),
    st.integers(0, len(_QUERY)).map(lambda n: _QUERY[:n]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(packet=_packets, over_tcp=st.booleans())
def test_any_packet_gets_a_well_formed_reply_or_is_dropped(packet: bytes, over_tcp: bool) -> None:
    # The packet handler itself, without sockets, so hypothesis can drive it fast.
    server = DnsServer(make_view(), [(LOOPBACK, 0)], [])
    result = server._respond(packet, LOOPBACK, over_tcp)
    assert server.stats["errors"] == 0
    assert result is None or isinstance(result, bytes)
    if result is not None:
        reply = dns.message.from_wire(result)
        assert reply.flags & dns.flags.QR
        assert reply.id == int.from_bytes(packet[:2], "big")
        assert len(result) <= 65535 if over_tcp else len(result) <= 1232
