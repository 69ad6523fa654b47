"""Replicating the store over gossip: rumours, anti-entropy, hostile input.

Most tests run many real gossip cores in the simulator's virtual time, each
with its own Store and Replicator; nothing sleeps. One test runs real
sockets on loopback.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import pytest
from conftest import async_wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossip.config import Config, lan_config, local_config
from gossip.crypto import Keyring
from gossip.driver import Gossip
from gossip.sim import SimNode, Simulation
from meshd.state.hlc import Timestamp
from meshd.state.replication import (
    MAX_BROADCAST,
    VERSION,
    GossipTransport,
    Replicator,
)
from meshd.state.store import (
    DIGEST_SIZE,
    Entry,
    MetaValue,
    PersistenceError,
    Store,
)

EPOCH = 1_700_000_000_000  # virtual time 0, as wall-clock milliseconds


# ----- harness -------------------------------------------------------------------


class SimTransport:
    """The Transport in the simulator: the node's current core, outputs
    delivered at once. Records what was sent, for size checks."""

    def __init__(self, sim: Simulation, name: str) -> None:
        self.sim = sim
        self.name = name
        self.broadcasts: list[tuple[bytes, str | None]] = []
        self.reliable: list[tuple[str, bytes]] = []

    def broadcast(self, payload: bytes, key: str | None) -> None:
        node = self.sim.by_name[self.name]
        self.broadcasts.append((payload, key))
        if node.up:
            node.core.queue_broadcast(payload, key)
            self.sim._after(node)

    def send_reliable(self, target: str, payload: bytes) -> None:
        node = self.sim.by_name[self.name]
        self.reliable.append((target, payload))
        dst = self.sim.by_name.get(target)
        if node.up and dst is not None:
            node.core.send_reliable(dst.addr, payload, self.sim.now)
            self.sim._after(node)


@dataclass
class Cluster:
    sim: Simulation
    nodes: list[SimNode] = field(default_factory=list)
    reps: list[Replicator] = field(default_factory=list)
    transports: list[SimTransport] = field(default_factory=list)
    skews: list[int] = field(default_factory=list)

    def clock(self, i: int) -> Callable[[], int]:
        return lambda: EPOCH + int(self.sim.now * 1000) + self.skews[i]

    def add(self, store: Store | None = None, skew: int = 0, **rep_kw: object) -> int:
        i = len(self.nodes)
        name = f"n{i}"
        self.skews.append(skew)
        transport = SimTransport(self.sim, name)
        rep = Replicator(
            store if store is not None else Store(name), name, self.clock(i), transport, **rep_kw
        )  # type: ignore[arg-type]
        self.transports.append(transport)
        self.reps.append(rep)
        self.nodes.append(self.sim.add_node(name, delegate=rep))
        return i

    def stores(self, among: Sequence[int] | None = None) -> list[Store]:
        idx = range(len(self.reps)) if among is None else among
        return [self.reps[i].store for i in idx]

    def converged(self, among: Sequence[int] | None = None) -> bool:
        """Every listed node that is up holds the same entries."""
        idx = [i for i in (among if among is not None else range(len(self.nodes)))]
        digests = {self.reps[i].store.digest() for i in idx if self.nodes[i].up}
        return len(digests) == 1

    def restart(self, i: int, store: Store, seed: int = 0) -> Replicator:
        """A new process on node i, with the given (old or reopened) store."""
        node = self.nodes[i]
        rep = Replicator(store, node.name, self.clock(i), self.transports[i])
        self.reps[i] = rep
        self.sim.restart(node)
        # Simulation.restart builds the new core without a delegate.
        node.core.delegate = rep
        self.sim.join(node, self.nodes[seed])
        return rep

    def total(self, stat: str) -> int:
        return sum(r.stats[stat] for r in self.reps)


def cluster(
    n: int, *, seed: int = 0, config: Config | None = None, loss: float = 0.0, **rep_kw: object
) -> Cluster:
    sim = Simulation(seed=seed, config=config or lan_config(push_pull_interval=5.0), loss=loss)
    c = Cluster(sim)
    for _ in range(n):
        c.add(**rep_kw)  # type: ignore[arg-type]
    sim.bootstrap()
    sim.run_for(1.0)
    return c


def holds(store: Store, entry: Entry) -> bool:
    return store.get(entry.key, include_deleted=True) == entry


def percentile(xs: Sequence[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


# ----- rumours: writes spread fast ----------------------------------------------------


def test_writes_reach_twenty_nodes_well_under_a_second() -> None:
    c = cluster(20, seed=1)
    sim = c.sim
    seen: dict[tuple[str, Timestamp], dict[str, float]] = {}
    for rep in c.reps:
        rep.store.subscribe(
            lambda e, name=rep.node: seen.setdefault((e.key, e.ts), {}).setdefault(name, sim.now)
        )
    rng = random.Random(1)
    written: dict[tuple[str, Timestamp], float] = {}
    for w in range(50):
        e = c.reps[rng.randrange(20)].put(f"service/s{w}", b'{"image":"web:%d"}' % w)
        written[(e.key, e.ts)] = sim.now
        sim.run_for(0.25)
    assert sim.run_until_true(lambda: all(len(seen[k]) == 20 for k in written), timeout=5)
    spread = [max(seen[k].values()) - t0 for k, t0 in written.items()]
    p50, p99 = statistics.median(spread), percentile(spread, 99)
    print(f"\nwrite visible on 20 nodes: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
    assert p99 < 1.0
    assert c.converged()
    # Each node applied each write once (nearly always from the rumour; a
    # push-pull running meanwhile may deliver one first).
    assert c.total("entries_applied") + c.total("sync_applied") == 50 * 19
    assert c.total("entries_applied") > 0.9 * 50 * 19


def test_deletes_spread_as_tombstones() -> None:
    c = cluster(20, seed=2)
    keys = [f"service/s{i}" for i in range(10)]
    for i, k in enumerate(keys):
        c.reps[i].put(k, b"spec")
    c.sim.run_for(1.0)
    assert all(len(s) == 10 for s in c.stores())
    gone = [c.reps[(i * 7) % 20].delete(k) for i, k in enumerate(keys[:6])]
    assert all(e is not None and e.is_tombstone for e in gone)
    assert c.reps[0].delete("service/never-there") is None
    assert c.sim.run_until_true(
        lambda: all(holds(s, e) for s in c.stores() for e in gone if e), timeout=1.0
    )
    for s in c.stores():
        assert len(s) == 4 and s.tombstones == 6
        assert s.get(keys[0]) is None
    assert c.converged()


def test_big_entries_are_announced_and_pulled_once_per_node() -> None:
    c = cluster(20, seed=3)
    big = c.reps[5].put("config/blob", bytes(range(256)) * 800)  # 200 KiB
    assert c.reps[5].stats["notices_sent"] == 1
    assert all(len(p) <= MAX_BROADCAST for p, _ in c.transports[5].broadcasts)
    assert c.sim.run_until_true(lambda: all(holds(s, big) for s in c.stores()), timeout=2.0)
    assert c.total("wants_sent") == 19  # each node asked once
    assert c.reps[5].stats["wants_in"] == 19
    # A newer small write to the same key travels inline again and wins.
    small = c.reps[9].put("config/blob", b"small")
    assert c.sim.run_until_true(lambda: all(holds(s, small) for s in c.stores()), timeout=1.0)


def test_largest_inline_write_fits_a_gossip_datagram() -> None:
    """MAX_BROADCAST must fit the gossip core's datagram budget, or the
    message would never leave the piggyback queue."""
    c = cluster(20, seed=11, config=lan_config())  # push-pull far away (30 s)
    key = "service/" + "k" * 500
    size = max(
        n
        for n in range(0, MAX_BROADCAST)
        if len(msgpack.packb([VERSION, "entry", [key, bytes(n), [EPOCH * 2, 2**32 - 1, "n0"]]]))
        <= MAX_BROADCAST
    )
    e = c.reps[0].put(key, bytes(size))
    ((payload, _),) = c.transports[0].broadcasts
    assert MAX_BROADCAST - 8 <= len(payload) <= MAX_BROADCAST
    assert c.reps[0].stats["entries_broadcast"] == 1
    assert c.sim.run_until_true(lambda: all(holds(s, e) for s in c.stores()), timeout=1.0)
    assert c.total("sync_applied") == 0 and c.total("wants_sent") == 0


def test_concurrent_writes_converge_on_one_winner() -> None:
    rng = random.Random(4)
    sim = Simulation(seed=4, config=lan_config(push_pull_interval=5.0), loss=0.05)
    c = Cluster(sim)
    for _ in range(12):
        c.add(skew=rng.randint(-500, 500))  # clocks disagree by up to a second
    sim.bootstrap()
    sim.run_for(1.0)
    for round_ in range(5):
        writers = rng.sample(range(12), 6)
        entries = [c.reps[i].put("service/web", f"{round_}:{i}".encode()) for i in writers]
        winner = max(entries, key=lambda e: e.ts)
        assert sim.run_until_true(
            lambda w=winner: all(holds(s, w) for s in c.stores()), timeout=10
        ), f"round {round_}"
        assert c.converged()


# ----- anti-entropy ------------------------------------------------------------------------


def test_crashed_node_catches_up_after_restart() -> None:
    c = cluster(10, seed=5)
    sim = c.sim
    for i in range(10):
        c.reps[i].put(f"service/before{i}", b"x")
    sim.run_for(1.0)
    assert c.converged()
    old_store = c.reps[3].store
    sim.crash(c.nodes[3])
    rng = random.Random(5)
    for w in range(40):
        i = rng.choice([0, 1, 2, 4, 5, 6, 7, 8, 9])
        c.reps[i].put(f"service/during{w}", b"y%d" % w)
        if w % 5 == 0:
            c.reps[i].delete(f"service/before{w // 5}")
        sim.run_for(0.5)
    assert not holds(old_store, c.reps[0].store.get("service/during0"))  # type: ignore[arg-type]
    rep = c.restart(3, old_store)
    assert sim.run_until_true(c.converged, timeout=30)
    assert rep.stats["sync_applied"] >= 40
    assert len(old_store) == 40 + 10 - 8


def test_lost_broadcasts_are_repaired_by_periodic_push_pull() -> None:
    c = cluster(8, seed=6)
    sim = c.sim
    deaf = c.nodes[2]
    deaf.udp_blocked = True  # no gossip reaches it; TCP (push-pull) still does
    for w in range(20):
        c.reps[w % 8].put(f"service/s{w}", b"v")
    sim.run_for(0.5)
    assert len(c.reps[2].store) < 20
    assert sim.run_until_true(c.converged, timeout=30)
    assert c.reps[2].stats["sync_applied"] > 0
    assert c.total("digests_differing") > 0 and c.total("buckets_differing") > 0


def test_restart_from_sqlite_catches_up(tmp_path: Path) -> None:
    sim = Simulation(seed=7, config=lan_config(push_pull_interval=5.0))
    c = Cluster(sim)
    for _ in range(4):
        c.add()
    db = tmp_path / "n4.db"
    c.add(store=Store.open("n4", db))
    sim.bootstrap()
    sim.run_for(1.0)
    mine = c.reps[4].put("status/n4/web.1", b"running")
    theirs = c.reps[0].put("service/web", b"v1")
    assert sim.run_until_true(c.converged, timeout=2)
    sim.crash(c.nodes[4])
    c.reps[4].store.close()
    for w in range(30):
        c.reps[w % 4].put(f"service/s{w}", b"v")
    c.reps[1].delete("service/web")
    sim.run_for(2.0)
    reopened = Store.open("n4", db)
    assert holds(reopened, mine) and holds(reopened, theirs)  # persisted before the crash
    c.restart(4, reopened)
    assert sim.run_until_true(c.converged, timeout=30)
    reopened.close()
    again = Store.open("n4", db)  # what was synced was persisted too
    try:
        assert again.digest() == c.reps[0].store.digest()
        assert again.get("service/web") is None and len(again) == 31
    finally:
        again.close()


def test_partition_heals_and_stores_converge() -> None:
    c = cluster(12, seed=8)
    sim = c.sim
    left, right = c.nodes[:6], c.nodes[6:]
    sim.partition(left, right)
    rng = random.Random(8)
    conflicts = []
    for w in range(30):
        i = rng.randrange(12)
        c.reps[i].put(f"service/s{w}", b"side-%d" % (i < 6))
        if w % 10 == 0:
            conflicts += [
                c.reps[0].put(f"service/both{w}", b"left"),
                c.reps[11].put(f"service/both{w}", b"right"),
            ]
        sim.run_for(1.0)
    sim.run_for(20)  # long enough for each side to declare the other dead
    assert c.converged(range(6)) and c.converged(range(6, 12))
    assert not c.converged()
    sim.heal()
    assert sim.run_until_true(c.converged, timeout=120)
    for k in {e.key for e in conflicts}:
        winner = max((e for e in conflicts if e.key == k), key=lambda e: e.ts)
        assert all(holds(s, winner) for s in c.stores())


def test_new_node_receives_five_thousand_keys_in_chunks() -> None:
    chunk = 64 * 1024
    c = cluster(3, seed=9, chunk_bytes=chunk)
    sim = c.sim
    store0 = c.reps[0].store
    for i in range(5000):
        store0.put(f"service/s{i:05d}", b"%0100d" % i, EPOCH + int(sim.now * 1000))
    assert sim.run_until_true(c.converged, timeout=30)  # by anti-entropy alone
    j = c.add(chunk_bytes=chunk)
    sim.join(c.nodes[j], c.nodes[0])
    t0 = sim.now
    assert sim.run_until_true(c.converged, timeout=10)
    print(f"\nnew node converged on 5,000 keys in {sim.now - t0:.2f} virtual s")
    assert len(c.reps[j].store) == 5000
    sent = [p for t in c.transports for _, p in t.reliable]
    assert sum(1 for t in c.transports[:3] for to, _ in t.reliable if to == "n3") > 1
    assert max(len(p) for p in sent) <= chunk + 256


def test_chunks_hold_every_entry_once_and_respect_the_limit() -> None:
    store = Store("a")
    for i in range(3):
        store.put(f"big/{i}", bytes(1024 * 1024 - 100), EPOCH)
    for i in range(100):
        store.put(f"small/{i}", b"v", EPOCH)
    sink = SimTransportStub()
    rep = Replicator(store, "a", lambda: EPOCH, sink, chunk_bytes=1024 * 1024)
    rep._send_entries("b", store.list())
    got = []
    for to, payload in sink.reliable:
        assert to == "b"
        msg = msgpack.unpackb(payload, raw=False)
        assert msg[:3] == [VERSION, "entries", "a"]
        got += [Entry.unpack(x) for x in msg[3]]
        assert len(payload) <= 1024 * 1024 + 256 or len(msg[3]) == 1
    assert got == store.list()
    assert len(sink.reliable) == 4  # each big entry alone, the small ones together


def test_tombstones_are_collected_everywhere() -> None:
    c = cluster(5, seed=10)
    for i in range(5):
        c.reps[i].put(f"k{i}", b"v")
    c.sim.run_for(1.0)
    for i in range(3):
        c.reps[i].delete(f"k{i}")
    c.sim.run_for(1.0)
    assert all(s.tombstones == 3 for s in c.stores())
    c.sim.run_for(11.0)
    assert sum(r.collect(older_than_ms=10_000) for r in c.reps) == 15
    assert all(s.tombstones == 0 and len(s) == 2 for s in c.stores())
    assert c.converged()


# ----- hostile and broken input --------------------------------------------------------------


class SimTransportStub:
    def __init__(self) -> None:
        self.broadcasts: list[tuple[bytes, str | None]] = []
        self.reliable: list[tuple[str, bytes]] = []

    def broadcast(self, payload: bytes, key: str | None) -> None:
        self.broadcasts.append((payload, key))

    def send_reliable(self, node: str, payload: bytes) -> None:
        self.reliable.append((node, payload))


def lone(store: Store | None = None) -> tuple[Replicator, SimTransportStub]:
    sink = SimTransportStub()
    store = store if store is not None else Store("me")
    for i in range(20):
        store.put(f"service/s{i}", b"spec", EPOCH)
    return Replicator(store, "me", lambda: EPOCH + 1000, sink), sink


def dropped(rep: Replicator) -> int:
    return rep.stats["invalid"] + rep.stats["unsupported"]


junk = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=64),
    # Arrays of at most two elements are never an entry or a timestamp (three).
    lambda inner: st.lists(inner, max_size=2),
    max_leaves=8,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000))
def test_garbage_bytes_change_nothing(data: bytes) -> None:
    rep, sink = lone()
    before = rep.store.digest()
    assert rep.notify_user_msg(data) is False
    rep.merge_remote_state(data, False)
    assert rep.store.digest() == before
    assert sink.broadcasts == [] and sink.reliable == []
    assert dropped(rep) == (2 if data else 1)  # empty push-pull state is "no state"


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    version=st.sampled_from([VERSION, VERSION + 1, 0]) | junk,
    kind=st.sampled_from(["entry", "entries", "notice", "digest", "bogus"]) | junk,
    fields=st.lists(junk, max_size=4),
    via_push_pull=st.booleans(),
)
def test_malformed_envelopes_change_nothing(
    version: object, kind: object, fields: list[object], via_push_pull: bool
) -> None:
    rep, sink = lone()
    before = rep.store.digest()
    index = rep.store.index
    data = msgpack.packb([version, kind, *fields], use_bin_type=True)
    if via_push_pull:
        rep.merge_remote_state(data, True)
    else:
        assert rep.notify_user_msg(data) is False
    assert rep.store.digest() == before and rep.store.index == index
    assert sink.broadcasts == [] and sink.reliable == []
    # The one well-formed message this can build: an empty batch of entries.
    empty_batch = (
        version == VERSION
        and kind == "entries"
        and len(fields) == 2
        and isinstance(fields[0], str)
        and 0 < len(fields[0].encode("utf-8", "replace")) <= 255
        and "\x00" not in fields[0]
        and fields[1] == []
        and not via_push_pull
    )
    assert empty_batch or dropped(rep) + rep.stats["invalid_entries"] >= 1
    assert rep.stats["internal_errors"] == 0


def envelope(*fields: object) -> bytes:
    return msgpack.packb([VERSION, *fields], use_bin_type=True)


def test_hostile_entries_are_refused_and_counted() -> None:
    rep, sink = lone()
    store = rep.store
    before = store.digest()
    future = Entry("service/x", b"v", Timestamp(EPOCH + 3_600_000, 0, "evil"))
    assert rep.notify_user_msg(envelope("entry", future.pack())) is False
    assert store.stats["clock_drift"] == 1
    bad_key = ("../etc", b"v", (EPOCH, 0, "evil"))
    assert rep.notify_user_msg(envelope("entry", bad_key)) is False
    assert rep.stats["invalid"] == 1
    # In a sync batch a bad entry is skipped and the rest applied.
    good = Entry("service/ok", b"v", Timestamp(EPOCH, 5, "peer"))
    batch = envelope("entries", "peer", [bad_key, future.pack(), good.pack(), 7])
    assert rep.notify_user_msg(batch) is False
    assert rep.stats["invalid_entries"] == 2 and store.stats["clock_drift"] == 2
    assert holds(store, good) and rep.stats["sync_applied"] == 1
    assert store.digest() != before
    # A notice from the future doesn't make us ask for anything.
    assert rep.notify_user_msg(envelope("notice", "evil", "k", future.ts.pack())) is False
    # Wrong field counts, a digest of the wrong size, a digest via the wrong hook.
    assert rep.notify_user_msg(envelope("entry", good.pack(), "extra")) is False
    rep.merge_remote_state(envelope("digest", "peer", b"\x00" * (DIGEST_SIZE - 1)), False)
    assert rep.notify_user_msg(envelope("digest", "peer", store.digest())) is False
    rep.merge_remote_state(envelope("entry", good.pack()), False)
    assert rep.stats["invalid"] == 4 and rep.stats["unsupported"] == 1
    assert sink.reliable == [] and rep.stats["internal_errors"] == 0


def test_push_pull_sends_only_differing_buckets() -> None:
    rep, sink = lone()
    peer = Store("peer")
    for e in rep.store.list()[:15]:
        peer.apply(e, EPOCH)
    rep.merge_remote_state(envelope("digest", "peer", peer.digest()), False)
    ((to, payload),) = sink.reliable
    assert to == "peer"
    sent = [Entry.unpack(x) for x in msgpack.unpackb(payload, raw=False)[3]]
    assert {e.key for e in rep.store.list()[15:]} <= {e.key for e in sent}
    assert len(sent) < 20
    peer.apply_many(sent, EPOCH)
    assert peer.digest() == rep.store.digest()
    # Equal digests: nothing to send.
    rep.merge_remote_state(envelope("digest", "peer", peer.digest()), False)
    assert len(sink.reliable) == 1
    assert rep.stats["digests_in"] == 2 and rep.stats["digests_differing"] == 1


class BrokenDisk:
    """A Persistence whose writes fail (disk full, say)."""

    def save(self, entries: object, meta: object = None) -> None:
        raise PersistenceError("state database test.db: can't save: disk I/O error")

    def delete_keys(self, keys: object, meta: object = None) -> None:
        raise PersistenceError("state database test.db: can't delete: disk I/O error")

    def load(self) -> list[Entry]:
        return []

    def save_meta(self, key: str, value: MetaValue) -> None:
        pass

    def load_meta(self, key: str) -> MetaValue | None:
        return None

    def close(self) -> None:
        pass


def test_storage_and_transport_failures_are_counted_not_raised() -> None:
    sink = SimTransportStub()
    rep = Replicator(Store("me", BrokenDisk()), "me", lambda: EPOCH, sink)
    e = Entry("service/x", b"v", Timestamp(EPOCH, 0, "peer"))
    assert rep.notify_user_msg(envelope("entry", e.pack())) is False
    assert rep.notify_user_msg(envelope("entries", "peer", [e.pack()])) is False
    assert rep.stats["persist_errors"] == 2
    with pytest.raises(PersistenceError):  # a local write must not be acknowledged
        rep.put("service/x", b"v")
    assert rep.collect(EPOCH, 0) == 0

    class Down:
        def broadcast(self, payload: bytes, key: str | None) -> None:
            raise OSError("gossip stopped")

        def send_reliable(self, node: str, payload: bytes) -> None:
            raise OSError("gossip stopped")

    rep = Replicator(Store("me"), "me", lambda: EPOCH, Down())
    assert rep.put("service/x", b"v").value == b"v"  # written; anti-entropy spreads it later
    rep.merge_remote_state(envelope("digest", "peer", bytes(DIGEST_SIZE)), False)
    assert rep.stats["transport_errors"] == 2


def test_wants_are_answered_and_deduplicated() -> None:
    rep, sink = lone()
    ts = Timestamp(EPOCH + 500, 0, "writer")
    assert rep.notify_user_msg(envelope("notice", "writer", "config/big", ts.pack())) is True
    assert rep.notify_user_msg(envelope("notice", "writer", "config/big", ts.pack())) is False
    ((to, want),) = sink.reliable
    assert to == "writer" and msgpack.unpackb(want) == [VERSION, "want", "me", ["config/big"]]
    # A notice of something we already hold in a newer version is old news.
    held = rep.store.get("service/s1")
    assert held is not None
    old = Timestamp(held.ts.wall_ms - 1, 0, "writer")
    assert rep.notify_user_msg(envelope("notice", "writer", "service/s1", old.pack())) is False
    # Answering: the keys we hold (tombstones too), none we don't.
    rep.delete("service/s2")
    sink.reliable.clear()
    rep.notify_user_msg(envelope("want", "asker", ["service/s1", "service/s2", "nope"]))
    ((to, reply),) = sink.reliable
    got = [Entry.unpack(x) for x in msgpack.unpackb(reply, raw=False)[3]]
    assert to == "asker" and [e.key for e in got] == ["service/s1", "service/s2"]
    assert got[1].is_tombstone


def test_broadcast_key_lets_newer_writes_supersede() -> None:
    rep, sink = lone()
    rep.put("service/web", b"1")
    rep.delete("service/web")
    keys = [k for _, k in sink.broadcasts]
    assert keys == ["state:service/web", "state:service/web"]


# ----- real sockets ---------------------------------------------------------------------------


@pytest.mark.integration
async def test_three_agents_replicate_over_loopback() -> None:
    key = Keyring.generate()
    config = local_config(push_pull_interval=1.0)

    def wall() -> int:
        return int(time.time() * 1000)

    reps: list[Replicator] = []
    nodes: list[Gossip] = []
    for i in range(3):
        transport = GossipTransport()
        store = Store(f"a{i}")
        rep = Replicator(store, f"a{i}", wall, transport)
        g = Gossip(
            config, name=f"a{i}", bind=("127.0.0.1", 0), keyring=Keyring([key]), delegate=rep
        )
        transport.attach(g)
        reps.append(rep)
        nodes.append(g)
    for i in range(200):
        reps[0].put(f"service/s{i}", b"spec")  # before anyone else is there
    try:
        for g in nodes:
            await g.start()
        for g in nodes[1:]:
            assert g.bound is not None and nodes[0].bound is not None
            assert await g.join([nodes[0].bound], timeout=5) == 1

        await async_wait_for(
            lambda: len({r.store.digest() for r in reps}) == 1, 10, message="digests equal"
        )
        assert len(reps[2].store) == 200
        small = reps[2].put("service/web", b"v2")
        big = reps[1].put("config/blob", b"x" * 300_000)
        await async_wait_for(
            lambda: all(holds(r.store, small) and holds(r.store, big) for r in reps),
            10,
            message="both writes everywhere",
        )
        # Each other node pulls the big entry at most once (a push-pull's
        # anti-entropy may bring it first, and then it never asks).
        assert reps[1].stats["notices_sent"] == 1 and reps[1].stats["wants_in"] <= 2
    finally:
        for g in nodes:
            await g.stop()


def test_big_entries_are_pushed_to_each_peer_of_a_small_cluster() -> None:
    sink = SimTransportStub()
    rep = Replicator(
        Store("me"), "me", lambda: EPOCH, sink, peers=lambda: ["a", "b", "c"], push_limit=3
    )
    rep.put("assign/web", b"x" * 4000)
    assert sorted(node for node, _ in sink.reliable) == ["a", "b", "c"]
    assert rep.stats["entries_pushed"] == 3 and rep.stats["notices_sent"] == 1
    # The receiver applies the pushed entry as it would a pulled one.
    other = Replicator(Store("a"), "a", lambda: EPOCH, SimTransportStub())
    other.notify_user_msg(sink.reliable[0][1])
    assert other.store.get("assign/web") is not None
    # Small writes still travel inline; a big cluster relies on notices alone.
    sink.reliable.clear()
    rep.put("k", b"small")
    assert sink.reliable == []
    big = Replicator(
        Store("me"), "me", lambda: EPOCH, sink, peers=lambda: list("abcd"), push_limit=3
    )
    big.put("assign/web", b"x" * 4000)
    assert sink.reliable == [] and big.stats["entries_pushed"] == 0
