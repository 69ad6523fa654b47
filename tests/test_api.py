"""The local HTTP API: every route, every error case, metrics and the OpenAPI document.

The API runs over a fake agent backed by a real in-memory store, served on
127.0.0.1. Requests whose exact bytes matter (malformed escapes, '..'
segments) go through ``raw_request*``, which sends them untouched.
"""

from __future__ import annotations

import base64
import logging
import socket
from collections.abc import AsyncIterator
from urllib.parse import quote

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from api_fake import FakeView, ServerThread, raw_request, raw_request_async
from conftest import async_wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from meshd.api import INDEX_HEADER, ServeError, create_app, openapi_document, serve
from meshd.api.appkeys import STATE
from meshd.api.serve import is_loopback, is_wildcard
from meshd.state.store import MAX_KEY, MAX_VALUE, PersistenceError

TOKEN = "s3cret-token"
SMALL_BODY = 4096


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


@pytest.fixture
async def small(view: FakeView) -> AsyncIterator[TestClient]:
    """An API with a small body limit, to test it without megabytes of traffic."""
    client = await _client(create_app(view, max_body=SMALL_BODY))
    yield client
    await client.close()


@pytest.fixture
async def guarded(view: FakeView) -> AsyncIterator[TestClient]:
    client = await _client(create_app(view, token=TOKEN))
    yield client
    await client.close()


def port_of(client: TestClient) -> int:
    port = client.server.port
    assert port is not None
    return port


def internal_errors(client: TestClient) -> int:
    return client.server.app[STATE].internal_errors


async def error_of(response, status: int, error: str) -> str:  # type: ignore[no-untyped-def]
    """Assert response is the JSON error (status, error); return its detail."""
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"error", "detail"}
    assert body["error"] == error
    assert isinstance(body["detail"], str) and body["detail"]
    return body["detail"]


# ----- the agent and its cluster ------------------------------------------------


async def test_agent(api: TestClient) -> None:
    response = await api.get("/v1/agent")
    assert response.status == 200
    body = await response.json()
    assert body["name"] == "n1"
    assert body["cluster"] == "test"
    assert body["labels"] == {"zone": "a"}
    assert body["capacity"]["cpus"] == 4


async def test_members_and_status_filter(api: TestClient) -> None:
    everyone = await (await api.get("/v1/members")).json()
    assert [m["name"] for m in everyone] == ["n1", "n2", "n3", "n4"]
    assert {m["status"] for m in everyone} == {"alive", "suspect", "left"}
    assert everyone[2]["rtt_ms"] == 12.5
    alive = await (await api.get("/v1/members?status=alive")).json()
    assert [m["name"] for m in alive] == ["n1", "n2"]
    some = await (await api.get("/v1/members?status=suspect,left")).json()
    assert [m["name"] for m in some] == ["n3", "n4"]
    assert await (await api.get("/v1/members?status=dead")).json() == []
    detail = await error_of(await api.get("/v1/members?status=zombie"), 400, "bad_param")
    assert "zombie" in detail and "alive" in detail


async def test_health(api: TestClient, view: FakeView) -> None:
    response = await api.get("/v1/health")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}
    view.healthy = (False, "not in a cluster yet: joining 10.0.0.2:7946")
    response = await api.get("/v1/health")
    assert response.status == 503
    body = await response.json()
    assert body["status"] == "unavailable"
    assert body["error"] == "unavailable"
    assert body["detail"] == "not in a cluster yet: joining 10.0.0.2:7946"


async def test_leave_answers_at_once_and_leaves(api: TestClient, view: FakeView) -> None:
    response = await api.post("/v1/agent/leave")
    assert response.status == 202
    assert await response.json() == {"status": "leaving"}
    await async_wait_for(lambda: view.leaves == 1, message="the view's leave() was called")
    # Asking again while the agent goes is harmless.
    assert (await api.post("/v1/agent/leave")).status == 202


async def test_failed_leave_is_logged_and_can_be_retried(
    api: TestClient, view: FakeView, caplog: pytest.LogCaptureFixture
) -> None:
    view.leave_error = RuntimeError("broadcast queue closed")
    with caplog.at_level(logging.ERROR, logger="meshd.api"):
        assert (await api.post("/v1/agent/leave")).status == 202
        await async_wait_for(lambda: "leave requested through the API failed" in caplog.text)
    view.leave_error = None
    assert (await api.post("/v1/agent/leave")).status == 202
    await async_wait_for(lambda: view.leaves == 2)


# ----- KV: reads and writes ---------------------------------------------------------


async def test_put_then_get_text(api: TestClient, view: FakeView) -> None:
    response = await api.put("/v1/kv/services/web", data=b"replicas=3")
    assert response.status == 200
    put = await response.json()
    assert put["key"] == "services/web"
    assert put["value"] == "replicas=3"
    assert base64.b64decode(put["value_base64"]) == b"replicas=3"
    assert put["size"] == 10
    wall, counter, node = put["version"].split(".", 2)
    assert int(wall) > 0 and int(counter) >= 0 and node == "n1"
    assert put["modified"].endswith("Z")
    assert response.headers[INDEX_HEADER] == str(view.store.index) == "1"

    response = await api.get("/v1/kv/services/web")
    assert response.status == 200
    assert response.headers[INDEX_HEADER] == "1"
    assert await response.json() == put
    assert view.store.get("services/web").value == b"replicas=3"


async def test_binary_values_and_raw(api: TestClient) -> None:
    blob = bytes(range(256))
    assert (await api.put("/v1/kv/blob", data=blob)).status == 200
    body = await (await api.get("/v1/kv/blob")).json()
    assert body["value"] is None  # not UTF-8
    assert base64.b64decode(body["value_base64"]) == blob
    response = await api.get("/v1/kv/blob?raw")
    assert response.status == 200
    assert response.content_type == "application/octet-stream"
    assert response.headers[INDEX_HEADER] == "1"
    assert await response.read() == blob
    assert await (await api.get("/v1/kv/blob?raw=false")).json() == body


async def test_empty_value(api: TestClient) -> None:
    assert (await api.put("/v1/kv/empty", data=b"")).status == 200
    body = await (await api.get("/v1/kv/empty")).json()
    assert body["value"] == "" and body["size"] == 0


async def test_put_base64(api: TestClient) -> None:
    encoded = base64.b64encode(b"\x00\xffbinary").decode() + "\n"  # as `base64` prints it
    assert (await api.put("/v1/kv/b64?base64", data=encoded)).status == 200
    assert await (await api.get("/v1/kv/b64?raw")).read() == b"\x00\xffbinary"


@pytest.mark.parametrize("body", [b"not base64!", b"abc", b"YWJj\x00", "é".encode()])
async def test_put_bad_base64(api: TestClient, view: FakeView, body: bytes) -> None:
    await error_of(await api.put("/v1/kv/b64?base64=1", data=body), 400, "bad_base64")
    assert view.store.index == 0


async def test_overwrite_bumps_version_and_index(api: TestClient) -> None:
    first = await (await api.put("/v1/kv/k", data=b"1")).json()
    response = await api.put("/v1/kv/k", data=b"2")
    second = await response.json()
    assert second["value"] == "2"
    assert second["version"] != first["version"]
    assert response.headers[INDEX_HEADER] == "2"


async def test_delete(api: TestClient, view: FakeView) -> None:
    await api.put("/v1/kv/gone", data=b"x")
    response = await api.delete("/v1/kv/gone")
    assert response.status == 200
    body = await response.json()
    assert body["key"] == "gone" and body["deleted"] is True and "value" not in body
    assert response.headers[INDEX_HEADER] == "2"
    await error_of(await api.get("/v1/kv/gone"), 404, "key_not_found")
    await error_of(await api.delete("/v1/kv/gone"), 404, "key_not_found")
    await error_of(await api.delete("/v1/kv/never"), 404, "key_not_found")
    assert view.store.index == 2


async def test_missing_key(api: TestClient) -> None:
    response = await api.get("/v1/kv/nope")
    detail = await error_of(response, 404, "key_not_found")
    assert "nope" in detail
    assert response.headers[INDEX_HEADER] == "0"
    await error_of(await api.get("/v1/kv/nope?raw"), 404, "key_not_found")


async def test_head_on_a_key(api: TestClient) -> None:
    await api.put("/v1/kv/h", data=b"hello")
    response = await api.head("/v1/kv/h")
    assert response.status == 200
    assert response.headers[INDEX_HEADER] == "1"
    assert (await api.head("/v1/kv/missing")).status == 404


@pytest.mark.parametrize(
    "key",
    ["a", "dir/sub/leaf", "sp ace", "ünï/cødé", "q?uery#frag", "100%", "a+b", "a=b&c", "./x", "k" * MAX_KEY],
)  # fmt: skip
async def test_keys_round_trip_when_percent_encoded(api: TestClient, key: str) -> None:
    target = "/v1/kv/" + quote(key, safe="/")
    status, _, body = await raw_request_async(port_of(api), "PUT", target, b"v")
    assert status == 200, body
    status, _, body = await raw_request_async(port_of(api), "GET", target + "?raw")
    assert (status, body) == (200, b"v")
    keys = await (await api.get("/v1/kv?keys")).json()
    assert keys == [key]


async def test_encoded_slash_is_a_slash(api: TestClient) -> None:
    port = port_of(api)
    assert (await raw_request_async(port, "PUT", "/v1/kv/a%2Fb", b"v"))[0] == 200
    assert await (await api.get("/v1/kv?keys")).json() == ["a/b"]


# ----- KV: listing ------------------------------------------------------------------


async def test_list(api: TestClient, view: FakeView) -> None:
    for key in ("svc/b", "svc/a", "other", "svc/c"):
        await api.put(f"/v1/kv/{key}", data=key.encode())
    await api.delete("/v1/kv/svc/c")
    response = await api.get("/v1/kv?prefix=svc/")
    assert response.status == 200
    assert response.headers[INDEX_HEADER] == str(view.store.index) == "5"
    listed = await response.json()
    assert [e["key"] for e in listed] == ["svc/a", "svc/b"]
    assert listed[0]["value"] == "svc/a"
    assert await (await api.get("/v1/kv?prefix=svc/&keys")).json() == ["svc/a", "svc/b"]
    assert await (await api.get("/v1/kv?keys=true")).json() == ["other", "svc/a", "svc/b"]
    assert await (await api.get("/v1/kv?prefix=zzz")).json() == []
    assert await (await api.get("/v1/kv?prefix=sv%63%2F&keys")).json() == ["svc/a", "svc/b"]


@pytest.mark.parametrize(
    "target, error",
    [
        ("/v1/kv?prefix=" + "p" * (MAX_KEY + 1), "bad_param"),
        ("/v1/kv?prefix=a%00", "bad_param"),
        ("/v1/kv?prefix=%ff", "bad_encoding"),
        ("/v1/kv?prefix=%zz", "bad_encoding"),
        ("/v1/kv?keys=maybe", "bad_param"),
        ("/v1/kv?recurse", "bad_param"),
        ("/v1/kv?prefix=a&prefix=b", "bad_param"),
        ("/v1/kv?%zz=1", "bad_encoding"),
    ],
)
async def test_list_bad_params(api: TestClient, target: str, error: str) -> None:
    status, _, body = await raw_request_async(port_of(api), "GET", target)
    assert status == 400, body
    assert b'"error": "%s"' % error.encode() in body


# ----- KV: bad keys and bodies ---------------------------------------------------------

BAD_KEY_TARGETS = [
    ("/v1/kv/a/../b", "bad_key"),
    ("/v1/kv/..", "bad_key"),
    ("/v1/kv/../agent", "bad_key"),
    ("/v1/kv/a/%2E%2E/b", "bad_key"),
    ("/v1/kv/a%00b", "bad_key"),
    ("/v1/kv/a%0Ab", "bad_key"),  # not printable
    ("/v1/kv//etc/passwd", "bad_key"),  # leading '/'
    ("/v1/kv/" + "k" * (MAX_KEY + 1), "bad_key"),
    ("/v1/kv/" + "%C3%A9" * (MAX_KEY // 2 + 1), "bad_key"),  # too many bytes, not chars
    ("/v1/kv/%zz", "bad_encoding"),
    ("/v1/kv/a%", "bad_encoding"),
    ("/v1/kv/a%4", "bad_encoding"),
    ("/v1/kv/%ff%fe", "bad_encoding"),
    ("/v1/kv/%C3", "bad_encoding"),  # truncated UTF-8
]


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
@pytest.mark.parametrize("target, error", BAD_KEY_TARGETS)
async def test_bad_keys(
    api: TestClient, view: FakeView, method: str, target: str, error: str
) -> None:
    status, headers, body = await raw_request_async(port_of(api), method, target, b"v")
    assert status == 400, body
    assert headers["content-type"].startswith("application/json")
    assert b'"error": "%s"' % error.encode() in body
    assert view.store.index == 0
    assert internal_errors(api) == 0


async def test_bad_key_detail_is_clear(api: TestClient) -> None:
    status, _, body = await raw_request_async(port_of(api), "PUT", "/v1/kv/a/../b", b"v")
    assert status == 400
    assert b"'..' segment" in body
    status, _, body = await raw_request_async(port_of(api), "GET", "/v1/kv/%zz")
    assert b"malformed percent-escape" in body and b"%25" in body


@pytest.mark.parametrize(
    "target", ["/v1/kv/k?raw=maybe", "/v1/kv/k?rav", "/v1/kv/k?raw&raw", "/v1/kv/k?raw=%ff"]
)
async def test_get_bad_params(api: TestClient, target: str) -> None:
    status, _, body = await raw_request_async(port_of(api), "GET", target)
    assert status == 400, body


async def test_put_and_delete_refuse_unknown_params(api: TestClient) -> None:
    await error_of(await api.put("/v1/kv/k?cas=3", data=b"v"), 400, "bad_param")
    await error_of(await api.delete("/v1/kv/k?recurse"), 400, "bad_param")


async def test_body_over_the_limit(small: TestClient, view: FakeView) -> None:
    detail = await error_of(
        await small.put("/v1/kv/big", data=b"x" * (SMALL_BODY + 1)), 413, "body_too_large"
    )
    assert str(SMALL_BODY) in detail
    assert (await small.put("/v1/kv/ok", data=b"x" * SMALL_BODY)).status == 200
    assert view.store.get("big") is None


async def test_chunked_body_over_the_limit(small: TestClient, view: FakeView) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(SMALL_BODY // 512 + 2):
            yield b"y" * 512

    await error_of(await small.put("/v1/kv/big", data=chunks()), 413, "body_too_large")
    assert view.store.get("big") is None


async def test_value_over_max_value(api: TestClient, view: FakeView) -> None:
    """The body limit (2 MiB) lets a base64 value through; the value limit still holds."""
    detail = await error_of(
        await api.put("/v1/kv/big", data=b"v" * (MAX_VALUE + 1)), 413, "value_too_large"
    )
    assert str(MAX_VALUE) in detail
    big = base64.b64encode(b"v" * (MAX_VALUE + 1))
    await error_of(await api.put("/v1/kv/big?base64", data=big), 413, "value_too_large")
    assert (await api.put("/v1/kv/max", data=b"v" * MAX_VALUE)).status == 200
    assert view.store.get("big") is None


async def test_view_refusing_a_value_is_a_400(api: TestClient, view: FakeView) -> None:
    view.write_error = ValueError("value is not a valid service spec")
    detail = await error_of(await api.put("/v1/kv/k", data=b"v"), 400, "bad_value")
    assert detail == "value is not a valid service spec"


async def test_persistence_failure_is_a_503(api: TestClient, view: FakeView) -> None:
    view.write_error = PersistenceError("state database /x/state.db: disk I/O error")
    detail = await error_of(await api.put("/v1/kv/k", data=b"v"), 503, "store_unavailable")
    assert "disk I/O error" in detail
    await api.put("/v1/kv/k", data=b"v")
    view.write_error = PersistenceError("disk full")
    await error_of(await api.delete("/v1/kv/k"), 503, "store_unavailable")


# ----- routes, methods, unexpected errors ------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/v1", "/v2/agent", "/v1/kv/", "/v1/agents", "/favicon.ico"])
async def test_unknown_route(api: TestClient, path: str) -> None:
    detail = await error_of(await api.get(path), 404, "not_found")
    assert "no such endpoint" in detail


@pytest.mark.parametrize(
    "method, path, allowed",
    [
        ("POST", "/v1/kv/k", "DELETE, GET, HEAD, PUT"),
        ("PATCH", "/v1/kv/k", "DELETE, GET, HEAD, PUT"),
        ("DELETE", "/v1/agent", "GET, HEAD"),
        ("GET", "/v1/agent/leave", "POST"),
        ("PUT", "/v1/kv", "GET, HEAD"),
        ("POST", "/metrics", "GET, HEAD"),
    ],
)
async def test_wrong_method(api: TestClient, method: str, path: str, allowed: str) -> None:
    response = await api.request(method, path)
    detail = await error_of(response, 405, "method_not_allowed")
    assert response.headers["Allow"] == allowed
    assert allowed in detail


@pytest.mark.parametrize("path", ["/v1/agent?x=1", "/v1/health?verbose", "/v1/agent/leave?now"])
async def test_unknown_query_params(api: TestClient, view: FakeView, path: str) -> None:
    method = "POST" if "leave" in path else "GET"
    detail = await error_of(await api.request(method, path), 400, "bad_param")
    assert "unknown query parameter" in detail
    assert view.leaves == 0


async def test_unexpected_exception_is_a_logged_json_500(
    api: TestClient, view: FakeView, caplog: pytest.LogCaptureFixture
) -> None:
    view.info_error = RuntimeError("bug in the agent")
    with caplog.at_level(logging.ERROR, logger="meshd.api"):
        await error_of(await api.get("/v1/agent"), 500, "internal")
    assert "bug in the agent" in caplog.text
    assert internal_errors(api) == 1


async def test_request_line_errors_never_reach_the_app(api: TestClient) -> None:
    """aiohttp's parser answers these itself (400, not JSON); the app never sees them."""
    status, _, _ = await raw_request_async(port_of(api), "GET", b"/v1/kv/\xff")
    assert status == 400
    assert internal_errors(api) == 0


# ----- the token ---------------------------------------------------------------------


async def test_token_missing(guarded: TestClient) -> None:
    response = await guarded.get("/v1/agent")
    detail = await error_of(response, 401, "unauthorized")
    assert "Bearer" in detail and "MESHD_TOKEN" in detail
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "header, status",
    [
        (f"Bearer {TOKEN}x", 403),
        ("Bearer nope", 403),
        (f"Basic {TOKEN}", 401),
        ("Bearer", 401),
        ("Bearer   ", 401),
        (TOKEN, 401),
        ("Bearer ünïcødé", 403),
    ],
)
async def test_token_wrong(guarded: TestClient, header: str, status: int) -> None:
    response = await guarded.get("/v1/members", headers={"Authorization": header})
    await error_of(response, status, "forbidden" if status == 403 else "unauthorized")


async def test_token_right(guarded: TestClient) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert (await guarded.get("/v1/agent", headers=auth)).status == 200
    assert (
        await guarded.get("/v1/agent", headers={"Authorization": f"bearer  {TOKEN} "})
    ).status == 200
    assert (await guarded.put("/v1/kv/k", data=b"v", headers=auth)).status == 200
    assert (await guarded.get("/metrics", headers=auth)).status == 200


async def test_token_guards_everything_but_health(guarded: TestClient, view: FakeView) -> None:
    assert (await guarded.get("/v1/health")).status == 200
    for method, path in [
        ("GET", "/v1/members"),
        ("POST", "/v1/agent/leave"),
        ("PUT", "/v1/kv/k"),
        ("GET", "/v1/kv"),
        ("GET", "/v1/openapi.json"),
        ("GET", "/metrics"),
        ("GET", "/no/such/route"),  # no probing for routes without the token
    ]:
        await error_of(await guarded.request(method, path), 401, "unauthorized")
    assert view.leaves == 0 and view.store.index == 0


def test_create_app_refuses_bad_settings(view: FakeView) -> None:
    with pytest.raises(ValueError, match="token must not be empty"):
        create_app(view, token="  ")
    with pytest.raises(ValueError, match="max_body"):
        create_app(view, max_body=0)


# ----- serving -----------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "*"])
async def test_serve_refuses_a_wildcard_without_a_token(view: FakeView, host: str) -> None:
    # Refused before anything is bound (tests never listen on every interface).
    with pytest.raises(ServeError, match="without a token"):
        await serve(create_app(view), host, 0)


def test_address_classes() -> None:
    assert all(is_wildcard(h) for h in ["0.0.0.0", "::", "[::]", "", None, "*", "0:0::0"])
    assert not any(is_wildcard(h) for h in ["127.0.0.1", "::1", "10.0.0.1", "localhost"])
    assert all(is_loopback(h) for h in ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"])
    assert not any(is_loopback(h) for h in ["10.0.0.1", "example.org", "0.0.0.0"])


async def test_serve_on_loopback_and_port_in_use(view: FakeView) -> None:
    runner = await serve(create_app(view), "127.0.0.1", 0)
    try:
        host, port = runner.addresses[0][:2]
        assert host == "127.0.0.1"
        assert (await raw_request_async(port, "GET", "/v1/health"))[0] == 200
        with pytest.raises(ServeError, match=rf"cannot serve the API on 127\.0\.0\.1:{port}: "):
            await serve(create_app(view), "127.0.0.1", port)
    finally:
        await runner.cleanup()


# ----- metrics -----------------------------------------------------------------------


async def test_metrics(api: TestClient, view: FakeView) -> None:
    await api.put("/v1/kv/a", data=b"1")
    await api.put("/v1/kv/b", data=b"2")
    await api.delete("/v1/kv/b")
    await api.get("/v1/kv/missing")
    response = await api.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(await response.text())}

    def samples(name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {tuple(sorted(s.labels.items())): s.value for s in families[name].samples}

    assert families["meshd_members"].type == "gauge"
    assert samples("meshd_members") == {
        (("status", "alive"),): 2,
        (("status", "suspect"),): 1,
        (("status", "dead"),): 0,
        (("status", "left"),): 1,
    }
    assert families["meshd_gossip_probes"].type == "counter"
    assert samples("meshd_gossip_probes") == {(): 120}
    assert samples("meshd_gossip_probe_failures") == {(): 3}
    assert samples("meshd_gossip_suspicions") == {(): 2}
    assert samples("meshd_gossip_refutations") == {(): 1}
    assert samples("meshd_gossip_packets") == {
        (("direction", "in"),): 500,
        (("direction", "out"),): 480,
    }
    assert samples("meshd_gossip_bytes") == {
        (("direction", "in"),): 64000,
        (("direction", "out"),): 61000,
    }
    assert samples("meshd_gossip_dropped_packets") == {
        (("reason", "decrypt"),): 4,
        (("reason", "wrong_target"),): 1,
    }
    assert samples("meshd_gossip_user_msgs_in") == {(): 9}  # exported generically
    assert not any("weird" in name for name in families)  # not a number: skipped
    assert families["meshd_store_keys"].type == "gauge"
    assert samples("meshd_store_keys") == {(): 1}
    assert samples("meshd_store_tombstones") == {(): 1}
    assert samples("meshd_store_puts") == {(): 2}
    assert samples("meshd_store_deletes") == {(): 1}
    assert samples("meshd_replication_broadcasts_sent") == {(): 5}
    assert samples("meshd_replication_sync_bytes_out") == {(): 2048}
    responses = samples("meshd_api_responses")
    assert responses[(("code", "200"),)] == 3
    assert responses[(("code", "404"),)] == 1
    assert samples("meshd_api_internal_errors") == {(): 0}
    info = families["meshd_agent_info"].samples[0].labels
    assert info == {"name": "n1", "cluster": "test", "version": "0.1.0", "driver": "docker"}
    assert "process_resident_memory_bytes" in families or "process_cpu_seconds" in families
    assert all(n.startswith(("meshd_", "process_")) for n in families)


async def test_metrics_follow_the_view(api: TestClient, view: FakeView) -> None:
    view.gossip["probes"] = 121
    view.gossip["dropped.bad_coordinate"] = 2
    text = await (await api.get("/metrics")).text()
    assert "meshd_gossip_probes_total 121.0" in text
    assert 'meshd_gossip_dropped_packets_total{reason="bad_coordinate"} 2.0' in text


# ----- the OpenAPI document ---------------------------------------------------------------


def _app_routes(app: web.Application) -> set[tuple[str, str]]:
    return {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }


def _document_routes(document: dict) -> set[tuple[str, str]]:
    methods = {"get", "put", "post", "delete", "patch", "head", "options"}
    return {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in methods
    }


def test_openapi_covers_every_route(view: FakeView) -> None:
    app = create_app(view)
    assert _app_routes(app) == _document_routes(openapi_document())


def test_openapi_is_valid() -> None:
    document = openapi_document()
    try:
        from openapi_spec_validator import validate
    except ImportError:  # the validator is optional: check the structure by hand
        validate = None
    if validate is not None:
        validate(document)
    assert document["openapi"].startswith("3.")
    assert document["info"]["title"] and document["info"]["version"]
    refs = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                refs.append(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)
    for ref in refs:  # every reference resolves
        target: object = document
        for part in ref.removeprefix("#/").split("/"):
            assert isinstance(target, dict) and part in target, ref
            target = target[part]
    for path, item in document["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            assert op["responses"], (method, path)
            assert op["operationId"] and op["summary"]
            if path != "/v1/health":
                assert "401" in op["responses"], (method, path)


async def test_openapi_served(api: TestClient) -> None:
    response = await api.get("/v1/openapi.json")
    assert response.status == 200
    assert await response.json() == openapi_document()


# ----- fuzzing: bad input never makes a 500 -------------------------------------------

# Characters a client can put in a request line: printable ASCII but space.
_URL_CHARS = st.sampled_from([chr(c) for c in range(0x21, 0x7F)])
_escape = st.integers(0, 255).map(lambda b: f"%{b:02X}")
_broken_escape = st.sampled_from(["%", "%z", "%G0", "%0", "%%"])
_segment = st.sampled_from(["..", ".", "", "a", "b/c", "%2E%2E", "%2F", "%00", "%C3", "%C3%A9"])
_path_part = st.lists(st.one_of(_URL_CHARS, _escape, _broken_escape, _segment), max_size=40).map(
    "".join
)
_query = st.one_of(
    st.just(""),
    st.lists(
        st.tuples(
            st.sampled_from(["raw", "keys", "prefix", "base64", "x", "%zz", ""]),
            st.sampled_from(["", "1", "true", "no", "maybe", "%ff", "a%2Fb", "=", "%"]),
        ),
        max_size=3,
    ).map(lambda pairs: "?" + "&".join(f"{k}={v}" for k, v in pairs)),
)
_body = st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"aGVsbG8=", b"!!", b"\x00"]))
_request = st.tuples(
    st.sampled_from(["GET", "PUT", "DELETE", "POST", "HEAD", "PATCH"]),
    st.sampled_from(["/v1/kv/", "/v1/kv", "/v1/kv//", "/v1/", "/"]),
    _path_part,
    _query,
    _body,
)


@pytest.fixture(scope="module")
def threaded() -> ServerThread:
    view = FakeView()
    with ServerThread(create_app(view, max_body=SMALL_BODY)) as server:
        yield server  # type: ignore[misc]


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(request=_request)
def test_random_requests_never_fail_internally(
    threaded: ServerThread, request: tuple[str, str, str, str, bytes]
) -> None:
    method, base, path, query, body = request
    target = (base + path + query).encode("latin-1", "replace")
    status, headers, answer = raw_request(threaded.port, method, target, body)
    assert status != 500, (target, answer)
    assert status in {200, 400, 404, 405, 413}, (status, target, answer)
    if method != "HEAD" and status != 200:
        assert headers["content-type"].startswith("application/json"), answer
    assert threaded.app[STATE].internal_errors == 0


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(key=st.text(min_size=1, max_size=80), value=st.binary(max_size=SMALL_BODY))
def test_any_text_key_is_stored_or_refused_cleanly(
    threaded: ServerThread, key: str, value: bytes
) -> None:
    target = "/v1/kv/" + quote(key.encode("utf-8", "surrogatepass"), safe="/")
    status, _, answer = raw_request(threaded.port, "PUT", target, value)
    assert status in {200, 400}, (key, answer)
    if status == 200:
        status, _, answer = raw_request(threaded.port, "GET", target + "?raw")
        assert (status, answer) == (200, value)
    assert threaded.app[STATE].internal_errors == 0


def test_free_port_is_refused() -> None:
    """Sanity check of the raw helper against nothing listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ConnectionRefusedError):
        raw_request(port, "GET", "/v1/health")


@pytest.mark.parametrize("module", ["meshd.metrics", "meshd.api", "meshd.api.view", "meshd.client"])
def test_modules_import_on_their_own(module: str) -> None:
    """No import cycle bites whichever module is imported first."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
