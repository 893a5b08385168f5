"""The scheduler waits for mail a sender holds for its receiving domain's pace (issue 21).

Real contacts, scheduler and sender, the embedded broker and PostgreSQL, and an SMTP relay
(aiosmtpd) that caps one domain's rate (test_sender_domains.RateCappingRelay): LIMITED's
mail waits for its domain long enough to be held (services/sender/holding.py), so its
requests' batches commit and the sender answers the release checkpoints while that mail has
no result yet. Checkpoints come every half second and a row is released at most twice
(SCHEDULER_MAX_RELEASES = 2), with no result timeout beyond what a confirmed checkpoint
says: before send.progress said what is held, two confirmed checkpoints released the held
rows again and the campaign was given up (sent, "without a result after 2 releases") while
its held mail was still going out.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from libs.common.topics import Topic
from tests.conftest import eventually, running
from tests.integration.relays import kept, serving
from tests.integration.test_scheduler import (
    NOON_TOKYO,
    campaign_body,
    category,
    counters,
    group,
    reserved,
    status_of,
)
from tests.integration.test_sender import recipients
from tests.integration.test_sender_domains import FAST, LIMITED, RateCappingRelay
from tests.integration.test_sender_hold import SENDER  # mail held past half a second
from tests.integration.test_steps import scheduler_at

pytestmark = pytest.mark.integration

#: checkpoints every half second, two releases at most, and no result timeout of its own:
#: a row is given up as soon as its last release is covered by a confirmed checkpoint.
SCHEDULER = {"checkpoint_seconds": 0.5, "max_releases": 2, "result_timeout_seconds": 0.0}


async def members_at(contacts: Any, addresses: list[str], group_id: int) -> None:
    """A contact for each address, in this order, members of ``group_id``."""
    api = contacts.api
    ids: list[int] = []
    for start in range(0, len(addresses), 25):
        created = await asyncio.gather(
            *(
                api.ok("POST", "/v1/contacts", {"email": a, "name": a.partition("@")[0]})
                for a in addresses[start : start + 25]
            )
        )
        ids.extend(c["id"] for c in created)
    await api.ok("POST", f"/v1/groups/{group_id}/members", {"contact_ids": ids})


async def held_rows(database: str) -> int:
    conn = await asyncpg.connect(database)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM sender.held_delivery"))
    finally:
        await conn.close()


@pytest.mark.parametrize("restart", [False, True], ids=["one_sender", "sender_restarted"])
async def test_a_campaign_waits_for_its_held_mail_and_every_recipient_gets_one(
    stack, database, prefix, contacts, kafka, monkeypatch, tmp_path: Path, restart: bool
):
    """LIMITED's mail is held while FAST's goes; the campaign shows the held count, stays
    配信中 (its held rows are neither released again nor given up) and is sent only once
    every recipient has a result: everyone got exactly one mail, every result a success.
    ``sender_restarted``: the sender stops while mail is held (its rows stay in
    held_delivery, answered by nobody meanwhile) and the next one adopts them (the sweep):
    its answers count them, and the campaign still waits for them."""
    limited = [f"l{i}@{LIMITED}" for i in range(24)]
    fast = [f"f{i}@{FAST}" for i in range(40)]
    addresses = [a for pair in itertools.zip_longest(limited, fast) for a in pair if a]
    members = await group(contacts)
    await members_at(contacts, addresses, members)
    handler = RateCappingRelay(tmp_path / "relay", per_second=4, pipelining=True)
    shown: list[int] = []
    with serving(handler) as controller:
        sender = {"smtp_relays": f"127.0.0.1:{controller.port}", **SENDER}
        async with scheduler_at(
            NOON_TOKYO,
            monkeypatch,
            stack,
            database,
            prefix,
            contacts_url=contacts.api.base,
            **SCHEDULER,
        ) as (scheduler, clock):
            cat = await category(scheduler)
            campaign = await reserved(
                scheduler, campaign_body(cat, clock, target={"group_id": members})
            )
            cid = campaign["id"]

            async def held_shown() -> bool:
                body = await scheduler.api.ok("GET", f"/v1/campaigns/{cid}")
                assert body["status"] == "sending", body["status"]
                shown.append(body["sender_held"])
                return body["sender_held"] > 0

            async with running("sender", stack, database, prefix, **sender):
                clock.advance(minutes=10)
                # The campaign says its mail is held (送信待ち) while it is.
                await eventually(held_shown)
                if not restart:
                    done = await status_of(scheduler, cid, "aggregating")
            if restart:
                # Stopped with mail held: it waits in held_delivery, the campaign for it.
                assert await held_rows(database) > 0
                assert await held_shown()
                async with running("sender", stack, database, prefix, **sender):
                    done = await status_of(scheduler, cid, "aggregating")

    # Every recipient exactly one mail, LIMITED's included, and the counts add up.
    assert recipients(kept(handler)) == dict.fromkeys(addresses, 1)
    assert counters(done) == {
        "planned": len(addresses),
        "success": len(addresses),
        "error": 0,
        "suppressed": 0,
        "unsent": 0,
    }
    # Sent because every recipient had a result, never given up; the held rows were not
    # released again (nothing was lost), and nothing is shown held any more.
    reasons = [h["reason"] for h in done["history"] if h["status"] == "sent"]
    assert reasons == ["every recipient has a result"], done["history"]
    assert (done["released"], done["re_released"]) == (len(addresses), 0)
    assert (done["pending"], done["sender_held"]) == (0, 0)
    assert 0 < max(shown) <= len(limited)
    # The senders said so: answers to the checkpoints counted LIMITED's held mail (never
    # FAST's, never more than LIMITED has), and the last one nothing.
    answers = [a for a in await kafka.read_to_end(Topic.SEND_PROGRESS) if a["campaign_id"] == cid]
    assert 0 < max(a["held"] for a in answers) <= len(limited)
    # Its checkpoints are gone with its sending (checkpoints.py forgets those answered with
    # held mail while it sends; tests/unit/test_scheduler_held.py): none is left behind.
    conn = await asyncpg.connect(database)
    try:
        left = await conn.fetchval(
            "SELECT count(*) FROM scheduler.checkpoint WHERE campaign_id = $1", uuid.UUID(cid)
        )
    finally:
        await conn.close()
    assert left == 0
