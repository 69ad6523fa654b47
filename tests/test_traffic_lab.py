"""Reaching services by name across lab hosts: the routing mesh and the DNS.

Real `meshd agent` processes, each in its own network namespace, run
process-driver replicas (a small Python HTTP server that answers which
replica and node it is). Clients run inside a host's namespace, as a program
on that machine would: they call ``127.0.0.1:<service_port>`` and the agent
DNS on ``127.0.0.1:8600``, and the mesh carries the request to a replica on
whichever host runs it. The last test cuts the power of a host (every process
in its namespace killed, optionally its network gone too) under steady load.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import _lab_available, lab_prefix, wait_for
from meshdlab import AgentProc, LabCluster

pytestmark = [pytest.mark.lab, pytest.mark.slow]

HOSTS = range(1, 5)
POLL = 0.2
NOT_YET = (AssertionError, RuntimeError, KeyError, TypeError, IndexError)
FAILOVER_S = 5.0
"""Errors seen by a client must stop this long after a host dies."""

REPLICA = r"""
import http.server, json, os
me = json.dumps({"replica": os.environ["MESHD_REPLICA"], "node": os.environ["MESHD_NODE"]})
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # head and body are two sends: no wait on a delayed ACK
    def do_GET(self):
        body = me.encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
addr = (os.environ["MESHD_ADDRESS"], int(os.environ["MESHD_PORT_HTTP"]))
http.server.ThreadingHTTPServer(addr, H).serve_forever()
"""

GETS = r"""
import http.client, json, sys
host, port, n, headers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
conn = http.client.HTTPConnection(host, port, timeout=5)
for _ in range(n):
    conn.request("GET", "/", headers=headers)
    resp = conn.getresponse()
    body = resp.read()
    if resp.status != 200:
        sys.exit(f"HTTP {resp.status}: {body[:200]!r}")
    print(body.decode(), flush=True)
"""
"""n sequential GETs on one keep-alive connection; one JSON answer a line."""

LOAD = r"""
import http.client, json, sys, time
host, port, seconds, limit, rate = (
    sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
start = time.monotonic()
conn = None
for k in range(limit):
    due = start + k / rate
    if due >= start + seconds:
        break
    time.sleep(max(0.0, due - time.monotonic()))  # pacing, so the load stays steady
    rec = {"t": time.time()}
    try:
        if conn is None:
            conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("GET", "/")
        resp = conn.getresponse()
        body = resp.read()
        rec["status"] = resp.status
        if resp.status == 200:
            rec.update(json.loads(body))
        else:
            rec["error"] = f"HTTP {resp.status}: {body[:200]!r}"
        if resp.will_close:
            conn.close()
            conn = None
    except Exception as exc:
        rec["error"] = repr(exc)[:200]
        if conn is not None:
            conn.close()
            conn = None
    rec["dt"] = round(time.time() - rec["t"], 4)
    print(json.dumps(rec), flush=True)
"""
"""Sequential GETs at a steady rate, bounded in time and count: one JSON line
per request with its start time, and the replica and node or the error."""

DIG = r"""
import json, sys
import dns.message, dns.query
q = dns.message.make_query(sys.argv[3], sys.argv[4])
r = dns.query.udp(q, sys.argv[1], port=int(sys.argv[2]), timeout=3)
print(json.dumps({
    "rcode": r.rcode(),
    "answer": [[str(rr.name), rd.to_text()] for rr in r.answer for rd in rr],
    "additional": [[str(rr.name), rd.to_text()] for rr in r.additional for rd in rr],
}))
"""


def spec(name: str, service_port: int, replicas: int = 3, **extra: Any) -> bytes:
    doc = {
        "name": name,
        "command": [sys.executable, "-c", REPLICA],
        "replicas": replicas,
        "ports": [
            {"name": "http", "target": 8080, "protocol": "http", "service_port": service_port}
        ],
        "health": {"http": "/", "port": "http", "interval": "1s"},
        **extra,
    }
    return json.dumps(doc).encode()


def until(pred: Callable[[], Any], timeout: float, message: str) -> Any:
    return wait_for(pred, timeout=timeout, interval=POLL, message=message, ignore=NOT_YET)


def run_py(cluster: LabCluster, i: int, script: str, *args: str, timeout: float = 30) -> str:
    """A Python snippet run to completion inside host i: its stdout."""
    out = cluster.lab.run(
        i, [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout
    )
    if out.returncode != 0:
        raise RuntimeError(f"on h{i}: {out.stderr.strip()[-500:]}")
    return out.stdout


def gets(
    cluster: LabCluster, i: int, port: int, n: int, headers: dict[str, str] | None = None
) -> list[dict[str, str]]:
    """n GETs from inside host i to its local service port: the answers."""
    text = run_py(cluster, i, GETS, "127.0.0.1", str(port), str(n), json.dumps(headers or {}))
    return [json.loads(line) for line in text.splitlines()]


def dig(cluster: LabCluster, i: int, name: str, rdtype: str) -> dict[str, Any]:
    """A query to host i's agent DNS, from inside host i."""
    return json.loads(run_py(cluster, i, DIG, "127.0.0.1", "8600", name, rdtype))


def crash_host(cluster: LabCluster, i: int) -> None:
    """Power cut: SIGKILL every process in the host's namespace (agent and replicas)."""
    out = subprocess.run(
        ["ip", "netns", "pids", cluster.lab.ns(i)], capture_output=True, text=True, check=True
    )
    for pid in map(int, out.stdout.split()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    cluster.agents[i].proc.wait(10)
    del cluster.agents[i]


def endpoints(agent: AgentProc, service: str) -> dict[str, Any]:
    return agent.api(f"/v1/services/{service}/endpoints")


def endpoint_view(agent: AgentProc, service: str) -> dict[str, tuple[str, int]]:
    """Replica id -> (node, host port of ``http``) as this node routes them."""
    return {
        e["id"]: (e["node"], e["ports"]["http"]) for e in endpoints(agent, service)["endpoints"]
    }


def serving_everywhere(cluster: LabCluster, service: str, n: int) -> dict[str, tuple[str, int]]:
    """Wait until every node routes the same n endpoints and listens on 127.0.0.1."""

    def check() -> dict[str, tuple[str, int]]:
        views = {}
        for i, agent in cluster.agents.items():
            got = endpoints(agent, service)
            assert len(got["endpoints"]) == n, f"h{i}: {len(got['endpoints'])} of {n} endpoints"
            listeners = got["listeners"]
            assert listeners and "127.0.0.1" in listeners[0]["addresses"], f"h{i}: {listeners}"
            views[i] = endpoint_view(agent, service)
        first = next(iter(views.values()))
        assert all(v == first for v in views.values()), views
        return first

    return until(check, 45, f"{n} endpoints of {service} on every node")


def delete(cluster: LabCluster, service: str) -> None:
    with contextlib.suppress(RuntimeError):
        cluster.agents[min(cluster.agents)].api(f"/v1/services/{service}", method="DELETE")


def deploy(cluster: LabCluster, via: int, name: str, body: bytes) -> None:
    status, doc = cluster.agents[via].request(f"/v1/services/{name}", method="PUT", body=body)
    assert status in (200, 201), doc


@pytest.fixture(scope="module")
def mesh(_stale_labs_reaped: None) -> Iterator[LabCluster]:
    _lab_available()
    extra = ["--driver", "process", "--dns-upstream", "127.0.0.1:9"]  # nothing forwarded out
    with LabCluster(len(HOSTS), prefix=lab_prefix(), subnet="10.88.0", extra=extra) as cluster:
        for i in HOSTS:
            cluster.start(i)
        assert cluster.wait(lambda: cluster.all_joined(HOSTS), 30), "cluster did not form"
        yield cluster


@pytest.fixture
def cluster(mesh: LabCluster) -> Iterator[LabCluster]:
    """The module's cluster with every host up: one a test crashed is started again."""
    mesh.lab.heal()
    for i in HOSTS:
        if i not in mesh.agents:
            mesh.start(i)
    assert mesh.wait(lambda: mesh.all_joined(HOSTS), 30), "cluster did not re-form"
    yield mesh


@pytest.fixture
def web(cluster: LabCluster) -> Iterator[dict[str, tuple[str, int]]]:
    """``web`` (3 replicas, service port 18080) deployed through h1 and routed everywhere."""
    deploy(cluster, 1, "web", spec("web", 18080))
    try:
        yield serving_everywhere(cluster, "web", 3)
    finally:
        delete(cluster, "web")


def test_requests_from_another_host_reach_replicas_on_several_hosts(
    cluster: LabCluster, web: dict[str, tuple[str, int]]
) -> None:
    nodes = {node for node, _ in web.values()}
    assert len(nodes) == 3, f"spread one per host: {web}"
    # A client on a host that did not take the deploy, preferably one running no replica.
    client = next((i for i in (4, 3, 2) if f"h{i}" not in nodes), 2)
    answers = gets(cluster, client, 18080, 30)
    seen = collections.Counter(a["replica"] for a in answers)
    assert set(seen) == set(web), f"from h{client}: {seen}, endpoints {web}"
    assert sorted(seen.values()) == [10, 10, 10], "round robin"
    assert {a["node"] for a in answers} == nodes
    for a in answers:  # each replica is where the routes say it is
        assert web[a["replica"]][0] == a["node"]


def test_dns_on_each_host_names_the_local_proxy_and_every_replica(
    cluster: LabCluster, web: dict[str, tuple[str, int]]
) -> None:
    want_srv = {(f"{node}.node.mesh.", port) for node, port in web.values()}
    for i in (2, 3):
        a = dig(cluster, i, "web.mesh.", "A")
        assert a["rcode"] == 0 and [rd for _, rd in a["answer"]] == ["127.0.0.1"], a

        srv = dig(cluster, i, "_http._tcp.web.mesh.", "SRV")
        got = set()
        for _, rd in srv["answer"]:
            _prio, _weight, port, target = rd.split()
            got.add((target, int(port)))
        assert got == want_srv, f"h{i}: {srv}"
        # The targets' addresses ride along: each node's lab address.
        glue = {name: rd for name, rd in srv["additional"]}
        for node, _ in web.values():
            assert glue.get(f"{node}.node.mesh.") == cluster.lab.addr(int(node[1:])), srv

        node = dig(cluster, i, "h1.node.mesh.", "A")
        assert [rd for _, rd in node["answer"]] == [cluster.lab.addr(1)], node

    # An SRV record is a real way to a replica: from h2 straight to each one.
    for node, port in web.values():
        text = run_py(
            cluster,
            2,
            "import sys, urllib.request; "
            "print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())",
            f"http://{cluster.lab.addr(int(node[1:]))}:{port}/",
        )
        assert json.loads(text)["node"] == node


def test_hash_on_a_header_picks_the_same_replica_from_every_node(cluster: LabCluster) -> None:
    balance = {"policy": "hash", "hash_on": "header:X-User"}
    deploy(cluster, 1, "cart", spec("cart", 18082, balance=balance))
    try:
        routed = serving_everywhere(cluster, "cart", 3)
        placed: dict[str, set[str]] = collections.defaultdict(set)
        for i in (2, 3, 4):
            for user in (f"user{k}" for k in range(8)):
                for a in gets(cluster, i, 18082, 3, {"X-User": user}):
                    placed[user].add(a["replica"])
        split = {u: r for u, r in placed.items() if len(r) != 1}
        assert not split, f"users served by several replicas: {split}"
        used = {next(iter(r)) for r in placed.values()}
        assert used <= set(routed) and len(used) >= 2, f"8 users on {used}"
    finally:
        delete(cluster, "cart")


class Load:
    """The LOAD client running inside one host; its lines are collected as they come."""

    def __init__(self, cluster: LabCluster, host: int, port: int, seconds: float) -> None:
        self.host = host
        self.records: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.proc = cluster.lab.popen(
            host,
            [sys.executable, "-c", LOAD, "127.0.0.1", str(port), str(seconds), "5000", "40"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError), self.cond:  # a line cut by the stop
                self.records.append(json.loads(line))
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def wait(self, pred: Callable[[list[dict[str, Any]]], bool], timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        with self.cond:
            while not pred(self.records):
                left = end - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"load from h{self.host}: never {what}")
                self.cond.wait(min(left, 0.5))

    def stop(self) -> list[dict[str, Any]]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)
        self._reader.join(5)
        with self.cond:
            return list(self.records)


@pytest.mark.parametrize("network", ["up", "gone"], ids=["processes_killed", "power_cut"])
def test_host_killed_under_steady_load(cluster: LabCluster, network: str) -> None:
    """``up``: the host's processes die but its kernel still answers (connection
    refused). ``gone``: its network goes too, so nothing answers at all and
    only timeouts and the failure detector tell."""
    name = f"shop{network}"
    deploy(cluster, 1, name, spec(name, 18083))
    load: Load | None = None
    try:
        routed = serving_everywhere(cluster, name, 3)
        nodes = {node for node, _ in routed.values()}
        leader = cluster.agents[1].api(f"/v1/services/{name}/leader")["node"]
        client = next((i for i in HOSTS if f"h{i}" not in nodes), 1)
        victim = next(int(n[1:]) for n in sorted(nodes) if n not in ("h1", leader, f"h{client}"))
        observer = cluster.agents[client]
        load = Load(cluster, client, 18083, seconds=45)
        load.wait(lambda rs: sum("replica" in r for r in rs) >= 40, 20, "40 answers")

        killed = time.time()
        if network == "gone":
            cluster.lab.split([victim], [i for i in HOSTS if i != victim])
        crash_host(cluster, victim)

        # The client's node stops routing to the dead host and a replacement
        # replica, placed on a surviving host, takes traffic.
        def replaced() -> bool:
            view = endpoint_view(observer, name)
            assert len(view) == 3 and f"h{victim}" not in {n for n, _ in view.values()}, view
            return True

        until(replaced, 40, f"{name} routed from h{client} without h{victim}")
        fresh = set(endpoint_view(observer, name)) - set(routed)
        load.wait(
            lambda rs: (
                any(r.get("replica") in fresh for r in rs) and rs[-1]["t"] > killed + FAILOVER_S + 1
            ),
            30,
            f"answers from the replacement {fresh}",
        )
        records = load.stop()
        declared = observer.dead.get(f"h{victim}")
    finally:
        if load is not None:
            load.stop()
        cluster.lab.heal()
        delete(cluster, name)

    after = [r for r in records if r["t"] >= killed]
    errors = [r for r in after if "error" in r]
    last_error = max((r["t"] - killed for r in errors), default=None)
    slowest = max(after, key=lambda r: r["dt"])
    summary = (
        f"{len(records)} requests from h{client}, {len(after)} after h{victim} died: "
        f"{len(errors)} failed, last error {last_error and round(last_error, 2)} s after; "
        f"slowest took {slowest['dt']} s at +{round(slowest['t'] - killed, 2)} s; "
        f"h{client} declared it dead at +{declared and round(declared - killed, 2)} s; "
        f"errors: {[(round(r['t'] - killed, 2), r['error']) for r in errors[:5]]}"
    )
    print(summary)
    assert last_error is None or last_error <= FAILOVER_S, summary
    late = [r for r in after if r["t"] > killed + FAILOVER_S]
    assert late and all("replica" in r for r in late), summary
    assert all(r["node"] != f"h{victim}" for r in late), summary
