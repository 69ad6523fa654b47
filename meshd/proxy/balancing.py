"""Load-balancing policies for the service proxy: pure, no IO, time and randomness as inputs.

A proxy holds one policy per service. The replica set changes under it
(``update``), it asks for a replica per connection or request (``pick``) and
reports each request's start and end (``on_start``/``on_finish``) so the
load-aware policies can steer away from busy or slow replicas.

Per-endpoint state is keyed by endpoint id: a replica that stays across an
``update`` keeps its counters, one that leaves loses them, so a replica that
comes back starts fresh instead of inheriting stale load. Reports about
endpoints that are no longer in the set are ignored (their requests may
still be finishing when the set changes).

Everything is deterministic given the ``random.Random`` handed to
``make_policy`` and the ``now`` values passed in, so every proxy behaves the
same under test and a hash policy maps a key to the same replica on every
node that sees the same replica set.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "EWMA_DECAY_S",
    "POLICIES",
    "Endpoint",
    "PickContext",
    "Policy",
    "make_policy",
]

EWMA_DECAY_S = 10.0
"""Time constant of the latency estimate, as in Finagle's and Linkerd's peak EWMA."""

DEFAULT_RTT_S = 0.05
"""Latency assumed for a replica when no replica has been measured yet."""

FAILURE_PENALTY_S = 1.0
"""Least latency charged for a failed request, so a replica that fails fast does not look fast."""

HASH_VNODES = 64
"""Ring points per unit of weight: enough to spread keys within a few percent."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One replica the proxy may send traffic to."""

    id: str
    node: str
    address: str
    port: int
    weight: int = 1

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("endpoint id must not be empty")
        if (
            isinstance(self.port, bool)
            or not isinstance(self.port, int)
            or not 0 < self.port < 65536
        ):
            raise ValueError(f"endpoint {self.id}: port must be 1..65535, got {self.port!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, int) or self.weight < 1:
            raise ValueError(
                f"endpoint {self.id}: weight must be an integer >= 1, got {self.weight!r}"
            )


def _no_rtt(node: str) -> float | None:
    return None


class PickContext:
    """What a policy may know about the request being placed.

    A plain slotted class rather than a frozen dataclass: the proxy builds
    one per request, and a frozen dataclass's ``__init__`` costs several
    times more. Policies only read it.
    """

    __slots__ = ("client", "hash_key", "local_node", "now", "rtt")

    def __init__(
        self,
        client: str,
        hash_key: str | None = None,
        local_node: str = "",
        rtt: Callable[[str], float | None] = _no_rtt,
        now: float = 0.0,
    ) -> None:
        self.client = client
        self.hash_key = hash_key
        self.local_node = local_node
        self.rtt = rtt
        self.now = now


class Policy(Protocol):
    """The interface the proxy drives; see the module docstring for the contract."""

    name: str
    dropped_samples: int  # latency reports refused as malformed

    def update(self, endpoints: Sequence[Endpoint]) -> None: ...

    def pick(self, ctx: PickContext) -> Endpoint | None: ...

    def on_start(self, ep: Endpoint) -> None: ...

    def on_finish(self, ep: Endpoint, latency_s: float, ok: bool, now: float) -> None: ...

    def outstanding(self, endpoint_id: str) -> int: ...

    def tracked_ids(self) -> frozenset[str]: ...


@dataclass(slots=True)
class _State:
    outstanding: int = 0
    cost: float | None = None  # peak-EWMA latency estimate, None until measured
    stamp: float = 0.0  # `now` of the last measurement
    current: int = 0  # smooth weighted round robin counter


class _Base:
    """Endpoint bookkeeping shared by every policy."""

    name = ""
    observes = False
    """Learns from latency (``_observe``); the others skip the sample."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._eps: list[Endpoint] = []
        self._state: dict[str, _State] = {}
        self._cursor = 0
        self.dropped_samples = 0

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return tuple(self._eps)

    def tracked_ids(self) -> frozenset[str]:
        """Ids that hold per-endpoint state; exactly the current set."""
        return frozenset(self._state)

    def outstanding(self, endpoint_id: str) -> int:
        st = self._state.get(endpoint_id)
        return st.outstanding if st else 0

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        eps = list(endpoints)
        ids = [ep.id for ep in eps]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"duplicate endpoint ids: {', '.join(dup)}")
        self._eps = eps
        self._state = {i: self._state.get(i) or _State() for i in ids}
        self._cursor = self._cursor % len(eps) if eps else 0
        self._rebuild()

    def _rebuild(self) -> None:
        """Hook for policies with structures derived from the endpoint set."""

    def on_start(self, ep: Endpoint) -> None:
        st = self._state.get(ep.id)
        if st is not None:
            st.outstanding += 1

    def on_finish(self, ep: Endpoint, latency_s: float, ok: bool, now: float) -> None:
        st = self._state.get(ep.id)
        if st is None:
            return
        if st.outstanding:
            st.outstanding -= 1
        if not self.observes:
            return
        if not math.isfinite(latency_s) or latency_s < 0 or not math.isfinite(now):
            self.dropped_samples += 1
            return
        self._observe(st, latency_s, ok, now)

    def _observe(self, st: _State, latency_s: float, ok: bool, now: float) -> None:
        """Hook for policies that learn from latency."""

    def pick(self, ctx: PickContext) -> Endpoint | None:
        if not self._eps:
            return None
        return self._pick(ctx)

    def _pick(self, ctx: PickContext) -> Endpoint:
        raise NotImplementedError

    def _next_among(self, allowed: Callable[[int], bool]) -> Endpoint:
        """Round robin restricted to the indices `allowed` accepts (at least one must be)."""
        n = len(self._eps)
        for step in range(n):
            i = (self._cursor + step) % n
            if allowed(i):
                self._cursor = (i + 1) % n
                return self._eps[i]
        raise AssertionError("no endpoint allowed")


class RoundRobin(_Base):
    name = "round_robin"

    def pick(self, ctx: PickContext) -> Endpoint | None:
        # The default policy, once per request: one call rather than two.
        eps = self._eps
        if not eps:
            return None
        i = self._cursor
        self._cursor = (i + 1) % len(eps)
        return eps[i]


class LeastConn(_Base):
    name = "least_conn"

    def _pick(self, ctx: PickContext) -> Endpoint:
        least = min(self._state[ep.id].outstanding for ep in self._eps)
        return self._next_among(lambda i: self._state[self._eps[i].id].outstanding == least)


class Random(_Base):
    name = "random"

    def _pick(self, ctx: PickContext) -> Endpoint:
        return self._eps[self._rng.randrange(len(self._eps))]


class _TwoChoices(_Base):
    """Power of two choices: nearly as good as the global minimum without herding onto it."""

    def _load(self, ep: Endpoint, now: float) -> float:
        raise NotImplementedError

    def _pick(self, ctx: PickContext) -> Endpoint:
        if len(self._eps) == 1:
            return self._eps[0]
        a, b = (self._eps[i] for i in self._rng.sample(range(len(self._eps)), 2))
        return b if self._load(b, ctx.now) < self._load(a, ctx.now) else a


class P2C(_TwoChoices):
    name = "p2c"

    def _load(self, ep: Endpoint, now: float) -> float:
        return self._state[ep.id].outstanding


class PeakEwma(_TwoChoices):
    """Peak-EWMA latency x (outstanding + 1), choosing between two random replicas.

    A slower sample replaces the estimate at once (peak), faster ones pull it
    down with weight exp(-dt / 10 s); between samples the estimate decays
    toward zero, so a replica that was slow gets probed again later.
    """

    name = "ewma"
    observes = True

    def _decayed(self, st: _State, now: float) -> float | None:
        if st.cost is None:
            return None
        return st.cost * math.exp(-max(0.0, now - st.stamp) / EWMA_DECAY_S)

    def _prior(self, now: float) -> float:
        # The mean of measured peers: a new replica neither wins all traffic
        # (as a zero would) nor starves (as a pessimistic guess would).
        known = [c for st in self._state.values() if (c := self._decayed(st, now)) is not None]
        return sum(known) / len(known) if known else DEFAULT_RTT_S

    def _load(self, ep: Endpoint, now: float) -> float:
        st = self._state[ep.id]
        cost = self._decayed(st, now)
        if cost is None:
            cost = self._prior(now)
        return cost * (st.outstanding + 1)

    def _observe(self, st: _State, latency_s: float, ok: bool, now: float) -> None:
        if not ok:
            latency_s = max(latency_s, FAILURE_PENALTY_S)
        if st.cost is None or latency_s > st.cost:
            st.cost = latency_s
        else:
            w = math.exp(-max(0.0, now - st.stamp) / EWMA_DECAY_S)
            st.cost = st.cost * w + latency_s * (1.0 - w)
        st.stamp = max(st.stamp, now)


def _hash64(data: str) -> int:
    # Stable across processes and runs, unlike hash(): every proxy must agree.
    return int.from_bytes(hashlib.blake2b(data.encode(), digest_size=8).digest(), "big")


class ConsistentHash(_Base):
    """Ring of virtual nodes: when a replica leaves, only the keys it held move."""

    name = "hash"

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self._points: list[int] = []
        self._owners: list[Endpoint] = []

    def _rebuild(self) -> None:
        ring = sorted(
            (_hash64(f"{ep.id}#{v}"), ep.id, ep)
            for ep in self._eps
            for v in range(HASH_VNODES * ep.weight)
        )
        self._points = [h for h, _, _ in ring]
        self._owners = [ep for _, _, ep in ring]

    def _pick(self, ctx: PickContext) -> Endpoint:
        key = ctx.hash_key if ctx.hash_key is not None else ctx.client
        i = bisect.bisect_left(self._points, _hash64(key))
        return self._owners[i % len(self._owners)]


class SmoothWeighted(_Base):
    """nginx's smooth weighted round robin: exact shares per cycle, no bursts."""

    name = "weighted"

    def _pick(self, ctx: PickContext) -> Endpoint:
        total = 0
        best: Endpoint | None = None
        best_st: _State | None = None
        for ep in self._eps:
            st = self._state[ep.id]
            st.current += ep.weight
            total += ep.weight
            if best_st is None or st.current > best_st.current:
                best, best_st = ep, st
        assert best is not None and best_st is not None
        best_st.current -= total
        return best


class LocalFirst(_Base):
    """Replicas on the local node, else those on the nearest node by RTT, round robin among them."""

    name = "local_first"

    def _pick(self, ctx: PickContext) -> Endpoint:
        eps = self._eps
        if any(ep.node == ctx.local_node for ep in eps):
            return self._next_among(lambda i: eps[i].node == ctx.local_node)
        rtts: dict[str, float] = {}
        for node in {ep.node for ep in eps}:
            r = ctx.rtt(node)
            if r is not None and math.isfinite(r) and r >= 0:
                rtts[node] = r
        if not rtts:
            return self._next_among(lambda i: True)
        best = min(rtts.values())
        return self._next_among(lambda i: rtts.get(eps[i].node) == best)


_CLASSES: dict[str, type[_Base]] = {
    cls.name: cls
    for cls in (
        RoundRobin,
        LeastConn,
        Random,
        P2C,
        PeakEwma,
        ConsistentHash,
        SmoothWeighted,
        LocalFirst,
    )
}

POLICIES: tuple[str, ...] = tuple(_CLASSES)


def make_policy(name: str, rng: random.Random) -> Policy:
    """Build the policy a service's spec names."""
    cls = _CLASSES.get(name)
    if cls is None:
        raise ValueError(f"unknown balancing policy {name!r}; valid: {', '.join(POLICIES)}")
    return cls(rng)
