"""The sender's answers to the scheduler's release checkpoints, on ``send.progress``.

A checkpoint is a ``send.requests`` record with checkpoint = true that the scheduler puts
into every partition after the requests it has released so far
(services/scheduler/checkpoints.py). The handler answers the checkpoints of a batch only
after every request of the batch is decided and its result acknowledged by the broker
(agents.py), so an answer means: in this partition, every request before the checkpoint
that reached this sender has its result on ``delivery.results``. A request the scheduler
released before it and never hears of was lost on the way (or its result was): it is
released again, and the ledger answers one it had decided with its recorded result.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence
from typing import Any

from libs.common.kafka import Message, Publisher
from libs.common.topics import Topic


def is_checkpoint(message: Message) -> bool:
    return bool(message.value.get("checkpoint"))


def reached(checkpoint: Message, now: dt.datetime) -> dict[str, Any]:
    """The ``send.progress`` record saying this sender reached ``checkpoint``."""
    return {
        "checkpoint_id": checkpoint.value["request_id"],
        "campaign_id": checkpoint.value["campaign_id"],
        "partition": checkpoint.partition,
        "reached_at": now,
    }


async def answer(publisher: Publisher, checkpoints: Sequence[Message]) -> None:
    """Publish that these checkpoints were reached; returns once the broker acknowledged
    (the batch's offsets are committed after: a crash before answers again)."""
    if checkpoints:
        now = dt.datetime.now(dt.UTC)
        records = [(c.value["campaign_id"], reached(c, now)) for c in checkpoints]
        await asyncio.gather(*await publisher.send_keyed(Topic.SEND_PROGRESS, records))
