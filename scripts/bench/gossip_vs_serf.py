#!/usr/bin/env python3
"""meshd's gossip library against HashiCorp Serf, on real lab hosts.

Both systems run the same way: one agent per lab host (network namespaces,
see scripts/labhosts.py), a 32-byte key (AES-256-GCM for both), the LAN
profile, gossip on port 7946, one system at a time in a lab of its own so the
two never compete for CPU. Measured for each:

* failure detection: ``kill -9`` one agent (never the seed; the victim
  rotates) and time until every survivor has reported it failed; then
  restart it under the same name and address and wait until all see it alive;
* false positives under 5% random UDP loss into every host, during a soak;
* bytes per member per second on an idle cluster (eth0 tx_bytes of each host);
* resident memory and CPU of each agent during that idle period.

Event times are taken when a line of an agent's output reaches this process
(a reader thread per agent), for both systems alike: Serf's log timestamps
have one-second resolution. meshd's ``suspect`` events are seen by every
member, while Serf logs a suspicion only on the member whose probe failed,
so the two ``false_suspicions`` counts are not comparable with each other.

Needs root. Prints a table; with ``--json`` the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

from benchstats import percentile  # noqa: E402
from labhosts import CHAIN_LOSS, Lab, LabError  # noqa: E402

PORT = 7946
SERF_RPC = "127.0.0.1:7373"  # loopback of each host's own namespace
SYSTEMS = ("meshd", "serf")
SEED = 1

# Deadlines: every wait is bounded, and a missed one is reported, not hung on.
FORM_TIMEOUT = 60.0
SEED_TIMEOUT = 15.0
DETECT_TIMEOUT = 60.0
REJOIN_TIMEOUT = 60.0
SETTLE_S = 2.0
SOAK_LOSS = 0.05
# Counting false positives goes on this long after the loss is lifted: a
# suspicion raised by a lost packet may run its full timeout (Serf's longest
# at 5 members is 24 s) before it turns into a failure.
SOAK_GRACE_S = 25.0

ALIVE, SUSPECT, FAILED, LEFT, REAP = "alive", "suspect", "failed", "left", "reap"


class BenchError(RuntimeError):
    """A measurement could not be made; the message says why."""


@dataclass(frozen=True, slots=True)
class Event:
    t: float  # time.monotonic() when the line arrived
    kind: str
    member: str


# ----- the two systems ---------------------------------------------------------


def _meshd_argv(python: str, name: str, bind: str, join: str | None, key: str) -> list[str]:
    argv = [python, "-m", "gossip", "--name", name, "--bind", bind, "--key", key]
    argv += ["--profile", "lan"]
    return argv + (["--join", join] if join else [])


_MESHD_KINDS = {
    "join": ALIVE,
    "update": ALIVE,
    "recover": ALIVE,
    "suspect": SUSPECT,
    "dead": FAILED,
    "leave": LEFT,
}


def _meshd_parse(line: str, t: float) -> Event | None:
    if not line.startswith("{"):
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    kind = _MESHD_KINDS.get(obj.get("event", "")) if isinstance(obj, dict) else None
    member = obj.get("member") if kind else None
    return Event(t, kind, member) if kind and isinstance(member, str) else None


def _serf_argv(_python: str, name: str, bind: str, join: str | None, key: str) -> list[str]:
    argv = ["serf", "agent", "-node", name, "-bind", bind, "-rpc-addr", SERF_RPC]
    argv += ["-profile", "lan", "-encrypt", key, "-log-level=info"]
    return argv + (["-join", join] if join else [])


_SERF_EVENT = re.compile(r"serf: EventMember(Join|Update|Failed|Leave|Reap): (\S+)")
_SERF_SUSPECT = re.compile(r"memberlist: Suspect (\S+) has failed")
_SERF_KINDS = {"Join": ALIVE, "Update": ALIVE, "Failed": FAILED, "Leave": LEFT, "Reap": REAP}


def _serf_parse(line: str, t: float) -> Event | None:
    if m := _SERF_EVENT.search(line):
        return Event(t, _SERF_KINDS[m.group(1)], m.group(2))
    if m := _SERF_SUSPECT.search(line):
        return Event(t, SUSPECT, m.group(1))
    return None


@dataclass(frozen=True)
class System:
    name: str
    argv: Callable[[str, str, str, str | None, str], list[str]]
    parse: Callable[[str, float], Event | None]
    # Serf's -join fails for good if the seed is not up yet, and Serf reports
    # its own member, so its seed is awaited; meshd agents retry their join.
    wait_for_seed: bool


SYSTEM_DEFS = {
    "meshd": System("meshd", _meshd_argv, _meshd_parse, wait_for_seed=False),
    "serf": System("serf", _serf_argv, _serf_parse, wait_for_seed=True),
}


# ----- agents and their output -------------------------------------------------


class Agent:
    """One agent process and what it has reported, read by a thread of its own
    so each line is timestamped as soon as the agent writes it."""

    def __init__(
        self,
        host: int,
        name: str,
        proc: subprocess.Popen,
        parse: Callable[[str, float], Event | None],
        cond: threading.Condition,
    ) -> None:
        self.host = host
        self.name = name
        self.proc = proc
        self.events: list[Event] = []
        self.view: dict[str, str] = {}
        self.tail: deque[str] = deque(maxlen=30)
        self.exited = False
        self._parse = parse
        self._cond = cond
        self._thread = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        stream = self.proc.stdout
        assert stream is not None
        for raw in iter(stream.readline, ""):
            t = time.monotonic()
            line = raw.rstrip("\n")
            ev = self._parse(line, t)
            with self._cond:
                self.tail.append(line)
                if ev is not None:
                    self.events.append(ev)
                    if ev.kind == REAP:
                        self.view.pop(ev.member, None)
                    elif ev.kind != SUSPECT:
                        # A suspect is still a member; Serf never logs the
                        # end of a suspicion, so it must not change the view.
                        self.view[ev.member] = ev.kind
                self._cond.notify_all()
        with self._cond:
            self.exited = True
            self._cond.notify_all()

    def sees_alive(self, names: Iterable[str]) -> bool:
        return all(self.view.get(n) == ALIVE for n in names if n != self.name)

    def first(self, kind: str, member: str, since: float) -> float | None:
        for ev in self.events:
            if ev.t >= since and ev.kind == kind and ev.member == member:
                return ev.t
        return None

    def count(self, kinds: set[str], since: float, until: float, skip: set[str]) -> list[Event]:
        return [
            ev
            for ev in self.events
            if since <= ev.t <= until and ev.kind in kinds and ev.member not in skip
        ]

    def describe(self) -> str:
        state = "exited" if self.proc.poll() is not None else "running"
        return f"{self.name} ({state}); last output:\n    " + "\n    ".join(self.tail)


class Cluster:
    """The agents of one system, one per lab host, host 1 being the seed."""

    def __init__(self, lab: Lab, system: System, key: str, python: str) -> None:
        self.lab = lab
        self.system = system
        self.key = key
        self.python = python
        self.cond = threading.Condition()
        self.agents: dict[int, Agent] = {}
        self.all_procs: list[subprocess.Popen] = []

    @staticmethod
    def member(i: int) -> str:
        return f"h{i}"

    @property
    def names(self) -> list[str]:
        return [self.member(i) for i in self.lab.hosts]

    def start(self, i: int) -> Agent:
        bind = f"{self.lab.addr(i)}:{PORT}"
        join = None if i == SEED else f"{self.lab.addr(SEED)}:{PORT}"
        argv = self.system.argv(self.python, self.member(i), bind, join, self.key)
        proc = self.lab.popen(
            i,
            argv,
            cwd=str(REPO),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            # Out of our process group: a Ctrl-C reaches us, and we stop them.
            start_new_session=True,
        )
        self.all_procs.append(proc)
        agent = Agent(i, self.member(i), proc, self.system.parse, self.cond)
        self.agents[i] = agent
        return agent

    def wait(self, pred: Callable[[], bool], timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(pred, timeout)

    def converged(self) -> bool:
        names = self.names
        return len(self.agents) == self.lab.n and all(
            a.sees_alive(names) for a in self.agents.values()
        )

    def form(self) -> float:
        """Start every agent; seconds until all see all others alive."""
        t0 = time.monotonic()
        seed = self.start(SEED)
        if self.system.wait_for_seed and not self.wait(
            lambda: seed.view.get(seed.name) == ALIVE or seed.exited, SEED_TIMEOUT
        ):
            raise BenchError(f"seed did not come up in {SEED_TIMEOUT:.0f}s: {seed.describe()}")
        if seed.exited:
            raise BenchError(f"seed exited: {seed.describe()}")
        for i in self.lab.hosts:
            if i != SEED:
                self.start(i)
        self.require(self.converged, FORM_TIMEOUT, "cluster did not form")
        return time.monotonic() - t0

    def require(self, pred: Callable[[], bool], timeout: float, what: str) -> None:
        if not self.wait(pred, timeout):
            laggards = [a for a in self.agents.values() if not a.sees_alive(self.names)]
            views = "\n  ".join(f"{a.describe()}\n    view={a.view}" for a in laggards)
            raise BenchError(f"{what} within {timeout:.0f}s; lagging:\n  {views}")

    def kill(self, i: int) -> float:
        agent = self.agents.pop(i)
        t = time.monotonic()
        agent.proc.kill()
        agent.proc.wait(timeout=10)
        return t

    def exits(self) -> list[str]:
        return [a.name for a in self.agents.values() if a.proc.poll() is not None]

    def stop(self) -> None:
        """Stop every process this cluster started (SIGTERM, then SIGKILL)."""
        live = [p for p in self.all_procs if p.poll() is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
        deadline = time.monotonic() + 5
        for p in live:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        self.agents.clear()


# ----- measurements ------------------------------------------------------------


def _all_saw(agents: Sequence[Agent], member: str, since: float) -> Callable[[], bool]:
    return lambda: all(a.first(FAILED, member, since) is not None for a in agents)


def measure_detection(cl: Cluster, repeats: int) -> dict[str, Any]:
    victims = [i for i in cl.lab.hosts if i != SEED]
    detect: list[float | None] = []
    per_agent_first: list[float] = []
    stray_failures = 0
    for r in range(repeats):
        victim = victims[r % len(victims)]
        vname = cl.member(victim)
        t_kill = cl.kill(victim)
        survivors = list(cl.agents.values())
        cl.wait(_all_saw(survivors, vname, t_kill), DETECT_TIMEOUT)
        with cl.cond:
            times = [a.first(FAILED, vname, t_kill) for a in survivors]
            stray_failures += sum(
                len(a.count({FAILED}, t_kill, time.monotonic(), {vname})) for a in survivors
            )
        got = [t - t_kill for t in times if t is not None]
        full = len(got) == len(survivors)
        detect.append(max(got) if full else None)
        if got:
            per_agent_first.append(min(got))
        shown = f"{max(got):.2f}s" if full else f"missed ({len(got)}/{len(survivors)} saw it)"
        _log(f"  {cl.system.name} repeat {r + 1}/{repeats}: killed {vname}, all saw it in {shown}")
        cl.start(victim)
        cl.require(cl.converged, REJOIN_TIMEOUT, f"{vname} was not seen alive again")
        time.sleep(SETTLE_S)
    done = [d for d in detect if d is not None]
    return {
        "detect_p50_s": _r(statistics.median(done)) if done else None,
        "detect_p99_s": _r(percentile(done, 99)),
        "detect_first_p50_s": _r(statistics.median(per_agent_first)) if per_agent_first else None,
        "detect_all": [_r(d) for d in detect],
        "detect_missed": len(detect) - len(done),
        "detect_stray_failures": stray_failures,
    }


def _loss_drops(lab: Lab, i: int) -> int:
    """Packets the lab's loss rule dropped in host i: proof the loss was real."""
    argv = ["iptables", "-w", "-t", "raw", "-L", CHAIN_LOSS, "-v", "-x", "-n"]
    res = lab.run(i, argv, capture_output=True, text=True, check=True, timeout=10)
    rows = [line.split() for line in res.stdout.splitlines()[2:]]
    return sum(int(r[0]) for r in rows if r and r[0].isdigit())


def measure_soak(cl: Cluster, seconds: float, loss: float) -> dict[str, Any]:
    hosts = list(cl.lab.hosts)
    t0 = time.monotonic()
    try:
        for i in hosts:
            cl.lab.set_loss(i, loss)
        _log(f"  {cl.system.name} soak: {loss:.0%} UDP loss into every host for {seconds:.0f}s")
        time.sleep(seconds)
        dropped = sum(_loss_drops(cl.lab, i) for i in hosts)
    finally:
        for i in hosts:
            cl.lab.set_loss(i, 0.0)
    t1 = time.monotonic()
    time.sleep(SOAK_GRACE_S)
    until = time.monotonic()
    with cl.cond:
        failed = [ev for a in cl.agents.values() for ev in a.count({FAILED}, t0, until, set())]
        suspect = [ev for a in cl.agents.values() for ev in a.count({SUSPECT}, t0, until, set())]
    recovered = cl.wait(cl.converged, REJOIN_TIMEOUT)
    return {
        "false_positives": len(failed),
        "false_positive_members": sorted({ev.member for ev in failed}),
        "false_suspicions": len(suspect),
        "soak_s": _r(t1 - t0),
        "soak_loss": loss,
        "soak_dropped_packets": dropped,
        "converged_after_soak": recovered,
    }


def _tx_counters(lab: Lab, i: int) -> tuple[int, int]:
    """(bytes, packets) sent by host i's eth0, read inside its namespace."""
    stats = "/sys/class/net/eth0/statistics"
    argv = ["cat", f"{stats}/tx_bytes", f"{stats}/tx_packets"]
    res = lab.run(i, argv, capture_output=True, text=True, check=True, timeout=10)
    nbytes, npackets = (int(w) for w in res.stdout.split())
    return nbytes, npackets


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for pid {pid}")


def measure_idle(cl: Cluster, seconds: float) -> dict[str, Any]:
    """Traffic, memory and CPU of a formed cluster with nothing happening."""
    hosts = list(cl.lab.hosts)
    pids = [a.proc.pid for a in cl.agents.values()]
    tx0 = {i: _tx_counters(cl.lab, i) for i in hosts}
    cpu0 = [_proc_cpu_s(p) for p in pids]
    t0 = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    cpu1 = [_proc_cpu_s(p) for p in pids]
    tx1 = {i: _tx_counters(cl.lab, i) for i in hosts}
    cpu = [(b - a) / elapsed * 100 for a, b in zip(cpu0, cpu1, strict=True)]
    n = len(hosts)
    tx_bytes = sum(tx1[i][0] - tx0[i][0] for i in hosts)
    tx_packets = sum(tx1[i][1] - tx0[i][1] for i in hosts)
    return {
        "bytes_per_member_s": _r(tx_bytes / n / elapsed, 1),
        "packets_per_member_s": _r(tx_packets / n / elapsed, 2),
        "idle_s": _r(elapsed),
        "rss_mb": _r(statistics.median(_proc_rss_mb(p) for p in pids), 1),
        "cpu_pct": _r(statistics.median(cpu), 2),
    }


def run_system(system: System, args: argparse.Namespace) -> dict[str, Any]:
    """One system in a lab of its own, torn down whatever happens."""
    key = base64.b64encode(os.urandom(32)).decode()
    lab = Lab(f"{args.prefix}-{system.name}"[:24], args.subnet)
    cl: Cluster | None = None
    result: dict[str, Any] = {"agents": args.hosts}
    try:
        lab.up(args.hosts, owner_pid=os.getpid())
        cl = Cluster(lab, system, key, args.python)
        _log(f"{system.name}: forming a {args.hosts}-host cluster")
        result["form_s"] = _r(cl.form())
        time.sleep(SETTLE_S)
        _log(f"{system.name}: idle for {args.idle_seconds:.0f}s (traffic, memory, CPU)")
        result.update(measure_idle(cl, args.idle_seconds))
        _log(f"{system.name}: failure detection, {args.repeats} repeats")
        result.update(measure_detection(cl, args.repeats))
        result.update(measure_soak(cl, args.soak_seconds, SOAK_LOSS))
        result["agent_exits"] = cl.exits()
    except (BenchError, LabError, subprocess.SubprocessError, OSError) as exc:
        result["error"] = str(exc)
        _log(f"{system.name}: FAILED: {exc}")
    finally:
        if cl is not None:
            cl.stop()
        lab.down()
    return result


# ----- setup and output --------------------------------------------------------


def ensure_tool(binary: str, package: str) -> None:
    """Install a Debian package when its command is missing."""
    if shutil.which(binary):
        return
    _log(f"{binary} not found: installing Debian package {package}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", package]
    if subprocess.run(cmd, env=env, capture_output=True, timeout=600).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise BenchError(f"apt-get install {package} failed: {res.stderr.strip()[-500:]}")
    if not shutil.which(binary):
        raise BenchError(f"{package} installed but {binary} is still not on PATH")


def _r(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


def _ratio(a: Any, b: Any) -> float | None:
    if not isinstance(a, int | float) or not isinstance(b, int | float) or b == 0:
        return None
    return round(a / b, 3)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


TABLE_ROWS = [
    ("form_s", "cluster formed (s)"),
    ("detect_p50_s", "detect p50 (s)"),
    ("detect_p99_s", "detect p99 (s)"),
    ("detect_first_p50_s", "first detector p50 (s)"),
    ("detect_missed", "detections missed"),
    ("detect_stray_failures", "other failures seen"),
    ("false_positives", "false positives"),
    ("false_suspicions", "suspicions (see doc)"),
    ("soak_dropped_packets", "packets dropped in soak"),
    ("converged_after_soak", "converged after soak"),
    ("bytes_per_member_s", "bytes/member/s"),
    ("packets_per_member_s", "packets/member/s"),
    ("rss_mb", "RSS per agent (MB)"),
    ("cpu_pct", "CPU per agent idle (%)"),
]


def print_table(report: dict[str, Any], systems: Sequence[str]) -> None:
    ratio_of = {
        "detect_p50_s": "detect_p50",
        "detect_p99_s": "detect_p99",
        "bytes_per_member_s": "bytes",
        "rss_mb": "rss",
        "cpu_pct": "cpu",
    }
    cols = [*systems, *(["ratio"] if report["ratios"] else [])]
    print(f"{report['hosts']} hosts, {report['repeats']} repeats")
    print(f"{'':26}" + "".join(f"{c:>12}" for c in cols))
    for key, label in TABLE_ROWS:
        cells = [report[s].get(key, "-") for s in systems]
        if report["ratios"]:
            cells.append(report["ratios"].get(ratio_of.get(key, ""), ""))
        print(f"{label:26}" + "".join(f"{_cell(c):>12}" for c in cells))
    for s in systems:
        if "error" in report[s]:
            print(f"{s} error: {report[s]['error']}")
        if report[s].get("false_positive_members"):
            print(f"{s} falsely failed: {', '.join(report[s]['false_positive_members'])}")
        if report[s].get("agent_exits"):
            print(f"{s} agents that exited on their own: {report[s]['agent_exits']}")
    if report["ratios"]:
        print("ratio: detect = serf/meshd (>1: meshd sooner); costs = meshd/serf (>1: meshd more)")


def _cell(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def ratios(meshd: dict[str, Any], serf: dict[str, Any]) -> dict[str, float | None]:
    """Detection as serf/meshd (above 1: meshd detects sooner); costs as
    meshd/serf (above 1: meshd spends more), as the issue states them."""
    return {
        "detect_p50": _ratio(serf.get("detect_p50_s"), meshd.get("detect_p50_s")),
        "detect_p99": _ratio(serf.get("detect_p99_s"), meshd.get("detect_p99_s")),
        "bytes": _ratio(meshd.get("bytes_per_member_s"), serf.get("bytes_per_member_s")),
        "rss": _ratio(meshd.get("rss_mb"), serf.get("rss_mb")),
        "cpu": _ratio(meshd.get("cpu_pct"), serf.get("cpu_pct")),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=5, help="lab hosts, one agent each (default 5)")
    ap.add_argument("--repeats", type=int, default=10, help="kill/restart rounds (default 10)")
    ap.add_argument("--soak-seconds", type=float, default=120.0, help="lossy soak (default 120)")
    ap.add_argument("--idle-seconds", type=float, default=30.0, help="idle window (default 30)")
    ap.add_argument("--only", choices=SYSTEMS, help="run one system only")
    ap.add_argument("--json", action="store_true", help="last line: one JSON object")
    ap.add_argument("--prefix", default="gvs", help="lab name prefix (default gvs)")
    ap.add_argument(
        "--subnet", default="10.78.0", help="lab subnet, three octets (default 10.78.0)"
    )
    default_py = REPO / ".venv" / "bin" / "python"
    ap.add_argument(
        "--python",
        default=str(default_py) if default_py.exists() else sys.executable,
        help="interpreter that runs python -m gossip (default: the repo's venv)",
    )
    args = ap.parse_args(argv)
    if not 3 <= args.hosts <= 50:
        ap.error("--hosts must be 3..50 (a victim needs two survivors besides the seed)")
    if args.repeats < 1 or args.soak_seconds <= 0 or args.idle_seconds <= 0:
        ap.error("--repeats, --soak-seconds and --idle-seconds must be positive")
    if len(args.prefix) > 18:
        ap.error("--prefix must be at most 18 characters (the lab adds '-meshd')")
    return args


def _on_sigterm(_sig: int, _frame: object) -> None:
    raise KeyboardInterrupt  # runs the same clean-up as Ctrl-C


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        _log("error: needs root (network namespaces)")
        return 1
    signal.signal(signal.SIGTERM, _on_sigterm)
    # A shell starts background jobs with SIGINT ignored; clean up on it anyway.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    systems = [args.only] if args.only else list(SYSTEMS)
    try:
        ensure_tool("iptables", "iptables")
        if "serf" in systems:
            ensure_tool("serf", "serf")
    except BenchError as exc:
        _log(f"error: {exc}")
        return 1
    Lab.reap_stale(args.prefix)
    results: dict[str, dict[str, Any]] = {}
    try:
        for name in systems:
            results[name] = run_system(SYSTEM_DEFS[name], args)
    except KeyboardInterrupt:
        _log("interrupted: labs removed, agents stopped")
        return 130
    report: dict[str, Any] = {
        "hosts": args.hosts,
        "repeats": args.repeats,
        "soak_seconds": args.soak_seconds,
        "idle_seconds": args.idle_seconds,
        **results,
        "ratios": ratios(results["meshd"], results["serf"]) if len(results) == 2 else {},
    }
    print_table(report, systems)
    if args.json:
        print(json.dumps(report, separators=(",", ":")))
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
