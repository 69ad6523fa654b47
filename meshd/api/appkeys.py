"""Typed keys for what the API keeps on its aiohttp application."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web

from meshd.api.view import AgentView

__all__ = ["STATE", "VIEW", "ApiState"]


@dataclass
class ApiState:
    """The API's own settings and counters (mutable, unlike the frozen app)."""

    token: str | None
    max_body: int
    #: Responses sent, by status code (exported as metrics).
    responses: dict[int, int] = field(default_factory=dict)
    #: Unexpected exceptions turned into a 500: a bug, whatever the request.
    internal_errors: int = 0
    #: The graceful leave started by POST /v1/agent/leave, if any.
    leave_task: asyncio.Task[None] | None = None


VIEW = web.AppKey("meshd_view", AgentView)
STATE = web.AppKey("meshd_api_state", ApiState)
