"""Wire format: round trips, compounding, and every limit and type check."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest

from gossip import wire
from gossip.wire import (
    Ack,
    Alive,
    Dead,
    DecodeError,
    IndirectPing,
    MemberState,
    MsgType,
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

COORD = ((0.5, -1.25, 3.0), 0.25, -0.015625, 2.0**-13)  # exact in float32, as sent

SAMPLES = [
    Ping(7, "node-b", "node-a"),
    IndirectPing(2**32 - 1, "node-c", "fe80::1", 7946, True),
    IndirectPing(0, "node-c", "10.1.2.3", 1, False),
    Ack(9, None),
    Ack(9, COORD),
    Nack(4),
    Suspect(3, "node-c", "node-a"),
    Alive(2**64 - 1, "ноде-ü", "192.168.0.10", 65535, b"\x00" * wire.META_MAX),
    Alive(0, "n", "::1", 7946, b""),
    Dead(5, "node-d", "node-d"),
    User(b"hello"),
    User(b""),
]


def pkt(*msgs: Any, version: Any = wire.VERSION) -> bytes:
    """Pack raw message arrays the way a (possibly hostile) peer could."""
    return msgpack.packb([version, *msgs], use_bin_type=True)


def reason_of(data: bytes) -> str:
    with pytest.raises(DecodeError) as info:
        decode_packet(data)
    return info.value.reason


def stream_reason_of(data: bytes) -> str:
    with pytest.raises(DecodeError) as info:
        decode_stream(data)
    return info.value.reason


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_single_message_round_trip(msg: Any) -> None:
    out = decode_packet(encode_packet([encode_message(msg)]))
    assert out == [msg]
    assert type(out[0]) is type(msg)


def test_message_wire_form_is_a_type_tagged_array() -> None:
    raw = msgpack.unpackb(encode_message(Alive(3, "a", "10.0.0.1", 80, b"m")), raw=False)
    assert raw == [MsgType.ALIVE, 3, "a", "10.0.0.1", 80, b"m"]
    raw = msgpack.unpackb(encode_message(IndirectPing(1, "t", "::1", 9, True)), raw=False)
    assert raw[-1] is True


def test_compound_packet_keeps_order() -> None:
    packed = [encode_message(m) for m in SAMPLES]
    assert decode_packet(encode_packet(packed)) == SAMPLES


@pytest.mark.parametrize("n", [1, 14, 15, 16, 17, 200, 254, 255, 256, 257, 1000, 21000])
def test_packet_header_sizes(n: int) -> None:
    # Packets of more than 255 messages take the incremental decoding path.
    packed = [encode_message(Nack(i % 100)) for i in range(n)]
    data = encode_packet(packed)
    assert len(data) <= wire.MAX_PACKET
    assert len(data) == wire.packet_overhead(n) + sum(map(len, packed))
    assert wire.packet_overhead(n) <= wire.PACKET_OVERHEAD
    # The hand-written header must agree with msgpack's own encoding.
    assert data == msgpack.packb([wire.VERSION, *[[4, i % 100] for i in range(n)]])
    assert decode_packet(data) == [Nack(i % 100) for i in range(n)]


def test_large_packet_errors() -> None:
    packed = [encode_message(m) for m in SAMPLES[:-2]] * 30
    data = encode_packet(packed)
    assert decode_packet(data) == SAMPLES[:-2] * 30
    assert reason_of(data[:-1]) == "truncated"
    assert reason_of(data + b"\x00") == "malformed"
    assert reason_of(data.replace(b"node-c", b"node-\xff")) == "malformed"
    bad = encode_packet([*packed, msgpack.packb([MsgType.NACK, -1])])
    assert reason_of(bad) == "field"
    assert reason_of(encode_packet([*packed, msgpack.packb([99])])) == "type"
    head = b"\xdc" + struct.pack(">H", len(packed) + 1)
    assert reason_of(head + b"\x02" + b"".join(packed)) == "version"
    # A claimed array header inside: the incremental path caps inner arrays too.
    assert reason_of(b"\xdc\x01\x01\x01" + b"\xdc\xff\xff" * 1000) == "malformed"
    assert reason_of(b"\xdc\xff\xff" + b"\x01" * 10) == "truncated"


def test_encode_packet_rejects_empty_and_too_many() -> None:
    with pytest.raises(ValueError):
        encode_packet([])
    with pytest.raises(ValueError):
        encode_packet([encode_message(Nack(1))] * (wire.MAX_MESSAGES + 1))


def test_ack_coord_ints_become_floats() -> None:
    data = pkt([MsgType.ACK, 1, [[1, 2], 0, -3, 4]])
    (ack,) = decode_packet(data)
    assert ack == Ack(1, ((1.0, 2.0), 0.0, -3.0, 4.0))
    assert all(type(x) is float for x in ack.coord[0])
    assert type(ack.coord[1]) is float


def test_messages_of_different_types_are_never_equal() -> None:
    assert Ping(1, "a", "b") != StreamPing(1, "a", "b")
    assert Suspect(1, "a", "b") != Dead(1, "a", "b")
    assert hash(Suspect(1, "a", "b")) != hash(Dead(1, "a", "b"))
    assert Ping(1, "a", "b") == Ping(1, "a", "b")
    assert len({Ping(1, "a", "b"), Ping(1, "a", "b")}) == 1


# ---------------------------------------------------------------- packet-level errors


def test_oversized() -> None:
    assert reason_of(b"\x00" * (wire.MAX_PACKET + 1)) == "oversized"


@pytest.mark.parametrize("data", [b"", pkt([4, 1])[:-1], b"\x92\x01"])
def test_truncated(data: bytes) -> None:
    assert reason_of(data) == "truncated"


@pytest.mark.parametrize(
    "data",
    [
        pkt([4, 1]) + b"\x00",  # trailing bytes
        b"\xc1",  # never-used msgpack byte
        msgpack.packb({"a": 1}),  # map (maps are not allowed at all)
        msgpack.packb(1),  # not an array
        msgpack.packb([]),  # no version
        pkt(),  # no messages
        pkt([]),  # empty message
        pkt(5),  # message that is not an array
        msgpack.packb(msgpack.ExtType(1, b"x")),  # ext type
        msgpack.packb([1, [4, 1], {"k": 1}]),
        b"\x92\x01\xa2\xff\xfe",  # invalid UTF-8 in a str
        b"\xdc\x00\xff" + b"\x91" * 1024 + b"\xdc\x00\xff",  # nested array headers
    ],
)
def test_malformed(data: bytes) -> None:
    assert reason_of(data) == "malformed"


@pytest.mark.parametrize("version", [0, 2, True, 1.0, "1", None])
def test_version(version: Any) -> None:
    assert reason_of(pkt([4, 1], version=version)) == "version"


@pytest.mark.parametrize(
    "t", [0, 9, 10, 11, 255, -1, True, 1.0, "1", None, MsgType.PUSH_PULL, MsgType.STREAM_PING]
)
def test_unknown_or_stream_only_type(t: Any) -> None:
    assert reason_of(pkt([t, 1, "a", "b"])) == "type"


def test_one_bad_message_rejects_the_whole_packet() -> None:
    data = pkt([4, 1], [1, 2, "a", "b"], [4, -1])
    assert reason_of(data) == "field"


def test_deeply_nested_input_is_refused() -> None:
    assert reason_of(b"\x91" * 5000 + b"\x01") == "malformed"


# ---------------------------------------------------------------- field checks

GOOD = {
    MsgType.PING: [1, "t", "s"],
    MsgType.INDIRECT_PING: [1, "t", "10.0.0.1", 80, False],
    MsgType.ACK: [1, None],
    MsgType.NACK: [1],
    MsgType.SUSPECT: [1, "n", "s"],
    MsgType.ALIVE: [1, "n", "10.0.0.1", 80, b""],
    MsgType.DEAD: [1, "n", "s"],
    MsgType.USER: [b"x"],
}


@pytest.mark.parametrize("t", list(GOOD))
def test_good_fields_decode(t: MsgType) -> None:
    assert len(decode_packet(pkt([t, *GOOD[t]]))) == 1


@pytest.mark.parametrize("t", list(GOOD))
def test_wrong_field_count(t: MsgType) -> None:
    fields = GOOD[t]
    assert reason_of(pkt([t, *fields[:-1]])) == "field"
    assert reason_of(pkt([t, *fields, 0])) == "field"


def bad(t: MsgType, index: int, value: Any) -> bytes:
    fields = list(GOOD[t])
    fields[index] = value
    return pkt([t, *fields])


LONG_NAME = "x" * (wire.MAX_NAME + 1)
LONG_UTF8 = "é" * (wire.MAX_NAME // 2 + 1)  # 66 characters, 132 bytes

FIELD_CASES = [
    # seq
    (MsgType.PING, 0, -1),
    (MsgType.PING, 0, 2**32),
    (MsgType.PING, 0, True),
    (MsgType.PING, 0, 1.0),
    (MsgType.PING, 0, "1"),
    (MsgType.NACK, 0, 2**32),
    (MsgType.ACK, 0, False),
    # names
    (MsgType.PING, 1, ""),
    (MsgType.PING, 1, LONG_NAME),
    (MsgType.PING, 2, LONG_UTF8),
    (MsgType.PING, 2, b"bytes"),
    (MsgType.PING, 2, None),
    (MsgType.SUSPECT, 1, 7),
    (MsgType.DEAD, 2, ""),
    (MsgType.ALIVE, 1, LONG_NAME),
    # incarnation
    (MsgType.SUSPECT, 0, -1),
    (MsgType.ALIVE, 0, True),
    (MsgType.DEAD, 0, 1.5),
    # host
    (MsgType.ALIVE, 2, "example.com"),
    (MsgType.ALIVE, 2, "10.0.0.256"),
    (MsgType.ALIVE, 2, ""),
    (MsgType.ALIVE, 2, " 10.0.0.1"),
    (MsgType.ALIVE, 2, b"10.0.0.1"),
    (MsgType.INDIRECT_PING, 2, "1" * 100),
    (MsgType.INDIRECT_PING, 2, 167772161),
    # port
    (MsgType.ALIVE, 3, 0),
    (MsgType.ALIVE, 3, 65536),
    (MsgType.ALIVE, 3, True),
    (MsgType.INDIRECT_PING, 3, -80),
    # meta
    (MsgType.ALIVE, 4, b"m" * (wire.META_MAX + 1)),
    (MsgType.ALIVE, 4, "meta"),
    (MsgType.ALIVE, 4, None),
    # nack flag
    (MsgType.INDIRECT_PING, 4, 1),
    (MsgType.INDIRECT_PING, 4, 0),
    (MsgType.INDIRECT_PING, 4, None),
    # user payload
    (MsgType.USER, 0, "text"),
    (MsgType.USER, 0, None),
]


@pytest.mark.parametrize(("t", "index", "value"), FIELD_CASES)
def test_field_rejected(t: MsgType, index: int, value: Any) -> None:
    assert reason_of(bad(t, index, value)) == "field"


def test_name_limit_is_in_utf8_bytes() -> None:
    ok = "é" * (wire.MAX_NAME // 2)  # exactly 128 bytes
    assert decode_packet(pkt([MsgType.PING, 1, ok, "x" * wire.MAX_NAME]))[0].target == ok


@pytest.mark.parametrize(
    "coord",
    [
        [],
        [[1.0], 0.0, 0.0],
        [[1.0], 0.0, 0.0, 0.0, 0.0],
        [[], 0.0, 0.0, 0.0],
        [[0.0] * (wire.MAX_COORD_DIMS + 1), 0.0, 0.0, 0.0],
        [[float("nan")], 0.0, 0.0, 0.0],
        [[float("inf")], 0.0, 0.0, 0.0],
        [[1.0], float("-inf"), 0.0, 0.0],
        [[1.0], 0.0, float("nan"), 0.0],
        [[1.0], -0.1, 0.0, 0.0],
        [[1.0], 0.0, 0.0, -1.0],
        [[True], 0.0, 0.0, 0.0],
        [[1.0], False, 0.0, 0.0],
        [["1"], 0.0, 0.0, 0.0],
        [(1.0,), 0.0, 0.0, None],
        [b"\x01", 0.0, 0.0, 0.0],
        "coord",
        0,
    ],
)
def test_bad_coord(coord: Any) -> None:
    assert reason_of(pkt([MsgType.ACK, 1, coord])) == "field"


def test_coord_dimension_limit_accepted() -> None:
    coord = [[0.0] * wire.MAX_COORD_DIMS, 0.0, 0.0, 0.0]
    (ack,) = decode_packet(pkt([MsgType.ACK, 1, coord]))
    assert len(ack.coord[0]) == wire.MAX_COORD_DIMS


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "0.0.0.0", "::1", "2001:db8::8a2e:370:7334", "fe80::1%eth0", "::ffff:1.2.3.4"],
)
def test_hosts_accepted(host: str) -> None:
    assert decode_packet(pkt([MsgType.ALIVE, 1, "n", host, 80, b""]))[0].host == host


@pytest.mark.parametrize("host", ["10.0.0.1", "::1", "fe80::1%eth0", "::ffff:10.0.0.1"])
def test_ip_literals_are_hosts(host: str) -> None:
    assert decode_packet(pkt([MsgType.ALIVE, 1, "n", host, 80, b""]))[0].host == host


@pytest.mark.parametrize(
    "host", ["01.2.3.4", "256.1.1.1", "1.2.3", "a.example", " 1.2.3.4", "1::2::3"]
)
def test_non_literals_are_refused(host: str) -> None:
    with pytest.raises(DecodeError):
        decode_packet(pkt([MsgType.ALIVE, 1, "n", host, 80, b""]))


def test_user_payload_may_fill_a_packet() -> None:
    payload = b"p" * (wire.MAX_PACKET - 20)
    data = encode_packet([encode_message(User(payload))])
    assert len(data) <= wire.MAX_PACKET
    assert decode_packet(data) == [User(payload)]


def test_non_bytes_input_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        decode_packet("not bytes")  # type: ignore[arg-type]
    with pytest.raises(DecodeError):
        decode_stream(None)  # type: ignore[arg-type]


def test_memoryview_input() -> None:
    data = encode_packet([encode_message(Nack(3))])
    assert decode_packet(memoryview(data)) == [Nack(3)]


def test_decode_error_reasons_are_a_fixed_set() -> None:
    assert DecodeError("field").reason in DecodeError.REASONS
    assert isinstance(DecodeError("field"), ValueError)


# ---------------------------------------------------------------- stream frames

MEMBERS = [
    MemberState("node-a", "10.0.0.1", 7946, b"meta", 3, 0),
    MemberState("node-b", "::1", 1, b"", 0, 1),
    MemberState("node-c", "10.0.0.3", 65535, b"x" * wire.META_MAX, 2**64 - 1, 2),
    MemberState("node-d", "10.0.0.4", 7946, b"", 9, 3),
]


@pytest.mark.parametrize(
    "msg",
    [
        PushPull(True, MEMBERS, b"app state"),
        PushPull(False, [], b""),
        PushPull(False, tuple(MEMBERS), b""),
        StreamPing(1, "node-b", "node-a"),
        Ack(1, None),
        Ack(2**32 - 1, COORD),
    ],
    ids=lambda m: type(m).__name__,
)
def test_stream_round_trip(msg: Any) -> None:
    out = decode_stream(encode_stream(msg))
    assert type(out) is type(msg)
    if isinstance(msg, PushPull):
        assert out.join is msg.join and out.app_state == msg.app_state
        assert list(out.members) == list(msg.members)
        assert all(type(m) is MemberState for m in out.members)
    else:
        assert out == msg


def test_stream_wire_form() -> None:
    raw = msgpack.unpackb(encode_stream(PushPull(True, MEMBERS[:1], b"s")), raw=False)
    assert raw == [wire.VERSION, [MsgType.PUSH_PULL, True, [list(MEMBERS[0])], b"s"]]


def test_encode_stream_rejects_udp_only_messages() -> None:
    with pytest.raises(TypeError):
        encode_stream(Ping(1, "a", "b"))  # type: ignore[arg-type]


def frame(msg: Any, version: Any = wire.VERSION) -> bytes:
    return msgpack.packb([version, msg], use_bin_type=True)


def member(**changes: Any) -> list[Any]:
    fields = dict(zip(MemberState._fields, MEMBERS[0], strict=True))
    fields.update(changes)
    return list(fields.values())


@pytest.mark.parametrize(
    "m",
    [
        member(name=""),
        member(name=LONG_NAME),
        member(host="localhost"),
        member(port=0),
        member(port=True),
        member(meta=b"m" * (wire.META_MAX + 1)),
        member(incarnation=-1),
        member(incarnation=False),
        member(state=4),
        member(state=-1),
        member(state=True),
        member()[:5],
        [*member(), 0],
        "member",
    ],
)
def test_stream_bad_member(m: Any) -> None:
    assert stream_reason_of(frame([MsgType.PUSH_PULL, False, [m], b""])) == "field"


@pytest.mark.parametrize(
    ("msg", "reason"),
    [
        ([MsgType.PUSH_PULL, 1, [], b""], "field"),  # join must be a bool
        ([MsgType.PUSH_PULL, False, [], "state"], "field"),
        ([MsgType.PUSH_PULL, False, []], "field"),
        ([MsgType.PUSH_PULL, False, [], b"", 0], "field"),
        ([MsgType.STREAM_PING, 1, "a"], "field"),
        ([MsgType.STREAM_PING, True, "a", "b"], "field"),
        ([MsgType.ACK, 1, [[1.0], -1.0, 0.0, 0.0]], "field"),
        ([MsgType.PING, 1, "a", "b"], "type"),  # UDP-only type on a stream
        ([MsgType.ALIVE, 1, "n", "10.0.0.1", 80, b""], "type"),
        ([99], "type"),
        ([True, 1, "a", "b"], "type"),
        ([], "malformed"),
        ({}, "malformed"),
        (5, "malformed"),
    ],
)
def test_stream_rejections(msg: Any, reason: str) -> None:
    assert stream_reason_of(frame(msg)) == reason


def test_stream_version() -> None:
    assert stream_reason_of(frame([MsgType.ACK, 1, None], version=2)) == "version"
    assert stream_reason_of(frame([MsgType.ACK, 1, None], version=True)) == "version"


def test_stream_framing_errors() -> None:
    good = encode_stream(PushPull(True, MEMBERS, b"app"))
    assert stream_reason_of(b"") == "truncated"
    assert stream_reason_of(good[:-1]) == "truncated"
    assert stream_reason_of(good[:5]) == "truncated"
    assert stream_reason_of(good + b"\x00") == "malformed"
    assert stream_reason_of(msgpack.packb([wire.VERSION, [MsgType.ACK, 1, None], 3])) == "malformed"
    assert stream_reason_of(b"\x00" * (wire.MAX_STREAM + 1)) == "oversized"


def test_stream_member_count_limit_checked_before_reading() -> None:
    # Claims one member too many and carries none: refused from the header alone.
    head = msgpack.packb(wire.VERSION) + b"\x94" + msgpack.packb(MsgType.PUSH_PULL) + b"\xc2"
    data = b"\x92" + head + b"\xdd" + struct.pack(">I", wire.MAX_MEMBERS + 1)
    assert stream_reason_of(data) == "field"


def test_stream_app_state_limit() -> None:
    data = frame([MsgType.PUSH_PULL, False, [], b"a" * (wire.MAX_APP_STATE + 1)])
    assert stream_reason_of(data) in {"malformed", "field"}
    ok = encode_stream(PushPull(False, [], b"a" * wire.MAX_APP_STATE))
    assert decode_stream(ok).app_state == b"a" * wire.MAX_APP_STATE


def test_stream_many_members() -> None:
    members = [MemberState(f"n{i}", "10.0.0.1", 7946, b"", i, 0) for i in range(5000)]
    out = decode_stream(encode_stream(PushPull(False, members, b"")))
    assert isinstance(out, PushPull) and list(out.members) == members


def test_stream_nested_arrays_inside_fields_are_refused() -> None:
    # A member "record" that claims a huge array: the unpacker's own limit refuses it.
    data = frame([MsgType.PUSH_PULL, False, [[0] * 1000], b""])
    assert stream_reason_of(data) == "malformed"
