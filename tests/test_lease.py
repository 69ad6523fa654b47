"""Lease election: scenarios and a randomized safety check in simulated time.

The tests keep a global true time and give every node its own clock with an
offset and a rate, so drift between voters and leaders is exercised for real.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, field

import pytest

from meshd.scheduler.lease import (
    Candidate,
    LeaseReply,
    LeaseRequest,
    Voter,
    accept_assignment,
    candidate,
    majority,
    ranked_candidates,
)

SERVICE = "web"
DURATION = 1.0
MARGIN = 0.1
# Clock rates within +-EPS of true time keep every rate ratio <= 1 + MARGIN.
EPS = 0.047
assert (1 + EPS) / (1 - EPS) <= 1 + MARGIN


@dataclass
class Clock:
    offset: float = 0.0
    rate: float = 1.0

    def local(self, true_time: float) -> float:
        return self.offset + self.rate * true_time

    def true(self, local_time: float) -> float:
        return (local_time - self.offset) / self.rate


@dataclass
class Cluster:
    """Synchronous delivery between reachable nodes, for scripted scenarios."""

    names: list[str]
    clocks: dict[str, Clock] = field(default_factory=dict)
    margin: float = MARGIN
    t: float = 0.0
    groups: list[set[str]] | None = None
    dead: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        for n in self.names:
            self.clocks.setdefault(n, Clock())
        self.voters = {n: Voter(drift_margin=self.margin) for n in self.names}
        self.cands: dict[str, Candidate] = {}

    def now(self, node: str) -> float:
        return self.clocks[node].local(self.t)

    def reachable(self, a: str, b: str) -> bool:
        if a in self.dead or b in self.dead:
            return False
        return self.groups is None or any(a in g and b in g for g in self.groups)

    def cand(self, node: str) -> Candidate:
        return self.cands.setdefault(node, Candidate(node, SERVICE, DURATION))

    def deliver(self, node: str, sends: list[tuple[str, LeaseRequest]]) -> None:
        c = self.cand(node)
        for voter, req in sends:
            if self.reachable(node, voter):
                reply = self.voters[voter].handle_request(req, self.now(voter))
                c.on_reply(voter, reply, self.now(node))

    def campaign(self, node: str) -> bool:
        c = self.cand(node)
        self.deliver(node, c.start(c.next_term(), self.names, self.now(node)))
        return c.is_leader(self.now(node))

    def renew(self, node: str) -> None:
        c = self.cand(node)
        self.deliver(node, c.renew(self.now(node)))

    def leaders(self) -> list[str]:
        return [n for n, c in self.cands.items() if n not in self.dead and c.is_leader(self.now(n))]


NAMES5 = [f"n{i}" for i in range(5)]


# ---------------------------------------------------------------- pure parts


def test_rendezvous_is_stable_and_moves_only_the_dead_members_services():
    services = [f"svc{i}" for i in range(200)]
    before = {s: candidate(s, NAMES5) for s in services}
    assert before == {s: candidate(s, reversed(NAMES5)) for s in services}
    assert len(set(before.values())) == 5  # spreads across members
    after = {s: candidate(s, [n for n in NAMES5 if n != "n2"]) for s in services}
    for s in services:
        if before[s] != "n2":
            assert after[s] == before[s]
        else:
            assert after[s] == ranked_candidates(s, NAMES5)[1]
    assert candidate("web", []) is None


def test_majority_and_fencing():
    assert [majority(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 2, 3, 3]
    assert accept_assignment(3, 3)
    assert accept_assignment(3, 4)
    assert not accept_assignment(3, 2)


def test_voter_grants_one_lease_and_refuses_stale_terms():
    v = Voter(drift_margin=0.1)
    r = v.handle_request(LeaseRequest(SERVICE, "a", 1, 1.0), 0.0)
    assert r.granted and r.term == 1 and r.holder == "a"
    r = v.handle_request(LeaseRequest(SERVICE, "b", 2, 1.0), 1.0)
    assert not r.granted and r.holder == "a" and r.reason == "held by another"
    assert v.highest_term(SERVICE) == 1  # a refusal does not raise the term
    # Renewal by the holder in the same term, before expiry.
    assert v.handle_request(LeaseRequest(SERVICE, "a", 1, 1.0), 1.0).granted
    # Held until 1.0 + 1.1 on the voter's clock.
    assert not v.handle_request(LeaseRequest(SERVICE, "b", 2, 1.0), 2.09).granted
    r = v.handle_request(LeaseRequest(SERVICE, "b", 1, 1.0), 2.2)
    assert not r.granted and r.reason == "stale term" and r.term == 1
    assert v.handle_request(LeaseRequest(SERVICE, "b", 2, 1.0), 2.2).granted
    # Another service is independent.
    assert v.handle_request(LeaseRequest("db", "a", 1, 1.0), 2.2).granted


def test_voter_rejects_bad_requests_with_a_reason():
    v = Voter(max_duration=10)
    for req in (
        LeaseRequest(SERVICE, "a", 1, 0.0),
        LeaseRequest(SERVICE, "a", 1, 11.0),
        LeaseRequest(SERVICE, "a", 0, 1.0),
    ):
        r = v.handle_request(req, 0.0)
        assert not r.granted and r.reason == "bad request"


def test_voter_restore_keeps_terms_and_stays_quiet_for_one_lease():
    v = Voter(max_duration=5)
    assert v.handle_request(LeaseRequest(SERVICE, "a", 7, 5.0), 0.0).granted
    w = Voter.restore(v.snapshot(), now=100.0, max_duration=5)
    assert w.highest_term(SERVICE) == 7
    assert w.handle_request(LeaseRequest(SERVICE, "b", 8, 5.0), 105.0).reason == "restarting"
    assert w.handle_request(LeaseRequest(SERVICE, "b", 7, 5.0), 106.0).reason == "stale term"
    assert w.handle_request(LeaseRequest(SERVICE, "b", 8, 5.0), 106.0).granted
    with pytest.raises(ValueError):
        Voter.restore({"highest_terms": {"web": "x"}}, now=0.0)


# ---------------------------------------------------------------- scenarios


def test_single_leader_in_a_healthy_five_voter_cluster():
    c = Cluster(NAMES5)
    first = candidate(SERVICE, NAMES5)
    assert c.campaign(first)
    for other in NAMES5:
        if other != first:
            assert not c.campaign(other)
    assert c.leaders() == [first]
    assert c.cand(first).fence() == 1


def test_renewal_keeps_leadership_in_the_same_term():
    c = Cluster(NAMES5)
    assert c.campaign("n0")
    term = c.cand("n0").fence()
    for _ in range(200):  # 10 lease durations
        c.t += 0.05
        if c.cand("n0").renew_due(c.now("n0")):
            c.renew("n0")
        assert c.leaders() == ["n0"]
        assert not c.campaign("n1")
    assert c.cand("n0").fence() == term


def test_leader_death_hands_over_after_expiry_with_a_higher_term():
    c = Cluster(NAMES5)
    first, second = ranked_candidates(SERVICE, NAMES5)[:2]
    assert c.campaign(first)
    old_term = c.cand(first).fence()
    c.dead.add(first)
    alive = [n for n in NAMES5 if n not in c.dead]
    assert candidate(SERVICE, alive) == second
    # Voters hold the lease for duration * (1 + margin) from the grant.
    c.t = DURATION * (1 + MARGIN) - 0.01
    assert not c.campaign(second)
    c.t = DURATION * (1 + MARGIN) + 0.01
    assert c.campaign(second)
    assert c.cand(second).fence() > old_term
    assert not accept_assignment(c.cand(second).fence(), old_term)


def test_partition_minority_never_leads_majority_does_after_expiry():
    c = Cluster(NAMES5)
    minority, majority_side = {"n0", "n1"}, {"n2", "n3", "n4"}
    assert c.campaign("n0")
    c.groups = [minority, majority_side]
    for step in range(100):
        c.t += 0.05
        c.renew("n0")  # reaches only its own side
        assert not c.campaign("n1")
        won = c.campaign("n2")
        if c.t < DURATION * (1 + MARGIN):
            assert not won
        leaders = c.leaders()
        assert len(leaders) <= 1
        if c.t > DURATION * (1 + MARGIN) + 0.05:
            assert leaders == ["n2"], step
    assert not c.cand("n0").is_leader(c.now("n0"))


def test_two_node_cluster_needs_both_nodes():
    names = ["a", "b"]
    c = Cluster(names)
    assert c.campaign("a")
    c.dead.add("a")
    for _ in range(100):
        c.t += 0.1
        assert not c.campaign("b")  # majority of 2 is 2
    # The operator removes the dead member: a voter set of one.
    c.names = ["b"]
    assert c.campaign("b")


def test_drift_within_the_bound_is_safe_beyond_it_is_not():
    def run(margin: float, leader_rate: float, voter_rate: float) -> bool:
        clocks = {n: Clock(rate=voter_rate) for n in NAMES5}
        clocks["n0"] = Clock(rate=leader_rate)
        c = Cluster(NAMES5, clocks=clocks, margin=margin)
        assert c.campaign("n0")
        c.dead.add("n0")
        while True:  # n1 tries until it wins
            c.t += 0.001
            if c.campaign("n1"):
                break
        leader_end = clocks["n0"].true(c.cand("n0").valid_until)
        return c.t >= leader_end

    assert run(MARGIN, 1 - EPS, 1 + EPS)
    assert not run(0.0, 0.9, 1.1)


# ---------------------------------------------------------------- randomized


def first_overlap(intervals: list[tuple[float, float, str]]) -> tuple | None:
    """Two different nodes' validity intervals that overlap, if any."""
    latest_end: dict[str, float] = {}
    for start, end, node in sorted(intervals):
        for other, other_end in latest_end.items():
            if other != node and other_end > start:
                return (other, other_end, node, start)
        latest_end[node] = max(latest_end.get(node, -math.inf), end)
    return None


def simulate(seed: int, steps: int = 2500, n: int = 5) -> tuple[list, int]:
    rng = random.Random(seed)
    names = [f"n{i}" for i in range(n)]
    services = ["web", "db"]
    clocks = {x: Clock(rng.uniform(-50, 50), rng.uniform(1 - EPS, 1 + EPS)) for x in names}
    voters = {x: Voter(drift_margin=MARGIN, max_duration=DURATION) for x in names}
    disk = {x: voters[x].snapshot() for x in names}
    cands = {(x, s): Candidate(x, s, DURATION) for x in names for s in services}
    last_try: dict[tuple[str, str], float] = {}
    dead: set[str] = set()
    groups: list[set[str]] = [set(names)]
    loss = rng.uniform(0, 0.3)
    queue: list[tuple[float, int, str, str, str, object]] = []
    seq = 0
    intervals: dict[str, list[tuple[float, float, str]]] = {s: [] for s in services}
    t = 0.0
    dt = 0.02

    def same_side(a: str, b: str) -> bool:
        return any(a in g and b in g for g in groups)

    def send(src: str, dst: str, kind: str, payload: object) -> None:
        nonlocal seq
        if src in dead or rng.random() < loss:
            return
        delay = rng.expovariate(1 / 0.02) if rng.random() < 0.9 else rng.uniform(0, 3 * DURATION)
        seq += 1
        heapq.heappush(queue, (t + delay, seq, src, dst, kind, payload))

    for _ in range(steps):
        t += dt
        # Faults: partitions heal and form, nodes die and come back.
        r = rng.random()
        if r < 0.01:
            cut = rng.randrange(1, n)
            shuffled = rng.sample(names, n)
            groups = [set(shuffled[:cut]), set(shuffled[cut:])]
        elif r < 0.02:
            groups = [set(names)]
        elif r < 0.025:
            dead.add(rng.choice(names))
        elif r < 0.035:
            # Take out a current leader: the handover is where overlaps hide.
            leading = [
                x
                for (x, _), c in cands.items()
                if x not in dead and c.is_leader(clocks[x].local(t))
            ]
            if leading and len(dead) < n // 2:
                dead.add(rng.choice(leading))
        elif r < 0.05 and dead:
            back = rng.choice(sorted(dead))
            dead.discard(back)
            # A restart: monotonic clock restarts, state comes from disk.
            clocks[back] = Clock(rng.uniform(-50, 50), rng.uniform(1 - EPS, 1 + EPS))
            now = clocks[back].local(t)
            voters[back] = Voter.restore(disk[back], now, MARGIN, DURATION)
            for s in services:
                cands[(back, s)] = Candidate(back, s, DURATION)
        # Deliver what is due.
        while queue and queue[0][0] <= t:
            _, _, src, dst, kind, payload = heapq.heappop(queue)
            if dst in dead or not same_side(src, dst):
                continue
            now = clocks[dst].local(t)
            if kind == "req":
                assert isinstance(payload, LeaseRequest)
                reply = voters[dst].handle_request(payload, now)
                if reply.granted:
                    disk[dst] = voters[dst].snapshot()  # persisted before replying
                send(dst, src, "rep", (payload.service, reply))
            else:
                service, reply = payload  # type: ignore[misc]
                assert isinstance(reply, LeaseReply)
                c = cands[(dst, service)]
                before = c.valid_until
                c.on_reply(src, reply, now)
                if c.valid_until > before and c.valid_until > now:
                    end = clocks[dst].true(c.valid_until)
                    intervals[service].append((t, end, dst))
                    if len(dead) < n // 2 and rng.random() < 0.05:
                        # Dies holding a fresh lease: the widest window for an overlap.
                        dead.add(dst)
        # Each alive node drives its candidates from its own view.
        for x in names:
            if x in dead:
                continue
            now = clocks[x].local(t)
            view = [y for y in names if y not in dead and same_side(x, y)]
            for s in services:
                c = cands[(x, s)]
                sends: list[tuple[str, LeaseRequest]] = []
                if c.is_leader(now):
                    if c.renew_due(now):
                        sends = c.renew(now)
                else:
                    # The rendezvous pick tries; a rogue node sometimes does too.
                    eager = candidate(s, view) == x or rng.random() < 0.01
                    if eager and now - last_try.get((x, s), -math.inf) >= DURATION / 10:
                        last_try[(x, s)] = now
                        sends = c.start(c.next_term(), names, now)
                for voter, req in sends:
                    send(x, voter, "req", req)
    leases = sum(len(v) for v in intervals.values())
    return [first_overlap(v) for v in intervals.values()], leases


@pytest.mark.parametrize("seed", range(30))
def test_random_faults_and_drift_never_give_two_overlapping_leaders(seed):
    overlaps, leases = simulate(seed)
    assert overlaps == [None, None]
    assert leases > 0  # leadership does happen despite the faults


def test_the_overlap_checker_finds_overlaps():
    assert first_overlap([(0, 2, "a"), (1, 3, "b")]) == ("a", 2, "b", 1)
    assert first_overlap([(0, 2, "a"), (1, 3, "a"), (3, 4, "b")]) is None
