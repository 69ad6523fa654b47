"""Run discovery alone and print what it finds, one JSON object per line.

    python -m meshd.discovery --node n1 --cluster prod --fingerprint 0123abcd \\
        --interface 10.77.0.1 --gossip 10.77.0.1:7946

Lines: ``{"event": "started", ...}`` once registered, ``{"event": "peer", ...}``
for each peer found (or changed), ``{"event": "gone", ...}`` when one leaves,
and ``{"event": "stats", ...}`` at exit. ``t`` is seconds since this process
began discovering and ``wall`` the clock time, so timings compare across
hosts of one machine.
Stops on SIGINT/SIGTERM, after --duration seconds, or once --exit-after
peers were seen; it says goodbye on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from .mdns import SERVICE_TYPE, MdnsDiscovery
from .txt import Peer


def _addr(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m meshd.discovery", description="Find same-cluster agents over mDNS."
    )
    p.add_argument("--node", required=True)
    p.add_argument("--cluster", required=True)
    p.add_argument("--fingerprint", required=True, help="cluster key fingerprint (not the key)")
    p.add_argument(
        "--interface",
        action="append",
        required=True,
        metavar="IP",
        help="address of an interface to use for mDNS (repeat for more)",
    )
    p.add_argument("--gossip", type=_addr, required=True, metavar="HOST:PORT")
    p.add_argument("--service-type", default=SERVICE_TYPE)
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--exit-after", type=int, default=None, metavar="N", help="stop at N peers")
    p.add_argument("--log-level", default="warning")
    return p


class _Printer:
    def __init__(self, t0: float) -> None:
        self.t0 = t0

    def __call__(self, event: str, **fields: Any) -> None:
        line = {
            "event": event,
            "t": round(time.monotonic() - self.t0, 4),
            "wall": round(time.time(), 4),
            **fields,
        }
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()


async def run(opts: argparse.Namespace) -> int:
    out = _Printer(time.monotonic())
    done = asyncio.Event()
    disc: MdnsDiscovery

    def found(peer: Peer) -> None:
        out("peer", **asdict(peer))
        if opts.exit_after is not None and len(disc.peers()) >= opts.exit_after:
            done.set()

    try:
        disc = MdnsDiscovery(
            node=opts.node,
            cluster=opts.cluster,
            key_fingerprint=opts.fingerprint,
            gossip_addr=opts.gossip,
            interfaces=opts.interface,
            service_type=opts.service_type,
            on_peer=found,
            on_peer_gone=lambda peer: out("gone", **asdict(peer)),
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    try:
        await disc.start()
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out("started", instance=disc.instance_name)
    if opts.exit_after is not None and len(disc.peers()) >= opts.exit_after:
        done.set()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), opts.duration)
    peers = [asdict(p) for p in disc.peers()]
    await disc.stop()
    out("stats", peers=peers, **disc.stats)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    opts = _parser().parse_args(argv)
    logging.basicConfig(level=opts.log_level.upper(), stream=sys.stderr)
    import uvloop  # the agent's loop, so this is what the agent will see

    return uvloop.run(run(opts))


if __name__ == "__main__":
    sys.exit(main())
