"""Lab hosts: several machines on one box, built from network namespaces.

Each host is a namespace ``PREFIX-hI`` with one interface, eth0, at
SUBNET.I/24, plugged into a bridge that lives in its own switch namespace
``PREFIX-sw``. Nothing is routed to the real network, so tests and benchmarks
can send real traffic between hosts and break the network between them
(loss, partitions) without touching anything outside.

Used three ways: the ``scripts/lab`` command, pytest fixtures and benchmarks
(``from labhosts import Lab``). Standard library only, so it runs before the
project's venv exists. Needs root, iproute2, util-linux (nsenter); iptables
for faults; dockerd and the docker CLI for ``docker=True``.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE_ROOT = Path("/run/meshd-lab")
DATA_ROOT = Path("/var/lib/meshd-lab")
TEST_IMAGE = "meshd-test/busybox:latest"
MAIN_DOCKER = "unix:///var/run/docker.sock"

# Fault rules live in chains of their own in the raw table: raw PREROUTING sees
# every packet that enters a host, whether it is delivered locally or forwarded
# to a container, and Docker never rewrites that table. Faults act on arrival
# only, so a sender sees no error, as on a real network.
CHAIN_LOSS = "LAB-LOSS"
CHAIN_PART = "LAB-PART"

MAX_HOSTS = 250


class LabError(RuntimeError):
    """A lab operation failed; the message says what and how to fix it."""


@dataclass
class LabState:
    """What ``up`` built, saved so ``down``/``status`` work from another process."""

    prefix: str
    subnet: str
    n: int
    docker: bool = False
    owner_pid: int | None = None
    created: float = field(default_factory=time.time)
    dockerd: dict[str, int] = field(default_factory=dict)


def _run(argv: Sequence[str], *, check: bool = True, input: str | None = None) -> str:
    """Run a setup command; on failure raise with its stderr, which says why."""
    try:
        res = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=120)
    except FileNotFoundError as exc:
        raise LabError(f"{argv[0]} not found: run scripts/setup --system") from exc
    if check and res.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _check_prefix(prefix: str) -> str:
    # Namespace names become file names and parts of socket paths: keep them tame.
    if not prefix or len(prefix) > 24 or not all(c.isalnum() or c in "-_" for c in prefix):
        raise LabError(f"bad prefix {prefix!r}: use 1-24 letters, digits, '-' or '_'")
    return prefix


def _check_subnet(subnet: str) -> str:
    try:
        net = ipaddress.IPv4Network(f"{subnet}.0/24")
    except ValueError as exc:
        raise LabError(f"bad subnet {subnet!r}: give three octets, e.g. 10.77.0") from exc
    if not net.is_private:
        raise LabError(f"subnet {subnet!r} is not a private range")
    return subnet


class Lab:
    """A set of lab hosts sharing one switch; see the module docstring."""

    def __init__(self, prefix: str = "lab", subnet: str = "10.77.0") -> None:
        self.prefix = _check_prefix(prefix)
        self.state_dir = STATE_ROOT / prefix
        self._procs: list[subprocess.Popen] = []
        saved = self._load_state()
        self.state = saved or LabState(prefix=prefix, subnet=_check_subnet(subnet), n=0)

    # ----- names and addresses -------------------------------------------------

    @property
    def n(self) -> int:
        return self.state.n

    @property
    def subnet(self) -> str:
        return self.state.subnet

    @property
    def hosts(self) -> range:
        return range(1, self.n + 1)

    @property
    def switch(self) -> str:
        return f"{self.prefix}-sw"

    def ns(self, i: int) -> str:
        """Namespace name of host i (1-based)."""
        self._check_host(i)
        return f"{self.prefix}-h{i}"

    def addr(self, i: int) -> str:
        """IPv4 address of host i on the lab switch."""
        self._check_host(i)
        return f"{self.subnet}.{i}"

    def docker_host(self, i: int) -> str:
        """DOCKER_HOST value for host i's own engine (``up(docker=True)``)."""
        self._check_host(i)
        return f"unix://{self._docker_sock(i)}"

    def _docker_sock(self, i: int) -> str:
        return f"/run/{self.prefix}-h{i}-docker.sock"

    def _docker_exec_root(self, i: int) -> Path:
        return Path(f"/run/{self.prefix}-h{i}-docker")

    def _docker_data_root(self, i: int) -> Path:
        return DATA_ROOT / self.prefix / f"h{i}"

    def _check_host(self, i: int) -> None:
        if not 1 <= i <= self.n:
            raise LabError(f"no host {i} in lab {self.prefix} (hosts 1..{self.n})")

    # ----- state ---------------------------------------------------------------

    def _state_file(self) -> Path:
        return self.state_dir / "state.json"

    def _load_state(self) -> LabState | None:
        try:
            data = json.loads(self._state_file().read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise LabError(f"unreadable lab state {self._state_file()}: {exc}") from exc
        return LabState(**data)

    def _save_state(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._state_file().with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.state), indent=1))
        tmp.replace(self._state_file())

    def exists(self) -> bool:
        return self._state_file().exists() or Path(f"/run/netns/{self.switch}").exists()

    # ----- life cycle ----------------------------------------------------------

    def up(self, n: int, *, docker: bool = False, owner_pid: int | None = None) -> Lab:
        """Create n hosts (and an engine per host with docker=True).

        owner_pid marks the lab as belonging to that process, so a later run
        can remove it with ``reap_stale`` if the owner died without cleaning up.
        """
        if os.geteuid() != 0:
            raise LabError("lab hosts need root (network namespaces)")
        if not 1 <= n <= MAX_HOSTS:
            raise LabError(f"host count must be 1..{MAX_HOSTS}, got {n}")
        if self.exists():
            raise LabError(
                f"lab {self.prefix} already exists: run 'scripts/lab down --prefix {self.prefix}' first"
            )
        self.state = LabState(
            prefix=self.prefix, subnet=self.subnet, n=n, docker=docker, owner_pid=owner_pid
        )
        self._save_state()
        try:
            self._make_switch()
            for i in self.hosts:
                self._make_host(i)
            if docker:
                self._start_engines()
        except BaseException:
            self.down()
            raise
        return self

    def _make_switch(self) -> None:
        _run(["ip", "netns", "add", self.switch])
        sw = ["ip", "-n", self.switch]
        _run([*sw, "link", "add", "br0", "type", "bridge"])
        _run([*sw, "link", "set", "br0", "up"])
        _run([*sw, "link", "set", "lo", "up"])

    def _make_host(self, i: int) -> None:
        ns = self.ns(i)
        _run(["ip", "netns", "add", ns])
        # Both ends are created directly inside their namespaces, so no name
        # ever appears in the root namespace where labs could collide.
        port = f"sw-h{i}"
        _run(
            [
                "ip",
                "link",
                "add",
                "eth0",
                "netns",
                ns,
                "type",
                "veth",
                "peer",
                "name",
                port,
                "netns",
                self.switch,
            ]
        )
        _run(["ip", "-n", self.switch, "link", "set", port, "master", "br0"])
        _run(["ip", "-n", self.switch, "link", "set", port, "up"])
        h = ["ip", "-n", ns]
        _run([*h, "link", "set", "lo", "up"])
        _run([*h, "addr", "add", f"{self.addr(i)}/24", "dev", "eth0"])
        _run([*h, "link", "set", "eth0", "up"])
        # Multicast (mDNS) goes out of eth0 even without a default route.
        _run([*h, "route", "add", "224.0.0.0/4", "dev", "eth0"])

    def down(self) -> None:
        """Remove the hosts and stop everything that runs inside them."""
        for proc in self._procs:
            _terminate([proc.pid])
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
        self._procs.clear()
        self._stop_engines()
        names = self._namespaces()
        _terminate(self._pids_in(names))
        for name in names:
            _run(["ip", "netns", "del", name], check=False)
        self._remove_docker_dirs()
        shutil.rmtree(self.state_dir, ignore_errors=True)
        self.state.n = 0

    def _namespaces(self) -> list[str]:
        """Every namespace of this lab, found by name so a half-built lab goes too."""
        out = _run(["ip", "netns", "list"], check=False)
        names = [line.split()[0] for line in out.splitlines() if line.strip()]
        mine = {self.switch}
        return [
            n
            for n in names
            if n in mine
            or (n.startswith(f"{self.prefix}-h") and n[len(self.prefix) + 2 :].isdigit())
        ]

    def _pids_in(self, names: Iterable[str]) -> list[int]:
        """Processes whose network namespace is one of ours."""
        ids = {i for n in names if (i := _netns_id(f"/run/netns/{n}")) is not None}
        if not ids:
            return []
        pids = []
        for entry in os.listdir("/proc"):
            if (
                entry.isdigit()
                and int(entry) != os.getpid()
                and _netns_id(f"/proc/{entry}/ns/net") in ids
            ):
                pids.append(int(entry))
        return pids

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    @classmethod
    def all(cls) -> list[Lab]:
        """Every lab with saved state on this machine."""
        if not STATE_ROOT.is_dir():
            return []
        return [cls(p.name) for p in sorted(STATE_ROOT.iterdir()) if (p / "state.json").exists()]

    @classmethod
    def reap_stale(cls, startswith: str = "") -> list[str]:
        """Remove labs whose owner process has died; returns their prefixes."""
        gone = []
        for lab in cls.all():
            pid = lab.state.owner_pid
            if lab.prefix.startswith(startswith) and pid is not None and not _pid_alive(pid):
                lab.down()
                gone.append(lab.prefix)
        return gone

    # ----- running things in hosts ---------------------------------------------

    def cmd(self, i: int, argv: Sequence[str]) -> list[str]:
        """argv wrapped to run inside host i."""
        return ["ip", "netns", "exec", self.ns(i), *argv]

    def popen(self, i: int, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start a process inside host i; ``down`` stops it if still running."""
        proc = subprocess.Popen(self.cmd(i, argv), **kw)
        self._procs.append(proc)
        return proc

    def run(self, i: int, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        """Run a command inside host i to completion (``subprocess.run`` keywords)."""
        kw.setdefault("timeout", 60)
        return subprocess.run(self.cmd(i, argv), **kw)

    # ----- faults --------------------------------------------------------------

    def _ipt(self, i: int, *args: str, check: bool = True) -> str:
        # nsenter switches only the network namespace: cheaper than ip netns exec.
        return _run(
            ["nsenter", f"--net=/run/netns/{self.ns(i)}", "iptables", "-w", "-t", "raw", *args],
            check=check,
        )

    def _ensure_chains(self, i: int) -> None:
        if self._ipt(i, "-S", CHAIN_LOSS, check=False).strip():
            return
        rules = "\n".join(
            [
                "*raw",
                f":{CHAIN_PART} - [0:0]",
                f":{CHAIN_LOSS} - [0:0]",
                f"-A PREROUTING -j {CHAIN_PART}",
                f"-A PREROUTING -j {CHAIN_LOSS}",
                "COMMIT",
                "",
            ]
        )
        _run(
            ["nsenter", f"--net=/run/netns/{self.ns(i)}", "iptables-restore", "-w", "--noflush"],
            input=rules,
        )

    def set_loss(self, i: int, p: float) -> None:
        """Drop each UDP packet arriving on host i's eth0 with probability p (0 = none)."""
        if not 0.0 <= p <= 1.0:
            raise LabError(f"loss probability must be within 0..1, got {p}")
        self._ensure_chains(i)
        self._ipt(i, "-F", CHAIN_LOSS)
        if p <= 0:
            return
        rule = ["-A", CHAIN_LOSS, "-i", "eth0", "-p", "udp"]
        if p < 1:
            rule += ["-m", "statistic", "--mode", "random", "--probability", f"{p:.6f}"]
        self._ipt(i, *rule, "-j", "DROP")

    def partition(self, i: int, j: int) -> None:
        """Cut all IP traffic between hosts i and j, both ways.

        Each side drops what arrives from the other: sends still succeed, and
        nothing gets through, like a real partition.
        """
        if i == j:
            raise LabError("cannot partition a host from itself")
        for a, b in ((i, j), (j, i)):
            self._ensure_chains(a)
            rule = [CHAIN_PART, "-s", self.addr(b), "-j", "DROP"]
            if not self._rule_exists(a, rule):
                self._ipt(a, "-A", *rule)

    def split(self, side_a: Iterable[int], side_b: Iterable[int]) -> None:
        """Partition every host of side_a from every host of side_b."""
        b = list(side_b)
        for i in side_a:
            for j in b:
                self.partition(i, j)

    def heal(self, i: int | None = None) -> None:
        """Undo partitions: all of them, or only those involving host i."""
        targets = list(self.hosts) if i is None else [i]
        for h in targets:
            self._ensure_chains(h)
            self._ipt(h, "-F", CHAIN_PART)
        if i is None:
            return
        for h in self.hosts:
            if h == i:
                continue
            self._ensure_chains(h)
            rule = [CHAIN_PART, "-s", self.addr(i), "-j", "DROP"]
            while self._rule_exists(h, rule):
                self._ipt(h, "-D", *rule)

    def _rule_exists(self, i: int, rule: list[str]) -> bool:
        try:
            self._ipt(i, "-C", *rule)
        except LabError:
            return False
        return True

    def faults(self, i: int) -> dict[str, object]:
        """Loss and partition rules in force on host i, for status displays."""
        loss: float = 0.0
        cut: list[str] = []
        for line in self._ipt(i, "-S", check=False).splitlines():
            words = line.split()
            if words[:2] == ["-A", CHAIN_LOSS]:
                loss = (
                    float(words[words.index("--probability") + 1])
                    if "--probability" in words
                    else 1.0
                )
            elif words[:2] == ["-A", CHAIN_PART] and "-s" in words:
                cut.append(words[words.index("-s") + 1].removesuffix("/32"))
        return {"loss": loss, "partitioned_from": cut}

    # ----- a Docker Engine per host --------------------------------------------

    def _start_engines(self) -> None:
        if shutil.which("dockerd") is None:
            raise LabError("dockerd not found: run scripts/setup --system")
        if not _docker_ping(MAIN_DOCKER.removeprefix("unix://")):
            raise LabError(
                "the default Docker engine is not running (needed for the test "
                "image): run scripts/setup --system"
            )
        for i in self.hosts:
            self.state.dockerd[str(i)] = self._start_engine(i)
            self._save_state()
        deadline = time.monotonic() + 90
        for i in self.hosts:
            sock = self._docker_sock(i)
            while not _docker_ping(sock):
                pid = self.state.dockerd[str(i)]
                if not _pid_alive(pid) or time.monotonic() > deadline:
                    tail = _tail(self.state_dir / f"h{i}-dockerd.log")
                    raise LabError(f"dockerd for host {i} did not start:\n{tail}")
                time.sleep(0.1)
        self._load_test_image()

    def _start_engine(self, i: int) -> int:
        data, exec_root = self._docker_data_root(i), self._docker_exec_root(i)
        data.mkdir(parents=True, exist_ok=True)
        log = open(self.state_dir / f"h{i}-dockerd.log", "ab")  # noqa: SIM115 - handed to the child
        # nsenter, not ip netns exec: the latter remounts /sys and dockerd then
        # finds no devices cgroup.
        argv = [
            "nsenter",
            f"--net=/run/netns/{self.ns(i)}",
            "dockerd",
            "--data-root",
            str(data),
            "--exec-root",
            str(exec_root),
            "--pidfile",
            str(self.state_dir / f"h{i}-dockerd.pid"),
            "-H",
            f"unix://{self._docker_sock(i)}",
            "--shutdown-timeout",
            "3",
        ]
        with log:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        return proc.pid

    def _load_test_image(self) -> None:
        with tempfile.TemporaryDirectory(prefix="meshd-lab-") as tmp:
            tar = os.path.join(tmp, "image.tar")
            # save/load, not import: every host then has the same image ID.
            _run(["docker", "-H", MAIN_DOCKER, "save", "-o", tar, TEST_IMAGE])
            for i in self.hosts:
                _run(["docker", "-H", self.docker_host(i), "load", "-q", "-i", tar])

    def _stop_engines(self) -> None:
        pids = [p for p in self.state.dockerd.values() if _pid_alive(p) and _is_dockerd(p)]
        if not pids:
            self.state.dockerd.clear()
            return
        # Kill containers first: a graceful engine stop waits 10 s for each one
        # that ignores SIGTERM (any PID 1 without a handler does).
        script = 'ids=$(docker -H "$1" ps -q) && [ -z "$ids" ] || docker -H "$1" rm -f $ids'
        killers = [
            subprocess.Popen(
                ["sh", "-c", script, "sh", f"unix://{self._docker_sock(int(i))}"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for i, pid in self.state.dockerd.items()
            if pid in pids
        ]
        for k in killers:
            try:
                k.wait(timeout=30)
            except subprocess.TimeoutExpired:
                k.kill()
                k.wait()
        _terminate(pids, grace=20)
        self.state.dockerd.clear()

    def _remove_docker_dirs(self) -> None:
        roots = [str(DATA_ROOT / self.prefix)]
        roots += [str(self._docker_exec_root(i)) for i in range(1, max(self.n, 0) + 1)]
        _unmount_under(roots)
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)
        for i in range(1, max(self.n, 0) + 1):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._docker_sock(i))

    # ----- reporting -----------------------------------------------------------

    def status(self) -> dict[str, object]:
        hosts = []
        for i in self.hosts:
            present = Path(f"/run/netns/{self.ns(i)}").exists()
            entry: dict[str, object] = {
                "host": i,
                "ns": self.ns(i),
                "addr": self.addr(i),
                "present": present,
            }
            if present and shutil.which("iptables"):
                entry.update(self.faults(i))
            if self.state.docker:
                pid = self.state.dockerd.get(str(i))
                entry["docker"] = self.docker_host(i) if pid and _pid_alive(pid) else "stopped"
            hosts.append(entry)
        return {
            "prefix": self.prefix,
            "subnet": self.subnet,
            "owner_pid": self.state.owner_pid,
            "hosts": hosts,
        }


def _is_dockerd(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "dockerd"
    except OSError:
        return False


def _terminate(pids: Sequence[int], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL whatever is left after grace seconds."""
    live = [p for p in pids if _pid_alive(p)]
    for pid in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while live and time.monotonic() < deadline:
        # A zombie is dead: its parent (maybe us, maybe not) reaps it; waiting
        # here on someone else's child would steal its exit status.
        live = [p for p in live if _pid_alive(p) and not _is_zombie(p)]
        if live:
            time.sleep(0.05)
    for pid in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _unmount_under(roots: Sequence[str]) -> None:
    """Lazily unmount leftovers (overlays, netns binds) of a killed engine."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return
    points = []
    for line in lines:
        point = line.split()[4].replace("\\040", " ")
        if any(point == r or point.startswith(r + "/") for r in roots):
            points.append(point)
    for point in sorted(points, key=len, reverse=True):
        _run(["umount", "-l", point], check=False)


def _docker_ping(sock: str) -> bool:
    """True when the engine at this unix socket answers /_ping."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(sock)
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
    except OSError:
        return False
    return data.startswith(b"HTTP/1.") and b" 200 " in data.split(b"\r\n", 1)[0]


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ----- command line ------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--prefix",
        default=argparse.SUPPRESS,
        help="lab name; namespaces are PREFIX-hI and PREFIX-sw (default: lab)",
    )
    p = argparse.ArgumentParser(
        prog="scripts/lab",
        parents=[common],
        description="Lab hosts in network namespaces, for tests and benchmarks.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", parents=[common], help="create N hosts")
    up.add_argument("n", type=int)
    up.add_argument("--subnet", default="10.77.0", help="first three octets (default: 10.77.0)")
    up.add_argument("--docker", action="store_true", help="start a Docker Engine in every host")
    sub.add_parser("down", parents=[common], help="remove the hosts and what runs in them")
    ex = sub.add_parser("exec", parents=[common], help="run a command in host I: exec I -- CMD...")
    ex.add_argument("host", type=int)
    ex.add_argument("argv", nargs="*", help="command (after --)")
    dk = sub.add_parser("docker", parents=[common], help="docker CLI against host I's engine")
    dk.add_argument("host", type=int)
    dk.add_argument("argv", nargs="*", help="docker arguments (after --)")
    ad = sub.add_parser("addr", parents=[common], help="print host I's address")
    ad.add_argument("host", type=int)
    loss = sub.add_parser("loss", parents=[common], help="random UDP loss into host I (0 removes)")
    loss.add_argument("host", type=int)
    loss.add_argument("prob", type=float)
    part = sub.add_parser("partition", parents=[common], help="cut traffic between hosts I and J")
    part.add_argument("host", type=int)
    part.add_argument("other", type=int)
    heal = sub.add_parser("heal", parents=[common], help="undo partitions (all, or host I's)")
    heal.add_argument("host", type=int, nargs="?")
    sub.add_parser("status", parents=[common], help="show labs, hosts and faults")
    return p


def _existing(prefix: str) -> Lab:
    lab = Lab(prefix)
    if lab.n == 0:
        raise LabError(f"no lab {prefix!r} is up (scripts/lab up N --prefix {prefix})")
    return lab


def _print_status(lab: Lab) -> None:
    st = lab.status()
    owner = f", owner pid {st['owner_pid']}" if st["owner_pid"] else ""
    print(f"lab {st['prefix']}: {len(st['hosts'])} hosts on {st['subnet']}.0/24{owner}")
    for h in st["hosts"]:  # type: ignore[union-attr]
        bits = [f"  h{h['host']}  {h['addr']:<15} {h['ns']}"]
        if not h["present"]:
            bits.append("MISSING")
        if h.get("loss"):
            bits.append(f"udp-loss={h['loss']:g}")
        if h.get("partitioned_from"):
            bits.append("cut-from=" + ",".join(h["partitioned_from"]))
        if "docker" in h:
            bits.append(f"docker={h['docker']}")
        print("  ".join(bits))


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    # Split at "--" first so options may come anywhere before it.
    tail: list[str] | None = None
    if "--" in words:
        k = words.index("--")
        words, tail = words[:k], words[k + 1 :]
    parser = _parser()
    args = parser.parse_args(words)
    if tail is not None:
        if args.command not in ("exec", "docker"):
            parser.error(f"'--' makes no sense for {args.command}")
        args.argv = [*args.argv, *tail]
    prefix = getattr(args, "prefix", None) or os.environ.get("MESHD_LAB_PREFIX", "lab")
    try:
        if args.command == "up":
            lab = Lab(prefix, subnet=args.subnet).up(args.n, docker=args.docker)
            _print_status(lab)
        elif args.command == "down":
            Lab(prefix).down()
            print(f"lab {prefix}: down")
        elif args.command in ("exec", "docker"):
            lab = _existing(prefix)
            rest = list(args.argv)
            if args.command == "docker":
                os.execvp("docker", ["docker", "-H", lab.docker_host(args.host), *rest])
            if not rest:
                raise LabError("nothing to run: scripts/lab exec I -- CMD...")
            os.execvp("ip", lab.cmd(args.host, rest))
        elif args.command == "addr":
            print(_existing(prefix).addr(args.host))
        elif args.command == "loss":
            _existing(prefix).set_loss(args.host, args.prob)
        elif args.command == "partition":
            _existing(prefix).partition(args.host, args.other)
        elif args.command == "heal":
            _existing(prefix).heal(args.host)
        elif args.command == "status":
            labs = [Lab(prefix)] if getattr(args, "prefix", None) else Lab.all()
            labs = [lab for lab in labs if lab.n]
            if not labs:
                print("no labs are up")
            for lab in labs:
                _print_status(lab)
    except LabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
