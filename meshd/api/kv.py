"""The key/value endpoints: the replicated store, seen from outside.

Values are bytes. A PUT body is the value itself (as in Consul), so any
file can be stored with ``curl -T``; ``?base64`` accepts a base64 body for
callers that can only send text. Reads return JSON with the value as text
when it is UTF-8 and always as base64, or the bare bytes with ``?raw``.

Keys arrive percent-encoded in the path; they are decoded strictly from the
raw URL and checked with the store's own rules before the agent sees them.
"""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from meshd.api.appkeys import STATE, VIEW
from meshd.api.errors import Problem, json_response, shorten
from meshd.api.parsing import decoded_path, flag, query
from meshd.state.store import MAX_KEY, MAX_VALUE, Entry, PersistenceError, check_key

__all__ = ["INDEX_HEADER", "KV_PREFIX", "entry_json", "routes"]

#: Response header carrying the store's change index (like X-Consul-Index).
INDEX_HEADER = "X-Meshd-Index"
KV_PREFIX = "/v1/kv/"
# [\s\S], not '.', so a key with a newline reaches the handler and is refused
# there as a bad key rather than falling through to "no such endpoint".
KEY_ROUTE = KV_PREFIX + r"{key:[\s\S]+}"


def entry_json(entry: Entry) -> dict[str, Any]:
    """The JSON form of an entry (live or deleted)."""
    ts = entry.ts
    out: dict[str, Any] = {"key": entry.key}
    if entry.value is None:
        out["deleted"] = True
    else:
        try:
            out["value"] = entry.value.decode("utf-8")
        except UnicodeDecodeError:
            out["value"] = None
        out["value_base64"] = base64.b64encode(entry.value).decode("ascii")
        out["size"] = len(entry.value)
    # wall_ms first and the node last, so the string sorts sensibly and a node
    # name containing dots still splits back with split(".", 2).
    out["version"] = f"{ts.wall_ms}.{ts.counter}.{ts.node}"
    out["modified"] = _iso(ts.wall_ms)
    return out


def _iso(wall_ms: int) -> str | None:
    try:
        when = datetime.fromtimestamp(wall_ms / 1000, UTC)
    except (OverflowError, OSError, ValueError):
        return None
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _key(request: web.Request) -> str:
    path = decoded_path(request)
    if not path.startswith(KV_PREFIX):
        raise Problem(400, "bad_key", f"the key must follow {KV_PREFIX} in the path")
    key = path[len(KV_PREFIX) :]
    try:
        return check_key(key)
    except (TypeError, ValueError) as exc:
        raise Problem(400, "bad_key", str(exc)) from None


def _index(request: web.Request) -> dict[str, str]:
    return {INDEX_HEADER: str(request.app[VIEW].index)}


def _not_found(request: web.Request, key: str) -> Problem:
    return Problem(404, "key_not_found", f"no key {shorten(key)}", _index(request))


async def get_key(request: web.Request) -> web.Response:
    raw = flag(query(request, {"raw"}), "raw")
    key = _key(request)
    entry = request.app[VIEW].kv_get(key)
    if entry is None or entry.value is None:
        raise _not_found(request, key)
    if raw:
        return web.Response(
            body=entry.value, content_type="application/octet-stream", headers=_index(request)
        )
    return json_response(entry_json(entry), headers=_index(request))


async def put_key(request: web.Request) -> web.Response:
    is_base64 = flag(query(request, {"base64"}), "base64")
    key = _key(request)
    limit = request.app[STATE].max_body
    if request.content_length is not None and request.content_length > limit:
        raise Problem(
            413, "body_too_large", f"request body is larger than the limit of {limit} bytes"
        )
    value = await request.read()  # aiohttp enforces max_body here too (chunked bodies)
    if is_base64:
        try:
            value = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise Problem(400, "bad_base64", f"the body is not valid base64: {exc}") from None
    if len(value) > MAX_VALUE:
        raise Problem(
            413, "value_too_large", f"the value is {len(value)} bytes; the limit is {MAX_VALUE}"
        )
    try:
        entry = await request.app[VIEW].kv_put(key, value)
    except (TypeError, ValueError) as exc:
        raise Problem(400, "bad_value", str(exc)) from None
    except PersistenceError as exc:
        raise Problem(503, "store_unavailable", f"the write was not stored: {exc}") from None
    return json_response(entry_json(entry), headers=_index(request))


async def delete_key(request: web.Request) -> web.Response:
    query(request)
    key = _key(request)
    try:
        entry = await request.app[VIEW].kv_delete(key)
    except PersistenceError as exc:
        raise Problem(503, "store_unavailable", f"the delete was not stored: {exc}") from None
    if entry is None:
        raise _not_found(request, key)
    return json_response(entry_json(entry), headers=_index(request))


async def list_keys(request: web.Request) -> web.Response:
    params = query(request, {"prefix", "keys"})
    keys_only = flag(params, "keys")
    prefix = params.get("prefix", "")
    if len(prefix.encode()) > MAX_KEY:
        raise Problem(400, "bad_param", f"prefix is longer than the longest key ({MAX_KEY} bytes)")
    if "\x00" in prefix:
        raise Problem(400, "bad_param", "prefix contains NUL")
    entries = [e for e in request.app[VIEW].kv_list(prefix) if e.value is not None]
    body: list[Any] = [e.key if keys_only else entry_json(e) for e in entries]
    return json_response(body, headers=_index(request))


def routes() -> list[web.RouteDef]:
    return [
        web.get("/v1/kv", list_keys),
        web.get(KEY_ROUTE, get_key),
        web.put(KEY_ROUTE, put_key),
        web.delete(KEY_ROUTE, delete_key),
    ]
