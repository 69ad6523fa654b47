"""The agent's settings: every default in one place, and the rules that check them.

Settings come from four layers, highest first: command-line flags, ``MESHD_*``
environment variables, a TOML file (``--config PATH`` or ``MESHD_CONFIG``) and
the defaults below. A setting is taken whole from the highest layer that gives
it (``--join`` on the command line replaces the file's ``join`` list), except
labels, which merge key by key so a flag can override one label of the file
without repeating the others.

Every problem is a ``ConfigError`` whose message is one line that names where
the bad value came from (``--bind``, ``MESHD_BIND``, ``config file /x.toml:
line 3: bind``), so the agent prints it and exits without a traceback. Nothing
here touches the network: the default bind address is read from the routing
table, and ports in use are the agent's business when it binds.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import os
import re
import socket
import sys
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from gossip import PROFILES as GOSSIP_PROFILES
from gossip import Keyring
from meshd.labels import key_problem, valid_value

Addr = tuple[str, int]

# ----- defaults, each with its reason ------------------------------------------

DEFAULT_GOSSIP_PORT = 7946
"""The port memberlist and Serf use, so existing firewall rules for gossip fit."""

DEFAULT_API_HOST = "127.0.0.1"
"""The API can change the whole cluster: only this host reaches it unless a token is set."""

DEFAULT_API_PORT = 7947
"""Next to the gossip port, so one firewall range covers the agent."""

FALLBACK_BIND_HOST = "127.0.0.1"
"""With no default route there is no LAN to join; loopback keeps the agent to itself."""

DEFAULT_CLUSTER = "meshd"
"""Agents merge only with the same cluster name (and key); one cluster per LAN needs no name."""

KEY_FILE_NAME = "cluster.key"
"""The key lives with the state by default: the agent makes it on first start."""

ROOT_DATA_DIR = Path("/var/lib/meshd")
"""The FHS place for a system service's state."""

LOG_FORMATS = ("text", "json")
"""Text for people at a terminal (the default); JSON for log collectors."""

LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_LOG_LEVEL = "info"
"""Membership changes and start/stop are worth seeing; probes are not."""

PROFILES = tuple(sorted(GOSSIP_PROFILES))
DEFAULT_PROFILE = "lan"
"""The zero-config case is machines on one LAN."""

DRIVERS = ("auto", "docker", "process")
"""Runtime drivers; auto picks docker when the engine answers."""

DEFAULT_DNS = ("127.0.0.1", 8600)
"""Consul's DNS port on loopback: no root needed, no clash with a host resolver on 53.
Containers get a second listener on port 53 of the address they reach the host by,
because a container's resolv.conf cannot name a port."""

PROXY_CONNECT_TIMEOUT = 1.0
"""A replica on the LAN accepts in well under a millisecond; after a second it is
more likely dead than slow, and the proxy tries another one."""

PROXY_RESPONSE_TIMEOUT = 60.0
"""Time for a replica to start answering an HTTP request: nginx's proxy_read_timeout."""

PROXY_CLIENT_IDLE = 75.0
"""An idle keep-alive client connection is closed after this (nginx's keepalive_timeout)."""

PROXY_POOL_IDLE = 30.0
"""Idle pooled connections to replicas are closed after this: shorter than most servers'
own keep-alive timeouts, so the proxy rarely reuses one the replica is closing."""

MAX_LABELS = 64
"""More would never fit in the 512 bytes of gossip metadata anyway."""

MAX_DISKS = 16
"""Each disk costs gossip metadata bytes; sixteen mounts is already a storage server."""

TOKEN_LENGTH = (16, 4096)
"""A shorter API token is guessable; a longer one is a mistake (a whole file pasted)."""

ENV_PREFIX = "MESHD_"


def default_data_dir(env: Mapping[str, str], euid: int) -> Path:
    """/var/lib/meshd for a system service, else the XDG data dir of the user."""
    if euid == 0:
        return ROOT_DATA_DIR
    xdg = env.get("XDG_DATA_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "meshd"
    home = env.get("HOME") or str(Path.home())
    return Path(home) / ".local" / "share" / "meshd"


class ConfigError(ValueError):
    """A bad setting; ``str()`` is one line naming where the value came from."""


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent needs to start, checked and with defaults filled in.

    ``load_config`` is the way to build one from a command line. Built
    directly (tests, embedding), the fields are taken as given: the defaults
    keep the agent on loopback, ``key_file`` and ``mdns_interface`` are
    derived once at construction when left as None.
    """

    node: str = field(default_factory=lambda: default_node_name(socket.gethostname()))
    """Unique in the cluster. The hostname by default: unique on most LANs and what people know."""

    bind: Addr = (FALLBACK_BIND_HOST, DEFAULT_GOSSIP_PORT)
    """Gossip UDP and TCP. ``load_config`` defaults it to the address of the interface with
    the default route (zero config on a LAN); port 0 picks a free port (tests)."""

    advertise: Addr | None = None
    """What peers dial when it is not the bind address (NAT, or a wildcard bind). Port 0
    means the port actually bound."""

    api: Addr = (DEFAULT_API_HOST, DEFAULT_API_PORT)
    """The local HTTP API."""

    data_dir: Path = field(default_factory=lambda: default_data_dir(os.environ, os.geteuid()))
    """State: the store's database, the key, the node identity."""

    join: tuple[Addr, ...] = ()
    """Nodes to join at start (retried with backoff); hosts may be names, resolved when joining."""

    cluster: str = DEFAULT_CLUSTER
    """Cluster name, bound into every packet and the mDNS announcement."""

    key_file: Path | None = None
    """The cluster key; DATA_DIR/cluster.key when None (filled in at construction)."""

    mdns: bool = True
    """Announce and find agents on the LAN: what makes a flagless start form a cluster."""

    mdns_interface: str | None = None
    """Where mDNS runs (an address, never "everywhere"). When None: the bind address, or
    the advertise address for a wildcard bind; None remains only when neither is known."""

    labels: Mapping[str, str] = field(default_factory=dict)
    """Placement labels, in priority order: the first ones survive when metadata is full."""

    log_format: str = "text"
    log_level: str = DEFAULT_LOG_LEVEL

    profile: str = DEFAULT_PROFILE
    """Gossip timing: ``lan``, ``local`` (one host, fast) or ``wan`` (slow links)."""

    driver: str = "auto"
    """How replicas run: ``docker``, ``process``, or ``auto`` (docker when the engine
    answers, else process), so one command starts a working agent on any host."""

    docker_url: str | None = None
    """The Docker engine's API; None means DOCKER_HOST or the standard socket."""

    api_token: str | None = field(default=None, repr=False)
    """Clients of the API present it; required when the API listens beyond loopback."""

    disks: tuple[Path, ...] = ()
    """Mounts besides the data dir whose capacity the node reports (for volumes)."""

    config_file: Path | None = None
    """The TOML file the settings were read from, if any (for the start-up log)."""

    proxy_addresses: tuple[str, ...] | None = None
    """Where the routing mesh serves service ports. None: the advertise address,
    loopback, and the address containers reach the host by (the docker bridge)."""

    dns: Addr | None = DEFAULT_DNS
    """The DNS server for the ``mesh`` domain (None: no DNS server)."""

    dns_upstreams: tuple[Addr, ...] | None = None
    """Where other names are forwarded; None: the host's resolv.conf."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "data_dir", Path(self.data_dir))
        if self.key_file is None:
            set_(self, "key_file", self.data_dir / KEY_FILE_NAME)
        if self.mdns_interface is None:
            set_(self, "mdns_interface", _mdns_default(self.bind, self.advertise))
        set_(self, "join", tuple(self.join))
        set_(self, "disks", tuple(Path(d) for d in self.disks))
        set_(self, "labels", dict(self.labels))


def _mdns_default(bind: Addr, advertise: Addr | None) -> str | None:
    # A specific bind address is the interface the operator chose; with a
    # wildcard bind the advertise address is the one peers reach us on.
    if not _is_wildcard(bind[0]):
        return bind[0]
    if advertise is not None and not _is_wildcard(advertise[0]):
        return advertise[0]
    return None


def _is_wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::")


# ----- the default bind address ---------------------------------------------------


def detect_default_bind(
    route_table: Path = Path("/proc/net/route"),
    interface_addresses: Callable[[], Mapping[str, Sequence[Any]]] | None = None,
) -> str | None:
    """The IPv4 address of the interface that carries the default route, or None.

    Read from the kernel's routing table and the interface list, so nothing is
    sent (the usual trick of "connecting" a UDP socket to a public address
    needs a route to it and reveals intent to firewalls).
    """
    try:
        best: tuple[int, str] | None = None
        for line in route_table.read_text().splitlines()[1:]:
            cols = line.split()
            if len(cols) < 8:
                continue
            iface, dest, flags, metric, mask = cols[0], cols[1], cols[3], cols[6], cols[7]
            if dest != "00000000" or mask != "00000000" or not int(flags, 16) & 0x1:
                continue
            if best is None or int(metric) < best[0]:
                best = (int(metric), iface)
        if best is None:
            return None
        if interface_addresses is None:
            import psutil

            interface_addresses = psutil.net_if_addrs
        for snic in interface_addresses().get(best[1], ()):
            if snic.family == socket.AF_INET and snic.address:
                ip = ipaddress.IPv4Address(snic.address)
                if not ip.is_unspecified:
                    return str(ip)
    except (OSError, ValueError):
        return None
    return None


# ----- values: addresses, names, labels ------------------------------------------

_NAME = re.compile(r"[A-Za-z0-9._-]{1,63}")
_NAME_RULE = "1 to 63 of A-Z a-z 0-9 . _ -"
_LABEL_RULE = "up to 63 of A-Z a-z 0-9 - _ . starting and ending with a letter or digit"
_HOST_LABEL = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?")
_TOKEN = re.compile(r"[\x21-\x7e]+")


def default_node_name(hostname: str) -> str:
    """The hostname if it is a valid node name, else its first label, cleaned up."""
    if _NAME.fullmatch(hostname):
        return hostname
    first = re.sub(r"[^A-Za-z0-9._-]", "-", hostname.split(".")[0])[:63]
    return first


def check_name(value: str, what: str = "node name") -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid {what}: use {_NAME_RULE}")
    return value


def _is_hostname(host: str) -> bool:
    # RFC 1123 labels; an all-numeric last label is a mistyped IPv4 address.
    labels = host.rstrip(".").split(".")
    return (
        len(host) <= 253
        and all(_HOST_LABEL.fullmatch(part) for part in labels)
        and not labels[-1].isdigit()
    )


def parse_host_port(
    text: str,
    default_port: int,
    *,
    hostnames: bool = False,
    empty_host: bool = False,
    zero_port: bool = True,
) -> Addr:
    """``ADDR[:PORT]``: IPv4, ``[v6]:port``, bare ``v6`` (no port), or a host name if allowed.

    IP literals come back normalised; an empty host (``:8000``) comes back as
    "" when ``empty_host`` allows it, for the caller to fill in.
    """
    s = text.strip()
    if not s:
        raise ValueError("empty address")
    port_text: str | None = None
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']' after the IPv6 address")
        host, rest = s[1:end], s[end + 1 :]
        if rest.startswith(":"):
            port_text = rest[1:]
        elif rest:
            raise ValueError(f"{text!r}: expected [IPv6]:PORT")
        if not _is_ip(host, version=6):
            raise ValueError(f"{host!r} is not an IPv6 address")
    elif s.count(":") > 1:
        host = s  # a bare IPv6 address: no port, or it would be ambiguous
    elif ":" in s:
        host, port_text = s.split(":")
    else:
        host = s
    port = default_port
    if port_text is not None:
        if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
            raise ValueError(f"{text!r}: port {port_text!r} is not a number from 0 to 65535")
        port = int(port_text)
    if port == 0 and not zero_port:
        raise ValueError(f"{text!r}: port 0 is not allowed here")
    if not host:
        if empty_host:
            return ("", port)
        raise ValueError(f"{text!r}: missing the address before the port")
    try:
        return (str(ipaddress.ip_address(host)), port)
    except ValueError:
        pass
    if hostnames and _is_hostname(host):
        return (host.rstrip(".").lower(), port)
    raise ValueError(f"{host!r} is not an IP address" + (" or host name" if hostnames else ""))


def parse_ip(text: str) -> str:
    """An IP literal (no port), normalised."""
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise ValueError(f"{text.strip()!r} is not an IP address") from None


def _is_ip(text: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False


def check_label(key: str, value: str) -> tuple[str, str]:
    """Kubernetes label rules: ``[prefix/]name`` keys, short plain values."""
    if key_problem(key) is not None:
        raise ValueError(
            f"label key {key!r} is not valid: use {_LABEL_RULE}, "
            "with an optional DNS prefix as in 'example.com/zone'"
        )
    if not valid_value(value):
        raise ValueError(f"label {key!r}: value {value!r} is not valid: use {_LABEL_RULE}")
    return key, value


def split_label(text: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not eq:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    return check_label(key.strip(), value.strip())


# ----- the command line ------------------------------------------------------------


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as a single ``meshd: error: ...`` line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"meshd: error: {' '.join(message.split())}\n")
        sys.exit(2)


@dataclass(frozen=True)
class _Setting:
    name: str  # AgentConfig field, TOML key, and MESHD_<NAME>
    flag: str | None  # long option, or None for file/environment only
    kind: str  # "str", "bool", "list" or "labels"


_SETTINGS = [
    _Setting("node", "--node", "str"),
    _Setting("bind", "--bind", "str"),
    _Setting("advertise", "--advertise", "str"),
    _Setting("join", "--join", "list"),
    _Setting("cluster", "--cluster", "str"),
    _Setting("key_file", "--key-file", "str"),
    _Setting("mdns", "--mdns", "bool"),
    _Setting("mdns_interface", "--mdns-interface", "str"),
    _Setting("profile", "--profile", "str"),
    _Setting("driver", "--driver", "str"),
    _Setting("docker_url", "--docker-url", "str"),
    _Setting("api", "--api", "str"),
    _Setting("api_token", None, "str"),
    _Setting("api_token_file", "--api-token-file", "str"),
    _Setting("data_dir", "--data-dir", "str"),
    _Setting("labels", "--label", "labels"),
    _Setting("disks", "--disk", "list"),
    _Setting("log_format", "--log-format", "str"),
    _Setting("log_level", "--log-level", "str"),
    _Setting("proxy_addresses", "--proxy-address", "list"),
    _Setting("dns", "--dns", "str"),
    _Setting("dns_upstreams", "--dns-upstream", "list"),
]
_BY_NAME = {s.name: s for s in _SETTINGS}

_EPILOG = f"""\
Settings come from, highest first: these options; MESHD_* environment
variables named after them (MESHD_BIND=10.0.0.5, MESHD_JOIN=a,b,
MESHD_LABELS=zone=a,ssd=yes, MESHD_MDNS=false, MESHD_API_TOKEN=...); the
TOML file of --config or MESHD_CONFIG, whose keys are the option names with
'_' for '-' (join = [...], disks = [...], [labels] zone = "a"); then the
defaults.
Labels merge across these sources; any other setting comes whole from the
highest one that gives it.

With no options at all the agent binds the address of the interface that has
the default route (127.0.0.1 if there is none), finds the other agents of
cluster '{DEFAULT_CLUSTER}' on the LAN by mDNS, and keeps its API on loopback."""


def add_agent_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the agent's options to ``parser`` (the ``meshd agent`` subcommand reuses this).

    Every option defaults to None so that ``config_from_args`` can tell what
    was given from what was not.
    """
    if parser.epilog is None:
        parser.epilog = _EPILOG
    if parser.formatter_class is argparse.HelpFormatter:
        parser.formatter_class = argparse.RawDescriptionHelpFormatter

    def env(name: str) -> str:
        return f"[{ENV_PREFIX}{name.upper()}]"

    parser.add_argument(
        "--config", metavar="PATH", help=f"read settings from this TOML file {env('config')}"
    )
    net = parser.add_argument_group("gossip and discovery")
    net.add_argument(
        "--node",
        metavar="NAME",
        help=f"this node's name, unique in the cluster: {_NAME_RULE} (default: the hostname) "
        + env("node"),
    )
    net.add_argument(
        "--bind",
        metavar="ADDR[:PORT]",
        help="gossip address, UDP and TCP; ':PORT' keeps the default address (default: the "
        f"address of the interface with the default route, else {FALLBACK_BIND_HOST}; "
        f"port {DEFAULT_GOSSIP_PORT}) {env('bind')}",
    )
    net.add_argument(
        "--advertise",
        metavar="ADDR[:PORT]",
        help="address other nodes reach this one at, when it is not the bind address (NAT, "
        f"or a bind to 0.0.0.0); the port defaults to the bind port {env('advertise')}",
    )
    net.add_argument(
        "--join",
        action="append",
        metavar="ADDR[:PORT]",
        help="a node to join at start, retried with backoff; repeatable; host names are "
        f"allowed (port {DEFAULT_GOSSIP_PORT} by default) {env('join')}",
    )
    net.add_argument(
        "--cluster",
        metavar="NAME",
        help=f"cluster name; agents merge only with the same name and key (default: "
        f"{DEFAULT_CLUSTER}) {env('cluster')}",
    )
    net.add_argument(
        "--key-file",
        metavar="PATH",
        help="the cluster key, as 'meshd keygen' prints it (default: DATA_DIR/"
        f"{KEY_FILE_NAME}, made on first start) {env('key_file')}",
    )
    net.add_argument(
        "--mdns",
        action=argparse.BooleanOptionalAction,
        help=f"announce this agent and find the others on the LAN by mDNS (default: on) "
        f"{env('mdns')}",
    )
    net.add_argument(
        "--mdns-interface",
        metavar="ADDR",
        help="address of the interface mDNS runs on (default: the bind address, or the "
        f"advertise address when binding to every interface) {env('mdns_interface')}",
    )
    net.add_argument(
        "--profile",
        metavar="{" + ",".join(PROFILES) + "}",
        help="failure-detection timing: lan, local (one host) or wan (default: "
        f"{DEFAULT_PROFILE}) {env('profile')}",
    )

    run = parser.add_argument_group("workloads")
    run.add_argument(
        "--driver",
        metavar="{" + ",".join(DRIVERS) + "}",
        help="how replicas run: docker, process, or auto (docker when the engine answers, "
        f"else process; default: auto) {env('driver')}",
    )
    run.add_argument(
        "--docker-url",
        metavar="URL",
        help="the Docker engine's API (default: DOCKER_HOST or unix:///var/run/docker.sock) "
        f"{env('docker_url')}",
    )

    mesh = parser.add_argument_group("routing mesh and DNS")
    mesh.add_argument(
        "--proxy-address",
        action="append",
        metavar="ADDR",
        help="an address where every service port is served; repeatable (default: the "
        "advertise address, 127.0.0.1 and the docker bridge address) "
        f"[{ENV_PREFIX}PROXY_ADDRESSES=a,b]",
    )
    mesh.add_argument(
        "--dns",
        metavar="ADDR:PORT|off",
        help=f"where the DNS server for the mesh domain listens (default: "
        f"{DEFAULT_DNS[0]}:{DEFAULT_DNS[1]}) {env('dns')}",
    )
    mesh.add_argument(
        "--dns-upstream",
        action="append",
        metavar="ADDR[:PORT]",
        help="a resolver for names outside the mesh domain; repeatable (default: the "
        f"nameservers of /etc/resolv.conf) [{ENV_PREFIX}DNS_UPSTREAMS=a,b]",
    )

    api = parser.add_argument_group("HTTP API")
    api.add_argument(
        "--api",
        metavar="ADDR[:PORT]",
        help=f"the agent's HTTP API (default: {DEFAULT_API_HOST}:{DEFAULT_API_PORT}); any "
        f"address but loopback needs an API token {env('api')}",
    )
    api.add_argument(
        "--api-token-file",
        metavar="PATH",
        help="file holding the token API clients must present; the token itself can come "
        f"from {ENV_PREFIX}API_TOKEN instead {env('api_token_file')}",
    )

    node = parser.add_argument_group("node")
    node.add_argument(
        "--data-dir",
        metavar="DIR",
        help=f"state directory (default: {ROOT_DATA_DIR} as root, else "
        f"~/.local/share/meshd) {env('data_dir')}",
    )
    node.add_argument(
        "--label",
        action="append",
        metavar="KEY=VALUE",
        help="a label for placement, such as zone=a; repeatable; when gossip metadata is "
        f"full the first labels are kept [{ENV_PREFIX}LABELS=k=v,k2=v2]",
    )
    node.add_argument(
        "--disk",
        action="append",
        metavar="PATH",
        help=f"another mount whose capacity the node reports; repeatable [{ENV_PREFIX}DISKS=a,b]",
    )

    logs = parser.add_argument_group("logging")
    logs.add_argument(
        "--log-format",
        metavar="{" + ",".join(LOG_FORMATS) + "}",
        help=f"text for people, json for collectors (default: text) {env('log_format')}",
    )
    logs.add_argument(
        "--log-level",
        metavar="{" + ",".join(LOG_LEVELS) + "}",
        help=f"(default: {DEFAULT_LOG_LEVEL}) {env('log_level')}",
    )
    return parser


def agent_parser(prog: str = "meshd agent") -> argparse.ArgumentParser:
    return add_agent_arguments(
        OneLineParser(
            prog=prog,
            description="Run the meshd agent on this host.",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )


# ----- gathering the layers ----------------------------------------------------------


@dataclass(frozen=True)
class _Raw:
    value: Any
    where: str  # "--bind", "MESHD_BIND" or "config file /x.toml: line 3: bind"
    base: Path | None = None  # relative paths are relative to this (the config file's dir)

    def fail(self, problem: str) -> NoReturn:
        raise ConfigError(f"{self.where}: {problem}")


@dataclass
class _FileLayer:
    path: Path
    data: dict[str, Any]
    text: str

    def where(self, key: str, sub: str | None = None) -> str:
        line = _line_of(self.text, key, sub)
        at = f": line {line}" if line else ""
        return f"config file {self.path}{at}: {key if sub is None else f'{key}.{sub}'}"


def _line_of(text: str, key: str, sub: str | None) -> int | None:
    """Best-effort line of a key (tomllib keeps no positions for values)."""
    lines = text.splitlines()
    k = rf"(?:{re.escape(key)}|\"{re.escape(key)}\"|'{re.escape(key)}')"
    if sub is not None:
        s = rf"(?:{re.escape(sub)}|\"{re.escape(sub)}\"|'{re.escape(sub)}')"
        in_table = False
        for number, line in enumerate(lines, 1):
            if re.match(rf"^\s*{k}\s*\.\s*{s}\s*=", line):
                return number
            if re.match(r"^\s*\[", line):
                in_table = bool(re.match(rf"^\s*\[\s*{k}\s*\]", line))
            elif in_table and re.match(rf"^\s*{s}\s*=", line):
                return number
    in_table = False
    for number, line in enumerate(lines, 1):
        if re.match(r"^\s*\[", line):
            if re.match(rf"^\s*\[\s*{k}\s*[\].]", line):
                return number
            in_table = True
        elif not in_table and re.match(rf"^\s*{k}\s*[=.]", line):
            return number
    return None


def _read_toml(raw: _Raw) -> _FileLayer:
    path = _path(raw)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"config file {path}: {_os_problem(exc)}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: not UTF-8 text (byte {exc.start})") from None
    try:
        parsed = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = " ".join(str(exc).split())
        m = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", message)
        if m:
            problem, where = m.group(1), f"line {m.group(2)}, column {m.group(3)}"
        else:
            m = re.fullmatch(r"(.*) \(at end of document\)", message)
            problem, where = (m.group(1), "end of file") if m else (message, "")
        prefix = f"config file {path}: {where}: " if where else f"config file {path}: "
        raise ConfigError(prefix + problem[:1].lower() + problem[1:]) from None
    layer = _FileLayer(path, parsed, text)
    for key in parsed:
        if key not in _BY_NAME:
            line = _line_of(text, key, None)
            hint = difflib.get_close_matches(key, [*_BY_NAME, "label", "disk"], n=1)
            guess = {"label": "labels", "disk": "disks"}.get(hint[0], hint[0]) if hint else None
            raise ConfigError(
                f"config file {path}{f': line {line}' if line else ''}: unknown key {key!r}"
                + (f" (did you mean {guess!r}?)" if guess else "")
            )
    return layer


def _os_problem(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not a file"
    reason = (exc.strerror or str(exc)).lower()
    return f"not readable: {reason}"


def _from_flags(ns: argparse.Namespace, setting: _Setting) -> _Raw | None:
    if setting.flag is None:
        return None
    value = getattr(ns, setting.flag[2:].replace("-", "_"), None)
    return None if value is None else _Raw(value, setting.flag)


def _from_env(env: Mapping[str, str], setting: _Setting) -> _Raw | None:
    # An empty variable counts as unset: compose files often define them empty.
    name = ENV_PREFIX + setting.name.upper()
    text = env.get(name, "").strip()
    if not text:
        return None
    if setting.kind in ("list", "labels"):
        return _Raw([item.strip() for item in text.split(",") if item.strip()], name)
    if setting.kind == "bool":
        truth = {"1": True, "true": True, "yes": True, "on": True}
        truth |= {"0": False, "false": False, "no": False, "off": False}
        if text.lower() not in truth:
            raise ConfigError(f"{name}: expected true or false, got {text!r}")
        return _Raw(truth[text.lower()], name)
    return _Raw(text, name)


def _from_file(layer: _FileLayer | None, setting: _Setting) -> _Raw | None:
    if layer is None or setting.name not in layer.data:
        return None
    value = layer.data[setting.name]
    where = layer.where(setting.name)
    raw = _Raw(value, where, layer.path.parent)
    if setting.kind == "str" and not isinstance(value, str):
        raw.fail(f"must be a string, got {_toml_type(value)}")
    if setting.kind == "bool" and not isinstance(value, bool):
        raw.fail(f"must be true or false, got {_toml_type(value)}")
    if setting.kind == "list":
        if not isinstance(value, list):
            raw.fail(f"must be a list of strings, got {_toml_type(value)}")
        for item in value:
            if not isinstance(item, str):
                raw.fail(f"must be a list of strings, but holds {_toml_type(item)}")
    if setting.kind == "labels":
        if not isinstance(value, dict):
            raw.fail(f'must be a table such as [labels] zone = "a", got {_toml_type(value)}')
        pairs = []
        for k, v in value.items():
            if isinstance(v, bool):
                v = "true" if v else "false"
            elif isinstance(v, int):
                v = str(v)
            elif not isinstance(v, str):
                _Raw(v, layer.where(setting.name, k)).fail(f"must be a string, got {_toml_type(v)}")
            pairs.append((k, v, layer.where(setting.name, k)))
        return _Raw(pairs, where, layer.path.parent)
    return raw


def _toml_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}
    names |= {list: "an array", dict: "a table"}
    return names.get(type(value), f"a {type(value).__name__}")


def _pick(
    setting: _Setting, ns: argparse.Namespace, env: Mapping[str, str], layer: _FileLayer | None
) -> _Raw | None:
    return _from_flags(ns, setting) or _from_env(env, setting) or _from_file(layer, setting)


# ----- checking each setting -------------------------------------------------------


def _check(raw: _Raw, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(raw.value, *args, **kwargs)
    except ValueError as exc:
        raw.fail(str(exc))


def _path(raw: _Raw) -> Path:
    text = os.path.expanduser(str(raw.value).strip())
    if not text:
        raw.fail("empty path")
    if "\0" in text:
        raw.fail("path contains a NUL byte")
    base = raw.base if raw.base is not None else Path.cwd()
    return Path(os.path.abspath(os.path.join(base, text)))


def _text(raw: _Raw) -> str:
    if not isinstance(raw.value, str) or not raw.value.strip():
        raw.fail("must be a non-empty string")
    return raw.value.strip()


def _choice(raw: _Raw, choices: Sequence[str]) -> str:
    value = str(raw.value).strip().lower()
    if value not in choices:
        raw.fail(f"{raw.value!r} is not one of {', '.join(choices)}")
    return value


def _read_secret(raw: _Raw, path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{raw.where} {path}: not a text file") from None
    except OSError as exc:
        raise ConfigError(f"{raw.where} {path}: {_os_problem(exc)}") from None


def _check_key_file(raw: _Raw | None, path: Path) -> None:
    """An explicit key file must exist; the default one may not exist yet (made on start)."""
    if raw is None:
        if not path.exists():
            return
        raw = _Raw(str(path), "key file")
    text = _read_secret(raw, path)
    try:
        Keyring.decode_key(text)
    except ValueError as exc:
        raise ConfigError(f"{raw.where} {path}: {exc}") from None


def _check_token(raw: _Raw, token: str) -> str:
    token = token.strip()
    low, high = TOKEN_LENGTH
    if not (low <= len(token) <= high and _TOKEN.fullmatch(token)):
        raw.fail(f"the API token must be {low} to {high} visible ASCII characters, no spaces")
    return token


def _check_dir(raw: _Raw, path: Path, *, must_exist: bool) -> Path:
    if not path.exists():
        if must_exist:
            raise ConfigError(f"{raw.where} {path}: no such directory")
        return path
    if not path.is_dir():
        raise ConfigError(f"{raw.where} {path}: not a directory")
    if not must_exist and not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{raw.where} {path}: not writable")
    return path


def _labels(raws: Iterable[_Raw]) -> dict[str, str]:
    """Merge label layers, highest first: a key keeps the highest layer's value and position."""
    merged: dict[str, str] = {}
    for raw in raws:
        seen: set[str] = set()
        for item in raw.value:
            try:
                if isinstance(item, tuple):  # (key, value, where) from a TOML table
                    entry = _Raw(item[1], item[2])
                    k, v = check_label(str(item[0]).strip(), str(item[1]).strip())
                else:
                    entry = _Raw(item, raw.where)
                    k, v = split_label(item)
            except ValueError as exc:
                entry.fail(str(exc))
            if k in seen:
                entry.fail(f"label {k!r} given twice")
            seen.add(k)
            merged.setdefault(k, v)
    if len(merged) > MAX_LABELS:
        raise ConfigError(f"too many labels: {len(merged)} (at most {MAX_LABELS})")
    return merged


# ----- putting it together -----------------------------------------------------------


def _interface_hint(raw: _Raw | None) -> str | None:
    """The --mdns-interface address, when it names one usable address."""
    if raw is None:
        return None
    try:
        ip = parse_ip(raw.value)
    except (ConfigError, ValueError, TypeError):
        return None  # reported where mdns_interface itself is checked
    return None if _is_wildcard(ip) else ip


def load_config(
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    default_bind_detector: Callable[[], str | None] = detect_default_bind,
    hostname: Callable[[], str] = socket.gethostname,
    euid: Callable[[], int] = os.geteuid,
) -> AgentConfig:
    """Parse the agent's arguments (after ``agent``) and build its checked configuration.

    Usage errors (an unknown flag) print one line and exit 2, as argparse
    does; every other problem raises ``ConfigError``. The detectors are
    parameters so tests never depend on this machine's interfaces.
    """
    ns = agent_parser().parse_args(list(argv))
    return config_from_args(
        ns, env, default_bind_detector=default_bind_detector, hostname=hostname, euid=euid
    )


def config_from_args(
    ns: argparse.Namespace,
    env: Mapping[str, str],
    *,
    default_bind_detector: Callable[[], str | None] = detect_default_bind,
    hostname: Callable[[], str] = socket.gethostname,
    euid: Callable[[], int] = os.geteuid,
) -> AgentConfig:
    """Like ``load_config`` for a namespace already parsed with ``add_agent_arguments``."""
    config_raw = None
    if getattr(ns, "config", None) is not None:
        config_raw = _Raw(ns.config, "--config")
    elif env.get(ENV_PREFIX + "CONFIG", "").strip():
        config_raw = _Raw(env[ENV_PREFIX + "CONFIG"], ENV_PREFIX + "CONFIG")
    layer = _read_toml(config_raw) if config_raw is not None else None

    def pick(name: str) -> _Raw | None:
        return _pick(_BY_NAME[name], ns, env, layer)

    detected: list[str | None] = []

    def detect() -> str | None:
        if not detected:
            try:
                found = default_bind_detector()
            except Exception:  # a detector must never stop the agent from starting
                found = None
            detected.append(found if found and _is_ip(found, 4) else None)
        return detected[0]

    # node and cluster
    if raw := pick("node"):
        node = _check(raw, lambda v: check_name(v.strip()))
    else:
        host_name = hostname()
        node = default_node_name(host_name)
        if not _NAME.fullmatch(node):
            raise ConfigError(f"the hostname {host_name!r} is not a usable node name: give --node")
    cluster = DEFAULT_CLUSTER
    if raw := pick("cluster"):
        cluster = _check(raw, lambda v: check_name(v.strip(), "cluster name"))

    # gossip addresses
    if raw := pick("bind"):
        host, port = _check(raw, parse_host_port, DEFAULT_GOSSIP_PORT, empty_host=True)
        bind = (host or detect() or FALLBACK_BIND_HOST, port)
    else:
        # Naming only the interface is enough: gossip binds to its address.
        bind = (
            _interface_hint(pick("mdns_interface")) or detect() or FALLBACK_BIND_HOST,
            DEFAULT_GOSSIP_PORT,
        )
    advertise: Addr | None = None
    if raw := pick("advertise"):
        advertise = _check(raw, parse_host_port, bind[1], zero_port=bind[1] == 0)
        if _is_wildcard(advertise[0]):
            raw.fail(f"{advertise[0]} is not an address peers can reach")
    elif _is_wildcard(bind[0]):
        found = detect()
        if found is None:
            where = (pick("bind") or _Raw(None, "--bind")).where
            raise ConfigError(
                f"{where}: {bind[0]} listens on every interface and no default route says "
                "which address peers should use: give --advertise ADDR"
            )
        advertise = (found, bind[1])
    join: list[Addr] = []
    if raw := pick("join"):
        for item in raw.value:
            addr = _check(
                _Raw(item, raw.where),
                parse_host_port,
                DEFAULT_GOSSIP_PORT,
                hostnames=True,
                zero_port=False,
            )
            if addr not in join:
                join.append(addr)

    # mDNS
    mdns = True
    if raw := pick("mdns"):
        mdns = bool(raw.value)
    mdns_interface = _mdns_default(bind, advertise)
    if raw := pick("mdns_interface"):
        ip = _check(raw, parse_ip)
        if _is_wildcard(ip):
            raw.fail(f"{ip} means every interface: name one address")
        mdns_interface = ip

    # state and key
    data_raw = pick("data_dir")
    if data_raw:
        data_dir = _check_dir(data_raw, _path(data_raw), must_exist=False)
    else:
        data_dir = default_data_dir(env, euid())
    key_raw = pick("key_file")
    key_file = _path(key_raw) if key_raw else data_dir / KEY_FILE_NAME
    _check_key_file(key_raw, key_file)

    # API
    api = (DEFAULT_API_HOST, DEFAULT_API_PORT)
    api_raw = pick("api")
    if api_raw:
        host, port = _check(api_raw, parse_host_port, DEFAULT_API_PORT, empty_host=True)
        api = (host or DEFAULT_API_HOST, port)
    api_token = _api_token(ns, env, layer)
    if api_token is None and not ipaddress.ip_address(api[0]).is_loopback:
        (api_raw or _Raw(None, "--api")).fail(
            f"{api[0]} is reachable from other hosts, so the API needs a token: "
            f"set {ENV_PREFIX}API_TOKEN or --api-token-file"
        )

    # node facts
    labels = _labels(
        r
        for r in (
            _from_flags(ns, _BY_NAME["labels"]),
            _from_env(env, _BY_NAME["labels"]),
            _from_file(layer, _BY_NAME["labels"]),
        )
        if r is not None
    )
    disks: list[Path] = []
    if raw := pick("disks"):
        for item in raw.value:
            entry = _Raw(item, raw.where, raw.base)
            path = _check_dir(entry, _path(entry), must_exist=True)
            if path not in disks:
                disks.append(path)
        if len(disks) > MAX_DISKS:
            raw.fail(f"too many disks: {len(disks)} (at most {MAX_DISKS})")

    # logging and timing
    log_format = _choice(raw, LOG_FORMATS) if (raw := pick("log_format")) else "text"
    log_level = _choice(raw, LOG_LEVELS) if (raw := pick("log_level")) else DEFAULT_LOG_LEVEL
    profile = _choice(raw, PROFILES) if (raw := pick("profile")) else DEFAULT_PROFILE
    driver = _choice(raw, DRIVERS) if (raw := pick("driver")) else "auto"
    docker_url = _text(raw) if (raw := pick("docker_url")) else None

    # routing mesh and DNS
    proxy_addresses: tuple[str, ...] | None = None
    if raw := pick("proxy_addresses"):
        found: list[str] = []
        for item in raw.value:
            ip = _check(_Raw(item, raw.where), parse_ip)
            if _is_wildcard(ip):
                raw.fail(f"{ip} means every interface: name each address")
            if ip not in found:
                found.append(ip)
        proxy_addresses = tuple(found)
    dns: Addr | None = DEFAULT_DNS
    if raw := pick("dns"):
        if str(raw.value).strip().lower() == "off":
            dns = None
        else:
            dns = _check(raw, parse_host_port, 53, zero_port=True)
            if _is_wildcard(dns[0]):
                raw.fail(f"{dns[0]} means every interface: name one address")
    dns_upstreams: tuple[Addr, ...] | None = None
    if raw := pick("dns_upstreams"):
        ups: list[Addr] = []
        for item in raw.value:
            addr = _check(_Raw(item, raw.where), parse_host_port, 53, zero_port=False)
            if addr not in ups:
                ups.append(addr)
        dns_upstreams = tuple(ups)

    return AgentConfig(
        node=node,
        bind=bind,
        advertise=advertise,
        api=api,
        data_dir=data_dir,
        join=tuple(join),
        cluster=cluster,
        key_file=key_file,
        mdns=mdns,
        mdns_interface=mdns_interface,
        labels=labels,
        log_format=log_format,
        log_level=log_level,
        profile=profile,
        driver=driver,
        docker_url=docker_url,
        api_token=api_token,
        disks=tuple(disks),
        config_file=layer.path if layer else None,
        proxy_addresses=proxy_addresses,
        dns=dns,
        dns_upstreams=dns_upstreams,
    )


def _api_token(
    ns: argparse.Namespace, env: Mapping[str, str], layer: _FileLayer | None
) -> str | None:
    """The token comes whole from the highest layer, given there directly or as a file."""
    direct, by_file = _BY_NAME["api_token"], _BY_NAME["api_token_file"]
    layers: list[tuple[_Raw | None, _Raw | None]] = [
        (None, _from_flags(ns, by_file)),
        (_from_env(env, direct), _from_env(env, by_file)),
        (_from_file(layer, direct), _from_file(layer, by_file)),
    ]
    for token_raw, file_raw in layers:
        if token_raw and file_raw:
            file_raw.fail(f"give the token or a token file, not both ({token_raw.where})")
        if token_raw:
            return _check_token(token_raw, str(token_raw.value))
        if file_raw:
            path = _path(file_raw)
            return _check_token(
                _Raw(path, f"{file_raw.where} {path}"), _read_secret(file_raw, path)
            )
    return None
