"""A small client for the agent's HTTP API, for the CLI, scripts and tests.

``Client`` is synchronous and uses only the standard library, so a CLI
command starts fast; ``AsyncClient`` gives the same calls over aiohttp for
code that already runs an event loop (benchmarks, tests). Both talk to
``MESHD_ADDR`` (default 127.0.0.1:7947) with the token in ``MESHD_TOKEN``,
ignore proxy settings (the agent is local), and raise ``ClientError`` with
a message fit to show as is.

Each call is described once as a ``_Call`` (request plus how to read the
answer); the two clients differ only in how they send it.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, TypeVar
from urllib.parse import quote, urlencode, urlsplit

__all__ = [
    "DEFAULT_ADDR",
    "ApiError",
    "AsyncClient",
    "Client",
    "ClientError",
    "SpecDocument",
    "base_url",
]

DEFAULT_ADDR = "127.0.0.1:7947"
DEFAULT_PORT = 7947
DEFAULT_TIMEOUT = 10.0

T = TypeVar("T")


class ClientError(Exception):
    """The agent could not be asked, or its answer could not be read."""


class ApiError(ClientError):
    """The agent answered with an error."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(f"{detail} ({status} {error})" if detail else f"{status} {error}")
        self.status = status
        self.error = error
        self.detail = detail


def base_url(addr: str) -> str:
    """http://HOST:PORT for an address given as HOST[:PORT], [V6]:PORT or a URL."""
    text = addr.strip()
    if text.startswith(("http://", "https://")):
        return text.rstrip("/")
    host, port = text, str(DEFAULT_PORT)
    if text.startswith("["):
        host, close, rest = text[1:].partition("]")
        if not close or (rest and not rest.startswith(":")):
            raise ClientError(f"bad agent address {addr!r}: expected [IPV6]:PORT")
        port = rest[1:] if rest else port
    elif text.count(":") == 1:
        host, port = text.split(":")
    elif text.count(":") > 1:  # a bare IPv6 address
        host = text
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClientError(f"bad agent address {addr!r}: expected HOST:PORT, like {DEFAULT_ADDR}")
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{int(port)}"


def _kv_path(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise ClientError("a key must be a non-empty string")
    return "/v1/kv/" + quote(key, safe="/")


def _service_path(name: str, *rest: str) -> str:
    if not isinstance(name, str) or not name:
        raise ClientError("a service name must be a non-empty string")
    return "/".join(["/v1/services", quote(name, safe=""), *rest])


#: A spec to send: the document's bytes or text (YAML, JSON, compose), or a mapping.
SpecDocument = bytes | str | Mapping[str, Any] | list[Any]


def _spec_body(document: SpecDocument) -> tuple[bytes, str]:
    if isinstance(document, bytes | bytearray | memoryview):
        return bytes(document), "application/octet-stream"
    if isinstance(document, str):
        return document.encode(), "application/yaml"
    if isinstance(document, Mapping | list):
        return json.dumps(document).encode(), "application/json"
    raise ClientError(f"a spec must be bytes, text or a mapping, not {type(document).__name__}")


def _json(body: bytes, where: str) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise ClientError(f"unexpected answer from {where}: not JSON") from None


def _api_error(status: int, body: bytes) -> ApiError:
    try:
        data = json.loads(body)
        return ApiError(status, str(data["error"]), str(data.get("detail", "")))
    except (ValueError, TypeError, KeyError):
        text = body.decode("utf-8", "replace").strip().splitlines()
        return ApiError(status, f"http_{status}", text[0][:200] if text else "")


@dataclass
class _Call(Generic[T]):
    """One API call: the request, and how to turn (status, body) into a result.

    ``accept`` lists the error codes that are answers rather than failures
    (a missing key), mapped to the result they stand for.
    """

    method: str
    path: str
    read: Callable[[bytes], T]
    params: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    ok: tuple[int, ...] = (200,)
    accept: dict[str, T] = field(default_factory=dict)
    content_type: str = "application/octet-stream"

    def target(self) -> str:
        return self.path + ("?" + urlencode(self.params) if self.params else "")

    def result(self, status: int, body: bytes, where: str) -> T:
        if status in self.ok:
            return self.read(body)
        error = _api_error(status, body)
        if error.error in self.accept:
            return self.accept[error.error]
        raise error


def _nothing(body: bytes) -> None:
    return None


class _Calls:
    """The API's calls, independent of how they are sent."""

    addr: str

    @property
    def base(self) -> str:
        """The agent's base URL; a bad address raises ClientError on the first call,
        where callers already handle ClientError."""
        return base_url(self.addr)

    def _read_json(self, body: bytes) -> Any:
        return _json(body, f"the meshd agent at {self.addr}")

    def _agent(self) -> _Call[dict[str, Any]]:
        return _Call("GET", "/v1/agent", self._read_json)

    def _members(self, status: str | None) -> _Call[list[dict[str, Any]]]:
        params = {"status": status} if status else {}
        return _Call("GET", "/v1/members", self._read_json, params)

    def _health(self) -> _Call[dict[str, Any]]:
        return _Call("GET", "/v1/health", self._read_json, ok=(200, 503))

    def _leave(self) -> _Call[None]:
        return _Call("POST", "/v1/agent/leave", _nothing, ok=(202,))

    def _kv_get(self, key: str) -> _Call[bytes | None]:
        return _Call("GET", _kv_path(key), bytes, {"raw": "true"}, accept={"key_not_found": None})

    def _kv_entry(self, key: str) -> _Call[dict[str, Any] | None]:
        return _Call("GET", _kv_path(key), self._read_json, accept={"key_not_found": None})

    def _kv_put(self, key: str, value: bytes) -> _Call[dict[str, Any]]:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise ClientError(f"a value must be bytes, not {type(value).__name__}")
        return _Call("PUT", _kv_path(key), self._read_json, body=bytes(value))

    def _kv_delete(self, key: str) -> _Call[bool]:
        return _Call("DELETE", _kv_path(key), lambda _: True, accept={"key_not_found": False})

    def _kv_list(self, prefix: str, keys_only: bool) -> _Call[Any]:
        params = {"prefix": prefix} if prefix else {}
        if keys_only:
            params["keys"] = "true"
        return _Call("GET", "/v1/kv", self._read_json, params)

    def _member_remove(self, node: str) -> _Call[bool]:
        if not isinstance(node, str) or not node:
            raise ClientError("a node name must be a non-empty string")
        path = "/v1/members/" + quote(node, safe="")
        return _Call("DELETE", path, lambda _: True, accept={"member_not_found": False})

    def _services(self) -> _Call[list[dict[str, Any]]]:
        return _Call("GET", "/v1/services", self._read_json)

    def _service(self, name: str, *rest: str) -> _Call[Any]:
        path = _service_path(name, *rest)
        return _Call("GET", path, self._read_json, accept={"service_not_found": None})

    def _service_put(self, name: str, document: SpecDocument) -> _Call[dict[str, Any]]:
        body, content_type = _spec_body(document)
        return _Call(
            "PUT",
            _service_path(name),
            self._read_json,
            body=body,
            ok=(200, 201),
            content_type=content_type,
        )

    def _deploy(self, document: SpecDocument) -> _Call[list[dict[str, Any]]]:
        body, content_type = _spec_body(document)
        return _Call("POST", "/v1/services", self._read_json, body=body, content_type=content_type)

    def _service_delete(self, name: str) -> _Call[bool]:
        return _Call(
            "DELETE", _service_path(name), lambda _: True, accept={"service_not_found": False}
        )

    def _service_scale(self, name: str, replicas: int) -> _Call[dict[str, Any] | None]:
        if isinstance(replicas, bool) or not isinstance(replicas, int):
            raise ClientError(f"replicas must be an integer, not {type(replicas).__name__}")
        return _Call(
            "POST",
            _service_path(name, "scale"),
            self._read_json,
            body=json.dumps({"replicas": replicas}).encode(),
            accept={"service_not_found": None},
            content_type="application/json",
        )

    def _service_logs(self, name: str, tail: int | None, follow: bool) -> _Call[None]:
        params = {}
        if tail is not None:
            params["tail"] = str(tail)
        if follow:
            params["follow"] = "true"
        return _Call("GET", _service_path(name, "logs"), _nothing, params)

    def _log_line(self, raw: bytes) -> dict[str, Any] | None:
        """A log line as sent; None for a blank line; an error line raises."""
        if not raw.strip():
            return None
        line = _json(raw, f"the meshd agent at {self.addr}")
        if not isinstance(line, dict):
            raise ClientError(f"unexpected log line from the meshd agent at {self.addr}")
        if "error" in line and "text" not in line:
            raise ClientError(f"the log stream failed: {line.get('detail') or line['error']}")
        return line


def _unreachable(addr: str, reason: str) -> ClientError:
    return ClientError(
        f"cannot reach the meshd agent at {addr}: {reason} "
        "(is it running? set --addr or MESHD_ADDR)"
    )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror})"
    if isinstance(exc, (ConnectionResetError, http.client.RemoteDisconnected)):
        return "the connection was closed without an answer (is that the API address?)"
    if isinstance(exc, http.client.HTTPException):
        return "the answer is not HTTP (is that the API address, not the gossip port?)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


class Client(_Calls):
    """Synchronous client (standard library only)."""

    def __init__(
        self, addr: str | None = None, token: str | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.addr = addr or os.environ.get("MESHD_ADDR") or DEFAULT_ADDR
        self.token = token if token is not None else (os.environ.get("MESHD_TOKEN") or None)
        self.timeout = timeout
        # No ProxyHandler settings: the agent is local, an HTTP_PROXY must not apply.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def agent(self) -> dict[str, Any]:
        return self._run(self._agent())

    def members(self, status: str | None = None) -> list[dict[str, Any]]:
        return self._run(self._members(status))

    def health(self) -> dict[str, Any]:
        """``{"status": "ok"}``, or ``{"status": "unavailable", "detail": ...}``."""
        return self._run(self._health())

    def leave(self) -> None:
        self._run(self._leave())

    def kv_get(self, key: str) -> bytes | None:
        """The value of key, or None if there is no such key."""
        return self._run(self._kv_get(key))

    def kv_entry(self, key: str) -> dict[str, Any] | None:
        """The JSON form of key (value, version, ...), or None."""
        return self._run(self._kv_entry(key))

    def kv_put(self, key: str, value: bytes) -> dict[str, Any]:
        return self._run(self._kv_put(key, value))

    def kv_delete(self, key: str) -> bool:
        """True if the key was deleted, False if there was none."""
        return self._run(self._kv_delete(key))

    def kv_list(self, prefix: str = "") -> list[dict[str, Any]]:
        return self._run(self._kv_list(prefix, False))

    def kv_keys(self, prefix: str = "") -> list[str]:
        return self._run(self._kv_list(prefix, True))

    def member_remove(self, node: str) -> bool:
        """Remove a dead member from the voter set; False if there is no such member."""
        return self._run(self._member_remove(node))

    def services(self) -> list[dict[str, Any]]:
        return self._run(self._services())

    def service(self, name: str) -> dict[str, Any] | None:
        """The service's record, or None if there is no such service."""
        return self._run(self._service(name))

    def service_put(self, name: str, document: SpecDocument) -> dict[str, Any]:
        """Create or replace one service from a spec (bytes or text as written, or a mapping)."""
        return self._run(self._service_put(name, document))

    def deploy(self, document: SpecDocument) -> list[dict[str, Any]]:
        """Create or replace every service of a document (a compose file, a list of specs)."""
        return self._run(self._deploy(document))

    def service_delete(self, name: str) -> bool:
        """True if the service was deleted, False if there was none."""
        return self._run(self._service_delete(name))

    def service_replicas(self, name: str) -> list[dict[str, Any]] | None:
        return self._run(self._service(name, "replicas"))

    def service_leader(self, name: str) -> dict[str, Any] | None:
        return self._run(self._service(name, "leader"))

    def service_scale(self, name: str, replicas: int) -> dict[str, Any] | None:
        """The service's record at its new count, or None if there is no such service."""
        return self._run(self._service_scale(name, replicas))

    def service_logs(
        self, name: str, *, tail: int | None = None, follow: bool = False
    ) -> Iterator[dict[str, Any]]:
        """The service's log lines. The request is made now (so an unknown service
        raises here); with follow the lines keep coming until the iterator is closed."""
        call = self._service_logs(name, tail, follow)
        connection, response = self._open_stream(call, follow)
        return self._lines(connection, response)

    def _open_stream(
        self, call: _Call[Any], follow: bool
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        parts = urlsplit(self.base)
        factory = (
            http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        )
        connection = factory(parts.hostname or "", parts.port, timeout=self.timeout)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            connection.request(call.method, call.target(), headers=headers)
            response = connection.getresponse()
            if response.status != 200:
                body = response.read()
                connection.close()
                call.result(response.status, body, self.addr)  # raises: not a 200
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise _unreachable(self.addr, _reason(exc)) from None
        if follow and connection.sock is not None:
            connection.sock.settimeout(None)  # lines may be minutes apart
        return connection, response

    def _lines(
        self, connection: http.client.HTTPConnection, response: http.client.HTTPResponse
    ) -> Iterator[dict[str, Any]]:
        try:
            while raw := response.readline():
                line = self._log_line(raw)
                if line is not None:
                    yield line
        except (OSError, http.client.HTTPException) as exc:
            raise ClientError(
                f"the log stream from the meshd agent at {self.addr} broke: {_reason(exc)}"
            ) from None
        finally:
            connection.close()

    def _run(self, call: _Call[T]) -> T:
        request = urllib.request.Request(
            self.base + call.target(), data=call.body, method=call.method
        )
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        if call.body is not None:
            request.add_header("Content-Type", call.content_type)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                status, body = response.status, response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                status, body = exc.code, exc.read()
        except urllib.error.URLError as exc:
            raise _unreachable(self.addr, _reason(exc.reason)) from None
        except (OSError, http.client.HTTPException) as exc:
            raise _unreachable(self.addr, _reason(exc)) from None
        return call.result(status, body, self.addr)


class AsyncClient(_Calls):
    """The same calls over aiohttp; use ``async with`` (or call ``close()``)."""

    def __init__(
        self, addr: str | None = None, token: str | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.addr = addr or os.environ.get("MESHD_ADDR") or DEFAULT_ADDR
        self.token = token if token is not None else (os.environ.get("MESHD_TOKEN") or None)
        self.timeout = timeout
        self._session: Any = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def agent(self) -> dict[str, Any]:
        return await self._run(self._agent())

    async def members(self, status: str | None = None) -> list[dict[str, Any]]:
        return await self._run(self._members(status))

    async def health(self) -> dict[str, Any]:
        return await self._run(self._health())

    async def leave(self) -> None:
        await self._run(self._leave())

    async def kv_get(self, key: str) -> bytes | None:
        return await self._run(self._kv_get(key))

    async def kv_entry(self, key: str) -> dict[str, Any] | None:
        return await self._run(self._kv_entry(key))

    async def kv_put(self, key: str, value: bytes) -> dict[str, Any]:
        return await self._run(self._kv_put(key, value))

    async def kv_delete(self, key: str) -> bool:
        return await self._run(self._kv_delete(key))

    async def kv_list(self, prefix: str = "") -> list[dict[str, Any]]:
        return await self._run(self._kv_list(prefix, False))

    async def kv_keys(self, prefix: str = "") -> list[str]:
        return await self._run(self._kv_list(prefix, True))

    async def member_remove(self, node: str) -> bool:
        return await self._run(self._member_remove(node))

    async def services(self) -> list[dict[str, Any]]:
        return await self._run(self._services())

    async def service(self, name: str) -> dict[str, Any] | None:
        return await self._run(self._service(name))

    async def service_put(self, name: str, document: SpecDocument) -> dict[str, Any]:
        return await self._run(self._service_put(name, document))

    async def deploy(self, document: SpecDocument) -> list[dict[str, Any]]:
        return await self._run(self._deploy(document))

    async def service_delete(self, name: str) -> bool:
        return await self._run(self._service_delete(name))

    async def service_replicas(self, name: str) -> list[dict[str, Any]] | None:
        return await self._run(self._service(name, "replicas"))

    async def service_leader(self, name: str) -> dict[str, Any] | None:
        return await self._run(self._service(name, "leader"))

    async def service_scale(self, name: str, replicas: int) -> dict[str, Any] | None:
        return await self._run(self._service_scale(name, replicas))

    async def service_logs(
        self, name: str, *, tail: int | None = None, follow: bool = False
    ) -> AsyncIterator[dict[str, Any]]:
        """The service's log lines (the request is made on the first iteration)."""
        import aiohttp
        from yarl import URL

        call = self._service_logs(name, tail, follow)
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.timeout, sock_read=None if follow else self.timeout
        )
        url = URL(self.base + call.target(), encoded=True)
        started = False
        try:
            async with self._get_session().get(
                url, headers=self._headers(), timeout=timeout
            ) as response:
                if response.status != 200:
                    call.result(response.status, await response.read(), self.addr)  # raises
                started = True
                pending = b""
                async for chunk in response.content.iter_any():
                    *complete, pending = (pending + chunk).split(b"\n")
                    for raw in complete:
                        line = self._log_line(raw)
                        if line is not None:
                            yield line
                line = self._log_line(pending)
                if line is not None:
                    yield line
        except aiohttp.ClientConnectorError as exc:
            raise _unreachable(self.addr, _reason(exc.os_error)) from None
        except (aiohttp.ClientError, OSError) as exc:  # TimeoutError is an OSError
            reason = "timed out" if isinstance(exc, TimeoutError) else _reason(exc)
            if started:
                raise ClientError(
                    f"the log stream from the meshd agent at {self.addr} broke: {reason}"
                ) from None
            raise _unreachable(self.addr, reason) from None

    def _get_session(self) -> Any:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def _run(self, call: _Call[T]) -> T:
        import aiohttp  # only async users pay for importing it
        from yarl import URL

        self._get_session()
        headers = self._headers()
        if call.body is not None:
            headers["Content-Type"] = call.content_type
        url = URL(self.base + call.target(), encoded=True)
        try:
            async with self._session.request(
                call.method, url, data=call.body, headers=headers
            ) as response:
                status, body = response.status, await response.read()
        except aiohttp.ClientConnectorError as exc:
            raise _unreachable(self.addr, _reason(exc.os_error)) from None
        except TimeoutError:
            raise _unreachable(self.addr, "timed out") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise _unreachable(self.addr, _reason(exc)) from None
        return call.result(status, body, self.addr)
