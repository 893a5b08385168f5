"""Periodic upkeep of the bounce processor's schema: consumed result ids past their
retention, and inbound mail kept as unreadable or unattributable past
``BOUNCE_REJECTED_RETENTION_DAYS``, and ESP webhook event ids past
``ESP_EVENT_RETENTION_DAYS`` are forgotten. Bounces, states and engagement stay:
they are the record the rules and the statistics read."""

from __future__ import annotations

from libs.common.logging import get_logger
from libs.common.retry import every
from services.bounce_processor.context import Context
from services.bounce_processor.store import QUERIES

log = get_logger(__name__)


async def run_once(ctx: Context) -> tuple[int, int]:
    """One pass: (result ids, rejected mails) forgotten. Safe to run on every replica."""
    s = ctx.settings
    async with ctx.pool.acquire() as conn:
        ids = await conn.fetchval(
            QUERIES["forget-processed-events"], s.processed_event_retention_days
        )
        mails = await conn.fetchval(QUERIES["forget-rejected-inbound"], s.rejected_retention_days)
        esp = await conn.fetchval(QUERIES["forget-esp-events"], s.esp_event_retention_days)
    log.info(
        "maintenance_done",
        result_ids_forgotten=ids,
        rejected_mail_forgotten=mails,
        esp_event_ids_forgotten=esp,
    )
    return ids, mails


async def run_forever(ctx: Context) -> None:
    """A pass every interval, the first one interval after the start."""
    s = ctx.settings
    await every(
        s.maintenance_interval_seconds, lambda: run_once(ctx), name="maintenance", service=s.service
    )
