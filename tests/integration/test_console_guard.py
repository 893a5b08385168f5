"""キャンペーン詳細's complaint guard (issue 21) without a browser: a campaign whose guard
tripped shows its held domains, why and the figures; an operator resumes one domain (the
scheduler records the user and publishes the resume), a viewer sees no button and may not
post, a domain no longer held is refused on the page. Real contacts and scheduler services,
the campaign.guard record published as deliverability would."""

from __future__ import annotations

import datetime as dt
import html as htmllib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from libs.common.topics import Topic
from tests.conftest import Kafka, Stack, eventually
from tests.integration.console_stack import (
    Browserless,
    ConsoleStack,
    console_stack,
    no_leaked_tasks_but_keepalives,
    site_kafka,
)
from tests.integration.test_contacts_api import published

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("console_guard")]
no_leaked_tasks = no_leaked_tasks_but_keepalives
kafka = site_kafka
DOCOMO, GMAIL = "docomo.ne.jp", "gmail.com"
REASON = "complaint_rate 0.0052 > 0.0030 (13/2500 delivered)"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def site(stack: Stack, template_db: str) -> AsyncIterator[ConsoleStack]:
    async with console_stack(stack, template_db, ("contacts", "scheduler")) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session")
async def client(site: ConsoleStack) -> AsyncIterator[Browserless]:
    browser = Browserless(site.base)
    yield browser
    await browser.close()


async def tripped_campaign(site: ConsoleStack, kafka: Kafka) -> str:
    """A scheduled-to-be draft whose complaint guard holds docomo.ne.jp and gmail.com."""
    scheduler = site.api("scheduler")
    category = await scheduler.ok(
        "POST",
        "/v1/categories",
        {"name": "メルマガ", "window_start": "08:00", "window_end": "21:00", "time_zone": "UTC"},
    )
    group = await site.api("contacts").ok("POST", "/v1/groups", {"name": f"g{uuid.uuid4().hex}"})
    campaign = await scheduler.ok(
        "POST",
        "/v1/campaigns",
        {
            "name": "冬のセール",
            "category_id": category["id"],
            "target": {"group_id": group["id"]},
            "from_address": "news@shop.example.jp",
            "subject": "冬のセール",
            "body": "配信停止: <#unsubscribe_url>\n",
            "scheduled_at": (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).isoformat(),
        },
    )
    cid = campaign["id"]
    record = {
        "guard_id": str(uuid.uuid4()),
        "campaign_id": cid,
        "domains": [DOCOMO, GMAIL],
        "reason": REASON,
        "delivered": 2500,
        "complaints": 13,
        "decided_at": dt.datetime.now(dt.UTC),
    }
    await (await kafka.publisher.send(Topic.CAMPAIGN_GUARD, cid, record))

    async def held() -> bool:
        body = await scheduler.ok("GET", f"/v1/campaigns/{cid}")
        return body["guard"] is not None

    await eventually(held)
    return cid


async def tripped_page(
    client: Browserless, site: ConsoleStack, kafka: Kafka, role: str
) -> tuple[str, str]:
    """A tripped campaign (tripped_campaign) and its page as a ``role`` sees it: (id, page)."""
    cid = await tripped_campaign(site, kafka)
    assert (await client.login(role))[0] == 200
    status, page, _ = await client.get(f"/campaigns/{cid}")
    assert status == 200, page
    return cid, page


def section(page: str) -> str:
    """The guard's section of the campaign page, unescaped."""
    start = page.index('id="guard"')
    return htmllib.unescape(page[start : page.index("</section>", start)])


async def test_an_operator_resumes_a_held_domain_from_the_campaign_page(
    client: Browserless, site: ConsoleStack, kafka: Kafka
) -> None:
    cid, page = await tripped_page(client, site, kafka, "operator")
    guard = section(page)
    assert "苦情率ガード" in guard and "配信保留中のドメイン" in guard
    assert DOCOMO in guard and GMAIL in guard and REASON in guard
    assert "0.52%" in guard and "13" in guard and "2500" in guard
    # One confirmed 再開 per held domain, one for all of them, and one 配信中止 per domain.
    assert guard.count("data-confirm=") == 5 and f'value="{DOCOMO}"' in guard
    assert guard.count("配信中止") == 2

    status, page, response = await client.post(
        f"/campaigns/{cid}/guard/resume", {"csrf": client.csrf(page), "domain": DOCOMO}
    )
    assert status == 200
    assert str(response.url).endswith(f"/campaigns/{cid}?resumed={DOCOMO}&done=resume")
    assert "配信を再開しました" in page
    body = await site.api("scheduler").ok("GET", f"/v1/campaigns/{cid}")
    assert (body["guard"]["held"], body["guard"]["resumed"]) == ([GMAIL], [DOCOMO])
    assert body["guard"]["resumed_by"] == "operator@example.jp"
    controls = [
        (c["action"], c["domains"])
        for c in await published(site.services["scheduler"], kafka, Topic.CAMPAIGN_CONTROL)
        if c["campaign_id"] == cid
    ]
    assert controls == [("pause", [DOCOMO, GMAIL]), ("resume", [DOCOMO])]

    # A second resume of the same domain (another tab) is refused on the page.
    status, page, _ = await client.post(
        f"/campaigns/{cid}/guard/resume", {"csrf": client.csrf(page), "domain": DOCOMO}
    )
    assert status == 409 and "guard-error" in page and DOCOMO in htmllib.unescape(page)

    # 配信中止 of the other held domain: its recipients count as suppressed, nothing resumed.
    status, page, response = await client.post(
        f"/campaigns/{cid}/guard/drop", {"csrf": client.csrf(page), "domain": GMAIL}
    )
    assert status == 200 and str(response.url).endswith(f"?resumed={GMAIL}&done=drop")
    assert "配信を中止しました" in page and "guard-dropped" in page
    body = await site.api("scheduler").ok("GET", f"/v1/campaigns/{cid}")
    assert (body["guard"]["held"], body["guard"]["dropped"]) == ([], [GMAIL])


async def test_a_viewer_sees_the_guard_but_cannot_resume(
    client: Browserless, site: ConsoleStack, kafka: Kafka
) -> None:
    cid, page = await tripped_page(client, site, kafka, "viewer")
    assert DOCOMO in section(page)
    assert "guard-resume" not in page and "guard-drop" not in page
    status, _, _ = await client.post(
        f"/campaigns/{cid}/guard/resume", {"csrf": client.csrf(page), "domain": DOCOMO}
    )
    assert status == 403
    body: dict[str, Any] = await site.api("scheduler").ok("GET", f"/v1/campaigns/{cid}")
    assert body["guard"]["held"] == [DOCOMO, GMAIL]
    # The home page's recent campaigns link to it, marked held.
    _, home, _ = await client.get("/")
    assert f'href="/campaigns/{cid}"' in home and "配信保留中" in home
