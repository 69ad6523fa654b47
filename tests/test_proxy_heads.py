"""The request-head rewrite of the L7 proxy, and the chunked-body end finder: pure."""

from __future__ import annotations

import random

import pytest

from meshd.proxy.heads import (
    CHUNKED,
    HTTP10,
    NEEDS_ID,
    ChunkedEnd,
    _rewrite_general,
    cookie_value,
    header_value,
    rewrite_request,
)

IP = b"10.0.0.7"
FORWARDED = b"X-Forwarded-For: 10.0.0.7\r\nX-Forwarded-Proto: http\r\n"


def rewrite(raw: bytes, upgrade: bool = False) -> tuple[bytes, int]:
    return rewrite_request(raw, FORWARDED, IP, upgrade)


def lines(head: bytes) -> list[tuple[bytes, bytes]]:
    """A head's request line and headers, as (name, value) pairs with spacing normalised."""
    first, *rest = head.rstrip(b"\r\n").split(b"\r\n")
    out = [(first, b"")]
    for line in rest:
        name, _, value = line.partition(b":")
        out.append((name.strip(), value.strip()))
    return out


def test_the_usual_request_keeps_every_byte_and_gains_forwarding_headers() -> None:
    raw = b"GET /a?b=c HTTP/1.1\r\nHost: web:8080\r\nAccept: */*\r\nUser-Agent: t/1\r\n\r\n"
    head, flags = rewrite(raw)
    assert flags == NEEDS_ID
    assert head == raw[:-2] + FORWARDED + b"X-Forwarded-Host: web:8080\r\n"


def test_a_request_without_host() -> None:
    head, flags = rewrite(b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n")
    assert (head, flags) == (b"GET / HTTP/1.1\r\nAccept: */*\r\n" + FORWARDED, NEEDS_ID)


def test_http10_is_sent_as_http11_and_flagged() -> None:
    head, flags = rewrite(b"GET /x HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n")
    assert flags == HTTP10 | NEEDS_ID
    assert lines(head) == [
        (b"GET /x HTTP/1.1", b""),
        (b"Host", b"h"),
        (b"X-Forwarded-For", IP),
        (b"X-Forwarded-Proto", b"http"),
        (b"X-Forwarded-Host", b"h"),
    ]


def test_hop_by_hop_headers_and_those_connection_names_are_dropped() -> None:
    raw = (
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: 5\r\n"
        b"X-Secret: s\r\nTE: trailers\r\nProxy-Connection: x\r\nTrailer: y\r\nX-Kept: k\r\n\r\n"
    )
    head, _ = rewrite(raw)
    names = [n.lower() for n, _ in lines(head)[1:]]
    assert names == [
        b"host",
        b"x-kept",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
    ]


def test_forwarding_headers_from_the_client_are_extended_or_kept() -> None:
    raw = (
        b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-For: 2.2.2.2\r\n"
        b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: outer\r\nX-Request-Id: given\r\n\r\n"
    )
    head, flags = rewrite(raw)
    assert not flags & NEEDS_ID
    got = dict(lines(head)[1:])
    assert got[b"X-Forwarded-For"] == b"1.1.1.1, 2.2.2.2, " + IP
    assert got[b"X-Forwarded-Proto"] == b"https"
    assert got[b"X-Forwarded-Host"] == b"outer"
    assert got[b"X-Request-Id"] == b"given"


@pytest.mark.parametrize("name", [b"X-Forwarded-Proto", b"x-forwarded-host", b"X-REQUEST-ID"])
def test_one_forwarding_header_from_the_client_is_not_repeated(name: bytes) -> None:
    head, _ = rewrite(b"GET / HTTP/1.1\r\nHost: h\r\n" + name + b": v\r\n\r\n")
    assert [n.lower() for n, _ in lines(head)].count(name.lower()) == 1


def test_a_chunked_request_is_flagged() -> None:
    _, flags = rewrite(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert flags & CHUNKED


def test_an_upgrade_keeps_its_connection_and_upgrade_headers() -> None:
    raw = b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    head, _ = rewrite(raw, upgrade=True)
    assert head.endswith(b"Connection: Upgrade\r\nUpgrade: websocket\r\n")
    plain, _ = rewrite(raw, upgrade=False)
    assert b"pgrade" not in plain.partition(b"\r\n")[2]


@pytest.mark.parametrize("seed", range(30))
def test_the_usual_rewrite_and_the_general_one_agree(seed: int) -> None:
    rng = random.Random(seed)
    names = [
        b"Host",
        b"Accept",
        b"User-Agent",
        b"Cookie",
        b"X-A",
        b"Content-Type",
        b"Authorization",
    ]
    headers = b"".join(
        b"%s:%s%s\r\n" % (n, b" " * rng.randint(0, 2), b"v%d" % rng.randint(0, 99))
        for n in rng.sample(names, rng.randint(0, len(names)))
    )
    raw = b"GET /p%d HTTP/1.1\r\n%s\r\n" % (seed, headers)
    usual, flags = rewrite(raw)
    general, general_flags = _rewrite_general(raw, IP, False)
    assert flags == general_flags
    assert lines(usual) == lines(general)


def test_header_and_cookie_values() -> None:
    raw = b"GET / HTTP/1.1\r\nX-User: alice \r\ncookie: a=1; sid=xyz\r\nCookie: b=2\r\n\r\n"
    assert header_value(raw, b"x-user") == b"alice"
    assert header_value(raw, b"x-none") is None
    assert cookie_value(raw, b"sid") == b"xyz"
    assert cookie_value(raw, b"b") == b"2"
    assert cookie_value(raw, b"none") is None


def _chunked(rng: random.Random) -> bytes:
    body = b""
    for _ in range(rng.randint(0, 5)):
        data = bytes(rng.choice(b"ab\r\n0") for _ in range(rng.randint(1, 20)))
        ext = b";x=%d" % rng.randint(0, 9) if rng.random() < 0.3 else b""
        body += b"%x%s\r\n%s\r\n" % (len(data), ext, data)
    body += b"0\r\n"
    for i in range(rng.randint(0, 2)):
        body += b"X-T%d: v\r\n" % i
    return body + b"\r\n"


@pytest.mark.parametrize("seed", range(50))
def test_the_end_of_a_chunked_body_is_found_across_any_reads(seed: int) -> None:
    rng = random.Random(seed)
    body = _chunked(rng)
    stream = b"HEAD" + body + b"GET / HTTP/1.1\r\n"  # the body starts at 4
    scan = ChunkedEnd()
    offset, found = 0, -1
    while found < 0 and offset < len(stream):
        read = stream[offset : offset + rng.randint(1, 9)]
        if offset + len(read) > 4:
            end = scan.scan(read, max(0, 4 - offset))
            if end >= 0:
                found = offset + end
        offset += len(read)
    assert found == 4 + len(body)


def test_a_chunked_body_not_yet_ended() -> None:
    scan = ChunkedEnd()
    assert scan.scan(b"5\r\nhel") == -1
    assert scan.scan(b"lo\r\n0\r\n") == -1
    assert scan.scan(b"\r\nGET") == 2
