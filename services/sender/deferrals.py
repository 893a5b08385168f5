"""The sender's ``delivery.deferrals``: each 4xx answer it retries inside itself, published
when it happens, so that deliverability's windows see them (docs/ARCHITECTURE.md,
"Deferrals the sender retries").

A relay worker hands the record over (:meth:`DeferralsOut.deferred`) and goes on at once:
nothing on the send path waits for the broker. The records of one linger
(:data:`LINGER_SECONDS`, as results are gathered) go out in one publication. They are
telemetry, at most once: not in the ledger, not waited for by a batch's commit; a record
the broker refuses (it is away) or one beyond :data:`WAITING_MAX` waiting is counted as
lost (``tayori_sender_deferrals_total{outcome="lost"}``) and not sent again. The outcome
of the message itself is not here: its one result still goes on ``delivery.results``; a 4xx
whose retries are spent is that result (temporary_error) and has no deferral record, so
deliverability counts every answer once.
"""

from __future__ import annotations

import asyncio
from typing import Any

from libs.common import trace
from libs.common.errors import Fault, classify
from libs.common.kafka import Publisher
from libs.common.logging import get_logger
from libs.common.metrics import SENDER_DEFERRALS
from libs.common.topics import Topic

log = get_logger(__name__)

#: records wait this long for others, to be published with them (results.py's reason).
LINGER_SECONDS = 0.1
#: at most this many records wait for the broker; more (a broker outage during a deferral
#: storm) are dropped and counted, not kept in memory without bound.
WAITING_MAX = 10_000
#: at a stop, how long the last publications may take before they are given up.
STOP_GRACE_SECONDS = 5.0


class DeferralsOut:
    """Gathers deferral records and publishes them on ``delivery.deferrals`` (key: the
    contact, like the results) once per linger, in the background."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self._waiting: list[dict[str, Any]] = []
        self._in_flight = 0
        self._next: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    def deferred(self, record: dict[str, Any]) -> None:
        """Queue one DeliveryDeferral (:func:`services.sender.processor.deferral`); returns
        at once."""
        if len(self._waiting) + self._in_flight >= WAITING_MAX:
            SENDER_DEFERRALS.labels("lost").inc()
            return
        self._waiting.append(record)
        if self._next is None:
            self._next = asyncio.ensure_future(self._publish_later())
            self._running.add(self._next)
            self._next.add_done_callback(self._settled)

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Publish what waits now and let the publications under way finish, for at most
        ``grace`` seconds (a broker away at the stop must not hold the sender's stop up
        for its request timeout): the rest are cancelled and counted lost."""
        if self._next is not None:
            self._next.cancel()
            self._next = None
        if self._waiting:
            last = asyncio.ensure_future(self._publish(self._take()))
            self._running.add(last)
            last.add_done_callback(self._settled)
        if not self._running:
            return
        _, late = await asyncio.wait(set(self._running), timeout=grace)
        for publication in late:
            publication.cancel()
        await asyncio.gather(*late, return_exceptions=True)

    def _settled(self, publication: asyncio.Task[None]) -> None:
        """Forget a finished publication; a bug in it is logged loudly (no handler waits
        for it to raise it to)."""
        self._running.discard(publication)
        if not publication.cancelled() and (exc := publication.exception()) is not None:
            log.error("deferrals_publication_failed", exc_info=exc)

    def _take(self) -> list[dict[str, Any]]:
        records, self._waiting = self._waiting, []
        return records

    async def _publish_later(self) -> None:
        await asyncio.sleep(LINGER_SECONDS)
        self._next = None
        await self._publish(self._take())

    async def _publish(self, records: list[dict[str, Any]]) -> None:
        """Publish ``records`` and wait for the broker; a transient failure loses them
        (counted, logged once for the lot), anything else is a bug and is raised."""
        if not records:
            return
        self._in_flight += len(records)
        try:
            # in no trace: a lot gathers the deferrals of many handlers' deliveries
            with trace.bound(None):
                futures = await self.publisher.send_keyed(
                    Topic.DELIVERY_DEFERRALS, [(r["contact_id"], r) for r in records]
                )
            await asyncio.gather(*futures)
        except asyncio.CancelledError:  # a stop gave up waiting for the broker
            SENDER_DEFERRALS.labels("lost").inc(len(records))
            raise
        except Exception as exc:
            if classify(exc) is not Fault.TRANSIENT:
                raise
            SENDER_DEFERRALS.labels("lost").inc(len(records))
            log.warning("deferrals_not_published", records=len(records), error=repr(exc))
        else:
            SENDER_DEFERRALS.labels("published").inc(len(records))
        finally:
            self._in_flight -= len(records)
