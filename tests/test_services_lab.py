"""Services across lab hosts with the process driver: deploy through any node,
a host killed with everything on it, the leader killed, a minority partition
that must never take a lease, resource exhaustion and bad specs.

Every agent is a real `meshd agent` in its own network namespace; a host
"crash" is SIGKILL to every process in its namespace (the agent and its
replicas), as a power cut would do.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import _lab_available, wait_for
from meshdlab import AgentProc, LabCluster

pytestmark = [pytest.mark.lab, pytest.mark.slow]

FIVE = range(1, 6)
POLL = 0.2
NOT_YET = (AssertionError, RuntimeError, KeyError, TypeError)
WWW = Path("/tmp/meshd-tsl-www")


def web_spec(name: str, replicas: int, **extra: Any) -> bytes:
    spec = {
        "name": name,
        "command": [
            "sh",
            "-c",
            f"exec busybox httpd -f -p $MESHD_PORT_HTTP -h {WWW}",
        ],
        "replicas": replicas,
        "ports": [{"name": "http", "target": 80}],
        "health": {"http": "/", "port": "http", "interval": "1s"},
        **extra,
    }
    return json.dumps(spec).encode()


def until(pred: Callable[[], Any], timeout: float, message: str) -> Any:
    return wait_for(pred, timeout=timeout, interval=POLL, message=message, ignore=NOT_YET)


def crash_host(cluster: LabCluster, i: int) -> None:
    """Power cut: SIGKILL every process in the host's namespace."""
    out = subprocess.run(
        ["ip", "netns", "pids", cluster.lab.ns(i)], capture_output=True, text=True, check=True
    )
    for pid in map(int, out.stdout.split()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    cluster.agents[i].proc.wait(10)
    del cluster.agents[i]


def ready_replicas(agent: AgentProc, service: str) -> list[dict[str, Any]]:
    return [
        r
        for r in agent.api(f"/v1/services/{service}/replicas")
        if r["state"] == "running" and r["health"] in ("healthy", "none")
    ]


def wait_ready(
    agent: AgentProc, service: str, n: int, timeout: float, avoid: frozenset[str] = frozenset()
):
    def check() -> list[dict[str, Any]]:
        got = ready_replicas(agent, service)
        assert len(got) == n, f"{len(got)} of {n} ready"
        assert not {r["node"] for r in got} & avoid, "replica on a dead host"
        return got

    return until(check, timeout, f"{n} ready replicas of {service}")


def assert_no_overlapping_leases(cluster: LabCluster) -> None:
    periods = []
    for agent in cluster.agents.values():
        for p in agent.api("/v1/agent/leases"):
            periods.append((agent.name, p))
    for (na, a), (nb, b) in itertools.combinations(periods, 2):
        if a["service"] == b["service"] and (na, a["term"]) != (nb, b["term"]):
            assert a["until"] <= b["start"] or b["until"] <= a["start"], (na, a, nb, b)


@pytest.fixture(scope="module")
def mesh(_stale_labs_reaped: None) -> Iterator[LabCluster]:
    _lab_available()
    WWW.mkdir(exist_ok=True)
    (WWW / "index.html").write_text("ok\n")
    with LabCluster(5, prefix="tsl", subnet="10.83.0", extra=["--driver", "process"]) as cluster:
        for i in FIVE:
            cluster.start(i)
        assert cluster.wait(lambda: cluster.all_joined(FIVE), 30), "cluster did not form"
        yield cluster


def test_deploy_spreads_and_heals_after_a_host_crash(mesh: LabCluster) -> None:
    h1 = mesh.agents[1]
    status, _ = h1.request("/v1/services/web", method="PUT", body=web_spec("web", 5))
    assert status in (200, 201)
    got = wait_ready(h1, "web", 5, 30)
    assert len({r["node"] for r in got}) == 5, "spread one per host"
    for i in (2, 3):  # any node answers for the service
        assert len(ready_replicas(mesh.agents[i], "web")) == 5
    leader = h1.api("/v1/services/web/leader")["node"]
    victim = next(r["node"] for r in got if r["node"] not in ("h1", leader))
    crash_host(mesh, int(victim[1:]))
    after = wait_ready(h1, "web", 5, 20, avoid=frozenset({victim}))
    assert len({r["node"] for r in after}) == 4
    # The host comes back (same data dir): it rejoins and runs nothing stale.
    mesh.start(int(victim[1:]))
    assert mesh.wait(lambda: mesh.all_joined(FIVE), 30)
    until(
        lambda: mesh.agents[int(victim[1:])].api("/v1/services/web") is not None,
        20,
        "restarted host knows the service",
    )


def test_leader_crash_moves_the_lease_and_keeps_replicas(mesh: LabCluster) -> None:
    h1 = mesh.agents[1]
    h1.request("/v1/services/api", method="PUT", body=web_spec("api", 3))
    wait_ready(h1, "api", 3, 30)
    lead = h1.api("/v1/services/api/leader")
    if lead["node"] == "h1":  # keep our observer; re-deploy under another name
        pytest.skip("h1 leads; covered by the other crash test")
    crash_host(mesh, int(lead["node"][1:]))
    until(
        lambda: (
            (new := h1.api("/v1/services/api/leader"))["node"] not in (None, lead["node"])
            and new["term"] > lead["term"]
        ),
        20,
        "a new leader with a higher term",
    )
    wait_ready(h1, "api", 3, 20, avoid=frozenset({lead["node"]}))
    mesh.start(int(lead["node"][1:]))
    assert mesh.wait(lambda: mesh.all_joined(FIVE), 30)
    assert_no_overlapping_leases(mesh)


def test_minority_side_never_takes_a_lease(mesh: LabCluster) -> None:
    until(lambda: all(a.api("/v1/health") for a in mesh.agents.values()), 20, "all up")
    mesh.lab.split([1, 2, 3], [4, 5])
    try:
        h4 = mesh.agents[4]
        h4.request("/v1/services/lonely", method="PUT", body=web_spec("lonely", 2))
        # Sampled over several lease lengths, past the point where the minority
        # has declared the majority dead and bids on its own: it never wins.
        end = time.monotonic() + 8.0
        while time.monotonic() < end:
            for i in (4, 5):
                assert mesh.agents[i].api("/v1/services/lonely/leader")["node"] is None
                assert ready_replicas(mesh.agents[i], "lonely") == []
    finally:
        mesh.lab.heal()
    # Healed: the majority learns the service, leads it and runs it.
    wait_ready(mesh.agents[1], "lonely", 2, 60)
    assert_no_overlapping_leases(mesh)
    # The minority was declared dead meanwhile and its replicas re-placed: back
    # in the cluster, each host runs exactly what is assigned to it now.
    # Assignments written during the partition reach the healed side by rumour
    # or, when the rumours are spent, by push-pull anti-entropy (every 30 s
    # per node under the LAN profile): allow two rounds of it.
    until(lambda: runs_only_assigned(mesh), 75, "every host runs only its assigned replicas")


def runs_only_assigned(cluster: LabCluster) -> bool:
    h1 = cluster.agents[1]
    assigned: dict[str, int] = {}
    for svc in h1.api("/v1/services"):
        for r in h1.api(f"/v1/services/{svc['name']}/replicas"):
            assigned[r["node"]] = assigned.get(r["node"], 0) + 1
    for i in cluster.agents:
        pids = subprocess.run(
            ["ip", "netns", "pids", cluster.lab.ns(i)], capture_output=True, text=True, check=True
        ).stdout.split()
        servers = 0
        for pid in pids:
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                servers += cmd[:2] == [b"busybox", b"httpd"]
        assert servers == assigned.get(f"h{i}", 0), f"h{i} runs {servers}, assigned {assigned}"
    return True


def test_exhausted_resources_give_a_pending_reason(mesh: LabCluster) -> None:
    h1 = mesh.agents[1]
    h1.request("/v1/services/huge", method="PUT", body=web_spec("huge", 2, resources={"cpu": 512}))

    def pending() -> list[dict[str, Any]]:
        got = h1.api("/v1/services/huge")["pending"]
        assert len(got) == 2
        return got

    reasons = until(pending, 20, "pending replicas with a reason")
    assert all("cpu" in p["reason"].lower() for p in reasons), reasons


def test_bad_specs_are_refused_naming_the_field(mesh: LabCluster) -> None:
    h2 = mesh.agents[2]
    status, body = h2.request(
        "/v1/services/bad", method="PUT", body=b'{"name": "bad", "command": ["x"], "replicas": -1}'
    )
    assert status == 400
    assert "replicas" in json.dumps(body)
    status, body = h2.request("/v1/services/bad", method="PUT", body=b"name: [unclosed")
    assert status == 400
