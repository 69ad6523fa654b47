"""The service commands of the `meshd` CLI: deploy, run, services, ps, scale, rm, logs.

Specs are checked here, with the same parser the agent uses, before anything
is sent: a typo is reported with its field (and, for ``run``, the flag that
set it) without a round trip, and ``deploy`` knows whether a file holds one
service (PUT) or several (POST).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .cli import EXIT_USAGE, format_table
from .client import Client
from .spec import ServiceSpec, SpecError, parse_spec

__all__ = ["COMMANDS", "member_remove", "parse_port"]

Command = Callable[[Client, argparse.Namespace], int]

_PORT_FORM = "NAME:TARGET[:SERVICE_PORT][/http], like web:8080:80/http"


def _error(message: str, status: int = 1) -> int:
    sys.stderr.write(f"meshd: error: {message}\n")
    return status


def _dump(data: Any) -> None:
    print(json.dumps(data, indent=2))


# ----- deploy and run ------------------------------------------------------------


def deploy(client: Client, args: argparse.Namespace) -> int:
    path: str = args.file
    where = "<stdin>" if path == "-" else path
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        return _error(f"cannot read {where}: {(exc.strerror or str(exc)).lower()}")
    try:
        specs = parse_spec(data, filename=None if path == "-" else path)
    except SpecError as exc:
        text = str(exc)
        return _error(text if text.startswith(where) else f"{where}: {text}")
    # One service goes to its own URL, several in one request that checks them all first.
    one = len(specs) == 1
    records = [client.service_put(specs[0].name, data)] if one else client.deploy(data)
    _warn(records)
    _print_services(records, args.json)
    return 0


def _warn(records: list[dict[str, Any]]) -> None:
    for record in records:
        for warning in record.get("warnings") or []:
            sys.stderr.write(f"meshd: warning: {record.get('name')}: {warning}\n")


def parse_port(text: str) -> dict[str, Any]:
    """``web:8080:80/http`` as a spec port; ValueError when it is not of that form."""
    spec, slash, protocol = text.partition("/")
    if slash and protocol not in ("http", "tcp"):
        raise ValueError(f"--port {text!r}: the protocol must be http or tcp, in {_PORT_FORM}")
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not all(p.isdigit() for p in parts[1:]):
        raise ValueError(f"--port {text!r}: expected {_PORT_FORM}")
    port: dict[str, Any] = {"name": parts[0], "target": int(parts[1])}
    if protocol:
        port["protocol"] = protocol
    if len(parts) == 3:
        port["service_port"] = int(parts[2])
    return port


def _run_document(args: argparse.Namespace) -> dict[str, Any]:
    doc: dict[str, Any] = {"name": args.name, "replicas": args.replicas}
    if args.image is not None:
        doc["image"] = args.image
    else:
        doc["command"] = args.process_command
    if args.args:
        doc["args"] = list(args.args)
    if args.port:
        doc["ports"] = [parse_port(text) for text in args.port]
    env: dict[str, str] = {}
    for text in args.env:
        key, eq, value = text.partition("=")
        if not eq or not key:
            raise ValueError(f"--env {text!r}: expected K=V")
        env[key] = value
    if env:
        doc["env"] = env
    resources = {k: v for k, v in (("cpu", args.cpu), ("memory", args.memory)) if v is not None}
    if resources:
        doc["resources"] = resources
    if args.balance is not None:
        doc["balance"] = args.balance
    return doc


def _flag(path: str, args: argparse.Namespace) -> str:
    """The command-line argument that set the spec field at path."""
    top = re.split(r"[.\[]", path, maxsplit=1)[0]
    index = re.match(r"ports\[(\d+)\]", path)
    if index is not None and int(index.group(1)) < len(args.port):
        return f"--port {args.port[int(index.group(1))]}"
    if path.startswith("env."):
        return f"--env {path[4:]}"
    named = {
        "name": "NAME",
        "image": "--image",
        "command": "--command",
        "args": "ARGS",
        "replicas": "--replicas",
        "resources.cpu": "--cpu",
        "resources.memory": "--memory",
        "balance": "--balance",
    }
    return named.get(path) or named.get(top) or path


def run(client: Client, args: argparse.Namespace) -> int:
    try:
        spec = ServiceSpec.from_dict(_run_document(args))
    except SpecError as exc:
        return _error(f"{_flag(exc.path, args)}: {exc.message}", EXIT_USAGE)
    except ValueError as exc:
        return _error(str(exc), EXIT_USAGE)
    record = client.service_put(spec.name, spec.to_dict())
    _print_services([record], args.json)
    return 0


# ----- looking at services ---------------------------------------------------------


def services(client: Client, args: argparse.Namespace) -> int:
    _print_services(client.services(), args.json)
    return 0


def _replica_count(record: dict[str, Any]) -> str:
    counts = record.get("replicas") or {}
    if record.get("kind") == "job":
        completions = (record.get("spec") or {}).get("completions", "?")
        return f"{record.get('completed', 0)}/{completions} done"
    return f"{counts.get('ready', 0)}/{counts.get('desired', 0)}"


def _leader(record: dict[str, Any]) -> str:
    leader = record.get("leader")
    if not leader or leader.get("node") is None:
        return "none"
    return f"{leader['node']} (term {leader.get('term', '?')})"


def _print_services(records: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        _dump(records)
        return
    rows = [
        [
            str(r.get("name", "")),
            str(r.get("kind", "")),
            _replica_count(r),
            str(r.get("version", "")),
            _leader(r),
            str(len(r.get("pending") or [])),
            str((r.get("update") or {}).get("state", "")),
        ]
        for r in records
    ]
    print(format_table(rows, ["name", "kind", "ready", "version", "leader", "pending", "update"]))


def _ports(replica: dict[str, Any]) -> str:
    address = replica.get("address") or ""
    where = f"{address}:" if address else ""
    return ",".join(f"{n}={where}{p}" for n, p in sorted((replica.get("ports") or {}).items()))


def ps(client: Client, args: argparse.Namespace) -> int:
    if args.name:
        replicas = client.service_replicas(args.name)
        if replicas is None:
            return _error(f"no service {args.name!r}")
    else:
        replicas = []
        for record in client.services():
            # A service removed since the listing has no replicas to show.
            replicas += client.service_replicas(record["name"]) or []
    if args.json:
        _dump(replicas)
        return 0
    rows = [
        [
            str(r.get("service", "")),
            str(r.get("id", "")),
            str(r.get("slot", "")),
            str(r.get("node", "")),
            str(r.get("state", "")),
            str(r.get("health", "")),
            str(r.get("version", "")),
            _ports(r),
            str(r.get("restarts", 0)),
            str(r.get("reason") or ""),
        ]
        for r in replicas
    ]
    header = ["service", "id", "slot", "node", "state", "health", "version", "ports", "restarts"]
    print(format_table(rows, [*header, "reason"]))
    return 0


# ----- changing services ---------------------------------------------------------------


def scale(client: Client, args: argparse.Namespace) -> int:
    record = client.service_scale(args.name, args.replicas)
    if record is None:
        return _error(f"no service {args.name!r}")
    if args.json:
        _dump(record)
    else:
        plural = "" if args.replicas == 1 else "s"
        print(f"{args.name} scaled to {args.replicas} replica{plural}")
    return 0


def remove(client: Client, args: argparse.Namespace) -> int:
    if not client.service_delete(args.name):
        return _error(f"no service {args.name!r}")
    if args.json:
        _dump({"name": args.name, "deleted": True})
    else:
        print(f"{args.name} removed")
    return 0


def logs(client: Client, args: argparse.Namespace) -> int:
    lines = client.service_logs(args.name, tail=args.tail, follow=args.follow)
    try:
        for line in lines:
            if args.json:
                print(json.dumps(line), flush=True)
            else:
                who = f"{line.get('replica', '?')}@{line.get('node', '?')}"
                print(f"{who} | {line.get('text', '')}", flush=True)
    finally:
        lines.close()  # type: ignore[attr-defined]
    return 0


def member_remove(client: Client, args: argparse.Namespace) -> int:
    if not client.member_remove(args.node):
        return _error(f"no member {args.node!r}")
    if args.json:
        _dump({"node": args.node, "removed": True})
    else:
        print(f"{args.node} removed from the voter set")
    return 0


COMMANDS: dict[str, Command] = {
    "deploy": deploy,
    "run": run,
    "services": services,
    "ps": ps,
    "scale": scale,
    "rm": remove,
    "logs": logs,
}
