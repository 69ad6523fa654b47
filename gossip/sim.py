"""A deterministic simulator: many real protocol cores in virtual time.

Every member is an unmodified `Core`; only the network and the clock are
simulated. Datagrams see loss and a delay distribution, streams (TCP) see
delay but no loss, partitions cut both, and members can crash and restart.
Everything random comes from the seed, so a run can be replayed exactly.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .config import Config, lan_config
from .core import BaseDelegate, Core, Delegate, StreamRequest
from .crypto import Keyring
from .events import EventKind, MemberEvent
from .members import Addr, Member, State

DelayFn = Callable[[random.Random], float]

_PACKET, _TICK, _STREAM_IN, _STREAM_REPLY = 0, 1, 2, 3


def lan_delay(base: float = 0.0003, jitter: float = 0.0002) -> DelayFn:
    """A fixed base plus an exponential tail: what a switched LAN looks like."""
    rate = 1.0 / jitter if jitter > 0 else 0.0

    def delay(rng: random.Random) -> float:
        return base + (rng.expovariate(rate) if rate else 0.0)

    return delay


def sim_addr(index: int) -> Addr:
    return (f"10.{(index >> 16) & 255}.{(index >> 8) & 255}.{index & 255}", 7946)


@dataclass(slots=True)
class SimNode:
    index: int
    name: str
    addr: Addr
    core: Core
    up: bool = True
    next_tick: float = float("inf")
    group: int = 0
    udp_blocked: bool = False
    """Datagrams to and from this node vanish; streams still pass (a
    firewall that drops UDP)."""
    events: list[MemberEvent] = field(default_factory=list)


class Simulation:
    def __init__(
        self,
        *,
        seed: int = 0,
        config: Config | None = None,
        loss: float = 0.0,
        delay: DelayFn | None = None,
        keyring: Keyring | None = None,
        record_events: bool = True,
        link_delay: Callable[[int, int], float] | None = None,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.config = config or lan_config()
        self.loss = loss
        self.delay = delay or lan_delay()
        self.link_delay = link_delay
        """Extra one-way delay between two node indexes (a topology)."""
        self.keyring = keyring if keyring is not None else Keyring([self.rng.randbytes(32)])
        self.record_events = record_events
        self.now = 0.0
        self.nodes: list[SimNode] = []
        self.by_name: dict[str, SimNode] = {}
        self.by_addr: dict[Addr, SimNode] = {}
        self._queue: list[tuple] = []
        self._seq = itertools.count()
        self._restarts: dict[str, int] = {}
        self.on_event: Callable[[SimNode, MemberEvent], None] | None = None
        self.first_seen: dict[tuple[EventKind, str], dict[str, float]] = {}
        self.packets_sent = 0
        self.packets_lost = 0
        self.bytes_sent = 0

    # ------------------------------------------------------------------ members

    def add_node(
        self,
        name: str | None = None,
        *,
        config: Config | None = None,
        keyring: Keyring | None = None,
        delegate: Delegate | None = None,
        meta: bytes = b"",
    ) -> SimNode:
        index = len(self.nodes)
        name = name or f"n{index}"
        addr = sim_addr(index + 1)
        core = self._make_core(name, addr, config, keyring, delegate, meta)
        node = SimNode(index, name, addr, core)
        self.nodes.append(node)
        self.by_name[name] = node
        self.by_addr[addr] = node
        self._after(node)
        return node

    def _make_core(
        self,
        name: str,
        addr: Addr,
        config: Config | None,
        keyring: Keyring | None,
        delegate: Delegate | None,
        meta: bytes,
    ) -> Core:
        gen = self._restarts.get(name, 0)
        return Core(
            config or self.config,
            name=name,
            addr=addr,
            meta=meta,
            keyring=keyring if keyring is not None else self.keyring,
            delegate=delegate,
            rng=random.Random(f"{self.seed}:{name}:{gen}"),
            now=self.now,
        )

    def add_nodes(self, n: int, **kw: object) -> list[SimNode]:
        return [self.add_node(**kw) for _ in range(n)]  # type: ignore[arg-type]

    def bootstrap(self, nodes: Iterable[SimNode] | None = None) -> None:
        """Give the nodes one shared membership table, as if each had just
        completed a push-pull with a fully informed member. Starts large
        clusters without O(N^2) joins; the join path itself is exercised by
        `join`."""
        group = list(nodes) if nodes is not None else self.nodes
        table = {
            n.name: Member(n.name, n.addr, n.core.local_member.meta, 0, State.ALIVE, self.now)
            for n in group
        }
        for n in group:
            n.core.bootstrap(table, self.now)
            self._after(n)

    def join(self, node: SimNode, *seeds: SimNode) -> None:
        node.core.join([s.addr for s in seeds], self.now)
        self._after(node)

    def crash(self, node: SimNode) -> None:
        """The process dies at once: no leave, packets to it vanish."""
        node.up = False
        node.next_tick = float("inf")

    def restart(self, node: SimNode, *seeds: SimNode, delegate: Delegate | None = None) -> None:
        """A fresh process with the same name and address rejoins. The
        application (delegate) survives unless another is given, as an
        agent's data dir survives a restart."""
        self._restarts[node.name] = self._restarts.get(node.name, 0) + 1
        old = node.core.delegate
        keep = None if isinstance(old, BaseDelegate) else old
        node.core = self._make_core(node.name, node.addr, None, None, delegate or keep, b"")
        node.up = True
        node.next_tick = float("inf")
        if seeds:
            self.join(node, *seeds)
        else:
            self._after(node)

    def leave(self, node: SimNode) -> None:
        node.core.leave(self.now)
        self._after(node)

    def partition(self, *groups: Iterable[SimNode]) -> None:
        """Cut the network between groups; nodes not listed form group 0."""
        for n in self.nodes:
            n.group = 0
        for gid, members in enumerate(groups, start=1):
            for n in members:
                n.group = gid

    def heal(self) -> None:
        for n in self.nodes:
            n.group = 0

    # ------------------------------------------------------------------ running

    def run_until(self, t: float) -> None:
        queue = self._queue
        pop = heapq.heappop
        nodes = self.nodes
        while queue and queue[0][0] <= t:
            when, _, kind, idx, a, b = pop(queue)
            self.now = when
            node = nodes[idx]
            if not node.up:
                if kind == _STREAM_REPLY:
                    pass
                else:
                    continue
            core = node.core
            if kind == _PACKET:
                core.handle_packet(a, b, when)
            elif kind == _TICK:
                if when != node.next_tick:
                    continue
                node.next_tick = float("inf")
                core.tick(when)
            elif kind == _STREAM_IN:
                self._serve_stream(node, a, b)
                continue
            else:  # _STREAM_REPLY: (token, data)
                if not node.up or a[0] is not core:
                    continue
                core.handle_stream_reply(a[1], b, when)
            self._after(node)
        self.now = max(self.now, t)

    def run_for(self, dt: float) -> None:
        self.run_until(self.now + dt)

    def run_until_true(self, pred: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
        """Advance in steps until pred() holds or `timeout` virtual seconds pass."""
        end = self.now + timeout
        while self.now < end:
            if pred():
                return True
            self.run_until(min(end, self.now + step))
        return pred()

    # ------------------------------------------------------------------ queries

    def views(self, name: str) -> dict[str, State | None]:
        """How every up node sees `name`."""
        out: dict[str, State | None] = {}
        for n in self.nodes:
            if n.up and n.name != name:
                m = n.core.member(name)
                out[n.name] = None if m is None else m.state
        return out

    def all_see(
        self, name: str, state: State | None, among: Iterable[SimNode] | None = None
    ) -> bool:
        for n in among if among is not None else self.nodes:
            if not n.up or n.name == name:
                continue
            m = n.core.member(name)
            if (None if m is None else m.state) != state:
                return False
        return True

    def converged(self, among: Iterable[SimNode] | None = None) -> bool:
        """Every listed up node sees exactly the listed up nodes alive."""
        group = [n for n in (among if among is not None else self.nodes) if n.up]
        names = {n.name for n in group}
        for n in group:
            alive = {m.name for m in n.core.members() if m.state == State.ALIVE}
            if alive != names:
                return False
        return True

    def total_stat(self, key: str) -> int:
        return sum(n.core.stats.get(key, 0) for n in self.nodes)

    # ------------------------------------------------------------------ internals

    def _after(self, node: SimNode) -> None:
        """Carry out what the core asked for after each input."""
        core = node.core
        packets = core.take_packets()
        if packets:
            rng = self.rng
            loss = self.loss
            by_addr = self.by_addr
            now = self.now
            src = node.addr
            for addr, data in packets:
                self.packets_sent += 1
                self.bytes_sent += len(data)
                dst = by_addr.get(addr)
                if dst is None or not dst.up or dst.group != node.group:
                    continue
                if node.udp_blocked or dst.udp_blocked:
                    self.packets_lost += 1
                    continue
                if loss and rng.random() < loss:
                    self.packets_lost += 1
                    continue
                d = self.delay(rng)
                if self.link_delay is not None:
                    d += self.link_delay(node.index, dst.index)
                self._push(now + d, _PACKET, dst.index, data, src)
        streams = core.take_streams()
        for req in streams:
            self._start_stream(node, req)
        events = core.take_events()
        if events:
            if self.record_events:
                node.events.extend(events)
            seen = self.first_seen
            for ev in events:
                key = (ev.kind, ev.member.name)
                per = seen.get(key)
                if per is None:
                    per = seen[key] = {}
                per.setdefault(node.name, ev.at)
                if self.on_event is not None:
                    self.on_event(node, ev)
        if node.up:
            nd = core.next_deadline()
            if nd < node.next_tick:
                node.next_tick = nd
                self._push(nd, _TICK, node.index, None, None)

    def _push(self, when: float, kind: int, idx: int, a: object, b: object) -> None:
        heapq.heappush(self._queue, (when, next(self._seq), kind, idx, a, b))

    def _start_stream(self, node: SimNode, req: StreamRequest) -> None:
        dst = self.by_addr.get(req.addr)
        reachable = dst is not None and dst.up and dst.group == node.group
        there = self.now + self.delay(self.rng)
        if not reachable or dst is None:
            self._push(req.deadline, _STREAM_REPLY, node.index, (node.core, req.token), None)
            return
        self._push(there, _STREAM_IN, dst.index, (node, req), None)

    def _serve_stream(self, dst: SimNode, ctx: tuple[SimNode, StreamRequest], _: object) -> None:
        src, req = ctx
        reply = dst.core.handle_stream(req.data, src.addr, self.now)
        self._after(dst)
        back = self.now + self.delay(self.rng)
        if reply is None or back > req.deadline or src.group != dst.group:
            self._push(req.deadline, _STREAM_REPLY, src.index, (src.core, req.token), None)
        else:
            self._push(back, _STREAM_REPLY, src.index, (src.core, req.token), reply)
