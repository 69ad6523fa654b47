"""Real sockets on loopback: drivers in one process, then agent processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from gossip.config import local_config
from gossip.crypto import Keyring
from gossip.driver import Gossip, format_addr
from gossip.members import State

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent


def state_of(g: Gossip, name: str) -> State | None:
    m = g.core.member(name)
    return None if m is None else m.state


async def converge(nodes: Sequence[Gossip], pred: Callable[[Gossip], bool], timeout: float) -> None:
    """Wait until pred holds on every node at once; each node wakes us when its
    state changes, so there is no polling."""
    end = time.monotonic() + timeout
    while True:
        pending = [g for g in nodes if not pred(g)]
        if not pending:
            return
        left = end - time.monotonic()
        if left <= 0:
            raise AssertionError(
                "not converged: "
                + ", ".join(f"{g.name}: {sorted(map(repr, g.members()))}" for g in pending)
            )
        g = pending[0]
        await g.wait_for(lambda g=g: pred(g), left)


@contextlib.asynccontextmanager
async def cluster(
    hosts: Sequence[str], key: bytes | None, **config: Any
) -> AsyncIterator[list[Gossip]]:
    cfg = local_config(**config)
    nodes = [
        Gossip(
            cfg,
            name=f"n{i}",
            bind=(h, 0),
            keyring=Keyring([key]) if key else None,
            meta=f"m{i}".encode(),
        )
        for i, h in enumerate(hosts, 1)
    ]
    try:
        for g in nodes:
            await g.start()
        yield nodes
    finally:
        for g in nodes:
            await g.stop()


async def test_five_nodes_converge_detect_failure_and_leave() -> None:
    key = Keyring.generate()
    hosts = [f"127.0.0.{i}" for i in range(1, 6)]
    async with cluster(hosts, key) as nodes:
        seed = nodes[0]
        assert seed.bound is not None
        for g in nodes[1:]:
            assert await g.join([format_addr(seed.bound)], timeout=5) == 1
        await converge(nodes, lambda g: g.core.num_alive() == 5, timeout=10)
        assert {m.name: m.meta for m in nodes[2].members()}["n4"] == b"m4"

        # Abrupt stop, as if killed: no leave message.
        victim = nodes[4]
        await victim.stop()
        alive = nodes[:4]
        await converge(alive, lambda g: state_of(g, "n5") == State.DEAD, timeout=15)

        # Graceful leave.
        leaver = nodes[3]
        assert await leaver.leave(timeout=3) is True
        await leaver.stop()
        rest = nodes[:3]
        await converge(rest, lambda g: state_of(g, "n4") == State.LEFT, timeout=5)
        assert all(state_of(g, n) == State.ALIVE for g in rest for n in ("n1", "n2", "n3"))

        # Somebody with another key is refused and never listed.
        intruder = Gossip(
            local_config(),
            name="evil",
            bind=("127.0.0.6", 0),
            keyring=Keyring([Keyring.generate()]),
        )
        async with intruder:
            assert await intruder.join([format_addr(seed.bound)], timeout=5) == 0
            assert [m.name for m in intruder.members()] == ["evil"]
            assert all(g.core.member("evil") is None for g in rest)
        assert any(k.startswith("dropped.") for k in seed.stats), seed.stats


async def test_events_report_join_and_dead() -> None:
    key = Keyring.generate()
    async with cluster(["127.0.0.1", "127.0.0.2"], key) as (a, b):
        assert b.bound is not None
        assert await a.join([b.bound]) == 1
        events = a.events()
        ev = await asyncio.wait_for(anext(events), 5)
        assert (ev.kind.value, ev.member.name) == ("join", "n2")
        await b.stop()
        while True:
            ev = await asyncio.wait_for(anext(events), 10)
            if ev.kind.value == "dead":
                assert ev.member.name == "n2"
                break


def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
async def test_ipv6_loopback() -> None:
    async with cluster(["::1", "::1", "::1"], Keyring.generate()) as nodes:
        first = nodes[0]
        assert first.bound is not None and first.bound[0] == "::1"
        for g in nodes[1:]:
            assert await g.join([format_addr(first.bound)]) == 1
        await converge(nodes, lambda g: g.core.num_alive() == 3, timeout=10)


async def test_plaintext_cluster() -> None:
    async with cluster(["127.0.0.1", "127.0.0.2"], None, allow_plaintext=True) as (a, b):
        assert b.bound is not None
        assert await a.join([b.bound]) == 1
        await converge([a, b], lambda g: g.core.num_alive() == 2, timeout=10)


def test_cluster_under_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        async with cluster(["127.0.0.1", "127.0.0.2", "127.0.0.3"], Keyring.generate()) as ns:
            assert ns[0].bound is not None
            for g in ns[1:]:
                assert await g.join([ns[0].bound]) == 1
            await converge(ns, lambda g: g.core.num_alive() == 3, timeout=10)
            await ns[2].stop()
            await converge(ns[:2], lambda g: state_of(g, "n3") == State.DEAD, timeout=15)

    uvloop.run(scenario())


# ---------------------------------------------------------------- agent processes


def free_port(host: str) -> int:
    """A port free for both UDP and TCP right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((host, 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


class Agent:
    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self.lines: list[dict[str, Any]] = []

    async def expect(self, pred: Callable[[dict[str, Any]], bool], timeout: float) -> dict:
        """Read stdout lines until one matches, with a deadline."""
        for obj in self.lines:
            if pred(obj):
                return obj
        end = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.name}: no matching line; got {self.lines}")
            try:
                raw = await asyncio.wait_for(self.proc.stdout.readline(), left)
            except TimeoutError:
                continue
            if not raw:
                raise AssertionError(f"{self.name} exited; got {self.lines}")
            obj = json.loads(raw)
            self.lines.append(obj)
            if pred(obj):
                return obj


async def spawn(name: str, bind: str, key: str, join: Sequence[str]) -> Agent:
    args = [sys.executable, "-m", "gossip", "--name", name, "--bind", bind, "--key", key]
    args += ["--profile", "local", "--cluster", "agents-test"]
    for j in join:
        args += ["--join", j]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env=env
    )
    return Agent(proc, name)


def is_event(kind: str, member: str) -> Callable[[dict[str, Any]], bool]:
    return lambda o: o.get("event") == kind and o.get("member") == member


async def test_agent_processes_detect_kill() -> None:
    key = Keyring.encode_key(Keyring.generate())
    addrs = [f"127.0.0.{i}:{free_port(f'127.0.0.{i}')}" for i in (1, 2, 3)]
    agents: list[Agent] = []
    try:
        # The joiners start first: they must retry until a1 is up.
        agents.append(await spawn("a2", addrs[1], key, [addrs[0]]))
        agents.append(await spawn("a3", addrs[2], key, [addrs[0], addrs[1]]))
        agents.insert(0, await spawn("a1", addrs[0], key, []))
        for ag in agents:
            for other in agents:
                if other is not ag:
                    ev = await ag.expect(is_event("join", other.name), timeout=20)
                    assert ev["addr"] == addrs[agents.index(other)]
                    assert isinstance(ev["t"], float) and ev["incarnation"] >= 0

        a1, a2, a3 = agents
        a3.proc.kill()  # SIGKILL: no leave
        await a3.proc.wait()
        for ag in (a1, a2):
            await ag.expect(is_event("dead", "a3"), timeout=20)

        a1.proc.send_signal(signal.SIGUSR1)
        status = await a1.expect(lambda o: "stats" in o, timeout=10)
        assert status["members"] == {"a1": "alive", "a2": "alive", "a3": "dead"}
        assert status["stats"]["packets_in"] > 0

        a2.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(a2.proc.wait(), 15) == 0
        await a1.expect(is_event("leave", "a2"), timeout=10)
        a1.proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(a1.proc.wait(), 15) == 0
    finally:
        for ag in agents:
            if ag.proc.returncode is None:
                ag.proc.kill()
                await ag.proc.wait()


async def test_agent_bad_arguments_exit_2() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cases = [
        ["--name", "x", "--bind", "nonsense", "--plaintext"],
        ["--name", "x", "--bind", "127.0.0.1:0"],  # no key choice
        ["--name", "x", "--bind", "127.0.0.1:0", "--key", "Zm9v"],
        ["--name", "x", "--bind", "127.0.0.1:0", "--key-file", "/nonexistent/key"],
    ]
    for args in cases:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gossip",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 2, args
        assert out == b""
        lines = err.decode().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gossip: error:"), err


async def test_agent_port_in_use_fails_cleanly() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gossip",
            "--name",
            "x",
            "--bind",
            f"127.0.0.1:{port}",
            "--plaintext",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        _out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 1
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and "in use" in lines[0], err


class Inbox:
    """A delegate that keeps what arrives."""

    def __init__(self) -> None:
        self.got: list[bytes] = []

    def notify_user_msg(self, payload: bytes) -> bool:
        self.got.append(payload)
        return False

    def local_state(self, join: bool) -> bytes:
        return b""

    def merge_remote_state(self, data: bytes, join: bool) -> None:
        return None


async def test_reliable_message_is_delivered_over_tcp() -> None:
    key = Keyring.generate()
    inbox = Inbox()
    cfg = local_config()
    a = Gossip(cfg, name="a", bind=("127.0.0.1", 0), keyring=Keyring([key]))
    b = Gossip(cfg, name="b", bind=("127.0.0.2", 0), keyring=Keyring([key]), delegate=inbox)
    await a.start()
    await b.start()
    try:
        assert b.bound is not None
        big = os.urandom(200_000)  # far beyond one datagram
        assert await a.send_reliable(b.bound, big)
        assert inbox.got == [big]
        with socket.socket() as s:  # a port with nobody listening
            s.bind(("127.0.0.3", 0))
            closed = s.getsockname()
        assert not await a.send_reliable(closed, b"lost")
    finally:
        await a.stop()
        await b.stop()
