"""What one stored mail or one delivery result means: pure decisions, no I/O.

- :func:`read_mail`: parse a mail (:mod:`.dsn`) and attribute it to a campaign and contact
  by a **signed** VERP address — the envelope recipient first (the return path the DSN was
  sent to), then the return paths the report carries (ARF ``Original-Mail-From``, the
  returned message's ``Return-Path``). No signed address, no attribution: the mail is kept
  as unattributed and never becomes a bounce (no guessing from the recipient address).
- :func:`failure_of`: what the report means for that contact (see :func:`.dsn.failure_for`).
- :func:`result_failure`: the classification of a synchronous SMTP outcome from
  ``delivery.results`` — the same rule (:mod:`libs.common.mail.bounce_class`) as for DSNs.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from libs.common.mail.bounce_class import classify
from libs.common.mail.tokens import BadToken
from libs.common.mail.verp import VerpAddresses, VerpTarget
from services.bounce_processor.dsn import BounceReport, Unreadable, failure_for, read_report
from services.bounce_processor.store import Failure

#: delivery.results outcomes that are failures (sent and suppressed are not).
FAILED_OUTCOMES = frozenset({"temporary_error", "permanent_error", "policy_error"})
MailOutcome = Literal["bounce", "not_a_bounce", "unattributed", "unreadable"]


@dataclass(frozen=True)
class ReadMail:
    """A stored mail, read: its report and whose mail it was — or why neither is known."""

    outcome: MailOutcome | None
    reason: str | None = None
    report: BounceReport | None = None
    target: VerpTarget | None = None


def attribute(verp: VerpAddresses, addresses: Iterable[str]) -> VerpTarget | None:
    """The campaign and contact of the first address that is one of our signed return paths."""
    for address in addresses:
        try:
            return verp.read(address)
        except BadToken:
            continue
    return None


def read_mail(verp: VerpAddresses, raw: bytes, rcpt_to: Iterable[str]) -> ReadMail:
    """Parse and attribute; ``outcome`` is None while the contact's part is still to decide."""
    try:
        report = read_report(raw)
    except Unreadable as exc:
        return ReadMail("unreadable", exc.reason)
    target = attribute(verp, [*rcpt_to, *report.return_paths])
    if target is None:
        return ReadMail("unattributed", "no signed return path", report)
    return ReadMail(None, None, report, target)


def failure_of(mail: ReadMail, known_email: str | None, received_at: dt.datetime) -> Failure | None:
    """The failure a read, attributed mail reports for its contact; None: not a bounce."""
    assert mail.report is not None and mail.target is not None
    outcome = failure_for(mail.report, [known_email] if known_email else [])
    if outcome is None or outcome.classification is None:
        return None
    return Failure(
        campaign_id=mail.target.campaign_id,
        contact_id=mail.target.contact_id,
        classification=outcome.classification,
        source=mail.report.kind,
        occurred_at=received_at,
        email=known_email or outcome.recipient,
        diagnostic=outcome.diagnostic,
        message_id=mail.report.original_message_id,
    )


def result_failure(result: dict[str, Any]) -> Failure | None:
    """The failure of one delivery result; None for sent and suppressed.

    The sender gives up on a 4xx after its retries (``temporary_error``: soft) and reads
    5.7.x as ``policy_error``; a ``permanent_error`` is classified again here with the
    shared rule, so a 552 or a 5.2.2 (mailbox full) counts as soft, like in a DSN.
    """
    outcome = result["outcome"]
    if outcome not in FAILED_OUTCOMES:
        return None
    if outcome == "temporary_error":
        classification = "temporary_error"
    elif outcome == "policy_error":
        classification = "policy"
    else:
        found = classify(
            enhanced=result.get("enhanced_code"),
            reply_code=result.get("smtp_code"),
            text=result.get("diagnostic") or "",
        )
        classification = found or "error"
    return Failure(
        campaign_id=result["campaign_id"],
        contact_id=result["contact_id"],
        classification=classification,
        source="smtp",
        occurred_at=result["occurred_at"],
        email=result["email"],
        diagnostic=result.get("diagnostic"),
        message_id=result.get("message_id"),
    )
