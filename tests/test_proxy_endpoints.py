"""build_routes: which replicas of which service take traffic, and on which ports."""

from __future__ import annotations

import json

from proxy_fixtures import make_spec, make_status, replica

from meshd.proxy.balancing import Endpoint
from meshd.proxy.endpoints import Backend, Route, build_routes
from meshd.spec import Balance

HTTP = {"name": "http", "target": 80, "protocol": "http", "service_port": 8080}
ADMIN = {"name": "admin", "target": 9000}
WEB = make_spec("web", HTTP, ADMIN, balance={"policy": "hash", "hash_on": "header:x-user"})


def everyone(node: str) -> bool:
    return True


def test_a_service_without_statuses_has_a_route_and_no_backends() -> None:
    routes = build_routes({"web": WEB}, [], everyone)
    route = routes["web"]
    assert route.service == "web"
    assert route.ports == WEB.ports
    assert route.balance == Balance("hash", "header:x-user")
    assert route.backends == ()
    assert route.endpoints("http") == ()


def test_ready_replicas_become_backends_sorted_by_id() -> None:
    statuses = [
        make_status("n2", "web", replica("web-c", address="10.0.0.2")),
        make_status(
            "n1",
            "web",
            replica("web-b", ports={"http": 31001, "admin": 32001}),
            replica("web-a", health="healthy", ports={"http": 31000}),
        ),
    ]
    route = build_routes({"web": WEB}, statuses, everyone)["web"]
    assert [b.id for b in route.backends] == ["web-a", "web-b", "web-c"]
    assert route.backends[1] == Backend("web-b", "n1", "10.0.0.1", {"http": 31001, "admin": 32001})
    assert route.backends[2].node == "n2" and route.backends[2].address == "10.0.0.2"


def test_replicas_not_ready_take_no_traffic() -> None:
    statuses = [
        make_status(
            "n1",
            "web",
            replica("starting", state="starting"),
            replica("exited", state="exited"),
            replica("failed", state="failed"),
            replica("unhealthy", health="unhealthy"),
            replica("checking", health="starting"),
            replica("no-address", address=""),
            replica("ok-none", health="none"),
            replica("ok-healthy", health="healthy"),
        )
    ]
    route = build_routes({"web": WEB}, statuses, everyone)["web"]
    assert [b.id for b in route.backends] == ["ok-healthy", "ok-none"]


def test_replicas_on_unreachable_nodes_are_left_out() -> None:
    statuses = [
        make_status("alive", "web", replica("a")),
        make_status("dead", "web", replica("d")),
    ]
    route = build_routes({"web": WEB}, statuses, lambda node: node != "dead")["web"]
    assert [b.id for b in route.backends] == ["a"]


def test_statuses_of_unknown_services_are_ignored() -> None:
    routes = build_routes({"web": WEB}, [make_status("n1", "gone", replica("g"))], everyone)
    assert set(routes) == {"web"}
    assert routes["web"].backends == ()


def test_a_replica_reported_twice_counts_once() -> None:
    statuses = [
        make_status("n1", "web", replica("r1", address="10.0.0.1")),
        make_status("n2", "web", replica("r1", address="10.0.0.2")),
    ]
    route = build_routes({"web": WEB}, statuses, everyone)["web"]
    assert [(b.id, b.node) for b in route.backends] == [("r1", "n1")]


def test_weights_come_from_the_node_and_are_at_least_one() -> None:
    statuses = [
        make_status("big", "web", replica("a")),
        make_status("zero", "web", replica("b")),
        make_status("small", "web", replica("c")),
    ]
    weights = {"big": 8, "zero": 0, "small": 1}
    route = build_routes({"web": WEB}, statuses, everyone, weights.__getitem__)["web"]
    assert {b.id: b.weight for b in route.backends} == {"a": 8, "b": 1, "c": 1}
    assert [e.weight for e in route.endpoints("http")] == [8, 1, 1]


def test_endpoints_are_per_port_and_skip_replicas_without_it() -> None:
    statuses = [
        make_status(
            "n1",
            "web",
            replica("a", ports={"http": 31000, "admin": 32000}),
            replica("b", ports={"http": 31001}),
            replica("c", ports={"http": 0, "admin": 70000}),  # nonsense ports: skipped, no error
        )
    ]
    route = build_routes({"web": WEB}, statuses, everyone)["web"]
    assert route.endpoints("http") == (
        Endpoint("a", "n1", "10.0.0.1", 31000),
        Endpoint("b", "n1", "10.0.0.1", 31001),
    )
    assert route.endpoints("admin") == (Endpoint("a", "n1", "10.0.0.1", 32000),)
    assert route.endpoints("nope") == ()


def test_port_lookup_and_json_form() -> None:
    route = build_routes(
        {"web": WEB}, [make_status("n1", "web", replica("a", ports={"http": 31000}))], everyone
    )["web"]
    port = route.port("http")
    assert port is not None and port.service_port == 8080 and port.protocol == "http"
    assert route.port("nope") is None
    data = json.loads(json.dumps(route.to_json()))
    assert data == {
        "service": "web",
        "balance": {"policy": "hash", "hash_on": "header:x-user"},
        "ports": [
            {"name": "http", "target": 80, "protocol": "http", "service_port": 8080},
            {"name": "admin", "target": 9000, "protocol": "tcp", "service_port": None},
        ],
        "endpoints": [
            {"id": "a", "node": "n1", "address": "10.0.0.1", "ports": {"http": 31000}, "weight": 1}
        ],
    }


def test_jobs_and_portless_services_get_routes_too() -> None:
    job = make_spec("batch", HTTP, kind="job")
    quiet = make_spec("quiet")
    statuses = [make_status("n1", "batch", replica("j1")), make_status("n1", "quiet", replica("q"))]
    routes = build_routes({"batch": job, "quiet": quiet}, statuses, everyone)
    assert [b.id for b in routes["batch"].backends] == ["j1"]
    assert routes["quiet"].ports == () and [b.id for b in routes["quiet"].backends] == ["q"]


def test_same_inputs_in_any_order_build_equal_routes() -> None:
    statuses = [
        make_status("n1", "web", replica("b"), replica("a")),
        make_status(
            "n2", "web", replica("d", address="10.0.0.2"), replica("c", address="10.0.0.2")
        ),
    ]
    one = build_routes({"web": WEB}, statuses, everyone)
    two = build_routes({"web": WEB}, list(reversed(statuses)), everyone)
    assert one == two
    assert isinstance(one["web"], Route)
