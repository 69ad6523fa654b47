"""Request and reply between agents, over the gossip library's TCP messages.

Agent-to-agent calls (lease votes, log reads) ride on ``Gossip.send_reliable``
so they are sealed with the cluster key like everything else; nothing needs
a second listener or a second trust setup. A call is two one-way messages:
the request to the callee and the reply back to the caller by node name.

Both share the gossip delegate with the store's replicator, so ``Mux`` sits
in front: payloads starting with ``RPC_TAG`` are ours, the rest go to the
replicator. (The replicator's messages are msgpack arrays, whose first byte
is never ``RPC_TAG``.)

Wire form, msgpack after the tag::

    [0, call_id, caller, method, body]      request
    [1, call_id, callee, ok, body]          reply (ok False: body is an error text)

Input is untrusted: anything malformed is dropped and counted in ``stats``.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack

__all__ = ["RPC_TAG", "Mux", "Rpc", "RpcError"]

log = logging.getLogger(__name__)

RPC_TAG = b"\xc1"
"""msgpack's one never-used byte: no replicator message can start with it."""
MAX_RPC_MESSAGE = 4 * 1024 * 1024
MAX_INFLIGHT_HANDLERS = 256
"""Concurrent async handlers; beyond that requests are refused (busy)."""

_REQUEST, _REPLY = 0, 1

Handler = Callable[[str, Any], Any]
"""(caller, body) -> reply body, or an awaitable of it. Raise to refuse."""


class RpcError(Exception):
    """A call failed: unreachable callee, timeout, or the callee's refusal."""


class Mux:
    """The gossip delegate: RPC messages to ``rpc``, the rest to ``inner``."""

    def __init__(self, inner: Any, rpc: Rpc) -> None:
        self.inner = inner
        self.rpc = rpc

    def notify_user_msg(self, payload: bytes) -> bool:
        if payload[:1] == RPC_TAG:
            self.rpc.on_message(payload)
            return False
        return bool(self.inner.notify_user_msg(payload))

    def local_state(self, join: bool) -> bytes:
        return self.inner.local_state(join)

    def merge_remote_state(self, data: bytes, join: bool) -> None:
        self.inner.merge_remote_state(data, join)


class Rpc:
    """Calls to other agents by node name, and handlers for theirs."""

    def __init__(self, node: str, gossip: Any = None) -> None:
        self.node = node
        self.gossip = gossip
        self._handlers: dict[str, Handler] = {}
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.stats: dict[str, int] = {
            "calls": 0,
            "replies": 0,
            "timeouts": 0,
            "unreachable": 0,
            "served": 0,
            "refused": 0,
            "invalid": 0,
            "late_replies": 0,
            "unknown_method": 0,
            "busy": 0,
        }

    def attach(self, gossip: Any) -> None:
        self.gossip = gossip

    def register(self, method: str, handler: Handler) -> None:
        self._handlers[method] = handler

    async def call(self, node: str, method: str, body: Any, timeout: float = 2.0) -> Any:
        """The callee's reply body; RpcError when it does not come or is a refusal."""
        self.stats["calls"] += 1
        if node == self.node:
            return await self._serve_local(method, body)
        call_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = fut
        try:
            payload = RPC_TAG + msgpack.packb(
                [_REQUEST, call_id, self.node, method, body], use_bin_type=True
            )
            if not await self._send(node, payload):
                self.stats["unreachable"] += 1
                raise RpcError(f"{node} is unreachable")
            try:
                return await asyncio.wait_for(fut, timeout)
            except TimeoutError:
                self.stats["timeouts"] += 1
                raise RpcError(f"{node} did not answer {method} within {timeout:g}s") from None
        finally:
            self._calls.pop(call_id, None)

    async def _serve_local(self, method: str, body: Any) -> Any:
        handler = self._handlers.get(method)
        if handler is None:
            raise RpcError(f"no handler for {method}")
        try:
            result = handler(self.node, body)
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:
            raise RpcError(str(exc) or type(exc).__name__) from None
        return result

    async def _send(self, node: str, payload: bytes) -> bool:
        gossip = self.gossip
        if gossip is None or not gossip.running:
            return False
        member = gossip.core.member(node)
        if member is None:
            return False
        try:
            return bool(await gossip.send_reliable(member.addr, payload))
        except Exception:
            log.exception("rpc message to %s failed", node)
            return False

    # ------------------------------------------------------------ incoming

    def on_message(self, payload: bytes) -> None:
        """From the gossip delegate (synchronously, inside the core): never raises."""
        try:
            msg = self._decode(payload)
        except ValueError as exc:
            self.stats["invalid"] += 1
            log.debug("dropped rpc message: %s", exc)
            return
        if msg[0] == _REQUEST:
            _, call_id, caller, method, body = msg
            self._spawn(self._serve(call_id, caller, method, body))
        else:
            _, call_id, _callee, ok, body = msg
            fut = self._calls.get(call_id)
            if fut is None or fut.done():
                self.stats["late_replies"] += 1
                return
            self.stats["replies"] += 1
            if ok:
                fut.set_result(body)
            else:
                fut.set_exception(RpcError(str(body)))

    def _decode(self, payload: bytes) -> list[Any]:
        if len(payload) > MAX_RPC_MESSAGE:
            raise ValueError("too big")
        try:
            msg = msgpack.unpackb(payload[1:], raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises many types on bad input
            raise ValueError(f"not msgpack: {exc}") from None
        if type(msg) is not list or len(msg) != 5 or msg[0] not in (_REQUEST, _REPLY):
            raise ValueError("not an rpc envelope")
        if type(msg[1]) is not int or not isinstance(msg[2], str) or not msg[2]:
            raise ValueError("bad call id or node")
        if msg[0] == _REQUEST and not isinstance(msg[3], str):
            raise ValueError("bad method")
        if msg[0] == _REPLY and type(msg[3]) is not bool:
            raise ValueError("bad reply flag")
        return msg

    def _spawn(self, coro: Awaitable[Any]) -> None:
        if len(self._tasks) >= MAX_INFLIGHT_HANDLERS:
            self.stats["busy"] += 1
            coro.close()  # type: ignore[attr-defined]
            return
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, call_id: int, caller: str, method: str, body: Any) -> None:
        handler = self._handlers.get(method)
        if handler is None:
            self.stats["unknown_method"] += 1
            ok, reply = False, f"no handler for {method!r}"
        else:
            try:
                result = handler(caller, body)
                if inspect.isawaitable(result):
                    result = await result
                ok, reply = True, result
                self.stats["served"] += 1
            except Exception as exc:
                self.stats["refused"] += 1
                ok, reply = False, str(exc) or type(exc).__name__
        try:
            payload = RPC_TAG + msgpack.packb(
                [_REPLY, call_id, self.node, ok, reply], use_bin_type=True
            )
        except (TypeError, ValueError) as exc:
            payload = RPC_TAG + msgpack.packb(
                [_REPLY, call_id, self.node, False, f"unencodable reply: {exc}"]
            )
        await self._send(caller, payload)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(RpcError("closed"))
