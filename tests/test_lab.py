"""The lab itself: hosts reach each other, and faults do what they say."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, lab_prefix, wait_for
from labhosts import Lab

pytestmark = pytest.mark.lab

LAB_HOSTS = 3
PORT = 7946

# Echoes datagrams until idle for a while, so a forgotten server ends by itself.
ECHO_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(120)
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(data, peer)
"""

# Sends numbered probes and prints how many distinct ones came back.
PROBE_CLIENT = """
import json, socket, sys
dst, port, count, wait = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(wait)
got = set()
for k in range(count):
    s.sendto(str(k).encode(), (dst, port))
    try:
        while True:
            data, _ = s.recvfrom(2048)
            got.add(int(data))
            if int(data) == k:
                break
    except socket.timeout:
        pass
print(json.dumps(len(got)))
"""


@pytest.fixture(scope="module")
def echo(lab: Lab):
    """An echo server on every host, at its lab address."""
    procs = []
    for i in lab.hosts:
        proc = lab.popen(
            i,
            [sys.executable, "-c", ECHO_SERVER, lab.addr(i), str(PORT)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready", f"echo server on host {i} failed"
        procs.append(proc)
    yield
    for proc in procs:
        proc.kill()
        proc.wait()


@pytest.fixture(autouse=True)
def _clean_faults(lab: Lab):
    yield
    lab.heal()
    for i in lab.hosts:
        lab.set_loss(i, 0)


def replies(lab: Lab, src: int, dst: int, count: int = 5, wait: float = 0.2) -> int:
    """How many of count UDP probes from host src got an echo back from host dst."""
    res = lab.run(
        src,
        [sys.executable, "-c", PROBE_CLIENT, lab.addr(dst), str(PORT), str(count), str(wait)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(res.stdout)


def in_netns(pid: int, ns: str) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{ns}").st_ino
    except OSError:
        return False


def is_dockerd(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "dockerd"
    except OSError:
        return False


def test_hosts_have_their_addresses(lab: Lab) -> None:
    for i in lab.hosts:
        out = lab.run(i, ["ip", "-br", "addr", "show", "eth0"], capture_output=True, text=True)
        assert f"{lab.addr(i)}/24" in out.stdout
        routes = lab.run(i, ["ip", "route"], capture_output=True, text=True).stdout
        assert "224.0.0.0/4 dev eth0" in routes


def test_udp_reaches_another_host(lab: Lab, echo: None) -> None:
    wait_for(lambda: replies(lab, 1, 2) == 5, timeout=10, message="all probes 1->2 answered")


def test_partition_blocks_and_heal_restores(lab: Lab, echo: None) -> None:
    wait_for(lambda: replies(lab, 1, 2) > 0, timeout=10, message="1->2 before the partition")
    lab.partition(1, 2)
    assert replies(lab, 1, 2) == 0
    assert replies(lab, 2, 1) == 0
    # Only that pair is cut: host 3 still talks to both.
    assert replies(lab, 3, 1) > 0
    assert replies(lab, 3, 2) > 0
    lab.heal()
    wait_for(lambda: replies(lab, 1, 2) > 0, timeout=10, message="1->2 after heal")


def test_heal_one_host_keeps_other_partitions(lab: Lab, echo: None) -> None:
    lab.split([1], [2, 3])
    assert lab.faults(1)["partitioned_from"] == [lab.addr(2), lab.addr(3)]
    lab.heal(3)
    assert lab.faults(1)["partitioned_from"] == [lab.addr(2)]
    assert lab.faults(3)["partitioned_from"] == []
    wait_for(lambda: replies(lab, 1, 3) > 0, timeout=10, message="1->3 after heal(3)")
    assert replies(lab, 1, 2) == 0


def test_full_loss_drops_udp(lab: Lab, echo: None) -> None:
    wait_for(lambda: replies(lab, 1, 2) > 0, timeout=10, message="1->2 before loss")
    lab.set_loss(2, 1.0)
    assert lab.faults(2)["loss"] == 1.0
    assert replies(lab, 1, 2) == 0
    lab.set_loss(2, 0)
    assert lab.faults(2)["loss"] == 0.0
    wait_for(lambda: replies(lab, 1, 2) == 5, timeout=10, message="1->2 after loss removed")


def test_partial_loss_drops_some(lab: Lab, echo: None) -> None:
    lab.set_loss(2, 0.5)
    got = replies(lab, 1, 2, count=60, wait=0.05)
    # Binomial(60, 0.5): outside 10..50 has odds below one in a million.
    assert 10 <= got <= 50


def test_bad_loss_probability_is_refused(lab: Lab) -> None:
    with pytest.raises(RuntimeError, match=r"within 0\.\.1"):
        lab.set_loss(1, 1.5)


def test_down_stops_what_runs_inside(make_lab) -> None:
    small = make_lab(1)
    ns = small.ns(1)
    ours = small.popen(1, ["sleep", "600"])
    # Started behind the lab's back: down still finds it by its namespace.
    stray = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "600"])
    wait_for(lambda: in_netns(stray.pid, ns), timeout=5, message="stray in the lab")
    small.down()
    assert ours.wait(timeout=10) == -signal.SIGTERM
    assert stray.wait(timeout=10) == -signal.SIGTERM
    assert not Path(f"/run/netns/{ns}").exists()
    assert not small.state_dir.exists()


def test_command_line(tmp_path: Path) -> None:
    prefix = lab_prefix()
    lab_cmd = [str(REPO / "scripts" / "lab")]

    def run(*args: str) -> str:
        res = subprocess.run(
            [*lab_cmd, *args], capture_output=True, text=True, timeout=60, env=dict(os.environ)
        )
        assert res.returncode == 0, res.stderr
        return res.stdout

    try:
        assert "2 hosts" in run("up", "2", "--prefix", prefix, "--subnet", "10.78.5")
        assert run("addr", "--prefix", prefix, "2").strip() == "10.78.5.2"
        assert "10.78.5.1/24" in run("exec", "--prefix", prefix, "1", "--", "ip", "-br", "addr")
        run("loss", "--prefix", prefix, "1", "0.25")
        run("partition", "--prefix", prefix, "1", "2")
        status = run("status", "--prefix", prefix)
        assert "udp-loss=0.25" in status
        assert "cut-from=10.78.5.2" in status
        run("heal", "--prefix", prefix)
        assert "cut-from" not in run("status", "--prefix", prefix)
    finally:
        run("down", "--prefix", prefix)
    assert not Path(f"/run/netns/{prefix}-h1").exists()
    res = subprocess.run(
        [*lab_cmd, "exec", "--prefix", prefix, "1", "--", "true"], capture_output=True, text=True
    )
    assert res.returncode == 1
    assert "no lab" in res.stderr


@pytest.mark.docker
@pytest.mark.slow
def test_docker_engine_per_host(make_lab) -> None:
    two = make_lab(2, docker=True)
    docker1 = ["docker", "-H", two.docker_host(1)]
    subprocess.run(
        [*docker1, "run", "-d", "--network", "host", "meshd-test/busybox:latest",
         "httpd", "-f", "-p", f"{two.addr(1)}:8080", "-h", "/www"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    fetch = (
        "import sys, urllib.request;"
        "print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())"
    )

    def served() -> bool:
        res = two.run(
            2,
            [sys.executable, "-c", fetch, f"http://{two.addr(1)}:8080/"],
            capture_output=True,
            text=True,
        )
        return "meshd test image" in res.stdout

    wait_for(served, timeout=20, message="httpd on host 1's engine answering host 2")
    # Host 2's engine is a different one: it sees no containers.
    ps = subprocess.run(
        ["docker", "-H", two.docker_host(2), "ps", "-q"], capture_output=True, text=True, check=True
    )
    assert ps.stdout.strip() == ""
    pids = list(two.state.dockerd.values())
    two.down()
    assert not any(is_dockerd(p) for p in pids)
