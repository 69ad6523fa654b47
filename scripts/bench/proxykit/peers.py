"""The shared backend and the peer proxies, each a foreground process with its own config.

All of them listen on 127.0.0.1 only. nginx is given ``-p`` and ``-e`` so it
touches nothing under /etc or /var/log, and ``daemon off`` so the harness
owns the process. Each proxy gets one worker (one thread for HAProxy): it is
pinned to one core, and more workers would only contend for it.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from .procs import Procs, accepts, free_port, wait_until

__all__ = [
    "BIG_PATH",
    "SMALL_BODY",
    "Backend",
    "backend_template",
    "render_backend",
    "start_haproxy",
    "start_naive_proxy",
    "start_nginx_proxy",
]

SMALL_BODY = "hello\n"
BIG_PATH = "/big.bin"
BIG_BYTES = 64 * 1024 * 1024
START_S = 10.0

_TEMP_PATHS = """\
  client_body_temp_path {d}/client_body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
"""

# One server on two ports: ``http`` for the L7 proxies, ``raw`` for the L4 ones.
_BACKEND = """\
# The shared backend of scripts/bench/proxy.py; @HTTP@ and @RAW@ are its ports.
{user}worker_processes 1;
daemon off;
pid {d}/backend.pid;
error_log {d}/backend-error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
{temp}  default_type application/octet-stream;
  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  keepalive_timeout 300s;
  keepalive_requests 100000000;
  server {{
    listen 127.0.0.1:@HTTP@ backlog=4096;
    listen 127.0.0.1:@RAW@ backlog=4096;
    root {www};
    location = / {{ default_type text/plain; return 200 "{body}"; }}
    location = {big} {{ }}
  }}
}}
"""

_NGINX_PROXY = """\
{user}worker_processes 1;
daemon off;
pid {d}/proxy.pid;
error_log {d}/proxy-error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
{temp}  keepalive_timeout 300s;
  keepalive_requests 100000000;
  upstream backend {{
    server 127.0.0.1:{backend};
    keepalive 256;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_max_temp_file_size 0;
    }}
  }}
}}
"""

# The TCP proxy splices (HAProxy's zero-copy path): with its default 16 kB
# buffers it moves half the bulk MB/s. maxconn stays within the FD limit a
# splicing HAProxy asks for (two pipe FDs per connection besides the sockets).
_HAPROXY = """\
global
  nbthread 1
  maxconn 4000
defaults
  timeout connect 5s
  timeout client 120s
  timeout server 120s
listen tcp
  mode tcp
  option splice-request
  option splice-response
  bind 127.0.0.1:{tcp_port}
  server backend 127.0.0.1:{raw}
listen http
  mode http
  option http-keep-alive
  http-reuse always
  bind 127.0.0.1:{http_port}
  server backend 127.0.0.1:{http}
"""


def _user() -> str:
    # Workers of a root master drop to nobody, who could not read the temp dir.
    return "user root;\n" if os.geteuid() == 0 else ""


def _temp(d: Path) -> str:
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    return _TEMP_PATHS.format(d=d)


@dataclass(frozen=True, slots=True)
class Backend:
    """Where the shared backend listens on 127.0.0.1."""

    http: int
    raw: int


def backend_template(workdir: Path) -> Path:
    """Write the backend's files (config template with @HTTP@/@RAW@, big file)."""
    d = workdir / "backend"
    www = d / "www"
    www.mkdir(parents=True, exist_ok=True)
    big = www / BIG_PATH.lstrip("/")
    if not big.exists() or big.stat().st_size != BIG_BYTES:
        with open(big, "wb") as f:
            chunk = os.urandom(1024 * 1024)
            for _ in range(BIG_BYTES // len(chunk)):
                f.write(chunk)
    body = SMALL_BODY.replace("\n", "\\n")
    text = _BACKEND.format(user=_user(), d=d, temp=_temp(d), www=www, body=body, big=BIG_PATH)
    template = d / "nginx.conf.in"
    template.write_text(text)
    return template


def backend_command(template: Path, cpus: str, http: str, raw: str) -> str:
    """A shell command rendering the config with ports ``http``/``raw`` and exec'ing nginx.

    ``http`` and ``raw`` are shell words: numbers, or ``$MESHD_PORT_HTTP``
    when meshd's process driver runs it.
    """
    conf = template.with_suffix("")
    d = shlex.quote(str(template.parent))
    return (
        f'sed -e "s/@HTTP@/{http}/" -e "s/@RAW@/{raw}/" {shlex.quote(str(template))}'
        f" > {shlex.quote(str(conf))} && "
        f"exec taskset -c {cpus} nginx -p {d} -e {d}/backend-error.log -c {shlex.quote(str(conf))}"
    )


def render_backend(procs: Procs, template: Path, cpus: str) -> Backend:
    """Run the backend directly (without meshd) on two free ports."""
    ports = Backend(http=free_port(), raw=free_port())
    command = backend_command(template, cpus, str(ports.http), str(ports.raw))
    procs.start("backend", ["sh", "-c", command])
    wait_until(
        lambda: procs.check("backend") or (accepts(ports.http) and accepts(ports.raw)),
        START_S,
        "backend nginx listening",
    )
    return ports


def start_haproxy(procs: Procs, workdir: Path, backend: Backend, cpus: str) -> tuple[int, int]:
    """HAProxy with a ``mode tcp`` and a ``mode http`` proxy; returns (tcp, http) ports."""
    tcp_port, http_port = free_port(), free_port()
    cfg = workdir / "haproxy.cfg"
    cfg.write_text(
        _HAPROXY.format(tcp_port=tcp_port, http_port=http_port, raw=backend.raw, http=backend.http)
    )
    procs.start("haproxy", ["haproxy", "-db", "-f", str(cfg)], cpus=cpus)
    wait_until(
        lambda: procs.check("haproxy") or (accepts(tcp_port) and accepts(http_port)),
        START_S,
        "haproxy listening",
    )
    return tcp_port, http_port


def start_nginx_proxy(procs: Procs, workdir: Path, backend: Backend, cpus: str) -> int:
    """nginx ``proxy_pass`` with keep-alive to the backend; returns its port."""
    d = workdir / "nginx-proxy"
    d.mkdir(exist_ok=True)
    port = free_port()
    conf = d / "nginx.conf"
    conf.write_text(
        _NGINX_PROXY.format(user=_user(), d=d, temp=_temp(d), backend=backend.http, port=port)
    )
    argv = ["nginx", "-p", str(d), "-e", str(d / "proxy-error.log"), "-c", str(conf)]
    procs.start("nginx-proxy", argv, cpus=cpus)
    wait_until(
        lambda: procs.check("nginx-proxy") or accepts(port), START_S, "nginx proxy listening"
    )
    return port


def start_naive_proxy(procs: Procs, backend: Backend, cpus: str) -> int:
    """The aiohttp server-plus-client proxy (``scripts/bench/naive_proxy.py``): a yardstick."""
    port = free_port()
    script = Path(__file__).resolve().parents[1] / "naive_proxy.py"
    procs.start(
        "naive-proxy", [sys.executable, str(script), str(port), str(backend.http)], cpus=cpus
    )
    wait_until(
        lambda: procs.check("naive-proxy") or accepts(port), START_S, "naive proxy listening"
    )
    return port
