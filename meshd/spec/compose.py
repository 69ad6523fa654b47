"""A docker-compose subset, converted to native specs.

Only what maps cleanly is taken (image, command, environment, ports,
deploy.replicas, deploy.resources, healthcheck, restart); everything else is
reported back as a warning instead of being silently half-honoured.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .errors import SpecError, join, show
from .units import parse_cpu, parse_duration, parse_size

_TOP_KNOWN = ("services", "version", "name")
_SERVICE_KEYS = ("image", "command", "environment", "ports", "deploy", "healthcheck", "restart")
_PORT = re.compile(
    r"(?:(?P<ip>\[[0-9a-fA-F:.]+\]|\d+(?:\.\d+){3}):)?(?:(?P<published>\d+):)?(?P<target>\d+)"
    r"(?:/(?P<proto>[a-z]+))?"
)
_RESTART = {
    "no": "never",
    "always": "always",
    "unless-stopped": "always",
    "on-failure": "on-failure",
}
_CONDITION = {"none": "never", "on-failure": "on-failure", "any": "always"}


_NATIVE_TO_COMPOSE = {
    "env": "environment",
    "args": "command",
    "replicas": "deploy.replicas",
    "health": "healthcheck",
    "resources": "deploy.resources",
}


def compose_path(native: str) -> str:
    """Blame the compose key a user wrote for an error found in the converted spec."""
    head, dot, rest = native.partition(".")
    bracket = head.find("[")
    key = head if bracket < 0 else head[:bracket]
    if key not in _NATIVE_TO_COMPOSE:
        return native
    return _NATIVE_TO_COMPOSE[key] + head[len(key) :] + dot + rest


def is_compose(data: object) -> bool:
    """Compose files have a top-level ``services`` mapping; native specs never do."""
    return isinstance(data, Mapping) and isinstance(data.get("services"), Mapping)


def from_compose(data: Mapping[str, Any]) -> list[tuple[str, dict[str, Any], list[str]]]:
    """Native dicts (with the compose path to blame, and warnings) per compose service."""
    top_warnings = [f"{key}: ignored (not supported)" for key in data if key not in _TOP_KNOWN]
    out = []
    for name, service in data["services"].items():
        path = join("services", str(name))
        warnings = list(top_warnings)
        top_warnings = []
        out.append((path, _service(str(name), service, path, warnings), warnings))
    if not out:
        raise SpecError("services", "no services defined")
    return out


def _service(name: str, service: object, path: str, warnings: list[str]) -> dict[str, Any]:
    if service is None:
        service = {}
    if not isinstance(service, Mapping):
        raise SpecError(path, f"must be a mapping, got {type(service).__name__}")
    for key in service:
        if key not in _SERVICE_KEYS:
            warnings.append(f"{join(path, str(key))}: ignored (not supported)")
    if "image" not in service:
        raise SpecError(join(path, "image"), "is required (build is not supported)")
    spec: dict[str, Any] = {"name": name, "image": service["image"]}
    if service.get("command") is not None:
        spec["args"] = service["command"]
    if service.get("environment") is not None:
        spec["env"] = _environment(service["environment"], join(path, "environment"), warnings)
    if service.get("ports") is not None:
        spec["ports"] = _ports(service["ports"], join(path, "ports"), warnings)
    if service.get("restart") is not None:
        spec["restart"] = _restart(service["restart"], join(path, "restart"))
    if service.get("deploy") is not None:
        _deploy(service["deploy"], join(path, "deploy"), spec, warnings)
    if service.get("healthcheck") is not None:
        health = _healthcheck(service["healthcheck"], join(path, "healthcheck"))
        if health is not None:
            spec["health"] = health
    return spec


def _environment(value: object, path: str, warnings: list[str]) -> dict[str, Any]:
    items: list[tuple[str, Any]]
    if isinstance(value, Mapping):
        items = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, list):
        items = []
        for i, entry in enumerate(value):
            if not isinstance(entry, str):
                raise SpecError(join(path, i), f"must be NAME=value, got {type(entry).__name__}")
            key, eq, val = entry.partition("=")
            items.append((key, val if eq else None))
    else:
        raise SpecError(path, f"must be a list or a mapping, got {type(value).__name__}")
    env: dict[str, Any] = {}
    for key, val in items:
        if val is None:
            warnings.append(
                f"{join(path, key)}: ignored (taking values from the host "
                "environment is not supported)"
            )
            continue
        env[key] = val
    return env


def _ports(value: object, path: str, warnings: list[str]) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise SpecError(path, f"must be a list, got {type(value).__name__}")
    ports = []
    for i, entry in enumerate(value):
        sub = join(path, i)
        if isinstance(entry, Mapping):
            port = _long_port(entry, sub, warnings)
        elif isinstance(entry, int) and not isinstance(entry, bool):
            port = {"target": entry}
        elif isinstance(entry, str):
            port = _short_port(entry, sub, warnings)
        else:
            raise SpecError(sub, f"must be like '8080:80' or a mapping, got {type(entry).__name__}")
        port.setdefault(
            "name", f"p{port['target']}" if isinstance(port["target"], int) else f"p{i}"
        )
        ports.append(port)
    return ports


def _short_port(text: str, path: str, warnings: list[str]) -> dict[str, Any]:
    match = _PORT.fullmatch(text.strip())
    if match is None:
        raise SpecError(
            path,
            f"cannot parse port {show(text)} (use e.g. '80', '8080:80' or "
            "'127.0.0.1:8080:80/tcp'; ranges are not supported)",
        )
    if match["ip"]:
        warnings.append(f"{path}: host address {match['ip']} ignored")
    _protocol(match["proto"] or "tcp", join(path, "protocol"))
    port: dict[str, Any] = {"target": int(match["target"])}
    if match["published"]:
        port["service_port"] = int(match["published"])
    return port


def _long_port(entry: Mapping[Any, Any], path: str, warnings: list[str]) -> dict[str, Any]:
    for key in entry:
        if key not in ("target", "published", "protocol", "name", "mode", "host_ip"):
            warnings.append(f"{join(path, str(key))}: ignored (not supported)")
    if "target" not in entry:
        raise SpecError(join(path, "target"), "is required")
    target = entry["target"]
    if isinstance(target, str) and target.isdigit():
        target = int(target)
    port: dict[str, Any] = {"target": target}
    published = entry.get("published")
    if isinstance(published, str) and published.isdigit():
        published = int(published)
    if published is not None:
        port["service_port"] = published
    if entry.get("name") is not None:
        port["name"] = entry["name"]
    _protocol(entry.get("protocol", "tcp"), join(path, "protocol"))
    return port


def _protocol(value: object, path: str) -> None:
    if value != "tcp":
        raise SpecError(path, f"only tcp is supported, got {show(value)}")


def _restart(value: object, path: str) -> str:
    text = value.split(":", 1)[0] if isinstance(value, str) else None
    if text not in _RESTART:
        raise SpecError(path, f"must be one of {', '.join(_RESTART)}, got {show(value)}")
    return _RESTART[text]


def _deploy(value: object, path: str, spec: dict[str, Any], warnings: list[str]) -> None:
    if not isinstance(value, Mapping):
        raise SpecError(path, f"must be a mapping, got {type(value).__name__}")
    for key in value:
        if key not in ("replicas", "resources", "restart_policy"):
            warnings.append(f"{join(path, str(key))}: ignored (not supported)")
    if value.get("replicas") is not None:
        spec["replicas"] = value["replicas"]
    policy = value.get("restart_policy")
    if isinstance(policy, Mapping) and policy.get("condition") is not None:
        condition = policy["condition"]
        if not isinstance(condition, str) or condition not in _CONDITION:
            raise SpecError(
                join(join(path, "restart_policy"), "condition"),
                f"must be one of {', '.join(_CONDITION)}, got {show(condition)}",
            )
        spec["restart"] = _CONDITION[condition]
    if value.get("resources") is not None:
        spec["resources"] = _resources(value["resources"], join(path, "resources"), warnings)


def _resources(value: object, path: str, warnings: list[str]) -> dict[str, Any]:
    """Reservations are what placement needs; limits stand in when none are given."""
    if not isinstance(value, Mapping):
        raise SpecError(path, f"must be a mapping, got {type(value).__name__}")
    out: dict[str, Any] = {}
    for section in ("limits", "reservations"):
        part = value.get(section)
        if part is None:
            continue
        sub = join(path, section)
        if not isinstance(part, Mapping):
            raise SpecError(sub, f"must be a mapping, got {type(part).__name__}")
        for key in part:
            if key not in ("cpus", "memory", "devices"):
                warnings.append(f"{join(sub, str(key))}: ignored (not supported)")
        if part.get("cpus") is not None:
            out["cpu"] = parse_cpu(part["cpus"], join(sub, "cpus"))
        if part.get("memory") is not None:
            out["memory"] = parse_size(part["memory"], join(sub, "memory"), docker=True)
        if part.get("devices") is not None:
            gpus = _gpus(part["devices"], join(sub, "devices"))
            if gpus:
                out["gpu"] = gpus
    return out


def _gpus(value: object, path: str) -> int:
    if not isinstance(value, list):
        raise SpecError(path, f"must be a list, got {type(value).__name__}")
    total = 0
    for i, dev in enumerate(value):
        caps = dev.get("capabilities") if isinstance(dev, Mapping) else None
        if not isinstance(caps, list) or "gpu" not in caps:
            continue
        count = dev.get("count", 1)
        if count == "all" or isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise SpecError(
                join(join(path, i), "count"), f"must be a number of GPUs, got {show(count)}"
            )
        total += count
    return total


def _healthcheck(value: object, path: str) -> dict[str, Any] | None:
    if not isinstance(value, Mapping):
        raise SpecError(path, f"must be a mapping, got {type(value).__name__}")
    if value.get("disable") is True:
        return None
    test = value.get("test")
    sub = join(path, "test")
    if isinstance(test, str):
        command = ["/bin/sh", "-c", test]
    elif isinstance(test, list) and test and all(isinstance(t, str) for t in test):
        head, rest = test[0], test[1:]
        if head == "NONE":
            return None
        if head == "CMD":
            command = rest
        elif head == "CMD-SHELL":
            command = ["/bin/sh", "-c", " ".join(rest)]
        else:
            raise SpecError(sub, f"must start with CMD, CMD-SHELL or NONE, got {show(head)}")
        if not command:
            raise SpecError(sub, "has no command")
    else:
        raise SpecError(sub, "must be a string or a list like [CMD, curl, -f, http://localhost]")
    health: dict[str, Any] = {"exec": command}
    for key in ("interval", "timeout", "start_period"):
        if value.get(key) is not None:
            health[key] = parse_duration(value[key], join(path, key), high=86400.0)
    if value.get("retries") is not None:
        health["retries"] = value["retries"]
    return health


__all__ = ["from_compose", "is_compose"]
