"""The contacts HTTP API's contracts: request and answer models (SPEC §10, issue 17).

The models take the shape checks (known keys, types, lengths, list sizes, nesting); the
domain rules stay where they were (:mod:`services.contacts.processor` for contact values,
:mod:`services.contacts.search` for filters, :mod:`services.contacts.stream` for bulk
reads), so their messages and field paths are what clients already read.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    Field,
    StrictBool,
    StrictInt,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    create_model,
)

from libs.common.checks import CONTROL
from libs.common.http import keyset
from libs.common.http.contract import (
    DIGITS,
    INT64_MAX,
    JSON_DEPTH,
    Answer,
    Id,
    Int64,
    JsonObject,
    Model,
    Name,
    Text,
    TimeZoneName,
    Token,
)
from libs.common.mail.mergetags import TEXT_FIELDS
from services.contacts.models import CUSTOM_TYPES, JAPANESE_ALIASES, MEMBERSHIP_STATES
from services.contacts.search import MAX_LIMIT, MAX_SORT_KEYS

#: and/or/not levels a filter may nest (each all/any level is two JSON levels).
FILTER_LEVELS = 16
MAX_BULK_IDS = 100_000
MAX_MEMBER_IDS = 100_000
MAX_STREAM_IDS = 1_000_000
MAX_STREAM_COLUMNS = 200
MAX_CHOICES = 200
MAX_CURSOR = 4096
#: the Japanese label of each contact field (the import headings' first alias).
LABELS: dict[str, str] = {}
for _alias, _name in JAPANESE_ALIASES.items():
    LABELS.setdefault(_name, _alias)

#: a database id inside a JSON body: a JSON integer, never a string or a boolean.
BodyId = Annotated[StrictInt, Field(ge=1, le=INT64_MAX, examples=[1])]


def _id_list(value: Any) -> Any:
    """A list of ids refused as a whole (the field is named, not each item)."""
    if not isinstance(value, list) or not all(
        type(item) is int and 1 <= item <= INT64_MAX for item in value
    ):
        raise ValueError("must be a list of integer ids")
    return value


def _ids(max_items: int, min_items: int = 0) -> Any:
    schema: dict[str, Any] = {
        "type": "array",
        "items": {"type": "integer", "minimum": 1, "maximum": INT64_MAX},
        "maxItems": max_items,
    }
    if min_items:
        schema["minItems"] = min_items
    return Annotated[
        list[Any],
        Field(min_length=min_items, max_length=max_items),
        AfterValidator(_id_list),
        WithJsonSchema(schema),
    ]


def _filter_levels(node: Any) -> Any:
    """At most ``FILTER_LEVELS`` levels of all/any/not, counted without recursion."""
    stack = [(node, 0)]
    while stack:
        item, levels = stack.pop()
        if levels > FILTER_LEVELS:
            raise ValueError(f"nests deeper than {FILTER_LEVELS} levels of all/any/not")
        if isinstance(item, dict):
            for key, child in item.items():
                deeper = levels + 1 if key in ("all", "any", "not") else levels
                if isinstance(child, list):
                    stack.extend((grandchild, deeper) for grandchild in child)
                else:
                    stack.append((child, deeper))
        elif isinstance(item, list):
            stack.extend((child, levels) for child in item)
    return node


#: a search filter (F-05): one node; its language is checked by services.contacts.search.
Filter = Annotated[
    JsonObject,
    AfterValidator(_filter_levels),
    Field(
        description=(
            "a filter node: {all: [node]}, {any: [node]}, {not: node}, "
            "{field, op, value}, {membership: {group_id, state}}, {delivery_state}, "
            f"{{history: {{event, ...}}}}, {{saved_filter: id}}; at most {FILTER_LEVELS} "
            f"levels of all/any/not and {JSON_DEPTH} levels of JSON"
        ),
        examples=[{"all": [{"field": "tags", "op": "include_any", "value": ["vip"]}]}],
    ),
]


def _scalar(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise ValueError("must be a string, a number, true/false or null")


#: a value the processor reads and converts (text, number, flag): never an array or object.
Scalar = Annotated[
    Any,
    AfterValidator(_scalar),
    WithJsonSchema({"type": ["string", "number", "boolean", "null"]}),
]


def _custom_values(value: Any) -> Any:
    if not isinstance(value, dict):
        raise ValueError("custom fields must be an object")
    for key, item in value.items():
        if len(key) > 63:
            raise ValueError(f"{key[:20]!r}… is not a custom field key")
        _scalar(item)
    return value


#: custom values by key (keys are defined at runtime through /v1/fields).
CustomValues = Annotated[
    dict[str, Any],
    AfterValidator(_custom_values),
    WithJsonSchema(
        {
            "type": "object",
            "additionalProperties": {"type": ["string", "number", "boolean", "null"]},
            "propertyNames": {"maxLength": 63},
            "description": "custom field values by key (see GET /v1/fields)",
        }
    ),
]


def _text_value(value: Any) -> Any:
    if value is None or (isinstance(value, (str, int, float)) and not isinstance(value, bool)):
        return value
    raise ValueError("must be text (a string or a number) or null")


#: a text field's value: a string or a number (kept as its text), null leaves it.
TextValue = Annotated[
    Any,
    AfterValidator(_text_value),
    WithJsonSchema({"type": ["string", "number", "null"]}),
]


def _tags(value: Any) -> Any:
    if isinstance(value, str) and len(value) <= 10_000:
        return value
    if (
        isinstance(value, list)
        and len(value) <= 1000
        and all(isinstance(tag, str) and len(tag) <= 100 for tag in value)
    ):
        return value
    raise ValueError("must be a list of tags (at most 100 characters each) or one string")


#: tags: a list of strings or one comma-separated string.
Tags = Annotated[
    Any,
    AfterValidator(_tags),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "maxLength": 10_000},
                {
                    "type": "array",
                    "items": {"type": "string", "maxLength": 100},
                    "maxItems": 1000,
                },
            ]
        }
    ),
]


def _contact_fields() -> dict[str, Any]:
    fields: dict[str, Any] = {
        "email": (
            Annotated[str, StringConstraints(max_length=320)] | None,
            Field(None, title=LABELS["email"], examples=["hanako@example.jp"]),
        ),
    }
    for name in ("external_id", *TEXT_FIELDS):
        fields[name] = (TextValue, Field(None, title=LABELS.get(name)))
    fields.update(
        acquired_at=(
            Annotated[str, StringConstraints(max_length=40)] | None,
            Field(None, title=LABELS["acquired_at"], examples=["2024-04-01"]),
        ),
        sales_status=(
            Annotated[str, StringConstraints(max_length=40)] | None,
            Field(None, title=LABELS["sales_status"], examples=["open", "返信済"]),
        ),
        engagement=(
            Annotated[str, StringConstraints(max_length=40)] | None,
            Field(None, title=LABELS["engagement"], examples=["hot"]),
        ),
        star=(Scalar, Field(None, title=LABELS["star"], examples=[True])),
        tags=(Tags, Field(None, title=LABELS["tags"], examples=[["vip"]])),
        custom_fields=(CustomValues | None, Field(None, title="カスタム項目")),
    )
    return fields


#: a contact body (F-01): absent or null leaves a field, "" clears it; custom_fields merge.
ContactBody: type[Model] = create_model(
    "ContactBody", __base__=Model, __doc__="A contact's fields (F-01).", **_contact_fields()
)


class Membership(Answer):
    group_id: int
    kind: str = Field(examples=["group"])
    name: str
    state: str = Field(examples=["deliverable"])
    method: str
    joined_at: dt.datetime
    changed_at: dt.datetime


class Contact(Answer):
    """A contact as the API shows it."""

    id: int
    email: str
    external_id: str | None = None
    name: str | None = None
    acquired_at: dt.date | None = None
    sales_status: str = Field(examples=["open"])
    engagement: str | None = None
    star: bool
    tags: list[str]
    score: int
    delivery_status: str = Field(examples=["unconfirmed"])
    version: int
    custom_fields: dict[str, Any]
    created_at: dt.datetime
    updated_at: dt.datetime
    memberships: list[Membership] | None = Field(None, description="GET of one contact only")


class ContactPath(Model):
    id: Id = Field(title="顧客ID", examples=[1])


# Search and bulk actions ------------------------------------------------------------------


_SORT_KEY = {
    "type": "object",
    "properties": {
        "field": {"type": "string", "maxLength": 64},
        "direction": {"type": "string", "enum": ["asc", "desc"]},
    },
    "required": ["field"],
    "additionalProperties": False,
}


def _sort(value: Any) -> Any:
    if value is None:
        return value
    items = value if isinstance(value, list) else [value]
    if len(items) > MAX_SORT_KEYS:
        raise ValueError(f"takes at most {MAX_SORT_KEYS} keys")
    for item in items:
        if isinstance(item, str) and len(item) <= 64:
            continue
        if (
            isinstance(item, dict)
            and set(item) <= {"field", "direction"}
            and isinstance(item.get("field"), str)
            and len(item["field"]) <= 64
            and item.get("direction", "asc") in ("asc", "desc")
        ):
            continue
        raise ValueError('a sort key is "field", "-field" or {"field": F, "direction": D}')
    return value


#: a field name ("-name" descending), or a list of up to three keys.
Sort = Annotated[
    Any,
    AfterValidator(_sort),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "maxLength": 64},
                {
                    "type": "array",
                    "items": {
                        "anyOf": [
                            {"type": "string", "maxLength": 64},
                            _SORT_KEY,
                        ]
                    },
                    "maxItems": MAX_SORT_KEYS,
                },
                {"type": "null"},
            ]
        }
    ),
]


class SearchBody(Model):
    """F-05: a filter, a sort, a page size and the cursor of the page before."""

    filter: Filter | None = None
    sort: Sort = Field(None, examples=[["-created_at"]])
    limit: Annotated[StrictInt, Field(ge=1, le=MAX_LIMIT)] = 50
    cursor: (
        Annotated[str, StringConstraints(max_length=MAX_CURSOR, pattern=r"^[A-Za-z0-9_=-]*$")]
        | None
    ) = Field(None, description="next_cursor of the page before")
    group_id: BodyId | None = Field(None, description="the group a search runs in")


class SearchPage(Answer):
    items: list[Contact]
    next_cursor: str | None
    total: int


class BulkBody(Model):
    """F-07: an action on ids or on a filter's matches."""

    action: Literal["add_tag", "remove_tag", "star", "unstar", "delete", "set_state"] = Field(
        title="一括操作", examples=["add_tag"]
    )
    ids: _ids(MAX_BULK_IDS) | None = None  # type: ignore[valid-type]
    filter: Filter | None = None
    tag: Annotated[str, StringConstraints(max_length=100)] | None = Field(None, title="タグ")
    group_id: BodyId | None = Field(None, description="the group the filter runs in")
    state: Literal["deliverable", "unsubscribed", "banned"] | None = Field(
        None,
        title="配信状態",
        description="set_state: the state the memberships move to (配信可能 / 配信停止 / 配信禁止)",
        examples=["unsubscribed"],
    )
    target_group_id: BodyId | None = Field(
        None,
        title="対象グループ",
        description="set_state: the group or step plan whose memberships change",
    )


class BulkResult(Answer):
    action: str
    selected: int
    affected: int


# Custom fields -----------------------------------------------------------------------------


class NewField(Model):
    key: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,62}$")] = Field(
        title="キー", examples=["plan"]
    )
    label: Name = Field(title="ラベル", examples=["プラン"])
    type: Literal[CUSTOM_TYPES] = Field(title="型", examples=["choice"])  # type: ignore[valid-type]
    choices: list[Name] | None = Field(
        None, max_length=MAX_CHOICES, title="選択肢", examples=[["free", "premium"]]
    )


class FieldDefinition(Answer):
    key: str
    label: str
    type: str
    choices: list[str]


class FieldList(Answer):
    items: list[FieldDefinition]


# Groups and plans --------------------------------------------------------------------------


class NewGroup(Model):
    name: Name = Field(title="グループ名", examples=["メルマガ会員"])
    description: Text | None = Field(None, title="説明")


class Group(Answer):
    id: int
    kind: str = Field(examples=["group"])
    name: str
    description: str | None
    created_at: dt.datetime
    members: int | None = Field(None, description="members counted (lists and reads)")


class GroupList(Answer):
    items: list[Group]


class GroupListQuery(Model):
    members: bool = Field(
        True,
        description="count each one's members; false: members null and no count over the "
        "memberships (a form's choice of groups: the count of a million members costs "
        "hundreds of milliseconds)",
    )


class GroupPath(Model):
    id: Id = Field(title="グループID", examples=[1])


class MemberPath(Model):
    id: Id = Field(title="グループID", examples=[1])
    contact_id: Id = Field(title="顧客ID", examples=[1])


class NewMembers(Model):
    contact_ids: list[BodyId] = Field(
        min_length=1, max_length=MAX_MEMBER_IDS, title="顧客ID", examples=[[1, 2]]
    )
    auto_stop: bool = Field(False, description="a plan's steps stop when the contact acts")


class Joined(Answer):
    group_id: int
    joined: int
    already_members: int


# Saved filters -----------------------------------------------------------------------------


class NewFilter(Model):
    name: Name = Field(title="絞込名", examples=["VIP"])
    filter: Filter
    group_id: BodyId | None = Field(None, title="グループID")


class SavedFilter(Answer):
    id: int
    name: str
    group_id: int | None
    filter: dict[str, Any]
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None


class SavedFilterList(Answer):
    items: list[SavedFilter]


class EmailCollision(Answer):
    """A contact whose address differs from another's only by case (migration 0007)."""

    email_key: str = Field(description="the address lower-cased: what the colliding rows share")
    contact_id: int
    email: str = Field(description="this contact's address as typed")
    found_at: dt.datetime


class EmailCollisionList(Answer):
    items: list[EmailCollision] = Field(description="at most 1000, by email_key")
    total: int = Field(description="how many contacts collide")


class FilterQuery(Model):
    group_id: Id | None = Field(None, description="also list the filters of this group")


class FilterPath(Model):
    id: Id = Field(title="絞込ID", examples=[1])


# Bulk read (stream) ------------------------------------------------------------------------


MembershipStateName = Literal["deliverable", "unsubscribed", "banned"]
if set(get_args(MembershipStateName)) != set(MEMBERSHIP_STATES):  # one vocabulary
    raise RuntimeError(f"membership states drifted: {sorted(MEMBERSHIP_STATES)}")


class StreamBody(Model):
    """POST /v1/contacts/stream: a selection and its columns (services/contacts/stream.py)."""

    filter: Filter | None = None
    saved_filter_id: BodyId | None = None
    ids: _ids(MAX_STREAM_IDS) | None = None  # type: ignore[valid-type]
    group_id: BodyId | None = None
    membership_states: list[MembershipStateName] | None = Field(
        None, max_length=len(MEMBERSHIP_STATES), examples=[["unsubscribed"]]
    )
    columns: list[Annotated[str, StringConstraints(max_length=100)]] = Field(
        min_length=1, max_length=MAX_STREAM_COLUMNS, examples=[["id", "email"]]
    )
    time_zone: TimeZoneName | None = None
    safe_csv: StrictBool = False
    dry_run: StrictBool = False


class StreamEstimate(Answer):
    estimated_total: int


# Imports -----------------------------------------------------------------------------------

_MAPPING = TypeAdapter(dict[Annotated[str, StringConstraints(max_length=1000)], str])


def _mapping(raw: str | None) -> str | None:
    """The mapping option is JSON text: an object column → field, parsed safely here."""
    if not raw:
        return raw
    try:
        _MAPPING.validate_json(raw)
    except ValidationError:
        raise ValueError('must be a JSON object: column → field ("" ignores a column)') from None
    return raw


def _one_line(value: str) -> str:
    if CONTROL.search(value):
        raise ValueError("must not contain control characters")
    return value


ImportMode = Literal["insert_or_update", "update_only", "insert_only"]
ImportKey = Literal["email", "external_id"]
#: a filename as given (stored with the job; no control characters).
FileName = Annotated[str, StringConstraints(max_length=255), AfterValidator(_one_line)]


class ImportOptions(Model):
    """F-04 import options: multipart form fields beside ``file``, or query parameters of a
    text/csv body."""

    mode: ImportMode | None = Field(None, title="登録モード")
    key: ImportKey | None = Field(None, title="更新キー")
    encoding: Annotated[str, StringConstraints(max_length=40)] | None = Field(
        None, title="文字コード", examples=["auto", "cp932"]
    )
    mapping: (
        Annotated[str, StringConstraints(max_length=1_000_000), AfterValidator(_mapping)] | None
    ) = Field(None, title="項目の対応", examples=['{"氏名": "name", "備考": ""}'])
    filename: FileName | None = Field(None, title="ファイル名")


class ImportQueryOptions(ImportOptions):
    """The options as query parameters (a text/csv body): a request line holds 8 kB, so a
    long mapping goes in a multipart form instead."""

    mapping: Annotated[str, StringConstraints(max_length=1000), AfterValidator(_mapping)] | None = (
        Field(None, title="項目の対応", examples=['{"氏名": "name", "備考": ""}'])
    )
    filename: Annotated[FileName, StringConstraints(max_length=200)] | None = Field(
        None, title="ファイル名", examples=["contacts.csv"]
    )


IMPORT_FORM: dict[str, Any] = {
    "type": "object",
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "the CSV file"},
        "mode": {"type": "string", "enum": list(ImportMode.__args__)},  # type: ignore[attr-defined]
        "key": {"type": "string", "enum": list(ImportKey.__args__)},  # type: ignore[attr-defined]
        "encoding": {"type": "string", "maxLength": 40},
        "mapping": {"type": "string", "description": "JSON object: column → field"},
        "filename": {"type": "string", "maxLength": 255, "description": "instead of the file's"},
    },
    "required": ["file"],
    "additionalProperties": False,
}


class ImportPath(Model):
    id: Token = Field(title="ジョブID", examples=["8f14e45f-ceea-467a-9af0-5f8a2b1c3d4e"])


class ImportQuery(Model):
    limit: Int64 = Field(50, description="at most this many jobs (clamped to 1..500)")
    status: Literal["queued", "running", "done", "failed"] | None = None


class ImportRowError(Answer):
    line: int
    field: str | None
    message: str


class ImportJob(Answer):
    id: str
    status: str = Field(examples=["queued"])
    mode: str
    key: str
    encoding: str
    filename: str | None
    requested_by: str | None
    mapping: dict[str, Any]
    next_line: int
    total: int
    inserted: int
    updated: int
    skipped: int
    failed: int
    processed: int
    detail: str | None
    created_at: dt.datetime
    updated_at: dt.datetime


class ImportJobWithErrors(ImportJob):
    errors: list[ImportRowError]


class ImportJobList(Answer):
    items: list[ImportJob]


# Delivery history of one contact (issue 20) ------------------------------------------------


class ActivityQuery(Model):
    limit: Annotated[int, Field(ge=1, le=200), DIGITS] = Field(50, title="件数")
    cursor: keyset.Cursor | None = None


class CampaignActivity(Answer):
    campaign_id: str
    at: dt.datetime = Field(description="the first thing recorded of this campaign (the sort)")
    received_at: dt.datetime | None = Field(title="受信日時")
    errored_at: dt.datetime | None = Field(title="エラー日時")
    opened_at: dt.datetime | None = Field(title="開封日時", description="the first open")
    opens: int = Field(ge=0, title="開封数", description="pixel loads (a click alone: 0)")
    clicked_at: dt.datetime | None = Field(title="クリック日時", description="the first click")
    clicks: int = Field(ge=0, title="クリック数")
    last_at: dt.datetime


class ActivityTotals(Answer):
    received: int = Field(ge=0, description="campaigns received")
    errored: int = Field(ge=0)
    opened: int = Field(ge=0)
    clicked: int = Field(ge=0)


class ContactActivity(Answer):
    contact_id: int
    items: list[CampaignActivity] = Field(description="one per campaign, newest first")
    next_cursor: str | None
    totals: ActivityTotals
