#!/usr/bin/env python3
"""Gossip at scale in virtual time: how fast a join and a crash spread.

Starts N members (sharing one membership table, as after a push-pull), lets
a new member join through the real join path, crashes a random member, and
runs to `--duration` virtual seconds counting false positives. The last line
with --json is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gossip.config import PROFILES
from gossip.events import EventKind
from gossip.sim import Simulation


def run(members: int, loss: float, seed: int, duration: float, profile: str) -> dict[str, object]:
    wall0 = time.perf_counter()
    sim = Simulation(seed=seed, config=PROFILES[profile](), loss=loss, record_events=False)
    nodes = sim.add_nodes(members)
    sim.bootstrap()
    setup_s = time.perf_counter() - wall0
    sim.run_for(2.0)

    joiner = sim.add_node("joiner")
    t_join = sim.now
    sim.join(joiner, sim.rng.choice(nodes))
    seen_join = lambda: len(sim.first_seen.get((EventKind.JOIN, "joiner"), {})) >= members  # noqa: E731
    sim.run_until_true(seen_join, timeout=60.0, step=0.05)
    joined = sim.first_seen.get((EventKind.JOIN, "joiner"), {})
    join_spread = max(joined.values()) - t_join if len(joined) >= members else None

    victim = sim.rng.choice(nodes)
    sim.crash(victim)
    t_crash = sim.now
    observers = members  # everyone else, joiner included
    seen_dead = lambda: len(sim.first_seen.get((EventKind.DEAD, victim.name), {})) >= observers  # noqa: E731
    sim.run_until_true(seen_dead, timeout=120.0, step=0.05)
    dead = sim.first_seen.get((EventKind.DEAD, victim.name), {})
    death_spread = max(dead.values()) - t_crash if len(dead) >= observers else None

    if sim.now < duration:
        sim.run_until(duration)
    false_pos = sum(
        len(who)
        for (kind, name), who in sim.first_seen.items()
        if kind == EventKind.DEAD and name != victim.name
    )
    false_susp = sum(
        len(who)
        for (kind, name), who in sim.first_seen.items()
        if kind == EventKind.SUSPECT and name != victim.name
    )
    return {
        "members": members,
        "loss": loss,
        "seed": seed,
        "profile": profile,
        "virtual_s": round(sim.now, 3),
        "join_spread_s": None if join_spread is None else round(join_spread, 3),
        "join_reached": len(joined),
        "death_spread_s": None if death_spread is None else round(death_spread, 3),
        "death_reached": len(dead),
        "false_positives": false_pos,
        "false_suspicions": false_susp,
        "bytes_per_member_s": round(sim.bytes_sent / ((members + 1) * sim.now), 1),
        "packets_per_member_s": round(sim.packets_sent / ((members + 1) * sim.now), 2),
        "setup_s": round(setup_s, 2),
        "wall_s": round(time.perf_counter() - wall0, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--members", type=int, default=100)
    ap.add_argument("--loss", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--duration", type=float, default=60.0, help="virtual seconds")
    ap.add_argument("--profile", choices=sorted(PROFILES), default="lan")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.members < 3 or not 0 <= args.loss < 1:
        ap.error("--members must be >= 3 and --loss in [0, 1)")
    result = run(args.members, args.loss, args.seed, args.duration, args.profile)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>22}: {v}")


if __name__ == "__main__":
    main()
