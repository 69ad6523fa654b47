"""Test helpers for the HTTP API: a fake agent over a real store, a server
thread, and raw HTTP requests that no client library tidies up first."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from aiohttp import web

from meshd.api import serve
from meshd.state.store import Entry, Store

T = TypeVar("T")

MEMBERS = [
    {"name": "n1", "address": "127.0.0.1:7946", "status": "alive", "labels": {"zone": "a"},
     "capacity": {"cpus": 4}, "rtt_ms": None},
    {"name": "n2", "address": "127.0.0.2:7946", "status": "alive", "labels": {},
     "capacity": {"cpus": 8}, "rtt_ms": 0.4},
    {"name": "n3", "address": "127.0.0.3:7946", "status": "suspect", "labels": {},
     "capacity": {}, "rtt_ms": 12.5},
    {"name": "n4", "address": "127.0.0.4:7946", "status": "left", "labels": {},
     "capacity": {}, "rtt_ms": None},
]  # fmt: skip


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class FakeView:
    """An AgentView with canned cluster facts and a real in-memory Store."""

    def __init__(self, node: str = "n1") -> None:
        self.store = Store(node)
        self.healthy: tuple[bool, str] = (True, "")
        self.leaves = 0
        self.leave_error: BaseException | None = None
        #: Raised by the next kv_put/kv_delete, to test error mapping.
        self.write_error: BaseException | None = None
        self.info_error: BaseException | None = None
        self.gossip: dict[str, Any] = {
            "probes": 120,
            "probe_failures": 3,
            "suspicions": 2,
            "refutations": 1,
            "packets_in": 500,
            "packets_out": 480,
            "bytes_in": 64000,
            "bytes_out": 61000,
            "dropped.decrypt": 4,
            "dropped.wrong_target": 1,
            "push_pulls": 7,
            "user_msgs_in": 9,  # no specific metric: exported generically
            "weird": "not a number",  # skipped
        }
        self.replication: dict[str, Any] = {"broadcasts_sent": 5, "sync_bytes_out": 2048}

    def agent_info(self) -> dict[str, Any]:
        if self.info_error is not None:
            raise self.info_error
        return {
            "name": self.store.node,
            "address": "127.0.0.1:7946",
            "api": "127.0.0.1:7947",
            "cluster": "test",
            "version": "0.1.0",
            "labels": {"zone": "a"},
            "capacity": {"cpus": 4, "memory_bytes": 8 << 30},
            "driver": "docker",
        }

    def member_list(self) -> list[dict[str, Any]]:
        return [dict(m) for m in MEMBERS]

    def health(self) -> tuple[bool, str]:
        return self.healthy

    async def leave(self) -> None:
        self.leaves += 1
        if self.leave_error is not None:
            raise self.leave_error

    def kv_get(self, key: str) -> Entry | None:
        return self.store.get(key)

    def kv_list(self, prefix: str) -> list[Entry]:
        return self.store.list(prefix)

    async def kv_put(self, key: str, value: bytes) -> Entry:
        self._maybe_fail()
        return self.store.put(key, value, now_ms())

    async def kv_delete(self, key: str) -> Entry | None:
        self._maybe_fail()
        return self.store.delete(key, now_ms())

    def _maybe_fail(self) -> None:
        error, self.write_error = self.write_error, None
        if error is not None:
            raise error

    def stats(self) -> dict[str, Any]:
        counts = {s: 0 for s in ("alive", "suspect", "dead", "left")}
        for m in MEMBERS:
            counts[m["status"]] += 1
        return {
            "gossip": dict(self.gossip),
            "members": counts,
            "store": {
                **self.store.stats,
                "keys": len(self.store),
                "tombstones": self.store.tombstones,
            },
            "replication": dict(self.replication),
        }

    @property
    def index(self) -> int:
        return self.store.index


class ServerThread:
    """Serve an app on 127.0.0.1 (a free port) from an event loop in its own
    thread, so synchronous code (urllib, raw sockets) can talk to it."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="api-server", daemon=True)

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(10):
            raise AssertionError("the API server thread did not start within 10 s")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run coro on the server's loop (where the view lives) and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        finally:
            self.loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        try:
            runner = await serve(self.app, "127.0.0.1", 0)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self.port = runner.addresses[0][1]
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()


# ----- raw HTTP -------------------------------------------------------------------

Raw = tuple[int, dict[str, str], bytes]


def _request_bytes(
    method: str, target: str | bytes, body: bytes, headers: dict[str, str] | None
) -> bytes:
    if isinstance(target, str):
        target = target.encode("latin-1")
    head = [
        method.encode() + b" " + target + b" HTTP/1.1",
        b"Host: 127.0.0.1",
        b"Connection: close",
    ]
    for name, value in (headers or {}).items():
        head.append(f"{name}: {value}".encode("latin-1"))
    if body or method in ("PUT", "POST"):
        head.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def _parse(data: bytes) -> Raw:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def raw_request(
    port: int,
    method: str,
    target: str | bytes,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> Raw:
    """Send one request exactly as given (blocking) and return status, headers, body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(_request_bytes(method, target, body, headers))
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return _parse(b"".join(chunks))


async def raw_request_async(
    port: int,
    method: str,
    target: str | bytes,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> Raw:
    """``raw_request`` for a server on the running loop."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(_request_bytes(method, target, body, headers))
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    return _parse(data)
