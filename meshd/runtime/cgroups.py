"""cgroup v2 limits for process-driver replicas.

Each replica gets a leaf ``<root>/meshd/<owner>/<replica>``: limits are
written there before the replica starts and the replica joins it first thing
(its wrapper shell writes its own pid to ``cgroup.procs``), so even its first
allocation is charged to it. The leaf also gives the driver a precise way to
kill every process of a replica (``cgroup.kill``) and to tell an OOM kill from
any other SIGKILL (``memory.events``).

cgroup v2 lets a group hold processes or delegate controllers to children,
not both, so only leaves hold processes; ``meshd`` and ``<owner>`` just pass
the cpu and memory controllers down. Anything here fails with
``CgroupError``; the driver then runs replicas without limits.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
from pathlib import Path

__all__ = [
    "CONTROLLERS",
    "CPU_PERIOD_US",
    "DEFAULT_ROOT",
    "CgroupError",
    "Cgroups",
    "is_cgroup2",
    "kill",
    "oom_kills",
    "remove",
]

DEFAULT_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("cpu", "memory")
CPU_PERIOD_US = 100_000
CPU_MIN_QUOTA_US = 1_000
"""The kernel refuses quotas below 1 ms per period."""

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class CgroupError(Exception):
    """The cgroup tree cannot be used; the message says why (one line)."""


def is_cgroup2(root: Path) -> bool:
    """A cgroup v2 mount has ``cgroup.controllers`` at its top (v1 and hybrid tmpfs do not)."""
    return (root / "cgroup.controllers").is_file()


def _component(name: str) -> str:
    """A name as one safe path component (node names are free text)."""
    safe = _UNSAFE.sub("_", name)
    return safe if safe not in ("", ".", "..") else "_"


def _write(path: Path, text: str) -> None:
    # One write() per value: cgroupfs parses each write separately.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


class Cgroups:
    """The owner's subtree ``<root>/meshd/<owner>`` and its replica leaves."""

    def __init__(self, root: Path, owner: str) -> None:
        self.root = root
        self.base = root / "meshd" / _component(owner)
        self.controllers: tuple[str, ...] = ()

    def prepare(self) -> None:
        """Create the subtree and pass the cpu/memory controllers down to leaves."""
        if not is_cgroup2(self.root):
            raise CgroupError(f"{self.root} is not a cgroup v2 mount")
        try:
            available = (self.root / "cgroup.controllers").read_text().split()
        except OSError as exc:
            raise CgroupError(
                f"cannot read {self.root}/cgroup.controllers: {exc.strerror}"
            ) from exc
        wanted = [c for c in CONTROLLERS if c in available]
        if not wanted:
            raise CgroupError(f"{self.root} offers neither the cpu nor the memory controller")
        chain = [self.root, self.root / "meshd", self.base]
        try:
            for group in chain[1:]:
                group.mkdir(exist_ok=True)
        except OSError as exc:
            raise CgroupError(f"cannot create {group}: {exc.strerror}") from exc
        enabled: list[str] = []
        for controller in wanted:
            try:
                for group in chain:
                    self._enable(group, controller)
            except OSError:
                continue
            enabled.append(controller)
        if not enabled:
            raise CgroupError(f"cannot enable the cpu or memory controller below {self.root}")
        self.controllers = tuple(enabled)

    @staticmethod
    def _enable(group: Path, controller: str) -> None:
        control = group / "cgroup.subtree_control"
        with contextlib.suppress(OSError):
            if controller in control.read_text().split():
                return
        _write(control, f"+{controller}")

    def leaf(self, replica_id: str) -> Path:
        return self.base / _component(replica_id)

    def create(self, replica_id: str, cpu: float | None, memory_mb: int | None) -> Path:
        """The replica's leaf with its limits written; an old leaf is reused."""
        path = self.leaf(replica_id)
        try:
            path.mkdir(exist_ok=True)
            if "cpu" in self.controllers:
                if cpu is None:
                    _write(path / "cpu.max", f"max {CPU_PERIOD_US}")
                else:
                    quota = max(CPU_MIN_QUOTA_US, round(cpu * CPU_PERIOD_US))
                    _write(path / "cpu.max", f"{quota} {CPU_PERIOD_US}")
            if "memory" in self.controllers:
                limit = "max" if memory_mb is None else str(memory_mb * 1024 * 1024)
                _write(path / "memory.max", limit)
        except OSError as exc:
            raise CgroupError(f"cannot set limits in {path}: {exc.strerror}") from exc
        return path


def oom_kills(path: Path) -> int:
    """How many processes the OOM killer took in this group (0 if unknown)."""
    try:
        text = (path / "memory.events").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def kill(path: Path) -> None:
    """SIGKILL every process in the group; ``cgroup.kill`` when the kernel has it (5.14+)."""
    if (path / "cgroup.kill").exists():
        with contextlib.suppress(OSError):
            _write(path / "cgroup.kill", "1")
            return
    if not (path / "cgroup.controllers").exists():
        return  # not a live cgroup (gone, or not cgroupfs): its pid list means nothing
    try:
        pids = (path / "cgroup.procs").read_text().split()
    except OSError:
        return
    for pid in pids:
        with contextlib.suppress(ValueError, OSError):
            os.kill(int(pid), signal.SIGKILL)


def remove(path: Path) -> bool:
    """rmdir the leaf (never rmtree: cgroupfs control files cannot be unlinked)."""
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True
