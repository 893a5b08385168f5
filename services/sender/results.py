"""The sender's ``delivery.results``: published from the ledger, with no outbox.

A result is published only once the ledger row that stores it is committed ``done``, and a
``send.requests`` batch's offsets are committed only after every result of the batch is
acknowledged by the broker (the handler waits for them after :meth:`Ledger.flush`). A batch
handled again (a crash, a failed publication) finds its rows ``done`` and publishes their
stored results again, with the same result_id, which consumers count once. That is the
guarantee the outbox gave — its relay, too, published committed rows before they were
flushed — without an outbox row written, read and deleted per message.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from typing import Any

from libs.common import trace
from libs.common.kafka import Publisher
from libs.common.topics import Topic

#: committed results wait this long for those of later cycles, to be published with them:
#: a cycle commits ~30 results, ~8 a partition, batches too small for the broker (per-cycle
#: publication cost the broker +32 us/msg and the sender alone +49 in the campaign bench).
RESULTS_LINGER_SECONDS = 0.05


async def publish(
    publisher: Publisher,
    results: Sequence[dict[str, Any]],
    traces: Sequence[str | None] | None = None,
) -> None:
    """Publish results on ``delivery.results`` (key: the contact) and wait for the broker's
    acknowledgements. Only results whose ledger rows are committed 'done': a repeat (same
    result_id) is harmless, a result of a row that could still be sent would not be.
    ``traces``: each result's trace (the request's; default: the current one)."""
    if not results:
        return
    if traces is None:
        traces = [trace.current()] * len(results)
    # In runs of one trace (mostly one run: a campaign's), in order: a key's results keep
    # their order across runs, as every run is queued before the next.
    futures = []
    for traceparent, run in itertools.groupby(
        zip(results, traces, strict=True), key=lambda pair: pair[1]
    ):
        records = [(r["contact_id"], r) for r, _ in run]
        with trace.bound(traceparent):
            futures += await publisher.send_keyed(Topic.DELIVERY_RESULTS, records)
    await asyncio.gather(*futures)


class ResultsOut:
    """Gathers the results of the cycles committed within RESULTS_LINGER_SECONDS into one
    publication: fewer, larger record batches for the broker and every consumer."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self._waiting: list[dict[str, Any]] = []
        self._traces: list[str | None] = []
        self._next: asyncio.Future[None] | None = None
        self._running: set[asyncio.Future[None]] = set()

    def announce(
        self, results: list[dict[str, Any]], traces: list[str | None]
    ) -> asyncio.Future[None]:
        """Queue committed results, each with its trace; returns the publication they will
        be part of (done once the broker acknowledged it)."""
        self._waiting.extend(results)
        self._traces.extend(traces)
        if self._next is None:
            self._next = asyncio.ensure_future(self._publish_later())
            self._running.add(self._next)
            self._next.add_done_callback(self._settled)
        return self._next

    async def stop(self) -> None:
        """Let the publications under way finish (or fail)."""
        await asyncio.gather(*self._running, return_exceptions=True)

    async def _publish_later(self) -> None:
        await asyncio.sleep(RESULTS_LINGER_SECONDS)
        results, self._waiting, self._next = self._waiting, [], None
        traces, self._traces = self._traces, []
        await publish(self.publisher, results, traces)

    def _settled(self, publication: asyncio.Future[None]) -> None:
        """Forget a finished publication and mark its error retrieved: the handlers waiting
        for it raise it (one cancelled meanwhile need not)."""
        self._running.discard(publication)
        if not publication.cancelled():
            publication.exception()
