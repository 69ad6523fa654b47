"""The asyncio driver against a scripted fake core: flushing, framing, join
counting, leave waiting, event overflow and hostile inbound streams."""

from __future__ import annotations

import asyncio
import math
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest

from gossip.config import local_config
from gossip.driver import BindError, Gossip, format_addr, parse_addr
from gossip.events import EventKind, MemberEvent
from gossip.members import Addr, Member, State

MAX_FRAME = 4096


@dataclass(slots=True)
class Req:
    token: int
    addr: Addr
    data: bytes
    deadline: float
    kind: str


@dataclass
class FakeCore:
    """Implements the core contract with scripted behaviour and a call log."""

    config: object
    name: str
    addr: Addr
    now: float
    wall_offset: float
    meta: bytes = b""
    deadline: float = math.inf
    packets: list[tuple[Addr, bytes]] = field(default_factory=list)
    streams: list[Req] = field(default_factory=list)
    events: list[MemberEvent] = field(default_factory=list)
    got_packets: list[tuple[bytes, Addr]] = field(default_factory=list)
    got_streams: list[tuple[bytes, Addr]] = field(default_factory=list)
    replies: dict[int, bytes | None] = field(default_factory=dict)
    ticks: list[float] = field(default_factory=list)
    broadcasts: list[tuple[bytes, str | None]] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=lambda: {"packets_in": 0})
    on_packet: Callable[[FakeCore, bytes, Addr], None] | None = None
    on_tick: Callable[[FakeCore, float], None] | None = None
    stream_reply: Callable[[bytes], bytes | None] = lambda body: b"re:" + body
    join_addrs: list[Addr] = field(default_factory=list)
    leaving: bool = False
    left: bool = False
    next_token: int = 1

    def handle_packet(self, data: bytes, addr: Addr, now: float) -> None:
        self.got_packets.append((data, addr))
        self.stats["packets_in"] += 1
        if self.on_packet:
            self.on_packet(self, data, addr)

    def handle_stream(self, data: bytes, addr: Addr, now: float) -> bytes | None:
        self.got_streams.append((data, addr))
        return self.stream_reply(data)

    def handle_stream_reply(self, token: int, data: bytes | None, now: float) -> bool:
        self.replies[token] = data
        return data is not None and data.startswith(b"re:")

    def tick(self, now: float) -> None:
        self.ticks.append(now)
        self.deadline = math.inf
        if self.on_tick:
            self.on_tick(self, now)

    def request(self, addr: Addr, data: bytes, kind: str = "push_pull", ttl: float = 2.0) -> int:
        token = self.next_token
        self.next_token += 1
        self.streams.append(Req(token, addr, data, time.monotonic() + ttl, kind))
        return token

    def join(self, addrs: Sequence[Addr], now: float) -> list[int]:
        self.join_addrs.extend(addrs)
        return [self.request(a, b"join", "join") for a in addrs]

    def leave(self, now: float) -> None:
        self.leaving = True
        self.deadline = now + 0.02

    def leave_done(self) -> bool:
        return self.left

    def set_meta(self, meta: bytes, now: float) -> None:
        self.meta = meta
        self.deadline = now

    def queue_broadcast(self, payload: bytes, key: str | None = None) -> None:
        self.broadcasts.append((payload, key))

    def take_packets(self) -> list[tuple[Addr, bytes]]:
        out, self.packets = self.packets, []
        return out

    def take_streams(self) -> list[Req]:
        out, self.streams = self.streams, []
        return out

    def take_events(self) -> list[MemberEvent]:
        out, self.events = self.events, []
        return out

    def next_deadline(self) -> float:
        return self.deadline

    def members(self) -> list[Member]:
        return [self.member(self.name)]  # type: ignore[list-item]

    def num_alive(self) -> int:
        return 1

    def member(self, name: str) -> Member | None:
        if name != self.name:
            return None
        return Member(self.name, self.addr, self.meta, 1, State.ALIVE, self.now)


def fake_factory(
    config: object,
    *,
    name: str,
    addr: Addr,
    meta: bytes = b"",
    keyring: object = None,
    delegate: object = None,
    now: float = 0.0,
    wall_offset: float = 0.0,
) -> FakeCore:
    return FakeCore(config, name, addr, now, wall_offset, meta=meta)


def make(**kw: object) -> Gossip:
    args: dict[str, object] = {
        "name": "n1",
        "bind": ("127.0.0.1", 0),
        "core_factory": fake_factory,
        "max_frame": MAX_FRAME,
    }
    args.update(kw)
    return Gossip(local_config(), **args)  # type: ignore[arg-type]


def fake(g: Gossip) -> FakeCore:
    assert isinstance(g.core, FakeCore)
    return g.core


async def until(pred: Callable[[], bool], timeout: float = 3.0) -> None:
    """Wait on a condition with a deadline, letting the loop run in between."""
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.001)


async def echo_server(reply: Callable[[bytes], bytes]) -> tuple[asyncio.Server, Addr]:
    """A peer that answers one framed request with a framed reply."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        (n,) = struct.unpack(">I", await r.readexactly(4))
        body = await r.readexactly(n)
        out = reply(body)
        w.write(out)
        await w.drain()
        w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[:2]


def framed(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ------------------------------------------------------------------ addresses


def test_parse_addr_forms() -> None:
    assert parse_addr("127.0.0.1:7946") == ("127.0.0.1", 7946)
    assert parse_addr("[::1]:7946") == ("::1", 7946)
    assert parse_addr(("10.0.0.1", 1)) == ("10.0.0.1", 1)
    assert parse_addr("h:0", allow_zero_port=True) == ("h", 0)
    for bad in ["nohost", ":80", "::1:80", "[::1]80", "h:x", "h:70000", "h:0", "[::1"]:
        with pytest.raises(ValueError):
            parse_addr(bad)
    assert format_addr(("::1", 5)) == "[::1]:5"
    assert format_addr(("1.2.3.4", 5)) == "1.2.3.4:5"


# ------------------------------------------------------------------ lifecycle


async def test_start_binds_udp_and_tcp_on_one_port_and_advertises_it() -> None:
    async with make() as g:
        core = fake(g)
        assert g.bound is not None and g.bound[1] != 0
        assert core.addr == g.bound
        assert abs(core.now + core.wall_offset - time.time()) < 1.0
        # TCP listens on the same port
        _r, w = await asyncio.open_connection(*g.bound)
        w.close()
    async with make(advertise="10.1.2.3:7000") as g2:
        assert fake(g2).addr == ("10.1.2.3", 7000)


async def test_port_in_use_is_a_clear_oserror() -> None:
    async with make() as g:
        assert g.bound is not None
        other = make(bind=g.bound)
        with pytest.raises(BindError) as err:
            await other.start()
        assert isinstance(err.value, OSError)
        assert format_addr(g.bound) in str(err.value)
        await other.stop()


async def test_wildcard_bind_needs_advertise() -> None:
    g = make(bind=("0.0.0.0", 0))
    # Refused before any socket is bound.
    with pytest.raises(ValueError, match="advertise"):
        await g.start()
    assert not g.running
    assert g.bound is None


async def test_stop_is_idempotent_and_ends_event_stream() -> None:
    g = make()
    await g.start()
    got: list[MemberEvent] = []

    async def consume() -> None:
        async for ev in g.events():
            got.append(ev)

    t = asyncio.create_task(consume())
    await g.stop()
    await g.stop()
    await asyncio.wait_for(t, 2)
    assert got == []


# ------------------------------------------------------------------ UDP and flush


async def test_datagram_in_is_fed_and_outputs_flushed() -> None:
    loop = asyncio.get_running_loop()
    received: asyncio.Queue[bytes] = asyncio.Queue()

    class Peer(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: object) -> None:
            received.put_nowait(data)

    peer, _ = await loop.create_datagram_endpoint(Peer, local_addr=("127.0.0.1", 0))
    async with make() as g:
        core = fake(g)
        core.on_packet = lambda c, data, addr: c.packets.append((addr, b"ack:" + data))
        peer.sendto(b"ping", g.bound)
        assert await asyncio.wait_for(received.get(), 2) == b"ack:ping"
        assert core.got_packets[0][1] == peer.get_extra_info("sockname")[:2]
        assert g.stats["packets_in"] == 1
    peer.close()


async def test_timer_ticks_at_deadline_and_is_woken_by_earlier_deadline() -> None:
    async with make() as g:
        core = fake(g)
        core.deadline = time.monotonic() + 0.03
        g._flush()  # an input changed the deadline
        await until(lambda: len(core.ticks) == 1)
        assert core.ticks[0] >= core.now
        # Deadline now infinite; set_meta makes it due immediately and must wake the timer.
        g.set_meta(b"m")
        await until(lambda: len(core.ticks) == 2, timeout=1.0)
        assert core.meta == b"m"


async def test_tick_outputs_are_flushed() -> None:
    loop = asyncio.get_running_loop()
    received: asyncio.Queue[bytes] = asyncio.Queue()

    class Peer(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: object) -> None:
            received.put_nowait(data)

    peer, _ = await loop.create_datagram_endpoint(Peer, local_addr=("127.0.0.1", 0))
    dst = peer.get_extra_info("sockname")[:2]
    async with make() as g:
        core = fake(g)
        core.on_tick = lambda c, now: c.packets.append((dst, b"probe"))
        core.deadline = time.monotonic()
        g._flush()
        assert await asyncio.wait_for(received.get(), 2) == b"probe"
    peer.close()


async def test_core_exception_is_counted_not_fatal() -> None:
    async with make() as g:
        core = fake(g)

        def boom(c: FakeCore, data: bytes, addr: Addr) -> None:
            raise RuntimeError("bug")

        core.on_packet = boom
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(b"x", g.bound)
        s.close()
        await until(lambda: g.stats.get("core_errors", 0) == 1)
        assert g.running


async def test_broadcast_goes_to_core() -> None:
    async with make() as g:
        g.broadcast(b"hello", key="k")
        assert fake(g).broadcasts == [(b"hello", "k")]


# ------------------------------------------------------------------ events


async def test_event_queue_overflow_drops_oldest() -> None:
    async with make(event_queue_size=3) as g:
        core = fake(g)
        m = core.member("n1")
        assert m is not None
        core.events = [
            MemberEvent(EventKind.JOIN, m.evolve(name=f"m{i}"), float(i)) for i in range(5)
        ]
        g._flush()
        assert g.stats["events_dropped"] == 2
        it = g.events()
        names = [(await anext(it)).member.name for _ in range(3)]
        assert names == ["m2", "m3", "m4"]


# ------------------------------------------------------------------ outbound streams


async def test_outbound_stream_framing_and_reply() -> None:
    srv, addr = await echo_server(lambda body: framed(b"re:" + body))
    async with make() as g:
        core = fake(g)
        token = core.request(addr, b"state")
        g._flush()
        await until(lambda: token in core.replies)
        assert core.replies[token] == b"re:state"
        assert g.stats["tcp_out_ok"] == 1
    srv.close()


@pytest.mark.parametrize(
    "reply",
    [
        lambda body: struct.pack(">I", MAX_FRAME + 1) + b"x" * 10,  # oversize length
        lambda body: struct.pack(">I", 100) + b"short",  # early close
        lambda body: b"\x00\x00",  # truncated header
    ],
    ids=["oversize", "early-close", "short-header"],
)
async def test_outbound_bad_reply_is_failure(reply: Callable[[bytes], bytes]) -> None:
    srv, addr = await echo_server(reply)
    async with make() as g:
        core = fake(g)
        token = core.request(addr, b"state")
        g._flush()
        await until(lambda: token in core.replies)
        assert core.replies[token] is None
        assert g.stats["tcp_out_failed"] == 1
    srv.close()


async def test_outbound_timeout_reports_failure() -> None:
    hold = asyncio.Event()

    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await hold.wait()
        w.close()

    srv = await asyncio.start_server(silent, "127.0.0.1", 0)
    addr = srv.sockets[0].getsockname()[:2]
    async with make() as g:
        core = fake(g)
        token = core.request(addr, b"x", ttl=0.1)
        g._flush()
        t0 = time.monotonic()
        await until(lambda: token in core.replies)
        assert core.replies[token] is None
        assert time.monotonic() - t0 < 1.0
    hold.set()
    srv.close()


async def test_outbound_concurrency_limit_rejects_at_once() -> None:
    hold = asyncio.Event()

    async def slow(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await hold.wait()
        w.close()

    srv = await asyncio.start_server(slow, "127.0.0.1", 0)
    addr = srv.sockets[0].getsockname()[:2]
    async with make(max_outbound_streams=1) as g:
        core = fake(g)
        first = core.request(addr, b"a")
        second = core.request(addr, b"b")
        g._flush()
        # rejected synchronously within the flush
        assert core.replies == {second: None}
        assert g.stats["tcp_out_rejected"] == 1
        assert first not in core.replies
        hold.set()
        await until(lambda: first in core.replies)
    srv.close()


async def test_join_counts_successes_and_survives_unreachable() -> None:
    srv, good = await echo_server(lambda body: framed(b"re:" + body))
    srv2, refusing = await echo_server(lambda body: framed(b"no"))
    async with make() as g:
        dead = ("127.0.0.1", closed_port())
        n = await g.join([format_addr(good), dead, refusing], timeout=3)
        assert n == 1
        assert fake(g).join_addrs == [good, dead, refusing]
        assert await g.join([dead]) == 0
        assert await g.join([]) == 0
        assert await g.join(["no-such-host.invalid:7946"]) == 0
        assert g._awaited == {}
    srv.close()
    srv2.close()


# ------------------------------------------------------------------ inbound streams


async def request(addr: Addr, payload: bytes) -> bytes:
    r, w = await asyncio.open_connection(*addr)
    w.write(payload)
    await w.drain()
    w.write_eof()  # a peer that stops sending early must not hold the slot
    data = await asyncio.wait_for(r.read(), 2)
    w.close()
    return data


async def test_inbound_stream_reply_is_framed() -> None:
    async with make() as g:
        assert g.bound is not None
        assert await request(g.bound, framed(b"hello")) == framed(b"re:hello")
        core = fake(g)
        assert core.got_streams[0][0] == b"hello"
        core.stream_reply = lambda body: None
        assert await request(g.bound, framed(b"x")) == b""


async def test_bad_inbound_frames_never_crash() -> None:
    async with make() as g:
        assert g.bound is not None
        bad = [
            struct.pack(">I", MAX_FRAME + 1) + b"zz",  # oversized length
            struct.pack(">I", 0xFFFFFFFF),  # absurd length
            struct.pack(">I", 50) + b"only-some",  # early close in body
            b"\x01",  # early close in header
            b"",  # connect and close
        ]
        for payload in bad:
            assert await request(g.bound, payload) == b""
        await until(lambda: g.stats.get("tcp_in_bad", 0) == len(bad))
        assert fake(g).got_streams == []
        # still serving
        assert await request(g.bound, framed(b"ok")) == framed(b"re:ok")


async def test_inbound_read_timeout_closes() -> None:
    g = Gossip(
        local_config(tcp_timeout=0.1),
        name="n",
        bind=("127.0.0.1", 0),
        core_factory=fake_factory,
        max_frame=MAX_FRAME,
    )
    async with g:
        assert g.bound is not None
        r, w = await asyncio.open_connection(*g.bound)
        w.write(b"\x00\x00")  # never finishes the header
        assert await asyncio.wait_for(r.read(), 2) == b""
        w.close()
        assert g.stats["tcp_in_bad"] == 1


async def test_inbound_connection_limit() -> None:
    async with make(max_inbound_streams=1) as g:
        assert g.bound is not None
        _r1, w1 = await asyncio.open_connection(*g.bound)
        w1.write(b"\x00")  # holds the only slot
        await until(lambda: len(g._in_tasks) == 1)
        r2, w2 = await asyncio.open_connection(*g.bound)
        assert await asyncio.wait_for(r2.read(), 2) == b""
        assert g.stats["tcp_in_rejected"] == 1
        w1.close()
        w2.close()


# ------------------------------------------------------------------ leave


async def test_leave_waits_for_core() -> None:
    async with make() as g:
        core = fake(g)

        def done(c: FakeCore, now: float) -> None:
            c.left = c.leaving

        core.on_tick = done
        t0 = time.monotonic()
        assert await g.leave(timeout=2.0) is True
        assert time.monotonic() - t0 < 1.0


async def test_leave_times_out() -> None:
    async with make() as g:
        t0 = time.monotonic()
        assert await g.leave(timeout=0.1) is False
        assert 0.09 <= time.monotonic() - t0 < 1.0


async def test_wait_for_returns_false_on_stop() -> None:
    g = make()
    await g.start()
    waiter = asyncio.create_task(g.wait_for(lambda: False, timeout=5))
    await asyncio.sleep(0)
    await g.stop()
    assert await asyncio.wait_for(waiter, 1) is False


async def test_local_member_and_members() -> None:
    async with make(meta=b"x") as g:
        assert g.local_member.name == "n1"
        assert g.local_member.meta == b"x"
        assert [m.name for m in g.members()] == ["n1"]


# ------------------------------------------------------------------ uvloop


def test_runs_under_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> tuple[int, bytes]:
        srv, addr = await echo_server(lambda body: framed(b"re:" + body))
        async with make() as g:
            assert g.bound is not None
            n = await g.join([addr], timeout=2)
            reply = await request(g.bound, framed(b"u"))
            fake(g).deadline = time.monotonic()
            g._flush()
            await until(lambda: len(fake(g).ticks) >= 1)
        srv.close()
        return n, reply

    n, reply = uvloop.run(scenario())
    assert n == 1
    assert reply == framed(b"re:u")
