"""Campaign contents sent once (send.requests v4): stored from ``campaign.content``, looked up
by the id each request names.

The scheduler publishes a content, acknowledged, before it releases any request naming it,
but the two arrive on different topics (and partitions), so a request can reach the sender
before its content has been stored. :func:`load` then waits a little for the content consumer
and, if it is still missing, raises :class:`TransientError`: the batch is handled again later,
uncommitted — nothing is lost and nothing is sent without its own content. The table is
shared by every replica (whichever stores a content, all can use it) and survives restarts.

An id is the hash of its campaign and content (:mod:`libs.common.mail.content`); :func:`check`
refuses a record whose id does not match, so an id only ever names the content it was made of.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Collection, Sequence
from typing import Any

import asyncpg

from libs.common.db import columns
from libs.common.errors import InvalidMessage, TransientError
from libs.common.mail.content import content_id
from services.sender.ledger import QUERIES

#: how long one batch waits for a content that has not arrived yet, before retrying.
WAIT_SECONDS = 10.0
_POLL_SECONDS = 0.05


def check(record: dict[str, Any]) -> dict[str, Any]:
    """The record, or refused if its id is not its content's hash (a bug or a forgery,
    never to be used)."""
    if record["content_id"] != content_id(record["campaign_id"], record["content"]):
        raise InvalidMessage("content_id is not the hash of this content", field="content_id")
    return record


async def store(conn: asyncpg.Connection, records: Sequence[dict[str, Any]]) -> None:
    await conn.execute(
        QUERIES["store-contents"],
        *columns(records, "content_id", "campaign_id"),
        [json.dumps(r["content"], ensure_ascii=False) for r in records],
    )


async def load(
    pool: asyncpg.Pool, ids: Collection[str], *, wait_seconds: float = WAIT_SECONDS
) -> dict[str, tuple[str, dict[str, Any]]]:
    """content id → (its campaign, content) for every id; waits ``wait_seconds`` for missing
    ones, then :class:`TransientError`."""
    found: dict[str, tuple[str, dict[str, Any]]] = {}
    deadline = asyncio.get_running_loop().time() + wait_seconds
    while True:
        missing = [i for i in ids if i not in found]
        async with pool.acquire() as conn:
            for row in await conn.fetch(QUERIES["contents"], missing):
                found[row["content_id"]] = (row["campaign_id"], row["content"])
        if len(found) == len(ids):
            return found
        if asyncio.get_running_loop().time() >= deadline:
            raise TransientError(
                f"campaign content not received yet: {sorted(set(ids) - set(found))}"
            )
        await asyncio.sleep(_POLL_SECONDS)
