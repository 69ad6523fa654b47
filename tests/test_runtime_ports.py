"""Host port allocation: round-robin, ownership, adoption, host checks (loopback only)."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.runtime.ports import (
    PortAllocator,
    PortConflict,
    PortError,
    PortsExhausted,
    bind_checker,
)


def free(_port: int) -> bool:
    return True


def alloc(low: int = 100, high: int = 109, is_free=free) -> PortAllocator:
    return PortAllocator(low, high, is_free)


def test_allocates_distinct_ports_per_name() -> None:
    a = alloc()
    assert a.allocate("web-1", ["http", "admin"]) == {"http": 100, "admin": 101}
    assert a.allocate("web-2", ["http"]) == {"http": 102}
    assert a.ports_of("web-1") == {"http": 100, "admin": 101}
    assert a.owner(102) == "web-2" and a.owner(103) is None
    assert len(a) == 3


def test_allocate_again_keeps_held_ports() -> None:
    a = alloc()
    first = a.allocate("web-1", ["http"])
    assert a.allocate("web-1", ["http", "http"]) == first
    assert a.allocate("web-1", ["http", "metrics"]) == {"http": 100, "metrics": 101}
    assert a.allocate("web-1", []) == {}
    assert a.ports_of("web-1") == {"http": 100, "metrics": 101}


def test_freed_port_is_not_reused_at_once() -> None:
    a = alloc(100, 103)
    a.allocate("a", ["p"])
    assert a.release("a") == {"p": 100}
    assert a.allocate("b", ["p"]) == {"p": 101}
    a.release("b")
    assert [a.allocate(r, ["p"])["p"] for r in ("c", "d", "e")] == [102, 103, 100]


def test_wraps_round_and_skips_held_ports() -> None:
    a = alloc(100, 103)
    for r in "abcd":
        a.allocate(r, ["p"])
    a.release("b")
    a.release("d")
    assert a.allocate("e", ["p", "q"]) == {"p": 101, "q": 103}


def test_exhausted_is_clear_and_all_or_nothing() -> None:
    a = alloc(100, 102)
    a.allocate("a", ["p"])
    with pytest.raises(PortsExhausted, match=r"no free host port in 100-102 for b port 'r'"):
        a.allocate("b", ["p", "q", "r"])
    assert a.ports_of("b") == {}
    assert a.owner(101) is None and a.owner(102) is None
    assert a.allocate("b", ["p", "q"]) == {"p": 101, "q": 102}
    with pytest.raises(PortsExhausted, match="3 held by replicas, 0 busy on the host"):
        a.allocate("c", ["p"])
    assert a.ports_of("c") == {}


def test_host_check_skips_busy_ports() -> None:
    busy = {100, 101, 103}
    checked: list[int] = []

    def is_free(port: int) -> bool:
        checked.append(port)
        return port not in busy

    a = alloc(100, 104, is_free)
    assert a.allocate("a", ["p", "q"]) == {"p": 102, "q": 104}
    assert checked == [100, 101, 102, 103, 104]
    checked.clear()
    with pytest.raises(PortsExhausted, match="2 held by replicas, 3 busy on the host"):
        a.allocate("b", ["p"])
    assert 102 not in checked and 104 not in checked  # held ports are never checked


def test_release_unknown_is_noop() -> None:
    a = alloc()
    assert a.release("nobody") == {}


def test_adopt_records_and_protects_ports() -> None:
    a = alloc(100, 109)
    a.adopt("web-1", {"http": 104, "admin": 40000})
    assert a.owner(104) == "web-1" and a.owner(40000) == "web-1"
    a.adopt("db-1", {"pg": 102})
    # Allocation continues after the highest held port inside the range.
    assert a.allocate("web-2", ["http"]) == {"http": 105}
    with pytest.raises(PortConflict, match="host port 105 is held by web-2"):
        a.adopt("web-3", {"http": 105})
    assert a.ports_of("web-3") == {}
    # Adopting again replaces what the replica held.
    a.adopt("web-1", {"http": 106})
    assert a.owner(104) is None and a.owner(40000) is None
    assert a.ports_of("web-1") == {"http": 106}
    a.adopt("web-1", {})
    assert a.ports_of("web-1") == {} and a.owner(106) is None


def test_adopt_bad_input_is_a_clear_error() -> None:
    a = alloc()
    a.adopt("a", {"p": 100})
    with pytest.raises(PortConflict, match="given for both 'p' and 'q'"):
        a.adopt("b", {"p": 101, "q": 101})
    for bad in (0, 70000, "101", True, None):
        with pytest.raises(PortError, match="not a port number"):
            a.adopt("b", {"p": bad})  # type: ignore[dict-item]
    assert a.ports_of("b") == {} and a.ports_of("a") == {"p": 100}


@pytest.mark.parametrize(
    ("low", "high", "words"),
    [(0, 10, "low end"), (10, 70000, "high end"), (200, 100, "empty port range")],
)
def test_bad_range(low: int, high: int, words: str) -> None:
    with pytest.raises(PortError, match=words):
        PortAllocator(low, high, free)


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["alloc", "release"]),
            st.sampled_from("abcdef"),
            st.lists(st.sampled_from(["p", "q", "r"]), max_size=3),
        ),
        max_size=60,
    )
)
def test_never_two_owners(ops: list[tuple[str, str, list[str]]]) -> None:
    a = alloc(100, 107)
    for op, replica, names in ops:
        if op == "release":
            a.release(replica)
            continue
        before = a.ports_of(replica)
        try:
            got = a.allocate(replica, names)
        except PortsExhausted:
            assert a.ports_of(replica) == before
            continue
        assert set(got) == set(names)
        assert all(100 <= p <= 107 for p in got.values())
    owners: dict[int, str] = {}
    for replica in "abcdef":
        for port in a.ports_of(replica).values():
            assert port not in owners, f"port {port} held by {owners[port]} and {replica}"
            owners[port] = replica
            assert a.owner(port) == replica
    assert len(a) == len(owners)


# -- the default host check (binds on loopback only) ------------------------------


def _listener(family: socket.AddressFamily, host: str) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen()
    return sock


def test_default_check_skips_a_port_with_a_listener() -> None:
    with _listener(socket.AF_INET, "127.0.0.1") as sock:
        port = sock.getsockname()[1]
        a = PortAllocator(port, port)
        with pytest.raises(PortsExhausted, match="0 held by replicas, 1 busy on the host"):
            a.allocate("a", ["p"])
    assert a.allocate("a", ["p"]) == {"p": port}


def test_default_check_on_ipv6_advertise_address() -> None:
    try:
        sock = _listener(socket.AF_INET6, "::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    with sock:
        port = sock.getsockname()[1]
        a = PortAllocator(port, port, bind_check_host="::1")
        with pytest.raises(PortsExhausted):
            a.allocate("a", ["p"])
    assert a.allocate("a", ["p"]) == {"p": port}


def test_check_host_must_be_an_ip() -> None:
    with pytest.raises(PortError, match="not an IP address"):
        PortAllocator(bind_check_host="node-1.local")


def test_check_on_an_address_this_host_lacks_is_an_error() -> None:
    # 192.0.2.0/24 is reserved for documentation: never a local address.
    with pytest.raises(PortError, match=r"cannot check port 0 on 192\.0\.2\.1"):
        bind_checker(["192.0.2.1"])(0)
    with _listener(socket.AF_INET, "127.0.0.1") as sock:
        port = sock.getsockname()[1]
    a = PortAllocator(port, port, bind_check_host="192.0.2.1")
    with pytest.raises(PortError, match=r"cannot check port \d+ on 192\.0\.2\.1"):
        a.allocate("a", ["p"])
    assert a.ports_of("a") == {}
