"""The protocol core driven by hand: hostile input, replays, health, API edges."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossip import wire
from gossip.config import lan_config
from gossip.core import Core
from gossip.crypto import Keyring, Sealer
from gossip.members import State
from gossip.sim import Simulation

KEY = bytes(range(32))


def make_cluster(n: int = 4, seed: int = 1) -> Simulation:
    sim = Simulation(seed=seed, keyring=Keyring([KEY]))
    sim.add_nodes(n)
    sim.bootstrap()
    sim.run_for(2)
    return sim


def snapshot(core: Core) -> tuple:
    return (
        sorted(
            (m.name, m.addr, m.meta, m.incarnation, int(m.state), m.state_change)
            for m in core.members()
        ),
        core.incarnation,
        core.health_score,
        len(core._bq),
    )


def captured_packets(sim: Simulation, src: int, dst: int, seconds: float = 3.0) -> list[bytes]:
    """Sealed datagrams that node src sent to node dst."""
    out: list[bytes] = []
    node = sim.nodes[src]
    orig = node.core.take_packets

    def spy() -> list:
        pkts = orig()
        out.extend(d for a, d in pkts if a == sim.nodes[dst].addr)
        return pkts

    node.core.take_packets = spy  # type: ignore[method-assign]
    sim.run_for(seconds)
    node.core.take_packets = orig  # type: ignore[method-assign]
    return out


SIM = make_cluster()
VALID = captured_packets(SIM, 1, 0)
TARGET = SIM.nodes[0].core
FROM = SIM.nodes[1].addr


@settings(max_examples=300, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=1600))
def test_random_bytes_change_nothing(data: bytes) -> None:
    before = snapshot(TARGET)
    TARGET.handle_packet(data, FROM, SIM.now)
    assert snapshot(TARGET) == before
    assert TARGET.take_packets() == []
    assert TARGET.take_events() == []


@settings(max_examples=300, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_valid_packets_change_nothing(data: st.DataObject) -> None:
    pkt = bytearray(data.draw(st.sampled_from(VALID)))
    op = data.draw(st.sampled_from(["flip", "truncate", "insert", "extend"]))
    i = data.draw(st.integers(0, len(pkt) - 1))
    if op == "flip":
        pkt[i] ^= 1 << data.draw(st.integers(0, 7))
    elif op == "truncate":
        del pkt[i:]
    elif op == "insert":
        pkt[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    else:
        pkt += data.draw(st.binary(min_size=1, max_size=70_000))
    before = snapshot(TARGET)
    TARGET.handle_packet(bytes(pkt), FROM, SIM.now)
    assert snapshot(TARGET) == before
    assert TARGET.take_packets() == []


def test_replayed_packet_is_dropped_and_counted() -> None:
    sim = make_cluster(seed=2)
    pkts = captured_packets(sim, 1, 0)
    target = sim.nodes[0].core
    before = snapshot(target)
    replays = target.stats.get("dropped.replay", 0)
    for p in pkts:
        target.handle_packet(p, sim.nodes[1].addr, sim.now)
    assert target.stats["dropped.replay"] == replays + len(pkts)
    assert snapshot(target) == before
    assert target.take_packets() == []


def test_forged_plaintext_and_foreign_cluster_packets_are_refused() -> None:
    sim = make_cluster(seed=3)
    target = sim.nodes[0].core
    forged = wire.encode_packet(
        [
            wire.encode_message(wire.Dead(99, "n2", "n1")),
            wire.encode_message(wire.Ping(1, "n0", "x")),
        ]
    )
    plain = Sealer("default", None).seal(forged, sim.now)
    foreign = Sealer("other", Keyring([KEY])).seal(forged, sim.now)
    before = snapshot(target)
    target.handle_packet(plain, sim.nodes[1].addr, sim.now)
    target.handle_packet(foreign, sim.nodes[1].addr, sim.now)
    assert snapshot(target) == before
    assert target.stats["dropped.plaintext"] == 1
    assert target.stats["dropped.auth"] == 1


def test_valid_message_about_unknown_or_old_state_is_ignored() -> None:
    sim = make_cluster(seed=4)
    target = sim.nodes[0].core
    sealer = Sealer("default", Keyring([KEY]))
    msgs = [
        wire.encode_message(wire.Suspect(5, "nobody", "n1")),
        wire.encode_message(wire.Dead(5, "nobody", "n1")),
        wire.encode_message(wire.Ping(7, "someone-else", "n1")),
        wire.encode_message(wire.Ack(12345, None)),
        wire.encode_message(wire.Nack(12345)),
    ]
    before = snapshot(target)
    target.handle_packet(sealer.seal(wire.encode_packet(msgs), sim.now), sim.nodes[1].addr, sim.now)
    assert snapshot(target) == before
    assert target.stats["dropped.wrong_target"] >= 1


def test_garbage_streams_get_no_reply_and_change_nothing() -> None:
    sim = make_cluster(seed=5)
    target = sim.nodes[0].core
    before = snapshot(target)
    rng = random.Random(1)
    for _ in range(200):
        assert (
            target.handle_stream(rng.randbytes(rng.randrange(0, 300)), ("10.0.0.9", 1), sim.now)
            is None
        )
    assert snapshot(target) == before
    assert target.handle_stream_reply(987654, b"junk", sim.now) is False


def test_isolated_member_raises_its_health_score_and_slows_down() -> None:
    sim = make_cluster(n=6, seed=6)
    lonely = sim.nodes[0]
    sim.partition([lonely])
    probes_before = lonely.core.stats["probes"]
    sim.run_for(20)
    assert lonely.core.health_score >= 3
    # Nominal would be 50 probes in 20 s at 0.4 s; a degraded member probes less.
    assert lonely.core.stats["probes"] - probes_before < 30
    sim.heal()
    assert sim.run_until_true(lambda: lonely.core.health_score == 0, timeout=120, step=0.5)


def test_plaintext_must_be_chosen_explicitly() -> None:
    with pytest.raises(ValueError, match="plaintext"):
        Core(lan_config(), name="a", addr=("127.0.0.1", 1))
    core = Core(lan_config(allow_plaintext=True), name="a", addr=("127.0.0.1", 1))
    assert core.member("a").state == State.ALIVE


def test_oversized_metadata_is_refused() -> None:
    core = Core(lan_config(), name="a", addr=("127.0.0.1", 1), keyring=Keyring([KEY]))
    with pytest.raises(ValueError, match="metadata"):
        core.set_meta(bytes(wire.META_MAX + 1), 0.0)
    with pytest.raises(ValueError, match="metadata"):
        Core(lan_config(), name="b", addr=("127.0.0.1", 1), meta=bytes(600), keyring=Keyring([KEY]))


def test_leave_done_alone_and_with_peers() -> None:
    alone = Core(lan_config(), name="a", addr=("127.0.0.1", 1), keyring=Keyring([KEY]))
    assert not alone.leave_done()
    alone.leave(0.0)
    assert alone.leave_done()
    sim = make_cluster(seed=7)
    core = sim.nodes[0].core
    core.leave(sim.now)
    assert not core.leave_done()
    sim._after(sim.nodes[0])
    assert sim.run_until_true(core.leave_done, timeout=2, step=0.01)


def test_stream_ping_answers_only_for_its_own_name() -> None:
    sim = make_cluster(seed=8)
    target = sim.nodes[0].core
    sealer = Sealer("default", Keyring([KEY]))
    ok = sealer.seal(wire.encode_stream(wire.StreamPing(3, "n0", "n1")), sim.now, stream=True)
    wrong = sealer.seal(wire.encode_stream(wire.StreamPing(4, "n9", "n1")), sim.now, stream=True)
    reply = target.handle_stream(ok, ("10.0.0.2", 7946), sim.now)
    assert reply is not None
    ack = wire.decode_stream(sealer.open(reply, sim.now, stream=True))
    assert isinstance(ack, wire.Ack) and ack.seq == 3
    assert target.handle_stream(wrong, ("10.0.0.2", 7946), sim.now) is None


def test_broadcast_too_big_for_a_datagram_is_refused() -> None:
    core = Core(lan_config(), name="a", addr=("127.0.0.1", 1), keyring=Keyring([KEY]))
    core.queue_broadcast(b"x" * core.max_broadcast_payload)
    with pytest.raises(ValueError, match="send_reliable"):
        core.queue_broadcast(b"x" * (core.max_broadcast_payload + 1))
