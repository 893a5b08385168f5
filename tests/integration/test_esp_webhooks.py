"""ESP event webhooks end to end (issue 21): signed webhooks of SES (through SNS),
SendGrid, Mailgun and Postmark, in their documented formats (tests/fixtures/esp/), posted
to the running bounce processor against the real PostgreSQL and broker. A mail's
reference is built by the real token code (what the sender puts in X-Tayori-Ref); the
effect must be the one a DSN has: the bounce.events record and the contact's delivery
status. Forged and replayed webhooks are refused and change nothing."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from libs.common.mail import esp_ref
from libs.common.mail.verp import VerpAddresses
from libs.common.topics import Topic
from services.bounce_processor.context import CONTEXT
from services.bounce_processor.esp_auth import SnsCertificates
from services.bounce_processor.webhooks import WEBHOOKS
from tests.conftest import Service, running
from tests.integration.test_sender import mail_to, send_request
from tests.unit.test_esp_webhooks import (
    CERT_URL,
    TOPIC,
    mailgun_signature,
    never_fetched,
    payload,
    self_signed,
    sns_message,
)

pytestmark = pytest.mark.integration
MAILGUN_KEY = "key-3ax6xnjp29jd6fds4gc373sgvjxteol0"
POSTMARK = ("tayori-postmark", "correct horse battery staple")
SENDGRID = ec.generate_private_key(ec.SECP256R1())
SENDGRID_PUBLIC = base64.b64encode(
    SENDGRID.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
).decode()


@pytest.fixture
async def esp_bounces(stack: Any, database: str, prefix: str) -> AsyncIterator[Service]:
    """The bounce processor with all four ESPs configured."""
    async with running(
        "bounce_processor",
        stack,
        database,
        prefix,
        smtp_host="127.0.0.1",
        smtp_port=0,
        esp_ses_topic_arns=TOPIC,
        esp_sendgrid_public_key=SENDGRID_PUBLIC,
        esp_mailgun_signing_key=MAILGUN_KEY,
        esp_postmark_username=POSTMARK[0],
        esp_postmark_password=POSTMARK[1],
    ) as service:
        yield service


def reference(service: Service, campaign: str, contact: int) -> str:
    s = service.runtime.settings
    return esp_ref.reference(VerpAddresses(s.signing_keys, s.bounce_domain), campaign, contact)


async def post(
    service: Service, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """A webhook as the ESP posts it: no Tayori credentials."""
    return await service.api.call(
        "POST",
        path,
        token=None,
        data=body,
        headers={"Content-Type": "application/json", **(headers or {})},
    )


def sendgrid_headers(body: bytes, timestamp: int | None = None) -> dict[str, str]:
    stamp = str(timestamp or int(time.time()))
    signature = SENDGRID.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return {
        "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
        "X-Twilio-Email-Event-Webhook-Timestamp": stamp,
    }


async def events_of(kafka: Any, contact: int, until: Any) -> list[dict[str, Any]]:
    def mine(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in records if r["contact_id"] == contact]

    return mine(await kafka.read(Topic.BOUNCE_EVENTS, until=lambda rs: until(mine(rs))))


def has(action: str) -> Any:
    return lambda events: any(e["action"] == action for e in events)


async def seen_rows(service: Service, sql: str, *args: Any) -> int:
    return int(await service.runtime.app[CONTEXT].pool.fetchval(sql, *args))


async def test_sendgrid_events_apply_like_dsns_and_replays_are_refused(esp_bounces, kafka):
    campaign, contact = str(uuid.uuid4()), 910001
    ref = reference(esp_bounces, campaign, contact)
    body = json.dumps(payload("sendgrid_events.json", ref)).encode()
    headers = sendgrid_headers(body)

    forged = body.replace(b'"delivered"', b'"spamreport"')
    status, problem = await post(esp_bounces, "/esp/sendgrid", forged, headers)
    assert status == 403 and "signature" in problem["detail"]
    status, _ = await post(esp_bounces, "/esp/sendgrid", body)  # unsigned
    assert status == 401
    stale = sendgrid_headers(body, int(time.time()) - 7200)
    status, problem = await post(esp_bounces, "/esp/sendgrid", body, stale)
    assert status == 409, problem
    assert await seen_rows(esp_bounces, "SELECT count(*) FROM esp_event") == 0

    status, summary = await post(esp_bounces, "/esp/sendgrid", body, headers)
    assert status == 200, summary
    assert summary == {
        "events": 6,
        "new": 6,
        "failures": 3,
        "deliveries": 1,
        "unattributed": 0,
    }
    events = await events_of(kafka, contact, has("complained"))
    bounced = next(e for e in events if e["action"] == "bounced")
    assert (bounced["classification"], bounced["hard"]) == ("invalid_address", True)
    assert bounced["campaign_id"] == campaign and bounced["email"] == "example@test.com"
    assert events[-1]["delivery_status"] == "spam"  # a complaint outranks the hard bounce
    state = await esp_bounces.api.ok("GET", f"/v1/contacts/{contact}/delivery")
    assert state["delivery_status"] == "spam"
    assert {b["source"] for b in state["bounces"]} == {"sendgrid"}

    # The same signed batch again (a replay within the tolerance): every id seen, refused.
    status, problem = await post(esp_bounces, "/esp/sendgrid", body, headers)
    assert status == 409 and "before" in problem["detail"]


async def test_mailgun_and_postmark_bounces(esp_bounces, kafka):
    campaign = str(uuid.uuid4())
    mailgun_contact, postmark_contact, forged_contact = 910011, 910012, 910013

    failed = payload("mailgun_failed_smtp.json", reference(esp_bounces, campaign, mailgun_contact))
    failed["signature"] = mailgun_signature(MAILGUN_KEY, str(int(time.time())), "a1b2c3d4e5f6")
    forged = payload("mailgun_complained.json", reference(esp_bounces, campaign, forged_contact))
    forged["signature"] = mailgun_signature("key-guessed", str(int(time.time())), "f00d")
    status, _ = await post(esp_bounces, "/esp/mailgun", json.dumps(forged).encode())
    assert status == 403
    status, summary = await post(esp_bounces, "/esp/mailgun", json.dumps(failed).encode())
    assert status == 200 and summary["failures"] == 1, summary
    [bounced] = await events_of(kafka, mailgun_contact, has("bounced"))
    assert bounced["classification"] == "invalid_address"
    assert "5.1.1" in bounced["diagnostic"]

    bounce = json.dumps(
        payload("postmark_bounce.json", reference(esp_bounces, campaign, postmark_contact))
    ).encode()
    wrong = "Basic " + base64.b64encode(b"tayori-postmark:guess").decode()
    status, _ = await post(esp_bounces, "/esp/postmark", bounce, {"Authorization": wrong})
    assert status == 401
    right = "Basic " + base64.b64encode(":".join(POSTMARK).encode()).decode()
    status, summary = await post(esp_bounces, "/esp/postmark", bounce, {"Authorization": right})
    assert status == 200 and summary["failures"] == 1, summary
    [bounced] = await events_of(kafka, postmark_contact, has("bounced"))
    assert (bounced["classification"], bounced["delivery_status"]) == (
        "invalid_address",
        "invalid_address",
    )
    # Postmark signs no timestamp: the repeated bounce ID is the replay.
    status, _ = await post(esp_bounces, "/esp/postmark", bounce, {"Authorization": right})
    assert status == 409

    # The forged complaint changed nothing: no bounce, no state, no record published.
    state = await esp_bounces.api.ok("GET", f"/v1/contacts/{forged_contact}/delivery")
    assert (state["delivery_status"], state["bounces"]) == ("unconfirmed", [])
    published = await kafka.read_to_end(Topic.BOUNCE_EVENTS)
    assert not [r for r in published if r["contact_id"] == forged_contact]


async def test_ses_through_sns(esp_bounces, kafka):
    key, pem = self_signed()
    hooks = esp_bounces.runtime.app[WEBHOOKS]
    # SNS cannot reach a test: its certificate is preloaded under an SNS URL (the host check
    # still applies), and the SubscribeURL GET is recorded instead of sent.
    hooks.certificates = SnsCertificates(never_fetched, preloaded={CERT_URL: pem})
    confirmed: list[str] = []

    async def confirm(url: str) -> bytes:
        confirmed.append(url)
        return b"<ConfirmSubscriptionResponse/>"

    hooks.confirm = confirm
    subscribe = "https://sns.ap-northeast-1.amazonaws.com/?Action=ConfirmSubscription&Token=x"
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    confirmation = sns_message(
        key,
        "You have chosen to subscribe to the topic",
        Type="SubscriptionConfirmation",
        Token="x",
        SubscribeURL=subscribe,
        Timestamp=now,
    )
    status, body = await post(esp_bounces, "/esp/ses", json.dumps(confirmation).encode())
    assert (status, body, confirmed) == (200, {"confirmed": True}, [subscribe])

    campaign, contact = str(uuid.uuid4()), 910021
    message = json.dumps(payload("ses_bounce.json", reference(esp_bounces, campaign, contact)))
    notification = sns_message(key, message, version="1", Timestamp=now)
    other_topic = sns_message(key, message, TopicArn=TOPIC + "-other", Timestamp=now)
    status, _ = await post(esp_bounces, "/esp/ses", json.dumps(other_topic).encode())
    assert status == 403
    tampered = {**notification, "Message": message.replace("5.1.1", "2.0.0")}
    status, _ = await post(esp_bounces, "/esp/ses", json.dumps(tampered).encode())
    assert status == 403

    status, summary = await post(esp_bounces, "/esp/ses", json.dumps(notification).encode())
    assert status == 200 and summary["failures"] == 1, summary
    [bounced] = await events_of(kafka, contact, has("bounced"))
    assert (bounced["classification"], bounced["campaign_id"]) == ("invalid_address", campaign)
    status, _ = await post(esp_bounces, "/esp/ses", json.dumps(notification).encode())
    assert status == 409


async def test_an_unconfigured_esp_answers_404(bounce_processor):
    for esp in ("ses", "sendgrid", "mailgun", "postmark"):
        status, problem = await post(bounce_processor, f"/esp/{esp}", b"{}")
        assert status == 404 and "not configured" in problem["detail"], (esp, problem)


async def test_a_mail_the_sender_sent_is_attributed_by_its_header(
    sender, esp_bounces, kafka, smtp_sink
):
    """The whole path: the sender's real mail carries X-Tayori-Ref; the ESP echoes it (here
    as Mailgun's user variable) and the bounce lands on that campaign and contact."""
    campaign, contact = str(uuid.uuid4()), 920001
    await kafka.send(Topic.SEND_REQUESTS, contact, send_request(campaign, contact))
    [mail] = await mail_to(smtp_sink, 1)
    ref = str(mail["X-Tayori-Ref"])
    assert f"{ref}@" in str(mail["X-Tayori-Envelope-From"])  # the VERP token itself
    [ok] = await events_of(kafka, contact, has("status"))  # the sent result: status ok
    assert ok["delivery_status"] == "ok"

    failed = payload("mailgun_failed_smtp.json", ref)
    failed["signature"] = mailgun_signature(MAILGUN_KEY, str(int(time.time())), "0a1b2c")
    status, summary = await post(esp_bounces, "/esp/mailgun", json.dumps(failed).encode())
    assert status == 200 and summary["failures"] == 1, summary
    events = await events_of(kafka, contact, has("bounced"))
    bounced = events[-1]
    assert (bounced["campaign_id"], bounced["classification"]) == (campaign, "invalid_address")
    assert bounced["delivery_status"] == "invalid_address"
