"""A container reaches another service by name on the real engine.

One agent with the docker driver: containers get the agent's DNS (on the
docker bridge's gateway, port 53) as resolver with ``mesh`` as search
domain, and the routing mesh serves ``web``'s service port on that address,
so ``wget http://web/`` inside a container reaches a replica of ``web``.
"""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_IMAGE, agent_running, async_wait_for, loopback_agent_argv

from meshd.agent import Agent
from meshd.config import load_config
from meshd.spec import ServiceSpec

pytestmark = [pytest.mark.docker, pytest.mark.integration]

HOST = "127.0.0.74"
PAGE = (
    "mkdir -p /www && echo hello from $MESHD_REPLICA > /www/index.html && "
    "exec httpd -f -p 80 -h /www"
)
# Debian's static busybox crashes in wget (static glibc without NSS) and its
# nc does not resolve names, so the caller resolves with busybox's own
# resolver, as any libc would, then speaks HTTP over nc.
CALLER = (
    "while true; do "
    "ip=$(nslookup web | awk '/^Address: /{print $2}' | tail -n 1); "
    'echo "resolved web to $ip"; '
    'printf "GET / HTTP/1.1\\r\\nHost: web\\r\\nConnection: close\\r\\n\\r\\n" '
    '| nc -w 2 "$ip" 80; '
    'echo "env $WEB_SERVICE_HOST:$WEB_SERVICE_PORT"; '
    "sleep 0.2; done"
)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def running(tmp: Path) -> contextlib.AbstractAsyncContextManager[Agent]:
    dns = ("--dns", f"{HOST}:0", "--dns-upstream", "127.0.0.1:9")  # nothing leaves the host
    argv = loopback_agent_argv(tmp, host=HOST, node="dock", driver="docker", more=dns)
    return agent_running(load_config(argv, {}))


def service(name: str, script: str, **kw: Any) -> ServiceSpec:
    data: dict[str, Any] = {
        "name": name,
        "image": TEST_IMAGE,
        "args": ["sh", "-c", script],
        "resources": {"cpu": 0.1, "memory": "32Mi"},
    }
    data.update(kw)
    return ServiceSpec.from_dict(data)


async def log_text(agent: Agent, name: str) -> str:
    lines = [str(line) async for line in agent.service_logs(name, tail=200, follow=False)]
    return "\n".join(lines)


async def test_container_calls_another_service_by_name(tmp_path: Path) -> None:
    if not port_free(80):
        pytest.skip("port 80 is taken on this host: the mesh cannot serve http://web/")
    async with running(tmp_path) as agent:
        assert agent.traffic is not None
        gateway = agent.traffic.host_address
        assert gateway, "the engine's bridge has a gateway address"
        dns = agent.traffic.container_dns
        assert dns is not None and dns.addresses == [(gateway, 53)], "DNS for containers"

        web = service(
            "web",
            PAGE,
            replicas=2,
            ports=[{"name": "http", "target": 80, "protocol": "http", "service_port": 80}],
            health={"http": "/", "port": "http", "interval": "1s", "retries": 2},
        )
        await agent.service_put(web)
        await async_wait_for(
            lambda: len((agent.service_endpoints("web") or {}).get("endpoints", [])) == 2, 60
        )
        await agent.service_put(service("caller", CALLER))

        async def answered() -> str:
            text = await log_text(agent, "caller")
            return text if "hello from" in text else ""

        text = await async_wait_for(answered, 60)
        assert f"resolved web to {gateway}" in text
        ids = {e["id"] for e in agent.service_endpoints("web")["endpoints"]}
        assert any(rid in text for rid in ids)
        assert f"env {gateway}:80" in text
