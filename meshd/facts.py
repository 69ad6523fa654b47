"""What a node publishes about itself: capacity, labels, version and runtime driver.

The agent collects its facts at start (``collect_facts``, blocking for up to a
few seconds: run it in a thread) and publishes them in its gossip member
metadata, so every node knows every other node's capacity without asking.
That metadata holds at most ``gossip.wire.META_MAX`` (512) bytes, so
``encode_meta`` writes compact msgpack: one-letter keys, sizes in whole MiB,
GPU names listed once and UUIDs as 16 raw bytes.

When the full facts do not fit, ``encode_meta`` leaves out, in this order,
until they do:

1. GPU UUIDs: placement needs GPU count and memory; the node's own API still
   shows the UUIDs.
2. Labels, lowest priority first. Priority is the order the operator gave
   them (command line, then environment, then config file, each as written),
   and a prefix of that order is kept: no label is published while one before
   it is left out. The metadata says how many were left out.
3. Extra disks, the last configured first (the data dir's disk stays).

What is left -- CPU, memory, the data dir's disk, GPUs, version, driver -- is
the minimum; only if that does not fit does ``encode_meta`` raise ValueError.

``decode_meta`` reads metadata from any member, of any version: it never
raises (garbage gives None) and ignores keys it does not know, so a newer
agent can add facts without breaking older ones.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from gossip.wire import META_MAX

from . import __version__
from .config import AgentConfig

MIB = 1 << 20
META_FORMAT = 1
"""Bumped only for changes old readers would misread; new keys need no bump."""

NVIDIA_SMI = (
    "nvidia-smi",
    "--query-gpu=index,name,memory.total,uuid",
    "--format=csv,noheader,nounits",
)
NVIDIA_SMI_TIMEOUT = 5.0
"""nvidia-smi can hang on a wedged driver; the agent must start anyway."""

MAX_GPUS = 64
MAX_TEXT = 128
"""Longest GPU name or UUID taken from nvidia-smi: anything longer is not a real one."""

DOCKER_SOCKET = "/var/run/docker.sock"
_MAX_INT = 1 << 53  # sizes beyond this are nonsense (and lose precision in JSON)


@dataclass(frozen=True)
class Disk:
    path: str
    total_mb: int
    free_mb: int


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_mb: int
    uuid: str | None = None
    """None when unknown or left out of the metadata to save room."""


@dataclass(frozen=True)
class NodeFacts:
    """A node's capacity and identity beyond its name and address. Sizes are MiB."""

    cpu_cores: int
    memory_mb: int
    disks: tuple[Disk, ...] = ()
    """The data dir's disk first, then the configured ones."""
    gpus: tuple[Gpu, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    version: str = __version__
    driver: str = "process"
    """How workloads run here: "docker" when a Docker engine answers, else "process"."""
    warnings: tuple[str, ...] = ()
    """Why a fact is missing (nvidia-smi failed...); local only, never in the metadata."""
    labels_dropped: int = 0
    disks_dropped: int = 0
    """How many labels and disks the sender's metadata had no room for."""

    def to_json(self) -> dict[str, Any]:
        """The API's view: memory in MiB as ``*_mb``, disks in GiB as ``*_gb``."""
        return {
            "capacity": {
                "cpu_cores": self.cpu_cores,
                "memory_mb": self.memory_mb,
                "disk": {
                    d.path: {
                        "total_gb": round(d.total_mb / 1024, 2),
                        "free_gb": round(d.free_mb / 1024, 2),
                    }
                    for d in self.disks
                },
                "gpus": [
                    {"index": g.index, "name": g.name, "memory_mb": g.memory_mb, "uuid": g.uuid}
                    for g in self.gpus
                ],
            },
            "labels": dict(self.labels),
            "version": self.version,
            "driver": self.driver,
            "warnings": list(self.warnings),
            "labels_dropped": self.labels_dropped,
            "disks_dropped": self.disks_dropped,
        }


# ----- collecting -----------------------------------------------------------------


Runner = Callable[..., subprocess.CompletedProcess[str]]


def collect_facts(
    config: AgentConfig,
    *,
    runner: Runner = subprocess.run,
    docker_probe: Callable[[], bool] | None = None,
    cpu_count: Callable[[], int] | None = None,
    memory_total: Callable[[], int] | None = None,
    disk_usage: Callable[[str], Any] = shutil.disk_usage,
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    self_cgroup: Path = Path("/proc/self/cgroup"),
) -> NodeFacts:
    """This node's facts. Each probe is a parameter so tests need no GPU, Docker or cgroup."""
    warnings: list[str] = []
    cpu_limit, memory_limit = cgroup_limits(cgroup_root, self_cgroup)
    cores = (cpu_count or _cpu_count)()
    if cpu_limit is not None:
        cores = min(cores, max(1, math.floor(cpu_limit)))
    memory = (memory_total or _memory_total)()
    if memory_limit is not None:
        memory = min(memory, memory_limit)

    disks: list[Disk] = []
    seen: set[str] = set()
    for i, path in enumerate((config.data_dir, *config.disks)):
        if str(path) in seen:
            continue
        seen.add(str(path))
        # The data dir may not exist before the first start: measure where it will be.
        target = _existing_ancestor(path) if i == 0 else path
        try:
            usage = disk_usage(str(target))
        except OSError as exc:
            warnings.append(f"disk {path}: {exc.strerror or exc}")
            continue
        disks.append(Disk(str(path), usage.total // MIB, usage.free // MIB))

    gpus, gpu_warning = nvidia_gpus(runner)
    if gpu_warning:
        warnings.append(gpu_warning)

    try:
        driver = "docker" if (docker_probe or docker_answers)() else "process"
    except Exception as exc:  # a broken probe must not stop the agent
        driver = "process"
        warnings.append(f"docker probe failed: {exc}")

    return NodeFacts(
        cpu_cores=max(1, cores),
        memory_mb=memory // MIB,
        disks=tuple(disks),
        gpus=gpus,
        labels=dict(config.labels),
        version=__version__,
        driver=driver,
        warnings=tuple(warnings),
    )


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the CPUs this process may run on
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _memory_total() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def _existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def cgroup_limits(root: Path, self_cgroup: Path) -> tuple[float | None, int | None]:
    """(CPUs, memory bytes) this process's cgroup allows, None where there is no limit.

    The limits bind the agent and the processes it starts. cgroup v2: the
    tightest of our group and its ancestors (in a container with its own
    cgroup namespace, that is the container's). cgroup v1: the mounted
    hierarchy's root, which is the container's own group.
    """
    cpus: list[float] = []
    memory: list[int] = []
    group = None
    try:
        for line in self_cgroup.read_text().splitlines():
            if line.startswith("0::"):
                group = line[3:].strip()
    except OSError:
        pass
    if group is not None and (root / "cgroup.controllers").exists():
        current = root / group.lstrip("/")
        for directory in (current, *current.parents):
            if not directory.is_relative_to(root):
                break
            text = _read(directory / "memory.max")
            if text and text.isdigit():
                memory.append(int(text))
            parts = (_read(directory / "cpu.max") or "").split()
            if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit() and int(parts[1]):
                cpus.append(int(parts[0]) / int(parts[1]))
    else:
        text = _read(root / "memory" / "memory.limit_in_bytes")
        if text and text.isdigit():
            memory.append(int(text))
        quota = _read(root / "cpu" / "cpu.cfs_quota_us")
        period = _read(root / "cpu" / "cpu.cfs_period_us")
        if quota and period and quota.isdigit() and period.isdigit() and int(period):
            cpus.append(int(quota) / int(period))  # "-1" (no quota) is not all digits
    return (min(cpus) if cpus else None, min(memory) if memory else None)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def nvidia_gpus(runner: Runner = subprocess.run) -> tuple[tuple[Gpu, ...], str | None]:
    """GPUs as nvidia-smi lists them, and a warning when it is there but fails.

    No nvidia-smi is the normal case (no warning). Output that does not parse
    as a whole gives no GPUs: reporting half a machine would mislead placement.
    """
    try:
        out = runner(
            list(NVIDIA_SMI),
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        return (), None
    except subprocess.TimeoutExpired:
        return (), f"nvidia-smi: no answer within {NVIDIA_SMI_TIMEOUT:g} s; no GPUs reported"
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        return (), f"nvidia-smi: cannot run: {exc}; no GPUs reported"
    if out.returncode != 0:
        said = _first_line(out.stderr) or _first_line(out.stdout) or "no message"
        return (), f"nvidia-smi: exit status {out.returncode}: {said}; no GPUs reported"
    gpus: list[Gpu] = []
    for number, line in enumerate(str(out.stdout or "").splitlines(), 1):
        if not line.strip():
            continue
        gpu = _parse_gpu_line(line)
        if gpu is None:
            return (), f"nvidia-smi: unexpected output on line {number}: {line[:80]!r}"
        gpus.append(gpu)
    if len(gpus) > MAX_GPUS:
        return (), f"nvidia-smi: {len(gpus)} GPUs listed, more than {MAX_GPUS}; none reported"
    return tuple(gpus), None


def _parse_gpu_line(line: str) -> Gpu | None:
    # index, name, memory.total (MiB), uuid; a name could hold a comma, so take the ends.
    parts = [p.strip() for p in line.split(",")]
    if len(parts) < 4:
        return None
    index, memory, uuid = parts[0], parts[-2], parts[-1]
    name = ", ".join(parts[1:-2])
    if not index.isdigit() or not name or len(name) > MAX_TEXT:
        return None
    if memory.isdigit():
        memory_mb = int(memory)
    elif memory.strip("[]").upper() == "N/A":  # unified-memory boards report no total
        memory_mb = 0
    else:
        return None
    if not uuid or len(uuid) > MAX_TEXT or not uuid.isprintable():
        return None
    return Gpu(int(index), name, memory_mb, uuid)


def _first_line(text: str | None) -> str:
    lines = str(text or "").strip().splitlines()
    return lines[0][:120] if lines else ""


def docker_answers(socket_path: str | None = None, timeout: float = 1.0) -> bool:
    """Whether a Docker engine answers a ping on its local socket."""
    path = socket_path or _docker_socket_path()
    if path is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            reply = b""
            while b"\r\n" not in reply and len(reply) < 1024:
                chunk = sock.recv(1024)
                if not chunk:
                    break
                reply += chunk
    except OSError:
        return False
    status = reply.split(b"\r\n", 1)[0].split()
    return len(status) >= 2 and status[0].startswith(b"HTTP/1.") and status[1] == b"200"


def _docker_socket_path() -> str | None:
    host = os.environ.get("DOCKER_HOST", "")
    if host.startswith("unix://"):
        return host[len("unix://") :]
    return DOCKER_SOCKET if not host else None  # a TCP engine is not probed here


# ----- gossip metadata ---------------------------------------------------------------


def encode_meta(facts: NodeFacts, limit: int = META_MAX) -> bytes:
    """Compact msgpack of the facts within ``limit`` bytes, cut as the module says."""
    labels = list(facts.labels.items())
    extra = len(facts.disks[1:])
    has_uuids = any(g.uuid for g in facts.gpus)
    attempts = [(True, len(labels), extra)] if has_uuids else []
    attempts += [(False, n, extra) for n in range(len(labels), -1, -1)]
    attempts += [(False, 0, n) for n in range(extra - 1, -1, -1)]
    for uuids, n_labels, n_extra in attempts:
        data = _pack(facts, uuids, labels[:n_labels], n_extra)
        if len(data) <= limit:
            return data
    raise ValueError(
        f"node facts need {len(data)} bytes of gossip metadata even without labels, "
        f"GPU UUIDs and extra disks; the limit is {limit}"
    )


def _pack(facts: NodeFacts, uuids: bool, labels: list[tuple[str, str]], n_extra: int) -> bytes:
    meta: dict[str, Any] = {
        "f": META_FORMAT,
        "s": facts.version,
        "r": facts.driver,
        "c": facts.cpu_cores,
        "m": facts.memory_mb,
    }
    disks = facts.disks[: 1 + n_extra]
    if disks:
        meta["d"] = [[d.path, d.total_mb, d.free_mb] for d in disks]
    if facts.gpus:
        names = list(dict.fromkeys(g.name for g in facts.gpus))
        meta["n"] = names
        meta["g"] = [
            [g.index, names.index(g.name), g.memory_mb, _uuid_bytes(g.uuid) if uuids else None]
            for g in facts.gpus
        ]
    if labels:
        meta["l"] = dict(labels)
    dropped_labels = len(facts.labels) - len(labels) + facts.labels_dropped
    if dropped_labels:
        meta["xl"] = dropped_labels
    dropped_disks = len(facts.disks) - len(disks) + facts.disks_dropped
    if dropped_disks:
        meta["xd"] = dropped_disks
    return msgpack.packb(meta, use_bin_type=True)


def _uuid_bytes(uuid: str | None) -> bytes | str | None:
    """NVIDIA's "GPU-8-4-4-4-12" hex form as 16 bytes; anything else as it is."""
    if uuid is None:
        return None
    if uuid.startswith("GPU-"):
        digits = uuid[4:].replace("-", "")
        if len(digits) == 32 and uuid[4:] == _dashed(digits):
            try:
                return bytes.fromhex(digits)
            except ValueError:
                pass
    return uuid


def _dashed(hexdigits: str) -> str:
    h = hexdigits
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class _Bad(Exception):
    """Metadata that is not valid facts."""


def decode_meta(data: bytes) -> NodeFacts | None:
    """Facts from a member's metadata, or None if it holds none (or garbage)."""
    try:
        meta = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, use_list=True)
    except Exception:  # any byte string at all may arrive here
        return None
    try:
        return _facts_from(meta)
    except _Bad:
        return None


def _facts_from(meta: Any) -> NodeFacts:
    if not isinstance(meta, dict):
        raise _Bad
    if _int(meta.get("f"), 1 << 16) < 1:
        raise _Bad
    disks = []
    for item in _list(meta.get("d", [])):
        path, total, free = _items(item, 3)
        disks.append(Disk(_text(path), _int(total), _int(free)))
    names = [_text(n) for n in _list(meta.get("n", []))]
    gpus = []
    for item in _list(meta.get("g", [])):
        index, name, memory, uuid = _items(item, 4)
        gpus.append(
            Gpu(
                _int(index, 1 << 16),
                names[_int(name, len(names) - 1)],
                _int(memory),
                _uuid_text(uuid),
            )
        )
    raw_labels = meta.get("l", {})
    if not isinstance(raw_labels, dict):
        raise _Bad
    labels = {_text(k): _text(v, allow_empty=True) for k, v in raw_labels.items()}
    return NodeFacts(
        cpu_cores=_int(meta.get("c"), 1 << 20),
        memory_mb=_int(meta.get("m")),
        disks=tuple(disks),
        gpus=tuple(gpus),
        labels=labels,
        version=_text(meta.get("s")),
        driver=_text(meta.get("r")),
        labels_dropped=_int(meta.get("xl", 0), 1 << 16),
        disks_dropped=_int(meta.get("xd", 0), 1 << 16),
    )


def _int(value: Any, high: int = _MAX_INT) -> int:
    if type(value) is not int or not 0 <= value <= high:
        raise _Bad
    return value


def _text(value: Any, *, allow_empty: bool = False) -> str:
    # No length limit: gossip bounds the whole metadata.
    if type(value) is not str or not (value or allow_empty):
        raise _Bad
    return value


def _list(value: Any) -> list[Any]:
    if type(value) is not list:
        raise _Bad
    return value


def _items(value: Any, n: int) -> list[Any]:
    # A newer sender may append fields to an entry; the first n are ours.
    items = _list(value)
    if len(items) < n:
        raise _Bad
    return items[:n]


def _uuid_text(value: Any) -> str | None:
    if value is None:
        return None
    if type(value) is bytes and len(value) == 16:
        return "GPU-" + _dashed(value.hex())
    return _text(value)
