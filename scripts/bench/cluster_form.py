#!/usr/bin/env python3
"""Zero-config cluster formation on lab hosts, and the idle agent's cost.

Starts one `meshd agent` per lab host with nothing but the interface (and,
since the lab hosts share one machine, a node name and data dir each) and
measures the seconds from the last agent's start until every agent has seen
every other one join, found by mDNS. Two ways of starting: all at once (the
agents also compete for this machine's 2 cores while starting), and one per
second (as people start them on separate machines). Then the formed cluster
idles and each agent's RSS and CPU are read.

Needs root. With --json the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshdlab import LabCluster


def form_once(hosts: int, stagger: float, prefix: str) -> tuple[float | None, LabCluster]:
    cluster = LabCluster(hosts, prefix=prefix, subnet="10.90.0").__enter__()
    for i in range(1, hosts + 1):
        cluster.start(i)
        if stagger and i < hosts:
            time.sleep(stagger)
    t_last = cluster.agents[hosts].started
    if not cluster.wait(cluster.all_joined, 30):
        return None, cluster
    return cluster.formed_at() - t_last, cluster


def idle_cost(cluster: LabCluster, seconds: float) -> dict[str, float]:
    agents = list(cluster.agents.values())
    cpu0 = [a.cpu_s() for a in agents]
    t0 = time.monotonic()
    time.sleep(seconds)  # the measurement window itself
    dt = time.monotonic() - t0
    cpu = [(a.cpu_s() - c) / dt * 100 for a, c in zip(agents, cpu0, strict=True)]
    return {
        "rss_mb": round(statistics.median(a.rss_mb() for a in agents), 1),
        "rss_max_mb": round(max(a.rss_mb() for a in agents), 1),
        "cpu_pct": round(statistics.median(cpu), 2),
        "cpu_max_pct": round(max(cpu), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hosts", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--stagger", type=float, default=1.0, help="seconds between starts")
    ap.add_argument("--idle-seconds", type=float, default=30.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not 2 <= args.hosts <= 20 or args.repeats < 1:
        ap.error("--hosts in 2..20 and --repeats >= 1")
    result: dict[str, object] = {"hosts": args.hosts, "repeats": args.repeats}
    for mode, stagger in (("together", 0.0), ("staggered", args.stagger)):
        times: list[float] = []
        missed = 0
        for r in range(args.repeats):
            formed, cluster = form_once(args.hosts, stagger, "cf")
            try:
                if formed is None:
                    missed += 1
                else:
                    times.append(formed)
                print(f"{mode} {r + 1}/{args.repeats}: {formed}", file=sys.stderr)
                if mode == "staggered" and r == args.repeats - 1:
                    result["idle"] = idle_cost(cluster, args.idle_seconds)
            finally:
                cluster.close()
        result[mode] = {
            "form_p50_s": round(statistics.median(times), 3) if times else None,
            "form_max_s": round(max(times), 3) if times else None,
            "all": [round(t, 3) for t in times],
            "missed": missed,
        }
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
