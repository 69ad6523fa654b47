"""The node controller against an in-memory driver: what it runs, refuses,
restarts, stops and reports for the assignments naming its node.

The store is a real in-memory ``Store``; assignments are written into it as a
leader would, and the controller's status writes land in it too. The driver
is a fake that records every call and lets a test make a replica exit. Only
the health tests touch sockets: the fake then serves HTTP on each replica's
host port, on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from conftest import async_wait_for

from meshd.runtime.base import DriverError, Instance, LaunchSpec, LogLine, PortBinding
from meshd.runtime.node import NodeController
from meshd.runtime.ports import PortAllocator
from meshd.scheduler.assignment import (
    AssignedReplica,
    Assignment,
    ReplicaStatus,
    ServiceStatus,
    assign_key,
    decode_status,
    encode_assignment,
    encode_status,
    spec_version,
    status_key,
)
from meshd.scheduler.placement import Resources
from meshd.spec import ServiceSpec
from meshd.state.store import Store

NODE = "n1"
HOST = "127.0.0.1"


def wall_ms() -> int:
    return int(time.time() * 1000)


class Clock:
    """Monotonic time that a test can move forward (to skip a backoff wait)
    or stop (to hold a replica in its backoff while it looks)."""

    def __init__(self) -> None:
        self.skew = 0.0
        self.frozen: float | None = None

    def __call__(self) -> float:
        return self.frozen if self.frozen is not None else time.monotonic() + self.skew

    def freeze(self) -> None:
        self.frozen = self()

    def thaw(self) -> None:
        assert self.frozen is not None
        self.skew = self.frozen - time.monotonic()
        self.frozen = None


# ----- the fake driver -------------------------------------------------------------


class FakeDriver:
    """An in-memory runtime: replicas are records; exits happen when a test says.

    ``stop`` reports the exit to the listener before it returns, as the process
    driver does. ``remove`` forgets a replica even when it runs, as docker's
    forced removal does. With ``serve_http`` every running replica answers
    HTTP with ``http_status`` on its host ports (loopback).
    """

    def __init__(self, name: str = "process", *, serve_http: bool = False) -> None:
        self.name = name
        self.serve_http = serve_http
        self.http_status = 200
        self.instances: dict[str, Instance] = {}
        self.launches: list[LaunchSpec] = []
        self.run_times: list[tuple[str, float]] = []
        self.stops: list[str] = []
        self.removes: list[str] = []
        self.run_error: str | None = None
        self.stop_exit_code = 143
        self.remove_gate: asyncio.Event | None = None
        """When set, ``remove`` waits for it (a slow engine)."""
        self.listener: Callable[[Instance], None] | None = None
        self._handles = itertools.count(1)
        self._servers: dict[str, list[web.AppRunner]] = {}

    # -- the Driver protocol --

    async def start(self, on_change: Callable[[Instance], None]) -> None:
        self.listener = on_change

    async def close(self) -> None:
        self.listener = None
        for rid in list(self._servers):
            await self._unserve(rid)

    async def list(self) -> list[Instance]:
        return list(self.instances.values())

    async def run(self, spec: LaunchSpec) -> Instance:
        self.launches.append(spec)
        self.run_times.append((spec.replica_id, time.monotonic()))
        if self.run_error is not None:
            raise DriverError(f"replica {spec.replica_id}: {self.run_error}")
        current = self.instances.get(spec.replica_id)
        if current is not None and current.state == "running":
            raise DriverError(f"replica {spec.replica_id} is already running")
        inst = Instance(
            replica_id=spec.replica_id,
            service=spec.service,
            slot=spec.slot,
            version=spec.version,
            state="running",
            handle=f"h{next(self._handles)}",
            started_at=time.time(),
            ports=spec.ports,
        )
        self.instances[spec.replica_id] = inst
        if self.serve_http:
            await self._serve(spec.replica_id, spec.ports)
        return inst

    async def stop(self, replica_id: str, timeout: float = 10.0) -> None:
        self.stops.append(replica_id)
        inst = self.instances.get(replica_id)
        if inst is not None and inst.state == "running":
            await self._unserve(replica_id)
            self.exit(replica_id, self.stop_exit_code)

    async def remove(self, replica_id: str) -> None:
        self.removes.append(replica_id)
        if self.remove_gate is not None:
            await self.remove_gate.wait()
        await self._unserve(replica_id)
        self.instances.pop(replica_id, None)

    async def exec(self, replica_id: str, argv: tuple[str, ...], timeout: float) -> tuple[int, str]:
        return 0, ""

    async def logs(
        self, replica_id: str, *, tail: int | None = None, follow: bool = False
    ) -> AsyncIterator[LogLine]:
        return
        yield

    # -- what tests do --

    def exit(self, replica_id: str, code: int | None, error: str | None = None) -> Instance:
        """The replica ends by itself (or by a stop); the listener hears of it."""
        inst = dataclasses.replace(
            self.instances[replica_id],
            state="exited",
            exit_code=code,
            finished_at=time.time(),
            error=error,
        )
        self.instances[replica_id] = inst
        self.emit(inst)
        return inst

    def emit(self, inst: Instance) -> None:
        if self.listener is not None:
            self.listener(inst)

    def launched(self, replica_id: str) -> list[LaunchSpec]:
        return [s for s in self.launches if s.replica_id == replica_id]

    def running(self, replica_id: str) -> Instance | None:
        inst = self.instances.get(replica_id)
        return inst if inst is not None and inst.state == "running" else None

    async def _serve(self, replica_id: str, ports: tuple[PortBinding, ...]) -> None:
        async def answer(request: web.Request) -> web.Response:
            return web.Response(status=self.http_status, text="ok\n")

        runners = []
        for binding in ports:
            app = web.Application()
            app.router.add_get("/{tail:.*}", answer)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, HOST, binding.host_port).start()
            runners.append(runner)
        self._servers[replica_id] = runners

    async def _unserve(self, replica_id: str) -> None:
        for runner in self._servers.pop(replica_id, []):
            await runner.cleanup()


# ----- the harness -----------------------------------------------------------------


class Harness:
    def __init__(self, driver: FakeDriver, capacity: Resources) -> None:
        self.store = Store(NODE)
        self.driver = driver
        self.capacity = capacity
        self.clock = Clock()
        self.ports = PortAllocator(bind_check_host=HOST)
        self.controller = NodeController(
            NODE,
            driver,
            store=self.store,
            put=lambda key, value: self.store.put(key, value, wall_ms()),
            delete=lambda key: self.store.delete(key, wall_ms()),
            allocatable=lambda: self.capacity,
            address=HOST,
            ports=self.ports,
            clock=self.clock,
        )
        self._barriers = itertools.count(1)

    def assign(
        self,
        spec: ServiceSpec,
        replicas: list[tuple[str, int] | tuple[str, int, str]],
        term: int = 1,
    ) -> None:
        """Write ``assign/<service>`` as the service's leader in ``term`` would."""
        version = spec_version(spec)
        assigned = tuple(
            AssignedReplica(r[0], r[1], r[2] if len(r) == 3 else NODE, version)  # type: ignore[misc]
            for r in replicas
        )
        assignment = Assignment(
            service=spec.name,
            term=term,
            leader="leader",
            version=version,
            specs={version: spec.to_dict()},
            replicas=assigned,
        )
        self.store.put(assign_key(spec.name), encode_assignment(assignment), wall_ms())

    def unassign(self, service: str) -> None:
        self.store.delete(assign_key(service), wall_ms())

    def status(self, service: str) -> ServiceStatus | None:
        entry = self.store.get(status_key(NODE, service))
        return None if entry is None else decode_status(entry.value)  # type: ignore[arg-type]

    def replica(self, service: str, replica_id: str) -> ReplicaStatus | None:
        status = self.status(service)
        return None if status is None else status.by_id().get(replica_id)

    async def wait_replica(self, service: str, replica_id: str, **want: Any) -> ReplicaStatus:
        """The replica's reported status once every field in ``want`` matches."""

        def matches() -> ReplicaStatus | None:
            r = self.replica(service, replica_id)
            if r is None:
                return None
            return r if all(getattr(r, k) == v for k, v in want.items()) else None

        return await async_wait_for(matches, message=f"{replica_id} reported with {want}")

    async def barrier(self) -> None:
        """Wait for a reconcile pass that began after everything done so far.

        A new service is assigned and the pass that launches it has also seen
        every earlier event: what that pass did not do, the controller will
        not do (unless a timer is due).
        """
        n = next(self._barriers)
        rid = f"barrier{n}-0-x"
        self.assign(spec(f"barrier{n}"), [(rid, 0)])
        await async_wait_for(lambda: self.driver.launched(rid), message=f"{rid} launched")


def spec(name: str, **fields: Any) -> ServiceSpec:
    data: dict[str, Any] = {"name": name, "command": ["srv", "--serve"]}
    data.update(fields)
    return ServiceSpec.from_dict(data)


@contextlib.asynccontextmanager
async def running(
    driver: FakeDriver | None = None,
    capacity: Resources | None = None,
    before_start: Callable[[Harness], None] | None = None,
) -> AsyncIterator[Harness]:
    h = Harness(
        driver or FakeDriver(),
        capacity or Resources(cpu=4.0, memory_mb=4096, disk_mb=10_000, gpus=0),
    )
    if before_start is not None:
        before_start(h)
    await h.controller.start()
    try:
        yield h
    finally:
        await h.controller.stop()
        await h.driver.close()


# ----- running what is assigned ------------------------------------------------------


async def test_assigned_replica_runs_with_identity_ports_and_limits() -> None:
    web_spec = spec(
        "web",
        env={"GREETING": "hi"},
        ports=[{"name": "http", "target": 8080}, {"name": "admin-ui", "target": 9000}],
        resources={"cpu": "500m", "memory": "64Mi"},
        labels={"tier": "front"},
    )
    async with running() as h:
        h.assign(web_spec, [("web-0-aaaa", 0), ("web-1-bbbb", 1, "n2")], term=3)
        status = await h.wait_replica("web", "web-0-aaaa", state="running")

        assert [s.replica_id for s in h.driver.launches] == ["web-0-aaaa"]  # not n2's
        launch = h.driver.launches[0]
        assert (launch.service, launch.slot, launch.version) == ("web", 0, spec_version(web_spec))
        assert launch.command == ("srv", "--serve") and launch.image is None
        assert (launch.cpu, launch.memory_mb, launch.gpus) == (0.5, 64, 0)
        assert launch.labels == {"tier": "front"}
        http, admin = launch.ports
        assert (http.name, http.target, admin.name, admin.target) == (
            "http",
            8080,
            "admin-ui",
            9000,
        )
        assert http.host_port != admin.host_port
        assert launch.env == {
            "GREETING": "hi",
            "MESHD_SERVICE": "web",
            "MESHD_REPLICA": "web-0-aaaa",
            "MESHD_SLOT": "0",
            "MESHD_NODE": NODE,
            "MESHD_ADDRESS": HOST,
            "MESHD_PORT_HTTP": str(http.host_port),
            "MESHD_PORT_ADMIN_UI": str(admin.host_port),
        }
        assert h.ports.owner(http.host_port) == "web-0-aaaa"

        assert status.ports == {"http": http.host_port, "admin-ui": admin.host_port}
        assert (status.address, status.health, status.restarts) == (HOST, "none", 0)
        assert status.ready and status.started_ms > 0
        whole = h.status("web")
        assert whole is not None and whole.term == 3 and whole.node == NODE
        assert [r.id for r in whole.replicas] == ["web-0-aaaa"]
        assert h.controller.stats["started"] == 1


# ----- admission -------------------------------------------------------------------


async def test_admission_refuses_what_does_not_fit_and_admits_it_when_room_frees() -> None:
    capacity = Resources(cpu=1.0, memory_mb=256, disk_mb=1000, gpus=0)
    web_spec = spec("web", resources={"cpu": 0.5})
    async with running(capacity=capacity) as h:
        h.assign(web_spec, [("web-0-a", 0), ("web-1-b", 1), ("web-2-c", 2)])
        h.assign(spec("big", resources={"memory": "512Mi"}), [("big-0-a", 0)])
        h.assign(ServiceSpec.from_dict({"name": "img", "image": "nginx:1"}), [("img-0-a", 0)])

        refused_cpu = await h.wait_replica("web", "web-2-c", state="refused")
        assert "CPU" in refused_cpu.reason and NODE in refused_cpu.reason
        refused_mem = await h.wait_replica("big", "big-0-a", state="refused")
        assert "memory" in refused_mem.reason and "512 MiB" in refused_mem.reason
        refused_img = await h.wait_replica("img", "img-0-a", state="refused")
        assert "Docker" in refused_img.reason
        await h.wait_replica("web", "web-0-a", state="running")
        await h.wait_replica("web", "web-1-b", state="running")
        assert sorted(s.replica_id for s in h.driver.launches) == ["web-0-a", "web-1-b"]
        assert h.controller.stats["refused"] >= 3

        # The leader moves slot 0 away: its half core frees up, and the still
        # assigned slot 2 is admitted on that pass.
        h.assign(web_spec, [("web-1-b", 1), ("web-2-c", 2)])
        await h.wait_replica("web", "web-2-c", state="running", reason="")
        assert "web-0-a" in h.driver.stops and "web-0-a" in h.driver.removes
        assert "web-0-a" not in h.driver.instances
        # Still nothing for the others: their needs did not change.
        assert h.replica("big", "big-0-a").state == "refused"  # type: ignore[union-attr]
        assert h.replica("img", "img-0-a").state == "refused"  # type: ignore[union-attr]


async def test_image_spec_is_admitted_by_a_docker_node() -> None:
    image_spec = ServiceSpec.from_dict({"name": "img", "image": "nginx:1"})
    async with running(FakeDriver("docker")) as h:
        h.assign(image_spec, [("img-0-a", 0)])
        await h.wait_replica("img", "img-0-a", state="running")
        assert h.driver.launches[0].image == "nginx:1"


# ----- fencing -------------------------------------------------------------------------


async def test_assignment_from_an_older_term_is_ignored() -> None:
    web_spec = spec("web")
    async with running() as h:
        h.assign(web_spec, [("web-0-a", 0)], term=5)
        await h.wait_replica("web", "web-0-a", state="running")

        # A deposed leader (term 4) writes last: it would scale web to zero.
        h.assign(web_spec, [], term=4)
        await async_wait_for(lambda: h.controller.stats["stale_assignments"] >= 1)
        await h.barrier()
        assert h.driver.stops == [] and h.driver.running("web-0-a")
        status = h.status("web")
        assert status is not None and status.term == 5
        assert status.by_id()["web-0-a"].state == "running"

        # The current leader (term 6) does scale it to zero.
        h.assign(web_spec, [], term=6)
        await async_wait_for(lambda: h.status("web") is None, message="web status deleted")
        assert h.driver.stops == ["web-0-a"] and h.driver.instances.keys() == {"barrier1-0-x"}


async def test_term_reported_before_a_restart_still_fences() -> None:
    def before(h: Harness) -> None:
        old = ServiceStatus(NODE, "web", term=7, replicas=(), updated_ms=wall_ms())
        h.store.put(status_key(NODE, "web"), encode_status(old), wall_ms())
        h.assign(spec("web"), [("web-0-a", 0)], term=6)

    async with running(before_start=before) as h:
        await h.barrier()
        assert h.driver.launched("web-0-a") == []
        assert h.controller.stats["stale_assignments"] >= 1


# ----- stopping what is no longer assigned ----------------------------------------------


async def test_unassigned_replicas_are_stopped_removed_and_unreported() -> None:
    web_spec = spec("web", ports=[{"name": "http", "target": 80}])
    async with running() as h:
        h.assign(web_spec, [("web-0-a", 0), ("web-1-b", 1)])
        await h.wait_replica("web", "web-0-a", state="running")
        gone = await h.wait_replica("web", "web-1-b", state="running")

        h.assign(web_spec, [("web-0-a", 0)])
        await async_wait_for(lambda: "web-1-b" in h.driver.removes)
        await async_wait_for(lambda: [r.id for r in h.status("web").replicas] == ["web-0-a"])  # type: ignore[union-attr]
        assert h.driver.stops == ["web-1-b"]
        assert h.ports.owner(gone.ports["http"]) is None  # its host port is free again
        assert h.controller.stats["stopped"] == 1

        h.unassign("web")
        await async_wait_for(lambda: h.status("web") is None, message="web status deleted")
        await async_wait_for(lambda: "web-0-a" in h.driver.removes)
        assert h.driver.instances == {}
        assert h.store.get(status_key(NODE, "web"), include_deleted=True) is not None


async def test_a_ready_replica_leaves_the_status_before_it_is_stopped() -> None:
    """Draining: the proxies stop picking it first, then it stops."""
    web_spec = spec("web", ports=[{"name": "http", "target": 80}])
    async with running() as h:
        h.controller.drain = 0.3
        h.assign(web_spec, [("web-0-a", 0), ("web-1-b", 1)])
        await h.wait_replica("web", "web-1-b", state="running")

        h.assign(web_spec, [("web-0-a", 0)])
        await async_wait_for(lambda: [r.id for r in h.status("web").replicas] == ["web-0-a"])  # type: ignore[union-attr]
        assert h.driver.stops == [], "stopped before its status was withdrawn"
        await async_wait_for(lambda: h.driver.stops == ["web-1-b"])
        assert h.controller.stats["drained"] == 1

        h.assign(spec("quiet"), [("quiet-0-a", 0)])  # no ports: nothing to drain
        await h.wait_replica("quiet", "quiet-0-a", state="running")
        h.unassign("quiet")
        await async_wait_for(lambda: "quiet-0-a" in h.driver.stops)
        assert h.controller.stats["drained"] == 1


# ----- restart policies ----------------------------------------------------------------


async def test_restart_always_restarts_with_backoff_and_counts() -> None:
    async with running() as h:
        h.assign(spec("web", restart="always"), [("web-0-a", 0)])
        await h.wait_replica("web", "web-0-a", state="running")

        exits = []
        for n, code in enumerate((1, 0), start=1):  # "always" restarts even exit 0
            exits.append(time.monotonic())
            h.driver.exit("web-0-a", code)
            await async_wait_for(lambda n=n: len(h.driver.launched("web-0-a")) == n + 1)
            status = await h.wait_replica("web", "web-0-a", state="running", restarts=n)
            assert status.exit_code == code and status.reason == ""

        run_at = [t for rid, t in h.driver.run_times if rid == "web-0-a"]
        # Crash-loop backoff: 0.1 s after the first exit, 0.2 s after the second.
        assert run_at[1] - exits[0] >= 0.1 * 0.9
        assert run_at[2] - exits[1] >= 0.2 * 0.9
        assert h.controller.stats["restarts"] == 2
        assert h.controller.stats["started"] == 3
        assert h.driver.removes.count("web-0-a") == 2  # each exited run was cleaned up


async def test_exited_replica_reports_code_error_and_backoff() -> None:
    async with running() as h:
        h.assign(spec("web"), [("web-0-a", 0)])
        await h.wait_replica("web", "web-0-a", state="running")
        h.clock.freeze()  # its backoff never ends while the test looks
        h.driver.exit("web-0-a", 137, error="OOM killed")
        status = await h.wait_replica("web", "web-0-a", state="exited")
        assert status.exit_code == 137 and status.restarts == 1 and not status.ready
        assert status.reason == "exited with code 137 (OOM killed); restarting in 0.1s"
        h.clock.thaw()
        await h.wait_replica("web", "web-0-a", state="running", restarts=1)


async def test_on_failure_exit_zero_succeeds_and_is_not_restarted() -> None:
    async with running() as h:
        h.assign(spec("web", restart="on-failure"), [("web-0-a", 0)])
        await h.wait_replica("web", "web-0-a", state="running")
        h.driver.exit("web-0-a", 0)
        status = await h.wait_replica("web", "web-0-a", state="succeeded")
        assert status.exit_code == 0 and status.restarts == 0
        await h.barrier()
        assert len(h.driver.launched("web-0-a")) == 1
        assert h.replica("web", "web-0-a").state == "succeeded"  # type: ignore[union-attr]


async def test_replica_finished_before_a_restart_is_not_run_again() -> None:
    def before(h: Harness) -> None:
        done = ReplicaStatus(
            "web-0-a", 0, "v", "succeeded", exit_code=0, reason="exited with code 0"
        )
        old = ServiceStatus(NODE, "web", term=1, replicas=(done,), updated_ms=wall_ms())
        h.store.put(status_key(NODE, "web"), encode_status(old), wall_ms())
        h.assign(spec("web", restart="on-failure"), [("web-0-a", 0)], term=1)

    async with running(before_start=before) as h:
        await h.barrier()
        assert h.driver.launched("web-0-a") == []
        assert h.replica("web", "web-0-a").state == "succeeded"  # type: ignore[union-attr]


async def test_on_failure_exit_nonzero_is_restarted() -> None:
    async with running() as h:
        h.assign(spec("web", restart="on-failure"), [("web-0-a", 0)])
        await h.wait_replica("web", "web-0-a", state="running")
        h.driver.exit("web-0-a", 3)
        await h.wait_replica("web", "web-0-a", state="running", restarts=1)
        assert len(h.driver.launched("web-0-a")) == 2


async def test_never_fails_for_good() -> None:
    async with running() as h:
        h.assign(spec("web", restart="never"), [("web-0-a", 0)])
        await h.wait_replica("web", "web-0-a", state="running")
        h.driver.exit("web-0-a", 2)
        status = await h.wait_replica("web", "web-0-a", state="failed")
        assert status.exit_code == 2 and "exited with code 2" in status.reason
        await h.barrier()
        assert len(h.driver.launched("web-0-a")) == 1
        assert h.replica("web", "web-0-a").state == "failed"  # type: ignore[union-attr]


async def test_job_that_succeeds_frees_its_resources_and_stays_succeeded() -> None:
    capacity = Resources(cpu=1.0, memory_mb=1024, disk_mb=1000, gpus=0)
    job = spec("report", kind="job", resources={"cpu": 1}, ports=[{"name": "http", "target": 80}])
    async with running(capacity=capacity) as h:
        h.assign(job, [("report-0-a", 0)])
        held = await h.wait_replica("report", "report-0-a", state="running")
        # "api" sorts before "report": admission order must not let the finished
        # job compete for the room it just gave back.
        h.assign(spec("api", resources={"cpu": 1}), [("api-0-a", 0)])
        await h.wait_replica("api", "api-0-a", state="refused")

        h.driver.exit("report-0-a", 0)
        done = await h.wait_replica("report", "report-0-a", state="succeeded")
        assert done.ports == {} and h.ports.owner(held.ports["http"]) is None
        await h.wait_replica("api", "api-0-a", state="running")
        await h.barrier()
        await h.wait_replica("report", "report-0-a", state="succeeded")
        assert len(h.driver.launched("report-0-a")) == 1


async def test_late_duplicate_exit_event_is_ignored() -> None:
    """Docker reports an OOM kill as both ``oom`` and ``die``, and replays
    events after reconnecting: one exit must count once, and an event about
    an instance already replaced must not touch the new one."""
    async with running() as h:
        h.assign(spec("web"), [("web-0-a", 0)])
        await h.wait_replica("web", "web-0-a", state="running")
        first = h.driver.exit("web-0-a", 1)
        await h.wait_replica("web", "web-0-a", state="running", restarts=1)
        new = h.driver.running("web-0-a")
        assert new is not None and new.handle != first.handle

        h.driver.emit(first)  # the same exit, reported again
        await h.barrier()
        assert h.driver.running("web-0-a") == new
        assert h.controller.stats["restarts"] == 1
        assert h.replica("web", "web-0-a").restarts == 1  # type: ignore[union-attr]


async def test_restart_waits_for_the_removal_of_the_exited_instance() -> None:
    """Removal is by replica id: one finishing after the restart would remove
    the new instance."""
    async with running() as h:
        h.assign(spec("web"), [("web-0-a", 0)])
        await h.wait_replica("web", "web-0-a", state="running")
        h.driver.remove_gate = gate = asyncio.Event()
        h.driver.exit("web-0-a", 1)
        await async_wait_for(lambda: "web-0-a" in h.driver.removes)
        h.clock.skew += 10.0  # long past the backoff
        await h.barrier()
        assert len(h.driver.launched("web-0-a")) == 1

        gate.set()
        await async_wait_for(lambda: h.driver.running("web-0-a"), message="restarted")
        await h.barrier()
        assert h.driver.running("web-0-a") is not None


# ----- start errors -----------------------------------------------------------------------


async def test_start_error_is_reported_and_retried() -> None:
    async with running() as h:
        h.driver.run_error = "image missing"
        h.assign(spec("web"), [("web-0-a", 0)])
        status = await h.wait_replica("web", "web-0-a", state="error")
        assert "image missing" in status.reason and "retrying in 1s" in status.reason
        assert h.controller.stats["start_errors"] == 1

        h.driver.run_error = None
        h.clock.skew += 1.0  # the retry backoff (1 s) has passed
        h.controller.poke()
        await h.wait_replica("web", "web-0-a", state="running", reason="")
        assert len(h.driver.launched("web-0-a")) == 2


# ----- health ---------------------------------------------------------------------------

HEALTH = {"http": "/health", "port": "http", "interval": 0.1, "retries": 1}


@pytest.mark.integration
async def test_http_health_check_marks_replica_healthy() -> None:
    async with running(FakeDriver(serve_http=True)) as h:
        h.assign(
            spec("web", ports=[{"name": "http", "target": 80}], health=HEALTH), [("web-0-a", 0)]
        )
        status = await h.wait_replica("web", "web-0-a", state="running", health="healthy")
        assert status.ready


@pytest.mark.integration
async def test_failing_health_check_restarts_replica_whatever_its_policy() -> None:
    driver = FakeDriver(serve_http=True)
    driver.stop_exit_code = 0  # it shuts down cleanly on SIGTERM
    web_spec = spec(
        "web", restart="on-failure", ports=[{"name": "http", "target": 80}], health=HEALTH
    )
    async with running(driver) as h:
        h.assign(web_spec, [("web-0-a", 0)])
        first = await h.wait_replica("web", "web-0-a", health="healthy")

        driver.http_status = 500
        await async_wait_for(lambda: "web-0-a" in driver.stops, message="unhealthy replica stopped")
        driver.http_status = 200
        await async_wait_for(lambda: len(driver.launched("web-0-a")) == 2, message="restarted")
        again = await h.wait_replica("web", "web-0-a", health="healthy", restarts=1)
        assert again.ports == first.ports  # same host port across the restart
        assert h.controller.stats["health_restarts"] == 1
        assert driver.stops == ["web-0-a"]


# ----- adoption ---------------------------------------------------------------------------


async def test_adopts_assigned_instances_without_running_them_again() -> None:
    web_spec = spec("web", ports=[{"name": "http", "target": 80}])
    version = spec_version(web_spec)

    def before(h: Harness) -> None:
        def inst(rid: str, slot: int, state: str, **kw: Any) -> Instance:
            return Instance(rid, "web", slot, version, state, f"old-{rid}", **kw)  # type: ignore[arg-type]

        h.driver.instances = {
            "web-0-a": inst(
                "web-0-a",
                0,
                "running",
                started_at=time.time() - 60,
                ports=(PortBinding("http", 80, 24567),),
            ),
            "web-1-b": inst("web-1-b", 1, "exited", exit_code=1),
            "gone-0-z": inst("gone-0-z", 0, "running"),
        }
        h.assign(web_spec, [("web-0-a", 0), ("web-1-b", 1)])

    async with running(before_start=before) as h:
        status = await h.wait_replica("web", "web-0-a", state="running")
        assert status.ports == {"http": 24567}
        assert h.ports.owner(24567) == "web-0-a"
        assert h.driver.launched("web-0-a") == []
        assert h.driver.instances["web-0-a"].handle == "old-web-0-a"
        # The exited one goes through its restart policy; the unassigned one goes.
        await h.wait_replica("web", "web-1-b", state="running", restarts=1)
        await async_wait_for(lambda: "gone-0-z" in h.driver.removes)
        assert h.driver.stops == ["gone-0-z"]
        assert h.controller.stats["adopted"] == 2
        # A new port never collides with the adopted one.
        assert h.driver.launched("web-1-b")[0].ports[0].host_port != 24567


# ----- bad input --------------------------------------------------------------------------


async def test_bad_assignments_are_ignored_and_counted_once() -> None:
    async with running() as h:
        h.store.put(assign_key("junk"), b"{not json", wall_ms())
        broken = Assignment(
            service="broken",
            term=1,
            leader="leader",
            version="v1",
            specs={"v1": {"name": "broken"}},  # neither image nor command
            replicas=(AssignedReplica("broken-0-a", 0, NODE, "v1"),),
        )
        h.store.put(assign_key("broken"), encode_assignment(broken), wall_ms())
        h.assign(spec("web"), [("web-0-a", 0)])
        await h.wait_replica("web", "web-0-a", state="running")
        await h.barrier()
        await h.barrier()
        assert h.controller.stats["bad_assignments"] == 2  # once each, not once a pass
        assert h.driver.launched("broken-0-a") == []
        assert h.status("broken") is None and h.status("junk") is None
