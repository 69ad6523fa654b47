"""The docker driver: replicas as containers of a Docker Engine (aiodocker).

Ownership lives in container labels (``io.meshd.*``), so ``list()`` after an
agent restart finds the same containers, still running, and the node
controller adopts them. Docker never restarts a replica by itself (restart
policy "no"): the controller decides, with its own backoff.

State changes come from the engine's event stream, filtered to this node's
containers; the stream is resubscribed (replaying from the last event seen)
whenever it breaks, so an exit is never missed and nothing polls.

Starting a replica is create, start, inspect: three calls. An image found
present is remembered, so it is not inspected again for every replica, and a
name still held by an older container of the replica is found by the
create's conflict rather than by a lookup before every create. The engine's
own start (namespaces, mounts, runc) is most of the time a start takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any

import aiodocker
import aiohttp

from meshd.runtime.base import (
    LABEL_PREFIX,
    DriverError,
    DriverUnavailable,
    Instance,
    InstanceState,
    LaunchSpec,
    Listener,
    LogLine,
    PortBinding,
)

__all__ = ["DEFAULT_DOCKER_URL", "DockerDriver", "container_name"]

log = logging.getLogger(__name__)

DEFAULT_DOCKER_URL = "unix:///var/run/docker.sock"

LABEL_CLUSTER = LABEL_PREFIX + "cluster"
LABEL_NODE = LABEL_PREFIX + "node"
LABEL_SERVICE = LABEL_PREFIX + "service"
LABEL_REPLICA = LABEL_PREFIX + "replica"
LABEL_SLOT = LABEL_PREFIX + "slot"
LABEL_VERSION = LABEL_PREFIX + "version"
LABEL_PORTS = LABEL_PREFIX + "ports"
"""Named ports as ``name:target:host_port/proto,...``: HostConfig has no names."""

EXEC_OUTPUT_LIMIT = 4096
_EVENTS = ("start", "die", "oom")
_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 5.0
# Calls that should answer quickly; streams and stop/pull set their own.
_CALL_TIMEOUT = aiohttp.ClientTimeout(total=60, connect=10)
_STREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_read=None, connect=10)

_NAME_BAD = re.compile(r"[^a-zA-Z0-9_.-]")
_TIME = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)")
_STATES: dict[str, InstanceState] = {
    "created": "created",
    "running": "running",
    "paused": "running",
    "restarting": "running",
    "exited": "exited",
    "dead": "exited",
    "removing": "exited",
}


_CLIENT_ERRORS = (
    aiodocker.DockerError,
    aiohttp.ClientError,
    OSError,
    TimeoutError,
    ValueError,
    KeyError,
    TypeError,
)
"""What the client library and the engine's answers can raise: each becomes
a one-line DriverError (or DriverUnavailable)."""


def container_name(owner: str, replica_id: str) -> str:
    """``meshd-<owner>-<replica>``, with anything docker refuses in a name replaced."""
    return _NAME_BAD.sub("_", f"meshd-{owner}-{replica_id}")


def _one_line(text: object, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _reason(exc: BaseException) -> str:
    if isinstance(exc, aiodocker.DockerError):
        return _one_line(exc.message)
    if isinstance(exc, TimeoutError):
        return "timed out"
    return _one_line(exc) or type(exc).__name__


def _unreachable(exc: BaseException) -> bool:
    if isinstance(exc, aiodocker.DockerError):
        return exc.status == 900  # aiodocker's "cannot connect"
    return isinstance(exc, aiohttp.ClientConnectionError | ConnectionError)


@contextlib.contextmanager
def _errors(what: str) -> Iterator[None]:
    """Turn whatever the client library raises into a one-line DriverError."""
    try:
        yield
    except DriverError:
        raise
    except _CLIENT_ERRORS as exc:
        kind = DriverUnavailable if _unreachable(exc) else DriverError
        raise kind(f"{what}: {_reason(exc)}") from exc


def parse_time(text: object) -> float | None:
    """Docker's RFC 3339 times (nanoseconds, year 1 meaning never) as epoch seconds."""
    if not isinstance(text, str):
        return None
    m = _TIME.fullmatch(text.strip())
    if m is None or m.group(1).startswith("0001-"):
        return None
    base, frac, zone = m.groups()
    try:
        stamp = datetime.fromisoformat(base + ("+00:00" if zone == "Z" else zone)).timestamp()
    except ValueError:
        return None
    return stamp + (int(frac) / 10 ** len(frac) if frac else 0.0)


def _ports_label(ports: tuple[PortBinding, ...]) -> str:
    return ",".join(f"{p.name}:{p.target}:{p.host_port}/{p.protocol}" for p in ports)


def _ports_from_label(text: str) -> tuple[PortBinding, ...] | None:
    out = []
    for item in filter(None, text.split(",")):
        try:
            rest, proto = item.rsplit("/", 1)
            name, target, host_port = rest.rsplit(":", 2)
            out.append(PortBinding(name, int(target), int(host_port), proto))
        except ValueError:
            return None
    return tuple(out)


def _ports_from_host_config(host_config: dict[str, Any]) -> tuple[PortBinding, ...]:
    out = []
    for key, bindings in (host_config.get("PortBindings") or {}).items():
        target, _, proto = str(key).partition("/")
        for binding in bindings or ():
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                out.append(
                    PortBinding(target, int(target), int(binding["HostPort"]), proto or "tcp")
                )
    return tuple(out)


def instance_from_inspect(info: dict[str, Any]) -> Instance | None:
    """An Instance from ``docker inspect``, or None when the labels aren't ours."""
    config = info.get("Config") or {}
    labels = config.get("Labels") or {}
    state = info.get("State") or {}
    try:
        replica_id = labels[LABEL_REPLICA]
        service = labels[LABEL_SERVICE]
        slot = int(labels[LABEL_SLOT])
        version = labels.get(LABEL_VERSION, "")
    except (KeyError, ValueError, TypeError):
        return None
    status = _STATES.get(str(state.get("Status", "")), "exited")
    ports = _ports_from_label(labels.get(LABEL_PORTS, ""))
    if not ports:
        ports = _ports_from_host_config(info.get("HostConfig") or {})
    error = None
    if state.get("OOMKilled"):
        error = "out of memory"
    elif state.get("Error"):
        error = _one_line(state["Error"])
    exit_code = state.get("ExitCode") if status == "exited" else None
    return Instance(
        replica_id=replica_id,
        service=service,
        slot=slot,
        version=version,
        state=status,
        handle=str(info.get("Id", "")),
        exit_code=exit_code if isinstance(exit_code, int) else None,
        started_at=parse_time(state.get("StartedAt")),
        finished_at=parse_time(state.get("FinishedAt")) if status == "exited" else None,
        ports=ports,
        error=error,
    )


def _log_line(replica_id: str, stream: str, raw: bytes, last: float) -> LogLine:
    """One line of ``logs?timestamps=1``: an RFC 3339 time, a space, the text."""
    text = raw.decode("utf-8", errors="replace").rstrip("\r")
    stamp_text, sep, rest = text.partition(" ")
    stamp = parse_time(stamp_text) if sep else None
    if stamp is not None:
        text = rest
    kind = "stderr" if stream == "stderr" else "stdout"
    return LogLine(replica_id, kind, stamp if stamp is not None else last, text)


class DockerDriver:
    """Replicas as containers, labelled with their owner so agents can share an engine."""

    name = "docker"

    def __init__(
        self,
        *,
        owner: str,
        cluster: str,
        url: str | None = None,
        publish_ip: str = "127.0.0.1",
        init: bool = True,
        pull_timeout: float = 300.0,
    ) -> None:
        self.owner = owner
        self.cluster = cluster
        self.url = url or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_URL
        self.publish_ip = publish_ip
        self.init = init
        """Run docker-init as PID 1: signals reach the replica, zombies are reaped."""
        self.pull_timeout = pull_timeout
        self._docker: aiodocker.Docker | None = None
        self._streams: aiodocker.Docker | None = None
        """A second connection pool, for the event stream and followed logs."""
        self._listener: Listener | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._events_resp: aiohttp.ClientResponse | None = None
        self._since: str | None = None
        self._images: dict[str, str] = {}
        """Image reference -> image id, for images seen present on the engine."""

    # ----- connection ------------------------------------------------------

    def _client(self, *, streams: bool = False) -> aiodocker.Docker:
        """The client for calls, or (``streams``) for long-lived streams.

        Each has its own pool of at most 100 connections (aiohttp's default):
        a stream holds its connection for as long as it is followed, and
        followed logs sharing the pool with calls could leave no connection
        for a create or a health check.
        """
        docker = self._streams if streams else self._docker
        if docker is None:
            try:
                docker = aiodocker.Docker(url=self.url, timeout=_CALL_TIMEOUT)
            except (ValueError, OSError, aiodocker.DockerError) as exc:
                raise DriverUnavailable(
                    f"docker engine at {self.url} is unusable: {_reason(exc)}"
                ) from exc
            if streams:
                self._streams = docker
            else:
                self._docker = docker
        return docker

    async def ping(self, timeout: float = 5.0) -> None:
        """Raise DriverUnavailable unless the engine answers within timeout."""
        docker = self._client()
        try:
            async with asyncio.timeout(timeout):
                await docker.version()
        except _CLIENT_ERRORS as exc:
            raise DriverUnavailable(
                f"docker engine at {self.url} is not answering: {_reason(exc)}"
            ) from exc

    async def start(self, on_change: Listener) -> None:
        if self._watch_task is not None:
            return
        await self.ping()
        self._listener = on_change
        self._since = None
        # Subscribe before returning, so nothing run afterwards goes unseen.
        try:
            first = await self._open_events()
        except DriverError as exc:
            raise DriverUnavailable(f"docker engine at {self.url}: {exc}") from exc
        self._events_resp = first  # closed by close() even if the task never ran
        self._watch_task = asyncio.create_task(self._watch(first), name="docker-events")

    async def close(self) -> None:
        task, self._watch_task = self._watch_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._events_resp is not None:
            self._events_resp.close()
            self._events_resp = None
        clients = (self._docker, self._streams)
        self._docker = self._streams = None
        for docker in clients:
            if docker is not None:
                with contextlib.suppress(Exception):
                    await docker.close()

    # ----- events ----------------------------------------------------------

    def _owner_labels(self) -> list[str]:
        return [f"{LABEL_CLUSTER}={self.cluster}", f"{LABEL_NODE}={self.owner}"]

    async def _open_events(self) -> aiohttp.ClientResponse:
        filters = {"type": ["container"], "event": list(_EVENTS), "label": self._owner_labels()}
        params: dict[str, Any] = {"filters": json.dumps(filters)}
        if self._since is not None:
            params["since"] = self._since  # replay what happened while disconnected
        with _errors("docker events"):
            return await self._client(streams=True)._do_query(
                "events", method="GET", params=params, timeout=_STREAM_TIMEOUT
            )

    async def _watch(self, resp: aiohttp.ClientResponse | None) -> None:
        """Follow the event stream forever; a broken stream is reopened with backoff."""
        backoff = _BACKOFF_FIRST
        while True:
            try:
                if resp is None:
                    resp = await self._open_events()
                    # The engine may have restarted and lost its event log:
                    # report every replica's current state once.
                    await self._report_all()
                self._events_resp = resp
                backoff = _BACKOFF_FIRST
                async for raw in resp.content:
                    await self._on_event(raw)
                log.info("docker event stream ended; resubscribing")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "docker event stream failed (%s); retrying in %.1fs", _reason(exc), backoff
                )
            finally:
                if resp is not None:
                    resp.close()
                resp = None
                self._events_resp = None
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)

    def _notify(self, instance: Instance) -> None:
        if self._listener is None:
            return
        try:
            self._listener(instance)
        except Exception:
            log.exception("runtime change listener failed")

    async def _report_all(self) -> None:
        for instance in await self.list():
            self._notify(instance)

    async def _on_event(self, raw: bytes) -> None:
        try:
            event = json.loads(raw)
            container_id = event.get("id") or event["Actor"]["ID"]
            nanos = int(event.get("timeNano") or int(event["time"]) * 1_000_000_000)
        except (ValueError, KeyError, TypeError, AttributeError):
            if raw.strip():
                log.debug("unreadable docker event dropped: %r", raw[:200])
            return
        nanos += 1  # resume just after this event
        self._since = f"{nanos // 1_000_000_000}.{nanos % 1_000_000_000:09d}"
        try:
            info = await self._inspect(str(container_id))
        except DriverError as exc:
            log.warning("docker event for %s: %s", container_id, exc)
            return
        instance = instance_from_inspect(info) if info is not None else None
        if instance is not None and self._owns(info):
            self._notify(instance)

    # ----- lookups ---------------------------------------------------------

    def _owns(self, info: dict[str, Any] | None) -> bool:
        labels = ((info or {}).get("Config") or {}).get("Labels") or {}
        return labels.get(LABEL_CLUSTER) == self.cluster and labels.get(LABEL_NODE) == self.owner

    async def host_address(self) -> str | None:
        """The default bridge's gateway: the host as containers on it see it."""
        with _errors("inspect the bridge network"):
            try:
                info = await self._client()._query_json("networks/bridge")
            except aiodocker.DockerError as exc:
                if exc.status == 404:
                    return None
                raise
        for cfg in ((info or {}).get("IPAM") or {}).get("Config") or []:
            gateway = (cfg or {}).get("Gateway")
            if isinstance(gateway, str) and gateway and ":" not in gateway:
                return gateway
        return None

    async def _inspect(self, ref: str) -> dict[str, Any] | None:
        """``docker inspect``; None when there is no such container."""
        with _errors(f"inspect {ref}"):
            try:
                return await self._client()._query_json(f"containers/{ref}/json")
            except aiodocker.DockerError as exc:
                if exc.status == 404:
                    return None
                raise

    async def _find(self, replica_id: str) -> dict[str, Any] | None:
        info = await self._inspect(container_name(self.owner, replica_id))
        if info is None or not self._owns(info):
            return None
        labels = (info.get("Config") or {}).get("Labels") or {}
        return info if labels.get(LABEL_REPLICA) == replica_id else None

    async def _require(self, replica_id: str) -> dict[str, Any]:
        info = await self._find(replica_id)
        if info is None:
            raise DriverError(f"no container for replica {replica_id}")
        return info

    async def list(self) -> list[Instance]:
        with _errors("list containers"):
            summaries = await self._client()._query_json(
                "containers/json",
                params={"all": "1", "filters": json.dumps({"label": self._owner_labels()})},
            )
        ids = [str(s["Id"]) for s in summaries if isinstance(s, dict) and "Id" in s]
        infos = await asyncio.gather(*(self._inspect(cid) for cid in ids))
        out = []
        for info in infos:
            if info is not None and self._owns(info):
                instance = instance_from_inspect(info)
                if instance is not None:
                    out.append(instance)
        return out

    # ----- lifecycle -------------------------------------------------------

    async def _ensure_image(self, image: str) -> None:
        """Pull image unless the engine has it; a known image costs no call.

        An image removed from the engine after it was seen shows up as a
        create that fails with 404, which forgets it and comes back here.
        """
        if image in self._images:
            return
        docker = self._client()
        with _errors(f"image {image}"):
            try:
                self._images[image] = str((await docker.images.inspect(image)).get("Id", ""))
                return
            except aiodocker.DockerError as exc:
                if exc.status != 404:
                    raise
        try:
            async with asyncio.timeout(self.pull_timeout):
                await docker.images.pull(image)
            self._images[image] = str((await docker.images.inspect(image)).get("Id", ""))
        except _CLIENT_ERRORS as exc:
            raise DriverError(
                f"image {image} not found locally and could not be pulled: {_reason(exc)}"
            ) from exc

    def _create_config(self, spec: LaunchSpec) -> dict[str, Any]:
        labels = dict(spec.labels)
        labels.update(
            {
                LABEL_CLUSTER: self.cluster,
                LABEL_NODE: self.owner,
                LABEL_SERVICE: spec.service,
                LABEL_REPLICA: spec.replica_id,
                LABEL_SLOT: str(spec.slot),
                LABEL_VERSION: spec.version,
            }
        )
        if spec.ports:
            labels[LABEL_PORTS] = _ports_label(spec.ports)
        host: dict[str, Any] = {"RestartPolicy": {"Name": "no"}, "Init": self.init}
        if spec.cpu is not None and spec.cpu > 0:
            host["NanoCpus"] = round(spec.cpu * 1e9)
        if spec.memory_mb:
            host["Memory"] = host["MemorySwap"] = spec.memory_mb * 1024 * 1024
        if spec.gpus > 0:
            host["DeviceRequests"] = [
                {"Driver": "nvidia", "Count": spec.gpus, "Capabilities": [["gpu"]]}
            ]
        if spec.ports:
            bindings: dict[str, list[dict[str, str]]] = {}
            for p in spec.ports:
                bindings.setdefault(f"{p.target}/{p.transport}", []).append(
                    {"HostIp": self.publish_ip, "HostPort": str(p.host_port)}
                )
            host["PortBindings"] = bindings
        if spec.dns:
            host["Dns"] = list(spec.dns)
        if spec.dns_search:
            host["DnsSearch"] = list(spec.dns_search)
        config: dict[str, Any] = {
            "Image": spec.image,
            "Env": [f"{k}={v}" for k, v in spec.env.items()],
            "Labels": labels,
            "HostConfig": host,
        }
        if spec.command:
            # A given entrypoint drops the image's CMD too: command + args is the argv.
            config["Entrypoint"] = list(spec.command)
            config["Cmd"] = list(spec.args)
        elif spec.args:
            config["Cmd"] = list(spec.args)
        if spec.ports:
            config["ExposedPorts"] = {f"{p.target}/{p.transport}": {} for p in spec.ports}
        return config

    async def _create(self, spec: LaunchSpec, name: str) -> aiodocker.containers.DockerContainer:
        """Create the replica's container, clearing what stands in the way once.

        409: the name is held, by an exited container of this replica (removed,
        then created again) or a running one (refused). 404: the image has
        gone since it was seen (pulled again if it can be).
        """
        assert spec.image
        await self._ensure_image(spec.image)
        config = self._create_config(spec)
        docker = self._client()
        cleared = False
        while True:
            try:
                with _errors(f"create {name}"):
                    return await docker.containers.create(config, name=name)
            except DriverError as exc:
                status = getattr(exc.__cause__, "status", None)
                if cleared or status not in (404, 409):
                    raise
                cleared = True
                if status == 404:
                    if self._images.pop(spec.image, None) is None:
                        raise
                    await self._ensure_image(spec.image)
                    continue
                stale = await self._find(spec.replica_id)
                if stale is None:
                    raise  # held by a container that is not this replica's
                state = (stale.get("State") or {}).get("Status")
                if _STATES.get(str(state)) == "running":
                    raise DriverError(
                        f"replica {spec.replica_id} is already running ({name})"
                    ) from None
                await self.remove(spec.replica_id)

    async def run(self, spec: LaunchSpec) -> Instance:
        if not spec.image:
            raise DriverError(f"replica {spec.replica_id}: the docker driver needs an image")
        name = container_name(self.owner, spec.replica_id)
        container = await self._create(spec, name)
        try:
            with _errors(f"start {name}"):
                await container.start()
        except DriverError:
            with contextlib.suppress(DriverError):
                await self.remove(spec.replica_id)  # leave nothing half-made behind
            raise
        # One inspect: the state and start time as the engine recorded them
        # (a replica that exited at once shows so; events report it anyway).
        info = await self._inspect(container.id)
        instance = instance_from_inspect(info) if info is not None else None
        if instance is None:
            raise DriverError(f"container {name} vanished right after it started")
        return instance

    async def stop(self, replica_id: str, timeout: float = 10.0) -> None:
        info = await self._find(replica_id)
        if info is None or _STATES.get(str((info.get("State") or {}).get("Status"))) != "running":
            return
        with _errors(f"stop {replica_id}"):
            try:
                await (
                    self._client()
                    .containers.container(info["Id"])
                    .stop(t=max(0, math.ceil(timeout)))
                )
            except aiodocker.DockerError as exc:
                if exc.status not in (304, 404):
                    raise

    async def remove(self, replica_id: str) -> None:
        info = await self._find(replica_id)
        if info is None:
            return
        with _errors(f"remove {replica_id}"):
            try:
                await self._client().containers.container(info["Id"]).delete(force=True)
            except aiodocker.DockerError as exc:
                # 409: a removal is already in progress.
                if exc.status not in (404, 409):
                    raise

    # ----- exec and logs ---------------------------------------------------

    async def exec(self, replica_id: str, argv: tuple[str, ...], timeout: float) -> tuple[int, str]:
        info = await self._require(replica_id)
        container = self._client().containers.container(info["Id"])
        try:
            async with asyncio.timeout(timeout):
                with _errors(f"exec in {replica_id}"):
                    run = await container.exec(list(argv), stdout=True, stderr=True)
                    out = bytearray()
                    async with run.start(detach=False) as stream:
                        while (msg := await stream.read_out()) is not None:
                            room = EXEC_OUTPUT_LIMIT - len(out)
                            if room > 0:
                                out += msg.data[:room]
                    # The stream ends as the process does; its state follows shortly.
                    while True:
                        state = await run.inspect()
                        if not state.get("Running") and state.get("ExitCode") is not None:
                            break
                        await asyncio.sleep(0.01)
        except TimeoutError:
            raise DriverError(f"exec in {replica_id} timed out after {timeout:g}s") from None
        return int(state["ExitCode"]), out.decode("utf-8", errors="replace")

    def logs(
        self, replica_id: str, *, tail: int | None = None, follow: bool = False
    ) -> AsyncIterator[LogLine]:
        return self._logs(replica_id, tail, follow)

    async def _logs(
        self, replica_id: str, tail: int | None, follow: bool
    ) -> AsyncIterator[LogLine]:
        info = await self._require(replica_id)
        tty = bool((info.get("Config") or {}).get("Tty"))
        params = {
            "stdout": "1",
            "stderr": "1",
            "timestamps": "1",
            "follow": "1" if follow else "0",
            "tail": "all" if tail is None else str(max(0, tail)),
        }
        with _errors(f"logs of {replica_id}"):
            async with self._client(streams=True)._query(
                f"containers/{info['Id']}/logs", params=params, timeout=_STREAM_TIMEOUT
            ) as resp:
                last = time.time()
                async for stream, payload in _frames(resp, tty):
                    *lines, rest = payload.split(b"\n")
                    if rest:
                        lines.append(rest)  # a partial line (docker splits long ones)
                    for raw in lines:
                        line = _log_line(replica_id, stream, raw, last)
                        last = line.time
                        yield line


async def _frames(resp: aiohttp.ClientResponse, tty: bool) -> AsyncIterator[tuple[str, bytes]]:
    """Docker's multiplexed stream: [kind, 0, 0, 0, size (big endian)] + payload."""
    if tty:
        async for chunk in resp.content.iter_any():
            yield "stdout", chunk
        return
    while True:
        try:
            header = await resp.content.readexactly(8)
            size = int.from_bytes(header[4:8], "big")
            payload = await resp.content.readexactly(size) if size else b""
        except asyncio.IncompleteReadError:
            return
        if payload:
            yield ("stderr" if header[0] == 2 else "stdout"), payload
