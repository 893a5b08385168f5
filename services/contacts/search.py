"""Contact search (詳細検索, F-05) and saved filters (F-06): a JSON filter language compiled
to parameterised PostgreSQL over the contact table (alias ``c``).

A filter is one node (None or ``{}``: no condition); nodes nest freely, at most 20 deep and
500 nodes in all, a saved filter's nodes included::

    {"all": [node, ...]}      every child holds (an empty list holds: TRUE)
    {"any": [node, ...]}      at least one child holds (an empty list: FALSE)
    {"not": node}
    {"field": F, "op": OP, "value": V}
    {"field": "tags", "op": "include_any" | "include_all" | "exclude_any" | "exclude_all",
     "value": ["tag", ...]}                      (tags also take empty / not_empty)
    {"membership": {"group_id": 12, "state": "deliverable" | "unsubscribed" | "banned"
                                             | "member" | "not_member"}}
    {"delivery_state": "all_deliverable" | "any_unsubscribed" | "any_banned"}
    {"history": {"event": "received" | "opened" | "clicked" | "errored",
                 "campaign_id": "c1" | "campaign_ids": ["c1", ...],   (optional)
                 "within_days": 30, "negate": false}}                  (optional)
    {"saved_filter": 7}       inlines a saved filter (global, or scoped to ``group_scope``)

``F`` is a standard field of :data:`models.FIELD_KINDS` or ``custom.<key>`` of a defined
custom field. Operators by kind:

- text: eq (exact; on email case-insensitive), ne, contains, starts_with (case-insensitive
  substring / prefix, wildcards in the value are literal), in, empty, not_empty
- number, date (``YYYY-MM-DD``), timestamp (ISO 8601; a bare date compares the calendar day in
  :data:`LOCAL_TIME_ZONE`): eq, ne, in, gt, gte, lt, lte, between ([low, high], inclusive),
  empty, not_empty
- choice (a code or its label): eq, ne, in, empty, not_empty; boolean: eq, ne, empty, not_empty

Every leaf is two-valued (never SQL NULL), so ``not`` means what it says: ``ne`` and ``not``
match contacts whose value is missing, ``empty`` is NULL, ``''`` or a missing custom key (a
custom value of the wrong JSON type counts as missing). A date-time without an offset is
Japan time. ``membership.state`` defaults to ``member``.
User values and custom keys only ever travel as parameters; column names come from
whitelists. Bad input raises :class:`InvalidMessage` whose ``field`` is a JSON path such as
``filter.all[2].op``.

:func:`compile_search` adds sorting (up to 3 keys, ``id`` appended as the tiebreaker, NULLs
last in either direction) and keyset pagination with an opaque cursor.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr

from libs.common.errors import InvalidMessage
from libs.common.mail.states import MembershipState
from services.contacts.models import CHOICES, FIELD_KINDS, MEMBERSHIP_STATES, FieldDefinition

#: Run in a search's transaction before its page and count: plan them with their values at
#: every execution. A filter's cost depends on its values (a tag on 15% of contacts or on
#: 0.1%), and after five executions of one statement PostgreSQL may keep a generic plan;
#: for search (a) that plan sorts every match for the page instead of walking the primary
#: key to the first 50 (1M contacts, 120 requests: p95 117-151 ms planned each time,
#: 253-336 ms with the cached plan).
CUSTOM_PLANS = "SET LOCAL plan_cache_mode = force_custom_plan"
MAX_LIMIT = 1000
MAX_DEPTH = 20
MAX_NODES = 500
MAX_SORT_KEYS = 3
MAX_WITHIN_DAYS = 36500
#: The zone whose calendar days a bare date on created_at / updated_at names (the seeds'
#: products are Japanese; SPEC §4 uses Asia/Tokyo as the home zone).
LOCAL_TIME_ZONE = "Asia/Tokyo"

OPS: dict[str, tuple[str, ...]] = {
    "text": ("eq", "ne", "contains", "starts_with", "in", "empty", "not_empty"),
    "number": ("eq", "ne", "in", "gt", "gte", "lt", "lte", "between", "empty", "not_empty"),
    "choice": ("eq", "ne", "in", "empty", "not_empty"),
    "boolean": ("eq", "ne", "empty", "not_empty"),
    "tags": ("include_any", "include_all", "exclude_any", "exclude_all", "empty", "not_empty"),
}
OPS["date"] = OPS["timestamp"] = OPS["number"]
_ALL_OPS = frozenset(op for ops in OPS.values() for op in ops)
_COMPARE = {"eq": "=", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
_TAG_SQL = {
    "include_any": "c.tags && {}",
    "include_all": "c.tags @> {}",
    "exclude_any": "NOT (c.tags && {})",
    "exclude_all": "NOT (c.tags @> {})",
}
#: columns that may be NULL; the rest are NOT NULL in 0001_contacts.sql.
NOT_NULL = frozenset(
    {"id", "email", "sales_status", "star", "score", "delivery_status", "created_at", "updated_at"}
)
SORT_FIELDS = (
    "id",
    "email",
    "name",
    "name_kana",
    "company",
    "score",
    "created_at",
    "updated_at",
    "acquired_at",
)
_SQL_TYPE = {
    "text": "text",
    "choice": "text",
    "number": "bigint",
    "date": "date",
    "timestamp": "timestamptz",
    "boolean": "boolean",
}
_NODE_KEYS = (
    "all",
    "any",
    "not",
    "field",
    "membership",
    "delivery_state",
    "history",
    "saved_filter",
)
MEMBERSHIP_FILTER_STATES = (*MEMBERSHIP_STATES, "member", "not_member")
#: the bits of the aggregate the membership triggers keep on the contact row
#: (0003_membership_flags.sql; a unit test holds the two together): a member somewhere, and
#: one bit per state that stops mail.
MEMBER_FLAG = 1
STATE_FLAGS = {MembershipState.UNSUBSCRIBED: 2, MembershipState.BANNED: 4}
#: across all memberships: 全てで配信可能 / いずれかで配信停止 / いずれかで配信禁止
DELIVERY_STATES = {
    "all_deliverable": f"c.membership_flags = {MEMBER_FLAG}",
    "any_unsubscribed": f"(c.membership_flags & {STATE_FLAGS[MembershipState.UNSUBSCRIBED]}) <> 0",
    "any_banned": f"(c.membership_flags & {STATE_FLAGS[MembershipState.BANNED]}) <> 0",
}
HISTORY_EVENTS = ("received", "opened", "clicked", "errored")
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_ISO_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}")


@dataclass(frozen=True)
class CompiledFilter:
    """``where`` is a boolean SQL expression over ``c``; ``params`` bind $first_param.. in order."""

    where: str
    params: list[Any]


@dataclass(frozen=True)
class SavedFilterRef:
    """A saved filter as the compiler needs it: global when ``group_id`` is None."""

    id: int
    group_id: int | None
    filter: dict[str, Any]


@dataclass(frozen=True)
class SearchPage:
    """One page query and the total-count query.

    Run ``sql_page`` with ``page_params`` and ``sql_count`` with ``count_params`` (a prefix
    of ``page_params``: the page adds the cursor values and the limit after the filter's).
    """

    sql_page: str
    sql_count: str
    page_params: list[Any]
    count_params: list[Any]


def _fail(reason: str, path: str) -> InvalidMessage:
    return InvalidMessage(reason, field=path)


def _listing(values: Any) -> str:
    return ", ".join(str(v) for v in values)


@dataclass(frozen=True)
class _Target:
    """What a field condition compares: a SQL expression and how to read values for it."""

    expr: str
    kind: str
    nullable: bool
    choices: Mapping[str, str]
    custom: bool = False
    #: a custom field's key (custom targets only): ``expr`` then holds ``{key}`` where the
    #: parameter binding it goes (see ``_Compiler.bound``)
    key: str | None = None


class _Compiler:
    def __init__(
        self,
        fields: Mapping[str, FieldDefinition],
        saved_filters: Mapping[int, SavedFilterRef],
        group_scope: int | None,
        first_param: int,
    ) -> None:
        self.fields = fields
        self.saved_filters = saved_filters
        self.group_scope = group_scope
        self.first_param = first_param
        self.params: list[Any] = []
        self.nodes = 0
        self.expanding: list[int] = []

    def bind(self, value: Any, cast: str) -> str:
        self.params.append(value)
        return f"${self.first_param + len(self.params) - 1}::{cast}"

    def node(self, node: Any, path: str, depth: int) -> str:
        if depth > MAX_DEPTH:
            raise _fail(f"filter nests deeper than {MAX_DEPTH} levels", path)
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _fail(f"filter has more than {MAX_NODES} conditions and groups", path)
        if not isinstance(node, dict):
            raise _fail(
                f"a filter node must be an object with one of: {_listing(_NODE_KEYS)}", path
            )
        kinds = [k for k in _NODE_KEYS if k in node]
        if len(kinds) != 1:
            raise _fail(
                f"a filter node needs exactly one of: {_listing(_NODE_KEYS)}; got "
                f"{_listing(node) or 'nothing'}",
                path,
            )
        kind = kinds[0]
        allowed = ("field", "op", "value") if kind == "field" else (kind,)
        extra = [k for k in node if k not in allowed]
        if extra:
            raise _fail(
                f"unknown key {extra[0]!r} in a {kind} node; allowed: {_listing(allowed)}",
                f"{path}.{extra[0]}",
            )
        if kind in ("all", "any"):
            return self.group(kind, node[kind], f"{path}.{kind}", depth)
        if kind == "not":
            return f"NOT ({self.node(node['not'], f'{path}.not', depth + 1)})"
        if kind == "field":
            return self.field(node, path)
        if kind == "saved_filter":
            return self.saved(node["saved_filter"], f"{path}.saved_filter", depth)
        return getattr(self, kind)(node[kind], f"{path}.{kind}")

    def group(self, kind: str, children: Any, path: str, depth: int) -> str:
        if not isinstance(children, list):
            raise _fail(f"{kind} takes a list of filter nodes", path)
        if not children:
            return "TRUE" if kind == "all" else "FALSE"
        parts = [self.node(child, f"{path}[{i}]", depth + 1) for i, child in enumerate(children)]
        joiner = " AND " if kind == "all" else " OR "
        return "(" + joiner.join(f"({part})" for part in parts) + ")"

    # -- field conditions ---------------------------------------------------------------

    def target(self, name: Any, path: str) -> _Target:
        if not isinstance(name, str):
            raise _fail("field must be a string naming a contact field or custom.<key>", path)
        if name.startswith("custom."):
            definition = self.fields.get(name[len("custom.") :])
            if definition is None:
                known = _listing(f"custom.{k}" for k in sorted(self.fields)) or "none defined"
                raise _fail(f"unknown custom field {name!r}; defined: {known}", path)
            expr = {
                "number": "(CASE WHEN jsonb_typeof(c.custom -> {key}) = 'number'"
                " THEN (c.custom ->> {key})::numeric END)",
                "boolean": "(CASE WHEN jsonb_typeof(c.custom -> {key}) = 'boolean'"
                " THEN (c.custom ->> {key})::boolean END)",
                # stored as ISO strings: compared as text, never cast (a bad value cannot raise)
                "date": "(CASE WHEN (c.custom ->> {key}) ~ '^\\d{{4}}-\\d{{2}}-\\d{{2}}$'"
                " THEN c.custom ->> {key} END)",
            }.get(definition.type, "(c.custom ->> {key})")
            choices = {c: c for c in definition.choices}
            return _Target(expr, definition.type, True, choices, custom=True, key=definition.key)
        kind = FIELD_KINDS.get(name)
        if kind is None:
            raise _fail(
                f"unknown field {name!r}; use one of: {_listing(FIELD_KINDS)}, or custom.<key>",
                path,
            )
        return _Target(f"c.{name}", kind, name not in NOT_NULL, CHOICES.get(name, {}))

    def field(self, node: dict[str, Any], path: str) -> str:
        target = self.target(node["field"], f"{path}.field")
        op = node.get("op")
        allowed = OPS[target.kind]
        if op not in allowed:
            known = isinstance(op, str) and op in _ALL_OPS
            what = "op not valid for this field:" if known else "unknown op"
            raise _fail(
                f"{what} {op!r} on {target.kind} field {node['field']!r}; allowed: "
                f"{_listing(allowed)}",
                f"{path}.op",
            )
        if op in ("empty", "not_empty"):
            if "value" in node:
                raise _fail(f"{op} takes no value", f"{path}.value")
            return self.emptiness(self.bound(target), op == "empty")
        if "value" not in node:
            raise _fail(f"{op} needs a value", f"{path}.value")
        value, vpath = node["value"], f"{path}.value"
        if target.kind == "tags":
            tags = _tag_list(value, vpath)
            return _TAG_SQL[op].format(self.bind(tags, "text[]"))
        if target.kind == "timestamp":
            target, convert = _timestamp_mode(target, value, op, vpath)
        else:
            convert = _converter(target)
        return self.compare(target, op, value, vpath, convert)

    def bound(self, target: _Target) -> _Target:
        """``target`` with a custom field's key bound as a parameter in its expression."""
        if target.key is None:
            return target
        expr = target.expr.format(key=self.bind(target.key, "text"))
        return _Target(expr, target.kind, target.nullable, target.choices, custom=target.custom)

    def emptiness(self, target: _Target, empty: bool) -> str:
        if target.kind == "tags":
            return "cardinality(c.tags) = 0" if empty else "cardinality(c.tags) > 0"
        e = target.expr
        if target.kind in ("text", "choice"):
            return f"({e} IS NULL OR {e} = '')" if empty else f"({e} IS NOT NULL AND {e} <> '')"
        return f"{e} IS NULL" if empty else f"{e} IS NOT NULL"

    def compare(
        self, target: _Target, op: str, value: Any, path: str, convert: Callable[[Any, str], Any]
    ) -> str:
        values = _operands(op, value, path, convert)
        if target.custom and op == "eq":
            # Containment of one bound document, so the GIN index on custom answers it and
            # the recheck of each candidate row compares with a constant (built per row,
            # jsonb_build_object cost ~15% of search (a)'s count). jsonb numbers compare by
            # value (3 matches 3.0); a value of another JSON type never matches.
            document = {target.key: _json_scalar(values[0])}
            return f"c.custom @> {self.bind(document, 'jsonb')}"
        target = self.bound(target)
        e = target.expr
        if e == "c.email" and op in ("eq", "ne", "in"):  # addresses match case-insensitively
            e, values = "lower(c.email)", [v.lower() for v in values]
        values, sql_type = _param_type(target, values)
        if op == "ne":
            return f"{e} IS DISTINCT FROM {self.bind(values[0], sql_type)}"
        if op == "in":
            condition = f"{e} = ANY({self.bind(values, sql_type + '[]')})"
        elif op == "between":
            low, high = self.bind(values[0], sql_type), self.bind(values[1], sql_type)
            condition = f"{e} BETWEEN {low} AND {high}"
        elif op in ("contains", "starts_with"):
            text = _like_escape(values[0])
            pattern = f"%{text}%" if op == "contains" else f"{text}%"
            condition = f"{e} ILIKE {self.bind(pattern, 'text')}"
        else:
            condition = f"{e} {_COMPARE[op]} {self.bind(values[0], sql_type)}"
        # keep every leaf two-valued so that NOT and ne treat a missing value as "not equal"
        if not target.nullable:
            return condition
        return f"({condition}) IS TRUE" if target.custom else f"({e} IS NOT NULL AND {condition})"

    # -- membership, delivery state, history, saved filters ---------------------------

    def membership(self, spec: Any, path: str) -> str:
        spec = _object(spec, ("group_id", "state"), path)
        group_id = _positive_int(spec.get("group_id"), f"{path}.group_id", "group_id")
        state = spec.get("state", "member")
        if state not in MEMBERSHIP_FILTER_STATES:
            raise _fail(
                f"unknown membership state {state!r}; allowed: "
                f"{_listing(MEMBERSHIP_FILTER_STATES)}",
                f"{path}.state",
            )
        sql = "SELECT 1 FROM membership m WHERE m.contact_id = c.id AND m.group_id = "
        sql += self.bind(group_id, "bigint")
        if state in MEMBERSHIP_STATES:
            sql += f" AND m.state = {self.bind(state, 'text')}"
        return f"NOT EXISTS ({sql})" if state == "not_member" else f"EXISTS ({sql})"

    def delivery_state(self, state: Any, path: str) -> str:
        if not isinstance(state, str) or state not in DELIVERY_STATES:
            raise _fail(
                f"unknown delivery_state {state!r}; allowed: {_listing(DELIVERY_STATES)}", path
            )
        return f"({DELIVERY_STATES[state]})"

    def history(self, spec: Any, path: str) -> str:
        keys = ("event", "campaign_id", "campaign_ids", "within_days", "negate")
        spec = _object(spec, keys, path)
        event = spec.get("event")
        if event not in HISTORY_EVENTS:
            raise _fail(
                f"unknown history event {event!r}; allowed: {_listing(HISTORY_EVENTS)}",
                f"{path}.event",
            )
        sql = (
            "SELECT 1 FROM delivery_history h WHERE h.contact_id = c.id AND h.kind = "
            + self.bind(event, "text")
        )
        if "campaign_id" in spec and "campaign_ids" in spec:
            raise _fail("give campaign_id or campaign_ids, not both", f"{path}.campaign_ids")
        if "campaign_id" in spec:
            campaign = _text(spec["campaign_id"], f"{path}.campaign_id")
            sql += f" AND h.campaign_id = {self.bind(campaign, 'text')}"
        if "campaign_ids" in spec:
            campaigns = _tag_list(spec["campaign_ids"], f"{path}.campaign_ids", "campaign id")
            sql += f" AND h.campaign_id = ANY({self.bind(campaigns, 'text[]')})"
        if "within_days" in spec:
            days = _positive_int(spec["within_days"], f"{path}.within_days", "within_days")
            if days > MAX_WITHIN_DAYS:
                raise _fail(f"within_days must be at most {MAX_WITHIN_DAYS}", f"{path}.within_days")
            sql += f" AND h.last_at >= now() - make_interval(days => {self.bind(days, 'int')})"
        negate = spec.get("negate", False)
        if not isinstance(negate, bool):
            raise _fail("negate must be true or false", f"{path}.negate")
        return f"NOT EXISTS ({sql})" if negate else f"EXISTS ({sql})"

    def saved(self, ref: Any, path: str, depth: int) -> str:
        filter_id = _positive_int(ref, path, "saved_filter")
        saved = self.saved_filters.get(filter_id)
        if saved is None:
            raise _fail(f"unknown saved filter {filter_id}", path)
        if saved.group_id is not None and saved.group_id != self.group_scope:
            raise _fail(
                f"saved filter {filter_id} is scoped to group {saved.group_id} and can "
                f"only be used within group {saved.group_id} (its searches, targets and "
                "exports); elsewhere use a global saved filter",
                path,
            )
        if filter_id in self.expanding:
            chain = " → ".join(str(i) for i in [*self.expanding, filter_id])
            raise _fail(f"saved filters refer to each other in a cycle: {chain}", path)
        self.expanding.append(filter_id)
        try:
            return self.node(saved.filter, f"{path}[{filter_id}]", depth + 1)
        finally:
            self.expanding.pop()


# -- value conversion -------------------------------------------------------------------


def _object(spec: Any, keys: tuple[str, ...], path: str) -> dict[str, Any]:
    if not isinstance(spec, dict):
        raise _fail(f"expected an object with keys: {_listing(keys)}", path)
    for key in spec:
        if key not in keys:
            raise _fail(f"unknown key {key!r}; allowed: {_listing(keys)}", f"{path}.{key}")
    return spec


def _positive_int(value: Any, path: str, what: str) -> int:
    if type(value) is not int or not 1 <= value < 2**63:
        raise _fail(f"{what} must be a positive integer, got {value!r}", path)
    return value


def _text(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise _fail(f"expected a string, got {value!r}", path)
    if "\x00" in value:
        raise _fail("a string may not contain NUL characters", path)
    return value


def _tag_list(value: Any, path: str, what: str = "tag") -> list[str]:
    if not isinstance(value, list) or not value:
        raise _fail(f"expected a non-empty list of {what}s", path)
    return [_text(item, f"{path}[{i}]") for i, item in enumerate(value)]


def _number(value: Any, path: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(f"expected a number, got {value!r}", path)
    if isinstance(value, float) and not math.isfinite(value):
        raise _fail("expected a finite number", path)
    return Decimal(value) if isinstance(value, int) else Decimal(repr(value))


def _boolean(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(f"expected true or false, got {value!r}", path)
    return value


def _date(value: Any, path: str) -> dt.date:
    if isinstance(value, str) and _ISO_DATE.match(value):
        try:
            return dt.date.fromisoformat(value)
        except ValueError:
            pass
    raise _fail(f"expected a date YYYY-MM-DD, got {value!r}", path)


def _datetime(value: Any, path: str) -> dt.datetime:
    if isinstance(value, str) and _ISO_DATETIME.match(value):
        try:
            moment = dt.datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            moment = moment if moment.tzinfo else moment.replace(tzinfo=ZoneInfo(LOCAL_TIME_ZONE))
            if not _in_range(moment):
                raise _fail(f"{value!r} is out of range: years 1900 to 9999", path)
            return moment
    raise _fail(f"expected an ISO 8601 date-time or a date YYYY-MM-DD, got {value!r}", path)


_EARLIEST = dt.datetime(1900, 1, 1, tzinfo=dt.UTC)
_LATEST = dt.datetime(9999, 12, 30, tzinfo=dt.UTC)


def _in_range(moment: dt.datetime) -> bool:
    """Whether an aware instant is one PostgreSQL and Python both hold once in UTC (an
    offset near year 1 or 9999 would overflow on the way)."""
    try:
        return _EARLIEST <= moment.astimezone(dt.UTC) <= _LATEST
    except OverflowError:
        return False


def _converter(target: _Target) -> Callable[[Any, str], Any]:
    if target.kind == "choice":

        def choice(value: Any, path: str) -> str:
            for code, label in target.choices.items():
                if value in (code, label):
                    return code
            raise _fail(f"{value!r} is not one of: {_listing(target.choices)}", path)

        return choice
    if target.kind == "date" and target.custom:
        return lambda value, path: _date(value, path).isoformat()
    return {"text": _text, "number": _number, "boolean": _boolean, "date": _date}[target.kind]


def _timestamp_mode(
    target: _Target, value: Any, op: str, path: str
) -> tuple[_Target, Callable[[Any, str], Any]]:
    """Bare dates compare the local calendar day; anything else compares the instant."""
    values = value if isinstance(value, list) and op in ("in", "between") else [value]
    if values and all(isinstance(v, str) and _ISO_DATE.match(v) for v in values):
        day = f"({target.expr} AT TIME ZONE '{LOCAL_TIME_ZONE}')::date"
        return _Target(day, "date", target.nullable, {}), _date
    return target, _datetime


def _operands(op: str, value: Any, path: str, convert: Callable[[Any, str], Any]) -> list[Any]:
    if op == "in" and (not isinstance(value, list) or not value):
        raise _fail("in takes a non-empty list of values", path)
    if op == "between" and (not isinstance(value, list) or len(value) != 2):
        raise _fail("between takes a list [low, high]", path)
    if op not in ("in", "between"):
        return [convert(value, path)]
    values = [convert(item, f"{path}[{i}]") for i, item in enumerate(value)]
    if op == "between" and values[0] > values[1]:
        raise _fail("between needs low <= high", path)
    return values


def _json_scalar(value: Any) -> Any:
    """A converted operand as the JSON value a custom field holds (the jsonb codec's input)."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def _param_type(target: _Target, values: list[Any]) -> tuple[list[Any], str]:
    """The parameter type: integer columns compare with bigint when they can (index use)."""
    if target.custom and target.kind == "date":
        return values, "text"  # custom dates are stored as ISO strings
    if target.kind != "number":
        return values, _SQL_TYPE[target.kind]
    if not target.custom and all(v == int(v) and abs(v) < 2**63 for v in values):
        return [int(v) for v in values], "bigint"
    return values, "numeric"


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


# -- public API -------------------------------------------------------------------------


def compile_filter(
    filter: dict[str, Any] | None,
    fields: Mapping[str, FieldDefinition],
    *,
    saved_filters: Mapping[int, SavedFilterRef] | None = None,
    group_scope: int | None = None,
    first_param: int = 1,
) -> CompiledFilter:
    """Compile a filter node to a WHERE expression over ``contact c`` and its parameters.

    ``fields`` are the custom field definitions by key; ``saved_filters`` must hold every
    filter named by ``{"saved_filter": id}`` (see :func:`referenced_saved_filters`);
    ``group_scope`` is the group a search runs in (allows that group's scoped filters);
    parameters are numbered from ``first_param`` so a caller can put its own first.
    """
    if filter is None or filter == {}:
        return CompiledFilter("TRUE", [])
    compiler = _Compiler(fields, saved_filters or {}, group_scope, first_param)
    where = compiler.node(filter, "filter", 1)
    return CompiledFilter(where, compiler.params)


def referenced_saved_filters(filter: Any) -> set[int]:
    """Ids named by ``{"saved_filter": id}`` anywhere in ``filter``.

    Saved filters may refer to others: load these, then call again on their bodies until no
    new id appears.
    """
    found: set[int] = set()
    stack = [filter]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            ref = item.get("saved_filter")
            if type(ref) is int and 1 <= ref < 2**63:  # others fail in the compiler
                found.add(ref)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def compile_search(
    filter: dict[str, Any] | None,
    fields: Mapping[str, FieldDefinition],
    *,
    sort: list[Any] | str | None,
    limit: int,
    cursor: str | None,
    saved_filters: Mapping[int, SavedFilterRef] | None = None,
    group_scope: int | None = None,
) -> tuple[SearchPage, Callable[[Mapping[str, Any]], str]]:
    """The page and count queries, and a function making the next cursor from a page's last row.

    The page holds at most ``limit`` rows; when it holds fewer there is no next page.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise InvalidMessage(f"limit must be an integer from 1 to {MAX_LIMIT}", field="limit")
    keys = _sort_keys(sort)
    compiled = compile_filter(filter, fields, saved_filters=saved_filters, group_scope=group_scope)
    fingerprint = hashlib.sha256(
        json.dumps([filter, keys], sort_keys=True, default=str).encode()
    ).hexdigest()[:16]
    params = list(compiled.params)
    where = compiled.where
    if cursor is not None:
        values = _decode_cursor(cursor, keys, fingerprint)
        where = f"({where}) AND ({_after(keys, values, params)})"
    params.append(limit)
    order = ", ".join(_order_terms(keys))
    page = SearchPage(
        sql_page=f"SELECT c.* FROM contact c WHERE {where} ORDER BY {order} LIMIT ${len(params)}",
        sql_count=f"SELECT count(*) FROM contact c WHERE {compiled.where}",
        page_params=params,
        count_params=list(compiled.params),
    )

    def next_cursor(row: Mapping[str, Any]) -> str:
        values = [_cursor_value(row[name]) for name, _ in keys]
        body = json.dumps({"f": fingerprint, "v": values}, separators=(",", ":"))
        return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")

    return page, next_cursor


# -- sorting and keyset pagination ------------------------------------------------------


def _sort_keys(sort: list[Any] | str | None) -> list[tuple[str, str]]:
    items = [] if sort is None else [sort] if isinstance(sort, str) else sort
    if not isinstance(items, list) or len(items) > MAX_SORT_KEYS:
        raise InvalidMessage(
            f"sort is a field name or a list of up to {MAX_SORT_KEYS} keys", field="sort"
        )
    keys: list[tuple[str, str]] = []
    name: Any
    for i, item in enumerate(items):
        path = f"sort[{i}]" if isinstance(sort, list) else "sort"
        if isinstance(item, str):
            name, direction = (item[1:], "desc") if item.startswith("-") else (item, "asc")
        elif isinstance(item, dict) and set(item) <= {"field", "direction"}:
            name, direction = item.get("field"), item.get("direction", "asc")
        else:
            raise InvalidMessage(
                'a sort key is "field", "-field" or {"field": F, "direction": "asc"|"desc"}',
                field=path,
            )
        if name not in SORT_FIELDS:
            raise InvalidMessage(
                f"cannot sort by {name!r}; sortable: {_listing(SORT_FIELDS)}", field=path
            )
        if direction not in ("asc", "desc"):
            raise InvalidMessage("direction must be asc or desc", field=path)
        if any(name == known for known, _ in keys):
            raise InvalidMessage(f"{name!r} appears twice in sort", field=path)
        keys.append((name, direction))
    if not any(name == "id" for name, _ in keys):
        keys.append(("id", "asc"))
    return keys


def _order_terms(keys: list[tuple[str, str]]) -> list[str]:
    terms = []
    for name, direction in keys:
        if name not in NOT_NULL:
            terms.append(f"(c.{name} IS NULL)")  # NULLs last in either direction
        terms.append(f"c.{name} {direction.upper()}")
    return terms


def _after(keys: list[tuple[str, str]], values: list[Any], params: list[Any]) -> str:
    """Rows strictly after the cursor in the ORDER BY of ``_order_terms``, as an OR-chain."""
    steps: list[tuple[str | None, str]] = []  # (strictly after on this term, equal on it)
    for (name, direction), value in zip(keys, values, strict=True):
        column = f"c.{name}"
        if name not in NOT_NULL:
            if value is None:
                steps.append((None, f"{column} IS NULL"))
                continue
            steps.append((f"{column} IS NULL", f"{column} IS NOT NULL"))
        params.append(value)
        param = f"${len(params)}::{_SQL_TYPE[FIELD_KINDS[name]]}"
        steps.append(
            (f"{column} {'>' if direction == 'asc' else '<'} {param}", f"{column} = {param}")
        )
    disjuncts = []
    for i, (after, _) in enumerate(steps):
        if after is not None:
            disjuncts.append(" AND ".join([*(eq for _, eq in steps[:i]), after]))
    return " OR ".join(f"({d})" for d in disjuncts) if disjuncts else "FALSE"


def _cursor_value(value: Any) -> Any:
    return value.isoformat() if isinstance(value, (dt.date, dt.datetime)) else value


class _CursorBody(BaseModel):
    """What a cursor decodes to: the filter's fingerprint and the last row's sort values."""

    model_config = ConfigDict(extra="forbid")
    f: StrictStr
    v: list[StrictStr | StrictInt | StrictFloat | StrictBool | None]


def _decode_cursor(cursor: str, keys: list[tuple[str, str]], fingerprint: str) -> list[Any]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        # the shape first (a flat list of scalars): nested JSON never reaches json.loads
        _CursorBody.model_validate_json(raw)
        body = json.loads(raw)
    except (binascii.Error, ValueError, TypeError) as exc:  # ValidationError is a ValueError
        raise InvalidMessage("malformed cursor", field="cursor") from exc
    if body.get("f") != fingerprint or len(body["v"]) != len(keys):
        raise InvalidMessage(
            "cursor belongs to a different filter or sort; start again without a cursor",
            field="cursor",
        )
    return [_cursor_field(name, value) for (name, _), value in zip(keys, body["v"], strict=True)]


def _cursor_field(name: str, value: Any) -> Any:
    kind = FIELD_KINDS[name]
    if value is None and name not in NOT_NULL:
        return None
    if kind == "number" and type(value) is int and abs(value) < 2**63:
        return value
    if kind == "text" and isinstance(value, str) and "\x00" not in value:
        return value
    parse = {"date": dt.date.fromisoformat, "timestamp": dt.datetime.fromisoformat}.get(kind)
    try:
        parsed = parse(value) if parse and isinstance(value, str) else None
    except ValueError:
        parsed = None
    if parsed is None or (
        isinstance(parsed, dt.datetime) and (parsed.tzinfo is None or not _in_range(parsed))
    ):
        raise InvalidMessage(f"malformed cursor value for {name}", field="cursor")
    return parsed
