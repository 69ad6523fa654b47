"""Small asyncio helpers shared by the agent's loops."""

from __future__ import annotations

import asyncio

__all__ = ["wait_event"]


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until ``event`` is set or ``timeout`` passes; True if it was set.

    Not ``asyncio.wait_for`` under ``suppress(TimeoutError)``: on Python 3.11
    a cancellation that lands as the timeout fires can come out of
    ``wait_for`` as a TimeoutError, which that pattern swallows, and the
    loop around it then never stops. ``asyncio.timeout`` tells the two apart.
    """
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True
