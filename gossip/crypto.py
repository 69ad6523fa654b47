"""Security layer: seals packets and stream frames with AES-256-GCM, or tags them in plaintext mode.

Encrypted format (first byte 1)::

    0x01 | ts_ms (uint64 BE, sender's wall clock) | nonce (12 random bytes) | ciphertext+tag

The AAD is the 21-byte header, then the domain (``b"udp"`` or ``b"tcp"``), then the
cluster name in UTF-8. Binding the cluster name keeps two clusters that happen to
share a key apart; binding the domain stops a UDP packet being replayed as a stream
frame. Authenticated frames older or newer than the replay window, or whose nonce
was already seen inside it, are refused.

Plaintext format (first byte 0), an explicit choice made by passing no keyring::

    0x00 | first 4 bytes of sha256(b"gossip-cluster:" + name) | plaintext

The tag only keeps neighbouring clusters from merging by accident; it is no
protection against anyone.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
from collections import deque
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16

_PLAIN = 0
_AEAD_V1 = 1
_HEADER = struct.Struct(">BQ12s")  # flag, ts_ms, nonce: 21 bytes
SEALED_OVERHEAD = _HEADER.size + TAG_SIZE
PLAIN_OVERHEAD = 1 + 4


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_SIZE:
        raise ValueError(f"a key must be {KEY_SIZE} bytes")
    return bytes(key)


class Keyring:
    """One primary key that seals, plus older keys still accepted, so keys rotate without downtime.

    Rotation: ``add_key(new)`` on every node, then ``use_key(new)`` on every node,
    then ``remove_key(old)``.
    """

    def __init__(self, keys: Sequence[bytes], primary: bytes | None = None) -> None:
        if not keys:
            raise ValueError("a keyring needs at least one key")
        self._aeads: dict[bytes, AESGCM] = {}
        for key in keys:
            key = _check_key(key)
            if key not in self._aeads:
                self._aeads[key] = AESGCM(key)
        first = _check_key(keys[0] if primary is None else primary)
        if first not in self._aeads:
            raise ValueError("the primary key must be one of the keys")
        self._order: list[bytes] = []
        self._set_primary(first)

    def _set_primary(self, key: bytes) -> None:
        self._order = [key, *(k for k in self._aeads if k != key)]
        # Read by the sealer on every packet: kept ready-made.
        self.primary_aead = self._aeads[key]
        self.aeads: tuple[AESGCM, ...] = tuple(self._aeads[k] for k in self._order)

    @property
    def primary(self) -> bytes:
        return self._order[0]

    @property
    def keys(self) -> list[bytes]:
        """Installed keys, primary first."""
        return list(self._order)

    def add_key(self, key: bytes) -> None:
        """Accept ``key`` from now on (no-op if already installed); the primary is unchanged."""
        key = _check_key(key)
        if key not in self._aeads:
            self._aeads[key] = AESGCM(key)
            self._set_primary(self._order[0])

    def use_key(self, key: bytes) -> None:
        """Seal with ``key`` from now on; it must already be installed."""
        key = _check_key(key)
        if key not in self._aeads:
            raise ValueError("key is not installed; add_key() it first")
        self._set_primary(key)

    def remove_key(self, key: bytes) -> None:
        """Stop accepting ``key``. Removing the primary or a key not installed is an error."""
        key = _check_key(key)
        if key == self._order[0]:
            raise ValueError("cannot remove the primary key; use_key() another first")
        if key not in self._aeads:
            raise ValueError("key is not installed")
        del self._aeads[key]
        self._set_primary(self._order[0])

    @staticmethod
    def generate() -> bytes:
        return os.urandom(KEY_SIZE)

    @staticmethod
    def decode_key(text: str) -> bytes:
        """Parse a base64 key as an operator would paste it (whitespace anywhere is ignored)."""
        compact = "".join(str(text).split())
        try:
            key = base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("key is not valid base64") from None
        if len(key) != KEY_SIZE:
            raise ValueError(f"key must decode to {KEY_SIZE} bytes, got {len(key)}")
        return key

    @staticmethod
    def encode_key(key: bytes) -> str:
        return base64.b64encode(_check_key(key)).decode("ascii")

    @staticmethod
    def fingerprint(key: bytes) -> str:
        """Short identifier that is safe to log or announce: a hash prefix, not the key."""
        digest = hashlib.sha256(b"gossip-key-fingerprint:" + _check_key(key)).hexdigest()
        return digest[:16]


class OpenError(ValueError):
    """A packet or frame that cannot be opened; ``reason`` is a metrics label."""

    REASONS = frozenset(
        {"truncated", "wrong_cluster", "auth", "stale", "replay", "plaintext", "encrypted"}
    )

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def cluster_tag(cluster: str) -> bytes:
    return hashlib.sha256(b"gossip-cluster:" + cluster.encode()).digest()[:4]


class Sealer:
    """Seals outgoing and opens incoming packets for one cluster.

    Replay protection keeps the nonces of authenticated frames until their timestamp
    leaves the window; at most ``max_nonces`` are kept, the oldest evicted first.
    Plaintext mode has no replay protection: there is nothing to authenticate.
    """

    def __init__(
        self,
        cluster: str,
        keyring: Keyring | None,
        replay_window: float = 60.0,
        max_nonces: int = 200_000,
    ) -> None:
        if not isinstance(cluster, str):
            raise TypeError("cluster name must be a str")
        if replay_window <= 0 or max_nonces < 1:
            raise ValueError("replay_window and max_nonces must be positive")
        self.cluster = cluster
        self.keyring = keyring
        self.replay_window = float(replay_window)
        self.max_nonces = max_nonces
        name = cluster.encode()
        self._aad_suffix = (b"udp" + name, b"tcp" + name)
        self._plain_prefix = bytes((_PLAIN,)) + cluster_tag(cluster)
        self.overhead: int = PLAIN_OVERHEAD if keyring is None else SEALED_OVERHEAD
        self._seen: set[bytes] = set()
        self._seen_order: deque[tuple[float, bytes]] = deque()

    @property
    def encrypted(self) -> bool:
        return self.keyring is not None

    def seal(self, plaintext: bytes, wall: float, stream: bool = False) -> bytes:
        keyring = self.keyring
        if keyring is None:
            return self._plain_prefix + plaintext
        nonce = os.urandom(NONCE_SIZE)
        # A wall clock before 1970 or past uint64 milliseconds is a caller bug: struct raises.
        header = _HEADER.pack(_AEAD_V1, int(wall * 1000.0), nonce)
        return header + keyring.primary_aead.encrypt(
            nonce, plaintext, header + self._aad_suffix[stream]
        )

    def open(self, data: bytes, wall: float, stream: bool = False) -> bytes:
        """Authenticate and strip the envelope; raises only OpenError."""
        try:
            return self._open(data, wall, stream)
        except OpenError:
            raise
        except Exception as exc:  # e.g. a non-bytes argument: still a clean refusal
            raise OpenError("truncated", f"{type(exc).__name__}: {exc}") from None

    def _open(self, data: bytes, wall: float, stream: bool) -> bytes:
        if not data:
            raise OpenError("truncated")
        if type(data) is not bytes:
            data = bytes(data)
        flag = data[0]
        keyring = self.keyring
        if flag == _PLAIN:
            if keyring is not None:
                raise OpenError("plaintext", "plaintext packet on an encrypted cluster")
            if len(data) < PLAIN_OVERHEAD:
                raise OpenError("truncated")
            if data[:PLAIN_OVERHEAD] != self._plain_prefix:
                raise OpenError("wrong_cluster")
            return data[PLAIN_OVERHEAD:]
        if flag != _AEAD_V1:
            # Not from a compatible sender: unauthenticated, or not our cluster.
            raise OpenError("auth" if keyring is not None else "wrong_cluster", "unknown envelope")
        if keyring is None:
            raise OpenError("encrypted", "encrypted packet on a plaintext cluster")
        if len(data) < SEALED_OVERHEAD:
            raise OpenError("truncated")
        header = data[: _HEADER.size]
        _, ts_ms, nonce = _HEADER.unpack(header)
        aad = header + self._aad_suffix[stream]
        body = data[_HEADER.size :]
        for aead in keyring.aeads:
            try:
                plaintext = aead.decrypt(nonce, body, aad)
                break
            except InvalidTag:
                continue
        else:
            raise OpenError("auth")
        # Checked only once authentic, so forged packets cannot fill the nonce cache
        # and the reason reported is true (a stale frame means real clock skew).
        ts = ts_ms / 1000.0
        window = self.replay_window
        if not wall - window <= ts <= wall + window:
            raise OpenError("stale", f"timestamp off by {ts - wall:.1f}s")
        seen = self._seen
        order = self._seen_order
        while order and order[0][0] < wall:
            seen.discard(order.popleft()[1])
        if nonce in seen:
            raise OpenError("replay")
        if len(order) >= self.max_nonces:
            seen.discard(order.popleft()[1])
        seen.add(nonce)
        order.append((ts + window, nonce))
        return plaintext
