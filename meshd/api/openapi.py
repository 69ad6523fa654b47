"""The OpenAPI 3.1 description of the agent's HTTP API, served at /v1/openapi.json.

Written by hand, next to the handlers it describes; a test checks that it
is a valid OpenAPI document and that it lists exactly the routes the
application registers.
"""

from __future__ import annotations

import copy
from typing import Any

from meshd import __version__
from meshd.api.services import LOG_CONTENT_TYPE, MAX_TAIL
from meshd.api.view import MEMBER_STATUSES
from meshd.scheduler.assignment import ReplicaHealth, ReplicaState
from meshd.spec.model import KINDS, MAX_REPLICAS
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
    "SpecError": {
        "type": "object",
        "required": ["error", "detail"],
        "properties": {
            "error": {"type": "string", "examples": ["bad_spec", "bad_name"]},
            "detail": {"type": "string"},
            "field": {
                "type": "string",
                "description": (
                    "With bad_spec: the dotted path of the field to fix, as the document "
                    "wrote it ('ports[1].target', 'services.web.deploy.replicas'); empty "
                    "when the document as a whole is wrong."
                ),
            },
        },
    },
    "ServiceSpec": {
        "type": "object",
        "description": (
            "A service in its canonical stored form (every field explicit, sizes in bytes, "
            "CPU in cores, durations in seconds); see docs for the fields a spec may give."
        ),
        "required": ["v", "name", "replicas", "kind"],
        "properties": {
            "v": {"type": "integer", "const": 1},
            "name": {"type": "string"},
            "image": {"type": ["string", "null"]},
            "command": {"type": ["array", "null"], "items": {"type": "string"}},
            "args": {"type": "array", "items": {"type": "string"}},
            "env": {"type": "object", "additionalProperties": {"type": "string"}},
            "replicas": {"type": "integer", "minimum": 0, "maximum": MAX_REPLICAS},
            "ports": {"type": "array", "items": {"type": "object"}},
            "resources": {"type": "object"},
            "constraints": {"type": "array", "items": {"type": "string"}},
            "kind": {"type": "string", "enum": list(KINDS)},
            "labels": _ref("Labels"),
        },
        "additionalProperties": True,
    },
    "Endpoints": {
        "type": "object",
        "required": ["service", "balance", "ports", "endpoints", "listeners"],
        "properties": {
            "service": {"type": "string"},
            "balance": {"type": "object", "additionalProperties": True},
            "ports": {"type": "array", "items": {"type": "object", "additionalProperties": True}},
            "endpoints": {
                "type": "array",
                "description": "Ready replicas on reachable nodes: what the proxies pick from.",
                "items": {
                    "type": "object",
                    "required": ["id", "node", "address", "ports", "weight"],
                    "properties": {
                        "id": {"type": "string"},
                        "node": {"type": "string"},
                        "address": {"type": "string"},
                        "ports": {"type": "object", "additionalProperties": {"type": "integer"}},
                        "weight": {"type": "integer", "minimum": 1},
                    },
                },
            },
            "listeners": {
                "type": "array",
                "description": "This node's mesh listeners for the service's ports.",
                "items": {"type": "object", "additionalProperties": True},
            },
            "routes_version": {"type": "integer", "minimum": 0},
            "changed_ms": {
                "type": "integer",
                "description": "Wall-clock ms when this node's route for the service last changed.",
            },
        },
    },
    "Leader": {
        "type": "object",
        "required": ["node", "term"],
        "properties": {
            "node": {
                "type": ["string", "null"],
                "description": "The member leading the service; null while none holds the lease.",
            },
            "term": {"type": "integer", "minimum": 0},
        },
    },
    "Service": {
        "type": "object",
        "required": ["name", "kind", "version", "spec", "replicas"],
        "properties": {
            "name": {"type": "string"},
            "kind": {"type": "string", "enum": list(KINDS)},
            "version": {
                "type": "string",
                "description": "Hash of what a replica runs: changes with the spec, not with scaling.",
            },
            "spec": _ref("ServiceSpec"),
            "replicas": {
                "type": "object",
                "required": ["desired", "running", "ready"],
                "properties": {
                    "desired": {"type": "integer", "minimum": 0},
                    "running": {"type": "integer", "minimum": 0},
                    "ready": {"type": "integer", "minimum": 0},
                },
            },
            "leader": {"oneOf": [_ref("Leader"), {"type": "null"}]},
            "pending": {
                "type": "array",
                "description": "Replicas that fit on no node right now, and why.",
                "items": {
                    "type": "object",
                    "required": ["slot", "reason"],
                    "properties": {"slot": {"type": "integer"}, "reason": {"type": "string"}},
                },
            },
            "update": {
                "type": ["object", "null"],
                "description": "The rolling update under way, or how the last one ended.",
            },
            "completed": {"type": "integer", "minimum": 0, "description": "Jobs: replicas done."},
            "created_ms": {"type": "integer"},
            "updated_ms": {"type": "integer"},
        },
        "additionalProperties": True,
    },
    "ServiceWritten": {
        "allOf": [
            _ref("Service"),
            {
                "type": "object",
                "properties": {
                    "warnings": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "What a compose import ignored.",
                    }
                },
            },
        ]
    },
    "Replica": {
        "type": "object",
        "required": ["id", "service", "slot", "node", "version", "state"],
        "properties": {
            "id": {"type": "string"},
            "service": {"type": "string"},
            "slot": {"type": "integer", "minimum": 0},
            "node": {"type": "string"},
            "version": {"type": "string"},
            "state": {"type": "string", "enum": list(ReplicaState.__args__)},  # type: ignore[attr-defined]
            "health": {"type": "string", "enum": list(ReplicaHealth.__args__)},  # type: ignore[attr-defined]
            "address": {"type": "string"},
            "ports": {
                "type": "object",
                "description": "Port name -> host port on address.",
                "additionalProperties": {"type": "integer"},
            },
            "restarts": {"type": "integer", "minimum": 0},
            "started_ms": {"type": "integer"},
            "exit_code": {"type": ["integer", "null"]},
            "reason": {"type": "string", "description": "Why it is not running, for people."},
        },
        "additionalProperties": True,
    },
    "LogLine": {
        "type": "object",
        "description": (
            "One line a replica wrote. A stream that breaks after it started ends with "
            "an {error, detail} line instead."
        ),
        "properties": {
            "replica": {"type": "string"},
            "node": {"type": "string"},
            "stream": {"type": "string", "enum": ["stdout", "stderr"]},
            "time": {"type": "string", "format": "date-time"},
            "text": {"type": "string"},
        },
    },
}

_NAME_PARAM = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "The service: 1-63 of a-z, 0-9 and '-', starting and ending alphanumeric.",
    "schema": {"type": "string", "pattern": "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"},
}

_SPEC_BODY = {
    "required": True,
    "description": (
        "A spec as YAML or JSON (a native spec, a list of them, or a docker-compose file); "
        "the format is recognised from the content."
    ),
    "content": {
        "application/yaml": {"schema": {"type": "string"}},
        "application/json": {"schema": {"type": "object"}},
        "*/*": {"schema": {"type": "string", "format": "binary"}},
    },
}

_GUARDED = {"401": _problem("Unauthorized"), "403": _problem("Forbidden")}

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
    "/v1/agent/leases": {
        "get": {
            "operationId": "listLeases",
            "summary": "Service leases this agent has held since it started (wall-clock s).",
            "responses": {
                "200": _json(
                    {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["service", "term", "start", "until"],
                            "properties": {
                                "service": {"type": "string"},
                                "term": {"type": "integer"},
                                "start": {"type": "number"},
                                "until": {"type": "number"},
                            },
                        },
                    },
                    "Lease periods, oldest first.",
                ),
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
    "/v1/members/{node}": {
        "parameters": [
            {
                "name": "node",
                "in": "path",
                "required": True,
                "description": "The member's node name.",
                "schema": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,63}$"},
            }
        ],
        "delete": {
            "operationId": "removeMember",
            "summary": "Remove a dead member from the lease voter set (restores quorum).",
            "description": (
                "Leases need a strict majority of the voter set, dead members included, so a "
                "cluster that lost nodes for good schedules nothing new until they are removed. "
                "Refused (409) while the member is alive. Remove one member at a time, and "
                "only members known to be dead."
            ),
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "required": ["node", "removed"],
                        "properties": {
                            "node": {"type": "string"},
                            "removed": {"type": "boolean", "const": True},
                        },
                    },
                    "Removed.",
                ),
                "400": _problem("BadRequest"),
                **_GUARDED,
                "404": _problem("NotFound"),
                "409": _problem("Conflict"),
                "503": _problem("Unavailable"),
            },
        },
    },
    "/v1/services": {
        "get": {
            "operationId": "listServices",
            "summary": "Every service, sorted by name.",
            "responses": {
                "200": _json({"type": "array", "items": _ref("Service")}, "The services."),
                "400": _problem("BadRequest"),
                **_GUARDED,
            },
        },
        "post": {
            "operationId": "deployServices",
            "summary": "Create or replace every service of a document (a compose file, say).",
            "description": "Every spec is checked before any is written: one bad spec deploys none.",
            "requestBody": _SPEC_BODY,
            "responses": {
                "200": _json(
                    {"type": "array", "items": _ref("ServiceWritten")}, "The services as stored."
                ),
                "400": _problem("BadSpec"),
                **_GUARDED,
                "409": _problem("Conflict"),
                "413": _problem("TooLarge"),
                "503": _problem("Unavailable"),
            },
        },
    },
    "/v1/services/{name}": {
        "parameters": [_NAME_PARAM],
        "get": {
            "operationId": "getService",
            "summary": "One service: its spec, replica counts, leader, pending replicas, update.",
            "responses": {
                "200": _json(_ref("Service"), "The service."),
                "400": _problem("BadRequest"),
                **_GUARDED,
                "404": _problem("NotFound"),
            },
        },
        "put": {
            "operationId": "putService",
            "summary": "Create or replace one service.",
            "description": (
                "The body holds exactly one service; its name must be the path's, or be left "
                "out. A changed spec rolls out by its update policy; a changed replica count "
                "only scales."
            ),
            "requestBody": _SPEC_BODY,
            "responses": {
                "200": _json(_ref("ServiceWritten"), "Replaced."),
                "201": _json(_ref("ServiceWritten"), "Created."),
                "400": _problem("BadSpec"),
                **_GUARDED,
                "409": _problem("Conflict"),
                "413": _problem("TooLarge"),
                "503": _problem("Unavailable"),
            },
        },
        "delete": {
            "operationId": "deleteService",
            "summary": "Delete a service; its replicas are stopped.",
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "required": ["name", "deleted"],
                        "properties": {
                            "name": {"type": "string"},
                            "deleted": {"type": "boolean", "const": True},
                        },
                    },
                    "Deleted.",
                ),
                "400": _problem("BadRequest"),
                **_GUARDED,
                "404": _problem("NotFound"),
                "409": _problem("Conflict"),
                "503": _problem("Unavailable"),
            },
        },
    },
    "/v1/services/{name}/replicas": {
        "parameters": [_NAME_PARAM],
        "get": {
            "operationId": "listReplicas",
            "summary": "The service's replicas, with their node, state, health and ports.",
            "responses": {
                "200": _json({"type": "array", "items": _ref("Replica")}, "The replicas."),
                "400": _problem("BadRequest"),
                **_GUARDED,
                "404": _problem("NotFound"),
            },
        },
    },
    "/v1/services/{name}/endpoints": {
        "parameters": [_NAME_PARAM],
        "get": {
            "operationId": "getEndpoints",
            "summary": "What this node's proxies and DNS use for the service.",
            "responses": {
                "200": _json(_ref("Endpoints"), "The service's endpoints and listeners."),
                "400": _problem("BadRequest"),
                **_GUARDED,
                "404": _problem("NotFound"),
            },
        },
    },
    "/v1/services/{name}/leader": {
        "parameters": [_NAME_PARAM],
        "get": {
            "operationId": "getLeader",
            "summary": "The member that holds the service's lease and its term.",
            "responses": {
                "200": _json(_ref("Leader"), "The leader (node null while there is none)."),
                "400": _problem("BadRequest"),
                **_GUARDED,
                "404": _problem("NotFound"),
            },
        },
    },
    "/v1/services/{name}/scale": {
        "parameters": [_NAME_PARAM],
        "post": {
            "operationId": "scaleService",
            "summary": "Set the number of replicas (no rollout: running replicas stay).",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["replicas"],
                            "additionalProperties": False,
                            "properties": {
                                "replicas": {
                                    "type": "integer",
                                    "minimum": 0,
                                    "maximum": MAX_REPLICAS,
                                }
                            },
                        }
                    }
                },
            },
            "responses": {
                "200": _json(_ref("Service"), "The service with its new count."),
                "400": _problem("BadRequest"),
                **_GUARDED,
                "404": _problem("NotFound"),
                "409": _problem("Conflict"),
                "503": _problem("Unavailable"),
            },
        },
    },
    "/v1/services/{name}/logs": {
        "parameters": [_NAME_PARAM],
        "get": {
            "operationId": "getLogs",
            "summary": "The replicas' log lines as newline-delimited JSON; ?follow streams on.",
            "parameters": [
                {
                    "name": "tail",
                    "in": "query",
                    "description": "Only the last N lines kept so far (default: all).",
                    "schema": {"type": "integer", "minimum": 0, "maximum": MAX_TAIL},
                },
                {
                    "name": "follow",
                    "in": "query",
                    "description": (
                        "Keep the response open and send new lines as they come "
                        "(chunked), until the client disconnects."
                    ),
                    "schema": _FLAG,
                },
            ],
            "responses": {
                "200": {
                    "description": "One LogLine JSON object per line.",
                    "content": {
                        LOG_CONTENT_TYPE: {
                            "x-itemSchema": _ref("LogLine"),
                            "schema": {"type": "string"},
                        }
                    },
                },
                "400": _problem("BadRequest"),
                **_GUARDED,
                "404": _problem("NotFound"),
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
            "The local HTTP API of a meshd agent: this node, the cluster's members, the "
            "replicated key/value store and the services the cluster runs. Every error is "
            "JSON {error, detail} (a bad spec adds the field to fix). When the agent has an "
            "API token, every endpoint but /v1/health needs 'Authorization: Bearer <token>'."
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
            "BadRequest": _error_response("Bad name, key, body or query parameter."),
            "BadSpec": _json(
                _ref("SpecError"),
                "A bad spec (bad_spec names the field), name or query parameter.",
            ),
            "Unauthorized": _error_response("A token is required and was not given."),
            "Forbidden": _error_response("The token is wrong."),
            "NotFound": _error_response("No such key, service or member."),
            "Conflict": _error_response(
                "The agent refuses the change (a conflicting service, a live member)."
            ),
            "TooLarge": _error_response("The body or the value is too large."),
            "Unavailable": _error_response("The store could not persist the change."),
        },
    },
}


def openapi_document() -> dict[str, Any]:
    """A copy of the document (callers may change theirs)."""
    return copy.deepcopy(_DOCUMENT)
