"""Shared pieces of the proxy tests: loopback backends, a proxy listener, a raw HTTP client.

Every socket is on 127.0.0.1 with an ephemeral port. The socket tests run
each scenario on both the stock asyncio loop and uvloop (what meshd runs
on), so a protocol detail one loop handles differently (half-close, pause
and resume of reading) shows up in either.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import uvloop
from aiohttp import WSMsgType, web

from meshd.proxy.balancing import Endpoint
from meshd.proxy.outlier import OutlierConfig
from meshd.proxy.router import Router
from meshd.scheduler.assignment import ReplicaStatus, ServiceStatus
from meshd.spec import Balance, ServiceSpec

LOOPS = ("asyncio", "uvloop")
HOST = "127.0.0.1"


_open: list[Any] = []
"""Listeners, proxies and client connections of the running scenario, closed at its end."""


def track(thing: Any) -> Any:
    _open.append(thing)
    return thing


async def _close_tracked() -> None:
    things = list(reversed(_open))
    _open.clear()
    for thing in things:  # proxies first (their clients), then client sockets, then listeners
        if hasattr(thing, "close_all"):
            thing.close_all()
    for thing in things:
        if isinstance(thing, asyncio.StreamWriter):
            thing.transport.abort()
    for thing in things:
        if hasattr(thing, "sockets"):  # a listener (uvloop's is no asyncio.AbstractServer)
            thing.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await thing.wait_closed()


def run_on(kind: str, scenario: Callable[[], Awaitable[Any]], timeout: float = 10.0) -> Any:
    """Run one scenario on a fresh loop of the given kind, bounded in time."""

    async def main() -> Any:
        _open.clear()
        try:
            async with asyncio.timeout(timeout):
                return await scenario()
        finally:
            await _close_tracked()

    if kind == "uvloop":
        return uvloop.run(main())
    return asyncio.run(main())


def refused_port() -> int:
    """A loopback port nothing listens on: bound, read, closed."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def blackhole() -> tuple[socket.socket, list[socket.socket], int]:
    """A loopback port whose accept queue is full: a connect to it hangs (SYNs dropped).

    Close the listener and the fillers when done.
    """
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        f = socket.socket()
        f.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            f.connect((HOST, port))
        fillers.append(f)
    return listener, fillers, port


def make_router(
    ports: Iterable[tuple[str, str, int]],
    *,
    policy: str = "round_robin",
    hash_on: str = "client",
    outlier: OutlierConfig | None = None,
    clock: Callable[[], float] | None = None,
) -> Router:
    """A router over ``(id, node, port)`` replicas on loopback."""
    kwargs: dict[str, Any] = {"outlier": outlier}
    if clock is not None:
        kwargs["clock"] = clock
    router = Router("svc", "http", Balance(policy, hash_on), **kwargs)
    router.set_endpoints(tuple(Endpoint(i, node, HOST, port) for i, node, port in ports))
    return router


def assert_balanced(router: Router) -> None:
    """Every ``begin`` the proxy made was matched by an ``end``."""
    busy = {ep.id: router.policy.outstanding(ep.id) for ep in router.endpoints}
    assert not any(busy.values()), f"requests never reported as finished: {busy}"


async def serve(factory: Callable[[], asyncio.Protocol]) -> tuple[asyncio.AbstractServer, int]:
    """A proxy (or any protocol factory) listening on an ephemeral loopback port."""
    server = await asyncio.get_running_loop().create_server(factory, HOST, 0)
    track(server)
    if hasattr(factory, "close_all"):
        track(factory)
    return server, server.sockets[0].getsockname()[1]


async def connect(
    port: int, *, rcvbuf: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client connection to a loopback port; ``rcvbuf`` shrinks its kernel receive buffer
    (set before connecting, so the window is small from the start): a slow reader."""
    if rcvbuf is None:
        reader, writer = await asyncio.open_connection(HOST, port)
    else:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (HOST, port))
        reader, writer = await asyncio.open_connection(sock=sock)
    track(writer)
    return reader, writer


# ----- an aiohttp backend ---------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class HttpBackend:
    """A small HTTP replica: echoes what it got as JSON, plus a few special paths.

    ``/status/<code>`` answers that code; ``/chunked`` streams its body in
    pieces without a length; ``/big/<n>`` sends n bytes; ``/hold`` answers
    only once ``gate`` is set; ``/ws`` is a WebSocket echo; ``/echo`` sends
    the request body back as it came.
    """

    name: str
    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    holding: int = 0
    fail: int = 0
    """When set, every request is answered with this status (a sick replica)."""
    keepalive_timeout: float = 75.0
    _runner: web.AppRunner | None = None

    @property
    def hits(self) -> int:
        return len(self.seen)

    async def start(self) -> HttpBackend:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, keepalive_timeout=self.keepalive_timeout)
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def header(self, i: int, name: str) -> list[str]:
        return [v for k, v in self.seen[i].headers if k.lower() == name.lower()]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path == "/ws":
            self.seen.append(Seen(request.method, path, list(request.headers.items()), b""))
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await ws.send_str(f"{self.name}:{msg.data}")
                elif msg.type == WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)
            return ws
        body = await request.read()
        self.seen.append(Seen(request.method, path, list(request.headers.items()), body))
        headers = {"X-Backend": self.name}
        if self.fail:
            return web.Response(status=self.fail, text=self.name, headers=headers)
        if path.startswith("/status/"):
            return web.Response(status=int(path.rsplit("/", 1)[1]), text=self.name, headers=headers)
        if path == "/echo":
            return web.Response(body=body, headers=headers)
        if path.startswith("/big/"):
            return web.Response(body=b"x" * int(path.rsplit("/", 1)[1]), headers=headers)
        if path == "/hold":
            self.holding += 1
            await self.gate.wait()
            return web.Response(text=self.name, headers=headers)
        if path == "/chunked":
            resp = web.StreamResponse(headers=headers)
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for i in range(5):
                await resp.write(b"part%d;" % i)
            await resp.write_eof()
            return resp
        echo = {
            "backend": self.name,
            "method": request.method,
            "path": request.path_qs,
            "version": f"{request.version.major}.{request.version.minor}",
            "headers": [[k, v] for k, v in request.headers.items()],
            "body": body.decode("latin-1"),
        }
        return web.Response(text=json.dumps(echo), content_type="application/json", headers=headers)


@contextlib.asynccontextmanager
async def http_backends(*names: str, **kwargs: Any) -> AsyncIterator[list[HttpBackend]]:
    started: list[HttpBackend] = []
    try:
        for name in names:
            started.append(await HttpBackend(name, **kwargs).start())
        yield started
    finally:
        for b in started:
            b.gate.set()
        for b in started:
            await b.stop()


# ----- a raw backend ---------------------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawBackend:
    """A TCP server whose every connection runs ``handler``: byte-level control."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.port = 0
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> RawBackend:
        self._server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the proxy or the test's teardown cut it: that is the point
        finally:
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in self.writers:
            w.transport.abort()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t


@contextlib.asynccontextmanager
async def raw_backends(*handlers: Handler) -> AsyncIterator[list[RawBackend]]:
    started: list[RawBackend] = []
    try:
        for h in handlers:
            started.append(await RawBackend(h).start())
        yield started
    finally:
        for b in started:
            await b.stop()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request head and its sized body, as a raw backend sees them."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    body = await reader.readexactly(length) if length else b""
    return head, body


# ----- a raw client ----------------------------------------------------------------


@dataclass
class Response:
    status: int
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    framing: str
    """``length``, ``chunked``, ``close`` (read to EOF) or ``none``."""

    def get(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class RawClient:
    """Bytes to the proxy and strictly parsed responses back (pipelining, HTTP/1.0, junk)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, *, rcvbuf: int | None = None) -> RawClient:
        return cls(*await connect(port, rcvbuf=rcvbuf))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, *, head: bool = False) -> Response:
        """The next response; ``head`` for the answer to a HEAD (no body whatever it says)."""
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw[:-4].decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        assert version.startswith("HTTP/"), f"not a status line: {lines[0]!r}"
        status = int(rest.split(" ", 1)[0])
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            assert sep and name == name.strip(), f"bad header line {line!r}"
            headers.append((name, value.strip()))
        resp = Response(status, version, headers, b"", "none")
        te = resp.get("transfer-encoding")
        length = resp.get("content-length")
        if head or status in (204, 304) or 100 <= status < 200:
            return resp
        if te is not None and "chunked" in te.lower():
            resp.framing = "chunked"
            parts = []
            while True:
                size_line = await self.reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    trailer = await self.reader.readuntil(b"\r\n")
                    while trailer != b"\r\n":
                        trailer = await self.reader.readuntil(b"\r\n")
                    break
                parts.append(await self.reader.readexactly(size))
                assert await self.reader.readexactly(2) == b"\r\n", "chunk not ended by CRLF"
            resp.body = b"".join(parts)
        elif length is not None:
            resp.framing = "length"
            resp.body = await self.reader.readexactly(int(length))
        else:
            resp.framing = "close"
            resp.body = await self.reader.read()
        return resp

    async def closed(self) -> bool:
        """True once the proxy closed the connection with nothing more to say."""
        return await self.reader.read() == b""

    def close(self) -> None:
        self.writer.transport.abort()

    def reset(self) -> None:
        """Leave with a TCP reset, as a crashed client does (a plain close is a half-close)."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


def get(
    path: str = "/",
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    version: str = "1.1",
) -> bytes:
    """A request as bytes (Host set, Content-Length when there is a body)."""
    lines = [f"{method} {path} HTTP/{version}", "Host: svc.test"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body and not any(
        k.lower() in ("content-length", "transfer-encoding") for k in headers or {}
    ):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# ----- specs and statuses ----------------------------------------------------------


def make_spec(name: str, *ports: dict[str, Any], **extra: Any) -> ServiceSpec:
    """A valid spec with these ports (``{"name", "target", ...}``)."""
    data: dict[str, Any] = {"name": name, "image": "example/app", "ports": list(ports)}
    data.update(extra)
    return ServiceSpec.from_dict(data)


def replica(
    rid: str,
    *,
    state: str = "running",
    health: str = "none",
    address: str = "10.0.0.1",
    ports: dict[str, int] | None = None,
) -> ReplicaStatus:
    return ReplicaStatus(
        id=rid,
        slot=0,
        version="v1",
        state=state,  # type: ignore[arg-type]
        health=health,  # type: ignore[arg-type]
        address=address,
        ports={"http": 31000} if ports is None else ports,
    )


def make_status(node: str, service: str, *replicas: ReplicaStatus) -> ServiceStatus:
    return ServiceStatus(node=node, service=service, term=1, replicas=replicas)
