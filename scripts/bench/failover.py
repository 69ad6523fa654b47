#!/usr/bin/env python3
"""From kill -9 of a host to all of its replicas healthy elsewhere.

Forms a cluster of lab hosts (process driver), deploys three services with
an HTTP health check and one replica per host each, then repeatedly crashes one
host other than the observer (SIGKILL to every process in its namespace:
the agent and its replicas, as a power cut), and measures until the
observer's API lists every replica ready and none on the crashed host. The
crashed host is then started again (same data dir) and the cluster settles
before the next repeat. Crashes include leaders of the service, so the
figure covers lease takeover too.

A watcher process inside the observer's namespace polls its agent over a
keep-alive connection every 10 ms; all processes share this machine's clock.
Needs root. With --json the last line is JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchstats import percentile
from meshdlab import API_PORT, LabCluster

WWW = Path("/tmp/meshd-bench-failover-www")

WATCHER = f"""
import http.client, json, sys, time
services, want, avoid = sys.argv[1].split(","), int(sys.argv[2]), sys.argv[3]
limit = float(sys.argv[4])
conn = http.client.HTTPConnection("127.0.0.1", {API_PORT}, timeout=5)
end = time.time() + limit
while time.time() < end:
    whole = True
    for service in services:
        try:
            conn.request("GET", f"/v1/services/{{service}}/replicas")
            r = conn.getresponse()
            body = json.loads(r.read())
        except Exception:
            conn = http.client.HTTPConnection("127.0.0.1", {API_PORT}, timeout=5)
            whole = False
            break
        ready = [x for x in body if x["state"] == "running" and x["health"] in ("healthy", "none")]
        if len(ready) != want or any(x["node"] == avoid for x in ready):
            whole = False
            break
    if whole:
        print(json.dumps({{"t": time.time()}}), flush=True)
        sys.exit(0)
    time.sleep(0.01)
print(json.dumps({{"t": None}}), flush=True)
"""


SERVICES = ("web", "api", "shop")
"""Three services, so their leaders are spread and crashes hit leaders too."""


def spec(name: str, replicas: int) -> bytes:
    return json.dumps(
        {
            "name": name,
            "command": ["sh", "-c", f"exec busybox httpd -f -p $MESHD_PORT_HTTP -h {WWW}"],
            "replicas": replicas,
            "ports": [{"name": "http", "target": 80}],
            "health": {"http": "/", "port": "http", "interval": "1s"},
        }
    ).encode()


def crash(cluster: LabCluster, i: int) -> float:
    out = subprocess.run(
        ["ip", "netns", "pids", cluster.lab.ns(i)], capture_output=True, text=True, check=True
    )
    t0 = time.time()
    for pid in map(int, out.stdout.split()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    cluster.agents[i].proc.wait(10)
    del cluster.agents[i]
    return t0


def wait_ready(cluster: LabCluster, want: int, avoid: str, limit: float) -> float | None:
    proc = cluster.lab.run(
        1,
        [sys.executable, "-c", WATCHER, ",".join(SERVICES), str(want), avoid, str(limit)],
        capture_output=True,
        text=True,
        timeout=limit + 10,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])["t"] if lines else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--per-host", type=int, default=1, help="replicas per host, per service")
    ap.add_argument("--limit", type=float, default=60.0, help="give up on one repeat after this")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not 3 <= args.hosts <= 20 or not 1 <= args.repeats <= 100:
        ap.error("--hosts must be 3..20 and --repeats 1..100")
    if os.geteuid() != 0:
        ap.error("needs root (network namespaces)")
    WWW.mkdir(exist_ok=True)
    (WWW / "index.html").write_text("ok\n")
    rng = random.Random(args.seed)
    hosts = range(1, args.hosts + 1)
    replicas = args.per_host * args.hosts
    times: list[float] = []
    leader_kills = 0
    failed = 0
    with LabCluster(
        args.hosts, prefix="bfo", subnet="10.86.0", extra=["--driver", "process"]
    ) as cluster:
        for i in hosts:
            cluster.start(i)
        if not cluster.wait(lambda: cluster.all_joined(hosts), 30):
            raise SystemExit("cluster did not form")
        for name in SERVICES:
            cluster.agents[1].api(f"/v1/services/{name}", method="PUT", body=spec(name, replicas))
        if wait_ready(cluster, replicas, "", 60) is None:
            raise SystemExit("service never became ready")
        for k in range(args.repeats):
            # A host that runs replicas (after restarts some run none).
            busy = sorted(
                {
                    int(r["node"][1:])
                    for name in SERVICES
                    for r in cluster.agents[1].api(f"/v1/services/{name}/replicas")
                }
                - {1}
            )
            victim = rng.choice(busy)
            leaders = {
                cluster.agents[1].api(f"/v1/services/{name}/leader")["node"] for name in SERVICES
            }
            leader = f"h{victim}" if f"h{victim}" in leaders else None
            leader_kills += leader is not None
            t0 = crash(cluster, victim)
            t1 = wait_ready(cluster, replicas, f"h{victim}", args.limit)
            if t1 is None:
                failed += 1
                print(f"repeat {k}: h{victim} not recovered in {args.limit}s", file=sys.stderr)
            else:
                times.append(t1 - t0)
                print(
                    f"repeat {k}: crashed h{victim}{' (leader)' if leader == f'h{victim}' else ''}"
                    f": healthy elsewhere in {t1 - t0:.2f}s",
                    file=sys.stderr,
                )
            cluster.start(victim)
            if not cluster.wait(lambda: cluster.all_joined(hosts), 30):
                raise SystemExit(f"h{victim} did not rejoin")
            # Settle: the restarted host is alive everywhere and the service is whole.
            wait_ready(cluster, replicas, "", 60)
            time.sleep(3)  # let suspicion timers and leases of the restart settle
    result = {
        "hosts": args.hosts,
        "replicas": replicas,
        "repeats": args.repeats,
        "leader_kills": leader_kills,
        "failed": failed,
        "p50_s": round(statistics.median(times), 3) if times else None,
        "p99_s": round(percentile(times, 99) or 0.0, 3) if times else None,
        "max_s": round(max(times), 3) if times else None,
        "times_s": [round(t, 3) for t in times],
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"failover over {len(times)} crashes ({leader_kills} of the leader): "
            f"p50 {result['p50_s']}s, p99 {result['p99_s']}s, max {result['max_s']}s"
        )
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
