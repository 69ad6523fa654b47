"""The SWIM protocol with Lifeguard, as a sans-IO state machine.

The core never touches a socket, a clock or a global random source. It is fed
datagrams, stream frames and timer ticks together with the current time, and
it leaves datagrams to send, stream requests to make and membership events in
lists its driver drains. The same code runs on real sockets (gossip.driver)
and in virtual time (gossip.sim).
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from . import wire
from .awareness import Awareness
from .broadcast import BroadcastQueue
from .config import Config
from .crypto import Keyring, OpenError, Sealer
from .events import EventKind, MemberEvent
from .members import Addr, Member, State
from .suspicion import Suspicion
from .vivaldi import Coordinate, VivaldiClient, estimate_rtt

MAX_RELAYS = 1024
"""Outstanding indirect probes we run for others; bounds what a flood of
ping-reqs can make us hold."""


class Delegate(Protocol):
    """Application hooks. Called synchronously from inside the core."""

    def notify_user_msg(self, payload: bytes) -> bool:
        """An application broadcast arrived. Return True if it was new to the
        application, so the core spreads it further."""
        ...

    def local_state(self, join: bool) -> bytes:
        """Application state to send during a push-pull exchange."""
        ...

    def merge_remote_state(self, data: bytes, join: bool) -> None:
        """Application state received during a push-pull exchange."""
        ...


class BaseDelegate:
    """No-op delegate: membership only."""

    def notify_user_msg(self, payload: bytes) -> bool:
        return False

    def local_state(self, join: bool) -> bytes:
        return b""

    def merge_remote_state(self, data: bytes, join: bool) -> None:
        return None


@dataclass(slots=True)
class StreamRequest:
    """A request/response exchange over TCP that the driver must carry out."""

    token: int
    addr: Addr
    data: bytes
    deadline: float
    kind: str  # "push_pull", "join", "ping" or "user"


class _Probe:
    __slots__ = (
        "acked",
        "addr",
        "end",
        "ended",
        "expected_nacks",
        "nacks",
        "sent",
        "seq",
        "target",
        "tcp_pending",
        "timeout_timer",
    )

    def __init__(self, target: str, addr: Addr, seq: int, sent: float, end: float) -> None:
        self.target = target
        self.addr = addr
        self.seq = seq
        self.sent = sent
        self.end = end
        self.ended = False
        self.acked = False
        self.nacks = 0
        self.expected_nacks = 0
        self.tcp_pending = False
        self.timeout_timer: list[Any] | None = None


class _Relay:
    __slots__ = ("nack_timer", "requester", "seq")

    def __init__(self, requester: Addr, seq: int) -> None:
        self.requester = requester
        self.seq = seq
        self.nack_timer: list[Any] | None = None


class Core:
    def __init__(
        self,
        config: Config,
        *,
        name: str,
        addr: Addr,
        meta: bytes = b"",
        keyring: Keyring | None = None,
        delegate: Delegate | None = None,
        rng: random.Random | None = None,
        now: float = 0.0,
        wall_offset: float = 0.0,
    ) -> None:
        if keyring is None and not config.allow_plaintext:
            raise ValueError("no keyring given and plaintext not allowed (config.allow_plaintext)")
        if len(meta) > wire.META_MAX:
            raise ValueError(f"metadata is {len(meta)} bytes, at most {wire.META_MAX} allowed")
        self.config = config
        self.name = name
        self.addr = addr
        self.wall_offset = wall_offset
        self.delegate: Delegate = delegate or BaseDelegate()
        self._rng = rng or random.Random()
        self._sealer = Sealer(config.cluster_name, keyring, config.replay_window)
        self._budget = config.udp_buffer_size - self._sealer.overhead - wire.packet_overhead(255)

        self._incarnation = 0
        self._meta = meta
        self._leaving = False
        self._members: dict[str, Member] = {}
        self._dead_since: dict[str, float] = {}
        self._probe_list: list[str] = []
        self._probe_index = 0
        self._bq = BroadcastQueue()
        self._suspicions: dict[str, tuple[Suspicion, list[Any]]] = {}
        self._awareness = Awareness(config.awareness_max_multiplier)
        self._vivaldi = VivaldiClient(rng=self._rng)
        self._coord_wire: tuple[Any, ...] = self._vivaldi.coordinate.to_wire()
        self._coords: dict[str, Coordinate] = {}
        self._seq = 0
        self._acks: dict[int, _Probe | _Relay] = {}
        self._relays = 0
        self._probe: _Probe | None = None
        self._pending_streams: dict[int, tuple[str, Any]] = {}
        self._tokens = itertools.count(1)
        self._timers: list[list[Any]] = []
        self._timer_ids = itertools.count()

        self._packets: list[tuple[Addr, bytes]] = []
        self._streams: list[StreamRequest] = []
        self._events: list[MemberEvent] = []
        self.stats: dict[str, int] = {}

        me = Member(name, addr, meta, 0, State.ALIVE, now)
        self._members[name] = me
        self._dispatch: dict[type, Callable[[Any, Addr, float], None]] = {
            wire.Ping: self._on_ping,
            wire.IndirectPing: self._on_indirect_ping,
            wire.Ack: self._on_ack,
            wire.Nack: self._on_nack,
            wire.Suspect: self._on_suspect_msg,
            wire.Alive: self._on_alive_msg,
            wire.Dead: self._on_dead_msg,
            wire.User: self._on_user,
        }
        # Spread the first timers over one period so that members started
        # together do not probe and gossip in lockstep.
        self._schedule(now + self._rng.random() * config.probe_interval, self._probe_round)
        self._gossip_timer: list[Any] | None = None
        self._now = now
        self._push_pull_timer = self._schedule(
            now + self._rng.random() * config.push_pull_interval, self._push_pull_round
        )
        self._schedule(now + self._reap_period(), self._reap_round)

    # ------------------------------------------------------------------ queries

    @property
    def incarnation(self) -> int:
        return self._incarnation

    @property
    def health_score(self) -> int:
        return self._awareness.score

    @property
    def coordinate(self) -> Coordinate:
        return self._vivaldi.coordinate

    @property
    def local_member(self) -> Member:
        return self._members[self.name]

    def members(self) -> list[Member]:
        return list(self._members.values())

    def member(self, name: str) -> Member | None:
        return self._members.get(name)

    def num_alive(self) -> int:
        return sum(1 for m in self._members.values() if m.state == State.ALIVE)

    def num_active(self) -> int:
        return sum(1 for m in self._members.values() if m.state <= State.SUSPECT)

    def estimate_rtt(self, a: str, b: str) -> float | None:
        """Round-trip estimate in seconds between any two members, from their
        Vivaldi coordinates (None until both are known)."""
        ca = self._vivaldi.coordinate if a == self.name else self._coords.get(a)
        cb = self._vivaldi.coordinate if b == self.name else self._coords.get(b)
        if ca is None or cb is None:
            return None
        return estimate_rtt(ca, cb)

    def next_deadline(self) -> float:
        timers = self._timers
        while timers and timers[0][2] is None:
            heapq.heappop(timers)
        return timers[0][0] if timers else float("inf")

    # ------------------------------------------------------------------ outputs

    def take_packets(self) -> list[tuple[Addr, bytes]]:
        out, self._packets = self._packets, []
        return out

    def take_streams(self) -> list[StreamRequest]:
        out, self._streams = self._streams, []
        return out

    def take_events(self) -> list[MemberEvent]:
        out, self._events = self._events, []
        return out

    # ------------------------------------------------------------------ inputs

    def tick(self, now: float) -> None:
        self._now = now
        timers = self._timers
        while timers and timers[0][0] <= now:
            entry = heapq.heappop(timers)
            fn = entry[2]
            if fn is not None:
                entry[2] = None
                fn(now, *entry[3])

    def handle_packet(self, data: bytes, addr: Addr, now: float) -> None:
        self._now = now
        stats = self.stats
        stats["packets_in"] = stats.get("packets_in", 0) + 1
        stats["bytes_in"] = stats.get("bytes_in", 0) + len(data)
        try:
            plain = self._sealer.open(data, now + self.wall_offset)
            msgs = wire.decode_packet(plain)
        except (OpenError, wire.DecodeError) as exc:
            self._count("dropped." + exc.reason)
            return
        dispatch = self._dispatch
        for msg in msgs:
            try:
                dispatch[type(msg)](msg, addr, now)
            except Exception:  # a bug must not take the member down
                self._count("dropped.internal_error")

    def handle_stream(self, data: bytes, addr: Addr, now: float) -> bytes | None:
        self._now = now
        self._count("streams_in")
        try:
            msg = wire.decode_stream(self._sealer.open(data, now + self.wall_offset, stream=True))
        except (OpenError, wire.DecodeError) as exc:
            self._count("dropped." + exc.reason)
            return None
        try:
            if isinstance(msg, wire.PushPull):
                reply = self._local_state(msg.join)
                self._merge_remote(msg, now)
                return self._seal_stream(reply, now)
            if isinstance(msg, wire.StreamPing):
                if msg.target != self.name:
                    self._count("dropped.wrong_target")
                    return None
                return self._seal_stream(wire.Ack(msg.seq, self._coord_wire), now)
            if isinstance(msg, wire.UserStream):
                self._count("user_streams_in")
                self.delegate.notify_user_msg(msg.payload)
                return self._seal_stream(wire.Ack(0, None), now)
        except Exception:
            self._count("dropped.internal_error")
            return None
        self._count("dropped.type")
        return None

    def handle_stream_reply(self, token: int, data: bytes | None, now: float) -> bool:
        self._now = now
        pending = self._pending_streams.pop(token, None)
        if pending is None:
            return False
        kind, ctx = pending
        msg: Any = None
        if data is not None:
            try:
                msg = wire.decode_stream(
                    self._sealer.open(data, now + self.wall_offset, stream=True)
                )
            except (OpenError, wire.DecodeError) as exc:
                self._count("dropped." + exc.reason)
                msg = None
        if kind == "ping":
            probe: _Probe = ctx
            probe.tcp_pending = False
            if isinstance(msg, wire.Ack) and msg.seq == probe.seq and not probe.acked:
                probe.acked = True
                self._count("tcp_fallback_acks")
            if probe.ended:  # the probe round already waited for us
                self._finish_probe(probe, now)
            return isinstance(msg, wire.Ack)
        if kind == "user":
            return isinstance(msg, wire.Ack)
        if isinstance(msg, wire.PushPull):
            try:
                self._merge_remote(msg, now)
            except Exception:
                self._count("dropped.internal_error")
                return False
            return True
        if data is not None:
            self._count("dropped.type")
        self._count("push_pull_failures")
        return False

    def join(self, addrs: Sequence[Addr], now: float) -> list[int]:
        """Start a push-pull with each address; returns the stream tokens."""
        self._now = now
        return [self._start_push_pull(tuple(a), True, now) for a in addrs]  # type: ignore[arg-type]

    def leave(self, now: float) -> None:
        """Announce a graceful leave. Keep driving the core until leave_done()."""
        if self._leaving:
            return
        self._now = now
        self._leaving = True
        me = self._members[self.name]
        self._members[self.name] = me.evolve(state=State.LEFT, state_change=now)
        self._broadcast(wire.Dead(self._incarnation, self.name, self.name), self.name)
        self._gossip_round(now, reschedule=False)

    def leave_done(self) -> bool:
        """True once the leave was handed to enough peers (or nobody is left
        to tell)."""
        if not self._leaving:
            return False
        if not any(m.is_active for n, m in self._members.items() if n != self.name):
            return True
        return self._bq.transmits(self.name) is None

    def set_meta(self, meta: bytes, now: float) -> None:
        if len(meta) > wire.META_MAX:
            raise ValueError(f"metadata is {len(meta)} bytes, at most {wire.META_MAX} allowed")
        self._now = now
        self._meta = meta
        self._incarnation += 1
        me = self._members[self.name]
        self._members[self.name] = me.evolve(meta=meta, incarnation=self._incarnation)
        self._broadcast_self()

    def queue_broadcast(self, payload: bytes, key: str | None = None) -> None:
        """Spread an application message through the piggyback queue. A later
        message with the same key replaces one still queued."""
        data = wire.encode_message(wire.User(payload))
        if len(data) > self._budget:
            raise ValueError(
                f"broadcast of {len(payload)} bytes cannot fit a datagram "
                f"(max_broadcast_payload is {self.max_broadcast_payload}); use send_reliable"
            )
        self._queue(data, None if key is None else "u:" + key)

    @property
    def max_broadcast_payload(self) -> int:
        """Largest application broadcast that fits one datagram."""
        return self._budget - 5  # array, type and bin16 headers

    def send_reliable(self, addr: Addr, payload: bytes, now: float) -> int:
        """Send an application message to one member over TCP; it arrives
        through the receiver's delegate.notify_user_msg. Returns the stream
        token (handle_stream_reply reports delivery)."""
        if len(payload) > wire.MAX_APP_STATE:
            raise ValueError(f"payload is {len(payload)} bytes, at most {wire.MAX_APP_STATE}")
        self._now = now
        frame = self._seal_stream(wire.UserStream(payload), now)
        return self._stream("user", None, addr, frame, now + self.config.tcp_timeout)

    def bootstrap(self, members: dict[str, Member], now: float) -> None:
        """Adopt a whole membership table as if a push-pull with a fully
        informed member had just completed. Records are shared, not copied:
        the simulator starts 10,000-member clusters this way."""
        table = dict(members)
        table[self.name] = self._members[self.name]
        self._members = table
        self._probe_list = [n for n in table if n != self.name]
        self._probe_index = 0
        # The exchange just "happened": the next one is due within one
        # interval scaled to the new size, at a random phase.
        self._cancel(self._push_pull_timer)
        period = self.config.push_pull_scaled(len(table))
        self._push_pull_timer = self._schedule(
            now + self._rng.random() * period, self._push_pull_round
        )

    # ------------------------------------------------------------------ timers

    def _schedule(self, when: float, fn: Callable[..., None], *args: Any) -> list[Any]:
        entry = [when, next(self._timer_ids), fn, args]
        heapq.heappush(self._timers, entry)
        return entry

    @staticmethod
    def _cancel(entry: list[Any] | None) -> None:
        if entry is not None:
            entry[2] = None

    def _reap_period(self) -> float:
        return max(0.5, min(5.0, self.config.dead_reap_time / 10))

    # ------------------------------------------------------------------ probing

    def _probe_round(self, now: float) -> None:
        interval = self._awareness.scale(self.config.probe_interval)
        self._schedule(now + interval, self._probe_round)
        if self._probe is not None:
            self._end_probe(now, self._probe)
        if self._leaving:
            return
        target = self._next_probe_target()
        if target is None:
            return
        self._seq = seq = (self._seq + 1) & 0xFFFFFFFF
        probe = _Probe(target.name, target.addr, seq, now, now + interval)
        self._probe = probe
        self._acks[seq] = probe
        msgs = [wire.encode_message(wire.Ping(seq, target.name, self.name))]
        if target.state == State.SUSPECT:
            # Buddy system: tell a suspect at once so it can refute.
            msgs.append(
                wire.encode_message(wire.Suspect(target.incarnation, target.name, self.name))
            )
        self._send(target.addr, msgs, now)
        self._count("probes")
        timeout = self._awareness.scale(self.config.probe_timeout)
        probe.timeout_timer = self._schedule(now + timeout, self._probe_timeout, probe)

    def _next_probe_target(self) -> Member | None:
        """Round robin over the member list, shuffled incrementally (a lazy
        Fisher-Yates), so each member is probed once per round in random
        order without an O(N) shuffle up front."""
        plist = self._probe_list
        members = self._members
        for _ in range(len(plist) + 1):
            n = len(plist)
            if self._probe_index >= n:
                self._probe_list = plist = [x for x in members if x != self.name]
                self._probe_index = 0
                n = len(plist)
                if n == 0:
                    return None
            i = self._probe_index
            j = self._rng.randrange(i, n)
            plist[i], plist[j] = plist[j], plist[i]
            self._probe_index = i + 1
            m = members.get(plist[i])
            if m is not None and m.state <= State.SUSPECT and m.name != self.name:
                return m
        return None

    def _probe_timeout(self, now: float, probe: _Probe) -> None:
        if probe.acked or probe is not self._probe:
            return
        self._count("probe_timeouts")
        candidates = self._random_members(
            self.config.indirect_checks, lambda m: m.state == State.ALIVE and m.name != probe.target
        )
        ping_req = wire.encode_message(
            wire.IndirectPing(probe.seq, probe.target, probe.addr[0], probe.addr[1], True)
        )
        for m in candidates:
            self._send(m.addr, [ping_req], now)
            self._count("indirect_probes")
        probe.expected_nacks = len(candidates)
        if self.config.tcp_fallback:
            frame = wire.StreamPing(probe.seq, probe.target, self.name)
            probe.tcp_pending = True
            self._stream("ping", probe, probe.addr, self._seal_stream(frame, now), probe.end)

    def _end_probe(self, now: float, probe: _Probe) -> None:
        """The probe's interval is over (the next probe round starts): count
        the result, suspect on failure. A TCP fallback still in flight gets
        until its own deadline."""
        if self._probe is probe:
            self._probe = None
        probe.ended = True
        self._cancel(probe.timeout_timer)
        self._acks.pop(probe.seq, None)
        if probe.tcp_pending and not probe.acked:
            return  # handle_stream_reply finishes it
        self._finish_probe(probe, now)

    def _finish_probe(self, probe: _Probe, now: float) -> None:
        if probe.acked:
            return
        if probe.expected_nacks > 0:
            missing = probe.expected_nacks - probe.nacks
            if missing > 0:
                self._awareness.apply(missing)
        else:
            self._awareness.apply(1)
        self._count("probe_failures")
        target = self._members.get(probe.target)
        if target is not None and target.state <= State.SUSPECT:
            # Already suspect: our own failed probe is an independent
            # confirmation that shortens the suspicion (Lifeguard).
            self._suspect(wire.Suspect(target.incarnation, target.name, self.name), now)

    # ------------------------------------------------------------------ gossip

    def _gossip_round(self, now: float, reschedule: bool = True) -> None:
        """Piggyback gossip. The timer runs only while there is news to
        spread, so an idle member costs no wake-ups."""
        if reschedule:
            self._gossip_timer = None
        if not len(self._bq):
            return
        dead_after = now - self.config.gossip_to_the_dead_time
        targets = self._random_members(
            self.config.gossip_nodes,
            lambda m: m.state <= State.SUSPECT or m.state_change > dead_after,
        )
        limit = self.config.retransmit_limit(len(self._members))
        wall = now + self.wall_offset
        for m in targets:
            msgs = self._bq.take(self._budget, limit)
            if not msgs:
                break
            self._emit(m.addr, wire.encode_packet(msgs), wall)
        if len(self._bq) > self.config.broadcast_queue_max:
            self._count("broadcasts_pruned", self._bq.prune(self.config.broadcast_queue_max))
        if len(self._bq) and self._gossip_timer is None:
            self._gossip_timer = self._schedule(
                now + self.config.gossip_interval, self._gossip_round
            )

    def _random_members(self, k: int, accept: Callable[[Member], bool]) -> list[Member]:
        """Up to k distinct random members (not us) that pass `accept`."""
        names = self._probe_list
        members = self._members
        n = len(names)
        chosen: dict[str, Member] = {}
        if n <= 4 * k:
            pool = [members[x] for x in names if x in members]
            self._rng.shuffle(pool)
            for m in pool:
                if m.name != self.name and accept(m):
                    chosen[m.name] = m
                    if len(chosen) >= k:
                        break
            return list(chosen.values())
        rand = self._rng.random
        for _ in range(6 * k):
            m = members.get(names[int(rand() * n)])
            if m is not None and m.name != self.name and m.name not in chosen and accept(m):
                chosen[m.name] = m
                if len(chosen) >= k:
                    break
        return list(chosen.values())

    # ------------------------------------------------------------------ push-pull

    def _push_pull_round(self, now: float) -> None:
        n = len(self._members)
        self._push_pull_timer = self._schedule(
            now + self.config.push_pull_scaled(n), self._push_pull_round
        )
        if self._leaving:
            return
        target = self._reconnect_target()
        if target is None:
            peers = self._random_members(1, lambda m: m.state == State.ALIVE)
            target = peers[0] if peers else None
        if target is not None:
            self._start_push_pull(target.addr, False, now)

    def _reconnect_target(self) -> Member | None:
        """Now and then exchange state with a member we think dead instead:
        after a partition both sides think the other dead and nothing else
        would ever cross. The chance grows with the share of dead members."""
        dead = [
            m
            for n in self._dead_since
            if (m := self._members.get(n)) is not None and m.state == State.DEAD
        ]
        if not dead:
            return None
        if self._rng.random() * (len(dead) + self.num_active()) >= len(dead):
            return None
        return self._rng.choice(dead)

    def _start_push_pull(self, addr: Addr, join: bool, now: float) -> int:
        frame = self._seal_stream(self._local_state(join), now)
        self._count("push_pulls")
        return self._stream(
            "join" if join else "push_pull", join, addr, frame, now + self.config.tcp_timeout
        )

    def _local_state(self, join: bool) -> wire.PushPull:
        states = [
            wire.MemberState(m.name, m.addr[0], m.addr[1], m.meta, m.incarnation, int(m.state))
            for m in self._members.values()
        ]
        return wire.PushPull(join, states, self.delegate.local_state(join))

    def _merge_remote(self, msg: wire.PushPull, now: float) -> None:
        members = self._members
        for st in msg.members:
            m = members.get(st.name)
            if m is not None and m.incarnation == st.incarnation and m.state == st.state:
                continue  # nothing new: the common case in a settled cluster
            if st.state == State.ALIVE:
                self._alive(wire.Alive(st.incarnation, st.name, st.host, st.port, st.meta), now)
            elif st.state == State.LEFT:
                self._dead(wire.Dead(st.incarnation, st.name, st.name), now)
            else:
                # A remote "dead" becomes our suspicion: the member gets its
                # chance to refute before we agree.
                self._suspect(wire.Suspect(st.incarnation, st.name, self.name), now)
        if msg.app_state:
            self.delegate.merge_remote_state(msg.app_state, msg.join)

    # ------------------------------------------------------------------ reaping

    def _reap_round(self, now: float) -> None:
        self._schedule(now + self._reap_period(), self._reap_round)
        cutoff = now - self.config.dead_reap_time
        gone = [n for n, since in self._dead_since.items() if since <= cutoff]
        for n in gone:
            del self._dead_since[n]
            m = self._members.get(n)
            if m is None or m.state < State.DEAD:
                continue
            del self._members[n]
            self._coords.pop(n, None)
            self._vivaldi.forget(n)
            self._count("reaped")

    # ------------------------------------------------------------------ messages

    def _on_ping(self, msg: wire.Ping, addr: Addr, now: float) -> None:
        if msg.target != self.name:
            self._count("dropped.wrong_target")
            return
        self._send(addr, [wire.encode_message(wire.Ack(msg.seq, self._coord_wire))], now)

    def _on_indirect_ping(self, msg: wire.IndirectPing, addr: Addr, now: float) -> None:
        if self._relays >= MAX_RELAYS:
            self._count("dropped.relay_limit")
            return
        self._seq = seq = (self._seq + 1) & 0xFFFFFFFF
        relay = _Relay(addr, msg.seq)
        self._acks[seq] = relay
        self._relays += 1
        self._send(
            (msg.host, msg.port), [wire.encode_message(wire.Ping(seq, msg.target, self.name))], now
        )
        timeout = self.config.probe_timeout
        if msg.nack:
            relay.nack_timer = self._schedule(now + timeout, self._relay_nack, seq)
        else:
            relay.nack_timer = self._schedule(now + timeout, self._relay_expire, seq)

    def _relay_nack(self, now: float, seq: int) -> None:
        relay = self._acks.get(seq)
        if type(relay) is _Relay:
            del self._acks[seq]
            self._relays -= 1
            self._send(relay.requester, [wire.encode_message(wire.Nack(relay.seq))], now)

    def _relay_expire(self, now: float, seq: int) -> None:
        if type(self._acks.get(seq)) is _Relay:
            del self._acks[seq]
            self._relays -= 1

    def _on_ack(self, msg: wire.Ack, addr: Addr, now: float) -> None:
        handler = self._acks.get(msg.seq)
        if handler is None:
            self._count("dropped.unexpected_ack")
            return
        if type(handler) is _Relay:
            del self._acks[msg.seq]
            self._relays -= 1
            self._cancel(handler.nack_timer)
            self._send(handler.requester, [wire.encode_message(wire.Ack(handler.seq, None))], now)
            return
        probe: _Probe = handler  # type: ignore[assignment]
        if probe.acked:
            return
        probe.acked = True
        self._cancel(probe.timeout_timer)
        if probe.expected_nacks == 0:
            self._awareness.apply(-1)  # a prompt direct ack: we are healthy
        if msg.coord is not None and addr == probe.addr:
            self._observe_rtt(probe.target, msg.coord, now - probe.sent)

    def _observe_rtt(self, name: str, coord_wire: tuple[Any, ...], rtt: float) -> None:
        try:
            other = Coordinate.from_wire(coord_wire)
            self._vivaldi.update(name, other, rtt)
        except ValueError:
            self._count("dropped.bad_coordinate")
            return
        self._coords[name] = other
        self._coord_wire = self._vivaldi.coordinate.to_wire()

    def _on_nack(self, msg: wire.Nack, addr: Addr, now: float) -> None:
        handler = self._acks.get(msg.seq)
        if type(handler) is _Probe:
            handler.nacks += 1

    def _on_user(self, msg: wire.User, addr: Addr, now: float) -> None:
        self._count("user_msgs_in")
        if self.delegate.notify_user_msg(msg.payload):
            self._queue(wire.encode_message(msg), None)

    def _on_alive_msg(self, msg: wire.Alive, addr: Addr, now: float) -> None:
        self._alive(msg, now)

    def _on_suspect_msg(self, msg: wire.Suspect, addr: Addr, now: float) -> None:
        self._suspect(msg, now)

    def _on_dead_msg(self, msg: wire.Dead, addr: Addr, now: float) -> None:
        self._dead(msg, now)

    # ------------------------------------------------------------------ state machine

    def _alive(self, a: wire.Alive, now: float) -> None:
        name = a.node
        addr = (a.host, a.port)
        if name == self.name:
            me = self._members[name]
            if a.incarnation < self._incarnation or self._leaving:
                return
            if a.incarnation == self._incarnation and addr == me.addr and a.meta == me.meta:
                return  # our own news, echoed back
            self._refute(a.incarnation, now)
            return
        m = self._members.get(name)
        if m is None:
            if len(self._members) >= self.config.max_members:
                self._count("dropped.member_limit")
                return
            new = Member(name, addr, a.meta, a.incarnation, State.ALIVE, now)
            self._members[name] = new
            self._probe_list.append(name)
            self._broadcast(a, name)
            self._event(EventKind.JOIN, new, now)
            return
        if m.addr != addr and m.state <= State.SUSPECT:
            self._count("name_conflicts")  # someone else claims a live member's name
            return
        if a.incarnation <= m.incarnation and not (m.state >= State.DEAD and m.addr != addr):
            return
        self._clear_suspicion(name)
        old = m.state
        new = Member(
            name,
            addr,
            a.meta,
            a.incarnation,
            State.ALIVE,
            m.state_change if old == State.ALIVE else now,
        )
        self._members[name] = new
        self._broadcast(a, name)
        if old == State.LEFT:
            self._event(EventKind.JOIN, new, now)
        elif old != State.ALIVE:
            self._event(EventKind.RECOVER, new, now)
        elif m.meta != a.meta or m.addr != addr:
            self._event(EventKind.UPDATE, new, now)

    def _suspect(self, s: wire.Suspect, now: float) -> None:
        name = s.node
        m = self._members.get(name)
        if m is None or s.incarnation < m.incarnation:
            return
        if name == self.name:
            if not self._leaving:
                self._refute(s.incarnation, now)
            return
        held = self._suspicions.get(name)
        if held is not None and m.state == State.SUSPECT:
            susp, timer = held
            if s.incarnation == susp.incarnation and susp.confirm(s.source):
                self._cancel(timer)
                timer = self._schedule(susp.deadline, self._suspicion_expired, name, susp)
                self._suspicions[name] = (susp, timer)
                self._count("suspicion_confirmations")
                self._broadcast(s, name)
            return
        if m.state != State.ALIVE:
            return
        new = m.evolve(incarnation=s.incarnation, state=State.SUSPECT, state_change=now)
        self._members[name] = new
        n = len(self._members)
        k = (
            self.config.suspicion_confirmations
            if n - 2 >= self.config.suspicion_confirmations
            else 0
        )
        min_t = self.config.suspicion_min(n)
        max_t = min_t * self.config.suspicion_max_timeout_mult
        susp = Suspicion(s.incarnation, s.source, k, min_t, max_t, now)
        timer = self._schedule(susp.deadline, self._suspicion_expired, name, susp)
        self._suspicions[name] = (susp, timer)
        self._count("suspicions")
        self._broadcast(s, name)
        self._event(EventKind.SUSPECT, new, now)

    def _suspicion_expired(self, now: float, name: str, susp: Suspicion) -> None:
        held = self._suspicions.get(name)
        if held is None or held[0] is not susp:
            return
        m = self._members.get(name)
        if m is None or m.state != State.SUSPECT or m.incarnation != susp.incarnation:
            return
        self._dead(wire.Dead(m.incarnation, name, self.name), now)

    def _dead(self, d: wire.Dead, now: float) -> None:
        name = d.node
        m = self._members.get(name)
        if m is None or d.incarnation < m.incarnation:
            return
        if name == self.name:
            if not self._leaving:
                self._refute(d.incarnation, now)
            return
        if m.state >= State.DEAD:
            return
        self._clear_suspicion(name)
        left = d.source == name
        new = m.evolve(
            incarnation=d.incarnation, state=State.LEFT if left else State.DEAD, state_change=now
        )
        self._members[name] = new
        self._dead_since[name] = now
        self._count("leaves" if left else "deaths")
        self._broadcast(d, name)
        self._event(EventKind.LEAVE if left else EventKind.DEAD, new, now)

    def _refute(self, incarnation: int, now: float) -> None:
        self._incarnation = max(self._incarnation, incarnation) + 1
        me = self._members[self.name]
        self._members[self.name] = me.evolve(incarnation=self._incarnation)
        self._awareness.apply(1)
        self._count("refutations")
        self._broadcast_self()

    def _broadcast_self(self) -> None:
        host, port = self.addr
        self._broadcast(wire.Alive(self._incarnation, self.name, host, port, self._meta), self.name)

    def _clear_suspicion(self, name: str) -> None:
        held = self._suspicions.pop(name, None)
        if held is not None:
            self._cancel(held[1])

    # ------------------------------------------------------------------ plumbing

    def _broadcast(self, msg: Any, key: str) -> None:
        self._queue(wire.encode_message(msg), key)

    def _queue(self, data: bytes, key: str | None) -> None:
        self._bq.queue(data, key)
        if self._gossip_timer is None:
            # First news after a quiet spell: gossip within one interval,
            # at a random phase so members do not synchronise.
            delay = self._rng.random() * self.config.gossip_interval
            self._gossip_timer = self._schedule(self._now + delay, self._gossip_round)

    def _event(self, kind: EventKind, member: Member, now: float) -> None:
        self._events.append(MemberEvent(kind, member, now))

    def _count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    def _send(self, addr: Addr, msgs: list[bytes], now: float) -> None:
        """Send messages in one datagram, filling the rest with broadcasts."""
        room = self._budget - sum(len(x) for x in msgs)
        if room > 16 and len(self._bq):
            msgs = msgs + self._bq.take(room, self.config.retransmit_limit(len(self._members)))
        self._emit(addr, wire.encode_packet(msgs), now + self.wall_offset)

    def _emit(self, addr: Addr, packet: bytes, wall: float) -> None:
        data = self._sealer.seal(packet, wall)
        self._packets.append((addr, data))
        stats = self.stats
        stats["packets_out"] = stats.get("packets_out", 0) + 1
        stats["bytes_out"] = stats.get("bytes_out", 0) + len(data)

    def _seal_stream(self, msg: Any, now: float) -> bytes:
        return self._sealer.seal(wire.encode_stream(msg), now + self.wall_offset, stream=True)

    def _stream(self, kind: str, ctx: Any, addr: Addr, data: bytes, deadline: float) -> int:
        token = next(self._tokens)
        self._pending_streams[token] = (kind, ctx)
        self._streams.append(StreamRequest(token, addr, data, deadline, kind))
        return token
