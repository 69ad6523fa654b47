"""Property tests: hostile bytes never raise anything but DecodeError/OpenError; valid input round-trips."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossip import wire
from gossip.crypto import Keyring, OpenError, Sealer
from gossip.wire import (
    Ack,
    Alive,
    Dead,
    DecodeError,
    IndirectPing,
    MemberState,
    Nack,
    Ping,
    PushPull,
    StreamPing,
    Suspect,
    User,
    decode_packet,
    decode_stream,
    encode_message,
    encode_packet,
    encode_stream,
)

# Deterministic and quick: the whole file runs in a few seconds.
FUZZ = settings(
    max_examples=100,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

NOW = 1_700_000_000.0
KEY = bytes(range(32))

names = st.text(min_size=1, max_size=32)
hosts = st.ip_addresses().map(str)
ports = st.integers(1, 65535)
seqs = st.integers(0, wire.MAX_SEQ)
incs = st.integers(0, wire.MAX_INCARNATION)
metas = st.binary(max_size=wire.META_MAX)
finite = st.floats(width=32, allow_nan=False, allow_infinity=False)
nonneg = st.floats(width=32, min_value=0.0, allow_nan=False, allow_infinity=False)
coords = st.none() | st.tuples(
    st.lists(finite, min_size=1, max_size=wire.MAX_COORD_DIMS).map(tuple), nonneg, finite, nonneg
)

udp_messages = st.one_of(
    st.builds(Ping, seqs, names, names),
    st.builds(IndirectPing, seqs, names, hosts, ports, st.booleans()),
    st.builds(Ack, seqs, coords),
    st.builds(Nack, seqs),
    st.builds(Suspect, incs, names, names),
    st.builds(Alive, incs, names, hosts, ports, metas),
    st.builds(Dead, incs, names, names),
    st.builds(User, st.binary(max_size=200)),
)

members = st.builds(MemberState, names, hosts, ports, metas, incs, st.integers(0, 3))
stream_messages = st.one_of(
    st.builds(PushPull, st.booleans(), st.lists(members, max_size=6), st.binary(max_size=300)),
    st.builds(StreamPing, seqs, names, names),
    st.builds(Ack, seqs, coords),
)

packets = st.lists(udp_messages, min_size=1, max_size=8).map(
    lambda msgs: encode_packet([encode_message(m) for m in msgs])
)
frames = stream_messages.map(encode_stream)

# More than 255 messages: decoded on the incremental path. Built by repeating a few
# small messages so generation stays quick and the packet fits MAX_PACKET.
small_udp_messages = st.one_of(
    st.builds(Ping, seqs, names, names),
    st.builds(Ack, seqs, st.none()),
    st.builds(Nack, seqs),
    st.builds(Dead, incs, names, names),
)
many_messages = st.builds(
    lambda msgs, n: (msgs * n)[:n],
    st.lists(small_udp_messages, min_size=1, max_size=3),
    st.integers(256, 400),
)
big_packets = many_messages.map(lambda msgs: encode_packet([encode_message(m) for m in msgs]))


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    """Apply a few bit flips, truncations, insertions and deletions to valid input."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "byte"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and data:
            data[pos] = draw(
                st.sampled_from([0x00, 0x7F, 0x80, 0xC0, 0xC1, 0xC3, 0xDC, 0xDD, 0xFF])
            )
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
    return bytes(data)


def only_decode_error(fn: Any, data: bytes) -> None:
    try:
        fn(data)
    except DecodeError as exc:
        assert exc.reason in DecodeError.REASONS


def only_open_error(sealer: Sealer, data: bytes, stream: bool) -> bytes | None:
    try:
        return sealer.open(data, NOW, stream)
    except OpenError as exc:
        assert exc.reason in OpenError.REASONS
        return None


# ---------------------------------------------------------------- round trips


@FUZZ
@given(st.lists(udp_messages, min_size=1, max_size=8))
def test_packets_round_trip(msgs: list[Any]) -> None:
    packed = [encode_message(m) for m in msgs]
    data = encode_packet(packed)
    assert len(data) == wire.packet_overhead(len(msgs)) + sum(map(len, packed))
    assert decode_packet(data) == msgs


@FUZZ
@given(many_messages)
def test_big_packets_round_trip(msgs: list[Any]) -> None:
    assert decode_packet(encode_packet([encode_message(m) for m in msgs])) == msgs


@FUZZ
@given(stream_messages)
def test_frames_round_trip(msg: Any) -> None:
    out = decode_stream(encode_stream(msg))
    assert type(out) is type(msg)
    if isinstance(msg, PushPull):
        assert (out.join, list(out.members), out.app_state) == (
            msg.join,
            list(msg.members),
            msg.app_state,
        )
    else:
        assert out == msg


@FUZZ
@given(st.binary(max_size=2000), st.booleans())
def test_seal_round_trip(payload: bytes, stream: bool) -> None:
    for keyring in (Keyring([KEY]), None):
        a, b = Sealer("fuzz", keyring), Sealer("fuzz", keyring)
        assert b.open(a.seal(payload, NOW, stream), NOW, stream) == payload


# ---------------------------------------------------------------- hostile input


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(data: bytes) -> None:
    only_decode_error(decode_packet, data)
    only_decode_error(decode_stream, data)


@FUZZ
@given(mutated(packets))
def test_mutated_packets(data: bytes) -> None:
    only_decode_error(decode_packet, data)
    only_decode_error(decode_stream, data)


@FUZZ
@given(mutated(big_packets))
def test_mutated_big_packets(data: bytes) -> None:
    only_decode_error(decode_packet, data)


@FUZZ
@given(mutated(frames))
def test_mutated_frames(data: bytes) -> None:
    only_decode_error(decode_stream, data)
    only_decode_error(decode_packet, data)


@FUZZ
@given(st.binary(max_size=256), st.booleans())
def test_random_bytes_open(data: bytes, stream: bool) -> None:
    for sealer in (Sealer("fuzz", Keyring([KEY])), Sealer("fuzz", None)):
        opened = only_open_error(sealer, data, stream)
        if opened is not None:
            only_decode_error(decode_packet, opened)


_SENDERS = (Sealer("fuzz", Keyring([KEY])), Sealer("fuzz", None))


@st.composite
def sealed(draw: st.DrawFn) -> tuple[bytes, bool, int]:
    which = draw(st.integers(0, 1))
    stream = draw(st.booleans())
    payload = draw(frames if stream else packets)
    return _SENDERS[which].seal(payload, NOW, stream), stream, which


@FUZZ
@given(sealed(), st.data())
def test_mutated_sealed_input(case: tuple[bytes, bool, int], data: st.DataObject) -> None:
    raw, stream, which = case
    forged = data.draw(mutated(st.just(raw)))
    receiver = Sealer("fuzz", Keyring([KEY]) if which == 0 else None)
    opened = only_open_error(receiver, forged, stream)
    if opened is not None:
        only_decode_error(decode_stream if stream else decode_packet, opened)
    if which == 0 and forged != raw:
        # Any change to an authenticated envelope is refused.
        assert opened is None
