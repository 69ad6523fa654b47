"""Choosing the runtime driver: docker when the engine answers, else processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meshd.runtime.auto import choose_driver
from meshd.runtime.base import DriverUnavailable
from meshd.runtime.docker import DockerDriver


def _nowhere(tmp_path: Path) -> str:
    """A unix socket URL nothing listens on."""
    return f"unix://{tmp_path / 'no-engine.sock'}"


async def test_process_is_the_process_driver(tmp_path: Path) -> None:
    from meshd.runtime.process import ProcessDriver

    driver = await choose_driver("process", owner="n1", cluster="c", state_dir=tmp_path)
    assert isinstance(driver, ProcessDriver)
    assert driver.name == "process"


async def test_docker_without_an_engine_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(DriverUnavailable, match="not answering") as err:
        await choose_driver(
            "docker", owner="n1", cluster="c", state_dir=tmp_path, docker_url=_nowhere(tmp_path)
        )
    assert "\n" not in str(err.value)


async def test_auto_without_an_engine_falls_back_to_processes(tmp_path: Path) -> None:
    from meshd.runtime.process import ProcessDriver

    driver = await choose_driver(
        "auto", owner="n1", cluster="c", state_dir=tmp_path, docker_url=_nowhere(tmp_path)
    )
    assert isinstance(driver, ProcessDriver)


async def test_an_unknown_kind_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown runtime driver 'podman'"):
        await choose_driver("podman", owner="n1", cluster="c", state_dir=tmp_path)


async def test_start_without_an_engine_is_unavailable(tmp_path: Path) -> None:
    driver = DockerDriver(owner="n1", cluster="c", url=_nowhere(tmp_path))
    try:
        with pytest.raises(DriverUnavailable, match="not answering"):
            await driver.start(lambda _: None)
    finally:
        await driver.close()


def test_default_url_follows_docker_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:2375")
    assert DockerDriver(owner="n1", cluster="c").url == "tcp://127.0.0.1:2375"
    monkeypatch.delenv("DOCKER_HOST")
    assert DockerDriver(owner="n1", cluster="c").url == "unix:///var/run/docker.sock"


@pytest.mark.docker
async def test_auto_with_an_engine_is_docker(docker_url: str, tmp_path: Path) -> None:
    driver = await choose_driver(
        "auto", owner="n1", cluster="c", state_dir=tmp_path, docker_url=docker_url
    )
    try:
        if driver.name != "docker" and os.environ.get("MESHD_REQUIRE_DOCKER") != "1":
            pytest.skip("the Docker Engine does not answer")
        assert isinstance(driver, DockerDriver)
        await driver.start(lambda _: None)  # usable after the probe closed its connection
    finally:
        await driver.close()
