"""Shared test helpers: condition waits, lab hosts and the Docker engine.

Tests never sleep for a fixed time: they wait for a condition with a deadline
(``wait_for`` / ``async_wait_for``), so a fast machine finishes fast and a
slow one fails with a message that says what never happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO / "scripts"))

from labhosts import Lab  # noqa: E402
from proxy_fixtures import LOOPS, run_on  # noqa: E402

# A suite started in the background by a non-interactive shell (``cmd &``)
# inherits SIGINT ignored, and so would every process it starts: a CLI or an
# agent under test would then never see the Ctrl-C a test sends it. Tests run
# as from a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

DOCKER_SOCK = "/var/run/docker.sock"
TEST_IMAGE = "meshd-test/busybox:latest"

# Markers that say a test needs more than pure Python; anything else is a unit test.
_ENV_MARKERS = {"integration", "lab", "docker"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if not any(item.get_closest_marker(m) for m in _ENV_MARKERS):
            item.add_marker(pytest.mark.unit)


# ----- waiting on conditions ---------------------------------------------------


def _describe(predicate: Callable[..., Any], message: str | None) -> str:
    return message or getattr(predicate, "__name__", repr(predicate))


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 5.0,
    interval: float = 0.01,
    message: str | None = None,
    ignore: tuple[type[BaseException], ...] = (AssertionError,),
) -> Any:
    """Poll predicate until it returns something truthy; return that value.

    Exceptions of the types in ignore count as "not yet" (so a predicate may
    assert). On timeout, AssertionError names the condition, the last value
    and the last ignored exception.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    error: BaseException | None = None
    while True:
        try:
            last = predicate()
            error = None
            if last:
                return last
        except ignore as exc:
            error = exc
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {_describe(predicate, message)}: "
                f"last value {last!r}" + (f", last error {error!r}" if error else "")
            )
        time.sleep(interval)


async def async_wait_for(
    predicate: Callable[[], Any | Awaitable[Any]],
    timeout: float = 5.0,
    interval: float = 0.01,
    message: str | None = None,
    ignore: tuple[type[BaseException], ...] = (AssertionError,),
) -> Any:
    """``wait_for`` for event-loop code; predicate may be sync or async."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    error: BaseException | None = None
    while True:
        try:
            last = predicate()
            if inspect.isawaitable(last):
                last = await last
            error = None
            if last:
                return last
        except ignore as exc:
            error = exc
        if loop.time() >= deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {_describe(predicate, message)}: "
                f"last value {last!r}" + (f", last error {error!r}" if error else "")
            )
        await asyncio.sleep(interval)


# ----- lab hosts -----------------------------------------------------------------

_lab_ids = itertools.count(1)


def _missing(requirement_env: str, reason: str) -> None:
    """Skip, unless scripts/test promised the requirement: then it's a failure."""
    if os.environ.get(requirement_env) == "1":
        pytest.fail(f"{reason} (scripts/setup --system should have provided it)")
    pytest.skip(reason)


def lab_prefix() -> str:
    """A prefix unique to this test process, short enough for socket paths."""
    return f"t{os.getpid()}x{next(_lab_ids)}"


def _lab_available() -> None:
    if os.geteuid() != 0:
        _missing("MESHD_REQUIRE_LAB", "lab hosts need root")
    for tool in ("ip", "iptables", "nsenter"):
        if shutil.which(tool) is None:
            _missing("MESHD_REQUIRE_LAB", f"lab hosts need '{tool}' (scripts/setup --system)")


@pytest.fixture(scope="session")
def _stale_labs_reaped() -> None:
    """Remove labs left by test runs that died before their teardown."""
    if os.geteuid() == 0:
        Lab.reap_stale(startswith="t")


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest, _stale_labs_reaped: None) -> Iterator[Lab]:
    """Lab hosts shared by a test module.

    The module sets LAB_HOSTS (default 3) and LAB_DOCKER (default False, True
    gives each host its own Docker Engine). Tests that change faults should
    undo them (``lab.heal()``, ``lab.set_loss(i, 0)``).
    """
    _lab_available()
    n = getattr(request.module, "LAB_HOSTS", 3)
    docker = getattr(request.module, "LAB_DOCKER", False)
    if docker:
        _docker_available()
    the_lab = Lab(lab_prefix()).up(n, docker=docker, owner_pid=os.getpid())
    try:
        yield the_lab
    finally:
        the_lab.down()


@pytest.fixture
def make_lab(_stale_labs_reaped: None) -> Iterator[Callable[..., Lab]]:
    """Factory for labs private to one test: make_lab(n, docker=False)."""
    _lab_available()
    made: list[Lab] = []

    def make(n: int, docker: bool = False) -> Lab:
        if docker:
            _docker_available()
        made.append(Lab(lab_prefix()))
        return made[-1].up(n, docker=docker, owner_pid=os.getpid())

    try:
        yield make
    finally:
        for one in made:
            one.down()


# ----- Docker Engine -----------------------------------------------------------


def _docker_available() -> None:
    if not os.path.exists(DOCKER_SOCK):
        _missing("MESHD_REQUIRE_DOCKER", f"no Docker Engine socket at {DOCKER_SOCK}")


@pytest.fixture
def docker_url() -> str:
    """URL of the machine's Docker Engine (skips when there is none)."""
    _docker_available()
    return f"unix://{DOCKER_SOCK}"


def loopback_agent_argv(
    tmp: Path, *, host: str, node: str, driver: str, more: Any = ()
) -> list[str]:
    """``meshd agent`` flags for one agent alone on a loopback address: no mDNS,
    fast gossip timing, its own data dir."""
    return [
        "--node", node,
        "--bind", f"{host}:0",
        "--api", f"{host}:0",
        "--data-dir", str(tmp / "data"),
        "--no-mdns",
        "--driver", driver,
        "--profile", "local",
        *more,
    ]  # fmt: skip


@pytest.fixture(params=LOOPS)
def run(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """Runs a socket scenario on each event loop (``proxy_fixtures.run_on``), so
    a protocol detail one loop handles differently shows up in either."""

    def runner(scenario: Callable[[], Awaitable[Any]], timeout: float = 10.0) -> Any:
        return run_on(request.param, scenario, timeout)

    return runner


@contextlib.asynccontextmanager
async def agent_running(config: Any) -> AsyncIterator[Any]:
    """An agent started in this process, stopped (leaving) at the end."""
    from meshd.agent import Agent

    agent = Agent(config)
    await agent.start()
    try:
        yield agent
    finally:
        await agent.stop(leave=True)
