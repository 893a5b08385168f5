"""Operator overrides of the per-domain sending policy: rows of ``domain_override`` ⇄
:class:`~services.sender.domains.Override`, loaded into the relay pool's pacing at start,
after each write through the API, and every ``SENDER_DOMAIN_OVERRIDES_REFRESH_SECONDS``
(another replica's writes)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import asyncpg

from libs.common.logging import get_logger
from libs.common.retry import every
from services.sender.context import Context
from services.sender.domains import Override, WarmUp
from services.sender.ledger import QUERIES

log = get_logger(__name__)


def from_row(row: Mapping[str, Any]) -> Override:
    warmup = None
    if row["warmup_start"] is not None:
        warmup = WarmUp(row["warmup_start"], tuple(row["warmup_caps"]))
    return Override(
        rate=row["rate"],
        connections=row["connections"],
        state=row["state"],
        until=row["until"],
        reason=row["reason"],
        warmup=warmup,
    )


async def load(conn: asyncpg.Connection | asyncpg.Pool) -> dict[str, Override]:
    return {row["domain"]: from_row(row) for row in await conn.fetch(QUERIES["domain-overrides"])}


async def refresh(ctx: Context) -> None:
    """The overrides in the database become the ones in force in this process."""
    ctx.relays.pacing.set_overrides(await load(ctx.pool))


async def refresh_forever(ctx: Context) -> None:
    """At start, then every interval."""
    s = ctx.settings
    await every(
        s.domain_overrides_refresh_seconds,
        lambda: refresh(ctx),
        name="domain_overrides",
        service=s.service,
        first_now=True,
    )
