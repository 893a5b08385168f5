"""Recipient snapshots (SPEC §9): snapshot.requests → campaign.recipients, end to end.

The acceptance criterion: the recipient snapshot of a target equals the search result for
the same filter. A group target is the search for its deliverable members (and its
unsubscribed ones with include_unsubscribed); addresses whose delivery_status stops every
send (invalid_address, error, bounced, spam) are left out of a snapshot, never out of a
search.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any

from libs.common.topics import Topic
from tests.integration.test_contacts_api import define_fields, ids_of
from tests.integration.test_contacts_projections import (
    bounce,
    consumed,
    membership_change,
    publish_together,
)

STOPPED = ["invalid_address", "error", "bounced", "spam"]


def snapshot_request(**target: Any) -> dict[str, Any]:
    request = {
        "request_id": str(uuid.uuid4()),
        "campaign_id": str(uuid.uuid4()),
        "group_id": None,
        "filter_json": None,
        "saved_filter_id": None,
        "include_unsubscribed": False,
        "dedupe": "none",
        "requested_at": dt.datetime.now(dt.UTC),
    }
    request.update(target)
    return request


async def snapshots(
    kafka: Any, requests: list[dict[str, Any]]
) -> dict[str, tuple[list[dict[str, Any]], dict[str, Any]]]:
    """Publish ``requests`` and read every answer: request_id → (recipients, end marker)."""
    await publish_together(
        kafka, Topic.SNAPSHOT_REQUESTS, [(r["campaign_id"], r) for r in requests]
    )
    wanted = {r["request_id"] for r in requests}

    def complete(records: list[dict[str, Any]]) -> bool:
        return wanted <= {r["request_id"] for r in records if r["kind"] == "end"}

    records = await kafka.read(Topic.CAMPAIGN_RECIPIENTS, until=complete)
    answers = {}
    for request in requests:
        mine = [r for r in records if r["request_id"] == request["request_id"]]
        assert all(r["campaign_id"] == request["campaign_id"] for r in mine)
        *recipients, end = mine  # one key, one partition: the end marker comes last
        assert end["kind"] == "end", end
        assert all(r["kind"] == "recipient" for r in recipients)
        answers[request["request_id"]] = (recipients, end)
    return answers


def complete_list(answer: tuple[list[dict[str, Any]], dict[str, Any]]) -> list[int]:
    """The recipient ids of a successful snapshot, after checking its numbering."""
    recipients, end = answer
    assert end["error"] is None, end
    assert [r["seq"] for r in recipients] == list(range(len(recipients)))
    assert (end["seq"], end["total"]) == (len(recipients), len(recipients))
    return [r["contact_id"] for r in recipients]


#: (name, company, tags, plan, seats, star, in the group) of contacts c0..c7
PEOPLE = [
    ("相川 一郎", "株式会社あおば", ["vip"], "premium", 10, True, True),
    ("伊藤 二郎", None, ["vip"], "free", 3, False, True),  # unsubscribed in the group
    ("上田 三郎", None, ["vip"], "premium", 2, False, True),  # banned in the group
    ("遠藤 四郎", None, ["vip"], "premium", 5, True, False),  # invalid_address
    ("小川 五郎", "小川商店", [], "business", 50, False, True),
    ("加藤 六郎", None, ["vip"], "premium", 12, True, True),
    ("木村 七郎", None, ["vip"], None, 1, False, False),
    ("工藤 八郎", None, [], "free", None, False, True),  # temporary_error: still sent
]


async def test_snapshot_of_each_target_equals_the_search(contacts, kafka):
    api = contacts.api
    await define_fields(api)
    group = (await api.ok("POST", "/v1/groups", {"name": "メルマガ会員"}))["id"]
    c: list[int] = []
    for i, (name, company, tags, plan, seats, star, _) in enumerate(PEOPLE):
        custom = {k: v for k, v in (("plan", plan), ("seats", seats)) if v is not None}
        c.append(
            (
                await api.ok(
                    "POST",
                    "/v1/contacts",
                    {
                        "email": f"c{i}@example.jp",
                        "name": name,
                        "company": company,
                        "tags": tags,
                        "star": star,
                        "custom_fields": custom,
                    },
                )
            )["id"]
        )
    await api.ok(
        "POST",
        f"/v1/groups/{group}/members",
        {"contact_ids": [c[i] for i, row in enumerate(PEOPLE) if row[6]]},
    )
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5)
    changes = [
        membership_change(c[1], group, "unsubscribed", later, 2, method="form"),
        membership_change(c[2], group, "banned", later, 2),
    ]
    await publish_together(
        kafka, Topic.SUPPRESSION_CHANGES, [(x["contact_id"], x) for x in changes]
    )
    bounces = [
        bounce(c[3], "invalid_address", later),
        bounce(c[7], "temporary_error", later, action="counted"),
    ]
    await publish_together(kafka, Topic.BOUNCE_EVENTS, [(x["contact_id"], x) for x in bounces])
    await consumed(contacts, [x["change_id"] for x in changes] + [x["event_id"] for x in bounces])

    deliverable = {"membership": {"group_id": group, "state": "deliverable"}}
    unsubscribed = {"membership": {"group_id": group, "state": "unsubscribed"}}
    vip = {"field": "tags", "op": "include_any", "value": ["vip"]}
    by_plan = {
        "any": [
            {"field": "custom.plan", "op": "eq", "value": "business"},
            {
                "all": [
                    {"field": "custom.plan", "op": "eq", "value": "premium"},
                    {"field": "custom.seats", "op": "gte", "value": 10},
                ]
            },
        ]
    }
    no_vip = await api.ok(
        "POST",
        "/v1/filters",
        {"name": "VIP以外", "filter": {"field": "tags", "op": "exclude_any", "value": ["vip"]}},
    )
    starred = await api.ok(
        "POST",
        "/v1/filters",
        {"name": "スター", "filter": {"field": "star", "op": "eq", "value": True}},
    )
    big_in_group = await api.ok(
        "POST",
        "/v1/filters",
        {
            "name": "大口",
            "group_id": group,
            "filter": {
                "all": [
                    {"membership": {"group_id": group}},
                    {"field": "custom.seats", "op": "gte", "value": 10},
                ]
            },
        },
    )
    vip_starred = {"all": [vip, {"field": "star", "op": "eq", "value": True}]}

    # (target, the same selection as a search, the search's group scope)
    cases = {
        "group": (dict(group_id=group), deliverable, None),
        "group+filter": (
            dict(group_id=group, filter_json=json.dumps(vip)),
            {"all": [deliverable, vip]},
            None,
        ),
        "filter": (dict(filter_json=json.dumps(by_plan, ensure_ascii=False)), by_plan, None),
        "saved filter": (dict(saved_filter_id=no_vip["id"]), {"saved_filter": no_vip["id"]}, None),
        "group+saved filter": (
            dict(group_id=group, saved_filter_id=starred["id"]),
            {"all": [deliverable, {"saved_filter": starred["id"]}]},
            None,
        ),
        "group+scoped saved filter": (
            dict(group_id=group, saved_filter_id=big_in_group["id"]),
            {"all": [deliverable, {"saved_filter": big_in_group["id"]}]},
            group,
        ),
        "include_unsubscribed": (
            dict(group_id=group, include_unsubscribed=True),
            {"any": [deliverable, unsubscribed]},
            None,
        ),
    }
    requests = {name: snapshot_request(**target) for name, (target, _, _) in cases.items()}
    requests["stopped status"] = snapshot_request(filter_json=json.dumps(vip_starred))
    requests["banned anywhere"] = snapshot_request(filter_json=json.dumps(vip))
    answers = await snapshots(kafka, list(requests.values()))
    got = {name: complete_list(answers[r["request_id"]]) for name, r in requests.items()}

    for name, (_, same_filter, scope) in cases.items():
        extra = {"group_id": scope} if scope else {}
        assert got[name] == await ids_of(api, same_filter, **extra), name
    banned_anywhere = got.pop("banned anywhere")
    assert got == {
        "group": [c[0], c[4], c[5], c[7]],
        "group+filter": [c[0], c[5]],
        "filter": [c[0], c[4], c[5]],
        "saved filter": [c[4], c[7]],
        "group+saved filter": [c[0], c[5]],
        "group+scoped saved filter": [c[0], c[4], c[5]],
        "include_unsubscribed": [c[0], c[1], c[4], c[5], c[7]],  # never the banned c2
        "stopped status": [c[0], c[5]],
    }
    # a filter-only campaign never reaches a contact banned in some group (c2), nor c3
    # whose address is invalid
    all_vip = await ids_of(api, vip)
    assert {c[2], c[3]} <= set(all_vip)
    assert banned_anywhere == [i for i in all_vip if i not in (c[2], c[3])]
    # (e) the search still finds the invalid address; the snapshot leaves it out
    assert await ids_of(api, vip_starred) == [c[0], c[3], c[5]]
    assert got["stopped status"] == await ids_of(
        api,
        {"all": [vip_starred, {"not": {"field": "delivery_status", "op": "in", "value": STOPPED}}]},
    )

    recipients, _ = answers[requests["include_unsubscribed"]["request_id"]]
    assert [
        (r["contact_id"], r["email"], r["group_id"], r["membership_state"]) for r in recipients
    ] == [
        (c[0], "c0@example.jp", group, "deliverable"),
        (c[1], "c1@example.jp", group, "unsubscribed"),
        (c[4], "c4@example.jp", group, "deliverable"),
        (c[5], "c5@example.jp", group, "deliverable"),
        (c[7], "c7@example.jp", group, "deliverable"),
    ]
    recipients, _ = answers[requests["filter"]["request_id"]]
    assert {(r["group_id"], r["membership_state"]) for r in recipients} == {(None, None)}

    # merge values are the contact as it was at the snapshot
    first = {
        r["contact_id"]: r["merge_values"] for r in answers[requests["group"]["request_id"]][0]
    }
    shown = (
        "contact_id",
        "email",
        "name",
        "company",
        "tags",
        "sales_status",
        "score",
        "custom.plan",
        "custom.seats",
    )
    assert {k: first[c[0]].get(k) for k in shown} == {
        "contact_id": str(c[0]),
        "email": "c0@example.jp",
        "name": "相川 一郎",
        "company": "株式会社あおば",
        "tags": "vip",
        "sales_status": "open",
        "score": "0",
        "custom.plan": "premium",
        "custom.seats": "10",
    }
    assert {k: first[c[7]].get(k) for k in shown} == {
        "contact_id": str(c[7]),
        "email": "c7@example.jp",
        "name": "工藤 八郎",
        "company": None,  # empty fields are left out: they render as ""
        "tags": None,
        "sales_status": "open",
        "score": "0",
        "custom.plan": "free",
        "custom.seats": None,
    }

    await api.ok(
        "PATCH",
        f"/v1/contacts/{c[0]}",
        {"name": "相川 一郎（改）", "company": "", "custom_fields": {"seats": 11, "plan": ""}},
    )
    again = snapshot_request(group_id=group)
    answer = (await snapshots(kafka, [again]))[again["request_id"]]
    assert complete_list(answer) == got["group"]
    now = {r["contact_id"]: r["merge_values"] for r in answer[0]}
    assert {k: now[c[0]].get(k) for k in shown} == {
        "contact_id": str(c[0]),
        "email": "c0@example.jp",
        "name": "相川 一郎（改）",
        "company": None,
        "tags": "vip",
        "sales_status": "open",
        "score": "0",
        "custom.plan": None,
        "custom.seats": "11",
    }
    assert first[c[0]]["name"] == "相川 一郎"  # the earlier snapshot kept its values


async def test_an_address_stopped_by_soft_bounces_is_shown_searchable_and_left_out(contacts, kafka):
    """Five soft bounces in a row stop an address: the bounce processor says so with the
    status バウンス ("bounced"). The contact shows it, search finds it by its label, and a
    campaign's frozen list leaves it out up front — as it does a hard bounce or a
    complaint — while an address with one soft bounce (一時エラー) is still sent to."""
    api = contacts.api
    group = (await api.ok("POST", "/v1/groups", {"name": "会員"}))["id"]
    ok, stopped, soft, hard = [
        (await api.ok("POST", "/v1/contacts", {"email": f"s{i}@example.jp"}))["id"]
        for i in range(4)
    ]
    await api.ok("POST", f"/v1/groups/{group}/members", {"contact_ids": [ok, stopped, soft, hard]})
    now = dt.datetime.now(dt.UTC)
    events = [
        bounce(stopped, "temporary_error", now, action="counted"),
        bounce(stopped, "bounced", now),  # the fifth soft bounce in a row
        bounce(soft, "temporary_error", now, action="counted"),
        bounce(hard, "invalid_address", now),
    ]
    await publish_together(kafka, Topic.BOUNCE_EVENTS, [(e["contact_id"], e) for e in events])
    await consumed(contacts, [e["event_id"] for e in events])

    assert (await api.ok("GET", f"/v1/contacts/{stopped}"))["delivery_status"] == "bounced"
    label = {"field": "delivery_status", "op": "eq", "value": "バウンス"}
    assert await ids_of(api, label) == [stopped]
    request = snapshot_request(group_id=group)
    answers = await snapshots(kafka, [request])
    assert complete_list(answers[request["request_id"]]) == [ok, soft]


async def test_snapshot_of_a_bad_target_ends_with_the_error(contacts, kafka):
    api = contacts.api
    group = (await api.ok("POST", "/v1/groups", {"name": "会員"}))["id"]
    member = (await api.ok("POST", "/v1/contacts", {"email": "m@example.jp"}))["id"]
    await api.ok("POST", f"/v1/groups/{group}/members", {"contact_ids": [member]})
    scoped = await api.ok(
        "POST",
        "/v1/filters",
        {"name": "会員限定", "group_id": group, "filter": {"membership": {"group_id": group}}},
    )
    bad = {
        "unknown field": (
            snapshot_request(filter_json=json.dumps({"field": "nope", "op": "eq", "value": 1})),
            "'nope'",
        ),
        "not json": (snapshot_request(filter_json="{not json"), ""),
        "unknown group": (snapshot_request(group_id=999999), "999999"),
        "unknown saved filter": (snapshot_request(saved_filter_id=999999), "999999"),
        "scoped filter outside its group": (
            snapshot_request(saved_filter_id=scoped["id"]),
            f"scoped to group {group}",
        ),
        "no target": (snapshot_request(), "target"),
    }
    good = snapshot_request(group_id=group)
    answers = await snapshots(kafka, [request for request, _ in bad.values()] + [good])
    for name, (request, mentions) in bad.items():
        recipients, end = answers[request["request_id"]]
        assert recipients == [], name
        assert (end["seq"], end["total"]) == (0, 0), name
        assert end["error"], name
        assert mentions in end["error"], (name, end["error"])
    assert complete_list(answers[good["request_id"]]) == [member]  # the bad ones held nothing up
