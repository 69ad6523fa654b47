"""Test helpers for the HTTP API: a fake agent over a real store, a server
thread, and raw HTTP requests that no client library tidies up first."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiohttp import web

from meshd.api import serve
from meshd.scheduler.assignment import spec_version
from meshd.spec import ServiceSpec
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
        self.members = [dict(m) for m in MEMBERS]
        self.removed: list[str] = []
        #: name -> (spec, created_ms, updated_ms)
        self.services: dict[str, tuple[ServiceSpec, int, int]] = {}
        #: Raised by the next service write (put, scale, delete, member removal).
        self.service_error: BaseException | None = None
        #: Raised by the log stream after the lines it has, to test a broken stream.
        self.log_error: BaseException | None = None
        self.logs: dict[str, list[dict[str, Any]]] = {}
        self.log_requests: list[tuple[str, int | None, bool]] = []
        #: Log streams open right now (a follower's stream closes when its client goes).
        self.followers = 0
        self._new_lines = asyncio.Condition()

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
        return [dict(m) for m in self.members]

    def leases(self) -> list[dict[str, Any]]:
        return [{"service": "web", "term": 3, "start": 1.0, "until": 3.0}]

    async def member_remove(self, node: str) -> bool:
        self._maybe_fail_service()
        member = next((m for m in self.members if m["name"] == node), None)
        if member is None:
            return False
        if member["status"] == "alive":
            raise ValueError(f"member {node!r} is alive: only a dead member can be removed")
        self.members.remove(member)
        self.removed.append(node)
        return True

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
        for m in self.members:
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

    # ----- services: an in-memory stand-in for the scheduler ---------------------------

    def _maybe_fail_service(self) -> None:
        error, self.service_error = self.service_error, None
        if error is not None:
            raise error

    def _record(self, name: str) -> dict[str, Any]:
        spec, created, updated = self.services[name]
        desired = spec.parallelism if spec.kind == "job" else spec.replicas
        return {
            "name": name,
            "kind": spec.kind,
            "version": spec_version(spec),
            "spec": spec.to_dict(),
            "replicas": {"desired": desired, "running": desired, "ready": desired},
            "leader": {"node": "n1", "term": 1},
            "pending": [],
            "update": None,
            "completed": 0,
            "created_ms": created,
            "updated_ms": updated,
        }

    async def service_put(self, spec: ServiceSpec) -> dict[str, Any]:
        self._maybe_fail_service()
        now = now_ms()
        created = self.services[spec.name][1] if spec.name in self.services else now
        self.services[spec.name] = (spec, created, now)
        self.logs.setdefault(spec.name, [])
        return self._record(spec.name)

    def service_get(self, name: str) -> dict[str, Any] | None:
        return self._record(name) if name in self.services else None

    def service_list(self) -> list[dict[str, Any]]:
        return [self._record(name) for name in sorted(self.services)]

    async def service_delete(self, name: str) -> bool:
        self._maybe_fail_service()
        if self.services.pop(name, None) is None:
            return False
        self.logs.pop(name, None)
        async with self._new_lines:
            self._new_lines.notify_all()  # followers of a removed service end
        return True

    def service_replicas(self, name: str) -> list[dict[str, Any]] | None:
        if name not in self.services:
            return None
        spec = self.services[name][0]
        version = spec_version(spec)
        count = spec.parallelism if spec.kind == "job" else spec.replicas
        nodes = ["n1", "n2"]
        return [
            {
                "id": f"{name}-{slot}-{version[:6]}",
                "service": name,
                "slot": slot,
                "node": nodes[slot % 2],
                "version": version,
                "state": "running",
                "health": "healthy" if spec.health else "none",
                "address": f"127.0.0.{slot % 2 + 1}",
                "ports": {p.name: 30000 + 10 * slot + i for i, p in enumerate(spec.ports)},
                "restarts": 0,
                "started_ms": self.services[name][2],
                "exit_code": None,
                "reason": "",
            }
            for slot in range(count)
        ]

    def service_endpoints(self, name: str) -> dict[str, Any] | None:
        if name not in self.services:
            return None
        spec = self.services[name][0]
        return {
            "service": name,
            "balance": spec.balance.to_dict(),
            "ports": [p.to_dict() for p in spec.ports],
            "endpoints": [
                {
                    "id": r["id"],
                    "node": r["node"],
                    "address": r["address"],
                    "ports": r["ports"],
                    "weight": 1,
                }
                for r in self.service_replicas(name) or []
            ],
            "listeners": [],
            "routes_version": 1,
        }

    def service_leader(self, name: str) -> dict[str, Any] | None:
        return {"node": "n1", "term": 1} if name in self.services else None

    async def service_scale(self, name: str, replicas: int) -> dict[str, Any] | None:
        self._maybe_fail_service()
        if name not in self.services:
            return None
        spec, created, _ = self.services[name]
        if spec.kind == "job":
            raise ValueError(f"{name!r} is a job: it runs to completion and is not scaled")
        self.services[name] = (ServiceSpec.from_dict({**spec.to_dict(), "replicas": replicas}),
                               created, now_ms())  # fmt: skip
        return self._record(name)

    async def emit(
        self, name: str, text: str, *, stream: str = "stdout", slot: int = 0
    ) -> dict[str, Any]:
        """Add a log line to a service (on the view's loop), waking its followers."""
        line = {
            "replica": f"{name}-{slot}",
            "node": "n1",
            "stream": stream,
            "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "text": text,
        }
        self.logs[name].append(line)
        async with self._new_lines:
            self._new_lines.notify_all()
        return line

    def service_logs(
        self, name: str, *, tail: int | None, follow: bool
    ) -> AsyncIterator[dict[str, Any]]:
        if name not in self.services:
            raise KeyError(name)
        self.log_requests.append((name, tail, follow))
        return self._lines(name, tail, follow)

    async def _lines(
        self, name: str, tail: int | None, follow: bool
    ) -> AsyncIterator[dict[str, Any]]:
        self.followers += 1
        try:
            lines = self.logs.get(name, [])
            start = 0 if tail is None else max(0, len(lines) - tail)
            for line in lines[start:]:
                yield line
            if self.log_error is not None:
                raise self.log_error
            sent = len(lines)
            while follow:
                async with self._new_lines:
                    while name in self.logs and len(self.logs[name]) <= sent:
                        await self._new_lines.wait()
                if name not in self.logs:
                    return
                for line in self.logs[name][sent:]:
                    yield line
                sent = len(self.logs[name])
        finally:
            self.followers -= 1


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
