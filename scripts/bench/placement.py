#!/usr/bin/env python3
"""Placements per second of the planner on one core.

Builds a synthetic cluster (`--nodes`, three zones, a few GPU nodes and some
not ready or with recent failures) and `--replicas` replica requests spread
over `--services` services of mixed shapes: some spread by zone, some
constrained to a zone or away from one, some needing a host port or a GPU.
Times one call to `plan()`. With --json the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from meshd.scheduler.placement import (
    Constraint,
    NodeInfo,
    ReplicaRequest,
    Resources,
    plan,
)

ZONES = ("a", "b", "c")


def make_nodes(n: int, rng: random.Random) -> list[NodeInfo]:
    nodes = []
    for i in range(n):
        gpus = 4 if i % 50 == 0 else 0
        cpu = rng.choice((8, 16, 32))
        nodes.append(
            NodeInfo(
                name=f"node-{i:05d}",
                labels={"zone": ZONES[i % 3], "rack": f"r{i % 40}"},
                allocatable=Resources(cpu, cpu * 4096, 500_000, gpus),
                used=Resources(rng.choice((0.0, 0.5, 1.0)), rng.choice((0, 512, 2048)), 0, 0),
                ports_used=frozenset(),
                recent_failures=1 if i % 97 == 0 else 0,
                ready=i % 211 != 0,
            )
        )
    return nodes


def make_requests(replicas: int, services: int, rng: random.Random) -> list[ReplicaRequest]:
    shapes = []
    for s in range(services):
        kind = s % 10
        cons: list[Constraint] = []
        spread = "node"
        ports: tuple[int, ...] = ()
        gpus = 0
        if kind == 1:
            spread = "zone"
        elif kind == 2:
            cons = [Constraint("label.zone", "==", ZONES[s % 3])]
        elif kind == 3:
            cons = [Constraint("label.zone", "!=", "c")]
        elif kind == 4:
            ports = (8000 + s % 50,)
        elif kind == 5 and s % 20 == 5:
            gpus = 1
        res = Resources(rng.choice((0.1, 0.25, 0.5)), rng.choice((64, 128, 256)), 100, gpus)
        shapes.append((f"svc-{s:04d}", res, cons, spread, ports))
    per = replicas // services
    out = []
    for s, (name, res, cons, spread, ports) in enumerate(shapes):
        count = per + (1 if s < replicas % services else 0)
        out.extend(ReplicaRequest(name, k, res, cons, spread, ports) for k in range(count))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=5000)
    ap.add_argument("--replicas", type=int, default=100_000)
    ap.add_argument("--services", type=int, default=200)
    ap.add_argument("--strategy", choices=("spread", "binpack"), default="spread")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    nodes = make_nodes(args.nodes, rng)
    requests = make_requests(args.replicas, max(1, args.services), rng)
    t0 = time.perf_counter()
    result = plan(requests, nodes, strategy=args.strategy, seed=args.seed)
    wall = time.perf_counter() - t0
    out = {
        "nodes": args.nodes,
        "replicas": len(requests),
        "services": args.services,
        "strategy": args.strategy,
        "placed": len(result.placements),
        "pending": len(result.pending),
        "wall_s": round(wall, 3),
        "placements_per_s": round(len(requests) / wall),
    }
    if not args.json:
        for k, v in out.items():
            print(f"{k:>18}: {v}")
        if result.pending:
            print(f"{'first pending':>18}: {result.pending[0].reason}")
    print(json.dumps(out) if args.json else "", end="\n" if args.json else "")


if __name__ == "__main__":
    main()
