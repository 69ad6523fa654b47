"""Lease election on the network: the IO shell around ``lease.Voter`` and
``lease.Candidate``.

Every agent is a voter for every service and, for the services whose
rendezvous candidate it is, a candidate. Requests travel over ``meshd.rpc``
(sealed with the cluster key), batched: one call per voter and tick carries
every service this node bids for or renews.

The voter set is the cluster's *registered* nodes (``node/<name>`` keys in
the replicated store, removed only by a graceful leave or ``meshd members
remove``), not the live membership: a dead node still counts, so a minority
side of a partition can never make a majority. Requests carry a digest of
the candidate's voter set, and a voter whose own view differs refuses: two
majorities computed over different sets could otherwise miss each other
while a join or removal spreads. What this guarantees, and what not: any
majority of a set and any majority of that set plus or minus one node share
a node (the argument behind Raft's single-server membership changes), so
changes that happen one node at a time -- each spreads through the store
in well under a second -- never allow two leaders. Several nodes joining or
being removed within the same second could, in principle, leave two voter
views that differ by two or more nodes at once; there is no joint
consensus here. Operators add or remove nodes one at a time (``meshd
members remove`` says so too).

Voter state (the highest term granted per service) is written to disk,
atomically and synced, before any grant that raised it leaves the node;
renewals in the same term write nothing.

Stickiness: a candidate that learns from a refusal who holds the lease, and
sees that holder alive, does not bid again until the holder dies or the hint
ages out; a leader that is no longer the rendezvous choice (a node joined)
keeps leading while it is alive. Leadership moves only when it must.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshd.aio import wait_event
from meshd.rpc import Rpc, RpcError
from meshd.scheduler.lease import Candidate, LeaseReply, LeaseRequest, Voter, candidate

__all__ = ["ElectionConfig", "Elector", "LeasePeriod", "voter_digest"]

log = logging.getLogger(__name__)

METHOD = "lease"
MAX_HISTORY = 1000
"""Lease periods kept (in memory and on disk) for ``leases()``."""
HISTORY_WRITE_INTERVAL = 0.2
"""Seconds between writes of the lease history while it changes."""


@dataclass(frozen=True, slots=True)
class ElectionConfig:
    duration: float = 2.0
    """Lease length. Bounds how long a service goes without a leader after
    its leader dies (the voters hold its lease up to duration x 1.1), so it
    is a direct term of the failover time; two seconds leave several renewal
    attempts (every retry_interval) inside each lease on a LAN."""
    renew_fraction: float = 0.5
    """Renew halfway through: half a lease of slack for lost rounds."""
    retry_interval: float = 0.2
    """Between bids and renewal attempts that got no majority."""
    tick: float = 0.05
    """How often the elector looks at its services (bids, renewals, expiry)."""
    call_timeout: float = 1.0
    """A vote that takes longer than this is lost; the next round retries."""
    holder_hint_ttl: float | None = None
    """How long a refusal naming a live holder keeps us from bidding; None
    means one lease duration: a voter's lease for a bidder that never won
    lapses within about that, and a real leader is met again at the next bid."""
    drift_margin: float = 0.1
    """Voters hold a lease 10% longer than asked: see lease.py on drift."""


@dataclass(slots=True)
class LeasePeriod:
    """One stretch of leadership as the leader saw it, in wall-clock seconds:
    the record that lets a test check no two leases ever overlapped."""

    service: str
    term: int
    start: float
    until: float


def voter_digest(voters: Iterable[str]) -> str:
    blob = "\0".join(sorted(set(voters))).encode()
    return hashlib.blake2b(blob, digest_size=8).hexdigest()


class Elector:
    """Bids, renews and votes for service leases on one node."""

    def __init__(
        self,
        node: str,
        rpc: Rpc,
        *,
        state_path: Path,
        voters: Callable[[], list[str]],
        alive: Callable[[], list[str]],
        services: Callable[[], Iterable[str]],
        term_hint: Callable[[str], int] = lambda service: 0,
        on_change: Callable[[str, bool], None] = lambda service, leading: None,
        config: ElectionConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.node = node
        self.rpc = rpc
        self.config = config or ElectionConfig()
        self.state_path = state_path
        self._voters_fn = voters
        self._alive_fn = alive
        self._services_fn = services
        self._term_hint = term_hint
        self._on_change = on_change
        self._clock = clock
        self._wall = wall
        self.voter = self._load_voter()
        self._persisted = dict(self.voter.snapshot()["highest_terms"])
        self._cands: dict[str, Candidate] = {}
        self._leading: dict[str, int] = {}
        self._next_try: dict[str, float] = {}
        self._holders: dict[str, tuple[str, float]] = {}
        self._inflight: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.history: list[LeasePeriod] = []
        self._open: dict[str, LeasePeriod] = {}
        self.history_path = state_path.with_name("lease-history.json")
        self._earlier = self._load_history()
        """Periods recorded by this node's earlier processes (a crash included)."""
        self._history_dirty = False
        self._history_written = -math.inf
        self.stats: dict[str, int] = {
            "bids": 0,
            "renewals": 0,
            "gained": 0,
            "lost": 0,
            "grants": 0,
            "refusals": 0,
            "persist_errors": 0,
            "vote_errors": 0,
        }
        rpc.register(METHOD, self._handle_votes)

    # ------------------------------------------------------------ public

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        self._history_written = -math.inf
        self._write_history(self._clock())
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._inflight):
            task.cancel()
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)

    def poke(self) -> None:
        """Look again now (membership or services changed)."""
        self._wake.set()

    def leading_term(self, service: str) -> int | None:
        """The fence term while this node holds a valid lease, else None."""
        cand = self._cands.get(service)
        if cand is not None and cand.is_leader(self._clock()):
            return cand.fence()
        return None

    def lease_remaining(self, service: str) -> float:
        cand = self._cands.get(service)
        return max(0.0, cand.valid_until - self._clock()) if cand is not None else 0.0

    def known_holder(self, service: str) -> str | None:
        if self.leading_term(service) is not None:
            return self.node
        hint = self._holders.get(service)
        return hint[0] if hint is not None else None

    def leases(self) -> list[dict[str, Any]]:
        """Every leadership period this node has had, oldest first: those of
        earlier runs (from disk; a run that crashed may miss its last
        ``HISTORY_WRITE_INTERVAL`` of extensions) and this run's."""
        return self._earlier + self._current()

    def _current(self) -> list[dict[str, Any]]:
        return [
            {"service": p.service, "term": p.term, "start": p.start, "until": p.until}
            for p in [*self.history, *self._open.values()]
        ]

    def _load_history(self) -> list[dict[str, Any]]:
        try:
            data = json.loads(self.history_path.read_text())
        except (OSError, ValueError):
            return []
        if not isinstance(data, list):
            return []
        keys = {"service": str, "term": int, "start": float, "until": float}
        out = []
        for item in data[-MAX_HISTORY:]:
            if isinstance(item, dict) and all(
                isinstance(item.get(k), t) or (t is float and isinstance(item.get(k), int))
                for k, t in keys.items()
            ):
                out.append({k: item[k] for k in keys})
        return out

    def _write_history(self, now: float) -> None:
        """Throttled, not synced: a record for people and tests, not for safety."""
        if not self._history_dirty or now - self._history_written < HISTORY_WRITE_INTERVAL:
            return
        self._history_dirty = False
        self._history_written = now
        tmp = self.history_path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps((self._earlier + self._current())[-MAX_HISTORY:]))
            os.replace(tmp, self.history_path)
        except OSError as exc:
            log.warning("cannot write %s: %s", self.history_path, exc)

    # ------------------------------------------------------------ the loop

    async def _run(self) -> None:
        while True:
            try:
                self._step()
            except Exception:
                log.exception("election step failed")
            self._wake.clear()
            await wait_event(self._wake, self.config.tick)

    def _step(self) -> None:
        now = self._clock()
        cfg = self.config
        voters = sorted(set(self._voters_fn()) | {self.node})
        alive = self._alive_fn()
        alive_set = set(alive)
        digest = voter_digest(voters)
        outgoing: dict[str, list[list[Any]]] = {}
        services = set(self._services_fn())
        for service in sorted(services | set(self._cands)):
            cand = self._cands.get(service)
            leading = cand is not None and cand.is_leader(now)
            self._note_leadership(service, cand, leading, now)
            if service not in services:
                if not leading:
                    self._cands.pop(service, None)
                    self._next_try.pop(service, None)
                continue
            if leading:
                assert cand is not None
                if cand.renew_due(now):
                    self.stats["renewals"] += 1
                    self._queue(outgoing, cand.start(cand.term, voters, now), digest)
                continue
            if candidate(service, alive) != self.node:
                continue
            hint = self._holders.get(service)
            if hint is not None:
                holder, seen = hint
                ttl = cfg.duration if cfg.holder_hint_ttl is None else cfg.holder_hint_ttl
                if now - seen > ttl or holder not in alive_set:
                    del self._holders[service]
                elif holder != self.node:
                    continue
            if now < self._next_try.get(service, -1.0):
                continue
            if cand is None:
                cand = self._cands[service] = Candidate(
                    self.node,
                    service,
                    cfg.duration,
                    renew_fraction=cfg.renew_fraction,
                    retry_interval=cfg.retry_interval,
                )
            term = max(cand.next_term(), self._term_hint(service) + 1)
            self.stats["bids"] += 1
            self._next_try[service] = now + cfg.retry_interval
            self._queue(outgoing, cand.start(term, voters, now), digest)
        for voter, reqs in outgoing.items():
            self._spawn(self._ask(voter, reqs))
        self._write_history(now)

    def _queue(
        self,
        outgoing: dict[str, list[list[Any]]],
        pairs: list[tuple[str, LeaseRequest]],
        digest: str,
    ) -> None:
        for voter, req in pairs:
            outgoing.setdefault(voter, []).append(
                [req.service, req.candidate, req.term, req.duration, req.round, digest]
            )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _ask(self, voter: str, reqs: list[list[Any]]) -> None:
        try:
            body = await self.rpc.call(voter, METHOD, reqs, timeout=self.config.call_timeout)
        except RpcError as exc:
            self.stats["vote_errors"] += 1
            log.debug("lease votes from %s: %s", voter, exc)
            return
        if not isinstance(body, list) or len(body) != len(reqs):
            self.stats["vote_errors"] += 1
            return
        now = self._clock()
        for req, rep in zip(reqs, body, strict=True):
            try:
                granted, term, holder, reason, rnd = rep
                reply = LeaseReply(bool(granted), int(term), holder, str(reason), int(rnd))
            except (TypeError, ValueError):
                self.stats["vote_errors"] += 1
                continue
            service = req[0]
            cand = self._cands.get(service)
            if cand is None:
                continue
            if not reply.granted and isinstance(holder, str) and holder != self.node:
                self._holders[service] = (holder, now)
            was = cand.is_leader(now)
            cand.on_reply(voter, reply, now)
            if cand.is_leader(now) != was:
                self._note_leadership(service, cand, cand.is_leader(now), now)

    def _note_leadership(
        self, service: str, cand: Candidate | None, leading: bool, now: float
    ) -> None:
        wall = self._wall()
        if leading or service in self._leading:
            self._history_dirty = True
        if leading and cand is not None:
            until = wall + (cand.valid_until - now)
            period = self._open.get(service)
            if period is None or period.term != cand.term:
                if period is not None:
                    self.history.append(period)
                self._open[service] = LeasePeriod(service, cand.term, wall, until)
            else:
                period.until = until
            if self._leading.get(service) != cand.term:
                self._leading[service] = cand.term
                self._holders.pop(service, None)
                self.stats["gained"] += 1
                log.info("leading %s in term %d", service, cand.term)
                self._on_change(service, True)
        elif service in self._leading:
            del self._leading[service]
            period = self._open.pop(service, None)
            if period is not None:
                # Stepping down early (a voter reported a newer term) ends
                # the leadership now, before the lease would have run out.
                period.until = min(period.until, wall)
                self.history.append(period)
            self.stats["lost"] += 1
            log.info("no longer leading %s", service)
            self._on_change(service, False)
        del self.history[:-MAX_HISTORY]

    # ------------------------------------------------------------ voting

    def _handle_votes(self, caller: str, body: Any) -> list[list[Any]]:
        if not isinstance(body, list) or len(body) > 100_000:
            raise ValueError("lease votes must be a list")
        now = self._clock()
        voters = sorted(set(self._voters_fn()) | {self.node})
        digest = voter_digest(voters)
        replies: list[list[Any]] = []
        for item in body:
            if not (
                isinstance(item, list)
                and len(item) == 6
                and isinstance(item[0], str)
                and item[1] == caller
                and type(item[2]) is int
                and isinstance(item[3], (int, float))
                and type(item[4]) is int
            ):
                replies.append([False, 0, None, "bad request", 0])
                continue
            service, cand, term, duration, rnd, their_digest = item
            if their_digest != digest:
                self.stats["refusals"] += 1
                highest = self.voter.highest_term(service)
                replies.append(
                    [False, highest, self.voter.holder(service, now), "voter sets differ", rnd]
                )
                continue
            rep = self.voter.handle_request(
                LeaseRequest(service, cand, term, float(duration), rnd), now
            )
            self.stats["grants" if rep.granted else "refusals"] += 1
            replies.append([rep.granted, rep.term, rep.holder, rep.reason, rep.round])
        if not self._persist():
            # Never send a grant we could not make durable.
            replies = [[False, r[1], r[2], "cannot persist", r[4]] if r[0] else r for r in replies]
        return replies

    def _persist(self) -> bool:
        terms = self.voter.snapshot()["highest_terms"]
        if terms == self._persisted:
            return True
        tmp = self.state_path.with_suffix(".tmp")
        try:
            with open(tmp, "w") as f:
                json.dump({"highest_terms": terms}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.state_path)
        except OSError as exc:
            self.stats["persist_errors"] += 1
            log.error("cannot persist lease votes to %s: %s", self.state_path, exc)
            return False
        self._persisted = dict(terms)
        return True

    def _load_voter(self) -> Voter:
        cfg = self.config
        try:
            data = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return Voter(drift_margin=cfg.drift_margin, max_duration=cfg.duration)
        except (OSError, ValueError) as exc:
            # Unknown past grants: stay silent for a lease as if restored.
            log.error("lease vote state %s unreadable (%s); starting quiet", self.state_path, exc)
            data = {}
        try:
            return Voter.restore(
                data, self._clock(), drift_margin=cfg.drift_margin, max_duration=cfg.duration
            )
        except ValueError as exc:
            log.error("lease vote state %s invalid (%s); starting quiet", self.state_path, exc)
            return Voter.restore(
                {}, self._clock(), drift_margin=cfg.drift_margin, max_duration=cfg.duration
            )
