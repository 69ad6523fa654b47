"""Serving the API on a TCP address, with the one safety rule binding needs.

The API can change the cluster's state, so it answers on loopback by
default. Listening on every interface without a token would hand that power
to anyone on the network: ``serve`` refuses it outright.
"""

from __future__ import annotations

import ipaddress
import logging

from aiohttp import web

from meshd.api.appkeys import STATE

__all__ = ["ServeError", "is_loopback", "is_wildcard", "serve"]

log = logging.getLogger("meshd.api")


class ServeError(ValueError):
    """The API can't be served as asked; the message says why, in one line.

    A ValueError, like the other bad-configuration errors the agent reports
    as one line at start-up.
    """


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def is_wildcard(host: str | None) -> bool:
    """True for an address that means every interface (0.0.0.0, ::, empty)."""
    if host is None or host.strip() in ("", "*"):
        return True
    ip = _ip(host)
    return ip is not None and ip.is_unspecified


def is_loopback(host: str) -> bool:
    ip = _ip(host)
    return host == "localhost" if ip is None else ip.is_loopback


def _hostport(host: str | None, port: int) -> str:
    host = host or "*"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve(
    app: web.Application,
    host: str,
    port: int,
    *,
    access_log: logging.Logger | None = None,
    shutdown_timeout: float = 3.0,
) -> web.AppRunner:
    """Serve app on host:port; the caller keeps the runner and calls ``cleanup()``.

    ``runner.addresses`` gives the bound address (useful with port 0).
    Raises ServeError for a wildcard address without a token, or when the
    address can't be bound.
    """
    where = _hostport(host, port)
    token = app[STATE].token
    if is_wildcard(host) and token is None:
        raise ServeError(
            f"refusing to serve the API on every interface ({where}) without a token: "
            "anyone on the network could change the cluster's state; "
            "set an API token or serve it on 127.0.0.1"
        )
    if token is None and not is_loopback(host):
        log.warning(
            "serving the API on %s without a token: anyone who can reach it has full control", where
        )
    runner = web.AppRunner(
        app, access_log=access_log, handle_signals=False, shutdown_timeout=shutdown_timeout
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        reason = exc.strerror or str(exc)
        raise ServeError(f"cannot serve the API on {where}: {reason}") from None
    return runner
