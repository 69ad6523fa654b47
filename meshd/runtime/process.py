"""The process driver: replicas as plain processes, for hosts without Docker.

State. Everything about a replica lives in ``<state_dir>/<replica_id>/``:

- ``spec.json``: the LaunchSpec and the owner (node name). Several agents may
  share one state dir; each lists only its own replicas.
- ``pid.json``: the pid, its start time in clock ticks after boot (field 22 of
  ``/proc/<pid>/stat``: a recycled pid has another start time, so it is never
  taken for ours), wall-clock start, cgroup leaf.
- ``stdout.log``, ``stderr.log``: the replica's output, appended.
- ``exit``: the exit code, written by the replica's wrapper when it ends.
- ``result.json``: how it ended, as the driver saw it (code, time, reason).
- ``work/``: the replica's working directory.

Adoption. A replica runs in its own session, so it outlives the agent. It runs
under a tiny ``/bin/sh`` wrapper that records ``$?`` in ``exit`` when the
command ends; a restarted agent, which is not the parent and so cannot
wait() for it, still learns its exit code. The wrapper costs one small shell
process per replica and nothing else. Stopping signals every process of the
replica's process group except the wrapper (found in /proc), which lives on
to record the code. (A
wrapper that trapped SIGTERM instead would pass its handler to the command's
process between fork and exec, where a SIGTERM is silently swallowed.)

Exit codes follow the shell: a command killed by signal N exits 128+N (SIGKILL
gives 137, SIGTERM 143), and ``error`` then names the signal, or says "out of
memory" when the cgroup counted an OOM kill. A code above 128 that the program
chose itself is reported the same way: the shell cannot tell them apart. If
the wrapper itself was killed (a SIGKILL to the whole group) the code comes
from wait() when this driver is the parent, or from the stop that killed it;
otherwise it is unknown (``exit_code`` None).

Exits are seen through pidfds on the event loop (no polling), which work for
adopted processes too. When a replica's main process ends, whatever it left
behind in its process group (or cgroup) is killed: a replica's processes end
with it, as in a container.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from . import cgroups
from .base import (
    DriverError,
    DriverUnavailable,
    Instance,
    LaunchSpec,
    Listener,
    LogLine,
    PortBinding,
)

__all__ = ["ProcessDriver"]

log = logging.getLogger(__name__)

STATE_FORMAT = 1
SPEC_FILE = "spec.json"
PID_FILE = "pid.json"
EXIT_FILE = "exit"
RESULT_FILE = "result.json"
STDOUT_LOG = "stdout.log"
STDERR_LOG = "stderr.log"
WORK_DIR = "work"

EXEC_OUTPUT_MAX = 4096
MAX_LOG_BYTES = 16 * 1024 * 1024
"""A replica's stdout or stderr log past this is rotated (copy to ``.1``, then
truncate): two generations per stream bound a chatty replica's disk use."""
LOG_ROTATE_INTERVAL = 10.0
"""How often log sizes are checked."""
LOG_POLL = 0.1
"""Seconds between size checks when following logs."""
LOG_CHUNK = 64 * 1024
MAX_LINE = 64 * 1024
"""A line longer than this is cut into pieces rather than held in memory."""
KILL_WAIT = 5.0
"""How long a SIGKILLed replica may take to be gone before stop gives up."""
BASE_ENV = ("PATH", "HOME", "LANG")
"""The agent's variables a replica inherits; everything else comes from its spec."""
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""PATH when the agent has none (the one sh would use, so lookups agree)."""
SH = "/bin/sh"

# $1 work dir, $2 exit file, $3 cgroup.procs ("" for none), then the command.
WRAPPER = (
    "w=$1 x=$2 c=$3; shift 3\n"
    '[ -z "$c" ] || { echo $$ >"$c"; } 2>/dev/null'
    ' || echo "meshd: cannot join cgroup; running without limits" >&2\n'
    'cd -- "$w" && "$@"\n'
    'echo $? >"$x"\n'
)

# Python ignores these; a replica must start with the defaults.
_DEFAULT_SIGNALS = (
    signal.SIGPIPE,
    signal.SIGXFSZ,
    signal.SIGHUP,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTERM,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGCHLD,
)

_REPLICA_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True, slots=True)
class _Proc:
    """What pid.json holds: enough to recognise the process later."""

    pid: int
    start: int
    started_at: float
    cgroup: str | None = None
    oom_base: int = 0


@dataclass(slots=True)
class _Watch:
    pid: int
    fd: int


# ----- /proc -----------------------------------------------------------------


def _stat_fields(pid: int) -> list[bytes]:
    """Fields 3 on of /proc/<pid>/stat (state, ppid, pgrp...); [] if no such process."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except OSError:
        return []
    try:
        raw = os.read(fd, 4096)
    except OSError:
        return []
    finally:
        os.close(fd)
    # comm (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    return raw[raw.rfind(b")") + 2 :].split()


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in ticks), or None if there is no such process."""
    fields = _stat_fields(pid)
    try:
        return fields[0].decode("ascii", "replace"), int(fields[19])
    except (IndexError, ValueError):
        return None


def _pgrp(pid: int) -> int | None:
    try:
        return int(_stat_fields(pid)[2])
    except (IndexError, ValueError):
        return None


def _signal_group_but_leader(pgid: int, sig: int) -> None:
    """Signal the members of process group ``pgid`` other than its leader, or
    the leader when it is alone (the command not yet forked: then the wrapper
    dies before starting it)."""
    members = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != pgid and _pgrp(int(name)) == pgid:
            members.append(int(name))
    for pid in members or [pgid]:
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            # Checked through the pidfd's process: a pid recycled since the scan is left alone.
            if _pgrp(pid) == pgid:
                signal.pidfd_send_signal(fd, sig)
        except OSError:
            pass
        finally:
            os.close(fd)


def _is_running(proc: _Proc) -> bool:
    stat = _proc_stat(proc.pid)
    return stat is not None and stat[1] == proc.start and stat[0] not in ("Z", "X")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _error_for(code: int | None, oom: bool) -> str | None:
    if oom:
        return "out of memory"
    if code is not None and 128 < code < 128 + signal.NSIG:
        return f"killed by {_signal_name(code - 128)}"
    return None


# ----- state files -----------------------------------------------------------


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    """Atomic replace, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, separators=(",", ":")))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any]:
    doc = json.loads(path.read_text())
    if not isinstance(doc, dict):
        raise ValueError(f"{path.name} is not an object")
    return doc


def _strs(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} is not a list of strings")
    return tuple(value)


def _str_map(value: Any, what: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError(f"{what} is not a map of strings")
    return dict(value)


def _typed(
    doc: dict[str, Any], key: str, kind: type | tuple[type, ...], optional: bool = False
) -> Any:
    value = doc.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{key} is missing or of the wrong type")
    return value


def _spec_doc(spec: LaunchSpec, owner: str) -> dict[str, Any]:
    doc = dataclasses.asdict(spec)
    doc["owner"] = owner
    doc["format"] = STATE_FORMAT
    return doc


def _spec_from_doc(doc: dict[str, Any]) -> tuple[str, LaunchSpec]:
    """(owner, spec); ValueError when anything is missing or mistyped."""
    raw_ports = doc.get("ports", [])
    if not isinstance(raw_ports, list) or not all(isinstance(p, dict) for p in raw_ports):
        raise ValueError("ports is not a list of objects")
    ports = []
    for p in raw_ports:
        ports.append(
            PortBinding(
                name=_typed(p, "name", str),
                target=_typed(p, "target", int),
                host_port=_typed(p, "host_port", int),
                protocol=_typed(p, "protocol", str),
            )
        )
    command = doc.get("command")
    cpu = _typed(doc, "cpu", (int, float), optional=True)
    spec = LaunchSpec(
        replica_id=_typed(doc, "replica_id", str),
        service=_typed(doc, "service", str),
        slot=_typed(doc, "slot", int),
        version=_typed(doc, "version", str),
        image=_typed(doc, "image", str, optional=True),
        command=None if command is None else _strs(command, "command"),
        args=_strs(doc.get("args", []), "args"),
        env=_str_map(doc.get("env", {}), "env"),
        ports=tuple(ports),
        cpu=None if cpu is None else float(cpu),
        memory_mb=_typed(doc, "memory_mb", int, optional=True),
        gpus=_typed(doc, "gpus", int) if "gpus" in doc else 0,
        labels=_str_map(doc.get("labels", {}), "labels"),
        dns=_strs(doc.get("dns", []), "dns"),
        dns_search=_strs(doc.get("dns_search", []), "dns_search"),
    )
    return _typed(doc, "owner", str), spec


def _proc_from_doc(doc: dict[str, Any]) -> _Proc:
    pid = _typed(doc, "pid", int)
    if pid <= 0:
        raise ValueError("pid is not positive")
    return _Proc(
        pid=pid,
        start=_typed(doc, "start", int),
        started_at=float(_typed(doc, "started_at", (int, float))),
        cgroup=_typed(doc, "cgroup", str, optional=True),
        oom_base=_typed(doc, "oom_base", int) if "oom_base" in doc else 0,
    )


def _read_exit(path: Path) -> tuple[int, float] | None:
    """(code, when) from the wrapper's exit file, None if absent or garbled."""
    try:
        text = path.read_text()
        when = path.stat().st_mtime
        return int(text.strip()), when
    except (OSError, ValueError):
        return None


# ----- logs ------------------------------------------------------------------


def _tail_offset(path: Path, lines: int) -> int:
    """Where the last ``lines`` lines of the file begin (a final partial line counts)."""
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below)
    except OSError:
        return 0
    with f:
        end = f.seek(0, os.SEEK_END)
        if lines <= 0:
            return end
        found = 0
        hi = end - 1  # a newline in the last byte ends the last line; it starts none
        while hi > 0:
            lo = max(0, hi - LOG_CHUNK)
            f.seek(lo)
            block = f.read(hi - lo)
            idx = len(block)
            while (idx := block.rfind(b"\n", 0, idx)) >= 0:
                found += 1
                if found == lines:
                    return lo + idx + 1
            hi = lo
        return 0


class _LogFile:
    """Reads one log file from an offset on, line by line, across appends."""

    def __init__(self, path: Path, stream: Literal["stdout", "stderr"]) -> None:
        self.path = path
        self.stream: Literal["stdout", "stderr"] = stream
        self.offset = 0
        self.pending = b""

    def mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return time.time()

    def read(self) -> tuple[list[bytes], int]:
        """Complete lines from one chunk of new data, and how many bytes were read."""
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < self.offset:  # truncated: start over
                    self.offset, self.pending = 0, b""
                f.seek(self.offset)
                data = f.read(min(size - self.offset, LOG_CHUNK))
        except OSError:
            return [], 0
        self.offset += len(data)
        parts = (self.pending + data).split(b"\n")
        self.pending = parts.pop()
        while len(self.pending) > MAX_LINE:
            parts.append(self.pending[:MAX_LINE])
            self.pending = self.pending[MAX_LINE:]
        return parts, len(data)

    def flush(self) -> list[bytes]:
        rest, self.pending = self.pending, b""
        return [rest] if rest else []


# ----- the driver ------------------------------------------------------------


class ProcessDriver:
    """Replicas as processes in their own sessions, with state on disk.

    ``cgroup_root`` None means /sys/fs/cgroup when it is a cgroup v2 mount;
    when no usable cgroup v2 tree is found, replicas run without cpu and
    memory limits and ``warning`` says why (logged once).
    """

    name = "process"

    def __init__(
        self,
        state_dir: Path,
        *,
        owner: str,
        cgroup_root: Path | None = None,
        stop_timeout: float = 10.0,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.owner = owner
        self.stop_timeout = stop_timeout
        self.warning: str | None = None
        self._cgroup_root = cgroup_root if cgroup_root is not None else cgroups.DEFAULT_ROOT
        self._cgroups: cgroups.Cgroups | None = None
        self._cgroups_tried = False
        self._listener: Listener | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watches: dict[str, _Watch] = {}
        self._damaged: set[Path] = set()
        self._killed: set[str] = set()
        """Replicas our stop SIGKILLed: their wrapper died before writing a code."""
        self._rotator: asyncio.Task[None] | None = None
        self.max_log_bytes = MAX_LOG_BYTES

    # -- lifecycle --

    async def start(self, on_change: Listener) -> None:
        if not hasattr(os, "pidfd_open"):
            raise DriverUnavailable("the process driver needs pidfd_open (Linux 5.3 or later)")
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DriverUnavailable(
                f"cannot use state dir {self.state_dir}: {exc.strerror}"
            ) from exc
        self._loop = asyncio.get_running_loop()
        self._listener = on_change
        for rid in self._owned_ids():
            proc = self._read_proc(rid)
            if proc is None or rid in self._watches:
                continue
            if _is_running(proc):
                self._watch(rid, proc)
            elif not self._recorded(rid, proc):
                # Ended while no agent watched: record it, reap it if ours, kill leftovers.
                self._settle(rid, proc)
        self._rotator = self._loop.create_task(self._rotate_logs_forever())

    async def _rotate_logs_forever(self) -> None:
        while True:
            await asyncio.sleep(LOG_ROTATE_INTERVAL)
            try:
                await asyncio.to_thread(self.rotate_logs)
            except Exception:
                log.exception("log rotation failed")

    def rotate_logs(self) -> int:
        """Rotate every log of this owner's replicas past ``max_log_bytes``
        (copy, then truncate in place: the replica keeps its open file, which
        is in append mode, so it writes on at the start). Lines written
        between the copy and the truncation are lost, as with logrotate's
        copytruncate. Returns how many files were rotated."""
        rotated = 0
        for rid in self._owned_ids():
            for name in (STDOUT_LOG, STDERR_LOG):
                path = self.state_dir / rid / name
                try:
                    if path.stat().st_size <= self.max_log_bytes:
                        continue
                    shutil.copyfile(path, path.with_name(name + ".1"))
                    os.truncate(path, 0)
                    rotated += 1
                except OSError as exc:
                    log.warning("cannot rotate %s: %s", path, exc)
        return rotated

    async def close(self) -> None:
        if self._rotator is not None:
            self._rotator.cancel()
            self._rotator = None
        for rid in list(self._watches):
            self._unwatch(rid)
        self._listener = None
        self._loop = None

    # -- queries --

    async def list(self) -> list[Instance]:
        out = []
        for rid in self._replica_dirs():
            inst = self._inspect(rid)  # None for other owners' and damaged ones
            if inst is not None:
                out.append(inst)
        return out

    # -- run / stop / remove --

    async def run(self, spec: LaunchSpec) -> Instance:
        rid = self._check_id(spec.replica_id)
        if not spec.command:
            raise DriverError(f"replica {rid}: the process driver needs a command")
        d = self._dir(rid)
        if d.exists():
            owner, _ = self._load(rid, strict=False)
            if owner is not None and owner != self.owner:
                raise DriverError(f"replica {rid} belongs to node {owner}")
            proc = self._read_proc(rid)
            if proc is not None and _is_running(proc):
                raise DriverError(f"replica {rid} is already running (pid {proc.pid})")
            self._unwatch(rid)
            if proc is not None:
                self._settle(rid, proc)  # reap and clean up the previous run
            shutil.rmtree(d, ignore_errors=True)
        self._killed.discard(rid)
        env = self._env(spec)
        argv = (*spec.command, *spec.args)
        self._check_executable(argv[0], env, d / WORK_DIR)
        try:
            (d / WORK_DIR).mkdir(parents=True)
            _write_json(d / SPEC_FILE, _spec_doc(spec, self.owner))
        except OSError as exc:
            shutil.rmtree(d, ignore_errors=True)
            raise DriverError(f"replica {rid}: cannot create {d}: {exc.strerror}") from exc
        leaf, oom_base = self._cgroup_for(spec)
        try:
            pid = self._spawn(d, argv, env, leaf)
        except OSError as exc:
            shutil.rmtree(d, ignore_errors=True)
            if leaf is not None:
                cgroups.remove(leaf)
            raise DriverError(
                f"replica {rid}: cannot start {argv[0]}: {exc.strerror or exc}"
            ) from exc
        started_at = time.time()
        stat = _proc_stat(pid)  # still there: unreaped at worst
        proc = _Proc(
            pid=pid,
            start=stat[1] if stat else 0,
            started_at=started_at,
            cgroup=str(leaf) if leaf is not None else None,
            oom_base=oom_base,
        )
        try:
            _write_json(d / PID_FILE, dataclasses.asdict(proc))
        except OSError as exc:
            # Untracked, it could never be stopped or adopted: better not run at all.
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
            self._settle(rid, proc)
            raise DriverError(f"replica {rid}: cannot write {PID_FILE}: {exc.strerror}") from exc
        if self._loop is not None:
            self._watch(rid, proc)
        log.info("replica %s started: pid %d", rid, pid)
        return Instance(
            replica_id=rid,
            service=spec.service,
            slot=spec.slot,
            version=spec.version,
            state="running",
            handle=str(pid),
            started_at=started_at,
            ports=spec.ports,
        )

    async def stop(self, replica_id: str, timeout: float | None = None) -> None:
        rid = self._check_id(replica_id)
        if timeout is None:
            timeout = self.stop_timeout
        owner, _ = self._load(rid, strict=False)
        if owner != self.owner:
            return  # gone, or not ours to stop
        proc = self._read_proc(rid)
        if proc is None:
            return
        fd = self._pidfd(proc)
        if fd is None:
            if not self._recorded(rid, proc):
                self._finish(rid, proc, None)
            return
        try:
            _signal_group_but_leader(proc.pid, signal.SIGTERM)
            if not await self._wait_readable(fd, timeout):
                log.info("replica %s: no exit %.1fs after SIGTERM; sending SIGKILL", rid, timeout)
                self._killed.add(rid)
                if proc.cgroup:
                    cgroups.kill(Path(proc.cgroup))
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                if not await self._wait_readable(fd, KILL_WAIT):
                    raise DriverError(f"replica {rid}: pid {proc.pid} survived SIGKILL")
            self._finish(rid, proc, fd)
        finally:
            os.close(fd)

    async def remove(self, replica_id: str) -> None:
        rid = self._check_id(replica_id)
        d = self._dir(rid)
        if not d.exists():
            return
        owner, _ = self._load(rid, strict=False)
        if owner is None:
            raise DriverError(f"replica {rid}: unreadable {SPEC_FILE}; cannot tell whose it is")
        if owner != self.owner:
            return
        proc = self._read_proc(rid)
        if proc is not None and _is_running(proc):
            raise DriverError(f"replica {rid} is still running (pid {proc.pid}); stop it first")
        if proc is not None and not self._recorded(rid, proc):
            self._settle(rid, proc)  # reaps it if it is our unreaped child
        self._unwatch(rid)
        self._killed.discard(rid)
        if proc is not None and proc.cgroup:
            leaf = Path(proc.cgroup)
            if not cgroups.remove(leaf):
                cgroups.kill(leaf)
                if not cgroups.remove(leaf):
                    log.warning("replica %s: cgroup %s not removed", rid, leaf)
        shutil.rmtree(d, ignore_errors=True)

    async def host_address(self) -> str | None:
        return None  # processes share the host's network: loopback reaches the mesh

    # -- exec and logs --

    async def exec(self, replica_id: str, argv: tuple[str, ...], timeout: float) -> tuple[int, str]:
        rid = self._check_id(replica_id)
        if not argv:
            raise DriverError("exec needs a command")
        _, spec = self._load(rid)
        assert spec is not None
        try:
            child = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=self._env(spec),
                cwd=self._dir(rid) / WORK_DIR,
                start_new_session=True,
            )
        except OSError as exc:
            raise DriverError(f"exec {argv[0]}: {exc.strerror or exc}") from exc

        async def collect() -> tuple[int, bytes]:
            assert child.stdout is not None
            out = bytearray()
            while chunk := await child.stdout.read(LOG_CHUNK):
                out += chunk[: EXEC_OUTPUT_MAX - len(out)]  # keep draining past the cap
            return await child.wait(), bytes(out)

        try:
            code, out = await asyncio.wait_for(collect(), timeout)
        except BaseException as exc:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)
            await asyncio.shield(child.wait())
            if isinstance(exc, TimeoutError):
                raise DriverError(f"exec {argv[0]}: timed out after {timeout:g}s") from None
            raise
        return (code if code >= 0 else 128 - code), out.decode("utf-8", "replace")

    async def logs(
        self, replica_id: str, *, tail: int | None = None, follow: bool = False
    ) -> AsyncIterator[LogLine]:
        """stdout.log then stderr.log. The two files share no clock, so ``tail``
        applies to each stream; followed lines come in the order they are read,
        stamped with the read time (history lines get the file's mtime)."""
        rid = self._check_id(replica_id)
        self._load(rid)
        d = self._dir(rid)
        proc = self._read_proc(rid)
        files = [_LogFile(d / STDOUT_LOG, "stdout"), _LogFile(d / STDERR_LOG, "stderr")]

        def lines(f: _LogFile, raw: Iterable[bytes], when: float) -> list[LogLine]:
            return [LogLine(rid, f.stream, when, b.decode("utf-8", "replace")) for b in raw]

        # History, one stream after the other: the files share no clock, so
        # ``tail`` applies to each stream.
        for f in files:
            if tail is not None:
                f.offset = _tail_offset(f.path, tail)
            when = f.mtime()
            while True:
                raw, n = f.read()
                for line in lines(f, raw, when):
                    yield line
                if n == 0:
                    break
            if not follow:
                for line in lines(f, f.flush(), when):
                    yield line
        if not follow:
            return
        while True:
            # Liveness first: whatever was written before the end is then read below.
            alive = proc is not None and _is_running(proc) and d.exists()
            got = 0
            for f in files:
                raw, n = f.read()
                got += n
                for line in lines(f, raw, time.time()):
                    yield line
            if got:
                continue
            if not alive:
                for f in files:
                    for line in lines(f, f.flush(), time.time()):
                        yield line
                return
            await asyncio.sleep(LOG_POLL)

    # -- internals: state --

    def _dir(self, rid: str) -> Path:
        return self.state_dir / rid

    @staticmethod
    def _check_id(rid: str) -> str:
        if not isinstance(rid, str) or not _REPLICA_ID.fullmatch(rid):
            raise DriverError(f"bad replica id {rid!r}")
        return rid

    def _replica_dirs(self) -> list[str]:
        try:
            entries = sorted(os.listdir(self.state_dir))
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):
                log.warning("cannot list %s: %s", self.state_dir, exc.strerror)
            return []
        return [
            name
            for name in entries
            if _REPLICA_ID.fullmatch(name) and (self.state_dir / name).is_dir()
        ]

    def _owned_ids(self) -> list[str]:
        return [
            rid for rid in self._replica_dirs() if self._load(rid, strict=False)[0] == self.owner
        ]

    def _load(self, rid: str, strict: bool = True) -> tuple[str | None, LaunchSpec | None]:
        """(owner, spec) of a replica dir. strict: DriverError unless it is ours and readable."""
        path = self._dir(rid) / SPEC_FILE
        try:
            owner, spec = _spec_from_doc(_read_json(path))
        except FileNotFoundError:
            if strict:
                raise DriverError(f"no replica {rid}") from None
            return None, None
        except (OSError, ValueError, TypeError) as exc:
            self._skip(path, exc)
            if strict:
                raise DriverError(f"replica {rid}: unreadable {SPEC_FILE}") from None
            return None, None
        if strict and owner != self.owner:
            raise DriverError(f"no replica {rid}")
        return owner, spec

    def _read_proc(self, rid: str) -> _Proc | None:
        path = self._dir(rid) / PID_FILE
        try:
            return _proc_from_doc(_read_json(path))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            self._skip(path, exc)
            return None

    def _skip(self, path: Path, exc: Exception) -> None:
        """Log a damaged state file once, not on every list()."""
        if path not in self._damaged:
            self._damaged.add(path)
            log.warning("skipping %s: %s", path, exc)

    def _inspect(self, rid: str) -> Instance | None:
        owner, spec = self._load(rid, strict=False)
        if spec is None or owner != self.owner:
            return None
        # spec written but never started (the agent died in between): "created".
        inst = Instance(
            replica_id=rid,
            service=spec.service,
            slot=spec.slot,
            version=spec.version,
            state="created",
            handle="",
            ports=spec.ports,
        )
        proc = self._read_proc(rid)
        if proc is None:
            if (self._dir(rid) / PID_FILE).exists():
                return None  # unreadable: logged by _read_proc
            return inst
        if _is_running(proc):
            return dataclasses.replace(
                inst, state="running", handle=str(proc.pid), started_at=proc.started_at
            )
        code, finished_at, error = self._result(rid, proc)
        return dataclasses.replace(
            inst,
            state="exited",
            handle=str(proc.pid),
            exit_code=code,
            started_at=proc.started_at,
            finished_at=finished_at,
            error=error,
        )

    def _recorded(self, rid: str, proc: _Proc) -> bool:
        try:
            return _read_json(self._dir(rid) / RESULT_FILE).get("pid") == proc.pid
        except (OSError, ValueError, TypeError):
            return False

    def _result(
        self, rid: str, proc: _Proc, status: int | None = None
    ) -> tuple[int | None, float | None, str | None]:
        """How an ended replica ended: the recorded result, else the wrapper's exit
        file, else the wait status (``status``), else what our stop did."""
        d = self._dir(rid)
        try:
            doc = _read_json(d / RESULT_FILE)
            if doc.get("pid") == proc.pid:
                code = doc.get("exit_code")
                at = doc.get("finished_at")
                err = doc.get("error")
                return (
                    code if isinstance(code, int) else None,
                    float(at) if isinstance(at, (int, float)) else None,
                    err if isinstance(err, str) else None,
                )
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError) as exc:
            self._skip(d / RESULT_FILE, exc)
        exited = _read_exit(d / EXIT_FILE)
        oom = bool(proc.cgroup) and cgroups.oom_kills(Path(proc.cgroup or "")) > proc.oom_base
        if exited is not None:
            return exited[0], exited[1], _error_for(exited[0], oom)
        if status is not None:
            return status, None, _error_for(status, oom)
        if rid in self._killed:
            return 137, None, _error_for(137, oom)
        return None, None, "out of memory" if oom else "exit code unknown"

    # -- internals: processes --

    def _env(self, spec: LaunchSpec) -> dict[str, str]:
        env = {k: os.environ[k] for k in BASE_ENV if k in os.environ}
        env.setdefault("PATH", DEFAULT_PATH)
        env.update(spec.env)
        return env

    @staticmethod
    def _check_executable(command: str, env: dict[str, str], work: Path) -> None:
        if "/" in command:
            path = work / command  # absolute stays absolute; relative is from the work dir
            if not (path.is_file() and os.access(path, os.X_OK)):
                raise DriverError(f"executable not found: {command}")
        elif shutil.which(command, path=env.get("PATH", DEFAULT_PATH)) is None:
            raise DriverError(f"executable not found in PATH: {command}")

    def _spawn(self, d: Path, argv: tuple[str, ...], env: dict[str, str], leaf: Path | None) -> int:
        append = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, str(d / STDOUT_LOG), append, 0o644),
            (os.POSIX_SPAWN_OPEN, 2, str(d / STDERR_LOG), append, 0o644),
        ]
        wrapper = [
            SH,
            "-c",
            WRAPPER,
            f"meshd:{d.name}",
            str(d / WORK_DIR),
            str(d / EXIT_FILE),
            str(leaf / "cgroup.procs") if leaf is not None else "",
            *argv,
        ]
        # posix_spawn (vfork) costs the same however big the agent is.
        return os.posix_spawn(
            SH,
            wrapper,
            env,
            file_actions=actions,
            setsid=True,
            setsigdef=_DEFAULT_SIGNALS,
            setsigmask=[],
        )

    def _cgroup_for(self, spec: LaunchSpec) -> tuple[Path | None, int]:
        """The replica's cgroup leaf with limits set, and its OOM count now."""
        tree = self._cgroup_tree()
        if tree is None:
            return None, 0
        try:
            leaf = tree.create(spec.replica_id, spec.cpu, spec.memory_mb)
        except cgroups.CgroupError as exc:
            log.warning("replica %s runs without limits: %s", spec.replica_id, exc)
            return None, 0
        return leaf, cgroups.oom_kills(leaf)

    def _cgroup_tree(self) -> cgroups.Cgroups | None:
        if not self._cgroups_tried:
            self._cgroups_tried = True
            tree = cgroups.Cgroups(self._cgroup_root, self.owner)
            try:
                tree.prepare()
            except cgroups.CgroupError as exc:
                self.warning = f"cpu and memory limits not enforced: {exc}"
                log.warning("%s", self.warning)
            else:
                self._cgroups = tree
        return self._cgroups

    @staticmethod
    def _pidfd(proc: _Proc) -> int | None:
        """A pidfd for the replica's process, running or an unreaped zombie;
        None once it is gone (reaped, or its pid recycled)."""
        try:
            fd = os.pidfd_open(proc.pid)
        except OSError:
            return None
        # Checked after opening: from here on the fd cannot follow a recycled pid.
        stat = _proc_stat(proc.pid)
        if stat is None or stat[1] != proc.start:
            os.close(fd)
            return None
        return fd

    def _settle(self, rid: str, proc: _Proc) -> None:
        """Record the end of a replica nobody watched end."""
        fd = self._pidfd(proc)
        try:
            self._finish(rid, proc, fd)
        finally:
            if fd is not None:
                os.close(fd)

    def _watch(self, rid: str, proc: _Proc) -> None:
        assert self._loop is not None
        fd = self._pidfd(proc)
        if fd is None:
            self._finish(rid, proc, None)  # gone already
            return
        # A zombie's pidfd is readable at once, so an early exit is seen too.
        self._watches[rid] = _Watch(proc.pid, fd)
        self._loop.add_reader(fd, self._on_exit, rid)

    def _unwatch(self, rid: str) -> _Watch | None:
        watch = self._watches.pop(rid, None)
        if watch is not None:
            if self._loop is not None:
                self._loop.remove_reader(watch.fd)
            os.close(watch.fd)
        return watch

    def _on_exit(self, rid: str) -> None:
        watch = self._watches.get(rid)
        if watch is None:
            return
        proc = self._read_proc(rid)
        if proc is None or proc.pid != watch.pid:
            self._unwatch(rid)  # removed or replaced under us
            return
        try:
            self._finish(rid, proc, watch.fd)
        except Exception:
            log.exception("replica %s: handling its exit failed", rid)
            self._unwatch(rid)

    def _finish(self, rid: str, proc: _Proc, fd: int | None) -> None:
        """Record how the replica ended, once; reap and clean up; tell the listener.

        Called by the exit watcher and by stop, whichever sees the end first;
        ``fd`` is any pidfd of the ended process (None when there is none).
        """
        watch = self._watches.get(rid)
        if watch is not None and watch.pid != proc.pid:
            watch = None
        if not self._recorded(rid, proc):
            status = self._kill_leftovers_and_reap(proc, fd)
            if status is None and watch is not None and fd != watch.fd:
                status = self._kill_leftovers_and_reap(proc, watch.fd)
            code, finished_at, error = self._result(rid, proc, status)
            doc = {
                "pid": proc.pid,
                "exit_code": code,
                "finished_at": finished_at or time.time(),
                "error": error,
            }
            with contextlib.suppress(OSError):
                _write_json(self._dir(rid) / RESULT_FILE, doc)
            if proc.cgroup:
                cgroups.remove(Path(proc.cgroup))
            self._killed.discard(rid)
            log.info("replica %s exited: code %s%s", rid, code, f" ({error})" if error else "")
        if watch is None:
            return
        self._unwatch(rid)
        if self._listener is not None:
            inst = self._inspect(rid)
            if inst is not None:
                self._listener(inst)

    def _kill_leftovers_and_reap(self, proc: _Proc, fd: int | None) -> int | None:
        """Kill what the replica left running, reap it if it is our child: its
        exit status as 128+signal or the code (None when not our child)."""
        if proc.cgroup:
            cgroups.kill(Path(proc.cgroup))
        if fd is None:
            return None
        flags = os.WEXITED | os.WNOHANG
        try:
            zombie = os.waitid(os.P_PIDFD, fd, flags | os.WNOWAIT)
        except ChildProcessError:
            zombie = None  # not our child (adopted), or reaped already
        except OSError:
            return None
        if zombie is not None or _proc_stat(proc.pid) is None:
            # The pid is held by our zombie, or no process has it and only
            # leftovers of this group can keep the group id alive: safe to signal.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if zombie is None:
            return None
        try:
            result = os.waitid(os.P_PIDFD, fd, flags)
        except OSError:
            return None
        if result is None:
            return None
        if result.si_code == os.CLD_EXITED:
            return result.si_status
        return 128 + result.si_status

    async def _wait_readable(self, fd: int, timeout: float) -> bool:
        """Wait (without polling) until a pidfd says its process ended."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        loop.add_reader(fd, lambda: done.done() or done.set_result(True))
        try:
            await asyncio.wait_for(done, timeout)
        except TimeoutError:
            return False
        finally:
            loop.remove_reader(fd)
        return True
