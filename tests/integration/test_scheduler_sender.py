"""A campaign through the real services: contacts freezes the list, the scheduler releases
it, the sender delivers to the SMTP sink and reports back, the scheduler counts (§9).

The scheduler's clock is a FakeClock (see test_scheduler.py): the test moves it past
``scheduled_at`` instead of waiting.
"""

from __future__ import annotations

from email.header import decode_header, make_header
from email.message import Message
from typing import Any

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
