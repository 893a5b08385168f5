"""The exporter's decisions, with no I/O: what a request means, which columns to ask a
source for and how a source row becomes an export row, what a job's events and mails say,
and which jobs.events record wins.

Column keys (F-40) of a request:

- a contact field: ``email``, ``name``, ``company``, ``score``, ``tags``, ``created_at``…
  (``contact_id`` is the same as ``id``);
- ``custom_fields.<key>``: a custom field;
- ``unsubscribed_at:<group_id>``: 配信停止日時(配信停止方法) of that group, e.g.
  ``2026-11-20 10:15 (フォーム)`` in ``EXPORT_TIME_ZONE``; empty unless the membership is
  unsubscribed (配信停止). The method is in Japanese, as the seed products show it
  (フォーム, システム, 自動停止, 自動同期, 外部連携); ``unsubscribed_at:<group_id>:code``
  gives an integration the machine code instead (``form``, ``system``, ``auto_stop``,
  ``auto_sync``, ``upstream``).

Campaign exports (the frozen recipient list) hold what the list froze: ``id``, ``email``,
``group_id``, ``membership_state`` and the merge values (contact fields and custom fields).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from libs.common.errors import InvalidMessage
from libs.common.jobs import job_event
from libs.common.mail import addresses
from libs.common.mail.states import ChangeMethod, MembershipState
from services.exporter.csvfile import ALIASES, ENCODINGS

SOURCES = ("filter", "saved_filter", "contact_ids", "group", "campaign")
MEMBERSHIP_STATES = MembershipState.values()
MAX_COLUMNS = 200
MAX_CONTACT_IDS = 100_000
CUSTOM_PREFIX = "custom_fields."
UNSUBSCRIBED_PREFIX = "unsubscribed_at:"
#: an unsubscribed_at column with the method's machine code instead of its Japanese label.
CODE_SUFFIX = ":code"
_KEY = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_REQUEST_KEYS = frozenset(
    {
        "source",
        "filter",
        "saved_filter_id",
        "contact_ids",
        "group_id",
        "membership_states",
        "campaign_id",
        "columns",
        "header",
        "encoding",
        "safe_csv",
        "notify_email",
    }
)
#: the keys of a request that choose its rows, by source: a key of another source is not
#: used by the request, and the API refuses it rather than ignore it (issue 18). A group
#: export narrows its members with a filter and/or a saved filter (global, or that group's
#: own 絞込条件): 配信リスト → 絞込条件 → CSV出力.
SOURCE_KEYS = {
    "filter": ("filter",),
    "saved_filter": ("saved_filter_id",),
    "contact_ids": ("contact_ids",),
    "group": ("group_id", "membership_states", "filter", "saved_filter_id"),
    "campaign": ("campaign_id",),
}
SOURCE_KEYS_ALL = frozenset(k for keys in SOURCE_KEYS.values() for k in keys)
#: columns of the scheduler's recipients.csv that are not merge values.
CAMPAIGN_BASE = {
    "id": "contact_id",
    "contact_id": "contact_id",
    "email": "email",
    "group_id": "group_id",
    "membership_state": "membership_state",
}

Row = Sequence[str]
Shape = Callable[[Row], Row]


def _fail(reason: str, field: str) -> InvalidMessage:
    return InvalidMessage(reason, field=field)


def _int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _fail(f"{field} must be a positive integer", field)
    return value


def _column(item: Any, at: str) -> dict[str, Any]:
    if isinstance(item, str):
        item = {"key": item}
    if not isinstance(item, dict) or set(item) - {"key", "label"}:
        raise _fail("a column is a key or {key, label}", at)
    key, label = item.get("key"), item.get("label")
    if not isinstance(key, str) or not key:
        raise _fail("a column needs a key", at)
    if key.startswith(CUSTOM_PREFIX) and not _KEY.match(key[len(CUSTOM_PREFIX) :]):
        raise _fail(f"bad custom field key in {key!r}", at)
    if key.startswith(UNSUBSCRIBED_PREFIX):
        group = key[len(UNSUBSCRIBED_PREFIX) :].removesuffix(CODE_SUFFIX)
        if not group.isascii() or not group.isdigit() or int(group) <= 0:
            raise _fail(f"{key!r}: unsubscribed_at:<group_id> or unsubscribed_at:<id>:code", at)
    if label is not None and not isinstance(label, str):
        raise _fail("a column label is text", at)
    return {"key": key, "label": label}


def unused_keys(source: str, keys: Iterable[str]) -> list[str]:
    """The keys of a request that choose rows for another source than ``source``: a group
    export has no use for ``filter``, a filter export none for ``group_id``."""
    return sorted((set(keys) & SOURCE_KEYS_ALL) - set(SOURCE_KEYS.get(source, ())))


def parse_request(
    body: Mapping[str, Any], *, requested_by: str, notify_email: str, now: dt.datetime
) -> dict[str, Any]:
    """A POST /v1/exports body → the ExportRequest record (export.requests.avsc)."""
    unknown = sorted(set(body) - _REQUEST_KEYS)
    if unknown:
        raise _fail(f"unknown keys {unknown}", unknown[0])
    source = body.get("source")
    if source not in SOURCES:
        raise _fail(f"source must be one of {', '.join(SOURCES)}", "source")
    request: dict[str, Any] = {
        "job_id": str(uuid.uuid4()),
        "source": source,
        "filter_json": None,
        "saved_filter_id": None,
        "contact_ids": [],
        "group_id": None,
        "membership_states": [],
        "campaign_id": None,
    }
    if source == "filter":
        if not isinstance(body.get("filter"), dict):
            raise _fail("filter must be an F-05 filter object", "filter")
        request["filter_json"] = json.dumps(body["filter"], ensure_ascii=False)
    elif source == "saved_filter":
        request["saved_filter_id"] = _int(body.get("saved_filter_id"), "saved_filter_id")
    elif source == "contact_ids":
        ids = body.get("contact_ids")
        if (
            not isinstance(ids, list)
            or not 0 < len(ids) <= MAX_CONTACT_IDS
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
        ):
            raise _fail(f"contact_ids: 1 to {MAX_CONTACT_IDS} integers", "contact_ids")
        request["contact_ids"] = ids
    elif source == "group":
        request["group_id"] = _int(body.get("group_id"), "group_id")
        states = body.get("membership_states") or []
        if not isinstance(states, list) or any(s not in MEMBERSHIP_STATES for s in states):
            raise _fail(
                f"membership_states: a list of {', '.join(MEMBERSHIP_STATES)}",
                "membership_states",
            )
        request["membership_states"] = list(dict.fromkeys(states))
        # 絞込条件 within the group: only the members that match (both, when both given)
        if body.get("filter") is not None:
            if not isinstance(body["filter"], dict):
                raise _fail("filter must be an F-05 filter object", "filter")
            if body["filter"]:  # {} narrows nothing
                request["filter_json"] = json.dumps(body["filter"], ensure_ascii=False)
        if body.get("saved_filter_id") is not None:
            request["saved_filter_id"] = _int(body["saved_filter_id"], "saved_filter_id")
    else:
        try:
            request["campaign_id"] = str(uuid.UUID(str(body.get("campaign_id"))))
        except ValueError:
            raise _fail("campaign_id must be a campaign's id", "campaign_id") from None
    columns = body.get("columns")
    if not isinstance(columns, list) or not 0 < len(columns) <= MAX_COLUMNS:
        raise _fail(f"columns: a list of 1 to {MAX_COLUMNS} columns", "columns")
    request["columns"] = [_column(c, f"columns[{i}]") for i, c in enumerate(columns)]
    if source == "campaign":
        campaign_plan_check(request["columns"])
    encoding = body.get("encoding", "utf-8")
    encoding = ALIASES.get(encoding, encoding) if isinstance(encoding, str) else encoding
    if encoding not in ENCODINGS:
        raise _fail(f"encoding must be one of {', '.join(ENCODINGS)}", "encoding")
    for flag in ("header", "safe_csv"):
        if not isinstance(body.get(flag, True), bool):
            raise _fail(f"{flag} must be true or false", flag)
    # The operator's configured address is taken as configured (operator@localhost in
    # development); any other must be an address. A record read back carries either.
    email = body.get("notify_email") or notify_email
    if email != notify_email:
        email = addresses.normalise(email, "notify_email")
    request.update(
        header=body.get("header", True),
        encoding=encoding,
        safe_csv=body.get("safe_csv", True),
        requested_by=requested_by,
        notify_email=email,
        requested_at=now,
    )
    return request


def labels(columns: Iterable[Mapping[str, Any]]) -> list[str]:
    """The header line: each column's label, or its key."""
    return [c["label"] or c["key"] for c in columns]


# -- contacts source ---------------------------------------------------------------------


@dataclass(frozen=True)
class ContactsPlan:
    """What to ask POST /v1/contacts/stream for, and how its rows become export rows."""

    stream_columns: list[str]
    shape: Shape | None  # None: the stream's rows are the export rows as they are


def contacts_plan(columns: Sequence[Mapping[str, Any]]) -> ContactsPlan:
    wanted: list[str] = []
    index: dict[str, int] = {}

    def ask(name: str) -> int:
        if name not in index:
            index[name] = len(wanted)
            wanted.append(name)
        return index[name]

    parts: list[int | tuple[int, int, int, bool]] = []
    for column in columns:
        key = column["key"]
        if key.startswith(UNSUBSCRIBED_PREFIX):
            group = key[len(UNSUBSCRIBED_PREFIX) :].removesuffix(CODE_SUFFIX)
            parts.append(
                (
                    ask(f"membership.{group}.state"),
                    ask(f"membership.{group}.changed_at"),
                    ask(f"membership.{group}.method"),
                    key.endswith(CODE_SUFFIX),
                )
            )
        elif key.startswith(CUSTOM_PREFIX):
            parts.append(ask("custom." + key[len(CUSTOM_PREFIX) :]))
        else:
            parts.append(ask("id" if key == "contact_id" else key))
    if parts == list(range(len(wanted))):
        return ContactsPlan(wanted, None)
    return ContactsPlan(wanted, _shaper(parts))


_METHOD_LABELS = ChangeMethod.labels()


def unsubscribed_cell(state: str, changed_at: str, method: str, code: bool = False) -> str:
    """配信停止日時(配信停止方法): ``2026-11-20 10:15 (フォーム)``, or with ``code``
    ``2026-11-20 10:15 (form)``; empty unless unsubscribed."""
    if state != MembershipState.UNSUBSCRIBED:
        return ""
    shown = method if code else _METHOD_LABELS.get(method, method)
    return f"{changed_at[:16]} ({shown})"


def _shaper(parts: list[int | tuple[int, int, int, bool]]) -> Shape:
    def shape(row: Row) -> Row:
        return [
            row[p]
            if isinstance(p, int)
            else unsubscribed_cell(row[p[0]], row[p[1]], row[p[2]], p[3])
            for p in parts
        ]

    return shape


# -- campaign source ---------------------------------------------------------------------


def _campaign_column(key: str) -> str:
    if key.startswith(CUSTOM_PREFIX):
        return "custom." + key[len(CUSTOM_PREFIX) :]
    return CAMPAIGN_BASE.get(key, key)


def campaign_plan_check(columns: Sequence[Mapping[str, Any]]) -> None:
    for i, column in enumerate(columns):
        if column["key"].startswith(UNSUBSCRIBED_PREFIX):
            raise _fail(
                "unsubscribed_at columns are not in a campaign's frozen list; export the "
                "group instead",
                f"columns[{i}]",
            )


def campaign_plan(header: Sequence[str], columns: Sequence[Mapping[str, Any]]) -> Shape:
    """Export rows from recipients.csv rows, its ``header`` naming the columns; a merge
    value no recipient had is not a column there, and is empty here."""
    position = {name: i for i, name in enumerate(header)}
    width = len(header)
    indices = [position.get(_campaign_column(c["key"]), width) for c in columns]

    def shape(row: Row) -> Row:
        padded = [*row, ""]
        return [padded[i] for i in indices]

    return shape


# -- jobs.events, completion, mails -------------------------------------------------------


def title(request: Mapping[str, Any]) -> str:
    """The jobs list title of an export (ジョブ確認)."""
    source = request["source"]
    what = {
        "filter": "検索条件 / filter",
        "saved_filter": f"保存した絞込 / saved filter {request.get('saved_filter_id')}",
        "contact_ids": f"選択した顧客 / {len(request.get('contact_ids') or [])} contacts",
        "group": f"グループ / group {request.get('group_id')}"
        + (" 検索条件 / filter" if request.get("filter_json") else "")
        + (
            f" 保存した絞込 / saved filter {request['saved_filter_id']}"
            if request.get("saved_filter_id")
            else ""
        ),
        "campaign": f"配信対象 / campaign {request.get('campaign_id')}",
    }[source]
    states = request.get("membership_states") or []
    if states:
        what += f" [{', '.join(states)}]"
    return f"CSV出力 / export: {what}"


def export_event(job: Mapping[str, Any], status: str) -> dict[str, Any]:
    """The jobs.events record of an export job row in ``status``."""
    detail = job["error"]
    if status == "done":
        detail = f"{job['rows_written']} rows, {job['size_bytes']} bytes"
        if job["replaced_chars"]:
            encoding = job["request"]["encoding"]
            detail += f"; {job['replaced_chars']} characters not in {encoding} written as ?"
    return job_event(
        str(job["id"]),
        kind="export",
        status=status,
        service="exporter",
        title=title(job["request"]),
        created_at=job["created_at"],
        # who asked: the person when the API was told (requester), else the role
        requested_by=job.get("requester") or job["requested_by"],
        total=job["estimated_total"],
        processed=job["rows_written"],
        succeeded=job["rows_written"],
        failed=0,
        errors=[{"message": job["error"]}] if job["error"] else [],
        detail=detail,
    )


def completed_record(
    job: Mapping[str, Any], download_url: str | None, now: dt.datetime
) -> dict[str, Any]:
    """The export.completed record of a finished job row."""
    done = job["status"] == "done"
    return {
        "job_id": str(job["id"]),
        "status": job["status"],
        "rows": job["rows_written"] if done else None,
        "file_name": job["file_name"] if done else None,
        "size_bytes": job["size_bytes"] if done else None,
        "download_url": download_url,
        "expires_at": job["expires_at"] if done else None,
        "requested_by": job["requested_by"],
        "notify_email": job["notify_email"],
        "error": job["error"],
        "completed_at": now,
    }


def _local(at: dt.datetime, time_zone: dt.tzinfo) -> str:
    return f"{at.astimezone(time_zone):%Y-%m-%d %H:%M}"


def completion_mail(
    job: Mapping[str, Any], download_url: str | None, time_zone: dt.tzinfo, now: dt.datetime
) -> dict[str, Any]:
    """The requester's notice (mail.system): the download link, or why the export failed."""
    done = job["status"] == "done"
    lines = [
        "CSV出力が完了しました。" if done else "CSV出力に失敗しました。",
        "Your CSV export is ready." if done else "Your CSV export failed.",
        "",
        f"ジョブ / job: {job['id']}",
        f"内容 / what: {title(job['request'])}",
    ]
    if done:
        lines += [
            f"行数 / rows: {job['rows_written']}",
            f"ダウンロード / download: {download_url}",
            f"有効期限 / link expires: {_local(job['expires_at'], time_zone)} "
            "(ファイルはその後削除されます / the file is deleted then)",
        ]
        if job["replaced_chars"]:
            lines.append(
                f"{job['request']['encoding']} で表せない文字 {job['replaced_chars']} 字を ? に"
                f"置き換えました / {job['replaced_chars']} characters written as ?"
            )
    else:
        lines.append(f"理由 / reason: {job['error']}")
    subject = (
        "CSV出力が完了しました / export ready" if done else "CSV出力に失敗しました / export failed"
    )
    return {
        "mail_id": f"export-{'ready' if done else 'failed'}-{job['id']}",
        "job_id": str(job["id"]),
        "kind": "export_ready" if done else "job_failed",
        "to": [job["notify_email"]],
        "subject": f"[Tayori] {subject}",
        "text_body": "\n".join(lines) + "\n",
        "html_body": None,
        "created_at": now,
    }


def latest_per_job(events: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Of a batch of jobs.events records, the newest per job (by updated_at; on a tie the
    later one): one upsert per job, an older record never overwrites a newer one."""
    latest: dict[str, Mapping[str, Any]] = {}
    for event in events:
        seen = latest.get(event["job_id"])
        if seen is None or event["updated_at"] >= seen["updated_at"]:
            latest[event["job_id"]] = event
    return list(latest.values())


def check_record(value: Mapping[str, Any], *, notify_email: str) -> dict[str, Any]:
    """An ExportRequest read from export.requests, checked as the API checks a body (a
    request from another producer may not have been): InvalidMessage when it cannot run."""
    try:
        job_id = str(uuid.UUID(value["job_id"]))
        search = json.loads(value["filter_json"]) if value.get("filter_json") else None
    except ValueError as exc:
        raise _fail(f"job_id or filter_json unreadable: {exc}", "job_id") from None
    body: dict[str, Any] = {
        "source": value["source"],
        "filter": search,
        "saved_filter_id": value.get("saved_filter_id"),
        "contact_ids": value.get("contact_ids"),
        "group_id": value.get("group_id"),
        "membership_states": value.get("membership_states"),
        "campaign_id": value.get("campaign_id"),
        "columns": value["columns"],
        "header": value["header"],
        "encoding": value["encoding"],
        "safe_csv": value.get("safe_csv", True),
        "notify_email": value.get("notify_email"),
    }
    body = {k: v for k, v in body.items() if v is not None}
    request = parse_request(
        body,
        requested_by=value.get("requested_by") or "viewer",
        notify_email=notify_email,
        now=value["requested_at"],
    )
    request["job_id"] = job_id
    return request
