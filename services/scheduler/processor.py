"""The scheduler's domain decisions, without I/O: what a valid campaign is, what a result
counts as, when a campaign halts, and what the records it publishes look like."""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from libs.common.db import columns
from libs.common.errors import InvalidMessage
from libs.common.mail import mergetags
from libs.common.mail.addresses import normalise as normalise_address
from services.scheduler.status import SENDING_OVER

#: contact fields a merge tag may name: what contacts puts in a snapshot's merge values.
BASE_FIELDS: tuple[str, ...] = mergetags.CONTACT_FIELDS

FORMATS = ("text", "html")
DEDUPE = ("none", "by_email")
#: F-23: at most this many addresses in one test send.
TEST_SEND_MAX = 20
TEST_SUBJECT_PREFIX = "[TEST] "
TEST_STEP_PREFIX = "test:"

#: delivery.results outcome → the ledger's (and the counters') outcome.
OUTCOMES: dict[str, str] = {
    "sent": "success",
    "suppressed": "suppressed",
    "temporary_error": "error",
    "permanent_error": "error",
    "policy_error": "error",
}


def _text(body: Mapping[str, Any], name: str, *, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise InvalidMessage(f"{name} is required", field=name)
        return None
    if not isinstance(value, str):
        raise InvalidMessage(f"{name} must be a string", field=name)
    if required and not value.strip():
        raise InvalidMessage(f"{name} must not be empty", field=name)
    return value


def _optional_id(value: Any, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidMessage(f"{field} must be a positive integer", field=field)
    return value


def parse_time(value: object, field: str) -> dt.datetime:
    """An ISO 8601 timestamp with its offset (a time without zone is ambiguous)."""
    if not isinstance(value, str):
        raise InvalidMessage(f"{field} must be an ISO 8601 timestamp with offset", field=field)
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidMessage(
            f"{field} is not an ISO 8601 timestamp: {value!r}", field=field
        ) from None
    if moment.tzinfo is None:
        raise InvalidMessage(f"{field} needs a UTC offset, e.g. +09:00", field=field)
    return moment


@dataclass(frozen=True)
class Target:
    group_id: int | None
    filter: dict[str, Any] | None
    saved_filter_id: int | None

    def search_filter(self) -> dict[str, Any] | None:
        """The filter part as one F-05 filter (for checking it with a search)."""
        parts: list[dict[str, Any]] = []
        if self.filter:
            parts.append(self.filter)
        if self.saved_filter_id is not None:
            parts.append({"saved_filter": self.saved_filter_id})
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else {"all": parts}


def parse_target(raw: object) -> Target:
    """``{"group_id"?, "filter"?, "saved_filter_id"?}`` with at least one of them."""
    if not isinstance(raw, dict):
        raise InvalidMessage(
            "target must be an object with group_id, filter and/or saved_filter_id",
            field="target",
        )
    unknown = set(raw) - {"group_id", "filter", "saved_filter_id"}
    if unknown:
        raise InvalidMessage(f"target has unknown keys: {sorted(unknown)}", field="target")
    flt = raw.get("filter")
    if flt is not None and (not isinstance(flt, dict) or not flt):
        raise InvalidMessage("target.filter must be a filter object (F-05)", field="target.filter")
    target = Target(
        _optional_id(raw.get("group_id"), "target.group_id"),
        flt,
        _optional_id(raw.get("saved_filter_id"), "target.saved_filter_id"),
    )
    if target.group_id is None and target.filter is None and target.saved_filter_id is None:
        raise InvalidMessage(
            "target needs a group_id, a filter or a saved_filter_id", field="target"
        )
    return target


def known_keys(custom_field_keys: Collection[str]) -> set[str]:
    """Every key a merge tag may name: base fields and custom fields (bare and prefixed)."""
    return {*BASE_FIELDS, *custom_field_keys, *(f"custom.{k}" for k in custom_field_keys)}


def validate_sender(body: Mapping[str, Any]) -> dict[str, Any]:
    """The sender settings shared by campaigns and step-mail plans: from, reply_to, coupon
    template and tracking switches (F-20, F-21, F-34), checked; the columns to store."""
    from_address = normalise_address(body.get("from_address"), "from_address")
    from_name = _text(body, "from_name") or ""
    if mergetags.escape_header(from_name) != from_name.strip():
        raise InvalidMessage("from_name must be one line", field="from_name")
    reply_to = body.get("reply_to")
    if reply_to is not None and reply_to != "":
        reply_to = normalise_address(reply_to, "reply_to")
    else:
        reply_to = None
    coupon_url = _text(body, "coupon_url") or None
    if coupon_url is not None and not coupon_url.startswith(("https://", "http://")):
        raise InvalidMessage("coupon_url must be an http(s) URL template", field="coupon_url")
    tracking = {name: body.get(name, True) for name in ("track_opens", "track_clicks")}
    for name, value in tracking.items():
        if not isinstance(value, bool):
            raise InvalidMessage(f"{name} must be true or false", field=name)
    return {
        "from_address": from_address,
        "from_name": from_name,
        "reply_to": reply_to,
        "coupon_url": coupon_url,
        **tracking,
    }


def validate_message(
    body: Mapping[str, Any], keys: Collection[str], *, has_coupon: bool, path: str = ""
) -> dict[str, Any]:
    """Subject, format and body of one mail (a campaign, or one step of a plan): present,
    a one-line subject, and every merge tag known (F-21). ``path`` prefixes error fields
    (``steps[1].``)."""

    def required(name: str) -> str:
        try:
            value = _text(body, name, required=True)
        except InvalidMessage as exc:
            raise InvalidMessage(exc.reason, field=f"{path}{name}") from None
        assert value is not None
        return value

    subject = required("subject")
    if mergetags.escape_header(subject) != subject.strip():
        raise InvalidMessage("subject must be one line", field=f"{path}subject")
    fmt = body.get("format", "text")
    if fmt not in FORMATS:
        raise InvalidMessage("format must be text or html", field=f"{path}format")
    content = required("body")
    mergetags.validate(subject, keys, has_coupon=has_coupon, field=f"{path}subject")
    mergetags.validate(content, keys, has_coupon=has_coupon, field=f"{path}body")
    return {"subject": subject, "format": fmt, "body": content}


def validate_campaign(
    body: Mapping[str, Any],
    *,
    custom_field_keys: Collection[str],
    now: dt.datetime,
    min_lead: dt.timedelta,
) -> dict[str, Any]:
    """A campaign body checked field by field (F-20..F-22); returns the columns to store.

    ``category_id`` is only type-checked here; that it exists is the store's business.
    """
    name = _text(body, "name", required=True)
    category_id = body.get("category_id")
    if isinstance(category_id, bool) or not isinstance(category_id, int):
        raise InvalidMessage("category_id must be the id of a category", field="category_id")
    target = parse_target(body.get("target"))
    sender = validate_sender(body)
    keys = known_keys(custom_field_keys)
    coupon_url = sender["coupon_url"]
    message = validate_message(body, keys, has_coupon=coupon_url is not None)
    dedupe = body.get("dedupe", "none")
    if dedupe not in DEDUPE:
        raise InvalidMessage("dedupe must be none or by_email", field="dedupe")
    include_unsubscribed = body.get("include_unsubscribed", False)
    if not isinstance(include_unsubscribed, bool):
        raise InvalidMessage(
            "include_unsubscribed must be true or false", field="include_unsubscribed"
        )
    if body.get("scheduled_at") is None:
        raise InvalidMessage("scheduled_at is required (no immediate send)", field="scheduled_at")
    scheduled_at = parse_time(body["scheduled_at"], "scheduled_at")
    if scheduled_at < now + min_lead:
        seconds = min_lead.total_seconds()
        lead = f"{seconds / 60:g} minutes" if seconds >= 60 else f"{seconds:g} seconds"
        raise InvalidMessage(
            f"scheduled_at must be at least {lead} from now ({now.isoformat()}): no immediate send",
            field="scheduled_at",
        )
    if coupon_url is not None:
        mergetags.validate(coupon_url, keys - {"coupon_url"}, has_coupon=False, field="coupon_url")
    return {
        "name": name,
        "category_id": category_id,
        "group_id": target.group_id,
        "filter": target.filter,
        "saved_filter_id": target.saved_filter_id,
        "from_address": sender["from_address"],
        "from_name": sender["from_name"],
        "reply_to": sender["reply_to"],
        "subject": message["subject"],
        "format": message["format"],
        "body": message["body"],
        "coupon_url": coupon_url,
        "dedupe": dedupe,
        "include_unsubscribed": include_unsubscribed,
        "scheduled_at": scheduled_at,
        "track_opens": sender["track_opens"],
        "track_clicks": sender["track_clicks"],
    }


def parse_test_addresses(raw: object) -> list[str]:
    """F-23: comma-separated (or a list of) addresses, 1 to 20, each valid."""
    if isinstance(raw, str):
        parts = [p.strip() for p in re.split(r"[,\n、，]", raw)]
    elif isinstance(raw, list) and all(isinstance(p, str) for p in raw):
        parts = [p.strip() for p in raw]
    else:
        raise InvalidMessage("addresses must be comma-separated addresses", field="addresses")
    addresses = [p for p in parts if p]
    if not addresses:
        raise InvalidMessage("addresses must name at least one address", field="addresses")
    if len(addresses) > TEST_SEND_MAX:
        raise InvalidMessage(
            f"a test send goes to at most {TEST_SEND_MAX} addresses, not {len(addresses)}",
            field="addresses",
        )
    return [normalise_address(a, "addresses") for a in addresses]


# Results and the error-rate halt (F-25, F-26) ----------------------------------------------


@dataclass(frozen=True)
class Counters:
    planned: int
    success: int
    error: int
    suppressed: int

    @property
    def results(self) -> int:
        """Recipients with a result (the first one decides)."""
        return self.success + self.error + self.suppressed

    @property
    def outstanding(self) -> int:
        """Recipients without a result yet (0: every one has one, the campaign is sent)."""
        return max(0, self.planned - self.results)

    def pending(self, status: str) -> int:
        """Recipients still waiting for their result while the campaign may send (released
        or not yet); 0 once it sends no more."""
        return 0 if status in SENDING_OVER else self.outstanding

    def unsent(self, status: str) -> int:
        """未配信数 (F-25): recipients given up — without a result once the campaign sends no
        more (given up after its releases, halted, cancelled); 0 while it may still send, and
        0 when every recipient has a result. A late result still counts and lowers it."""
        return self.outstanding if status in SENDING_OVER else 0

    @property
    def attempts(self) -> int:
        """Delivery attempts: results that went to a relay (suppressed ones did not)."""
        return self.success + self.error


def should_halt(counters: Counters, *, min_attempts: int, threshold: float) -> bool:
    """F-26: at least ``min_attempts`` attempts and an error rate above ``threshold``."""
    attempts = counters.attempts
    return attempts >= min_attempts and attempts > 0 and counters.error / attempts > threshold


def halt_reason(counters: Counters, threshold: float) -> str:
    rate = counters.error / counters.attempts if counters.attempts else 0.0
    return (
        f"error rate {rate:.1%} > {threshold:.0%} after {counters.attempts} attempts"
        f" ({counters.error} errors)"
    )


# Checkpoints: lost requests and results ------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint of a campaign's release (services/scheduler/checkpoints.py)."""

    id: uuid.UUID
    #: the campaign's release mark when it was published: every row released with a mark up
    #: to this one was acknowledged before it, so it follows them in each partition.
    mark: int
    #: send.requests partitions it went into, and in how many a sender has reached it.
    partitions: int
    reached: int
    #: delivery.results end offsets (index: partition) once every partition had reached it.
    fence: tuple[int, ...] | None = None
    #: the most deliveries of the campaign a sender's answer said were held for their
    #: domain (send.progress v2; 0 from a v1 sender).
    held: int = 0

    @property
    def reached_everywhere(self) -> bool:
        return self.reached >= self.partitions

    @property
    def conclusive(self) -> bool:
        """Every partition answered and no answer saw held mail: a row before it without a
        result is lost, not waiting for its domain (see :func:`checkpoint_step`)."""
        return self.reached_everywhere and self.held == 0


@dataclass(frozen=True)
class CheckpointStep:
    """What one tick does about a sending campaign's checkpoints."""

    #: re-release this checkpoint's rows that still have no result, and forget it and older.
    confirm: Checkpoint | None = None
    #: checkpoints every partition reached, whose results fence is to be taken now.
    fence: tuple[uuid.UUID, ...] = ()
    #: publish a new checkpoint.
    issue: bool = False
    #: checkpoints every partition answered, one of them with held mail: they will never be
    #: confirmed (an answer's count never changes), so they go.
    forget: tuple[uuid.UUID, ...] = ()


def fence_passed(fence: Sequence[int], results_counted: Mapping[int, int]) -> bool:
    """Whether the results consumer has counted delivery.results up to ``fence`` (end
    offsets by partition) in every partition (``results_counted``: its group's committed
    offsets)."""
    return all(results_counted.get(p, 0) >= end for p, end in enumerate(fence) if end > 0)


def checkpoint_step(
    checkpoints: Sequence[Checkpoint],
    *,
    release_mark: int,
    confirmed_mark: int,
    awaiting_results: int,
    results_counted: Mapping[int, int],
    since_issued: float | None,
    interval: float,
) -> CheckpointStep:
    """The decision that keeps a campaign from waiting for requests or results a broker lost.

    A row released up to a checkpoint's mark went out before the checkpoint, in its
    partition; a sender answers a checkpoint per partition only once it has decided every
    request before it there (its result published and acknowledged). So when every partition
    answered, a row up to the mark without a result either never reached a sender (its
    request was lost) or its result has not been counted. Once the results consumer has read
    delivery.results up to where it ended after the last answer (the fence), an uncounted
    result is a lost one too: those rows go out again, and the sender's ledger answers those
    it decided with their recorded result without sending. A backlog never triggers it: a
    checkpoint waits behind the requests before it, however slow the sender, and covers none
    released after it.

    Held mail is not lost either: a sender holds a delivery its domain keeps waiting long
    (services/sender/holding.py) and answers the checkpoint without its result, which comes
    when the domain admits it. The answers say how many of the campaign's deliveries were
    held (send.progress v2, counted over every sender); a checkpoint any answer of which saw
    held mail proves nothing about the rows before it and is never confirmed (not
    :attr:`Checkpoint.conclusive`). Later checkpoints keep coming while rows await their
    results, and the first one answered with nothing held is confirmed: by then every held
    delivery before it has its result out, so what is still missing is lost. Mail lost
    while some is held is thus released again once the held mail has gone, not before.

    - ``confirm``: the newest conclusive checkpoint newer than ``confirmed_mark`` whose
      fence the results consumer passed (``results_counted``: its group's committed offsets
      by partition);
    - ``fence``: the conclusive checkpoints newer than that, without a fence yet;
    - ``forget``: the checkpoints answered everywhere with held mail (never confirmed:
      a campaign whose mail is held for hours would otherwise keep one per interval);
    - ``issue``: some released row awaits its result (``awaiting_results``), something was
      released since the last confirmed checkpoint, and ``interval`` seconds passed since
      the last one was issued (``since_issued``; None: none yet). A checkpoint that was
      itself lost is made good by the next one.
    """
    candidates = [c for c in checkpoints if c.mark > confirmed_mark and c.conclusive]
    passed = [
        c for c in candidates if c.fence is not None and fence_passed(c.fence, results_counted)
    ]
    confirm = max(passed, key=lambda c: c.mark, default=None)
    floor = confirm.mark if confirm is not None else confirmed_mark
    fence = tuple(c.id for c in candidates if c.fence is None and c.mark > floor)
    issue = (
        awaiting_results > 0
        and release_mark > confirmed_mark
        and (since_issued is None or since_issued >= interval)
    )
    forget = tuple(c.id for c in checkpoints if c.reached_everywhere and not c.conclusive)
    return CheckpointStep(confirm=confirm, fence=fence, issue=issue, forget=forget)


def newest_held(
    answers: Iterable[tuple[uuid.UUID, dt.datetime, int]],
) -> dict[uuid.UUID, tuple[dt.datetime, int]]:
    """Per campaign, the newest of a batch's answers (campaign, reached_at, held) as
    (reached_at, held): the senders' answers reach send.progress in the order they were
    published, which two senders may invert; the later count wins (the last one of a tie)."""
    newest: dict[uuid.UUID, tuple[dt.datetime, int]] = {}
    for campaign_id, reached_at, held in answers:
        seen = newest.get(campaign_id)
        if seen is None or reached_at >= seen[0]:
            newest[campaign_id] = (reached_at, held)
    return newest


def senders_hold(held: int, held_at: dt.datetime | None, cutoff: dt.datetime) -> bool:
    """Whether senders hold some of a campaign's mail for its receiving domains, by the
    newest answer to a checkpoint (``held`` deliveries, received at ``held_at``): then the
    overdue check neither releases rows again nor gives the campaign up — the held mail
    goes at its domain's pace, however long past the result timeout. An answer older than
    ``cutoff`` (the result timeout ago) no longer counts: senders that stopped answering
    are not waited for beyond the timeout that holds for any row."""
    return held > 0 and held_at is not None and held_at >= cutoff


def held_shown(held: int, status: str, pending: int) -> int:
    """The campaign's held count as shown (送信待ち: ドメインの速度制限): the newest
    answer's, while it may send; never more than the recipients still pending, and 0 once
    it sends no more (a count answered before its last results came is stale)."""
    return 0 if status in SENDING_OVER else max(0, min(held, pending))


def checkpoint_request(campaign_id: str, checkpoint_id: str, now: dt.datetime) -> dict[str, Any]:
    """The send.requests record of a checkpoint: no recipient, no content (schema v5)."""
    return {
        "request_id": checkpoint_id,
        "campaign_id": campaign_id,
        "step_id": None,
        "contact_id": 0,
        "email": "",
        "group_id": None,
        "include_unsubscribed": False,
        "merge_values": {},
        "content": {"from_address": "", "subject": "", "format": "", "body": ""},
        "attempt": 0,
        "released_at": now,
        "test": False,
        "content_id": None,
        "checkpoint": True,
    }


# Feedback (F-34) ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeedbackTally:
    """The opens or clicks of one recipient of one campaign in a batch."""

    campaign_id: uuid.UUID
    contact_id: int
    kind: str
    count: int
    first_at: dt.datetime


def feedback_tallies(events: Iterable[Mapping[str, Any]]) -> list[FeedbackTally]:
    """``feedback.events`` (each once: already deduplicated by event id) grouped per
    (campaign, contact, kind): how many, and the first. Events naming no campaign UUID are
    left out (nothing of ours to count them for)."""
    grouped: dict[tuple[uuid.UUID, int, str], tuple[int, dt.datetime]] = {}
    for event in events:
        try:
            campaign_id = uuid.UUID(str(event["campaign_id"]))
        except ValueError:
            continue
        key = (campaign_id, int(event["contact_id"]), str(event["type"]))
        at: dt.datetime = event["occurred_at"]
        count, first = grouped.get(key, (0, at))
        grouped[key] = (count + 1, min(first, at))
    return [
        FeedbackTally(c, contact, kind, n, at) for (c, contact, kind), (n, at) in grouped.items()
    ]


def feedback_columns(tallies: Sequence[FeedbackTally]) -> list[list[Any]]:
    """The tallies as record-feedback's unnest arrays: ids, contacts, kinds, counts,
    first times."""
    return columns(tallies, "campaign_id", "contact_id", "kind", "count", "first_at")


# Published records ----------------------------------------------------------------------------


def content_of(campaign: Mapping[str, Any], *, test: bool = False) -> dict[str, Any]:
    """The ``MailContent`` of a campaign's send requests (templates, not rendered)."""
    subject = campaign["subject"]
    return {
        "from_address": campaign["from_address"],
        "from_name": campaign["from_name"] or None,
        "reply_to": campaign["reply_to"],
        "subject": TEST_SUBJECT_PREFIX + subject if test else subject,
        "format": campaign["format"],
        "body": campaign["body"],
        "coupon_url": campaign["coupon_url"],
        "track_opens": campaign["track_opens"],
        "track_clicks": campaign["track_clicks"],
    }


def snapshot_request(
    campaign: Mapping[str, Any], request_id: str, now: dt.datetime
) -> dict[str, Any]:
    flt = campaign["filter"]
    return {
        "request_id": request_id,
        "campaign_id": str(campaign["id"]),
        "group_id": campaign["group_id"],
        "filter_json": None if flt is None else json.dumps(flt, ensure_ascii=False),
        "saved_filter_id": campaign["saved_filter_id"],
        "include_unsubscribed": campaign["include_unsubscribed"],
        "dedupe": campaign["dedupe"],
        "requested_at": now,
    }


def control(
    campaign_id: str,
    action: str,
    reason: str | None,
    command_id: str,
    now: dt.datetime,
    domains: Sequence[str] = (),
) -> dict[str, Any]:
    """A campaign.control command; ``domains`` (pause / resume only) names the receiving
    domains it is about, none = the whole campaign."""
    return {
        "command_id": command_id,
        "campaign_id": campaign_id,
        "action": action,
        "reason": reason,
        "domains": sorted(domains),
        "issued_at": now,
    }


# Merge values for test sends and previews ------------------------------------------------------

#: what a preview or test send shows when no contact is chosen.
SAMPLE_VALUES: dict[str, str] = {
    "contact_id": "0",
    "email": "sample@example.com",
    "name": "山田 太郎",
    "name_kana": "ヤマダ タロウ",
    "company": "株式会社サンプル",
    "department": "営業部",
    "title": "部長",
}


def merge_values_of_contact(contact: Mapping[str, Any]) -> dict[str, str]:
    """Merge values from a contact as the contacts API returns it, the way contacts puts
    them in a snapshot: fields with a value as text, custom fields as ``custom.<key>``."""
    values: dict[str, str] = {}
    for name in BASE_FIELDS:
        if name in ("tags", "contact_id"):
            continue
        value = contact.get(name)
        if value is not None and value != "":
            values[name] = str(value)
    if contact.get("tags"):
        values["tags"] = ",".join(contact["tags"])
    for key, value in (contact.get("custom_fields") or {}).items():
        if value is None:
            continue
        values[f"custom.{key}"] = (
            ("true" if value else "false") if isinstance(value, bool) else str(value)
        )
    values["contact_id"] = str(contact.get("id", 0))
    return values


def merge_columns(keys: Collection[str]) -> list[str]:
    """Merge value columns of the recipient CSV: base fields in their order, then the rest."""
    base = [k for k in BASE_FIELDS if k in keys and k not in ("email", "contact_id")]
    rest = sorted(k for k in keys if k not in BASE_FIELDS)
    return base + rest
