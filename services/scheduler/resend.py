"""Re-sending (再配信, F-28) without I/O: a new campaign from a past one, and targets over
the recipients of past campaigns.

"Recipients of campaign X, only those who did not open" is written in the F-05 filter
language with contacts' ``history`` node, so it combines with any other condition and can
be saved as a filter (:func:`recipients_filter` only writes it out)::

    {"all": [{"history": {"event": "received", "campaign_id": X}},
             {"history": {"event": "opened", "campaign_id": X, "negate": true}}]}

Only campaigns of the last 3 months may be named (the seeds' rule: 過去3ヶ月以内に配信した
メール), judged by when the campaign started sending. The scheduler enforces it when a
campaign is created (re-sends included), because it is the one that knows when campaigns
were sent; contacts' search does not (its history is the contact's, and an operator may
still look at older history there).
"""

from __future__ import annotations

import calendar
import datetime as dt
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

from libs.common.errors import InvalidMessage
from libs.common.mail import content

#: engagement → the history conditions on the source campaign (received = delivered).
ENGAGEMENTS: dict[str, list[tuple[str, bool]]] = {
    "all": [],
    "opened": [("opened", False)],
    "not_opened": [("received", False), ("opened", True)],
    "clicked": [("clicked", False)],
    "not_clicked": [("received", False), ("clicked", True)],
    "errored": [("errored", False)],
    "not_errored": [("received", False), ("errored", True)],
}
#: what a re-send copies from its source (配信実績の再送信): the whole mail content, its
#: category and its settings.
COPIED = ("category_id", *content.FIELDS, "dedupe", "include_unsubscribed")
#: what the re-send request may change besides the target.
OVERRIDABLE = ("name", "subject", "dedupe", "include_unsubscribed", "scheduled_at")


def recipients_filter(campaign_id: str, engagement: str) -> dict[str, Any]:
    """The F-05 filter selecting recipients of ``campaign_id`` by engagement."""
    if engagement not in ENGAGEMENTS:
        raise InvalidMessage(
            f"recipients must be one of {', '.join(ENGAGEMENTS)}", field="recipients"
        )
    if engagement == "all":
        return {
            "any": [
                {"history": {"event": "received", "campaign_id": campaign_id}},
                {"history": {"event": "errored", "campaign_id": campaign_id}},
            ]
        }
    nodes = [
        {"history": {"event": event, "campaign_id": campaign_id, "negate": True}}
        if negate
        else {"history": {"event": event, "campaign_id": campaign_id}}
        for event, negate in ENGAGEMENTS[engagement]
    ]
    return nodes[0] if len(nodes) == 1 else {"all": nodes}


def resend_body(source: Mapping[str, Any], request: Mapping[str, Any]) -> dict[str, Any]:
    """The body of the new campaign: the source's content and settings, the request's
    target (chosen anew) and schedule. ``recipients`` adds the engagement condition on the
    source campaign to the target's filter."""
    unknown = set(request) - {"target", "recipients", *OVERRIDABLE}
    if unknown:
        raise InvalidMessage(f"unknown keys: {sorted(unknown)}", field=sorted(unknown)[0])
    target = dict(request.get("target") or {})
    if not isinstance(request.get("target", {}), dict):
        raise InvalidMessage("target must be an object", field="target")
    engagement = request.get("recipients")
    if engagement is not None:
        condition = recipients_filter(str(source["id"]), engagement)
        current = target.get("filter")
        target["filter"] = {"all": [current, condition]} if current else condition
    if not target:
        raise InvalidMessage(
            "a re-send needs a target (chosen anew) or recipients of the source campaign",
            field="target",
        )
    body: dict[str, Any] = {name: source[name] for name in COPIED}
    body["name"] = f"{source['name']} (再配信)"
    body.update({k: request[k] for k in OVERRIDABLE if k in request})
    body["target"] = target
    return body


def history_campaigns(node: Any) -> Iterator[str]:
    """Every campaign id a filter's history nodes name (saved filters not followed)."""
    if isinstance(node, list):
        for child in node:
            yield from history_campaigns(child)
    elif isinstance(node, dict):
        history = node.get("history")
        if isinstance(history, dict):
            if isinstance(history.get("campaign_id"), str):
                yield history["campaign_id"]
            ids = history.get("campaign_ids")
            if isinstance(ids, list):
                yield from (i for i in ids if isinstance(i, str))
        for key in ("all", "any", "not"):
            if key in node:
                yield from history_campaigns(node[key])


def saved_filters(node: Any) -> Iterator[int]:
    """Saved filter ids a filter inlines (their history nodes count too)."""
    if isinstance(node, list):
        for child in node:
            yield from saved_filters(child)
    elif isinstance(node, dict):
        if isinstance(node.get("saved_filter"), int):
            yield node["saved_filter"]
        for key in ("all", "any", "not"):
            if key in node:
                yield from saved_filters(node[key])


def months_before(moment: dt.datetime, months: int) -> dt.datetime:
    """The same day and time ``months`` calendar months earlier (the last day of a shorter
    month: 3 months before 31 May is 28/29 February)."""
    year, month = divmod(moment.year * 12 + moment.month - 1 - months, 12)
    last_day = calendar.monthrange(year, month + 1)[1]
    return moment.replace(year=year, month=month + 1, day=min(moment.day, last_day))


def check_history(
    named: set[str],
    known: Mapping[str, tuple[dt.datetime | None, bool]],
    now: dt.datetime,
    months: int,
) -> None:
    """Refuse a target naming a campaign that does not exist, was never sent, or started
    sending more than ``months`` calendar months before ``now``. ``known``: id → (when it
    started sending, is a step); a step-mail step is always allowed (it keeps sending)."""
    oldest = months_before(now, months)
    for campaign_id in sorted(named):
        try:
            key = str(uuid.UUID(campaign_id))
        except ValueError:
            key = campaign_id
        if key not in known:
            raise InvalidMessage(
                f"history names campaign {campaign_id}, which does not exist", field="target"
            )
        sent_at, step = known[key]
        if step:
            continue
        if sent_at is None:
            raise InvalidMessage(
                f"history names campaign {campaign_id}, which has not been sent", field="target"
            )
        if sent_at < oldest:
            raise InvalidMessage(
                f"history names campaign {campaign_id}, sent {sent_at.date().isoformat()}:"
                f" only campaigns sent in the last {months} months"
                f" (since {oldest.date().isoformat()}) can be targeted by their recipients",
                field="target",
            )
