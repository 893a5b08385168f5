"""When step-mail steps are due (services/scheduler/steps.py), re-send filters and the
3-month rule (resend.py), plan validation and edits (plans.py): pure, no broker."""

from __future__ import annotations

import datetime as dt
import itertools
import uuid
from zoneinfo import ZoneInfo

import pytest

from libs.common.errors import InvalidMessage
from services.scheduler import plans, resend, steps

TOKYO = ZoneInfo("Asia/Tokyo")
NEW_YORK = ZoneInfo("America/New_York")
LONG_AGO = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)


def timing(day: int, hhmm: str, since: dt.datetime = LONG_AGO) -> steps.StepTiming:
    hour, minute = map(int, hhmm.split(":"))
    return steps.StepTiming(day, dt.time(hour, minute), since)


def tokyo(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, tzinfo=TOKYO)


def test_day_offset_counts_local_calendar_days_from_the_enrolment_date() -> None:
    # 23:30 in Tokyo is 14:30 UTC: the local date, not the UTC one, is day 0.
    enrolled = tokyo(2026, 3, 1, 23, 30)
    assert steps.due_at(timing(1, "10:00"), enrolled, TOKYO) == tokyo(2026, 3, 2, 10, 0)
    assert steps.due_at(timing(3, "18:00"), enrolled, TOKYO) == tokyo(2026, 3, 4, 18, 0)


def test_a_day_zero_step_whose_time_has_passed_goes_out_at_enrolment() -> None:
    enrolled = tokyo(2026, 3, 1, 11, 0)
    assert steps.due_at(timing(0, "10:00"), enrolled, TOKYO) == enrolled
    assert steps.due_at(timing(0, "12:00"), enrolled, TOKYO) == tokyo(2026, 3, 1, 12, 0)


def test_a_step_is_never_due_for_a_moment_before_its_timing_was_set() -> None:
    added = tokyo(2026, 3, 10, 9, 0)
    old = tokyo(2026, 3, 1, 8, 0)  # day 3 at 18:00 = 4 March: before the step existed
    assert steps.due_at(timing(3, "18:00", added), old, TOKYO) is None
    recent = tokyo(2026, 3, 8, 8, 0)  # 11 March: after
    assert steps.due_at(timing(3, "18:00", added), recent, TOKYO) == tokyo(2026, 3, 11, 18, 0)
    # enrolled after the step was added: a late day-0 step still goes out at enrolment
    late = tokyo(2026, 3, 10, 11, 0)
    assert steps.due_at(timing(0, "10:00", added), late, TOKYO) == late


def test_dst_keeps_the_local_send_time() -> None:
    enrolled = dt.datetime(2026, 3, 7, 9, 0, tzinfo=NEW_YORK)  # the day before DST starts
    due = steps.due_at(timing(2, "10:00"), enrolled, NEW_YORK)
    assert due is not None
    assert due.astimezone(NEW_YORK).hour == 10
    assert due.astimezone(dt.UTC).hour == 14  # EDT (UTC-4), where day 0 was EST (UTC-5)


@pytest.mark.parametrize("zone", [TOKYO, NEW_YORK, ZoneInfo("UTC")])
def test_due_range_selects_exactly_the_enrolments_that_are_due(zone: ZoneInfo) -> None:
    """The range the release loop queries agrees with the rule, enrolment by enrolment."""
    base = dt.datetime(2026, 3, 6, 0, 0, tzinfo=zone)
    enrolments = [base + dt.timedelta(hours=h, minutes=17) for h in range(0, 24 * 5, 5)]
    nows = [base + dt.timedelta(hours=h, minutes=m) for h in range(0, 24 * 7, 7) for m in (0, 30)]
    sinces = [LONG_AGO, base + dt.timedelta(days=1, hours=12)]
    for (day, hhmm), since, now in itertools.product(
        [(0, "10:00"), (1, "10:00"), (3, "18:00"), (0, "00:00")], sinces, nows
    ):
        step = timing(day, hhmm, since)
        window = steps.due_range(step, now, zone)
        for enrolled in enrolments:
            in_range = window.since <= enrolled < window.before and enrolled <= now
            assert in_range == steps.is_due(step, enrolled, now, zone), (day, hhmm, now, enrolled)


def test_step_keys_name_plan_and_enrolment() -> None:
    key = plans.step_key(12, 345)
    assert key == "plan:12:enrolment:345"
    assert plans.parse_step_key(key) == (12, 345)
    for other in (None, "", "test:abc:0", "plan:x:enrolment:1", "plan:1:2"):
        assert plans.parse_step_key(other) is None


STEP = {"day_offset": 0, "send_time": "10:00", "subject": "<#name>様", "body": "ようこそ"}


def plan_body(**changes: object) -> dict[str, object]:
    body: dict[str, object] = {
        "category_id": 1,
        "from_address": "news@shop.example.jp",
        "steps": [STEP, {**STEP, "day_offset": 1}],
    }
    body.update(changes)
    return body


def test_plan_validation_reuses_campaign_content_rules() -> None:
    values, wanted = plans.validate_plan(plan_body(), custom_field_keys=[])
    assert values["from_address"] == "news@shop.example.jp"
    assert [s.day_offset for s in wanted] == [0, 1]
    bad = [
        (plan_body(from_address="nope"), "from_address"),
        (plan_body(steps=[]), "steps"),
        (plan_body(steps=[{**STEP, "body": "<#unknown>"}]), "steps[0].body"),
        (plan_body(steps=[{**STEP, "send_time": "25:00"}]), "steps[0].send_time"),
        (plan_body(steps=[{**STEP, "day_offset": -1}]), "steps[0].day_offset"),
        (plan_body(steps=[{**STEP, "subject": ""}]), "steps[0].subject"),
    ]
    for body, field in bad:
        with pytest.raises(InvalidMessage) as caught:
            plans.validate_plan(body, custom_field_keys=[])
        assert caught.value.field == field


def test_plan_edit_keeps_ids_retimes_only_moved_steps_and_removes_left_out_ones() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    current = {
        a: {"day_offset": 0, "send_time": "10:00"},
        b: {"day_offset": 1, "send_time": "10:00"},
    }
    wanted = [
        plans.Step(a, 0, "10:00", "new subject", "text", "body"),
        plans.Step(None, 2, "09:00", "s", "text", "b"),
    ]
    changes, removed = plans.plan_edit(current, wanted)
    assert removed == [b]
    assert [(c.id == a, c.new, c.retimed) for c in changes] == [
        (True, False, False),
        (False, True, True),
    ]
    with pytest.raises(InvalidMessage):
        plans.plan_edit(current, [plans.Step(uuid.uuid4(), 0, "10:00", "s", "text", "b")])


def test_membership_changes_keep_the_newest_per_group_and_contact() -> None:
    at = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
    base = {"kind": "membership", "group_id": 1, "contact_id": 2, "changed_at": at}
    values = [
        {**base, "state": "unsubscribed", "version": 9},
        {**base, "state": "deliverable", "version": 3},
        {**base, "kind": "address", "group_id": None, "state": "bounced", "version": 10},
    ]
    [change] = plans.membership_changes(values)
    assert (change.state, change.version, change.enrols) == ("unsubscribed", 9, False)


def test_recipient_filters_are_history_conditions() -> None:
    assert resend.recipients_filter("X", "not_opened") == {
        "all": [
            {"history": {"event": "received", "campaign_id": "X"}},
            {"history": {"event": "opened", "campaign_id": "X", "negate": True}},
        ]
    }
    assert resend.recipients_filter("X", "clicked") == {
        "history": {"event": "clicked", "campaign_id": "X"}
    }
    with pytest.raises(InvalidMessage):
        resend.recipients_filter("X", "bounced")


def test_resend_copies_content_and_takes_a_new_target() -> None:
    source = {name: f"v-{name}" for name in resend.COPIED}
    source.update(id="X", name="11月のお知らせ")
    body = resend.resend_body(
        source,
        {"scheduled_at": "t", "recipients": "not_clicked", "target": {"filter": {"star": 1}}},
    )
    assert {k: body[k] for k in resend.COPIED} == {k: source[k] for k in resend.COPIED}
    assert body["name"] == "11月のお知らせ (再配信)"
    assert body["target"]["filter"]["all"][0] == {"star": 1}
    with pytest.raises(InvalidMessage):
        resend.resend_body(source, {"scheduled_at": "t"})


def test_history_targets_are_limited_to_three_months() -> None:
    now = dt.datetime(2026, 5, 31, 12, 0, tzinfo=dt.UTC)
    assert resend.months_before(now, 3) == dt.datetime(2026, 2, 28, 12, 0, tzinfo=dt.UTC)
    opened = {"history": {"event": "opened", "campaign_id": "a"}}
    node = {"all": [opened, {"not": {"history": {"event": "received", "campaign_ids": ["b"]}}}]}
    assert set(resend.history_campaigns(node)) == {"a", "b"}
    recent = (dt.datetime(2026, 3, 1, tzinfo=dt.UTC), False)
    old = (dt.datetime(2026, 2, 27, tzinfo=dt.UTC), False)
    resend.check_history({"a"}, {"a": recent}, now, 3)
    refusals: list[tuple[dict[str, tuple[dt.datetime | None, bool]], str]] = [
        ({"a": old}, "last 3 months"),
        ({}, "does not exist"),
        ({"a": (None, False)}, "has not been sent"),
    ]
    for known, words in refusals:
        with pytest.raises(InvalidMessage) as caught:
            resend.check_history({"a"}, known, now, 3)
        assert words in caught.value.reason
