"""The asyncio driver: real sockets and real time around the sans-IO core.

The core never touches the network or the clock. This module feeds it UDP
datagrams and TCP frames as they arrive, wakes it when its next timer is due,
and carries out what it asks for (datagrams to send, stream exchanges to run,
events to report). Every core call is followed by a flush so that nothing the
core produced waits for the next timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from .config import Config
from .crypto import SEALED_OVERHEAD, Keyring
from .events import MemberEvent
from .members import Addr, Member
from .wire import MAX_STREAM

if TYPE_CHECKING:
    from .core import Delegate, StreamRequest

log = logging.getLogger(__name__)

_LEN = struct.Struct(">I")
MAX_FRAME = MAX_STREAM + SEALED_OVERHEAD
"""Largest stream frame accepted: the largest stream message once sealed."""
_MIN_IDLE = 0.001
"""Pause when a tick leaves the deadline in the past, so a stuck timer cannot
spin the event loop."""


class BindError(OSError):
    """The gossip address could not be bound (typically: already in use)."""


class FrameError(ValueError):
    """A stream frame broke the framing rules (too long)."""


class CoreLike(Protocol):
    """What the driver needs from the core; the real one is gossip.core.Core."""

    name: str
    addr: Addr
    stats: dict[str, int]

    def handle_packet(self, data: bytes, addr: Addr, now: float) -> None: ...
    def handle_stream(self, data: bytes, addr: Addr, now: float) -> bytes | None: ...
    def handle_stream_reply(self, token: int, data: bytes | None, now: float) -> bool: ...
    def tick(self, now: float) -> None: ...
    def join(self, addrs: Sequence[Addr], now: float) -> list[int]: ...
    def leave(self, now: float) -> None: ...
    def leave_done(self) -> bool: ...
    def set_meta(self, meta: bytes, now: float) -> None: ...
    def queue_broadcast(self, payload: bytes, key: str | None = None) -> None: ...
    def take_packets(self) -> list[tuple[Addr, bytes]]: ...
    def take_streams(self) -> list[StreamRequest]: ...
    def take_events(self) -> list[MemberEvent]: ...
    def next_deadline(self) -> float: ...
    def members(self) -> list[Member]: ...
    def member(self, name: str) -> Member | None: ...
    def num_alive(self) -> int: ...


CoreFactory = Callable[..., CoreLike]


# ---------------------------------------------------------------- addresses


def parse_addr(value: Addr | str, *, allow_zero_port: bool = False) -> Addr:
    """Accept ("host", port), "host:port" or "[v6]:port"; brackets are dropped."""
    if isinstance(value, tuple):
        if len(value) < 2:
            raise ValueError(f"bad address {value!r}")
        host, port = str(value[0]), value[1]
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            end = text.find("]")
            if end < 0 or text[end + 1 : end + 2] != ":":
                raise ValueError(f"bad address {value!r}: expected [v6addr]:port")
            host, port_text = text[1:end], text[end + 2 :]
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep or not host:
                raise ValueError(f"bad address {value!r}: expected host:port")
            if ":" in host:
                raise ValueError(f"bad address {value!r}: write IPv6 as [addr]:port")
        try:
            port = int(port_text)
        except ValueError:
            raise ValueError(f"bad address {value!r}: port is not a number") from None
    else:
        raise ValueError(f"bad address {value!r}")
    if not isinstance(port, int) or not (0 <= port <= 65535):
        raise ValueError(f"bad address {value!r}: port out of range")
    if port == 0 and not allow_zero_port:
        raise ValueError(f"bad address {value!r}: port 0")
    if not host:
        raise ValueError(f"bad address {value!r}: empty host")
    return (host, port)


def format_addr(addr: Addr) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _norm(addr: Any) -> Addr:
    """Socket addresses come as (host, port) or, for IPv6, (host, port, flow, scope)."""
    return (addr[0], addr[1])


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _bound_socket(asked: Addr, addr: Addr, kind: socket.SocketKind) -> socket.socket:
    sock = socket.socket(_family(addr[0]), kind)
    try:
        if kind == socket.SOCK_STREAM:
            # A restarted member must get its port back despite TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        proto = "TCP" if kind == socket.SOCK_STREAM else "UDP"
        err = BindError(f"cannot bind {proto} {format_addr(asked)}: {exc.strerror or exc}")
        err.errno = exc.errno
        raise err from exc
    return sock


# ---------------------------------------------------------------- framing


async def read_frame(reader: asyncio.StreamReader, max_len: int) -> bytes:
    """One length-prefixed frame; raises IncompleteReadError on early close."""
    (n,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if n > max_len:
        raise FrameError(f"frame of {n} bytes exceeds {max_len}")
    return await reader.readexactly(n)


def frame(data: bytes) -> bytes:
    return _LEN.pack(len(data)) + data


def _default_core_factory() -> CoreFactory:
    from .core import Core

    return Core


# ---------------------------------------------------------------- UDP


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, owner: Gossip) -> None:
        self._owner = owner

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._owner._on_datagram(data, _norm(addr))

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable...) surface here; the failure detector
        # already notices the silence, so only count them.
        self._owner._count("udp_errors")


# ---------------------------------------------------------------- driver


class Gossip:
    """A gossip member on real sockets: UDP for probes and gossip, TCP for
    push-pull state exchange and TCP fallback pings, on the same port."""

    def __init__(
        self,
        config: Config,
        *,
        name: str,
        bind: Addr | str,
        advertise: Addr | str | None = None,
        meta: bytes = b"",
        keyring: Keyring | None = None,
        delegate: Delegate | None = None,
        event_queue_size: int = 4096,
        max_outbound_streams: int = 64,
        max_inbound_streams: int = 64,
        max_frame: int | None = None,
        core_factory: CoreFactory | None = None,
    ) -> None:
        self.config = config
        self.name = name
        self.bind = parse_addr(bind, allow_zero_port=True)
        self.advertise = parse_addr(advertise) if advertise is not None else None
        self._meta = meta
        self._keyring = keyring
        self._delegate = delegate
        self._max_out = max_outbound_streams
        self._max_in = max_inbound_streams
        self._max_frame = max_frame if max_frame is not None else MAX_FRAME
        self._core_factory = core_factory
        self._events: asyncio.Queue[MemberEvent | None] = asyncio.Queue(event_queue_size)

        self._core: CoreLike | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._server: asyncio.Server | None = None
        self._timer: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._sleep_until = -math.inf
        self._out_tasks: set[asyncio.Task[None]] = set()
        self._in_tasks: set[asyncio.Task[Any]] = set()
        self._waiters: list[asyncio.Future[None]] = []
        self._awaited: dict[int, bool | None] = {}
        self._awaited_deadlines: dict[int, float] = {}
        self._counters: dict[str, int] = {}
        self._started = False
        self._stopped = False
        self.bound: Addr | None = None
        """The address actually bound (the port is real even if 0 was asked)."""

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("Gossip.start() called twice")
        self._started = True
        addr = self.advertise or self.bind
        if _is_ip(addr[0]) and ipaddress.ip_address(addr[0]).is_unspecified:
            # Checked before binding: peers cannot reach "0.0.0.0".
            self._stopped = True
            raise ValueError(
                f"binding to the wildcard {format_addr(self.bind)} needs an advertise address"
            )
        try:
            await self._bind()
            assert self.bound is not None
            addr = self.advertise or self.bound
            factory = self._core_factory or _default_core_factory()
            mono = time.monotonic()
            self._core = factory(
                self.config,
                name=self.name,
                addr=addr,
                meta=self._meta,
                keyring=self._keyring,
                delegate=self._delegate,
                now=mono,
                wall_offset=time.time() - mono,
            )
        except BaseException:
            await self.stop()
            raise
        self._timer = asyncio.create_task(self._run_timer(), name=f"gossip-timer-{self.name}")
        self._flush()

    async def _bind(self) -> None:
        """UDP and TCP share one port. With port 0 the kernel picks the UDP
        port, and TCP may find it taken: pick again a few times. Sockets are
        bound here rather than by the loop so that every loop (uvloop too)
        reports the same clear error."""
        loop = asyncio.get_running_loop()
        host, port = self.bind
        if not _is_ip(host):
            resolved = await self._resolve((host, port), socket.AF_UNSPEC)
            if resolved is None:
                raise BindError(f"cannot bind {format_addr(self.bind)}: host not found")
            host = resolved[0]
        attempts = 20 if port == 0 else 1
        for attempt in range(attempts):
            udp_sock = _bound_socket(self.bind, (host, port), socket.SOCK_DGRAM)
            real = _norm(udp_sock.getsockname())
            try:
                tcp_sock = _bound_socket(self.bind, real, socket.SOCK_STREAM)
            except BindError:
                udp_sock.close()
                if attempt + 1 == attempts:
                    raise
                continue
            try:
                udp, _proto = await loop.create_datagram_endpoint(
                    lambda: _Datagrams(self), sock=udp_sock
                )
            except BaseException:
                udp_sock.close()
                tcp_sock.close()
                raise
            try:
                server = await asyncio.start_server(self._on_connection, sock=tcp_sock)
            except BaseException:
                udp.close()
                tcp_sock.close()
                raise
            self._udp, self._server, self.bound = udp, server, real
            return

    async def stop(self) -> None:
        """Close everything without telling anyone (use leave() first to be polite)."""
        if self._stopped:
            return
        self._stopped = True
        tasks = [t for t in (self._timer, *self._out_tasks, *self._in_tasks) if t is not None]
        current = asyncio.current_task()
        for t in tasks:
            if t is not current:
                t.cancel()
        if self._udp is not None:
            self._udp.close()
        if self._server is not None:
            self._server.close()
        for t in tasks:
            if t is not current:
                with contextlib.suppress(BaseException):
                    await t
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
        self._notify()
        self._put_event(None)

    async def __aenter__(self) -> Gossip:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------ public API

    @property
    def core(self) -> CoreLike:
        if self._core is None:
            raise RuntimeError("Gossip is not started")
        return self._core

    @property
    def running(self) -> bool:
        return self._core is not None and not self._stopped

    @property
    def local_member(self) -> Member:
        m = self.core.member(self.core.name)
        assert m is not None
        return m

    def members(self) -> list[Member]:
        return self.core.members()

    @property
    def stats(self) -> dict[str, int]:
        """The core's counters plus the driver's own: events_dropped (queue
        full, oldest dropped), tcp_out_ok/failed/rejected (outgoing streams;
        rejected = over the concurrency limit), tcp_in_bad/rejected (inbound
        streams broken or over the limit), udp_errors, udp_send_errors,
        join_unresolved and core_errors (a core call raised: a bug)."""
        return {**self.core.stats, **self._counters}

    async def join(self, addrs: Sequence[Addr | str], timeout: float | None = None) -> int:
        """Push-pull with each address; returns how many succeeded. Unreachable
        or unresolvable peers count as failures, never as errors."""
        core = self.core
        targets: list[Addr] = []
        for a in addrs:
            resolved = await self._resolve(parse_addr(a))
            if resolved is not None:
                targets.append(resolved)
        if not targets:
            return 0
        tokens = self._call(core.join, targets, time.monotonic()) or []
        for t in tokens:
            self._awaited[t] = None
        self._flush()
        try:
            if timeout is None:
                # The stream deadlines already bound every exchange; the grace
                # only covers a token the core never turned into a request.
                latest = max(
                    (self._awaited_deadlines.get(t, -math.inf) for t in tokens), default=-math.inf
                )
                if latest == -math.inf:
                    latest = time.monotonic() + self.config.tcp_timeout
                timeout = max(0.0, latest - time.monotonic()) + 1.0
            await self.wait_for(
                lambda: all(self._awaited.get(t) is not None for t in tokens), timeout
            )
            return sum(1 for t in tokens if self._awaited.get(t))
        finally:
            for t in tokens:
                self._awaited.pop(t, None)
                self._awaited_deadlines.pop(t, None)

    async def send_reliable(self, addr: Addr | str, payload: bytes) -> bool:
        """Send an application message to one member over TCP; it arrives in
        the receiver's delegate.notify_user_msg. True once delivered."""
        target = await self._resolve(parse_addr(addr))
        if target is None:
            return False
        token = self.core.send_reliable(target, payload, time.monotonic())
        self._awaited[token] = None
        self._flush()
        try:
            await self.wait_for(
                lambda: self._awaited.get(token) is not None, self.config.tcp_timeout + 1.0
            )
            return bool(self._awaited.get(token))
        finally:
            self._awaited.pop(token, None)
            self._awaited_deadlines.pop(token, None)

    async def _resolve(self, addr: Addr, family: int | None = None) -> Addr | None:
        host, port = addr
        if _is_ip(host):
            return addr
        loop = asyncio.get_running_loop()
        if family is None:
            family = _family(self.bound[0]) if self.bound else socket.AF_UNSPEC
        try:
            infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
        except OSError as exc:
            log.warning("cannot resolve %s: %s", host, exc)
            self._count("join_unresolved")
            return None
        if not infos:
            return None
        return _norm(infos[0][4])

    async def leave(self, timeout: float = 2.0) -> bool:
        """Announce a graceful leave; True once the core says it went out."""
        core = self.core
        self._call(core.leave, time.monotonic())
        self._flush()
        return await self.wait_for(core.leave_done, timeout)

    def set_meta(self, meta: bytes) -> None:
        """Raises ValueError for metadata the wire format cannot carry."""
        self.core.set_meta(meta, time.monotonic())
        self._flush()

    def broadcast(self, payload: bytes, key: str | None = None) -> None:
        self._call(self.core.queue_broadcast, payload, key)
        self._flush()

    async def events(self) -> AsyncIterator[MemberEvent]:
        """Member events in order, until stop(). Meant for one consumer."""
        while True:
            ev = await self._events.get()
            if ev is None:
                self._put_event(None)  # leave the end marker for other readers
                return
            yield ev

    async def wait_for(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        """Wait until predicate() holds, re-checking after every flush; False on
        timeout or stop. This is how callers wait on cluster state without polling."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    if self._stopped:
                        return False
                    fut: asyncio.Future[None] = loop.create_future()
                    self._waiters.append(fut)
                    await fut
        except TimeoutError:
            return predicate()
        return True

    # ------------------------------------------------------------ internals

    def _count(self, key: str, n: int = 1) -> None:
        self._counters[key] = self._counters.get(key, 0) + n

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one core call. A core exception is a bug, but it must not kill
        the socket callbacks or the timer: log it and carry on."""
        try:
            return fn(*args)
        except Exception:
            self._count("core_errors")
            log.exception("gossip core raised in %s", getattr(fn, "__name__", fn))
            return None

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def _put_event(self, ev: MemberEvent | None) -> None:
        q = self._events
        if q.full():
            q.get_nowait()
            if ev is not None:
                self._count("events_dropped")
        q.put_nowait(ev)

    def _flush(self) -> None:
        """Carry out everything the core has asked for. Rejecting a stream feeds
        the core again, so loop until it has nothing more to say."""
        core = self._core
        if core is None or self._stopped:
            return
        while True:
            packets = self._call(core.take_packets) or []
            streams = self._call(core.take_streams) or []
            events = self._call(core.take_events) or []
            if not (packets or streams or events):
                break
            udp = self._udp
            for addr, data in packets:
                try:
                    assert udp is not None
                    udp.sendto(data, addr)
                except (OSError, ValueError, TypeError) as exc:
                    self._count("udp_send_errors")
                    log.debug("sendto %s failed: %s", addr, exc)
            rejected: list[int] = []
            for req in streams:
                if req.token in self._awaited:
                    self._awaited_deadlines[req.token] = req.deadline
                if len(self._out_tasks) >= self._max_out:
                    self._count("tcp_out_rejected")
                    rejected.append(req.token)
                    continue
                task = asyncio.create_task(self._stream_out(req))
                self._out_tasks.add(task)
                task.add_done_callback(self._out_tasks.discard)
            for token in rejected:
                self._complete(token, None)
            for ev in events:
                self._put_event(ev)
        if core.next_deadline() < self._sleep_until:
            self._wake.set()
        self._notify()

    def _complete(self, token: int, body: bytes | None) -> None:
        core = self._core
        assert core is not None
        accepted = self._call(core.handle_stream_reply, token, body, time.monotonic())
        if token in self._awaited:
            self._awaited[token] = bool(accepted) and body is not None

    def _on_datagram(self, data: bytes, addr: Addr) -> None:
        core = self._core
        if core is None or self._stopped:
            return
        self._call(core.handle_packet, data, addr, time.monotonic())
        self._flush()

    async def _run_timer(self) -> None:
        core = self._core
        assert core is not None
        while True:
            now = time.monotonic()
            deadline = self._call(core.next_deadline)
            if deadline is None:
                deadline = now + 0.1
            if deadline <= now:
                self._call(core.tick, now)
                self._flush()
                after = self._call(core.next_deadline)
                await asyncio.sleep(_MIN_IDLE if after is None or after <= now else 0)
                continue
            self._wake.clear()
            self._sleep_until = deadline
            try:
                async with asyncio.timeout(None if math.isinf(deadline) else deadline - now):
                    await self._wake.wait()
            except TimeoutError:
                pass
            finally:
                self._sleep_until = -math.inf

    async def _stream_out(self, req: StreamRequest) -> None:
        body: bytes | None = None
        timeout = req.deadline - time.monotonic()
        writer: asyncio.StreamWriter | None = None
        try:
            if timeout > 0:
                async with asyncio.timeout(timeout):
                    host, port = req.addr
                    reader, writer = await asyncio.open_connection(host, port)
                    writer.write(frame(req.data))
                    await writer.drain()
                    body = await read_frame(reader, self._max_frame)
        except (OSError, TimeoutError, FrameError, asyncio.IncompleteReadError) as exc:
            log.debug("stream %s to %s failed: %r", req.kind, req.addr, exc)
            body = None
        finally:
            if writer is not None:
                writer.close()
        self._count("tcp_out_ok" if body is not None else "tcp_out_failed")
        if self._stopped:
            return
        self._complete(req.token, body)
        self._flush()

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if self._stopped or self._core is None or len(self._in_tasks) >= self._max_in:
            self._count("tcp_in_rejected")
            writer.close()
            return
        assert task is not None
        self._in_tasks.add(task)
        try:
            peer = _norm(writer.get_extra_info("peername"))
            async with asyncio.timeout(self.config.tcp_timeout):
                body = await read_frame(reader, self._max_frame)
                reply = self._call(self._core.handle_stream, body, peer, time.monotonic())
                self._flush()
                if reply is not None:
                    writer.write(frame(reply))
                    await writer.drain()
        except (OSError, TimeoutError, FrameError, asyncio.IncompleteReadError) as exc:
            self._count("tcp_in_bad")
            log.debug("inbound stream dropped: %r", exc)
        finally:
            self._in_tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
