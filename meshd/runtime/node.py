"""The node controller: makes this node run what the leaders assigned to it.

Level-triggered, like a Kubernetes kubelet: whenever anything changes (an
assignment arrives, a replica exits, a health check fails, a backoff timer
expires) one ``_reconcile`` pass compares the assignments naming this node
with what the runtime runs, and acts:

* **admit** new replicas only while they fit this node's allocatable
  capacity (the node is the authority on itself); a replica that does not
  fit, or needs a runtime this node lacks, is reported ``refused`` with the
  reason, and its leader places it elsewhere;
* **start** admitted replicas, with their identity and host ports in their
  environment; **restart** exited ones by their restart policy, with an
  exponential backoff on crash loops; restart ones that fail their health
  check;
* **stop and remove** whatever no assignment names any more: scaled-down,
  moved, replaced by a rolling update, or re-placed while this node was
  thought dead;
* **report** each service's replicas under ``status/<node>/<service>``.

Fencing: the newest assignment term applied per service is remembered (and
reported in the status); an assignment carrying an older term, written by a
leader that has since lost its lease, is ignored.

Adoption: on start the driver lists the replicas this node owns; those still
assigned are kept running as they are, with their ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meshd.aio import wait_event
from meshd.runtime.backoff import RestartBackoff
from meshd.runtime.base import Driver, DriverError, Instance, LaunchSpec, PortBinding
from meshd.runtime.health import HealthTracker, run_probe
from meshd.runtime.ports import PortAllocator, PortError, PortsExhausted
from meshd.scheduler.assignment import (
    ASSIGN_PREFIX,
    STATUS_PREFIX,
    AssignedReplica,
    Assignment,
    ReplicaStatus,
    ServiceStatus,
    decode_assignment,
    decode_status,
    encode_status,
    status_key,
)
from meshd.scheduler.lease import accept_assignment
from meshd.scheduler.placement import Resources
from meshd.spec import ServiceSpec
from meshd.state.hlc import Timestamp
from meshd.state.store import Entry

__all__ = ["NodeController", "spec_resources"]

log = logging.getLogger(__name__)

STOP_TIMEOUT = 5.0
"""SIGTERM grace before SIGKILL when a replica is no longer assigned."""
DRAIN_S = 1.0
"""A ready replica that is no longer assigned keeps running this long after its
status says it is gone: every proxy in the mesh stops picking it (status spreads
in well under a second) and requests already sent to it finish."""
STATUS_FLUSH_DELAY = 0.02
"""Status changes within this window go out as one write per service."""
RESYNC_INTERVAL = 5.0
"""A full pass even without events: catches anything an event missed."""
RETIRED_HANDLES = 8
"""Instances per replica whose late events are recognised and dropped."""


def spec_resources(spec: ServiceSpec) -> Resources:
    """What a replica of spec reserves, in placement units (cores, MiB)."""
    r = spec.resources
    mib = 1024 * 1024
    return Resources(
        cpu=r.cpu or 0.0,
        memory_mb=-(-(r.memory or 0) // mib),
        disk_mb=-(-(r.disk or 0) // mib),
        gpus=r.gpu,
    )


def env_name(port: str) -> str:
    return "MESHD_PORT_" + port.upper().replace("-", "_")


@dataclass(slots=True)
class _Replica:
    """What this node knows and does about one assigned replica."""

    assigned: AssignedReplica
    spec: ServiceSpec
    admitted: bool = False
    refused: str = ""
    instance: Instance | None = None
    ports: dict[str, int] = field(default_factory=dict)
    state: str = "starting"
    reason: str = ""
    busy: bool = False
    """A driver call for it is in flight: no second one."""
    backoff: RestartBackoff = field(default_factory=RestartBackoff)
    start_errors: RestartBackoff = field(
        default_factory=lambda: RestartBackoff(first=1.0, max=30.0)
    )
    health: HealthTracker | None = None
    health_task: asyncio.Task[None] | None = None
    done: bool = False
    """Finished for good (succeeded, or failed under its restart policy)."""
    exit_code: int | None = None
    started_ms: int = 0
    retired: dict[str, None] = field(default_factory=dict)
    """Handles of its recent instances that exited or were stopped (oldest
    first): later events about them are stale."""

    def retire(self, inst: Instance) -> None:
        self.retired[inst.handle] = None
        while len(self.retired) > RETIRED_HANDLES:
            del self.retired[next(iter(self.retired))]


class NodeController:
    """Runs this node's assigned replicas through a ``Driver``."""

    def __init__(
        self,
        node: str,
        driver: Driver,
        *,
        store: Any,
        put: Callable[[str, bytes], Any],
        delete: Callable[[str], Any],
        allocatable: Callable[[], Resources],
        address: str,
        ports: PortAllocator,
        dns: tuple[str, ...] = (),
        dns_search: tuple[str, ...] = (),
        service_env: Callable[[], dict[str, str]] = dict,
        drain: float = DRAIN_S,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node = node
        self.driver = driver
        self.store = store
        self._put = put
        self._delete = delete
        self._allocatable = allocatable
        self.address = address
        self.ports = ports
        self.dns = dns
        self.dns_search = dns_search
        self.service_env = service_env
        self.drain = drain
        self._draining: set[str] = set()
        """Replica ids taken out of the status that still serve until ``drain`` ends."""
        """``WEB_SERVICE_HOST``-style variables of every service, for new replicas."""
        self._wall_ms = wall_ms
        self._clock = clock
        self._replicas: dict[str, _Replica] = {}
        self._finished: dict[str, ReplicaStatus] = {}
        """Replicas reported finished before a restart: adopted as finished."""
        self._orphans: dict[str, Instance] = {}
        """Instances the runtime has that no assignment names: to stop and remove."""
        self._terms: dict[str, int] = {}
        self._counted: dict[str, tuple[str, Timestamp]] = {}
        """Assignment key -> (stat, entry timestamp) already counted as bad or
        stale: every pass sees the entry again; it is counted (and logged) once."""
        self._dirty: set[str] = set()
        self._reported: dict[str, bytes] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._flush_task: asyncio.Task[None] | None = None
        self._ops: set[asyncio.Task[None]] = set()
        self._unsubscribe: Callable[[], None] | None = None
        self.stats: dict[str, int] = {
            "started": 0,
            "restarts": 0,
            "stopped": 0,
            "refused": 0,
            "start_errors": 0,
            "health_restarts": 0,
            "stale_assignments": 0,
            "bad_assignments": 0,
            "adopted": 0,
            "drained": 0,
        }

    # ------------------------------------------------------------ life cycle

    async def start(self) -> None:
        for entry in self.store.list(STATUS_PREFIX + self.node + "/"):
            with contextlib.suppress(ValueError):
                status = decode_status(entry.value)
                self._terms[status.service] = status.term
                self._reported[status.service] = _comparable(entry.value)
                for r in status.replicas:
                    if r.state in ("succeeded", "failed"):
                        self._finished[r.id] = r
        await self.driver.start(self._on_instance)
        for inst in await self.driver.list():
            self._orphans[inst.replica_id] = inst
        self._unsubscribe = self.store.subscribe(self._on_entry)
        self._sync_desired()
        for rid, rep in self._replicas.items():
            inst = self._orphans.pop(rid, None)
            if inst is not None:
                self._adopt(rep, inst)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop managing; replicas keep running and are adopted at the next start."""
        if self._unsubscribe is not None:
            self._unsubscribe()
        for task in [self._task, self._flush_task, *self._ops]:
            if task is not None:
                task.cancel()
        for rep in self._replicas.values():
            if rep.health_task is not None:
                rep.health_task.cancel()
        tasks = [t for t in [self._task, self._flush_task, *self._ops] if t is not None]
        tasks += [r.health_task for r in self._replicas.values() if r.health_task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.driver.close()

    def poke(self) -> None:
        self._wake.set()

    # ------------------------------------------------------------ views

    def replicas(self) -> list[tuple[str, ReplicaStatus]]:
        """(service, status) of every replica this node manages."""
        return [(r.spec.name, self._status(r)) for r in self._replicas.values()]

    def replica(self, replica_id: str) -> _Replica | None:
        return self._replicas.get(replica_id)

    # ------------------------------------------------------------ events

    def _on_entry(self, entry: Entry) -> None:
        if entry.key.startswith(ASSIGN_PREFIX):
            self._wake.set()

    def _on_instance(self, inst: Instance) -> None:
        rep = self._replicas.get(inst.replica_id)
        if rep is not None:
            # Only news of the current instance (or, when there is none, of
            # one not yet seen: a start in flight) counts. Runtimes report one
            # exit more than once (docker: "oom" then "die", replays after a
            # reconnect); taken in, a late one would count an exit twice or
            # replace the instance that has run since.
            current = rep.instance
            if current is None:
                if inst.handle not in rep.retired:
                    rep.instance = inst
            elif current.handle == inst.handle:
                rep.instance = inst
        elif inst.replica_id in self._orphans or inst.state != "exited":
            self._orphans[inst.replica_id] = inst
        self._wake.set()

    async def _run(self) -> None:
        while True:
            # Cleared before the pass, not after: a wake-up asked for during
            # it (an exit handled, room freed by a finished job) must cause
            # the next pass now, not at the next resync.
            self._wake.clear()
            try:
                self._sync_desired()
                self._reconcile()
            except Exception:
                log.exception("reconcile pass failed")
            await wait_event(self._wake, self._next_wait())

    def _next_wait(self) -> float:
        now = self._clock()
        wait = RESYNC_INTERVAL
        for rep in self._replicas.values():
            for b in (rep.backoff, rep.start_errors):
                if b.restart_at is not None and b.restart_at > now:
                    wait = min(wait, b.restart_at - now)
        return max(wait, 0.005)

    # ------------------------------------------------------------ desired state

    def _sync_desired(self) -> None:
        """Bring ``_replicas`` in line with the stored assignments naming this node."""
        wanted: dict[str, tuple[AssignedReplica, ServiceSpec, str]] = {}
        services_seen: set[str] = set()
        entries = self.store.list(ASSIGN_PREFIX)
        keys = {e.key for e in entries}
        self._counted = {k: v for k, v in self._counted.items() if k in keys}
        for entry in entries:
            try:
                assignment = decode_assignment(entry.value)
            except ValueError as exc:
                if self._count_once("bad_assignments", entry):
                    log.warning("ignoring malformed %s: %s", entry.key, exc)
                continue
            service = assignment.service
            services_seen.add(service)
            seen = self._terms.get(service, 0)
            if not accept_assignment(seen, assignment.term):
                if self._count_once("stale_assignments", entry):
                    log.info(
                        "ignoring %s of term %d: term %d applied already",
                        entry.key,
                        assignment.term,
                        seen,
                    )
                # Keep what we run for it until a current leader says otherwise.
                for rid, rep in self._replicas.items():
                    if _service_of(rep) == service:
                        wanted[rid] = (rep.assigned, rep.spec, service)
                continue
            if assignment.term > seen:
                self._terms[service] = assignment.term
                self._dirty.add(service)
            for r in assignment.replicas:
                if r.node != self.node:
                    continue
                spec = self._spec_for(assignment, r, entry)
                if spec is not None:
                    wanted[r.id] = (r, spec, service)
        for rid, (assigned, spec, _service) in wanted.items():
            rep = self._replicas.get(rid)
            if rep is None:
                self._replicas[rid] = rep = _Replica(assigned, spec)
                inst = self._orphans.pop(rid, None)
                finished = self._finished.pop(rid, None)
                if finished is not None and (inst is None or inst.state == "exited"):
                    # Done before this agent restarted: never run it again.
                    rep.done = True
                    rep.state = finished.state
                    rep.reason = finished.reason
                    rep.exit_code = finished.exit_code
                    rep.started_ms = finished.started_ms
                elif inst is not None:
                    self._adopt(rep, inst)
                self._dirty.add(spec.name)
        for rid in [rid for rid in self._replicas if rid not in wanted]:
            rep = self._replicas.pop(rid)
            self._dirty.add(rep.spec.name)
            if rep.health_task is not None:
                rep.health_task.cancel()
            if rep.instance is not None:
                self._orphans[rid] = rep.instance
                if rep.spec.ports and self._status(rep).ready:
                    self._draining.add(rid)
            else:
                self.ports.release(rid)
        # Services whose assignment is gone entirely: report nothing for them.
        for service in list(self._reported):
            if service not in services_seen:
                self._dirty.add(service)

    def _spec_for(
        self, assignment: Assignment, r: AssignedReplica, entry: Entry
    ) -> ServiceSpec | None:
        try:
            return assignment.spec(r.version)
        except (KeyError, ValueError) as exc:
            if self._count_once("bad_assignments", entry):
                log.warning("assignment of %s has no usable spec %s: %s", r.id, r.version, exc)
            return None

    def _count_once(self, stat: str, entry: Entry) -> bool:
        """Count ``stat`` for this version of the entry unless already done."""
        mark = (stat, entry.ts)
        if self._counted.get(entry.key) == mark:
            return False
        self._counted[entry.key] = mark
        self.stats[stat] += 1
        return True

    def _adopt(self, rep: _Replica, inst: Instance) -> None:
        rep.instance = inst
        rep.admitted = True
        rep.ports = {p.name: p.host_port for p in inst.ports}
        if rep.ports:
            try:
                self.ports.adopt(rep.assigned.id, rep.ports)
            except PortError as exc:
                # Two replicas claim a port (state from before a crash): keep
                # the replica; the allocator simply will not hand the port out.
                log.warning("replica %s: %s", rep.assigned.id, exc)
        rep.state = "running" if inst.state == "running" else "exited"
        rep.started_ms = int((inst.started_at or 0) * 1000)
        if inst.state == "running":
            rep.backoff.on_running(self._clock())
            self._start_health(rep)
        self.stats["adopted"] += 1

    # ------------------------------------------------------------ reconcile

    def _reconcile(self) -> None:
        self._admit()
        now = self._clock()
        for rep in list(self._replicas.values()):
            if rep.busy or not rep.admitted:
                continue
            inst = rep.instance
            if inst is None:
                if rep.done:
                    continue
                if rep.start_errors.restart_at is not None and now < rep.start_errors.restart_at:
                    continue
                if rep.backoff.restart_at is not None and now < rep.backoff.restart_at:
                    continue
                self._op(rep, functools.partial(self._start, rep))
            elif inst.state == "exited":
                self._on_exited(rep, inst, now)
            elif inst.state == "running":
                if rep.state != "running":
                    rep.state = "running"
                    rep.reason = ""
                    self._dirty.add(rep.spec.name)
                if rep.health is not None and rep.health.needs_restart:
                    self.stats["health_restarts"] += 1
                    rep.reason = f"unhealthy: {rep.health.last_message}"
                    self._op(rep, functools.partial(self._restart_unhealthy, rep))
        for rid, inst in list(self._orphans.items()):
            del self._orphans[rid]
            self._spawn(self._remove(rid, inst))
        if self._dirty:
            self._schedule_flush()

    def _admit(self) -> None:
        """Admit new replicas in a fixed order while they fit; refuse the rest."""
        # A finished replica (done) gave its room back and needs none again:
        # were it pending here it would take that room from the others, and
        # be reported "refused" when it no longer fit.
        pending = [r for r in self._replicas.values() if not r.admitted and not r.done]
        if not pending:
            return
        free = self._allocatable()
        for rep in self._replicas.values():
            if rep.admitted and not rep.done:
                free = free.sub(spec_resources(rep.spec))
        for rep in sorted(pending, key=lambda r: (r.spec.name, r.assigned.slot, r.assigned.id)):
            need = spec_resources(rep.spec)
            reason = ""
            if rep.spec.image is not None and self.driver.name != "docker":
                reason = "this node has no Docker engine (it runs the process driver)"
            elif not need.fits(free):
                reason = f"does not fit on {self.node}: {_describe_free(need, free)}"
            if reason:
                if rep.refused != reason:
                    rep.refused = rep.reason = reason
                    rep.state = "refused"
                    self.stats["refused"] += 1
                    self._dirty.add(rep.spec.name)
                continue
            rep.admitted = True
            rep.refused = ""
            free = free.sub(need)

    def _on_exited(self, rep: _Replica, inst: Instance, now: float) -> None:
        code = inst.exit_code
        policy = rep.spec.restart
        rep.exit_code = code
        if rep.health_task is not None:
            rep.health_task.cancel()
            rep.health_task = None
        if code == 0 and (policy != "always" or rep.spec.kind == "job"):
            final = "succeeded"
        elif policy == "never":
            final = "failed"
        else:
            final = ""
        old = rep.instance
        rep.instance = None
        if final:
            rep.done = True
            rep.state = final
            rep.reason = f"exited with code {code}" + (f" ({inst.error})" if inst.error else "")
            self._release(rep)  # a finished replica frees its resources at once
        else:
            delay = rep.backoff.on_exit(now)
            rep.state = "exited"
            rep.reason = (
                f"exited with code {code}"
                + (f" ({inst.error})" if inst.error else "")
                + f"; restarting in {delay:.1f}s"
            )
        self._dirty.add(rep.spec.name)
        if old is not None:
            rep.retire(old)
            # As an op (busy): the removal is by replica id, so a restart must
            # not run before it is done, or it would remove the new instance.
            self._op(rep, functools.partial(self._forget, old))
        self._wake.set()

    def _release(self, rep: _Replica) -> None:
        rep.admitted = not rep.done and rep.admitted
        self.ports.release(rep.assigned.id)
        rep.ports = {}

    # ------------------------------------------------------------ driver calls

    def _op(self, rep: _Replica, make: Callable[[], Any]) -> None:
        """Run one driver call for rep; ``make`` builds the coroutine inside the
        task, so a task cancelled before it ran leaves no coroutine unawaited."""
        rep.busy = True

        async def run() -> None:
            try:
                await make()
            finally:
                rep.busy = False
                self._wake.set()

        self._spawn(run())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._ops.add(task)
        task.add_done_callback(self._ops.discard)

    def _launch_spec(self, rep: _Replica) -> LaunchSpec:
        spec, a = rep.spec, rep.assigned
        env = self.service_env()
        env.update(spec.env)
        env.update(
            MESHD_SERVICE=spec.name,
            MESHD_REPLICA=a.id,
            MESHD_SLOT=str(a.slot),
            MESHD_NODE=self.node,
            MESHD_ADDRESS=self.address,
        )
        bindings = []
        for p in spec.ports:
            host_port = rep.ports[p.name]
            env[env_name(p.name)] = str(host_port)
            bindings.append(PortBinding(p.name, p.target, host_port, p.protocol))
        mib = 1024 * 1024
        return LaunchSpec(
            replica_id=a.id,
            service=spec.name,
            slot=a.slot,
            version=a.version,
            image=spec.image,
            command=spec.command,
            args=spec.args,
            env=env,
            ports=tuple(bindings),
            cpu=spec.resources.cpu,
            memory_mb=None if spec.resources.memory is None else -(-spec.resources.memory // mib),
            gpus=spec.resources.gpu,
            labels=dict(spec.labels),
            dns=self.dns,
            dns_search=self.dns_search,
        )

    async def _start(self, rep: _Replica) -> None:
        rid = rep.assigned.id
        try:
            if not rep.ports and rep.spec.ports:
                rep.ports = self.ports.allocate(rid, [p.name for p in rep.spec.ports])
            launch = self._launch_spec(rep)
            rep.state = "starting"
            self._dirty.add(rep.spec.name)
            inst = await self.driver.run(launch)
        except (DriverError, PortsExhausted) as exc:
            self.stats["start_errors"] += 1
            delay = rep.start_errors.on_exit(self._clock())
            rep.state = "error"
            rep.reason = f"{exc}; retrying in {delay:.0f}s"
            self._dirty.add(rep.spec.name)
            log.warning("cannot start %s: %s", rid, exc)
            return
        if rid not in self._replicas:  # unassigned while starting
            self._orphans[rid] = inst
            return
        if rep.backoff.restarts or rep.started_ms:
            self.stats["restarts"] += 1
        self.stats["started"] += 1
        rep.instance = inst if rep.instance is None else rep.instance
        rep.retired.pop(inst.handle, None)  # a reused pid is a new instance
        rep.start_errors.reset()
        rep.started_ms = self._wall_ms()
        rep.state = "running" if inst.state == "running" else rep.state
        rep.reason = ""
        rep.backoff.on_running(self._clock())
        self._dirty.add(rep.spec.name)
        self._start_health(rep)

    async def _restart_unhealthy(self, rep: _Replica) -> None:
        """Stop, remove and (after the backoff) start again a replica that
        failed its health check, whatever its restart policy: the exit that
        the stop causes is this restart, not an exit to judge by the policy
        (a replica that shuts down cleanly on SIGTERM would "succeed")."""
        if rep.health_task is not None:
            rep.health_task.cancel()
            rep.health_task = None
        rep.health = None
        rid = rep.assigned.id
        old = rep.instance
        try:
            await self.driver.stop(rid, STOP_TIMEOUT)
        except DriverError as exc:
            log.warning("cannot restart unhealthy %s: %s", rid, exc)
            if rep.instance is not None and rep.instance.state == "running":
                self._start_health(rep)  # check on; the next failure tries again
            return
        with contextlib.suppress(DriverError):
            await self.driver.remove(rid)  # run() clears a leftover, should this fail
        for inst in (old, rep.instance):
            if inst is not None:
                rep.retire(inst)
        rep.instance = None
        delay = rep.backoff.on_exit(self._clock())
        rep.state = "exited"
        rep.reason += f"; restarting in {delay:.1f}s"
        self._dirty.add(rep.spec.name)

    async def _forget(self, inst: Instance) -> None:
        with contextlib.suppress(DriverError):
            await self.driver.remove(inst.replica_id)

    async def _remove(self, rid: str, inst: Instance) -> None:
        if rid in self._draining:
            self._draining.discard(rid)
            self.flush()  # the proxies learn it is gone now, not after the drain
            self.stats["drained"] += 1
            await asyncio.sleep(self.drain)
        try:
            if inst.state != "exited":
                await self.driver.stop(rid, STOP_TIMEOUT)
                self.stats["stopped"] += 1
            await self.driver.remove(rid)
        except DriverError as exc:
            log.warning("cannot remove %s: %s", rid, exc)
            self._orphans.setdefault(rid, inst)
            return
        finally:
            if rid not in self._replicas:
                self.ports.release(rid)

    # ------------------------------------------------------------ health

    def _start_health(self, rep: _Replica) -> None:
        check = rep.spec.health
        if check is None or rep.health_task is not None:
            return
        rep.health = HealthTracker(check, self._clock())
        rep.health_task = asyncio.get_running_loop().create_task(self._health_loop(rep))

    async def _health_loop(self, rep: _Replica) -> None:
        tracker = rep.health
        assert tracker is not None and rep.spec.health is not None
        rid = rep.assigned.id

        async def exec_fn(argv: tuple[str, ...], timeout: float) -> tuple[int, str]:
            return await self.driver.exec(rid, argv, timeout)

        while True:
            await asyncio.sleep(max(0.0, tracker.next_due(self._clock()) - self._clock()))
            ok, message = await run_probe(
                rep.spec.health, host=self.address, ports=rep.ports, exec_fn=exec_fn
            )
            before = tracker.state
            after = tracker.on_result(ok, self._clock(), message)
            if after != before:
                self._dirty.add(rep.spec.name)
                self._schedule_flush()
                if after == "unhealthy":
                    self._wake.set()
                    return

    # ------------------------------------------------------------ status

    def _status(self, rep: _Replica) -> ReplicaStatus:
        health = "none"
        if rep.spec.health is not None:
            health = rep.health.state if rep.health is not None else "starting"
            if rep.state != "running":
                health = "starting" if rep.state == "starting" else "unhealthy"
        return ReplicaStatus(
            id=rep.assigned.id,
            slot=rep.assigned.slot,
            version=rep.assigned.version,
            state=rep.state,  # type: ignore[arg-type]
            health=health,  # type: ignore[arg-type]
            address=self.address,
            ports=dict(rep.ports),
            restarts=rep.backoff.restarts,
            started_ms=rep.started_ms,
            exit_code=rep.exit_code,
            reason=rep.reason,
        )

    def _schedule_flush(self) -> None:
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.get_running_loop().create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(STATUS_FLUSH_DELAY)
        self.flush()

    def flush(self) -> None:
        """Write the status of every service that changed since the last write."""
        dirty, self._dirty = self._dirty, set()
        for service in sorted(dirty):
            reps = sorted(
                (r for r in self._replicas.values() if r.spec.name == service),
                key=lambda r: (r.assigned.slot, r.assigned.id),
            )
            key = status_key(self.node, service)
            if not reps:
                if service in self._reported:
                    del self._reported[service]
                    try:
                        self._delete(key)
                    except Exception:
                        log.exception("cannot delete %s", key)
                continue
            status = ServiceStatus(
                node=self.node,
                service=service,
                term=self._terms.get(service, 0),
                replicas=tuple(self._status(r) for r in reps),
                updated_ms=self._wall_ms(),
            )
            raw = encode_status(status)
            comparable = _comparable(raw)
            if self._reported.get(service) == comparable:
                continue
            try:
                self._put(key, raw)
            except Exception:
                log.exception("cannot write %s", key)
                self._dirty.add(service)
                continue
            self._reported[service] = comparable


def _service_of(rep: _Replica) -> str:
    return rep.spec.name


def _comparable(raw: bytes) -> bytes:
    """A status without its timestamp: an unchanged status is not rewritten."""
    with contextlib.suppress(ValueError):
        s = decode_status(raw)
        return encode_status(ServiceStatus(s.node, s.service, s.term, s.replicas, 0))
    return raw


def _describe_free(need: Resources, free: Resources) -> str:
    parts = []
    if round(need.cpu * 1000) > round(free.cpu * 1000):
        parts.append(f"needs {need.cpu:g} CPU, {max(free.cpu, 0):g} free")
    if need.memory_mb > free.memory_mb:
        parts.append(f"needs {need.memory_mb} MiB memory, {max(free.memory_mb, 0)} free")
    if need.disk_mb > free.disk_mb:
        parts.append(f"needs {need.disk_mb} MiB disk, {max(free.disk_mb, 0)} free")
    if need.gpus > free.gpus:
        parts.append(f"needs {need.gpus} GPU, {max(free.gpus, 0)} free")
    return "; ".join(parts) or "no room"
