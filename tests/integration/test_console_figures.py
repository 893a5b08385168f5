"""ホーム's figures per day and 顧客詳細's histories (issue 20), through the real system: mail
sent by the sender to an SMTP relay that refuses one address, a DSN and a complaint on the
bounce processor's SMTP listener, opens and clicks on its tracking URLs, an operator's
unsubscribe in suppression. The services' new read APIs are checked for their numbers,
paging and refusals, then the console's pages for the same numbers (over HTTP)."""

from __future__ import annotations

import datetime as dt
import html as htmllib
import os
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiosmtpd.controller import Controller

from libs.common.mail.tracking import TrackingLinks
from libs.common.topics import Topic
from tayori.embedded import free_port
from tests.conftest import Kafka, Stack, eventually
from tests.integration.console_stack import (
    PASSWORD,
    Browserless,
    ConsoleStack,
    console_stack,
    no_leaked_tasks_but_keepalives,
    site_kafka,
)
from tests.integration.test_bounce_processor import Bounces, fixture
from tests.integration.test_sender import RefusingHandler, send_request

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("console_figures")]
no_leaked_tasks = no_leaked_tasks_but_keepalives
kafka = site_kafka
TOKYO = dt.timezone(dt.timedelta(hours=9))
#: as tests/integration/test_console_browser.py drives it (not imported: that module skips
#: itself where Chromium is missing, and these HTTP tests must run there too)
CHROMIUM = "/usr/bin/chromium"
HAVE_CHROMIUM = Path(CHROMIUM).exists()
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
WAIT_MS = 60_000
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "console"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def relay(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Controller]:
    """An SMTP relay that refuses perm@… with 550 5.1.1 and keeps everything else."""
    handler = RefusingHandler(tmp_path_factory.mktemp("relay"), pipelining=True)
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield controller
    controller.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def site(stack: Stack, template_db: str, relay: Controller) -> AsyncIterator[ConsoleStack]:
    async with console_stack(
        stack,
        template_db,
        ("contacts", "suppression", "scheduler", "sender", "bounce_processor"),
        service_overrides={
            "sender": {"smtp_relays": f"127.0.0.1:{relay.port}"},
            "bounce_processor": {"smtp_host": "127.0.0.1", "smtp_port": free_port()},
        },
    ) as running:
        yield running


class World:
    """What the module's data is: five readers, one group, two campaigns and 25 more."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.group = 0
        self.named = ""  # a campaign the scheduler knows (its name shows on the page)
        self.other = str(uuid.uuid4())  # a campaign id only the deliveries carry


#: many@ receives this many campaigns (more than the contact page's page of 20).
MANY = 25


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def world(site: ConsoleStack, kafka: Kafka) -> World:
    """alice receives both campaigns, opens the first twice and clicks it; perm@ is refused
    by the relay (an error and a hard bounce) and gets a DSN for the second; carol reports
    spam; dave is unsubscribed by an operator once his mail went; many@ receives MANY other
    campaigns. Returns once every service has counted all of it."""
    w = World()
    contacts = site.api("contacts")
    for name in ("alice", "perm", "carol", "dave", "many"):
        body = await contacts.ok("POST", "/v1/contacts", {"email": f"{name}@example.com"})
        w.ids[name] = body["id"]
    w.group = (await contacts.ok("POST", "/v1/groups", {"name": "お知らせ"}))["id"]
    members = [w.ids[n] for n in ("alice", "perm", "carol", "dave")]
    await contacts.ok("POST", f"/v1/groups/{w.group}/members", {"contact_ids": members})
    scheduler = site.api("scheduler")
    category = await scheduler.ok(
        "POST",
        "/v1/categories",
        {
            "name": "メルマガ",
            "window_start": "00:00",
            "window_end": "23:59",
            "time_zone": "Asia/Tokyo",
        },
    )
    campaign = await scheduler.ok(
        "POST",
        "/v1/campaigns",
        {
            "name": "12月のお知らせ",
            "category_id": category["id"],
            "target": {"group_id": w.group},
            "from_address": "news@shop.example.jp",
            "subject": "お知らせ",
            "format": "text",
            "body": "本文\n配信停止: <#unsubscribe_url>\n",
            "scheduled_at": (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat(),
        },
    )
    w.named = str(campaign["id"])

    # the deliveries, as the scheduler releases them
    def request(campaign_id: str, name: str) -> dict[str, Any]:
        return send_request(campaign_id, w.ids[name], f"{name}@example.com", group_id=w.group)

    requests = [request(w.named, n) for n in ("alice", "perm", "carol", "dave")]
    requests.append(request(w.other, "alice"))
    requests += [request(str(uuid.uuid4()), "many") for _ in range(MANY)]
    for one in requests:
        await kafka.send(Topic.SEND_REQUESTS, one["contact_id"], one)

    async def all_sent() -> bool:
        totals = (await daily(site, "sender"))["totals"]
        return totals["sent"] + totals["errors"] == len(requests)

    await eventually(all_sent)

    # opens and a click on the first campaign, through the public tracking URLs
    bounce = site.services["bounce_processor"]
    links = TrackingLinks(bounce.runtime.settings.signing_keys, bounce.api.base)
    async with aiohttp.ClientSession() as session:
        for url in (
            links.open_url(w.named, w.ids["alice"]),
            links.open_url(w.named, w.ids["alice"]),
            links.click_url(w.named, w.ids["alice"], "https://shop.example.jp/sale"),
        ):
            async with session.get(url, allow_redirects=False) as response:
                assert response.status in (200, 302)

    # a DSN for perm@ on the second campaign, a complaint from carol on the first
    bounces = Bounces(bounce, kafka)
    await bounces.bounce("postfix_user_unknown", w.other, w.ids["perm"])
    await bounces.mail(
        fixture("arf_abuse", bounces.verp.address(w.named, w.ids["carol"])),
        "fbl@bounces.localhost",
    )

    # an operator stops dave's delivery in the group
    suppression = site.api("suppression")
    path = f"/v1/memberships/{w.ids['dave']}/{w.group}"

    async def joined() -> bool:
        return (await suppression.call("GET", path))[0] == 200

    await eventually(joined)
    await suppression.ok("PUT", path, {"state": "unsubscribed"})

    async def counted() -> bool:
        bounced = (await daily(site, "bounce_processor"))["totals"]
        stopped = (await daily(site, "suppression"))["totals"]
        alice = await contacts.ok("GET", f"/v1/contacts/{w.ids['alice']}/activity")
        many = await contacts.ok("GET", f"/v1/contacts/{w.ids['many']}/activity")
        perm = await contacts.ok("GET", f"/v1/contacts/{w.ids['perm']}/activity")
        history = await bounce.api.ok("GET", f"/v1/contacts/{w.ids['perm']}/bounces")
        return (
            (bounced["bounces"], bounced["complaints"], stopped["unsubscribes"]) == (2, 1, 1)
            and (bounced["opens"], bounced["clicks"]) == (1, 1)
            and (alice["totals"]["received"], alice["totals"]["clicked"]) == (2, 1)
            and many["totals"]["received"] == MANY
            and perm["totals"]["errored"] == 1
            and len(history["items"]) == 2
        )

    await eventually(counted)
    return w


def fields(problem: dict[str, Any]) -> set[str]:
    """The fields a problem answer names."""
    return {problem.get("field", "")} | {e["field"] for e in problem.get("errors", [])}


def today(body: dict[str, Any]) -> dict[str, Any]:
    """The last day of an answer in Asia/Tokyo, which is today in Japan."""
    day = body["days"][-1]
    assert day["date"] == dt.datetime.now(TOKYO).date().isoformat()
    return day


async def daily(site: ConsoleStack, service: str, **query: str) -> dict[str, Any]:
    return await site.api(service).ok("GET", "/v1/stats/daily", params=query)


async def test_figures_per_day_of_the_three_services(site: ConsoleStack, world: World) -> None:
    sends = await daily(site, "sender")
    assert len(sends["days"]) == 7 and sends["tz"] == "Asia/Tokyo"
    assert today(sends) == {
        "date": today(sends)["date"],
        "sent": 4 + MANY,
        "errors": 1,
        "suppressed": 0,
    }
    assert sends["totals"] == {"sent": 4 + MANY, "errors": 1, "suppressed": 0}
    # the refused delivery's 5.1.1 and the DSN: two hard bounces of perm@; carol's report
    bounces = await daily(site, "bounce_processor")
    assert today(bounces) | {"date": None} == {
        "date": None,
        "bounces": 2,
        "hard": 2,
        "soft": 0,
        "policy": 0,
        "complaints": 1,
        "opens": 1,  # alice, once however often she opened
        "clicks": 1,
    }
    refusals = await daily(site, "suppression")
    assert today(refusals)["unsubscribes"] == 1
    assert today(refusals)["unsubscribed_contacts"] == 1
    assert today(refusals)["by_form"] == 0 and refusals["totals"]["bans"] == 0

    # another zone counts the same events on its own days; a longer window holds them too
    utc = await daily(site, "sender", tz="UTC", days="30")
    assert len(utc["days"]) == 30 and utc["tz"] == "UTC"
    assert utc["totals"]["sent"] == 4 + MANY
    assert utc["days"][-1]["date"] == dt.datetime.now(dt.UTC).date().isoformat()


@pytest.mark.parametrize("service", ["sender", "bounce_processor", "suppression"])
async def test_figures_per_day_refuse_bad_input_and_anonymous_callers(
    site: ConsoleStack, service: str
) -> None:
    api = site.api(service)
    for query, field in (
        ({"days": "0"}, "days"),
        ({"days": "93"}, "days"),
        ({"days": "seven"}, "days"),
        ({"tz": "Mars/Olympus"}, "tz"),
        ({"tz": "../etc/passwd"}, "tz"),
        ({"zone": "UTC"}, "zone"),
    ):
        status, problem = await api.call("GET", "/v1/stats/daily", params=query)
        assert status == 400, (query, problem)
        assert field in fields(problem), problem
    status, _ = await api.call("GET", "/v1/stats/daily", token=None)
    assert status == 401


async def test_a_contacts_campaigns_page_by_cursor(site: ConsoleStack, world: World) -> None:
    contacts = site.api("contacts")
    alice = world.ids["alice"]
    body = await contacts.ok("GET", f"/v1/contacts/{alice}/activity")
    assert body["totals"] == {"received": 2, "errored": 0, "opened": 1, "clicked": 1}
    assert body["next_cursor"] is None
    by_campaign = {item["campaign_id"]: item for item in body["items"]}
    assert set(by_campaign) == {world.named, world.other}
    opened = by_campaign[world.named]
    assert (opened["opens"], opened["clicks"]) == (2, 1)
    assert opened["received_at"] and opened["opened_at"] and opened["clicked_at"]
    assert by_campaign[world.other]["opened_at"] is None

    first = await contacts.ok("GET", f"/v1/contacts/{alice}/activity", params={"limit": "1"})
    assert len(first["items"]) == 1 and first["next_cursor"]
    second = await contacts.ok(
        "GET",
        f"/v1/contacts/{alice}/activity",
        params={"limit": "1", "cursor": first["next_cursor"]},
    )
    assert second["next_cursor"] is None
    assert [i["campaign_id"] for i in first["items"] + second["items"]] == [
        i["campaign_id"] for i in body["items"]
    ]
    perm = await contacts.ok("GET", f"/v1/contacts/{world.ids['perm']}/activity")
    assert perm["totals"]["errored"] == 1

    status, problem = await contacts.call(
        "GET", f"/v1/contacts/{alice}/activity", params={"cursor": "Zm9v"}
    )
    assert status == 400 and "cursor" in fields(problem)
    status, _ = await contacts.call("GET", "/v1/contacts/999999999/activity")
    assert status == 404


async def test_a_contacts_bounces_page_by_cursor(site: ConsoleStack, world: World) -> None:
    api = site.api("bounce_processor")
    perm = world.ids["perm"]
    body = await api.ok("GET", f"/v1/contacts/{perm}/bounces")
    assert {(b["campaign_id"], b["classification"]) for b in body["items"]} == {
        (world.named, "invalid_address"),
        (world.other, "invalid_address"),
    }
    times = [b["occurred_at"] for b in body["items"]]
    assert times == sorted(times, reverse=True)
    first = await api.ok("GET", f"/v1/contacts/{perm}/bounces", params={"limit": "1"})
    second = await api.ok(
        "GET", f"/v1/contacts/{perm}/bounces", params={"limit": "1", "cursor": first["next_cursor"]}
    )
    assert first["items"] + second["items"] == body["items"]
    assert second["next_cursor"] is None
    status, problem = await api.call("GET", f"/v1/contacts/{perm}/bounces", params={"cursor": "!!"})
    assert status == 400 and "cursor" in fields(problem)
    assert (await api.ok("GET", f"/v1/contacts/{world.ids['dave']}/bounces"))["items"] == []


def card(page: str, key: str) -> tuple[str, str]:
    """The (today, last 7 days) numbers of the home page's card ``figure-<key>``."""
    found = re.search(
        rf'id="figure-{key}".*?class="today">(\d+)<.*?class="week">(\d+)<', page, re.S
    )
    assert found, f"no figures for {key}"
    return found.group(1), found.group(2)


def figure(page: str, key: str) -> str:
    """The home page's card ``figure-<key>``, its chart and any notice included."""
    return page.split(f'id="figure-{key}"', 1)[1].split("</article>", 1)[0]


async def home(base: str) -> tuple[int, str]:
    """The home page as a viewer of the console at ``base`` sees it: (status, page)."""
    client = Browserless(base)
    try:
        assert (await client.login("viewer"))[0] == 200
        status, page, _ = await client.get("/")
    finally:
        await client.close()
    return status, page


async def test_home_shows_the_figures_of_today_and_the_week(
    site: ConsoleStack, world: World
) -> None:
    status, page = await home(site.base)
    assert status == 200
    assert card(page, "sent") == (str(4 + MANY), str(4 + MANY))
    assert card(page, "errors") == ("1", "1")
    assert card(page, "bounces") == ("2", "2")
    assert card(page, "complaints") == ("1", "1")
    assert card(page, "unsubscribes") == ("1", "1")
    assert card(page, "opens") == ("1", "1")
    assert card(page, "clicks") == ("1", "1")
    for key in ("sent", "errors", "bounces", "complaints", "unsubscribes", "opens", "clicks"):
        assert "取得できません" not in figure(page, key)
    # each chart: seven bars, today's the tallest of the sends
    sent = figure(page, "sent")
    assert sent.count("<rect") == 7
    assert re.search(rf"<title>\d\d/\d\d: {4 + MANY}</title>", sent)


async def test_home_says_which_service_is_away(
    stack: Stack, template_db: str, relay: Controller
) -> None:
    async with console_stack(stack, template_db, ("suppression",)) as partial:
        status, page = await home(partial.base)
    assert status == 200
    assert card(page, "unsubscribes") == ("0", "0")
    sent = figure(page, "sent")
    assert "取得できません" in sent and "sender" in sent
    assert "bounce_processor" in figure(page, "complaints")


async def test_contact_page_shows_campaigns_opens_clicks_and_bounces(
    site: ConsoleStack, world: World
) -> None:
    client = Browserless(site.base)
    try:
        assert (await client.login("viewer"))[0] == 200
        status, page, _ = await client.get(f"/contacts/{world.ids['alice']}")
        assert status == 200
        table = page.split('id="activity-table"', 1)[1].split("</table>", 1)[0]
        rows = re.findall(r'<tr data-campaign="([^"]+)">(.*?)</tr>', table, re.S)
        assert [campaign for campaign, _ in rows].count(world.named) == 1
        named = dict(rows)[world.named]
        assert "12月のお知らせ" in named  # the scheduler's name, not the id
        assert re.search(r'class="opens">[^<]*\(2\)', named)
        assert re.search(r'class="clicks">[^<]*\(1\)', named)
        assert world.other in dict(rows)[world.other]  # unknown to the scheduler: its id
        totals = htmllib.unescape(page.split('id="activity-totals"', 1)[1].split("</p>")[0])
        assert re.search(r'class="received">2<', totals)

        status, page, _ = await client.get(f"/contacts/{world.ids['perm']}")
        table = page.split('id="bounces-table"', 1)[1].split("</table>", 1)[0]
        assert table.count("<tr data-campaign=") == 2
        assert "アドレス不正" in table  # invalid_address, in the seeds' words
        assert 'id="delivery-status">アドレス不正<' in page

        # a cursor that is not one: the page still answers, saying so next to the history
        status, page, _ = await client.get(f"/contacts/{world.ids['alice']}?activity=Zm9v")
        assert status == 200
        section = page.split('id="activity"', 1)[1].split("</section>", 1)[0]
        assert 'class="problem"' in section and "cursor" in section
    finally:
        await client.close()


async def test_contact_page_pages_through_its_history(site: ConsoleStack, world: World) -> None:
    """More campaigns than a page: 次へ leads on, by the contacts API's cursor."""
    client = Browserless(site.base)
    found = None
    try:
        assert (await client.login("viewer"))[0] == 200
        seen: list[str] = []
        path = f"/contacts/{world.ids['many']}"
        for _ in range(3):
            status, page, _ = await client.get(path)
            assert status == 200
            table = page.split('id="activity-table"', 1)[1].split("</table>", 1)[0]
            seen += re.findall(r'<tr data-campaign="([^"]+)">', table)
            found = re.search(r'id="activity-next" href="([^"]+)"', page)
            if not found:
                break
            path = htmllib.unescape(found.group(1)).split("#", 1)[0]
        assert len(seen) == MANY and len(set(seen)) == MANY
        assert not found  # the second page was the last
    finally:
        await client.close()


async def test_the_figures_and_the_history_in_chromium(
    site: ConsoleStack, world: World, tmp_path: Path
) -> None:
    """The same pages in a real Chromium (Debian's, as test_console_browser.py drives it):
    the charts are drawn and 次へ is followed by the keyboard. Screenshots go to
    docs/console/ with TAYORI_SCREENSHOTS=docs, else to the test's directory."""
    if not HAVE_CHROMIUM:
        pytest.skip("Chromium is not installed (apt-get install chromium): no browser check")
    from playwright.async_api import async_playwright

    shots = SHOTS if os.environ.get("TAYORI_SCREENSHOTS") == "docs" else tmp_path
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            context = await browser.new_context(
                viewport={"width": 1280, "height": 860}, locale="ja-JP"
            )
            context.set_default_timeout(WAIT_MS)
            page = await context.new_page()
            await page.goto(site.base + "/login")
            await page.fill("#login", "viewer")
            await page.fill("#password", PASSWORD)
            await page.click("button[type=submit]")
            await page.wait_for_url(site.base + "/")
            sent = page.locator("#figure-sent")
            assert await sent.locator("strong.today").inner_text() == str(4 + MANY)
            assert await sent.locator("svg rect").count() == 7
            tallest = sent.locator("svg rect").last  # today's bar, the only one not flat
            assert float(await tallest.get_attribute("height") or 0) == 40
            assert await page.locator("#figure-complaints strong.week").inner_text() == "1"
            await page.screenshot(path=str(shots / "home-figures.png"), full_page=True)

            await page.goto(site.base + f"/contacts/{world.ids['alice']}")
            named = page.locator(f'#activity-table tr[data-campaign="{world.named}"]')
            assert "12月のお知らせ" in await named.inner_text()
            await page.screenshot(path=str(shots / "contact-history.png"), full_page=True)

            await page.goto(site.base + f"/contacts/{world.ids['many']}")
            assert await page.locator("#activity-table tbody tr").count() == 20
            await page.focus("#activity-next")
            await page.keyboard.press("Enter")
            await page.wait_for_url("**activity=**")
            assert await page.locator("#activity-table tbody tr").count() == MANY - 20
            assert await page.locator("#activity-next").count() == 0
        finally:
            await browser.close()
