"""The `meshd` command: the agent, and a client for a running agent's API."""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from gossip import Keyring

from . import __version__

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"meshd: error: {message}\n")
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="meshd", description="meshd: a container orchestrator with no manager nodes")
    p.add_argument("--version", action="version", version=f"meshd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("agent", help="run the agent on this host (meshd agent --help)", add_help=False)
    sub.add_parser("keygen", help="print a new secret cluster key")

    def client(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument("--addr", help="agent API address (default $MESHD_ADDR or 127.0.0.1:7947)")
        c.add_argument("--token", help="API token (default $MESHD_TOKEN)")
        c.add_argument("--json", action="store_true", help="JSON output for scripts")
        return c

    client("members", "list the cluster's members")
    client("info", "show this agent")
    kv = client("kv", "read and write the replicated key/value store")
    ops = kv.add_subparsers(dest="op", required=True, parser_class=_Parser)
    ops.add_parser("get").add_argument("key")
    put = ops.add_parser("put")
    put.add_argument("key")
    put.add_argument("value", nargs="?", help="the value (default: read standard input)")
    ops.add_parser("delete").add_argument("key")
    ops.add_parser("list").add_argument("prefix", nargs="?", default="")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "agent":
        return _agent(args_list[1:])
    args = build_parser().parse_args(args_list)
    if args.command == "keygen":
        print(Keyring.encode_key(Keyring.generate()))
        return 0
    return _client_command(args)


def _agent(argv: list[str]) -> int:
    from .agent import StartError, run
    from .config import ConfigError, load_config
    from .logs import setup_logging

    try:
        config = load_config(argv, os.environ)
    except ConfigError as exc:
        sys.stderr.write(f"meshd: error: {exc}\n")
        return EXIT_USAGE
    setup_logging(config.log_format, config.log_level)
    try:
        import uvloop

        return uvloop.run(run(config))
    except StartError as exc:
        sys.stderr.write(f"meshd: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        logging.shutdown()


def _client_command(args: argparse.Namespace) -> int:
    from .client import ApiError, Client, ClientError

    client = Client(args.addr, token=args.token)
    try:
        if args.command == "members":
            _print_members(client.members(), args.json)
        elif args.command == "info":
            _print_info(client.agent(), args.json)
        elif args.command == "kv":
            return _kv(client, args)
    except ApiError as exc:
        sys.stderr.write(f"meshd: error: {exc}\n")
        return 1
    except ClientError as exc:
        sys.stderr.write(f"meshd: error: {exc}\n")
        return 1
    return 0


def _kv(client: Any, args: argparse.Namespace) -> int:
    if args.op == "get":
        value = client.kv_get(args.key)
        if value is None:
            sys.stderr.write(f"meshd: error: no key {args.key!r}\n")
            return 1
        if args.json:
            print(json.dumps({"key": args.key, "value_base64": base64.b64encode(value).decode()}))
        else:
            sys.stdout.buffer.write(value)
            if sys.stdout.isatty() and not value.endswith(b"\n"):
                sys.stdout.write("\n")
        return 0
    if args.op == "put":
        data = args.value.encode() if args.value is not None else sys.stdin.buffer.read()
        client.kv_put(args.key, data)
        if args.json:
            print(json.dumps({"key": args.key, "ok": True}))
        return 0
    if args.op == "delete":
        if not client.kv_delete(args.key):
            sys.stderr.write(f"meshd: error: no key {args.key!r}\n")
            return 1
        return 0
    items = client.kv_list(args.prefix)
    if args.json:
        print(json.dumps(items))
    else:
        for item in items:
            print(item["key"])
    return 0


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _print_members(members: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(members, indent=2))
        return
    rows = []
    for m in members:
        cap = m.get("capacity") or {}
        labels = ",".join(f"{k}={v}" for k, v in sorted((m.get("labels") or {}).items()))
        rtt = m.get("rtt_ms")
        rows.append(
            [
                m["name"],
                m["address"],
                m["status"],
                str(cap.get("cpu_cores", "")),
                f"{cap['memory_mb']} MiB" if "memory_mb" in cap else "",
                str(len(cap.get("gpus") or [])),
                "" if rtt is None else f"{rtt:.2f} ms",
                labels,
            ]
        )
    print(_table(rows, ["name", "address", "status", "cpus", "memory", "gpus", "rtt", "labels"]))


def _print_info(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        text = json.dumps(value) if isinstance(value, dict | list) else str(value)
        print(f"{key + ':':<18}{text}")
