"""The suppression service end to end: real service, real PostgreSQL, real Kafka-protocol broker.

Commands on ``suppression.commands`` (F-10, F-11), the operator API for memberships, the
sync policy with its backfill job and completion mail (F-12), the blacklist and the black
flag (F-14), address suppressions from ``bounce.events`` (F-15) and the can-send decision
(F-16). Every change is checked where others see it: on ``suppression.changes``.
"""

from __future__ import annotations

import datetime as dt
import itertools
import uuid
from collections import defaultdict
from typing import Any

from libs.common.topics import Topic
from tests.conftest import OPERATOR_TOKEN, VIEWER_TOKEN, eventually, running
from tests.integration.test_contacts_api import published

# Schema-valid records (schemas/avro/*.avsc) ----------------------------------------------------


def command(
    kind: str,
    contact_id: int | None,
    group_id: int | None = None,
    *,
    state: str | None = None,
    method: str | None = None,
    actor: str | None = "operator",
    email: str | None = None,
    campaign_id: str | None = None,
    command_id: str | None = None,
) -> dict[str, Any]:
    return {
        "command_id": command_id or str(uuid.uuid4()),
        "type": kind,
        "contact_id": contact_id,
        "email": email,
        "group_id": group_id,
        "state": state,
        "method": method,
        "actor": actor,
        "campaign_id": campaign_id,
        "issued_at": dt.datetime.now(dt.UTC),
    }


def join(contact_id: int, group_id: int, *, auto_stop: bool = False, **extra: Any) -> dict:
    """A Join as contacts sends it (auto_stop: registered already unsubscribed)."""
    state, method = ("unsubscribed", "auto_stop") if auto_stop else ("deliverable", "system")
    return command("Join", contact_id, group_id, **{"state": state, "method": method, **extra})


def contact_changed(contact_id: int, email: str, version: int = 1) -> dict[str, Any]:
    """A contacts.changelog record (op upserted) carrying the contact's address."""
    now = dt.datetime.now(dt.UTC)
    return {
        "contact_id": contact_id,
        "op": "upserted",
        "version": version,
        "changed_at": now,
        "contact": {
            "email": email,
            "external_id": None,
            "name": None,
            "name_kana": None,
            "company": None,
            "department": None,
            "title": None,
            "phone": None,
            "address": None,
            "website": None,
            "memo": None,
            "acquired_at": None,
            "acquisition_channel": None,
            "sales_status": "open",
            "engagement": None,
            "star": False,
            "tags": [],
            "custom_fields": {},
            "score": 0,
            "delivery_status": "unconfirmed",
            "created_at": now,
            "updated_at": now,
        },
    }


def bounce_event(
    contact_id: int, email: str, action: str, delivery_status: str | None = None
) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "contact_id": contact_id,
        "email": email,
        "campaign_id": None,
        "classification": {"complained": "spam"}.get(action, "invalid_address"),
        "hard": action == "bounced",
        "action": action,
        "delivery_status": delivery_status,
        "diagnostic": "550 5.1.1 user unknown" if action == "bounced" else None,
        "occurred_at": dt.datetime.now(dt.UTC),
    }


# Helpers ---------------------------------------------------------------------------------------


async def send_all(kafka: Any, topic: Topic, records: list[tuple[Any, dict[str, Any]]]) -> None:
    for key, value in records:
        await kafka.send(topic, key, value)


async def membership(api: Any, contact_id: int, group_id: int) -> dict[str, Any] | None:
    status, body = await api.call("GET", f"/v1/memberships/{contact_id}/{group_id}")
    assert status in (200, 404), body
    return body if status == 200 else None


async def wait_member(
    api: Any, contact_id: int, group_id: int, state: str | None = None
) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        found = await membership(api, contact_id, group_id)
        if found is not None and state is not None and found["state"] != state:
            return None
        return found

    return await eventually(check)


async def states(api: Any, contact_id: int) -> dict[int, tuple[str, str]]:
    """group_id → (state, method) of every membership of a contact."""
    body = await api.ok("GET", f"/v1/memberships/{contact_id}")
    return {m["group_id"]: (m["state"], m["method"]) for m in body["items"]}


def entity(change: dict[str, Any]) -> tuple[Any, ...]:
    if change["kind"] == "membership":
        return ("membership", change["contact_id"], change["group_id"])
    if change["kind"] == "contact_black":
        return ("contact_black", change["contact_id"])
    return (change["kind"], change["email"])


def assert_versions_increase(changes: list[dict[str, Any]]) -> None:
    """Per entity, in the order published, versions strictly increase."""
    versions: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    for change in changes:
        versions[entity(change)].append(change["version"])
    for key, seen in versions.items():
        assert all(a < b for a, b in itertools.pairwise(seen)), (key, seen)


def of_contact(changes: list[dict[str, Any]], contact_id: int) -> list[tuple[Any, ...]]:
    return [
        (c["group_id"], c["state"], c["method"])
        for c in changes
        if c["kind"] == "membership" and c["contact_id"] == contact_id
    ]


async def dead_letters(kafka: Any, topic: Topic, n: int) -> list[tuple[str, str]]:
    records = await kafka.read(topic.dlq, until=lambda r: len(r) >= n)
    return [
        (r.key.decode(), dict(r.headers)["dlq-reason"].decode())
        for r in records
        if dict(r.headers).get("dlq-stage") == b"process"
    ]


def legacy(answer: tuple[int, Any]) -> tuple[int, Any]:
    """A problem answer as the first API's clients read it: its status, error and field."""
    status, body = answer
    if isinstance(body, dict) and "type" in body and "error" in body:
        return status, {k: body[k] for k in ("error", "field") if k in body}
    return answer


def no_membership(contact_id: int, group_id: int) -> str:
    """The 404 for a membership not recorded here: never "not a member" (issue 18 item 4), as
    it may be a join contacts made a moment ago."""
    return (
        f"contact {contact_id} has no membership in group or plan {group_id} here: not a "
        "member, or a join made a moment ago that is still being applied (retry in a moment)"
    )


def path_of(url: str) -> str:
    return "/" + url.split("://", 1)[1].split("/", 1)[1]


async def unsubscribe_by_link(api: Any, contact_id: int, group_id: int, campaign: str) -> None:
    link = await api.ok(
        "GET",
        f"/v1/unsubscribe-link?contact_id={contact_id}&group_id={group_id}&campaign_id={campaign}",
    )
    status, _ = await api.call(
        "POST", path_of(link["url"]), token=None, data={"List-Unsubscribe": "One-Click"}
    )
    assert status == 200


# Commands ---------------------------------------------------------------------------------------


async def test_commands_join_leave_duplicates_and_dead_letters(suppression, kafka):
    api = suppression.api
    duplicate = join(1, 12)
    commands = [
        (1, join(1, 10)),
        (1, join(1, 11, auto_stop=True)),
        (1, duplicate),
        (1, {**duplicate, "group_id": 13}),  # the same command id again: no second effect
        (1, duplicate),
        (1, join(1, 10)),  # an existing membership is left as it is
        (1, join(1, 14)),
        (1, command("Leave", 1, 14)),
        (1, join(1, 19)),  # the last of contact 1: once it is there, all before it are done
        (2, join(2, 20)),
        (2, command("SetState", 2, 20, state="banned", actor="operator")),
        # a reader lifting a ban: refused with the rule, dead-lettered, and the next applies
        (2, command("SetState", 2, 20, state="deliverable", actor="reader")),
        (2, join(2, 21)),
        (3, command("SetState", 3, 30, state="unsubscribed", actor="upstream")),
        (3, join(3, 31, method="bogus")),
        (3, join(3, 32)),
    ]
    await send_all(kafka, Topic.SUPPRESSION_COMMANDS, commands)

    assert await wait_member(api, 2, 21)
    assert await wait_member(api, 3, 32)
    assert await wait_member(api, 1, 19)
    dead = await dead_letters(kafka, Topic.SUPPRESSION_COMMANDS, 3)
    assert sorted(dead) == [
        ("2", "a banned (配信禁止) membership is changed by an operator only"),
        ("3", no_membership(3, 30)),
        ("3", "method must be one of form, system, auto_sync, auto_stop, upstream"),
    ]

    assert await states(api, 1) == {
        10: ("deliverable", "system"),
        11: ("unsubscribed", "auto_stop"),
        12: ("deliverable", "system"),
        19: ("deliverable", "system"),
    }
    assert await states(api, 2) == {20: ("banned", "system"), 21: ("deliverable", "system")}
    assert await states(api, 3) == {32: ("deliverable", "system")}
    assert await membership(api, 1, 13) is None
    status, body = await api.call("GET", "/v1/memberships/1/14")
    assert legacy((status, body)) == (
        404,
        {"error": no_membership(1, 14)},
    )

    changes = await published(suppression, kafka, Topic.SUPPRESSION_CHANGES)
    assert of_contact(changes, 1) == [
        (10, "deliverable", "system"),
        (11, "unsubscribed", "auto_stop"),
        (12, "deliverable", "system"),
        (14, "deliverable", "system"),
        (14, "left", "system"),
        (19, "deliverable", "system"),
    ]
    assert of_contact(changes, 2) == [
        (20, "deliverable", "system"),
        (20, "banned", "system"),
        (21, "deliverable", "system"),
    ]
    assert of_contact(changes, 3) == [(32, "deliverable", "system")]
    assert {c["kind"] for c in changes} == {"membership"}
    assert_versions_increase(changes)


async def test_operator_api_for_memberships(suppression, kafka):
    api = suppression.api
    await send_all(
        kafka, Topic.SUPPRESSION_COMMANDS, [(5, join(5, 1)), (5, join(5, 2)), (6, join(6, 1))]
    )
    for contact_id, group_id in ((5, 1), (5, 2), (6, 1)):
        await wait_member(api, contact_id, group_id)

    got = await api.ok("GET", "/v1/memberships/5/1", token=VIEWER_TOKEN)
    assert (got["contact_id"], got["group_id"], got["state"], got["method"]) == (
        5,
        1,
        "deliverable",
        "system",
    )
    # an operator can set any state, in any order, including lifting a ban
    seen = []
    for state in ("banned", "deliverable", "unsubscribed", "banned", "unsubscribed"):
        body = await api.ok("PUT", "/v1/memberships/5/1", {"state": state}, token=OPERATOR_TOKEN)
        assert (body["state"], body["method"]) == (state, "system")
        seen.append(body["version"])
    assert seen == sorted(set(seen))
    same = await api.ok("PUT", "/v1/memberships/5/1", {"state": "unsubscribed"})
    assert same["version"] == seen[-1]  # no change, no new version

    refusals = [
        ("PUT", "/v1/memberships/5/99", {"state": "banned"}, OPERATOR_TOKEN),
        ("GET", "/v1/memberships/7/1", None, VIEWER_TOKEN),
        ("PUT", "/v1/memberships/5/1", {"state": "paused"}, OPERATOR_TOKEN),
        ("PUT", "/v1/memberships/5/1", {}, OPERATOR_TOKEN),
        ("PUT", "/v1/memberships/x/1", {"state": "banned"}, OPERATOR_TOKEN),
        ("PUT", "/v1/memberships/5/1", {"state": "deliverable"}, VIEWER_TOKEN),
        ("PUT", "/v1/memberships/5/1", {"state": "deliverable"}, None),
    ]
    answers = [legacy(await api.call(m, p, body, token=t)) for m, p, body, t in refusals]
    assert answers == [
        (404, {"error": no_membership(5, 99)}),
        (404, {"error": no_membership(7, 1)}),
        (
            400,
            {"error": "state must be one of deliverable, unsubscribed, banned", "field": "state"},
        ),
        (
            400,
            {"error": "state must be one of deliverable, unsubscribed, banned", "field": "state"},
        ),
        (400, {"error": "contact_id must be an integer", "field": "contact_id"}),
        (403, {"error": "role 'viewer' may not do this; 'operator' or higher is required"}),
        (401, {"error": "missing or unknown bearer token"}),
    ]
    assert await states(api, 5) == {1: ("unsubscribed", "system"), 2: ("deliverable", "system")}
    assert await states(api, 6) == {1: ("deliverable", "system")}

    changes = await published(suppression, kafka, Topic.SUPPRESSION_CHANGES)
    assert of_contact(changes, 5) == [
        (1, "deliverable", "system"),
        (2, "deliverable", "system"),
        (1, "banned", "system"),
        (1, "deliverable", "system"),
        (1, "unsubscribed", "system"),
        (1, "banned", "system"),
        (1, "unsubscribed", "system"),
    ]
    assert [c["version"] for c in changes if c["contact_id"] == 5 and c["group_id"] == 1][
        1:
    ] == seen
    assert_versions_increase(changes)


# Sync policy (F-12) ---------------------------------------------------------------------------

OPERATOR_EMAIL = "ops@tayori.example.jp"


async def wait_job_done(api: Any, job_id: str) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        job = await api.ok("GET", f"/v1/sync-jobs/{job_id}")
        return job if job["status"] == "done" else None

    return await eventually(done)


async def test_unsubscribe_sync_off_then_on_with_backfill_job(stack, database, prefix, kafka):
    async with running(
        "suppression", stack, database, prefix, operator_email=OPERATOR_EMAIL
    ) as suppression:
        api = suppression.api
        a, b, c, d = 101, 102, 103, 104
        joins = [(x, join(x, g)) for x in (a, b, c) for g in (1, 2, 3)]
        joins += [(d, join(d, 1)), (d, join(d, 2))]
        await send_all(kafka, Topic.SUPPRESSION_COMMANDS, joins)
        for key, cmd in joins:
            await wait_member(api, key, cmd["group_id"])

        # off: an unsubscribe changes only the one membership
        policy = await api.ok("GET", "/v1/sync-policy", token=VIEWER_TOKEN)
        assert (policy["unsubscribe"], policy["ban"]) == (False, False)
        await unsubscribe_by_link(api, a, 1, "camp-a")
        for group_id in (1, 2):
            await api.ok("PUT", f"/v1/memberships/{c}/{group_id}", {"state": "unsubscribed"})
        assert await states(api, a) == {
            1: ("unsubscribed", "form"),
            2: ("deliverable", "system"),
            3: ("deliverable", "system"),
        }
        assert await states(api, c) == {
            1: ("unsubscribed", "system"),
            2: ("unsubscribed", "system"),
            3: ("deliverable", "system"),
        }

        # the switch needs admin, and exact values
        assert legacy(
            await api.call("PUT", "/v1/sync-policy", {"unsubscribe": True}, token=OPERATOR_TOKEN)
        ) == (403, {"error": "role 'operator' may not do this; 'admin' or higher is required"})
        assert legacy(await api.call("PUT", "/v1/sync-policy", {"unsubscribe": "yes"})) == (
            400,
            {"error": "unsubscribe must be true or false", "field": "unsubscribe"},
        )
        assert legacy(await api.call("PUT", "/v1/sync-policy", {"all": True})) == (
            400,
            {"error": "unknown switch 'all'; use unsubscribe and ban", "field": "all"},
        )
        assert await api.ok("GET", "/v1/sync-jobs") == {"items": []}

        switched = await api.ok("PUT", "/v1/sync-policy", {"unsubscribe": True})
        assert (switched["unsubscribe"], switched["ban"]) == (True, False)
        assert [(j["kind"], j["status"], j["requested_by"]) for j in switched["jobs"]] == [
            ("unsubscribe", "queued", "admin")
        ]
        job_id = switched["jobs"][0]["id"]
        job = await wait_job_done(api, job_id)
        # a (one unsubscribe, two to sync) and c (two, one to sync): 2 contacts, 3 changes
        assert (job["kind"], job["contacts"], job["changed"], job["detail"]) == (
            "unsubscribe",
            2,
            3,
            None,
        )
        listed = await api.ok("GET", "/v1/sync-jobs", token=VIEWER_TOKEN)
        assert [(j["id"], j["status"], j["contacts"], j["changed"]) for j in listed["items"]] == [
            (job_id, "done", 2, 3)
        ]
        assert await states(api, a) == {
            1: ("unsubscribed", "form"),
            2: ("unsubscribed", "auto_sync"),
            3: ("unsubscribed", "auto_sync"),
        }
        assert await states(api, c) == {
            1: ("unsubscribed", "system"),
            2: ("unsubscribed", "system"),
            3: ("unsubscribed", "auto_sync"),
        }
        for untouched in (b, d):
            assert {s for s, _ in (await states(api, untouched)).values()} == {"deliverable"}

        events = await kafka.read(
            Topic.JOBS_EVENTS,
            until=lambda r: any(e["job_id"] == job_id and e["status"] == "done" for e in r),
        )
        mine = [e for e in events if e["job_id"] == job_id]
        assert [(e["status"], e["processed"], e["succeeded"]) for e in mine] == [
            ("queued", 0, 0),
            ("running", 2, 3),
            ("done", 2, 3),
        ]
        assert {(e["kind"], e["service"]) for e in mine} == {("sync", "suppression")}
        mails = await kafka.read(Topic.MAIL_SYSTEM, until=lambda r: len(r) >= 1)
        assert len(mails) == 1
        mail = mails[0]
        assert (mail["kind"], mail["to"], mail["job_id"]) == (
            "sync_done",
            [OPERATOR_EMAIL],
            job_id,
        )
        assert "contacts examined: 2\n" in mail["text_body"]
        assert "memberships changed: 3\n" in mail["text_body"]
        assert job_id in mail["text_body"]

        # on: a new unsubscribe propagates in the same transaction as the change
        await unsubscribe_by_link(api, b, 2, "camp-b")
        assert await states(api, b) == {
            1: ("unsubscribed", "auto_sync"),
            2: ("unsubscribed", "form"),
            3: ("unsubscribed", "auto_sync"),
        }
        again = await api.ok("PUT", "/v1/sync-policy", {"unsubscribe": True})
        assert again["jobs"] == []  # already on: no second job

        # off again: nothing propagates any more
        off = await api.ok("PUT", "/v1/sync-policy", {"unsubscribe": False})
        assert (off["unsubscribe"], off["jobs"]) == (False, [])
        await unsubscribe_by_link(api, d, 1, "camp-d")
        assert await states(api, d) == {
            1: ("unsubscribed", "form"),
            2: ("deliverable", "system"),
        }

        changes = await published(suppression, kafka, Topic.SUPPRESSION_CHANGES)
        after_joins = of_contact(changes, b)[3:]
        assert after_joins[0] == (2, "unsubscribed", "form")
        assert sorted(after_joins[1:]) == [
            (1, "unsubscribed", "auto_sync"),
            (3, "unsubscribed", "auto_sync"),
        ]
        assert sorted(of_contact(changes, a)[3:]) == [
            (1, "unsubscribed", "form"),
            (2, "unsubscribed", "auto_sync"),
            (3, "unsubscribed", "auto_sync"),
        ]
        assert of_contact(changes, d)[2:] == [(1, "unsubscribed", "form")]
        assert_versions_increase(changes)
        form = [c for c in changes if c["contact_id"] == a and c["method"] == "form"]
        assert (await membership(api, a, 1))["campaign_id"] == "camp-a"
        assert len(form) == 1


async def test_ban_sync_switch(suppression, kafka):
    api = suppression.api
    e, f = 201, 202
    joins = [(e, join(e, g)) for g in (1, 2, 3)] + [(f, join(f, g)) for g in (1, 2)]
    await send_all(kafka, Topic.SUPPRESSION_COMMANDS, joins)
    for key, cmd in joins:
        await wait_member(api, key, cmd["group_id"])

    await api.ok("PUT", f"/v1/memberships/{e}/1", {"state": "banned"}, token=OPERATOR_TOKEN)
    assert await states(api, e) == {
        1: ("banned", "system"),
        2: ("deliverable", "system"),
        3: ("deliverable", "system"),
    }
    switched = await api.ok("PUT", "/v1/sync-policy", {"ban": True})
    assert (switched["unsubscribe"], switched["ban"]) == (False, True)
    assert [j["kind"] for j in switched["jobs"]] == ["ban"]
    job = await wait_job_done(api, switched["jobs"][0]["id"])
    assert (job["contacts"], job["changed"]) == (1, 2)
    assert await states(api, e) == {
        1: ("banned", "system"),
        2: ("banned", "auto_sync"),
        3: ("banned", "auto_sync"),
    }

    # a new ban propagates at once; an unsubscribe does not (its switch is off)
    await unsubscribe_by_link(api, f, 2, "camp-f")
    assert await states(api, f) == {1: ("deliverable", "system"), 2: ("unsubscribed", "form")}
    await api.ok("PUT", f"/v1/memberships/{f}/1", {"state": "banned"}, token=OPERATOR_TOKEN)
    assert await states(api, f) == {1: ("banned", "system"), 2: ("banned", "auto_sync")}

    # a new join of a contact banned elsewhere joins banned; others join as asked
    await send_all(kafka, Topic.SUPPRESSION_COMMANDS, [(e, join(e, 4)), (203, join(203, 4))])
    assert (await wait_member(api, e, 4))["state"] == "banned"
    assert (await wait_member(api, e, 4))["method"] == "auto_sync"
    assert (await wait_member(api, 203, 4))["state"] == "deliverable"

    # an operator lifts one ban; it is not a refusal, so it does not propagate
    await api.ok("PUT", f"/v1/memberships/{e}/2", {"state": "deliverable"})
    assert await states(api, e) == {
        1: ("banned", "system"),
        2: ("deliverable", "system"),
        3: ("banned", "auto_sync"),
        4: ("banned", "auto_sync"),
    }

    changes = await published(suppression, kafka, Topic.SUPPRESSION_CHANGES)
    assert of_contact(changes, f)[2:] == [
        (2, "unsubscribed", "form"),
        (1, "banned", "system"),
        (2, "banned", "auto_sync"),
    ]
    assert sorted(of_contact(changes, e)[3:]) == sorted(
        [
            (1, "banned", "system"),
            (2, "banned", "auto_sync"),
            (3, "banned", "auto_sync"),
            (4, "banned", "auto_sync"),
            (2, "deliverable", "system"),
        ]
    )
    assert_versions_increase(changes)
    events = await kafka.read_to_end(Topic.JOBS_EVENTS)
    assert [ev["status"] for ev in events if ev["job_id"] == job["id"]] == [
        "queued",
        "running",
        "done",
    ]


# Blacklist, black flag, address suppressions, can-send (F-14 to F-16) ---------------------------

ADDRESSES = {
    301: "a@example.com",
    302: "a@mx.example.com",
    303: "a@A.MX.Example.COM",
    304: "a@notexample.com",
    305: "a@example.com.evil.jp",
    306: "a@example.co",
    307: "Block@shop.example.jp",
    308: "other@shop.example.jp",
    309: "black@example.jp",
    310: "bounced@example.jp",
    311: "complained@example.jp",
    312: "banned@example.jp",
    313: "status@example.jp",
    314: "unsub@example.jp",
}


async def can_send(api: Any, contact_id: int, include: bool, group_id: int | None = 1) -> Any:
    query = f"contact_id={contact_id}&include_unsubscribed={'true' if include else 'false'}"
    if group_id is not None:
        query += f"&group_id={group_id}"
    answer = await api.ok("GET", f"/v1/can-send?{query}", token=VIEWER_TOKEN)
    return answer["allowed"], answer["reason"]


async def test_blacklist_suppressions_and_can_send(suppression, kafka):
    api = suppression.api
    # rules --------------------------------------------------------------------------------
    status, exact = await api.call(
        "POST",
        "/v1/blacklist",
        {"title": "担当者の依頼", "match": "exact", "value": " Block@Shop.Example.JP "},
    )
    assert (status, exact["title"], exact["match"], exact["value"]) == (
        201,
        "担当者の依頼",
        "exact",
        "block@shop.example.jp",
    )
    status, suffix = await api.call(
        "POST", "/v1/blacklist", {"title": "競合", "match": "suffix", "value": "Example.COM"}
    )
    assert (status, suffix["match"], suffix["value"]) == (201, "suffix", "example.com")

    bad = [
        ({"match": "exact", "value": "x@example.jp"}, "title"),
        ({"title": " ", "match": "exact", "value": "x@example.jp"}, "title"),
        ({"title": "t", "match": "regex", "value": ".*"}, "match"),
        ({"title": "t", "match": "exact", "value": ""}, "value"),
        ({"title": "t", "match": "exact", "value": "example.jp"}, "value"),
        ({"title": "t", "match": "exact", "value": "@example.jp"}, "value"),
        ({"title": "t", "match": "suffix", "value": "x@example.jp"}, "value"),
        ({"title": "t", "match": "suffix", "value": "localhost"}, "value"),
        ({"title": "t", "match": "suffix", "value": "exa mple.jp"}, "value"),
        ({"title": "t", "match": "suffix", "value": 5}, "value"),
    ]
    for body, field in bad:
        status, answer = await api.call("POST", "/v1/blacklist", body)
        assert (status, answer.get("field")) == (400, field), body
    for match, value, stored in (
        ("exact", "BLOCK@shop.example.jp", "block@shop.example.jp"),
        ("suffix", "@example.com", "example.com"),
        ("suffix", ".example.com.", "example.com"),
    ):
        body = {"title": "again", "match": match, "value": value}
        assert legacy(await api.call("POST", "/v1/blacklist", body)) == (
            409,
            {"error": f"a {match} rule for '{stored}' already exists"},
        )
    status, _ = await api.call(
        "POST",
        "/v1/blacklist",
        {"title": "t", "match": "exact", "value": "x@example.jp"},
        token=VIEWER_TOKEN,
    )
    assert status == 403
    temporary = await api.ok(
        "POST", "/v1/blacklist", {"title": "一時", "match": "suffix", "value": "tmp.example.jp"}
    )
    assert await api.call("DELETE", f"/v1/blacklist/{temporary['id']}") == (204, "")
    assert legacy(await api.call("DELETE", f"/v1/blacklist/{temporary['id']}")) == (
        404,
        {"error": f"blacklist rule {temporary['id']} does not exist"},
    )
    assert (await api.call("DELETE", "/v1/blacklist/abc"))[0] == 400
    listed = await api.ok("GET", "/v1/blacklist", token=VIEWER_TOKEN)
    assert [(r["id"], r["title"], r["match"], r["value"]) for r in listed["items"]] == [
        (exact["id"], "担当者の依頼", "exact", "block@shop.example.jp"),
        (suffix["id"], "競合", "suffix", "example.com"),
    ]

    # contacts: addresses from contacts.changelog, memberships registered stopped ---------
    await send_all(
        kafka,
        Topic.CONTACTS_CHANGELOG,
        [(cid, contact_changed(cid, email)) for cid, email in ADDRESSES.items()],
    )
    await send_all(
        kafka,
        Topic.SUPPRESSION_COMMANDS,
        [(cid, join(cid, 1, auto_stop=cid != 312)) for cid in ADDRESSES],
    )
    for cid in ADDRESSES:
        await wait_member(api, cid, 1)

    async def addresses_known() -> bool:
        for cid in ADDRESSES:
            answer = await api.ok("GET", f"/v1/can-send?contact_id={cid}&group_id=1")
            assert answer["address_known"], cid
        return True

    await eventually(addresses_known)

    await api.ok("PUT", "/v1/memberships/312/1", {"state": "banned"})
    assert legacy(
        await api.call("PUT", "/v1/contacts/309/black", {"black": True}, token=VIEWER_TOKEN)
    ) == (
        403,
        {"error": "role 'viewer' may not do this; 'operator' or higher is required"},
    )
    assert await api.ok("PUT", "/v1/contacts/309/black", {"black": True}) == {
        "contact_id": 309,
        "black": True,
        "changed": True,
    }
    assert (await api.ok("PUT", "/v1/contacts/309/black", {"black": True}))["changed"] is False
    assert (await api.call("PUT", "/v1/contacts/309/black", {"black": "yes"}))[0] == 400
    await send_all(
        kafka,
        Topic.BOUNCE_EVENTS,
        [
            (310, bounce_event(310, "bounced@example.jp", "bounced")),
            (311, bounce_event(311, "complained@example.jp", "complained")),
            (313, bounce_event(313, "status@example.jp", "counted", delivery_status="error")),
        ],
    )

    async def suppressed(email: str, reason: str) -> bool:
        status, body = await api.call("GET", f"/v1/suppressions/{email}")
        return status == 200 and body["reason"] == reason

    await eventually(lambda: suppressed("bounced@example.jp", "bounced"))
    await eventually(lambda: suppressed("complained@example.jp", "complained"))

    async def status_stops() -> bool:
        return await can_send(api, 313, True) == (False, "delivery_status_error")

    await eventually(status_stops)

    expected = {
        301: "blacklisted",
        302: "blacklisted",
        303: "blacklisted",
        304: None,
        305: None,
        306: None,
        307: "blacklisted",
        308: None,
        309: "black_flag",
        310: "address_bounced",
        311: "address_complained",
        312: "banned",
        313: "delivery_status_error",
        314: None,
    }
    # include_unsubscribed reaches the unsubscribed, never a stronger refusal
    with_unsubscribed = {cid: await can_send(api, cid, True) for cid in ADDRESSES}
    assert with_unsubscribed == {cid: (reason is None, reason) for cid, reason in expected.items()}
    without = {cid: await can_send(api, cid, False) for cid in ADDRESSES}
    assert without == {cid: (False, reason or "unsubscribed") for cid, reason in expected.items()}
    assert await can_send(api, 304, False, group_id=None) == (True, None)
    assert await can_send(api, 301, True, group_id=None) == (False, "blacklisted")
    assert legacy(await api.call("GET", "/v1/can-send?contact_id=304&group_id=2")) == (
        404,
        {"error": no_membership(304, 2)},
    )
    assert (await api.call("GET", "/v1/can-send?contact_id=abc"))[0] == 400

    # clearing: a bounce (not a complaint), a rule, the black flag -------------------------
    assert await api.call("DELETE", "/v1/suppressions/Bounced@Example.JP") == (204, "")
    assert await can_send(api, 310, True) == (True, None)
    assert legacy(await api.call("DELETE", "/v1/suppressions/bounced@example.jp")) == (
        404,
        {"error": "this address is not suppressed"},
    )
    assert legacy(await api.call("DELETE", "/v1/suppressions/complained@example.jp")) == (
        403,
        {"error": "only a bounced address can be cleared; this one is complained"},
    )
    assert await can_send(api, 311, True) == (False, "address_complained")
    assert await api.call("DELETE", f"/v1/blacklist/{suffix['id']}") == (204, "")
    assert await can_send(api, 302, True) == (True, None)
    await api.ok("PUT", "/v1/contacts/309/black", {"black": False})
    assert await can_send(api, 309, True) == (True, None)

    changes = await published(suppression, kafka, Topic.SUPPRESSION_CHANGES)
    assert_versions_increase(changes)
    others = [
        (c["kind"], c["contact_id"], c["email"], c["state"])
        for c in changes
        if c["kind"] != "membership"
    ]
    assert sorted(others, key=repr) == sorted(
        [
            ("blacklist_rule", None, "block@shop.example.jp", "exact"),
            ("blacklist_rule", None, "example.com", "suffix"),
            ("blacklist_rule", None, "tmp.example.jp", "suffix"),
            ("blacklist_rule", None, "tmp.example.jp", "cleared"),
            ("blacklist_rule", None, "example.com", "cleared"),
            ("contact_black", 309, "black@example.jp", "black"),
            ("contact_black", 309, "black@example.jp", "cleared"),
            ("address", 310, "bounced@example.jp", "bounced"),
            ("address", 310, "bounced@example.jp", "cleared"),
            ("address", 311, "complained@example.jp", "complained"),
        ],
        key=repr,
    )
    assert of_contact(changes, 312) == [(1, "deliverable", "system"), (1, "banned", "system")]


async def test_deleted_contact_ends_memberships_and_clearing_a_bounce_resets_its_status(
    suppression, kafka
):
    api = suppression.api
    await kafka.send(Topic.CONTACTS_CHANGELOG, 41, contact_changed(41, "gone@example.jp"))
    await kafka.send(Topic.CONTACTS_CHANGELOG, 42, contact_changed(42, "back@example.jp"))
    for group in (1, 2):
        await kafka.send(Topic.SUPPRESSION_COMMANDS, 41, join(41, group))
    await kafka.send(Topic.SUPPRESSION_COMMANDS, 42, join(42, 1))
    await wait_member(api, 42, 1)
    await wait_member(api, 41, 2)

    deleted = {
        **contact_changed(41, "gone@example.jp", version=2),
        "op": "deleted",
        "contact": None,
    }
    await kafka.send(Topic.CONTACTS_CHANGELOG, 41, deleted)
    changes = await kafka.read(
        Topic.SUPPRESSION_CHANGES,
        until=lambda r: sum(c["state"] == "left" for c in r) >= 2,
    )
    assert sorted((c["contact_id"], c["group_id"]) for c in changes if c["state"] == "left") == [
        (41, 1),
        (41, 2),
    ]
    assert (await api.ok("GET", "/v1/memberships/41"))["items"] == []

    await kafka.send(
        Topic.BOUNCE_EVENTS, 42, bounce_event(42, "back@example.jp", "bounced", "invalid_address")
    )

    async def refused() -> bool:
        return await can_send(api, 42, False) == (False, "address_bounced")

    await eventually(refused)
    status, _ = await api.call("DELETE", "/v1/suppressions/back@example.jp")
    assert status == 204
    assert await can_send(api, 42, False) == (True, None)  # not still invalid_address


# Contracts (issue 17): inputs that once answered 500 ------------------------------------------

TOO_BIG = "99999999999999999999"  # beyond 64 bits


def problem_at(answer: tuple[int, Any], location: str, pointer: str) -> dict[str, Any]:
    status, body = answer
    assert status == 400, answer
    assert (body["status"], body["title"], body["type"]) == (400, "Bad Request", "about:blank")
    first = body["errors"][0]
    assert (first["location"], first["pointer"]) == (location, pointer), body
    return body


async def test_inputs_that_once_answered_500_are_problems(suppression):
    api = suppression.api
    nested = {"data": "[" * 5000 + "]" * 5000, "headers": {"Content-Type": "application/json"}}
    for method, path in (
        ("PUT", "/v1/memberships/1/1"),
        ("PUT", "/v1/sync-policy"),
        ("POST", "/v1/blacklist"),
        ("PUT", "/v1/contacts/1/black"),
    ):
        status, body = await api.call(method, path, **nested)
        assert (status, body["status"], body["title"]) == (400, 400, "Bad Request"), path

    # NUL from a path and from a JSON string
    for method in ("GET", "DELETE"):
        body = problem_at(await api.call(method, "/v1/suppressions/a%00b"), "path", "/email")
        assert "U+0000" in body["errors"][0]["detail"]
    rule = {"title": "a\u0000b", "match": "suffix", "value": "example.com"}
    body = problem_at(await api.call("POST", "/v1/blacklist", rule), "body", "/title")
    assert body["errors"][0]["label"] == "タイトル"
    rule = {"title": "t", "match": "exact", "value": "a\u0000b@example.jp"}
    problem_at(await api.call("POST", "/v1/blacklist", rule), "body", "/value")
    assert (await api.ok("GET", "/v1/blacklist"))["items"] == []

    # integers beyond 64 bits in path ids and query parameters
    for method, path, where, pointer in (
        ("GET", f"/v1/memberships/{TOO_BIG}", "path", "/contact_id"),
        ("GET", f"/v1/memberships/1/{TOO_BIG}", "path", "/group_id"),
        ("DELETE", f"/v1/blacklist/{TOO_BIG}", "path", "/id"),
        ("GET", f"/v1/can-send?contact_id={TOO_BIG}", "query", "/contact_id"),
        ("GET", f"/v1/can-send?contact_id=1&group_id={TOO_BIG}", "query", "/group_id"),
        ("GET", f"/v1/unsubscribe-link?contact_id=1&group_id={TOO_BIG}", "query", "/group_id"),
    ):
        problem_at(await api.call(method, path), where, pointer)
    for path, body, pointer in (
        (f"/v1/memberships/{TOO_BIG}/1", {"state": "banned"}, "/contact_id"),
        (f"/v1/contacts/{TOO_BIG}/black", {"black": True}, "/id"),
    ):
        problem_at(await api.call("PUT", path, body), "path", pointer)

    # unknown keys are refused, naming the key
    rule = {"title": "t", "match": "suffix", "value": "a.jp", "note": 1}
    body = problem_at(await api.call("POST", "/v1/blacklist", rule), "body", "/note")
    assert body["field"] == "note"
    problem_at(await api.call("GET", "/v1/can-send?contact_id=1&groupid=1"), "query", "/groupid")
    problem_at(await api.call("PUT", "/v1/contacts/1/black", {"black": True, "x": 1}), "body", "/x")
