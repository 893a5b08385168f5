"""Held deliveries: mail that waits for its domain without holding its batch.

A ``send.requests`` batch's offsets are committed only once every delivery of the batch has
an outcome (ledger.py). A delivery that pacing (pacing.py) parks for longer than
``SENDER_DOMAIN_HOLD_SECONDS`` — its domain is slow, paused or capped — would keep its
whole batch, and so every other domain's mail behind it, waiting; and a batch held past the
consumer's poll interval loses its partition. So such a delivery is **held**: its request
(its record, Avro with its headers) is written to ``held_delivery`` and only then its
handler stops waiting for it (the handler's ledger flush makes the row durable before the
batch's offsets are committed) (its ``done`` future is resolved and replaced by a new one
for its outcome). It stays parked here and goes when its domain admits it; its outcome is
recorded and its result published as any other's, after which its held row is deleted.

The :class:`Holder` batches both writes (one transaction for whatever accumulated while the
last one ran, as the ledger's group committer does) and knows the deliveries held in this
process (:attr:`Holder.live`). Rows of a sender that is gone are taken over by the sweep
(agents.sweep_held).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
from typing import Any

import asyncpg

from libs.common import avro
from libs.common.logging import get_logger
from libs.common.metrics import SENDER_HELD, SENDER_HELD_TOTAL
from libs.common.retry import FOREVER, retry
from libs.common.topics import Topic
from services.sender.ledger import HELD, HOLDING, QUERIES, Delivery, columns
from services.sender.models import LedgerKey

log = get_logger(__name__)


def encode_request(request: dict[str, Any]) -> tuple[bytes, str]:
    """A decoded ``send.requests`` record as stored in its held row: its Avro value and its
    headers as JSON ([[name, base64 of the bytes], ...]); :func:`decode_request` reads it
    back to the same record."""
    value, headers = avro.encode(Topic.SEND_REQUESTS, request)
    return value, json.dumps([[k, base64.b64encode(v).decode()] for k, v in headers])


def decode_request(value: bytes, headers: list[list[str]]) -> dict[str, Any]:
    """The record a held row stores (:func:`encode_request`)."""
    raw = [(k, base64.b64decode(v)) for k, v in headers]
    return avro.decode(Topic.SEND_REQUESTS, bytes(value), raw)


class Holder:
    """Writes and deletes held rows in batches; see the module's docstring."""

    def __init__(self, pool: asyncpg.Pool, service: str, owner: int | None = None) -> None:
        self.pool = pool
        self.service = service
        #: this process's ledger owner key (ledger.OwnerLock): abandoned rows let go of it.
        self.owner = owner
        #: the deliveries held in this process (being written, written, or adopted), until
        #: their held row is deleted.
        self.live: dict[LedgerKey, Delivery] = {}
        self._holding: list[Delivery] = []
        self._unholding: list[Delivery] = []
        self._releasing: list[Delivery] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())
        self._task.set_name("sender:holder")

    async def stop(self) -> None:
        """Writes not done stay undone: a delivery whose row was not written is still its
        batch's (resent after the restart), a row not deleted is the next sweep's."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    # What pacing and the ledger tell it ----------------------------------------------------

    def hold(self, d: Delivery) -> None:
        """Pacing parks ``d`` for long: write its held row (it stays parked meanwhile)."""
        d.hold = HOLDING
        self.live[d.key] = d
        self._holding.append(d)
        self._wake.set()

    def adopt(self, d: Delivery) -> None:
        """``d`` is a held row taken over from a sender that is gone (its row exists)."""
        d.hold = HELD
        self.live[d.key] = d
        d.done.add_done_callback(functools.partial(self._outcome_failed, d))
        SENDER_HELD_TOTAL.labels("adopted").inc()
        SENDER_HELD.set(len(self.live))

    def recorded(self, d: Delivery, published: asyncio.Future[None] | None) -> None:
        """The ledger committed held ``d``'s outcome; ``published``: its result's
        publication (None: it has no result). Its row goes once that is acknowledged; if
        the publication failed the row stays, and the sweep publishes the stored result."""
        if published is None:
            self._unhold(d)
            return

        def settled(publication: asyncio.Future[None]) -> None:
            if not publication.cancelled() and publication.exception() is None:
                self._unhold(d)
            else:
                log.warning("held_result_not_published", campaign_id=d.campaign_id)
                self._drop(d)

        published.add_done_callback(settled)

    def abandoned(self, d: Delivery) -> None:
        """``d`` will not be sent (its campaign or domain stopped meanwhile), held or not:
        a held row goes, with no result, as for the requests dropped at the claim; and its
        unfinished ledger row is let go (no owner). After a resume the scheduler releases
        its request again, maybe to another replica (a rebalance moved its partition),
        which must take the row over rather than wait for this process to finish a
        delivery it dropped (ledger.claim: a row whose owner is not alive is adopted)."""
        if self.owner is not None:
            self._releasing.append(d)
            self._wake.set()
        if d.hold == HELD:
            self._unhold(d)

    # Writes ---------------------------------------------------------------------------------

    def _unhold(self, d: Delivery) -> None:
        self._unholding.append(d)
        self._wake.set()

    def _drop(self, d: Delivery) -> None:
        if self.live.get(d.key) is d:
            del self.live[d.key]
        SENDER_HELD.set(len(self.live))

    def _outcome_failed(self, d: Delivery, future: asyncio.Future[None]) -> None:
        """A held delivery's outcome future failed (a bug) or was cancelled (a stop): its
        row stays for a sweep; the error is retrieved here, as its handler is gone."""
        if future.cancelled() or future.exception() is not None:
            self._drop(d)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            holding, self._holding = self._holding, []
            unholding, self._unholding = self._unholding, []
            releasing, self._releasing = self._releasing, []
            if holding or unholding or releasing:
                await self._write(holding, unholding, releasing)

    async def _write(
        self, holding: list[Delivery], unholding: list[Delivery], releasing: list[Delivery]
    ) -> None:
        rows = [(d, *encode_request(d.request or {})) for d in holding]

        async def transaction() -> None:
            # Committed without waiting for the WAL flush, as the ledger's cycles are: the
            # handler the held rows release flushes (Ledger.flush) before it commits its
            # batch's offsets, and a flushing commit makes every earlier one durable.
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute("SET LOCAL synchronous_commit = off")
                if rows:
                    keys = [d.key for d, _, _ in rows]
                    await conn.execute(
                        QUERIES["hold"],
                        *columns(keys),
                        [d.domain for d, _, _ in rows],
                        [value for _, value, _ in rows],
                        [headers for _, _, headers in rows],
                        [d.trace for d, _, _ in rows],
                    )
                if unholding:
                    await conn.execute(QUERIES["unhold"], *columns([d.key for d in unholding]))
                if releasing:
                    keys = [d.key for d in releasing]
                    await conn.execute(QUERIES["release"], *columns(keys), self.owner)

        await retry(transaction, name="sender:holder", service=self.service, strategy=FOREVER)
        for d in unholding:
            self._drop(d)
        late = []
        for d, _, _ in rows:
            if d.done.done():
                # Finished (or given up by its handler) while its row was written: it is
                # its batch's as any other delivery, and the row goes.
                d.hold = ""
                late.append(d)
                continue
            d.hold = HELD
            waited, d.done = d.done, asyncio.get_running_loop().create_future()
            d.done.add_done_callback(functools.partial(self._outcome_failed, d))
            waited.set_result(None)  # its handler stops waiting (and flushes: the row is durable)
        if late:
            self._unholding.extend(late)
            self._wake.set()
        held = len(rows) - len(late)
        if held:
            SENDER_HELD_TOTAL.labels("held").inc(held)
            log.info("deliveries_held", deliveries=held)
        SENDER_HELD.set(len(self.live))
