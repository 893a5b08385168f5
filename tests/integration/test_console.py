"""The console without a browser: login and throttling, sessions, CSRF, roles, escaping,
security headers, and a service that is away — against real contacts and suppression
services (tests/integration/test_console_browser.py drives the screens in Chromium)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.conftest import Stack, eventually
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
