"""The service endpoints: deploy, inspect, scale, remove and read the logs of services.

A spec arrives as the bytes a user wrote (native YAML or JSON, or a
docker-compose file) and is read by the same ``meshd.spec`` parser as the
CLI, so a spec that the API refuses fails the same way on either side, and
the 400 names the field to fix: ``{"error": "bad_spec", "detail", "field"}``.
Parsing runs in a worker thread: a large YAML document takes long enough to
stall gossip if it ran on the event loop.

Logs are newline-delimited JSON, streamed as they come with ``?follow``.
aiohttp does not cancel a handler whose client went away, so a follower
checks the connection while it waits for the next line and stops when the
client is gone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Mapping
from functools import partial
from typing import Any, TypeVar

from aiohttp import web

from meshd.api.appkeys import STATE, VIEW
from meshd.api.errors import Problem, json_response, shorten
from meshd.api.parsing import flag, query
from meshd.spec import ServiceSpec, SpecError, specs_from_value
from meshd.spec.compose import is_compose
from meshd.spec.model import MAX_REPLICAS
from meshd.spec.parse import load
from meshd.state.store import PersistenceError

__all__ = [
    "LOG_CONTENT_TYPE",
    "MAX_TAIL",
    "SERVICE_NAME",
    "SpecProblem",
    "routes",
    "write_errors",
]

log = logging.getLogger("meshd.api")

T = TypeVar("T")

#: A service name, as the spec defines it (a DNS label).
SERVICE_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
#: The most log lines ``?tail`` may ask for.
MAX_TAIL = 100_000
LOG_CONTENT_TYPE = "application/x-ndjson"
#: How often a log follower with nothing to send checks that its client is still there.
DISCONNECT_CHECK = 0.25
#: Lines gathered into one write when not following (fewer, larger chunks).
_BATCH_BYTES = 32 * 1024

_dumps = partial(json.dumps, default=str, ensure_ascii=False, separators=(",", ":"))


class SpecProblem(Problem):
    """A 400 for a bad spec that also names the field: ``{"error", "detail", "field"}``."""

    def __init__(self, exc: SpecError) -> None:
        super().__init__(400, "bad_spec", str(exc) or "bad spec")
        self.field = exc.path

    def response(self) -> web.Response:
        return json_response(
            {"error": self.error, "detail": self.detail, "field": self.field}, status=self.status
        )


# ----- reading requests ----------------------------------------------------------


def _name(request: web.Request) -> str:
    name = request.match_info["name"]
    if not SERVICE_NAME.fullmatch(name):
        raise Problem(
            400,
            "bad_name",
            f"bad service name {shorten(name)}: 1-63 characters of a-z, 0-9 and '-', "
            "starting and ending with a letter or digit",
        )
    return name


def _not_found(name: str) -> Problem:
    return Problem(404, "service_not_found", f"no service {shorten(name)}")


async def _body(request: web.Request) -> bytes:
    limit = request.app[STATE].max_body
    if request.content_length is not None and request.content_length > limit:
        raise Problem(
            413, "body_too_large", f"request body is larger than the limit of {limit} bytes"
        )
    return await request.read()  # aiohttp enforces the limit on chunked bodies too


async def _parse(function: Any, *args: Any) -> Any:
    """Run a spec parser in a thread; a SpecError becomes a 400 naming its field."""
    try:
        return await asyncio.to_thread(function, *args)
    except SpecError as exc:
        raise SpecProblem(exc) from None


def one_spec(body: bytes, name: str) -> ServiceSpec:
    """The one spec a PUT to /v1/services/{name} carries; its name may be left out."""
    value = load(body)
    if isinstance(value, Mapping) and not is_compose(value) and "name" not in value:
        value = {**value, "name": name}
    specs = specs_from_value(value)
    if len(specs) != 1:
        raise SpecError(
            "",
            f"the document holds {len(specs)} services; PUT /v1/services/{name} takes one "
            "(POST /v1/services deploys several)",
        )
    spec = specs[0]
    if spec.name != name:
        if is_compose(value):
            field = f"services.{spec.name}"
        elif isinstance(value, list):
            field = "[0].name"
        else:
            field = "name"
        raise SpecError(field, f"the service is named {spec.name!r} but the path names {name!r}")
    return spec


async def write_errors(write: Awaitable[T]) -> T:
    """Await an agent write, mapping its refusals to answers."""
    try:
        return await write
    except SpecError as exc:
        raise SpecProblem(exc) from None
    except PersistenceError as exc:
        raise Problem(503, "store_unavailable", f"the change was not stored: {exc}") from None
    except ValueError as exc:
        raise Problem(409, "conflict", str(exc) or "the agent refused the change") from None


def _with_warnings(record: dict[str, Any], spec: ServiceSpec) -> dict[str, Any]:
    """A write's answer: the record plus what a compose import ignored."""
    return {**record, "warnings": list(spec.warnings)}


# ----- handlers ----------------------------------------------------------------


async def list_services(request: web.Request) -> web.Response:
    query(request)
    return json_response(request.app[VIEW].service_list())


async def deploy(request: web.Request) -> web.Response:
    """Deploy every service of a document (compose file, list or one spec).

    All specs are checked before any is written, so a bad one deploys nothing.
    """
    query(request)
    specs: list[ServiceSpec] = await _parse(_parse_all, await _body(request))
    view = request.app[VIEW]
    records = [_with_warnings(await write_errors(view.service_put(s)), s) for s in specs]
    return json_response(records)


def _parse_all(body: bytes) -> list[ServiceSpec]:
    return specs_from_value(load(body))


async def put_service(request: web.Request) -> web.Response:
    query(request)
    name = _name(request)
    spec: ServiceSpec = await _parse(one_spec, await _body(request), name)
    view = request.app[VIEW]
    existed = view.service_get(name) is not None
    record = await write_errors(view.service_put(spec))
    return json_response(_with_warnings(record, spec), status=200 if existed else 201)


async def get_service(request: web.Request) -> web.Response:
    query(request)
    name = _name(request)
    record = request.app[VIEW].service_get(name)
    if record is None:
        raise _not_found(name)
    return json_response(record)


async def delete_service(request: web.Request) -> web.Response:
    query(request)
    name = _name(request)
    if not await write_errors(request.app[VIEW].service_delete(name)):
        raise _not_found(name)
    return json_response({"name": name, "deleted": True})


async def get_replicas(request: web.Request) -> web.Response:
    query(request)
    name = _name(request)
    replicas = request.app[VIEW].service_replicas(name)
    if replicas is None:
        raise _not_found(name)
    return json_response(replicas)


async def get_endpoints(request: web.Request) -> web.Response:
    name = _name(request)
    endpoints = request.app[VIEW].service_endpoints(name)
    if endpoints is None:
        raise _not_found(name)
    return json_response(endpoints)


async def get_leader(request: web.Request) -> web.Response:
    query(request)
    name = _name(request)
    leader = request.app[VIEW].service_leader(name)
    if leader is None:
        raise _not_found(name)
    return json_response(leader)


async def scale(request: web.Request) -> web.Response:
    query(request)
    name = _name(request)
    replicas = _replicas(await _body(request))
    record = await write_errors(request.app[VIEW].service_scale(name, replicas))
    if record is None:
        raise _not_found(name)
    return json_response(record)


def _replicas(body: bytes) -> int:
    usage = f'the body must be {{"replicas": N}} with N from 0 to {MAX_REPLICAS}'
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise Problem(400, "bad_body", f"the body is not JSON; {usage}") from None
    if not isinstance(data, dict) or set(data) != {"replicas"}:
        raise Problem(400, "bad_body", usage)
    value = data["replicas"]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_REPLICAS:
        raise Problem(400, "bad_body", f"{usage}, got {shorten(repr(value))}")
    return value


async def logs(request: web.Request) -> web.StreamResponse:
    params = query(request, {"tail", "follow"})
    follow = flag(params, "follow")
    tail = _tail(params.get("tail"))
    name = _name(request)
    view = request.app[VIEW]
    if view.service_get(name) is None:
        raise _not_found(name)
    try:
        lines = view.service_logs(name, tail=tail, follow=follow)
    except KeyError:
        raise _not_found(name) from None
    response = web.StreamResponse(
        headers={"Content-Type": LOG_CONTENT_TYPE, "Cache-Control": "no-cache"}
    )
    response.enable_chunked_encoding()
    try:
        await response.prepare(request)
        await _send(request, response, lines, follow)
        await response.write_eof()
    except ConnectionResetError:  # the client went away: nothing left to do
        pass
    finally:
        await _close(lines)
    return response


def _tail(text: str | None) -> int | None:
    if text is None:
        return None
    if not text.isascii() or not text.isdigit() or int(text) > MAX_TAIL:
        raise Problem(
            400,
            "bad_param",
            f"query parameter 'tail' must be a number of lines from 0 to {MAX_TAIL}, "
            f"not {shorten(text)}",
        )
    return int(text)


async def _send(
    request: web.Request,
    response: web.StreamResponse,
    lines: AsyncIterator[dict[str, Any]],
    follow: bool,
) -> None:
    source = _until_disconnected(request, lines) if follow else lines
    batch: list[str] = []
    size = 0
    try:
        async for line in source:
            text = _dumps(line) + "\n"
            if follow:
                await response.write(text.encode())
                continue
            batch.append(text)
            size += len(text)
            if size >= _BATCH_BYTES:
                await response.write("".join(batch).encode())
                batch, size = [], 0
    except KeyError:  # the service was removed while its logs were read
        pass
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception as exc:
        # The status is sent already: the stream's last line says what broke.
        request.app[STATE].internal_errors += 1
        log.exception("reading the logs of %s failed", request.match_info["name"])
        batch.append(_dumps({"error": "internal", "detail": f"the log stream failed: {exc}"}))
        batch.append("\n")
    finally:
        if source is not lines:
            await _close(source)
    if batch:
        await response.write("".join(batch).encode())


async def _until_disconnected(
    request: web.Request, lines: AsyncIterator[dict[str, Any]]
) -> AsyncIterator[dict[str, Any]]:
    """lines, ending early once the client has closed its connection."""
    while True:
        step = asyncio.ensure_future(anext(lines))
        try:
            while not (await asyncio.wait({step}, timeout=DISCONNECT_CHECK))[0]:
                if _gone(request):
                    return
        finally:
            if not step.done():
                step.cancel()
                await asyncio.wait({step})  # the iterator must be idle before it is closed
        try:
            line = step.result()
        except StopAsyncIteration:
            return
        except asyncio.CancelledError:
            return
        yield line


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _close(lines: object) -> None:
    aclose = getattr(lines, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception:
        log.exception("closing a log stream failed")


def routes() -> list[web.RouteDef]:
    one = "/v1/services/{name}"
    return [
        web.get("/v1/services", list_services),
        web.post("/v1/services", deploy),
        web.get(one, get_service),
        web.put(one, put_service),
        web.delete(one, delete_service),
        web.get(one + "/replicas", get_replicas),
        web.get(one + "/endpoints", get_endpoints),
        web.get(one + "/leader", get_leader),
        web.post(one + "/scale", scale),
        web.get(one + "/logs", logs, allow_head=False),
    ]
