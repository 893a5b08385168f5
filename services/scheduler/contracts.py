"""The scheduler's HTTP contracts (SPEC §10): what each route takes and answers, as models.

The models check shapes and limits (types, lengths, ranges, depth, NUL and control
characters, unknown keys); the domain rules — merge tags, the 3-minute lead, one-line
subjects, known categories, address syntax — stay in :mod:`services.scheduler.processor`
and :mod:`services.scheduler.plans`, which keep their messages. Request bodies are strict:
``"5"`` is not an id and ``"true"`` is not a switch, as before.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
)

from libs.common.http.contract import (
    INT64_MAX,
    Answer,
    Content,
    Id,
    Int64,
    JsonObject,
    Model,
    Name,
    Text,
    TimeZoneName,
    Token,
)
from services.scheduler import guard, plans, processor, resend
from services.scheduler.status import STATUSES

# Value types -------------------------------------------------------------------------------

#: a local time of day, "HH:MM" (00:00-23:59).
HHMM = Annotated[
    str,
    StringConstraints(pattern=r"^([01][0-9]|2[0-3]):([0-5][0-9])$"),
    Field(examples=["08:00"], description='a local time of day, "HH:MM" (00:00-23:59)'),
]
#: an address as sent; its syntax is checked by the processor (which names the field).
Address = Annotated[Text, StringConstraints(max_length=320), Field(examples=["news@example.jp"])]
#: a one-line header value; multi-line text is let through for the processor to refuse
#: with its own message ("must be one line").
HeaderText = Annotated[Text, StringConstraints(max_length=1000)]
#: a URL template (coupon): merge tags allowed.
UrlTemplate = Annotated[Text, StringConstraints(max_length=2000)]
#: a mail format, checked by the processor ("format must be text or html").
Format = Annotated[
    str,
    StringConstraints(max_length=16),
    Field(examples=["text"], json_schema_extra={"enum": list(processor.FORMATS)}),
]
Dedupe = Annotated[
    str,
    StringConstraints(max_length=16),
    Field(examples=["none"], json_schema_extra={"enum": list(processor.DEDUPE)}),
]
Engagement = Literal[
    "all", "opened", "not_opened", "clicked", "not_clicked", "errored", "not_errored"
]
assert set(Engagement.__args__) == set(resend.ENGAGEMENTS)  # type: ignore[attr-defined]
Status = Annotated[str, Field(json_schema_extra={"enum": list(STATUSES)})]

_EARLIEST = dt.datetime(1900, 1, 1, tzinfo=dt.UTC)
_LATEST = dt.datetime(9999, 12, 30, tzinfo=dt.UTC)


def _moment(value: str) -> str:
    """An ISO 8601 instant in range, left as text for the processor (which requires the
    offset and the lead time, with its own messages)."""
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"is not an ISO 8601 timestamp: {value[:64]!r}") from None
    if moment.tzinfo is None:
        raise ValueError("needs a UTC offset, e.g. +09:00 (an ISO 8601 timestamp with offset)")
    try:
        utc = moment.astimezone(dt.UTC)
    except OverflowError:
        utc = None
    if utc is None or not _EARLIEST <= utc <= _LATEST:
        raise ValueError("must be between 1900-01-01 and 9999-12-30")
    return value


#: an ISO 8601 timestamp with its offset.
Moment = Annotated[
    str,
    StringConstraints(max_length=64),
    AfterValidator(_moment),
    Field(
        examples=["2099-12-01T10:00:00+09:00"],
        json_schema_extra={"format": "date-time"},
    ),
]


_ID_SCHEMA = {"type": "integer", "minimum": 1, "maximum": INT64_MAX}
_INT64_SCHEMA = {"type": "integer", "minimum": -INT64_MAX - 1, "maximum": INT64_MAX}
_DIGITS = r"^[1-9][0-9]{0,18}$"


def _blank_is_none(value: Any) -> Any:
    return None if value == "" else value


def _digits_are_a_number(value: Any) -> Any:
    """A form's contact id: "" is none, "12" is 12 (anything else is left to fail)."""
    if value == "":
        return None
    if isinstance(value, str) and re.fullmatch(_DIGITS, value):
        return int(value)
    return value


# (Not unions: a union's failure would name its member in the pointer, /contact_id/...)
#: an optional id in a query: empty is the same as absent.
QueryId = Annotated[
    Id | None,
    BeforeValidator(_blank_is_none),
    WithJsonSchema({"anyOf": [_ID_SCHEMA, {"type": "string", "const": ""}, {"type": "null"}]}),
]
#: an optional cursor in a query: empty is the same as absent.
QueryCursor = Annotated[
    Int64 | None,
    BeforeValidator(_blank_is_none),
    WithJsonSchema({"anyOf": [_INT64_SCHEMA, {"type": "string", "const": ""}, {"type": "null"}]}),
]
#: an optional id in a JSON body, also as digits ("12") or empty, as a form sends it.
FormId = Annotated[
    Id | None,
    BeforeValidator(_digits_are_a_number),
    WithJsonSchema(
        {
            "anyOf": [
                _ID_SCHEMA,
                {"type": "string", "pattern": _DIGITS},
                {"type": "string", "const": ""},
                {"type": "null"},
            ]
        }
    ),
]

_ADDRESS_TEXT: TypeAdapter[str] = TypeAdapter(Annotated[Text, StringConstraints(max_length=20_000)])
_ADDRESS_LIST: TypeAdapter[list[str]] = TypeAdapter(
    Annotated[list[Address], Field(max_length=processor.TEST_SEND_MAX)]
)


def _addresses(value: Any) -> str | list[str]:
    adapter: TypeAdapter[Any] = _ADDRESS_TEXT if isinstance(value, str) else _ADDRESS_LIST
    try:
        return adapter.validate_python(value, strict=True)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = "".join(f"[{p}]" for p in first["loc"])
        raise ValueError(
            f"must be comma-separated addresses or a list of them{where}: {first['msg']}"
        ) from None


#: F-23's addresses: one text ("a@x, b@y") or a list of up to 20.
TestAddresses = Annotated[
    Any,
    PlainValidator(_addresses),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "maxLength": 20_000},
                {
                    "type": "array",
                    "items": {"type": "string", "maxLength": 320},
                    "maxItems": processor.TEST_SEND_MAX,
                },
            ],
            "examples": ["qa@example.jp, boss@example.jp"],
        }
    ),
]


class Body(Model):
    """A JSON request body: unknown keys refused, no coercion between JSON types."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)


class NoQuery(Model):
    """A route that reads no query parameter: any one given is refused (400 naming it)."""


# Categories ------------------------------------------------------------------------------


class CategoryPath(Model):
    id: Id = Field(description="the category's id", examples=[1])


class CategoryBody(Body):
    """A category: its name and sending window (配信可能時間帯). A window whose start is
    after its end crosses midnight; start == end is the whole day."""

    name: Name = Field(title="カテゴリ名", examples=["メルマガ"])
    window_start: HHMM = Field(title="配信開始時刻", examples=["08:00"])
    window_end: HHMM = Field(title="配信終了時刻", examples=["21:00"])
    time_zone: TimeZoneName = Field(title="タイムゾーン", examples=["Asia/Tokyo"])


class Category(Answer):
    id: int
    name: str
    window_start: str = Field(examples=["08:00"])
    window_end: str = Field(examples=["21:00"])
    time_zone: str = Field(examples=["Asia/Tokyo"])
    created_at: dt.datetime
    updated_at: dt.datetime


class Categories(Answer):
    items: list[Category]


# Campaigns -------------------------------------------------------------------------------


class TargetBody(Body):
    """Who receives it: a group, an F-05 filter and/or a saved filter (at least one)."""

    group_id: Id | None = Field(None, title="グループ")
    filter: JsonObject | None = Field(
        None, title="絞り込み条件", examples=[{"field": "name", "op": "not_empty"}]
    )
    saved_filter_id: Id | None = Field(None, title="保存済み条件")


class SenderFields(Body):
    """From, reply-to, coupon template and tracking switches (F-20, F-21, F-34)."""

    from_address: Address = Field(title="差出人アドレス")
    from_name: HeaderText | None = Field(None, title="差出人名", examples=["ショップ便り"])
    reply_to: Address | None = Field(None, title="返信先アドレス")
    coupon_url: UrlTemplate | None = Field(
        None, title="クーポンURL", examples=["https://shop.example.jp/c/<#contact_id>"]
    )
    track_opens: bool = Field(True, title="開封計測")
    track_clicks: bool = Field(True, title="クリック計測")


class CampaignBody(SenderFields):
    """A draft campaign (F-20..F-22)."""

    name: Name = Field(title="メール名", examples=["11月のお知らせ"])
    category_id: Id = Field(title="カテゴリ", examples=[1])
    target: TargetBody = Field(title="配信対象")
    subject: HeaderText = Field(title="件名", examples=["<#氏名>様へ 11月のお知らせ"])
    format: Format = Field("text", title="形式")
    body: Content = Field(title="本文", examples=["<#name>様\n配信停止: <#unsubscribe_url>\n"])
    dedupe: Dedupe = Field("none", title="重複排除")
    include_unsubscribed: bool = Field(False, title="配信停止者を含める")
    scheduled_at: Moment | None = Field(
        title="配信日時", description="ISO 8601 with its offset, at least 3 minutes from now"
    )


class ResendBody(Body):
    """A re-send (F-28): a target chosen anew and/or the source's recipients by
    engagement; what it may change besides."""

    target: TargetBody | None = Field(None, title="配信対象")
    recipients: Engagement | None = Field(None, title="再配信の対象")
    name: Name | None = Field(None, title="メール名")
    subject: HeaderText | None = Field(None, title="件名")
    dedupe: Dedupe | None = Field(None, title="重複排除")
    include_unsubscribed: bool | None = Field(None, title="配信停止者を含める")
    scheduled_at: Moment | None = Field(None, title="配信日時")


class TestSendBody(Body):
    """F-23: up to 20 addresses (comma-separated text or a list) and, optionally, the
    contact whose values fill the merge tags."""

    addresses: TestAddresses = Field(title="送信先")
    contact_id: FormId = Field(None, title="顧客")


class CampaignPath(Model):
    # Any text is taken (one that is not a UUID names no campaign: 404, as before).
    id: Token = Field(
        description="the campaign's id (a UUID)",
        examples=["0b7c6f8e-3f5d-4c43-9a57-3c9d1f0a2b11"],
        json_schema_extra={"format": "uuid"},
    )


class CampaignsQuery(Model):
    limit: int = Field(50, ge=1, le=200, description="page size")
    cursor: QueryCursor = Field(None, description="next_cursor of the previous page")
    status: Status | None = Field(None, description="only campaigns in this status")


class PreviewQuery(Model):
    contact_id: QueryId = Field(
        None, description="the recipient to render for (default: the first of the list)"
    )


class CampaignTarget(Answer):
    group_id: int | None
    filter: dict[str, Any] | None
    saved_filter_id: int | None


class StatusChange(Answer):
    status: str
    reason: str | None
    at: dt.datetime


#: a receiving domain as named in a resume (lower case or not: it is compared lower-cased).
Domain = Annotated[
    str,
    StringConstraints(min_length=1, max_length=guard.MAX_DOMAIN, pattern=r"^[^@\s\x00-\x1f]+$"),
    Field(examples=["docomo.ne.jp"]),
]


class GuardResumeBody(Body):
    """再開 / 配信中止 (complaint guard): the held receiving domains to send to again, or to
    give up; without ``domains`` (or with no body at all), every held one."""

    domains: list[Domain] | None = Field(
        None,
        title="再開するドメイン",
        min_length=1,
        max_length=guard.MAX_RESUME_DOMAINS,
        examples=[["docomo.ne.jp"]],
    )


class Guard(Answer):
    """The complaint guard of a campaign (issue 21): the receiving domains whose remaining
    sends are held until an operator resumes them, and why."""

    held: list[str] = Field(examples=[["docomo.ne.jp"]])
    resumed: list[str] = Field(examples=[[]])
    dropped: list[str] = Field(
        examples=[[]], description="domains an operator gave up (their held rows: suppressed)"
    )
    reason: str = Field(examples=["complaint_rate 0.0052 > 0.0030 (13/2500 delivered)"])
    delivered: int
    complaints: int
    decided_at: dt.datetime
    resumed_by: str | None = Field(description="who last resumed or dropped held domains")
    resumed_at: dt.datetime | None = Field(description="when they did")
    held_recipients: int | None = Field(
        None, description="recipients without a result to held domains (one campaign only)"
    )


class Campaign(Answer):
    id: str
    name: str
    category_id: int
    target: CampaignTarget
    from_address: str
    from_name: str
    reply_to: str | None
    subject: str
    format: str
    body: str
    coupon_url: str | None
    dedupe: str
    include_unsubscribed: bool
    scheduled_at: dt.datetime
    status: str = Field(examples=["draft"])
    status_label: str = Field(examples=["下書き"])
    status_reason: str | None
    paused: bool
    planned: int
    success: int
    error: int
    suppressed: int
    unsent: int
    pending: int
    released: int
    re_released: int
    sender_held: int = Field(
        description="送信待ち (ドメインの速度制限): recipients whose mail a sender holds until"
        " its receiving domain admits it, by the newest checkpoint answer; the campaign stays"
        " sending until they have results (0 once it sends no more)"
    )
    opens: int
    clicks: int
    unique_opens: int
    unique_clicks: int
    track_opens: bool
    track_clicks: bool
    resent_from: str | None
    created_by: str | None
    created_at: dt.datetime
    reserved_at: dt.datetime | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    history: list[StatusChange] | None = Field(None, description="only for one campaign")
    guard: Guard | None = Field(
        None,
        description="the complaint guard: null when it never tripped for the campaign"
        " (only in GET answers and the guard's resume)",
    )


class Campaigns(Answer):
    items: list[Campaign]
    next_cursor: str | None


class TestSend(Answer):
    test_id: str
    addresses: list[str]
    contact_id: int
    requests: int


class Preview(Answer):
    contact_id: int
    to: str
    from_: str = Field(alias="from")
    from_name: str
    reply_to: str | None
    subject: str
    text: str
    html: str | None
    mime: str


# Step-mail plans -------------------------------------------------------------------------


class PlanPath(Model):
    id: Id = Field(description="the plan's id (as contacts has it)", examples=[1])


class StepBody(Body):
    """One step; ``id`` (as GET returns it) edits that step, none makes a new one."""

    id: Annotated[Text, StringConstraints(max_length=64)] | None = Field(None, title="ステップ")
    day_offset: int = Field(ge=0, le=plans.MAX_DAY_OFFSET, title="日数", examples=[0])
    send_time: HHMM = Field(title="送信時刻", examples=["09:00"])
    subject: HeaderText = Field(title="件名")
    format: Format = Field("text", title="形式")
    body: Content = Field(title="本文")


class PlanBody(SenderFields):
    """A plan's schedule: its category (window and time zone), sender and steps."""

    category_id: Id = Field(title="カテゴリ", examples=[1])
    steps: list[StepBody] = Field(max_length=plans.MAX_STEPS, title="ステップ")


class EnrolmentsQuery(Model):
    contact_id: QueryId = Field(None, description="only this contact's")
    cursor: QueryCursor = Field(None, description="next_cursor of the previous page")
    limit: int = Field(100, ge=1, le=1000, description="page size")


class Step(Answer):
    id: str
    position: int
    day_offset: int
    send_time: str
    subject: str
    format: str
    body: str
    timed_since: dt.datetime
    released: int
    success: int
    error: int
    suppressed: int
    skipped: int
    opens: int
    clicks: int
    unique_opens: int
    unique_clicks: int


class EnrolmentCounts(Answer):
    active: int
    ended: int


class Plan(Answer):
    id: int
    name: str
    category_id: int
    from_address: str
    from_name: str
    reply_to: str | None
    coupon_url: str | None
    track_opens: bool
    track_clicks: bool
    created_at: dt.datetime
    updated_at: dt.datetime
    steps: list[Step]
    enrolments: EnrolmentCounts | None = Field(None, description="only for one plan")


class Plans(Answer):
    items: list[Plan]


class Enrolment(Answer):
    id: int
    contact_id: int
    enrolled_at: dt.datetime
    ended_at: dt.datetime | None
    ended_reason: str | None
    steps_done: int


class Enrolments(Answer):
    items: list[Enrolment]
    next_cursor: str | None
