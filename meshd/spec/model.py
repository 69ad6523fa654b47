"""The service spec as frozen values, and the rules that build them from a native dict.

``ServiceSpec.from_dict`` is the single gate: native YAML/JSON, converted compose
files and the canonical form kept in the replicated store all pass through it,
so every spec the cluster holds obeys the same rules. ``to_dict`` writes the
canonical form (every field explicit, numbers in base units, ``"v": 1``) that
``from_dict`` reads back to an equal spec.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from meshd.labels import key_problem, valid_value

from .errors import SpecError, join, show
from .units import parse_cpu, parse_duration, parse_size

VERSION = 1
MAX_REPLICAS = 10_000

_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CONSTRAINT = re.compile(r"\s*([A-Za-z0-9_./-]+)\s*(==|!=|\bin\b)\s*(.*?)\s*", re.DOTALL)
_CONSTRAINT_VALUE = re.compile(r"[A-Za-z0-9_.:/-]+")

PROTOCOLS = ("tcp", "http")
RESTARTS = ("always", "on-failure", "never")
KINDS = ("service", "job")
BALANCE_POLICIES = (
    "round_robin",
    "least_conn",
    "random",
    "p2c",
    "ewma",
    "hash",
    "weighted",
    "local_first",
)
"""Kept equal to ``meshd.proxy.balancing.POLICIES`` (a test checks): the spec
layer imports nothing from the features."""
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")


# -- small typed readers -------------------------------------------------------


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _mapping(value: object, path: str) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise SpecError(path, f"must be a mapping, got {_type_name(value)}")
    return value


def _list(value: object, path: str) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise SpecError(path, f"must be a list, got {_type_name(value)}")
    return list(value)


def _str(value: object, path: str, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise SpecError(path, f"must be a string, got {_type_name(value)}")
    if not empty and not value.strip():
        raise SpecError(path, "must not be empty")
    return value


def _scalar_str(value: object, path: str) -> str:
    """YAML turns ``1`` and ``true`` into numbers and bools; env values mean text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
        return str(value)
    if isinstance(value, str):
        return value
    raise SpecError(path, f"must be a string, got {_type_name(value)}")


def _int(value: object, path: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(path, f"must be an integer {low}..{high}, got {_type_name(value)}")
    if not low <= value <= high:
        raise SpecError(path, f"must be {low}..{high}, got {show(value)}")
    return value


def _bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise SpecError(path, f"must be true or false, got {_type_name(value)}")
    return value


def _choice(value: object, path: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise SpecError(path, f"must be one of {', '.join(choices)}, got {show(value)}")
    return value


def _known(data: Mapping[Any, Any], path: str, known: tuple[str, ...]) -> None:
    for key in data:
        if not isinstance(key, str) or key not in known:
            raise SpecError(join(path, str(key)), f"unknown field (known: {', '.join(known)})")


def _argv(value: object, path: str) -> tuple[str, ...]:
    """A command as a list, or a string split the way a shell would."""
    if isinstance(value, str):
        try:
            argv = shlex.split(value)
        except ValueError as exc:
            raise SpecError(path, f"cannot split command: {exc}") from None
    else:
        argv = [_str(a, join(path, i), empty=True) for i, a in enumerate(_list(value, path))]
    return tuple(argv)


# -- parts ----------------------------------------------------------------------


@dataclass(frozen=True)
class Port:
    """A named port: ``target`` inside the replica, ``service_port`` cluster-wide."""

    name: str
    target: int
    protocol: str = "tcp"
    service_port: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "target": self.target,
            "protocol": self.protocol,
            "service_port": self.service_port,
        }

    @classmethod
    def from_dict(cls, data: object, path: str) -> Port:
        data = _mapping(data, path)
        _known(data, path, ("name", "target", "protocol", "service_port"))
        if "name" not in data:
            raise SpecError(join(path, "name"), "is required")
        if "target" not in data:
            raise SpecError(join(path, "target"), "is required")
        name = _str(data["name"], join(path, "name"))
        if not _DNS_LABEL.fullmatch(name) or len(name) > 15:
            raise SpecError(
                join(path, "name"), f"must be 1-15 characters of a-z, 0-9 and '-', got {show(name)}"
            )
        service_port = data.get("service_port")
        if service_port is not None:
            service_port = _int(service_port, join(path, "service_port"), 1, 65535)
        return cls(
            name=name,
            target=_int(data["target"], join(path, "target"), 1, 65535),
            protocol=_choice(data.get("protocol", "tcp"), join(path, "protocol"), PROTOCOLS),
            service_port=service_port,
        )


@dataclass(frozen=True)
class Resources:
    """What one replica needs; ``None`` means not reserved."""

    cpu: float | None = None
    memory: int | None = None
    disk: int | None = None
    gpu: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"cpu": self.cpu, "memory": self.memory, "disk": self.disk, "gpu": self.gpu}

    @classmethod
    def from_dict(cls, data: object, path: str) -> Resources:
        data = _mapping(data, path)
        _known(data, path, ("cpu", "memory", "disk", "gpu"))

        def opt(key: str, parse: Any) -> Any:
            value = data.get(key)
            return None if value is None else parse(value, join(path, key))

        return cls(
            cpu=opt("cpu", parse_cpu),
            memory=opt("memory", parse_size),
            disk=opt("disk", parse_size),
            gpu=_int(data.get("gpu", 0), join(path, "gpu"), 0, 1024),
        )


@dataclass(frozen=True)
class Constraint:
    """``label.zone == a``: ``attr`` is ``node.name``, ``node.id`` or ``label.<key>``."""

    attr: str
    op: str
    value: str | tuple[str, ...]

    def __str__(self) -> str:
        if isinstance(self.value, tuple):
            return f"{self.attr} in ({', '.join(self.value)})"
        return f"{self.attr} {self.op} {self.value}"

    def matches(self, attrs: Mapping[str, str]) -> bool:
        """Whether a node with these attributes (``node.name``, ``label.zone``) qualifies."""
        have = attrs.get(self.attr)
        if self.op == "in":
            return have in self.value
        if self.op == "==":
            return have == self.value
        return have != self.value

    @classmethod
    def parse(cls, text: object, path: str) -> Constraint:
        text = _str(text, path)
        match = _CONSTRAINT.fullmatch(text)
        if match is None:
            raise SpecError(
                path,
                f"cannot parse constraint {show(text)} "
                "(use e.g. 'label.zone == a' or 'label.disk in (ssd, nvme)')",
            )
        attr, op, rest = match.groups()
        _check_attr(attr, path)
        if op == "in":
            if not (rest.startswith("(") and rest.endswith(")")):
                raise SpecError(path, f"'in' needs a list in parentheses, got {show(rest)}")
            items = [v.strip() for v in rest[1:-1].split(",")]
            if not items or any(not _CONSTRAINT_VALUE.fullmatch(v) for v in items):
                raise SpecError(path, f"bad value list {show(rest)}")
            return cls(attr, op, tuple(items))
        if not _CONSTRAINT_VALUE.fullmatch(rest):
            raise SpecError(path, f"bad value {show(rest)} in constraint")
        return cls(attr, op, rest)


def _check_attr(attr: str, path: str) -> None:
    if attr in ("node.name", "node.id"):
        return
    if attr.startswith("label."):
        _label_key(attr[len("label.") :], path)
        return
    raise SpecError(path, f"unknown attribute {show(attr)} (use node.name, node.id or label.<key>)")


def _label_key(key: str, path: str) -> str:
    problem = key_problem(key)
    if problem == "prefix":
        prefix = key.rpartition("/")[0]
        raise SpecError(path, f"bad label key prefix {show(prefix)} (must be a DNS subdomain)")
    if problem is not None:
        raise SpecError(
            path,
            f"bad label key {show(key)} (1-63 characters of A-Z, a-z, 0-9, "
            "'-', '_', '.', starting and ending alphanumeric)",
        )
    return key


def _labels(value: object, path: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, raw in _mapping(value, path).items():
        sub = join(path, str(key))
        _label_key(_str(key, sub), sub)
        text = _scalar_str(raw, sub)
        if not valid_value(text):
            raise SpecError(
                sub,
                f"bad label value {show(text)} (at most 63 characters of A-Z, a-z, "
                "0-9, '-', '_', '.', starting and ending alphanumeric)",
            )
        out[key] = text
    return dict(sorted(out.items()))


def _env(value: object, path: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, raw in _mapping(value, path).items():
        sub = join(path, str(key))
        if not isinstance(key, str) or not _ENV_KEY.fullmatch(key):
            raise SpecError(
                sub, "bad variable name (use letters, digits and '_', not starting with a digit)"
            )
        out[key] = _scalar_str(raw, sub)
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class Health:
    """One check (``http`` path, ``tcp`` or ``exec``) and how often to run it."""

    kind: str
    port: str | None = None
    path: str | None = None
    command: tuple[str, ...] = ()
    interval: float = 10.0
    timeout: float = 2.0
    retries: int = 3
    start_period: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.kind == "http":
            out["http"] = self.path
            out["port"] = self.port
        elif self.kind == "tcp":
            out["tcp"] = self.port
        else:
            out["exec"] = list(self.command)
        out.update(
            interval=self.interval,
            timeout=self.timeout,
            retries=self.retries,
            start_period=self.start_period,
        )
        return out

    @classmethod
    def from_dict(cls, data: object, path: str, ports: tuple[Port, ...]) -> Health:
        data = _mapping(data, path)
        _known(
            data,
            path,
            ("http", "tcp", "exec", "port", "interval", "timeout", "retries", "start_period"),
        )
        kinds = [k for k in ("http", "tcp", "exec") if k in data]
        if len(kinds) != 1:
            raise SpecError(
                path, f"needs exactly one of http, tcp or exec, got {', '.join(kinds) or 'none'}"
            )
        kind = kinds[0]
        names = [p.name for p in ports]
        port = path_ = None
        command: tuple[str, ...] = ()
        if kind == "http":
            path_ = _str(data["http"], join(path, "http"))
            if not path_.startswith("/"):
                raise SpecError(
                    join(path, "http"), f"must be a path starting with '/', got {show(path_)}"
                )
            port = _port_ref(data.get("port"), join(path, "port"), names)
        elif kind == "tcp":
            if "port" in data:
                raise SpecError(join(path, "port"), "give the port as the value of tcp")
            port = _port_ref(data["tcp"], join(path, "tcp"), names)
        else:
            if "port" in data:
                raise SpecError(join(path, "port"), "exec checks take no port")
            command = _argv(data["exec"], join(path, "exec"))
            if not command:
                raise SpecError(join(path, "exec"), "must not be empty")
        interval = parse_duration(
            data.get("interval", 10.0), join(path, "interval"), low=0.1, high=3600.0
        )
        timeout = parse_duration(
            data.get("timeout", min(2.0, interval)), join(path, "timeout"), low=0.01, high=600.0
        )
        if timeout > interval:
            raise SpecError(
                join(path, "timeout"), f"must not exceed interval ({interval:g}s), got {timeout:g}s"
            )
        return cls(
            kind=kind,
            port=port,
            path=path_,
            command=command,
            interval=interval,
            timeout=timeout,
            retries=_int(data.get("retries", 3), join(path, "retries"), 1, 100),
            start_period=parse_duration(
                data.get("start_period", 0.0), join(path, "start_period"), high=3600.0
            ),
        )


def _port_ref(value: object, path: str, names: list[str]) -> str:
    if value is None:
        if not names:
            raise SpecError(path, "the service declares no ports to check")
        return names[0]
    name = _str(value, path)
    if name not in names:
        raise SpecError(path, f"no port named {show(name)} (ports: {', '.join(names) or 'none'})")
    return name


@dataclass(frozen=True)
class Update:
    """How a spec change rolls out: batch size, pause, health gate, rollback."""

    parallelism: int = 1
    delay: float = 0.0
    health_gated: bool = True
    rollback: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "parallelism": self.parallelism,
            "delay": self.delay,
            "health_gated": self.health_gated,
            "rollback": self.rollback,
        }

    @classmethod
    def from_dict(cls, data: object, path: str) -> Update:
        data = _mapping(data, path)
        _known(data, path, ("parallelism", "delay", "health_gated", "rollback"))
        return cls(
            parallelism=_int(
                data.get("parallelism", 1), join(path, "parallelism"), 1, MAX_REPLICAS
            ),
            delay=parse_duration(data.get("delay", 0.0), join(path, "delay"), high=3600.0),
            health_gated=_bool(data.get("health_gated", True), join(path, "health_gated")),
            rollback=_bool(data.get("rollback", True), join(path, "rollback")),
        )


@dataclass(frozen=True)
class Balance:
    """How the mesh proxies spread a service's traffic over its replicas.

    ``hash_on`` matters for ``hash`` only: ``client`` (the client address),
    ``header:<name>`` or ``cookie:<name>`` (affinity by a session value).
    """

    policy: str = "round_robin"
    hash_on: str = "client"

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "hash_on": self.hash_on}

    @classmethod
    def from_dict(cls, data: object, path: str) -> Balance:
        if isinstance(data, str):
            data = {"policy": data}
        data = _mapping(data, path)
        _known(data, path, ("policy", "hash_on"))
        policy = _choice(data.get("policy", "round_robin"), join(path, "policy"), BALANCE_POLICIES)
        hash_on = _str(data.get("hash_on", "client"), join(path, "hash_on"))
        kind, _, name = hash_on.partition(":")
        if hash_on != "client" and (
            kind not in ("header", "cookie") or not _HEADER_NAME.fullmatch(name)
        ):
            raise SpecError(
                join(path, "hash_on"),
                f"must be client, header:<name> or cookie:<name>, got {show(hash_on)}",
            )
        if hash_on != "client" and policy != "hash":
            raise SpecError(join(path, "hash_on"), "only the hash policy takes hash_on")
        return cls(policy=policy, hash_on=hash_on)


# -- the spec -------------------------------------------------------------------

FIELDS = (
    "v",
    "name",
    "image",
    "command",
    "args",
    "env",
    "replicas",
    "ports",
    "resources",
    "constraints",
    "spread",
    "restart",
    "health",
    "update",
    "kind",
    "parallelism",
    "completions",
    "labels",
    "balance",
)


@dataclass(frozen=True)
class ServiceSpec:
    """A service (or job) as the cluster stores it.

    ``image`` selects the docker driver and ``command`` the process driver;
    exactly one is set. ``warnings`` carries what a compose import dropped and
    is not part of the stored form.
    """

    name: str
    image: str | None = None
    command: tuple[str, ...] | None = None
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    replicas: int = 1
    ports: tuple[Port, ...] = ()
    resources: Resources = Resources()
    constraints: tuple[Constraint, ...] = ()
    spread: str = "node"
    restart: str = "always"
    health: Health | None = None
    update: Update = Update()
    kind: str = "service"
    parallelism: int = 1
    completions: int = 1
    labels: dict[str, str] = field(default_factory=dict)
    balance: Balance = Balance()
    warnings: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @property
    def driver(self) -> str:
        return "docker" if self.image is not None else "process"

    def port(self, name: str) -> Port | None:
        return next((p for p in self.ports if p.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        """The canonical stored form: explicit, base units, versioned."""
        return {
            "v": VERSION,
            "name": self.name,
            "image": self.image,
            "command": None if self.command is None else list(self.command),
            "args": list(self.args),
            "env": dict(self.env),
            "replicas": self.replicas,
            "ports": [p.to_dict() for p in self.ports],
            "resources": self.resources.to_dict(),
            "constraints": [str(c) for c in self.constraints],
            "spread": self.spread,
            "restart": self.restart,
            "health": None if self.health is None else self.health.to_dict(),
            "update": self.update.to_dict(),
            "kind": self.kind,
            "parallelism": self.parallelism,
            "completions": self.completions,
            "labels": dict(self.labels),
            "balance": self.balance.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: object, path: str = "") -> ServiceSpec:
        """Validate a native spec; the first problem raises ``SpecError`` naming its field."""
        data = _mapping(data, path)
        _known(data, path, FIELDS)
        at = lambda key: join(path, key)  # noqa: E731
        if "v" in data and data["v"] != VERSION:
            raise SpecError(
                at("v"), f"unsupported spec version {show(data['v'])} (this is {VERSION})"
            )
        if "name" not in data:
            raise SpecError(at("name"), "is required")
        name = _str(data["name"], at("name"))
        if not _DNS_LABEL.fullmatch(name):
            raise SpecError(
                at("name"),
                "must be 1-63 characters of a-z, 0-9 and '-', "
                f"starting and ending with a letter or digit, got {show(name)}",
            )

        image = data.get("image")
        command = data.get("command")
        if (image is None) == (command is None):
            raise SpecError(
                at("image") if image is None else path or "image",
                "give exactly one of image (docker) or command (process)",
            )
        if image is not None:
            image = _str(image, at("image"))
            if any(c.isspace() for c in image):
                raise SpecError(at("image"), f"must not contain spaces, got {show(image)}")
        else:
            command = _argv(command, at("command"))
            if not command:
                raise SpecError(at("command"), "must not be empty")

        kind = _choice(data.get("kind", "service"), at("kind"), KINDS)
        if kind == "service":
            for key in ("parallelism", "completions"):
                if data.get(key) not in (None, 1):
                    raise SpecError(
                        at(key), "only jobs take parallelism and completions (set kind: job)"
                    )
        parallelism = _int(data.get("parallelism", 1), at("parallelism"), 1, MAX_REPLICAS)
        completions = _int(data.get("completions", 1), at("completions"), 1, 1_000_000)

        ports = tuple(
            Port.from_dict(p, join(at("ports"), i))
            for i, p in enumerate(_list(data.get("ports", []), at("ports")))
        )
        seen_names: set[str] = set()
        seen_service: set[int] = set()
        for i, port in enumerate(ports):
            if port.name in seen_names:
                raise SpecError(
                    join(join(at("ports"), i), "name"), f"duplicate port name {port.name!r}"
                )
            seen_names.add(port.name)
            if port.service_port is not None:
                if port.service_port in seen_service:
                    raise SpecError(
                        join(join(at("ports"), i), "service_port"),
                        f"duplicate service_port {port.service_port}",
                    )
                seen_service.add(port.service_port)

        spread = _str(data.get("spread", "node"), at("spread"))
        if spread != "node":
            if not spread.startswith("label."):
                raise SpecError(
                    at("spread"), f"must be 'node' or 'label.<key>', got {show(spread)}"
                )
            _label_key(spread[len("label.") :], at("spread"))

        health = data.get("health")
        return cls(
            name=name,
            image=image,
            command=command,
            args=_argv(data.get("args", []), at("args")),
            env=_env(data.get("env", {}), at("env")),
            replicas=_int(data.get("replicas", 1), at("replicas"), 0, MAX_REPLICAS),
            ports=ports,
            resources=Resources.from_dict(data.get("resources", {}), at("resources")),
            constraints=tuple(
                Constraint.parse(c, join(at("constraints"), i))
                for i, c in enumerate(_list(data.get("constraints", []), at("constraints")))
            ),
            spread=spread,
            restart=_choice(
                data.get("restart", "always" if kind == "service" else "on-failure"),
                at("restart"),
                RESTARTS,
            ),
            health=None if health is None else Health.from_dict(health, at("health"), ports),
            update=Update.from_dict(data.get("update", {}), at("update")),
            kind=kind,
            parallelism=parallelism,
            completions=completions,
            labels=_labels(data.get("labels", {}), at("labels")),
            balance=Balance.from_dict(data.get("balance", {}), at("balance")),
        )
