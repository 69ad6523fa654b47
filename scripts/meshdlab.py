"""meshd agents on lab hosts: start, watch and stop them.

Used by the lab tests and the cluster benchmarks. Each agent runs in its own
network namespace (scripts/labhosts.py) with its API on that namespace's
loopback; its JSON log lines are read by a thread as they arrive, so the
time of each membership event is known to the millisecond.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from labhosts import Lab  # noqa: E402

API_PORT = 7947
MESHD = [
    str(REPO / ".venv/bin/python"),
    "-c",
    "import sys; from meshd.cli import main; sys.exit(main())",
]


class AgentProc:
    """One `meshd agent` process on lab host `host`."""

    def __init__(self, lab: Lab, host: int, argv: Sequence[str], cond: threading.Condition) -> None:
        self.lab = lab
        self.host = host
        self.name = f"h{host}"
        self.started = time.time()
        self.proc = lab.popen(
            host,
            list(argv),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.joined: dict[str, float] = {}
        self.left: dict[str, float] = {}
        self.dead: dict[str, float] = {}
        self.tail: deque[str] = deque(maxlen=40)
        self.messages: deque[tuple[float, str]] = deque(maxlen=10_000)
        """(time read, msg field) of every JSON log line, oldest first."""
        self._cond = cond
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in iter(self.proc.stderr.readline, ""):
            t = time.time()
            line = raw.rstrip("\n")
            with self._cond:
                self.tail.append(line)
                self._parse(line, t)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _parse(self, line: str, t: float) -> None:
        try:
            msg = json.loads(line).get("msg", "")
        except (ValueError, AttributeError):
            return
        self.messages.append((t, msg))
        parts = msg.split()
        if len(parts) >= 3 and parts[0] == "member":
            name, kind = parts[1], parts[2]
            if kind in ("join", "recover"):
                self.joined.setdefault(name, t)
                self.dead.pop(name, None)
            elif kind == "dead":
                self.dead.setdefault(name, t)
            elif kind == "leave":
                self.left.setdefault(name, t)

    def request(
        self, path: str, *, method: str = "GET", body: bytes | None = None
    ) -> tuple[int, Any]:
        """Call this agent's API from inside its namespace: (status, parsed JSON).

        HTTP error statuses are returned, not raised; an agent that does not
        answer at all raises RuntimeError.
        """
        script = (
            "import sys, urllib.error, urllib.request\n"
            f"req = urllib.request.Request('http://127.0.0.1:{API_PORT}' + sys.argv[1], "
            "method=sys.argv[2], data=sys.stdin.buffer.read() or None)\n"
            "try:\n"
            "    resp = urllib.request.urlopen(req, timeout=5)\n"
            "    status, data = resp.status, resp.read()\n"
            "except urllib.error.HTTPError as exc:\n"
            "    status, data = exc.code, exc.read()\n"
            "sys.stdout.write(f'{status}\\n')\n"
            "sys.stdout.flush()\n"
            "sys.stdout.buffer.write(data)\n"
        )
        out = self.lab.run(
            self.host,
            [sys.executable, "-c", script, path, method],
            input=body or b"",
            capture_output=True,
            timeout=15,
        )
        if out.returncode != 0:
            raise RuntimeError(f"{self.name} {method} {path}: {out.stderr.decode()[-300:]}")
        head, _, text = out.stdout.decode().partition("\n")
        try:
            doc = json.loads(text) if text.strip() else None
        except ValueError:
            doc = text
        return int(head), doc

    def api(self, path: str, *, method: str = "GET", body: bytes | None = None) -> Any:
        """Call this agent's API from inside its namespace; HTTP errors raise
        RuntimeError."""
        status, doc = self.request(path, method=method, body=body)
        if status >= 400:
            raise RuntimeError(f"{self.name} {method} {path}: HTTP {status}: {doc}")
        return doc

    def logged(self, text: str) -> list[str]:
        """The log messages so far that contain text."""
        with self._cond:
            return [m for _, m in self.messages if text in m]

    def logged_at(self, text: str) -> float | None:
        """When the first log message containing text was read, if one was."""
        with self._cond:
            return next((t for t, m in self.messages if text in m), None)

    def rss_mb(self) -> float:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def cpu_s(self) -> float:
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


class LabCluster:
    """N lab hosts, each with a meshd agent started with only what a lab on
    one machine needs (a node name and data dir per host, since all hosts
    share one hostname and file system) plus the interface.

    With ``docker=True`` every host gets its own Docker engine (holding the
    test image) and its agent runs replicas there (``--driver docker``), so a
    host's containers live in its namespace and die with it, as on a machine.
    """

    def __init__(
        self,
        n: int,
        *,
        prefix: str = "mlab",
        subnet: str = "10.79.0",
        workdir: Path | None = None,
        extra: Sequence[str] = (),
        docker: bool = False,
    ) -> None:
        self.n = n
        self.docker = docker
        self.lab = Lab(prefix, subnet)
        self.workdir = workdir or Path(f"/tmp/meshd-{prefix}")
        self.extra = list(extra)
        self.cond = threading.Condition()
        self.agents: dict[int, AgentProc] = {}

    def __enter__(self) -> LabCluster:
        Lab.reap_stale(self.lab.prefix)
        self.lab.up(self.n, docker=self.docker, owner_pid=os.getpid())
        shutil.rmtree(self.workdir, ignore_errors=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for a in self.agents.values():
            a.stop(signal.SIGKILL, timeout=5)
        self.agents.clear()
        self.lab.down()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def argv(self, i: int, *more: str) -> list[str]:
        # Before extra and more, so a caller's own --driver still wins.
        engine = (
            ["--driver", "docker", "--docker-url", self.lab.docker_host(i)] if self.docker else []
        )
        return [
            *MESHD,
            "agent",
            "--node",
            f"h{i}",
            "--mdns-interface",
            self.lab.addr(i),
            "--data-dir",
            str(self.workdir / f"h{i}"),
            "--log-format",
            "json",
            *engine,
            *self.extra,
            *more,
        ]

    def start(self, i: int, *more: str) -> AgentProc:
        agent = AgentProc(self.lab, i, self.argv(i, *more), self.cond)
        self.agents[i] = agent
        return agent

    def docker_cli(self, i: int, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """The docker CLI against host i's own engine (``docker=True``); text output."""
        if not self.docker:
            raise RuntimeError("this cluster has no Docker engines (LabCluster(docker=True))")
        return subprocess.run(
            ["docker", "-H", self.lab.docker_host(i), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def containers(self, i: int) -> list[str]:
        """IDs of every container on host i's engine, running or not."""
        out = self.docker_cli(i, "ps", "-aq")
        if out.returncode != 0:
            raise RuntimeError(f"docker ps on h{i}: {out.stderr.strip()}")
        return out.stdout.split()

    def wait(self, pred: Callable[[], bool], timeout: float) -> bool:
        end = time.monotonic() + timeout
        with self.cond:
            while not pred():
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.5))
        return True

    def all_joined(self, hosts: Sequence[int] | None = None) -> bool:
        hosts = list(hosts or self.agents)
        names = {f"h{i}" for i in hosts}
        return all(names - {self.agents[i].name} <= set(self.agents[i].joined) for i in hosts)

    def formed_at(self, hosts: Sequence[int] | None = None) -> float:
        """When the last agent had seen every other join."""
        hosts = list(hosts or self.agents)
        names = {f"h{i}" for i in hosts}
        return max(
            max(self.agents[i].joined[n] for n in names - {self.agents[i].name}) for i in hosts
        )
