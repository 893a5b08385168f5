"""Waits that keep a cancel.

On Python 3.11 ``asyncio.wait_for`` swallows a cancel that arrives in the same loop step as
its awaitable's completion: it returns the result instead (CPython gh-86296, fixed in 3.12).
A loop idling on ``wait_for(event.wait(), t)`` whose event is set just as a stopping service
cancels it goes on forever, and the stop waits for it forever. ``asyncio.timeout`` keeps the
cancel, so the project waits with it (a unit test keeps ``asyncio.wait_for`` out).
"""

from __future__ import annotations

import asyncio


async def woken(event: asyncio.Event, seconds: float) -> bool:
    """Wait until ``event`` is set, at most ``seconds``; whether it was set."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    return True
