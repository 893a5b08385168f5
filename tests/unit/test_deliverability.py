"""The deliverability decisions with no broker: a record's receiving domain and counters."""

from __future__ import annotations

import pytest

from libs.common.topics import Topic
from services.deliverability import processor


@pytest.mark.parametrize(
    ("address", "domain"),
    [
        ("a@docomo.ne.jp", "docomo.ne.jp"),
        ("A.B@EZweb.NE.JP", "ezweb.ne.jp"),
        ("<x@i.softbank.jp>", "i.softbank.jp"),
        ("x@gmail.com.", "gmail.com"),
        ('"a@b"@outlook.jp', "outlook.jp"),
        ("x@例え.jp", "xn--r8jz45g.jp"),
        ("no-at-sign", None),
        ("x@", None),
        ("x@bad domain", None),
        ("x@-bad.jp", None),
        ("", None),
        (None, None),
    ],
)
def test_domain_of(address: str | None, domain: str | None) -> None:
    assert processor.domain_of(address) == domain


def _result(outcome: str, smtp: int | None = None, enhanced: str | None = None) -> dict:
    return {
        "email": "u@docomo.ne.jp",
        "outcome": outcome,
        "smtp_code": smtp,
        "enhanced_code": enhanced,
    }


def test_results_move_attempts_delivered_deferred_rejected() -> None:
    assert processor.result_counts(_result("sent", 250)) == {"attempts": 1, "delivered": 1}
    assert processor.result_counts(_result("temporary_error", 421, "4.7.0")) == {
        "attempts": 1,
        "deferred": 1,
        "deferred:4.7.0": 1,
    }
    # no enhanced code: the SMTP code; an odd one is not kept as a key
    assert processor.result_counts(_result("temporary_error", 451))["deferred:451"] == 1
    assert "deferred:4xx" in processor.deferral_counts(_result("temporary_error", None, "junk!"))
    # given up waiting for its domain ("not sent: …", no SMTP code): nothing reached a relay
    assert processor.result_counts(_result("temporary_error")) == {}
    for outcome in ("permanent_error", "policy_error"):
        assert processor.result_counts(_result(outcome, 550)) == {"attempts": 1, "rejected": 1}
    assert processor.result_counts(_result("suppressed")) == {}


def test_bounces_move_hard_soft_and_complaints() -> None:
    def bounce(classification: str, hard: bool, action: str = "bounced") -> dict:
        return {"classification": classification, "hard": hard, "action": action}

    assert processor.bounce_counts(bounce("invalid_address", True)) == {"hard_bounces": 1}
    assert processor.bounce_counts(bounce("error", True)) == {"hard_bounces": 1}
    assert processor.bounce_counts(bounce("temporary_error", False, "counted")) == {
        "soft_bounces": 1
    }
    assert processor.bounce_counts(bounce("policy", False, "counted")) == {"soft_bounces": 1}
    assert processor.bounce_counts(bounce("spam", False, "complained")) == {"complaints": 1}
    assert processor.bounce_counts(bounce("none", False, "status")) == {}
    assert processor.bounce_counts(bounce("none", False, "reset")) == {}


def test_feedback_counts_under_the_known_domain() -> None:
    open_ = {"type": "open", "contact_id": 1}
    assert processor.classify(Topic.FEEDBACK_EVENTS, open_, "gmail.com") == (
        "gmail.com",
        {"opens": 1},
    )
    assert processor.classify(Topic.FEEDBACK_EVENTS, {"type": "click"}, None) == (
        None,
        {"clicks": 1},
    )
    with pytest.raises(ValueError, match="not a deliverability input"):
        processor.classify(Topic.JOBS_EVENTS, {}, None)


def test_tally_sums_a_batch_per_domain_and_figures_give_rates() -> None:
    batch = [
        ("a.jp", {"attempts": 1, "delivered": 1}),
        ("a.jp", {"attempts": 1, "deferred": 1, "deferred:4.7.0": 1}),
        (None, {"opens": 1}),
        ("b.jp", {}),
    ]
    per_domain = processor.tally(batch)
    assert per_domain == {
        "a.jp": {"attempts": 2, "delivered": 1, "deferred": 1, "deferred:4.7.0": 1}
    }
    figures = processor.figures(per_domain["a.jp"])
    assert figures["deferral_rate"] == 0.5
    assert figures["complaint_rate"] == 0.0
    assert figures["deferred_by_code"] == {"4.7.0": 1}
    assert figures["clicks"] == 0
    assert processor.figures(None)["attempts"] == 0


CAMPAIGN = "0B9F6C2E-3D1A-4C57-9F0E-6A2D8B1C4E73"


def test_a_batch_sums_delivered_and_complaints_per_campaign_and_domain() -> None:
    other = "7c1e2d3f-4a5b-4c6d-8e9f-0a1b2c3d4e5f"
    items = [
        (CAMPAIGN, "docomo.ne.jp", {"attempts": 1, "delivered": 1}),
        (CAMPAIGN, "docomo.ne.jp", {"attempts": 1, "delivered": 1}),
        (CAMPAIGN, "docomo.ne.jp", {"complaints": 1}),
        (CAMPAIGN, "gmail.com", {"attempts": 1, "deferred": 1, "deferred:4.7.0": 1}),
        (other, "gmail.com", {"attempts": 1, "delivered": 1}),
        ("not-a-uuid", "gmail.com", {"attempts": 1, "delivered": 1}),
    ]
    assert processor.tally_campaigns(items) == {
        # canonical (lower-case) ids; gmail.com's deferral moves neither counter
        CAMPAIGN.lower(): {"docomo.ne.jp": {"delivered": 2, "complaints": 1}},
        other: {"gmail.com": {"delivered": 1}},
    }
    assert processor.tally_campaigns([]) == {}


def test_a_campaign_tally_adds_domain_by_domain() -> None:
    total = {"docomo.ne.jp": {"delivered": 2, "complaints": 1}}
    more = {"docomo.ne.jp": {"delivered": 3}, "gmail.com": {"complaints": 1}}
    assert processor.add_domains(total, more) == {
        "docomo.ne.jp": {"delivered": 5, "complaints": 1},
        "gmail.com": {"complaints": 1},
    }
    assert total == {"docomo.ne.jp": {"delivered": 2, "complaints": 1}}  # not changed


def test_a_deferral_the_sender_retried_is_an_attempt_deferred_under_its_code() -> None:
    deferral = {"domain": "DoCoMo.ne.jp", "smtp_code": 421, "enhanced_code": "4.7.0"}
    assert processor.classify(Topic.DELIVERY_DEFERRALS, deferral) == (
        "docomo.ne.jp",
        {"attempts": 1, "deferred": 1, "deferred:4.7.0": 1},
    )
    bare = {"domain": "a.jp", "smtp_code": 451, "enhanced_code": None}
    assert processor.deferral_counts(bare) == {"attempts": 1, "deferred": 1, "deferred:451": 1}
    # the same counters as a result whose retries were spent: one answer, counted once
    spent = _result("temporary_error", 421, "4.7.0")
    assert processor.result_counts(spent) == processor.deferral_counts(deferral)
    assert processor.classify(Topic.DELIVERY_DEFERRALS, {"domain": "bad domain"})[0] is None
    # a deferral's contact id may be a system mail's recipient index: it teaches no domain
    assert Topic.DELIVERY_DEFERRALS not in processor.TEACHES_DOMAIN


def test_deferrals_and_the_final_result_sum_per_domain() -> None:
    """A message deferred twice, then delivered: three attempts, two deferred."""
    deferral = {"domain": "docomo.ne.jp", "smtp_code": 421, "enhanced_code": "4.7.0"}
    batch = [
        processor.classify(Topic.DELIVERY_DEFERRALS, deferral),
        processor.classify(Topic.DELIVERY_DEFERRALS, deferral),
        processor.classify(Topic.DELIVERY_RESULTS, _result("sent", 250)),
    ]
    counts = processor.tally(batch)["docomo.ne.jp"]
    figures = processor.figures(counts)
    assert (figures["attempts"], figures["deferred"], figures["delivered"]) == (3, 2, 1)
    assert figures["deferred_by_code"] == {"4.7.0": 2}
