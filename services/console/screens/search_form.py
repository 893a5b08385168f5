"""The 顧客検索 form as an F-05 filter, and the API's field paths back to form inputs.

The form is flat (query parameters, so a search is a link); :func:`build` turns it into
``{"all": [...]}`` and remembers which input each condition came from, so an error the
contacts service names ``filter.all[3].value`` is shown beside that input.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from services.console.fields import STANDARD

EXTRA_ROWS = 3
_INDEX = re.compile(r"^filter\.all\[(\d+)\]")


@dataclass
class Search:
    filter: dict[str, Any] | None
    sort: list[str]
    group_id: int | None
    inputs: list[str] = field(default_factory=list)  # condition index → form input name
    errors: dict[str, list[str]] = field(default_factory=dict)  # form input → messages

    def body(self, limit: int, cursor: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {"limit": limit, "sort": self.sort}
        if self.filter is not None:
            body["filter"] = self.filter
        if cursor:
            body["cursor"] = cursor
        if self.group_id is not None:
            body["group_id"] = self.group_id
        return body

    def input_of(self, api_field: str) -> str:
        """The form input an API error's field names ("" when none does)."""
        match = _INDEX.match(api_field)
        if match and int(match.group(1)) < len(self.inputs):
            return self.inputs[int(match.group(1))]
        if api_field.startswith("sort"):
            return "sort"
        return ""


def _tags(raw: str) -> list[str]:
    return [t.strip() for t in re.split(r"[,、，]", raw) if t.strip()]


def _int(form: Mapping[str, str], name: str, errors: dict[str, list[str]]) -> int | None:
    raw = form.get(name, "").strip()
    if not raw:
        return None
    if not re.fullmatch(r"-?\d{1,18}", raw):
        errors.setdefault(name, []).append("数字で入力してください / enter a number")
        return None
    return int(raw)


def _value(kind: str, raw: str) -> Any:
    if kind == "tags":
        return _tags(raw)
    if kind == "number" and re.fullmatch(r"-?\d{1,18}", raw.strip()):
        return int(raw.strip())
    if kind == "boolean":
        return raw.strip().lower() in ("1", "true", "yes", "はい", "あり", "on")
    return raw


def build(form: Mapping[str, str], custom_kinds: Mapping[str, str]) -> Search:
    """The filter, sort and group of a search form (its own input errors in ``errors``)."""
    conditions: list[dict[str, Any]] = []
    inputs: list[str] = []
    errors: dict[str, list[str]] = {}

    def add(node: dict[str, Any], name: str) -> None:
        conditions.append(node)
        inputs.append(name)

    q = form.get("q", "").strip()
    if q:
        add(
            {
                "any": [
                    {"field": f, "op": "contains", "value": q} for f in ("email", "name", "company")
                ]
            },
            "q",
        )
    for side in ("in", "ex"):
        tags = _tags(form.get(f"tags_{side}", ""))
        if tags:
            mode = "all" if form.get(f"tags_{side}_mode") == "all" else "any"
            op = ("include_" if side == "in" else "exclude_") + mode
            add({"field": "tags", "op": op, "value": tags}, f"tags_{side}")
    group = _int(form, "group", errors)
    state = form.get("group_state", "")
    if group is not None:
        add({"membership": {"group_id": group, "state": state or "member"}}, "group")
    if form.get("delivery_state"):
        add({"delivery_state": form["delivery_state"]}, "delivery_state")
    for name in ("delivery_status", "sales_status"):
        if form.get(name):
            add({"field": name, "op": "eq", "value": form[name]}, name)
    if form.get("star") in ("yes", "no"):
        add({"field": "star", "op": "eq", "value": form["star"] == "yes"}, "star")
    for name, op in (("score_min", "gte"), ("score_max", "lte")):
        value = _int(form, name, errors)
        if value is not None:
            add({"field": "score", "op": op, "value": value}, name)
    for name, op in (("created_from", "gte"), ("created_to", "lte")):
        if form.get(name, "").strip():
            add({"field": "created_at", "op": op, "value": form[name].strip()}, name)
    event = form.get("history_event", "")
    if event:
        spec: dict[str, Any] = {"event": event}
        days = _int(form, "history_days", errors)
        if days is not None:
            spec["within_days"] = days
        if form.get("history_negate") == "1":
            spec["negate"] = True
        add({"history": spec}, "history_event")
    for i in range(EXTRA_ROWS):
        key = form.get(f"f{i}", "")
        if not key:
            continue
        kind = (
            STANDARD[key][1]
            if key in STANDARD
            else custom_kinds.get(key.removeprefix("custom."), "text")
        )
        op = form.get(f"op{i}", "")
        node: dict[str, Any] = {"field": key, "op": op}
        if op not in ("empty", "not_empty"):
            node["value"] = _value(kind, form.get(f"v{i}", ""))
        add(node, f"v{i}")
    saved = _int(form, "saved", errors)
    if saved is not None:
        add({"saved_filter": saved}, "saved")
    sort_field = form.get("sort", "") or "id"
    sort = [("-" if form.get("dir") == "desc" else "") + sort_field]
    return Search(
        {"all": conditions} if conditions else None,
        sort,
        group,
        inputs,
        errors,
    )
