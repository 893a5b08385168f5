"""The console without a browser: login and throttling, sessions, CSRF, roles, escaping,
security headers, and a service that is away — against real contacts and suppression
services (tests/integration/test_console_browser.py drives the screens in Chromium)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from libs.common import db
from services.console import auth
from services.console.app import SCHEMA
from tests.conftest import Stack, eventually, running
from tests.integration.console_stack import (
    PASSWORD,
    Browserless,
    ConsoleStack,
    console_stack,
    no_leaked_tasks_but_keepalives,
)

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("console")]
no_leaked_tasks = no_leaked_tasks_but_keepalives


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def site(stack: Stack, template_db: str) -> AsyncIterator[ConsoleStack]:
    async with console_stack(
        stack, template_db, ("contacts", "suppression"), login_max_failures=3
    ) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session")
async def client(site: ConsoleStack) -> AsyncIterator[Browserless]:
    browser = Browserless(site.base)
    yield browser
    await browser.close()


async def test_a_page_needs_a_login_and_comes_back_after_it(client: Browserless) -> None:
    status, html, response = await client.get("/contacts?q=x")
    assert status == 200 and "/login" in str(response.url)
    assert 'value="/contacts?q=x"' in html
    _, login_page, _ = await client.get("/login?next=%2Fcontacts%3Fq%3Dx")
    status, html, response = await client.post(
        "/login",
        {
            "csrf": client.csrf(login_page),
            "login": "viewer",
            "password": PASSWORD,
            "next": "/contacts?q=x",
        },
    )
    assert status == 200
    assert response.url.path == "/contacts" and response.url.query_string == "q=x"
    assert "顧客検索" in html


async def test_session_cookie_is_httponly_and_samesite(
    client: Browserless, site: ConsoleStack
) -> None:
    _, html, _ = await client.get("/login")
    status, _, response = await client.post(
        "/login",
        {"csrf": client.csrf(html), "login": "admin", "password": PASSWORD},
        follow=False,
    )
    assert status == 303
    cookie = response.cookies["tayori_session"]
    assert cookie["httponly"] and cookie["samesite"] == "Lax"
    assert not cookie["secure"]  # plain http in the test; https public URLs set it


async def test_a_wrong_password_is_refused_and_repeated_failures_lock_the_account(
    client: Browserless,
) -> None:
    for _ in range(2):
        status, html = await client.login("operator", "wrong password")
        assert status == 401 and "ユーザー名かパスワードが違います" in html
    status, html = await client.login("operator", "wrong password")
    assert status == 429 and "しばらくお待ちください" in html
    # Locked: even the right password is refused until the lock ends.
    status, html = await client.login("operator")
    assert status == 429
    # Another account from the same address is not locked.
    status, _ = await client.login("viewer")
    assert status == 200


async def test_a_post_without_the_csrf_token_is_refused(client: Browserless) -> None:
    assert (await client.login("admin"))[0] == 200
    status, html, _ = await client.post("/groups", {"name": "no token"})
    assert status == 403 and "フォームの有効期限が切れました" in html
    status, html, _ = await client.post("/groups", {"name": "bad token", "csrf": "forged"})
    assert status == 403
    status, html, _ = await client.post("/login", {"login": "admin", "password": PASSWORD})
    assert status == 403


async def test_a_viewer_sees_no_write_buttons_and_its_posts_are_refused(
    client: Browserless, site: ConsoleStack
) -> None:
    contact = await site.api("contacts").ok("POST", "/v1/contacts", {"email": "v@example.jp"})
    assert (await client.login("viewer"))[0] == 200
    status, html, _ = await client.get("/contacts")
    assert status == 200
    assert 'id="bulk-form"' not in html and 'id="save-filter"' not in html
    status, html, _ = await client.get(f"/contacts/{contact['id']}")
    assert status == 200 and "state-change" not in html
    token = client.csrf(html)
    status, html, _ = await client.post(
        "/contacts/bulk", {"csrf": token, "action": "star", "id": str(contact["id"])}
    )
    assert status == 403 and "この操作は許可されていません" in html
    status, _, _ = await client.post("/groups", {"csrf": token, "name": "by a viewer"})
    assert status == 403
    groups = await site.api("contacts").ok("GET", "/v1/groups")
    assert "by a viewer" not in [g["name"] for g in groups["items"]]


async def test_values_are_escaped(client: Browserless, site: ConsoleStack) -> None:
    evil = "<script>alert(1)</script>"
    contact = await site.api("contacts").ok(
        "POST", "/v1/contacts", {"email": "xss@example.jp", "name": evil, "tags": ['"><img>']}
    )
    assert (await client.login("admin"))[0] == 200
    for path in (f"/contacts/{contact['id']}", "/contacts?q=xss"):
        status, html, _ = await client.get(path)
        assert status == 200
        assert evil not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert '"><img>' not in html


async def test_pages_carry_a_strict_content_security_policy(client: Browserless) -> None:
    status, _, response = await client.get("/login")
    assert status == 200
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "'unsafe-inline'" not in csp
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "same-origin"


async def test_a_service_that_is_away_shows_a_page_not_a_trace(client: Browserless) -> None:
    assert (await client.login("admin"))[0] == 200
    # The exporter is not running in this module: the jobs page says which service is away.
    status, html, response = await client.get("/jobs")
    assert status == 503 and "サービスに接続できません" in html and "exporter" in html
    assert "Traceback" not in html
    assert response.headers["Retry-After"]


async def test_a_service_that_stops_while_the_console_runs_is_named_on_the_page(
    client: Browserless, site: ConsoleStack, stack: Stack
) -> None:
    """The exporter runs, the jobs page shows; the exporter stops: the same page is a 503
    naming it in Japanese and English (no 500, no trace), readiness reports it and the
    console stays ready; the other screens keep working."""
    assert (await client.login("admin"))[0] == 200
    urls = site.console.api.urls
    away = urls["exporter"]
    try:
        async with running(
            "exporter",
            stack,
            site.dsn,
            site.prefix,
            contacts_url=site.api("contacts").base,
            export_dir=stack.home / f"exports-{site.prefix}stopped",
            public_url="http://x",
        ) as exporter:
            urls["exporter"] = exporter.api.base
            status, html, _ = await client.get("/jobs")
            assert status == 200 and "サービスに接続できません" not in html
        status, html, response = await client.get("/jobs")
        assert status == 503 and response.headers["Retry-After"]
        assert "exporter サービスに接続できません" in html
        assert "the exporter service cannot be reached" in html
        assert "Traceback" not in html and "ClientConnectorError" in html
        status, body, _ = await client.get("/readyz")
        assert status == 200 and '"exporter": "unreachable: ClientConnectorError"' in body
        status, html, _ = await client.get("/contacts")
        assert status == 200
    finally:
        urls["exporter"] = away


async def test_an_api_refusal_is_shown_beside_its_field(client: Browserless) -> None:
    assert (await client.login("admin"))[0] == 200
    status, html, _ = await client.get("/contacts?score_min=abc")
    assert status == 200 and 'id="err-score_min"' in html
    status, html, _ = await client.get("/contacts?f0=created_at&op0=gte&v0=not-a-date")
    assert status == 200 and 'id="err-v0"' in html


async def test_the_language_is_a_preference_of_the_user(client: Browserless) -> None:
    assert (await client.login("admin"))[0] == 200
    _, html, _ = await client.get("/")
    status, html, _ = await client.post(
        "/preferences/lang", {"csrf": client.csrf(html), "lang": "en", "next": "/contacts"}
    )
    assert status == 200 and "Contacts" in html and "Search" in html
    _, html, _ = await client.get("/")
    await client.post("/preferences/lang", {"csrf": client.csrf(html), "lang": "ja", "next": "/"})


async def test_health_readiness_and_metrics(client: Browserless) -> None:
    status, body, _ = await client.get("/healthz")
    assert status == 200
    status, body, _ = await client.get("/readyz")
    assert status == 200 and '"database": "ok"' in body and '"contacts": "ok"' in body

    async def counted() -> bool:
        _, text, _ = await client.get("/metrics")
        return 'service="console"' in text

    await eventually(counted)


async def _members_applied(site: ConsoleStack, group_id: int, contact_ids: list[int]) -> None:
    """Until suppression has applied the joins (contacts records them at once)."""
    suppression = site.api("suppression")

    async def applied() -> bool:
        for contact_id in contact_ids:
            status, _ = await suppression.call("GET", f"/v1/memberships/{contact_id}/{group_id}")
            if status != 200:
                return False
        return True

    await eventually(applied)


async def test_bulk_delivery_state_is_confirmed_then_applied_for_the_user(
    client: Browserless, site: ConsoleStack
) -> None:
    """配信停止 for a group over a search's matches: the confirmation counts the selection,
    the members and those that change, and states the rules, changing nothing; confirmed,
    suppression applies it to the members only, recording the console user as who asked —
    and the console's audit names the same user."""
    contacts, suppression = site.api("contacts"), site.api("suppression")
    group = await contacts.ok("POST", "/v1/groups", {"name": "一括配信停止"})
    ids = [
        (
            await contacts.ok(
                "POST", "/v1/contacts", {"email": f"bulkstate{i}@example.jp", "tags": ["bs"]}
            )
        )["id"]
        for i in range(3)
    ]
    members = ids[:2]
    await contacts.ok("POST", f"/v1/groups/{group['id']}/members", {"contact_ids": members})
    await _members_applied(site, group["id"], members)

    # an operator of their own ("operator" is locked out by the throttling test)
    conn = await db.connect(site.dsn, SCHEMA)
    try:
        await auth.save_user(conn, "tanaka", PASSWORD, "operator", "tanaka@example.jp")
    finally:
        await conn.close()
    assert (await client.login("tanaka"))[0] == 200
    status, html, _ = await client.get("/contacts?tags_in=bs")
    assert status == 200 and 'value="state_unsubscribed"' in html
    form = {
        "csrf": client.csrf(html),
        "query": "tags_in=bs",
        "action": "state_unsubscribed",
        "target_group": str(group["id"]),
        "scope": "all",
    }
    status, html, _ = await client.post("/contacts/bulk", form)
    assert status == 200 and 'id="bulk-confirm"' in html
    assert '<strong id="bulk-count">3</strong>' in html
    assert '<strong id="bulk-members">2</strong>' in html
    assert '<strong id="bulk-changing">2</strong>' in html
    assert 'id="bulk-rules"' in html and "配信禁止は配信停止より強い停止です" in html
    for contact_id in members:  # the confirmation changed nothing
        row = await suppression.ok("GET", f"/v1/memberships/{contact_id}/{group['id']}")
        assert row["state"] == "deliverable"

    status, html, response = await client.post("/contacts/bulk", {**form, "confirm": "1"})
    assert status == 200 and response.url.query.get("done") == "2"

    async def stopped() -> list[dict[str, object]]:
        rows = [
            await suppression.ok("GET", f"/v1/memberships/{contact_id}/{group['id']}")
            for contact_id in members
        ]
        return rows if all(r["state"] == "unsubscribed" for r in rows) else []

    for row in await eventually(stopped):
        assert row["method"] == "system" and row["changed_by"] == "tanaka@example.jp"
    status, _ = await suppression.call("GET", f"/v1/memberships/{ids[2]}/{group['id']}")
    assert status == 404  # not a member: left alone

    conn = await db.connect(site.dsn, SCHEMA)
    try:
        audit = await conn.fetchrow(
            "SELECT username, requested_by, target, detail FROM audit_log"
            " WHERE action = 'bulk_state_unsubscribed' ORDER BY id DESC LIMIT 1"
        )
    finally:
        await conn.close()
    assert audit["username"] == "tanaka" and audit["requested_by"] == "tanaka@example.jp"
    assert audit["target"] == f"group:{group['id']}" and audit["detail"]["affected"] == 2


async def test_a_bulk_delivery_state_needs_a_group(client: Browserless, site: ConsoleStack) -> None:
    contact = await site.api("contacts").ok(
        "POST", "/v1/contacts", {"email": "bulknogroup@example.jp"}
    )
    assert (await client.login("admin"))[0] == 200
    _, html, _ = await client.get("/contacts")
    status, html, _ = await client.post(
        "/contacts/bulk",
        {
            "csrf": client.csrf(html),
            "action": "state_banned",
            "id": str(contact["id"]),
            "confirm": "1",
        },
    )
    assert status == 200 and "グループを選んでください" in html
    assert 'id="bulk-confirm"' not in html


async def test_the_contact_page_state_change_records_the_user(
    client: Browserless, site: ConsoleStack
) -> None:
    contacts, suppression = site.api("contacts"), site.api("suppression")
    group = await contacts.ok("POST", "/v1/groups", {"name": "詳細から配信禁止"})
    contact = await contacts.ok("POST", "/v1/contacts", {"email": "detailban@example.jp"})
    await contacts.ok("POST", f"/v1/groups/{group['id']}/members", {"contact_ids": [contact["id"]]})
    await _members_applied(site, group["id"], [contact["id"]])
    assert (await client.login("admin"))[0] == 200
    _, html, _ = await client.get(f"/contacts/{contact['id']}")
    status, _, _ = await client.post(
        f"/contacts/{contact['id']}/memberships/{group['id']}",
        {"csrf": client.csrf(html), "state": "banned"},
    )
    assert status == 200
    row = await suppression.ok("GET", f"/v1/memberships/{contact['id']}/{group['id']}")
    assert row["state"] == "banned" and row["changed_by"] == "admin@example.jp"


async def test_set_state_in_the_contacts_api_is_validated(site: ConsoleStack) -> None:
    contacts = site.api("contacts")
    contact = await contacts.ok("POST", "/v1/contacts", {"email": "setstate@example.jp"})
    base = {"action": "set_state", "ids": [contact["id"]]}
    for body, field in (
        ({**base, "target_group_id": 1}, "state"),
        ({**base, "state": "banned"}, "target_group_id"),
        ({**base, "state": "gone", "target_group_id": 1}, "state"),
    ):
        status, problem = await contacts.call("POST", "/v1/contacts/bulk", body)
        assert status == 400, (body, problem)
        assert problem["field"] == field, problem
    status, problem = await contacts.call(
        "POST", "/v1/contacts/bulk", {**base, "state": "banned", "target_group_id": 999999}
    )
    assert status == 404
    # Who asked is a name, not anything: a control character is refused.
    status, problem = await contacts.call(
        "POST",
        "/v1/contacts/bulk",
        {**base, "state": "banned", "target_group_id": 999999},
        headers={"X-Tayori-Requested-By": "a%0Ab"},
    )
    assert status == 400 and "X-Tayori-Requested-By" in problem["detail"]
