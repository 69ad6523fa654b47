"""Pick the runtime driver for this node: docker when the engine answers, else processes.

"auto" lets a node without Docker (or without permission to use it) still run
process services instead of refusing to start; asking for "docker" by name
fails loudly instead, since the operator said containers are required.
"""

from __future__ import annotations

import logging
from pathlib import Path

from meshd.runtime.base import Driver, DriverUnavailable
from meshd.runtime.docker import DockerDriver

__all__ = ["DRIVER_KINDS", "choose_driver"]

log = logging.getLogger(__name__)

DRIVER_KINDS = ("auto", "docker", "process")


def _process_driver(state_dir: Path, owner: str) -> Driver:
    # Imported here: the process driver is only loaded on hosts that use it.
    from meshd.runtime.process import ProcessDriver

    return ProcessDriver(state_dir, owner=owner)


async def choose_driver(
    kind: str,
    *,
    owner: str,
    cluster: str,
    state_dir: Path,
    docker_url: str | None = None,
    publish_ip: str = "127.0.0.1",
    ping_timeout: float = 1.0,
) -> Driver:
    """The driver for ``kind`` ("auto", "docker" or "process"), not yet started.

    Raises DriverUnavailable for "docker" when the engine does not answer
    within ``ping_timeout``, and ValueError for an unknown kind.
    """
    if kind not in DRIVER_KINDS:
        raise ValueError(
            f"unknown runtime driver {kind!r} (expected one of {', '.join(DRIVER_KINDS)})"
        )
    if kind == "process":
        return _process_driver(state_dir, owner)
    docker = DockerDriver(owner=owner, cluster=cluster, url=docker_url, publish_ip=publish_ip)
    try:
        await docker.ping(timeout=ping_timeout)
    except DriverUnavailable as exc:
        if kind == "docker":
            raise
        log.info("runtime: %s; running services as processes", exc)
        return _process_driver(state_dir, owner)
    finally:
        await docker.close()  # the probe's connection; start() opens its own
    return docker
