"""The bounce processor end to end (issue 5): DSNs and complaints through its real SMTP
listener, delivery results and tracking hits through Kafka and HTTP, against the real
PostgreSQL and broker; suppression and contacts where their answers are the point."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import pytest

from libs.common.mail.tracking import PIXEL_GIF, TrackingLinks
from libs.common.mail.verp import VerpAddresses
from libs.common.topics import Topic
from services.bounce_processor import maintenance
from services.bounce_processor.context import CONTEXT
from tests.conftest import eventually
from tests.integration.test_contacts_projections import delivery_result as projection_result

pytestmark = pytest.mark.integration
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "bounces"
SAMPLE_RETURN_PATH = b"b-k1-example@bounces.localhost"


def fixture(name: str, return_path: str | None = None) -> bytes:
    """A corpus mail; ``return_path`` replaces the placeholder return path inside it."""
    raw = (FIXTURES / f"{name}.eml").read_bytes()
    return raw.replace(SAMPLE_RETURN_PATH, return_path.encode()) if return_path else raw


class Bounces:
    """Drives one running bounce processor: its SMTP listener, its HTTP API, its topics."""

    def __init__(self, service: Any, kafka: Any) -> None:
        self.service = service
        self.kafka = kafka
        settings = service.runtime.settings
        self.port = settings.smtp_port
        self.verp = VerpAddresses(settings.signing_keys, settings.bounce_domain)
        self.links = TrackingLinks(settings.signing_keys, service.api.base)

    async def mail(self, raw: bytes, rcpt: str, mail_from: str = "") -> None:
        """One SMTP transaction; a DSN's MAIL FROM is the null path ``<>``."""
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=self.port) as smtp:
            errors, reply = await smtp.sendmail(mail_from, [rcpt], raw)
        assert not errors and reply.startswith("2.0.0"), reply

    async def bounce(self, name: str, campaign: str, contact: int) -> None:
        """Corpus mail ``name`` as the DSN of ``campaign``'s mail to ``contact``."""
        await self.mail(fixture(name), self.verp.address(campaign, contact))

    async def events(self, contact: int, until: Any) -> list[dict[str, Any]]:
        def mine(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [r for r in records if r["contact_id"] == contact]

        records = await self.kafka.read(Topic.BOUNCE_EVENTS, until=lambda rs: until(mine(rs)))
        return mine(records)

    async def state(self, contact: int) -> dict[str, Any]:
        return await self.service.api.ok("GET", f"/v1/contacts/{contact}/delivery")


def actions(events: list[dict[str, Any]]) -> list[str]:
    return [e["action"] for e in events]


def count(action: str, n: int) -> Any:
    return lambda events: actions(events).count(action) >= n


def delivery_result(contact: int, campaign: str, email: str, outcome: str, **extra: Any) -> dict:
    """A delivery result as the sender publishes it, to ``email``."""
    now = dt.datetime.now(dt.UTC)
    return {**projection_result(contact, campaign, outcome, now), "email": email, **extra}


def campaigns(n: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(n)]


async def test_one_hard_bounce_stops_the_address(bounce_processor, suppression, contacts, kafka):
    bounces = Bounces(bounce_processor, kafka)
    contact = (await contacts.api.ok("POST", "/v1/contacts", {"email": "taro@example.jp"}))["id"]

    async def address_known() -> bool:
        body = await suppression.api.ok("GET", f"/v1/can-send?contact_id={contact}")
        return body["address_known"] and body["allowed"]

    await eventually(address_known)
    campaign = str(uuid.uuid4())
    sent = delivery_result(contact, campaign, "taro@example.jp", "sent")
    await kafka.send(Topic.DELIVERY_RESULTS, contact, sent)
    [status] = await bounces.events(contact, count("status", 1))
    assert status["delivery_status"] == "ok"

    # the DSN names another address (a forward): the address our mail went to is stopped
    await bounces.bounce("postfix_user_unknown", campaign, contact)
    events = await bounces.events(contact, count("bounced", 1))
    bounced = events[-1]
    assert bounced["action"] == "bounced"
    assert (bounced["classification"], bounced["hard"]) == ("invalid_address", True)
    assert (bounced["email"], bounced["campaign_id"]) == ("taro@example.jp", campaign)
    assert bounced["delivery_status"] == "invalid_address"
    assert "5.1.1" in bounced["diagnostic"]

    async def refused() -> dict[str, Any]:
        body = await suppression.api.ok("GET", f"/v1/can-send?contact_id={contact}")
        return body if not body["allowed"] else {}

    assert (await eventually(refused))["reason"] == "address_bounced"

    async def shown() -> bool:
        body = await contacts.api.ok("GET", f"/v1/contacts/{contact}")
        return body["delivery_status"] == "invalid_address"

    await eventually(shown)
    state = await bounces.state(contact)
    assert state["delivery_status"] == "invalid_address"

    # an operator clears the bounce (クリーニング解除): the address gets a clean slate
    await suppression.api.ok("DELETE", "/v1/suppressions/taro@example.jp")
    events = await bounces.events(contact, count("status", 2))
    assert events[-1]["delivery_status"] == "unconfirmed"
    assert (await bounces.state(contact))["delivery_status"] == "unconfirmed"

    async def allowed_again() -> bool:
        body = await suppression.api.ok("GET", f"/v1/can-send?contact_id={contact}")
        return body["allowed"]

    await eventually(allowed_again)

    async def shown_again() -> bool:
        body = await contacts.api.ok("GET", f"/v1/contacts/{contact}")
        return body["delivery_status"] == "unconfirmed"

    await eventually(shown_again)
    assert [b["source"] for b in state["bounces"]] == ["dsn"]


async def test_soft_bounces_an_open_resets_and_five_in_a_row_stop(bounce_processor, kafka):
    bounces = Bounces(bounce_processor, kafka)
    contact = 7
    soft = campaigns(9)
    for campaign in soft[:4]:
        await bounces.bounce("exim_mailbox_full", campaign, contact)
    await bounces.events(contact, count("counted", 4))
    assert (await bounces.state(contact))["soft_streak"] == 4

    async with aiohttp.ClientSession() as http:
        async with http.get(bounces.links.open_url(soft[0], contact)) as response:
            assert response.status == 200
    events = await bounces.events(contact, count("reset", 1))
    reset = events[-1]
    assert (reset["classification"], reset["delivery_status"]) == ("temporary_error", "ok")

    for campaign in soft[4:8]:
        await bounces.bounce("exim_mailbox_full", campaign, contact)
    events = await bounces.events(contact, count("counted", 8))
    assert "bounced" not in actions(events)
    assert (await bounces.state(contact))["soft_streak"] == 4

    await bounces.bounce("exim_mailbox_full", soft[8], contact)  # the fifth in a row
    events = await bounces.events(contact, count("bounced", 1))
    bounced = events[-1]
    assert (bounced["action"], bounced["classification"], bounced["hard"]) == (
        "bounced",
        "temporary_error",
        False,
    )
    assert bounced["email"] == "hanako@example.org"  # no delivery result: the DSN's recipient
    assert actions(events).count("counted") == 8
    # stopped: the status says so (バウンス), not 一時エラー with a count of 0
    assert bounced["delivery_status"] == "bounced"
    assert (await bounces.state(contact))["delivery_status"] == "bounced"


async def test_policy_blocks_are_not_held_against_the_recipient(bounce_processor, kafka):
    bounces = Bounces(bounce_processor, kafka)
    contact = 8
    for campaign in campaigns(5):
        await bounces.bounce("yahoo_style_policy_block", campaign, contact)
    blocked = campaigns(1)[0]
    await kafka.send(
        Topic.DELIVERY_RESULTS,
        contact,
        delivery_result(
            contact, blocked, "x@example.com", "policy_error", smtp_code=554, enhanced_code="5.7.1"
        ),
    )
    events = await bounces.events(contact, count("counted", 6))
    assert {(e["classification"], e["hard"], e["delivery_status"]) for e in events} == {
        ("policy", False, None)
    }
    state = await bounces.state(contact)
    assert (state["delivery_status"], state["soft_streak"]) == ("unconfirmed", 0)


async def test_the_same_failure_twice_counts_once(bounce_processor, kafka):
    bounces = Bounces(bounce_processor, kafka)
    contact = 9
    first, second = campaigns(2)
    await bounces.bounce("exim_mailbox_full", first, contact)
    await bounces.bounce("exim_mailbox_full", first, contact)  # the same DSN again
    result = delivery_result(contact, first, "hanako@example.org", "temporary_error")
    await kafka.send(Topic.DELIVERY_RESULTS, contact, result)
    await kafka.send(Topic.DELIVERY_RESULTS, contact, result)  # redelivered
    await bounces.events(contact, count("counted", 1))
    # mail is read in arrival order: once the next DSN is counted, the repeats were read
    await bounces.bounce("exim_mailbox_full", second, contact)
    events = await bounces.events(contact, count("counted", 2))
    assert [e["campaign_id"] for e in events] == [first, second]
    assert (await bounces.state(contact))["soft_streak"] == 2


async def test_delayed_and_complaints(bounce_processor, kafka):
    bounces = Bounces(bounce_processor, kafka)
    contact = 10
    campaign = str(uuid.uuid4())
    await bounces.bounce("delayed", campaign, contact)
    # an ARF report to the feedback-loop address, attributed by its Original-Mail-From
    await bounces.mail(
        fixture("arf_abuse", bounces.verp.address(campaign, contact)), "fbl@bounces.localhost"
    )
    events = await bounces.events(contact, count("complained", 1))
    assert actions(events) == ["complained"]  # the delay was no bounce
    assert (events[0]["email"], events[0]["delivery_status"]) == (
        "complainer@hotmail.example",
        "spam",
    )


async def test_mail_that_cannot_be_attributed_or_read_is_kept(bounce_processor, kafka):
    bounces = Bounces(bounce_processor, kafka)
    contact, campaign = 11, str(uuid.uuid4())
    real = bounces.verp.address(campaign, contact)
    forged = real.replace(real.split("@")[0][-6:], "aaaaaa")
    await bounces.mail(fixture("postfix_user_unknown"), forged)  # signature does not hold
    await bounces.mail(fixture("garbage"), real)  # a reader's reply, no bounce
    await bounces.mail(fixture("binary_junk"), real)
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
        await bounces.mail(fixture("postfix_user_unknown"), "someone@example.com")
    await bounces.bounce("postfix_user_unknown", campaign, contact)  # still listening
    events = await bounces.events(contact, count("bounced", 1))
    assert actions(events) == ["bounced"]

    body = await bounce_processor.api.ok("GET", "/v1/inbound/rejected")
    reasons = sorted(item["reason"] for item in body["items"])
    assert reasons == [
        "no delivery report and no bounce recognised",
        "no mail headers",
        "no signed return path",
    ]
    metrics = await bounce_processor.api.ok("GET", "/metrics")
    assert 'tayori_bounce_inbound_mail_total{outcome="unattributed"}' in metrics

    # kept for BOUNCE_REJECTED_RETENTION_DAYS, then forgotten by the upkeep
    ctx = bounce_processor.runtime.app[CONTEXT]
    await ctx.pool.execute(
        "UPDATE inbound_mail SET received_at = now() - interval '31 days'"
        " WHERE id = (SELECT min(id) FROM inbound_mail WHERE status = 'rejected')"
    )
    _, forgotten = await maintenance.run_once(ctx)
    assert forgotten == 1
    body = await bounce_processor.api.ok("GET", "/v1/inbound/rejected")
    assert len(body["items"]) == 2


async def test_tracking_feeds_history_score_and_statistics(bounce_processor, contacts, kafka):
    bounces = Bounces(bounce_processor, kafka)
    contact = (await contacts.api.ok("POST", "/v1/contacts", {"email": "hanako@example.jp"}))["id"]
    campaign = str(uuid.uuid4())
    destination = "https://shop.example.jp/sale?item=42&utm_source=mail"
    links = bounces.links
    async with aiohttp.ClientSession() as http:
        for _ in range(2):
            async with http.get(
                links.open_url(campaign, contact), headers={"User-Agent": "Mail/1.0 " + "x" * 900}
            ) as response:
                assert response.status == 200
                assert await response.read() == PIXEL_GIF
                assert response.headers["Cache-Control"] == (
                    "no-store, no-cache, must-revalidate, private"
                )
                assert response.headers["Pragma"] == "no-cache"
                assert response.headers["Expires"] == "0"
        click = links.click_url(campaign, contact, destination)
        async with http.get(click, allow_redirects=False) as response:
            assert response.status == 302
            assert response.headers["Location"] == destination
        # a forged open still gets the pixel, and records nothing
        async with http.get(f"{bounce_processor.api.base}/t/o/k1.forged.token") as response:
            assert response.status == 200 and await response.read() == PIXEL_GIF
        # a tampered click token: 404 and never a redirect
        token = click.rsplit("/", 1)[1]
        kid, payload, mac = token.split(".")
        tampered = f"{kid}.{payload[:-2]}{'A' if payload[-2] != 'A' else 'B'}{payload[-1]}.{mac}"
        for bad in (tampered, "nothing", f"{kid}.{payload}.{mac[:-1]}"):
            async with http.get(
                f"{bounce_processor.api.base}/t/c/{bad}", allow_redirects=False
            ) as response:
                assert response.status == 404
                assert "Location" not in response.headers

    feedback = await kafka.read(Topic.FEEDBACK_EVENTS, until=lambda rs: len(rs) >= 3)
    assert sorted(e["type"] for e in feedback) == ["click", "open", "open"]
    assert len({e["event_id"] for e in feedback}) == 3
    assert all(e["contact_id"] == contact and e["campaign_id"] == campaign for e in feedback)
    assert next(e["url"] for e in feedback if e["type"] == "click") == destination
    assert all(len(e["user_agent"]) <= 256 for e in feedback)

    stats = await bounce_processor.api.ok("GET", f"/v1/campaigns/{campaign}/engagement")
    assert (stats["opens"], stats["unique_opens"], stats["clicks"], stats["unique_clicks"]) == (
        2,
        1,
        1,
        1,
    )
    status, _ = await bounce_processor.api.call(
        "GET", f"/v1/campaigns/{campaign}/engagement", token=None
    )
    assert status == 401

    async def found(event: str) -> bool:
        body = await contacts.api.ok(
            "POST",
            "/v1/contacts/search",
            {"filter": {"history": {"event": event, "campaign_id": campaign}}},
        )
        return [item["id"] for item in body["items"]] == [contact]

    await eventually(lambda: found("opened"))
    await eventually(lambda: found("clicked"))

    async def scored() -> bool:
        body = await contacts.api.ok("GET", f"/v1/contacts/{contact}")
        return body["score"] == 2 * 1 + 3  # two opens, one click (SCORE_*_POINTS defaults)

    await eventually(scored)


async def test_inputs_that_once_answered_500_are_400_problems(bounce_processor):
    """Issue 17: ids beyond 64 bits and NUL in a path are problems naming the value; the
    public tracking links keep their answers for any token (pixel always, 404 for a click)."""
    api = bounce_processor.api
    for path, pointer, location in [
        ("/v1/contacts/99999999999999999999/delivery", "/contact_id", "path"),
        ("/v1/contacts/0/delivery", "/contact_id", "path"),
        ("/v1/campaigns/a%00b/engagement", "/campaign_id", "path"),
        ("/v1/inbound/rejected?limit=99999999999999999999", "/limit", "query"),
        ("/v1/inbound/rejected?limit=0", "/limit", "query"),
        ("/v1/inbound/rejected?lmit=5", "/lmit", "query"),
    ]:
        status, body = await api.call("GET", path)
        assert status == 400, (path, body)
        assert body["status"] == 400, body
        assert (body["errors"][0]["location"], body["errors"][0]["pointer"]) == (
            location,
            pointer,
        ), body
    for token in ("nope", "a%00b", "x" * 3000):
        async with api.session.get(f"{api.base}/t/o/{token}") as response:
            assert (response.status, await response.read()) == (200, PIXEL_GIF)
        async with api.session.get(f"{api.base}/t/c/{token}", allow_redirects=False) as response:
            assert response.status == 404
            assert "Location" not in response.headers
            assert (response.content_type, await response.text()) == ("text/plain", "Not found\n")
