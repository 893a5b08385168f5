"""The bounce processor's mail loop waiting out a database outage (no database needed)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import asyncpg

from libs.common.metrics import sample_value
from services.bounce_processor import agents


class AwayPool:
    """A pool whose database is starting up."""

    def acquire(self) -> Any:
        raise asyncpg.CannotConnectNowError("the database system is starting up")


def retries() -> float:
    labels = {"service": "bounce_processor", "operation": "process_inbound"}
    return sample_value("tayori_transient_retries_total", labels) or 0


async def test_the_mail_loop_beats_while_it_waits_for_the_database() -> None:
    """Waiting for the database is the loop's work while it is away: it beats before each
    wait, so /healthz (a loop silent for 60 s is stalled) does not have the service
    restarted for an outage; /readyz says the database is missing."""
    ctx: Any = SimpleNamespace(
        pool=AwayPool(),
        settings=SimpleNamespace(service="bounce_processor", batch=10),
        mail_arrived=asyncio.Event(),
    )
    before = retries()
    beats: list[float] = []
    waited = asyncio.Event()

    def beat() -> None:
        beats.append(1)
        if len(beats) >= 3:  # the first round's, then one before each of two waits
            waited.set()

    loop = asyncio.ensure_future(agents.inbound_loop(ctx, beat))
    try:
        async with asyncio.timeout(10):  # the first two waits take 0.6 s at most
            await waited.wait()
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
    assert retries() >= before + 2
