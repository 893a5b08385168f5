"""Step-mail plans (ステップメール, F-29) as the scheduler keeps them, without I/O.

The plan itself — its id (one id space with groups), name and memberships — belongs to
contacts (``/v1/plans`` there). Its *schedule* belongs to the scheduler, which owns
categories, content validation and the release path: ``PUT /v1/plans/{id}`` here sets the
category, the sender settings and the ordered steps, each ``{day_offset, send_time
"HH:MM", subject, format, body}``.

Each step has a UUID that plays the campaign id on the topics (``send.requests``,
``campaign.content``, ``delivery.results``, ``feedback.events``): a step's results, opens
and clicks are counted per step without any schema change, and contacts' history filters
(F-05) can name a step like a campaign. ``step_id`` in a send request names the plan and
the enrolment (:func:`step_key`), so the sender's ledger — one send per (campaign, step,
contact) — sends a step once per enrolment, and a contact who leaves and joins again gets
the plan again.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from libs.common.errors import InvalidMessage
from libs.common.mail import mergetags
from libs.common.mail.states import MembershipState
from services.scheduler import processor
from services.scheduler.window import parse_hhmm

#: most steps in one plan, and the furthest day offset (about ten years).
MAX_STEPS = 100
MAX_DAY_OFFSET = 3660
#: step_id of a step's send requests: ``plan:<plan id>:enrolment:<enrolment id>``.
STEP_KEY_PREFIX = "plan:"


def step_key(plan_id: int, enrolment_id: int) -> str:
    return f"{STEP_KEY_PREFIX}{plan_id}:enrolment:{enrolment_id}"


def parse_step_key(step_id: str | None) -> tuple[int, int] | None:
    """(plan id, enrolment id) of a step send's step_id; None for anything else."""
    if not step_id or not step_id.startswith(STEP_KEY_PREFIX):
        return None
    parts = step_id.split(":")
    if len(parts) != 4 or parts[2] != "enrolment":
        return None
    try:
        return int(parts[1]), int(parts[3])
    except ValueError:
        return None


@dataclass(frozen=True)
class Step:
    """One step as asked for; ``id`` is set when it edits an existing step."""

    id: uuid.UUID | None
    day_offset: int
    send_time: str
    subject: str
    format: str
    body: str


def _day_offset(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_DAY_OFFSET:
        raise InvalidMessage(
            f"day_offset must be an integer from 0 to {MAX_DAY_OFFSET}", field=f"{path}day_offset"
        )
    return value


def _step_id(value: Any, path: str) -> uuid.UUID | None:
    if value is None:
        return None
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise InvalidMessage(
            "id must be the id of a step of this plan", field=f"{path}id"
        ) from None


def validate_plan(
    body: Mapping[str, Any], *, custom_field_keys: Collection[str]
) -> tuple[dict[str, Any], list[Step]]:
    """A plan schedule ``{category_id, from_address, from_name?, reply_to?, coupon_url?,
    track_opens?, track_clicks?, steps: [...]}`` checked like a campaign's content (F-20,
    F-21): the plan's columns and its steps in order (by day, then time, as given)."""
    category_id = body.get("category_id")
    if isinstance(category_id, bool) or not isinstance(category_id, int):
        raise InvalidMessage("category_id must be the id of a category", field="category_id")
    sender = processor.validate_sender(body)
    keys = processor.known_keys(custom_field_keys)
    has_coupon = sender["coupon_url"] is not None
    if has_coupon:
        mergetags.validate(
            sender["coupon_url"], keys - {"coupon_url"}, has_coupon=False, field="coupon_url"
        )
    raw_steps = body.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise InvalidMessage("steps must be a non-empty list of steps", field="steps")
    if len(raw_steps) > MAX_STEPS:
        raise InvalidMessage(f"a plan has at most {MAX_STEPS} steps", field="steps")
    steps: list[Step] = []
    for n, raw in enumerate(raw_steps):
        path = f"steps[{n}]."
        if not isinstance(raw, dict):
            raise InvalidMessage("a step must be an object", field=f"steps[{n}]")
        unknown = set(raw) - {"id", "day_offset", "send_time", "subject", "format", "body"}
        if unknown:
            raise InvalidMessage(f"unknown step keys: {sorted(unknown)}", field=f"steps[{n}]")
        message = processor.validate_message(raw, keys, has_coupon=has_coupon, path=path)
        send_time = parse_hhmm(raw.get("send_time"), f"{path}send_time")
        steps.append(
            Step(
                _step_id(raw.get("id"), path),
                _day_offset(raw.get("day_offset"), path),
                f"{send_time:%H:%M}",
                message["subject"],
                message["format"],
                message["body"],
            )
        )
    ids = [s.id for s in steps if s.id is not None]
    if len(ids) != len(set(ids)):
        raise InvalidMessage("a step id appears twice", field="steps")
    steps.sort(key=lambda s: (s.day_offset, s.send_time))
    return {"category_id": category_id, **sender}, steps


@dataclass(frozen=True)
class StepChange:
    """What saving a step does: insert a new one or update one (``retimed``: its day or
    time changed, so its ``timed_since`` moves to now; see steps.py)."""

    id: uuid.UUID
    position: int
    step: Step
    new: bool
    retimed: bool


def plan_edit(
    current: Mapping[uuid.UUID, Mapping[str, Any]], wanted: list[Step]
) -> tuple[list[StepChange], list[uuid.UUID]]:
    """Match the wanted steps to the plan's current (not removed) steps by id: the changes
    to save, and the ids of current steps no longer wanted (removed: never due again, kept
    for their statistics). Editing affects only what has not been sent yet."""
    changes: list[StepChange] = []
    for position, step in enumerate(wanted):
        if step.id is None:
            changes.append(StepChange(uuid.uuid4(), position, step, True, True))
            continue
        old = current.get(step.id)
        if old is None:
            raise InvalidMessage(
                f"step {step.id} is not a step of this plan", field=f"steps[{position}].id"
            )
        retimed = (old["day_offset"], old["send_time"]) != (step.day_offset, step.send_time)
        changes.append(StepChange(step.id, position, step, False, retimed))
    kept = {c.id for c in changes}
    return changes, [i for i in current if i not in kept]


# Enrolments -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MembershipChange:
    group_id: int
    contact_id: int
    state: str
    changed_at: dt.datetime
    version: int

    @property
    def enrols(self) -> bool:
        """Deliverable starts an enrolment (if none is running); any other state ends it."""
        return self.state == MembershipState.DELIVERABLE


def membership_changes(values: Iterable[Mapping[str, Any]]) -> list[MembershipChange]:
    """The ``suppression.changes`` membership records of a batch, the newest (highest
    version) per (group, contact): an older one is already superseded."""
    latest: dict[tuple[int, int], MembershipChange] = {}
    for value in values:
        if value.get("kind") != "membership":
            continue
        if value.get("group_id") is None or value.get("contact_id") is None:
            continue
        change = MembershipChange(
            int(value["group_id"]),
            int(value["contact_id"]),
            str(value["state"]),
            value["changed_at"],
            int(value["version"]),
        )
        key = (change.group_id, change.contact_id)
        if key not in latest or latest[key].version < change.version:
            latest[key] = change
    return list(latest.values())
