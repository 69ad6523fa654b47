"""The stored shapes of placement and of replica status, and their codecs.

Ownership (one writer per key, see docs/architecture.md):

* ``assign/<service>``: an ``Assignment``, written only by the service's
  current leader and fenced by its lease term. It carries the spec of every
  version it refers to, so a node never has to guess which spec a replica
  of an older version runs while a rolling update is under way.
* ``status/<node>/<service>``: a ``ServiceStatus``, written only by that
  node: how each of its replicas of the service is doing.

Both are JSON (``meshd kv get assign/web`` is readable). Decoding is strict:
anything malformed raises ``ValueError`` and the caller drops and counts it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from meshd.spec import ServiceSpec

__all__ = [
    "ASSIGN_PREFIX",
    "SERVICE_PREFIX",
    "STATUS_PREFIX",
    "AssignedReplica",
    "Assignment",
    "ReplicaHealth",
    "ReplicaState",
    "ReplicaStatus",
    "ServiceStatus",
    "UpdateState",
    "assign_key",
    "decode_assignment",
    "decode_status",
    "encode_assignment",
    "encode_status",
    "service_key",
    "spec_version",
    "status_key",
]

SERVICE_PREFIX = "service/"
ASSIGN_PREFIX = "assign/"
STATUS_PREFIX = "status/"

ReplicaState = Literal[
    "starting",  # the node is creating it (pulling, starting)
    "running",
    "exited",  # stopped by itself; will be restarted after its backoff
    "succeeded",  # a job replica (or restart: on-failure) that exited 0: done
    "failed",  # exited and its restart policy says never again
    "refused",  # the node did not admit it (does not fit); the leader moves it
    "error",  # the runtime could not start it (image missing...); retried with backoff
]
ReplicaHealth = Literal["none", "starting", "healthy", "unhealthy"]


def service_key(service: str) -> str:
    return SERVICE_PREFIX + service


def assign_key(service: str) -> str:
    return ASSIGN_PREFIX + service


def status_key(node: str, service: str) -> str:
    return f"{STATUS_PREFIX}{node}/{service}"


def spec_version(spec: ServiceSpec) -> str:
    """What a replica runs, as a short hash: changes roll out, scaling does not.

    ``replicas``, the ``update`` policy and ``balance`` are left out: changing
    them never replaces a running replica.
    """
    data = spec.to_dict()
    for key in ("replicas", "update", "balance"):
        data.pop(key, None)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.blake2b(blob, digest_size=6).hexdigest()


@dataclass(frozen=True, slots=True)
class AssignedReplica:
    id: str
    """Unique for the life of the cluster: a moved or replaced replica gets a new id."""
    slot: int
    """0..replicas-1 for services (kept across moves); the job index for jobs."""
    node: str
    version: str

    def to_json(self) -> list[Any]:
        return [self.id, self.slot, self.node, self.version]

    @classmethod
    def from_json(cls, data: object) -> AssignedReplica:
        if not isinstance(data, list) or len(data) != 4:
            raise ValueError("replica must be [id, slot, node, version]")
        rid, slot, node, version = data
        if not (isinstance(rid, str) and rid and isinstance(node, str) and node):
            raise ValueError("replica id and node must be non-empty strings")
        if type(slot) is not int or slot < 0 or not isinstance(version, str):
            raise ValueError("replica slot must be an int >= 0 and version a string")
        return cls(rid, slot, node, version)


@dataclass(frozen=True, slots=True)
class UpdateState:
    """A rolling update in progress, or how the last one ended."""

    from_version: str
    to_version: str
    state: Literal["rolling", "done", "rolled_back", "failed"]
    reason: str = ""
    batch_started_ms: int = 0
    """When the current batch was started (health gate and ``update.delay``)."""
    batch: dict[str, int] = field(default_factory=dict)
    """Replica id -> when it was started (ms), for the new replicas of the current
    batch: the next batch waits until they are ready, and one that is not ready
    by its deadline fails the update."""

    def to_json(self) -> dict[str, Any]:
        return {
            "from": self.from_version,
            "to": self.to_version,
            "state": self.state,
            "reason": self.reason,
            "batch_started_ms": self.batch_started_ms,
            "batch": self.batch,
        }

    @classmethod
    def from_json(cls, data: object) -> UpdateState:
        if not isinstance(data, dict):
            raise ValueError("update must be an object")
        state = data.get("state")
        if state not in ("rolling", "done", "rolled_back", "failed"):
            raise ValueError(f"bad update state {state!r}")
        batch = data.get("batch", {})
        if not isinstance(batch, dict) or not all(
            isinstance(k, str) and type(v) is int for k, v in batch.items()
        ):
            raise ValueError("update batch must map replica id to a time in ms")
        return cls(
            _s(data.get("from")),
            _s(data.get("to")),
            state,
            _s(data.get("reason", "")),
            _i(data.get("batch_started_ms", 0)),
            batch,
        )


@dataclass(frozen=True, slots=True)
class Assignment:
    """Where a service's replicas run, as decided by its leader in ``term``."""

    service: str
    term: int
    leader: str
    version: str
    """The version the service should converge to."""
    specs: dict[str, dict[str, Any]]
    """``ServiceSpec.to_dict()`` by version, for every version referred to."""
    replicas: tuple[AssignedReplica, ...] = ()
    pending: tuple[tuple[int, str], ...] = ()
    """(slot, reason) of replicas that fit nowhere right now."""
    completed: int = 0
    """Jobs: replicas that succeeded so far."""
    update: UpdateState | None = None
    failures: dict[str, int] = field(default_factory=dict)
    """Node -> when (ms) a replica was last refused there or failed there
    (runtime errors, crash loops): placement avoids such nodes for a while."""
    updated_ms: int = 0
    job_failures: int = 0
    """Jobs: replicas that failed so far (counted against the backoff limit)."""
    job_failed: str = ""
    """Jobs: why the job gave up; empty while it has not."""

    def spec(self, version: str | None = None) -> ServiceSpec:
        return ServiceSpec.from_dict(self.specs[version or self.version])


def encode_assignment(a: Assignment) -> bytes:
    return json.dumps(
        {
            "service": a.service,
            "term": a.term,
            "leader": a.leader,
            "version": a.version,
            "specs": a.specs,
            "replicas": [r.to_json() for r in a.replicas],
            "pending": [list(p) for p in a.pending],
            "completed": a.completed,
            "update": None if a.update is None else a.update.to_json(),
            "failures": a.failures,
            "updated_ms": a.updated_ms,
            "job_failures": a.job_failures,
            "job_failed": a.job_failed,
        },
        separators=(",", ":"),
        sort_keys=True,
    ).encode()


def decode_assignment(raw: bytes) -> Assignment:
    data = _load(raw)
    specs = data.get("specs")
    if not isinstance(specs, dict) or not all(
        isinstance(k, str) and isinstance(v, dict) for k, v in specs.items()
    ):
        raise ValueError("specs must map version to spec")
    version = _s(data.get("version"))
    if version not in specs:
        raise ValueError("the target version has no spec")
    replicas = tuple(AssignedReplica.from_json(r) for r in _l(data.get("replicas", [])))
    for r in replicas:
        if r.version not in specs:
            raise ValueError(f"replica {r.id} runs version {r.version} that has no spec")
    pending = []
    for p in _l(data.get("pending", [])):
        if not isinstance(p, list) or len(p) != 2 or type(p[0]) is not int:
            raise ValueError("pending must be [slot, reason]")
        pending.append((p[0], _s(p[1])))
    failures = data.get("failures", {})
    if not isinstance(failures, dict) or not all(
        isinstance(k, str) and type(v) is int for k, v in failures.items()
    ):
        raise ValueError("failures must map node to a time in ms")
    update = data.get("update")
    return Assignment(
        service=_s(data.get("service")),
        term=_i(data.get("term")),
        leader=_s(data.get("leader")),
        version=version,
        specs=specs,
        replicas=replicas,
        pending=tuple(pending),
        completed=_i(data.get("completed", 0)),
        update=None if update is None else UpdateState.from_json(update),
        failures=failures,
        updated_ms=_i(data.get("updated_ms", 0)),
        job_failures=_i(data.get("job_failures", 0)),
        job_failed=_s(data.get("job_failed", "")),
    )


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """One replica as its node reports it."""

    id: str
    slot: int
    version: str
    state: ReplicaState
    health: ReplicaHealth = "none"
    address: str = ""
    """Where the replica's host ports are reachable (the node's advertise address)."""
    ports: dict[str, int] = field(default_factory=dict)
    """Port name -> host port on ``address``."""
    restarts: int = 0
    started_ms: int = 0
    exit_code: int | None = None
    reason: str = ""
    """Why it is not running (refusal, runtime error, exit), for people."""

    @property
    def ready(self) -> bool:
        """Running and passing its health check (or having none): may take traffic."""
        return self.state == "running" and self.health in ("none", "healthy")

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "slot": self.slot,
            "version": self.version,
            "state": self.state,
            "health": self.health,
            "address": self.address,
            "ports": self.ports,
            "restarts": self.restarts,
            "started_ms": self.started_ms,
            "exit_code": self.exit_code,
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, data: object) -> ReplicaStatus:
        if not isinstance(data, dict):
            raise ValueError("replica status must be an object")
        state = data.get("state")
        if state not in ReplicaState.__args__:  # type: ignore[attr-defined]
            raise ValueError(f"bad replica state {state!r}")
        health = data.get("health", "none")
        if health not in ReplicaHealth.__args__:  # type: ignore[attr-defined]
            raise ValueError(f"bad replica health {health!r}")
        ports = data.get("ports", {})
        if not isinstance(ports, dict) or not all(
            isinstance(k, str) and type(v) is int for k, v in ports.items()
        ):
            raise ValueError("ports must map name to port")
        exit_code = data.get("exit_code")
        if exit_code is not None and type(exit_code) is not int:
            raise ValueError("exit_code must be an int or null")
        return cls(
            id=_s(data.get("id")),
            slot=_i(data.get("slot")),
            version=_s(data.get("version")),
            state=state,
            health=health,
            address=_s(data.get("address", "")),
            ports=ports,
            restarts=_i(data.get("restarts", 0)),
            started_ms=_i(data.get("started_ms", 0)),
            exit_code=exit_code,
            reason=_s(data.get("reason", "")),
        )


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    """A node's replicas of one service."""

    node: str
    service: str
    term: int
    """The newest assignment term this node has applied (fencing)."""
    replicas: tuple[ReplicaStatus, ...] = ()
    updated_ms: int = 0

    def by_id(self) -> dict[str, ReplicaStatus]:
        return {r.id: r for r in self.replicas}


def encode_status(s: ServiceStatus) -> bytes:
    return json.dumps(
        {
            "node": s.node,
            "service": s.service,
            "term": s.term,
            "replicas": [r.to_json() for r in s.replicas],
            "updated_ms": s.updated_ms,
        },
        separators=(",", ":"),
        sort_keys=True,
    ).encode()


def decode_status(raw: bytes) -> ServiceStatus:
    data = _load(raw)
    return ServiceStatus(
        node=_s(data.get("node")),
        service=_s(data.get("service")),
        term=_i(data.get("term", 0)),
        replicas=tuple(ReplicaStatus.from_json(r) for r in _l(data.get("replicas", []))),
        updated_ms=_i(data.get("updated_ms", 0)),
    )


def _load(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("must be a JSON object")
    return data


def _s(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    return value


def _i(value: object) -> int:
    if type(value) is not int:
        raise ValueError(f"expected an integer, got {type(value).__name__}")
    return value


def _l(value: object) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list, got {type(value).__name__}")
    return value
