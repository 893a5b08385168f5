"""Reading bounce mail (F-30, F-33): RFC 3464 DSNs, RFC 5965 ARF reports, other bounces.

Pure: bytes in, a :class:`BounceReport` out (or :class:`Unreadable` with the reason).

- A **DSN** (``multipart/report; report-type=delivery-status``): every per-recipient block
  is read — Final-Recipient, Original-Recipient, Action, Status, Diagnostic-Code — and each
  failed block is classified by :mod:`libs.common.mail.bounce_class` (Status first, then the
  codes and wording of Diagnostic-Code). ``delayed``, ``delivered``, ``relayed`` and
  ``expanded`` blocks are no failure.
- An **ARF report** (``report-type=feedback-report``): ``Feedback-Type: abuse`` is a spam
  complaint; other feedback types (fraud, virus, not-spam, auth-failure…) are not about the
  recipient's wish and are refused as unreadable (kept and counted, never a bounce).
- Anything else goes to the heuristic detectors of ``flufl.bounce`` (GNU Mailman's, kept up
  for two decades: qmail, old Exchange, Yahoo, …), but only when no standard report part is
  present. A recipient they find is classified from the lines of the bounce that name it.

The report also lists the return paths found inside the mail (ARF ``Original-Mail-From``,
the ``Return-Path`` of the returned message or headers), in that order, so a report sent to
an address other than the VERP return path (a feedback loop's fixed address) can still be
attributed — but only by a signed VERP address, never by guessing from the recipient.
"""

from __future__ import annotations

import email
import email.policy
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from email.message import Message
from email.parser import HeaderParser
from typing import Literal

from flufl.bounce import all_failures

from libs.common.mail.bounce_class import Classification, classify

Kind = Literal["dsn", "arf", "heuristic"]

#: DSN actions that mean the message reached (or is still on its way to) the recipient.
NOT_FAILED = frozenset({"delayed", "delivered", "relayed", "expanded"})
#: ARF feedback types that are a recipient's complaint (RFC 5965 §7.3).
COMPLAINT_TYPES = frozenset({"abuse"})
#: how the worst of several failures is chosen for one recipient: most decisive first.
SEVERITY: tuple[Classification, ...] = (
    "spam",
    "invalid_address",
    "error",
    "temporary_error",
    "policy",
)
DIAGNOSTIC_LIMIT = 500
#: where a non-standard bounce's own words end and its copy of the message begins.
_COPY_STARTS = re.compile(
    r"^(-+ ?(below this line|this is a copy|original message)|return-path:)", re.I | re.M
)
_RETURN_PATH = re.compile(r"^return-path:\s*<([^<>\s]+)>", re.I | re.M)


class Unreadable(Exception):
    """Mail that is no bounce report we can read; ``reason`` is stored with it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class RecipientOutcome:
    """What a report says about one recipient."""

    recipient: str | None
    original_recipient: str | None
    action: str
    status: str | None
    diagnostic: str | None
    #: None: no failure (delayed, delivered, …) or nothing readable about one.
    classification: Classification | None


@dataclass(frozen=True)
class BounceReport:
    kind: Kind
    recipients: tuple[RecipientOutcome, ...]
    #: return paths found inside the mail, most trusted first (for attribution by VERP).
    return_paths: tuple[str, ...] = ()
    #: the Message-ID of the returned message, when the report carries it.
    original_message_id: str | None = None
    envelope_id: str | None = None
    feedback_type: str | None = None


def one_line(text: str | None, limit: int = DIAGNOSTIC_LIMIT) -> str | None:
    """Folded header text on one line, bounded (it travels in events and rows)."""
    if text is None:
        return None
    joined = " ".join(str(text).split())
    return joined[:limit] or None


def address_of(field: str | None) -> str | None:
    """``"rfc822; a@example.jp"`` or ``"<a@example.jp>"`` → ``"a@example.jp"``."""
    if not field:
        return None
    value = str(field).rpartition(";")[2].strip().strip("<>").strip()
    return value if "@" in value else None


def _header(block: Message, name: str) -> str | None:
    value = block.get(name)
    return None if value is None else str(value)


def _blocks(part: Message) -> list[Message]:
    """The header blocks of a report part (message/delivery-status and friends)."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return [p for p in payload if isinstance(p, Message)]
    raw = part.get_payload(decode=True)
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(payload)
    parser = HeaderParser()
    return [parser.parsestr(chunk) for chunk in re.split(r"\r?\n\s*\r?\n", text) if chunk.strip()]


def _embedded_headers(message: Message) -> Message | None:
    """The returned message's headers (message/rfc822 or text/rfc822-headers part)."""
    for part in message.walk():
        kind = part.get_content_type()
        if kind in ("message/rfc822", "message/global"):
            inner = part.get_payload()
            if isinstance(inner, list) and inner and isinstance(inner[0], Message):
                return inner[0]
        elif kind in ("text/rfc822-headers", "text/global-headers"):
            raw = part.get_payload(decode=True)
            text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else ""
            return HeaderParser().parsestr(text)
    return None


def _recipient_outcome(block: Message) -> RecipientOutcome:
    action = (_header(block, "Action") or "").strip().lower()
    status = (_header(block, "Status") or "").strip().split(" ")[0] or None
    diagnostic = one_line(_header(block, "Diagnostic-Code"))
    classification: Classification | None = None
    if action == "failed":
        classification = classify(enhanced=status, text=diagnostic or "")
    return RecipientOutcome(
        recipient=address_of(_header(block, "Final-Recipient")),
        original_recipient=address_of(_header(block, "Original-Recipient")),
        action=action or "unknown",
        status=status,
        diagnostic=diagnostic,
        classification=classification,
    )


def _read_dsn(message: Message, part: Message, return_paths: list[str]) -> BounceReport:
    blocks = _blocks(part)
    per_message = blocks[0] if blocks else Message()
    recipients = tuple(
        _recipient_outcome(b) for b in blocks if b.get("Final-Recipient") or b.get("Action")
    )
    if not recipients:
        raise Unreadable("delivery-status part without a recipient block")
    embedded = _embedded_headers(message)
    original_id = (_header(embedded, "Message-ID") if embedded is not None else None) or _header(
        per_message, "X-Original-Message-ID"
    )
    return BounceReport(
        kind="dsn",
        recipients=recipients,
        return_paths=tuple(return_paths),
        original_message_id=one_line(original_id, 200),
        envelope_id=one_line(_header(per_message, "Original-Envelope-Id"), 200),
    )


def _read_arf(message: Message, part: Message, return_paths: list[str]) -> BounceReport:
    blocks = _blocks(part)
    fields = blocks[0] if blocks else Message()
    feedback_type = (_header(fields, "Feedback-Type") or "").strip().lower()
    if feedback_type not in COMPLAINT_TYPES:
        raise Unreadable(f"feedback report of type {feedback_type or 'none'!r} is no complaint")
    embedded = _embedded_headers(message)
    recipient = address_of(_header(fields, "Original-Rcpt-To")) or (
        address_of(_header(embedded, "To")) if embedded is not None else None
    )
    outcome = RecipientOutcome(
        recipient=recipient,
        original_recipient=None,
        action=feedback_type,
        status=None,
        diagnostic=f"ARF feedback-type: {feedback_type}",
        classification="spam",
    )
    return BounceReport(
        kind="arf",
        recipients=(outcome,),
        return_paths=tuple(return_paths),
        original_message_id=one_line(_header(embedded, "Message-ID"), 200) if embedded else None,
        feedback_type=feedback_type,
    )


def _own_words(message: Message) -> str:
    """The text of a non-standard bounce up to where its copy of the message starts."""
    texts = []
    for part in message.walk():
        if part.get_content_maintype() == "text" and not part.is_multipart():
            raw = part.get_payload(decode=True)
            if isinstance(raw, bytes):
                texts.append(raw.decode(part.get_content_charset() or "utf-8", "replace"))
    text = "\n".join(texts)
    end = _COPY_STARTS.search(text)
    return text[: end.start()] if end else text


def _lines_naming(text: str, address: str) -> str:
    """The line naming ``address`` and the two after it: the bounce's words about it."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if address.lower() in line.lower():
            return " ".join(lines[i : i + 3])
    return text


def _read_heuristic(message: Message, return_paths: list[str]) -> BounceReport:
    try:
        temporary, permanent = all_failures(message)
    except Exception as exc:  # a third-party heuristic must never stop the mail loop
        raise Unreadable(f"bounce heuristics failed: {exc!r}"[:300]) from None
    if not temporary and not permanent:
        raise Unreadable("no delivery report and no bounce recognised")
    words = _own_words(message)
    outcomes = []
    for raw, fallback in [(a, "temporary_error") for a in sorted(temporary)] + [
        (a, "error") for a in sorted(permanent)
    ]:
        address = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        about = _lines_naming(words, address)
        classification: Classification = classify(text=about) or fallback  # type: ignore[assignment]
        outcomes.append(
            RecipientOutcome(
                recipient=address,
                original_recipient=None,
                action="failed",
                status=None,
                diagnostic=one_line(about),
                classification=classification,
            )
        )
    return BounceReport(
        kind="heuristic", recipients=tuple(outcomes), return_paths=tuple(return_paths)
    )


def _return_paths(message: Message, text: str) -> list[str]:
    found: list[str] = []
    for part in message.walk():
        if part.get_content_type() == "message/feedback-report":
            for block in _blocks(part)[:1]:
                address = address_of(_header(block, "Original-Mail-From"))
                if address:
                    found.append(address)
    embedded = _embedded_headers(message)
    if embedded is not None:
        address = address_of(_header(embedded, "Return-Path"))
        if address:
            found.append(address)
    found.extend(_RETURN_PATH.findall(text))
    return list(dict.fromkeys(found))


def parse_message(raw: bytes) -> Message:
    """The mail as a message tree; compat32 because bounces are often malformed and the
    strict policy raises on headers it cannot parse."""
    if not raw.strip():
        raise Unreadable("empty message")
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def read_report(raw: bytes) -> BounceReport:
    """What a bounce mail reports; :class:`Unreadable` when it reports nothing we can use."""
    message = parse_message(raw)
    if not message.keys():
        raise Unreadable("no mail headers")
    text = raw.decode("utf-8", "replace")
    return_paths = _return_paths(message, text)
    for part in message.walk():
        kind = part.get_content_type()
        if kind in ("message/delivery-status", "message/global-delivery-status"):
            return _read_dsn(message, part, return_paths)
        if kind == "message/feedback-report":
            return _read_arf(message, part, return_paths)
    return _read_heuristic(message, return_paths)


def _matches(outcome: RecipientOutcome, addresses: Collection[str]) -> bool:
    wanted = {a.lower() for a in addresses}
    return any(a and a.lower() in wanted for a in (outcome.recipient, outcome.original_recipient))


def worst(outcomes: Iterable[RecipientOutcome]) -> RecipientOutcome | None:
    """The most decisive failure among ``outcomes`` (see :data:`SEVERITY`)."""
    failed = [o for o in outcomes if o.classification is not None]
    if not failed:
        return None
    return min(failed, key=lambda o: SEVERITY.index(o.classification))


def failure_for(report: BounceReport, addresses: Collection[str]) -> RecipientOutcome | None:
    """What the report means for the one recipient of our mail (a VERP return path names
    one recipient), whose known addresses are ``addresses``; None: not a bounce.

    The blocks naming one of ``addresses`` speak for it; when none does (a forward, an
    alias), all blocks do. If any of those reached its destination (an expanded list
    with one dead member), the address itself works: not a bounce.
    """
    chosen = [o for o in report.recipients if _matches(o, addresses)] or list(report.recipients)
    if any(o.action in NOT_FAILED - {"delayed"} for o in chosen):
        return None
    return worst(chosen)
