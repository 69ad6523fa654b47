#!/usr/bin/env python3
"""How long a change of replicas takes to reach every node's proxy.

Forms a cluster of lab hosts (process driver), deploys ``web`` with one
replica per host and a service port, then alternately scales it up by one
and back down. For each change, the node that runs the added (or removed)
replica writes its status at ``updated_ms``; every node notes, in wall-clock
ms, when its own route for ``web`` changed (``changed_ms`` in
``/v1/services/web/endpoints``). The delay of a node is the difference; all
lab hosts share this machine's clock. Reported: p50/p99/max over every node
and change. Needs root. With --json the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchstats import percentile
from meshdlab import LabCluster

WWW = Path("/tmp/meshd-bench-route-www")
SERVICE_PORT = 18080


def spec(replicas: int) -> bytes:
    return json.dumps(
        {
            "name": "web",
            "command": ["sh", "-c", f"exec busybox httpd -f -p $MESHD_PORT_HTTP -h {WWW}"],
            "replicas": replicas,
            "ports": [
                {"name": "http", "target": 80, "protocol": "http", "service_port": SERVICE_PORT}
            ],
            "health": {"http": "/", "port": "http", "interval": "1s"},
        }
    ).encode()


def endpoints(cluster: LabCluster, i: int) -> dict[str, Any]:
    return cluster.agents[i].api("/v1/services/web/endpoints")


def settled(cluster: LabCluster, hosts: range, want: int) -> list[dict[str, Any]] | None:
    """Every node's endpoints once all list ``want`` replicas, else None."""
    got = [endpoints(cluster, i) for i in hosts]
    return got if all(len(g["endpoints"]) == want for g in got) else None


def wait_settled(cluster: LabCluster, hosts: range, want: int, limit: float) -> list[Any]:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        got = settled(cluster, hosts, want)
        if got is not None:
            return got
        time.sleep(0.1)
    raise SystemExit(f"the routes did not settle at {want} replicas within {limit}s")


def status_ms(cluster: LabCluster, node: str) -> int:
    """When ``node`` last wrote its status for web (0: it has none any more)."""
    status, doc = cluster.agents[1].request(f"/v1/kv/status/{node}/web?raw")
    if status == 404:
        return 0
    if isinstance(doc, dict):
        return int(doc.get("updated_ms", 0))
    return int(json.loads(doc).get("updated_ms", 0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=5)
    ap.add_argument("--changes", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not 3 <= args.hosts <= 20 or not 1 <= args.changes <= 200:
        ap.error("--hosts must be 3..20 and --changes 1..200")
    if os.geteuid() != 0:
        ap.error("needs root (network namespaces)")
    WWW.mkdir(exist_ok=True)
    (WWW / "index.html").write_text("ok\n")
    hosts = range(1, args.hosts + 1)
    delays: list[float] = []
    with LabCluster(
        args.hosts, prefix="brc", subnet="10.85.0", extra=["--driver", "process"]
    ) as cluster:
        for i in hosts:
            cluster.start(i)
        if not cluster.wait(lambda: cluster.all_joined(hosts), 30):
            raise SystemExit("cluster did not form")
        base = args.hosts
        cluster.agents[1].api("/v1/services/web", method="PUT", body=spec(base))
        before = wait_settled(cluster, hosts, base, 60)
        for k in range(args.changes):
            want = base + 1 if k % 2 == 0 else base
            old_ids = {e["id"] for e in before[0]["endpoints"]}
            cluster.agents[1].api(
                "/v1/services/web/scale",
                method="POST",
                body=json.dumps({"replicas": want}).encode(),
            )
            after = wait_settled(cluster, hosts, want, 60)
            new_ids = {e["id"] for e in after[0]["endpoints"]}
            moved = (new_ids ^ old_ids).pop()
            owner = next(
                e["node"]
                for e in (after[0]["endpoints"] + before[0]["endpoints"])
                if e["id"] == moved
            )
            written = status_ms(cluster, owner)
            if not written:  # the owner's last replica went: no status to date it by
                print(f"change {k}: {moved} left {owner} empty; not counted", file=sys.stderr)
                before = after
                continue
            per_node = [g["changed_ms"] - written for g in after]
            delays += per_node
            print(
                f"change {k}: {'+' if want > base else '-'}{moved} on {owner}: "
                f"reached every node in {max(per_node)} ms (per node {per_node})",
                file=sys.stderr,
            )
            before = after
            time.sleep(1.5)  # the drain of a removed replica, and health settling
    result = {
        "hosts": args.hosts,
        "changes": args.changes,
        "route_change_p50_ms": round(statistics.median(delays), 1),
        "route_change_p99_ms": round(percentile(delays, 99) or 0.0, 1),
        "route_change_max_ms": round(max(delays), 1),
        "samples_ms": delays,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"replica change reached every node's proxy: p50 {result['route_change_p50_ms']} ms, "
            f"p99 {result['route_change_p99_ms']} ms, max {result['route_change_max_ms']} ms "
            f"({len(delays)} node-changes)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
