"""Periodic upkeep of the sender's schema: finished ledger rows, campaign.control ids and
the contents of campaigns with no ledger row left, older than their retention, are
forgotten, so the tables hold the recent past, not every mail ever sent.

The ledger's retention must outlast the time a request can be redelivered or replayed
(the retention of ``send.requests``): a row forgotten earlier would let a replay send again.
Unfinished rows ('claimed', 'handed') are never forgotten.
"""

from __future__ import annotations

from libs.common.logging import get_logger
from libs.common.retry import every
from services.sender.context import Context
from services.sender.ledger import QUERIES

log = get_logger(__name__)

#: rows deleted per statement: short transactions, no long locks on a big ledger.
CHUNK = 10_000


async def run_once(ctx: Context) -> tuple[int, int]:
    """One pass: (ledger rows, control ids) forgotten. Safe to run on every replica."""
    s = ctx.settings
    ledger_rows = 0
    while True:
        async with ctx.pool.acquire() as conn:
            deleted = await conn.fetchval(QUERIES["forget-ledger"], s.ledger_retention_days, CHUNK)
        ledger_rows += deleted
        if deleted < CHUNK:
            break
    async with ctx.pool.acquire() as conn:
        ids = await conn.fetchval(QUERIES["forget-processed-events"], s.ledger_retention_days)
        forgotten = await conn.fetchval(QUERIES["forget-contents"], s.ledger_retention_days)
    log.info(
        "maintenance_done",
        ledger_rows_forgotten=ledger_rows,
        control_ids_forgotten=ids,
        contents_forgotten=forgotten,
    )
    return ledger_rows, ids


async def run_forever(ctx: Context) -> None:
    """A pass every interval, the first one interval after the start."""
    s = ctx.settings
    await every(
        s.maintenance_interval_seconds, lambda: run_once(ctx), name="maintenance", service=s.service
    )
