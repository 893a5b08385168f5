"""A campaign through the real services: contacts freezes the list, the scheduler releases
it, the sender delivers to the SMTP sink and reports back, the scheduler counts (§9).

The scheduler's clock is a FakeClock (see test_scheduler.py): the test moves it past
``scheduled_at`` instead of waiting.
"""

from __future__ import annotations

from email.header import decode_header, make_header
from email.message import Message
from typing import Any

import aiohttp

from services.scheduler.clock import FakeClock
from tests.conftest import eventually
from tests.integration.test_scheduler import (
    campaign_body,
    category,
    counters,
    fake_clock,
    group,
    people,
    reserved,
    status_of,
)


def subject(mail: Message) -> str:
    return str(make_header(decode_header(str(mail["Subject"]))))


async def mails(sink: Any, n: int) -> list[Message]:
    async def arrived() -> list[Message]:
        got = sink.messages()
        return got if len(got) >= n else []

    return await eventually(arrived)


async def test_campaign_and_test_send_through_the_sender(scheduler, contacts, sender, smtp_sink):
    clock: FakeClock = fake_clock(scheduler)
    members = await group(contacts)
    await people(contacts, 30, members)
    cat = await category(scheduler)
    campaign = await reserved(scheduler, campaign_body(cat, clock, target={"group_id": members}))
    cid = campaign["id"]

    # A test send first: delivered with [TEST], never counted.
    await scheduler.api.ok("POST", f"/v1/campaigns/{cid}/test-send", {"addresses": "qa@example.jp"})
    [test_mail] = await mails(smtp_sink, 1)
    assert str(test_mail["To"]) == "qa@example.jp"
    assert subject(test_mail) == "[TEST] 山田 太郎様へ 11月のお知らせ"

    clock.advance(minutes=10)
    done = await status_of(scheduler, cid, "aggregating")
    assert counters(done) == {
        "planned": 30,
        "success": 30,
        "error": 0,
        "suppressed": 0,
        "unsent": 0,
    }
    delivered = await mails(smtp_sink, 31)
    by_to = {str(m["To"]): m for m in delivered}
    assert len(by_to) == 31
    assert subject(by_to["p7@example.jp"]) == "顧客 7様へ 11月のお知らせ"
    assert by_to["p7@example.jp"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


async def test_a_test_mails_unsubscribe_link_opens_a_preview_that_changes_nothing(
    scheduler, contacts, sender, suppression, smtp_sink
):
    """An operator checking a test mail clicks its unsubscribe link: a page says this was a
    test and that nothing changed (it used to say the link was invalid), and pressing its
    button — or a mail client's one-click POST — stops no membership."""
    clock: FakeClock = fake_clock(scheduler)
    members = await group(contacts)
    first, *_ = await people(contacts, 2, members)
    cat = await category(scheduler)
    campaign = await reserved(scheduler, campaign_body(cat, clock, target={"group_id": members}))
    await scheduler.api.ok(
        "POST",
        f"/v1/campaigns/{campaign['id']}/test-send",
        {"addresses": "qa@example.jp", "contact_id": first},
    )
    [test_mail] = await mails(smtp_sink, 1)
    url = str(test_mail["List-Unsubscribe"]).strip("<>").split(">")[0]
    token = url.rsplit("/u/", 1)[1]
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{suppression.api.base}/u/{token}") as page:
            assert page.status == 200
            assert "テスト送信" in await page.text()
        for body in ({"confirm": "1"}, {"List-Unsubscribe": "One-Click"}):
            async with http.post(f"{suppression.api.base}/u/{token}", data=body) as done:
                assert done.status == 200
                text = await done.text()
                assert "配信停止は行われていません" in text and "nothing was changed" in text
    membership = await suppression.api.ok("GET", f"/v1/memberships/{first}/{members}")
    assert membership["state"] == "deliverable"
