"""Every error the API returns is JSON: ``{"error": code, "detail": text}``.

Handlers raise ``Problem``; the error middleware turns it, aiohttp's own
HTTP exceptions (unknown route, wrong method, body too large) and anything
unexpected into that shape, so a client never has to parse an HTML page or
a bare status line. Unexpected exceptions become a 500 that is logged and
counted: bad input must never get that far, and the tests check that it
doesn't.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any

from aiohttp import web

from meshd.api.appkeys import STATE

__all__ = ["Problem", "error_middleware", "error_response", "json_response", "shorten"]

log = logging.getLogger("meshd.api")

_dumps = partial(json.dumps, default=str, ensure_ascii=False)

#: Error codes for the statuses aiohttp raises by itself.
_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    500: "internal",
    503: "unavailable",
}


class Problem(Exception):
    """An error response: status, a short machine-readable code and a sentence for people."""

    def __init__(
        self, status: int, error: str, detail: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        return error_response(self.status, self.error, self.detail, self.headers)


def json_response(
    data: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.json_response(data, status=status, headers=headers, dumps=_dumps)


def error_response(
    status: int, error: str, detail: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    return json_response({"error": error, "detail": detail}, status=status, headers=headers)


def shorten(text: str, limit: int = 60) -> str:
    """repr of user-supplied text, cut so an error message stays one readable line."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> web.Response:
    status = exc.status
    code = _CODES.get(status, f"http_{status}")
    headers: dict[str, str] = {}
    path = shorten(request.path)
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = sorted(exc.allowed_methods)
        headers["Allow"] = ", ".join(allowed)
        detail = f"{request.method} is not allowed on {path}; allowed: {', '.join(allowed)}"
    elif status == 404:
        detail = f"no such endpoint: {request.method} {path} (see /v1/openapi.json)"
    elif status == 413:
        limit = request.app[STATE].max_body
        detail = f"request body is larger than the limit of {limit} bytes"
    else:
        detail = exc.text or exc.reason
    return error_response(status, code, detail, headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE]
    try:
        response = await handler(request)
    except Problem as problem:
        response = problem.response()
    except web.HTTPException as exc:
        if exc.status < 400:  # redirects and the like are answers, not errors
            raise
        response = _from_http_exception(request, exc)
    except asyncio.CancelledError:
        raise
    except Exception:
        state.internal_errors += 1
        log.exception("API request %s %s failed", request.method, shorten(request.path, 200))
        response = error_response(
            500, "internal", "the agent failed to handle this request; its log has the details"
        )
    state.responses[response.status] = state.responses.get(response.status, 0) + 1
    return response
