"""One real agent with the docker driver against the real engine, loopback
only: deploy with a health check, a rolling update, and adoption of running
containers by a new agent over the same data dir (no restart)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiodocker
import pytest
from conftest import TEST_IMAGE, async_wait_for

from meshd.agent import Agent
from meshd.config import load_config
from meshd.spec import ServiceSpec

pytestmark = [pytest.mark.docker, pytest.mark.integration]

HOST = "127.0.0.72"
PAGE = "mkdir -p /www && echo $MESHD_REPLICA > /www/index.html && exec httpd -f -p 80 -h /www"


def config(tmp: Path, node: str) -> Any:
    return load_config(
        [
            "--node", node,
            "--bind", f"{HOST}:0",
            "--api", f"{HOST}:0",
            "--data-dir", str(tmp / "data"),
            "--no-mdns",
            "--driver", "docker",
            "--profile", "local",
        ],
        {},
    )  # fmt: skip


@contextlib.asynccontextmanager
async def running(tmp: Path, node: str, *, leave: bool = True) -> AsyncIterator[Agent]:
    a = Agent(config(tmp, node))
    await a.start()
    try:
        yield a
    finally:
        await a.stop(leave=leave)


def spec(**kw: Any) -> ServiceSpec:
    data: dict[str, Any] = {
        "name": "web",
        "image": TEST_IMAGE,
        "args": ["sh", "-c", PAGE],
        "replicas": 2,
        "ports": [{"name": "http", "target": 80}],
        "health": {"http": "/", "port": "http", "interval": "1s", "retries": 2},
        "resources": {"cpu": 0.1, "memory": "32Mi"},
    }
    data.update(kw)
    return ServiceSpec.from_dict(data)


def ready(agent: Agent) -> list[dict[str, Any]]:
    return [
        r
        for r in agent.service_replicas("web") or []
        if r["state"] == "running" and r["health"] == "healthy"
    ]


async def containers(node: str) -> dict[str, dict[str, Any]]:
    """This node's containers by replica id: id, limits."""
    async with aiodocker.Docker() as docker:
        found = await docker.containers.list(all=True, filters={"label": [f"io.meshd.node={node}"]})
        out = {}
        for c in found:
            info = await c.show()
            out[info["Config"]["Labels"]["io.meshd.replica"]] = info
        return out


async def remove_all(node: str) -> None:
    async with aiodocker.Docker() as docker:
        for c in await docker.containers.list(
            all=True, filters={"label": [f"io.meshd.node={node}"]}
        ):
            with contextlib.suppress(aiodocker.DockerError):
                await c.delete(force=True)


async def test_deploy_update_and_adopt(tmp_path: Path, docker_url: str) -> None:
    node = f"dk-{tmp_path.name[-12:]}".replace("_", "-")
    try:
        async with running(tmp_path, node, leave=False) as a:
            await a.service_put(spec())
            first = await async_wait_for(lambda: len(ready(a)) == 2 and ready(a), 30)
            info = await containers(node)
            for r in first:
                hc = info[r["id"]]["HostConfig"]
                assert hc["NanoCpus"] == 100_000_000 and hc["Memory"] == 32 * 1024 * 1024
            # A rolling update: every replica replaced, health-gated, none left behind.
            await a.service_put(spec(env={"COLOR": "blue"}))
            version = a.service_get("web")["version"]

            def rolled() -> bool:
                got = ready(a)
                update = a.service_get("web")["update"]
                return (
                    len(got) == 2
                    and all(r["version"] == version for r in got)
                    and update is not None
                    and update["state"] == "done"
                )

            await async_wait_for(rolled, 40, message="rolled out")
            after = {r["id"] for r in ready(a)}
            assert not after & {r["id"] for r in first}

            async def only_new() -> bool:
                return set(await containers(node)) == after

            await async_wait_for(only_new, 20, message="old containers removed")
            before = {rid: c["Id"] for rid, c in (await containers(node)).items()}
        # The agent stopped without leaving (as after a crash): a new one adopts.
        async with running(tmp_path, node) as b:
            await async_wait_for(lambda: {r["id"] for r in ready(b)} == after, 30)
            now = {rid: c["Id"] for rid, c in (await containers(node)).items()}
            assert now == before  # the same containers, never restarted
            assert all(r["restarts"] == 0 for r in ready(b))
    finally:
        await remove_all(node)
