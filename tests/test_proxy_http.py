"""HttpProxy on loopback: spread, headers, bodies, keep-alive, retries, errors, upgrades.

Backends are small aiohttp apps, or raw servers where a test needs a replica
that misbehaves at the byte level; clients are aiohttp or a raw stream for
pipelining, HTTP/1.0 and junk.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import socket
import struct
import termios
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from conftest import async_wait_for
from proxy_fixtures import (
    HOST,
    HttpBackend,
    RawClient,
    Response,
    assert_balanced,
    get,
    http_backends,
    make_router,
    raw_backends,
    read_request,
    refused_port,
    serve,
)

from meshd.proxy.http import RETRY_BODY_LIMIT, HttpProxy, HttpTimeouts
from meshd.proxy.outlier import OutlierConfig
from meshd.proxy.router import Router

pytestmark = pytest.mark.integration

Run = Callable[..., Any]
MB = 1024 * 1024


async def proxy_for(
    router: Router | None, timeouts: HttpTimeouts | None = None
) -> tuple[HttpProxy, int]:
    proxy = HttpProxy("svc", router, timeouts)
    _, port = await serve(proxy)
    return proxy, port


def routed(*backends: HttpBackend, **kwargs: Any) -> Router:
    """A router over aiohttp backends, each on its own node ``n-<name>``."""
    return make_router([(b.name, f"n-{b.name}", b.port) for b in backends], **kwargs)


def echoed(resp: Response) -> dict[str, Any]:
    return json.loads(resp.body)


def header(echo: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in echo["headers"] if k.lower() == name.lower()]


@contextlib.asynccontextmanager
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# ----- spread and keep-alive ----------------------------------------------------------------


def test_round_robin_spreads_requests_evenly(run: Run) -> None:
    async def scenario() -> None:
        async with http_backends("a", "b", "c") as bs:
            router = routed(*bs)
            proxy, port = await proxy_for(router)
            got: Counter[str] = Counter()
            async with client() as s:
                for _ in range(30):
                    async with s.get(f"http://{HOST}:{port}/") as r:
                        assert r.status == 200
                        got[r.headers["X-Backend"]] += 1
            assert got == {"a": 10, "b": 10, "c": 10}
            assert [b.hits for b in bs] == [10, 10, 10]
            assert proxy.stats["requests"] == 30
            assert_balanced(router)

    run(scenario)


def test_replica_connections_are_kept_alive_and_reused(run: Run) -> None:
    async def scenario() -> None:
        async with http_backends("a") as bs:
            proxy, port = await proxy_for(routed(*bs))
            for _ in range(3):  # three clients, one after the other
                c = await RawClient.connect(port)
                for _ in range(4):
                    await c.send(get("/"))
                    assert (await c.response()).status == 200
                c.close()
            assert proxy.stats["pool_new"] == 1
            assert proxy.stats["pool_reused"] == 11
            assert proxy.pool.count() == 1

    run(scenario)


def test_hash_on_a_header_keeps_a_key_on_one_replica(run: Run) -> None:
    async def scenario() -> None:
        async with http_backends("a", "b", "c") as bs:
            router = routed(*bs, policy="hash", hash_on="header:X-User")
            _, port = await proxy_for(router)
            owners: dict[str, set[str]] = {}
            async with client() as s:
                for _ in range(3):
                    for user in range(12):
                        headers = {"x-user": f"user-{user}"}
                        async with s.get(f"http://{HOST}:{port}/", headers=headers) as r:
                            owners.setdefault(f"user-{user}", set()).add(r.headers["X-Backend"])
            assert all(len(o) == 1 for o in owners.values()), owners
            assert len(set().union(*owners.values())) >= 2  # keys spread over replicas

    run(scenario)


def test_hash_on_a_cookie_keeps_a_session_on_one_replica(run: Run) -> None:
    async def scenario() -> None:
        async with http_backends("a", "b", "c") as bs:
            router = routed(*bs, policy="hash", hash_on="cookie:sid")
            _, port = await proxy_for(router)
            c = await RawClient.connect(port)
            owners: dict[str, set[str]] = {}
            for _ in range(2):
                for sid in range(10):
                    cookie = f"theme=dark; sid=s{sid}; lang=en"
                    await c.send(get("/", headers={"Cookie": cookie}))
                    owners.setdefault(str(sid), set()).add((await c.response()).get("x-backend"))
            assert all(len(o) == 1 for o in owners.values()), owners
            assert len(set().union(*owners.values())) >= 2

    run(scenario)


# ----- headers -----------------------------------------------------------------------


def test_forwarding_headers_are_added(run: Run) -> None:
    async def scenario() -> None:
        async with http_backends("a") as bs:
            _, port = await proxy_for(routed(*bs))
            c = await RawClient.connect(port)
            await c.send(get("/path?q=1"))
            first = echoed(await c.response())
            assert first["path"] == "/path?q=1"
            assert header(first, "x-forwarded-for") == ["127.0.0.1"]
            assert header(first, "x-forwarded-proto") == ["http"]
            assert header(first, "x-forwarded-host") == ["svc.test"]
            assert header(first, "host") == ["svc.test"]
            await c.send(get("/"))
            second = echoed(await c.response())
            ids = header(first, "x-request-id") + header(second, "x-request-id")
            assert len(ids) == 2 and ids[0] and ids[0] != ids[1]

    run(scenario)


def test_forwarding_headers_from_the_client_are_kept_or_extended(run: Run) -> None:
    async def scenario() -> None:
        async with http_backends("a") as bs:
            _, port = await proxy_for(routed(*bs))
            c = await RawClient.connect(port)
            await c.send(
                get(
                    "/",
                    headers={
                        "X-Forwarded-For": "203.0.113.7",
                        "X-Forwarded-Proto": "https",
                        "X-Forwarded-Host": "public.example",
                        "X-Request-Id": "abc-123",
                    },
                )
            )
            echo = echoed(await c.response())
            assert header(echo, "x-forwarded-for") == ["203.0.113.7, 127.0.0.1"]
            assert header(echo, "x-forwarded-proto") == ["https"]
            assert header(echo, "x-forwarded-host") == ["public.example"]
            assert header(echo, "x-request-id") == ["abc-123"]

    run(scenario)


def test_every_x_forwarded_for_line_is_kept(run: Run) -> None:
    async def scenario() -> None:
        async with http_backends("a") as bs:
            _, port = await proxy_for(routed(*bs))
            c = await RawClient.connect(port)
            await c.send(
                b"GET / HTTP/1.1\r\nHost: x\r\n"
                b"X-Forwarded-For: 198.51.100.1\r\nX-Forwarded-For: 203.0.113.7\r\n\r\n"
            )
            echo = echoed(await c.response())
            assert header(echo, "x-forwarded-for") == ["198.51.100.1, 203.0.113.7, 127.0.0.1"]

    run(scenario)


def test_hop_by_hop_request_headers_are_dropped(run: Run) -> None:
    async def scenario() -> None:
        async with http_backends("a") as bs:
            _, port = await proxy_for(routed(*bs))
            c = await RawClient.connect(port)
            await c.send(
                get(
                    "/",
                    headers={
                        "Connection": "keep-alive, X-Private",
                        "Keep-Alive": "timeout=5",
                        "Proxy-Connection": "keep-alive",
                        "TE": "trailers",
                        "Trailer": "X-Checksum",
                        "Upgrade": "h2c",
                        "X-Private": "secret",
                        "X-Public": "fine",
                    },
                )
            )
            echo = echoed(await c.response())
            names = {k.lower() for k, _ in echo["headers"]}
            for gone in ("keep-alive", "proxy-connection", "te", "trailer", "upgrade", "x-private"):
                assert gone not in names
            assert header(echo, "x-public") == ["fine"]
            assert header(echo, "connection") in ([], ["keep-alive"])

    run(scenario)


def test_hop_by_hop_response_headers_are_dropped(run: Run) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(
                b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n"
                b"X-Fine: 1\r\nContent-Length: 2\r\n\r\nok"
            )
            await writer.drain()

    async def scenario() -> None:
        async with raw_backends(answer) as (b,):
            _, port = await proxy_for(make_router([("a", "n1", b.port)]))
            c = await RawClient.connect(port)
            await c.send(get("/"))
            resp = await c.response()
            assert resp.body == b"ok"
            assert resp.get("x-fine") == "1"
            assert resp.get("keep-alive") is None
            assert resp.get("connection") is None

    run(scenario)


@pytest.mark.parametrize(
    "lines",
    [
        b"Connection: keep-alive\r\nX-Fine: 1\r\nConnection: close-ish\r\n",  # two lines
        b"connection: keep-alive, X-Secret\r\nX-Secret: s\r\nX-Fine: 1\r\n",  # names one
        b"X-Fine: 1\r\nTrailer: X-T\r\n",  # no Connection, another hop-by-hop
        b"X-Fine: 1\r\nConnection: keep-alive\r\n",  # the usual case
    ],
)
def test_response_hop_by_hop_lines_go_in_every_shape(run: Run, lines: bytes) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\n" + lines + b"Content-Length: 2\r\n\r\nok")
            await writer.drain()

    async def scenario() -> None:
        async with raw_backends(answer) as (b,):
            _, port = await proxy_for(make_router([("a", "n1", b.port)]))
            c = await RawClient.connect(port)
            for _ in range(2):  # and the connection goes on
                await c.send(get("/"))
                resp = await c.response()
                assert resp.body == b"ok" and resp.get("x-fine") == "1"
                for gone in ("connection", "x-secret", "trailer"):
                    assert resp.get(gone) is None, gone

    run(scenario)


# ----- bodies ----------------------------------------------------------------------------


def test_sized_and_chunked_request_bodies_arrive_whole(run: Run) -> None:
    async def scenario() -> None:
        async with http_backends("a") as bs:
            router = routed(*bs)
            _, port = await proxy_for(router)
            big = bytes(range(256)) * (MB // 256)

            async def pieces() -> AsyncIterator[bytes]:
                for i in range(50):
                    yield b"piece %d;" % i

            async with client() as s:
                async with s.post(f"http://{HOST}:{port}/echo", data=big) as r:
                    assert r.status == 200 and await r.read() == big
                async with s.post(f"http://{HOST}:{port}/echo", data=pieces()) as r:
                    assert r.status == 200
                    assert await r.read() == b"".join(b"piece %d;" % i for i in range(50))
            assert bs[0].header(1, "transfer-encoding") == ["chunked"]
            assert_balanced(router)

    run(scenario)


def test_chunked_and_large_responses_stream_back(run: Run) -> None:
    async def scenario() -> None:
        async with http_backends("a") as bs:
            _, port = await proxy_for(routed(*bs))
            c = await RawClient.connect(port)
            await c.send(get("/chunked"))
            resp = await c.response()
            assert resp.framing == "chunked"
            assert resp.body == b"part0;part1;part2;part3;part4;"
            await c.send(get(f"/big/{4 * MB}"))
            resp = await c.response()
            assert resp.framing == "length" and len(resp.body) == 4 * MB

    run(scenario)


def test_a_body_delimited_by_close_reaches_the_client(run: Run) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it, up to the close")
        await writer.drain()

    async def scenario() -> None:
        async with raw_backends(answer) as (b,):
            router = make_router([("a", "n1", b.port)])
            _, port = await proxy_for(router)
            c = await RawClient.connect(port)
            await c.send(get("/"))
            resp = await c.response()
            assert resp.framing == "close"
            assert resp.body == b"all of it, up to the close"
            assert_balanced(router)

    run(scenario)


def test_head_204_and_304_have_no_body_and_the_connection_goes_on(run: Run) -> None:
    async def scenario() -> None:
        async with http_backends("a") as bs:
            _, port = await proxy_for(routed(*bs))
            c = await RawClient.connect(port)
            await c.send(get("/big/1000", method="HEAD"))
            head = await c.response(head=True)
            assert head.status == 200 and head.get("content-length") == "1000"
            for code in (204, 304):
                await c.send(get(f"/status/{code}"))
                assert (await c.response()).status == code
            await c.send(get("/echo", method="POST", body=b"after"))
            resp = await c.response()
            assert resp.body == b"after"

    run(scenario)


@pytest.mark.parametrize("request_line", [b"HEAD / HTTP/1.1", b"GET /304 HTTP/1.1"])
def test_bodiless_responses_with_a_chunked_head_add_nothing(run: Run, request_line: bytes) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await read_request(reader)
            if head.startswith((b"HEAD", b"GET /304")):
                code = b"304 Not Modified" if b"/304" in head else b"200 OK"
                writer.write(b"HTTP/1.1 %s\r\nTransfer-Encoding: chunked\r\n\r\n" % code)
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")
            await writer.drain()

    async def scenario() -> None:
        async with raw_backends(answer) as (b,):
            _, port = await proxy_for(make_router([("a", "n1", b.port)]))
            c = await RawClient.connect(port)
            await c.send(request_line + b"\r\nHost: x\r\n\r\n")
            await c.response(head=True)
            await c.send(get("/"))
            async with asyncio.timeout(1.0):
                resp = await c.response()
            assert resp.body == b"next"

    run(scenario)


def test_expect_100_continue(run: Run) -> None:
    async def scenario() -> None:
        async with http_backends("a") as bs:
            _, port = await proxy_for(routed(*bs))
            c = await RawClient.connect(port)
            await c.send(
                get(
                    "/echo", method="PUT", headers={"Expect": "100-continue", "Content-Length": "5"}
                )
            )
            interim = await c.response()
            assert interim.status == 100
            await c.send(b"hello")
            resp = await c.response()
            assert resp.status == 200 and resp.body == b"hello"
            url = f"http://{HOST}:{port}/echo"
            async with client() as s, s.post(url, data=b"abc", expect100=True) as r:
                assert r.status == 200 and await r.read() == b"abc"

    run(scenario)


# ----- HTTP/1.0 and pipelining ------------------------------------------------------------------


def test_http10_client_gets_a_closed_connection_and_no_chunks(run: Run) -> None:
    async def scenario() -> None:
        async with http_backends("a") as bs:
            _, port = await proxy_for(routed(*bs))
            c = await RawClient.connect(port)
            await c.send(get("/", version="1.0"))
            resp = await c.response()
            assert resp.status == 200 and resp.get("connection") == "close"
            assert echoed(resp)["version"] == "1.1"  # the replica is spoken to in 1.1
            assert await c.closed()
            c = await RawClient.connect(port)
            await c.send(get("/chunked", version="1.0"))
            resp = await c.response()
            assert resp.get("transfer-encoding") is None
            assert resp.framing == "close"
            assert resp.body == b"part0;part1;part2;part3;part4;"

    run(scenario)


def test_http10_keep_alive_is_honoured(run: Run) -> None:
    async def scenario() -> None:
        async with http_backends("a") as bs:
            _, port = await proxy_for(routed(*bs))
            c = await RawClient.connect(port)
            for _ in range(3):
                await c.send(get("/", version="1.0", headers={"Connection": "keep-alive"}))
                resp = await c.response()
                assert resp.status == 200 and resp.get("connection") == "keep-alive"

    run(scenario)


def test_connection_close_from_the_client_is_honoured(run: Run) -> None:
    async def scenario() -> None:
        async with http_backends("a") as bs:
            proxy, port = await proxy_for(routed(*bs))
            c = await RawClient.connect(port)
            await c.send(get("/", headers={"Connection": "close"}))
            resp = await c.response()
            assert resp.status == 200 and resp.get("connection") == "close"
            assert await c.closed()
            assert proxy.pool.count() == 1  # the replica's connection is still good

    run(scenario)


def test_a_replica_closing_after_its_answer_is_not_pooled(run: Run) -> None:
    async def one_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    async def scenario() -> None:
        async with raw_backends(one_and_close) as (b,):
            router = make_router([("a", "n1", b.port)])
            proxy, port = await proxy_for(router)
            c = await RawClient.connect(port)
            for _ in range(3):
                await c.send(get("/"))
                resp = await c.response()
                assert resp.body == b"ok" and resp.get("connection") is None  # client kept
            assert b.connections == 3
            assert proxy.stats["pool_reused"] == 0 and proxy.stats["retries"] == 0
            assert_balanced(router)

    run(scenario)


def test_a_refused_upgrade_leaves_the_connection_usable(run: Run) -> None:
    seen: list[bytes] = []

    async def no_upgrades(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await read_request(reader)
            seen.append(head.split(b"\r\n")[0])
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async def scenario() -> None:
        async with raw_backends(no_upgrades) as (b,):
            _, port = await proxy_for(make_router([("a", "n1", b.port)]))
            c = await RawClient.connect(port)
            await c.send(get("/", headers={"Connection": "Upgrade", "Upgrade": "websocket"}))
            first = await c.response()
            assert first.status == 200
            with contextlib.suppress(ConnectionError):
                await c.send(get("/second"))
            async with asyncio.timeout(0.5):
                if first.get("connection") == "close":
                    assert await c.closed()
                    assert seen == [b"GET / HTTP/1.1"]
                else:
                    assert (await c.response()).status == 200

    run(scenario)


def test_pipelined_requests_are_answered_in_order(run: Run) -> None:
    async def scenario() -> None:
        async with http_backends("a", "b") as bs:
            router = routed(*bs)
            _, port = await proxy_for(router)
            c = await RawClient.connect(port)
            await c.send(
                get("/hold")
                + get("/first")
                + get("/echo", method="POST", body=b"third")
                + get("/fourth")
            )
            await async_wait_for(lambda: bs[0].holding == 1, timeout=2.0)
            bs[0].gate.set()
            assert (await c.response()).body == b"a"
            assert echoed(await c.response())["path"] == "/first"
            assert (await c.response()).body == b"third"
            assert echoed(await c.response())["path"] == "/fourth"
            assert_balanced(router)

    run(scenario)


def test_many_pipelined_requests_beyond_the_queue_limit(run: Run) -> None:
    async def scenario() -> None:
        async with http_backends("a", "b", "c") as bs:
            _, port = await proxy_for(routed(*bs))
            c = await RawClient.connect(port)
            await c.send(b"".join(get(f"/r?i={i}") for i in range(100)))
            for i in range(100):
                assert echoed(await c.response())["path"] == f"/r?i={i}"

    run(scenario)


def test_a_pipelined_chunked_request_keeps_its_framing(run: Run) -> None:
    async def scenario() -> None:
        async with http_backends("a") as bs:
            _, port = await proxy_for(routed(*bs))
            c = await RawClient.connect(port)
            await c.send(
                get("/hold")
                + b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            )
            await async_wait_for(lambda: bs[0].holding == 1, timeout=2.0)
            bs[0].gate.set()
            assert (await c.response()).status == 200
            resp = await c.response()
            assert (resp.status, resp.body) == (200, b"hello world")

    run(scenario)


def test_a_large_body_waits_for_the_connection_then_flows(run: Run) -> None:
    async def scenario() -> None:
        async with http_backends("a") as bs:
            router = routed(*bs)
            _, port = await proxy_for(router)
            body = b"b" * (RETRY_BODY_LIMIT * 8)
            c = await RawClient.connect(port)
            await c.send(get("/echo", method="POST", body=body))
            resp = await c.response()
            assert resp.body == body
            await c.send(get("/"))
            assert (await c.response()).status == 200
            assert_balanced(router)

    run(scenario)


def _queued(sock: Any, request: int) -> int:
    """Bytes in a socket's kernel queue (FIONREAD: to read, TIOCOUTQ: not yet sent)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0"))[0]


def test_a_pooled_connection_is_never_left_paused(run: Run) -> None:
    """The final bytes of a response fill a slow client's buffer: the replica's
    connection goes back to the pool and must still be read from."""
    body = 2 * MB

    async def scenario() -> None:
        gate = asyncio.Event()
        sockets: list[Any] = []

        async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sockets.append(writer.get_extra_info("socket"))
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(body // 65536):
                writer.write(b"10000\r\n" + b"x" * 65536 + b"\r\n")
            await writer.drain()
            await gate.wait()  # the last piece comes in one segment, on cue
            writer.write(b"4000\r\n" + b"y" * 16384 + b"\r\n0\r\n\r\n")
            while True:
                await writer.drain()
                await read_request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

        async with raw_backends(backend) as (b,):
            proxy, port = await proxy_for(make_router([("a", "n1", b.port)]))
            slow = await RawClient.connect(port, rcvbuf=4096)  # reads nothing until told
            client_side = await async_wait_for(lambda: next(iter(proxy.clients), None))
            client_side.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
            )
            client_side.transport.set_write_buffer_limits(high=64 * MB)  # no pause yet
            await slow.send(get("/"))
            ex = await async_wait_for(lambda: client_side.current())
            upstream = await async_wait_for(lambda: ex.conn)
            up_sock = upstream.transport.get_extra_info("socket")

            def body_read_by_the_proxy_and_partly_held() -> bool:
                return (
                    b.writers[0].transport.get_write_buffer_size() == 0
                    and _queued(sockets[0], termios.TIOCOUTQ) == 0
                    and _queued(up_sock, termios.FIONREAD) == 0
                    and client_side.transport.get_write_buffer_size() > 0
                )

            await async_wait_for(body_read_by_the_proxy_and_partly_held)
            held = client_side.transport.get_write_buffer_size()
            client_side.transport.set_write_buffer_limits(high=held + 2)
            gate.set()  # the last chunk tips the client's buffer over the mark
            await async_wait_for(lambda: proxy.stats["requests"] == 1)
            assert len((await slow.response()).body) == body + 16384
            assert [c.transport.is_reading() for cs in proxy.pool.idle.values() for c in cs] == [
                True
            ]
            other = await RawClient.connect(port)
            await other.send(get("/"))
            async with asyncio.timeout(0.5):
                assert (await other.response()).body == b"ok"

    run(scenario)


# ----- retries --------------------------------------------------------------------------------


async def close_on_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads one request and hangs up without a byte of answer."""
    await read_request(reader)


def test_a_refused_connect_is_retried_on_another_replica(run: Run) -> None:
    async def scenario() -> None:
        async with http_backends("good") as (good,):
            router = make_router([("dead", "n1", refused_port()), ("good", "n2", good.port)])
            proxy, port = await proxy_for(router)
            c = await RawClient.connect(port)
            await c.send(get("/"))
            resp = await c.response()
            assert resp.status == 200 and resp.get("x-backend") == "good"
            assert proxy.stats["connect_failures"] == 1
            assert proxy.stats["retries"] == 1
            assert_balanced(router)

    run(scenario)


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE", "OPTIONS"])
def test_idempotent_requests_cut_before_an_answer_are_retried(run: Run, method: str) -> None:
    async def scenario() -> None:
        async with raw_backends(close_on_request) as (closer,), http_backends("good") as (good,):
            router = make_router([("closer", "n1", closer.port), ("good", "n2", good.port)])
            proxy, port = await proxy_for(router)
            c = await RawClient.connect(port)
            await c.send(get("/echo", method=method, body=b"same body" if method == "PUT" else b""))
            resp = await c.response(head=method == "HEAD")
            assert resp.status == 200 and resp.get("x-backend") == "good"
            assert closer.connections == 1
            if method == "PUT":
                assert good.seen[0].body == b"same body"
            assert proxy.stats["retries"] == 1
            assert_balanced(router)

    run(scenario)


def test_a_post_cut_before_an_answer_is_not_retried(run: Run) -> None:
    async def scenario() -> None:
        async with raw_backends(close_on_request) as (closer,), http_backends("good") as (good,):
            router = make_router([("closer", "n1", closer.port), ("good", "n2", good.port)])
            proxy, port = await proxy_for(router)
            c = await RawClient.connect(port)
            await c.send(get("/echo", method="POST", body=b"charge the card"))
            resp = await c.response()
            assert resp.status == 502
            assert good.hits == 0
            assert proxy.stats["retries"] == 0 and proxy.stats["errors_502"] == 1
            await c.send(get("/"))  # the client connection is still good
            assert (await c.response()).status == 200
            assert_balanced(router)

    run(scenario)


def test_a_body_too_large_to_keep_is_not_retried(run: Run) -> None:
    async def scenario() -> None:
        async with raw_backends(close_on_request) as (closer,), http_backends("good") as (good,):
            router = make_router([("closer", "n1", closer.port), ("good", "n2", good.port)])
            proxy, port = await proxy_for(router)
            c = await RawClient.connect(port)
            await c.send(get("/echo", method="PUT", body=b"p" * (RETRY_BODY_LIMIT * 4)))
            assert (await c.response()).status == 502
            assert good.hits == 0 and proxy.stats["retries"] == 0
            assert_balanced(router)

    run(scenario)


def second_request_closes(
    answered: list[int],
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """Answers the first request of each connection and hangs up on the second: what a
    replica closing an idle keep-alive connection looks like to a proxy that reuses it."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        answered.append(1)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_request(reader)

    return handler


def test_a_stale_pooled_connection_is_retried_on_another_replica(run: Run) -> None:
    async def scenario() -> None:
        answered: list[int] = []
        async with (
            raw_backends(second_request_closes(answered)) as (a,),
            http_backends("b") as (b,),
        ):
            router = make_router([("a", "n1", a.port), ("b", "n2", b.port)])
            proxy, port = await proxy_for(router)
            c = await RawClient.connect(port)
            for _ in range(3):  # a, b, then a's pooled connection, which a hangs up
                await c.send(get("/"))
                assert (await c.response()).status == 200
            assert len(answered) == 1 and b.hits == 2
            assert proxy.stats["pool_reused"] == 2  # a's stale one, then b's for the retry
            assert router.outliers.ejections_total == 0
            assert_balanced(router)

    run(scenario)


def test_a_stale_pooled_connection_is_retried_on_the_same_replica(run: Run) -> None:
    async def scenario() -> None:
        answered: list[int] = []
        async with raw_backends(second_request_closes(answered)) as (a,):
            router = make_router([("a", "n1", a.port)])
            _, port = await proxy_for(router)
            c = await RawClient.connect(port)
            await c.send(get("/"))
            assert (await c.response()).status == 200
            await c.send(get("/"))  # the pooled connection is hung up: a new one must do
            resp = await c.response()
            assert resp.status == 200, resp.body

    run(scenario)


def test_502_when_every_replica_refuses_after_three_tries(run: Run) -> None:
    async def scenario() -> None:
        router = make_router([(f"r{i}", f"n{i}", refused_port()) for i in range(4)])
        proxy, port = await proxy_for(router)
        c = await RawClient.connect(port)
        await c.send(get("/"))
        resp = await c.response()
        assert resp.status == 502
        assert proxy.stats["connect_failures"] == 3 and proxy.stats["retries"] == 2
        two = make_router([("x", "n1", refused_port()), ("y", "n2", refused_port())])
        proxy, port = await proxy_for(two)
        c = await RawClient.connect(port)
        await c.send(get("/"))
        assert (await c.response()).status == 502
        await c.send(get("/"))  # keep-alive survives an error answer
        assert (await c.response()).status == 502
        assert_balanced(router)
        assert_balanced(two)

    run(scenario)


def test_a_garbage_answer_is_a_502(run: Run) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SMTP READY\r\n\r\n")
        await writer.drain()
        await reader.read()

    async def scenario() -> None:
        async with raw_backends(garbage) as (b,):
            router = make_router([("a", "n1", b.port)])
            proxy, port = await proxy_for(router)
            c = await RawClient.connect(port)
            await c.send(get("/"))
            assert (await c.response()).status == 502
            assert proxy.stats["bad_responses"] == 1
            assert_balanced(router)

    run(scenario)


# ----- no replica, timeouts, ejection ----------------------------------------------------------------


def test_503_without_a_replica(run: Run) -> None:
    async def scenario() -> None:
        for router in (None, make_router([])):
            proxy, port = await proxy_for(router)
            for _ in range(2):
                c = await RawClient.connect(port)
                await c.send(get("/"))
                resp = await c.response()
                assert resp.status == 503 and b"no healthy replica of svc" in resp.body
                c.close()
            assert proxy.stats["errors_503"] == proxy.stats["no_endpoint"] == 2

    run(scenario)


def test_503_keeps_a_keep_alive_connection(run: Run) -> None:
    async def scenario() -> None:
        _, port = await proxy_for(make_router([]))
        c = await RawClient.connect(port)
        for _ in range(2):
            await c.send(get("/"))
            resp = await c.response()
            assert resp.status == 503 and resp.get("connection") is None

    run(scenario)


def test_504_when_the_replica_does_not_answer_in_time(run: Run) -> None:
    async def scenario() -> None:
        async with http_backends("slow", "fast") as (slow, fast):
            router = routed(slow, fast, outlier=OutlierConfig(consecutive=1))
            proxy, port = await proxy_for(router, HttpTimeouts(response=0.2))
            c = await RawClient.connect(port)
            await c.send(get("/hold"))
            await async_wait_for(lambda: slow.holding == 1, timeout=2.0)
            proxy.sweep(time.monotonic())  # not yet
            assert proxy.stats["timeouts"] == 0
            proxy.sweep(time.monotonic() + 1)
            resp = await c.response()
            assert resp.status == 504
            assert proxy.stats["timeouts"] == 1 and proxy.stats["errors_504"] == 1
            assert [ep.id for ep in router.active] == ["fast"]  # the timeout counted
            await c.send(get("/"))  # same client connection, next request
            resp = await c.response()
            assert resp.status == 200 and resp.get("x-backend") == "fast"
            assert_balanced(router)

    run(scenario)


def test_a_slow_answer_inside_the_deadline_is_not_cut(run: Run) -> None:
    async def scenario() -> None:
        async with http_backends("a") as bs:
            proxy, port = await proxy_for(routed(*bs), HttpTimeouts(response=30.0))
            c = await RawClient.connect(port)
            await c.send(get("/hold"))
            await async_wait_for(lambda: bs[0].holding == 1, timeout=2.0)
            proxy.sweep(time.monotonic() + 1)
            bs[0].gate.set()
            assert (await c.response()).status == 200

    run(scenario)


def test_consecutive_5xx_eject_a_replica(run: Run) -> None:
    async def scenario() -> None:
        async with http_backends("sick", "well") as (sick, well):
            sick.fail = 500
            router = routed(sick, well, outlier=OutlierConfig(consecutive=3))
            proxy, port = await proxy_for(router)
            statuses: Counter[int] = Counter()
            async with client() as s:
                for _ in range(20):
                    async with s.get(f"http://{HOST}:{port}/") as r:
                        statuses[r.status] += 1
            assert statuses == {500: 3, 200: 17}  # 5xx answers pass through, not retried
            assert sick.hits == 3
            assert [ep.id for ep in router.active] == ["well"]
            assert proxy.stats["responses_5xx"] == 3

    run(scenario)


# ----- upgrades ----------------------------------------------------------------------------


def test_websocket_passes_through(run: Run) -> None:
    async def scenario() -> None:
        async with http_backends("a", "b") as bs:
            router = routed(*bs)
            proxy, port = await proxy_for(router)
            async with client() as s:
                async with s.ws_connect(f"http://{HOST}:{port}/ws") as ws:
                    for i in range(5):
                        await ws.send_str(f"m{i}")
                        msg = await ws.receive()
                        assert msg.type == aiohttp.WSMsgType.TEXT and msg.data == f"a:m{i}"
                    await ws.send_bytes(b"\x00\x01" * 40000)
                    msg = await ws.receive()
                    assert msg.data == b"\x00\x01" * 40000
                assert proxy.stats["upgrades"] == 1
                async with s.get(f"http://{HOST}:{port}/") as r:  # plain requests go on
                    assert r.status == 200
            assert_balanced(router)

    run(scenario)


def test_a_closed_websocket_releases_its_connections(run: Run) -> None:
    async def scenario() -> None:
        async with http_backends("a") as bs:
            proxy, port = await proxy_for(routed(*bs))
            async with client() as s, s.ws_connect(f"http://{HOST}:{port}/ws") as ws:
                await ws.send_str("x")
                assert (await ws.receive()).data == "a:x"
            await async_wait_for(lambda: proxy.active() == 0, timeout=0.5)

    run(scenario)


def test_drop_nodes_cuts_a_websocket_tunnel(run: Run) -> None:
    async def scenario() -> None:
        async with http_backends("a") as bs:
            proxy, port = await proxy_for(routed(*bs))
            async with client() as s, s.ws_connect(f"http://{HOST}:{port}/ws") as ws:
                await ws.send_str("x")
                assert (await ws.receive()).data == "a:x"
                assert proxy.drop_nodes({"n-a"}) == 1
                msg = await ws.receive()
                assert msg.type in (
                    aiohttp.WSMsgType.CLOSE,
                    aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.ERROR,
                )

    run(scenario)


# ----- bad input, idle clients, drops ------------------------------------------------------------------


@pytest.mark.parametrize(
    "junk",
    [b"NOT AN HTTP REQUEST\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n"],
)
def test_a_malformed_request_is_answered_400_counted_and_closed(run: Run, junk: bytes) -> None:
    async def scenario() -> None:
        async with http_backends("a") as bs:
            proxy, port = await proxy_for(routed(*bs))
            c = await RawClient.connect(port)
            await c.send(junk)
            resp = await c.response()
            assert resp.status == 400 and resp.get("connection") == "close"
            assert await c.closed()
            assert proxy.stats["bad_requests"] == 1
            assert bs[0].hits == 0
            await async_wait_for(lambda: proxy.active() == 0, timeout=2.0)

    run(scenario)


def test_sweep_closes_idle_clients_and_idle_or_unrouted_pooled_connections(run: Run) -> None:
    async def scenario() -> None:
        async with http_backends("a") as bs:
            timeouts = HttpTimeouts(client_idle=5.0, pool_idle=10.0)
            proxy, port = await proxy_for(routed(*bs), timeouts)
            c = await RawClient.connect(port)
            await c.send(get("/"))
            assert (await c.response()).status == 200
            now = time.monotonic()
            live = {(HOST, bs[0].port)}
            proxy.sweep(now, live)
            assert proxy.active() == 1 and proxy.pool.count() == 1
            proxy.sweep(now + 6, live)  # the client has been idle too long
            assert await c.closed()
            assert proxy.pool.count() == 1
            proxy.sweep(now + 6, set())  # the replica left the routes
            assert proxy.pool.count() == 0
            c = await RawClient.connect(port)
            await c.send(get("/"))
            assert (await c.response()).status == 200
            later = time.monotonic()
            proxy.sweep(later, live)  # a sweep starts a pooled connection's idle clock
            assert proxy.pool.count() == 1
            proxy.sweep(later + 11, live)  # pooled too long
            assert proxy.pool.count() == 0

    run(scenario)


def test_drop_nodes_retries_requests_in_flight_elsewhere(run: Run) -> None:
    async def scenario() -> None:
        async with http_backends("a", "b") as (a, b):
            b.gate.set()  # b answers /hold at once
            router = routed(a, b)
            proxy, port = await proxy_for(router)
            c = await RawClient.connect(port)
            await c.send(get("/hold"))  # to a, on a new connection
            await async_wait_for(lambda: a.holding == 1, timeout=2.0)
            assert proxy.drop_nodes({"n-b"}) == 0
            router.set_endpoints(tuple(ep for ep in router.endpoints if ep.node != "n-a"))
            assert proxy.drop_nodes({"n-a"}) == 1
            resp = await c.response()
            assert resp.status == 200 and resp.get("x-backend") == "b"
            assert_balanced(router)

    run(scenario)


def test_drop_nodes_retries_requests_on_pooled_connections_and_closes_idle_ones(run: Run) -> None:
    async def scenario() -> None:
        async with http_backends("a", "b", "c") as (a, b, c_):
            b.gate.set()
            c_.gate.set()
            router = routed(a, b, c_)
            proxy, port = await proxy_for(router)
            first = await RawClient.connect(port)
            for _ in range(3):  # leaves one pooled connection to each replica
                await first.send(get("/"))
                assert (await first.response()).status == 200
            second = await RawClient.connect(port)
            await second.send(get("/hold"))  # to a, on its pooled connection
            await async_wait_for(lambda: a.holding == 1, timeout=2.0)
            assert proxy.stats["pool_reused"] == 1
            router.set_endpoints(tuple(ep for ep in router.endpoints if ep.node != "n-a"))
            assert proxy.drop_nodes({"n-a"}) == 1
            resp = await second.response()
            assert resp.status == 200 and resp.get("x-backend") in ("b", "c")
            proxy.drop_nodes({"n-c"})  # no request in flight there: its idle connection goes
            assert all(port != c_.port for _, port in proxy.pool.idle)
            assert_balanced(router)

    run(scenario)


def test_a_client_leaving_mid_request_leaves_nothing_behind(run: Run) -> None:
    async def scenario() -> None:
        async with http_backends("a") as bs:
            router = routed(*bs)
            proxy, port = await proxy_for(router)
            for i in range(5):
                c = await RawClient.connect(port)
                await c.send(get("/hold"))
                await async_wait_for(lambda n=i + 1: bs[0].holding == n, timeout=2.0)
                c.reset()  # while the replica works on it
            await async_wait_for(lambda: proxy.active() == 0, timeout=2.0)
            assert_balanced(router)
            assert proxy.pool.count() == 0  # cut connections are not pooled

    run(scenario)


def test_a_client_half_close_still_gets_its_answer(run: Run) -> None:
    async def scenario() -> None:
        async with http_backends("a") as bs:
            router = routed(*bs)
            proxy, port = await proxy_for(router)
            c = await RawClient.connect(port)
            await c.send(get("/hold"))
            c.writer.write_eof()  # nothing more to ask
            await async_wait_for(lambda: bs[0].holding == 1, timeout=2.0)
            bs[0].gate.set()
            resp = await c.response()
            assert resp.body == b"a" and resp.get("connection") == "close"
            assert await c.closed()
            await async_wait_for(lambda: proxy.active() == 0, timeout=2.0)
            assert_balanced(router)

    run(scenario)


def test_a_client_half_close_gets_every_pipelined_answer(run: Run) -> None:
    async def scenario() -> None:
        async with http_backends("a") as bs:
            _, port = await proxy_for(routed(*bs))
            c = await RawClient.connect(port)
            await c.send(get("/hold") + get("/second"))
            c.writer.write_eof()
            await async_wait_for(lambda: bs[0].holding == 1, timeout=2.0)
            bs[0].gate.set()
            assert (await c.response()).body == b"a"
            last = await c.response()
            assert echoed(last)["path"] == "/second" and last.get("connection") == "close"

    run(scenario)


def test_close_all_closes_clients_and_the_pool(run: Run) -> None:
    async def scenario() -> None:
        async with http_backends("a") as bs:
            proxy, port = await proxy_for(routed(*bs))
            c = await RawClient.connect(port)
            await c.send(get("/"))
            await c.response()
            proxy.close_all()
            assert await c.closed()
            assert proxy.pool.count() == 0

    run(scenario)
