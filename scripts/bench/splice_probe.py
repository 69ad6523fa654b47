#!/usr/bin/env python3
"""Does a zero-copy ``os.splice`` path beat plain asyncio forwarding for the L4 proxy?

Two forwarders, side by side in one run, on 127.0.0.1 only:

* ``product``: meshd's ``TcpProxy`` (meshd/proxy/tcp.py: asyncio protocols on
  uvloop) with a ``Router`` holding one endpoint, the backend.
* ``splice``: the forwarder below. Accepts and connects with non-blocking
  sockets driven by uvloop's ``add_reader``/``add_writer``; per direction one
  pipe (``--pipe-size``, default 1 MiB), bytes go socket -> pipe -> socket
  with ``os.splice`` and never enter Python. When the destination cannot
  take what the pipe holds, the source is no longer read until the pipe has
  drained (backpressure); EOF becomes a ``shutdown(SHUT_WR)`` once the pipe
  is empty (half-close passes through).

Each runs in its own process pinned to ``--proxy-cpu`` (default 1); wrk (one
thread) and the backend, nginx from scripts/bench/proxykit (a 6-byte body at
``/`` and a 64 MiB static file), share ``--load-cpus`` (default 0). Before any
load, both forwarders must pass a check: the 64 MiB file arrives intact, and a
request followed by a half-close gets its whole answer.

Each repeat runs, for both forwarders in turn (the order swaps every repeat):
``small``, wrk with ``--connections`` keep-alive connections fetching ``/``;
and ``bulk``, wrk with ``--bulk-connections`` connections downloading the big
file again and again. Every run lasts ``--duration`` seconds. The forwarder
process's CPU time over each run (utime + stime from /proc/<pid>/stat, all its
threads) gives CPU seconds per 10k requests and per GB moved: the least noisy
figure on a shared machine, since it does not depend on who else got the
other core. Medians over ``--repeats`` are quoted; ratios are splice over
product of those medians. With ``--json`` the last line is one JSON object.
Everything started is killed at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import fcntl
import hashlib
import http.client
import os
import socket
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from proxykit.peers import BIG_BYTES, BIG_PATH, SMALL_BODY, backend_template, render_backend  # noqa: E402
from proxykit.procs import (  # noqa: E402
    BenchError,
    Procs,
    accepts,
    bench_main,
    cpu_shares,
    cpu_ticks,
    free_port,
    wait_until,
)
from proxykit.wrk import Wrk, WrkResult  # noqa: E402

KINDS = ("product", "splice")
CLK_TCK = os.sysconf("SC_CLK_TCK")
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
CONNECT_TIMEOUT_S = 5.0
START_S = 15.0
CHECK_TIMEOUT_S = 30.0
PIPE_SIZE = 1 << 20
"""Bytes per splice pipe: fs.pipe-max-size's default. With the kernel's 64 KiB (16 slots,
one per socket buffer fragment) bulk moves cost about 2.5 times more CPU per GB."""
ACCEPT_BATCH = 64
"""Connections accepted per readiness event, so a flood of them cannot starve the others."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log(msg)


# ----- the splice forwarder ----------------------------------------------------------------


class _Direction:
    """One way of a connection: ``src`` -> pipe -> ``dst``, moved by the kernel."""

    __slots__ = (
        "cap", "conn", "done", "dst", "dst_sock", "eof", "held", "loop", "r", "reading",
        "src", "w", "writing",
    )  # fmt: skip

    def __init__(
        self, conn: _SpliceConn, src: socket.socket, dst: socket.socket, pipe_size: int
    ) -> None:
        self.conn = conn
        self.loop = conn.loop
        self.src = src.fileno()
        self.dst = dst.fileno()
        self.dst_sock = dst
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        if pipe_size:
            try:
                fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, pipe_size)
            except OSError as exc:  # over pipe-max-size or the user's quota: keep the default
                _warn_once(f"pipe size {pipe_size}: {exc!r}; kept the kernel's default")
        self.cap = fcntl.fcntl(self.w, fcntl.F_GETPIPE_SZ)
        self.held = 0
        """Bytes in the pipe not yet passed on."""
        self.eof = False
        self.done = False
        self.reading = False
        self.writing = False

    def start(self) -> None:
        self.reading = True
        self.loop.add_reader(self.src, self.on_readable)

    def on_readable(self) -> None:
        try:
            n = os.splice(self.src, self.w, self.cap, flags=SPLICE_FLAGS)
        except BlockingIOError:
            return
        except OSError:
            self.conn.abort()
            return
        if n == 0:
            self.eof = True
            self._stop_reading()
            self._finish()
            return
        self.held += n
        if not self._flush() and not self.conn.closed:
            # The destination is full: hold the source until the pipe drains.
            self._stop_reading()
            self.writing = True
            self.loop.add_writer(self.dst, self.on_writable)

    def on_writable(self) -> None:
        if not self._flush():
            return
        self.writing = False
        self.loop.remove_writer(self.dst)
        if self.eof:
            self._finish()
        else:
            self.start()

    def _flush(self) -> bool:
        """Pass on what the pipe holds; whether it is empty now (False also after an abort)."""
        while self.held:
            try:
                n = os.splice(self.r, self.dst, self.held, flags=SPLICE_FLAGS)
            except BlockingIOError:
                return False
            except OSError:
                self.conn.abort()
                return False
            self.held -= n
        return True

    def _stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.src)

    def _finish(self) -> None:
        """The source ended and the pipe is empty: pass the half-close on."""
        if self.held or self.done or self.conn.closed:
            return
        self.done = True
        try:
            self.dst_sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.conn.abort()
            return
        self.conn.direction_done()

    def close(self) -> None:
        """Stop watching the sockets (before they are closed) and free the pipe."""
        self._stop_reading()
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.dst)
        os.close(self.r)
        os.close(self.w)


class _SpliceConn:
    """A client joined to an upstream: two directions, closed when both ended."""

    __slots__ = ("client", "closed", "dirs", "ep", "forwarder", "loop", "started", "up", "watching")

    def __init__(self, forwarder: SpliceForwarder, client: socket.socket) -> None:
        self.forwarder = forwarder
        self.loop = forwarder.loop
        self.client = client
        self.up: socket.socket | None = None
        self.dirs: tuple[_Direction, _Direction] | None = None
        self.closed = False
        self.watching = False
        """Waiting for the upstream connect to complete."""
        self.ep: Any = None
        self.started = 0.0

    def connect(self) -> None:
        router = self.forwarder.router
        try:
            client_ip = self.client.getpeername()[0]
        except OSError:  # already gone
            self.abort()
            return
        ep = router.pick(client_ip)
        if ep is None:
            self.abort()
            return
        self.ep, self.started = ep, time.monotonic()
        router.begin(ep)
        up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        up.setblocking(False)
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.up = up
        err = up.connect_ex((ep.address, ep.port))
        if err not in (0, errno.EINPROGRESS):
            self.abort()
            return
        self.watching = True
        self.loop.add_writer(up.fileno(), self._connected)
        self.loop.call_later(CONNECT_TIMEOUT_S, self._connect_timeout)

    def _connect_timeout(self) -> None:
        if self.dirs is None and not self.closed:
            self.abort()

    def _connected(self) -> None:
        assert self.up is not None
        self.loop.remove_writer(self.up.fileno())
        self.watching = False
        if self.up.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self.abort()
            return
        size = self.forwarder.pipe_size
        try:
            self.dirs = (
                _Direction(self, self.client, self.up, size),
                _Direction(self, self.up, self.client, size),
            )
        except OSError as exc:  # out of fds for the pipes
            log(f"pipe: {exc!r}")
            self.abort()
            return
        for d in self.dirs:
            d.start()

    def direction_done(self) -> None:
        if self.dirs is not None and all(d.done for d in self.dirs):
            self.close()

    def abort(self) -> None:
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.forwarder.conns.discard(self)
        if self.dirs is not None:
            for d in self.dirs:
                d.close()
        if self.up is not None:
            if self.watching:
                self.loop.remove_writer(self.up.fileno())
            self.up.close()
        self.client.close()
        if self.ep is not None:
            # As in TcpProxy: only a failed connect counts against the replica (a client
            # resetting its connection says nothing about it).
            self.forwarder.router.end(
                self.ep, time.monotonic() - self.started, self.dirs is not None
            )


class SpliceForwarder:
    """Accepts on ``listener`` and forwards each connection to the router's pick."""

    def __init__(self, loop: asyncio.AbstractEventLoop, listener: socket.socket, router: Any,
                 pipe_size: int) -> None:  # fmt: skip
        self.loop = loop
        self.listener = listener
        self.router = router
        self.pipe_size = pipe_size
        self.conns: set[_SpliceConn] = set()
        listener.setblocking(False)
        loop.add_reader(listener.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of fds and the like: drop this one, keep serving
                log(f"accept: {exc!r}")
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _SpliceConn(self, sock)
            self.conns.add(conn)
            conn.connect()


# ----- the forwarder process ---------------------------------------------------------------


def make_router(upstream: int) -> Any:
    from meshd.proxy.balancing import Endpoint
    from meshd.proxy.router import Router
    from meshd.spec import Balance

    router = Router("bench", "raw", Balance())
    router.set_endpoints((Endpoint("backend", "local", "127.0.0.1", upstream),))
    return router


async def serve(kind: str, port: int, upstream: int, pipe_size: int) -> None:
    loop = asyncio.get_running_loop()
    router = make_router(upstream)
    if kind == "product":
        from meshd.proxy.tcp import TcpProxy

        proxy = TcpProxy(router, connect_timeout=CONNECT_TIMEOUT_S)
        server = await loop.create_server(proxy, "127.0.0.1", port, backlog=4096)
        async with server:  # held until the process is ended
            await asyncio.Event().wait()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)
    SpliceForwarder(loop, listener, router, pipe_size)
    await asyncio.Event().wait()


def serve_main(args: argparse.Namespace) -> int:
    import uvloop

    uvloop.install()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.kind, args.port, args.upstream, args.pipe_size))
    return 0


# ----- the harness -------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def check_forwarder(kind: str, port: int, big_sha: str) -> None:
    """The forwarder moves the big file intact and passes a half-close through."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CHECK_TIMEOUT_S)
    try:
        conn.request("GET", BIG_PATH)
        r = conn.getresponse()
        digest, n = hashlib.sha256(), 0
        while chunk := r.read(1 << 20):
            digest.update(chunk)
            n += len(chunk)
    finally:
        conn.close()
    if r.status != 200 or n != BIG_BYTES or digest.hexdigest() != big_sha:
        raise BenchError(f"{kind}: {BIG_PATH} arrived damaged (HTTP {r.status}, {n} bytes)")
    with socket.create_connection(("127.0.0.1", port), timeout=CHECK_TIMEOUT_S) as s:
        s.sendall(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
        s.shutdown(socket.SHUT_WR)
        got = b""
        while data := s.recv(65536):
            got += data
    if not got.startswith(b"HTTP/1.1 200") or not got.endswith(SMALL_BODY.encode()):
        raise BenchError(f"{kind}: no whole answer after a half-close: {got[:200]!r}")


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    logs = workdir / "logs"
    logs.mkdir()
    procs = Procs(logs)
    try:
        return measure(args, workdir, procs)
    finally:
        procs.close()


def measure(args: argparse.Namespace, workdir: Path, procs: Procs) -> dict[str, Any]:
    template = backend_template(workdir)
    big = template.parent / "www" / BIG_PATH.lstrip("/")
    big_sha = hashlib.sha256(big.read_bytes()).hexdigest()
    backend = render_backend(procs, template, args.load_cpus)
    log(f"backend nginx on 127.0.0.1:{backend.raw} (cpus {args.load_cpus})")

    ports: dict[str, int] = {}
    pids: dict[str, int] = {}
    for kind in KINDS:
        port = free_port()
        argv = [
            sys.executable, str(Path(__file__).resolve()), "serve",
            "--kind", kind, "--port", str(port), "--upstream", str(backend.raw),
            "--pipe-size", str(args.pipe_size),
        ]  # fmt: skip
        pids[kind] = procs.start(kind, argv, cpus=args.proxy_cpu).pid
        ports[kind] = port
    for kind, port in ports.items():
        wait_until(lambda k=kind, p=port: procs.check(k) or accepts(p), START_S, f"{kind} up")
        check_forwarder(kind, port, big_sha)
        log(f"{kind} on 127.0.0.1:{port} (pid {pids[kind]}, cpu {args.proxy_cpu}): checked")

    wrk = Wrk(procs, workdir, args.load_cpus, threads=1)
    samples: dict[str, dict[str, list[float]]] = {k: {} for k in KINDS}
    runs: list[dict[str, Any]] = []
    tests = (("small", "/", args.connections), ("bulk", BIG_PATH, args.bulk_connections))
    for rep in range(args.repeats):
        order = KINDS if rep % 2 == 0 else KINDS[::-1]
        for test, path, conns in tests:
            for kind in order:
                procs.check(kind)
                cpu0, ticks0 = proc_cpu_s(pids[kind]), cpu_ticks()
                res: WrkResult = wrk.run(f"http://127.0.0.1:{ports[kind]}{path}", conns,
                                         args.duration)  # fmt: skip
                cpu, ticks1 = proc_cpu_s(pids[kind]) - cpu0, cpu_ticks()
                procs.check(kind)
                row = record(samples[kind], test, res, cpu)
                # How busy each core was (everything on it), to tell a proxy-bound run apart.
                cores = {c: v["busy"] for c, v in cpu_shares(ticks0, ticks1).items()}
                runs.append({"repeat": rep, "kind": kind, "test": test, **row,
                             "core_busy_pct": cores, "errors": res.errors})  # fmt: skip
                busy = " ".join(f"{c}:{v}%" for c, v in cores.items())
                log(f"[{rep + 1}/{args.repeats}] {test:5} {kind:7} {fmt_row(test, row)} "
                    f"cores busy {busy}")  # fmt: skip
    return report(args, samples, runs)


def record(s: dict[str, list[float]], test: str, res: WrkResult, cpu: float) -> dict[str, float]:
    row = {"cpu_s": round(cpu, 3), "cpu_pct": round(100 * cpu / res.seconds, 1)}
    if res.error_count() or res.ok == 0:
        raise BenchError(f"{test}: {res.error_count()} errors in {res.requests} requests")
    if test == "small":
        row["rps"] = round(res.rps, 1)
        row["cpu_s_per_10k_req"] = round(cpu / res.ok * 10_000, 4)
    else:
        row["mbps"] = round(res.mbps, 1)
        row["cpu_s_per_gb"] = round(cpu / (res.bytes / 1e9), 4)
    for k, v in row.items():
        s.setdefault(f"{test}_{k}", []).append(v)
    return row


def fmt_row(test: str, row: dict[str, float]) -> str:
    if test == "small":
        head = f"{row['rps']:9.0f} req/s  {row['cpu_s_per_10k_req']:.3f} cpu-s/10k req"
    else:
        head = f"{row['mbps']:9.0f} MB/s   {row['cpu_s_per_gb']:.3f} cpu-s/GB"
    return f"{head}  (proxy {row['cpu_pct']:.0f}% cpu)"


METRICS = {
    "small_rps": "higher",
    "small_cpu_s_per_10k_req": "lower",
    "bulk_mbps": "higher",
    "bulk_cpu_s_per_gb": "lower",
}


def report(args: argparse.Namespace, samples: dict[str, dict[str, list[float]]],
           runs: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    medians = {k: {m: round(median(v), 4) for m, v in s.items()} for k, s in samples.items()}
    ratios = {}
    for m in METRICS:
        base = medians["product"].get(m)
        ratios[m] = round(medians["splice"][m] / base, 3) if base else None
    return {
        "config": {
            "repeats": args.repeats,
            "duration_s": args.duration,
            "connections": args.connections,
            "bulk_connections": args.bulk_connections,
            "proxy_cpu": args.proxy_cpu,
            "load_cpus": args.load_cpus,
            "pipe_size": args.pipe_size,
            "big_bytes": BIG_BYTES,
        },
        "medians": medians,
        "ratios_splice_over_product": ratios,
        "samples": samples,
        "runs": runs,
    }


def print_table(rep: dict[str, Any]) -> None:
    med, ratios = rep["medians"], rep["ratios_splice_over_product"]
    print(f"medians of {rep['config']['repeats']} repeats (ratio = splice / product)")
    print(f"{'metric':26} {'product':>12} {'splice':>12} {'ratio':>8}  better")
    for m, better in METRICS.items():
        print(f"{m:26} {med['product'][m]:12.3f} {med['splice'][m]:12.3f} "
              f"{ratios[m]:8.3f}  {better}")  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    sub = p.add_subparsers(dest="cmd")
    s = sub.add_parser("serve", help="run one forwarder (the harness starts these)")
    s.add_argument("--kind", choices=KINDS, required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--upstream", type=int, required=True)
    s.add_argument("--pipe-size", type=int, default=PIPE_SIZE)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--duration", type=float, default=3.0, help="seconds per load run")
    p.add_argument("--connections", type=int, default=50, help="wrk connections, small")
    p.add_argument("--bulk-connections", type=int, default=4, help="wrk connections, bulk")
    p.add_argument("--proxy-cpu", default="1")
    p.add_argument("--load-cpus", default="0", help="wrk and the backend")
    p.add_argument("--pipe-size", type=int, default=PIPE_SIZE,
                   help="splice pipe size in bytes (0: the kernel's default, 64 KiB)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    if args.cmd is None and (args.repeats < 1 or args.duration < 1):
        p.error("--repeats and --duration must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cmd == "serve":
        return serve_main(args)
    return bench_main(
        "meshd-bench-splice-",
        lambda workdir: run(args, workdir),
        print_table,
        keep=args.keep,
        as_json=args.json,
    )


if __name__ == "__main__":
    sys.exit(main())
