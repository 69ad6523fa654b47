"""wrk runs, each bounded in time, read through a Lua ``done()`` that prints JSON.

The Lua hook gives the exact counts and latency percentiles (in microseconds)
instead of wrk's rounded human-readable summary. Throughput counts only
responses below 400: a proxy answering 502 quickly must not look fast.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .procs import BenchError, Procs

__all__ = ["LUA", "Wrk", "WrkResult"]

LUA = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\n{"requests":%d,"bytes":%d,"duration_us":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50_us":%.1f,"p99_us":%.1f,"max_us":%.1f}\\n',
    summary.requests, summary.bytes, summary.duration, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99), latency.max))
end
"""

RUN_SLACK_S = 30.0
"""wrk stops itself after -d; past this much longer it is hung and killed."""


@dataclass(frozen=True, slots=True)
class WrkResult:
    conns: int
    seconds: float
    requests: int
    ok: int
    """Responses with a status below 400."""
    bytes: int
    errors: dict[str, int]
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.ok / self.seconds

    @property
    def mbps(self) -> float:
        """MB/s (10^6 bytes) read by wrk: wrk's transfer rate, headers included."""
        return self.bytes / self.seconds / 1e6

    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "conns": self.conns,
            "seconds": round(self.seconds, 3),
            "requests": self.requests,
            "ok": self.ok,
            "rps": round(self.rps, 1),
            "mbps": round(self.mbps, 1),
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "errors": {k: v for k, v in self.errors.items() if v},
        }


class Wrk:
    """Runs wrk pinned to the load CPUs; its Lua script lives in ``workdir``."""

    def __init__(self, procs: Procs, workdir: Path, cpus: str, threads: int = 1) -> None:
        self.procs = procs
        self.cpus = cpus
        self.threads = threads
        self.lua = workdir / "report.lua"
        self.lua.write_text(LUA)

    def run(self, url: str, conns: int, seconds: float, timeout_s: float = 5.0) -> WrkResult:
        """One closed-loop run of ``conns`` keep-alive connections for ``seconds``."""
        argv = [
            "wrk",
            "-t", str(min(self.threads, conns)),
            "-c", str(conns),
            "-d", f"{max(1, round(seconds))}s",
            "--timeout", f"{timeout_s:g}s",
            "-s", str(self.lua),
            url,
        ]  # fmt: skip
        out = self.procs.run("wrk", argv, cpus=self.cpus, timeout=seconds + RUN_SLACK_S)
        return parse(out, conns)


def parse(out: str, conns: int) -> WrkResult:
    """The result from wrk's output (the JSON line the Lua hook wrote)."""
    line = next((ln for ln in reversed(out.splitlines()) if ln.startswith('{"requests"')), None)
    if line is None:
        raise BenchError(f"no report in wrk's output: {out[-400:].strip()}")
    doc = json.loads(line)
    errors = {k: int(doc[k]) for k in ("connect", "read", "write", "status", "timeout")}
    if doc["duration_us"] <= 0:
        raise BenchError(f"wrk reported no duration: {line}")
    return WrkResult(
        conns=conns,
        seconds=doc["duration_us"] / 1e6,
        requests=int(doc["requests"]),
        ok=max(0, int(doc["requests"]) - errors["status"]),
        bytes=int(doc["bytes"]),
        errors=errors,
        p50_ms=doc["p50_us"] / 1000,
        p99_ms=doc["p99_us"] / 1000,
    )
