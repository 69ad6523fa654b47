"""What the node asks of a runtime driver, and what a driver reports back.

Two drivers implement ``Driver``: docker (aiodocker against dockerd) and
process (plain child processes, for hosts without Docker and for the lab).
The node controller (``meshd.runtime.node``) is written against this
interface only, so its logic is the same for both.

Ownership. Every replica a driver starts carries the owner (cluster and node
name), service, replica id, slot and spec version: as container labels for
docker, in a state directory for processes. ``list()`` returns only what
this node owns, which is how an agent adopts its replicas after a restart
without restarting them, and how several agents can share one engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

__all__ = [
    "LABEL_PREFIX",
    "Driver",
    "DriverError",
    "DriverUnavailable",
    "Instance",
    "InstanceState",
    "LaunchSpec",
    "LogLine",
    "PortBinding",
]

LABEL_PREFIX = "io.meshd."
"""Container labels (and process state keys) are namespaced under this."""

InstanceState = Literal["created", "running", "exited"]


class DriverError(Exception):
    """A driver operation failed; the message is for the operator (one line)."""


class DriverUnavailable(DriverError):
    """The runtime itself cannot be reached (no dockerd, no permission...)."""


@dataclass(frozen=True, slots=True)
class PortBinding:
    """A named port of a replica: ``target`` inside it, ``host_port`` on the node.

    The node allocates ``host_port``; a process-driver replica listens on it
    itself (it learns it from ``MESHD_PORT_<NAME>``), a container gets it
    published to ``target``.
    """

    name: str
    target: int
    host_port: int
    protocol: str = "tcp"

    @property
    def transport(self) -> str:
        """What the kernel carries it over (``http`` is TCP too): what the engine publishes."""
        return "udp" if self.protocol == "udp" else "tcp"


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    """Everything a driver needs to start one replica."""

    replica_id: str
    """Unique in the cluster, e.g. ``web-3-k2x9`` (service, slot, suffix)."""
    service: str
    slot: int
    version: str
    """The spec version (a hash): rolling updates compare it."""
    image: str | None = None
    """docker driver: the image; process driver: None."""
    command: tuple[str, ...] | None = None
    """process driver: argv[0] and on; docker: overrides the entrypoint when set."""
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    """Includes MESHD_SERVICE, MESHD_REPLICA, MESHD_NODE, MESHD_PORT_<NAME>."""
    ports: tuple[PortBinding, ...] = ()
    cpu: float | None = None
    """Cores (limit); None means unlimited."""
    memory_mb: int | None = None
    gpus: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    """The service's own labels; the driver adds its ownership labels."""
    dns: tuple[str, ...] = ()
    """Resolvers for the replica (docker); empty means the engine's default."""
    dns_search: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Instance:
    """A replica as the runtime sees it right now."""

    replica_id: str
    service: str
    slot: int
    version: str
    state: InstanceState
    handle: str
    """Container id, or the pid as text."""
    exit_code: int | None = None
    started_at: float | None = None
    """Wall-clock seconds."""
    finished_at: float | None = None
    ports: tuple[PortBinding, ...] = ()
    error: str | None = None
    """Why it exited, when the runtime knows (OOM killed, image missing...)."""


@dataclass(frozen=True, slots=True)
class LogLine:
    replica_id: str
    stream: Literal["stdout", "stderr"]
    time: float
    """Wall-clock seconds; when the runtime gives no time, when it was read."""
    text: str
    """One line without its newline, decoded as UTF-8 with replacement."""


Listener = Callable[[Instance], None]


class Driver(Protocol):
    """A container or process runtime, as the node controller uses it.

    Every method may raise ``DriverError`` (with a one-line message); none
    raises anything else on bad runtime answers.
    """

    name: str
    """"docker" or "process"."""

    async def start(self, on_change: Listener) -> None:
        """Connect to the runtime and begin watching it; ``on_change`` is called
        (on the event loop) whenever an owned replica changes state, e.g. when
        it exits. Raises DriverUnavailable when the runtime does not answer."""
        ...

    async def close(self) -> None:
        """Stop watching; leaves replicas running (they are adopted on restart)."""
        ...

    async def list(self) -> list[Instance]:
        """Every replica this node owns, running or exited."""
        ...

    async def run(self, spec: LaunchSpec) -> Instance:
        """Create and start a replica (pulling its image if absent)."""
        ...

    async def stop(self, replica_id: str, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after timeout; no error if already stopped or gone."""
        ...

    async def remove(self, replica_id: str) -> None:
        """Forget a stopped replica (container, state dir); no error if gone."""
        ...

    async def host_address(self) -> str | None:
        """The address replicas reach this host by (the docker bridge's gateway), where
        the routing mesh and DNS also listen for them; None when replicas share the
        host's network and reach it on loopback (processes)."""
        ...

    async def exec(self, replica_id: str, argv: tuple[str, ...], timeout: float) -> tuple[int, str]:
        """Run argv inside (docker) or beside (process) the replica, for exec
        health checks: (exit code, first 4 KiB of output). Timeout raises
        DriverError."""
        ...

    def logs(
        self, replica_id: str, *, tail: int | None = None, follow: bool = False
    ) -> AsyncIterator[LogLine]:
        """The replica's output: the last ``tail`` lines (all if None), then,
        when ``follow``, new lines as they come until the replica stops or the
        caller stops iterating."""
        ...
