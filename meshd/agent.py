"""The agent: configuration in, running components out, clean shutdown.

Wiring only: every feature lives in its own package (gossip membership,
mDNS discovery, the replicated store, the HTTP API); this module builds them
from the configuration, connects them and owns their tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gossip import PROFILES, Gossip, Keyring, State
from gossip.driver import format_addr

from . import __version__
from .api import create_app, serve
from .config import AgentConfig
from .discovery import MdnsDiscovery, Peer
from .facts import NodeFacts, collect_facts, decode_meta, encode_meta
from .rpc import Mux, Rpc
from .runtime.auto import choose_driver
from .runtime.base import Driver, DriverUnavailable
from .scheduler.placement import Resources
from .spec import ServiceSpec
from .state.replication import GossipTransport, Replicator
from .state.store import Entry, PersistenceError, Store
from .traffic import Traffic, TrafficStartError
from .workloads import Workloads

log = logging.getLogger("meshd.agent")

JOIN_BACKOFF_FIRST = 0.5
JOIN_BACKOFF_MAX = 30.0
GC_INTERVAL = 60.0
"""How often tombstones past their lifetime are collected."""
YOUNG_GC_THRESHOLD = 20_000
"""Allocations between young-generation collections (Python's default: 700). The
proxy allocates a few dozen short-lived objects per request, freed by reference
counting; at the default, collections ran every few dozen requests and cost a
fifth of the proxy's time. Cyclic garbage, rare here, just waits a little longer."""


def tune_gc() -> None:
    """Freeze what start-up built (modules, the agent) out of the collector's sight,
    so full collections stay cheap however big the heap of imports is."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GC_THRESHOLD, older, oldest)


class StartError(Exception):
    """The agent cannot start; the message is one line for the operator."""


def open_key(path: Path | None, cluster: str) -> tuple[Keyring, bool]:
    """The cluster key and whether it is a secret.

    Without a key file the cluster uses an open key derived from its name:
    agents on a LAN then find and trust each other with no configuration at
    all, authenticated against accidents (another cluster name never merges)
    but not against an attacker. `meshd keygen` and --key-file make it
    secret; the two kinds never merge since their fingerprints differ.
    """
    if path is None or not path.exists():
        key = hashlib.sha256(b"meshd-open-cluster-key:" + cluster.encode()).digest()
        return Keyring([key]), False
    try:
        text = path.read_text()
    except OSError as exc:
        raise StartError(f"--key-file {path}: {exc.strerror or exc}") from None
    try:
        return Keyring([Keyring.decode_key(text)]), True
    except ValueError as exc:
        raise StartError(f"--key-file {path}: {exc}") from None


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.name = config.node
        self.facts: NodeFacts | None = None
        self.store: Store | None = None
        self.replicator: Replicator | None = None
        self._gossip: Gossip | None = None
        self._discovery: MdnsDiscovery | None = None
        self.rpc = Rpc(config.node)
        self.driver: Driver | None = None
        self.workloads: Workloads | None = None
        self.traffic: Traffic | None = None
        self._api_runner: Any = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = asyncio.Event()
        self._key_fingerprint = ""
        self._secret_key = False
        self.started_at = 0.0
        self.api_addr: tuple[str, int] | None = None

    # ------------------------------------------------------------ life cycle

    @property
    def gossip(self) -> Gossip:
        assert self._gossip is not None, "agent not started"
        return self._gossip

    async def start(self) -> None:
        cfg = self.config
        data_dir = Path(cfg.data_dir)
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartError(f"--data-dir {data_dir}: {exc.strerror or exc}") from None
        keyring, self._secret_key = open_key(cfg.key_file, cfg.cluster)
        self._key_fingerprint = Keyring.fingerprint(keyring.primary)
        if not self._secret_key:
            log.warning(
                "no --key-file: cluster %r uses its open key (anyone on the LAN can join); "
                "run 'meshd keygen' and pass --key-file on every host for a secret one",
                cfg.cluster,
            )
        advertise_host = (cfg.advertise or cfg.bind)[0]
        try:
            self.driver = await choose_driver(
                cfg.driver,
                owner=self.name,
                cluster=cfg.cluster,
                state_dir=data_dir / "replicas",
                docker_url=cfg.docker_url,
                publish_ip=advertise_host,
            )
        except DriverUnavailable as exc:
            raise StartError(f"--driver {cfg.driver}: {exc}") from None
        try:
            await self._start_rest(cfg, data_dir, keyring)
        except BaseException:
            await self._abort_start()
            raise

    async def _abort_start(self) -> None:
        """Undo a start that failed half way: nothing may be left open."""
        if self.traffic is not None:
            with contextlib.suppress(Exception):
                await self.traffic.stop()
        if self.workloads is not None:
            with contextlib.suppress(Exception):
                await self.workloads.stop(stop_replicas=False)
        elif self.driver is not None:
            with contextlib.suppress(Exception):
                await self.driver.close()
        if self._discovery is not None:
            with contextlib.suppress(Exception):
                await self._discovery.stop()
        if self._gossip is not None and self._gossip.running:
            with contextlib.suppress(Exception):
                await self._gossip.stop()
        for task in list(self._tasks):
            task.cancel()
        if self.store is not None:
            with contextlib.suppress(Exception):
                self.store.close()

    async def _start_rest(self, cfg: AgentConfig, data_dir: Path, keyring: Keyring) -> None:
        assert self.driver is not None
        driver_name = self.driver.name
        # nvidia-smi may take seconds: keep the loop free meanwhile.
        self.facts = await asyncio.to_thread(
            collect_facts, cfg, docker_probe=lambda: driver_name == "docker"
        )
        try:
            self.store = Store.open(self.name, data_dir / "state.db")
        except PersistenceError as exc:
            raise StartError(str(exc)) from None
        self._transport = GossipTransport()
        self.replicator = Replicator(
            self.store, self.name, _wall_ms, self._transport, peers=self._live_peers
        )
        gossip_config = PROFILES[cfg.profile](cluster_name=cfg.cluster)
        self._gossip = Gossip(
            gossip_config,
            name=self.name,
            bind=cfg.bind,
            advertise=cfg.advertise,
            meta=encode_meta(self.facts),
            keyring=keyring,
            delegate=Mux(self.replicator, self.rpc),
        )
        self._transport.attach(self._gossip)
        self.rpc.attach(self._gossip)
        try:
            await self._gossip.start()
        except (OSError, ValueError) as exc:
            raise StartError(str(exc)) from None
        self.workloads = Workloads(
            node=self.name,
            gossip=self._gossip,
            store=self.store,
            replicator=self.replicator,
            rpc=self.rpc,
            driver=self.driver,
            data_dir=data_dir,
            address=self.gossip.core.addr[0],
            allocatable=self._allocatable,
        )
        # Traffic first: replicas started from here on get the mesh DNS and env.
        self.traffic = Traffic(
            node=self.name,
            gossip=self._gossip,
            store=self.store,
            driver=self.driver,
            controller=self.workloads.controller,
            advertise=self.gossip.core.addr[0],
            proxy_addresses=cfg.proxy_addresses,
            dns=cfg.dns,
            dns_upstreams=cfg.dns_upstreams,
        )
        try:
            await self.traffic.start()
        except TrafficStartError as exc:
            raise StartError(str(exc)) from None
        try:
            await self.workloads.start()
        except Exception as exc:
            raise StartError(f"runtime {self.driver.name}: {exc}") from None
        self.spawn(self._log_events())  # before discovery: joins start during it
        if cfg.mdns and cfg.mdns_interface:
            self._discovery = MdnsDiscovery(
                node=self.name,
                cluster=cfg.cluster,
                key_fingerprint=self._key_fingerprint,
                gossip_addr=self.gossip.core.addr,
                interfaces=[cfg.mdns_interface],
                on_peer=self._on_peer,
                probe=False,  # names carry the key fingerprint: announce at once
            )
            try:
                await self._discovery.start()
            except (OSError, ValueError, RuntimeError) as exc:
                raise StartError(f"--mdns-interface {cfg.mdns_interface}: {exc}") from None
        app = create_app(self, token=cfg.api_token)
        try:
            self._api_runner = await serve(app, *cfg.api)
        except (OSError, ValueError) as exc:
            raise StartError(f"--api {format_addr(cfg.api)}: {exc}") from None
        self.api_addr = cfg.api
        self.started_at = time.time()
        if cfg.join:
            self.spawn(self._join_static(list(cfg.join)))
        self.spawn(self._collect_garbage())
        log.info(
            "meshd %s: node %s, gossip %s, api %s, cluster %r, key %s%s",
            __version__,
            self.name,
            format_addr(self.gossip.core.addr),
            format_addr(cfg.api),
            cfg.cluster,
            self._key_fingerprint,
            "" if self._secret_key else " (open)",
        )

    async def stop(self, *, leave: bool = True) -> None:
        """Leave the cluster (unless told not to), then close everything."""
        if self._discovery is not None:
            with contextlib.suppress(Exception):
                await self._discovery.stop()
        if self.workloads is not None:
            if leave:
                self.workloads.unregister()
            with contextlib.suppress(Exception):
                await self.workloads.stop(stop_replicas=leave)
        if self.traffic is not None:
            with contextlib.suppress(Exception):
                await self.traffic.stop()
        if self._gossip is not None:
            if leave:
                await self._gossip.leave(timeout=2 * self._gossip.config.leave_propagate_time)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._transport.drain(), 2.0)
            await self._gossip.stop()
        await self.rpc.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._api_runner is not None:
            await self._api_runner.cleanup()
        if self.store is not None:
            self.store.close()

    def request_stop(self) -> None:
        self._stopping.set()

    async def wait_stopped(self) -> None:
        await self._stopping.wait()

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------ background

    def _on_peer(self, peer: Peer) -> None:
        """mDNS found an agent of our cluster: join it unless we already
        count it as a member."""
        if peer.node == self.name:
            return
        member = self.gossip.core.member(peer.node)
        if member is not None and member.is_active:
            return
        self.spawn(self.gossip.join([(peer.host, peer.port)]))

    async def _join_static(self, peers: list[tuple[str, int]]) -> None:
        delay = JOIN_BACKOFF_FIRST
        while True:
            n = await self.gossip.join(peers)
            if n:
                log.info("joined through %d of %d peers", n, len(peers))
                return
            log.warning(
                "could not join %s; retrying in %.1fs", ", ".join(map(format_addr, peers)), delay
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, JOIN_BACKOFF_MAX)

    async def _collect_garbage(self) -> None:
        assert self.replicator is not None
        while True:
            await asyncio.sleep(GC_INTERVAL)
            self.replicator.collect(_wall_ms())

    async def _log_events(self) -> None:
        async for ev in self.gossip.events():
            m = ev.member
            log.info("member %s %s (%s)", m.name, ev.kind.value, format_addr(m.addr))
            if self.workloads is not None:
                self.workloads.on_members_changed()
            if self.traffic is not None:
                self.traffic.on_members_changed()

    def _live_peers(self) -> list[str]:
        if self._gossip is None:
            return []
        return [
            m.name
            for m in self._gossip.core.members()
            if m.state == State.ALIVE and m.name != self.name
        ]

    def _allocatable(self) -> Resources:
        facts = self.facts
        if facts is None:
            return Resources()
        disk = facts.disks[0].total_mb if facts.disks else 0
        return Resources(float(facts.cpu_cores), facts.memory_mb, disk, len(facts.gpus))

    # ------------------------------------------------------------ AgentView

    def agent_info(self) -> dict[str, Any]:
        facts = self.facts.to_json() if self.facts else {}
        return {
            "name": self.name,
            "address": format_addr(self.gossip.core.addr),
            "api": format_addr(self.api_addr) if self.api_addr else None,
            "cluster": self.config.cluster,
            "key_fingerprint": self._key_fingerprint,
            "secret_key": self._secret_key,
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 1),
            **facts,
        }

    def member_list(self) -> list[dict[str, Any]]:
        core = self.gossip.core
        out = []
        for m in sorted(core.members(), key=lambda m: m.name):
            facts = decode_meta(m.meta)
            rtt = core.estimate_rtt(self.name, m.name) if m.name != self.name else 0.0
            info = facts.to_json() if facts is not None else {}
            out.append(
                {
                    "name": m.name,
                    "address": format_addr(m.addr),
                    "status": m.state.label,
                    "labels": info.get("labels", {}),
                    "capacity": info.get("capacity", {}),
                    "version": info.get("version"),
                    "driver": info.get("driver"),
                    "rtt_ms": None if rtt is None else round(rtt * 1000, 3),
                }
            )
        return out

    def health(self) -> tuple[bool, str]:
        if self._gossip is None or not self._gossip.running:
            return False, "gossip is not running"
        if self._gossip.core.local_member.state != State.ALIVE:
            return False, "leaving the cluster"
        return True, "ok"

    async def leave(self) -> None:
        self.request_stop()

    def kv_get(self, key: str) -> Entry | None:
        assert self.store is not None
        return self.store.get(key)

    def kv_list(self, prefix: str) -> list[Entry]:
        assert self.store is not None
        return self.store.list(prefix)

    async def kv_put(self, key: str, value: bytes) -> Entry:
        assert self.replicator is not None
        return self.replicator.put(key, value)

    async def kv_delete(self, key: str) -> Entry | None:
        assert self.replicator is not None
        return self.replicator.delete(key)

    async def member_remove(self, node: str) -> bool:
        assert self.workloads is not None
        return await self.workloads.member_remove(node)

    # ------------------------------------------------------------ services

    async def service_put(self, spec: ServiceSpec) -> dict[str, Any]:
        assert self.workloads is not None
        return await self.workloads.service_put(spec)

    def service_get(self, name: str) -> dict[str, Any] | None:
        assert self.workloads is not None
        return self.workloads.service_get(name)

    def service_list(self) -> list[dict[str, Any]]:
        assert self.workloads is not None
        return self.workloads.service_list()

    async def service_delete(self, name: str) -> bool:
        assert self.workloads is not None
        return await self.workloads.service_delete(name)

    def service_replicas(self, name: str) -> list[dict[str, Any]] | None:
        assert self.workloads is not None
        return self.workloads.service_replicas(name)

    def service_endpoints(self, name: str) -> dict[str, Any] | None:
        assert self.traffic is not None
        return self.traffic.endpoints(name)

    def service_leader(self, name: str) -> dict[str, Any] | None:
        assert self.workloads is not None
        return self.workloads.service_leader(name)

    async def service_scale(self, name: str, replicas: int) -> dict[str, Any] | None:
        assert self.workloads is not None
        return await self.workloads.service_scale(name, replicas)

    def service_logs(self, name: str, *, tail: int | None, follow: bool) -> Any:
        assert self.workloads is not None
        return self.workloads.service_logs(name, tail=tail, follow=follow)

    def leases(self) -> list[dict[str, Any]]:
        assert self.workloads is not None
        return self.workloads.elector.leases()

    @property
    def index(self) -> int:
        assert self.store is not None
        return self.store.index

    def stats(self) -> dict[str, Any]:
        core = self.gossip.core
        by_status = {s.label: 0 for s in State}
        for m in core.members():
            by_status[m.state.label] += 1
        store = self.store
        return {
            "gossip": dict(self.gossip.stats),
            "members": by_status,
            "store": {**(store.stats if store else {}), "keys": len(store) if store else 0},
            "replication": dict(self.replicator.stats) if self.replicator else {},
            "rpc": dict(self.rpc.stats),
            "traffic": self.traffic.stats() if self.traffic else {},
            **(
                {
                    "election": dict(self.workloads.elector.stats),
                    "leader": dict(self.workloads.leader.stats),
                    "node": dict(self.workloads.controller.stats),
                }
                if self.workloads
                else {}
            ),
        }


def _wall_ms() -> int:
    return int(time.time() * 1000)


async def run(config: AgentConfig, on_started: Callable[[Agent], None] | None = None) -> int:
    """Run until SIGTERM/SIGINT or an API leave; a second signal exits at once."""
    import signal

    agent = Agent(config)
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if agent._stopping.is_set():
            os._exit(1)
        agent.request_stop()

    await agent.start()
    tune_gc()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    if on_started is not None:
        on_started(agent)
    await agent.wait_stopped()
    log.info("leaving the cluster")
    await agent.stop(leave=True)
    return 0
