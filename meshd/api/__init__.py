"""The agent's local HTTP API (JSON in and out) and its Prometheus endpoint.

``create_app(view)`` builds the aiohttp application over anything that
implements ``AgentView``; ``serve`` binds it. Routes: ``/v1/agent``,
``/v1/members``, ``/v1/health``, ``/v1/agent/leave``, ``/v1/kv[/{key}]``,
``/v1/openapi.json`` and ``/metrics``; the OpenAPI document is the reference.
"""

from meshd.api.app import DEFAULT_MAX_BODY, create_app
from meshd.api.errors import Problem
from meshd.api.kv import INDEX_HEADER, entry_json
from meshd.api.openapi import openapi_document
from meshd.api.serve import ServeError, serve
from meshd.api.view import MEMBER_STATUSES, AgentView

__all__ = [
    "DEFAULT_MAX_BODY",
    "INDEX_HEADER",
    "MEMBER_STATUSES",
    "AgentView",
    "Problem",
    "ServeError",
    "create_app",
    "entry_json",
    "openapi_document",
    "serve",
]
