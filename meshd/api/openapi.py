"""The OpenAPI 3.1 description of the agent's HTTP API, served at /v1/openapi.json.

Written by hand, next to the handlers it describes; a test checks that it
is a valid OpenAPI document and that it lists exactly the routes the
application registers.
"""

from __future__ import annotations

import copy
from typing import Any

from meshd import __version__
from meshd.api.view import MEMBER_STATUSES
from meshd.state.store import MAX_KEY, MAX_VALUE

__all__ = ["openapi_document"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str, headers: dict[str, Any] | None = None) -> dict:
    out: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if headers:
        out["headers"] = headers
    return out


def _problem(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/responses/{name}"}


_INDEX = {"X-Meshd-Index": {"$ref": "#/components/headers/Index"}}
_FLAG = {"type": "boolean", "default": False}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error", "detail"],
        "properties": {
            "error": {"type": "string", "description": "Short machine-readable code."},
            "detail": {"type": "string", "description": "What went wrong, for people."},
        },
    },
    "Labels": {"type": "object", "additionalProperties": {"type": "string"}},
    "Capacity": {
        "type": "object",
        "description": "Resources the node offers (CPU cores, memory, disks, GPUs).",
        "additionalProperties": True,
    },
    "Agent": {
        "type": "object",
        "required": ["name", "address", "cluster", "version"],
        "properties": {
            "name": {"type": "string"},
            "address": {"type": "string", "description": "Gossip address, host:port."},
            "api": {"type": "string", "description": "This API's address, host:port."},
            "cluster": {"type": "string"},
            "version": {"type": "string"},
            "labels": _ref("Labels"),
            "capacity": _ref("Capacity"),
            "driver": {"type": ["string", "null"], "description": "Container runtime driver."},
        },
        "additionalProperties": True,
    },
    "Member": {
        "type": "object",
        "required": ["name", "address", "status"],
        "properties": {
            "name": {"type": "string"},
            "address": {"type": "string"},
            "status": {"type": "string", "enum": list(MEMBER_STATUSES)},
            "labels": _ref("Labels"),
            "capacity": _ref("Capacity"),
            "rtt_ms": {
                "type": ["number", "null"],
                "description": "Estimated round-trip time from this node, if known.",
            },
        },
        "additionalProperties": True,
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {
            "status": {"type": "string", "enum": ["ok", "unavailable"]},
            "error": {"type": "string"},
            "detail": {"type": "string"},
        },
    },
    "Leaving": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string", "const": "leaving"}},
    },
    "Entry": {
        "type": "object",
        "required": ["key", "version"],
        "properties": {
            "key": {"type": "string", "maxLength": MAX_KEY},
            "value": {
                "type": ["string", "null"],
                "description": "The value as text; null when it is not valid UTF-8.",
            },
            "value_base64": {"type": "string", "contentEncoding": "base64"},
            "size": {"type": "integer", "minimum": 0, "maximum": MAX_VALUE},
            "deleted": {"type": "boolean", "description": "Present (true) on a delete's answer."},
            "version": {
                "type": "string",
                "description": "The write's hybrid-logical-clock version: wall_ms.counter.node.",
                "examples": ["1718000000000.0.node-1"],
            },
            "modified": {"type": ["string", "null"], "format": "date-time"},
        },
    },
}

_KEY_PARAM = {
    "name": "key",
    "in": "path",
    "required": True,
    "description": (
        f"The key, percent-encoded; '/' may appear as is. 1..{MAX_KEY} UTF-8 bytes, printable, "
        "no leading '/', no '..' segment."
    ),
    "schema": {"type": "string"},
}

_PATHS: dict[str, Any] = {
    "/v1/agent": {
        "get": {
            "operationId": "getAgent",
            "summary": "This node: name, addresses, cluster, version, labels, capacity.",
            "responses": {
                "200": _json(_ref("Agent"), "This node."),
                "400": _problem("BadRequest"),
                "401": _problem("Unauthorized"),
                "403": _problem("Forbidden"),
            },
        }
    },
    "/v1/members": {
        "get": {
            "operationId": "listMembers",
            "summary": "Every member of the cluster as this node sees it.",
            "parameters": [
                {
                    "name": "status",
                    "in": "query",
                    "description": "Only members with one of these statuses (comma-separated).",
                    "schema": {"type": "string", "examples": ["alive", "alive,suspect"]},
                }
            ],
            "responses": {
                "200": _json({"type": "array", "items": _ref("Member")}, "The members."),
                "400": _problem("BadRequest"),
                "401": _problem("Unauthorized"),
                "403": _problem("Forbidden"),
            },
        }
    },
    "/v1/health": {
        "get": {
            "operationId": "getHealth",
            "summary": "Whether the agent is up and in a cluster. Never needs the token.",
            "security": [],
            "responses": {
                "200": _json(_ref("Health"), "Healthy."),
                "400": _problem("BadRequest"),
                "503": _json(_ref("Health"), "Not healthy; detail says why."),
            },
        }
    },
    "/v1/agent/leave": {
        "post": {
            "operationId": "leave",
            "summary": "Leave the cluster gracefully; the agent exits once it has left.",
            "responses": {
                "202": _json(_ref("Leaving"), "The leave has started."),
                "400": _problem("BadRequest"),
                "401": _problem("Unauthorized"),
                "403": _problem("Forbidden"),
            },
        }
    },
    "/v1/kv": {
        "get": {
            "operationId": "listKeys",
            "summary": "Live keys (with their values) whose key starts with prefix, sorted.",
            "parameters": [
                {
                    "name": "prefix",
                    "in": "query",
                    "schema": {"type": "string", "default": ""},
                },
                {
                    "name": "keys",
                    "in": "query",
                    "description": "Return the keys only (an array of strings).",
                    "schema": _FLAG,
                },
            ],
            "responses": {
                "200": _json(
                    {
                        "oneOf": [
                            {"type": "array", "items": _ref("Entry")},
                            {"type": "array", "items": {"type": "string"}},
                        ]
                    },
                    "The entries, or their keys with ?keys.",
                    _INDEX,
                ),
                "400": _problem("BadRequest"),
                "401": _problem("Unauthorized"),
                "403": _problem("Forbidden"),
            },
        }
    },
    "/v1/kv/{key}": {
        "parameters": [_KEY_PARAM],
        "get": {
            "operationId": "getKey",
            "summary": "One key: JSON, or the bare value with ?raw.",
            "parameters": [
                {
                    "name": "raw",
                    "in": "query",
                    "description": "Answer with the value's bytes (application/octet-stream).",
                    "schema": _FLAG,
                }
            ],
            "responses": {
                "200": {
                    "description": "The entry.",
                    "headers": _INDEX,
                    "content": {
                        "application/json": {"schema": _ref("Entry")},
                        "application/octet-stream": {
                            "schema": {"type": "string", "format": "binary"}
                        },
                    },
                },
                "400": _problem("BadRequest"),
                "401": _problem("Unauthorized"),
                "403": _problem("Forbidden"),
                "404": _problem("NotFound"),
            },
        },
        "put": {
            "operationId": "putKey",
            "summary": "Write a key: the body is the value (or its base64 with ?base64).",
            "parameters": [
                {
                    "name": "base64",
                    "in": "query",
                    "description": "The body is base64 text, to be decoded.",
                    "schema": _FLAG,
                }
            ],
            "requestBody": {
                "required": False,
                "description": f"The value, at most {MAX_VALUE} bytes.",
                "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
            },
            "responses": {
                "200": _json(_ref("Entry"), "Written and persisted on this node.", _INDEX),
                "400": _problem("BadRequest"),
                "401": _problem("Unauthorized"),
                "403": _problem("Forbidden"),
                "413": _problem("TooLarge"),
                "503": _problem("Unavailable"),
            },
        },
        "delete": {
            "operationId": "deleteKey",
            "summary": "Delete a key.",
            "responses": {
                "200": _json(_ref("Entry"), "Deleted (the answer has deleted: true).", _INDEX),
                "400": _problem("BadRequest"),
                "401": _problem("Unauthorized"),
                "403": _problem("Forbidden"),
                "404": _problem("NotFound"),
                "503": _problem("Unavailable"),
            },
        },
    },
    "/v1/openapi.json": {
        "get": {
            "operationId": "getOpenApi",
            "summary": "This document.",
            "responses": {
                "200": _json({"type": "object"}, "The OpenAPI document."),
                "401": _problem("Unauthorized"),
                "403": _problem("Forbidden"),
            },
        }
    },
    "/metrics": {
        "get": {
            "operationId": "getMetrics",
            "summary": "Prometheus metrics: members by status, gossip, store and sync traffic.",
            "responses": {
                "200": {
                    "description": "Prometheus text exposition.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                "401": _problem("Unauthorized"),
                "403": _problem("Forbidden"),
            },
        }
    },
}


def _error_response(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


_DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "meshd agent API",
        "version": __version__,
        "description": (
            "The local HTTP API of a meshd agent: this node, the cluster's members and the "
            "replicated key/value store. Every error is JSON {error, detail}. When the agent "
            "has an API token, every endpoint but /v1/health needs 'Authorization: Bearer <token>'."
        ),
    },
    "servers": [{"url": "http://127.0.0.1:7947"}],
    "security": [{"bearer": []}, {}],
    "paths": _PATHS,
    "components": {
        "schemas": _SCHEMAS,
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "headers": {
            "Index": {
                "description": "The store's change index when the answer was made.",
                "schema": {"type": "integer", "minimum": 0},
            }
        },
        "responses": {
            "BadRequest": _error_response("Bad key, body or query parameter."),
            "Unauthorized": _error_response("A token is required and was not given."),
            "Forbidden": _error_response("The token is wrong."),
            "NotFound": _error_response("No such key."),
            "TooLarge": _error_response("The body or the value is too large."),
            "Unavailable": _error_response("The store could not persist the change."),
        },
    },
}


def openapi_document() -> dict[str, Any]:
    """A copy of the document (callers may change theirs)."""
    return copy.deepcopy(_DOCUMENT)
