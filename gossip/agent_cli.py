"""`python -m gossip`: a standalone gossip agent.

It exists to run the library as a process of its own: for benchmarks against
HashiCorp Serf and for poking at a cluster by hand. Output is one JSON object
per line on stdout, so a harness can timestamp membership changes without
parsing logs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TextIO

from .config import PROFILES, Config
from .crypto import Keyring
from .driver import Gossip, format_addr, parse_addr
from .events import MemberEvent
from .members import Addr
from .wire import MAX_NAME, META_MAX

PROG = "gossip"
JOIN_BACKOFF_FIRST = 0.5
JOIN_BACKOFF_MAX = 10.0
EXIT_USAGE = 2
EXIT_FAILURE = 1

log = logging.getLogger("gossip.agent")


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is a single line: scripts read stderr too."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{PROG}: error: {message}\n")
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Run one gossip cluster member.")
    p.add_argument("--name", required=True, help="unique member name")
    p.add_argument("--bind", required=True, metavar="HOST:PORT", help="UDP+TCP address")
    p.add_argument("--advertise", metavar="HOST:PORT", help="address announced to peers")
    p.add_argument(
        "--join", action="append", default=[], metavar="HOST:PORT", help="peer (repeatable)"
    )
    p.add_argument("--cluster", default=None, help="cluster name (default: 'default')")
    keys = p.add_mutually_exclusive_group(required=True)
    keys.add_argument("--key-file", metavar="PATH", help="file holding a base64 32-byte key")
    keys.add_argument("--key", metavar="BASE64", help="base64 32-byte key")
    keys.add_argument("--plaintext", action="store_true", help="no encryption (tests only)")
    p.add_argument("--profile", choices=sorted(PROFILES), default="lan")
    p.add_argument("--meta", default="", help="member metadata (UTF-8 text)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="warning")
    return p


@dataclass(slots=True)
class AgentOptions:
    name: str
    bind: Addr
    advertise: Addr | None
    join: list[Addr | str]
    config: Config
    keyring: Keyring | None
    meta: bytes
    log_level: str


def parse_options(argv: Sequence[str] | None = None) -> AgentOptions:
    """Parse and validate everything up front, so a bad flag never surfaces
    later as a traceback from inside the event loop."""
    p = build_parser()
    a = p.parse_args(argv)
    if not a.name or len(a.name.encode()) > MAX_NAME:
        p.error(f"--name must be 1..{MAX_NAME} bytes")
    try:
        bind = parse_addr(a.bind, allow_zero_port=True)
    except ValueError as exc:
        p.error(f"--bind: {exc}")
    advertise: Addr | None = None
    if a.advertise:
        try:
            advertise = parse_addr(a.advertise)
        except ValueError as exc:
            p.error(f"--advertise: {exc}")
    join: list[Addr | str] = []
    for j in a.join:
        try:
            join.append(parse_addr(j))
        except ValueError as exc:
            p.error(f"--join: {exc}")
    meta = a.meta.encode()
    if len(meta) > META_MAX:
        p.error(f"--meta is {len(meta)} bytes; the limit is {META_MAX}")
    keyring: Keyring | None = None
    if a.key_file is not None:
        try:
            with open(a.key_file, encoding="ascii") as f:
                keyring = Keyring([Keyring.decode_key(f.read())])
        except OSError as exc:
            p.error(f"--key-file {a.key_file}: {exc.strerror or exc}")
        except (ValueError, UnicodeDecodeError) as exc:
            p.error(f"--key-file {a.key_file}: {exc}")
    elif a.key is not None:
        try:
            keyring = Keyring([Keyring.decode_key(a.key)])
        except ValueError as exc:
            p.error(f"--key: {exc}")
    overrides: dict[str, Any] = {"allow_plaintext": bool(a.plaintext)}
    if a.cluster is not None:
        if not a.cluster:
            p.error("--cluster must not be empty")
        overrides["cluster_name"] = a.cluster
    config = PROFILES[a.profile](**overrides)
    return AgentOptions(a.name, bind, advertise, join, config, keyring, meta, a.log_level)


class Output:
    """JSON lines on stdout, flushed at once so a reader sees each event when
    it happens. A closed pipe silences output instead of killing the agent."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._broken = False

    def write(self, obj: dict[str, Any]) -> None:
        if self._broken:
            return
        try:
            self._stream.write(json.dumps(obj, separators=(",", ":")) + "\n")
            self._stream.flush()
        except (BrokenPipeError, ValueError):
            self._broken = True

    def event(self, ev: MemberEvent) -> None:
        m = ev.member
        self.write(
            {
                "t": time.time(),
                "event": ev.kind.value,
                "member": m.name,
                "addr": format_addr(m.addr),
                "incarnation": m.incarnation,
            }
        )

    def status(self, g: Gossip) -> None:
        self.write(
            {
                "t": time.time(),
                "stats": g.stats,
                "members": {m.name: m.state.label for m in g.members()},
            }
        )


async def join_with_backoff(g: Gossip, peers: Sequence[Addr | str]) -> int:
    """Retry until one peer answers: agents of a benchmark start in any order."""
    delay = JOIN_BACKOFF_FIRST
    while True:
        n = await g.join(peers)
        if n > 0:
            log.info("joined through %d of %d peers", n, len(peers))
            return n
        log.warning("join failed; retrying in %.1fs", delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, JOIN_BACKOFF_MAX)


async def run(opts: AgentOptions, out: Output) -> int:
    g = Gossip(
        opts.config,
        name=opts.name,
        bind=opts.bind,
        advertise=opts.advertise,
        meta=opts.meta,
        keyring=opts.keyring,
    )
    try:
        await g.start()
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return EXIT_FAILURE

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def on_stop_signal() -> None:
        if stopping.is_set():
            os._exit(EXIT_FAILURE)  # second signal: the operator wants out now
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop_signal)
    loop.add_signal_handler(signal.SIGUSR1, out.status, g)

    async def pump() -> None:
        async for ev in g.events():
            out.event(ev)

    pump_task = asyncio.create_task(pump())
    join_task = asyncio.create_task(join_with_backoff(g, opts.join)) if opts.join else None
    try:
        await stopping.wait()
    finally:
        if join_task is not None:
            join_task.cancel()
        if not await g.leave(timeout=max(2.0, 2 * opts.config.leave_propagate_time)):
            log.warning("leave not confirmed before timeout")
        await g.stop()
        await pump_task
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            loop.remove_signal_handler(sig)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_options(argv)
    logging.basicConfig(
        level=opts.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    out = Output(sys.stdout)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(run(opts, out))
    return uvloop.run(run(opts, out))
