"""Lease election over real gossip on loopback: one leader, takeover, quorum."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import msgpack
import pytest
from conftest import async_wait_for

from gossip import Gossip, State, local_config
from gossip.core import BaseDelegate
from meshd.rpc import RPC_TAG, Mux, Rpc, RpcError
from meshd.scheduler.election import ElectionConfig, Elector, voter_digest

pytestmark = pytest.mark.integration

FAST = ElectionConfig(duration=0.6, retry_interval=0.05, tick=0.02, call_timeout=0.5)


class Node:
    def __init__(self, name: str, tmp: Path, voters: list[str], services: set[str]) -> None:
        self.name = name
        self.rpc = Rpc(name)
        self.gossip = Gossip(
            local_config(allow_plaintext=True),
            name=name,
            bind=("127.0.0.1", 0),
            delegate=Mux(BaseDelegate(), self.rpc),
        )
        self.rpc.attach(self.gossip)
        self.voters = voters
        self.services = services
        self.changes: list[tuple[str, bool]] = []
        self.elector = Elector(
            name,
            self.rpc,
            state_path=tmp / f"{name}-votes.json",
            voters=lambda: self.voters,
            alive=self.alive,
            services=lambda: self.services,
            on_change=lambda s, lead: self.changes.append((s, lead)),
            config=FAST,
        )

    def alive(self) -> list[str]:
        return [m.name for m in self.gossip.core.members() if m.state == State.ALIVE]

    async def start(self, join: tuple[str, int] | None = None) -> None:
        await self.gossip.start()
        if join is not None:
            await self.gossip.join([join])
        self.elector.start()

    async def kill(self) -> None:
        await self.elector.stop()
        await self.gossip.stop()
        await self.rpc.close()


async def cluster(tmp: Path, names: list[str], voters: list[str], services: set[str]) -> list[Node]:
    nodes = [Node(n, tmp, voters, services) for n in names]
    await nodes[0].start()
    for n in nodes[1:]:
        await n.start(nodes[0].gossip.core.addr)
    await async_wait_for(
        lambda: all(len(n.alive()) == len(nodes) for n in nodes), 5, message="all alive"
    )
    return nodes


def leaders(nodes: list[Node], service: str) -> list[str]:
    return [n.name for n in nodes if n.elector.leading_term(service) is not None]


def assert_no_overlap(nodes: list[Node]) -> None:
    periods = [p for n in nodes for p in n.elector.leases()]
    for a, b in itertools.combinations(periods, 2):
        if a["service"] == b["service"] and a["term"] != b["term"]:
            assert a["until"] <= b["start"] or b["until"] <= a["start"], (a, b)


async def test_one_leader_per_service_and_takeover(tmp_path: Path) -> None:
    names = ["a", "b", "c"]
    nodes = await cluster(tmp_path, names, names, {"web", "db", "cache"})
    try:
        for svc in ("web", "db", "cache"):
            await async_wait_for(lambda s=svc: len(leaders(nodes, s)) == 1, 5, message=f"{svc} led")
        first = leaders(nodes, "web")[0]
        term = next(n for n in nodes if n.name == first).elector.leading_term("web")
        victim = next(n for n in nodes if n.name == first)
        await victim.kill()
        rest = [n for n in nodes if n is not victim]
        await async_wait_for(lambda: len(leaders(rest, "web")) == 1, 10, message="takeover")
        new = next(n for n in rest if n.name == leaders(rest, "web")[0])
        assert new.elector.leading_term("web") > term  # type: ignore[operator]
        assert ("web", True) in new.changes
        assert_no_overlap(nodes)
    finally:
        for n in nodes:
            await n.kill()


async def test_minority_never_leads(tmp_path: Path) -> None:
    # Five registered voters, two of them never started: 3 of 5 lead, 2 of 5 do not.
    voters = ["a", "b", "c", "d", "e"]
    nodes = await cluster(tmp_path, ["a", "b", "c"], voters, {"web"})
    try:
        await async_wait_for(lambda: len(leaders(nodes, "web")) == 1, 5, message="led by 3/5")
        victim = next(n for n in nodes if n.name == leaders(nodes, "web")[0])
        await victim.kill()
        rest = [n for n in nodes if n is not victim]
        # Both survivors keep trying for several lease lengths; neither may lead.
        deadline = asyncio.get_running_loop().time() + 4 * FAST.duration
        while asyncio.get_running_loop().time() < deadline:
            assert leaders(rest, "web") == []
            await asyncio.sleep(0.02)  # sampling an invariant over time, not waiting for it
        assert sum(n.elector.stats["bids"] for n in rest) > 0
    finally:
        for n in nodes:
            await n.kill()


async def test_voter_state_persisted_and_quiet_after_restart(tmp_path: Path) -> None:
    names = ["a", "b", "c"]
    nodes = await cluster(tmp_path, names, names, {"web"})
    try:
        await async_wait_for(lambda: len(leaders(nodes, "web")) == 1, 5)
        for n in nodes:
            data = (tmp_path / f"{n.name}-votes.json").read_text()
            assert '"web"' in data
        restored = Elector(
            "a",
            Rpc("a"),
            state_path=tmp_path / "a-votes.json",
            voters=lambda: names,
            alive=lambda: names,
            services=lambda: [],
            config=FAST,
        )
        assert restored.voter.highest_term("web") >= 1
        reply = restored._handle_votes("b", [["web", "b", 99, 0.5, 1, voter_digest(names)]])
        assert reply[0][0] is False and reply[0][3] == "restarting"
    finally:
        for n in nodes:
            await n.kill()


async def test_voter_refuses_other_voter_sets_and_bad_requests(tmp_path: Path) -> None:
    e = Elector(
        "a",
        Rpc("a"),
        state_path=tmp_path / "v.json",
        voters=lambda: ["a", "b", "c"],
        alive=lambda: ["a"],
        services=lambda: [],
        config=FAST,
    )
    d = voter_digest(["a", "b"])
    assert e._handle_votes("b", [["web", "b", 1, 0.5, 1, d]])[0][3] == "voter sets differ"
    good = voter_digest(["a", "b", "c"])
    out = e._handle_votes(
        "b", [["web", "c", 1, 0.5, 1, good], "junk", ["web", "b", 1, 0.5, 1, good]]
    )
    assert out[0][3] == "bad request"  # candidate must be the caller
    assert out[1][3] == "bad request"
    assert out[2][0] is True
    with pytest.raises(ValueError):
        e._handle_votes("b", {"not": "a list"})


async def test_rpc_drops_and_counts_garbage() -> None:
    rpc = Rpc("a")
    for junk in [
        RPC_TAG,
        RPC_TAG + b"\xff\xff",
        RPC_TAG + msgpack.packb([9, 1, "b", "m", 0]),
        RPC_TAG + msgpack.packb([0, "x", "b", "m", 0]),
        RPC_TAG + msgpack.packb({"a": 1}),
    ]:
        rpc.on_message(junk)
    assert rpc.stats["invalid"] == 5
    rpc.register("echo", lambda caller, body: [caller, body])
    assert await rpc.call("a", "echo", 5) == ["a", 5]
    with pytest.raises(RpcError):
        await rpc.call("a", "missing", 1)
    with pytest.raises(RpcError):
        await rpc.call("nobody", "echo", 1)  # not attached: unreachable


async def test_rpc_over_gossip_and_refusals(tmp_path: Path) -> None:
    a, b = Rpc("a"), Rpc("b")
    ga = Gossip(
        local_config(allow_plaintext=True),
        name="a",
        bind=("127.0.0.1", 0),
        delegate=Mux(BaseDelegate(), a),
    )
    gb = Gossip(
        local_config(allow_plaintext=True),
        name="b",
        bind=("127.0.0.1", 0),
        delegate=Mux(BaseDelegate(), b),
    )
    a.attach(ga)
    b.attach(gb)
    await ga.start()
    await gb.start()
    try:
        await gb.join([ga.core.addr])
        await async_wait_for(lambda: ga.core.member("b") is not None, 5)

        async def slow(caller: str, body: object) -> object:
            await asyncio.sleep(0)
            return {"from": caller, "got": body}

        def boom(caller: str, body: object) -> object:
            raise ValueError("no thanks")

        b.register("slow", slow)
        b.register("boom", boom)
        assert await a.call("b", "slow", [1, 2]) == {"from": "a", "got": [1, 2]}
        with pytest.raises(RpcError, match="no thanks"):
            await a.call("b", "boom", None)
        with pytest.raises(RpcError, match="no handler"):
            await a.call("b", "nope", None)
        assert b.stats["served"] == 1 and b.stats["refused"] == 1
    finally:
        await ga.stop()
        await gb.stop()


async def test_lease_history_survives_a_crash(tmp_path: Path) -> None:
    names = ["a", "b", "c"]
    nodes = await cluster(tmp_path, names, names, {"web"})
    try:
        await async_wait_for(lambda: len(leaders(nodes, "web")) == 1, 5)
        lead = next(n for n in nodes if n.name == leaders(nodes, "web")[0])
        await async_wait_for(lambda: lead.elector.history_path.exists(), 2, message="written")
        held = lead.elector.leases()
        again = Elector(
            lead.name,
            Rpc(lead.name),
            state_path=tmp_path / f"{lead.name}-votes.json",
            voters=lambda: names,
            alive=lambda: names,
            services=lambda: [],
            config=FAST,
        )
        earlier = again.leases()
        assert [(p["service"], p["term"]) for p in earlier] == [
            (p["service"], p["term"]) for p in held
        ]
        assert earlier[0]["until"] > earlier[0]["start"]
    finally:
        for n in nodes:
            await n.kill()
