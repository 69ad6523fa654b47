"""The meshd command as a user runs it."""

from __future__ import annotations

import signal
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


@pytest.mark.integration
def test_two_agents_form_a_cluster_and_leave_on_sigterm(tmp_path: Path) -> None:
    common = ["--data-dir", str(tmp_path), "--profile", "local"]
    a = subprocess.Popen(
        [*MESHD, "agent", "--node", "a", "--bind", "127.0.0.1:0", *common],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        a_out = Output(a)
        out = a_out.wait_for("node a on 127.0.0.1:", 15)
        port = out.split("node a on 127.0.0.1:")[1].split(",")[0]
        b = subprocess.Popen(
            [
                *MESHD,
                "agent",
                "--node",
                "b",
                "--bind",
                "127.0.0.2:0",
                "--join",
                f"127.0.0.1:{port}",
                *common,
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            b_out = Output(b)
            b_out.wait_for("member a join", 15)
            a.send_signal(signal.SIGTERM)
            assert a.wait(10) == 0
            b_out.wait_for("member a leave", 10)
        finally:
            b.send_signal(signal.SIGTERM)
            assert b.wait(10) == 0
    finally:
        if a.poll() is None:
            a.kill()
