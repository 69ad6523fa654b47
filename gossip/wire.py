"""Wire format of the gossip protocol: msgpack messages, UDP packets and stream frames.

Every message is a msgpack array whose first element is its type::

    PING           [1, seq, target, source]
    INDIRECT_PING  [2, seq, target, host, port, nack]
    ACK            [3, seq, coord]      coord: nil or [[x, ...], error, adjustment, height]
    NACK           [4, seq]
    SUSPECT        [5, incarnation, node, source]
    ALIVE          [6, incarnation, node, host, port, meta]
    DEAD           [7, incarnation, node, source]   source == node: the node left
    USER           [8, payload]
    PUSH_PULL      [10, join, [[name, host, port, meta, incarnation, state], ...], app_state]
    STREAM_PING    [11, seq, target, source]
    USER_STREAM    [12, payload]   application message to one member over TCP

Strings are msgpack str (UTF-8), byte fields are msgpack bin, flags are msgpack
bool. A UDP packet (before sealing, see ``gossip.crypto``) compounds up to
``MAX_MESSAGES`` messages::

    [VERSION, msg1, msg2, ...]

Only types 1..8 may appear in a packet. A stream (TCP) frame carries exactly one
PUSH_PULL, STREAM_PING, USER_STREAM or ACK (the reply to STREAM_PING and
USER_STREAM)::

    [VERSION, msg]

Field limits (decoding rejects anything else with ``DecodeError(reason="field")``):

- names (target, source, node, member name): str of 1..``MAX_NAME`` UTF-8 bytes
- host: str holding an IPv4 or IPv6 address literal
- port: int 1..65535; seq: int 0..2**32-1; incarnation: int 0..2**64-1
- meta: bytes of at most ``META_MAX``; user payload: bytes of at most ``MAX_PACKET``
- member state: 0 alive, 1 suspect, 2 dead, 3 left
- coord: 1..``MAX_COORD_DIMS`` finite numbers, finite error/adjustment/height,
  error and height >= 0
- bool fields must be msgpack bools and int fields must not be bools

Decoding is strict and all-or-nothing: every message of a packet is validated
before any is returned, so a caller never applies half a packet. Unpacking limits
are tight because the input is hostile: a msgpack array header costs three bytes
but makes the unpacker allocate room for all its claimed elements.
"""

from __future__ import annotations

import ipaddress
import math
import struct
from collections.abc import Sequence
from enum import IntEnum
from socket import AF_INET, AF_INET6, inet_pton
from typing import Any, NamedTuple

import msgpack

VERSION = 1

MAX_PACKET = 65507  # largest UDP payload over IPv4
MAX_MESSAGES = 0xFFFF - 1  # messages per packet: the array header is at most 0xdc + uint16
MAX_NAME = 128  # UTF-8 bytes
META_MAX = 512
MAX_COORD_DIMS = 16
MAX_SEQ = 2**32 - 1
MAX_INCARNATION = 2**64 - 1
MAX_STREAM = 16 * 1024 * 1024
MAX_MEMBERS = 100_000
MAX_APP_STATE = 8 * 1024 * 1024


class MsgType(IntEnum):
    PING = 1
    INDIRECT_PING = 2
    ACK = 3
    NACK = 4
    SUSPECT = 5
    ALIVE = 6
    DEAD = 7
    USER = 8
    PUSH_PULL = 10
    STREAM_PING = 11
    USER_STREAM = 12


class MemberStatus(IntEnum):
    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


class DecodeError(ValueError):
    """Input that is not a valid packet or frame; ``reason`` is a metrics label."""

    REASONS = frozenset({"oversized", "truncated", "malformed", "version", "type", "field"})

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


Coord = tuple[tuple[float, ...], float, float, float]


# Messages are NamedTuples: cheap to build, and msgpack packs them as arrays
# directly. Equality is made type-aware below so Ping(...) != StreamPing(...).


class Ping(NamedTuple):
    seq: int
    target: str
    source: str


class IndirectPing(NamedTuple):
    seq: int
    target: str
    host: str
    port: int
    nack: bool


class Ack(NamedTuple):
    seq: int
    coord: Coord | None


class Nack(NamedTuple):
    seq: int


class Suspect(NamedTuple):
    incarnation: int
    node: str
    source: str


class Alive(NamedTuple):
    incarnation: int
    node: str
    host: str
    port: int
    meta: bytes


class Dead(NamedTuple):
    incarnation: int
    node: str
    source: str


class User(NamedTuple):
    payload: bytes


class MemberState(NamedTuple):
    name: str
    host: str
    port: int
    meta: bytes
    incarnation: int
    state: int


class PushPull(NamedTuple):
    join: bool
    members: Sequence[MemberState]
    app_state: bytes


class StreamPing(NamedTuple):
    seq: int
    target: str
    source: str


class UserStream(NamedTuple):
    payload: bytes


Message = (
    Ping
    | IndirectPing
    | Ack
    | Nack
    | Suspect
    | Alive
    | Dead
    | User
    | PushPull
    | StreamPing
    | UserStream
)
StreamMessage = PushPull | StreamPing | UserStream | Ack

_TYPE_OF: dict[type, int] = {
    Ping: MsgType.PING.value,
    IndirectPing: MsgType.INDIRECT_PING.value,
    Ack: MsgType.ACK.value,
    Nack: MsgType.NACK.value,
    Suspect: MsgType.SUSPECT.value,
    Alive: MsgType.ALIVE.value,
    Dead: MsgType.DEAD.value,
    User: MsgType.USER.value,
    PushPull: MsgType.PUSH_PULL.value,
    StreamPing: MsgType.STREAM_PING.value,
    UserStream: MsgType.USER_STREAM.value,
}


def _typed_eq(self: tuple, other: object) -> bool:
    return type(self) is type(other) and tuple.__eq__(self, other)  # type: ignore[arg-type]


def _typed_ne(self: tuple, other: object) -> bool:
    return not _typed_eq(self, other)


def _typed_hash(self: tuple) -> int:
    return hash((type(self).__name__, tuple.__hash__(self)))


for _cls in (*_TYPE_OF, MemberState):
    _cls.__eq__ = _typed_eq  # type: ignore[assignment,method-assign]
    _cls.__ne__ = _typed_ne  # type: ignore[assignment,method-assign]
    _cls.__hash__ = _typed_hash  # type: ignore[assignment,method-assign]


# ---------------------------------------------------------------- encoding

# One shared packer: packing runs entirely in C under the GIL, so sharing is safe
# and saves building a Packer per message.
# Floats (only Vivaldi coordinates) go as float32: 7 significant digits are
# far finer than RTT noise, and each ack is 32 bytes smaller.
_pack = msgpack.Packer(use_bin_type=True, use_single_float=True).pack


def encode_message(msg: Message) -> bytes:
    """Pack one message; the result can be compounded with ``encode_packet``.

    Fields are trusted here (they come from our own state); peers validate on decode.
    """
    return _pack((_TYPE_OF[type(msg)], *msg))


def _array_header(n: int) -> bytes:
    return bytes((0x90 | n,)) if n < 16 else b"\xdc" + struct.pack(">H", n)


_VERSION_BYTES = msgpack.packb(VERSION)
# Index n: array header for VERSION plus n messages, followed by the packed version.
_PACKET_HEADS = [_array_header(n + 1) + _VERSION_BYTES for n in range(256)]
PACKET_OVERHEAD = 3 + len(_VERSION_BYTES)  # worst case header, for budgeting


def packet_overhead(n_msgs: int) -> int:
    """Bytes a packet of ``n_msgs`` messages adds on top of the packed messages."""
    return 1 + len(_VERSION_BYTES) if n_msgs < 15 else PACKET_OVERHEAD


def encode_packet(packed_msgs: Sequence[bytes]) -> bytes:
    """Compound pre-packed messages into one packet without re-encoding them."""
    n = len(packed_msgs)
    if not 1 <= n <= MAX_MESSAGES:
        raise ValueError(f"a packet carries 1..{MAX_MESSAGES} messages, got {n}")
    if n < 256:
        return _PACKET_HEADS[n] + b"".join(packed_msgs)
    return _array_header(n + 1) + _VERSION_BYTES + b"".join(packed_msgs)


def encode_stream(msg: StreamMessage) -> bytes:
    """Pack one stream frame."""
    if type(msg) is PushPull:
        return _pack((VERSION, (MsgType.PUSH_PULL.value, msg.join, msg.members, msg.app_state)))
    if type(msg) is StreamPing or type(msg) is Ack or type(msg) is UserStream:
        return _pack((VERSION, (_TYPE_OF[type(msg)], *msg)))
    raise TypeError(f"{type(msg).__name__} cannot be sent on a stream")


# ---------------------------------------------------------------- validation


def _field(detail: str) -> DecodeError:
    return DecodeError("field", detail)


def _is_name(v: Any) -> bool:
    # Up to 32 characters is at most 128 UTF-8 bytes, so most names skip encoding.
    return type(v) is str and v != "" and (len(v) <= MAX_NAME // 4 or len(v.encode()) <= MAX_NAME)


def _is_host(v: Any) -> bool:
    """An IPv4 or IPv6 literal. inet_pton is C and ~20x faster than
    ipaddress, which matters when a push-pull carries 10,000 addresses."""
    if type(v) is not str or len(v) > 64:  # longest IPv6 literal plus a zone id
        return False
    try:
        inet_pton(AF_INET6 if ":" in v else AF_INET, v)
    except (OSError, ValueError):
        return _is_scoped_v6(v)
    return True


def _is_scoped_v6(v: str) -> bool:
    """IPv6 with a zone id (fe80::1%eth0), which inet_pton refuses."""
    if "%" not in v:
        return False
    try:
        ipaddress.ip_address(v)
    except ValueError:
        return False
    return True


def _is_port(v: Any) -> bool:
    return type(v) is int and 1 <= v <= 65535


def _is_seq(v: Any) -> bool:
    return type(v) is int and 0 <= v <= MAX_SEQ


def _is_inc(v: Any) -> bool:
    return type(v) is int and 0 <= v <= MAX_INCARNATION


def _is_meta(v: Any) -> bool:
    return type(v) is bytes and len(v) <= META_MAX


def _number(v: Any) -> float:
    t = type(v)
    if t is float:
        f = v
    elif t is int:
        f = float(v)
    else:
        raise _field("coord: number expected")
    if not math.isfinite(f):
        raise _field("coord: not finite")
    return f


def _coord(v: Any) -> Coord | None:
    if v is None:
        return None
    if type(v) is not list or len(v) != 4:
        raise _field("coord: 4-element array expected")
    vec, error, adjustment, height = v
    if type(vec) is not list or not 1 <= len(vec) <= MAX_COORD_DIMS:
        raise _field(f"coord: vector of 1..{MAX_COORD_DIMS} numbers expected")
    out = (tuple([_number(x) for x in vec]), _number(error), _number(adjustment), _number(height))
    if out[1] < 0 or out[3] < 0:
        raise _field("coord: negative error or height")
    return out


# The decoders below inline the common-case checks (the simulator pushes about a
# million packets through here); the helpers above handle the slow cases.
_new = tuple.__new__
_SHORT_NAME = MAX_NAME // 4  # this many characters always fit in MAX_NAME bytes
_U32 = MAX_SEQ
_U64 = MAX_INCARNATION


def _d_ping(m: list) -> Ping:
    if len(m) != 4:
        raise _field("ping: 3 fields expected")
    _, seq, target, source = m
    if not (
        type(seq) is int
        and 0 <= seq <= _U32
        and ((type(target) is str and 0 < len(target) <= _SHORT_NAME) or _is_name(target))
        and ((type(source) is str and 0 < len(source) <= _SHORT_NAME) or _is_name(source))
    ):
        raise _field("ping")
    return _new(Ping, (seq, target, source))


def _d_indirect(m: list) -> IndirectPing:
    if len(m) != 6:
        raise _field("indirect ping: 5 fields expected")
    _, seq, target, host, port, nack = m
    if not (_is_seq(seq) and _is_name(target) and _is_host(host) and _is_port(port)):
        raise _field("indirect ping")
    if type(nack) is not bool:
        raise _field("indirect ping: nack must be a bool")
    return _new(IndirectPing, (seq, target, host, port, nack))


def _d_ack(m: list) -> Ack:
    if len(m) != 3:
        raise _field("ack: 2 fields expected")
    seq = m[1]
    if type(seq) is not int or not 0 <= seq <= _U32:
        raise _field("ack: seq")
    return _new(Ack, (seq, _coord(m[2])))


def _d_nack(m: list) -> Nack:
    if len(m) != 2 or not _is_seq(m[1]):
        raise _field("nack")
    return _new(Nack, (m[1],))


def _d_suspect(m: list) -> Suspect:
    if len(m) != 4:
        raise _field("suspect: 3 fields expected")
    _, inc, node, source = m
    if not (_is_inc(inc) and _is_name(node) and _is_name(source)):
        raise _field("suspect")
    return _new(Suspect, (inc, node, source))


def _d_alive(m: list) -> Alive:
    if len(m) != 6:
        raise _field("alive: 5 fields expected")
    _, inc, node, host, port, meta = m
    if not (
        type(inc) is int
        and 0 <= inc <= _U64
        and ((type(node) is str and 0 < len(node) <= _SHORT_NAME) or _is_name(node))
        and type(host) is str
        and _is_host(host)
        and type(port) is int
        and 0 < port <= 65535
    ):
        raise _field("alive")
    if type(meta) is not bytes or len(meta) > META_MAX:
        raise _field(f"alive: meta must be bytes of at most {META_MAX}")
    return _new(Alive, (inc, node, host, port, meta))


def _d_dead(m: list) -> Dead:
    if len(m) != 4:
        raise _field("dead: 3 fields expected")
    _, inc, node, source = m
    if not (_is_inc(inc) and _is_name(node) and _is_name(source)):
        raise _field("dead")
    return _new(Dead, (inc, node, source))


def _d_user(m: list) -> User:
    if len(m) != 2 or type(m[1]) is not bytes or len(m[1]) > MAX_PACKET:
        raise _field("user: one bytes payload expected")
    return _new(User, (m[1],))


def _d_stream_ping(m: list) -> StreamPing:
    return StreamPing(*_d_ping(m))


def _d_user_stream(m: list) -> UserStream:
    if len(m) != 2 or type(m[1]) is not bytes or len(m[1]) > MAX_APP_STATE:
        raise _field("user stream: one bytes payload expected")
    return UserStream(m[1])


def _member(v: Any) -> MemberState:
    if type(v) is not list or len(v) != 6:
        raise _field("member: 6-element array expected")
    name, host, port, meta, inc, state = v
    if not (_is_name(name) and _is_host(host) and _is_port(port) and _is_meta(meta)):
        raise _field("member")
    if not _is_inc(inc) or type(state) is not int or not 0 <= state <= 3:
        raise _field("member: incarnation or state")
    return MemberState(name, host, port, meta, inc, state)


_UDP_DECODERS = {
    MsgType.PING.value: _d_ping,
    MsgType.INDIRECT_PING.value: _d_indirect,
    MsgType.ACK.value: _d_ack,
    MsgType.NACK.value: _d_nack,
    MsgType.SUSPECT.value: _d_suspect,
    MsgType.ALIVE.value: _d_alive,
    MsgType.DEAD.value: _d_dead,
    MsgType.USER.value: _d_user,
}

_STREAM_DECODERS = {
    MsgType.STREAM_PING.value: _d_stream_ping,
    MsgType.USER_STREAM.value: _d_user_stream,
    MsgType.ACK.value: _d_ack,
}


# ---------------------------------------------------------------- decoding

# unpackb applies one array limit to every array and preallocates what a header
# claims, so it is kept small: 1024 nested headers (msgpack's depth limit) then cost
# at most 2 MiB. Packets with more messages take the slower incremental path, which
# reads the top-level header by itself and caps every inner array at MAX_COORD_DIMS.
_FAST_ARRAY_MAX = 256

_UDP_LIMITS: dict[str, Any] = {
    "raw": False,
    "use_list": True,
    "strict_map_key": True,
    "max_str_len": 1024,  # names are checked against MAX_NAME to report "field"
    "max_bin_len": MAX_PACKET,
    "max_array_len": _FAST_ARRAY_MAX,
    "max_map_len": 0,
    "max_ext_len": 0,
}


def _unpack_error(exc: Exception) -> DecodeError:
    if isinstance(exc, msgpack.OutOfData) or "incomplete input" in str(exc):
        return DecodeError("truncated")
    if isinstance(exc, msgpack.ExtraData):
        return DecodeError("malformed", "trailing bytes")
    return DecodeError("malformed", f"{type(exc).__name__}: {exc}")


def _unpacker(data: bytes, max_bin_len: int) -> msgpack.Unpacker:
    # Large arrays (packet messages, members) have their headers read one by one and
    # checked by the caller, so the unpacker itself only ever sees small arrays.
    u = msgpack.Unpacker(
        raw=False,
        use_list=True,
        strict_map_key=True,
        max_buffer_size=max(len(data), 1),
        max_str_len=1024,
        max_bin_len=max_bin_len,
        max_array_len=MAX_COORD_DIMS,
        max_map_len=0,
        max_ext_len=0,
    )
    u.feed(data)
    return u


def _read_header(u: msgpack.Unpacker) -> int:
    try:
        return u.read_array_header()
    except msgpack.OutOfData:
        raise DecodeError("truncated") from None
    except Exception as exc:
        # Not an array header at this position.
        raise DecodeError("malformed", f"array expected: {exc}") from None


def _read(u: msgpack.Unpacker) -> Any:
    try:
        return u.unpack()
    except Exception as exc:
        raise _unpack_error(exc) from None


def _unpack_many(data: bytes) -> list[Any]:
    u = _unpacker(data, max_bin_len=MAX_PACKET)
    count = _read_header(u)
    obj = [_read(u) for _ in range(count)]
    if u.tell() != len(data):
        raise DecodeError("malformed", "trailing bytes")
    return obj


def decode_packet(data: bytes) -> list[Message]:
    """Decode and fully validate one UDP packet; raises only DecodeError."""
    try:
        if len(data) > MAX_PACKET:
            raise DecodeError("oversized")
        if not data:
            raise DecodeError("truncated")
        head = data[0]
        if head == 0xDC and len(data) >= 3 and (data[1] << 8 | data[2]) > _FAST_ARRAY_MAX:
            obj = _unpack_many(data)
        else:
            try:
                obj = msgpack.unpackb(data, **_UDP_LIMITS)
            except Exception as exc:
                raise _unpack_error(exc) from None
        if type(obj) is not list or not obj:
            raise DecodeError("malformed", "array of version and messages expected")
        version = obj[0]
        if type(version) is not int or version != VERSION:
            raise DecodeError("version", repr(version)[:20])
        if len(obj) < 2:
            raise DecodeError("malformed", "packet without messages")
        out: list[Message] = []
        decoders = _UDP_DECODERS
        for i in range(1, len(obj)):
            m = obj[i]
            if type(m) is not list or not m:
                raise DecodeError("malformed", "message must be a non-empty array")
            t = m[0]
            dec = decoders.get(t) if type(t) is int else None
            if dec is None:
                raise DecodeError("type", repr(t)[:20])
            out.append(dec(m))
        return out
    except DecodeError:
        raise
    except Exception as exc:  # a bug or an input we did not foresee: still only DecodeError
        raise DecodeError("malformed", f"{type(exc).__name__}: {exc}") from None


def decode_stream(data: bytes) -> StreamMessage:
    """Decode and fully validate one stream frame; raises only DecodeError."""
    try:
        if len(data) > MAX_STREAM:
            raise DecodeError("oversized")
        if not data:
            raise DecodeError("truncated")
        u = _unpacker(data, max_bin_len=MAX_APP_STATE)
        if _read_header(u) != 2:
            raise DecodeError("malformed", "array of version and message expected")
        version = _read(u)
        if type(version) is not int or version != VERSION:
            raise DecodeError("version", repr(version)[:20])
        n = _read_header(u)
        if n < 1:
            raise DecodeError("malformed", "message must be a non-empty array")
        t = _read(u)
        msg: StreamMessage
        if type(t) is int and t == MsgType.PUSH_PULL:
            if n != 4:
                raise _field("push-pull: 3 fields expected")
            join = _read(u)
            if type(join) is not bool:
                raise _field("push-pull: join must be a bool")
            count = _read_header(u)
            if count > MAX_MEMBERS:
                raise _field(f"push-pull: more than {MAX_MEMBERS} members")
            members = [_member(_read(u)) for _ in range(count)]
            app_state = _read(u)
            if type(app_state) is not bytes or len(app_state) > MAX_APP_STATE:
                raise _field("push-pull: app state must be bytes")
            msg = PushPull(join, members, app_state)
        else:
            dec = _STREAM_DECODERS.get(t) if type(t) is int else None
            if dec is None:
                raise DecodeError("type", repr(t)[:20])
            if n > 8:  # no stream message besides push-pull has this many fields
                raise _field("too many fields")
            msg = dec([t, *(_read(u) for _ in range(n - 1))])
        if u.tell() != len(data):
            raise DecodeError("malformed", "trailing bytes")
        return msg
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError("malformed", f"{type(exc).__name__}: {exc}") from None
