"""Every tunable of the gossip protocol, with its default and the reason for it.

Three profiles cover the usual networks: `lan_config()` (the default: one
data centre or office LAN), `local_config()` (loopback and tests, where
round trips are microseconds) and `wan_config()` (links with tens to
hundreds of milliseconds of latency). All durations are in seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(slots=True)
class Config:
    # ---- failure detection -------------------------------------------------
    probe_interval: float = 0.4
    """Time between probes. 0.4 s on a LAN finds a crashed member within
    about a second in small clusters, for five small datagrams per second
    per member (pings out, acks back)."""
    probe_timeout: float = 0.2
    """Wait for a direct ack before asking others to probe. LAN round trips
    are under a millisecond; 200 ms leaves room for a busy peer."""
    indirect_checks: int = 3
    """Members asked to probe on our behalf (ping-req). Three independent
    paths make a false suspicion from random loss very unlikely."""
    tcp_fallback: bool = True
    """Also try a TCP ping when UDP fails: UDP-only filtering or loss must not
    make a healthy member look dead."""
    suspicion_mult: float = 1.0
    """Minimum suspicion timeout = mult x max(1, log10 N) x probe_interval.
    Refutation on a LAN takes milliseconds, so one probe interval (scaled by
    cluster size) is enough for a suspect to answer."""
    suspicion_max_timeout_mult: float = 3.0
    """Maximum suspicion timeout = this x the minimum. A lone suspicion waits
    the maximum; independent confirmations shorten it towards the minimum
    (Lifeguard's dynamic suspicion)."""
    suspicion_confirmations: int = 2
    """Independent confirmations that bring the timeout down to the minimum
    (capped by N-2, as no more members can confirm)."""
    awareness_max_multiplier: int = 8
    """Local health score ceiling: a struggling node stretches its probe
    interval and timeout up to this factor instead of accusing others."""

    # ---- dissemination -----------------------------------------------------
    gossip_interval: float = 0.1
    """Period of piggyback gossip to random members. Spread time is about
    log_fanout(N) of these."""
    gossip_nodes: int = 3
    """Fan-out of each gossip round."""
    gossip_to_the_dead_time: float = 30.0
    """Keep gossiping to a dead member for this long so that a falsely
    declared member learns of it and refutes."""
    retransmit_mult: int = 4
    """Each broadcast is sent retransmit_mult x ceil(log10(N+1)) times, which
    reaches every member with high probability."""
    retransmit_min: int = 8
    """Floor on the retransmit limit. In a small cluster mult x log10(N+1) is
    4 sends, and a message then misses some member about once in a thousand
    (each holder's few sends can all pick others); 8 makes that about one in
    a million, for a cost only small clusters pay."""
    udp_buffer_size: int = 1400
    """Largest datagram we build: fits a 1500-byte Ethernet MTU with IP/UDP
    headers, so nothing is fragmented."""
    broadcast_queue_max: int = 4096
    """Queued broadcasts beyond this are pruned, most-sent first: a member
    that just learned a large cluster must not gossip old news for minutes."""
    push_pull_interval: float = 30.0
    """Full state exchange with one random member; heals partitions and
    repairs anything gossip missed. Scaled up beyond 32 members."""
    tcp_timeout: float = 10.0
    """Deadline for one stream exchange (push-pull or TCP ping)."""

    # ---- membership --------------------------------------------------------
    dead_reap_time: float = 300.0
    """Dead or left members are forgotten after this long; keeps memory
    bounded while letting everyone see the final state first."""
    leave_propagate_time: float = 1.0
    """Longest a graceful leave waits for its message to go out."""

    # ---- security and limits ----------------------------------------------
    cluster_name: str = "default"
    """Bound into every packet's authenticated data: two clusters on one LAN
    never merge even if they share a key."""
    allow_plaintext: bool = False
    """Plaintext is allowed only by explicit choice."""
    replay_window: float = 60.0
    """Packets whose timestamp is further than this from our clock are
    refused; within it, a nonce cache refuses exact replays."""
    max_members: int = 100_000
    """Refuse to grow beyond this: bounds memory under a flood of forged joins."""

    def suspicion_min(self, n: int) -> float:
        """Lifeguard's minimum suspicion timeout for a cluster of n members."""
        return self.suspicion_mult * max(1.0, math.log10(max(1, n))) * self.probe_interval

    def retransmit_limit(self, n: int) -> int:
        return max(self.retransmit_min, self.retransmit_mult * math.ceil(math.log10(n + 1)))

    def push_pull_scaled(self, n: int) -> float:
        """Push-pull interval scaled with size: beyond 32 members double it for
        each doubling, so state exchange traffic grows slowly."""
        if n <= 32:
            return self.push_pull_interval
        return self.push_pull_interval * (math.ceil(math.log2(n) - math.log2(32)) + 1)


def lan_config(**overrides: object) -> Config:
    """One data centre or office LAN: the defaults above."""
    return replace(Config(), **overrides)


def local_config(**overrides: object) -> Config:
    """Loopback and tests: fast timers, since round trips are microseconds."""
    base = Config(
        probe_interval=0.2,
        probe_timeout=0.05,
        gossip_interval=0.05,
        suspicion_mult=1.0,
        push_pull_interval=5.0,
        tcp_timeout=2.0,
        gossip_to_the_dead_time=10.0,
        dead_reap_time=30.0,
        leave_propagate_time=0.5,
    )
    return replace(base, **overrides)


def wan_config(**overrides: object) -> Config:
    """Links of tens to hundreds of ms: longer timeouts, more patience before
    declaring death (memberlist's WAN numbers)."""
    base = Config(
        probe_interval=5.0,
        probe_timeout=3.0,
        suspicion_mult=6.0,
        suspicion_max_timeout_mult=6.0,
        suspicion_confirmations=4,
        gossip_interval=0.5,
        gossip_nodes=4,
        gossip_to_the_dead_time=60.0,
        push_pull_interval=60.0,
        tcp_timeout=30.0,
        dead_reap_time=3600.0,
        leave_propagate_time=3.0,
        replay_window=300.0,
    )
    return replace(base, **overrides)


PROFILES = {"lan": lan_config, "local": local_config, "wan": wan_config}
