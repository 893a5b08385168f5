"""Kafka handlers of the exporter: decode → process → write → (the loop commits).

- ``export.requests``: each request becomes a job row (once: job_id is the idempotency
  id; the API usually wrote it already) and is run in the background — an export takes
  longer than a consumer may stay away from polling, so the durable job row, not the
  offset, is what carries it across a restart.
- ``jobs.events``: the jobs list (F-43), the newest state per job.
"""

from __future__ import annotations

import functools

from libs.common.kafka import Message, checked
from services.exporter import jobs, processor, store
from services.exporter.context import Context


async def handle_requests(ctx: Context, batch: list[Message]) -> None:
    """``export.requests`` → export jobs, launched after their rows committed."""
    check = functools.partial(processor.check_record, notify_email=ctx.settings.operator_email)
    requests = checked(batch, check)
    async with ctx.pool.acquire() as conn, conn.transaction():
        for request in requests:
            await jobs.create(conn, request)
    for request in requests:
        jobs.launch(ctx, request["job_id"])


async def handle_jobs_events(ctx: Context, batch: list[Message]) -> None:
    """``jobs.events`` → the jobs list; older or repeated records change nothing."""
    async with ctx.pool.acquire() as conn, conn.transaction():
        await store.upsert_jobs(conn, [m.value for m in batch])
