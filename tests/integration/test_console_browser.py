"""The console's journeys in a real Chromium (Debian's ``chromium`` driven by Playwright for
Python, never a downloaded browser) against real services. One browser and one stack for
the module; each test has its own browser context (cookies). Every screen is saved as a
screenshot: into docs/console/ (shown in the README) with ``TAYORI_SCREENSHOTS=docs``
(refresh them when a screen changes), else into the test's temporary directory, so an
ordinary run leaves the checkout as it was.

Without /usr/bin/chromium the module is skipped with a loud reason; `.ci/run` installs it.
"""

from __future__ import annotations

import asyncio
import csv
import functools
import io
import os
import shutil
import tempfile
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from libs.common import db
from services.console import auth
from services.console.app import SCHEMA
from tayori.embedded import free_port
from tests.conftest import Stack, eventually, reserved_port
from tests.integration.console_stack import (
    PASSWORD,
    ConsoleStack,
    console_stack,
    no_leaked_tasks_but_keepalives,
)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    REASON = (
        "Chromium is not installed (apt-get install chromium): the console's browser tests "
        "are SKIPPED — the screens are NOT tested in a browser on this machine"
    )
    warnings.warn(REASON, stacklevel=1)
    print(f"\n!!! {REASON} !!!\n")
    pytest.skip(REASON, allow_module_level=True)

from playwright.async_api import Browser, BrowserContext, Page, async_playwright  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("console_browser")]
no_leaked_tasks = no_leaked_tasks_but_keepalives
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "console"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
#: how long a page may take to show what a test waits for (a generous deadline).
WAIT_MS = 60_000


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def site(stack: Stack, template_db: str) -> AsyncIterator[ConsoleStack]:
    # The console starts after six services: its port is held until then (a port merely
    # picked was once taken meanwhile: "address already in use").
    with reserved_port() as port:
        async with console_stack(
            stack,
            template_db,
            ("contacts", "suppression", "scheduler", "exporter", "bounce_processor", "sender"),
            # the sender answers ホーム's figures; these journeys send no mail
            service_overrides={"sender": {"smtp_relays": f"127.0.0.1:{free_port()}"}},
            http_port=port,
            public_url=f"http://127.0.0.1:{port}",
            # the export mail's link opens the console (as tayori dev sets it)
            exporter_public_url=f"http://127.0.0.1:{port}",
            login_max_failures=3,
        ) as running:
            yield running


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield launched
        await launched.close()


@pytest_asyncio.fixture(loop_scope="session")
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    made = await browser.new_context(
        viewport={"width": 1280, "height": 860}, locale="ja-JP", accept_downloads=True
    )
    made.set_default_timeout(WAIT_MS)
    yield made
    await made.close()


async def shot(page: Page, name: str) -> None:
    where = SHOTS if os.environ.get("TAYORI_SCREENSHOTS") == "docs" else _scratch()
    where.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(where / f"{name}.png"), full_page=True)


@functools.cache
def _scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="tayori-console-shots-"))


async def downloaded(info: Any) -> bytes:
    """The bytes of a download the browser finished."""
    path = await (await info.value).path()
    return await asyncio.to_thread(Path(path).read_bytes)


async def login(page: Page, site: ConsoleStack, username: str, password: str = PASSWORD) -> None:
    await page.goto(site.base + "/login")
    await page.fill("#login", username)
    await page.fill("#password", password)
    await page.click("button[type=submit]")


async def contact(site: ConsoleStack, **fields: Any) -> dict[str, Any]:
    return await site.api("contacts").ok("POST", "/v1/contacts", fields)


async def group(site: ConsoleStack, name: str) -> dict[str, Any]:
    return await site.api("contacts").ok("POST", "/v1/groups", {"name": name})


async def join(site: ConsoleStack, group_id: int, *contact_ids: int) -> None:
    await site.api("contacts").ok(
        "POST", f"/v1/groups/{group_id}/members", {"contact_ids": list(contact_ids)}
    )
    for contact_id in contact_ids:

        async def applied(contact_id: int = contact_id) -> bool:
            status, _ = await site.api("suppression").call(
                "GET", f"/v1/memberships/{contact_id}/{group_id}"
            )
            return status == 200

        await eventually(applied)


async def state(site: ConsoleStack, contact_id: int, group_id: int) -> str:
    body = await site.api("suppression").ok("GET", f"/v1/memberships/{contact_id}/{group_id}")
    return str(body["state"])


# -- journeys ---------------------------------------------------------------------------------


async def test_login_wrong_password_throttling_and_home(
    context: BrowserContext, site: ConsoleStack
) -> None:
    conn = await db.connect(site.dsn, SCHEMA)
    try:
        await auth.save_user(conn, "throttled", PASSWORD, "viewer")
    finally:
        await conn.close()
    page = await context.new_page()
    await page.goto(site.base + "/")
    assert "/login" in page.url
    await shot(page, "login")
    await login(page, site, "admin", "not the password")
    assert "ユーザー名かパスワードが違います" in await page.inner_text("#login-error")
    for _ in range(3):
        await login(page, site, "throttled", "wrong")
    assert "しばらくお待ちください" in await page.inner_text("#login-error")
    await login(page, site, "throttled")  # the right password, but locked out
    assert "/login" in page.url
    await login(page, site, "admin")
    await page.wait_for_url(site.base + "/")
    assert await page.inner_text("h1") == "ホーム"
    nav = await page.inner_text("nav")
    for label in ("顧客検索", "配信リスト", "インポート", "ジョブ確認", "キャンペーン", "準備中"):
        assert label in nav
    # the figures per day, each from its owner (issue 20): today, the week, seven bars
    for key in ("sent", "errors", "bounces", "complaints", "unsubscribes", "opens", "clicks"):
        card = page.locator(f"#figure-{key}")
        assert (await card.locator("strong.today").inner_text()).isdigit()
        assert await card.locator("svg rect").count() == 7
        assert "取得できません" not in await card.inner_text()
    await shot(page, "home")


async def test_search_with_tag_include_and_exclude_then_save_it(
    context: BrowserContext, site: ConsoleStack
) -> None:
    for i, tags in enumerate((["vip", "tokyo"], ["vip"], ["vip", "churned"], ["tokyo"])):
        await contact(site, email=f"search{i}@example.jp", name=f"検索 {i}", tags=tags)
    page = await context.new_page()
    await login(page, site, "operator")
    await page.goto(site.base + "/contacts")
    await page.fill("#tags_in", "vip")
    await page.fill("#tags_ex", "churned")
    await page.fill("#q", "search")
    await page.click("#search-button")
    await page.wait_for_selector("#total")
    assert await page.inner_text("#total") == "2"
    emails = await page.locator("table.contacts tbody td a").all_inner_texts()
    assert sorted(emails) == ["search0@example.jp", "search1@example.jp"]
    await shot(page, "contacts")
    await page.fill("#filter-name", "VIP（解約除く）")
    await page.click("#save-filter button[type=submit]")
    await page.wait_for_selector(".notice")
    saved = await site.api("contacts").ok("GET", "/v1/filters")
    mine = [f for f in saved["items"] if f["name"] == "VIP（解約除く）"]
    assert len(mine) == 1 and mine[0]["group_id"] is None
    conditions = mine[0]["filter"]["all"]
    assert {"field": "tags", "op": "include_any", "value": ["vip"]} in conditions
    assert {"field": "tags", "op": "exclude_any", "value": ["churned"]} in conditions
    # The saved search gives the same contacts when loaded.
    await page.goto(site.base + f"/contacts?saved={mine[0]['id']}")
    assert await page.inner_text("#total") == "2"
    # At 375 px the page still reads (no horizontal scroll of the page itself).
    await page.set_viewport_size({"width": 375, "height": 812})
    await page.goto(site.base + "/contacts?tags_in=vip")
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= 375 + 1
    await shot(page, "contacts-375px")


async def test_open_a_contact_and_stop_its_delivery_in_one_group(
    context: BrowserContext, site: ConsoleStack
) -> None:
    person = await contact(site, email="stop@example.jp", name="配信 停止", tags=["seminar"])
    news = await group(site, "メルマガ")
    seminar = await group(site, "セミナー案内")
    await join(site, news["id"], person["id"])
    await join(site, seminar["id"], person["id"])
    page = await context.new_page()
    await login(page, site, "operator")
    await page.goto(site.base + f"/contacts/{person['id']}")
    row = page.locator(f"#membership-{news['id']}")
    assert "配信可能" in await row.inner_text()
    page.once("dialog", lambda dialog: dialog.accept())
    await row.locator("button[value=unsubscribed]").click()
    await page.wait_for_url(f"**/contacts/{person['id']}?changed={news['id']}")
    row = page.locator(f"#membership-{news['id']}")
    text = await row.inner_text()
    assert "配信停止" in text and "システム" in text  # its state, and 方法
    assert await state(site, person["id"], news["id"]) == "unsubscribed"
    assert await state(site, person["id"], seminar["id"]) == "deliverable"
    await shot(page, "contact")


async def test_bulk_stop_delivery_in_a_group_from_the_search_with_confirmation(
    context: BrowserContext, site: ConsoleStack
) -> None:
    """Select two results of a search, choose 配信停止にする for a group: the confirmation
    shows the count and the rules and changes nothing; confirmed, the members are stopped
    in that group only, recorded for the operator who asked."""
    people = [
        await contact(site, email=f"bulkstop{i}@example.jp", name=f"一括 {i}", tags=["bulkstop"])
        for i in range(3)
    ]
    letters = await group(site, "一括停止テスト")
    other = await group(site, "一括停止の対象外")
    await join(site, letters["id"], *(p["id"] for p in people))
    await join(site, other["id"], people[0]["id"])
    page = await context.new_page()
    await login(page, site, "operator")
    await page.goto(site.base + "/contacts?tags_in=bulkstop&sort=id")
    assert await page.inner_text("#total") == "3"
    for person in people[:2]:
        await page.check(f"#bulk-form input[name=id][value='{person['id']}']")
    await page.select_option("#bulk-action", "state_unsubscribed")
    await page.select_option("#bulk-form select[name=target_group]", str(letters["id"]))
    await page.click("#bulk-form button[type=submit]")
    await page.wait_for_selector("#bulk-confirm")
    assert await page.inner_text("#bulk-count") == "2"
    assert await page.inner_text("#bulk-changing") == "2"
    assert "配信禁止は配信停止より強い停止です" in await page.inner_text("#bulk-rules")
    assert await state(site, people[0]["id"], letters["id"]) == "deliverable"
    await shot(page, "contacts-bulk-state")
    await page.click("#bulk-confirm")
    await page.wait_for_url("**/contacts?*done=2*")

    async def stopped() -> bool:
        states = [await state(site, p["id"], letters["id"]) for p in people]
        return states == ["unsubscribed", "unsubscribed", "deliverable"]

    await eventually(stopped)
    assert await state(site, people[0]["id"], other["id"]) == "deliverable"
    row = await site.api("suppression").ok(
        "GET", f"/v1/memberships/{people[0]['id']}/{letters['id']}"
    )
    assert row["changed_by"] == "operator@example.jp" and row["method"] == "system"


async def test_a_viewer_cannot_change_anything(context: BrowserContext, site: ConsoleStack) -> None:
    person = await contact(site, email="viewer-sees@example.jp", name="閲覧 のみ")
    members = await group(site, "閲覧テスト")
    await join(site, members["id"], person["id"])
    page = await context.new_page()
    await login(page, site, "viewer")
    await page.goto(site.base + f"/contacts/{person['id']}")
    assert await page.locator("form.state-change").count() == 0
    assert await page.locator(f"#membership-{members['id']} button").count() == 0
    await page.goto(site.base + "/contacts")
    assert await page.locator("#bulk-form").count() == 0
    assert await page.locator("#save-filter").count() == 0
    csrf = await page.locator("input[name=csrf]").first.get_attribute("value")
    refused = await page.request.post(
        site.base + f"/contacts/{person['id']}/memberships/{members['id']}",
        form={"csrf": csrf or "", "state": "banned"},
    )
    assert refused.status == 403
    assert await state(site, person["id"], members["id"]) == "deliverable"


async def test_a_contact_named_like_a_script_is_shown_as_text(
    context: BrowserContext, site: ConsoleStack
) -> None:
    evil = "<script>alert(1)</script>"
    person = await contact(site, email="script@example.jp", name=evil, tags=["<b>x</b>"])
    page = await context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: dialogs.append(dialog.message))
    await login(page, site, "admin")
    await page.goto(site.base + f"/contacts/{person['id']}")
    assert await page.inner_text("#contact-name") == evil
    await page.goto(site.base + "/contacts?q=script%40example")
    assert evil in await page.inner_text("td.name")
    assert dialogs == []


async def test_a_form_without_its_csrf_token_is_refused(
    context: BrowserContext, site: ConsoleStack
) -> None:
    page = await context.new_page()
    await login(page, site, "admin")
    refused = await page.request.post(site.base + "/groups", form={"name": "CSRFなし"})
    assert refused.status == 403
    groups = await site.api("contacts").ok("GET", "/v1/groups")
    assert "CSRFなし" not in [g["name"] for g in groups["items"]]


async def test_import_a_cp932_file_with_bad_rows_and_read_its_errors(
    context: BrowserContext, site: ConsoleStack, tmp_path: Path
) -> None:
    rows = [
        "メールアドレス,氏名,会社名",
        "import1@example.jp,山田 太郎,株式会社テスト",
        "not-an-address,佐藤 花子,髙島屋",
        "import2@example.jp,鈴木 一郎,",
        "also bad,田中,",
    ]
    upload = tmp_path / "顧客.csv"
    upload.write_bytes("\r\n".join(rows).encode("cp932") + b"\r\n")
    page = await context.new_page()
    await login(page, site, "operator")
    await page.goto(site.base + "/imports")
    await shot(page, "imports")
    await page.set_input_files("#file", str(upload))
    await page.select_option("#encoding", "cp932")
    await page.click("#upload-form button[type=submit]")
    await page.wait_for_selector("table.preview")
    preview = await page.inner_text("table.preview")
    assert "山田 太郎" in preview and "髙島屋" in preview
    await shot(page, "import-preview")
    await page.click("#import-button")
    await page.wait_for_selector('#import-status[data-status="done"]')
    errors = await page.locator("#row-errors tbody tr").all_inner_texts()
    assert [e.split("\t")[0] for e in errors] == ["3", "5"]
    await shot(page, "import-job")
    async with page.expect_download() as info:
        await page.click("#errors-csv")
    text = (await downloaded(info)).decode("utf-8-sig")
    lines = list(csv.reader(io.StringIO(text)))
    assert [line[0] for line in lines[1:]] == ["3", "5"]
    found = await site.api("contacts").ok(
        "POST",
        "/v1/contacts/search",
        {"filter": {"field": "email", "op": "starts_with", "value": "import"}},
    )
    assert sorted(c["email"] for c in found["items"]) == [
        "import1@example.jp",
        "import2@example.jp",
    ]


async def test_export_a_groups_unsubscribed_members_and_follow_the_mail_link(
    browser: Browser, context: BrowserContext, site: ConsoleStack
) -> None:
    gone = await contact(site, email="gone@example.jp", name="停止 済")
    stays = await contact(site, email="stays@example.jp", name="配信 可能")
    letters = await group(site, "お知らせ")
    await join(site, letters["id"], gone["id"], stays["id"])
    await site.api("suppression").ok(
        "PUT", f"/v1/memberships/{gone['id']}/{letters['id']}", {"state": "unsubscribed"}
    )
    page = await context.new_page()
    await login(page, site, "admin")
    await page.goto(site.base + "/groups")
    await shot(page, "groups")
    counts = page.locator(f"#group-{letters['id']}")
    assert await counts.locator(".count-unsubscribed").inner_text() == "1"
    await page.goto(site.base + f"/exports/new?group={letters['id']}")
    await page.check("#source-group")
    await page.select_option("#export-group", str(letters["id"]))
    await page.check("#state-unsubscribed")
    await page.check(f"input[value='unsubscribed_at:{letters['id']}']")
    await page.select_option("#encoding", "cp932")
    await shot(page, "export")
    await page.click("#export-button")
    await page.wait_for_url("**/jobs?kind=export&created=*")
    job_id = page.url.rsplit("created=", 1)[1]
    await page.wait_for_selector(f'#job-{job_id}[data-status="done"]')
    await shot(page, "jobs")
    async with page.expect_download() as info:
        await page.click(f"#job-{job_id} a.download")
    data = (await downloaded(info)).decode("cp932")
    assert "gone@example.jp" in data and "stays@example.jp" not in data
    assert "配信停止日時" in data
    # The mail's link (the exporter builds it on EXPORTER_PUBLIC_URL = the console) opens
    # the console: a stranger is asked to log in, then gets the file.
    job = await site.api("exporter").ok("GET", f"/v1/exports/{job_id}")
    link = job["download_url"]
    assert link.startswith(site.base + "/v1/exports/")
    stranger = await browser.new_context(accept_downloads=True)
    stranger.set_default_timeout(WAIT_MS)
    try:
        fresh = await stranger.new_page()
        await fresh.goto(link)
        assert "/login" in fresh.url
        await fresh.fill("#login", "admin")
        await fresh.fill("#password", PASSWORD)
        async with fresh.expect_download() as info:
            await fresh.click("button[type=submit]")
        again = (await downloaded(info)).decode("cp932")
        assert again == data
    finally:
        await stranger.close()
