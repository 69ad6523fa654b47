#!/usr/bin/env python3
"""From PUT of a service to every replica ready, on lab hosts.

Forms a cluster of lab hosts (with --driver docker each host has its own
Docker engine holding the test image), then deploys one HTTP service of
--replicas replicas through host 1 and measures until host 1's API lists them
all ready: running and passing their HTTP health check. The service is then
deleted, and the next repeat starts once host 1 no longer knows it and no
replica is left on any host (no container on any engine, no process beside
the agent in any host).

A first, untimed deploy of one replica per host warms the cluster up: every
node has registered with the others (placement skips nodes it has not yet
heard register, which would skew the spread) and every engine has run a
container once.

The PUT is sent by a process inside host 1's namespace, which then polls host
1's API every 10 ms over the same keep-alive connection; both ends of the
interval are read in that process. Needs root. With --json the last line is
JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labhosts import TEST_IMAGE
from meshdlab import API_PORT, LabCluster

WWW = Path("/tmp/meshd-bench-deploy-www")
SERVICE = "web"
WARMUP = "warmup"

DEPLOYER = f"""
import http.client, json, sys, time
service, want, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
body = sys.stdin.buffer.read()
conn = http.client.HTTPConnection("127.0.0.1", {API_PORT}, timeout=5)
conn.connect()  # before the clock starts: the interval is meshd's, not ours
t0 = time.monotonic()
conn.request("PUT", "/v1/services/" + service, body=body,
             headers={{"Content-Type": "application/json"}})
r = conn.getresponse()
answer = r.read()
if r.status not in (200, 201):
    print(json.dumps({{"error": f"PUT {{r.status}}: {{answer[:300]!r}}"}}), flush=True)
    sys.exit(1)
polls, seen = 0, []
while time.monotonic() - t0 < limit:
    polls += 1
    try:
        conn.request("GET", f"/v1/services/{{service}}/replicas")
        r = conn.getresponse()
        listed = json.loads(r.read()) if r.status == 200 else []
    except Exception:
        conn = http.client.HTTPConnection("127.0.0.1", {API_PORT}, timeout=5)
        listed = []
    seen = [x for x in listed
            if x["state"] == "running" and x["health"] in ("healthy", "none")]
    if len(seen) == want:
        t1 = time.monotonic()
        nodes = {{}}
        for x in seen:
            nodes[x["node"]] = nodes.get(x["node"], 0) + 1
        restarts = sum(x["restarts"] for x in seen)
        print(json.dumps({{"s": t1 - t0, "polls": polls, "nodes": nodes, "restarts": restarts}}),
              flush=True)
        sys.exit(0)
    time.sleep(0.01)
print(json.dumps({{"error": f"{{len(seen)}} of {{want}} ready after {{limit}}s"}}), flush=True)
sys.exit(1)
"""


def spec(driver: str, replicas: int) -> dict[str, Any]:
    """The same HTTP service for either driver: busybox httpd serving one page."""
    common: dict[str, Any] = {
        "replicas": replicas,
        "ports": [{"name": "http", "target": 80}],
        "health": {"http": "/", "port": "http", "interval": "1s"},
    }
    if driver == "docker":
        page = "mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 80 -h /www"
        return {"image": TEST_IMAGE, "args": ["sh", "-c", page], **common}
    return {
        "command": ["sh", "-c", f"exec busybox httpd -f -p $MESHD_PORT_HTTP -h {WWW}"],
        **common,
    }


def deploy(cluster: LabCluster, name: str, body: dict[str, Any], limit: float) -> dict[str, Any]:
    """PUT the service from inside host 1 and wait there until all are ready."""
    doc = json.dumps({"name": name, **body}).encode()
    out = cluster.lab.run(
        1,
        [sys.executable, "-c", DEPLOYER, name, str(body["replicas"]), str(limit)],
        input=doc,
        capture_output=True,
        timeout=limit + 30,
    )
    lines = [ln for ln in out.stdout.decode().splitlines() if ln.startswith("{")]
    if not lines:
        return {"error": f"deployer failed: {out.stderr.decode()[-500:]}"}
    return json.loads(lines[-1])


def leftovers(cluster: LabCluster, driver: str) -> list[str]:
    """What still runs of deleted services: containers, or processes beside the agent."""
    found = []
    for i, agent in cluster.agents.items():
        if driver == "docker":
            found += [f"h{i}:{c}" for c in cluster.containers(i)]
            continue
        out = subprocess.run(
            ["ip", "netns", "pids", cluster.lab.ns(i)], capture_output=True, text=True, check=True
        )
        found += [f"h{i}:pid {p}" for p in out.stdout.split() if int(p) != agent.proc.pid]
    return found


def delete(cluster: LabCluster, name: str, driver: str, limit: float) -> None:
    """DELETE the service and wait until host 1 forgets it and nothing of it runs."""
    h1 = cluster.agents[1]
    status, doc = h1.request(f"/v1/services/{name}", method="DELETE")
    if status != 200:
        raise SystemExit(f"DELETE {name}: HTTP {status}: {doc}")
    end = time.monotonic() + limit
    while True:
        status, _ = h1.request(f"/v1/services/{name}/replicas")
        left = leftovers(cluster, driver)
        if status == 404 and not left:
            return
        if time.monotonic() > end:
            raise SystemExit(f"{name} not gone {limit}s after DELETE: {left[:5]}")
        time.sleep(0.2)


def ensure_image(cluster: LabCluster) -> None:
    """Every engine holds the test image (the lab loads it; a pull would fail)."""
    for i in cluster.agents:
        if cluster.docker_cli(i, "image", "inspect", TEST_IMAGE).returncode == 0:
            continue
        saved = subprocess.run(["docker", "save", TEST_IMAGE], capture_output=True, check=True)
        subprocess.run(
            ["docker", "-H", cluster.lab.docker_host(i), "load", "-q"],
            input=saved.stdout,
            capture_output=True,
            timeout=120,
        )
        if cluster.docker_cli(i, "image", "inspect", TEST_IMAGE).returncode != 0:
            raise SystemExit(f"h{i}: could not load {TEST_IMAGE} into its engine")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=3)
    ap.add_argument("--replicas", type=int, default=30)
    ap.add_argument("--driver", choices=("docker", "process"), default="docker")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit", type=float, default=120.0, help="give up on one deploy after this")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not 1 <= args.hosts <= 20 or not 1 <= args.repeats <= 100:
        ap.error("--hosts must be 1..20 and --repeats 1..100")
    if not 1 <= args.replicas <= 300:
        ap.error("--replicas must be 1..300")
    if os.geteuid() != 0:
        ap.error("needs root (network namespaces)")
    WWW.mkdir(exist_ok=True)
    (WWW / "index.html").write_text("ok\n")
    hosts = range(1, args.hosts + 1)
    docker = args.driver == "docker"
    times: list[float] = []
    failed = 0
    with LabCluster(
        args.hosts,
        prefix="bdp",
        subnet="10.87.0",
        docker=docker,
        extra=[] if docker else ["--driver", "process"],
    ) as cluster:
        for i in hosts:
            cluster.start(i)
        if not cluster.wait(lambda: cluster.all_joined(hosts), 30):
            raise SystemExit("cluster did not form")
        if docker:
            ensure_image(cluster)
        warm = deploy(cluster, WARMUP, spec(args.driver, args.hosts), args.limit)
        if "error" in warm:
            raise SystemExit(f"warm-up deploy failed: {warm['error']}")
        delete(cluster, WARMUP, args.driver, 60)
        for k in range(args.repeats):
            got = deploy(cluster, SERVICE, spec(args.driver, args.replicas), args.limit)
            if "error" in got:
                failed += 1
                print(f"repeat {k}: {got['error']}", file=sys.stderr)
            else:
                times.append(got["s"])
                spread = ", ".join(f"{n}: {c}" for n, c in sorted(got["nodes"].items()))
                print(
                    f"repeat {k}: {args.replicas} replicas ready in {got['s']:.2f}s "
                    f"({spread}; {got['restarts']} restarts; {got['polls']} polls)",
                    file=sys.stderr,
                )
            delete(cluster, SERVICE, args.driver, 60)
    result = {
        "hosts": args.hosts,
        "replicas": args.replicas,
        "driver": args.driver,
        "repeats": args.repeats,
        "failed": failed,
        "p50_s": round(statistics.median(times), 3) if times else None,
        "max_s": round(max(times), 3) if times else None,
        "times_s": [round(t, 3) for t in times],
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"deploy of {args.replicas} replicas on {args.hosts} hosts ({args.driver}), "
            f"{len(times)} repeats: p50 {result['p50_s']}s, max {result['max_s']}s"
        )
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
