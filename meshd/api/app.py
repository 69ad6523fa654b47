"""The agent's local HTTP API: an aiohttp application over an ``AgentView``.

``create_app`` builds it; binding is the agent's business (``serve`` helps).
With a token configured every endpoint but ``/v1/health`` requires
``Authorization: Bearer <token>``, so a load balancer or a container's
health check can probe the agent without holding the key to its state.
"""

from __future__ import annotations

import asyncio
import hmac
import logging

from aiohttp import web

from meshd.api import kv, services
from meshd.api import members as member_api
from meshd.api.appkeys import STATE, VIEW, ApiState
from meshd.api.errors import Handler, Problem, error_middleware, json_response, shorten
from meshd.api.openapi import openapi_document
from meshd.api.parsing import query
from meshd.api.view import MEMBER_STATUSES, AgentView

__all__ = ["DEFAULT_MAX_BODY", "OPEN_PATHS", "create_app"]

log = logging.getLogger("meshd.api")

#: Largest request body accepted; a value is at most 1 MiB, and a base64 body
#: of one is a third larger.
DEFAULT_MAX_BODY = 2 * 1024 * 1024
#: Endpoints that answer without the token.
OPEN_PATHS = frozenset({"/v1/health"})


def create_app(
    view: AgentView, *, token: str | None = None, max_body: int = DEFAULT_MAX_BODY
) -> web.Application:
    """The API application for view; token (if set) guards every endpoint but health."""
    if token is not None and not token.strip():
        raise ValueError("the API token must not be empty")
    if max_body < 1:
        raise ValueError("max_body must be at least 1 byte")
    app = web.Application(
        middlewares=[error_middleware, _auth_middleware], client_max_size=max_body
    )
    app[VIEW] = view
    app[STATE] = state = ApiState(token=token.strip() if token else None, max_body=max_body)
    # Imported here: meshd.metrics imports this package (for the view's types).
    from meshd.metrics import make_registry, render

    registry = make_registry(view, state)
    document = openapi_document()

    async def metrics(request: web.Request) -> web.Response:
        body, content_type = render(registry)
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def openapi(request: web.Request) -> web.Response:
        query(request)
        return json_response(document)

    app.add_routes(
        [
            web.get("/v1/agent", agent),
            web.get("/v1/members", members),
            web.get("/v1/health", health),
            web.post("/v1/agent/leave", leave),
            web.get("/v1/agent/leases", leases),
            *member_api.routes(),
            *kv.routes(),
            *services.routes(),
            web.get("/v1/openapi.json", openapi),
            web.get("/metrics", metrics),
        ]
    )
    return app


# ----- authentication ------------------------------------------------------------

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="meshd"'}


@web.middleware
async def _auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = request.app[STATE].token
    if token is not None and request.path not in OPEN_PATHS:
        _check_token(request.headers.get("Authorization"), token)
    return await handler(request)


def _check_token(header: str | None, token: str) -> None:
    if not header:
        raise Problem(
            401,
            "unauthorized",
            "this agent's API requires a token: send 'Authorization: Bearer <token>' "
            "(the CLI reads it from --token or MESHD_TOKEN)",
            _CHALLENGE,
        )
    scheme, _, credentials = header.strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer" or not credentials:
        raise Problem(
            401, "unauthorized", "the Authorization header must be 'Bearer <token>'", _CHALLENGE
        )
    given = credentials.encode("utf-8", "backslashreplace")
    if not hmac.compare_digest(given, token.encode("utf-8", "backslashreplace")):
        raise Problem(403, "forbidden", "wrong API token")


# ----- the agent and its cluster ------------------------------------------------


async def agent(request: web.Request) -> web.Response:
    query(request)
    return json_response(request.app[VIEW].agent_info())


async def leases(request: web.Request) -> web.Response:
    """Every service lease this agent has held since it started (wall-clock
    seconds): how an operator, or a test, checks that no two leaders of a
    service ever overlapped."""
    query(request)
    return json_response(request.app[VIEW].leases())


async def members(request: web.Request) -> web.Response:
    params = query(request, {"status"})
    listed = request.app[VIEW].member_list()
    wanted = params.get("status")
    if wanted is not None:
        statuses = {s.strip() for s in wanted.split(",")}
        unknown = statuses.difference(MEMBER_STATUSES)
        if unknown:
            raise Problem(
                400,
                "bad_param",
                f"unknown status {shorten(sorted(unknown)[0])}; "
                f"expected one or more (comma-separated) of: {', '.join(MEMBER_STATUSES)}",
            )
        listed = [m for m in listed if m.get("status") in statuses]
    return json_response(listed)


async def health(request: web.Request) -> web.Response:
    query(request)
    ok, reason = request.app[VIEW].health()
    if ok:
        return json_response({"status": "ok"})
    detail = reason or "the agent is not in a cluster"
    return json_response(
        {"status": "unavailable", "error": "unavailable", "detail": detail}, status=503
    )


async def leave(request: web.Request) -> web.Response:
    """Start a graceful leave and answer at once: the agent exits when it is done,
    so waiting for it could leave the client without an answer."""
    query(request)
    state = request.app[STATE]
    if state.leave_task is None or state.leave_task.done():  # done: it failed, try again
        state.leave_task = asyncio.create_task(_leave(request.app[VIEW]), name="meshd-api-leave")
    return json_response({"status": "leaving"}, status=202)


async def _leave(view: AgentView) -> None:
    try:
        await view.leave()
    except Exception:
        log.exception("graceful leave requested through the API failed")
