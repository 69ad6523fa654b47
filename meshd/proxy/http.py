"""L7 forwarding: HTTP/1.1 requests spread one by one over a service's replicas.

Why not an aiohttp server plus an aiohttp client: that pair builds request
and response objects, header multidicts and futures for every request, and
reached about an eighth of HAProxy's rate here. This proxy is two asyncio
protocols around llhttp (``httptools``): the client side parses requests,
rewrites only the head and writes it to a pooled keep-alive connection to the
chosen replica; the upstream side parses the response, rewrites its head and
streams the body back. Nothing is awaited on the fast path when a pooled
connection is idle.

What it does for each request:
- adds ``X-Forwarded-For`` / ``-Proto`` / ``-Host`` and an ``X-Request-Id``
  (kept when the client sent one), drops hop-by-hop headers;
- streams bodies both ways, chunked or sized, with backpressure;
- retries an idempotent request on another replica when the connection
  fails before any response byte (connect failure, reset, stale pooled
  connection), up to ``RETRIES`` times;
- reports each outcome to the router (5xx and failures count toward outlier
  ejection) and times out a replica that does not answer;
- passes a WebSocket (any ``Upgrade``) through as a byte tunnel after ``101``;
- answers ``503`` when the service has no healthy replica, ``502`` when none
  could be reached and ``504`` when the chosen one did not answer in time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections import deque

import httptools

from .balancing import Endpoint
from .heads import (
    CHUNKED,
    HTTP10,
    NEEDS_ID,
    ChunkedEnd,
    cookie_value,
    header_value,
    rewrite_request,
)
from .router import Router
from .tcp import _tune

__all__ = ["HttpProxy", "HttpTimeouts"]

log = logging.getLogger(__name__)
_monotonic = time.monotonic

RETRIES = 2
"""Extra tries of an idempotent request, each on another replica when there is one."""
RETRY_BODY_LIMIT = 64 * 1024
"""Bodies up to this size are kept until the response starts, so the request can be retried."""
MAX_HEAD = 64 * 1024
"""Largest request head accepted (431 beyond), like nginx's large_client_header_buffers."""
MAX_PIPELINED = 32
"""Requests a client may queue behind the one in flight before its reads pause."""
POOL_IDLE_PER_ENDPOINT = 256
CLIENT_HEAD_CACHE = 16
"""Request heads remembered with their rewrite, per client connection; all forgotten when full."""
HEAD_CACHE = 256
CACHED_HEAD_MAX = 2048
"""Heads longer than this are rewritten every time: the caches stay small (32 KiB a client)."""
"""Response heads remembered with their rewrite, per service port; all forgotten when full."""
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_RESPONSE_HOP = re.compile(
    rb"\r\n(?:connection|keep-alive|proxy-connection|te|trailer|upgrade)[ \t]*:[^\r\n]*", re.I
)
"""Hop-by-hop lines of a response head (``upgrade``/``connection`` stay on a 101)."""
_RESPONSE_HOP_101 = re.compile(
    rb"\r\n(?:keep-alive|proxy-connection|te|trailer)[ \t]*:[^\r\n]*", re.I
)
_HOP_NAMES = re.compile(rb"\r\n(?:keep-alive|proxy-connection|te|trailer|upgrade)[ \t]*:")
"""On a lower-cased head without ``Connection``: is there anything to drop at all."""
_CHUNKED = re.compile(rb"\r\ntransfer-encoding[ \t]*:[^\r\n]*chunked", re.I)
_TRANSFER_ENCODING = re.compile(rb"\r\ntransfer-encoding[ \t]*:[^\r\n]*", re.I)
_CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
_CRLF = frozenset(b"\r\n")
_CLOSE = 8
"""Flag (beside those of ``heads``): the request asks the connection to close after it."""
_UPGRADE = 16
"""Flag: the request asks for an upgrade (WebSocket, say)."""
_UNUSUAL = _CLOSE | _UPGRADE | HTTP10 | CHUNKED
_CONNECTION_WORDS = frozenset({b"close", b"keep-alive", b"upgrade", b""})
"""``Connection`` values that name no header."""
_STATUS = {
    503: b"Service Unavailable",
    502: b"Bad Gateway",
    504: b"Gateway Timeout",
    400: b"Bad Request",
    431: b"Request Header Fields Too Large",
}


class HeadTooLarge(Exception):
    """Raised in a parser callback: the request head exceeds ``MAX_HEAD``."""


class HttpTimeouts:
    """Seconds; defaults and their reasons are in ``meshd.config``."""

    __slots__ = ("client_idle", "connect", "pool_idle", "response")

    def __init__(
        self,
        connect: float = 1.0,
        response: float = 60.0,
        client_idle: float = 75.0,
        pool_idle: float = 30.0,
    ) -> None:
        self.connect = connect
        self.response = response
        self.client_idle = client_idle
        self.pool_idle = pool_idle


def _error_response(status: int, message: str, close: bool) -> bytes:
    body = (message + "\n").encode()
    return b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n%s" % (
        status,
        _STATUS.get(status, b"Error"),
        len(body),
        b"Connection: close\r\n" if close else b"",
        body,
    )


def _chunk(data: bytes) -> bytes:  # request bodies: re-framed as they are streamed
    return b"%x\r\n%s\r\n" % (len(data), data)


class _Exchange:
    """One request and its response."""

    __slots__ = (
        "body",
        "body_bytes",
        "body_done",
        "chunked",
        "conn",
        "endpoint",
        "error",
        "head",
        "http10",
        "keep_alive",
        "method",
        "raw",
        "replayable",
        "response_started",
        "router",
        "sent",
        "started",
        "tried",
        "upgrade",
    )

    def __init__(self, method: bytes, raw: bytes, head: bytes, flags: int) -> None:
        self.method = method
        self.raw = raw
        """The head as the client sent it; ``head``: as it is sent to the replica."""
        self.head = head
        self.keep_alive = True
        self.upgrade = False
        self.http10 = False
        self.chunked = False
        self.replayable = True
        """The whole body is still held: the request can be sent again."""
        if flags & _UNUSUAL:
            self.keep_alive = not flags & _CLOSE
            self.upgrade = bool(flags & _UPGRADE)
            self.replayable = not self.upgrade
            self.http10 = bool(flags & HTTP10)
            self.chunked = bool(flags & CHUNKED)
        self.body: list[bytes] = []
        self.body_bytes = 0
        self.body_done = False
        self.sent = False
        self.response_started = False
        self.conn: _Upstream | None = None
        self.endpoint: Endpoint | None = None
        self.router: Router | None = None
        """The router that picked ``endpoint``: told how it went."""
        self.started = 0.0
        """When it was sent to the chosen replica: latency, and the response timeout."""
        self.tried: set[str] = set()
        self.error: bytes = b""
        """An answer of the proxy's own, sent once the request's body has been read."""


def _strip_hop_by_hop(head: bytes) -> bytes:
    """A response head less its hop-by-hop lines (and those its ``Connection`` names)."""
    low = head.lower()
    at = low.find(b"\r\nconnection:")
    if at >= 0:
        end = low.find(b"\r\n", at + 2)
        value = low[at + 13 : end].strip()
        if value not in _CONNECTION_WORDS:  # it may name more hop-by-hop headers
            return _RESPONSE_HOP.sub(b"", _drop_named(head, value))
        if _HOP_NAMES.search(low) or low.find(b"\r\nconnection:", end) >= 0:
            return _RESPONSE_HOP.sub(b"", head)
        return head[:at] + head[end:]  # the usual case: only Connection itself to drop
    if _HOP_NAMES.search(low):
        return _RESPONSE_HOP.sub(b"", head)
    return head


def _drop_named(head: bytes, value: bytes) -> bytes:
    """Drop the headers a response's ``Connection`` names (besides the usual words)."""
    extra = {t.strip() for t in value.split(b",")} - _CONNECTION_WORDS
    if not extra:
        return head
    words = b"|".join(re.escape(w) for w in sorted(extra))
    return re.sub(rb"\r\n(?:" + words + rb")[ \t]*:[^\r\n]*", b"", head, flags=re.I)


class _Dechunk:
    """Decodes a chunked body for an HTTP/1.0 client, which cannot read chunks."""

    __slots__ = ("conn", "parser")

    def __init__(self, conn: _Upstream) -> None:
        self.conn = conn
        self.parser = httptools.HttpResponseParser(self)
        self.parser.feed_data(_CHUNKED_HEAD)

    def on_body(self, body: bytes) -> None:
        self.conn.out.append(body)


class _Upstream(asyncio.Protocol):
    """A keep-alive connection to one replica; carries one exchange at a time.

    Responses go to the client as they came, but for their head: llhttp
    (without per-header callbacks) finds where the head ends and the message
    ends, and only the head is rewritten, with a few regular expressions.
    """

    __slots__ = (
        "body_from",
        "client",
        "closed",
        "dechunk",
        "endpoint",
        "exchange",
        "feeding",
        "head_parts",
        "head_start",
        "idle_since",
        "key",
        "last_head",
        "out",
        "parser",
        "pool",
        "reused",
        "transport",
        "tunnel",
        "upgraded",
    )

    def __init__(self, pool: _Pool, key: tuple[str, int], endpoint: Endpoint) -> None:
        self.pool = pool
        self.key = key
        self.endpoint = endpoint
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpResponseParser(self)
        self.client: _Client | None = None
        self.exchange: _Exchange | None = None
        self.head_parts: list[bytes] = []
        """Reads since the response began, until its head is complete."""
        self.head_start = 0
        """Where the head being read starts in ``head_parts`` (after interim heads)."""
        self.body_from: int | None = None
        """While the body is read: where it starts in the read being parsed."""
        self.dechunk: _Dechunk | None = None
        self.feeding = b""
        """The read being parsed."""
        self.out: list[bytes] = []
        """Bytes for the client from one read, written together: one send, not three."""
        self.last_head = b""
        """The last response's head as it came: the next one is likely the same."""
        self.closed = False
        self.reused = False
        self.tunnel = False
        self.upgraded = False
        self.idle_since = 0.0

    # -- asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _tune(transport)

    def data_received(self, data: bytes) -> None:
        if self.tunnel:
            if self.client is not None:
                self.client.transport.write(data)
            return
        ex = self.exchange
        if ex is None:  # a response nobody asked for: the connection is unusable
            self.close()
            return
        client = self.client
        if self.body_from is None:
            self.head_parts.append(data)
        else:
            self.body_from = 0
        self.feeding = data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._flush(client)
            self._start_tunnel(data[upgrade.args[0] :])
            return
        except httptools.HttpParserError as exc:
            self.pool.proxy.counts["bad_responses"] += 1
            client = self.client
            self.close()
            if client is not None and ex is client.current():
                if ex.response_started:
                    client.abort(f"bad response from replica: {exc}")
                else:
                    client.upstream_failed(ex, f"bad response from replica: {exc}", retry=False)
            return
        if self.exchange is ex and self.body_from is not None:
            self._body(data)  # a body that goes on in later reads
        if self.out:
            self._flush(client)

    def _body(self, data: bytes) -> None:
        part = data[self.body_from :] if self.body_from else data
        if not part:
            return
        if self.dechunk is not None:
            self.dechunk.parser.feed_data(part)
        else:
            self.out.append(part)

    def _flush(self, client: _Client | None) -> None:
        if self.out:
            if client is not None:
                client.transport.write(b"".join(self.out) if len(self.out) > 1 else self.out[0])
            self.out = []

    def eof_received(self) -> bool:
        if self.tunnel and self.client is not None:
            t = self.client.transport
            if t.can_write_eof() and not t.is_closing():
                t.write_eof()
            return self.client.tunnel_eof()
        return False

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        client, ex = self.client, self.exchange
        self.client = self.exchange = None
        if client is None:
            return
        if self.tunnel:
            client.close()
        elif ex is not None and ex is client.current():
            if ex.response_started:
                # The client sees the body end here: complete if it was read to
                # the close, short of its length (or last chunk) if cut.
                client.close()
            else:
                client.upstream_failed(
                    ex, "replica closed the connection", retry=True, stale=self.reused
                )

    # -- llhttp callbacks

    def on_headers_complete(self) -> None:
        ex, client = self.exchange, self.client
        if ex is None or client is None:
            return
        status = self.parser.get_status_code()
        parts = self.head_parts
        last = self.last_head
        if len(parts) == 1 and not self.head_start and parts[0].startswith(last) and last:
            # The usual: the same head as the last response on this connection.
            head = last
            body_from = len(last)
        else:
            buf = parts[0] if len(parts) == 1 else b"".join(parts)
            end = buf.find(b"\r\n\r\n", self.head_start) + 4
            head = buf[self.head_start : end]
            # The read being parsed is the last part: where its body starts.
            body_from = end - (len(buf) - len(parts[-1]))
            if status >= 200 or status == 101:
                self.last_head = head
        if 100 <= status < 200 and status != 101:  # interim: the final answer follows
            if not ex.http10:
                self.out.append(_RESPONSE_HOP.sub(b"", head))
            self.head_start += len(head)
            return
        self.head_parts = []
        self.head_start = 0
        ex.response_started = True
        if ex.body:
            ex.body = []  # no replay once the answer started
        self.out.append(client.response_head(ex, self, status, head))
        if status == 101:
            self.upgraded = True  # llhttp reports the rest as an upgrade
        elif ex.method == b"HEAD":  # no body follows, whatever the head says
            keep = self.parser.should_keep_alive()
            self.parser = httptools.HttpResponseParser(self)
            self._finish(ex, client, keep)
        else:
            self.body_from = body_from

    def on_message_complete(self) -> None:
        ex, client = self.exchange, self.client
        if ex is None or client is None or self.upgraded or not ex.response_started:
            return
        if self.body_from is not None:
            self._body(self.feeding)
        self._finish(ex, client, self.parser.should_keep_alive())

    def _finish(self, ex: _Exchange, client: _Client, keep_alive: bool) -> None:
        out = self.out
        if out:
            client.transport.write(out[0] if len(out) == 1 else b"".join(out))
            self.out = []
        self.exchange = None
        self.client = None
        self.body_from = None
        self.dechunk = None
        if keep_alive and ex.body_done:
            if client.write_paused:  # the client paused it; idle, it must read
                self.transport.resume_reading()
            self.pool.release(self)
        else:
            self.close()
        client.exchange_done(ex)

    # -- tunnel and lifecycle

    def _start_tunnel(self, rest: bytes) -> None:
        self.tunnel = True
        client = self.client
        if client is not None:
            if rest:
                client.transport.write(rest)
            client.tunnel_to(self)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool.forget(self)
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        self.pool.forget(self)
        self.transport.abort()


class _Pool:
    """Idle keep-alive connections per replica address."""

    def __init__(self, proxy: HttpProxy) -> None:
        self.proxy = proxy
        self.idle: dict[tuple[str, int], list[_Upstream]] = {}

    def take(self, ep: Endpoint) -> _Upstream | None:
        conns = self.idle.get((ep.address, ep.port))
        while conns:
            conn = conns.pop()
            if not conn.closed and not conn.transport.is_closing():
                conn.reused = True
                conn.endpoint = ep
                self.proxy.pool_reused += 1
                return conn
        return None

    def release(self, conn: _Upstream) -> None:
        conns = self.idle.get(conn.key)
        if conns is None:
            conns = self.idle[conn.key] = []
        elif len(conns) >= POOL_IDLE_PER_ENDPOINT:
            conn.close()
            return
        conn.idle_since = 0.0  # the next sweep starts its idle clock
        conns.append(conn)

    def forget(self, conn: _Upstream) -> None:
        conns = self.idle.get(conn.key)
        if conns and conn in conns:
            conns.remove(conn)
            if not conns:
                del self.idle[conn.key]

    def sweep(self, now: float, idle_s: float, live: set[tuple[str, int]] | None) -> None:
        """Close connections idle too long, and those to replicas no longer routed."""
        for key, conns in list(self.idle.items()):
            for conn in list(conns):
                if not conn.idle_since:
                    conn.idle_since = now
                if now - conn.idle_since > idle_s or (live is not None and key not in live):
                    conn.close()

    def count(self) -> int:
        return sum(len(c) for c in self.idle.values())

    def close_all(self) -> None:
        for conns in list(self.idle.values()):
            for conn in list(conns):
                conn.close()


class _Client(asyncio.Protocol):
    """One client connection: requests parsed, queued and answered in order."""

    __slots__ = (
        "body_at",
        "body_seen",
        "broken",
        "chunks",
        "chunks_end",
        "client_ip",
        "client_ip_b",
        "closed",
        "feeding",
        "forwarded",
        "head_first",
        "head_more",
        "head_size",
        "head_start",
        "heads",
        "in_body",
        "last_active",
        "last_known",
        "last_raw",
        "parser",
        "parsing",
        "paused",
        "proxy",
        "queue",
        "recent",
        "rest",
        "transport",
        "tunnel",
        "tunnel_eofs",
        "upgrade_buffer",
        "upgrading",
        "write_paused",
    )

    def __init__(self, proxy: HttpProxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.upgrading: _Exchange | None = None
        self.upgrade_buffer: list[bytes] = []
        """Bytes after an upgrade request: the tunnel's if the replica agrees, else requests."""
        self.tunnel_eofs = 0
        self.write_paused = False
        self.broken = b""
        """A request could not be read: this answer after those before it, then close."""
        self.queue: deque[_Exchange] = deque()
        self.parsing: _Exchange | None = None
        """The request whose body is being read."""
        # Where requests start and end in the reads: llhttp does not say.
        self.feeding = b""
        """The read being parsed."""
        self.rest = False
        """The next request started in an earlier read: at ``head_start`` in ``head_first``,
        continued in ``head_more``."""
        self.head_first = b""
        self.head_start = 0
        self.head_more: list[bytes] | None = None
        self.head_size = 0
        self.in_body = False
        self.body_at = 0
        """Where the body of ``parsing`` starts in the read being parsed."""
        self.body_seen = 0
        """Body bytes of ``parsing`` in the read being parsed."""
        self.chunks: ChunkedEnd | None = None
        """Follows a chunked body's framing; ``chunks_end``: its end in this read, or -1."""
        self.chunks_end = -1
        self.heads: dict[bytes, tuple[bytes, bytes, int]] = {}
        """Request heads this client sent -> what was made of them (``_rewrite``)."""
        self.last_raw = b""
        """The last request head, and (``last_known``) what was made of it."""
        self.last_known: tuple[bytes, bytes, int] = (b"", b"", 0)
        self.closed = False
        self.paused = False
        self.tunnel: _Upstream | None = None
        self.client_ip = ""
        self.client_ip_b = b""
        self.forwarded = b""
        """The forwarding headers of a request that brought none of its own."""
        self.last_active = 0.0
        self.recent = False
        """Read from since the last sweep, which then dates ``last_active``."""

    # -- asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _tune(transport)
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if peer else ""
        self.client_ip_b = self.client_ip.encode()
        self.forwarded = b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: http\r\n" % self.client_ip_b
        self.last_active = time.monotonic()
        self.proxy.clients.add(self)
        self.proxy.counts["connections"] += 1

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.transport.write(data)
            return
        self.recent = True
        if self.upgrading is not None:
            self._early_tunnel_bytes(data)
            return
        # Where the next request starts: its head is taken from the reads.
        if self.in_body:  # the body of a request goes on in this read
            self.body_at = self.body_seen = 0
            if self.chunks is not None:
                self.chunks_end = self.chunks.scan(data)
        elif not self.rest:  # the next request starts this read
            self.head_first = data
            self.head_start = 0
            self.rest = True
        else:  # a head that started in an earlier read
            if self.head_more is None:
                self.head_more = [data]
                self.head_size = len(self.head_first) - self.head_start + len(data)
            else:
                self.head_more.append(data)
                self.head_size += len(data)
            if self.head_size > MAX_HEAD:
                self._refuse(431, f"request head larger than {MAX_HEAD} bytes")
                return
        self.feeding = data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.upgrading = self.queue[-1] if self.queue else None
            self._early_tunnel_bytes(data[upgrade.args[0] :])
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, HeadTooLarge):
                self._refuse(431, f"request head larger than {MAX_HEAD} bytes")
            else:
                self._refuse(400, f"bad request: {exc}")

    def _refuse(self, status: int, why: str) -> None:
        """The request being read cannot be served: the ones before it are
        answered, then this answer, then the connection closes."""
        self.proxy.counts["bad_requests"] += 1
        bad = self.parsing
        if bad is not None and self.queue and self.queue[-1] is bad and not bad.sent:
            self.queue.pop()  # never sent: the requests before it are still answered
            self._report(bad, ok=True)
        self.parsing = None
        self.broken = _error_response(status, why, True)
        self.transport.pause_reading()
        if not self.queue:
            self.transport.write(self.broken)
            self.close()

    def _early_tunnel_bytes(self, data: bytes) -> None:
        """Bytes after an upgrade request: held until the replica answers it."""
        if data:
            self.upgrade_buffer.append(data)
            if sum(map(len, self.upgrade_buffer)) > RETRY_BODY_LIMIT and not self.paused:
                self.paused = True
                self.transport.pause_reading()

    def _upgrade_refused(self) -> None:
        """The replica answered the upgrade with a plain response: back to HTTP."""
        self.upgrading = None
        self.parser = httptools.HttpRequestParser(self)
        self.rest = self.in_body = False
        self.head_more = self.chunks = None
        held, self.upgrade_buffer = self.upgrade_buffer, []
        if self.paused and len(self.queue) <= MAX_PIPELINED:
            self.paused = False
            self.transport.resume_reading()
        for data in held:
            if self.closed or self.tunnel is not None:
                break
            self.data_received(data)

    def eof_received(self) -> bool:
        if self.tunnel is not None:
            t = self.tunnel.transport
            if t.can_write_eof() and not t.is_closing():
                t.write_eof()
            return self.tunnel_eof()
        if self.queue:  # answer what was asked, then close
            self.queue[-1].keep_alive = False
            return True
        return False

    def pause_writing(self) -> None:
        self.write_paused = True
        ex = self.current()
        conn = self.tunnel or (ex.conn if ex is not None else None)
        if conn is not None and not conn.closed:
            conn.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        ex = self.current()
        conn = self.tunnel or (ex.conn if ex is not None else None)
        if conn is not None and not conn.closed:
            conn.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.proxy.clients.discard(self)
        if self.tunnel is not None:
            self.tunnel.close()
        for ex in self.queue:
            conn = ex.conn
            if conn is not None and conn.exchange is ex:
                conn.client = conn.exchange = None
                conn.abort()
                self._report(ex, ok=True)  # the client left; not the replica's fault
        self.queue.clear()

    # -- llhttp callbacks (requests)

    def on_headers_complete(self) -> None:
        """A request's head is complete. llhttp has checked it; its bytes are
        taken from the reads (no callback per header or for the URL) and
        rewritten by ``heads`` -- or not: a client tends to send the same head
        again, and the rewrite is remembered per connection."""
        data = self.feeding
        more = self.head_more
        if not self.head_start and more is None and data == self.last_raw:
            # The usual: a read that is one request, the same as the last one.
            raw = data
            known = self.last_known
            self.body_at = len(data)
        else:
            if more is None:
                buf = data
            else:
                buf = b"".join((self.head_first, *more))
                self.head_more = None
            start = self.head_start
            if buf[start] in _CRLF:  # empty lines before a request
                start = len(buf) - len(buf[start:].lstrip(b"\r\n"))
            end = buf.find(b"\r\n\r\n", start) + 4
            raw = buf if start == 0 and end == len(buf) else buf[start:end]
            if len(raw) > MAX_HEAD:
                raise HeadTooLarge
            self.body_at = end - len(buf) + len(data)
            heads = self.heads
            known = heads.get(raw)
            if known is None:
                known = self._rewrite(raw)
                if len(raw) <= CACHED_HEAD_MAX:
                    if len(heads) >= CLIENT_HEAD_CACHE:
                        heads.clear()
                    heads[raw] = known
            self.last_raw = raw
            self.last_known = known
        self.in_body = True
        self.body_seen = 0
        method, head, flags = known
        if flags & NEEDS_ID:
            proxy = self.proxy
            proxy.request_ids += 1
            head = b"%sX-Request-Id: %s%x\r\n\r\n" % (
                head,
                proxy.request_id_prefix,
                proxy.request_ids,
            )
        else:
            head += b"\r\n"
        ex = self.parsing = _Exchange(method, raw, head, flags)
        queue = self.queue
        queue.append(ex)
        if len(queue) > MAX_PIPELINED and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        if flags & CHUNKED:
            chunks = self.chunks = ChunkedEnd()
            self.chunks_end = chunks.scan(data, self.body_at)
        if ex is queue[0]:
            self.dispatch(ex)

    def _rewrite(self, raw: bytes) -> tuple[bytes, bytes, int]:
        """What the proxy makes of a head: method, head to send (less its request
        id and final line) and flags; all of it a function of the head's bytes."""
        p = self.parser
        upgrade = p.should_upgrade()
        head, flags = rewrite_request(raw, self.forwarded, self.client_ip_b, upgrade)
        if not p.should_keep_alive():
            flags |= _CLOSE
        if upgrade:
            flags |= _UPGRADE
        return p.get_method(), head, flags

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        if ex.error:
            return  # answered by the proxy itself: the body goes nowhere
        data = _chunk(body) if ex.chunked else body
        ex.body_bytes += len(body)
        self.body_seen += len(body)
        if ex.sent and ex.conn is not None and not ex.conn.closed:
            ex.conn.transport.write(data)
            if ex.replayable and ex.body_bytes <= RETRY_BODY_LIMIT and not ex.response_started:
                ex.body.append(data)
            else:
                ex.replayable = False
                ex.body = []
        else:
            ex.body.append(data)
            if ex.body_bytes > RETRY_BODY_LIMIT:
                ex.replayable = False
            if ex.body_bytes > RETRY_BODY_LIMIT and not self.paused:
                self.paused = True  # resumed when the request goes out
                self.transport.pause_reading()

    def on_message_complete(self) -> None:
        ex = self.parsing
        assert ex is not None
        ex.body_done = True
        self.parsing = None
        # The next request starts in this read after this one's body, or in the next read.
        self.in_body = False
        if self.chunks is not None:
            end = self.chunks_end
            self.chunks = None
            if end < 0:  # cannot be: llhttp and the scan read the same bytes
                raise httptools.HttpParserError("chunked body framing out of step")
        else:
            end = self.body_at + self.body_seen
        data = self.feeding
        self.head_first = data
        self.head_start = end
        self.rest = end < len(data)
        if ex.error:
            if ex is self.current():
                self._write_error(ex)
            return
        if ex.chunked:
            if ex.sent and ex.conn is not None and not ex.conn.closed:
                ex.conn.transport.write(b"0\r\n\r\n")
            if not ex.response_started:
                ex.body.append(b"0\r\n\r\n")

    # -- the exchange, in order

    def current(self) -> _Exchange | None:
        return self.queue[0] if self.queue else None

    def dispatch(self, ex: _Exchange) -> None:
        """Send ``ex`` (the oldest request) to a replica: pooled now, or connect first."""
        proxy = self.proxy
        router = proxy.router
        if router is None or not router.active:
            proxy.counts["no_endpoint"] += 1
            self._answer_error(ex, 503, f"no healthy replica of {proxy.name}")
            return
        key = self._hash_key(ex, router) if router.hashing else None
        now = _monotonic()
        ep = router.pick(self.client_ip, key, ex.tried, now)
        if ep is None:
            self._answer_error(ex, 502, f"no reachable replica of {proxy.name}")
            return
        ex.tried.add(ep.id)
        ex.endpoint = ep
        ex.router = router
        ex.started = now
        router.begin(ep)
        conn = proxy.pool.take(ep) if not ex.upgrade else None
        if conn is not None:
            self._send(ex, conn)
        else:
            proxy.counts["pool_new"] += 1
            asyncio.get_running_loop().create_task(self._connect_and_send(ex, ep))

    async def _connect_and_send(self, ex: _Exchange, ep: Endpoint) -> None:
        proxy = self.proxy
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(proxy.timeouts.connect):
                _, conn = await loop.create_connection(
                    lambda: _Upstream(proxy.pool, (ep.address, ep.port), ep), ep.address, ep.port
                )
        except (OSError, TimeoutError) as exc:
            proxy.counts["connect_failures"] += 1
            if not self.closed and ex is self.current():
                self.upstream_failed(
                    ex, f"cannot connect to a replica: {exc!r}", retry=True, unsent=True
                )
            else:
                self._report(ex, ok=False)
            return
        if self.closed or ex is not self.current():
            conn.close()
            self._report(ex, ok=True)
            return
        self._send(ex, conn)

    def _send(self, ex: _Exchange, conn: _Upstream) -> None:
        ex.sent = True
        if self.write_paused:
            conn.transport.pause_reading()
        conn.client = self
        conn.exchange = ex
        ex.conn = conn
        body = ex.body
        conn.transport.write(ex.head + b"".join(body) if body else ex.head)
        if self.paused and len(self.queue) <= MAX_PIPELINED:
            self.paused = False
            self.transport.resume_reading()
        if body and not ex.replayable and not ex.upgrade:
            ex.body = []

    def upstream_failed(
        self, ex: _Exchange, why: str, *, retry: bool, stale: bool = False, unsent: bool = False
    ) -> None:
        """The replica failed before answering: retry elsewhere when safe, else answer an error.

        ``unsent``: nothing reached the replica (the connect failed), so any
        method may go elsewhere; otherwise only idempotent ones.
        """
        proxy = self.proxy
        if ex.conn is not None:
            ex.conn = None
        failed_id = ex.endpoint.id if ex.endpoint is not None else ""
        self._report(ex, ok=stale)
        can_retry = (
            retry
            and (unsent or ex.method in IDEMPOTENT)
            and ex.replayable
            and not ex.response_started
            and (stale or len(ex.tried) <= RETRIES)
        )
        if can_retry and not self.closed:
            proxy.counts["retries"] += 1
            if stale:  # a pooled connection the replica had closed: same replica is fine
                ex.tried.discard(failed_id)
            ex.sent = False
            self.dispatch(ex)
            return
        if ex.response_started:
            self.abort(why)
            return
        self._answer_error(ex, 502, why)

    def response_head(self, ex: _Exchange, conn: _Upstream, status: int, head: bytes) -> bytes:
        """The head for the client: as the replica sent it, less hop-by-hop lines,
        plus what this client's connection needs; decides how the body is framed."""
        if status == 101:
            head = _RESPONSE_HOP_101.sub(b"", head)
        else:
            # A replica sends the same head again and again (within a second, even
            # its Date): the rewrite is looked up rather than done anew.
            heads = self.proxy.heads
            stripped = heads.get(head)
            if stripped is None:
                stripped = _strip_hop_by_hop(head)
                if len(head) <= CACHED_HEAD_MAX:
                    if len(heads) >= HEAD_CACHE:
                        heads.clear()
                    heads[head] = stripped
            head = stripped
            if ex.http10 or not ex.keep_alive:
                head = self._downgrade_head(ex, conn, status, head)
        if status >= 500:
            self.proxy.counts["responses_5xx"] += 1
        ep = ex.endpoint
        if ep is not None:
            now = time.monotonic()
            ex.router.end(ep, now - ex.started, status < 500, now)  # type: ignore[union-attr]
            ex.endpoint = None
        return head

    def _downgrade_head(self, ex: _Exchange, conn: _Upstream, status: int, head: bytes) -> bytes:
        """A response head for an HTTP/1.0 client, or for a connection that closes after it."""
        bodiless = ex.method == b"HEAD" or status in (204, 304)
        if ex.http10 and not bodiless and _CHUNKED.search(head):
            head = _TRANSFER_ENCODING.sub(b"", head)
            conn.dechunk = _Dechunk(conn)
            ex.keep_alive = False  # a body without length ends with the connection
        if not ex.keep_alive:
            return head[:-2] + b"Connection: close\r\n\r\n"
        return head[:-2] + b"Connection: keep-alive\r\n\r\n"

    def exchange_done(self, ex: _Exchange) -> None:
        """The response to ``ex`` is complete: next request, or close."""
        self.proxy.requests += 1
        queue = self.queue
        if queue and queue[0] is ex:
            queue.popleft()
        if not ex.keep_alive:
            self.close()
            return
        if self.broken or self.paused or self.upgrading is not None:
            if self.broken and not queue:
                self.transport.write(self.broken)
                self.close()
                return
            if self.upgrading is ex:
                self._upgrade_refused()
                if self.closed:
                    return
            if self.paused and len(queue) <= MAX_PIPELINED:
                self.paused = False
                self.transport.resume_reading()
        if queue:
            self.dispatch(queue[0])

    def tunnel_to(self, conn: _Upstream) -> None:
        """``101``: from now on bytes flow as they are, both ways."""
        self.tunnel = conn
        self.upgrading = None
        self.proxy.counts["upgrades"] += 1
        self.queue.clear()
        held, self.upgrade_buffer = self.upgrade_buffer, []
        if held:
            conn.transport.write(b"".join(held))
        if self.paused:
            self.paused = False
            self.transport.resume_reading()

    def tunnel_eof(self) -> bool:
        """One side of the tunnel finished sending; both done closes it."""
        self.tunnel_eofs += 1
        if self.tunnel_eofs >= 2:
            self.close()
            if self.tunnel is not None:
                self.tunnel.close()
            return False
        return True

    # -- helpers

    def _report(self, ex: _Exchange, *, ok: bool) -> None:
        if ex.endpoint is None:
            return
        if ex.router is not None:
            ex.router.end(ex.endpoint, time.monotonic() - ex.started, ok)
        ex.endpoint = None

    def _answer_error(self, ex: _Exchange, status: int, message: str) -> None:
        """Answer ``ex`` with an error of the proxy's own once its body has been read."""
        self.proxy.counts[f"errors_{status}"] += 1
        ex.error = _error_response(status, message, not ex.keep_alive)
        ex.body = []
        if ex.body_done:
            self._write_error(ex)
        elif self.paused and len(self.queue) <= MAX_PIPELINED:
            self.paused = False  # read the rest of the body, to throw it away
            self.transport.resume_reading()

    def _write_error(self, ex: _Exchange) -> None:
        self.transport.write(ex.error)
        self.exchange_done(ex)

    def abort(self, why: str) -> None:
        self.proxy.counts["aborted"] += 1
        log.debug("%s: aborting a client connection: %s", self.proxy.name, why)
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()

    def _hash_key(self, ex: _Exchange, router: Router) -> str | None:
        on = router.balance.hash_on
        if router.balance.policy != "hash" or on == "client":
            return None
        kind, _, name = on.partition(":")
        lname = name.lower().encode()
        value = header_value(ex.raw, lname) if kind == "header" else cookie_value(ex.raw, lname)
        return value.decode("latin-1") if value is not None else None


class HttpProxy:
    """A listener's protocol factory for one ``http`` service port."""

    def __init__(
        self,
        name: str,
        router: Router | None,
        timeouts: HttpTimeouts | None = None,
    ) -> None:
        self.name = name
        self.router = router
        """Set anew by the mesh when the service's balance changes; None: no route (503)."""
        self.timeouts = timeouts or HttpTimeouts()
        self.pool = _Pool(self)
        self.clients: set[_Client] = set()
        self.heads: dict[bytes, bytes] = {}
        """Response heads as replicas sent them -> without their hop-by-hop lines."""
        self.request_id_prefix = os.urandom(4).hex().encode() + b"-"
        self.request_ids = 0
        """Requests given an id: ids are the prefix (random per listener) and this, in hex."""
        self.requests = 0
        self.pool_reused = 0
        self.counts: dict[str, int] = {
            "connections": 0,
            "retries": 0,
            "connect_failures": 0,
            "no_endpoint": 0,
            "bad_requests": 0,
            "bad_responses": 0,
            "responses_5xx": 0,
            "errors_502": 0,
            "errors_503": 0,
            "errors_504": 0,
            "aborted": 0,
            "upgrades": 0,
            "pool_new": 0,
            "timeouts": 0,
        }

    def __call__(self) -> asyncio.Protocol:
        return _Client(self)

    @property
    def stats(self) -> dict[str, int]:
        """Counters since the listener started (the two counted per request are attributes)."""
        return {**self.counts, "requests": self.requests, "pool_reused": self.pool_reused}

    def active(self) -> int:
        return len(self.clients)

    def sweep(self, now: float, live: set[tuple[str, int]] | None = None) -> None:
        """Once a second: idle clients, replicas too slow to answer, stale pooled connections."""
        t = self.timeouts
        for client in list(self.clients):
            ex = client.current()
            if ex is None:
                if client.recent:
                    client.recent = False
                    client.last_active = now
                elif client.tunnel is None and now - client.last_active > t.client_idle:
                    client.close()
            elif ex.sent and not ex.response_started and now - ex.started > t.response:
                self.counts["timeouts"] += 1
                conn = ex.conn
                ex.conn = None
                if conn is not None:
                    conn.client = conn.exchange = None
                    conn.abort()
                client._report(ex, ok=False)
                client._answer_error(ex, 504, f"a replica of {self.name} did not answer in time")
        self.pool.sweep(now, t.pool_idle, live)

    def drop_nodes(self, nodes: set[str]) -> int:
        """Cut connections to replicas on these nodes; requests in flight are retried."""
        n = 0
        for client in list(self.clients):
            conn = client.tunnel
            ex = client.current()
            if conn is None and ex is not None:
                conn = ex.conn
            if conn is not None and not conn.closed and conn.endpoint.node in nodes:
                conn.abort()
                n += 1
        for conns in list(self.pool.idle.values()):
            for conn in list(conns):
                if conn.endpoint.node in nodes:
                    conn.abort()
        return n

    def close_all(self) -> None:
        for client in list(self.clients):
            client.close()
        self.pool.close_all()
