"""The machine's Docker Engine answers and runs the local test image.

Guards the setup the orchestrator's own Docker tests rely on: an engine on
the default socket and meshd-test/busybox, built locally (there is no
registry to pull from).
"""

from __future__ import annotations

import aiodocker
import pytest
from conftest import TEST_IMAGE

pytestmark = pytest.mark.docker


async def test_engine_answers(docker_url: str) -> None:
    async with aiodocker.Docker(url=docker_url) as docker:
        version = await docker.version()
        assert version["ApiVersion"]
        info = await docker.system.info()
        assert info["ServerVersion"] == version["Version"]


async def test_runs_the_test_image(docker_url: str) -> None:
    async with aiodocker.Docker(url=docker_url) as docker:
        image = await docker.images.inspect(TEST_IMAGE)
        assert image["Id"].startswith("sha256:")
        container = await docker.containers.create(
            {"Image": TEST_IMAGE, "Cmd": ["echo", "hello"], "Labels": {"meshd-test": "1"}}
        )
        try:
            await container.start()
            result = await container.wait(timeout=30)
            assert result["StatusCode"] == 0
            logs = await container.log(stdout=True)
            assert "".join(logs) == "hello\n"
        finally:
            await container.delete(force=True)
        with pytest.raises(aiodocker.DockerError) as err:
            await docker.containers.get(container.id)
        assert err.value.status == 404
