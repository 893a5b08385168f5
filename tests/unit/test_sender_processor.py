"""The sender's decisions (services/sender/processor.py), over plain values: no broker,
no database."""

from __future__ import annotations

import datetime as dt
import uuid

from libs.common.mail.can_send import ALLOWED, Decision
from services.sender import processor
from services.sender.models import Claimed, LedgerKey, Outcome
from services.sender.processor import Deliverable, Duplicate, Suppressed

CAMPAIGN = str(uuid.uuid4())
KEY = LedgerKey(CAMPAIGN, "step-1", 42)
AT = dt.datetime(2026, 12, 4, 18, 0, tzinfo=dt.UTC)


def request(**extra: object) -> dict[str, object]:
    return {"campaign_id": CAMPAIGN, "contact_id": 42, "email": "a@example.jp", **extra}


def test_ledger_keys() -> None:
    assert processor.request_key(request(step_id="step-1")) == KEY
    assert processor.request_key(request(step_id=None)) == LedgerKey(CAMPAIGN, "", 42)
    assert processor.request_key(request()) == LedgerKey(CAMPAIGN, "", 42)
    assert processor.system_key("m-1", 2) == LedgerKey("mail:m-1", "", 2)


def test_kind_of_a_request() -> None:
    assert processor.kind_of(request()) == "campaign"
    assert processor.kind_of(request(test=False)) == "campaign"
    assert processor.kind_of(request(test=True)) == "test"


def test_a_stopped_campaign_stops_its_requests_but_not_test_sends() -> None:
    for state in ("halted", "cancelled", "paused"):
        stopped = {CAMPAIGN: state}
        assert processor.campaign_stop(request(), stopped) == state
        assert processor.campaign_stop(request(test=True), stopped) is None
    assert processor.campaign_stop(request(), {}) is None
    assert processor.campaign_stop(request(), {str(uuid.uuid4()): "halted"}) is None


def test_a_fresh_claim_is_delivered_when_allowed_and_suppressed_with_its_reason() -> None:
    fresh = Claimed(KEY, fresh=True, status="claimed", result=None)
    assert processor.needs_check(fresh)
    assert processor.after_claim(fresh, ALLOWED) == Deliverable(resend=False)
    refused = Decision(False, "unsubscribed")
    assert processor.after_claim(fresh, refused) == Suppressed("unsubscribed", resend=False)


def test_an_unfinished_row_is_sent_again_or_suppressed_as_a_resend() -> None:
    for status in ("claimed", "handed"):  # 'handed': written by older senders
        unfinished = Claimed(KEY, fresh=False, status=status, result=None, owner=7)
        assert processor.needs_check(unfinished)
        assert processor.after_claim(unfinished, ALLOWED) == Deliverable(resend=True)
        assert processor.after_claim(unfinished, Decision(False, "bounced")) == Suppressed(
            "bounced", resend=True
        )


def test_a_done_row_is_a_duplicate_that_republishes_its_recorded_result() -> None:
    stored = {"result_id": "r-1", "outcome": "sent"}
    done = Claimed(KEY, fresh=False, status="done", result=stored)
    assert not processor.needs_check(done)
    # Whatever the copy says now, the recorded outcome stands.
    assert processor.after_claim(done, Decision(False, "unsubscribed")) == Duplicate(stored)
    assert processor.after_claim(done, None) == Duplicate(stored)
    system_done = Claimed(processor.system_key("m", 0), fresh=False, status="done", result=None)
    assert processor.after_claim(system_done, None) == Duplicate(None)


def test_unchecked_mail_is_deliverable() -> None:
    """mail.system is not checked against the suppression copy (no verdict)."""
    key = processor.system_key("m", 0)
    assert processor.after_claim(Claimed(key, True, "claimed", None), None) == Deliverable(False)
    assert processor.after_claim(Claimed(key, False, "claimed", None), None) == Deliverable(True)


def test_a_suppressed_outcome_becomes_a_result_in_its_ledger_row() -> None:
    outcome = processor.suppressed("blacklisted")
    assert outcome == Outcome("suppressed", suppressed_reason="blacklisted")
    key, kind, recorded, result = processor.ledger_row(KEY, "campaign", "a@example.jp", outcome, AT)
    assert (key, kind, recorded) == (KEY, "campaign", outcome)
    assert result is not None
    uuid.UUID(result.pop("result_id"))
    assert result == {
        "campaign_id": CAMPAIGN,
        "contact_id": 42,
        "email": "a@example.jp",
        "outcome": "suppressed",
        "smtp_code": None,
        "enhanced_code": None,
        "diagnostic": None,
        "relay": None,
        "message_id": None,
        "step_id": "step-1",
        "suppressed_reason": "blacklisted",
        "occurred_at": int(AT.timestamp() * 1000),
    }


def test_a_sent_outcome_carries_the_relay_reply_and_each_result_its_own_id() -> None:
    outcome = Outcome("sent", 250, "2.0.0", "250 2.0.0 Ok", "relay-a", "<id@example>")
    no_step = LedgerKey(CAMPAIGN, "", 42)
    first = processor.delivery_result(no_step, "a@example.jp", outcome, AT)
    second = processor.delivery_result(no_step, "a@example.jp", outcome, AT)
    assert first["result_id"] != second["result_id"]
    assert first["step_id"] is None  # '' in the ledger key, absent in the record
    assert (first["smtp_code"], first["enhanced_code"], first["relay"]) == (250, "2.0.0", "relay-a")
    assert first["message_id"] == "<id@example>"


def test_test_sends_and_system_mail_record_no_result() -> None:
    outcome = Outcome("sent")
    assert processor.ledger_row(KEY, "test", "op@example.jp", outcome, AT)[3] is None
    system = processor.system_key("m", 0)
    assert processor.ledger_row(system, "system", "op@example.jp", outcome, AT)[3] is None
