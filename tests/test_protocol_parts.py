"""The small pure pieces of the protocol: piggyback queue, suspicion, health."""

from __future__ import annotations

import math

from gossip.awareness import Awareness
from gossip.broadcast import BroadcastQueue
from gossip.config import lan_config, local_config, wan_config
from gossip.suspicion import Suspicion


def test_queue_supersedes_by_key_and_keeps_unkeyed() -> None:
    q = BroadcastQueue()
    q.queue(b"old-a", "a")
    q.queue(b"new-a", "a")
    q.queue(b"x")
    q.queue(b"y")
    assert len(q) == 3
    assert sorted(q.take(1000, 10)) == [b"new-a", b"x", b"y"]


def test_queue_sends_fewest_transmits_first_then_newest() -> None:
    first, second, third = (bytes([i]) * 20 for i in range(3))
    q = BroadcastQueue()
    q.queue(first, "1")
    assert q.take(1000, 5) == [first]
    q.queue(second, "2")
    q.queue(third, "3")
    # Room for two messages: the two never-sent ones, newest first.
    assert q.take(45, 5) == [third, second]
    assert q.take(100, 5) == [third, second, first]
    out = BroadcastQueue()
    out.queue(b"aaaa", "a")
    out.queue(b"bbbb", "b")
    assert out.take(4, 5) == [b"bbbb"]
    assert out.take(4, 5) == [b"aaaa"]


def test_queue_retransmit_limit_and_transmits() -> None:
    q = BroadcastQueue()
    q.queue(b"m", "k")
    for i in range(3):
        assert q.transmits("k") == i
        assert q.take(100, 3) == [b"m"]
    assert q.transmits("k") is None
    assert len(q) == 0
    assert q.take(100, 3) == []


def test_queue_budget_and_prune() -> None:
    q = BroadcastQueue()
    for i in range(10):
        q.queue(bytes(100), str(i))
    assert len(q.take(350, 10)) == 3
    assert q.prune(4) == 6
    assert len(q) == 4
    assert len(q.take(10_000, 10)) == 4


def test_suspicion_shrinks_with_confirmations() -> None:
    s = Suspicion(1, "a", k=3, min_t=2.0, max_t=12.0, now=100.0)
    assert s.deadline == 112.0
    assert not s.confirm("a")  # the accuser is not its own confirmation
    deadlines = [s.deadline]
    for src in ("b", "c", "d"):
        assert s.confirm(src)
        deadlines.append(s.deadline)
    assert deadlines == sorted(deadlines, reverse=True)
    assert math.isclose(s.deadline, 102.0)
    assert not s.confirm("e")  # beyond k nothing changes
    assert math.isclose(s.deadline, 102.0)


def test_suspicion_without_confirmations_waits_minimum() -> None:
    s = Suspicion(1, "a", k=0, min_t=2.0, max_t=12.0, now=0.0)
    assert s.deadline == 2.0


def test_awareness_bounds_and_scaling() -> None:
    a = Awareness(8)
    a.apply(-1)
    assert a.score == 0
    assert a.scale(0.5) == 0.5
    a.apply(3)
    assert a.scale(0.5) == 2.0
    a.apply(100)
    assert a.score == 7


def test_profiles_are_ordered_by_patience() -> None:
    local, lan, wan = local_config(), lan_config(), wan_config()
    assert local.probe_interval < lan.probe_interval < wan.probe_interval
    assert lan.suspicion_min(1000) > lan.suspicion_min(10) == lan.probe_interval
    assert lan.retransmit_limit(5) == 8  # the floor
    assert lan_config(retransmit_min=0).retransmit_limit(5) == 4
    assert lan.retransmit_limit(1000) == 16
    assert lan.push_pull_scaled(10) == lan.push_pull_interval
    assert lan.push_pull_scaled(1000) > lan.push_pull_interval
    assert lan_config(probe_interval=2.0).probe_interval == 2.0
