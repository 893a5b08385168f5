"""Kafka handlers of the suppression service: decode → process → write → (loop commits).

One transaction per partition batch; command and event ids are claimed in it, so a
redelivered batch has no second effect; every change goes out through the outbox.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from structlog.contextvars import bound_contextvars

from libs.common import checks
from libs.common.db import claim_once
from libs.common.errors import Forbidden, InvalidMessage, NotFound
from libs.common.kafka import Message, checked, reject
from libs.common.logging import get_logger
from libs.common.mail.states import ChangeMethod, MembershipState
from services.suppression import store
from services.suppression.context import Context
from services.suppression.processor import METHODS, STATES
from services.suppression.store import QUERIES

log = get_logger(__name__)


async def handle_commands(ctx: Context, batch: list[Message]) -> None:
    """``suppression.commands``: joins from contacts, state changes from upstream systems."""
    checked(batch, _check_values)  # before the ids are claimed: a NUL would fail the claim
    async with ctx.pool.acquire() as conn, conn.transaction():
        for message in await claim_once(conn, batch, lambda m: m.value["command_id"]):
            command = message.value
            with bound_contextvars(contact_id=command.get("contact_id"), command=command["type"]):
                try:
                    await _apply(conn, command)
                except (InvalidMessage, NotFound, Forbidden) as exc:
                    reason = getattr(exc, "reason", None) or str(exc)
                    raise reject(message, reason, getattr(exc, "field", None)) from None


async def _contact_ids(conn: asyncpg.Connection, command: dict[str, Any]) -> list[int]:
    if command.get("contact_id") is not None:
        return [command["contact_id"]]
    if command.get("email"):
        ids = [
            r["id"] for r in await conn.fetch(QUERIES["contacts-with-address"], command["email"])
        ]
        if ids:
            return ids
        raise NotFound(f"no contact has the address of command {command['command_id']}")
    raise InvalidMessage("the command names neither contact_id nor email", field="contact_id")


def _group(command: dict[str, Any]) -> int:
    if command.get("group_id") is None:
        raise InvalidMessage(f"{command['type']} needs group_id", field="group_id")
    return int(command["group_id"])


def _check_values(command: dict[str, Any]) -> dict[str, Any]:
    """Free-text fields the schema cannot constrain: refuse them here (→ DLQ) rather than
    let the table's CHECK constraints or PostgreSQL's text type fail the whole batch."""
    checks.identifier(command["command_id"], "command_id")
    if command.get("email") is not None:
        checks.identifier(command["email"], "email")
    if command.get("state") is not None and command["state"] not in STATES:
        raise InvalidMessage(f"state must be one of {', '.join(STATES)}", field="state")
    if command.get("method") is not None and command["method"] not in METHODS:
        raise InvalidMessage(f"method must be one of {', '.join(METHODS)}", field="method")
    return command


async def _apply(conn: asyncpg.Connection, command: dict[str, Any]) -> None:
    kind = command["type"]
    if kind == "ClearBounce":
        if not command.get("email"):
            raise InvalidMessage("ClearBounce needs email", field="email")
        await store.clear_bounce(conn, command["email"])
        return
    for contact_id in await _contact_ids(conn, command):
        if kind == "Join":
            await store.join(
                conn,
                contact_id,
                _group(command),
                state=command.get("state") or MembershipState.DELIVERABLE.value,
                auto_stop=command.get("method") == ChangeMethod.AUTO_STOP,
                email=command.get("email"),
                joined_at=command["issued_at"],
            )
        elif kind == "Leave":
            await store.leave(conn, contact_id, _group(command))
        elif kind == "SetState":
            state = command.get("state")
            if state not in STATES:
                raise InvalidMessage(f"state must be one of {', '.join(STATES)}", field="state")
            await store.change_state(
                conn,
                contact_id,
                _group(command),
                state,
                actor=command.get("actor") or "upstream",
                method=command.get("method"),
                campaign_id=command.get("campaign_id"),
            )
        elif kind in ("SetBlack", "ClearBlack"):
            await store.set_black(conn, contact_id, kind == "SetBlack")
        else:
            raise InvalidMessage(f"unknown command type {kind!r}", field="type")


async def handle_bounces(ctx: Context, batch: list[Message]) -> None:
    """``bounce.events``: addresses the bounce rules stopped (F-15) and delivery status (F-32)."""
    async with ctx.pool.acquire() as conn, conn.transaction():
        for message in await claim_once(conn, batch, lambda m: m.value["event_id"]):
            event = message.value
            reason = {"bounced": "bounced", "complained": "complained"}.get(event["action"])
            if reason:
                await store.suppress_address(
                    conn, event["email"], reason, f"bounce:{event['event_id']}"
                )
            if event.get("delivery_status") and event.get("contact_id") is not None:
                await conn.execute(
                    QUERIES["set-delivery-status"], event["contact_id"], event["delivery_status"]
                )


async def handle_changelog(ctx: Context, batch: list[Message]) -> None:
    """``contacts.changelog``: the address of every contact, for blacklist matching."""
    async with ctx.pool.acquire() as conn, conn.transaction():
        for message in batch:
            change = message.value
            if change["op"] == "deleted":
                gone = await conn.fetch(QUERIES["forget-contact"], change["contact_id"])
                await store.publish(conn, [store.left_change(r) for r in gone])
            elif change["contact"] is not None:
                await conn.execute(
                    QUERIES["upsert-contact-address"],
                    change["contact_id"],
                    change["contact"]["email"],
                    change["version"],
                )
