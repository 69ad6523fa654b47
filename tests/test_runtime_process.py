"""The process driver with real processes: run, exit codes, stop, adoption by a
new driver, logs, exec, owner isolation, damaged state and cgroup limits.

Replicas that must end on cue block reading a FIFO the test holds open;
nothing here sleeps to wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from conftest import async_wait_for

from meshd.runtime import cgroups
from meshd.runtime.base import DriverError, Instance, LaunchSpec, PortBinding
from meshd.runtime.process import ProcessDriver, _tail_offset

pytestmark = pytest.mark.integration

MakeDriver = Callable[..., Awaitable[tuple[ProcessDriver, list[Instance]]]]


def spec(rid: str, *command: str, **kw: object) -> LaunchSpec:
    return LaunchSpec(replica_id=rid, service="web", slot=1, version="v1", command=command, **kw)  # type: ignore[arg-type]


def sh(rid: str, script: str, *args: str, **kw: object) -> LaunchSpec:
    return spec(rid, "sh", "-c", script, "sh", *args, **kw)


class Gate:
    """A FIFO a replica blocks on (``read x < $1``) until the test opens it."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = path
        # O_RDWR never blocks and keeps the pipe alive, so a line written
        # before the replica opens its end still reaches it.
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)

    def open(self) -> None:
        os.write(self.fd, b"go\n")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Callable[[str], Gate]]:
    made: list[Gate] = []

    def make(name: str = "gate") -> Gate:
        made.append(Gate(tmp_path / name))
        return made[-1]

    yield make
    for g in made:
        g.close()


@pytest.fixture
async def make_driver(tmp_path: Path) -> AsyncIterator[MakeDriver]:
    """Started drivers over tmp_path/state; every replica is killed at the end."""
    drivers: list[ProcessDriver] = []

    async def make(
        owner: str = "n1", state: Path | None = None, **kw: object
    ) -> tuple[ProcessDriver, list[Instance]]:
        kw.setdefault("cgroup_root", tmp_path / "no-cgroup")
        driver = ProcessDriver(state or tmp_path / "state", owner=owner, **kw)  # type: ignore[arg-type]
        events: list[Instance] = []
        await driver.start(events.append)
        drivers.append(driver)
        return driver, events

    yield make
    for driver in drivers:
        for inst in await driver.list():
            if inst.state == "running":
                with contextlib.suppress(Exception):
                    await driver.stop(inst.replica_id, timeout=0.2)
        await driver.close()


async def log_texts(driver: ProcessDriver, rid: str, **kw: object) -> list[str]:
    return [line.text async for line in driver.logs(rid, **kw)]  # type: ignore[arg-type]


async def one(driver: ProcessDriver, rid: str) -> Instance:
    [inst] = [i for i in await driver.list() if i.replica_id == rid]
    return inst


async def test_run_lists_running_and_tails_logs(make_driver: MakeDriver) -> None:
    driver, _ = await make_driver()
    ports = (PortBinding("http", 8080, 31000),)
    started = await driver.run(sh("web-1-a", "echo hi; sleep 30", ports=ports))
    assert started.state == "running" and started.ports == ports

    inst = await one(driver, "web-1-a")
    assert (inst.state, inst.handle, inst.service, inst.slot) == (
        "running",
        started.handle,
        "web",
        1,
    )
    assert inst.ports == ports and inst.started_at == started.started_at
    assert await async_wait_for(lambda: log_texts(driver, "web-1-a", tail=10)) == ["hi"]
    lines = [line async for line in driver.logs("web-1-a")]
    assert lines[0].stream == "stdout" and lines[0].replica_id == "web-1-a"


async def test_exit_code_is_recorded_and_reported(make_driver: MakeDriver) -> None:
    driver, events = await make_driver()
    await driver.run(sh("web-1-b", "echo bye >&2; exit 3"))
    await async_wait_for(lambda: events, message="on_change after exit")
    [event] = events
    assert (event.replica_id, event.state, event.exit_code, event.error) == (
        "web-1-b",
        "exited",
        3,
        None,
    )
    inst = await one(driver, "web-1-b")
    assert inst.state == "exited" and inst.exit_code == 3
    assert inst.finished_at is not None and inst.started_at is not None
    assert inst.finished_at >= inst.started_at - 1
    lines = [line async for line in driver.logs("web-1-b")]
    assert [(x.stream, x.text) for x in lines] == [("stderr", "bye")]


async def test_stop_terminates_the_process_group(make_driver: MakeDriver) -> None:
    driver, events = await make_driver()
    # A child of the command, in the same group, must end too.
    inst = await driver.run(sh("web-1-c", "sleep 30 & echo $!; wait"))
    child = int((await async_wait_for(lambda: log_texts(driver, "web-1-c")))[0])
    await driver.stop("web-1-c", timeout=5)
    stopped = await one(driver, "web-1-c")
    assert stopped.state == "exited" and stopped.exit_code == 143
    assert stopped.error == "killed by SIGTERM"
    assert [e.exit_code for e in events] == [143]
    assert not _alive(int(inst.handle)) and not _is_zombie(int(inst.handle))
    await async_wait_for(lambda: not _alive(child), message="the command's child ended")
    await driver.stop("web-1-c")  # idempotent
    await driver.stop("never-was")


async def test_stop_right_after_run_is_prompt(make_driver: MakeDriver) -> None:
    """SIGTERM sent while the wrapper is still starting the command is not lost."""
    driver, _ = await make_driver()
    loop = asyncio.get_running_loop()
    for i in range(20):
        await driver.run(sh(f"fast-{i}", "sleep 30"))
        t0 = loop.time()
        await driver.stop(f"fast-{i}", timeout=5)
        assert loop.time() - t0 < 2
        assert (await one(driver, f"fast-{i}")).exit_code == 143


async def test_what_a_replica_leaves_behind_ends_with_it(make_driver: MakeDriver) -> None:
    driver, events = await make_driver()
    await driver.run(sh("web-1-r", "sleep 30 & echo $!; exit 0"))
    await async_wait_for(lambda: events)
    assert events[0].exit_code == 0
    left = int((await log_texts(driver, "web-1-r"))[0])
    await async_wait_for(lambda: not _alive(left), message="the background child was killed")


async def test_stop_kills_a_process_that_ignores_term(make_driver: MakeDriver) -> None:
    driver, events = await make_driver()
    await driver.run(sh("web-1-d", "trap '' TERM; echo ready; sleep 30"))
    await async_wait_for(lambda: log_texts(driver, "web-1-d"))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await driver.stop("web-1-d", timeout=0.2)
    assert loop.time() - t0 < 3
    inst = await one(driver, "web-1-d")
    assert (inst.state, inst.exit_code, inst.error) == ("exited", 137, "killed by SIGKILL")
    assert [e.error for e in events] == ["killed by SIGKILL"]


async def test_a_new_driver_adopts_running_replicas(
    make_driver: MakeDriver, gate: Callable[[str], Gate], tmp_path: Path
) -> None:
    g = gate("adopt")
    first, first_events = await make_driver()
    started = await first.run(sh("web-1-e", 'echo up; read x < "$1"; exit 7', str(g.path)))
    await async_wait_for(lambda: log_texts(first, "web-1-e"))
    await first.close()

    second, events = await make_driver()
    inst = await one(second, "web-1-e")
    assert inst.state == "running" and inst.handle == started.handle
    g.open()
    await async_wait_for(lambda: events, message="the adopted replica's exit")
    assert (events[0].exit_code, events[0].handle) == (7, started.handle)
    assert first_events == []
    assert (await one(second, "web-1-e")).exit_code == 7
    assert not _alive(int(started.handle)), "the adopting driver reaps a child of its process"


async def test_exit_while_no_driver_watches_is_found_at_start(
    make_driver: MakeDriver, gate: Callable[[str], Gate]
) -> None:
    g = gate()
    first, _ = await make_driver()
    started = await first.run(sh("web-1-f", 'read x < "$1"; exit 5', str(g.path)))
    await first.close()
    g.open()
    await async_wait_for(lambda: (first._dir("web-1-f") / "exit").exists())
    second, events = await make_driver()
    inst = await one(second, "web-1-f")
    assert (inst.state, inst.exit_code, inst.handle) == ("exited", 5, started.handle)
    assert events == []  # found by list(), not a change seen live
    assert not _alive(int(started.handle))


async def test_remove_refuses_running_then_forgets(make_driver: MakeDriver) -> None:
    driver, _ = await make_driver()
    await driver.run(sh("web-1-g", "sleep 30"))
    with pytest.raises(DriverError, match="still running"):
        await driver.remove("web-1-g")
    await driver.stop("web-1-g", timeout=5)
    await driver.remove("web-1-g")
    assert await driver.list() == []
    assert not driver._dir("web-1-g").exists()
    await driver.remove("web-1-g")  # no error once gone


async def test_env_is_minimal_plus_spec(
    make_driver: MakeDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESHD_TEST_AGENT_ONLY", "secret")
    driver, events = await make_driver()
    await driver.run(sh("web-1-h", "env; pwd", env={"FOO": "bar baz", "MESHD_REPLICA": "web-1-h"}))
    await async_wait_for(lambda: events)
    lines = await log_texts(driver, "web-1-h")
    assert "FOO=bar baz" in lines and "MESHD_REPLICA=web-1-h" in lines
    assert not any(x.startswith("MESHD_TEST_AGENT_ONLY") for x in lines)
    assert lines[-1] == str(driver._dir("web-1-h") / "work")


async def test_exec_beside_the_replica(make_driver: MakeDriver) -> None:
    driver, _ = await make_driver()
    await driver.run(sh("web-1-i", "sleep 30", env={"FOO": "bar"}))
    code, out = await driver.exec("web-1-i", ("sh", "-c", "echo $FOO; pwd; exit 4"), timeout=5)
    assert code == 4
    assert out == f"bar\n{driver._dir('web-1-i') / 'work'}\n"

    code, out = await driver.exec(
        "web-1-i", ("sh", "-c", "head -c 10000 /dev/zero | tr '\\0' a"), 5
    )
    assert code == 0 and out == "a" * 4096

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(DriverError, match="timed out"):
        await driver.exec("web-1-i", ("sleep", "30"), timeout=0.2)
    assert loop.time() - t0 < 3
    with pytest.raises(DriverError):
        await driver.exec("web-1-i", ("/no/such/binary",), timeout=5)
    with pytest.raises(DriverError, match="no replica"):
        await driver.exec("nope", ("true",), timeout=5)


async def test_follow_sees_appended_lines_until_exit(
    make_driver: MakeDriver, gate: Callable[[str], Gate]
) -> None:
    g = gate()
    driver, _ = await make_driver()
    script = 'echo one; read x < "$1"; echo two; echo err >&2; printf partial; exit 0'
    await driver.run(sh("web-1-j", script, str(g.path)))
    seen: list[tuple[str, str]] = []

    async def follow() -> None:
        async for line in driver.logs("web-1-j", tail=5, follow=True):
            seen.append((line.stream, line.text))

    task = asyncio.create_task(follow())
    try:
        await async_wait_for(lambda: ("stdout", "one") in seen)
        g.open()
        await asyncio.wait_for(task, 5)  # ends by itself once the replica exited
    finally:
        task.cancel()
    assert seen[0] == ("stdout", "one")
    assert set(seen[1:]) == {("stdout", "two"), ("stderr", "err"), ("stdout", "partial")}


async def test_follow_stops_when_the_consumer_does(make_driver: MakeDriver) -> None:
    driver, _ = await make_driver()
    await driver.run(sh("web-1-k", "echo a; echo b; sleep 30"))
    got = []
    async with contextlib.aclosing(driver.logs("web-1-k", follow=True)) as lines:
        async for line in lines:
            got.append(line.text)
            if len(got) == 2:
                break
    assert got == ["a", "b"]


async def test_owners_see_only_their_replicas(make_driver: MakeDriver) -> None:
    mine, _ = await make_driver("n1")
    theirs, _ = await make_driver("n2")
    await mine.run(sh("web-1-l", "sleep 30"))
    assert await theirs.list() == []
    await theirs.stop("web-1-l", timeout=0.1)
    await theirs.remove("web-1-l")
    assert (await one(mine, "web-1-l")).state == "running"
    with pytest.raises(DriverError):
        await theirs.exec("web-1-l", ("true",), timeout=5)
    with pytest.raises(DriverError):
        await log_texts(theirs, "web-1-l")
    with pytest.raises(DriverError, match="belongs to node n1"):
        await theirs.run(sh("web-1-l", "true"))


async def test_damaged_state_is_skipped(
    make_driver: MakeDriver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    good = spec("good", "true")
    doc = {**json.loads(json.dumps(_as_doc(good))), "owner": "n1"}

    def put(name: str, files: dict[str, str]) -> None:
        (state / name).mkdir(parents=True)
        for fname, text in files.items():
            (state / name / fname).write_text(text)

    put("bad-json", {"spec.json": "{not json"})
    put("bad-list", {"spec.json": "[1, 2]"})
    put("bad-slot", {"spec.json": json.dumps({**doc, "replica_id": "bad-slot", "slot": "one"})})
    put("bad-ports", {"spec.json": json.dumps({**doc, "replica_id": "bad-ports", "ports": [1]})})
    put("bad-pid", {"spec.json": json.dumps({**doc, "replica_id": "bad-pid"}), "pid.json": "{}"})
    put(
        "bad-pid2",
        {"spec.json": json.dumps({**doc, "replica_id": "bad-pid2"}), "pid.json": "\0\xff"},
    )
    put(
        "bad-exit",
        {
            "spec.json": json.dumps({**doc, "replica_id": "bad-exit"}),
            "pid.json": json.dumps({"pid": 2**22 + 7, "start": 1, "started_at": 1.0}),
            "exit": "garbage",
            "result.json": "[",
        },
    )
    put("created", {"spec.json": json.dumps({**doc, "replica_id": "created"})})
    put("no-spec", {})
    (state / "a-file").write_text("not a dir")
    (state / "bad name").mkdir()

    driver, _ = await make_driver()
    found = {i.replica_id: i for i in await driver.list()}
    assert set(found) == {"bad-exit", "created"}
    assert found["created"].state == "created"
    assert (found["bad-exit"].state, found["bad-exit"].exit_code) == ("exited", None)
    assert found["bad-exit"].error == "exit code unknown"
    assert "skipping" in caplog.text
    caplog.clear()
    await driver.list()
    assert "skipping" not in caplog.text  # each damaged file is reported once


async def test_a_recycled_pid_is_not_ours(make_driver: MakeDriver, tmp_path: Path) -> None:
    driver, _ = await make_driver()
    await driver.run(spec("web-1-m", "true"))
    await async_wait_for(lambda: (driver._dir("web-1-m") / "result.json").exists())
    pid_file = driver._dir("web-1-m") / "pid.json"
    doc = json.loads(pid_file.read_text())
    pid_file.write_text(json.dumps({**doc, "pid": os.getpid(), "start": doc["start"] + 1}))
    inst = await one(driver, "web-1-m")
    assert inst.state == "exited" and inst.handle == str(os.getpid())
    await driver.stop("web-1-m", timeout=0.1)  # must not signal the test process
    await driver.remove("web-1-m")


async def test_run_rejects_bad_requests(make_driver: MakeDriver) -> None:
    driver, _ = await make_driver()
    with pytest.raises(DriverError, match="needs a command"):
        await driver.run(LaunchSpec(replica_id="x-1", service="x", slot=1, version="v"))
    with pytest.raises(DriverError, match="not found"):
        await driver.run(spec("x-2", "no-such-binary-anywhere"))
    with pytest.raises(DriverError, match="not found"):
        await driver.run(spec("x-3", "/no/such/binary"))
    with pytest.raises(DriverError, match="bad replica id"):
        await driver.run(spec("../escape", "true"))
    assert await driver.list() == []
    await driver.run(sh("x-4", "sleep 30"))
    with pytest.raises(DriverError, match="already running"):
        await driver.run(sh("x-4", "sleep 30"))


async def test_an_exited_replica_can_run_again(make_driver: MakeDriver) -> None:
    driver, events = await make_driver()
    await driver.run(sh("web-1-n", "echo first; exit 1"))
    await async_wait_for(lambda: events)
    again = await driver.run(sh("web-1-n", "echo second; exit 2"))
    await async_wait_for(lambda: len(events) == 2)
    assert [e.exit_code for e in events] == [1, 2] and events[1].handle == again.handle
    assert await log_texts(driver, "web-1-n") == ["second"]


async def test_no_cgroup_means_a_warning(make_driver: MakeDriver) -> None:
    driver, _ = await make_driver()
    await driver.run(spec("web-1-o", "true", memory_mb=64))
    assert driver.warning is not None and "not enforced" in driver.warning


# ----- cgroups ---------------------------------------------------------------


def _fake_cgroup_root(tmp_path: Path) -> Path:
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    return root


async def test_limits_are_written_to_the_replicas_cgroup(
    make_driver: MakeDriver, tmp_path: Path
) -> None:
    root = _fake_cgroup_root(tmp_path)
    driver, events = await make_driver(cgroup_root=root)
    inst = await driver.run(sh("web-1-p", "echo $$; exec sleep 30", cpu=0.5, memory_mb=64))
    leaf = root / "meshd" / "n1" / "web-1-p"
    assert driver.warning is None
    assert (leaf / "memory.max").read_text() == str(64 * 1024 * 1024)
    assert (leaf / "cpu.max").read_text() == "50000 100000"
    for group in (root, root / "meshd", root / "meshd" / "n1"):
        assert (group / "cgroup.subtree_control").exists()
    await async_wait_for(
        lambda: (leaf / "cgroup.procs").read_text().strip() == inst.handle,
        ignore=(OSError,),
        message="the wrapper joined its cgroup",
    )

    # The kernel counted an OOM kill in the group: the exit says so.
    command = int((await async_wait_for(lambda: log_texts(driver, "web-1-p")))[0])
    (leaf / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    os.kill(command, signal.SIGKILL)
    await async_wait_for(lambda: events)
    assert (events[0].exit_code, events[0].error) == (137, "out of memory")


def _real_cgroup_root() -> Path | None:
    root = cgroups.DEFAULT_ROOT
    if os.geteuid() != 0 or not cgroups.is_cgroup2(root):
        return None
    if "memory" not in (root / "cgroup.controllers").read_text().split():
        return None
    return root


@pytest.mark.skipif(
    _real_cgroup_root() is None, reason="needs root and a cgroup v2 memory controller"
)
async def test_limits_on_a_real_cgroup_v2(make_driver: MakeDriver) -> None:
    root = cgroups.DEFAULT_ROOT
    owner = f"test-{os.getpid()}"
    driver, _ = await make_driver(owner=owner, cgroup_root=root)
    try:
        inst = await driver.run(sh("web-1-q", "sleep 30", memory_mb=64))
        if driver.warning is not None:
            pytest.skip(driver.warning)
        leaf = root / "meshd" / owner / "web-1-q"
        assert (leaf / "memory.max").read_text().strip() == str(64 * 1024 * 1024)
        await async_wait_for(
            lambda: (
                Path(f"/proc/{inst.handle}/cgroup")
                .read_text()
                .strip()
                .endswith(f"/meshd/{owner}/web-1-q")
            )
        )
        await driver.stop("web-1-q", timeout=5)
        await driver.remove("web-1-q")
        assert not leaf.exists()
    finally:
        with contextlib.suppress(OSError):
            (root / "meshd" / owner).rmdir()


# ----- log tails -------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "n", "expect"),
    [
        (b"a\nb\nc\n", 1, b"c\n"),
        (b"a\nb\nc\n", 2, b"b\nc\n"),
        (b"a\nb\nc\n", 3, b"a\nb\nc\n"),
        (b"a\nb\nc\n", 9, b"a\nb\nc\n"),
        (b"a\nb\nc", 1, b"c"),
        (b"a\nb\nc", 2, b"b\nc"),
        (b"a\nb\n", 0, b""),
        (b"", 3, b""),
        (b"\n\n", 1, b"\n"),
        (b"x" * 200_000 + b"\n" + b"y" * 100_000 + b"\n", 1, b"y" * 100_000 + b"\n"),
    ],
)
def test_tail_offset(tmp_path: Path, content: bytes, n: int, expect: bytes) -> None:
    path = tmp_path / "log"
    path.write_bytes(content)
    assert content[_tail_offset(path, n) :] == expect


# ----- helpers ---------------------------------------------------------------


def _as_doc(s: LaunchSpec) -> dict[str, object]:
    from dataclasses import asdict

    return asdict(s)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


async def test_big_logs_are_rotated_and_the_replica_writes_on(tmp_path: Path) -> None:
    driver = ProcessDriver(tmp_path / "state", owner="rot")
    await driver.start(lambda inst: None)
    try:
        driver.max_log_bytes = 1000
        argv = (
            "sh",
            "-c",
            "i=0; while [ $i -lt 100 ]; do echo line-$i-xxxxxxxxxxxxxxxx; i=$((i+1)); done; exec sleep 30",
        )
        await driver.run(
            LaunchSpec(replica_id="r1", service="s", slot=0, version="v", command=argv)
        )
        log_file = tmp_path / "state" / "r1" / "stdout.log"
        await async_wait_for(lambda: log_file.exists() and log_file.stat().st_size > 1000, 5)
        assert driver.rotate_logs() == 1
        assert (tmp_path / "state" / "r1" / "stdout.log.1").stat().st_size > 1000
        assert log_file.stat().st_size == 0
        assert driver.rotate_logs() == 0
    finally:
        await driver.stop("r1", 2.0)
        await driver.close()
