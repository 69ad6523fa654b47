"""Where requests start and end when the L7 proxy takes their heads from its reads.

llhttp checks each request but, with no per-header callbacks, does not say
where a head starts or a body ends; the client side works it out (after a
sized body, after a chunked one, across reads). These tests drive one client
connection and one pooled replica connection with in-memory transports and
feed the same pipelined stream split at every offset, so every boundary
falls inside a request line, a header, a body, a chunk-size line and a
trailer at least once.
"""

from __future__ import annotations

import random
from typing import Any

import httptools
import pytest

from meshd.proxy.balancing import Endpoint
from meshd.proxy.http import MAX_HEAD, HttpProxy, _Upstream
from meshd.proxy.router import Router
from meshd.spec import Balance

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"

STREAM = (
    b"\r\n"  # an empty line before the first request is allowed
    b"GET /one HTTP/1.1\r\nHost: h\r\n\r\n"
    b"POST /sized HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\nhello\r\n\r\nyo"
    b"POST /chunked HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;ext=1\r\nhello\r\n4\r\n\r\n\r\n\r\n0\r\nX-Trailer: t\r\n\r\n"
    b"GET /two HTTP/1.1\r\nHost: h\r\nConnection: keep-alive\r\n\r\n"
    b"PUT /chunked-bare HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n0\r\n\r\n"
    b"GET /three?q=1 HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n"
    b"GET /last HTTP/1.1\r\nHost: h\r\n\r\n"
)
EXPECTED = [
    (b"GET", b"/one", b""),
    (b"POST", b"/sized", b"hello\r\n\r\nyo"),
    (b"POST", b"/chunked", b"hello\r\n\r\n"),
    (b"GET", b"/two", b""),
    (b"PUT", b"/chunked-bare", b"abc"),
    (b"GET", b"/three?q=1", b""),
    (b"GET", b"/last", b""),
]


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    abort = close

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _Requests:
    """Parses what the replica side received, as a replica would."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.done: list[tuple[bytes, bytes, bytes]] = []
        self.heads: list[dict[bytes, bytes]] = []
        self._url = b""
        self._body = b""
        self._headers: dict[bytes, bytes] = {}

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self.done.append((self.parser.get_method(), self._url, self._body))
        self.heads.append(self._headers)
        self._url, self._body, self._headers = b"", b"", {}


def _proxy_pair() -> tuple[Any, _Transport, _Upstream, _Transport]:
    router = Router("web", "http", Balance())
    endpoint = Endpoint("a", "n1", "127.0.0.1", 18000)
    router.set_endpoints((endpoint,))
    proxy = HttpProxy("web", router)
    client = proxy()
    client_transport = _Transport()
    client.connection_made(client_transport)  # type: ignore[arg-type]
    upstream = _Upstream(proxy.pool, ("127.0.0.1", 18000), endpoint)
    upstream_transport = _Transport()
    upstream.transport = upstream_transport  # type: ignore[assignment]
    proxy.pool.release(upstream)
    return client, client_transport, upstream, upstream_transport


def _run(reads: list[bytes]) -> tuple[_Requests, int]:
    """Feed the client's reads, answer every request the replica side gets; the
    requests the replica parsed and the responses the client got."""
    client, client_transport, upstream, upstream_transport = _proxy_pair()
    received = _Requests()
    seen = 0
    for data in reads:
        client.data_received(data)
        while len(upstream_transport.written) > seen:
            for data_out in upstream_transport.written[seen:]:
                seen += 1
                received.parser.feed_data(data_out)
            while len(received.done) > sum(
                w.count(b"HTTP/1.1 200") for w in client_transport.written
            ):
                upstream.data_received(RESPONSE)
    answered = sum(w.count(b"HTTP/1.1 200 OK") for w in client_transport.written)
    return received, answered


def test_a_pipelined_stream_in_one_read() -> None:
    received, answered = _run([STREAM])
    assert received.done == EXPECTED
    assert answered == len(EXPECTED)


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_a_pipelined_stream_split_anywhere(cut: int) -> None:
    received, answered = _run([STREAM[:cut], STREAM[cut:]])
    assert received.done == EXPECTED
    assert answered == len(EXPECTED)


@pytest.mark.parametrize("seed", range(20))
def test_a_pipelined_stream_in_random_pieces(seed: int) -> None:
    rng = random.Random(seed)
    reads, at = [], 0
    while at < len(STREAM):
        step = rng.randint(1, 40)
        reads.append(STREAM[at : at + step])
        at += step
    received, answered = _run(reads)
    assert received.done == EXPECTED
    assert answered == len(EXPECTED)


def test_a_stream_byte_by_byte() -> None:
    received, answered = _run([STREAM[i : i + 1] for i in range(len(STREAM))])
    assert received.done == EXPECTED
    assert answered == len(EXPECTED)


def test_the_same_head_again_gets_its_own_request_id() -> None:
    head = b"GET /same HTTP/1.1\r\nHost: h\r\n\r\n"
    received, _ = _run([head, head, head * 2])
    ids = [h[b"x-request-id"] for h in received.heads]
    assert len(ids) == 4 and len(set(ids)) == 4
    assert all(h[b"x-forwarded-for"] == b"127.0.0.1" for h in received.heads)
    assert all(h[b"x-forwarded-host"] == b"h" for h in received.heads)


def _big_head(size: int) -> bytes:
    return b"GET /big HTTP/1.1\r\nHost: h\r\nX-Pad: " + b"p" * size + b"\r\n\r\n"


@pytest.mark.parametrize("piece", [None, 1000])
def test_a_head_too_large_is_refused_after_the_requests_before_it(piece: int | None) -> None:
    stream = b"GET /first HTTP/1.1\r\nHost: h\r\n\r\n" + _big_head(MAX_HEAD)
    reads = (
        [stream] if piece is None else [stream[i : i + piece] for i in range(0, len(stream), piece)]
    )
    client, client_transport, upstream, upstream_transport = _proxy_pair()
    for data in reads:
        if client_transport.closed:
            break
        client.data_received(data)
    assert len(upstream_transport.written) == 1  # only /first went to the replica
    assert not client_transport.closed  # /first is answered first
    upstream.data_received(RESPONSE)
    answers = b"".join(client_transport.written)
    assert answers.startswith(b"HTTP/1.1 200 OK")
    assert b"HTTP/1.1 431 Request Header Fields Too Large" in answers
    assert client_transport.closed
    assert client.proxy.stats["bad_requests"] == 1


def test_a_large_head_within_the_limit_is_served() -> None:
    received, answered = _run([_big_head(MAX_HEAD - 100)])
    assert [r[1] for r in received.done] == [b"/big"] and answered == 1
