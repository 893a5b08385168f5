"""Open and click tracking end to end (F-34): a campaign through contacts, the scheduler and
the sender to the SMTP sink; the mail that arrives has an open pixel and its links rewritten
to signed click URLs whose destination is the link as written, while the unsubscribe link,
mailto: and anchors are left alone. A test send is not tracked. Then a reader opens and clicks
through the bounce processor: the scheduler's statistics count them (unique once) and the
contacts history filter finds the reader.

The scheduler's clock is a FakeClock (see test_scheduler.py).
"""

from __future__ import annotations

import re
from email.message import Message

from libs.common.mail.tracking import TrackingLinks
from libs.common.mail.unsubscribe import UnsubscribeLinks
from libs.common.settings import CommonSettings
from tests.conftest import eventually
from tests.integration.test_contacts_api import ids_of
from tests.integration.test_scheduler import (
    campaign_body,
    category,
    fake_clock,
    group,
    people,
    reserved,
    status_of,
)
from tests.integration.test_scheduler_sender import mails

DEFAULTS = CommonSettings()  # the services under test run with these keys and URLs
TRACKING = TrackingLinks(DEFAULTS.signing_keys, DEFAULTS.tracking_base_url)
UNSUBSCRIBE = UnsubscribeLinks(DEFAULTS.signing_keys, DEFAULTS.public_base_url)
BODY = (
    "<html><body><p><#氏名>様</p>"
    '<p><a href="https://shop.example.jp/sale?utm_source=tayori&amp;utm_medium=mail">セール</a></p>'
    '<p><a href="https://shop.example.jp/me?id=<#contact_id>">マイページ</a></p>'
    '<p><a href="mailto:support@shop.example.jp">問い合わせ</a> <a href="#top">上へ</a></p>'
    '<p><a href="<#配信停止URL>">配信停止</a></p></body></html>'
)


def html_of(mail: Message) -> str:
    [part] = [p for p in mail.walk() if p.get_content_type() == "text/html"]
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode("utf-8")


def hrefs(html: str) -> list[str]:
    return re.findall(r'href="([^"]*)"', html)


def token(url: str, kind: str) -> str:
    prefix = f"{DEFAULTS.tracking_base_url}/t/{kind}/"
    assert url.startswith(prefix), url
    return url.removeprefix(prefix)


async def test_sent_mail_carries_signed_pixel_and_links(
    scheduler, contacts, sender, smtp_sink, bounce_processor
):
    clock = fake_clock(scheduler)
    members = await group(contacts)
    ids = await people(contacts, 3, members)
    cat = await category(scheduler)
    body = campaign_body(cat, clock, target={"group_id": members}, format="html", body=BODY)
    campaign = await reserved(scheduler, body)
    cid = campaign["id"]

    # A test send: delivered as written, nothing in it can count as an open or a click.
    await scheduler.api.ok("POST", f"/v1/campaigns/{cid}/test-send", {"addresses": "qa@example.jp"})
    [test_mail] = await mails(smtp_sink, 1)
    test_html = html_of(test_mail)
    assert DEFAULTS.tracking_base_url not in test_html
    assert "https://shop.example.jp/sale?utm_source=tayori&amp;utm_medium=mail" in test_html

    clock.advance(minutes=10)
    await status_of(scheduler, cid, "aggregating")
    delivered = {str(m["To"]): m for m in await mails(smtp_sink, 4)}
    contact_of = {f"p{i}@example.jp": contact for i, contact in enumerate(ids)}
    followed: dict[int, tuple[str, str]] = {}
    for address, contact_id in contact_of.items():
        html = html_of(delivered[address])
        [pixel] = re.findall(
            r'<img src="([^"]+)" width="1" height="1" alt="" style="display:none"></body>', html
        )
        opened = TRACKING.read_open(token(pixel, "o"))
        assert (opened.campaign_id, opened.contact_id, opened.step_id) == (cid, contact_id, None)

        sale, mine, mailto, anchor, unsubscribe = hrefs(html)
        clicks = [TRACKING.read_click(token(url, "c")) for url in (sale, mine)]
        assert [(c.campaign_id, c.contact_id) for c in clicks] == [(cid, contact_id)] * 2
        assert [c.url for c in clicks] == [
            "https://shop.example.jp/sale?utm_source=tayori&utm_medium=mail",
            f"https://shop.example.jp/me?id={contact_id}",
        ]
        assert (mailto, anchor) == ("mailto:support@shop.example.jp", "#top")
        target = UNSUBSCRIBE.read(unsubscribe.removeprefix(f"{DEFAULTS.public_base_url}/u/"))
        assert (target.contact_id, target.group_id) == (contact_id, members)
        listed = "".join(str(delivered[address]["List-Unsubscribe"]).split())
        assert listed == f"<{unsubscribe}>"
        followed[contact_id] = (pixel, sale)

    # p0 opens twice and clicks the sale link; the others do nothing.
    reader = ids[0]
    pixel, sale = followed[reader]
    tracker = bounce_processor.api
    for _ in range(2):
        url = tracker.base + pixel.removeprefix(DEFAULTS.tracking_base_url)
        async with tracker.session.get(url) as response:
            assert (response.status, response.content_type) == (200, "image/gif")
    path = sale.removeprefix(DEFAULTS.tracking_base_url)
    async with tracker.session.get(tracker.base + path, allow_redirects=False) as response:
        assert response.status == 302
        assert response.headers["Location"] == (
            "https://shop.example.jp/sale?utm_source=tayori&utm_medium=mail"
        )
    status, _ = await tracker.call("GET", path[:-2] + ("AA" if path[-2:] != "AA" else "BB"))
    assert status == 404  # a tampered token: no redirect, nothing counted

    async def counted() -> bool:
        body = await scheduler.api.ok("GET", f"/v1/campaigns/{cid}")
        statistics = [body[k] for k in ("opens", "clicks", "unique_opens", "unique_clicks")]
        assert statistics == [2, 1, 1, 1]
        return True

    await eventually(counted)
    for event in ("opened", "clicked"):
        history = {"history": {"event": event, "campaign_id": cid}}

        async def found(history: dict[str, object] = history) -> bool:
            assert await ids_of(contacts.api, history) == [reader]
            return True

        await eventually(found)
