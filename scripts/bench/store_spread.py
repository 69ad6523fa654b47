#!/usr/bin/env python3
"""How fast a write on one node becomes readable on every node.

Forms a cluster of lab hosts (mDNS, as cluster_form.py), then a writer on
host 1 PUTs `--writes` keys through its local API, one every `--interval`
seconds, while a watcher on every host polls its own agent's API for each
key in turn (keep-alive HTTP, 2 ms between polls). All processes share this
machine's clock, so spread = the last host's first sight minus the moment
before the PUT was sent. Needs root. With --json the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchstats import percentile
from meshdlab import API_PORT, LabCluster

WATCHER = f"""
import http.client, json, sys, time
n = int(sys.argv[1])
conn = http.client.HTTPConnection("127.0.0.1", {API_PORT}, timeout=5)
for j in range(n):
    end = time.time() + 20
    seen = None
    while time.time() < end:
        conn.request("GET", f"/v1/kv/bench/k{{j}}")
        r = conn.getresponse()
        r.read()
        if r.status == 200:
            seen = time.time()
            break
        time.sleep(0.002)
    print(json.dumps({{"j": j, "t": seen}}), flush=True)
"""

WRITER = f"""
import http.client, json, sys, time
n, interval = int(sys.argv[1]), float(sys.argv[2])
conn = http.client.HTTPConnection("127.0.0.1", {API_PORT}, timeout=5)
for j in range(n):
    t0 = time.time()
    conn.request("PUT", f"/v1/kv/bench/k{{j}}", body=b"v" * 64)
    r = conn.getresponse()
    r.read()
    print(json.dumps({{"j": j, "t": t0, "status": r.status, "ack_ms": (time.time() - t0) * 1000}}), flush=True)
    time.sleep(interval)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hosts", type=int, default=5)
    ap.add_argument("--writes", type=int, default=100)
    ap.add_argument("--interval", type=float, default=0.2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not 2 <= args.hosts <= 20 or not 1 <= args.writes <= 10_000:
        ap.error("--hosts in 2..20, --writes in 1..10000")
    with LabCluster(args.hosts, prefix="ss", subnet="10.91.0") as cluster:
        for i in range(1, args.hosts + 1):
            cluster.start(i)
            time.sleep(0.3)
        if not cluster.wait(cluster.all_joined, 30):
            raise SystemExit("the cluster did not form")
        py = sys.executable
        watchers = {
            i: cluster.lab.popen(
                i, [py, "-c", WATCHER, str(args.writes)], stdout=subprocess.PIPE, text=True
            )
            for i in range(1, args.hosts + 1)
        }
        time.sleep(0.5)  # let every watcher start polling before the first write
        writer = cluster.lab.run(
            1,
            [py, "-c", WRITER, str(args.writes), str(args.interval)],
            capture_output=True,
            text=True,
            timeout=args.writes * (args.interval + 5) + 30,
        )
        writes = {d["j"]: d for d in map(json.loads, writer.stdout.splitlines())}
        seen: dict[int, dict[int, float | None]] = {}
        for i, w in watchers.items():
            out, _ = w.communicate(timeout=60)
            for d in map(json.loads, out.splitlines()):
                seen.setdefault(d["j"], {})[i] = d["t"]
    spreads, missed = [], 0
    for j, w in writes.items():
        ts = seen.get(j, {})
        if w["status"] != 200 or len(ts) < args.hosts or any(t is None for t in ts.values()):
            missed += 1
            continue
        spreads.append(max(ts.values()) - w["t"])  # type: ignore[type-var]
    acks = [w["ack_ms"] for w in writes.values()]
    result = {
        "hosts": args.hosts,
        "writes": args.writes,
        "spread_p50_ms": round((percentile(spreads, 50) or 0.0) * 1000, 1) if spreads else None,
        "spread_p99_ms": round((percentile(spreads, 99) or 0.0) * 1000, 1) if spreads else None,
        "spread_max_ms": round(max(spreads) * 1000, 1) if spreads else None,
        "write_ack_p50_ms": round(statistics.median(acks), 2) if acks else None,
        "missed": missed,
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
