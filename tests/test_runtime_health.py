"""Health tracking rules (virtual time) and probes against loopback servers."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
from aiohttp import web

from meshd.runtime.base import DriverError
from meshd.runtime.health import (
    HealthTracker,
    probe_exec,
    probe_http,
    probe_tcp,
    run_probe,
)
from meshd.spec import Health

# -- the tracker ------------------------------------------------------------------


def check(**kw: object) -> Health:
    base: dict[str, object] = {"kind": "tcp", "port": "web", "interval": 5.0, "retries": 3}
    base.update(kw)
    return Health(**base)  # type: ignore[arg-type]


def feed(tracker: HealthTracker, results: list[tuple[float, bool]]) -> list[str]:
    return [tracker.on_result(ok, now) for now, ok in results]


def test_starts_starting_and_first_success_makes_healthy() -> None:
    t = HealthTracker(check(), started_at=100.0)
    assert t.state == "starting" and not t.needs_restart
    assert t.on_result(True, 105.0) == "healthy"
    assert t.failures == 0 and t.checks == 1


def test_failures_in_start_period_do_not_count() -> None:
    t = HealthTracker(check(start_period=30.0, retries=2), started_at=0.0)
    states = feed(t, [(5.0, False), (10.0, False), (15.0, False), (29.9, False)])
    assert states == ["starting"] * 4
    assert t.failures == 0 and not t.needs_restart
    # After the start period failures count: two of them make it unhealthy.
    assert t.on_result(False, 30.0) == "starting"
    assert t.on_result(False, 35.0) == "unhealthy"
    assert t.needs_restart


def test_success_ends_start_period_early() -> None:
    t = HealthTracker(check(start_period=60.0, retries=2), started_at=0.0)
    assert t.on_result(True, 5.0) == "healthy"
    assert not t.in_start_period(10.0)
    assert t.on_result(False, 10.0) == "healthy"
    assert t.on_result(False, 15.0) == "unhealthy"


def test_no_start_period_counts_from_the_first_check() -> None:
    t = HealthTracker(check(retries=3), started_at=0.0)
    assert feed(t, [(5.0, False), (10.0, False), (15.0, False)]) == [
        "starting",
        "starting",
        "unhealthy",
    ]


def test_retries_need_consecutive_failures() -> None:
    t = HealthTracker(check(retries=3), started_at=0.0)
    t.on_result(True, 5.0)
    states = feed(t, [(10, False), (15, False), (20, True), (25, False), (30, False)])
    assert states == ["healthy"] * 5
    assert t.failures == 2
    assert t.on_result(False, 35.0) == "unhealthy"
    assert t.needs_restart


def test_recovers_after_unhealthy() -> None:
    t = HealthTracker(check(retries=1), started_at=0.0)
    assert t.on_result(False, 5.0, "connection refused") == "unhealthy"
    assert t.last_message == "connection refused" and t.last_ok is False
    assert t.on_result(True, 10.0) == "healthy"
    assert not t.needs_restart and t.failures == 0


def test_next_due_follows_interval_from_start_and_each_result() -> None:
    t = HealthTracker(check(interval=5.0), started_at=100.0)
    assert t.next_due(100.0) == 100.02  # quick checks until the first success
    t.on_result(False, 100.02)
    assert t.next_due(100.02) == pytest.approx(100.06)  # gaps double, up to 0.25 s
    assert t.next_due(107.0) == 107.0  # overdue: run now
    t.on_result(True, 106.5)  # a check that took a while
    assert t.next_due(106.5) == 111.5


def test_quick_checks_before_first_success_count_failures_once_per_interval() -> None:
    t = HealthTracker(check(interval=2.0, retries=2), started_at=0.0)
    now = 0.0
    while t.state == "starting":
        now = t.next_due(now)
        t.on_result(False, now)
    assert t.state == "unhealthy" and 4.0 <= now < 4.5  # two intervals, not two quick checks
    t2 = HealthTracker(check(interval=10.0), started_at=0.0)
    t2.on_result(False, 0.25)
    assert t2.on_result(True, 0.5) == "healthy"


def test_virtual_clock_drives_checks() -> None:
    """A controller loop on virtual time: down for 12s out of a 60s run."""
    t = HealthTracker(check(interval=2.0, retries=3, start_period=4.0), started_at=0.0)
    now = 0.0
    seen: list[tuple[float, str]] = []
    while now < 60.0:
        now = t.next_due(now)
        ok = not (1.0 <= now < 5.0 or 20.0 <= now < 32.0)
        state = t.on_result(ok, now)
        if not seen or seen[-1][1] != state:
            seen.append((now, state))
    # Up at 0.02 (a quick check finds it); the 1-5 s outage costs only two
    # failures (checks every 2 s), short of 3 retries; the 20-32 s one counts.
    assert [(round(t, 2), state) for t, state in seen] == [
        (0.02, "healthy"),
        (24.02, "unhealthy"),
        (32.02, "healthy"),
    ]


# -- probes against loopback servers ----------------------------------------------


async def _handler_ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _handler_fail(request: web.Request) -> web.Response:
    return web.Response(status=500, text="broken")


async def _handler_redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound("/ok")


@pytest.fixture
async def http_server() -> AsyncIterator[tuple[int, asyncio.Event, list[str]]]:
    """aiohttp on 127.0.0.1:0 with /ok, /fail, /moved and /slow (waits until teardown)."""
    release = asyncio.Event()
    paths: list[str] = []

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="late")

    @web.middleware
    async def record(request: web.Request, handler: Callable[..., Awaitable[web.StreamResponse]]):
        paths.append(request.raw_path)
        return await handler(request)

    app = web.Application(middlewares=[record])
    app.router.add_get("/ok", _handler_ok)
    app.router.add_get("/fail", _handler_fail)
    app.router.add_get("/moved", _handler_redirect)
    app.router.add_get("/slow", slow)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield port, release, paths
    finally:
        release.set()
        await runner.cleanup()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound but not listening: connections are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def test_http_2xx_is_ok(http_server: tuple[int, asyncio.Event, list[str]]) -> None:
    port, _, _ = http_server
    ok, message = await probe_http("127.0.0.1", port, "/ok", 2.0)
    assert ok, message
    assert "HTTP 200" in message


async def test_http_5xx_fails(http_server: tuple[int, asyncio.Event, list[str]]) -> None:
    port, _, _ = http_server
    ok, message = await probe_http("127.0.0.1", port, "/fail", 2.0)
    assert not ok
    assert "HTTP 500" in message


async def test_http_3xx_is_ok_and_not_followed(
    http_server: tuple[int, asyncio.Event, list[str]],
) -> None:
    port, _, paths = http_server
    ok, message = await probe_http("127.0.0.1", port, "/moved", 2.0)
    assert ok and "HTTP 302" in message
    assert paths == ["/moved"]


async def test_http_404_fails(http_server: tuple[int, asyncio.Event, list[str]]) -> None:
    port, _, _ = http_server
    ok, message = await probe_http("127.0.0.1", port, "/missing", 2.0)
    assert not ok and "HTTP 404" in message


async def test_http_path_with_spaces_is_quoted(
    http_server: tuple[int, asyncio.Event, list[str]],
) -> None:
    port, _, paths = http_server
    ok, message = await probe_http("127.0.0.1", port, "/a b\r\nX: y?q=1", 2.0)
    assert not ok and "HTTP 404" in message
    assert paths == ["/a%20b%0D%0AX:%20y?q=1"]


async def test_http_timeout(http_server: tuple[int, asyncio.Event, list[str]]) -> None:
    port, _, _ = http_server
    ok, message = await probe_http("127.0.0.1", port, "/slow", 0.2)
    assert not ok
    assert "timed out after 0.2s" in message


async def test_http_refused(closed_port: int) -> None:
    ok, message = await probe_http("127.0.0.1", closed_port, "/", 2.0)
    assert not ok
    assert "connection refused" in message


async def _raw_server(reply: bytes) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(reply)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.parametrize(
    ("reply", "expect"),
    [
        (b"", "closed without a response"),
        (b"SSH-2.0-OpenSSH\r\n", "not an HTTP response"),
        (b"HTTP/1.1 abc\r\n\r\n", "not an HTTP response"),
        (b"HTTP/1.1 " + b"2" * 20000 + b"\r\n", "http"),
    ],
)
async def test_http_bad_answers_fail_cleanly(reply: bytes, expect: str) -> None:
    server = await _raw_server(reply)
    try:
        port = server.sockets[0].getsockname()[1]
        ok, message = await probe_http("127.0.0.1", port, "/", 2.0)
    finally:
        server.close()
        await server.wait_closed()
    assert not ok
    assert expect in message
    assert len(message) < 300


async def test_http_minimal_status_line_ok() -> None:
    server = await _raw_server(b"HTTP/1.0 204\r\n\r\n")
    try:
        port = server.sockets[0].getsockname()[1]
        ok, message = await probe_http("127.0.0.1", port, "/", 2.0)
    finally:
        server.close()
        await server.wait_closed()
    assert ok and message.endswith("HTTP 204")


async def test_tcp_ok_and_refused(
    http_server: tuple[int, asyncio.Event, list[str]], closed_port: int
) -> None:
    port, _, _ = http_server
    assert await probe_tcp("127.0.0.1", port, 2.0) == (True, f"tcp {port}: connected")
    ok, message = await probe_tcp("127.0.0.1", closed_port, 2.0)
    assert not ok and "connection refused" in message


@pytest.mark.parametrize("port", [0, 70000, -1, True])
async def test_bad_port_numbers_fail_cleanly(port: int) -> None:
    ok, message = await probe_tcp("127.0.0.1", port, 1.0)
    assert not ok and "not a port number" in message
    ok, message = await probe_http("127.0.0.1", port, "/", 1.0)
    assert not ok and "not a port number" in message


# -- exec ---------------------------------------------------------------------------


def fake_run(code: int = 0, output: str = "", error: Exception | None = None, hang: bool = False):
    calls: list[tuple[tuple[str, ...], float]] = []

    async def run(argv: tuple[str, ...], timeout: float) -> tuple[int, str]:
        calls.append((argv, timeout))
        if hang:
            await asyncio.Event().wait()
        if error is not None:
            raise error
        return code, output

    run.calls = calls  # type: ignore[attr-defined]
    return run


async def test_exec_exit_zero_ok() -> None:
    run = fake_run(0, "all good\n")
    ok, message = await probe_exec(run, ("check", "--quick"), 1.5)
    assert ok and message == "exec: exit 0: all good"
    assert run.calls == [(("check", "--quick"), 1.5)]  # type: ignore[attr-defined]


async def test_exec_nonzero_fails_with_output() -> None:
    ok, message = await probe_exec(fake_run(3, "db down\nmore " + "x" * 1000), ("c",), 1.0)
    assert not ok
    assert message.startswith("exec: exit 3: db down more")
    assert len(message) <= 220


async def test_exec_driver_error_fails() -> None:
    ok, message = await probe_exec(fake_run(error=DriverError("exec timed out")), ("c",), 1.0)
    assert (ok, message) == (False, "exec: exec timed out")


async def test_exec_hanging_driver_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("meshd.runtime.health._EXEC_GRACE", 0.0)
    ok, message = await probe_exec(fake_run(hang=True), ("c",), 0.05)
    assert (ok, message) == (False, "exec: timed out after 0.05s")


# -- run_probe picks by kind --------------------------------------------------------


async def test_run_probe_http_and_tcp(
    http_server: tuple[int, asyncio.Event, list[str]], closed_port: int
) -> None:
    port, _, _ = http_server
    ports = {"web": port, "admin": closed_port}
    ok, _ = await run_probe(
        Health(kind="http", port="web", path="/ok", timeout=1.0), host="127.0.0.1", ports=ports
    )
    assert ok
    ok, message = await run_probe(
        Health(kind="http", port="web", path="/fail", timeout=1.0), host="127.0.0.1", ports=ports
    )
    assert not ok and "500" in message
    ok, _ = await run_probe(Health(kind="tcp", port="web"), host="127.0.0.1", ports=ports)
    assert ok
    ok, message = await run_probe(Health(kind="tcp", port="admin"), host="127.0.0.1", ports=ports)
    assert not ok and "refused" in message


async def test_run_probe_missing_port() -> None:
    ok, message = await run_probe(Health(kind="tcp", port="web"), host="127.0.0.1", ports={})
    assert not ok and "no host port named 'web'" in message


async def test_run_probe_exec() -> None:
    run = fake_run(1, "nope")
    health = Health(kind="exec", command=("sh", "-c", "exit 1"), timeout=0.5)
    ok, message = await run_probe(health, host="127.0.0.1", ports={}, exec_fn=run)
    assert (ok, message) == (False, "exec: exit 1: nope")
    assert run.calls == [(("sh", "-c", "exit 1"), 0.5)]  # type: ignore[attr-defined]
    ok, message = await run_probe(health, host="127.0.0.1", ports={})
    assert not ok and "cannot run commands" in message


async def test_run_probe_feeds_tracker(http_server: tuple[int, asyncio.Event, list[str]]) -> None:
    port, _, _ = http_server
    health = Health(kind="http", port="web", path="/fail", retries=2, timeout=1.0)
    tracker = HealthTracker(health, started_at=0.0)
    for now in (10.0, 20.0):  # failures count once per interval (10 s by default)
        ok, message = await run_probe(health, host="127.0.0.1", ports={"web": port})
        tracker.on_result(ok, now, message)
    assert tracker.needs_restart
    assert "HTTP 500" in tracker.last_message
