"""What a delivery failure says about the recipient (F-30): one rule for SMTP replies and DSNs.

The sender reads SMTP replies through :mod:`libs.common.mail.smtp_reply`, the bounce processor
reads DSNs and delivery results; both ask :func:`classify`, so a ``550 5.1.1`` means the
same thing whether it came back synchronously or in a bounce a day later.

Evidence is read strongest first (RFC 3463 is the only structured, registered vocabulary;
reply codes only say temporary or permanent; wording is a last resort):

1. an **enhanced status code** ``class.subject.detail``: 2.x.x success (not a failure);
   4.x.x → ``temporary_error``; 5.1.x (addressing) → ``invalid_address``; 5.2.x (mailbox
   full or disabled) → ``temporary_error``; 5.7.x (security or policy, reputation blocks)
   → ``policy``; any other 5.x.x → ``error``. ``5.0.0`` ("other or undefined") says no
   more than a 5xx reply code, so it is read like one;
2. a **reply code**: 2xx/3xx not a failure; 4xx ``temporary_error``; 5xx → the wording
   decides, else ``error`` (552 "exceeded storage allocation" → ``temporary_error``, 553
   "mailbox name not allowed" → ``invalid_address``, as RFC 3463 maps them);
3. the **diagnostic text** alone (non-standard bounces): well-known phrases, else nothing.

``invalid_address`` and ``error`` are hard (one is enough to stop the address), a
``temporary_error`` is soft (counted; N in a row stop it), ``policy`` is a campaign error
that is not held against the recipient, and ``spam`` (an ARF complaint, RFC 5965) is a
complaint. An ARF report is recognised by its report type, not here.
"""

from __future__ import annotations

import re
from typing import Literal

Classification = Literal["invalid_address", "temporary_error", "policy", "error", "spam"]

HARD: frozenset[str] = frozenset({"invalid_address", "error"})
SOFT: frozenset[str] = frozenset({"temporary_error"})

#: ``5.1.1`` at the start of a reply text (where RFC 2034 puts it).
_LEADING_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
#: an enhanced code anywhere (DSN Diagnostic-Code, bounce prose), not inside a version
#: number or an IP address; here the subject is one of the registered 0-7 (RFC 3463), so
#: "Exim 4.96.2" is not read as a code.
_ANY_ENHANCED = re.compile(r"(?<![\d.])([245])\.([0-7])\.(\d{1,3})(?![\d.]*\d)")
#: a reply code at the start of a line or after ``smtp;`` (``smtp; 550 ...``).
_REPLY_CODE = re.compile(r"(?:^|;|\n)\s*([245]\d\d)(?=[\s-]|$)")

# Wording of non-standard or code-less failures, checked in this order. Deliberately short:
# a phrase that matches innocent text would turn a campaign error into a hard bounce.
_PHRASES: tuple[tuple[Classification, re.Pattern[str]], ...] = (
    (
        "policy",
        re.compile(
            r"\bspam\b|blacklist|blocklist|block ?list|\bblocked\b|reputation|\bpolicy\b"
            r"|\bdmarc\b|\bspf\b|\bdkim\b|not accepted for policy"
        ),
    ),
    (
        "temporary_error",
        re.compile(
            r"mailbox (is )?full|over ?quota|quota exceeded|exceeded (the )?storage"
            r"|insufficient (system )?storage|mailbox (is )?(disabled|inactive)"
            r"|account (is )?(disabled|inactive|suspended)|temporar|try again"
        ),
    ),
    (
        "invalid_address",
        re.compile(
            r"user unknown|unknown user|no such (user|mailbox|recipient|address)"
            r"|(user|mailbox|address|recipient) (does not|doesn't) exist"
            r"|(recipient|mailbox) (not found|unavailable)|unknown recipient|invalid recipient"
            r"|recipient address rejected|address rejected|not a valid (mailbox|recipient)"
            r"|unrouteable address|no mailbox here|(does not|doesn't) have an? [\w.-]+ account"
        ),
    ),
)


#: RFC 3463 subjects of permanent failures that are not a plain "error".
_SUBJECT_CLASSES: dict[str, Classification] = {
    "1": "invalid_address",
    "2": "temporary_error",
    "7": "policy",
}
#: reply codes RFC 3463 maps to one subject (552 → 5.2.2 mailbox full, 553 → 5.1.3).
_REPLY_CODE_CLASSES: dict[int, Classification] = {552: "temporary_error", 553: "invalid_address"}


def leading_enhanced_code(text: str) -> str | None:
    """The RFC 3463 code at the start of a reply text (``"5.1.1"``), if any."""
    match = _LEADING_ENHANCED.match(text)
    return ".".join(match.groups()) if match else None


def find_enhanced_code(text: str) -> str | None:
    """The first RFC 3463 code anywhere in ``text`` (``"smtp; 550 5.1.1 <a@b>"``)."""
    match = _ANY_ENHANCED.search(text)
    return ".".join(match.groups()) if match else None


def find_reply_code(text: str) -> int | None:
    """An SMTP reply code at the start of ``text`` or of one of its lines, or after ``;``."""
    match = _REPLY_CODE.search(text)
    return int(match.group(1)) if match else None


def from_text(text: str) -> Classification | None:
    """The class the wording alone suggests; None when it says nothing we recognise."""
    lowered = " ".join(text.lower().split())
    for classification, phrase in _PHRASES:
        if phrase.search(lowered):
            return classification
    return None


def _from_enhanced(code: str) -> Classification | None:
    klass, subject, _ = code.split(".")
    if klass == "2":
        return None
    if klass == "4":
        return "temporary_error"
    return _SUBJECT_CLASSES.get(subject, "error")


def classify(
    *, enhanced: str | None = None, reply_code: int | None = None, text: str = ""
) -> Classification | None:
    """The class of one failure; None when the evidence says it is no failure (2.x.x,
    2xx) or says nothing at all (no code, no known wording).

    ``enhanced`` and ``reply_code`` are what the caller read from structured fields (the
    DSN's Status, the reply); codes found in ``text`` are used when they are missing.
    """
    enhanced = enhanced or find_enhanced_code(text)
    undefined = enhanced is not None and enhanced.startswith("5") and enhanced.endswith(".0.0")
    if undefined:  # Status: 5.0.0 with "550 5.1.1 user unknown" in Diagnostic-Code
        specific = find_enhanced_code(text)
        if specific is not None and specific.startswith("5") and not specific.endswith(".0.0"):
            enhanced, undefined = specific, False
    if enhanced is not None and not undefined:
        return _from_enhanced(enhanced)
    reply_code = reply_code or find_reply_code(text)
    permanent = undefined or (reply_code is not None and reply_code >= 500)
    if not permanent and reply_code is not None:
        return None if reply_code < 400 else "temporary_error"
    if reply_code in _REPLY_CODE_CLASSES:
        return _REPLY_CODE_CLASSES[reply_code]
    worded = from_text(text)
    if permanent:  # a code that says no more than "permanent": the wording, else "error"
        return worded or "error"
    return worded


def is_hard(classification: str | None) -> bool:
    return classification in HARD


def is_soft(classification: str | None) -> bool:
    return classification in SOFT
