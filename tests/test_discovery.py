"""mDNS discovery: the TXT record rules, then real agents on loopback.

Loopback tests give every test its own service type, so agents of tests
running side by side on this machine never see each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from conftest import async_wait_for, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from gossip.crypto import Keyring
from meshd.discovery import (
    PROTOCOL_VERSION,
    BadRecord,
    MdnsDiscovery,
    Peer,
    decode_txt,
    encode_txt,
    mismatch,
    parse_txt,
)
from meshd.discovery.mdns import instance_label
from meshd.discovery.txt import split_txt

FP = "0123456789abcdef"
LO = "127.0.0.1"


def good(**over: Any) -> dict[str, Any]:
    fields: dict[str, Any] = dict(
        node="n1", cluster="prod", key_fingerprint=FP, host="10.0.0.1", port=7946
    )
    fields.update(over)
    return fields


def wire(props: dict[str, str]) -> dict[bytes, bytes | None]:
    """Properties as zeroconf hands them over after decoding a TXT record."""
    return {k.encode(): v.encode() for k, v in props.items()}


# ----- the TXT record (pure) ---------------------------------------------------------


def test_round_trip() -> None:
    props = encode_txt(**good())
    ann = decode_txt(wire(props))
    assert (ann.node, ann.cluster, ann.fingerprint, ann.host, ann.port) == (
        "n1",
        "prod",
        FP,
        "10.0.0.1",
        7946,
    )
    assert ann.version == PROTOCOL_VERSION
    assert parse_txt(wire(props), cluster="prod", key_fingerprint=FP) == Peer(
        "n1", "10.0.0.1", 7946
    )


def test_round_trip_ipv6_and_unicode_node() -> None:
    props = encode_txt(**good(host="fd00::1", node="büro-1"))
    assert decode_txt(wire(props)).peer == Peer("büro-1", "fd00::1", 7946)


def test_the_record_carries_the_fingerprint_never_the_key() -> None:
    key = Keyring.generate()
    props = encode_txt(**good(key_fingerprint=Keyring.fingerprint(key)))
    blob = json.dumps(props).encode()
    assert key not in blob and key.hex().encode() not in blob
    assert Keyring.encode_key(key).encode() not in blob
    # A caller that passes the key itself, in any usual text form, is refused.
    for leak in (Keyring.encode_key(key), key.hex()):
        with pytest.raises(BadRecord, match="never the key"):
            encode_txt(**good(key_fingerprint=leak))


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        ({"port": 0}, "bad_port"),
        ({"port": 65536}, "bad_port"),
        ({"port": True}, "bad_port"),
        ({"host": "example.com"}, "bad_host"),
        ({"host": "0.0.0.0"}, "bad_host"),
        ({"host": "224.0.0.251"}, "bad_host"),
        ({"node": ""}, "bad_node"),
        ({"node": "x" * 129}, "bad_node"),
        ({"node": "a\nb"}, "bad_node"),
        ({"cluster": "c" * 65}, "bad_cluster"),
        ({"key_fingerprint": "ab"}, "bad_fingerprint"),
        ({"key_fingerprint": "has space"}, "bad_fingerprint"),
    ],
)
def test_encode_refuses_bad_settings(over: dict[str, Any], reason: str) -> None:
    with pytest.raises(BadRecord) as err:
        encode_txt(**good(**over))
    assert err.value.reason == reason
    assert isinstance(err.value, ValueError)


def _broken(change: Callable[[dict[str, str]], None]) -> dict[bytes, bytes | None]:
    props = encode_txt(**good())
    change(props)
    return wire(props)


@pytest.mark.parametrize(
    ("props", "reason"),
    [
        (_broken(lambda p: p.pop("node")), "missing_node"),
        (_broken(lambda p: p.pop("port")), "missing_port"),
        (_broken(lambda p: p.pop("host")), "missing_host"),
        (_broken(lambda p: p.pop("fp")), "missing_fp"),
        (_broken(lambda p: p.pop("cluster")), "missing_cluster"),
        (_broken(lambda p: p.pop("v")), "missing_v"),
        (_broken(lambda p: p.update(port="http")), "bad_port"),
        (_broken(lambda p: p.update(port="-1")), "bad_port"),
        (_broken(lambda p: p.update(port="99999")), "bad_port"),
        (_broken(lambda p: p.update(port="123456")), "bad_port"),
        (_broken(lambda p: p.update(host="node1.local")), "bad_host"),
        (_broken(lambda p: p.update(host="10.0.0.256")), "bad_host"),
        (_broken(lambda p: p.update(node="n" * 200)), "bad_node"),
        (_broken(lambda p: p.update(cluster="c" * 100)), "bad_cluster"),
        (_broken(lambda p: p.update(fp="f" * 41)), "bad_fingerprint"),
        (_broken(lambda p: p.update(v="one")), "bad_version"),
        (_broken(lambda p: p.update(v="1", vmin="2")), "bad_version"),
        ({**wire(encode_txt(**good())), b"node": None}, "missing_node"),
        ({**wire(encode_txt(**good())), b"node": b"\xff\xfe"}, "bad_node"),
        ({**wire(encode_txt(**good())), b"node": b"x" * 300}, "oversized"),
        ({}, "missing_v"),
    ],
)
def test_decode_rejects_bad_records(props: dict[bytes, bytes | None], reason: str) -> None:
    with pytest.raises(BadRecord) as err:
        decode_txt(props)
    assert err.value.reason == reason
    assert parse_txt(props, cluster="prod", key_fingerprint=FP) is None


def test_split_txt_reads_the_wire_format() -> None:
    assert split_txt(b"\x03v=1\x04Port\x00\x06port=9\x05=skip\x07port=10") == {
        b"v": b"1",
        b"port": None,  # "Port" came first; keys are case-insensitive
    }
    assert split_txt(b"") == {} and split_txt(b"\x00") == {}
    with pytest.raises(BadRecord, match="past the end"):
        split_txt(b"\x09v=1")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_split_then_decode_never_raises_anything_but_bad_record(text: bytes) -> None:
    with contextlib.suppress(BadRecord):
        decode_txt(split_txt(text))


def test_decode_ignores_unknown_keys() -> None:
    props = {**wire(encode_txt(**good())), b"future": b"x", b"flag": None}
    assert decode_txt(props).peer == Peer("n1", "10.0.0.1", 7946)


def test_decode_rejects_a_non_mapping() -> None:
    with pytest.raises(BadRecord):
        decode_txt([(b"v", b"1")])  # type: ignore[arg-type]


def test_mismatch_names_why_a_record_is_not_ours() -> None:
    ann = decode_txt(wire(encode_txt(**good())))
    assert mismatch(ann, cluster="prod", key_fingerprint=FP) is None
    assert mismatch(ann, cluster="dev", key_fingerprint=FP) == "ignored_foreign_cluster"
    assert mismatch(ann, cluster="prod", key_fingerprint="feedbeef") == "ignored_foreign_key"
    assert parse_txt(wire(encode_txt(**good())), cluster="dev", key_fingerprint=FP) is None


@pytest.mark.parametrize(
    ("v", "vmin", "ok"),
    [
        (PROTOCOL_VERSION, PROTOCOL_VERSION, True),
        (PROTOCOL_VERSION + 1, PROTOCOL_VERSION, True),  # newer, still speaks ours
        (PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 1, False),  # newer only
        (0, 0, False),  # older than we accept
    ],
)
def test_versions_are_compatible_when_ranges_overlap(v: int, vmin: int, ok: bool) -> None:
    props = wire(encode_txt(**good(), version=v, min_version=vmin))
    ann = decode_txt(props)
    assert (mismatch(ann, cluster="prod", key_fingerprint=FP) is None) == ok
    if not ok:
        assert mismatch(ann, cluster="prod", key_fingerprint=FP) == "ignored_incompatible_version"


def test_a_record_without_vmin_accepts_only_its_own_version() -> None:
    props = wire(encode_txt(**good(), version=PROTOCOL_VERSION + 1))
    del props[b"vmin"]
    assert parse_txt(props, cluster="prod", key_fingerprint=FP) is None


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from([b"v", b"vmin", b"cluster", b"fp", b"node", b"host", b"port", b"x"]),
        st.one_of(st.none(), st.binary(max_size=300), st.sampled_from([b"1", b"10.0.0.1"])),
    )
)
def test_decode_never_raises_anything_but_bad_record(props: dict[bytes, bytes | None]) -> None:
    try:
        ann = decode_txt(props)
    except BadRecord:
        return
    assert 1 <= ann.port <= 65535


def test_instance_label_is_a_short_ascii_dns_label() -> None:
    assert instance_label("web-1") == "web-1"
    assert instance_label("web.prod 1") == "web-prod-1"
    assert instance_label("...") == "node"
    assert len(instance_label("x" * 200)) <= 48


@pytest.mark.parametrize(
    "interfaces",
    [[], ["0.0.0.0"], ["::"], ["eth0"], "127.0.0.1"],
)
def test_interfaces_must_be_explicit_addresses(interfaces: Any) -> None:
    with pytest.raises(ValueError):
        MdnsDiscovery(
            node="n1",
            cluster="prod",
            key_fingerprint=FP,
            gossip_addr=(LO, 7946),
            interfaces=interfaces,
        )


@pytest.mark.parametrize(
    "service_type",
    ["_meshd._tcp.local", "meshd._tcp.local.", "_a-very-long-service-name._tcp.local."],
)
def test_service_type_must_be_dns_sd(service_type: str) -> None:
    with pytest.raises(ValueError, match="not a DNS-SD service type"):
        MdnsDiscovery(
            node="n1",
            cluster="prod",
            key_fingerprint=FP,
            gossip_addr=(LO, 7946),
            interfaces=[LO],
            service_type=service_type,
        )


@pytest.mark.parametrize("addr", [("localhost", 7946), (LO, 0), ("0.0.0.0", 7946)])
def test_gossip_address_must_be_a_reachable_ip_and_port(addr: tuple[str, int]) -> None:
    with pytest.raises(ValueError):
        MdnsDiscovery(
            node="n1", cluster="prod", key_fingerprint=FP, gossip_addr=addr, interfaces=[LO]
        )


# ----- agents on loopback ----------------------------------------------------------


@pytest.fixture
def service_type() -> str:
    """A service type of this test's own (labels may hold up to 15 characters)."""
    return f"_mt{secrets.token_hex(5)}._tcp.local."


Factory = Callable[..., MdnsDiscovery]


@pytest.fixture
async def make(service_type: str) -> AsyncIterator[Factory]:
    """Build discoveries on loopback; all are stopped when the test ends."""
    made: list[MdnsDiscovery] = []
    ports = iter(range(17000, 18000))

    def build(node: str, cluster: str = "prod", fp: str = FP, **kw: Any) -> MdnsDiscovery:
        disc = MdnsDiscovery(
            node=node,
            cluster=cluster,
            key_fingerprint=fp,
            gossip_addr=(LO, next(ports)),
            interfaces=[LO],
            service_type=service_type,
            **kw,
        )
        made.append(disc)
        return disc

    yield build
    await asyncio.gather(*(d.stop() for d in made))


@pytest.fixture
async def publisher() -> AsyncIterator[AsyncZeroconf]:
    """A bare zeroconf on loopback, to put records on the LAN that no agent would."""
    aiozc = AsyncZeroconf(interfaces=[LO])
    yield aiozc
    await aiozc.async_close()


def nodes(disc: MdnsDiscovery) -> set[str]:
    return {p.node for p in disc.peers()}


@pytest.mark.integration
async def test_agents_of_one_cluster_find_each_other(make: Factory) -> None:
    seen: dict[str, list[Peer]] = {"a": [], "b": [], "c": []}
    agents = {n: make(n, on_peer=seen[n].append) for n in seen}
    await asyncio.gather(*(d.start() for d in agents.values()))
    for name, disc in agents.items():
        peers = await disc.wait_peers(2, timeout=10)
        assert {p.node for p in peers} == set(agents) - {name}
        assert all(p.host == LO for p in peers)
        assert {p.port for p in peers} == {agents[o].gossip_addr[1] for o in agents if o != name}
        # on_peer fired once per peer, with the same values peers() reports
        assert sorted(seen[name], key=lambda p: p.node) == peers
        assert disc.stats["ignored_bad_record"] == 0


@pytest.mark.integration
async def test_five_agents_see_each_other_soon_after_the_last_start(make: Factory) -> None:
    """Time to full discovery; the product target is 2 s after the last agent starts."""
    agents = [make(f"n{i}") for i in range(5)]
    # Stagger the starts a little, as separately launched agents would be.
    starts = []
    for d in agents:
        starts.append(asyncio.ensure_future(d.start()))
        await asyncio.sleep(0.05)
    last_start = asyncio.get_running_loop().time()
    await asyncio.gather(*(d.wait_peers(4, timeout=10) for d in agents))
    took = asyncio.get_running_loop().time() - last_start
    await asyncio.gather(*starts)
    print(f"\n5 agents on loopback: all saw each other {took:.3f} s after the last start")
    assert took < 4.0, f"full discovery took {took:.2f} s (target 2 s)"


@pytest.mark.integration
async def test_other_clusters_and_keys_are_ignored_and_counted(make: Factory) -> None:
    a, b = make("a"), make("b")
    other_cluster = make("x", cluster="staging")
    other_key = make("y", fp="feedfacefeedface")
    everyone = [a, b, other_cluster, other_key]
    await asyncio.gather(*(d.start() for d in everyone))
    await a.wait_peers(1, timeout=10)
    await b.wait_peers(1, timeout=10)
    await async_wait_for(
        lambda: a.stats["ignored_foreign_cluster"] >= 1 and a.stats["ignored_foreign_key"] >= 1,
        timeout=10,
        message="a counting the foreign agents",
    )
    assert nodes(a) == {"b"} and nodes(b) == {"a"}
    await async_wait_for(lambda: other_cluster.stats["ignored_foreign_cluster"] >= 2, timeout=10)
    assert other_cluster.peers() == [] and other_key.peers() == []


@pytest.mark.integration
async def test_goodbye_removes_a_peer_and_a_restart_brings_it_back(make: Factory) -> None:
    gone: list[Peer] = []
    a, b = make("a", on_peer_gone=gone.append), make("b")
    await asyncio.gather(a.start(), b.start())
    await a.wait_peers(1, timeout=10)
    name_before = b.instance_name
    await b.stop()
    await b.stop()  # idempotent
    assert not b.running and b.peers() == []
    await async_wait_for(lambda: a.peers() == [], timeout=5, message="goodbye to remove b")
    assert [p.node for p in gone] == ["b"]
    assert a.stats["peers_removed"] == 1
    await b.start()
    assert b.instance_name == name_before  # a restarted agent takes its name back
    assert {p.node for p in await a.wait_peers(1, timeout=10)} == {"b"}
    assert {p.node for p in await b.wait_peers(1, timeout=10)} == {"a"}


@pytest.mark.integration
async def test_a_taken_name_gets_a_suffix(make: Factory) -> None:
    first = make("twin")
    await first.start()
    second = make("twin")
    await second.start()
    assert first.instance_name != second.instance_name
    assert second.instance_name is not None
    assert second.instance_name.startswith("twin-")
    assert second.stats["name_conflicts"] >= 1
    # Same node name, different agents: each still reports the other.
    assert (await first.wait_peers(1, timeout=10))[0].port == second.gossip_addr[1]
    assert (await second.wait_peers(1, timeout=10))[0].port == first.gossip_addr[1]


async def _claim(
    publisher: AsyncZeroconf, disc: MdnsDiscovery, text: bytes, port: int
) -> AsyncServiceInfo:
    """Announce a record under disc's own name without probing, as a racing agent would."""
    assert disc.instance_name is not None
    info = AsyncServiceInfo(
        disc.service_type,
        disc.instance_name,
        port=port,
        properties=text,
        addresses=[socket.inet_aton(LO)],
    )
    await publisher.async_register_service(info, cooperating_responders=True)
    return info


@pytest.mark.integration
async def test_a_name_claimed_later_by_a_larger_record_is_given_up(
    make: Factory, publisher: AsyncZeroconf
) -> None:
    a, watcher = make("a"), make("w")
    await asyncio.gather(a.start(), watcher.start())
    await watcher.wait_peers(1, timeout=10)
    old = a.instance_name
    # Record data compares bytewise (RFC 6762 8.2): "\x05zzz=1" sorts after "\x01v=1..."
    await _claim(publisher, a, b"\x05zzz=1", 9)
    await async_wait_for(lambda: a.instance_name not in (None, old), timeout=10)
    assert a.stats["name_conflicts"] == 1
    # The watcher finds a again under its new name.
    await async_wait_for(
        lambda: Peer("a", LO, a.gossip_addr[1]) in watcher.peers(),
        timeout=10,
        message="watcher to see a under its new name",
    )


@pytest.mark.integration
async def test_a_name_claimed_later_by_a_smaller_record_is_kept(
    make: Factory, publisher: AsyncZeroconf
) -> None:
    a, watcher = make("a"), make("w")
    await asyncio.gather(a.start(), watcher.start())
    await watcher.wait_peers(1, timeout=10)
    old = a.instance_name
    await _claim(publisher, a, b"\x01a", 9)
    await async_wait_for(lambda: a.stats["name_defended"] >= 1, timeout=10)
    assert a.instance_name == old and a.stats["name_conflicts"] == 0
    # a announced again, so the watcher's cache holds a's record, not the claim.
    await async_wait_for(
        lambda: watcher.peers() == [Peer("a", LO, a.gossip_addr[1])],
        timeout=10,
        message="watcher to hold a's record again",
    )


BAD_RECORDS: list[tuple[str, bytes | dict[str, Any]]] = [
    ("missing-port", {k: v for k, v in encode_txt(**good(host=LO)).items() if k != "port"}),
    ("bad-port", {**encode_txt(**good(host=LO)), "port": "70000"}),
    ("name-host", {**encode_txt(**good(host=LO)), "host": "evil.example"}),
    ("oversized", {**encode_txt(**good(host=LO)), "node": "n" * 250}),
    ("bad-version", {**encode_txt(**good(host=LO)), "v": "x"}),
    ("truncated", b"\x40v=1"),  # a length byte past the end of the record
    ("binary", b"\x04\xff\xfe\xfd\xfc"),
]


@pytest.mark.integration
async def test_bad_records_are_ignored_and_counted(
    make: Factory, publisher: AsyncZeroconf, service_type: str
) -> None:
    a = make("a")
    await a.start()
    for label, props in BAD_RECORDS:
        info = AsyncServiceInfo(
            service_type,
            f"bad-{label}.{service_type}",
            port=9,
            properties=props,
            addresses=[socket.inet_aton(LO)],
        )
        await publisher.async_register_service(info, cooperating_responders=True)
    await async_wait_for(
        lambda: a.stats["ignored_bad_record"] >= len(BAD_RECORDS),
        timeout=10,
        message=f"all {len(BAD_RECORDS)} bad records counted",
    )
    assert a.peers() == []
    # ...and a good agent is still found alongside them.
    b = make("b")
    await b.start()
    assert [p.node for p in await a.wait_peers(1, timeout=10)] == ["b"]


@pytest.mark.integration
async def test_a_failing_callback_is_counted_not_raised(make: Factory) -> None:
    def boom(peer: Peer) -> None:
        raise RuntimeError("caller bug")

    a, b = make("a", on_peer=boom), make("b")
    await asyncio.gather(a.start(), b.start())
    await a.wait_peers(1, timeout=10)
    assert a.stats["callback_errors"] == 1


@pytest.mark.integration
async def test_wait_peers_times_out_with_what_it_found(make: Factory) -> None:
    a = make("alone")
    await a.start()
    with pytest.raises(TimeoutError, match="found 0 of 1 peers"):
        await a.wait_peers(1, timeout=0.2)


@pytest.mark.integration
async def test_an_address_that_is_not_ours_fails_start_clearly(service_type: str) -> None:
    disc = MdnsDiscovery(
        node="n1",
        cluster="prod",
        key_fingerprint=FP,
        gossip_addr=(LO, 7946),
        interfaces=["198.51.100.77"],  # TEST-NET-2: on no interface here
        service_type=service_type,
    )
    with pytest.raises(OSError, match=r"mDNS cannot use interfaces \['198.51.100.77'\]"):
        await disc.start()
    assert not disc.running
    await disc.stop()


# ----- separate processes ----------------------------------------------------------


class Runner:
    """``python -m meshd.discovery`` in a process; its JSON lines gathered by a thread."""

    def __init__(self, argv: list[str], popen: Callable[..., subprocess.Popen[str]]) -> None:
        self.proc = popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._lock:
                self.lines.append(json.loads(raw))

    def events(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return [line for line in self.lines if line["event"] == kind]

    def peer_nodes(self) -> set[str]:
        """Nodes seen and not since gone."""
        found: set[str] = set()
        with self._lock:
            for line in self.lines:
                if line["event"] == "peer":
                    found.add(line["node"])
                elif line["event"] == "gone":
                    found.discard(line["node"])
        return found

    def stop(self, timeout: float = 10) -> dict[str, Any]:
        """SIGTERM, then the stats line it prints on the way out."""
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=timeout)
        wait_for(lambda: self.events("stats"), timeout=timeout, message="the stats line")
        return self.events("stats")[-1]


def runner_argv(
    node: str, cluster: str, iface: str, port: int, service_type: str, fp: str = FP
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "meshd.discovery",
        "--node",
        node,
        "--cluster",
        cluster,
        "--fingerprint",
        fp,
        "--interface",
        iface,
        "--gossip",
        f"{iface}:{port}",
        "--service-type",
        service_type,
        "--duration",
        "60",  # a forgotten runner ends by itself
    ]


@pytest.mark.integration
def test_runner_processes_find_each_other_and_say_goodbye(service_type: str) -> None:
    runners = {
        name: Runner(runner_argv(name, cluster, LO, port, service_type), subprocess.Popen)
        for name, cluster, port in [
            ("p1", "prod", 17101),
            ("p2", "prod", 17102),
            ("p3", "prod", 17103),
            ("q1", "other", 17104),
        ]
    }
    try:
        prod = {"p1", "p2", "p3"}
        for name in prod:
            wait_for(
                lambda n=name: runners[n].peer_nodes() == prod - {n},
                timeout=15,
                message=f"{name} to see the other prod runners",
            )
        for r in runners.values():
            wait_for(lambda r=r: r.events("started"), timeout=15, message="every runner registered")
        stats = runners["p3"].stop()
        assert {p["node"] for p in stats["peers"]} == {"p1", "p2"}
        for name in ("p1", "p2"):
            wait_for(
                lambda n=name: runners[n].peer_nodes() == prod - {n, "p3"},
                timeout=5,
                message=f"{name} to drop p3 after its goodbye",
            )
        stats = runners["p1"].stop()
        assert stats["ignored_foreign_cluster"] >= 1 and stats["ignored_bad_record"] == 0
        stats = runners["q1"].stop()
        assert stats["peers"] == [] and stats["ignored_foreign_cluster"] >= 2
        assert runners["q1"].peer_nodes() == set()
    finally:
        for r in runners.values():
            if r.proc.poll() is None:
                r.proc.kill()
            r.proc.wait()


def test_runner_refuses_bad_arguments_in_one_line() -> None:
    out = subprocess.run(
        [
            *runner_argv("n", "c", LO, 7946, "_meshd._tcp.local."),
            "--interface",  # a second, unsafe one: refused before anything is sent
            "0.0.0.0",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert out.stderr.strip() == "error: interface 0.0.0.0 means every interface: name one address"


@pytest.mark.integration
async def test_without_probing_names_carry_the_key_and_never_collide(make: Factory) -> None:
    # Same hostname in two clusters (other key): both announce at once, neither
    # renames, and each still finds only its own peer.
    a, b = make("host", probe=False), make("peer", probe=False)
    other = make("host", fp="feedfacefeedface", probe=False)
    await asyncio.gather(a.start(), b.start(), other.start())
    assert {p.node for p in await a.wait_peers(1, timeout=5)} == {"peer"}
    assert {p.node for p in await b.wait_peers(1, timeout=5)} == {"host"}
    assert a.instance_name != other.instance_name
    assert a.stats["name_conflicts"] == other.stats["name_conflicts"] == 0
    assert other.peers() == []
