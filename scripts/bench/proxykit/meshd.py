"""One meshd agent on loopback with the process driver, driven through its HTTP API.

The agent runs pinned to the proxy core (every thread: it starts under
``taskset``, which its threads and children inherit); the replicas it runs
pin themselves elsewhere. Replicas outlive their agent by design, so
``close`` deletes the services first, waits for their processes to end,
and then kills any replica process group still recorded in the driver's
``pid.json`` files (checked against the process start time, so a recycled
pid is never hit).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .procs import BenchError, Procs, free_port, wait_until

__all__ = ["Agent", "Api"]

START_S = 30.0
READY_S = 60.0
GONE_S = 20.0


class Api:
    """A keep-alive JSON client of the agent's API (reconnects after an error)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """(status, decoded JSON or text); status 0 when the agent cannot be reached."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            self.conn.request(method, path, body=data, headers=headers)
            r = self.conn.getresponse()
            raw = r.read()
        except (OSError, http.client.HTTPException):
            self.close()
            return 0, None
        try:
            return r.status, json.loads(raw)
        except ValueError:
            return r.status, raw.decode(errors="replace")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _ready(replica: dict[str, Any]) -> bool:
    return replica.get("state") == "running" and replica.get("health") in ("healthy", "none")


class Agent:
    """The agent process, its API, and the services this benchmark deployed."""

    def __init__(self, procs: Procs, workdir: Path, meshd: str, cpus: str) -> None:
        self.procs = procs
        self.data = workdir / "agent"
        self.meshd = meshd
        self.cpus = cpus
        self.services: list[str] = []
        self.api = Api(0)
        self.pid = 0

    def start(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        self.api = Api(free_port())
        argv = [
            self.meshd, "agent",
            "--node", "bench",
            "--bind", f"127.0.0.1:{free_port()}",
            "--advertise", "127.0.0.1",
            "--api", f"127.0.0.1:{self.api.port}",
            "--data-dir", str(self.data),
            "--driver", "process",
            "--no-mdns",
            "--cluster", f"bench-{secrets.token_hex(4)}",
            "--profile", "local",
            "--log-level", "warning",
        ]  # fmt: skip
        # Keep the mesh and the DNS server on loopback, clear of other agents.
        flags = self._flags()
        if "--proxy-address" in flags:
            argv += ["--proxy-address", "127.0.0.1"]
        if "--dns" in flags:
            argv += ["--dns", f"127.0.0.1:{free_port()}"]
        self.pid = self.procs.start("meshd", argv, cpus=self.cpus).pid
        wait_until(
            lambda: self.procs.check("meshd") or self.api.request("GET", "/v1/agent")[0] == 200,
            START_S,
            "meshd agent answering its API",
            step=0.05,
        )

    def _flags(self) -> set[str]:
        """The options this agent's version knows (the mesh's arrived with issue 5)."""
        out = subprocess.run(
            [self.meshd, "agent", "--help"], capture_output=True, text=True, timeout=30
        )
        return set(re.findall(r"--[a-z][a-z-]+", out.stdout))

    def put(self, name: str, spec: dict[str, Any]) -> None:
        status, doc = self.api.request("PUT", f"/v1/services/{name}", {"name": name, **spec})
        if status not in (200, 201):
            raise BenchError(f"PUT /v1/services/{name}: HTTP {status}: {doc}")
        if name not in self.services:
            self.services.append(name)

    def replicas(self, name: str) -> list[dict[str, Any]]:
        status, doc = self.api.request("GET", f"/v1/services/{name}/replicas")
        return doc if status == 200 and isinstance(doc, list) else []

    def wait_ready(self, name: str, count: int, timeout: float = READY_S) -> list[dict[str, Any]]:
        """The replicas once exactly ``count`` are running and healthy."""
        found: list[dict[str, Any]] = []

        def done() -> bool:
            nonlocal found
            self.procs.check("meshd")
            found = [r for r in self.replicas(name) if _ready(r)]
            return len(found) == count

        try:
            wait_until(done, timeout, f"{count} ready replica(s) of {name}", step=0.05)
        except BenchError as exc:
            raise BenchError(f"{exc}; replicas: {self.replicas(name)}") from None
        return found

    def endpoints(self, name: str) -> list[dict[str, Any]] | None:
        """The routing mesh's endpoints of ``name``; None when the agent has no such API."""
        status, doc = self.api.request("GET", f"/v1/services/{name}/endpoints")
        if status == 200 and isinstance(doc, dict):
            return list(doc.get("endpoints") or [])
        return None

    def ready_ids(self, name: str, via: str) -> list[str] | None:
        """Ids of what can take traffic, from the endpoints or the replicas list."""
        if via == "endpoints":
            eps = self.endpoints(name)
            return None if eps is None else sorted(e["id"] for e in eps)
        return sorted(r["id"] for r in self.replicas(name) if _ready(r))

    def scale(self, name: str, replicas: int) -> None:
        status, doc = self.api.request("POST", f"/v1/services/{name}/scale", {"replicas": replicas})
        if status != 200:
            raise BenchError(f"scale {name} to {replicas}: HTTP {status}: {doc}")

    def time_change(
        self, name: str, replicas: int, via: str, limit: float, poll: float = 0.005
    ) -> float | None:
        """Seconds from a scale request to a new set of ``replicas`` ids; None past ``limit``."""
        before = self.ready_ids(name, via)
        t0 = time.monotonic()
        self.scale(name, replicas)
        while (elapsed := time.monotonic() - t0) < limit:
            ids = self.ready_ids(name, via)
            if ids is not None and len(ids) == replicas and ids != before:
                return elapsed
            time.sleep(poll)
        return None

    # -- cleanup -------------------------------------------------------------------

    def replica_groups(self) -> list[int]:
        """Process groups of the replicas (each runs in a session of its own)."""
        return self._replica_pids()

    def _replica_pids(self) -> list[int]:
        """Live process groups the process driver recorded (start time verified)."""
        pids = []
        for f in (self.data / "replicas").glob("*/pid.json"):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                doc = json.loads(f.read_text())
                pid, start = int(doc["pid"]), int(doc["start"])
                stat = Path(f"/proc/{pid}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[19]) == start:
                    pids.append(pid)
        return pids

    def close(self) -> None:
        """Delete the services, stop the agent, kill any replica left behind."""
        try:
            if self.pid and self.procs.running.get("meshd") is not None:
                for name in self.services:
                    self.api.request("DELETE", f"/v1/services/{name}")
                gone: Callable[[], bool] = lambda: not self._replica_pids()  # noqa: E731
                with contextlib.suppress(BenchError):
                    wait_until(gone, GONE_S, "replicas stopped", step=0.05)
        finally:
            self.api.close()
            self.procs.stop("meshd")
            for pid in self._replica_pids():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
