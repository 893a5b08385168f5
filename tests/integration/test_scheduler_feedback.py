"""Campaign statistics from ``feedback.events`` (F-34), and the per-campaign tracking switches
the scheduler hands to the sender. The bounce processor is played by the test: it publishes
opens and clicks with the kafka fixture."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from libs.common.topics import Topic
from tests.conftest import eventually
from tests.integration.test_contacts_projections import feedback as opened_or_clicked
from tests.integration.test_contacts_projections import publish_together
from tests.integration.test_scheduler import (
    campaign_body,
    category,
    fake_clock,
    group,
    people,
    reserved,
    send_requests,
)

STATISTICS = ("opens", "clicks", "unique_opens", "unique_clicks")


def feedback(kind: str, campaign_id: str, contact_id: int) -> dict[str, Any]:
    return opened_or_clicked(contact_id, campaign_id, kind, dt.datetime.now(dt.UTC))


async def statistics(scheduler: Any, campaign_id: str, wanted: dict[str, int]) -> None:
    """Wait until the campaign shows ``wanted``, in its own view and in the list."""

    async def shown() -> bool:
        body = await scheduler.api.ok("GET", f"/v1/campaigns/{campaign_id}")
        assert {k: body[k] for k in STATISTICS} == wanted
        listed = await scheduler.api.ok("GET", "/v1/campaigns")
        [item] = [c for c in listed["items"] if c["id"] == campaign_id]
        assert {k: item[k] for k in STATISTICS} == wanted
        return True

    await eventually(shown)


async def test_opens_and_clicks_are_counted_once_each(scheduler, contacts, kafka):
    clock = fake_clock(scheduler)
    members = await group(contacts)
    p = await people(contacts, 3, members)
    outsider = (await people(contacts, 1, first=100))[0]
    cat = await category(scheduler)
    campaign = await reserved(scheduler, campaign_body(cat, clock, target={"group_id": members}))
    cid = campaign["id"]
    assert {k: campaign[k] for k in STATISTICS} == dict.fromkeys(STATISTICS, 0)

    first_open = feedback("open", cid, p[0])
    await publish_together(
        kafka,
        Topic.FEEDBACK_EVENTS,
        [
            (e["contact_id"], e)
            for e in [
                first_open,
                feedback("open", cid, p[0]),  # opened again: a total, not unique
                feedback("click", cid, p[0]),
                feedback("open", cid, p[1]),
                first_open,  # redelivered in the same batch
                feedback("open", cid, outsider),  # not on the frozen list: not counted
                feedback("click", str(uuid.uuid4()), p[2]),  # a campaign we do not know
            ]
        ],
    )
    await statistics(
        scheduler, cid, {"opens": 3, "clicks": 1, "unique_opens": 2, "unique_clicks": 1}
    )

    # Later: the first open redelivered once more, new events of known recipients.
    await publish_together(
        kafka,
        Topic.FEEDBACK_EVENTS,
        [
            (p[0], first_open),
            (p[1], feedback("click", cid, p[1])),
            (p[1], feedback("click", cid, p[1])),
            (p[0], feedback("open", cid, p[0])),
        ],
    )
    await statistics(
        scheduler, cid, {"opens": 4, "clicks": 3, "unique_opens": 2, "unique_clicks": 2}
    )


async def test_a_click_without_a_pixel_counts_as_a_unique_open(scheduler, contacts, kafka):
    """Images blocked, link clicked: the recipient read the mail. Unique opens count them;
    opens stays the number of pixel loads."""
    clock = fake_clock(scheduler)
    members = await group(contacts)
    p = await people(contacts, 3, members)
    cat = await category(scheduler)
    campaign = await reserved(scheduler, campaign_body(cat, clock, target={"group_id": members}))
    cid = campaign["id"]
    await publish_together(
        kafka,
        Topic.FEEDBACK_EVENTS,
        [
            (p[0], feedback("click", cid, p[0])),  # no pixel: images blocked
            (p[1], feedback("open", cid, p[1])),
            (p[1], feedback("click", cid, p[1])),  # both: one unique open
        ],
    )
    await statistics(
        scheduler, cid, {"opens": 1, "clicks": 2, "unique_opens": 2, "unique_clicks": 2}
    )
    # p[0]'s images load later: a pixel load, not a new reader
    await publish_together(kafka, Topic.FEEDBACK_EVENTS, [(p[0], feedback("open", cid, p[0]))])
    await statistics(
        scheduler, cid, {"opens": 2, "clicks": 2, "unique_opens": 2, "unique_clicks": 2}
    )


async def test_tracking_switches_reach_the_send_requests(scheduler, contacts, kafka):
    clock = fake_clock(scheduler)
    members = await group(contacts)
    await people(contacts, 2, members)
    cat = await category(scheduler)
    status, answer = await scheduler.api.call(
        "POST",
        "/v1/campaigns",
        campaign_body(cat, clock, target={"group_id": members}, track_clicks="no"),
    )
    assert status == 400 and answer["field"] == "track_clicks"
    body = campaign_body(cat, clock, target={"group_id": members}, track_clicks=False)
    campaign = await reserved(scheduler, body)
    assert (campaign["track_opens"], campaign["track_clicks"]) == (True, False)
    clock.advance(minutes=10)
    requests = await send_requests(kafka, campaign["id"], 2)
    named = {r["content_id"] for r in requests}
    contents = [
        c for c in await kafka.read_to_end(Topic.CAMPAIGN_CONTENT) if c["content_id"] in named
    ]
    assert {(c["content"]["track_opens"], c["content"]["track_clicks"]) for c in contents} == {
        (True, False)
    }
