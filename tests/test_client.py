"""The API client against a real API served on 127.0.0.1, and against nothing."""

from __future__ import annotations

import socket
import threading
from collections.abc import AsyncIterator, Iterator

import pytest
from aiohttp.test_utils import TestServer
from api_fake import FakeView, ServerThread
from conftest import wait_for

from meshd.api import create_app
from meshd.client import DEFAULT_ADDR, ApiError, AsyncClient, Client, ClientError, base_url
from meshd.state.store import MAX_KEY

TOKEN = "t0ken"


@pytest.fixture
def view() -> FakeView:
    return FakeView()


@pytest.fixture
def server(view: FakeView) -> Iterator[ServerThread]:
    with ServerThread(create_app(view)) as running:
        yield running


@pytest.fixture
def guarded(view: FakeView) -> Iterator[ServerThread]:
    with ServerThread(create_app(view, token=TOKEN)) as running:
        yield running


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MESHD_ADDR", "MESHD_TOKEN"):
        monkeypatch.delenv(name, raising=False)


# ----- the synchronous client ----------------------------------------------------------


def test_agent_members_health(server: ServerThread, view: FakeView) -> None:
    client = Client(server.addr)
    assert client.agent()["name"] == "n1"
    assert [m["name"] for m in client.members()] == ["n1", "n2", "n3", "n4"]
    assert [m["name"] for m in client.members("alive")] == ["n1", "n2"]
    assert client.health() == {"status": "ok"}
    view.healthy = (False, "not in a cluster")
    health = client.health()
    assert health["status"] == "unavailable" and health["detail"] == "not in a cluster"


def test_leave(server: ServerThread, view: FakeView) -> None:
    assert Client(server.addr).leave() is None
    wait_for(lambda: view.leaves == 1, message="the agent was asked to leave")


def test_kv(server: ServerThread) -> None:
    client = Client(server.addr)
    assert client.kv_get("app/config") is None
    assert client.kv_entry("app/config") is None
    entry = client.kv_put("app/config", b"port=80")
    assert entry["key"] == "app/config" and entry["value"] == "port=80"
    assert client.kv_get("app/config") == b"port=80"
    assert client.kv_entry("app/config")["version"] == entry["version"]
    client.kv_put("app/blob", bytes(range(256)))
    assert client.kv_get("app/blob") == bytes(range(256))
    client.kv_put("other", b"")
    assert client.kv_get("other") == b""
    assert [e["key"] for e in client.kv_list("app/")] == ["app/blob", "app/config"]
    assert client.kv_keys() == ["app/blob", "app/config", "other"]
    assert client.kv_delete("app/config") is True
    assert client.kv_delete("app/config") is False
    assert client.kv_get("app/config") is None
    assert client.kv_keys("app/") == ["app/blob"]


@pytest.mark.parametrize("key", ["sp ace/ü", "q?x#y", "100%", "a+b=c&d", "k" * MAX_KEY])
def test_keys_are_encoded(server: ServerThread, key: str) -> None:
    client = Client(server.addr)
    client.kv_put(key, b"v")
    assert client.kv_get(key) == b"v"
    assert client.kv_keys() == [key]
    assert client.kv_keys(key) == [key]


@pytest.mark.parametrize("key", ["a/../b", "/abs", "k" * (MAX_KEY + 1), "nul\x00", "line\nbreak"])
def test_bad_keys_are_api_errors(server: ServerThread, key: str) -> None:
    with pytest.raises(ApiError) as caught:
        Client(server.addr).kv_put(key, b"v")
    assert caught.value.status == 400
    assert caught.value.error == "bad_key"
    assert caught.value.detail in str(caught.value)


def test_value_too_large(server: ServerThread) -> None:
    with pytest.raises(ApiError, match="value_too_large") as caught:
        Client(server.addr).kv_put("big", b"x" * (1024 * 1024 + 1))
    assert caught.value.status == 413


def test_value_must_be_bytes(server: ServerThread) -> None:
    with pytest.raises(ClientError, match="must be bytes"):
        Client(server.addr).kv_put("k", "text")  # type: ignore[arg-type]


def test_empty_key(server: ServerThread) -> None:
    with pytest.raises(ClientError, match="non-empty"):
        Client(server.addr).kv_get("")


def test_token(guarded: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ApiError) as caught:
        Client(guarded.addr).agent()
    assert (caught.value.status, caught.value.error) == (401, "unauthorized")
    assert "MESHD_TOKEN" in str(caught.value)
    with pytest.raises(ApiError) as caught:
        Client(guarded.addr, token="wrong").agent()
    assert (caught.value.status, caught.value.error) == (403, "forbidden")
    assert Client(guarded.addr, token=TOKEN).agent()["name"] == "n1"
    assert Client(guarded.addr).health() == {"status": "ok"}  # open without the token
    monkeypatch.setenv("MESHD_TOKEN", TOKEN)
    assert Client(guarded.addr).kv_put("k", b"v")["key"] == "k"


def test_address_from_the_environment(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Client().addr == DEFAULT_ADDR
    monkeypatch.setenv("MESHD_ADDR", server.addr)
    assert Client().agent()["name"] == "n1"
    assert Client(f"http://{server.addr}/").agent()["name"] == "n1"


def test_proxy_settings_are_ignored(server: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, dead)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert Client(server.addr).agent()["name"] == "n1"


# ----- when the agent can't be reached ----------------------------------------------------


def test_unreachable_agent() -> None:
    addr = f"127.0.0.1:{free_port()}"
    with pytest.raises(ClientError) as caught:
        Client(addr).members()
    assert str(caught.value) == (
        f"cannot reach the meshd agent at {addr}: connection refused "
        "(is it running? set --addr or MESHD_ADDR)"
    )
    assert not isinstance(caught.value, ApiError)


def test_bad_address() -> None:
    client = Client("127.0.0.1:notaport")  # refused on use, where the CLI handles ClientError
    with pytest.raises(ClientError, match=r"bad agent address '127\.0\.0\.1:notaport'"):
        client.agent()
    for bad in ["host:0", "host:70000", "[::1", "[::1]x", ":80"]:
        with pytest.raises(ClientError, match="bad agent address"):
            base_url(bad)
    assert base_url("::1") == "http://[::1]:7947"
    assert base_url("[::1]:80") == "http://[::1]:80"
    assert base_url("localhost") == "http://localhost:7947"


class _Listener:
    """A loopback TCP server that answers every connection with fixed bytes."""

    def __init__(self, answer: bytes) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.answer = answer
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.recv(65536)
            conn.sendall(self.answer)

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


@pytest.mark.parametrize(
    "answer, message",
    [
        (b"", "closed without an answer"),
        (b"\x00\x01garbage\r\n\r\n", "not HTTP"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello", "not JSON"),
    ],
)
def test_something_else_on_the_port(answer: bytes, message: str) -> None:
    listener = _Listener(answer)
    try:
        with pytest.raises(ClientError, match=message):
            Client(listener.addr).agent()
    finally:
        listener.close()


def test_non_json_error_answer() -> None:
    listener = _Listener(
        b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 11\r\nConnection: close\r\n\r\nbad gateway"
    )
    try:
        with pytest.raises(ApiError) as caught:
            Client(listener.addr).agent()
        assert (caught.value.status, caught.value.error) == (502, "http_502")
        assert caught.value.detail == "bad gateway"
    finally:
        listener.close()


# ----- the asynchronous client ----------------------------------------------------------


@pytest.fixture
async def async_server(view: FakeView) -> AsyncIterator[TestServer]:
    server = TestServer(create_app(view, token=TOKEN), host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


async def test_async_client(async_server: TestServer, view: FakeView) -> None:
    addr = f"127.0.0.1:{async_server.port}"
    async with AsyncClient(addr, token=TOKEN) as client:
        assert (await client.agent())["name"] == "n1"
        assert len(await client.members("alive,suspect")) == 3
        assert await client.health() == {"status": "ok"}
        assert await client.kv_get("k y") is None
        await client.kv_put("k y", b"\x00v")
        assert await client.kv_get("k y") == b"\x00v"
        assert (await client.kv_entry("k y"))["value_base64"] == "AHY="
        assert [e["key"] for e in await client.kv_list()] == ["k y"]
        assert await client.kv_keys("k") == ["k y"]
        assert await client.kv_delete("k y") is True
        assert await client.kv_delete("k y") is False
        await client.leave()
        with pytest.raises(ApiError, match="bad_key"):
            await client.kv_put("a/../b", b"v")
    async with AsyncClient(addr) as client:
        with pytest.raises(ApiError, match="unauthorized"):
            await client.agent()


async def test_async_client_unreachable() -> None:
    addr = f"127.0.0.1:{free_port()}"
    async with AsyncClient(addr) as client:
        with pytest.raises(ClientError) as caught:
            await client.agent()
    assert str(caught.value) == (
        f"cannot reach the meshd agent at {addr}: connection refused "
        "(is it running? set --addr or MESHD_ADDR)"
    )
