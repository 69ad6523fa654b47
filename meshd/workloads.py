"""Services on this node: the lease elector, the leader loop and the node
controller wired together, and the service answers the API gives.

The agent builds one ``Workloads`` after gossip and the store are up. It
owns the parts of issue-free service life: registration of this node as a
voter (``node/<name>``), leadership of the services whose lease it holds,
running what is assigned here, and reading logs of replicas anywhere (over
``meshd.rpc``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gossip import State
from meshd.facts import decode_meta
from meshd.rpc import Rpc, RpcError
from meshd.runtime.base import Driver, DriverError
from meshd.runtime.node import NodeController
from meshd.runtime.ports import PortAllocator
from meshd.scheduler.assignment import (
    SERVICE_PREFIX,
    ReplicaStatus,
    service_key,
    spec_version,
)
from meshd.scheduler.election import ElectionConfig, Elector
from meshd.scheduler.leader import LeaderLoop, decode_spec
from meshd.scheduler.placement import Resources
from meshd.scheduler.reschedule import NodeState
from meshd.spec import ServiceSpec

__all__ = ["NODE_PREFIX", "Workloads"]

log = logging.getLogger(__name__)

NODE_PREFIX = "node/"
"""``node/<name>``: the registered nodes, which are the lease voter set."""
LOG_POLL = 0.25
"""How often a followed log asks remote nodes for new lines."""
LOG_CALL_TIMEOUT = 3.0
MAX_LOG_LINES = 10_000


class Workloads:
    def __init__(
        self,
        *,
        node: str,
        gossip: Any,
        store: Any,
        replicator: Any,
        rpc: Rpc,
        driver: Driver,
        data_dir: Path,
        address: str,
        allocatable: Callable[[], Resources],
        election: ElectionConfig | None = None,
    ) -> None:
        self.node = node
        self.gossip = gossip
        self.store = store
        self.replicator = replicator
        self.rpc = rpc
        self.driver = driver
        self.address = address
        self.elector = Elector(
            node,
            rpc,
            state_path=data_dir / "leases.json",
            voters=self.voters,
            alive=self.alive,
            services=lambda: self.leader.services(),
            term_hint=self._term_hint,
            on_change=self._on_leadership,
            config=election,
        )
        self.leader = LeaderLoop(
            node,
            self.elector,
            store,
            put=replicator.put,
            delete=replicator.delete,
            nodes=self.node_states,
        )
        self.controller = NodeController(
            node,
            driver,
            store=store,
            put=replicator.put,
            delete=replicator.delete,
            allocatable=allocatable,
            address=address,
            ports=PortAllocator(bind_check_host=address),
        )
        rpc.register("logs", self._serve_logs)
        self._unsubscribe: Callable[[], None] | None = None

    async def start(self) -> None:
        self.register()
        self.leader.load()
        # A new service wants a leader now, not at the elector's next tick.
        self._unsubscribe = self.store.subscribe(
            lambda e: self.elector.poke() if e.key.startswith(SERVICE_PREFIX) else None
        )
        await self.controller.start()
        self.elector.start()
        self.leader.start()

    async def stop(self, *, stop_replicas: bool) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        await self.leader.stop()
        await self.elector.stop()
        if stop_replicas:
            await self._stop_all()
        await self.controller.stop()

    async def _stop_all(self) -> None:
        """A node leaving for good stops its replicas: the leaders re-place them."""
        with contextlib.suppress(DriverError):
            instances = await self.driver.list()
            await asyncio.gather(
                *(self.driver.stop(i.replica_id, 5.0) for i in instances if i.state != "exited"),
                return_exceptions=True,
            )

    def register(self) -> None:
        """Join the voter set (again): ``node/<name>``."""
        entry = self.store.get(NODE_PREFIX + self.node)
        if entry is None:
            body = {"address": self.address, "registered_ms": int(time.time() * 1000)}
            self.replicator.put(NODE_PREFIX + self.node, json.dumps(body).encode())

    def unregister(self) -> None:
        with contextlib.suppress(Exception):
            self.replicator.delete(NODE_PREFIX + self.node)

    def on_members_changed(self) -> None:
        self.elector.poke()
        self.leader.poke()

    # ------------------------------------------------------------ cluster views

    def voters(self) -> list[str]:
        return [e.key[len(NODE_PREFIX) :] for e in self.store.list(NODE_PREFIX)]

    def alive(self) -> list[str]:
        return [m.name for m in self.gossip.core.members() if m.state == State.ALIVE]

    def node_states(self) -> list[NodeState]:
        out = []
        registered = set(self.voters())
        for m in self.gossip.core.members():
            facts = decode_meta(m.meta)
            if facts is None:
                continue
            status = m.state.label
            if m.name not in registered and status in ("alive", "suspect"):
                status = "suspect"  # not yet (or no longer) registered: no new replicas
            disk = facts.disks[0].total_mb if facts.disks else 0
            out.append(
                NodeState(
                    name=m.name,
                    status=status,
                    labels=dict(facts.labels),
                    allocatable=Resources(
                        float(facts.cpu_cores), facts.memory_mb, disk, len(facts.gpus)
                    ),
                    driver=facts.driver,
                )
            )
        return out

    def _term_hint(self, service: str) -> int:
        a = self.leader.assignments.get(service)
        return a.term if a is not None else 0

    def _on_leadership(self, service: str, leading: bool) -> None:
        if leading:
            self.leader.poke(service)

    # ------------------------------------------------------------ service answers

    async def member_remove(self, node: str) -> bool:
        member = self.gossip.core.member(node)
        if member is not None and member.state in (State.ALIVE, State.SUSPECT):
            raise ValueError(f"{node} is {member.state.label}: only a dead member can be removed")
        if self.store.get(NODE_PREFIX + node) is None and member is None:
            return False
        self.replicator.delete(NODE_PREFIX + node)
        return True

    def _spec(self, name: str) -> ServiceSpec | None:
        entry = self.store.get(service_key(name))
        if entry is None:
            return None
        try:
            return decode_spec(entry.value)
        except ValueError:
            return None

    async def service_put(self, spec: ServiceSpec) -> dict[str, Any]:
        raw = json.dumps(spec.to_dict(), separators=(",", ":"), sort_keys=True).encode()
        self.replicator.put(service_key(spec.name), raw)
        record = self.service_get(spec.name)
        assert record is not None
        return record

    def service_get(self, name: str) -> dict[str, Any] | None:
        entry = self.store.get(service_key(name))
        if entry is None:
            return None
        spec = self._spec(name)
        replicas = self._replica_statuses(name)
        a = self.leader.assignments.get(name)
        created = self.store.get(service_key(name))
        return {
            "name": name,
            "kind": spec.kind if spec else None,
            "version": spec_version(spec) if spec else None,
            "spec": spec.to_dict() if spec else None,
            "replicas": {
                "desired": (spec.replicas if spec.kind == "service" else spec.completions)
                if spec
                else 0,
                "running": sum(1 for _, st in replicas if st.state == "running"),
                "ready": sum(1 for _, st in replicas if st.ready),
            },
            "leader": self.service_leader(name),
            "pending": [{"slot": s, "reason": r} for s, r in (a.pending if a else ())],
            "update": a.update.to_json() if a and a.update else None,
            "completed": a.completed if a else 0,
            "created_ms": created.ts.wall_ms if created is not None else 0,
            "updated_ms": a.updated_ms if a else 0,
        }

    def service_list(self) -> list[dict[str, Any]]:
        names = [e.key[len(SERVICE_PREFIX) :] for e in self.store.list(SERVICE_PREFIX)]
        return [r for n in names if (r := self.service_get(n)) is not None]

    async def service_delete(self, name: str) -> bool:
        return self.replicator.delete(service_key(name)) is not None

    def _replica_statuses(self, name: str) -> list[tuple[str, ReplicaStatus]]:
        """(node, status) of the replicas the current assignment names."""
        a = self.leader.assignments.get(name)
        statuses = self.leader.statuses.get(name, {})
        out = []
        for r in a.replicas if a else ():
            st = statuses.get(r.node)
            got = st.by_id().get(r.id) if st is not None else None
            if got is None:
                got = ReplicaStatus(r.id, r.slot, r.version, "starting", reason="assigned")
            out.append((r.node, got))
        return out

    def service_replicas(self, name: str) -> list[dict[str, Any]] | None:
        if self.store.get(service_key(name)) is None and name not in self.leader.assignments:
            return None
        out = []
        for node, st in sorted(self._replica_statuses(name), key=lambda x: (x[1].slot, x[1].id)):
            out.append({"service": name, "node": node, **st.to_json()})
        return out

    def service_leader(self, name: str) -> dict[str, Any] | None:
        if self.store.get(service_key(name)) is None and name not in self.leader.assignments:
            return None
        term = self.elector.leading_term(name)
        if term is not None:
            return {"node": self.node, "term": term}
        a = self.leader.assignments.get(name)
        holder = self.elector.known_holder(name)
        if a is not None:
            member = self.gossip.core.member(a.leader)
            if member is not None and member.state == State.ALIVE:
                return {"node": a.leader, "term": a.term}
        return {"node": holder, "term": a.term if a else 0}

    async def service_scale(self, name: str, replicas: int) -> dict[str, Any] | None:
        spec = self._spec(name)
        if spec is None:
            return None
        if spec.kind == "job":
            raise ValueError(f"{name} is a job: set its completions instead of scaling it")
        data = spec.to_dict()
        data["replicas"] = replicas
        return await self.service_put(ServiceSpec.from_dict(data))

    async def service_logs(
        self, name: str, *, tail: int | None, follow: bool
    ) -> AsyncIterator[dict[str, Any]]:
        if self.store.get(service_key(name)) is None and name not in self.leader.assignments:
            raise KeyError(name)
        replicas = self._replica_statuses(name)
        seen: dict[tuple[str, str], dict[str, int]] = {}
        first = True
        while True:
            calls = [
                self._fetch_logs(node, st.id, tail if first else None, seen)
                for node, st in replicas
            ]
            results = await asyncio.gather(*calls)
            for line in sorted((x for batch in results for x in batch), key=lambda x: x["_t"]):
                t = line.pop("_t")
                line["time"] = datetime.fromtimestamp(t, UTC).isoformat()
                yield line
            if not follow:
                return
            first = False
            await asyncio.sleep(LOG_POLL)
            replicas = self._replica_statuses(name) or replicas

    async def _fetch_logs(
        self,
        node: str,
        replica: str,
        tail: int | None,
        seen: dict[tuple[str, str], dict[str, int]],
    ) -> list[dict[str, Any]]:
        """New lines of one replica; ``seen`` counts the lines per stream
        already given, so a followed log never repeats or skips a line."""
        key = (node, replica)
        skip = seen.get(key)
        try:
            body = await self.rpc.call(
                node,
                "logs",
                {"replica": replica, "tail": tail, "skip": skip},
                LOG_CALL_TIMEOUT,
            )
        except RpcError as exc:
            log.debug("logs of %s from %s: %s", replica, node, exc)
            return []
        if not isinstance(body, dict):
            return []
        counts = body.get("counts")
        if isinstance(counts, dict):
            seen[key] = {k: v for k, v in counts.items() if isinstance(v, int)}
        out = []
        for item in body.get("lines", []) if isinstance(body.get("lines"), list) else []:
            if isinstance(item, list) and len(item) == 3:
                stream, t, text = item
                if isinstance(t, (int, float)) and isinstance(text, str):
                    out.append(
                        {
                            "replica": replica,
                            "node": node,
                            "stream": str(stream),
                            "_t": t,
                            "text": text,
                        }
                    )
        return out

    async def _serve_logs(self, caller: str, body: Any) -> dict[str, Any]:
        """Lines of a replica here: the last ``tail`` (when ``skip`` is None), or
        those after ``skip`` lines per stream; with the line counts per stream."""
        if not isinstance(body, dict) or not isinstance(body.get("replica"), str):
            raise ValueError("logs request must name a replica")
        replica = body["replica"]
        tail = body.get("tail")
        skip = body.get("skip")
        if tail is not None and (type(tail) is not int or tail < 0):
            raise ValueError("tail must be a non-negative integer")
        if skip is not None and not (
            isinstance(skip, dict) and all(type(v) is int and v >= 0 for v in skip.values())
        ):
            raise ValueError("skip must map stream to a line count")
        by_stream: dict[str, list[list[Any]]] = {}
        try:
            async for line in self.driver.logs(replica):
                got = by_stream.setdefault(line.stream, [])
                got.append([line.stream, line.time, line.text])
        except DriverError as exc:
            raise ValueError(str(exc)) from None
        counts = {stream: len(got) for stream, got in by_stream.items()}
        lines: list[list[Any]] = []
        for stream, got in by_stream.items():
            start = 0 if skip is None else skip.get(stream, 0)
            if start > len(got):
                start = 0  # fewer lines than already seen: the log was rotated
            lines.extend(got[start:])
        lines.sort(key=lambda x: x[1])
        lines = lines[-MAX_LOG_LINES:]
        if skip is None and tail is not None:
            lines = lines[-tail:] if tail else []
        return {"lines": lines, "counts": counts}
