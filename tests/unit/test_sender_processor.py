"""The sender's decisions (services/sender/processor.py), over plain values: no broker,
no database."""

from __future__ import annotations

import datetime as dt
import uuid

from libs.common import avro
from libs.common.mail.can_send import ALLOWED, Decision
from libs.common.topics import Topic
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


def test_a_held_domain_stops_its_campaigns_requests_to_it_only() -> None:
    held = {CAMPAIGN: frozenset({"example.jp", "xn--eckwd4c7c.jp"})}
    stop = processor.campaign_stop
    assert stop(request(email="a@example.jp"), {}, held) == processor.DOMAIN_PAUSED
    assert stop(request(email="A.B@Mail@EXAMPLE.JP"), {}, held) == "domain_paused"  # last '@'
    assert stop(request(email="a@ドメイン.JP"), {}, held) == "domain_paused"  # as an A-label
    assert stop(request(email="a@other.jp"), {}, held) is None
    assert stop(request(email="a@sub.example.jp"), {}, held) is None  # a domain, not a suffix
    assert stop(request(email="a@example.jp", test=True), {}, held) is None
    other = {str(uuid.uuid4()): frozenset({"example.jp"})}
    assert stop(request(email="a@example.jp"), {}, other) is None
    # The campaign's own state comes first: a halted campaign is halted to every domain.
    assert stop(request(email="a@example.jp"), {CAMPAIGN: "halted"}, held) == "halted"
    assert stop(request(email="a@other.jp"), {CAMPAIGN: "paused"}, held) == "paused"
    assert processor.stop_of(CAMPAIGN, "x@example.jp", {}, held) == "domain_paused"
    assert processor.stop_of(CAMPAIGN, "x@example.jp", {}, None) is None


def control(action: str, domains: list[str] | None = None) -> dict[str, object]:
    command: dict[str, object] = {"campaign_id": CAMPAIGN, "action": action}
    if domains is not None:
        command["domains"] = domains
    return command


def test_a_control_command_changes_the_state_or_the_held_domains() -> None:
    change = processor.control_change
    StateChange, DomainChange = processor.StateChange, processor.DomainChange
    # v1 records (no domains) and v2 with none: the whole campaign, as before.
    assert change(control("pause")) == StateChange("paused")
    assert change(control("pause", [])) == StateChange("paused")
    assert change(control("resume", [])) == StateChange("active")
    assert change(control("halt")) == StateChange("halted")
    assert change(control("cancel")) == StateChange("cancelled")
    # Domains: normalised like a recipient's (lower case, A-labels), each once, sorted.
    assert change(control("pause", ["Gmail.com ", "docomo.ne.jp", "gmail.com"])) == DomainChange(
        ("docomo.ne.jp", "gmail.com"), held=True
    )
    assert change(control("resume", ["ドメイン.jp"])) == DomainChange(
        ("xn--eckwd4c7c.jp",), held=False
    )
    # halt and cancel stop the whole campaign whatever they name.
    assert change(control("halt", ["gmail.com"])) == StateChange("halted")
    assert change(control("cancel", ["gmail.com"])) == StateChange("cancelled")
    # Only blanks: nothing changes (a resume for some domains never resumes everything).
    assert change(control("resume", [" ", ""])) == DomainChange((), held=False)


def test_recipient_domains() -> None:
    assert processor.recipient_domain("a@Example.JP") == "example.jp"
    assert processor.recipient_domain("no-at-sign") == "no-at-sign"
    assert processor.recipient_domain("a@bad..ドメイン") == "bad..ドメイン"  # not encodable: as is


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


def test_a_deferral_names_the_domain_and_the_code_not_the_address() -> None:
    step = LedgerKey(CAMPAIGN, "step-1", 42)
    record = processor.deferral(
        step, "docomo.ne.jp", 421, "4.7.0", "421 4.7.0 Try again later", "relay-a", AT
    )
    again = processor.deferral(step, "docomo.ne.jp", 421, "4.7.0", None, "relay-a", AT)
    assert record["deferral_id"] != again["deferral_id"]
    assert (record["campaign_id"], record["contact_id"], record["step_id"]) == (
        CAMPAIGN,
        42,
        "step-1",
    )
    assert (record["domain"], record["smtp_code"], record["enhanced_code"]) == (
        "docomo.ne.jp",
        421,
        "4.7.0",
    )
    assert record["occurred_at"] == int(AT.timestamp() * 1000)
    assert "email" not in record
    no_step = LedgerKey(CAMPAIGN, "", 42)
    assert processor.deferral(no_step, "a.jp", 451, None, None, None, AT)["step_id"] is None
    # what the topic's schema takes, as it is
    data, headers = avro.encode(Topic.DELIVERY_DEFERRALS, record)
    decoded = avro.decode(Topic.DELIVERY_DEFERRALS, data, headers)
    assert {k: v for k, v in decoded.items() if k != "occurred_at"} == {
        k: v for k, v in record.items() if k != "occurred_at"
    }
