"""Reaching services by name through one in-process agent: mesh proxy, DNS and env.

Process-driver replicas on loopback: the proxy listens on the service port,
the DNS server answers ``web.mesh`` and SRV records, and replicas started
later see ``WEB_SERVICE_HOST`` / ``WEB_SERVICE_PORT``.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import dns.asyncquery
import dns.message
import dns.rdatatype
import pytest
from conftest import agent_running, async_wait_for, loopback_agent_argv

from meshd.agent import Agent, StartError
from meshd.config import DEFAULT_DNS, load_config
from meshd.spec import ServiceSpec

pytestmark = pytest.mark.integration

HOST = "127.0.0.73"

SERVER = r"""
import http.server, os
rid = os.environ["MESHD_REPLICA"].encode()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = rid + b" " + self.headers.get("X-Forwarded-For", "").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer((os.environ["MESHD_ADDRESS"], int(os.environ["MESHD_PORT_HTTP"])), H).serve_forever()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The agent's DNS on its own address; names outside the mesh go nowhere.
DNS_FLAGS = ("--dns", f"{HOST}:0", "--dns-upstream", "127.0.0.1:9")


def running(tmp: Path) -> contextlib.AbstractAsyncContextManager[Agent]:
    return agent_running(agent_config(tmp, *DNS_FLAGS))


def web(service_port: int, replicas: int = 3, **extra: Any) -> ServiceSpec:
    return ServiceSpec.from_dict(
        {
            "name": "web",
            "command": [sys.executable, "-c", SERVER],
            "replicas": replicas,
            "ports": [
                {"name": "http", "target": 8080, "protocol": "http", "service_port": service_port}
            ],
            "health": {"http": "/", "port": "http", "interval": "1s"},
            **extra,
        }
    )


def endpoint_ids(agent: Agent) -> set[str]:
    got = agent.service_endpoints("web") or {}
    return {e["id"] for e in got.get("endpoints", [])}


async def get_all(url: str, n: int) -> collections.Counter[str]:
    seen: collections.Counter[str] = collections.Counter()
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            async with session.get(url) as resp:
                assert resp.status == 200
                seen[(await resp.text()).split()[0]] += 1
    return seen


async def test_service_port_spreads_requests_and_follows_scaling(tmp_path: Path) -> None:
    port = free_port()
    async with running(tmp_path) as agent:
        await agent.service_put(web(port))
        await async_wait_for(lambda: len(endpoint_ids(agent)) == 3, 20)
        listeners = agent.service_endpoints("web")["listeners"]
        assert listeners[0]["service_port"] == port
        assert set(listeners[0]["addresses"]) >= {HOST, "127.0.0.1"}

        seen = await get_all(f"http://127.0.0.1:{port}/", 30)
        assert set(seen) == endpoint_ids(agent)
        assert sorted(seen.values()) == [10, 10, 10]  # round robin

        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://{HOST}:{port}/") as resp,
        ):
            assert (await resp.text()).split()[1] == "127.0.0.1"  # X-Forwarded-For: the client

        await agent.service_scale("web", 1)
        await async_wait_for(lambda: len(endpoint_ids(agent)) == 1, 20)
        seen = await get_all(f"http://127.0.0.1:{port}/", 5)
        assert set(seen) == endpoint_ids(agent)

        await agent.service_delete("web")
        await async_wait_for(lambda: agent.service_endpoints("web") is None, 20)
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            pass


async def query(agent: Agent, name: str, rdtype: str) -> dns.message.Message:
    assert agent.traffic is not None and agent.traffic.dns is not None
    host, dns_port = agent.traffic.dns.addresses[0]
    q = dns.message.make_query(name, rdtype)
    return await dns.asyncquery.udp(q, host, port=dns_port, timeout=2)


async def test_dns_answers_the_local_proxy_and_srv_replicas(tmp_path: Path) -> None:
    port = free_port()
    async with running(tmp_path) as agent:
        await agent.service_put(web(port, replicas=2))
        await async_wait_for(lambda: len(endpoint_ids(agent)) == 2, 20)

        a = await query(agent, "web.mesh.", "A")
        assert [r.address for rr in a.answer for r in rr] == [HOST]

        srv = await query(agent, "_http._tcp.web.mesh.", "SRV")
        records = [r for rr in srv.answer for r in rr]
        host_ports = {
            p for e in agent.service_endpoints("web")["endpoints"] for p in e["ports"].values()
        }
        assert {r.port for r in records} == host_ports
        assert {str(r.target) for r in records} == {"solo.node.mesh."}

        missing = await query(agent, "nope.mesh.", "A")
        assert missing.rcode() == dns.rcode.NXDOMAIN

        # The name answered is where the proxy listens: a request by name works.
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://{HOST}:{port}/") as resp,
        ):
            assert resp.status == 200


async def test_new_replicas_get_service_variables(tmp_path: Path) -> None:
    port = free_port()
    async with running(tmp_path) as agent:
        await agent.service_put(web(port, replicas=1))
        await async_wait_for(lambda: len(endpoint_ids(agent)) == 1, 20)
        probe = ServiceSpec.from_dict(
            {
                "name": "probe",
                "command": [
                    "sh",
                    "-c",
                    'echo "at $WEB_SERVICE_HOST:$WEB_SERVICE_PORT_HTTP"; exec sleep 60',
                ],
            }
        )
        await agent.service_put(probe)

        async def printed() -> bool:
            lines = [line async for line in agent.service_logs("probe", tail=10, follow=False)]
            return any(f"at 127.0.0.1:{port}" in str(line) for line in lines)

        await async_wait_for(printed, 20)


async def test_tcp_port_forwards_connections(tmp_path: Path) -> None:
    port = free_port()
    async with running(tmp_path) as agent:
        spec = web(port, replicas=2).to_dict()
        spec["ports"][0]["protocol"] = "tcp"
        await agent.service_put(ServiceSpec.from_dict(spec))
        await async_wait_for(lambda: len(endpoint_ids(agent)) == 2, 20)
        seen = collections.Counter()
        for _ in range(6):  # a new connection per request: round robin per connection
            url = f"http://127.0.0.1:{port}/"
            async with aiohttp.ClientSession() as session, session.get(url) as resp:
                body = (await resp.text()).split()
                seen[body[0]] += 1
                assert len(body) == 1  # L4 adds no X-Forwarded-For
        assert sorted(seen.values()) == [3, 3]


def agent_config(tmp: Path, *more: str) -> Any:
    argv = loopback_agent_argv(tmp, host=HOST, node="solo", driver="process", more=more)
    return load_config(argv, {})


async def test_a_taken_dns_address_fails_the_start_only_when_chosen(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((HOST, 0))
        port = taken.getsockname()[1]
        agent = Agent(agent_config(tmp_path, "--dns", f"{HOST}:{port}"))
        with pytest.raises(StartError, match=f"--dns {HOST}:{port}"):
            await agent.start()

    # At the default address a clash (a second agent on this host) costs the
    # DNS listener only: the agent starts and says so.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        with contextlib.suppress(OSError):  # taken by something else: the same case
            holder.bind(DEFAULT_DNS)
        async with agent_running(agent_config(tmp_path)) as agent:
            assert agent.traffic is not None and agent.traffic.dns is None
