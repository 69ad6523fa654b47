"""The meshd command as a user runs it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gossip.crypto import Keyring

MESHD = [sys.executable, "-c", "import sys; from meshd.cli import main; sys.exit(main())"]


def run(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MESHD, *args], capture_output=True, text=True, timeout=timeout)


def test_keygen_prints_a_usable_key() -> None:
    out = run("keygen")
    assert out.returncode == 0
    assert len(Keyring.decode_key(out.stdout)) == 32


@pytest.mark.parametrize(
    "args",
    [["agent", "--bogus"], ["agent", "--bind", "1.2.3.4:99999"], ["nope"]],
)
def test_bad_arguments_give_one_line_and_nonzero_exit(args: list[str], tmp_path: Path) -> None:
    out = run(*args, "--data-dir", str(tmp_path)) if args[0] == "agent" else run(*args)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("meshd: error:")


class Output:
    """Collects a process's stderr in a thread so tests can wait on it."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.text = ""
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._pump, args=(proc,), daemon=True)
        self._thread.start()

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            with self._lock:
                self.text += line

    def wait_for(self, needle: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if needle in self.text:
                    return self.text
            time.sleep(0.02)
        raise AssertionError(f"{needle!r} not seen; output so far:\n{self.text}")


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def client(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return run(*args[:1], "--addr", f"127.0.0.1:{port}", *args[1:])


@pytest.mark.integration
def test_two_agents_form_a_cluster_answer_the_cli_and_leave(tmp_path: Path) -> None:
    gossip_a, api_a, api_b = free_port("127.0.0.1"), free_port("127.0.0.1"), free_port("127.0.0.2")
    common = ["--profile", "local", "--no-mdns", "--cluster", f"t{os.getpid()}"]
    a = subprocess.Popen(
        [
            *MESHD,
            "agent",
            "--node",
            "a",
            "--bind",
            f"127.0.0.1:{gossip_a}",
            "--api",
            f"127.0.0.1:{api_a}",
            "--data-dir",
            str(tmp_path / "a"),
            *common,
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    b = None
    try:
        Output(a).wait_for("node a", 15)
        b = subprocess.Popen(
            [
                *MESHD,
                "agent",
                "--node",
                "b",
                "--bind",
                "127.0.0.2:0",
                "--api",
                f"127.0.0.1:{api_b}",
                "--join",
                f"127.0.0.1:{gossip_a}",
                "--data-dir",
                str(tmp_path / "b"),
                *common,
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        b_out = Output(b)
        b_out.wait_for("member a join", 15)

        members = json.loads(client(api_a, "members", "--json").stdout)
        assert {m["name"]: m["status"] for m in members} == {"a": "alive", "b": "alive"}
        table = client(api_a, "members").stdout
        assert table.splitlines()[0].split()[:3] == ["NAME", "ADDRESS", "STATUS"]
        assert client(api_a, "kv", "put", "app/x", "hello").returncode == 0
        deadline = time.monotonic() + 10
        while client(api_b, "kv", "get", "app/x").stdout != "hello":
            assert time.monotonic() < deadline, "write did not reach b"
            time.sleep(0.05)
        assert client(api_b, "kv", "list", "app/").stdout.split() == ["app/x"]
        assert client(api_b, "kv", "delete", "app/x").returncode == 0
        assert client(api_b, "kv", "get", "app/x").returncode == 1
        assert json.loads(client(api_a, "info", "--json").stdout)["name"] == "a"

        a.send_signal(signal.SIGTERM)
        assert a.wait(10) == 0
        b_out.wait_for("member a leave", 10)
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(10)


def test_cli_explains_an_unreachable_agent() -> None:
    out = client(free_port("127.0.0.1"), "members")
    assert out.returncode == 1
    assert "cannot reach the meshd agent" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.integration
@pytest.mark.parametrize("which", ["gossip", "api"])
def test_port_in_use_is_one_clear_line(which: str, tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
        udp.bind(("127.0.0.1", 0))
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        gossip = udp.getsockname()[1] if which == "gossip" else free_port("127.0.0.1")
        api = tcp.getsockname()[1] if which == "api" else free_port("127.0.0.1")
        out = run(
            "agent",
            "--node",
            "z",
            "--bind",
            f"127.0.0.1:{gossip}",
            "--api",
            f"127.0.0.1:{api}",
            "--data-dir",
            str(tmp_path),
            "--no-mdns",
        )
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("meshd: error:") and "in use" in last.lower()
    assert "Traceback" not in out.stderr


def test_unreadable_state_database_is_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "state.db").write_bytes(b"not a database at all" * 100)
    out = run(
        "agent",
        "--node",
        "z",
        "--bind",
        f"127.0.0.1:{free_port('127.0.0.1')}",
        "--api",
        f"127.0.0.1:{free_port('127.0.0.1')}",
        "--data-dir",
        str(tmp_path),
        "--no-mdns",
    )
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("meshd: error: state database") and "Traceback" not in out.stderr
