"""TcpProxy on loopback: forwarding, spread, retry on refusal, half-close, backpressure, drops."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from conftest import async_wait_for
from proxy_fixtures import (
    assert_balanced,
    blackhole,
    connect,
    make_router,
    raw_backends,
    refused_port,
    serve,
)

from meshd.proxy.outlier import OutlierConfig
from meshd.proxy.router import Router
from meshd.proxy.tcp import TcpProxy

pytestmark = pytest.mark.integration

Run = Callable[..., Any]
MB = 1024 * 1024


# ----- backends ----------------------------------------------------------------------


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


def named(name: str) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """Says its name, then echoes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(name.encode() + b"\n")
        await writer.drain()
        await echo(reader, writer)

    return handler


async def count_then_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads to the client's EOF, then says how much and what it got, and closes."""
    digest = hashlib.sha256()
    n = 0
    while data := await reader.read(65536):
        n += len(data)
        digest.update(data)
    writer.write(b"%d %s" % (n, digest.hexdigest().encode()))
    await writer.drain()


async def ready_then_count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Says ``ready`` first: a client that waits for it knows the proxy has connected."""
    writer.write(b"ready\n")
    await writer.drain()
    await count_then_answer(reader, writer)


async def proxy_for(router: Router | None, connect_timeout: float = 1.0) -> tuple[TcpProxy, int]:
    proxy = TcpProxy(router, connect_timeout=connect_timeout)
    _, port = await serve(proxy)
    return proxy, port


async def who(port: int) -> tuple[str, asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await connect(port)
    name = (await reader.readline()).decode().strip()
    return name, reader, writer


# ----- forwarding and spread ---------------------------------------------------------------


def test_bytes_flow_both_ways(run: Run) -> None:
    async def scenario() -> None:
        async with raw_backends(echo) as (b,):
            router = make_router([("a", "n1", b.port)])
            proxy, port = await proxy_for(router)
            reader, writer = await connect(port)
            for i in range(20):
                writer.write(b"line %d\n" % i)
                assert await reader.readline() == b"line %d\n" % i
            assert proxy.active() == 1
            writer.close()
            await async_wait_for(lambda: proxy.active() == 0, timeout=2.0)
            assert proxy.stats["connections"] == 1
            assert_balanced(router)

    run(scenario)


def test_round_robin_spreads_connections_evenly(run: Run) -> None:
    async def scenario() -> None:
        async with raw_backends(named("a"), named("b"), named("c")) as bs:
            router = make_router([(n, "n" + n, b.port) for n, b in zip("abc", bs, strict=True)])
            _, port = await proxy_for(router)
            names = Counter()
            for _ in range(30):
                name, _, writer = await who(port)
                names[name] += 1
                writer.close()
            assert names == {"a": 10, "b": 10, "c": 10}

    run(scenario)


def test_hash_on_client_keeps_a_client_on_one_replica(run: Run) -> None:
    async def scenario() -> None:
        async with raw_backends(named("a"), named("b"), named("c")) as bs:
            router = make_router(
                [(n, "n" + n, b.port) for n, b in zip("abc", bs, strict=True)], policy="hash"
            )
            _, port = await proxy_for(router)
            names = set()
            for _ in range(12):
                name, _, writer = await who(port)
                names.add(name)
                writer.close()
            assert len(names) == 1

    run(scenario)


def test_large_transfers_arrive_intact(run: Run) -> None:
    async def scenario() -> None:
        async with raw_backends(ready_then_count) as (b,):
            _, port = await proxy_for(make_router([("a", "n1", b.port)]))
            reader, writer = await connect(port)
            assert await reader.readline() == b"ready\n"
            data = bytes(range(256)) * (8 * MB // 256)
            writer.write(data)
            await writer.drain()
            writer.write_eof()
            answer = await reader.read()
            assert answer == b"%d %s" % (len(data), hashlib.sha256(data).hexdigest().encode())

    run(scenario)


# ----- failures --------------------------------------------------------------------------


def test_a_refusing_replica_is_skipped_for_another(run: Run) -> None:
    async def scenario() -> None:
        async with raw_backends(named("good")) as (b,):
            router = make_router([("dead", "n1", refused_port()), ("good", "n2", b.port)])
            proxy, port = await proxy_for(router)
            name, _, writer = await who(port)  # round robin tries "dead" first
            assert name == "good"
            assert proxy.stats["connect_failures"] == 1
            writer.close()
            await async_wait_for(lambda: proxy.active() == 0, timeout=2.0)
            assert_balanced(router)

    run(scenario)


def test_refusals_eject_the_replica(run: Run) -> None:
    async def scenario() -> None:
        router = None
        async with raw_backends(named("good")) as (b,):
            router = make_router(
                [("dead", "n1", refused_port()), ("good", "n2", b.port)],
                outlier=OutlierConfig(consecutive=2),
            )
            proxy, port = await proxy_for(router)
            for _ in range(6):
                name, _, writer = await who(port)
                assert name == "good"
                writer.close()
            assert proxy.stats["connect_failures"] == 2
            assert [ep.id for ep in router.active] == ["good"]

    run(scenario)


def test_a_replica_that_does_not_accept_times_out_and_another_is_tried(run: Run) -> None:
    async def scenario() -> None:
        listener, fillers, hole = blackhole()
        try:
            async with raw_backends(count_then_answer) as (b,):
                router = make_router([("hole", "n1", hole), ("good", "n2", b.port)])
                proxy, port = await proxy_for(router, connect_timeout=0.2)
                reader, writer = await connect(port)
                writer.write(b"sent before any replica answered")  # held, then delivered
                writer.write_eof()
                answer = await reader.read()
                assert answer.startswith(b"32 ")
                assert proxy.stats["connect_failures"] == 1
        finally:
            listener.close()
            for f in fillers:
                f.close()

    run(scenario)


def test_much_data_before_the_upstream_connects_still_flows(run: Run) -> None:
    async def scenario() -> None:
        listener, fillers, hole = blackhole()
        try:
            async with raw_backends(count_then_answer) as (b,):
                router = make_router([("hole", "n1", hole), ("good", "n2", b.port)])
                _, port = await proxy_for(router, connect_timeout=0.2)
                reader, writer = await connect(port)
                data = b"y" * MB
                writer.write(data)
                async with asyncio.timeout(1.0):
                    await writer.drain()
                    writer.write_eof()
                    answer = await reader.read()
                assert answer.startswith(b"%d " % len(data))
        finally:
            listener.close()
            for f in fillers:
                f.close()

    run(scenario)


def test_no_replica_closes_the_client(run: Run) -> None:
    async def scenario() -> None:
        for router in (None, make_router([])):
            proxy, port = await proxy_for(router)
            reader, _ = await connect(port)
            assert await reader.read() == b""
            assert proxy.stats["no_endpoint"] == 1
            await async_wait_for(lambda p=proxy: p.active() == 0, timeout=2.0)

    run(scenario)


def test_all_replicas_refusing_closes_the_client_after_three_tries(run: Run) -> None:
    async def scenario() -> None:
        router = make_router([(f"r{i}", f"n{i}", refused_port()) for i in range(4)])
        proxy, port = await proxy_for(router)
        reader, _ = await connect(port)
        assert await reader.read() == b""
        assert proxy.stats["connect_failures"] == 3
        assert proxy.stats["no_endpoint"] == 1
        assert_balanced(router)

    run(scenario)


def test_a_client_leaving_at_once_leaves_nothing_behind(run: Run) -> None:
    async def scenario() -> None:
        async with raw_backends(echo) as (b,):
            router = make_router([("a", "n1", b.port)], policy="least_conn")
            proxy, port = await proxy_for(router)
            for _ in range(20):
                _, writer = await connect(port)
                writer.transport.abort()
            await async_wait_for(lambda: proxy.active() == 0, timeout=2.0)
            await async_wait_for(lambda: router.policy.outstanding("a") == 0, timeout=2.0)

    run(scenario)


# ----- half-close ----------------------------------------------------------------------------


def test_client_half_close_reaches_the_replica_and_its_answer_comes_back(run: Run) -> None:
    async def scenario() -> None:
        async with raw_backends(count_then_answer) as (b,):
            proxy, port = await proxy_for(make_router([("a", "n1", b.port)]))
            reader, writer = await connect(port)
            writer.write(b"12345")
            await writer.drain()
            writer.write_eof()  # the replica answers only after it sees this
            assert (await reader.read()).startswith(b"5 ")
            await async_wait_for(lambda: proxy.active() == 0, timeout=2.0)

    run(scenario)


def test_replica_half_close_reaches_the_client_which_may_still_send(run: Run) -> None:
    got: list[bytes] = []

    async def speaks_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"banner")
        await writer.drain()
        writer.write_eof()
        got.append(await reader.read())

    async def scenario() -> None:
        async with raw_backends(speaks_first) as (b,):
            proxy, port = await proxy_for(make_router([("a", "n1", b.port)]))
            reader, writer = await connect(port)
            assert await reader.read() == b"banner"  # EOF seen by the client
            writer.write(b"still talking")
            await writer.drain()
            writer.write_eof()
            await async_wait_for(lambda: got == [b"still talking"], timeout=2.0)
            await async_wait_for(lambda: proxy.active() == 0, timeout=2.0)

    run(scenario)


# ----- backpressure ------------------------------------------------------------------------------


def test_a_slow_client_pauses_the_replica_instead_of_buffering(run: Run) -> None:
    total = 16 * MB

    async def scenario() -> None:
        async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            chunk = b"z" * 65536
            for _ in range(total // len(chunk)):
                writer.write(chunk)
                await writer.drain()

        async with raw_backends(firehose) as (b,):
            proxy, port = await proxy_for(make_router([("a", "n1", b.port)]))
            reader, writer = await connect(port, rcvbuf=16384)
            client = await async_wait_for(lambda: next(iter(proxy.clients), None), timeout=2.0)
            await async_wait_for(
                lambda: client.upstream is not None and not client.upstream.is_reading(),
                timeout=5.0,
                message="the proxy pauses reading the replica",
            )
            assert client.transport.get_write_buffer_size() < 2 * MB
            n = 0
            while data := await reader.read(MB):
                n += len(data)
                if n >= total:
                    break
            assert n == total
            writer.close()

    run(scenario)


def test_a_slow_replica_pauses_the_client_instead_of_buffering(run: Run) -> None:
    total = 16 * MB

    async def scenario() -> None:
        gate = asyncio.Event()

        async def late_reader(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"ready\n")
            await writer.drain()
            await gate.wait()
            await count_then_answer(reader, writer)

        async with raw_backends(late_reader) as (b,):
            proxy, port = await proxy_for(make_router([("a", "n1", b.port)]))
            reader, writer = await connect(port)
            assert await reader.readline() == b"ready\n"
            data = b"q" * total
            writer.write(data)
            client = await async_wait_for(lambda: next(iter(proxy.clients), None), timeout=2.0)
            await async_wait_for(
                lambda: client.upstream is not None and not client.transport.is_reading(),
                timeout=5.0,
                message="the proxy pauses reading the client",
            )
            assert client.upstream.get_write_buffer_size() < 2 * MB
            gate.set()
            await writer.drain()
            writer.write_eof()
            assert (await reader.read()).startswith(b"%d " % total)

    run(scenario)


# ----- dropping nodes --------------------------------------------------------------------------


def test_drop_nodes_cuts_only_connections_to_those_nodes(run: Run) -> None:
    async def scenario() -> None:
        async with raw_backends(named("a"), named("b")) as (a, b):
            router = make_router([("a", "n1", a.port), ("b", "n2", b.port)])
            proxy, port = await proxy_for(router)
            conns = [await who(port) for _ in range(3)]
            assert [c[0] for c in conns] == ["a", "b", "a"]
            assert proxy.drop_nodes({"n3"}) == 0
            assert proxy.drop_nodes({"n1"}) == 2
            for name, reader, _ in conns:
                if name == "a":
                    with contextlib.suppress(ConnectionResetError):  # aborted: may be a reset
                        assert await reader.read() == b""
            _, reader, writer = conns[1]
            writer.write(b"ping\n")
            assert await reader.readline() == b"ping\n"
            await async_wait_for(lambda: proxy.active() == 1, timeout=2.0)
            proxy.close_all()
            assert await reader.read() == b""
            await async_wait_for(lambda: proxy.active() == 0, timeout=2.0)
            assert_balanced(router)

    run(scenario)
