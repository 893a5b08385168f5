"""Checkpoints of a release: a campaign notices within minutes the send requests, or the
delivery results, that a broker lost — never a request merely waiting its turn.

A broker that loses records (the embedded one keeps them in memory; a topic recreated; an
unclean leader election) leaves released rows without a result, and nothing comes for them
until ``SCHEDULER_RESULT_TIMEOUT_SECONDS``. Elapsed time cannot tell a lost request from one
waiting in ``send.requests`` behind a paced backlog or a slow sender, so the release asks
the senders instead, in the stream itself:

1. every ``SCHEDULER_CHECKPOINT_SECONDS`` while some released row awaits its result, the
   releasing tick publishes a checkpoint (a ``send.requests`` record with checkpoint = true)
   into *every* partition, after the chunks it has released so far (each chunk's rows carry
   the campaign's ``release_mark``; the checkpoint records the mark it follows). The
   campaign's content goes out again with it: a sender that never got it would wait for it
   and never reach the checkpoint;
2. a sender reaches the checkpoint in a partition only after it has decided every request
   before it there and its results were acknowledged, and answers on ``send.progress``
   (services/sender/agents.py); the scheduler records the partitions (agents.py);
3. when every partition has answered, the tick takes the *fence*: the end offsets of
   ``delivery.results``, which lie above every result published before the answers;
4. once the results consumer has counted up to the fence (its group's committed offsets:
   fence.py), a row up to
   the checkpoint's mark still without a result was passed by a sender with nothing coming:
   its request never arrived, or its result was lost. It goes out again (attempt + 1,
   counted in ``re_released``); the sender's ledger sends a lost request and answers a
   decided one with its recorded result, same result_id, without sending
   (services/sender/ledger.py). A row at its ``SCHEDULER_MAX_RELEASES``-th release is not
   sent again: the overdue check gives it up (release.py).

Mail a sender *holds* for its receiving domain's pace (services/sender/holding.py) is
neither: it has no result yet and goes when its domain admits it. Each answer says how many
of the campaign's deliveries are held (send.progress v2); a checkpoint answered with held
mail is never confirmed, and while the newest answer says some is held the overdue check
neither releases rows again nor gives the campaign up (processor.checkpoint_step,
processor.senders_hold). The campaign stays 配信中 until the held mail has its results.

The decision is :func:`services.scheduler.processor.checkpoint_step`; this module does its
I/O in the releasing tick's transaction, under the campaign row's lock.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from collections.abc import Mapping
from typing import Any

import asyncpg

from libs.common import avro, trace
from libs.common.logging import get_logger
from libs.common.metrics import MESSAGES_PUBLISHED
from libs.common.topics import Topic
from services.scheduler import processor, store
from services.scheduler.contents import publish_content
from services.scheduler.context import Context
from services.scheduler.processor import Checkpoint
from services.scheduler.store import QUERIES

log = get_logger(__name__)


async def tend(
    ctx: Context, conn: asyncpg.Connection, campaign: Mapping[str, Any], now: dt.datetime
) -> None:
    """One tick of a sending campaign's checkpoints, in the releasing transaction: apply the
    newest one confirmed (its rows without a result go out again in this tick's chunk), take
    the fence of those every partition reached, publish a new one when due."""
    key = str(campaign["id"])
    rows = await conn.fetch(QUERIES["checkpoints"], campaign["id"], campaign["confirmed_mark"])
    checkpoints = [
        Checkpoint(
            r["id"],
            r["mark"],
            r["partitions"],
            r["reached"],
            None if r["fence"] is None else tuple(r["fence"]),
            r["held"],
        )
        for r in rows
    ]
    counted: dict[int, int] = {}
    if any(c.fence is not None for c in checkpoints):
        counted = await ctx.results.counted(ctx.publisher)
    issued = ctx.checkpoint_issued.get(key)
    step = processor.checkpoint_step(
        checkpoints,
        release_mark=campaign["release_mark"],
        confirmed_mark=campaign["confirmed_mark"],
        awaiting_results=campaign["released"] - store.counters(campaign).results,
        results_counted=counted,
        since_issued=None if issued is None else time.monotonic() - issued,
        interval=ctx.settings.checkpoint_seconds,
    )
    if step.forget:
        await conn.execute(QUERIES["forget-checkpoints"], list(step.forget))
    if step.confirm is not None:
        await confirm(ctx, conn, campaign, step.confirm)
    if step.fence:
        fence = list(await ctx.results.ends(ctx.publisher))
        await conn.execute(QUERIES["set-fence"], list(step.fence), fence)
    if step.issue:
        await issue(ctx, conn, campaign, now)


async def confirm(
    ctx: Context, conn: asyncpg.Connection, campaign: Mapping[str, Any], checkpoint: Checkpoint
) -> None:
    """Rows up to the checkpoint's mark still without a result go out again."""
    again = await conn.fetchval(
        QUERIES["unrelease-unseen"], campaign["id"], checkpoint.mark, ctx.settings.max_releases
    )
    await conn.execute(QUERIES["confirm-checkpoint"], campaign["id"], checkpoint.mark)
    if again:
        log.warning(
            "unseen_requests_released_again",
            campaign_id=str(campaign["id"]),
            rows=again,
            checkpoint_id=str(checkpoint.id),
        )


async def issue(
    ctx: Context, conn: asyncpg.Connection, campaign: Mapping[str, Any], now: dt.datetime
) -> None:
    """Publish a checkpoint into every partition of send.requests (acknowledged), after the
    rows released so far, and record it."""
    await publish_content(ctx, campaign, again=True)
    checkpoint_id = uuid.uuid4()
    value = processor.checkpoint_request(str(campaign["id"]), str(checkpoint_id), now)
    data, headers = avro.encode(Topic.SEND_REQUESTS, value)
    headers += trace.headers()
    name = ctx.publisher.name(Topic.SEND_REQUESTS)
    producer = ctx.publisher.producer
    partitions = sorted(await producer.partitions_for(name))
    key = str(campaign["id"]).encode()
    # One record per partition, so the Publisher's keyed helpers (a key's one partition) do
    # not fit: the producer is told the partition.
    sent = [
        await producer.send(name, data, key=key, partition=p, headers=headers) for p in partitions
    ]
    await asyncio.gather(*sent)
    MESSAGES_PUBLISHED.labels(ctx.settings.service, Topic.SEND_REQUESTS.value).inc(len(sent))
    await conn.execute(
        QUERIES["insert-checkpoint"],
        checkpoint_id,
        campaign["id"],
        campaign["release_mark"],
        len(partitions),
        now,
    )
    ctx.checkpoint_issued[str(campaign["id"])] = time.monotonic()
