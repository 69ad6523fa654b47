"""meshd agents on lab hosts: zero-config formation, isolation, the store
across failures and partitions, and leaving.

Every agent is a real `meshd agent` process in its own network namespace
(scripts/meshdlab.py), found by real multicast mDNS on the lab switch, and
is observed only from outside: its HTTP API (called inside its namespace)
and its JSON log. Each test group has a lab of its own (prefix and subnet),
so it never meets another lab's traffic.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import pytest
from conftest import _lab_available, wait_for
from meshdlab import MESHD, AgentProc, LabCluster

pytestmark = [pytest.mark.lab, pytest.mark.slow]

FIVE = range(1, 6)
POLL = 0.2
"""Seconds between polls of an agent's API (each poll starts a process)."""
NOT_YET = (AssertionError, RuntimeError)
"""A failed condition, or an agent that does not answer (yet)."""
REPAIR_LAN = 75.0
"""Deadline for the store to agree under the LAN profile. A rumoured write
reaches every node within a second nearly always, but rumours are lossy by
design (now and then a node misses every copy, more so while a dead member
still takes its share of them) and push-pull anti-entropy, every 30 s per
node, is what repairs them."""
REPAIR_LOCAL = 30.0
"""The same under the local profile (push-pull every 5 s)."""


@pytest.fixture(scope="module", autouse=True)
def _needs_lab(_stale_labs_reaped: None) -> None:
    _lab_available()


# ----- observing agents ----------------------------------------------------------


def names(hosts: Iterable[int]) -> set[str]:
    return {f"h{i}" for i in hosts}


def statuses(agent: AgentProc) -> dict[str, str]:
    """Member name -> status, as this agent's API lists them."""
    return {m["name"]: m["status"] for m in agent.api("/v1/members")}


def kv(agent: AgentProc, prefix: str) -> dict[str, str]:
    """Key -> value under prefix in this agent's copy of the store."""
    return {e["key"]: e["value"] for e in agent.api(f"/v1/kv?prefix={prefix}")}


def put(agent: AgentProc, key: str, value: str) -> None:
    agent.api(f"/v1/kv/{key}", method="PUT", body=value.encode())


def until(pred: Callable[[], Any], timeout: float, message: str) -> Any:
    return wait_for(pred, timeout=timeout, interval=POLL, message=message, ignore=NOT_YET)


def wait_members(
    cluster: LabCluster, hosts: Sequence[int], want: dict[str, str], timeout: float
) -> None:
    """Every agent of hosts lists exactly want (name -> status)."""

    def agree() -> bool:
        for i in hosts:
            got = statuses(cluster.agents[i])
            assert got == want, f"h{i} lists {got}"
        return True

    until(agree, timeout, f"{sorted(names(hosts))} to list exactly {want}")


def wait_store(
    cluster: LabCluster, hosts: Sequence[int], prefix: str, want: dict[str, str], timeout: float
) -> None:
    """Every agent of hosts holds exactly want under prefix."""

    def agree() -> bool:
        for i in hosts:
            got = kv(cluster.agents[i], prefix)
            missing = sorted(k for k in want if got.get(k) != want[k])
            extra = sorted(set(got) - set(want))
            assert not missing and not extra, f"h{i}: missing {missing}, extra {extra}"
        return True

    until(agree, timeout, f"{sorted(names(hosts))} to hold {len(want)} keys under {prefix!r}")


def refused(agent: AgentProc, reason: str) -> set[str]:
    """mDNS names whose announcements agent ignored for reason (debug log)."""
    return {m.split()[1] for m in agent.logged(reason) if m.startswith("ignoring ")}


def wait_event(cluster: LabCluster, pred: Callable[[], bool], timeout: float, message: str) -> None:
    """Wait on what the agents' logs say (no polling: woken per log line)."""
    assert cluster.wait(pred, timeout), f"timed out after {timeout}s waiting for {message}"


def start_all(cluster: LabCluster, hosts: Iterable[int], *flags: str) -> None:
    """Start an agent on each host; return when they have all seen each other join."""
    hosts = list(hosts)
    for i in hosts:
        cluster.start(i, *flags)
    wait_event(
        cluster,
        lambda: cluster.all_joined(hosts),
        30,
        f"{sorted(names(hosts))} to see each other join",
    )


# ----- one zero-config cluster, shared by several tests -----------------------------


@pytest.fixture(scope="class")
def mesh() -> Iterator[LabCluster]:
    """Five agents started with nothing but the interface, and two spare
    hosts on the same switch for agents that must stay out."""
    with LabCluster(7, prefix="ta1", subnet="10.81.0") as cluster:
        start_all(cluster, FIVE)
        yield cluster


class TestZeroConfigCluster:
    def test_five_hosts_form_one_cluster_by_mdns(self, mesh: LabCluster) -> None:
        alive = dict.fromkeys(sorted(names(FIVE)), "alive")
        wait_members(mesh, FIVE, alive, 15)
        for i in FIVE:
            status, body = mesh.agents[i].request("/v1/health")
            assert status == 200, body
            # Found by mDNS: nobody was told of anybody.
            assert mesh.agents[i].logged("announced ")
        formed = mesh.formed_at(FIVE)
        last_start = max(mesh.agents[i].started for i in FIVE)
        # Its first log line comes once the interpreter has loaded the agent:
        # the time after that is the agent's own.
        ready = []
        for i in FIVE:
            t = mesh.agents[i].logged_at("")
            assert t is not None
            ready.append(t)
        print(
            f"\n5 lab hosts formed one cluster {formed - last_start:.2f} s after the last "
            f"process start, {formed - max(ready):.2f} s after the last agent's first log line"
        )

    def test_another_cluster_name_or_key_stays_out(self, mesh: LabCluster) -> None:
        key_file = mesh.workdir / "other.key"
        key = subprocess.run([*MESHD, "keygen"], capture_output=True, text=True, check=True)
        key_file.write_text(key.stdout)
        other_name = mesh.start(6, "--cluster", "other", "--log-level", "debug")
        # The other key even asks to join a member outright.
        other_key = mesh.start(
            7, "--key-file", str(key_file), "--log-level", "debug", "--join", mesh.lab.addr(1)
        )
        try:
            # Both saw every other agent's announcement by mDNS and refused it.
            for agent, reason in (
                (other_name, "ignored_foreign_cluster"),
                (other_key, "ignored_foreign_"),
            ):
                wait_event(
                    mesh,
                    lambda agent=agent, reason=reason: len(refused(agent, reason)) >= 6,
                    20,
                    f"{agent.name} to refuse the announcements of the six others",
                )
            wait_event(
                mesh,
                lambda: len(other_key.logged("could not join")) >= 2,
                30,
                "h7's join to h1 to be refused twice",
            )
            alive = dict.fromkeys(sorted(names(FIVE)), "alive")
            for i in FIVE:
                assert statuses(mesh.agents[i]) == alive
                assert not {"h6", "h7"} & set(mesh.agents[i].joined)
            assert statuses(other_name) == {"h6": "alive"}
            assert statuses(other_key) == {"h7": "alive"}
            assert other_name.api("/v1/agent")["cluster"] == "other"
            info = other_key.api("/v1/agent")
            assert info["secret_key"] is True
            assert info["key_fingerprint"] != mesh.agents[1].api("/v1/agent")["key_fingerprint"]
        finally:
            for agent in (other_name, other_key):
                agent.stop(signal.SIGTERM)

    def test_a_write_on_one_node_is_readable_on_all(self, mesh: LabCluster) -> None:
        t0 = time.monotonic()
        put(mesh.agents[2], "spread/one", "hello")
        wait_store(mesh, FIVE, "spread/", {"spread/one": "hello"}, REPAIR_LAN)
        print(f"\nwrite on h2 read back from all 5 within {time.monotonic() - t0:.2f} s")
        assert mesh.agents[4].api("/v1/kv/spread/one")["value"] == "hello"

        mesh.agents[3].api("/v1/kv/spread/one", method="DELETE")
        wait_store(mesh, FIVE, "spread/", {}, REPAIR_LAN)
        for i in FIVE:
            status, body = mesh.agents[i].request("/v1/kv/spread/one")
            assert status == 404, body

    def test_a_killed_node_catches_up_after_restart(self, mesh: LabCluster) -> None:
        others = range(1, 5)
        put(mesh.agents[1], "kill/gone", "soon deleted")
        wait_store(mesh, [5], "kill/", {"kill/gone": "soon deleted"}, REPAIR_LAN)

        t_kill = time.monotonic()
        mesh.agents[5].stop(signal.SIGKILL)
        want: dict[str, str] = {}
        # Write on every other node until they have all declared h5 dead, and a
        # few more after; one of them removes a key h5 holds.
        n = 0
        deadline = time.monotonic() + 60
        extra = 4
        while extra:
            assert time.monotonic() < deadline, "h5 never declared dead by all of h1-h4"
            key, value = f"kill/k{n:03d}", f"v{n} from h{1 + n % 4}"
            put(mesh.agents[1 + n % 4], key, value)
            want[key] = value
            if n == 2:
                mesh.agents[2].api("/v1/kv/kill/gone", method="DELETE")
            n += 1
            with mesh.cond:
                if all("h5" in mesh.agents[i].dead for i in others):
                    extra -= 1
        print(f"\nh5 killed: all others saw it dead within {time.monotonic() - t_kill:.1f} s")

        t_restart = time.monotonic()
        restarted = mesh.start(5)
        wait_store(mesh, [5], "kill/", want, REPAIR_LAN)
        caught_up = time.monotonic() - t_restart
        wait_store(mesh, FIVE, "kill/", want, REPAIR_LAN)
        wait_event(
            mesh,
            lambda: all("h5" not in mesh.agents[i].dead for i in others),
            30,
            "h1-h4 to see h5 come back",
        )
        alive = dict.fromkeys(sorted(names(FIVE)), "alive")
        wait_members(mesh, FIVE, alive, 30)
        assert restarted.api("/v1/agent")["name"] == "h5"
        print(f"h5 restarted: caught up on {len(want)} writes and a delete in {caught_up:.1f} s")

    def test_graceful_leave_shows_left(self, mesh: LabCluster) -> None:
        by_api, by_signal = mesh.agents[4], mesh.agents[5]
        status, body = by_api.request("/v1/agent/leave", method="POST")
        assert 200 <= status < 300, body
        assert by_api.proc.wait(15) == 0
        assert by_signal.stop(signal.SIGTERM, timeout=15) == 0
        want = {"h1": "alive", "h2": "alive", "h3": "alive", "h4": "left", "h5": "left"}
        wait_members(mesh, range(1, 4), want, 15)
        for i in range(1, 4):
            assert {"h4", "h5"} <= set(mesh.agents[i].left)
            assert not {"h4", "h5"} & set(mesh.agents[i].dead)


# ----- clusters of their own ------------------------------------------------------


def test_static_join_without_mdns() -> None:
    with LabCluster(3, prefix="ta3", subnet="10.83.0", extra=["--no-mdns"]) as cluster:
        seed = cluster.lab.addr(1)
        # The joiners start first and find nobody: they keep retrying.
        for i in (2, 3):
            cluster.start(i, "--join", seed)
        wait_event(
            cluster,
            lambda: all(len(cluster.agents[i].logged("could not join")) >= 2 for i in (2, 3)),
            30,
            "h2 and h3 to retry their join",
        )
        cluster.start(1)
        wait_event(cluster, lambda: cluster.all_joined([1, 2, 3]), 30, "h1-h3 to join")
        alive = dict.fromkeys(["h1", "h2", "h3"], "alive")
        wait_members(cluster, [1, 2, 3], alive, 15)
        for agent in cluster.agents.values():
            assert not agent.logged("announced "), "mDNS ran despite --no-mdns"


def test_partition_heals_and_the_store_converges() -> None:
    # The local profile's 5 s push-pull makes anti-entropy (and the reconnect
    # that heals a partition) quick enough for a test.
    side_a, side_b = [1, 2], [3, 4, 5]
    with LabCluster(5, prefix="ta6", subnet="10.86.0", extra=["--profile", "local"]) as cluster:
        start_all(cluster, FIVE)
        a = cluster.agents
        put(a[1], "part/base", "before")
        put(a[1], "part/kept", "before")
        wait_store(
            cluster, FIVE, "part/", {"part/base": "before", "part/kept": "before"}, REPAIR_LOCAL
        )

        cluster.lab.split(side_a, side_b)
        t_split = time.monotonic()
        wait_event(
            cluster,
            lambda: (
                all(names(side_b) <= set(a[i].dead) for i in side_a)
                and all(names(side_a) <= set(a[i].dead) for i in side_b)
            ),
            30,
            "each side to declare the other dead",
        )
        print(f"\nsplit {side_a} | {side_b}: dead both ways in {time.monotonic() - t_split:.1f} s")
        put(a[1], "part/a1", "from h1")
        put(a[2], "part/a2", "from h2")
        put(a[2], "part/both", "side a")
        put(a[3], "part/b3", "from h3")
        put(a[5], "part/b5", "from h5")
        a[4].api("/v1/kv/part/base", method="DELETE")
        put(a[4], "part/both", "side b")  # the later write wins everywhere
        wait_store(
            cluster,
            side_a,
            "part/",
            {
                "part/base": "before",
                "part/kept": "before",
                "part/a1": "from h1",
                "part/a2": "from h2",
                "part/both": "side a",
            },
            REPAIR_LOCAL,
        )
        wait_store(
            cluster,
            side_b,
            "part/",
            {
                "part/kept": "before",
                "part/b3": "from h3",
                "part/b5": "from h5",
                "part/both": "side b",
            },
            REPAIR_LOCAL,
        )

        cluster.lab.heal()
        t_heal = time.monotonic()
        alive = dict.fromkeys(sorted(names(FIVE)), "alive")
        wait_members(cluster, FIVE, alive, 60)
        rejoined = time.monotonic() - t_heal
        want = {
            "part/kept": "before",
            "part/a1": "from h1",
            "part/a2": "from h2",
            "part/b3": "from h3",
            "part/b5": "from h5",
            "part/both": "side b",
        }
        wait_store(cluster, FIVE, "part/", want, 60)
        print(
            f"healed: membership in {rejoined:.1f} s, "
            f"store converged in {time.monotonic() - t_heal:.1f} s"
        )
