"""Retry strategies for :class:`~libs.common.errors.TransientError` and connection errors."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import asyncpg
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError

from libs.common.errors import TransientError
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

RETRYABLE: tuple[type[BaseException], ...] = (
    TransientError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
    KafkaConnectionError,
    KafkaTimeoutError,
)


async def retry(
    operation: Callable[[], Awaitable[T]],
    *,
    name: str,
    service: str,
    strategy: Backoff = FOREVER,
    retry_on: tuple[type[BaseException], ...] = RETRYABLE,
) -> T:
    """Run ``operation``, retrying on ``retry_on`` per ``strategy``; the last error propagates."""
    delays = strategy.delays()
    while True:
        try:
            return await operation()
        except retry_on as exc:
            delay = next(delays, None)
            if delay is None:
                raise
            TRANSIENT_RETRIES.labels(service, name).inc()
            log.warning("transient_error_retry", operation=name, error=repr(exc), delay=delay)
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
