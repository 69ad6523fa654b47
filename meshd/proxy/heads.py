"""Request heads as bytes: the rewrite a proxied request needs, with no callback per header.

llhttp (``httptools``) validates every request the L7 proxy reads, but asked
for each header it calls back into Python once per header and once for the
URL, and the head then has to be built again from the pieces. The proxy
instead takes the head's bytes as they were read (llhttp has checked them)
and rewrites them here: the usual request (HTTP/1.1, no hop-by-hop headers,
no ``X-Forwarded-For`` of its own) keeps every byte and gains the forwarding
headers at its end; anything else goes through the general rewrite, line by
line. Pure: bytes in, bytes out.

Also here: finding a header's value in a raw head (for hashing on a header
or a cookie), and where a chunked body ends, which llhttp reports as body
bytes but not as an offset.
"""

from __future__ import annotations

import re

__all__ = [
    "CHUNKED",
    "HTTP10",
    "NEEDS_ID",
    "ChunkedEnd",
    "cookie_value",
    "header_value",
    "rewrite_request",
]

CHUNKED = 1
"""Flag: the request's body is chunked (it is re-framed as it is streamed)."""
HTTP10 = 2
"""Flag: the client speaks HTTP/1.0 (its response may need decoding and a Connection line)."""
NEEDS_ID = 4
"""Flag: the client sent no ``X-Request-Id``; the proxy adds one."""

_UNUSUAL = re.compile(
    rb"\r\n(?:connection|keep-alive|proxy-connection|te|trailer|upgrade|x-forwarded-for"
    rb"|transfer-encoding|x-forwarded-proto|x-forwarded-host|x-request-id)[ \t]*:"
)
"""On a lower-cased head: a header that makes the request one for the general rewrite."""
_HOST, _TE, _PROTO, _FWD_HOST, _REQUEST_ID = 1, 2, 4, 8, 16
_KEPT = {
    b"host": _HOST,
    b"transfer-encoding": _TE,
    b"x-forwarded-proto": _PROTO,
    b"x-forwarded-host": _FWD_HOST,
    b"x-request-id": _REQUEST_ID,
}
"""Headers passed on as they are (noting that they were sent)."""
_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"})
_CONNECTION_WORDS = frozenset({b"close", b"keep-alive", b"upgrade", b""})
"""``Connection`` values that name no header."""


def rewrite_request(
    raw: bytes, forwarded: bytes, client_ip: bytes, upgrade: bool
) -> tuple[bytes, int]:
    """The head to send upstream for ``raw`` (a whole head, ``\\r\\n\\r\\n`` included), and flags.

    The head is returned without its final empty line: with ``NEEDS_ID`` the
    caller adds an ``X-Request-Id`` line first (the client sent none), so
    that the rest can be remembered and used again for the same head.
    ``forwarded`` is the usual request's forwarding lines (``X-Forwarded-For``
    and ``-Proto`` for this client, each ending in CRLF).
    """
    line_end = raw.find(b"\r\n")
    if upgrade or raw[line_end - 8 : line_end] != b"HTTP/1.1":
        return _rewrite_general(raw, client_ip, upgrade)
    low = raw.lower()
    if _UNUSUAL.search(low, line_end):
        return _rewrite_general(raw, client_ip, upgrade)
    # The usual request: every byte kept, the forwarding headers added at its end.
    at = low.find(b"\r\nhost:", line_end)
    if at < 0:
        return raw[:-2] + forwarded, NEEDS_ID
    at += 7
    host = raw[at : raw.find(b"\r\n", at)].strip()
    return b"%s%sX-Forwarded-Host: %s\r\n" % (raw[:-2], forwarded, host), NEEDS_ID


def _rewrite_general(raw: bytes, client_ip: bytes, upgrade: bool) -> tuple[bytes, int]:
    """Any head: the request line in HTTP/1.1, hop-by-hop headers (and those
    ``Connection`` names) dropped, ``X-Forwarded-For`` lines merged."""
    lines = raw[:-4].split(b"\r\n")
    request_line = lines[0]
    flags = HTTP10 if request_line.endswith(b"HTTP/1.0") else 0
    pairs = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        pairs.append((name.rstrip(b" \t"), value.strip(b" \t")))
    drop: set[bytes] = set()
    for name, value in pairs:
        if name.lower() == b"connection":
            drop.update(t.strip().lower() for t in value.split(b","))
    drop -= _CONNECTION_WORDS
    out = [request_line[: request_line.rfind(b" ") + 1], b"HTTP/1.1\r\n"]
    xff = b""
    host = b""
    seen = 0
    upgrade_to = b""
    for name, value in pairs:
        lname = name.lower()
        if lname in _HOP or lname in drop:
            if lname == b"upgrade":
                upgrade_to = value
            continue
        if lname == b"x-forwarded-for":
            xff = xff + b", " + value if xff else value
            continue
        bit = _KEPT.get(lname, 0)
        seen |= bit
        if bit == _HOST:
            host = value
        elif bit == _TE and b"chunked" in value.lower():
            flags |= CHUNKED
        out += (name, b": ", value, b"\r\n")
    out += (b"X-Forwarded-For: ", xff + b", " + client_ip if xff else client_ip, b"\r\n")
    if not seen & _PROTO:
        out.append(b"X-Forwarded-Proto: http\r\n")
    if host and not seen & _FWD_HOST:
        out += (b"X-Forwarded-Host: ", host, b"\r\n")
    if not seen & _REQUEST_ID:
        flags |= NEEDS_ID
    if upgrade and upgrade_to:
        out += (b"Connection: Upgrade\r\nUpgrade: ", upgrade_to, b"\r\n")
    return b"".join(out), flags


def header_value(raw: bytes, name: bytes) -> bytes | None:
    """The first ``name`` header's value in a raw head (``name`` lower-cased)."""
    m = re.search(rb"\r\n" + re.escape(name) + rb"[ \t]*:[ \t]*([^\r\n]*)", raw, re.I)
    return m.group(1).rstrip(b" \t") if m else None


def cookie_value(raw: bytes, name: bytes) -> bytes | None:
    """The value of cookie ``name`` (lower-cased) in any ``Cookie`` header of a raw head."""
    for m in re.finditer(rb"\r\ncookie[ \t]*:([^\r\n]*)", raw, re.I):
        for part in m.group(1).split(b";"):
            k, _, value = part.strip().partition(b"=")
            if k.lower() == name:
                return value
    return None


class ChunkedEnd:
    """Follows a chunked body's framing to find the offset where the message ends.

    The bytes were validated by llhttp, which parses the same bytes; this
    only counts: chunk-size lines, chunk data, then trailer lines up to the
    empty one.
    """

    __slots__ = ("left", "line", "trailers")

    def __init__(self) -> None:
        self.left = 0
        """Bytes of chunk data (and its CRLF) still to skip."""
        self.line = b""
        """A line split across reads."""
        self.trailers = False

    def scan(self, data: bytes, at: int = 0) -> int:
        """The offset in ``data`` just past the message's end, or -1 if it goes on."""
        n = len(data)
        while at < n:
            if self.left:
                step = min(self.left, n - at)
                self.left -= step
                at += step
                continue
            nl = data.find(b"\n", at)
            if nl < 0:
                self.line += data[at:]
                return -1
            line = (self.line + data[at:nl]).rstrip(b"\r")
            self.line = b""
            at = nl + 1
            if self.trailers:
                if not line:
                    return at
                continue
            size = int(line.partition(b";")[0].strip(b" \t"), 16)
            if size:
                self.left = size + 2
            else:
                self.trailers = True
        return -1
