"""Retrying what is transient (:func:`libs.common.errors.classify`): one call, or a whole loop."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from libs.common.errors import is_transient
from libs.common.logging import get_logger
from libs.common.metrics import TRANSIENT_RETRIES

T = TypeVar("T")
log = get_logger(__name__)


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter; ``attempts=None`` retries until cancelled."""

    initial: float = 0.1
    maximum: float = 10.0
    multiplier: float = 2.0
    attempts: int | None = 8

    def delays(self) -> Iterator[float]:
        delay = self.initial
        n = 0
        while self.attempts is None or n < self.attempts:
            yield random.uniform(0, delay)
            delay = min(self.maximum, delay * self.multiplier)
            n += 1


#: for a consumer's database write: wait as long as it takes, the offset is not committed.
FOREVER = Backoff(initial=0.2, maximum=30.0, attempts=None)
#: for a request-scoped call: give up after a few seconds and answer 503.
BRIEF = Backoff(initial=0.05, maximum=1.0, attempts=5)
#: for a loop that lost its dependency: try again soon, then every few seconds.
RECONNECT = Backoff(initial=0.5, maximum=15.0, attempts=None)


async def retry(
    operation: Callable[[], Awaitable[T]],
    *,
    name: str,
    service: str,
    strategy: Backoff = FOREVER,
    waiting: Callable[[], None] | None = None,
) -> T:
    """Run ``operation``, retrying what :func:`~libs.common.errors.classify` calls transient
    per ``strategy``; anything else, and the last transient error, propagates. ``waiting``
    is called before each wait (a consumer stays healthy while it waits on purpose)."""
    delays = strategy.delays()
    while True:
        try:
            return await operation()
        except Exception as exc:
            if not is_transient(exc):
                raise
            delay = next(delays, None)
            if delay is None:
                raise
            TRANSIENT_RETRIES.labels(service, name).inc()
            log.warning("transient_error_retry", operation=name, error=repr(exc), delay=delay)
            if waiting is not None:
                waiting()
            await asyncio.sleep(delay)


#: a supervised loop that ran this long before failing starts over from the first delay.
SETTLED_SECONDS = 60.0


async def supervise(
    loop: Callable[[], Awaitable[None]],
    *,
    name: str,
    service: str,
    strategy: Backoff = RECONNECT,
) -> None:
    """Run a long-lived ``loop`` (a relay, a lock holder, a job runner) and start it again
    after a transient error, with backoff, for as long as it takes: a dependency's restart
    is weather. A loop that returns is done; a bug (anything else) propagates and stops the
    service. The loop must resume from committed state: what it had not committed is
    simply redone."""
    delays = strategy.delays()
    while True:
        started = time.monotonic()
        try:
            await loop()
            return
        except Exception as exc:
            if not is_transient(exc):
                raise
            if time.monotonic() - started > SETTLED_SECONDS:
                delays = strategy.delays()
            delay = next(delays)
            TRANSIENT_RETRIES.labels(service, name).inc()
            log.warning("loop_restarting", loop=name, error=repr(exc), delay=round(delay, 2))
            await asyncio.sleep(delay)


async def every(
    seconds: float,
    operation: Callable[[], Awaitable[object]],
    *,
    name: str,
    service: str,
    first_now: bool = False,
) -> None:
    """Run ``operation`` every ``seconds`` for ever (periodic upkeep), each run retried on
    transient errors; the first run at once when ``first_now``, else one interval after the
    start (nothing is urgent, and a restarting replica should not add load)."""
    if not first_now:
        await asyncio.sleep(seconds)
    while True:
        await retry(operation, name=name, service=service)
        await asyncio.sleep(seconds)
