"""One service port's traffic decisions: its policy, its outlier ejection, its endpoints.

The L4 and L7 proxies ask a ``Router`` for a replica per connection or
request and tell it how each one went. Ejected replicas are taken out of the
set the policy sees and put back when their time is up; a pick can exclude
replicas already tried (a retry goes to another one when there is another).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Container

from meshd.spec import Balance

from .balancing import Endpoint, PickContext, make_policy
from .outlier import OutlierConfig, OutlierDetector

__all__ = ["Router"]

_CONTEXT_FREE = frozenset({"round_robin", "least_conn", "random", "p2c", "weighted"})
"""Policies whose pick reads nothing of the request (client, key, node, time)."""


class Router:
    def __init__(
        self,
        service: str,
        port: str,
        balance: Balance,
        *,
        local_node: str = "",
        rtt: Callable[[str], float | None] = lambda node: None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        outlier: OutlierConfig | None = None,
    ) -> None:
        self.service = service
        self.port = port
        self.balance = balance
        self.policy = make_policy(balance.policy, rng or random.Random())
        self._blind = balance.policy in _CONTEXT_FREE
        self.hashing = balance.policy == "hash"
        """Picks need the request's hash key."""
        self._blind_ctx = PickContext("")
        self.outliers = OutlierDetector(outlier)
        self.local_node = local_node
        self.rtt = rtt
        self.clock = clock
        self.endpoints: tuple[Endpoint, ...] = ()
        self.active: tuple[Endpoint, ...] = ()
        """``endpoints`` less the ejected ones: what the policy picks from."""
        self._recheck = math.inf

    def set_endpoints(self, endpoints: tuple[Endpoint, ...]) -> None:
        if endpoints == self.endpoints:
            return
        self.endpoints = endpoints
        self.outliers.update(ep.id for ep in endpoints)
        self._apply(self.clock())

    def _apply(self, now: float) -> None:
        ejected = self.outliers.ejected(now)
        # Every replica ejected (a service of one): better to try them than refuse all.
        self.active = tuple(ep for ep in self.endpoints if ep.id not in ejected) or self.endpoints
        self.policy.update(self.active)
        back = self.outliers.next_return(now)
        self._recheck = math.inf if back is None else back

    def pick(
        self,
        client: str,
        hash_key: str | None = None,
        exclude: Container[str] = (),
        now: float | None = None,
    ) -> Endpoint | None:
        if now is None:
            now = self.clock()
        if now >= self._recheck:
            self._apply(now)
        if self._blind:
            ctx = self._blind_ctx  # the policy reads nothing from it: no new one per pick
        else:
            ctx = PickContext(client, hash_key, self.local_node, self.rtt, now)
        ep = self.policy.pick(ctx)
        if ep is None or ep.id not in exclude:
            return ep
        for _ in range(len(self.active)):
            ep = self.policy.pick(ctx)
            if ep is not None and ep.id not in exclude:
                return ep
        return next((e for e in self.active if e.id not in exclude), None)

    def begin(self, ep: Endpoint) -> None:
        self.policy.on_start(ep)

    def end(self, ep: Endpoint, latency_s: float, ok: bool, now: float | None = None) -> None:
        """One connection or request to ``ep`` finished; ``ok`` False counts toward ejection."""
        if now is None:
            now = self.clock()
        self.policy.on_finish(ep, latency_s, ok, now)
        if (not ok or self.outliers.watching) and self.outliers.on_result(ep.id, ok, now):
            self._apply(now)
