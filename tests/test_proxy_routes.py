"""RouteTable: routes kept current from a real store, one rebuild per burst of changes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import async_wait_for
from proxy_fixtures import make_spec, make_status, replica

import meshd.proxy.routes as routes_mod
from meshd.proxy.endpoints import Route
from meshd.proxy.routes import RouteTable
from meshd.scheduler.assignment import ServiceStatus, encode_status, service_key, status_key
from meshd.state.store import Store

HTTP = {"name": "http", "target": 80, "protocol": "http", "service_port": 8080}
WALL = 1_700_000_000_000


class Recorder:
    def __init__(self) -> None:
        self.tables: list[dict[str, Route]] = []

    def __call__(self, routes: dict[str, Route]) -> None:
        self.tables.append(routes)

    @property
    def last(self) -> dict[str, Route]:
        return self.tables[-1]


class Harness:
    def __init__(self) -> None:
        self.store = Store("n1")
        self.down: set[str] = set()
        self.weights: dict[str, int] = {}
        self.table = RouteTable(
            self.store,
            reachable=lambda node: node not in self.down,
            weight=lambda node: self.weights.get(node, 1),
        )
        self.wall = WALL

    def put(self, key: str, value: bytes) -> None:
        self.wall += 1
        self.store.put(key, value, self.wall)

    def delete(self, key: str) -> None:
        self.wall += 1
        self.store.delete(key, self.wall)

    def spec(self, name: str, *ports: dict[str, Any]) -> None:
        self.put(service_key(name), json.dumps(make_spec(name, *ports).to_dict()).encode())

    def status(self, status: ServiceStatus) -> None:
        self.put(status_key(status.node, status.service), encode_status(status))

    def ids(self, service: str) -> list[str]:
        route = self.table.get(service)
        return [] if route is None else [b.id for b in route.backends]

    async def settled(self, rebuilds: int) -> None:
        """Wait until the table has rebuilt ``rebuilds`` times in all."""
        await async_wait_for(
            lambda: self.table.stats["rebuilds"] >= rebuilds,
            timeout=2.0,
            message=f"{rebuilds} rebuilds",
        )


@pytest.fixture
def h() -> Harness:
    return Harness()


async def test_start_builds_from_what_the_store_already_holds(h: Harness) -> None:
    h.spec("web", HTTP)
    h.status(make_status("n1", "web", replica("w1")))
    h.table.start()
    assert h.ids("web") == ["w1"]
    assert h.table.version == 1 and h.table.updated > 0
    seen = Recorder()
    h.table.listen(seen)
    assert [set(t) for t in seen.tables] == [{"web"}]  # the current table, at once
    h.table.stop()


async def test_a_burst_of_changes_rebuilds_once_on_the_next_iteration(h: Harness) -> None:
    h.table.start()
    seen = Recorder()
    h.table.listen(seen)
    base = h.table.stats["rebuilds"]
    h.spec("web", HTTP)
    h.spec("api", HTTP)
    for i in range(5):
        h.status(make_status(f"n{i}", "web", replica(f"w{i}")))
    assert h.table.get("web") is None  # nothing rebuilt inside the writes
    await async_wait_for(lambda: len(seen.tables) == 2, timeout=2.0)
    assert h.table.stats["rebuilds"] == base + 1
    assert set(seen.last) == {"web", "api"}
    assert h.ids("web") == [f"w{i}" for i in range(5)]
    h.table.stop()


async def test_status_and_spec_deletions_take_replicas_and_routes_away(h: Harness) -> None:
    h.spec("web", HTTP)
    h.status(make_status("n1", "web", replica("a")))
    h.status(make_status("n2", "web", replica("b")))
    h.table.start()
    assert h.ids("web") == ["a", "b"]
    h.delete(status_key("n2", "web"))
    await async_wait_for(lambda: h.ids("web") == ["a"], timeout=2.0)
    h.delete(service_key("web"))
    await async_wait_for(lambda: h.table.get("web") is None, timeout=2.0)
    h.table.stop()


async def test_a_replica_turning_unready_leaves_the_route(h: Harness) -> None:
    h.spec("web", HTTP)
    h.status(make_status("n1", "web", replica("a"), replica("b")))
    h.table.start()
    h.status(make_status("n1", "web", replica("a"), replica("b", health="unhealthy")))
    await async_wait_for(lambda: h.ids("web") == ["a"], timeout=2.0)
    h.table.stop()


async def test_bad_entries_are_counted_and_the_rest_still_routes(h: Harness) -> None:
    h.spec("web", HTTP)
    h.status(make_status("n1", "web", replica("a")))
    h.put(service_key("broken"), b"{not json")
    h.put(service_key("invalid"), json.dumps({"name": "Bad Name!", "image": "x"}).encode())
    h.put(status_key("n2", "web"), b"[]")
    h.put(status_key("n3", "web"), json.dumps({"node": "n3", "service": "web"}).encode()[:-3])
    h.table.start()
    assert set(h.table.routes) == {"web"}
    assert h.ids("web") == ["a"]
    assert h.table.stats["bad_specs"] == 2
    assert h.table.stats["bad_statuses"] == 2
    # unchanged bad entries are not decoded (nor counted) again on later rebuilds
    h.status(make_status("n1", "web", replica("a"), replica("b")))
    await async_wait_for(lambda: h.ids("web") == ["a", "b"], timeout=2.0)
    assert h.table.stats["bad_specs"] == 2
    assert h.table.stats["bad_statuses"] == 2
    # a fixed entry is picked up
    h.status(make_status("n2", "web", replica("c")))
    await async_wait_for(lambda: h.ids("web") == ["a", "b", "c"], timeout=2.0)
    h.table.stop()


async def test_only_changed_entries_are_decoded_again(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded: list[bytes] = []
    real = routes_mod.decode_status

    def counting(raw: bytes) -> ServiceStatus:
        decoded.append(raw)
        return real(raw)

    monkeypatch.setattr(routes_mod, "decode_status", counting)
    h.spec("web", HTTP)
    for i in range(4):
        h.status(make_status(f"n{i}", "web", replica(f"w{i}")))
    h.table.start()
    assert len(decoded) == 4
    h.status(make_status("n0", "web", replica("w0"), replica("x0")))
    await async_wait_for(lambda: "x0" in h.ids("web"), timeout=2.0)
    assert len(decoded) == 5


async def test_other_keys_do_not_rebuild(h: Harness) -> None:
    h.table.start()
    base = h.table.stats["rebuilds"]
    h.put("assign/web", b"{}")
    h.put("config/x", b"1")
    h.put("servicex", b"1")
    h.spec("web", HTTP)  # a real change afterwards: the only rebuild
    await h.settled(base + 1)
    assert h.table.stats["rebuilds"] == base + 1
    h.table.stop()


async def test_a_member_becoming_unreachable_rebuilds_on_mark_dirty(h: Harness) -> None:
    h.spec("web", HTTP)
    h.status(make_status("n1", "web", replica("a")))
    h.status(make_status("n2", "web", replica("b")))
    h.table.start()
    seen = Recorder()
    h.table.listen(seen)
    h.down.add("n2")
    assert h.ids("web") == ["a", "b"]  # the table does not watch gossip itself
    h.table.mark_dirty()
    h.table.mark_dirty()
    await async_wait_for(lambda: h.ids("web") == ["a"], timeout=2.0)
    assert len(seen.tables) == 2
    h.down.clear()
    h.table.mark_dirty()
    await async_wait_for(lambda: h.ids("web") == ["a", "b"], timeout=2.0)
    h.table.stop()


async def test_node_weights_reach_the_backends(h: Harness) -> None:
    h.weights["big"] = 4
    h.spec("web", HTTP)
    h.status(make_status("big", "web", replica("a")))
    h.status(make_status("small", "web", replica("b")))
    h.table.start()
    assert {b.id: b.weight for b in h.table.routes["web"].backends} == {"a": 4, "b": 1}


async def test_a_rebuild_that_changes_nothing_calls_no_listener(h: Harness) -> None:
    h.spec("web", HTTP)
    h.status(make_status("n1", "web", replica("a")))
    h.table.start()
    seen = Recorder()
    h.table.listen(seen)
    version = h.table.version
    base = h.table.stats["rebuilds"]
    h.status(make_status("n1", "web", replica("a")))  # rewritten, same content
    await h.settled(base + 1)
    assert h.table.version == version
    assert len(seen.tables) == 1
    h.table.stop()


async def test_a_failing_listener_does_not_stop_the_others(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    h.table.start()
    seen = Recorder()

    def broken(routes: dict[str, Route]) -> None:
        if routes:
            raise RuntimeError("listener bug")

    h.table.listen(broken)
    h.table.listen(seen)
    h.spec("web", HTTP)
    await async_wait_for(lambda: len(seen.tables) == 2, timeout=2.0)
    assert "web" in seen.last
    assert "route listener failed" in caplog.text
    h.table.stop()


async def test_after_stop_store_changes_are_not_followed(h: Harness) -> None:
    h.table.start()
    h.table.stop()
    h.table.stop()  # twice is fine
    witness = RouteTable(h.store, reachable=lambda node: True)
    witness.start()
    base = h.table.stats["rebuilds"]
    h.spec("web", HTTP)
    # the witness's rebuild runs in the iteration a rebuild of the stopped table would
    await async_wait_for(lambda: witness.get("web") is not None, timeout=2.0)
    assert h.table.stats["rebuilds"] == base
    assert h.table.get("web") is None


def test_without_a_running_loop_mark_dirty_rebuilds_at_once(h: Harness) -> None:
    h.table.start()
    h.spec("web", HTTP)  # the store's callback marks dirty: rebuilt on the spot
    assert h.table.get("web") is not None
    h.status(make_status("n1", "web", replica("a")))
    assert h.ids("web") == ["a"]
    h.down.add("n1")
    h.table.mark_dirty()
    assert h.ids("web") == []
    h.table.stop()


class FakeStore:
    """The two calls RouteTable makes, nothing more."""

    def __init__(self) -> None:
        self.entries: dict[str, Any] = {}
        self.subscribers: list[Any] = []

    def list(self, prefix: str) -> list[Any]:
        return [e for k, e in sorted(self.entries.items()) if k.startswith(prefix)]

    def subscribe(self, cb: Any) -> Any:
        self.subscribers.append(cb)
        return lambda: self.subscribers.remove(cb)


def test_any_store_with_list_and_subscribe_will_do() -> None:
    class E:
        def __init__(self, key: str, value: bytes, ts: int) -> None:
            self.key, self.value, self.ts = key, value, ts

    store = FakeStore()
    spec = json.dumps(make_spec("web", HTTP).to_dict()).encode()
    store.entries["service/web"] = E("service/web", spec, 1)
    table = RouteTable(store, reachable=lambda node: True)
    table.start()
    assert set(table.routes) == {"web"}
    entry = E("status/n1/web", encode_status(make_status("n1", "web", replica("a"))), 2)
    store.entries[entry.key] = entry
    for cb in list(store.subscribers):
        cb(entry)
    assert [b.id for b in table.routes["web"].backends] == ["a"]
    table.stop()
    assert store.subscribers == []
