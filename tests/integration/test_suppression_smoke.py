"""A first pass through the suppression service: join, unsubscribe by link, propagate."""

from __future__ import annotations

import datetime as dt
import uuid

from libs.common.topics import Topic
from tests.conftest import eventually


def join(contact_id: int, group_id: int, email: str) -> dict:
    return {
        "command_id": str(uuid.uuid4()),
        "type": "Join",
        "contact_id": contact_id,
        "email": email,
        "group_id": group_id,
        "state": "deliverable",
        "method": "system",
        "actor": "operator",
        "campaign_id": None,
        "issued_at": dt.datetime.now(dt.UTC),
    }


async def test_join_then_unsubscribe_by_link(suppression, kafka):
    api = suppression.api
    for group in (1, 2, 3):
        await kafka.send(Topic.SUPPRESSION_COMMANDS, 7, join(7, group, "u@example.jp"))
    await eventually(lambda: _members(api, 7, 3))
    link = await api.ok("GET", "/v1/unsubscribe-link?contact_id=7&group_id=2&campaign_id=c1")
    path = link["url"].split("://", 1)[1].split("/", 1)[1]
    status, page = await api.call("GET", "/" + path, token=None)
    assert status == 200 and "配信停止" in page
    assert (await api.ok("GET", "/v1/memberships/7/2"))["state"] == "deliverable"
    status, page = await api.call(
        "POST", "/" + path, token=None, data={"List-Unsubscribe": "One-Click"}
    )
    assert status == 200
    assert (await api.ok("GET", "/v1/memberships/7/2"))["state"] == "unsubscribed"
    assert (await api.ok("GET", "/v1/memberships/7/1"))["state"] == "deliverable"
    changes = await kafka.read(Topic.SUPPRESSION_CHANGES, until=lambda r: len(r) >= 4)
    assert [(c["group_id"], c["state"]) for c in changes][-1] == (2, "unsubscribed")


async def _members(api, contact_id, n):
    body = await api.ok("GET", f"/v1/memberships/{contact_id}")
    return len(body["items"]) == n
