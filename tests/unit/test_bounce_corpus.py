"""F-30, F-33: every mail of the bounce corpus (tests/fixtures/bounces) is read and
classified as expected, and attributed only by a signed return path."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path

import pytest

from libs.common.mail.verp import VerpAddresses
from services.bounce_processor.dsn import Unreadable, failure_for, read_report
from services.bounce_processor.processor import failure_of, read_mail, result_failure

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "bounces"
KEYS = "k1:unit-test-signing-key"
INVALID = "invalid_address"


def raw(name: str) -> bytes:
    return (FIXTURES / f"{name}.eml").read_bytes()


@pytest.mark.parametrize(
    ("name", "kind", "recipient", "status", "classification"),
    [
        ("postfix_user_unknown", "dsn", "no-such-user@example.jp", "5.1.1", "invalid_address"),
        ("exim_mailbox_full", "dsn", "hanako@example.org", "5.2.2", "temporary_error"),
        ("exchange_recipient_not_found", "dsn", "taro@contoso.example", "5.1.10", INVALID),
        # Status 5.0.0 says only "permanent": the 5.1.1 in Diagnostic-Code is more precise
        ("gmail_style_no_such_account", "dsn", "jiro.nonexistent@gmail.com", "5.0.0", INVALID),
        # no enhanced code in the reply: the wording decides
        ("yahoo_style_no_account", "dsn", "saburo@yahoo.co.jp", "5.0.0", "invalid_address"),
        ("yahoo_style_policy_block", "dsn", "shiro@yahoo.com", "5.7.1", "policy"),
        ("arf_abuse", "arf", "complainer@hotmail.example", None, "spam"),
        # no report part: flufl.bounce finds the recipient, its lines give the class
        ("qmail_nonstandard", "heuristic", "goro@example.net", None, "invalid_address"),
    ],
)
def test_each_bounce_shape_is_read_and_classified(
    name: str, kind: str, recipient: str, status: str | None, classification: str
) -> None:
    report = read_report(raw(name))
    assert report.kind == kind
    outcome = failure_for(report, [])
    assert outcome is not None
    assert (outcome.recipient, outcome.status, outcome.classification) == (
        recipient,
        status,
        classification,
    )
    assert outcome.diagnostic and len(outcome.diagnostic) <= 500


def test_a_delayed_dsn_is_no_bounce() -> None:
    report = read_report(raw("delayed"))
    [block] = report.recipients
    assert (block.action, block.status, block.classification) == ("delayed", "4.4.7", None)
    assert failure_for(report, ["busy@example.jp"]) is None


def test_every_recipient_block_of_a_multi_recipient_dsn() -> None:
    report = read_report(raw("multi_recipient"))
    assert [(o.recipient, o.action, o.classification) for o in report.recipients] == [
        ("gone@example.com", "failed", "invalid_address"),
        ("slow@example.com", "failed", "temporary_error"),
        ("ok@example.com", "relayed", None),
    ]
    assert report.envelope_id == "0b9f6c2e3d1a4c57-4096"
    # our mail went to one address: the blocks naming it speak for it
    gone, slow = (
        failure_for(report, ["GONE@example.com"]),
        failure_for(report, ["slow@example.com"]),
    )
    assert gone is not None and gone.classification == "invalid_address"
    assert slow is not None and slow.classification == "temporary_error"
    # the list we mailed expanded and one member got it: the address itself works
    assert failure_for(report, ["sales@example.com"]) is None
    assert failure_for(report, []) is None


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("garbage", "no delivery report and no bounce recognised"),
        ("binary_junk", "no mail headers"),
    ],
)
def test_mail_that_is_no_bounce_is_unreadable(name: str, reason: str) -> None:
    with pytest.raises(Unreadable) as caught:
        read_report(raw(name))
    assert caught.value.reason == reason


def test_a_complaint_that_is_not_abuse_is_no_complaint() -> None:
    virus = raw("arf_abuse").replace(b"Feedback-Type: abuse", b"Feedback-Type: virus")
    with pytest.raises(Unreadable, match="virus"):
        read_report(virus)


def test_attribution_only_by_a_signed_return_path() -> None:
    verp = VerpAddresses(KEYS, "bounces.localhost")
    campaign = str(uuid.uuid4())
    address = verp.address(campaign, 42)
    received = dt.datetime(2025, 6, 11, tzinfo=dt.UTC)

    by_rcpt = read_mail(verp, raw("postfix_user_unknown"), [address])
    assert by_rcpt.target is not None
    assert (by_rcpt.target.campaign_id, by_rcpt.target.contact_id) == (campaign, 42)
    failure = failure_of(by_rcpt, "taro@example.jp", received)
    assert failure is not None
    # the address our mail went to, not the one the DSN names (a forward)
    assert (failure.email, failure.classification, failure.source) == (
        "taro@example.jp",
        "invalid_address",
        "dsn",
    )
    assert failure.message_id == "<3f0c2a4e-8d0b-5c1e-9a53-0c9e4b7f1d21@shop.example.jp>"

    # an ARF report sent to the feedback-loop address: its Original-Mail-From is ours
    arf = raw("arf_abuse").replace(b"b-k1-example@bounces.localhost", address.encode())
    target = read_mail(verp, arf, ["fbl@bounces.localhost"]).target
    assert target is not None and target.contact_id == 42

    # the sample return path in the corpus is not signed: nobody is blamed
    unsigned = read_mail(verp, raw("postfix_user_unknown"), ["fbl@bounces.localhost"])
    assert (unsigned.outcome, unsigned.reason) == ("unattributed", "no signed return path")
    forged = address.replace(address[5:9], "zzzz")
    assert read_mail(verp, raw("postfix_user_unknown"), [forged]).outcome == "unattributed"
    assert read_mail(verp, raw("garbage"), [address]).outcome == "unreadable"


@pytest.mark.parametrize(
    ("outcome", "code", "enhanced", "diagnostic", "classification"),
    [
        ("sent", 250, None, "250 2.0.0 OK", None),
        ("suppressed", None, None, None, None),
        ("temporary_error", 451, "4.3.0", "451 4.3.0 try later", "temporary_error"),
        ("policy_error", 554, "5.7.1", "554 5.7.1 blocked", "policy"),
        ("permanent_error", 550, "5.1.1", "550 5.1.1 user unknown", "invalid_address"),
        ("permanent_error", 552, "5.2.2", "552 5.2.2 mailbox full", "temporary_error"),
        ("permanent_error", 550, None, "550 no", "error"),
        ("permanent_error", None, None, "not sent: bad address", "error"),
    ],
)
def test_delivery_results_are_classified_by_the_same_rule(
    outcome: str, code: int | None, enhanced: str | None, diagnostic: str | None, classification
) -> None:
    result = {
        "result_id": "r",
        "campaign_id": "c",
        "contact_id": 1,
        "email": "a@example.jp",
        "outcome": outcome,
        "smtp_code": code,
        "enhanced_code": enhanced,
        "diagnostic": diagnostic,
        "message_id": None,
        "occurred_at": dt.datetime.now(dt.UTC),
    }
    failure = result_failure(result)
    assert (failure.classification if failure else None) == classification
