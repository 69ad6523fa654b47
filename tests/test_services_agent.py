"""One real agent in this process, process driver, loopback only: the whole
service path (store, lease, leader, node controller, driver) on one node.

Covers what a single host shows best: a rolling update that replaces every
replica, a crashed replica restarted in place, logs, a job that completes and
frees its slots, scaling to zero, a pending reason, and adoption of running
replicas by a new agent over the same data dir.
"""

from __future__ import annotations

import contextlib
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import async_wait_for

from meshd.agent import Agent
from meshd.config import load_config
from meshd.runtime.process import PID_FILE, _signal_group_but_leader
from meshd.spec import ServiceSpec

pytestmark = pytest.mark.integration

HOST = "127.0.0.71"


def config(tmp: Path) -> Any:
    return load_config(
        [
            "--node",
            "solo",
            "--bind",
            f"{HOST}:0",
            "--api",
            f"{HOST}:0",
            "--data-dir",
            str(tmp / "data"),
            "--no-mdns",
            "--driver",
            "process",
            "--profile",
            "local",
        ],
        {},
    )


@contextlib.asynccontextmanager
async def running(tmp: Path) -> AsyncIterator[Agent]:
    """An agent for one test, started and stopped on the test's own loop."""
    a = Agent(config(tmp))
    await a.start()
    try:
        yield a
    finally:
        await a.stop(leave=True)


def spec(**kw: Any) -> ServiceSpec:
    data = {"name": "web", "command": ["sh", "-c", "echo hi $MESHD_REPLICA; exec sleep 60"]}
    data.update(kw)
    return ServiceSpec.from_dict(data)


def ready(agent: Agent, name: str) -> list[dict[str, Any]]:
    return [r for r in agent.service_replicas(name) or [] if r["state"] == "running"]


async def test_job_runs_to_completion_and_frees_its_slots(tmp_path: Path) -> None:
    async with running(tmp_path) as agent:
        job = ServiceSpec.from_dict(
            {
                "name": "batch",
                "kind": "job",
                "command": ["sh", "-c", "exit 0"],
                "parallelism": 2,
                "completions": 4,
            }
        )
        await agent.service_put(job)
        await async_wait_for(lambda: agent.service_get("batch")["completed"] == 4, 15)
        assert agent.service_replicas("batch") == []


async def test_resources_that_fit_nowhere_are_pending_with_a_reason(tmp_path: Path) -> None:
    async with running(tmp_path) as agent:
        await agent.service_put(spec(name="huge", resources={"cpu": 4096}))
        got = await async_wait_for(lambda: agent.service_get("huge")["pending"], 10)
        assert "cpu" in json.dumps(got).lower()


async def test_new_agent_adopts_running_replicas(tmp_path: Path) -> None:
    a = Agent(config(tmp_path))
    await a.start()
    await a.service_put(spec(replicas=2))
    before = await async_wait_for(lambda: len(ready(a, "web")) == 2 and ready(a, "web"), 10)
    await a.stop(leave=False)  # a crash-like stop: replicas keep running
    b = Agent(config(tmp_path))
    await b.start()
    try:

        def adopted() -> bool:
            got = ready(b, "web")
            return len(got) == 2 and all(r["restarts"] == 0 for r in got)

        await async_wait_for(adopted, 15, message="replicas adopted")
        assert {r["id"] for r in ready(b, "web")} == {r["id"] for r in before}
        assert b.workloads is not None and b.workloads.controller.stats["adopted"] == 2
    finally:
        await b.stop(leave=True)


async def test_deploy_scale_update_and_delete(tmp_path: Path) -> None:
    async with running(tmp_path) as agent:
        await agent.service_put(spec(replicas=2))
        first = await async_wait_for(
            lambda: len(ready(agent, "web")) == 2 and ready(agent, "web"), 10
        )
        assert agent.service_leader("web") == {"node": "solo", "term": 1}
        # A rolling update (new env) replaces every replica with a new id and version.
        await agent.service_put(spec(replicas=2, env={"X": "2"}))
        version = agent.service_get("web")["version"]

        def rolled() -> bool:
            got = ready(agent, "web")
            update = agent.service_get("web")["update"]
            return (
                len(got) == 2
                and all(r["version"] == version for r in got)
                and update is not None
                and update["state"] == "done"
            )

        await async_wait_for(rolled, 15, message="rolled out")
        assert not {r["id"] for r in ready(agent, "web")} & {r["id"] for r in first}
        await agent.service_scale("web", 0)
        await async_wait_for(lambda: agent.service_replicas("web") == [], 10)
        assert await agent.service_delete("web")
        await async_wait_for(lambda: agent.service_get("web") is None, 5)


async def test_crashed_replica_restarts_and_logs_are_read(tmp_path: Path) -> None:
    async with running(tmp_path) as agent:
        await agent.service_put(spec(replicas=1))
        (r,) = await async_wait_for(lambda: ready(agent, "web"), 10)

        async def logged() -> bool:
            lines = [line async for line in agent.service_logs("web", tail=10, follow=False)]
            return any(line["text"] == f"hi {r['id']}" for line in lines)

        await async_wait_for(logged, 5, message="the replica's first line in its logs")
        state = json.loads(
            (Path(agent.config.data_dir) / "replicas" / r["id"] / PID_FILE).read_text()
        )
        _signal_group_but_leader(state["pid"], signal.SIGKILL)  # the command, not its wrapper

        def restarted() -> bool:
            got = ready(agent, "web")
            return len(got) == 1 and got[0]["restarts"] >= 1

        await async_wait_for(restarted, 10, message="restarted after a crash")
        assert ready(agent, "web")[0]["id"] == r["id"]  # the same replica, in place
