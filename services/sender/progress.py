"""The sender's answers to the scheduler's release checkpoints, on ``send.progress``.

A checkpoint is a ``send.requests`` record with checkpoint = true that the scheduler puts
into every partition after the requests it has released so far
(services/scheduler/checkpoints.py). The handler answers the checkpoints of a batch only
after every request of the batch is decided and its result acknowledged by the broker
(agents.py), so an answer means: in this partition, every request before the checkpoint
that reached this sender has its result on ``delivery.results``. A request the scheduler
released before it and never hears of was lost on the way (or its result was): it is
released again, and the ledger answers one it had decided with its recorded result.

Except a *held* one (holding.py): its row in ``held_delivery`` stands for it, and its
result comes when its domain admits it. So each answer also says how many of the
campaign's deliveries are held at that moment (``held``, send.progress v2), counted in the
table every sender replica shares — a row adopted by another sender's sweep, or held by a
sender that restarted, is counted alike. The count is taken after the batch's held rows
are written, so a request before the checkpoint is either answered by its result or
counted as held, or both; the scheduler waits while any is held
(services/scheduler/processor.py ``checkpoint_step``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg

from libs.common.kafka import Message, Publisher
from libs.common.topics import Topic
from services.sender.ledger import QUERIES


def is_checkpoint(message: Message) -> bool:
    return bool(message.value.get("checkpoint"))


def reached(checkpoint: Message, now: dt.datetime, held: int = 0) -> dict[str, Any]:
    """The ``send.progress`` record saying this sender reached ``checkpoint``, with
    ``held`` of its campaign's deliveries held for their domain."""
    return {
        "checkpoint_id": checkpoint.value["request_id"],
        "campaign_id": checkpoint.value["campaign_id"],
        "partition": checkpoint.partition,
        "reached_at": now,
        "held": held,
    }


async def held_counts(pool: asyncpg.Pool, campaigns: Sequence[str]) -> Mapping[str, int]:
    """How many deliveries of each campaign are held now, by any sender (none: absent)."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(QUERIES["held-counts"], sorted(set(campaigns)))
    return {r["campaign_id"]: int(r["held"]) for r in rows}


async def answer(publisher: Publisher, pool: asyncpg.Pool, checkpoints: Sequence[Message]) -> None:
    """Publish that these checkpoints were reached, each with its campaign's held count
    (read now, after the batch's held rows were written); returns once the broker
    acknowledged (the batch's offsets are committed after: a crash before answers again)."""
    if checkpoints:
        held = await held_counts(pool, [c.value["campaign_id"] for c in checkpoints])
        now = dt.datetime.now(dt.UTC)
        records = [
            (c.value["campaign_id"], reached(c, now, held.get(c.value["campaign_id"], 0)))
            for c in checkpoints
        ]
        await asyncio.gather(*await publisher.send_keyed(Topic.SEND_PROGRESS, records))
