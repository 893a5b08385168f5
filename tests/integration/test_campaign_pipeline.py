"""Campaigns through every service at once (issue 4): contacts freezes the list, suppression
decides who may be mailed, the scheduler releases and counts, the sender delivers to a real
SMTP server and applies the can-send rule at the last moment against its own copy of
suppression state (F-16, §9).

The scheduler's clock is a FakeClock (see test_scheduler.py): tests move it past
``scheduled_at`` instead of waiting.
"""

from __future__ import annotations

import mailbox
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiosmtpd.controller import Controller

from services.scheduler.context import context_of
from tayori.embedded import MaildirHandler, SmtpSink, free_port
from tests.conftest import eventually, running
from tests.integration.test_scheduler import (
    campaign_body,
    category,
    counters,
    fake_clock,
    group,
    people,
    reserved,
    status_of,
    ticks,
)
from tests.integration.test_sender import control_state, copy_holds


def delivered(sink: SmtpSink | MaildirHandler) -> Counter[str]:
    """Mails received, by recipient address."""
    box = sink.maildir if isinstance(sink, MaildirHandler) else mailbox.Maildir(str(sink.path))
    return Counter(str(m["X-Tayori-Envelope-To"]) for m in box)


async def copy_says(sender: Any, sql: str, *args: Any) -> None:
    """Wait until the sender's own copy of suppression state answers ``sql`` truthily."""

    async def holds() -> bool:
        return bool(await sender.runtime.pool.fetchval(sql, *args))

    await eventually(holds)


async def test_decisions_after_reservation_are_honoured_at_the_last_moment(
    contacts, suppression, scheduler, sender, smtp_sink
):
    clock = fake_clock(scheduler)
    members = await group(contacts)
    p = await people(contacts, 5, members)  # p0..p4@example.jp
    await copy_holds(sender, "membership_copy", 5)
    cat = await category(scheduler)
    first = await reserved(scheduler, campaign_body(cat, clock, target={"group_id": members}))
    assert first["planned"] == 5  # frozen with all five

    # After the list is frozen: p1 unsubscribes with the one-click link of a mail, an
    # operator bans p2, and p3's address is blacklisted.
    link = await suppression.api.ok(
        "GET", f"/v1/unsubscribe-link?contact_id={p[1]}&group_id={members}"
    )
    status, _ = await suppression.api.call(
        "POST",
        urlsplit(link["url"]).path,
        token=None,
        data={"List-Unsubscribe": "One-Click"},
    )
    assert status == 200
    await suppression.api.ok("PUT", f"/v1/memberships/{p[2]}/{members}", {"state": "banned"})
    await suppression.api.ok(
        "POST", "/v1/blacklist", {"title": "退会者", "match": "exact", "value": "p3@example.jp"}
    )
    membership = "SELECT state = $3 FROM membership_copy WHERE contact_id = $1 AND group_id = $2"
    await copy_says(sender, membership, p[1], members, "unsubscribed")
    await copy_says(sender, membership, p[2], members, "banned")
    await copy_says(sender, "SELECT count(*) FROM blacklist_copy WHERE value = $1", "p3@example.jp")

    clock.advance(minutes=10)
    done = await status_of(scheduler, first["id"], "aggregating")
    assert counters(done) == {
        "planned": 5,
        "success": 2,
        "error": 0,
        "suppressed": 3,
        "unsent": 0,
    }
    assert delivered(smtp_sink) == {"p0@example.jp": 1, "p4@example.jp": 1}

    # include_unsubscribed reaches p1 again, never the banned or the blacklisted address.
    second = await reserved(
        scheduler,
        campaign_body(
            cat, clock, target={"group_id": members}, include_unsubscribed=True, name="再送"
        ),
    )
    clock.advance(minutes=10)
    done = await status_of(scheduler, second["id"], "aggregating")
    assert (done["success"], done["error"], done["unsent"]) == (3, 0, 0)
    assert delivered(smtp_sink) == {"p0@example.jp": 2, "p4@example.jp": 2, "p1@example.jp": 1}


async def test_dedupe_by_email_sends_one_mail_per_mailbox(contacts, scheduler, sender, smtp_sink):
    clock = fake_clock(scheduler)
    members = await group(contacts)
    await people(contacts, 3, members)  # p0..p2
    # The same mailbox once more, its local part written in capitals: no longer possible
    # through the API (an address is one identity whatever its case), but a database that
    # held both spellings before that migration keeps them (contact_email_collision).
    pool = contacts.runtime.pool
    await pool.execute(
        "DROP INDEX contact_email_identity_key;"
        " CREATE UNIQUE INDEX contact_email_key ON contact (email);"
        " INSERT INTO contact (email, name) VALUES ('P0@example.jp', '顧客 0 (旧)');"
        " SELECT contact_email_identity();"
    )
    twin = await pool.fetchval("SELECT id FROM contact WHERE email = 'P0@example.jp'")
    await contacts.api.ok("POST", f"/v1/groups/{members}/members", {"contact_ids": [twin]})
    cat = await category(scheduler)

    async def send(dedupe: str) -> dict[str, Any]:
        body = campaign_body(cat, clock, target={"group_id": members}, dedupe=dedupe)
        campaign = await reserved(scheduler, body)
        clock.advance(minutes=10)
        return await status_of(scheduler, campaign["id"], "aggregating")

    everyone = await send("none")
    assert (everyone["planned"], everyone["success"]) == (4, 4)
    once = await send("by_email")
    assert (once["planned"], once["success"]) == (3, 3)
    by_mailbox = Counter(address.lower() for address in delivered(smtp_sink).elements())
    assert by_mailbox == {"p0@example.jp": 3, "p1@example.jp": 2, "p2@example.jp": 2}


class RejectingX(MaildirHandler):
    """Accepts every recipient but those whose local part starts with ``x`` (550 5.1.1)."""

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if address.startswith("x"):
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 OK"


async def test_error_rate_halts_for_good_and_the_rest_is_never_sent(
    stack, database, prefix, contacts, tmp_path: Path
):
    relay = Controller(RejectingX(tmp_path / "relay"), hostname="127.0.0.1", port=free_port())
    relay.start()
    try:
        async with (
            running(
                "scheduler",
                stack,
                database,
                prefix,
                contacts_url=contacts.api.base,
                halt_min_attempts=20,
            ) as scheduler,
            running(
                "sender", stack, database, prefix, smtp_relays=f"127.0.0.1:{relay.port}"
            ) as sender,
        ):
            clock = fake_clock(scheduler)
            members = await group(contacts)
            # 100 recipients, every 7th refused (15 of them): a 15% error rate throughout.
            ids = []
            for i in range(100):
                local = f"x{i}" if i % 7 == 3 else f"p{i}"
                created = await contacts.api.ok(
                    "POST", "/v1/contacts", {"email": f"{local}@example.jp", "name": f"顧客 {i}"}
                )
                ids.append(created["id"])
            await contacts.api.ok("POST", f"/v1/groups/{members}/members", {"contact_ids": ids})
            cat = await category(scheduler)
            campaign = await reserved(
                scheduler, campaign_body(cat, clock, target={"group_id": members})
            )
            assert campaign["planned"] == 100
            context_of(scheduler.runtime).release_rate = 50  # halted long before the end
            clock.advance(minutes=10)

            halted = await status_of(scheduler, campaign["id"], "halted")
            await control_state(sender, campaign["id"], "halted")

            # Whatever was in flight when the halt came is answered and counted: every mail
            # the relay kept is a success, every outcome the sender recorded is counted.
            async def settled() -> tuple[dict[str, Any], int] | None:
                body = await scheduler.api.ok("GET", f"/v1/campaigns/{campaign['id']}")
                mails = sum(delivered(relay.handler).values())
                recorded = await sender.runtime.pool.fetchval(
                    "SELECT count(*) FROM send_ledger WHERE campaign_id = $1 AND status = 'done'",
                    campaign["id"],
                )
                success, error = counters(body)["success"], counters(body)["error"]
                return (body, mails) if success == mails and success + error == recorded else None

            after, mails = await eventually(settled)
            # Then nothing moves.
            await ticks(scheduler, 10)
            later = await scheduler.api.ok("GET", f"/v1/campaigns/{campaign['id']}")
            assert later["status"] == "halted"
            assert counters(later) == counters(after)
            assert sum(delivered(relay.handler).values()) == mails == after["success"]
            assert halted["success"] + halted["error"] >= 20
            assert after["unsent"] > 0, "the halt came after everything was sent"
            assert after["error"] / (after["success"] + after["error"]) > 0.10
            # A halted campaign never resumes: reserving or cancelling it is refused.
            for action in ("reserve", "cancel"):
                status, _ = await scheduler.api.call(
                    "POST", f"/v1/campaigns/{campaign['id']}/{action}"
                )
                assert status == 409, action
    finally:
        relay.stop()
