"""The TXT record an agent announces, and the checks applied to one heard from the LAN.

Pure functions, no sockets: a record from the network is untrusted input, so
decoding either yields a complete, valid ``Announcement`` or raises
``BadRecord`` with the reason, and the caller drops and counts it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass

# Version of what agents put in the record and expect of each other. A peer
# announces the newest version it speaks ("v") and the oldest it still
# accepts ("vmin"); two agents are compatible when those ranges overlap, so a
# rolling upgrade keeps old and new agents discovering each other.
PROTOCOL_VERSION = 1
MIN_PROTOCOL_VERSION = 1

MAX_NODE = 128
MAX_CLUSTER = 64
# A fingerprint is a short hash prefix. The charset excludes '+', '/' and '='
# and the length cap sits below the hex and base64 forms of a 32-byte key, so
# a caller that passes the key by mistake gets an error instead of
# broadcasting it to the LAN.
_FINGERPRINT = re.compile(r"[0-9A-Za-z:_.-]{4,40}")
_DIGITS = re.compile(r"[0-9]{1,5}")
# DNS character-strings hold at most 255 bytes, "key=value" included.
MAX_ENTRY = 255

KEYS = ("v", "vmin", "cluster", "fp", "node", "host", "port")


class BadRecord(ValueError):
    """A TXT record that is not a usable announcement; ``reason`` is a stats label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Peer:
    """A same-cluster agent, as the caller needs it to join through gossip."""

    node: str
    host: str  # IP literal
    port: int


@dataclass(frozen=True, slots=True)
class Announcement:
    """Everything one agent's TXT record says about it."""

    node: str
    cluster: str
    fingerprint: str
    host: str
    port: int
    version: int = PROTOCOL_VERSION
    min_version: int = MIN_PROTOCOL_VERSION

    @property
    def peer(self) -> Peer:
        return Peer(self.node, self.host, self.port)


# ----- field checks, shared by both directions --------------------------------


def _text(value: str, what: str, limit: int) -> str:
    if not isinstance(value, str) or not value:
        raise BadRecord("bad_" + what, f"{what} must be a non-empty string")
    if len(value.encode()) > limit:
        raise BadRecord("bad_" + what, f"{what} is longer than {limit} bytes")
    if not value.isprintable():
        raise BadRecord("bad_" + what, f"{what} {value!r} has control characters")
    return value


def check_fingerprint(value: str) -> str:
    if not isinstance(value, str) or not _FINGERPRINT.fullmatch(value):
        raise BadRecord(
            "bad_fingerprint",
            "a key fingerprint is 4-40 characters of [0-9A-Za-z:_.-] (a hash prefix, never the key)",
        )
    return value


def check_host(value: str) -> str:
    """An IP literal a peer can send to: no names (no lookups), no wildcard address."""
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise BadRecord("bad_host", f"host {value!r} is not an IP address") from None
    if ip.is_unspecified or ip.is_multicast:
        raise BadRecord("bad_host", f"host {value} cannot be a peer's address")
    return str(ip)


def check_port(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise BadRecord("bad_port", f"port {value!r} is not in 1-65535")
    return value


def _version(value: str, what: str) -> int:
    if not _DIGITS.fullmatch(value):
        raise BadRecord("bad_version", f"{what} {value!r} is not a small integer")
    return int(value)


# ----- encoding ---------------------------------------------------------------------


def encode_txt(
    *,
    node: str,
    cluster: str,
    key_fingerprint: str,
    host: str,
    port: int,
    version: int = PROTOCOL_VERSION,
    min_version: int = MIN_PROTOCOL_VERSION,
) -> dict[str, str]:
    """Properties for our own record; raises BadRecord (a ValueError) on bad settings."""
    if not 0 <= min_version <= version <= 99999:
        raise BadRecord("bad_version", f"versions {min_version}..{version} are not a range")
    props = {
        "v": str(version),
        "vmin": str(min_version),
        "cluster": _text(cluster, "cluster", MAX_CLUSTER),
        "fp": check_fingerprint(key_fingerprint),
        "node": _text(node, "node", MAX_NODE),
        "host": check_host(host),
        "port": str(check_port(port)),
    }
    for key, value in props.items():
        if len(key) + 1 + len(value.encode()) > MAX_ENTRY:  # pragma: no cover - limits above
            raise BadRecord("oversized", f"{key} does not fit a TXT entry")
    return props


# ----- decoding ---------------------------------------------------------------------


def split_txt(text: bytes) -> dict[bytes, bytes | None]:
    """TXT record data to properties (RFC 6763 6.3-6.4).

    Length-prefixed strings of key=value; keys are case-insensitive and the
    first occurrence wins; a key without '=' is present with no value.
    """
    props: dict[bytes, bytes | None] = {}
    i = 0
    while i < len(text):
        n = text[i]
        i += 1
        if i + n > len(text):
            raise BadRecord("bad_record", "TXT string runs past the end of the record")
        entry = text[i : i + n]
        i += n
        key, sep, value = entry.partition(b"=")
        if key:  # empty strings and ones starting with '=' carry nothing
            props.setdefault(key.lower(), value if sep else None)
    return props


def _field(props: Mapping[bytes, bytes | None], key: str) -> str:
    raw = props.get(key.encode())
    if raw is None:
        raise BadRecord("missing_" + key, f"no {key!r} in the record")
    if len(raw) + len(key) + 1 > MAX_ENTRY:
        raise BadRecord("oversized", f"{key!r} is {len(raw)} bytes")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise BadRecord("bad_" + key, f"{key!r} is not UTF-8") from None


def decode_txt(props: Mapping[bytes, bytes | None]) -> Announcement:
    """Read an announcement from TXT properties as zeroconf gives them (bytes to bytes)."""
    if not isinstance(props, Mapping):
        raise BadRecord("bad_record", "properties are not a mapping")
    version = _version(_field(props, "v"), "v")
    # An agent that predates "vmin" accepts only its own version.
    min_version = _version(_field(props, "vmin"), "vmin") if b"vmin" in props else version
    if min_version > version:
        raise BadRecord("bad_version", f"vmin {min_version} is above v {version}")
    port_text = _field(props, "port")
    if not _DIGITS.fullmatch(port_text):
        raise BadRecord("bad_port", f"port {port_text!r} is not a number")
    return Announcement(
        node=_text(_field(props, "node"), "node", MAX_NODE),
        cluster=_text(_field(props, "cluster"), "cluster", MAX_CLUSTER),
        fingerprint=check_fingerprint(_field(props, "fp")),
        host=check_host(_field(props, "host")),
        port=check_port(int(port_text)),
        version=version,
        min_version=min_version,
    )


def compatible(ann: Announcement) -> bool:
    """Do our supported versions overlap the peer's?"""
    return max(ann.min_version, MIN_PROTOCOL_VERSION) <= min(ann.version, PROTOCOL_VERSION)


def mismatch(ann: Announcement, *, cluster: str, key_fingerprint: str) -> str | None:
    """Why a valid announcement is not one of our peers (a stats label), or None if it is."""
    if ann.cluster != cluster:
        return "ignored_foreign_cluster"
    if ann.fingerprint != key_fingerprint:
        return "ignored_foreign_key"
    if not compatible(ann):
        return "ignored_incompatible_version"
    return None


def parse_txt(
    props: Mapping[bytes, bytes | None], *, cluster: str, key_fingerprint: str
) -> Peer | None:
    """The peer a record announces if it is valid and of our cluster, else None."""
    try:
        ann = decode_txt(props)
    except BadRecord:
        return None
    if mismatch(ann, cluster=cluster, key_fingerprint=key_fingerprint):
        return None
    return ann.peer
