"""Health checks of replicas: a pure state machine and the probes that feed it.

``HealthTracker`` holds no clock and does no IO: the node controller runs a
probe when ``next_due`` says so and passes the result in, which keeps the
rules (start period, retries, recovery) testable with virtual time. The
probes are the IO edge; they never raise on network or runtime errors
because a failing replica is the normal case they exist to report.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
from collections.abc import Awaitable, Callable, Mapping
from typing import Literal
from urllib.parse import quote

from meshd.spec import Health

__all__ = [
    "ExecFn",
    "HealthState",
    "HealthTracker",
    "probe_exec",
    "probe_http",
    "probe_tcp",
    "run_probe",
]

HealthState = Literal["starting", "healthy", "unhealthy"]

ExecFn = Callable[[tuple[str, ...], float], Awaitable[tuple[int, str]]]
"""A driver's ``exec`` bound to one replica: (argv, timeout) -> (exit code, output)."""

_MESSAGE_MAX = 200
"""Probe messages end up in replica status; keep them one short line."""

_EXEC_GRACE = 1.0
"""The driver enforces an exec check's timeout itself (and kills what it ran);
the probe waits this much longer before giving up on a driver that does not."""

_STATUS_LINE_MAX = 8192


STARTING_INTERVAL = 0.25
"""Most seconds between checks of a replica that has not passed one yet."""
FIRST_CHECK_DELAY = 0.02
"""The first check comes this soon after start, and the gaps double up to
``STARTING_INTERVAL``: a replica that answers at once is ready at once."""


class HealthTracker:
    """Docker/Kubernetes health rules for one running replica.

    - Until the first success the replica is ``starting``; failures inside
      ``start_period`` (from ``started_at``) do not count, because slow
      starters would otherwise be killed before they could ever answer.
    - Once a check has passed, the start period is over for good: every
      failure counts from then on, as in Docker.
    - ``retries`` consecutive counted failures make it ``unhealthy``; a single
      success makes it ``healthy`` again.
    - Checks run ``interval`` after the replica starts and ``interval`` after
      each result (so a slow check never overlaps the next).

    Times are seconds on any one clock the caller uses consistently.
    """

    def __init__(self, check: Health, started_at: float) -> None:
        self.check = check
        self.started_at = started_at
        self.state: HealthState = "starting"
        self.failures = 0
        """Consecutive failures that counted towards ``retries``."""
        self.checks = 0
        self.last_result_at: float | None = None
        self.last_ok: bool | None = None
        self.last_message = ""
        self._passed_once = False
        self._last_counted = started_at

    @property
    def needs_restart(self) -> bool:
        """Unhealthy now: the controller restarts the replica (with a new tracker)."""
        return self.state == "unhealthy"

    def in_start_period(self, now: float) -> bool:
        """Whether a failure at ``now`` would be forgiven."""
        return not self._passed_once and now < self.started_at + self.check.start_period

    def on_result(self, ok: bool, now: float, message: str = "") -> HealthState:
        """Record one probe result; returns the state after it."""
        self.checks += 1
        self.last_result_at = now
        self.last_ok = ok
        self.last_message = message
        if ok:
            self._passed_once = True
            self.failures = 0
            self.state = "healthy"
            return self.state
        if self.in_start_period(now):
            return self.state
        if not self._passed_once:
            # Fast checks before the first success only find it sooner; they
            # count failures no faster than one per interval.
            if now < self._last_counted + self.check.interval:
                return self.state
            self._last_counted = now
        self.failures += 1
        if self.failures >= self.check.retries:
            self.state = "unhealthy"
        return self.state

    def next_due(self, now: float) -> float:
        """When the next check should start; ``now`` when it is overdue.

        Until the first success checks come every ``STARTING_INTERVAL`` at
        most (like Docker's start interval): a new replica takes traffic as
        soon as it answers, not one full interval after it started.
        """
        base = self.started_at if self.last_result_at is None else self.last_result_at
        interval = self.check.interval
        if not self._passed_once:
            interval = min(interval, STARTING_INTERVAL, FIRST_CHECK_DELAY * 2**self.checks)
        return max(now, base + interval)


# -- probes ---------------------------------------------------------------------


def _short(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _MESSAGE_MAX else line[: _MESSAGE_MAX - 3] + "..."


def _reason(exc: BaseException) -> str:
    """One line for an operator: 'connection refused', not an errno tuple."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, OSError):
        if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return "unreachable"
        if exc.strerror:
            return _short(exc.strerror.lower())
    return _short(str(exc) or type(exc).__name__)


def _host_header(host: str, port: int) -> str:
    try:
        if isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address):
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        await writer.wait_closed()


def _bad_port(port: object) -> bool:
    return isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535


async def probe_tcp(host: str, port: int, timeout: float) -> tuple[bool, str]:
    """Ok when a TCP connection opens within ``timeout``."""
    if _bad_port(port):
        return False, f"tcp {port!r}: not a port number"
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
            await _close(writer)
    except TimeoutError:
        return False, f"tcp {port}: timed out after {timeout:g}s"
    except (OSError, ValueError, OverflowError) as exc:
        return False, f"tcp {port}: {_reason(exc)}"
    return True, f"tcp {port}: connected"


async def probe_http(host: str, port: int, path: str, timeout: float) -> tuple[bool, str]:
    """Ok on a 2xx or 3xx answer to ``GET path`` within ``timeout``.

    Only the status line is read: a health endpoint's body says nothing the
    status does not, and a raw stream costs far less per probe than a client
    session. Redirects are not followed (3xx already means the server is up).
    """
    if _bad_port(port):
        return False, f"http {port!r}: not a port number"
    # Whitespace or control characters in the path would break the request line.
    target = quote(path, safe="!#$&'()*+,/:;=?@[]~%")
    request = (
        f"GET {target} HTTP/1.1\r\n"
        f"Host: {_host_header(host, port)}\r\n"
        "User-Agent: meshd-health\r\n"
        "Accept: */*\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, limit=_STATUS_LINE_MAX)
            writer.write(request)
            await writer.drain()
            line = await reader.readline()
    except TimeoutError:
        return False, f"http {port}{path}: timed out after {timeout:g}s"
    except (OSError, ValueError, OverflowError, asyncio.IncompleteReadError) as exc:
        # ValueError: a status line longer than the reader's limit.
        return False, f"http {port}{path}: {_reason(exc)}"
    finally:
        if writer is not None:
            await _close(writer)
    if not line:
        return False, f"http {port}{path}: connection closed without a response"
    parts = line.decode("latin-1").strip().split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        return False, f"http {port}{path}: not an HTTP response: {_short(line.decode('latin-1'))}"
    status = int(parts[1])
    text = f"HTTP {status}" + (f" {parts[2]}" if len(parts) == 3 and parts[2] else "")
    return 200 <= status < 400, f"http {port}{path}: {_short(text)}"


async def probe_exec(run: ExecFn, argv: tuple[str, ...], timeout: float) -> tuple[bool, str]:
    """Ok when ``argv`` exits 0; ``run`` is the driver's exec for the replica."""
    try:
        async with asyncio.timeout(timeout + _EXEC_GRACE):
            code, output = await run(tuple(argv), timeout)
    except TimeoutError:
        return False, f"exec: timed out after {timeout:g}s"
    except Exception as exc:  # a driver error or a broken runtime: the check failed
        return False, f"exec: {_reason(exc)}"
    first = _short(output)
    message = f"exec: exit {code}" + (f": {first}" if first else "")
    return code == 0, message


async def run_probe(
    check: Health,
    *,
    host: str,
    ports: Mapping[str, int],
    exec_fn: ExecFn | None = None,
) -> tuple[bool, str]:
    """Run ``check`` once against a replica whose named ports are on ``host``."""
    if check.kind == "exec":
        if exec_fn is None:
            return False, "exec: this runtime cannot run commands in the replica"
        return await probe_exec(exec_fn, check.command, check.timeout)
    if check.kind not in ("http", "tcp"):
        return False, f"unknown check kind {check.kind!r}"
    port = ports.get(check.port or "")
    if port is None:
        return False, f"{check.kind}: replica has no host port named {check.port!r}"
    if check.kind == "tcp":
        return await probe_tcp(host, port, check.timeout)
    return await probe_http(host, port, check.path or "/", check.timeout)
