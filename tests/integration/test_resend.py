"""Re-sending (F-28) through the real services: campaign A goes to 10 contacts, 3 open
(2 of them click) and 1 hard-bounces afterwards; a re-send of A to those who did not open
reaches exactly the 6 others, the bounced one refused by the can-send rule. A campaign
sent more than 3 months ago cannot be targeted by its recipients.

Opens, clicks and the bounce are published as the bounce processor publishes them
(``feedback.events``, ``bounce.events``); the scheduler's clock is a FakeClock.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter

from libs.common.topics import Topic
from tests.integration.test_campaign_pipeline import delivered
from tests.integration.test_contacts_projections import (
    bounce,
    consumed,
    feedback,
    publish_together,
    search_ids,
)
from tests.integration.test_scheduler import (
    campaign_body,
    category,
    fake_clock,
    group,
    people,
    reserved,
    status_of,
)
from tests.integration.test_sender import copy_holds


async def test_resend_to_non_openers(contacts, suppression, scheduler, sender, smtp_sink, kafka):
    clock = fake_clock(scheduler)
    members = await group(contacts)
    ids = await people(contacts, 10, members)  # p0..p9@example.jp
    await copy_holds(sender, "membership_copy", 10)
    cat = await category(scheduler)
    first = await reserved(scheduler, campaign_body(cat, clock, target={"group_id": members}))
    a = first["id"]
    clock.advance(minutes=10)
    await status_of(scheduler, a, "aggregating")
    everyone = {f"p{i}@example.jp": 1 for i in range(10)}
    assert delivered(smtp_sink) == everyone

    # p0, p1, p2 open (p0 and p1 also click); p9 hard-bounces afterwards.
    now = dt.datetime.now(dt.UTC)
    events = [(ids[i], feedback(ids[i], a, "open", now)) for i in range(3)]
    events += [(ids[i], feedback(ids[i], a, "click", now)) for i in range(2)]
    await publish_together(kafka, Topic.FEEDBACK_EVENTS, events)
    hard = {**bounce(ids[9], "invalid_address", now), "email": "p9@example.jp", "campaign_id": a}
    await kafka.send(Topic.BOUNCE_EVENTS, ids[9], hard)
    await consumed(contacts, [e["event_id"] for _, e in events] + [hard["event_id"]])
    await copy_holds(sender, "address_copy", 1)

    # The history conditions the re-send writes are contacts' F-05 filter language.
    not_opened = {
        "all": [
            {"history": {"event": "received", "campaign_id": a}},
            {"history": {"event": "opened", "campaign_id": a, "negate": True}},
        ]
    }
    assert await search_ids(contacts.api, not_opened) == set(ids[3:])

    schedule = {"scheduled_at": (clock.now() + dt.timedelta(minutes=5)).isoformat()}
    again = await scheduler.api.ok(
        "POST", f"/v1/campaigns/{a}/resend", {"recipients": "not_opened", **schedule}
    )
    assert again["resent_from"] == a
    assert again["target"] == {"group_id": None, "filter": not_opened, "saved_filter_id": None}
    copied = ("category_id", "from_address", "from_name", "reply_to", "subject", "body", "format")
    assert {k: again[k] for k in copied} == {k: first[k] for k in copied}
    await scheduler.api.ok("POST", f"/v1/campaigns/{again['id']}/reserve")
    await status_of(scheduler, again["id"], "scheduled")
    clock.advance(minutes=10)
    done = await status_of(scheduler, again["id"], "aggregating")
    assert done["success"] == 6 and done["error"] == 0 and done["unsent"] == 0
    # The bounced address is either left out of the frozen list (contacts knows its
    # delivery status) or refused by the sender at the last moment: never sent.
    assert done["planned"] - done["suppressed"] == 6
    assert delivered(smtp_sink) == Counter(everyone) + Counter(
        {f"p{i}@example.jp": 1 for i in range(3, 9)}
    )

    # Re-send by other engagement: the clickers; combined with another condition.
    clickers = await scheduler.api.ok(
        "POST",
        f"/v1/campaigns/{a}/resend",
        {
            "recipients": "clicked",
            "target": {
                "group_id": members,
                "filter": {"field": "star", "op": "eq", "value": False},
            },
            "scheduled_at": (clock.now() + dt.timedelta(minutes=5)).isoformat(),
        },
    )
    assert clickers["target"]["filter"]["all"][1] == {
        "history": {"event": "clicked", "campaign_id": a}
    }

    # More than 3 months after A was sent, it can no longer be a history target.
    clock.advance(days=100)
    late = {"scheduled_at": (clock.now() + dt.timedelta(minutes=5)).isoformat()}
    status, body = await scheduler.api.call(
        "POST", f"/v1/campaigns/{a}/resend", {"recipients": "not_opened", **late}
    )
    assert status == 400, body
    assert "last 3 months" in body["error"] and body["field"] == "target"
    status, body = await scheduler.api.call(
        "POST",
        "/v1/campaigns",
        campaign_body(cat, clock, target={"filter": not_opened}),
    )
    assert status == 400 and "last 3 months" in body["error"], body
    # A re-send with a new target (not A's history) is still possible.
    await scheduler.api.ok(
        "POST", f"/v1/campaigns/{a}/resend", {"target": {"group_id": members}, **late}
    )
