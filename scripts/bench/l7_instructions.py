#!/usr/bin/env python3
"""Instructions the L7 proxy's Python side spends per request: steady on a noisy machine.

Requests per second on a shared machine move by tens of percent from one
run to the next (``proxy.py`` shows it); instructions do not. This drives
one client connection and one pooled replica connection of
``meshd.proxy.http`` with in-memory transports -- no sockets, no kernel --
and counts the instructions executed per proxied request with valgrind's
callgrind (``--tool=callgrind``): one run with N requests, one with none,
the difference over N. That is the interpreter, llhttp and everything the
proxy calls, for one request and its response, without the syscalls.

Two kinds of traffic:

* ``same``: every request and every response head alike (wrk against one
  URL; also a client polling an API) -- the proxy's head caches hit;
* ``distinct``: every request has its own URL and every response its own
  ``ETag``, so no head was seen before.

Usage: ``scripts/bench/l7_instructions.py [--requests N] [--json]`` (needs
valgrind: ``apt install valgrind``); ``--wall`` instead times the loop
(noisy, no valgrind needed).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Any

HOST_HEADER = b"Host: 127.0.0.1:18001\r\nAccept: */*\r\n"
SAME_REQUEST = b"GET / HTTP/1.1\r\n" + HOST_HEADER + b"\r\n"
SAME_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sat, 28 Nov 2026 01:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 6\r\nConnection: keep-alive\r\n\r\nhello\n"
)


class _Transport:
    """Enough of an asyncio transport for the proxy's protocols."""

    def __init__(self) -> None:
        self.last = b""

    def write(self, data: bytes) -> None:
        self.last = data

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


def traffic(kind: str, n: int) -> tuple[list[bytes], list[bytes]]:
    if kind == "same":
        return [SAME_REQUEST] * n, [SAME_RESPONSE] * n
    requests = [b"GET /item/%d HTTP/1.1\r\n%s\r\n" % (i, HOST_HEADER) for i in range(n)]
    responses = [SAME_RESPONSE.replace(b"Server:", b'ETag: "%d"\r\nServer:' % i) for i in range(n)]
    return requests, responses


def drive(kind: str, n: int) -> float:
    """Proxy n requests; seconds taken."""
    from meshd.proxy.balancing import Endpoint
    from meshd.proxy.http import HttpProxy, _Upstream
    from meshd.proxy.router import Router
    from meshd.spec import Balance

    router = Router("web", "http", Balance())
    endpoint = Endpoint("a", "n1", "127.0.0.1", 18000)
    router.set_endpoints((endpoint,))
    proxy = HttpProxy("web", router)
    client = proxy()
    client_transport = _Transport()
    client.connection_made(client_transport)  # type: ignore[arg-type]
    upstream = _Upstream(proxy.pool, ("127.0.0.1", 18000), endpoint)
    upstream.transport = _Transport()  # type: ignore[assignment]
    proxy.pool.release(upstream)
    requests, responses = traffic(kind, n)
    to_proxy, to_client = client.data_received, upstream.data_received
    gc.collect()
    gc.freeze()  # as the agent does after its start
    gc.set_threshold(20_000, 10, 10)
    started = time.perf_counter()
    for request, response in zip(requests, responses, strict=True):
        to_proxy(request)
        to_client(response)
    took = time.perf_counter() - started
    if n and not client_transport.last.endswith(b"hello\n"):
        raise SystemExit("the proxy did not answer: " + repr(client_transport.last[:200]))
    return took


def instructions(kind: str, n: int) -> float:
    """Instructions per request: callgrind runs with n and with no requests."""

    def total(count: int) -> int:
        out = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--callgrind-out-file=/dev/null",
                sys.executable,
                __file__,
                "--child",
                kind,
                str(count),
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=1800,
        )
        found = re.search(r"Collected : (\d+)", out.stderr)
        if found is None:
            raise SystemExit("no instruction count in valgrind's output:\n" + out.stderr[-2000:])
        return int(found.group(1))

    return (total(n) - total(0)) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--requests", type=int, default=5000, help="requests per count (default 5000)")
    ap.add_argument("--wall", action="store_true", help="time the loop instead (noisy)")
    ap.add_argument("--json", action="store_true", help="end with one JSON line")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        drive(args.child[0], int(args.child[1]))
        return 0
    if args.requests < 1:
        ap.error("--requests must be at least 1")
    if not args.wall and shutil.which("valgrind") is None:
        ap.error("valgrind is not installed (apt install valgrind), or use --wall")
    result: dict[str, float] = {}
    for kind in ("same", "distinct"):
        if args.wall:
            best = min(drive(kind, args.requests) for _ in range(5))
            result[f"{kind}_us_per_request"] = round(best / args.requests * 1e6, 2)
        else:
            result[f"{kind}_instructions_per_request"] = round(instructions(kind, args.requests))
        print(f"{kind}: {list(result.values())[-1]}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
