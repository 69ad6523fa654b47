"""Removing a member from the cluster's lease voter set.

The lease needs a strict majority of the configured voters, so a small
cluster that lost a node for good schedules nothing until an operator
removes the dead node (``meshd members remove NODE``). The agent refuses to
remove a member it sees alive: a live member removed on one side of a
partition could help form a second majority.
"""

from __future__ import annotations

from aiohttp import web

from meshd.api.appkeys import VIEW
from meshd.api.errors import Problem, json_response, shorten
from meshd.api.parsing import query
from meshd.api.services import write_errors
from meshd.config import check_name

__all__ = ["routes"]


async def remove_member(request: web.Request) -> web.Response:
    query(request)
    node = request.match_info["node"]
    try:
        check_name(node)
    except ValueError as exc:
        raise Problem(400, "bad_name", str(exc)) from None
    if not await write_errors(request.app[VIEW].member_remove(node)):
        raise Problem(404, "member_not_found", f"no member {shorten(node)}")
    return json_response({"node": node, "removed": True})


def routes() -> list[web.RouteDef]:
    return [web.delete("/v1/members/{node}", remove_member)]
