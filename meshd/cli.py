"""The `meshd` command.

For now the agent forms the gossip cluster (membership and failure
detection) and logs membership changes; the API, discovery and workloads
build on it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from gossip import PROFILES, Gossip, Keyring
from gossip.agent_cli import join_with_backoff
from gossip.driver import BindError, parse_addr

from . import __version__

DEFAULT_PORT = 7946
log = logging.getLogger("meshd")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"meshd: error: {message}\n")
        sys.exit(2)


def default_data_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/meshd")
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local/share")) / "meshd"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="meshd", description="meshd: a container orchestrator with no manager nodes")
    p.add_argument("--version", action="version", version=f"meshd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    a = sub.add_parser("agent", help="run the agent on this host")
    a.add_argument("--node", default=socket.gethostname(), help="node name (default: hostname)")
    a.add_argument(
        "--bind",
        default=f"127.0.0.1:{DEFAULT_PORT}",
        metavar="ADDR[:PORT]",
        help="gossip address, UDP and TCP (default: loopback)",
    )
    a.add_argument("--advertise", metavar="ADDR[:PORT]", help="address peers use to reach us")
    a.add_argument("--join", action="append", default=[], metavar="ADDR[:PORT]")
    a.add_argument("--cluster", default="meshd", help="cluster name")
    a.add_argument("--data-dir", type=Path, default=None, help="state directory")
    a.add_argument(
        "--key-file",
        type=Path,
        default=None,
        help="cluster key (default: DATA_DIR/cluster.key, made on first start)",
    )
    a.add_argument("--profile", choices=sorted(PROFILES), default="lan")
    a.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub.add_parser("keygen", help="print a new cluster key")
    return p


def _with_port(value: str) -> tuple[str, int]:
    """ADDR or ADDR:PORT (IPv6 as [ADDR]:PORT or bare); the gossip port by default."""
    if value.startswith("["):
        text = value if "]:" in value else f"{value}:{DEFAULT_PORT}"
    elif value.count(":") > 1:
        text = f"[{value}]:{DEFAULT_PORT}"
    elif ":" in value:
        text = value
    else:
        text = f"{value}:{DEFAULT_PORT}"
    return parse_addr(text, allow_zero_port=True)


def load_or_make_key(path: Path) -> Keyring:
    if path.exists():
        return Keyring([Keyring.decode_key(path.read_text())])
    key = Keyring.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(Keyring.encode_key(key) + "\n")
    log.info("made a new cluster key in %s: copy it to the other hosts", path)
    return Keyring([key])


async def run_agent(args: argparse.Namespace) -> int:
    bind = _with_port(args.bind)
    advertise = _with_port(args.advertise) if args.advertise else None
    peers = [_with_port(j) for j in args.join]
    data_dir = args.data_dir or default_data_dir()
    keyring = load_or_make_key(args.key_file or data_dir / "cluster.key")
    config = PROFILES[args.profile](cluster_name=args.cluster)
    g = Gossip(config, name=args.node, bind=bind, advertise=advertise, keyring=keyring)
    await g.start()
    log.info(
        "meshd %s: node %s on %s:%d, cluster %r, key %s",
        __version__,
        args.node,
        *(g.bound or ("?", 0)),
        args.cluster,
        Keyring.fingerprint(keyring.primary),
    )
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def on_signal() -> None:
        if stopping.is_set():
            os._exit(1)  # a second signal: leave at once
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)

    async def report() -> None:
        async for ev in g.events():
            m = ev.member
            log.info("member %s %s (%s:%d)", m.name, ev.kind.value, m.addr[0], m.addr[1])

    reporter = asyncio.create_task(report())
    joiner = asyncio.create_task(join_with_backoff(g, peers)) if peers else None
    await stopping.wait()
    log.info("leaving the cluster")
    if joiner is not None:
        joiner.cancel()
    await g.leave(timeout=config.leave_propagate_time * 2)
    await g.stop()
    await reporter
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "keygen":
        print(Keyring.encode_key(Keyring.generate()))
        return 0
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        import uvloop

        return uvloop.run(run_agent(args))
    except (BindError, OSError, ValueError) as exc:
        sys.stderr.write(f"meshd: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130
