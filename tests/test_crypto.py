"""Sealing: encryption, cluster binding, key rotation, replay protection and Keyring errors."""

from __future__ import annotations

import base64
import struct

import pytest

from gossip.crypto import KEY_SIZE, Keyring, OpenError, Sealer, cluster_tag

NOW = 1_700_000_000.0
K1 = bytes(range(32))
K2 = bytes(range(100, 132))
K3 = b"\xaa" * 32


def reason(sealer: Sealer, data: bytes, wall: float = NOW, stream: bool = False) -> str:
    with pytest.raises(OpenError) as info:
        sealer.open(data, wall, stream)
    assert info.value.reason in OpenError.REASONS
    return info.value.reason


def enc(cluster: str = "prod", *keys: bytes, **kw: float) -> Sealer:
    return Sealer(cluster, Keyring(list(keys) or [K1]), **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------- encrypted mode


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("size", [0, 1, 200, 65000])
def test_round_trip(size: int, stream: bool) -> None:
    a, b = enc(), enc()
    msg = bytes(i % 251 for i in range(size))
    sealed = a.seal(msg, NOW, stream)
    assert len(sealed) == size + a.overhead
    assert b.open(sealed, NOW + 1, stream) == msg


def test_layout_and_secrecy() -> None:
    sealed = enc().seal(b"secret payload", NOW)
    assert sealed[0] == 1
    assert struct.unpack(">Q", sealed[1:9])[0] == int(NOW * 1000)
    assert b"secret" not in sealed
    assert enc().seal(b"secret payload", NOW)[9:21] != sealed[9:21]  # fresh nonce


def test_wrong_key() -> None:
    assert reason(enc("prod", K2), enc("prod", K1).seal(b"x", NOW)) == "auth"


def test_other_cluster_with_same_key() -> None:
    assert reason(enc("staging"), enc("prod").seal(b"x", NOW)) == "auth"


def test_tampering_is_detected() -> None:
    sealed = bytearray(enc().seal(b"payload", NOW))
    for i in (0 + 5, 12, len(sealed) - 1):  # timestamp, nonce, tag
        forged = bytearray(sealed)
        forged[i] ^= 1
        assert reason(enc(), bytes(forged)) == "auth"


def test_udp_packet_cannot_open_as_stream() -> None:
    a, b = enc(), enc()
    assert reason(b, a.seal(b"x", NOW, stream=False), stream=True) == "auth"
    assert reason(b, a.seal(b"x", NOW, stream=True), stream=False) == "auth"


def test_replay() -> None:
    a, b = enc(), enc()
    sealed = a.seal(b"x", NOW)
    assert b.open(sealed, NOW) == b"x"
    assert reason(b, sealed, NOW + 1) == "replay"


def test_same_nonce_cache_covers_both_domains() -> None:
    a, b = enc(), enc()
    assert b.open(a.seal(b"u", NOW), NOW) == b"u"
    assert b.open(a.seal(b"t", NOW, True), NOW, True) == b"t"


@pytest.mark.parametrize("skew", [-60.001, 60.001, -3600, 3600])
def test_stale(skew: float) -> None:
    sealed = enc().seal(b"x", NOW + skew)
    assert reason(enc(), sealed) == "stale"


@pytest.mark.parametrize("skew", [-59.9, 0, 59.9])
def test_within_window(skew: float) -> None:
    assert enc().open(enc().seal(b"x", NOW + skew), NOW) == b"x"


def test_custom_replay_window() -> None:
    sealed = enc().seal(b"x", NOW - 5)
    assert reason(enc(replay_window=2.0), sealed) == "stale"


def test_replayed_packet_after_the_window_is_stale_not_accepted() -> None:
    a, b = enc(), enc()
    sealed = a.seal(b"x", NOW)
    b.open(sealed, NOW)
    # Nonce cache entry has expired, but the timestamp check refuses it.
    assert reason(b, sealed, NOW + 61) == "stale"


def test_nonce_cache_is_pruned_and_bounded() -> None:
    a, b = enc(), enc(max_nonces=100)
    for i in range(250):
        b.open(a.seal(b"x", NOW + i * 0.001), NOW + i * 0.001)
    assert len(b._seen) == len(b._seen_order) == 100
    later = NOW + 1000
    b.open(a.seal(b"x", later), later)
    assert len(b._seen) == 1


def test_forged_packets_do_not_enter_the_nonce_cache() -> None:
    b = enc()
    sealed = enc("prod", K2).seal(b"x", NOW)
    for _ in range(3):
        assert reason(b, sealed) == "auth"
    assert not b._seen


def test_stale_packets_do_not_enter_the_nonce_cache() -> None:
    b = enc()
    reason(b, enc().seal(b"x", NOW - 3600))
    assert not b._seen


@pytest.mark.parametrize("cut", [1, 5, 21, 36])
def test_truncated(cut: int) -> None:
    sealed = enc().seal(b"", NOW)
    assert len(sealed) == 37
    assert reason(enc(), sealed[:cut]) == "truncated"


def test_empty_input() -> None:
    assert reason(enc(), b"") == "truncated"
    assert reason(Sealer("prod", None), b"") == "truncated"


def test_plaintext_packet_on_encrypted_cluster() -> None:
    assert reason(enc(), Sealer("prod", None).seal(b"x", NOW)) == "plaintext"


def test_unknown_envelope() -> None:
    assert reason(enc(), b"\x07" + b"\x00" * 60) == "auth"
    assert reason(Sealer("prod", None), b"\x07" + b"\x00" * 60) == "wrong_cluster"


def test_non_bytes_input_is_an_open_error() -> None:
    with pytest.raises(OpenError):
        enc().open(12345, NOW)  # type: ignore[arg-type]
    with pytest.raises(OpenError):
        Sealer("prod", None).open(object(), NOW)  # type: ignore[arg-type]


def test_bytes_like_inputs() -> None:
    sealed = enc().seal(memoryview(b"abc"), NOW)
    assert enc().open(bytearray(sealed), NOW) == b"abc"
    assert enc().open(memoryview(enc().seal(b"abc", NOW)), NOW) == b"abc"


# ---------------------------------------------------------------- key rotation


def test_rotation_without_downtime() -> None:
    ring_a, ring_b = Keyring([K1]), Keyring([K1])
    a, b = Sealer("prod", ring_a), Sealer("prod", ring_b)
    # Step 1: every node installs the new key as secondary.
    ring_a.add_key(K2)
    ring_b.add_key(K2)
    assert b.open(a.seal(b"1", NOW), NOW) == b"1"
    # Step 2: a switches first; b still seals with the old key.
    ring_a.use_key(K2)
    assert ring_a.primary == K2 and ring_a.keys == [K2, K1]
    assert b.open(a.seal(b"2", NOW), NOW) == b"2"  # new primary, secondary on b
    assert a.open(b.seal(b"3", NOW), NOW) == b"3"  # old key still accepted on a
    # Step 3: everyone on the new key, the old one removed.
    ring_b.use_key(K2)
    ring_a.remove_key(K1)
    ring_b.remove_key(K1)
    assert b.open(a.seal(b"4", NOW), NOW) == b"4"
    old = Sealer("prod", Keyring([K1]))
    assert reason(b, old.seal(b"5", NOW)) == "auth"


def test_primary_argument() -> None:
    ring = Keyring([K1, K2, K3], primary=K3)
    assert ring.primary == K3
    assert ring.keys[0] == K3 and sorted(ring.keys) == sorted([K1, K2, K3])
    assert Keyring([K1, K2]).primary == K1
    assert Keyring([K1, K1, K2]).keys == [K1, K2]


def test_keys_is_a_copy() -> None:
    ring = Keyring([K1])
    ring.keys.append(K2)
    assert ring.keys == [K1]


def test_add_key_is_idempotent() -> None:
    ring = Keyring([K1])
    ring.add_key(K2)
    ring.add_key(K2)
    assert ring.keys == [K1, K2]


# ---------------------------------------------------------------- keyring errors


@pytest.mark.parametrize("keys", [[], [b"short"], [b"x" * 33], [K1, b"x" * 16], ["a" * 32]])
def test_keyring_rejects_bad_keys(keys: list) -> None:
    with pytest.raises(ValueError):
        Keyring(keys)


def test_keyring_operation_errors() -> None:
    with pytest.raises(ValueError):
        Keyring([K1], primary=K2)
    ring = Keyring([K1, K2])
    with pytest.raises(ValueError):
        ring.remove_key(K1)  # the primary
    with pytest.raises(ValueError):
        ring.remove_key(K3)  # not installed
    with pytest.raises(ValueError):
        ring.use_key(K3)  # not installed
    with pytest.raises(ValueError):
        ring.add_key(b"x")
    assert ring.keys == [K1, K2]


def test_generate() -> None:
    a, b = Keyring.generate(), Keyring.generate()
    assert len(a) == KEY_SIZE and a != b


def test_key_text_round_trip() -> None:
    key = Keyring.generate()
    text = Keyring.encode_key(key)
    assert Keyring.decode_key(text) == key
    assert Keyring.decode_key(f"  {text[:10]}\n{text[10:]}\n") == key


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not base64!",
        base64.b64encode(b"x" * 16).decode(),
        base64.b64encode(b"x" * 33).decode(),
        base64.b64encode(K1).decode()[:-2],
    ],
)
def test_decode_key_errors(text: str) -> None:
    with pytest.raises(ValueError, match="key"):
        Keyring.decode_key(text)


def test_fingerprint_never_reveals_the_key() -> None:
    for key in (K1, K2, K3, Keyring.generate()):
        fp = Keyring.fingerprint(key)
        assert fp == Keyring.fingerprint(key)
        assert 8 <= len(fp) <= 32
        assert fp not in key.hex() and key.hex()[:8] not in fp
        assert fp not in Keyring.encode_key(key)
        assert bytes.fromhex(fp) not in key
    assert Keyring.fingerprint(K1) != Keyring.fingerprint(K2)


# ---------------------------------------------------------------- plaintext mode


def test_plaintext_round_trip() -> None:
    a, b = Sealer("prod", None), Sealer("prod", None)
    sealed = a.seal(b"hello", NOW)
    assert sealed == b"\x00" + cluster_tag("prod") + b"hello"
    assert len(sealed) == 5 + a.overhead
    assert b.open(sealed, NOW) == b"hello"
    assert b.open(sealed, NOW) == b"hello"  # no replay protection without keys
    assert b.open(a.seal(b"", NOW, True), NOW, True) == b""


def test_plaintext_wrong_cluster() -> None:
    sealed = Sealer("staging", None).seal(b"x", NOW)
    assert reason(Sealer("prod", None), sealed) == "wrong_cluster"


def test_plaintext_truncated() -> None:
    assert reason(Sealer("prod", None), b"\x00" + cluster_tag("prod")[:3]) == "truncated"


def test_encrypted_packet_on_plaintext_cluster() -> None:
    assert reason(Sealer("prod", None), enc().seal(b"x", NOW)) == "encrypted"


def test_overheads() -> None:
    assert Sealer("prod", None).overhead == 5
    assert enc().overhead == 1 + 8 + 12 + 16
    assert not Sealer("prod", None).encrypted and enc().encrypted


def test_sealer_argument_checks() -> None:
    with pytest.raises(ValueError):
        enc(replay_window=0)
    with pytest.raises(ValueError):
        enc(max_nonces=0)
    with pytest.raises(TypeError):
        Sealer(b"prod", None)  # type: ignore[arg-type]
