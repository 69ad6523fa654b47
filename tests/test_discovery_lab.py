"""mDNS discovery between lab hosts: real multicast across a switch, one agent per host.

Each host runs ``python -m meshd.discovery`` on its own lab address, with the
real service type (the namespaces keep it off every other network).
"""

from __future__ import annotations

import pytest
from conftest import wait_for
from labhosts import Lab
from test_discovery import Runner, runner_argv

from meshd.discovery import SERVICE_TYPE

pytestmark = pytest.mark.lab

PORT = 7946
FP = "0123456789abcdef"


def start(lab: Lab, i: int, cluster: str) -> Runner:
    argv = runner_argv(f"n{i}", cluster, lab.addr(i), PORT, SERVICE_TYPE, fp=FP)
    return Runner(argv, lambda argv, **kw: lab.popen(i, argv, **kw))


def begun(r: Runner) -> float:
    """Wall-clock time at which this runner began discovering."""
    first = r.lines[0]
    return first["wall"] - first["t"]


def seen_all_at(r: Runner, want: set[str]) -> float:
    """Wall-clock time of the peer line that completed ``want``."""
    found: set[str] = set()
    for line in r.events("peer"):
        found.add(line["node"])
        if want <= found:
            return line["wall"]
    raise AssertionError(f"never saw {want}, only {found}")


def test_agents_on_three_hosts_find_each_other_and_ignore_another_cluster(
    make_lab,
) -> None:
    lab = make_lab(4)
    prod = {1: "n1", 2: "n2", 3: "n3"}
    runners = {i: start(lab, i, "prod") for i in prod}
    runners[4] = start(lab, 4, "staging")  # same LAN, same key, other cluster
    for i, node in prod.items():
        want = set(prod.values()) - {node}
        wait_for(
            lambda i=i, want=want: runners[i].peer_nodes() == want,
            timeout=15,
            message=f"host {i} to see {sorted(want)}",
        )
    # Each peer is reported at its gossip address on the lab network.
    for line in runners[1].events("peer"):
        i = int(line["node"][1:])
        assert (line["host"], line["port"]) == (lab.addr(i), PORT)

    last_begin = max(begun(runners[i]) for i in prod)
    took = max(seen_all_at(runners[i], set(prod.values()) - {n}) for i, n in prod.items())
    print(f"\n3 lab hosts: all saw each other {took - last_begin:.3f} s after the last began")
    assert took - last_begin < 5.0

    for r in runners.values():
        wait_for(lambda r=r: r.events("started"), timeout=15, message="every runner registered")

    # Goodbye crosses the switch: the others drop n3 at once.
    stats = runners[3].stop()
    assert {p["node"] for p in stats["peers"]} == {"n1", "n2"}
    for i in (1, 2):
        wait_for(
            lambda i=i: "n3" not in runners[i].peer_nodes(),
            timeout=5,
            message=f"host {i} to drop n3 after its goodbye",
        )

    # A late starter finds the running agents by asking (they answer its query),
    # and they find it from its announcement.
    runners[3] = late = start(lab, 3, "prod")
    wait_for(lambda: late.peer_nodes() == {"n1", "n2"}, timeout=15, message="n3 back")
    for i in (1, 2):
        wait_for(lambda i=i: "n3" in runners[i].peer_nodes(), timeout=15, message="n3 seen")
    asked = seen_all_at(late, {"n1", "n2"}) - begun(late)
    print(f"late starter found both running agents {asked:.3f} s after it began")

    foreign = runners[4].stop()
    assert foreign["peers"] == [] and foreign["ignored_foreign_cluster"] >= 3
    assert runners[4].peer_nodes() == set()
    for i in prod:
        stats = runners[i].stop()
        assert stats["ignored_foreign_cluster"] >= 1, f"host {i} never heard the other cluster"
        assert stats["ignored_bad_record"] == 0 and stats["callback_errors"] == 0


def test_five_hosts_see_each_other_soon_after_the_last_start(make_lab) -> None:
    """Time to full discovery across hosts; the product target is 2 s."""
    lab = make_lab(5)
    nodes = {i: f"n{i}" for i in lab.hosts}
    runners = {i: start(lab, i, "prod") for i in lab.hosts}
    for i, node in nodes.items():
        want = set(nodes.values()) - {node}
        wait_for(
            lambda i=i, want=want: runners[i].peer_nodes() == want,
            timeout=15,
            message=f"host {i} to see all others",
        )
    last_begin = max(begun(r) for r in runners.values())
    took = max(seen_all_at(runners[i], set(nodes.values()) - {n}) for i, n in nodes.items())
    print(f"\n5 lab hosts: all saw each other {took - last_begin:.3f} s after the last began")
    assert took - last_begin < 5.0
