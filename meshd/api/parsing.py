"""Strict reading of what a request puts in its URL.

aiohttp decodes paths and query strings leniently (a malformed escape stays
as it is, invalid UTF-8 becomes U+FFFD), which would let a typo silently
name another key. The KV API reads the raw URL instead and refuses anything
it cannot decode exactly, and every endpoint refuses query parameters it
does not know, so a misspelt ``?prefx=`` is an error rather than a no-op.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from urllib.parse import unquote_to_bytes

from aiohttp import web

from meshd.api.errors import Problem, shorten

__all__ = ["decoded_path", "flag", "query"]

_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_TRUE = frozenset({"", "1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def pct_decode(text: str, what: str, *, plus_is_space: bool = False) -> str:
    """Percent-decode text as UTF-8; Problem(400) for a malformed escape or bad UTF-8."""
    bad = _BAD_ESCAPE.search(text)
    if bad is not None:
        raise Problem(
            400,
            "bad_encoding",
            f"{what} has a malformed percent-escape at {shorten(text[bad.start() : bad.start() + 3])}"
            " (a literal '%' is written %25)",
        )
    if plus_is_space:
        text = text.replace("+", " ")
    try:
        return unquote_to_bytes(text).decode("utf-8")
    except UnicodeDecodeError:
        raise Problem(400, "bad_encoding", f"{what} is not valid UTF-8 once decoded") from None


def decoded_path(request: web.Request) -> str:
    """The request path, decoded strictly from what the client sent."""
    raw = request.raw_path.partition("?")[0].partition("#")[0]
    return pct_decode(raw, "the URL path")


def query(request: web.Request, allowed: Collection[str] = ()) -> dict[str, str]:
    """The query parameters, decoded strictly; each may appear once and must be in allowed."""
    raw = request.raw_path.partition("?")[2].partition("#")[0]
    params: dict[str, str] = {}
    for part in raw.split("&"):
        if not part:
            continue
        raw_name, _, raw_value = part.partition("=")
        name = pct_decode(raw_name, "a query parameter name", plus_is_space=True)
        if name not in allowed:
            takes = ", ".join(sorted(allowed)) or "none"
            raise Problem(
                400,
                "bad_param",
                f"unknown query parameter {shorten(name)}; this endpoint takes: {takes}",
            )
        if name in params:
            raise Problem(400, "bad_param", f"query parameter {name!r} is given more than once")
        params[name] = pct_decode(raw_value, f"query parameter {name!r}", plus_is_space=True)
    return params


def flag(params: dict[str, str], name: str) -> bool:
    """A boolean parameter: present (``?raw``, ``?raw=1``, ``?raw=true``) or not."""
    value = params.get(name)
    if value is None:
        return False
    low = value.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise Problem(
        400, "bad_param", f"query parameter {name!r} must be true or false, not {shorten(value)}"
    )
