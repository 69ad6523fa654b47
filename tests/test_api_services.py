"""The service endpoints and member removal, over the fake agent on 127.0.0.1."""

from __future__ import annotations

import asyncio
import inspect
import json
import socket
from collections.abc import AsyncIterator, Iterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from api_fake import FakeView, ServerThread, raw_request, raw_request_async
from conftest import async_wait_for, wait_for
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from meshd.api import AgentView, create_app, openapi_document
from meshd.api.appkeys import STATE
from meshd.api.services import LOG_CONTENT_TYPE, MAX_TAIL
from meshd.scheduler.assignment import spec_version
from meshd.spec import ServiceSpec, SpecError
from meshd.spec.model import MAX_REPLICAS
from meshd.state.store import PersistenceError

TOKEN = "s3cret"
SMALL_BODY = 4096

WEB_YAML = b"""
name: web
image: nginx:1.27
replicas: 3
ports:
  - {name: http, target: 80, protocol: http, service_port: 8080}
health: {http: /healthz}
"""

COMPOSE = b"""
services:
  web:
    image: nginx
    ports: ["8080:80"]
    deploy: {replicas: 2}
    build: .
  cache:
    image: redis:7
"""


@pytest.fixture
def view() -> FakeView:
    return FakeView()


async def _client(app: web.Application) -> TestClient:
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    return client


@pytest.fixture
async def api(view: FakeView) -> AsyncIterator[TestClient]:
    client = await _client(create_app(view))
    yield client
    await client.close()


def port_of(client: TestClient) -> int:
    port = client.server.port
    assert port is not None
    return port


def internal_errors(client: TestClient) -> int:
    return client.server.app[STATE].internal_errors


async def error_of(response, status: int, error: str) -> dict:  # type: ignore[no-untyped-def]
    """Assert response is the JSON error (status, error); return the body."""
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert body["error"] == error, body
    assert isinstance(body["detail"], str) and body["detail"]
    return body


async def spec_error(response, field: str) -> str:  # type: ignore[no-untyped-def]
    body = await error_of(response, 400, "bad_spec")
    assert set(body) == {"error", "detail", "field"}
    assert body["field"] == field, body
    return body["detail"]


# ----- create, read, replace, delete ---------------------------------------------------


async def test_put_creates_then_replaces(api: TestClient, view: FakeView) -> None:
    assert await (await api.get("/v1/services")).json() == []
    response = await api.put("/v1/services/web", data=WEB_YAML)
    assert response.status == 201, await response.text()
    created = await response.json()
    spec = view.services["web"][0]
    assert created["name"] == "web" and created["kind"] == "service"
    assert created["version"] == spec_version(spec)
    assert created["spec"] == spec.to_dict()
    assert created["spec"]["ports"][0]["service_port"] == 8080
    assert created["replicas"] == {"desired": 3, "running": 3, "ready": 3}
    assert created["leader"] == {"node": "n1", "term": 1}
    assert created["pending"] == [] and created["update"] is None
    assert created["warnings"] == []

    replaced = await api.put("/v1/services/web", json={"image": "nginx:1.28", "replicas": 1})
    assert replaced.status == 200
    body = await replaced.json()
    assert body["spec"]["image"] == "nginx:1.28" and body["version"] != created["version"]
    assert body["created_ms"] == created["created_ms"]

    got = await (await api.get("/v1/services/web")).json()
    assert got == {k: v for k, v in body.items() if k != "warnings"}
    assert [s["name"] for s in await (await api.get("/v1/services")).json()] == ["web"]


async def test_put_json_and_name_from_path(api: TestClient) -> None:
    response = await api.put("/v1/services/worker", json={"command": "sleep 100", "replicas": 2})
    assert response.status == 201
    body = await response.json()
    assert body["spec"]["name"] == "worker"
    assert body["spec"]["command"] == ["sleep", "100"]
    response = await api.put("/v1/services/api", data=b'{"name": "api", "image": "x"}')
    assert response.status == 201


async def test_put_a_compose_file_with_one_service(api: TestClient) -> None:
    doc = b"services:\n  cache:\n    image: redis\n    build: .\n"
    response = await api.put("/v1/services/cache", data=doc)
    assert response.status == 201
    body = await response.json()
    assert body["spec"]["image"] == "redis"
    assert body["warnings"] == ["services.cache.build: ignored (not supported)"]


@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/v1/services/web", b"name: api\nimage: x\n", "name"),
        ("/v1/services/web", b'[{"name": "api", "image": "x"}]', "[0].name"),
        ("/v1/services/web", b"services:\n  api: {image: x}\n", "services.api"),
    ],
)
async def test_body_name_must_match_the_path(
    api: TestClient, view: FakeView, path: str, body: bytes, field: str
) -> None:
    detail = await spec_error(await api.put(path, data=body), field)
    assert "'api'" in detail and "'web'" in detail
    assert view.services == {}


async def test_put_takes_exactly_one_service(api: TestClient, view: FakeView) -> None:
    detail = await spec_error(await api.put("/v1/services/web", data=COMPOSE), "")
    assert "2 services" in detail and "POST /v1/services" in detail
    assert view.services == {}


@pytest.mark.parametrize(
    "body, field",
    [
        (b"image: x\nports: [{name: http, target: 0}]\n", "ports[0].target"),
        (b"image: x\nreplicas: -1\n", "replicas"),
        (b"image: x\nreplicas: 10001\n", "replicas"),
        (b"image: x\nimage_typo: y\n", "image_typo"),
        (b"command: [sleep, 1]\nimage: x\n", "image"),
        (b"image: x\nhealth: {tcp: nope}\n", "health.tcp"),
        (b"image: x\nresources: {memory: lots}\n", "resources.memory"),
        (b"services:\n  web: {image: x, deploy: {replicas: many}}\n", "services.web.deploy.replicas"),
        (b"name: [unclosed\n", ""),
        (b"", ""),
        (b"\xff\xfe", ""),
        (b"just text", ""),
        (b'{"image": "x", "replicas": 1e400}', "replicas"),
        (b"[" * 5000, ""),
    ],
)  # fmt: skip
async def test_bad_specs_name_their_field(
    api: TestClient, view: FakeView, body: bytes, field: str
) -> None:
    await spec_error(await api.put("/v1/services/web", data=body), field)
    assert view.services == {}
    assert internal_errors(api) == 0


@pytest.mark.parametrize("name", ["Web", "-web", "web-", "a_b", "a" * 64, "w%C3%A9b", "a.b"])
async def test_bad_service_names(api: TestClient, name: str) -> None:
    for method, suffix in [
        ("GET", ""),
        ("PUT", ""),
        ("DELETE", ""),
        ("GET", "/replicas"),
        ("GET", "/leader"),
        ("POST", "/scale"),
        ("GET", "/logs"),
    ]:
        status, _, body = await raw_request_async(
            port_of(api), method, f"/v1/services/{name}{suffix}", b"image: x"
        )
        assert status == 400, (method, suffix, body)
        assert json.loads(body)["error"] == "bad_name"


async def test_unknown_services_are_404(api: TestClient) -> None:
    for method, suffix in [
        ("GET", ""),
        ("DELETE", ""),
        ("GET", "/replicas"),
        ("GET", "/leader"),
        ("GET", "/logs"),
        ("GET", "/logs?follow=true"),
    ]:
        response = await api.request(method, f"/v1/services/nope{suffix}")
        body = await error_of(response, 404, "service_not_found")
        assert "'nope'" in body["detail"]
    response = await api.post("/v1/services/nope/scale", json={"replicas": 1})
    await error_of(response, 404, "service_not_found")


async def test_delete(api: TestClient, view: FakeView) -> None:
    await api.put("/v1/services/web", data=WEB_YAML)
    response = await api.delete("/v1/services/web")
    assert response.status == 200
    assert await response.json() == {"name": "web", "deleted": True}
    assert view.services == {}
    await error_of(await api.delete("/v1/services/web"), 404, "service_not_found")


async def test_replicas_and_leader(api: TestClient) -> None:
    await api.put("/v1/services/web", data=WEB_YAML)
    replicas = await (await api.get("/v1/services/web/replicas")).json()
    assert [r["slot"] for r in replicas] == [0, 1, 2]
    first = replicas[0]
    assert set(first) == {
        "id", "service", "slot", "node", "version", "state", "health", "address",
        "ports", "restarts", "started_ms", "exit_code", "reason",
    }  # fmt: skip
    assert first["service"] == "web" and first["ports"] == {"http": 30000}
    assert await (await api.get("/v1/services/web/leader")).json() == {"node": "n1", "term": 1}


# ----- deploying several ----------------------------------------------------------------


async def test_post_deploys_a_compose_file(api: TestClient, view: FakeView) -> None:
    response = await api.post("/v1/services", data=COMPOSE)
    assert response.status == 200, await response.text()
    records = await response.json()
    assert [r["name"] for r in records] == ["web", "cache"]
    assert records[0]["replicas"]["desired"] == 2
    assert records[0]["spec"]["ports"][0]["service_port"] == 8080
    assert records[0]["warnings"] == ["services.web.build: ignored (not supported)"]
    assert records[1]["warnings"] == []
    assert sorted(view.services) == ["cache", "web"]


async def test_post_takes_lists_and_single_specs(api: TestClient, view: FakeView) -> None:
    body = [{"name": "a", "image": "x"}, {"name": "b", "command": ["true"], "kind": "job"}]
    records = await (await api.post("/v1/services", json=body)).json()
    assert [(r["name"], r["kind"]) for r in records] == [("a", "service"), ("b", "job")]
    records = await (await api.post("/v1/services", data=b"name: c\nimage: y\n")).json()
    assert [r["name"] for r in records] == ["c"]


async def test_post_with_one_bad_spec_deploys_nothing(api: TestClient, view: FakeView) -> None:
    body = b"services:\n  web: {image: x}\n  db: {image: y, ports: ['99999']}\n"
    await spec_error(await api.post("/v1/services", data=body), "services.db.ports[0].target")
    body = b'[{"name": "a", "image": "x"}, {"name": "a", "image": "y"}]'
    await spec_error(await api.post("/v1/services", data=body), "name")
    assert view.services == {}


# ----- scaling ---------------------------------------------------------------------------


async def test_scale(api: TestClient, view: FakeView) -> None:
    await api.put("/v1/services/web", data=WEB_YAML)
    version = view.services["web"][0]
    response = await api.post("/v1/services/web/scale", json={"replicas": 5})
    assert response.status == 200
    body = await response.json()
    assert body["replicas"]["desired"] == 5
    assert body["version"] == spec_version(version)  # scaling is no rollout
    assert len(await (await api.get("/v1/services/web/replicas")).json()) == 5
    assert (await api.post("/v1/services/web/scale", json={"replicas": 0})).status == 200
    response = await api.post("/v1/services/web/scale", json={"replicas": MAX_REPLICAS})
    assert response.status == 200


@pytest.mark.parametrize(
    "body",
    [
        b"", b"3", b"not json", b"\xff", b"[]", b'{"replicas": -1}',
        b'{"replicas": %d}' % (MAX_REPLICAS + 1), b'{"replicas": "3"}', b'{"replicas": true}',
        b'{"replicas": 1.5}', b'{"replicas": null}', b'{"replicas": 2, "force": true}', b"{}",
        b'{"replicas": 1e999}', b"[" * 5000,
    ],
)  # fmt: skip
async def test_scale_bad_bodies(api: TestClient, view: FakeView, body: bytes) -> None:
    await api.put("/v1/services/web", data=WEB_YAML)
    detail = (await error_of(await api.post("/v1/services/web/scale", data=body), 400, "bad_body"))[
        "detail"
    ]
    assert '{"replicas": N}' in detail
    assert view.services["web"][0].replicas == 3
    assert internal_errors(api) == 0


async def test_scaling_a_job_is_a_conflict(api: TestClient) -> None:
    await api.put("/v1/services/batch", json={"command": ["true"], "kind": "job"})
    response = await api.post("/v1/services/batch/scale", json={"replicas": 2})
    body = await error_of(response, 409, "conflict")
    assert "job" in body["detail"]


# ----- the agent refusing or failing a write ----------------------------------------------


@pytest.mark.parametrize(
    "error, status, code",
    [
        (PersistenceError("disk I/O error"), 503, "store_unavailable"),
        (ValueError("service_port 8080 is taken by 'api'"), 409, "conflict"),
        (SpecError("ports[0].service_port", "is taken by 'api'"), 400, "bad_spec"),
    ],
)
async def test_write_errors_are_mapped(
    api: TestClient, view: FakeView, error: Exception, status: int, code: str
) -> None:
    view.service_error = error
    body = await error_of(await api.put("/v1/services/web", data=WEB_YAML), status, code)
    assert str(error) in body["detail"]
    await api.put("/v1/services/web", data=WEB_YAML)
    for method, path, data in [
        ("POST", "/v1/services", WEB_YAML),
        ("POST", "/v1/services/web/scale", b'{"replicas": 1}'),
        ("DELETE", "/v1/services/web", b""),
    ]:
        view.service_error = error
        await error_of(await api.request(method, path, data=data), status, code)
    assert internal_errors(api) == 0


async def test_body_over_the_limit(view: FakeView) -> None:
    api = await _client(create_app(view, max_body=SMALL_BODY))
    try:
        big = WEB_YAML + b"#" * SMALL_BODY
        await error_of(await api.put("/v1/services/web", data=big), 413, "body_too_large")
        await error_of(await api.post("/v1/services", data=big), 413, "body_too_large")
        assert view.services == {}
    finally:
        await api.close()


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/v1/services?all"),
        ("POST", "/v1/services?dry_run"),
        ("PUT", "/v1/services/web?force"),
        ("GET", "/v1/services/web/replicas?node=n1"),
        ("GET", "/v1/services/web/logs?since=1h"),
        ("DELETE", "/v1/members/n3?force"),
    ],
)
async def test_unknown_query_params(api: TestClient, method: str, path: str) -> None:
    await error_of(await api.request(method, path, data=WEB_YAML), 400, "bad_param")


@pytest.mark.parametrize(
    "method, path, allowed",
    [
        ("DELETE", "/v1/services", "GET, HEAD, POST"),
        ("POST", "/v1/services/web", "DELETE, GET, HEAD, PUT"),
        ("GET", "/v1/services/web/scale", "POST"),
        ("HEAD", "/v1/services/web/logs", "GET"),
        ("PUT", "/v1/services/web/leader", "GET, HEAD"),
        ("GET", "/v1/members/n3", "DELETE"),
    ],
)
async def test_wrong_method(api: TestClient, method: str, path: str, allowed: str) -> None:
    response = await api.request(method, path)
    assert response.status == 405
    assert response.headers["Allow"] == allowed


# ----- logs --------------------------------------------------------------------------------


async def _with_lines(api: TestClient, view: FakeView, count: int) -> None:
    await api.put("/v1/services/web", data=WEB_YAML)
    for i in range(count):
        await view.emit("web", f"line {i}", stream="stderr" if i % 2 else "stdout")


def _ndjson(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


async def test_logs(api: TestClient, view: FakeView) -> None:
    await _with_lines(api, view, 5)
    response = await api.get("/v1/services/web/logs")
    assert response.status == 200
    assert response.headers["Content-Type"] == LOG_CONTENT_TYPE
    lines = _ndjson(await response.text())
    assert [line["text"] for line in lines] == [f"line {i}" for i in range(5)]
    assert set(lines[0]) == {"replica", "node", "stream", "time", "text"}
    assert lines[1]["stream"] == "stderr"
    tail = _ndjson(await (await api.get("/v1/services/web/logs?tail=2")).text())
    assert [line["text"] for line in tail] == ["line 3", "line 4"]
    assert await (await api.get("/v1/services/web/logs?tail=0")).text() == ""
    assert view.log_requests[-1] == ("web", 0, False)
    await api.get(f"/v1/services/web/logs?tail={MAX_TAIL}&follow=false")
    assert view.log_requests[-1] == ("web", MAX_TAIL, False)
    assert view.followers == 0


async def test_many_log_lines_arrive_whole(api: TestClient, view: FakeView) -> None:
    await _with_lines(api, view, 3000)
    lines = _ndjson(await (await api.get("/v1/services/web/logs")).text())
    assert [line["text"] for line in lines] == [f"line {i}" for i in range(3000)]


@pytest.mark.parametrize("tail", ["-1", "x", "1.5", "", str(MAX_TAIL + 1), "%EF%BC%91", "1e3"])
async def test_logs_bad_tail(api: TestClient, view: FakeView, tail: str) -> None:
    await api.put("/v1/services/web", data=WEB_YAML)
    status, _, body = await raw_request_async(
        port_of(api), "GET", f"/v1/services/web/logs?tail={tail}"
    )
    assert status == 400, body
    assert json.loads(body)["error"] == "bad_param"


async def test_logs_follow_streams_until_the_client_goes(api: TestClient, view: FakeView) -> None:
    await _with_lines(api, view, 2)
    response = await api.get("/v1/services/web/logs?tail=1&follow")
    assert response.status == 200
    assert response.headers["Transfer-Encoding"] == "chunked"
    assert json.loads(await response.content.readline())["text"] == "line 1"
    assert view.followers == 1
    await view.emit("web", "fresh")
    line = await asyncio.wait_for(response.content.readline(), 5)
    assert json.loads(line)["text"] == "fresh"
    response.close()  # the client goes away
    await async_wait_for(lambda: view.followers == 0, message="the follower stopped")
    assert internal_errors(api) == 0


async def test_logs_follow_ends_when_the_service_is_removed(
    api: TestClient, view: FakeView
) -> None:
    await _with_lines(api, view, 1)
    response = await api.get("/v1/services/web/logs?follow=1")
    assert json.loads(await response.content.readline())["text"] == "line 0"
    await api.delete("/v1/services/web")
    assert await asyncio.wait_for(response.content.read(), 5) == b""
    assert view.followers == 0


async def test_a_broken_log_stream_ends_with_an_error_line(api: TestClient, view: FakeView) -> None:
    await _with_lines(api, view, 2)
    view.log_error = RuntimeError("driver went away")
    for query in ("", "?follow"):
        lines = _ndjson(await (await api.get(f"/v1/services/web/logs{query}")).text())
        assert [line.get("text") for line in lines[:2]] == ["line 0", "line 1"]
        assert lines[2]["error"] == "internal" and "driver went away" in lines[2]["detail"]
    assert internal_errors(api) == 2
    assert view.followers == 0


def test_logs_follow_over_a_raw_socket_stops_on_disconnect(view: FakeView) -> None:
    """A follower with nothing to send still notices that its client closed."""
    with ServerThread(create_app(view)) as server:
        server.run(view.service_put(ServiceSpec.from_dict({"name": "web", "image": "x"})))
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        try:
            sock.sendall(b"GET /v1/services/web/logs?follow HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            wait_for(lambda: view.followers == 1, message="the follower started")
        finally:
            sock.close()
        wait_for(lambda: view.followers == 0, message="the follower noticed the disconnect")
        assert server.app[STATE].internal_errors == 0


# ----- removing members ------------------------------------------------------------------


async def test_member_remove(api: TestClient, view: FakeView) -> None:
    response = await api.delete("/v1/members/n3")
    assert response.status == 200
    assert await response.json() == {"node": "n3", "removed": True}
    assert view.removed == ["n3"]
    names = [m["name"] for m in await (await api.get("/v1/members")).json()]
    assert names == ["n1", "n2", "n4"]
    await error_of(await api.delete("/v1/members/n3"), 404, "member_not_found")
    body = await error_of(await api.delete("/v1/members/n1"), 409, "conflict")
    assert "alive" in body["detail"]
    view.service_error = PersistenceError("disk full")
    await error_of(await api.delete("/v1/members/n4"), 503, "store_unavailable")
    assert view.removed == ["n3"]


@pytest.mark.parametrize("node", ["a%20b", "x" * 64, "%C3%A9", "a%00"])
async def test_member_remove_bad_names(api: TestClient, view: FakeView, node: str) -> None:
    status, _, body = await raw_request_async(port_of(api), "DELETE", f"/v1/members/{node}")
    assert status == 400, body
    assert json.loads(body)["error"] == "bad_name"
    assert view.removed == []


# ----- the token, the view, the document ------------------------------------------------


async def test_token_guards_the_service_routes(view: FakeView) -> None:
    api = await _client(create_app(view, token=TOKEN))
    try:
        for method, path in [
            ("GET", "/v1/services"),
            ("POST", "/v1/services"),
            ("PUT", "/v1/services/web"),
            ("GET", "/v1/services/web/logs"),
            ("POST", "/v1/services/web/scale"),
            ("DELETE", "/v1/members/n3"),
        ]:
            await error_of(await api.request(method, path, data=WEB_YAML), 401, "unauthorized")
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert (await api.put("/v1/services/web", data=WEB_YAML, headers=auth)).status == 201
        assert view.removed == [] and list(view.services) == ["web"]
    finally:
        await api.close()


def test_the_fake_implements_the_whole_view() -> None:
    wanted = {
        name
        for name, member in vars(AgentView).items()
        if not name.startswith("_") and (callable(member) or isinstance(member, property))
    }
    assert {"service_put", "service_logs", "member_remove"} <= wanted
    for name in wanted:
        assert hasattr(FakeView, name), name
        protocol, fake = getattr(AgentView, name), getattr(FakeView, name)
        if callable(protocol):
            assert inspect.iscoroutinefunction(protocol) == inspect.iscoroutinefunction(fake), name


def test_openapi_documents_the_service_routes() -> None:
    paths = openapi_document()["paths"]
    for path in ["/v1/services/{name}", "/v1/services/{name}/logs", "/v1/members/{node}"]:
        assert path in paths
    put = paths["/v1/services/{name}"]["put"]["responses"]
    assert {"200", "201", "400", "409", "413"} <= set(put)
    logs = paths["/v1/services/{name}/logs"]["get"]["responses"]["200"]["content"]
    assert LOG_CONTENT_TYPE in logs
    for path, item in paths.items():
        if path.startswith("/v1/services/{name}"):
            for method, op in item.items():
                if method not in ("parameters", "put"):  # a PUT creates
                    assert "404" in op["responses"], (method, path)


# ----- fuzzing: bad input never makes a 500 -------------------------------------------

_name = st.one_of(
    st.sampled_from(["web", "nope", "Web", "-", "a" * 64, "%zz", "%C3", "..", "n3", "n1"]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=12),
)
_suffix = st.sampled_from(["", "/", "/replicas", "/leader", "/scale", "/logs", "/x"])
_query = st.one_of(
    st.just(""),
    st.lists(
        st.tuples(
            st.sampled_from(["tail", "follow", "x", "%zz", ""]),
            st.sampled_from(["", "1", "0", "-1", "no", "maybe", "%ff", "99999999999999"]),
        ),
        max_size=3,
    ).map(lambda pairs: "?" + "&".join(f"{k}={v}" for k, v in pairs)),
)
_body = st.one_of(
    st.binary(max_size=64),
    st.sampled_from(
        [b"", WEB_YAML, COMPOSE, b'{"replicas": 2}', b"name: web\nimage: x", b"- a\n- b", b"&a [*a]"]
    ),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
        max_leaves=10,
    ).map(lambda v: json.dumps(v).encode()),
)  # fmt: skip


@pytest.fixture(scope="module")
def threaded() -> Iterator[tuple[ServerThread, FakeView]]:
    view = FakeView()
    with ServerThread(create_app(view, max_body=SMALL_BODY)) as server:
        server.run(view.service_put(ServiceSpec.from_dict({"name": "web", "image": "x"})))
        yield server, view


def _follows(query: str) -> bool:
    """?follow with a true value: the answer would never end."""
    for part in query.lstrip("?").split("&"):
        name, _, value = part.partition("=")
        if name == "follow" and value.lower() in ("", "1", "true", "yes", "on"):
            return True
    return False


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    method=st.sampled_from(["GET", "PUT", "POST", "DELETE", "HEAD", "PATCH"]),
    base=st.sampled_from(["/v1/services/", "/v1/services", "/v1/members/"]),
    name=_name,
    suffix=_suffix,
    query=_query,
    body=_body,
)
def test_random_requests_never_fail_internally(
    threaded: tuple[ServerThread, FakeView],
    method: str,
    base: str,
    name: str,
    suffix: str,
    query: str,
    body: bytes,
) -> None:
    server, view = threaded
    assume(not (_follows(query) and "logs" in suffix))
    target = (base + name + suffix + query).encode("latin-1", "replace")
    status, headers, answer = raw_request(server.port, method, target, body)
    assert status != 500, (target, answer)
    assert status in {200, 201, 400, 404, 405, 409, 413}, (status, target, answer)
    if method != "HEAD" and status >= 400:
        assert headers["content-type"].startswith("application/json"), answer
    assert server.app[STATE].internal_errors == 0
    if "web" not in view.services:  # keep a service to hit
        server.run(view.service_put(ServiceSpec.from_dict({"name": "web", "image": "x"})))


_json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(
        st.sampled_from(["name", "image", "command", "replicas", "ports", "env", "health",
                         "resources", "services", "kind", "update", "target", "x"]),
        inner,
        max_size=5,
    ),
    max_leaves=20,
)  # fmt: skip


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(value=_json_value)
def test_any_json_spec_is_stored_or_refused_cleanly(
    threaded: tuple[ServerThread, FakeView], value: object
) -> None:
    server, _ = threaded
    body = json.dumps(value).encode()
    status, _, answer = raw_request(server.port, "PUT", "/v1/services/fuzz", body)
    assert status in {200, 201, 400, 413}, answer
    if status == 400:
        error = json.loads(answer)
        assert error["error"] == "bad_spec" and isinstance(error["field"], str)
    status, _, answer = raw_request(server.port, "POST", "/v1/services", body)
    assert status in {200, 400, 413}, answer
    assert server.app[STATE].internal_errors == 0


async def test_leases_lists_what_the_agent_held(api: TestClient) -> None:
    resp = await api.get("/v1/agent/leases")
    assert resp.status == 200
    assert await resp.json() == [{"service": "web", "term": 3, "start": 1.0, "until": 3.0}]
