"""The sender's batches waiting out a database outage tell their consumer they still work
(libs/common/kafka.still_working), so /healthz does not have the sender restarted for it."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import asyncpg

from libs.common import kafka
from services.sender.ledger import Ledger, OwnerLock


class AwayPool:
    """A pool whose database is starting up."""

    def acquire(self) -> Any:
        raise asyncpg.CannotConnectNowError("the database system is starting up")


async def _kept_alive(wait: Any) -> asyncio.Task[None]:
    """``wait()`` run as a batch of a consumer; returns once the consumer was told twice."""
    consumer = SimpleNamespace(last_progress=0.0)
    told: list[float] = []
    token = kafka._HANDLING.set(consumer)  # type: ignore[arg-type]
    try:
        task = asyncio.ensure_future(wait())  # copies this context: the batch's consumer
    finally:
        kafka._HANDLING.reset(token)
    async with asyncio.timeout(10):
        while len(told) < 2:
            await asyncio.sleep(0.01)
            if consumer.last_progress not in (0.0, *told):
                told.append(consumer.last_progress)
    return task


async def test_a_batch_waiting_for_the_owner_lock_still_works() -> None:
    lock = OwnerLock("postgresql://unused", "sender")
    waiting = await _kept_alive(lambda: lock.wait_held(keepalive=0.01))
    assert not waiting.done()
    lock.held.set()
    await waiting


async def test_a_batch_waiting_for_its_flush_still_works() -> None:
    ledger = Ledger(AwayPool(), "sender", None, None)  # type: ignore[arg-type]
    flushing = await _kept_alive(ledger.flush)
    flushing.cancel()
    await asyncio.gather(flushing, return_exceptions=True)
