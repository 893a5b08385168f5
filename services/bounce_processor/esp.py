"""What an ESP's webhook says, in the bounce processor's terms: pure, no I/O (issue 21).

Each ESP's documented payload is read into :class:`EspEvent` records: a **failure** (with
the classification of :mod:`libs.common.mail.bounce_class`, F-30 — the SMTP status and
diagnostic the ESP reports are read by the same rule as a DSN's Status and
Diagnostic-Code; a complaint is ``spam`` like an ARF report), a **delivery** (the
delivery status becomes ``ok`` as for a ``sent`` result), or **ignored** (deferrals and
delays — like a DSN's ``delayed`` — opens and clicks, which our own tracking links count,
and anything else). Whose mail it was comes from the signed reference the sender put in
the mail (:mod:`libs.common.mail.esp_ref`), echoed in the payload.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from libs.common.mail import esp_ref
from libs.common.mail.bounce_class import Classification, classify

Kind = Literal["failure", "delivered", "ignored"]
DIAGNOSTIC_LIMIT = 500


class BadPayload(ValueError):
    """A signed payload we cannot read (answered 400 with the reason)."""


@dataclass(frozen=True)
class EspEvent:
    event_id: str
    kind: Kind
    ref: str | None
    occurred_at: dt.datetime
    email: str | None = None
    classification: Classification | None = None
    diagnostic: str | None = None


def _text(value: Any) -> str:
    return "" if value is None else " ".join(str(value).split())


def _diagnostic(*parts: Any) -> str | None:
    joined = " ".join(t for t in map(_text, parts) if t)
    return joined[:DIAGNOSTIC_LIMIT] or None


def _when(value: Any, fallback: dt.datetime) -> dt.datetime:
    """ISO 8601 text or unix seconds; the fallback for anything else."""
    try:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return dt.datetime.fromtimestamp(float(value), dt.UTC)
        if isinstance(value, str) and value:
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
    except (ValueError, OverflowError, OSError):
        pass
    return fallback


def _failure(
    event_id: str,
    ref: str | None,
    when: dt.datetime,
    email: str | None,
    classification: Classification | None,
    diagnostic: str | None,
) -> EspEvent:
    if classification is None:
        return EspEvent(event_id, "ignored", ref, when, email)
    return EspEvent(event_id, "failure", ref, when, email, classification, diagnostic)


def _object(payload: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(payload, dict):
        raise BadPayload(f"{what} is not a JSON object")
    return payload


# -- Amazon SES (the SNS Notification's Message) ---------------------------------------

#: SES's verdict when a bounced recipient carries no code or wording we know.
SES_BOUNCE_TYPES: dict[str, Classification] = {
    "Permanent": "error",
    "Transient": "temporary_error",
}


def ses_reference(mail: Mapping[str, Any]) -> str | None:
    """X-Tayori-Ref from ``mail.headers`` ("include original headers"), else the
    ``tayori_ref`` message tag."""
    for header in mail.get("headers") or []:
        if isinstance(header, dict) and str(header.get("name", "")).lower() == "x-tayori-ref":
            return _text(header.get("value")) or None
    tags = mail.get("tags") or {}
    values = tags.get(esp_ref.KEY) if isinstance(tags, dict) else None
    return _text(values[0]) or None if isinstance(values, list) and values else None


def ses_events(message_id: str, text: str, now: dt.datetime) -> list[EspEvent]:
    """The events of one SES notification (``notificationType``, or ``eventType`` of
    configuration-set event publishing): Bounce, Complaint, Delivery, DeliveryDelay."""
    try:
        body = _object(json.loads(text), "the SNS Message")
    except json.JSONDecodeError:
        raise BadPayload("the SNS Message is not JSON") from None
    kind = body.get("notificationType") or body.get("eventType")
    mail = body.get("mail")
    mail = mail if isinstance(mail, dict) else {}
    ref = ses_reference(mail)
    if kind == "Bounce":
        bounce = _object(body.get("bounce"), "bounce")
        when = _when(bounce.get("timestamp"), now)
        bounce_type = bounce.get("bounceType")
        events = []
        for i, r in enumerate(bounce.get("bouncedRecipients") or []):
            status, code = r.get("status"), _text(r.get("diagnosticCode"))
            found = classify(enhanced=status if _is_code(status) else None, text=code)
            if found is None:  # no code, no wording: SES's own verdict
                found = SES_BOUNCE_TYPES.get(str(bounce_type))
            if bounce_type == "Transient" and found in ("error", "invalid_address"):
                found = "temporary_error"  # SES will not stop at a transient bounce
            subtype = bounce.get("bounceSubType")
            diagnostic = _diagnostic(code or status, f"({bounce_type}/{subtype})")
            events.append(
                _failure(f"{message_id}:{i}", ref, when, r.get("emailAddress"), found, diagnostic)
            )
        return events
    if kind == "Complaint":
        complaint = _object(body.get("complaint"), "complaint")
        when = _when(complaint.get("timestamp"), now)
        feedback = complaint.get("complaintFeedbackType")
        # Like ARF (dsn.COMPLAINT_TYPES): only abuse, or no type at all, is a complaint.
        spam: Classification | None = "spam" if feedback in (None, "abuse") else None
        return [
            _failure(f"{message_id}:{i}", ref, when, r.get("emailAddress"), spam, feedback)
            for i, r in enumerate(complaint.get("complainedRecipients") or [])
        ]
    if kind == "Delivery":
        delivery = _object(body.get("delivery"), "delivery")
        when = _when(delivery.get("timestamp"), now)
        return [
            EspEvent(f"{message_id}:{i}", "delivered", ref, when, str(email))
            for i, email in enumerate(delivery.get("recipients") or [])
        ]
    return [EspEvent(message_id, "ignored", ref, now)]  # DeliveryDelay, Send, Open, …


def _is_code(value: Any) -> bool:
    parts = str(value or "").split(".")
    return len(parts) == 3 and all(p.isdigit() for p in parts) and parts[0] in "245"


# -- SendGrid --------------------------------------------------------------------------


def sendgrid_events(payload: Any, now: dt.datetime) -> list[EspEvent]:
    """SendGrid's Event Webhook posts a JSON array of events; custom (unique) args are
    top-level keys of each event."""
    if not isinstance(payload, list):
        raise BadPayload("the SendGrid payload is not a JSON array")
    events = []
    for i, item in enumerate(payload):
        event = _object(item, f"event {i}")
        event_id = _text(event.get("sg_event_id")) or None
        if event_id is None:
            raise BadPayload(f"event {i} has no sg_event_id")
        ref = _text(event.get(esp_ref.KEY)) or None
        when = _when(event.get("timestamp"), now)
        email = event.get("email")
        name = event.get("event")
        if name == "bounce":
            status, reason = event.get("status"), _text(event.get("reason"))
            found = classify(enhanced=status if _is_code(status) else None, text=reason)
            if found is None:
                found = "temporary_error" if event.get("type") == "blocked" else "error"
            diagnostic = _diagnostic(reason or status)
            events.append(_failure(event_id, ref, when, email, found, diagnostic))
        elif name == "spamreport":
            events.append(_failure(event_id, ref, when, email, "spam", "spamreport"))
        elif name == "delivered":
            events.append(EspEvent(event_id, "delivered", ref, when, email))
        else:  # processed, deferred, dropped, open, click, unsubscribe, group_*
            events.append(EspEvent(event_id, "ignored", ref, when, email))
    return events


# -- Mailgun ---------------------------------------------------------------------------


def mailgun_events(payload: Mapping[str, Any], now: dt.datetime) -> list[EspEvent]:
    """One Mailgun webhook: ``event-data`` with ``user-variables``."""
    data = _object(payload.get("event-data"), "event-data")
    event_id = _text(data.get("id")) or None
    if event_id is None:
        raise BadPayload("event-data has no id")
    variables = data.get("user-variables")
    ref = _text(variables.get(esp_ref.KEY)) or None if isinstance(variables, dict) else None
    when = _when(data.get("timestamp"), now)
    email = data.get("recipient")
    name = data.get("event")
    if name == "failed":
        if data.get("severity") != "permanent":  # Mailgun retries: a DSN's "delayed"
            return [EspEvent(event_id, "ignored", ref, when, email)]
        status = data.get("delivery-status")
        status = status if isinstance(status, dict) else {}
        code = status.get("code")
        text = _diagnostic(code, status.get("message"), status.get("description")) or ""
        enhanced = status.get("enhanced-code")
        found = classify(
            enhanced=enhanced if _is_code(enhanced) else None,
            reply_code=code if isinstance(code, int) and 200 <= code < 600 else None,
            text=text,
        )
        return [_failure(event_id, ref, when, email, found or "error", text or None)]
    if name == "complained":
        return [_failure(event_id, ref, when, email, "spam", "complained")]
    if name == "delivered":
        return [EspEvent(event_id, "delivered", ref, when, email)]
    return [EspEvent(event_id, "ignored", ref, when, email)]


# -- Postmark --------------------------------------------------------------------------

#: Postmark bounce types that are failures of the recipient, and their class when the
#: Details carry no code or wording we know. Others (Transient, AutoResponder,
#: Subscribe, ManuallyDeactivated, …) are no failure.
POSTMARK_BOUNCES: dict[str, Classification] = {
    "HardBounce": "invalid_address",
    "BadEmailAddress": "invalid_address",
    "SoftBounce": "temporary_error",
    "DnsError": "temporary_error",
    "Blocked": "policy",
    "SpamNotification": "policy",
    "DMARCPolicy": "policy",
}


def postmark_events(payload: Mapping[str, Any], now: dt.datetime) -> list[EspEvent]:
    """One Postmark webhook (``RecordType``: Bounce, SpamComplaint, Delivery, …);
    Metadata carries the reference (``X-PM-Metadata-tayori_ref``)."""
    record = payload.get("RecordType")
    metadata = payload.get("Metadata")
    ref = _text(metadata.get(esp_ref.KEY)) or None if isinstance(metadata, dict) else None
    message = _text(payload.get("MessageID"))
    if record in ("Bounce", "SpamComplaint"):
        event_id = f"{record}:{_text(payload.get('ID')) or message}"
        when = _when(payload.get("BouncedAt"), now)
        email = payload.get("Email")
        if record == "SpamComplaint" or payload.get("Type") == "SpamComplaint":
            return [_failure(event_id, ref, when, email, "spam", "SpamComplaint")]
        fallback = POSTMARK_BOUNCES.get(str(payload.get("Type")))
        if fallback is None:
            return [EspEvent(event_id, "ignored", ref, when, email)]
        details = _text(payload.get("Details"))
        found = classify(text=details) or fallback
        if fallback == "temporary_error" and found in ("error", "invalid_address"):
            found = fallback
        diagnostic = _diagnostic(details or payload.get("Description"), f"({payload.get('Type')})")
        return [_failure(event_id, ref, when, email, found, diagnostic)]
    if record == "Delivery":
        email = payload.get("Recipient")
        event_id = f"Delivery:{message}:{_text(email)}"
        return [EspEvent(event_id, "delivered", ref, _when(payload.get("DeliveredAt"), now), email)]
    event_id = f"{record}:{message}:{_text(payload.get('ReceivedAt') or payload.get('ChangedAt'))}"
    return [EspEvent(event_id, "ignored", ref, now)]
