"""F-30: the one classification of failures (libs/common/mail/bounce_class.py)."""

from __future__ import annotations

import pytest

from libs.common.mail.bounce_class import (
    classify,
    find_enhanced_code,
    find_reply_code,
    is_hard,
    is_soft,
)


@pytest.mark.parametrize(
    ("enhanced", "code", "text", "expected"),
    [
        # enhanced codes first
        ("5.1.1", None, "", "invalid_address"),
        ("5.1.10", 550, "", "invalid_address"),
        ("5.2.2", 552, "mailbox full", "temporary_error"),
        ("5.2.1", 550, "mailbox disabled", "temporary_error"),
        ("4.4.7", None, "", "temporary_error"),
        ("4.7.0", 421, "", "temporary_error"),
        ("5.7.1", 550, "user unknown", "policy"),  # the code wins over the wording
        ("5.4.4", 550, "", "error"),
        ("5.3.0", None, "", "error"),
        ("2.0.0", 250, "", None),
        # 5.0.0 only says "permanent": a precise code or the wording refines it
        ("5.0.0", None, "smtp; 550-5.1.1 The email account does not exist", "invalid_address"),
        ("5.0.0", None, "smtp; 554 This user doesn't have a yahoo.com account", "invalid_address"),
        ("5.0.0", None, "smtp; 554 message rejected", "error"),
        # reply codes second
        (None, 550, "Requested action not taken", "error"),
        (None, 552, "Requested mail action aborted", "temporary_error"),
        (None, 553, "mailbox name not allowed", "invalid_address"),
        (None, 451, "local error", "temporary_error"),
        (None, 250, "ok", None),
        (None, 554, "Message rejected as spam", "policy"),
        # codes found in the text
        (None, None, "smtp; 550 5.1.1 <a@b.example>: address rejected", "invalid_address"),
        (None, None, "host said: 452 4.2.2 over quota", "temporary_error"),
        # wording last, only when there is no code
        (None, None, "Sorry, no mailbox here by that name.", "invalid_address"),
        (None, None, "mailbox is full", "temporary_error"),
        (None, None, "your IP is on a blocklist", "policy"),
        (None, None, "thank you for your mail", None),
        (None, None, "", None),
    ],
)
def test_classification(enhanced, code, text, expected) -> None:
    assert classify(enhanced=enhanced, reply_code=code, text=text) == expected


def test_codes_are_not_read_inside_addresses_or_versions() -> None:
    assert find_enhanced_code("connect to [192.0.2.5]:25 refused") is None
    assert find_enhanced_code("Exim 4.96.2 said 5.1.1 unknown") == "5.1.1"
    assert find_enhanced_code("(#5.1.1)") == "5.1.1"
    assert find_reply_code("smtp; 550 5.1.1 x") == 550
    assert find_reply_code("no code 12345") is None


def test_hard_and_soft() -> None:
    assert is_hard("invalid_address") and is_hard("error")
    assert not is_hard("policy") and not is_hard("temporary_error") and not is_hard("spam")
    assert is_soft("temporary_error") and not is_soft("policy")
