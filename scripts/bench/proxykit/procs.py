"""The processes a benchmark starts, each in its own session so it can be ended whole.

Everything started here is remembered until it has been reaped, and
``Procs.close`` ends whatever is left (SIGTERM to the process group, SIGKILL
after a grace period): the harness leaves nothing running, whether it
finishes, fails or is interrupted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "BenchError",
    "Procs",
    "accepts",
    "cpu_shares",
    "cpu_ticks",
    "cpus_of",
    "free_port",
    "group_ticks",
    "others_ticks",
    "ticks_between",
    "wait_until",
]

GRACE_S = 5.0
"""How long a SIGTERMed process group gets before SIGKILL."""


class BenchError(RuntimeError):
    """A measurement could not be made; the message says why."""


def wait_until(pred: Callable[[], object], timeout: float, what: str, step: float = 0.02) -> None:
    """Poll ``pred`` until it is true; a missed deadline is an error naming ``what``."""
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise BenchError(f"{what}: not within {timeout:g}s")
        time.sleep(step)


def free_port() -> int:
    """A TCP port nothing listens on at 127.0.0.1 now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def accepts(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def cpus_of(pid: int) -> set[str]:
    """The CPU lists every thread of ``pid`` may run on (to check a pinning)."""
    lists = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for line in (task / "status").read_text().splitlines():
                if line.startswith("Cpus_allowed_list:"):
                    lists.add(line.split(":", 1)[1].strip())
    return lists


CpuTicks = dict[str, tuple[int, int, int, int]]


def cpu_ticks() -> CpuTicks:
    """Per CPU: (processes, interrupts, steal, total) clock ticks since boot (/proc/stat)."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *fields = line.split()
                user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
                total = user + nice + system + idle + iowait + irq + softirq + steal
                out[name[3:]] = (user + nice + system, irq + softirq, steal, total)
    return out


def cpu_shares(before: CpuTicks, after: CpuTicks) -> dict[str, dict[str, int]]:
    """Per CPU between two readings, in percent: ``busy`` (all but idle), ``procs``
    (processes), ``irq`` (interrupts, where loopback traffic is handled) and ``steal``."""
    out = {}
    for cpu, now in after.items():
        then = before.get(cpu, (0, 0, 0, 0))
        procs, irq, steal, total = (a - b for a, b in zip(now, then, strict=True))
        shares = {"busy": procs + irq + steal, "procs": procs, "irq": irq, "steal": steal}
        out[cpu] = {k: round(100 * v / total) if total > 0 else 0 for k, v in shares.items()}
    return out


def _proc_stats() -> Iterator[tuple[int, list[str]]]:
    """(pid, the fields of /proc/<pid>/stat after the command name) of every live process."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        yield int(entry.name), stat.rsplit(")", 1)[1].split()


def others_ticks(ours: set[int]) -> dict[int, tuple[int, int]]:
    """pid -> (start time, user + system ticks) of every process outside the groups
    ``ours`` (kernel threads excluded): what other programs on the machine use."""
    out = {}
    for pid, fields in _proc_stats():
        # fields[1] is the parent: kthreadd (2) and its children are the kernel's.
        ppid, pgid = int(fields[1]), int(fields[2])
        if pgid in ours or pid == 2 or ppid == 2:
            continue
        out[pid] = (int(fields[19]), int(fields[11]) + int(fields[12]))
    return out


def ticks_between(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> int:
    """Ticks used between two ``others_ticks`` readings (by processes alive at the second)."""
    total = 0
    for pid, (start, ticks) in after.items():
        then = before.get(pid)
        total += ticks - then[1] if then is not None and then[0] == start else ticks
    return total


def group_ticks(pgid: int) -> int:
    """CPU clock ticks (user + system) used so far by the live processes of a group."""
    total = 0
    for _, fields in _proc_stats():
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total


class Procs:
    """Started processes by name, with their logs in ``logs``."""

    def __init__(self, logs: Path, nice: int = 0) -> None:
        self.logs = logs
        self.nice = nice
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cpus: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` (pinned to ``cpus`` when given), output to logs/<name>.log."""
        if name in self.running and self.running[name].poll() is None:
            raise BenchError(f"{name} is already running")
        full = ["taskset", "-c", cpus, *argv] if cpus else list(argv)
        if self.nice:
            full = ["nice", "-n", str(self.nice), *full]
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                full,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        self.running[name] = proc
        return proc

    def check(self, name: str) -> None:
        """Fail with the tail of its log if ``name`` has exited."""
        proc = self.running[name]
        if proc.poll() is not None:
            raise BenchError(f"{name} exited with code {proc.returncode}: {self.tail(name)}")

    def tail(self, name: str, chars: int = 600) -> str:
        try:
            text = (self.logs / f"{name}.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return text[-chars:].strip() or "(empty log)"

    def run(
        self, name: str, argv: Sequence[str], *, cpus: str | None = None, timeout: float
    ) -> str:
        """Run to completion and return its output; killed (an error) after ``timeout``."""
        self.logs.joinpath(f"{name}.log").unlink(missing_ok=True)
        proc = self.start(name, argv, cpus=cpus)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(name)
            raise BenchError(f"{name} still running after {timeout:g}s; killed") from None
        self.stop(name)  # it has exited: this only forgets it
        out = (self.logs / f"{name}.log").read_text(errors="replace")
        if proc.returncode != 0:
            raise BenchError(f"{name} failed with code {proc.returncode}: {out[-600:].strip()}")
        return out

    def stop(self, name: str, grace: float = GRACE_S) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace``; forget it."""
        proc = self.running.pop(name, None)
        if proc is None:
            return
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=grace)
        # Children that outlived their leader (nginx workers) share its group.
        _signal_group(proc.pid, signal.SIGKILL)

    def close(self) -> None:
        """End everything still known, most recent first."""
        for name in reversed(list(self.running)):
            with contextlib.suppress(Exception):
                self.stop(name)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _stop(_sig: int, _frame: object) -> None:
    raise KeyboardInterrupt


def bench_main(
    prefix: str,
    measure: Callable[[Path], dict[str, Any]],
    show: Callable[[dict[str, Any]], None],
    *,
    keep: bool,
    as_json: bool,
) -> int:
    """A benchmark's outer shell: SIGTERM and SIGHUP stop it like Ctrl-C (its
    ``measure`` cleans up on the way out), its work dir goes unless ``keep``,
    errors become an exit status; the report is printed as a table or JSON."""
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, _stop)
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        report = measure(workdir)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130
    finally:
        if keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if as_json:
        print(json.dumps(report, separators=(",", ":")))
    else:
        show(report)
    return 0
