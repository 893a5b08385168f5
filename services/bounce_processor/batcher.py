"""Group commit for request handlers: many callers, one transaction, each waits for it.

An SMTP ``DATA`` or a tracking hit must be durable before it is acknowledged (a 250 for a
bounce, the pixel for an open), but one transaction per request would make the commit —
a WAL flush — the ceiling of the whole service. :class:`GroupWriter` queues the items of
concurrent callers and writes whatever has gathered in one transaction while the previous
one commits; each caller's ``write`` returns once its item is committed, or raises
:class:`~libs.common.errors.TransientError` when the database stays unreachable (the caller
answers "try again later": SMTP 451, HTTP 503).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from libs.common.errors import TransientError, is_transient
from libs.common.retry import BRIEF, retry

T = TypeVar("T")


class GroupWriter(Generic[T]):
    def __init__(
        self,
        flush: Callable[[list[T]], Awaitable[None]],
        *,
        name: str,
        service: str,
        max_batch: int = 1000,
    ) -> None:
        self._flush = flush
        self.name = name
        self._service = service
        self._max_batch = max_batch
        self._queue: list[tuple[T, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()

    async def write(self, item: T) -> None:
        """Queue ``item`` and wait until the transaction holding it has committed."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((item, done))
        self._wake.set()
        await done

    async def run(self) -> None:
        """Write until cancelled; on the way out, callers still waiting are told to retry."""
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._queue:
                    batch = self._queue[: self._max_batch]
                    del self._queue[: self._max_batch]
                    await self._write(batch)
        finally:
            self._fail(self._queue, TransientError(f"{self.name}: stopping"))
            self._queue = []

    async def _write(self, batch: list[tuple[T, asyncio.Future[None]]]) -> None:
        items = [item for item, _ in batch]
        try:
            await retry(
                lambda: self._flush(items),
                name=self.name,
                service=self._service,
                strategy=BRIEF,
            )
        except BaseException as exc:  # the callers must not hang, whatever happened
            self._fail(batch, TransientError(f"{self.name}: {exc!r}"))
            if isinstance(exc, Exception) and is_transient(exc):
                return
            raise  # a bug or cancellation
        for _, done in batch:
            if not done.done():
                done.set_result(None)

    @staticmethod
    def _fail(batch: list[tuple[T, asyncio.Future[None]]], error: Exception) -> None:
        for _, done in batch:
            if not done.done():
                done.set_exception(error)
