"""The `meshd` command: the agent, and a client for a running agent's API.

Client commands print tables by default and JSON with ``--json``. Errors are
one line on stderr; the exit status is 2 for bad usage and 1 for a failure.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
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
        c = sub.add_parser(name, help=help, description=help)
        _client_options(c)
        return c

    members = client("members", "list the cluster's members, or remove a dead one")
    member_ops = members.add_subparsers(dest="op", parser_class=_Parser)
    remove = member_ops.add_parser(
        "remove",
        help="remove a dead member from the lease voter set (restores quorum)",
        description="Remove a member known to be dead from the lease voter set, so the "
        "remaining members form a majority again. Refused while the member is alive.",
    )
    remove.add_argument("node")
    _client_options(remove, nested=True)
    client("info", "show this agent")
    _service_commands(client)
    kv = client("kv", "read and write the replicated key/value store")
    ops = kv.add_subparsers(dest="op", required=True, parser_class=_Parser)
    ops.add_parser("get").add_argument("key")
    put = ops.add_parser("put")
    put.add_argument("key")
    put.add_argument("value", nargs="?", help="the value (default: read standard input)")
    ops.add_parser("delete").add_argument("key")
    ops.add_parser("list").add_argument("prefix", nargs="?", default="")
    return p


def _client_options(parser: argparse.ArgumentParser, nested: bool = False) -> None:
    """The options of every client command; nested under another command they
    default to nothing, so they don't undo the same option given before the subcommand."""
    default: Any = argparse.SUPPRESS if nested else None
    parser.add_argument(
        "--addr", default=default, help="agent API address (default $MESHD_ADDR or 127.0.0.1:7947)"
    )
    parser.add_argument("--token", default=default, help="API token (default $MESHD_TOKEN)")
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if nested else False,
        help="JSON output for scripts",
    )


def _count(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def _service_commands(client: Callable[[str, str], argparse.ArgumentParser]) -> None:
    deploy = client("deploy", "create or replace the services of a spec file")
    deploy.add_argument(
        "-f",
        "--file",
        required=True,
        metavar="FILE",
        help="a spec in YAML or JSON, a list of specs, or a docker-compose file ('-': stdin)",
    )
    run = client("run", "create or replace one service from the command line")
    run.add_argument("name")
    what = run.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", help="container image to run (docker driver)")
    what.add_argument(
        "--command",
        dest="process_command",  # not "command": that is the subcommand's name
        metavar="CMD",
        help="command line to run (process driver)",
    )
    run.add_argument("--replicas", type=_count, default=1, metavar="N", help="default 1")
    run.add_argument(
        "--port",
        action="append",
        default=[],
        metavar="NAME:TARGET[:SERVICE_PORT][/http]",
        help="a named port (repeatable), e.g. web:8080:80/http",
    )
    run.add_argument(
        "--env", action="append", default=[], metavar="K=V", help="environment (repeatable)"
    )
    run.add_argument("--cpu", metavar="C", help="CPU cores per replica (0.5, 500m)")
    run.add_argument("--memory", metavar="M", help="memory per replica (512Mi, 1G)")
    run.add_argument(
        "--balance",
        metavar="POLICY",
        help="how the mesh spreads traffic: round_robin (default), least_conn, random, "
        "p2c, ewma, hash, weighted, local_first",
    )
    run.usage = (
        "meshd run NAME (--image IMG | --command CMD) [--replicas N] [--port SPEC]... "
        "[--env K=V]... [--cpu C] [--memory M] [--balance POLICY] [-- ARGS...]"
    )
    run.epilog = "ARGS after -- go to the image's entrypoint or the command."
    client("services", "list the services")
    ps = client("ps", "list the replicas of a service, or of every service")
    ps.add_argument("name", nargs="?")
    scale = client("scale", "set a service's number of replicas")
    scale.add_argument("name")
    scale.add_argument("replicas", type=_count)
    client("rm", "delete a service and stop its replicas").add_argument("name")
    logs = client("logs", "print a service's logs")
    logs.add_argument("name")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument("--tail", type=_count, metavar="N", help="only the last N lines")


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "agent":
        return _agent(args_list[1:])
    # `meshd run NAME ... -- ARGS`: what follows -- belongs to the service, options
    # and all, so it is split off before argparse sees it.
    run_args: list[str] = []
    if args_list[:1] == ["run"] and "--" in args_list:
        cut = args_list.index("--")
        args_list, run_args = args_list[:cut], args_list[cut + 1 :]
    args = build_parser().parse_args(args_list)
    if args.command == "run":
        args.args = run_args
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
    from .cli_services import COMMANDS, member_remove
    from .client import Client, ClientError

    client = Client(args.addr, token=args.token)
    try:
        if args.command == "members":
            if args.op == "remove":
                return member_remove(client, args)
            _print_members(client.members(), args.json)
        elif args.command == "info":
            _print_info(client.agent(), args.json)
        elif args.command == "kv":
            return _kv(client, args)
        elif args.command in COMMANDS:
            return COMMANDS[args.command](client, args)
    except ClientError as exc:
        sys.stderr.write(f"meshd: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (| head): say nothing, and keep Python's exit-time
        # flush from complaining about the closed pipe.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
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


def format_table(rows: list[list[str]], header: list[str]) -> str:
    """Columns padded to their widest cell, under an upper-case header."""
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
    print(
        format_table(rows, ["name", "address", "status", "cpus", "memory", "gpus", "rtt", "labels"])
    )


def _print_info(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        text = json.dumps(value) if isinstance(value, dict | list) else str(value)
        print(f"{key + ':':<18}{text}")
