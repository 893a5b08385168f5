"""Public ESP event webhooks (issue 21): bounces, complaints and deliveries reported by an
ESP the operator relays through, instead of DSNs to our own return path.

- ``POST /esp/ses``: Amazon SES through an SNS HTTPS subscription (signature v1/v2
  verified, topic in ``ESP_SES_TOPIC_ARNS``; a SubscriptionConfirmation is confirmed);
- ``POST /esp/sendgrid``: SendGrid's signed Event Webhook;
- ``POST /esp/mailgun``: Mailgun webhooks (HMAC signature in the payload);
- ``POST /esp/postmark``: Postmark webhooks (basic authentication in the webhook URL).

A webhook is checked (:mod:`.esp_auth`: 401 no credentials, 403 a bad signature, 409 a
replay: a stale timestamp or only event ids seen before), read (:mod:`.esp`), and each new
event attributed by its signed ``tayori_ref`` and applied in one transaction exactly like
a DSN: :func:`store.record_failures` (classification, duplicates, rules, ``bounce.events``
through the outbox) and deliveries as for a ``sent`` result. An event without a valid
reference is counted and dropped: an ESP account may carry other applications' mail.
Every request is counted in ``tayori_esp_webhooks_total{esp,outcome}``.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from libs.common.errors import TransientError
from libs.common.http import error, json_response, public
from libs.common.http.contract import contract, read_body
from libs.common.logging import get_logger
from libs.common.mail.esp_ref import read_reference
from libs.common.mail.tokens import BadToken
from libs.common.metrics import ESP_WEBHOOKS
from services.bounce_processor import esp_auth, rules, store
from services.bounce_processor.context import CONTEXT, Context
from services.bounce_processor.esp import (
    BadPayload,
    EspEvent,
    mailgun_events,
    postmark_events,
    sendgrid_events,
    ses_events,
)
from services.bounce_processor.esp_auth import Refused, SnsCertificates
from services.bounce_processor.settings import BounceSettings
from services.bounce_processor.store import QUERIES, ContactEvent, Failure

log = get_logger(__name__)
routes = web.RouteTableDef()

#: a webhook body (a SendGrid batch is the largest: up to a few thousand events).
MAX_BYTES = 4 << 20
#: an SNS signing certificate is a few KiB.
CERT_BYTES = 64 << 10
FETCH_SECONDS = 10.0
JSON_BODY = {"type": "object", "description": "the ESP's webhook payload, as it documents it"}
JSON_BODIES = {"application/json": JSON_BODY}
SNS_BODIES = {"text/plain": JSON_BODY, "application/json": JSON_BODY}


async def _get(url: str) -> bytes:
    """GET ``url`` (an SNS certificate or SubscribeURL, host checked by the caller); AWS
    out of reach is weather (503: SNS retries), a wrong answer a refusal."""
    timeout = aiohttp.ClientTimeout(total=FETCH_SECONDS)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(url, allow_redirects=False) as response:
                if response.status != 200:
                    raise Refused(403, "forged", f"{url} answered {response.status}")
                body = await response.content.read(CERT_BYTES + 1)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise TransientError(f"SNS unreachable: {exc}") from exc
    if len(body) > CERT_BYTES:
        raise Refused(403, "forged", f"{url} is too large")
    return body


@dataclass
class Webhooks:
    """What the webhook views need beyond the context; replaceable in tests only by
    reaching into the running app (settings cannot preload a certificate)."""

    settings: BounceSettings
    certificates: SnsCertificates = field(init=False)
    #: GET of an SNS SubscribeURL (its host checked before).
    confirm: Callable[[str], Awaitable[bytes]] = _get
    sendgrid_key: Any = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.certificates = SnsCertificates(_get)
        if self.settings.esp_sendgrid_public_key:
            self.sendgrid_key = esp_auth.sendgrid_key(self.settings.esp_sendgrid_public_key)


WEBHOOKS = web.AppKey("esp_webhooks", Webhooks)


def _refuse(request: web.Request, esp: str, refused: Refused) -> web.Response:
    ESP_WEBHOOKS.labels(esp, refused.outcome).inc()
    log.warning("esp_webhook_refused", esp=esp, outcome=refused.outcome, reason=refused.reason)
    response = error(refused.status, refused.reason, request=request)
    if refused.status == 401:
        response.headers["WWW-Authenticate"] = 'Basic realm="tayori-esp"'
    return response


def _unconfigured(request: web.Request, esp: str, variable: str) -> web.Response:
    ESP_WEBHOOKS.labels(esp, "unconfigured").inc()
    return error(404, f"the {esp} webhook is not configured ({variable} is empty)", request=request)


def _bad(request: web.Request, esp: str, reason: str) -> web.Response:
    ESP_WEBHOOKS.labels(esp, "bad_payload").inc()
    log.warning("esp_webhook_unreadable", esp=esp, reason=reason)
    return error(400, reason, request=request)


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadPayload("the body is not JSON") from None


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    body = _json(raw)
    if not isinstance(body, dict):
        raise BadPayload(f"the {what} is not a JSON object")
    return body


async def apply(ctx: Context, esp: str, events: list[EspEvent]) -> dict[str, int]:
    """Claim the events' ids and apply the new, attributed ones, in one transaction.
    Refused (409) when every id was seen before (a replay)."""
    async with ctx.pool.acquire() as conn, conn.transaction():
        ids = list(dict.fromkeys(e.event_id for e in events))
        fresh_ids = {r["event_id"] for r in await conn.fetch(QUERIES["claim-esp-events"], esp, ids)}
        if ids and not fresh_ids:
            raise Refused(409, "replayed", "every event of this webhook was received before")
        fresh = [e for e in events if e.event_id in fresh_ids]
        failures: list[Failure] = []
        delivered: list[ContactEvent] = []
        unattributed = 0
        for event in fresh:
            if event.kind == "ignored":
                continue
            try:
                target = read_reference(ctx.verp, event.ref or "")
            except BadToken:
                unattributed += 1
                continue
            if event.kind == "delivered":
                delivered.append(
                    ContactEvent(
                        target.contact_id,
                        rules.Delivered(),
                        event.occurred_at,
                        event.email,
                        target.campaign_id,
                    )
                )
            else:
                assert event.classification is not None
                failures.append(
                    Failure(
                        campaign_id=target.campaign_id,
                        contact_id=target.contact_id,
                        classification=event.classification,
                        source=esp,
                        occurred_at=event.occurred_at,
                        email=event.email,
                        diagnostic=event.diagnostic,
                    )
                )
        threshold = ctx.settings.soft_threshold
        await store.apply_events(conn, delivered, soft_threshold=threshold)
        await store.record_failures(conn, failures, soft_threshold=threshold)
    return {
        "events": len(events),
        "new": len(fresh),
        "failures": len(failures),
        "deliveries": len(delivered),
        "unattributed": unattributed,
    }


async def _finish(
    request: web.Request, esp: str, read: Callable[[], list[EspEvent]]
) -> web.Response:
    """Read the events (400 when unreadable), apply them, answer and count."""
    try:
        events = read()
    except BadPayload as exc:
        return _bad(request, esp, str(exc))
    try:
        summary = await apply(request.app[CONTEXT], esp, events)
    except Refused as exc:
        return _refuse(request, esp, exc)
    ESP_WEBHOOKS.labels(esp, "unattributed" if summary["unattributed"] else "accepted").inc()
    log.info("esp_webhook_applied", esp=esp, **summary)
    return json_response(summary)


# -- the views -------------------------------------------------------------------------


@routes.post("/esp/ses")
@public
@contract(raw_body=SNS_BODIES, max_bytes=MAX_BYTES, errors=(400, 401, 403, 404, 409))
async def ses_webhook(request: web.Request) -> web.Response:
    """Amazon SES notifications through SNS (public; signature verified): Bounce,
    Complaint, Delivery; a SubscriptionConfirmation of an allowed topic is confirmed."""
    ctx: Context = request.app[CONTEXT]
    hooks = request.app[WEBHOOKS]
    topics = ctx.settings.ses_topics()
    if not topics:
        return _unconfigured(request, "ses", "ESP_SES_TOPIC_ARNS")
    raw = await read_body(request, max_bytes=MAX_BYTES)
    try:
        message = _json_object(raw, "SNS message")
        if message.get("TopicArn") not in topics:
            raise Refused(403, "forged", "the SNS topic is not in ESP_SES_TOPIC_ARNS")
        await esp_auth.verify_sns(message, hooks.certificates)
        sent = dt.datetime.fromisoformat(str(message.get("Timestamp")).replace("Z", "+00:00"))
        tolerance = ctx.settings.esp_webhook_tolerance_seconds
        esp_auth.check_age(sent.timestamp(), time.time(), tolerance)
    except BadPayload as exc:
        return _bad(request, "ses", str(exc))
    except ValueError:
        return _bad(request, "ses", "Timestamp is not an ISO 8601 time")
    except Refused as exc:
        return _refuse(request, "ses", exc)
    kind = message["Type"]
    if kind == "SubscriptionConfirmation":
        return await _confirm(request, hooks, message)
    if kind != "Notification":  # UnsubscribeConfirmation: nothing to do
        ESP_WEBHOOKS.labels("ses", "accepted").inc()
        return json_response({"events": 0})
    now = dt.datetime.now(dt.UTC)
    message_id, text = str(message.get("MessageId")), str(message["Message"])
    return await _finish(request, "ses", lambda: ses_events(message_id, text, now))


async def _confirm(request: web.Request, hooks: Webhooks, message: dict[str, Any]) -> web.Response:
    url = str(message.get("SubscribeURL") or "")
    if not esp_auth.is_sns_url(url):
        return _refuse(request, "ses", Refused(403, "forged", "SubscribeURL is not an SNS URL"))
    if not hooks.settings.esp_ses_auto_confirm:
        ESP_WEBHOOKS.labels("ses", "accepted").inc()
        log.warning("esp_ses_subscription_not_confirmed", topic=message.get("TopicArn"))
        return json_response({"confirmed": False})
    try:
        await hooks.confirm(url)
    except Refused as exc:
        return _refuse(request, "ses", exc)
    ESP_WEBHOOKS.labels("ses", "confirmed").inc()
    log.info("esp_ses_subscription_confirmed", topic=message.get("TopicArn"))
    return json_response({"confirmed": True})


@routes.post("/esp/sendgrid")
@public
@contract(raw_body=JSON_BODIES, max_bytes=MAX_BYTES, errors=(400, 401, 403, 404, 409))
async def sendgrid_webhook(request: web.Request) -> web.Response:
    """SendGrid Event Webhook (public; ECDSA signature over timestamp and body verified)."""
    ctx: Context = request.app[CONTEXT]
    key = request.app[WEBHOOKS].sendgrid_key
    if key is None:
        return _unconfigured(request, "sendgrid", "ESP_SENDGRID_PUBLIC_KEY")
    raw = await read_body(request, max_bytes=MAX_BYTES)
    try:
        signed_at = esp_auth.verify_sendgrid(
            key,
            request.headers.get("X-Twilio-Email-Event-Webhook-Signature"),
            request.headers.get("X-Twilio-Email-Event-Webhook-Timestamp"),
            raw,
        )
        esp_auth.check_age(signed_at, time.time(), ctx.settings.esp_webhook_tolerance_seconds)
    except Refused as exc:
        return _refuse(request, "sendgrid", exc)
    now = dt.datetime.now(dt.UTC)
    return await _finish(request, "sendgrid", lambda: sendgrid_events(_json(raw), now))


@routes.post("/esp/mailgun")
@public
@contract(raw_body=JSON_BODIES, max_bytes=MAX_BYTES, errors=(400, 401, 403, 404, 409))
async def mailgun_webhook(request: web.Request) -> web.Response:
    """Mailgun webhook (public; HMAC-SHA256 signature of timestamp and token verified)."""
    ctx: Context = request.app[CONTEXT]
    signing_key = ctx.settings.esp_mailgun_signing_key
    if not signing_key:
        return _unconfigured(request, "mailgun", "ESP_MAILGUN_SIGNING_KEY")
    raw = await read_body(request, max_bytes=MAX_BYTES)
    try:
        payload = _json_object(raw, "Mailgun payload")
    except BadPayload as exc:
        return _bad(request, "mailgun", str(exc))
    try:
        signed_at = esp_auth.verify_mailgun(signing_key, payload.get("signature"))
        esp_auth.check_age(signed_at, time.time(), ctx.settings.esp_webhook_tolerance_seconds)
    except Refused as exc:
        return _refuse(request, "mailgun", exc)
    now = dt.datetime.now(dt.UTC)
    return await _finish(request, "mailgun", lambda: mailgun_events(payload, now))


@routes.post("/esp/postmark")
@public
@contract(raw_body=JSON_BODIES, max_bytes=MAX_BYTES, errors=(400, 401, 404, 409))
async def postmark_webhook(request: web.Request) -> web.Response:
    """Postmark webhook (public; HTTP basic authentication, as Postmark documents)."""
    ctx: Context = request.app[CONTEXT]
    s = ctx.settings
    if not (s.esp_postmark_username and s.esp_postmark_password):
        return _unconfigured(request, "postmark", "ESP_POSTMARK_USERNAME/PASSWORD")
    try:
        esp_auth.verify_basic_auth(
            request.headers.get("Authorization"), s.esp_postmark_username, s.esp_postmark_password
        )
    except Refused as exc:
        return _refuse(request, "postmark", exc)
    raw = await read_body(request, max_bytes=MAX_BYTES)
    now = dt.datetime.now(dt.UTC)

    return await _finish(
        request, "postmark", lambda: postmark_events(_json_object(raw, "Postmark payload"), now)
    )
