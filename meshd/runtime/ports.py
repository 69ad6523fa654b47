"""Host ports for the replicas of this node.

Every named port of a replica gets its own host port so several replicas of
one service can share a node. The allocator hands them out round-robin: a
port freed by a stopped replica is the last to be reused, so clients (and
the routing mesh) still holding the old address reach nothing rather than a
different replica.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable, Iterable, Mapping

__all__ = ["PortAllocator", "PortConflict", "PortError", "PortsExhausted", "bind_checker"]


class PortError(Exception):
    """A port could not be allocated or recorded; the message is for the operator."""


class PortsExhausted(PortError):
    """Every port of the range is held by a replica or busy on the host."""


class PortConflict(PortError):
    """A port was claimed for one replica while another holds it."""


def bind_checker(hosts: Iterable[str]) -> Callable[[int], bool]:
    """A check that a TCP port can be bound on every one of ``hosts``.

    A port something else listens on (another program, a container published
    outside meshd) fails the bind on the loopback or the advertise address,
    so it is skipped rather than handed to a replica that would then fail.
    Errors other than "in use" (an advertise address this host does not
    have, say) raise ``PortError``: they would make every port look busy.
    """
    targets: list[tuple[socket.AddressFamily, str]] = []
    for host in dict.fromkeys(hosts):
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise PortError(f"cannot check ports on {host!r}: not an IP address") from None
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        targets.append((family, str(ip)))

    def is_free(port: int) -> bool:
        for family, host in targets:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                # Ports in TIME_WAIT are free for a listener; only live owners count.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((host, port))
                except OSError as exc:
                    if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                        return False
                    raise PortError(
                        f"cannot check port {port} on {host}: {exc.strerror or exc}"
                    ) from None
        return True

    return is_free


def _check_port(port: object, what: str) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise PortError(f"{what}: not a port number (1..65535): {port!r}")
    return port


class PortAllocator:
    """Host ports in ``low..high`` (inclusive), each held by at most one replica.

    ``is_free`` says whether the host can use a port; by default it tries to
    bind it on 127.0.0.1 and on ``bind_check_host`` (the node's advertise
    address). Ports held by replicas are never checked: they are in use.
    """

    def __init__(
        self,
        low: int = 20000,
        high: int = 32767,
        is_free: Callable[[int], bool] | None = None,
        *,
        bind_check_host: str = "127.0.0.1",
    ) -> None:
        low = _check_port(low, "low end of the port range")
        high = _check_port(high, "high end of the port range")
        if low > high:
            raise PortError(f"empty port range {low}-{high}")
        self.low = low
        self.high = high
        self.is_free = is_free or bind_checker(("127.0.0.1", bind_check_host))
        self._by_replica: dict[str, dict[str, int]] = {}
        self._owner: dict[int, str] = {}
        self._cursor = low

    @property
    def size(self) -> int:
        return self.high - self.low + 1

    def __len__(self) -> int:
        """Ports held by replicas (inside the range or adopted from outside it)."""
        return len(self._owner)

    def ports_of(self, replica_id: str) -> dict[str, int]:
        return dict(self._by_replica.get(replica_id, {}))

    def owner(self, port: int) -> str | None:
        return self._owner.get(port)

    def allocate(self, replica_id: str, names: Iterable[str]) -> dict[str, int]:
        """Host ports for ``names``; names the replica already holds keep theirs.

        All or nothing: on ``PortsExhausted`` (or a failing host check) the
        replica holds what it held before.
        """
        held = self._by_replica.get(replica_id, {})
        result: dict[str, int] = {}
        fresh: dict[str, int] = {}
        cursor = self._cursor
        for name in names:
            if name in result:
                continue
            if name in held:
                result[name] = held[name]
                continue
            port, busy = self._next_free(cursor, set(fresh.values()))
            if port is None:
                in_range = sum(self.low <= p <= self.high for p in self._owner) + len(fresh)
                raise PortsExhausted(
                    f"no free host port in {self.low}-{self.high} for {replica_id} "
                    f"port {name!r}: {in_range} held by replicas, {busy} busy on the host"
                )
            fresh[name] = result[name] = port
            cursor = self._after(port)
        if fresh:
            self._by_replica.setdefault(replica_id, {}).update(fresh)
            for port in fresh.values():
                self._owner[port] = replica_id
            self._cursor = cursor
        return result

    def release(self, replica_id: str) -> dict[str, int]:
        """Free the replica's ports; returns what it held (empty when unknown)."""
        ports = self._by_replica.pop(replica_id, {})
        for port in ports.values():
            if self._owner.get(port) == replica_id:
                del self._owner[port]
        return ports

    def adopt(self, replica_id: str, ports: Mapping[str, int]) -> None:
        """Record ports a replica already uses (found running after an agent
        restart); replaces what it held. Ports outside the range are kept
        too, since they are in use all the same. Allocation then continues
        after the highest held port in the range, so after a restart the
        ports freed just before it are not the first handed out again."""
        checked = {
            str(name): _check_port(port, f"{replica_id} port {name!r}")
            for name, port in ports.items()
        }
        seen: dict[int, str] = {}
        for name, port in checked.items():
            other = self._owner.get(port)
            if other is not None and other != replica_id:
                raise PortConflict(
                    f"{replica_id} port {name!r}: host port {port} is held by {other}"
                )
            if port in seen:
                raise PortConflict(
                    f"{replica_id}: host port {port} given for both {seen[port]!r} and {name!r}"
                )
            seen[port] = name
        self.release(replica_id)
        if not checked:
            return
        self._by_replica[replica_id] = checked
        for port in checked.values():
            self._owner[port] = replica_id
        inside = [p for p in self._owner if self.low <= p <= self.high]
        if inside:
            self._cursor = self._after(max(inside))

    # -- internals ---------------------------------------------------------------

    def _after(self, port: int) -> int:
        return self.low if port >= self.high else port + 1

    def _next_free(self, start: int, taken: set[int]) -> tuple[int | None, int]:
        """The first usable port from ``start`` round the range, and how many
        ports the host check turned down on the way."""
        busy = 0
        for step in range(self.size):
            port = self.low + (start - self.low + step) % self.size
            if port in self._owner or port in taken:
                continue
            if self.is_free(port):
                return port, busy
            busy += 1
        return None, busy
