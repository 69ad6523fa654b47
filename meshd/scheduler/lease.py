"""Lease election per service: pure state machines, no IO, time as an input.

Each service has at most one leader at any real moment, the only node that
may write its placement. The pieces:

* ``candidate(service, alive)`` picks who should try, by rendezvous hashing:
  every node computes the same answer from the same membership, and when a
  member leaves only the services it led move.
* ``Voter`` (one per node, for every service) grants at most one unexpired
  lease per service at a time and never grants a term lower than one it has
  granted before. Each term is granted to at most one candidate.
* ``Candidate`` (one per node and service) asks every voter for a lease with
  a term and leads once a strict majority of the voter set granted the same
  term in the same round. Two majorities of one voter set always share a
  voter, and that voter refuses anyone else while the lease it granted is
  unexpired, so two leaders never overlap.

Time and drift. Every clock is local and only its *rate* matters (offsets
cancel out). The leader's own validity runs from when it *sent* the round's
requests: ``sent_at + duration`` on its clock. A voter receives the request
later and keeps the lease until ``now + duration * (1 + drift_margin)`` on
its own clock. The voter therefore outlasts the leader as long as the ratio
between any two nodes' clock rates is at most ``1 + drift_margin``: with the
default margin of 0.1, rates within about +-4.7% of true time (e.g. 0.953 to
1.047). Real hardware drifts by parts per million; the bound is for VMs that
pause and clocks that are slewed hard. Network delay needs no bound: a late
request only makes the voter hold the lease longer.

Terms. A voter remembers the highest term it has *granted* per service
(``snapshot()``), and the node must persist that before it sends a grant. A
refused request does not raise the term: a node that merely believes the
leader is dead cannot disturb a leader that still holds its majority. A
leader renews in the same term (a new round), so assignments keep one fence
while it leads; a new leader always takes a higher term, and agents accept
an assignment only if its term is not older than the newest they have seen
(``accept_assignment``). After a restart a voter cannot know how long ago its
leases were granted (monotonic clocks restart), so ``Voter.restore`` grants
nothing for one longest possible lease.

Quorum and small clusters. The voter set is the cluster's configured
members, dead ones included; only alive members are *candidates*. A strict
majority of N voters is ``N // 2 + 1``, so a two-node cluster needs both
nodes: when one dies, the survivor keeps running its workloads but takes no
lease and schedules nothing new. Likewise a minority side of a partition
keeps what it runs and schedules nothing. An operator restores quorum by
removing the dead member from the voter set (``meshd members remove NODE``),
after which the remaining nodes form a majority of the smaller set. Remove
only members known to be dead (a removed member that is in fact alive on the
other side of a partition could form a majority of the old set), and one at
a time.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_DRIFT_MARGIN = 0.1
"""Voters keep a lease 10% longer: tolerates clock-rate ratios up to 1.1."""

DEFAULT_RENEW_FRACTION = 0.5
"""A leader renews halfway through its lease, leaving half for retries."""


def _weight(service: str, member: str) -> tuple[int, str]:
    digest = hashlib.blake2b(service.encode() + b"\0" + member.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big"), member


def candidate(service: str, alive_members: Iterable[str]) -> str | None:
    """The member that should lead ``service``: highest rendezvous weight."""
    best = max((_weight(service, m) for m in alive_members), default=None)
    return None if best is None else best[1]


def ranked_candidates(service: str, alive_members: Iterable[str]) -> list[str]:
    """All members by rendezvous weight, best first: the order of takeover."""
    return [m for _, m in sorted((_weight(service, m) for m in alive_members), reverse=True)]


def majority(voter_count: int) -> int:
    """Grants needed from a voter set of this size (strict majority)."""
    return voter_count // 2 + 1


def accept_assignment(current_term_seen: int, assignment_term: int) -> bool:
    """Whether an agent applies an assignment: never one from an older term."""
    return assignment_term >= current_term_seen


@dataclass(frozen=True, slots=True)
class LeaseRequest:
    service: str
    candidate: str
    term: int
    duration: float
    round: int = 0
    """Echoed in the reply so a late grant from an older round never counts."""


@dataclass(frozen=True, slots=True)
class LeaseReply:
    granted: bool
    term: int
    """The highest term the voter has granted for the service."""
    holder: str | None
    """Who holds the voter's unexpired lease, if anyone."""
    reason: str = ""
    round: int = 0


@dataclass(slots=True)
class _Lease:
    holder: str
    term: int
    expires: float


class Voter:
    """One node's vote: one unexpired lease per service, terms never go back."""

    def __init__(
        self,
        drift_margin: float = DEFAULT_DRIFT_MARGIN,
        max_duration: float = 60.0,
    ) -> None:
        if drift_margin < 0 or max_duration <= 0:
            raise ValueError("drift_margin must be >= 0 and max_duration > 0")
        self.drift_margin = drift_margin
        self.max_duration = max_duration
        self._highest: dict[str, int] = {}
        self._leases: dict[str, _Lease] = {}
        self._quiet_until = -math.inf

    def snapshot(self) -> dict[str, Any]:
        """What must be persisted before a grant is sent."""
        return {"highest_terms": dict(self._highest)}

    @classmethod
    def restore(
        cls,
        data: dict[str, Any],
        now: float,
        drift_margin: float = DEFAULT_DRIFT_MARGIN,
        max_duration: float = 60.0,
    ) -> Voter:
        """A voter back from disk; silent for one longest lease, see module doc."""
        voter = cls(drift_margin=drift_margin, max_duration=max_duration)
        terms = data.get("highest_terms", {}) if isinstance(data, dict) else {}
        if not isinstance(terms, dict):
            raise ValueError("highest_terms must be a mapping")
        for service, term in terms.items():
            if not isinstance(service, str) or not isinstance(term, int) or term < 0:
                raise ValueError(f"bad highest term for {service!r}: {term!r}")
            voter._highest[service] = term
        voter._quiet_until = now + max_duration * (1 + drift_margin)
        return voter

    def highest_term(self, service: str) -> int:
        return self._highest.get(service, 0)

    def holder(self, service: str, now: float) -> str | None:
        lease = self._leases.get(service)
        return lease.holder if lease is not None and now < lease.expires else None

    def handle_request(self, req: LeaseRequest, now: float) -> LeaseReply:
        highest = self._highest.get(req.service, 0)
        lease = self._leases.get(req.service)
        if lease is not None and now >= lease.expires:
            lease = None
        holder = lease.holder if lease is not None else None

        def refuse(reason: str) -> LeaseReply:
            return LeaseReply(False, highest, holder, reason, req.round)

        if not (0 < req.duration <= self.max_duration) or req.term < 1:
            return refuse("bad request")
        if now < self._quiet_until:
            return refuse("restarting")
        if lease is not None and lease.holder != req.candidate:
            return refuse("held by another")
        if lease is not None:
            # Renewal by the holder: the same term, or a newer one it chose.
            if req.term < lease.term:
                return refuse("stale term")
        elif req.term <= highest:
            return refuse("stale term")
        expires = now + req.duration * (1 + self.drift_margin)
        if lease is not None:
            expires = max(expires, lease.expires)
        self._leases[req.service] = _Lease(req.candidate, req.term, expires)
        self._highest[req.service] = max(highest, req.term)
        return LeaseReply(True, self._highest[req.service], req.candidate, "", req.round)


@dataclass(slots=True)
class _Round:
    number: int
    sent_at: float
    granted: set[str] = field(default_factory=set)


class Candidate:
    """One node's bid for one service's lease, and its view of holding it."""

    def __init__(
        self,
        node: str,
        service: str,
        duration: float,
        renew_fraction: float = DEFAULT_RENEW_FRACTION,
        retry_interval: float | None = None,
    ) -> None:
        if duration <= 0 or not 0 < renew_fraction < 1:
            raise ValueError("duration must be > 0 and renew_fraction in (0, 1)")
        self.node = node
        self.service = service
        self.duration = duration
        self.renew_fraction = renew_fraction
        self.retry_interval = duration / 10 if retry_interval is None else retry_interval
        self.term = 0
        self.highest_seen = 0
        self.valid_until = -math.inf
        self._voters: tuple[str, ...] = ()
        self._rounds: dict[int, _Round] = {}
        self._round_no = 0
        self._last_sent = -math.inf
        self._lead_sent_at = -math.inf

    def next_term(self) -> int:
        """A term higher than any this candidate has used or heard of."""
        return max(self.term, self.highest_seen) + 1

    def start(self, term: int, voters: Sequence[str], now: float) -> list[tuple[str, LeaseRequest]]:
        """Bid for ``term``: (voter, request) pairs to send, itself included."""
        if term < 1:
            raise ValueError("term must be >= 1")
        if not voters:
            raise ValueError("the voter set is empty")
        if term != self.term:
            self.valid_until = -math.inf
            self._lead_sent_at = -math.inf
            self._rounds.clear()
        self.term = term
        self.highest_seen = max(self.highest_seen, term)
        self._voters = tuple(dict.fromkeys(voters))
        return self._send(now)

    def renew(self, now: float) -> list[tuple[str, LeaseRequest]]:
        """A new round in the current term, to extend the lease."""
        if self.term == 0 or not self._voters:
            return []
        return self._send(now)

    def _send(self, now: float) -> list[tuple[str, LeaseRequest]]:
        self._round_no += 1
        self._rounds[self._round_no] = _Round(self._round_no, now)
        # Only rounds that could still extend the lease are worth keeping.
        for number in [n for n, r in self._rounds.items() if r.sent_at + self.duration <= now]:
            del self._rounds[number]
        self._last_sent = now
        req = LeaseRequest(self.service, self.node, self.term, self.duration, self._round_no)
        return [(voter, req) for voter in self._voters]

    @property
    def voters(self) -> tuple[str, ...]:
        return self._voters

    def on_reply(self, voter: str, reply: LeaseReply, now: float) -> None:
        if reply.term > self.highest_seen:
            self.highest_seen = reply.term
        if reply.term > self.term:
            # Someone was granted a newer term: our lease is gone at that voter.
            self.step_down()
            return
        if not reply.granted or reply.term != self.term or voter not in self._voters:
            return
        rnd = self._rounds.get(reply.round)
        if rnd is None:
            return
        rnd.granted.add(voter)
        if len(rnd.granted) >= majority(len(self._voters)):
            until = rnd.sent_at + self.duration
            if until > self.valid_until:
                self.valid_until = until
                self._lead_sent_at = rnd.sent_at

    def step_down(self) -> None:
        self.valid_until = -math.inf
        self._lead_sent_at = -math.inf
        self._rounds.clear()

    def is_leader(self, now: float) -> bool:
        return now < self.valid_until

    def renew_due(self, now: float) -> bool:
        """Leader past the renew point, and no round sent very recently."""
        return (
            self.is_leader(now)
            and now >= self._lead_sent_at + self.duration * self.renew_fraction
            and now >= self._last_sent + self.retry_interval
        )

    def fence(self) -> int:
        """The term to stamp on assignments written while leading."""
        return self.term
