"""The docker driver against the machine's real Docker Engine.

Every test uses an owner name of its own, so it only ever sees (and cleans
up) its own containers, even when other runs share the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiodocker
import aiohttp
import pytest
from conftest import TEST_IMAGE, async_wait_for

from meshd.runtime.base import DriverError, DriverUnavailable, Instance, LaunchSpec, PortBinding
from meshd.runtime.docker import LABEL_NODE, DockerDriver, container_name, parse_time

pytestmark = pytest.mark.docker

CLUSTER = "test-cluster"


@dataclass
class Harness:
    driver: DockerDriver
    owner: str
    url: str
    changes: list[Instance] = field(default_factory=list)
    n: int = 0

    def spec(self, *args: str, **kw: object) -> LaunchSpec:
        self.n += 1
        kw.setdefault("image", TEST_IMAGE)
        return LaunchSpec(
            replica_id=f"web-{self.n}-{uuid.uuid4().hex[:4]}",
            service="web",
            slot=self.n,
            version="v1",
            args=args,
            **kw,  # type: ignore[arg-type]
        )

    def exited(self, replica_id: str) -> Instance | None:
        for change in reversed(self.changes):
            if change.replica_id == replica_id and change.state == "exited":
                return change
        return None

    async def inspect(self, replica_id: str) -> dict:
        async with aiodocker.Docker(url=self.url) as docker:
            return await docker._query_json(
                f"containers/{container_name(self.owner, replica_id)}/json"
            )


async def _remove_owned(url: str, owner: str) -> None:
    async with aiodocker.Docker(url=url) as docker:
        filters = json.dumps({"label": [f"{LABEL_NODE}={owner}"]})
        for container in await docker.containers.list(all=True, filters=filters):
            try:
                await container.delete(force=True)
            except aiodocker.DockerError as exc:
                if exc.status != 404:
                    raise


@pytest.fixture
async def h(docker_url: str) -> AsyncIterator[Harness]:
    owner = f"t{os.getpid()}-{uuid.uuid4().hex[:6]}"
    harness = Harness(DockerDriver(owner=owner, cluster=CLUSTER, url=docker_url), owner, docker_url)
    try:
        await harness.driver.start(harness.changes.append)
    except DriverUnavailable as exc:
        await harness.driver.close()
        if os.environ.get("MESHD_REQUIRE_DOCKER") == "1":
            raise
        pytest.skip(f"no Docker Engine: {exc}")
    try:
        yield harness
    finally:
        await harness.driver.close()
        await _remove_owned(docker_url, owner)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _collect(it: AsyncIterator, timeout: float = 10.0) -> list:
    async with asyncio.timeout(timeout):
        return [x async for x in it]


async def test_run_lists_running_with_labels_and_logs(h: Harness) -> None:
    spec = h.spec("sh", "-c", "echo hi; echo oops >&2; sleep 30", labels={"team": "a"})
    started = await h.driver.run(spec)
    assert started.state == "running"
    assert (started.replica_id, started.service, started.slot, started.version) == (
        spec.replica_id,
        "web",
        spec.slot,
        "v1",
    )
    listed = await h.driver.list()
    assert [i.handle for i in listed] == [started.handle]
    assert listed[0].state == "running" and listed[0].started_at is not None

    labels = (await h.inspect(spec.replica_id))["Config"]["Labels"]
    assert labels["team"] == "a"
    assert labels["io.meshd.node"] == h.owner and labels["io.meshd.cluster"] == CLUSTER
    assert labels["io.meshd.replica"] == spec.replica_id and labels["io.meshd.slot"] == str(
        spec.slot
    )

    async def both_lines() -> list:
        lines = await _collect(h.driver.logs(spec.replica_id, tail=10))
        return lines if len(lines) >= 2 else []

    lines = await async_wait_for(both_lines, message="both log lines")
    by_text = {line.text: line for line in lines}
    assert by_text["hi"].stream == "stdout" and by_text["oops"].stream == "stderr"
    assert abs(by_text["hi"].time - started.started_at) < 30


async def test_follow_logs_end_when_the_container_stops(h: Harness) -> None:
    spec = h.spec("sh", "-c", "echo a; sleep 0.3; echo b")
    await h.driver.run(spec)
    lines = await _collect(h.driver.logs(spec.replica_id, follow=True))
    assert [line.text for line in lines] == ["a", "b"]
    tail = await _collect(h.driver.logs(spec.replica_id, tail=1))
    assert [line.text for line in tail] == ["b"]


async def test_followed_logs_leave_connections_for_calls(h: Harness) -> None:
    # The event stream and 99 followers: as many connections as one pool holds.
    spec = h.spec("sh", "-c", "echo up; sleep 30")
    await h.driver.run(spec)
    following: set[int] = set()

    async def follow(n: int) -> None:
        async for _ in h.driver.logs(spec.replica_id, follow=True):
            following.add(n)

    followers = [asyncio.create_task(follow(n)) for n in range(99)]
    try:
        await async_wait_for(lambda: len(following) == 99, timeout=20, message="99 followers")
        async with asyncio.timeout(20):
            other = h.spec("sh", "-c", "sleep 30")
            assert (await h.driver.run(other)).state == "running"
            assert await h.driver.exec(other.replica_id, ("true",), 5) == (0, "")
    finally:
        for task in followers:
            task.cancel()
        await asyncio.gather(*followers, return_exceptions=True)


async def test_exit_codes_come_from_events_one_after_another(h: Harness) -> None:
    first, second = h.spec("sh", "-c", "exit 3"), h.spec("sh", "-c", "exit 4")
    await h.driver.run(first)
    got = await async_wait_for(lambda: h.exited(first.replica_id), message="first exit event")
    assert got.exit_code == 3 and got.finished_at is not None and got.error is None
    await h.driver.run(second)
    got = await async_wait_for(lambda: h.exited(second.replica_id), message="second exit event")
    assert got.exit_code == 4
    listed = {i.replica_id: i for i in await h.driver.list()}
    assert listed[first.replica_id].exit_code == 3 and listed[first.replica_id].state == "exited"


async def test_event_stream_is_resubscribed_after_it_breaks(h: Harness) -> None:
    await async_wait_for(lambda: h.driver._events_resp is not None, message="event stream")
    h.driver._events_resp.close()  # as if the engine dropped the connection
    spec = h.spec("sh", "-c", "exit 5")
    await h.driver.run(spec)
    got = await async_wait_for(lambda: h.exited(spec.replica_id), message="exit after resubscribe")
    assert got.exit_code == 5


async def test_stop_and_remove_are_idempotent(h: Harness) -> None:
    spec = h.spec("sh", "-c", "sleep 30")
    await h.driver.run(spec)
    await h.driver.stop(spec.replica_id, timeout=2)
    [stopped] = await h.driver.list()
    assert stopped.state == "exited" and stopped.finished_at is not None
    await h.driver.stop(spec.replica_id, timeout=2)
    await h.driver.remove(spec.replica_id)
    await h.driver.remove(spec.replica_id)
    await h.driver.stop(spec.replica_id)
    assert await h.driver.list() == []


async def test_an_exited_container_of_the_same_replica_is_replaced(h: Harness) -> None:
    spec = h.spec("sh", "-c", "exit 0")
    first = await h.driver.run(spec)
    await async_wait_for(lambda: h.exited(spec.replica_id), message="exit event")
    again = await h.driver.run(spec)
    assert again.handle != first.handle
    assert [i.handle for i in await h.driver.list()] == [again.handle]


async def test_running_twice_is_refused(h: Harness) -> None:
    spec = h.spec("sh", "-c", "sleep 30")
    await h.driver.run(spec)
    with pytest.raises(DriverError, match="already running"):
        await h.driver.run(spec)


async def test_limits_dns_and_policy_in_inspect(h: Harness) -> None:
    spec = h.spec(
        "sh",
        "-c",
        "sleep 30",
        cpu=0.5,
        memory_mb=64,
        dns=("127.0.0.1",),
        dns_search=("meshd.test",),
    )
    await h.driver.run(spec)
    info = await h.inspect(spec.replica_id)
    host = info["HostConfig"]
    assert host["NanoCpus"] == 500_000_000
    assert host["Memory"] == 64 * 1024 * 1024
    assert host["Dns"] == ["127.0.0.1"] and host["DnsSearch"] == ["meshd.test"]
    assert host["RestartPolicy"]["Name"] == "no"
    assert info["Name"] == "/" + container_name(h.owner, spec.replica_id)


async def test_exec_sees_env_and_reports_exit_codes(h: Harness) -> None:
    spec = h.spec("sh", "-c", "sleep 30", env={"GREETING": "hello there"})
    await h.driver.run(spec)
    assert await h.driver.exec(spec.replica_id, ("sh", "-c", "echo $GREETING"), 5) == (
        0,
        "hello there\n",
    )
    assert (await h.driver.exec(spec.replica_id, ("sh", "-c", "exit 2"), 5))[0] == 2
    code, out = await h.driver.exec(
        spec.replica_id, ("sh", "-c", "head -c 10000 /dev/zero | tr '\\0' x"), 5
    )
    assert code == 0 and out == "x" * 4096
    with pytest.raises(DriverError, match="timed out"):
        await h.driver.exec(spec.replica_id, ("sleep", "5"), 0.3)
    with pytest.raises(DriverError, match="no container"):
        await h.driver.exec("nope", ("true",), 5)


async def test_command_overrides_the_entrypoint(h: Harness) -> None:
    spec = h.spec("echo from-args", command=("sh", "-c"))
    await h.driver.run(spec)
    await async_wait_for(lambda: h.exited(spec.replica_id), message="exit event")
    lines = await _collect(h.driver.logs(spec.replica_id))
    assert [line.text for line in lines] == ["from-args"]


async def test_published_port_answers_on_loopback(h: Harness) -> None:
    port = _free_port()
    spec = h.spec(
        "sh",
        "-c",
        "mkdir -p /www && echo hello-meshd > /www/index.html && exec httpd -f -p 80 -h /www",
        ports=(PortBinding("http", 80, port),),
    )
    started = await h.driver.run(spec)
    assert started.ports == (PortBinding("http", 80, port),)
    host = (await h.inspect(spec.replica_id))["HostConfig"]["PortBindings"]
    assert host == {"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]}

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:

        async def page() -> str:
            try:
                async with session.get(f"http://127.0.0.1:{port}/") as resp:
                    return await resp.text() if resp.status == 200 else ""
            except (aiohttp.ClientError, TimeoutError):
                return ""

        assert await async_wait_for(page, timeout=10, message="httpd answers") == "hello-meshd\n"


async def test_a_second_driver_adopts_running_containers(h: Harness) -> None:
    spec = h.spec("sh", "-c", "sleep 30")
    started = await h.driver.run(spec)
    other = DockerDriver(owner=h.owner, cluster=CLUSTER, url=h.url)
    await other.start(lambda _: None)
    try:
        [adopted] = await other.list()
    finally:
        await other.close()
    assert adopted.handle == started.handle and adopted.state == "running"
    assert adopted.started_at == started.started_at
    # A different owner on the same engine sees none of it.
    stranger = DockerDriver(owner=h.owner + "-x", cluster=CLUSTER, url=h.url)
    try:
        assert await stranger.list() == []
    finally:
        await stranger.close()
    [still] = await h.driver.list()
    assert still.state == "running" and still.started_at == started.started_at


async def test_a_missing_image_is_a_clear_error(h: Harness) -> None:
    # A registry on a closed loopback port: the pull fails at once, off no network.
    spec = h.spec("true", image="127.0.0.1:1/meshd-test/missing:latest")
    with pytest.raises(DriverError, match="not found locally and could not be pulled") as err:
        await h.driver.run(spec)
    assert "\n" not in str(err.value)
    assert await h.driver.list() == []


async def test_an_image_seen_present_is_not_inspected_again(h: Harness) -> None:
    images = h.driver._client().images
    calls: list[str] = []
    real = images.inspect

    async def counting(name: str) -> dict:
        calls.append(name)
        return await real(name)

    images.inspect = counting  # type: ignore[method-assign]
    for _ in range(3):
        await h.driver.run(h.spec("sh", "-c", "sleep 30"))
    assert calls == [TEST_IMAGE]


async def test_an_image_removed_after_it_was_seen_is_looked_for_again(h: Harness) -> None:
    # Under a loopback registry's name: the pull that follows fails at once, off no network.
    repo = f"127.0.0.1:1/meshd-test/gone-{uuid.uuid4().hex[:8]}"
    image = repo + ":v1"
    async with aiodocker.Docker(url=h.url) as docker:
        await docker.images.tag(TEST_IMAGE, repo, tag="v1")
        try:
            await h.driver.run(h.spec("sh", "-c", "sleep 30", image=image))
            await docker.images.delete(image)  # only the tag: the image stays
            with pytest.raises(DriverError, match="not found locally and could not be pulled"):
                await h.driver.run(h.spec("sh", "-c", "sleep 30", image=image))
            await docker.images.tag(TEST_IMAGE, repo, tag="v1")
            again = await h.driver.run(h.spec("sh", "-c", "sleep 30", image=image))
            assert again.state == "running"
        finally:
            with contextlib.suppress(aiodocker.DockerError):
                await docker.images.delete(image)
    assert len(await h.driver.list()) == 2


async def test_a_missing_binary_exits_127_with_the_reason_in_its_logs(h: Harness) -> None:
    spec = h.spec(command=("/no/such/binary",))
    await h.driver.run(spec)
    got = await async_wait_for(lambda: h.exited(spec.replica_id), message="exit event")
    assert got.exit_code == 127
    lines = await _collect(h.driver.logs(spec.replica_id))
    assert any("/no/such/binary" in line.text and line.stream == "stderr" for line in lines)


async def test_a_failed_start_leaves_nothing_behind(h: Harness) -> None:
    port = _free_port()
    first = h.spec("sh", "-c", "sleep 30", ports=(PortBinding("http", 80, port),))
    await h.driver.run(first)
    taken = h.spec("sh", "-c", "sleep 30", ports=(PortBinding("http", 80, port),))
    with pytest.raises(DriverError, match=f"start .*{taken.replica_id}") as err:
        await h.driver.run(taken)
    assert "\n" not in str(err.value)
    assert [i.replica_id for i in await h.driver.list()] == [first.replica_id]


def test_docker_times_parse() -> None:
    assert parse_time("0001-01-01T00:00:00Z") is None
    assert parse_time("1970-01-01T00:00:01.500000000Z") == pytest.approx(1.5)
    assert parse_time("1970-01-01T01:00:01+01:00") == pytest.approx(1.0)
    assert parse_time("garbage") is None and parse_time(None) is None
