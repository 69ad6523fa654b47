#!/usr/bin/env python3
"""The naive L7 proxy the issue warns about: an aiohttp server plus an aiohttp client.

Kept only as a yardstick for ``scripts/bench/proxy.py``: each request is
read by an aiohttp server, re-sent with a pooled ``ClientSession`` and its
response copied back. ``python naive_proxy.py LISTEN_PORT UPSTREAM_PORT``
serves on 127.0.0.1 until killed.
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
import uvloop
from aiohttp import web

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


async def main(listen: int, upstream: int) -> None:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=0), auto_decompress=False
    )
    base = f"http://127.0.0.1:{upstream}"

    async def forward(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        headers["X-Forwarded-For"] = request.remote or ""
        body = await request.read()
        async with session.request(
            request.method, base + request.rel_url.raw_path_qs, headers=headers, data=body or None
        ) as resp:
            data = await resp.read()
            out = {k: v for k, v in resp.headers.items() if k.lower() not in HOP}
            return web.Response(status=resp.status, headers=out, body=data)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", listen, backlog=1024).start()
    try:
        while True:
            await asyncio.sleep(3600)
    finally:
        await session.close()
        await runner.cleanup()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
