"""Services as containers across lab hosts, each host with its own Docker engine.

A service deployed through one node runs one container per host; its
published port answers from another host, as it would across a LAN; a host
that dies (agent killed with -9, its containers killed) has its replica
replaced on the survivors; a bad image reference is refused, naming the field.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import TEST_IMAGE, _docker_available, _lab_available, _missing, lab_prefix, wait_for
from meshdlab import AgentProc, LabCluster

from meshd.runtime.docker import container_name

pytestmark = [pytest.mark.lab, pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(120)]

HOSTS = (1, 2, 3)
POLL = 0.1
NOT_YET = (AssertionError, RuntimeError, KeyError, TypeError)

PAGE = "mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 80 -h /www"
"""Each replica serves its container's hostname, so an answer says who gave it."""

FETCH = (
    "import sys, urllib.request\n"
    "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())\n"
)


def web_spec(name: str, replicas: int, image: str = TEST_IMAGE) -> bytes:
    return json.dumps(
        {
            "name": name,
            "image": image,
            "args": ["sh", "-c", PAGE],
            "replicas": replicas,
            "ports": [{"name": "http", "target": 80}],
            "health": {"http": "/", "port": "http", "interval": "1s"},
        }
    ).encode()


def until(pred: Callable[[], Any], timeout: float, message: str) -> Any:
    return wait_for(pred, timeout=timeout, interval=POLL, message=message, ignore=NOT_YET)


def ready_replicas(agent: AgentProc, service: str) -> list[dict[str, Any]]:
    return [
        r
        for r in agent.api(f"/v1/services/{service}/replicas")
        if r["state"] == "running" and r["health"] in ("healthy", "none")
    ]


def fetch(cluster: LabCluster, host: int, replica: dict[str, Any]) -> str:
    """GET / of a replica's published port, from inside lab host `host`."""
    url = f"http://{replica['address']}:{replica['ports']['http']}/"
    out = cluster.lab.run(
        host, [sys.executable, "-c", FETCH, url], capture_output=True, text=True, timeout=15
    )
    assert out.returncode == 0, f"GET {url} from h{host}: {out.stderr[-300:]}"
    return out.stdout.strip()


def container_hostname(cluster: LabCluster, replica: dict[str, Any]) -> str:
    node = replica["node"]
    out = cluster.docker_cli(
        int(node[1:]),
        "inspect",
        "--format",
        "{{.Config.Hostname}}",
        container_name(node, replica["id"]),
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture(scope="module")
def mesh(_stale_labs_reaped: None) -> Iterator[LabCluster]:
    _lab_available()
    _docker_available()
    if shutil.which("dockerd") is None or shutil.which("docker") is None:
        _missing("MESHD_REQUIRE_DOCKER", "lab engines need dockerd and the docker CLI")
    with LabCluster(3, prefix=lab_prefix(), subnet="10.84.0", docker=True) as cluster:
        for i in HOSTS:
            cluster.start(i)
        assert cluster.wait(lambda: cluster.all_joined(HOSTS), 30), "cluster did not form"
        yield cluster


@pytest.fixture(scope="module")
def web(mesh: LabCluster) -> list[dict[str, Any]]:
    """Three replicas of an HTTP service, deployed through h1 and all ready."""
    status, body = mesh.agents[1].request("/v1/services/web", method="PUT", body=web_spec("web", 3))
    assert status == 201, body

    def spread() -> list[dict[str, Any]]:
        got = ready_replicas(mesh.agents[1], "web")
        assert len(got) == 3, f"{len(got)} of 3 ready"
        # spread: node is the default, so three hosts take one each.
        assert {r["node"] for r in got} == {"h1", "h2", "h3"}, "one per host"
        return got

    return until(spread, 30, "3 ready replicas of web, one per host")


def test_bad_image_is_refused_naming_the_field(mesh: LabCluster) -> None:
    status, body = mesh.agents[2].request(
        "/v1/services/bad", method="PUT", body=web_spec("bad", 1, image="meshd-test/busybox latest")
    )
    assert status == 400, body
    assert body["error"] == "bad_spec"
    assert body["field"] == "image", body
    assert "space" in body["detail"], body
    assert mesh.agents[2].request("/v1/services/bad")[0] == 404, "nothing was stored"


def test_each_host_runs_a_container_that_answers_from_another_host(
    mesh: LabCluster, web: list[dict[str, Any]]
) -> None:
    for replica in web:
        i = int(replica["node"][1:])
        assert replica["address"] == mesh.lab.addr(i)
        assert len(mesh.containers(i)) == 1, f"h{i} runs exactly the replica's container"
        other = HOSTS[i % len(HOSTS)]  # the next host round
        assert fetch(mesh, other, replica) == container_hostname(mesh, replica)


def test_a_dead_host_is_replaced_on_the_survivors(
    mesh: LabCluster, web: list[dict[str, Any]]
) -> None:
    h1 = mesh.agents[1]  # the observer stays up
    leader = h1.api("/v1/services/web/leader")["node"]
    # A host other than the observer, and not the leader when there is a choice.
    victims = sorted(r["node"] for r in web if r["node"] != "h1")
    victim = next((n for n in victims if n != leader), victims[0])
    v = int(victim[1:])

    start = time.monotonic()
    mesh.agents.pop(v).stop(signal.SIGKILL)
    ids = mesh.containers(v)
    killed = mesh.docker_cli(v, "kill", *ids)
    assert killed.returncode == 0, killed.stderr

    def healed() -> list[dict[str, Any]]:
        got = ready_replicas(h1, "web")
        assert len(got) == 3, f"{len(got)} of 3 ready"
        assert victim not in {r["node"] for r in got}, f"a replica is still listed on {victim}"
        return got

    left = 20 - (time.monotonic() - start)
    after = until(healed, left, f"3 ready replicas of web off {victim} within 20 s of the kill")
    survivors = {r["node"] for r in after}
    assert survivors <= {f"h{i}" for i in HOSTS} - {victim}
    moved = [r for r in after if r["id"] not in {w["id"] for w in web}]
    assert len(moved) == 1, "only the dead host's replica was replaced"
    (other,) = {f"h{i}" for i in HOSTS} - {victim, moved[0]["node"]}
    assert fetch(mesh, int(other[1:]), moved[0]) == container_hostname(mesh, moved[0])
