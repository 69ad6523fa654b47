"""The service commands of the meshd CLI, and the client calls under them, against
the fake agent served on 127.0.0.1."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from api_fake import FakeView, ServerThread
from conftest import wait_for

from meshd.api import create_app
from meshd.cli import main
from meshd.cli_services import parse_port
from meshd.client import ApiError, AsyncClient, Client, ClientError
from meshd.spec import ServiceSpec

WEB = """\
name: web
image: nginx:1.27
replicas: 2
ports:
  - {name: http, target: 80, protocol: http, service_port: 8080}
"""

COMPOSE = """\
services:
  web:
    image: nginx
    ports: ["8080:80"]
    deploy: {replicas: 3}
    build: .
  cache:
    image: redis:7
"""


@pytest.fixture
def view() -> FakeView:
    return FakeView()


@pytest.fixture
def server(view: FakeView, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServerThread]:
    monkeypatch.delenv("MESHD_TOKEN", raising=False)
    with ServerThread(create_app(view)) as running:
        monkeypatch.setenv("MESHD_ADDR", running.addr)
        yield running


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process: exit status, stdout, stderr."""
    try:
        status = main(list(args))
    except SystemExit as exc:
        status = int(exc.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("meshd: error: ")
    assert "Traceback" not in err
    return lines[0]


def deploy_web(server: ServerThread, view: FakeView, **fields: object) -> None:
    spec = ServiceSpec.from_dict({"name": "web", "image": "nginx", "replicas": 2, **fields})
    server.run(view.service_put(spec))


# ----- deploy -------------------------------------------------------------------------


def test_deploy_one_service(
    server: ServerThread, view: FakeView, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "web.yaml"
    path.write_text(WEB)
    status, out, err = cli(capsys, "deploy", "-f", str(path))
    assert (status, err) == (0, "")
    header, row = out.splitlines()
    assert header.split() == ["NAME", "KIND", "READY", "VERSION", "LEADER", "PENDING", "UPDATE"]
    assert row.split()[:3] == ["web", "service", "2/2"]
    assert "n1 (term 1)" in row
    assert view.services["web"][0].ports[0].service_port == 8080
    status, out, _ = cli(capsys, "deploy", "-f", str(path), "--json")
    assert status == 0
    assert [r["name"] for r in json.loads(out)] == ["web"]


def test_deploy_a_compose_file(
    server: ServerThread, view: FakeView, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "compose.yaml"
    path.write_text(COMPOSE)
    status, out, err = cli(capsys, "deploy", "--file", str(path), "--json")
    assert status == 0
    records = json.loads(out)
    assert [r["name"] for r in records] == ["web", "cache"]
    assert records[0]["replicas"]["desired"] == 3
    assert err == "meshd: warning: web: services.web.build: ignored (not supported)\n"
    assert sorted(view.services) == ["cache", "web"]
    assert view.services["web"][0].ports[0].service_port == 8080


def test_deploy_from_stdin(
    server: ServerThread,
    view: FakeView,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = json.dumps({"name": "api", "command": "sleep 100"}).encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(spec)))
    status, _, _ = cli(capsys, "deploy", "-f", "-")
    assert status == 0
    assert view.services["api"][0].command == ("sleep", "100")


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("web.yaml", "name: web\nimage: x\nreplicas: -2\n", "web.yaml: replicas: must be 0..10000"),
        ("bad.yaml", "name: [unclosed\n", "bad.yaml: invalid YAML at line"),
        ("c.yaml", "services:\n  db: {image: y, ports: ['x']}\n", "c.yaml: services.db.ports[0]"),
        ("s.json", '{"name": "web",', "s.json: invalid JSON at line 1"),
    ],
)
def test_deploy_a_bad_file_names_file_and_field(
    server: ServerThread,
    view: FakeView,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    name: str,
    text: str,
    message: str,
) -> None:
    path = tmp_path / name
    path.write_text(text)
    status, out, err = cli(capsys, "deploy", "-f", str(path))
    assert status == 1 and out == ""
    assert one_error_line(err).startswith(f"meshd: error: {tmp_path / message}"), err
    assert view.services == {}


def test_deploy_a_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, _, err = cli(capsys, "deploy", "-f", str(tmp_path / "nope.yaml"))
    assert status == 1
    assert "cannot read" in one_error_line(err) and "no such file" in err


def test_deploy_refused_by_the_agent(
    server: ServerThread, view: FakeView, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "web.yaml"
    path.write_text(WEB)
    view.service_error = ValueError("service_port 8080 is taken by 'api'")
    status, _, err = cli(capsys, "deploy", "-f", str(path))
    assert status == 1
    assert one_error_line(err) == (
        "meshd: error: service_port 8080 is taken by 'api' (409 conflict)"
    )


# ----- run ---------------------------------------------------------------------------------


def test_run_an_image(
    server: ServerThread, view: FakeView, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = cli(
        capsys,
        "run", "web", "--image", "nginx:1.27", "--replicas", "3",
        "--port", "http:80:8080/http", "--port", "admin:9000",
        "--env", "MODE=prod", "--env", "EMPTY=", "--cpu", "500m", "--memory", "256Mi",
        "--", "nginx", "-g", "daemon off;",
    )  # fmt: skip
    assert (status, err) == (0, ""), err
    assert out.splitlines()[1].split()[:3] == ["web", "service", "3/3"]
    spec = view.services["web"][0]
    assert spec.image == "nginx:1.27" and spec.replicas == 3
    assert spec.args == ("nginx", "-g", "daemon off;")
    assert [(p.name, p.target, p.protocol, p.service_port) for p in spec.ports] == [
        ("http", 80, "http", 8080),
        ("admin", 9000, "tcp", None),
    ]
    assert spec.env == {"EMPTY": "", "MODE": "prod"}
    assert spec.resources.cpu == 0.5 and spec.resources.memory == 256 * 2**20


def test_run_a_command(
    server: ServerThread, view: FakeView, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = cli(capsys, "run", "ticker", "--command", "sleep 1000", "--json")
    assert status == 0
    assert json.loads(out)[0]["spec"]["command"] == ["sleep", "1000"]
    assert view.services["ticker"][0].replicas == 1


def test_run_with_a_balancing_policy(
    server: ServerThread, view: FakeView, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = cli(capsys, "run", "api", "--command", "srv", "--balance", "least_conn")
    assert (status, err) == (0, ""), err
    assert view.services["api"][0].balance.policy == "least_conn"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--port", "http"], "--port 'http': expected NAME:TARGET"),
        (["--port", "http:eighty"], "--port 'http:eighty': expected"),
        (["--port", ":80"], "--port ':80': expected"),
        (["--port", "http:80:81:82"], "expected"),
        (["--port", "http:80/udp"], "the protocol must be http or tcp"),
        (["--port", "http:0"], "--port http:0: must be 1..65535"),
        (["--port", "HTTP:80"], "--port HTTP:80: must be 1-15 characters"),
        (["--port", "a:80:9000", "--port", "b:81:9000"], "--port b:81:9000: duplicate"),
        (["--env", "NOVALUE"], "--env 'NOVALUE': expected K=V"),
        (["--env", "=x"], "--env '=x': expected K=V"),
        (["--env", "1BAD=x"], "--env 1BAD: bad variable name"),
        (["--cpu", "lots"], "--cpu: cannot parse 'lots'"),
        (["--memory", "-1"], "--memory: cannot parse '-1'"),
        (["--balance", "fastest"], "--balance: must be one of round_robin"),
        (["--replicas", "20000"], "--replicas: must be 0..10000"),
    ],
)
def test_run_bad_arguments_are_usage_errors(
    server: ServerThread,
    view: FakeView,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    status, out, err = cli(capsys, "run", "web", "--image", "x", *args)
    assert status == 2 and out == ""
    assert message in one_error_line(err), err
    assert view.services == {}


@pytest.mark.parametrize(
    "args",
    [
        ["run", "web"],  # neither --image nor --command
        ["run", "web", "--image", "x", "--command", "y"],
        ["run", "web", "--image", "x", "--replicas", "-1"],
        ["run", "web", "--image", "x", "--replicas", "two"],
        ["run", "--image", "x"],
        ["scale", "web"],
        ["scale", "web", "-3"],
        ["logs", "web", "--tail", "x"],
        ["deploy"],
        ["members", "remove"],
        ["ps", "a", "b"],
    ],
)
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    status, out, err = cli(capsys, *args)
    assert status == 2 and out == ""
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("meshd: error:")


def test_run_a_bad_name(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = cli(capsys, "run", "Web_1", "--image", "x")
    assert status == 2
    assert one_error_line(err).startswith("meshd: error: NAME: must be 1-63 characters")


def test_parse_port() -> None:
    assert parse_port("web:8080") == {"name": "web", "target": 8080}
    assert parse_port("web:8080:80/http") == {
        "name": "web",
        "target": 8080,
        "service_port": 80,
        "protocol": "http",
    }
    for bad in ["web", "web:", "web:x", "web:1:2:3", "web:80/", "web:80/udp", ":80", "web:-1"]:
        with pytest.raises(ValueError):
            parse_port(bad)


# ----- services, ps ---------------------------------------------------------------------


def test_services(server: ServerThread, view: FakeView, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = cli(capsys, "services")
    assert status == 0 and out.split() == [
        "NAME", "KIND", "READY", "VERSION", "LEADER", "PENDING", "UPDATE"
    ]  # fmt: skip
    deploy_web(server, view)
    job = ServiceSpec.from_dict(
        {"name": "batch", "command": "true", "kind": "job", "completions": 4}
    )
    server.run(view.service_put(job))
    status, out, _ = cli(capsys, "services")
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [r[:3] for r in rows] == [["batch", "job", "0/4"], ["web", "service", "2/2"]]
    status, out, _ = cli(capsys, "services", "--json")
    assert [s["name"] for s in json.loads(out)] == ["batch", "web"]


def test_ps(server: ServerThread, view: FakeView, capsys: pytest.CaptureFixture[str]) -> None:
    deploy_web(server, view, ports=[{"name": "http", "target": 80}])
    server.run(view.service_put(ServiceSpec.from_dict({"name": "api", "image": "x"})))
    status, out, _ = cli(capsys, "ps", "web")
    assert status == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "SERVICE", "ID", "SLOT", "NODE", "STATE", "HEALTH", "VERSION", "PORTS", "RESTARTS", "REASON"
    ]  # fmt: skip
    assert [line.split()[0] for line in lines[1:]] == ["web", "web"]
    assert "http=127.0.0.2:30010" in lines[2]
    status, out, _ = cli(capsys, "ps")
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["api", "web", "web"]
    status, out, _ = cli(capsys, "ps", "--json")
    assert [(r["service"], r["slot"]) for r in json.loads(out)] == [
        ("api", 0),
        ("web", 0),
        ("web", 1),
    ]
    status, _, err = cli(capsys, "ps", "nope")
    assert status == 1 and one_error_line(err) == "meshd: error: no service 'nope'"


# ----- scale, rm ------------------------------------------------------------------------


def test_scale(server: ServerThread, view: FakeView, capsys: pytest.CaptureFixture[str]) -> None:
    deploy_web(server, view)
    status, out, _ = cli(capsys, "scale", "web", "5")
    assert (status, out) == (0, "web scaled to 5 replicas\n")
    assert view.services["web"][0].replicas == 5
    status, out, _ = cli(capsys, "scale", "web", "1", "--json")
    assert json.loads(out)["replicas"]["desired"] == 1
    status, _, err = cli(capsys, "scale", "nope", "2")
    assert status == 1 and one_error_line(err) == "meshd: error: no service 'nope'"
    status, _, err = cli(capsys, "scale", "web", "10001")
    assert status == 1 and "400 bad_body" in one_error_line(err)
    job = ServiceSpec.from_dict({"name": "batch", "command": "true", "kind": "job"})
    server.run(view.service_put(job))
    status, _, err = cli(capsys, "scale", "batch", "3")
    assert status == 1 and "is a job" in one_error_line(err)


def test_rm(server: ServerThread, view: FakeView, capsys: pytest.CaptureFixture[str]) -> None:
    deploy_web(server, view)
    assert cli(capsys, "rm", "web") == (0, "web removed\n", "")
    assert view.services == {}
    status, _, err = cli(capsys, "rm", "web")
    assert status == 1 and one_error_line(err) == "meshd: error: no service 'web'"
    deploy_web(server, view)
    status, out, _ = cli(capsys, "rm", "web", "--json")
    assert json.loads(out) == {"name": "web", "deleted": True}


# ----- logs ---------------------------------------------------------------------------------


def test_logs(server: ServerThread, view: FakeView, capsys: pytest.CaptureFixture[str]) -> None:
    deploy_web(server, view)
    for i in range(4):
        server.run(view.emit("web", f"line {i}", slot=i % 2))
    status, out, _ = cli(capsys, "logs", "web")
    assert status == 0
    assert out.splitlines() == [
        "web-0@n1 | line 0",
        "web-1@n1 | line 1",
        "web-0@n1 | line 2",
        "web-1@n1 | line 3",
    ]
    status, out, _ = cli(capsys, "logs", "web", "--tail", "1", "--json")
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["text"] for line in lines] == ["line 3"]
    assert view.log_requests[-1] == ("web", 1, False)
    status, _, err = cli(capsys, "logs", "nope")
    assert status == 1 and "no service 'nope'" in one_error_line(err)
    view.log_error = RuntimeError("driver went away")
    status, out, err = cli(capsys, "logs", "web")
    assert status == 1 and len(out.splitlines()) == 4
    assert "the log stream failed" in one_error_line(err) and "driver went away" in err


MESHD = [sys.executable, "-c", "import sys; from meshd.cli import main; sys.exit(main())"]


class Lines:
    """A process's stdout, collected by a thread so a test can wait for a line."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._pump, args=(proc,), daemon=True)
        self._thread.start()

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line.rstrip("\n"))


def test_logs_follow_until_interrupted(server: ServerThread, view: FakeView) -> None:
    deploy_web(server, view)
    server.run(view.emit("web", "before"))
    proc = subprocess.Popen(
        [*MESHD, "logs", "web", "-f", "--addr", server.addr],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out = Lines(proc)
        wait_for(lambda: out.lines == ["web-0@n1 | before"], timeout=15, message="the old line")
        wait_for(lambda: view.followers == 1, message="the CLI follows")
        server.run(view.emit("web", "after", slot=1))
        wait_for(lambda: out.lines[-1:] == ["web-1@n1 | after"], message="the new line")
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate(timeout=10)
            pytest.fail(f"the CLI did not stop on SIGINT; its stderr: {err!r}")
        assert code == 130
        assert proc.stderr is not None and "Traceback" not in proc.stderr.read()
        wait_for(lambda: view.followers == 0, message="the agent stopped following")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# ----- members remove, and the agent being unreachable ------------------------------------------


def test_members_remove(
    server: ServerThread, view: FakeView, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(capsys, "members", "remove", "n3") == (0, "n3 removed from the voter set\n", "")
    assert view.removed == ["n3"]
    status, _, err = cli(capsys, "members", "remove", "n1")
    assert status == 1 and "is alive" in one_error_line(err) and "409 conflict" in err
    status, _, err = cli(capsys, "members", "remove", "zz")
    assert status == 1 and one_error_line(err) == "meshd: error: no member 'zz'"
    status, out, _ = cli(capsys, "members", "--json")
    assert [m["name"] for m in json.loads(out)] == ["n1", "n2", "n4"]
    status, out, _ = cli(capsys, "members", "--addr", server.addr, "remove", "n4", "--json")
    assert status == 0 and json.loads(out) == {"node": "n4", "removed": True}


@pytest.mark.parametrize(
    "args",
    [["services"], ["ps"], ["ps", "web"], ["scale", "web", "1"], ["rm", "web"], ["logs", "web"],
     ["run", "web", "--image", "x"], ["members", "remove", "n3"]],
)  # fmt: skip
def test_unreachable_agent(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{sock.getsockname()[1]}"
    status, out, err = cli(capsys, *args, "--addr", addr)
    assert status == 1 and out == ""
    assert "cannot reach the meshd agent" in one_error_line(err)


# ----- the clients themselves ---------------------------------------------------------------


def test_client_service_calls(server: ServerThread, view: FakeView) -> None:
    client = Client(server.addr)
    assert client.services() == []
    assert client.service("web") is None
    assert client.service_replicas("web") is None
    assert client.service_leader("web") is None
    assert client.service_scale("web", 2) is None
    assert client.service_delete("web") is False
    created = client.service_put("web", WEB)  # text
    assert created["replicas"]["desired"] == 2
    assert client.service_put("web", WEB.encode())["name"] == "web"  # bytes
    assert client.service_put("web", {"image": "x", "replicas": 4})["replicas"]["desired"] == 4
    assert client.service("web")["spec"]["image"] == "x"
    assert len(client.service_replicas("web") or []) == 4
    assert client.service_leader("web") == {"node": "n1", "term": 1}
    assert client.service_scale("web", 1)["replicas"]["desired"] == 1
    assert [r["name"] for r in client.deploy(COMPOSE)] == ["web", "cache"]
    assert [r["name"] for r in client.deploy([{"name": "z", "image": "x"}])] == ["z"]
    assert client.service_delete("z") is True
    with pytest.raises(ApiError) as caught:
        client.service_put("web", "name: web\nimage: x\nreplicas: -1\n")
    assert (caught.value.status, caught.value.error) == (400, "bad_spec")
    assert "replicas" in caught.value.detail
    with pytest.raises(ClientError, match="non-empty"):
        client.service("")
    with pytest.raises(ClientError, match="must be bytes, text or a mapping"):
        client.service_put("web", 42)  # type: ignore[arg-type]
    with pytest.raises(ClientError, match="must be an integer"):
        client.service_scale("web", "2")  # type: ignore[arg-type]
    assert client.member_remove("n3") is True
    assert client.member_remove("n3") is False


def test_client_logs(server: ServerThread, view: FakeView) -> None:
    deploy_web(server, view)
    for i in range(3):
        server.run(view.emit("web", f"line {i}"))
    client = Client(server.addr)
    assert [line["text"] for line in client.service_logs("web")] == ["line 0", "line 1", "line 2"]
    assert [line["text"] for line in client.service_logs("web", tail=1)] == ["line 2"]
    with pytest.raises(ApiError, match="service_not_found"):
        client.service_logs("nope")  # raised when called, not when iterated
    follow = client.service_logs("web", tail=0, follow=True)
    wait_for(lambda: view.followers == 1, message="following")
    server.run(view.emit("web", "new"))
    assert next(follow)["text"] == "new"
    follow.close()  # type: ignore[attr-defined]
    wait_for(lambda: view.followers == 0, message="the follower stopped")


@pytest.fixture
async def async_server(view: FakeView) -> AsyncIterator[TestServer]:
    server = TestServer(create_app(view), host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


async def test_async_client_service_calls(async_server: TestServer, view: FakeView) -> None:
    async with AsyncClient(f"127.0.0.1:{async_server.port}") as client:
        assert await client.services() == []
        assert (await client.service_put("web", WEB))["name"] == "web"
        assert (await client.service("web"))["replicas"]["desired"] == 2
        assert len(await client.service_replicas("web") or []) == 2
        assert await client.service_leader("web") == {"node": "n1", "term": 1}
        assert (await client.service_scale("web", 3))["replicas"]["desired"] == 3
        assert [r["name"] for r in await client.deploy(COMPOSE)] == ["web", "cache"]
        await view.emit("web", "one")
        await view.emit("web", "two")
        lines = [line["text"] async for line in client.service_logs("web", tail=5)]
        assert lines == ["one", "two"]
        follow = client.service_logs("web", tail=1, follow=True)
        assert (await anext(follow))["text"] == "two"
        await view.emit("web", "three")
        assert (await anext(follow))["text"] == "three"
        await follow.aclose()  # type: ignore[attr-defined]
        with pytest.raises(ApiError, match="service_not_found"):
            await anext(client.service_logs("nope"))
        assert await client.service_delete("web") is True
        assert await client.service("web") is None
        assert await client.member_remove("n3") is True
