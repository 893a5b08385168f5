"""The state vocabularies are declared once (``libs/common/mail/states.py``); SQL cannot import
them, so these tests read every CHECK constraint and literal list in the migrations and
queries that spell them and check they say the same, so the two cannot drift."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from libs.common.mail.can_send import STOPPING_DELIVERY_STATUSES
from libs.common.mail.states import (
    LEFT,
    MEMBERSHIP_CHANGE_STATES,
    ChangeMethod,
    DeliveryStatus,
    MembershipState,
)
from services.contacts.search import MEMBER_FLAG, STATE_FLAGS
from services.suppression.processor import RANK

ROOT = Path(__file__).resolve().parents[2]
MEMBERSHIP = set(MembershipState.values())
DELIVERY = set(DeliveryStatus.values())
#: literals that can only mean one of the two vocabularies (``error``, ``spam``... have
#: other meanings too: outcomes, bounce classifications).
DISTINCTIVE = MEMBERSHIP | {"unconfirmed", "temporary_error"}


def _sql(path: str) -> str:
    """The file without its ``--`` comments."""
    return re.sub(r"--[^\n]*", "", (ROOT / path).read_text())


def _named(path: str, name: str) -> str:
    """One named block of a queries.sql file, without its comments."""
    block = (ROOT / path).read_text().split(f"-- name: {name}\n", 1)[1].split(";", 1)[0]
    return re.sub(r"--[^\n]*", "", block)


def _literals(text: str) -> list[str]:
    return re.findall(r"'([^']*)'", text)


def _check_in(path: str, column: str) -> list[set[str]]:
    """The literal sets of every ``CHECK (<column> IN (...))`` in ``path``."""
    found = re.findall(rf"CHECK \({column} IN\s*\(([^)]*)\)\)", _sql(path))
    return [set(_literals(group)) for group in found]


def _case(path: str, function: str) -> tuple[dict[str, int], int]:
    """``CASE state WHEN 'a' THEN 1 ... ELSE n END`` of ``function``: the WHENs and the ELSE."""
    body = _sql(path).split(f"FUNCTION {function}(", 1)[1]
    case = re.search(r"CASE state (.*?) ELSE (\d+) END", body, re.S)
    assert case is not None
    whens = {k: int(v) for k, v in re.findall(r"WHEN '(\w+)' THEN (\d+)", case.group(1))}
    return whens, int(case.group(2))


def _with(values: set[str], path: str) -> set[str]:
    return {literal for literal in _literals(_sql(path)) if literal in values}


#: every SQL file that spells a distinctive value, and the test below that checks it.
CHECKED = {
    "services/contacts/migrations/0001_contacts.sql": "test_check_constraints",
    "services/contacts/migrations/0002_search_indexes.sql": "test_stopped_memberships_index",
    "services/contacts/migrations/0003_membership_flags.sql": "test_membership_flag_bits",
    "services/suppression/migrations/0001_suppression.sql": "test_check_constraints",
    "services/bounce_processor/migrations/0001_bounce_processor.sql": "test_check_constraints",
    "services/contacts/migrations/0006_delivery_status_bounced.sql": "test_check_constraints",
    "services/bounce_processor/migrations/0003_delivery_status_bounced.sql": (
        "test_check_constraints"
    ),
    "services/suppression/queries.sql": "test_query_literals",
    "services/scheduler/queries.sql": "test_query_literals",
    "services/suppression/migrations/0005_daily_stats.sql": "test_daily_stats_literals",
    "services/bounce_processor/queries.sql": "test_daily_stats_literals",
    "services/sender/queries.sql": "test_daily_stats_literals",
}


def test_the_enums_are_the_wire_strings() -> None:
    assert MembershipState.values() == ("deliverable", "unsubscribed", "banned")
    assert DeliveryStatus.values() == (
        "unconfirmed",
        "ok",
        "invalid_address",
        "error",
        "temporary_error",
        "spam",
        "bounced",
    )
    assert MembershipState.labels() == {
        "deliverable": "配信可能",
        "unsubscribed": "配信停止",
        "banned": "配信禁止",
    }
    assert MEMBERSHIP_CHANGE_STATES == (*MembershipState.values(), LEFT)
    assert STOPPING_DELIVERY_STATUSES <= DELIVERY
    assert all(type(v) is str for v in MembershipState.values() + DeliveryStatus.values())


def test_change_methods_are_suppressions_methods() -> None:
    """配信停止方法 labels cover exactly the methods suppression stores."""
    [methods] = _check_in("services/suppression/migrations/0001_suppression.sql", "method")
    assert set(ChangeMethod.values()) == methods
    assert ChangeMethod.labels()["auto_stop"] == "自動停止"


def test_every_sql_file_spelling_the_values_is_checked() -> None:
    spelling = {
        str(path.relative_to(ROOT))
        for path in sorted(ROOT.glob("services/*/migrations/*.sql"))
        + sorted(ROOT.glob("services/*/queries.sql"))
        if _with(DISTINCTIVE, str(path.relative_to(ROOT)))
    }
    assert spelling == set(CHECKED)


@pytest.mark.parametrize(
    ("path", "column", "values"),
    [
        ("services/contacts/migrations/0001_contacts.sql", "state", MEMBERSHIP),
        ("services/suppression/migrations/0001_suppression.sql", "state", MEMBERSHIP),
        (
            "services/contacts/migrations/0006_delivery_status_bounced.sql",
            "delivery_status",
            DELIVERY,
        ),
        (
            "services/bounce_processor/migrations/0003_delivery_status_bounced.sql",
            "delivery_status",
            DELIVERY,
        ),
    ],
)
def test_check_constraints(path: str, column: str, values: set[str]) -> None:
    """The newest CHECK of each column holds exactly the enum's values."""
    assert _check_in(path, column) == [values]


@pytest.mark.parametrize(
    ("path", "newer"),
    [
        (
            "services/contacts/migrations/0001_contacts.sql",
            "services/contacts/migrations/0006_delivery_status_bounced.sql",
        ),
        (
            "services/bounce_processor/migrations/0001_bounce_processor.sql",
            "services/bounce_processor/migrations/0003_delivery_status_bounced.sql",
        ),
    ],
)
def test_replaced_delivery_status_checks_are_replaced_by_name(path: str, newer: str) -> None:
    """An older CHECK of delivery_status is dropped by the newer migration, by its name."""
    assert _check_in(path, "delivery_status")
    table = "contact_state" if "bounce_processor" in path else "contact"
    assert f"DROP CONSTRAINT IF EXISTS {table}_delivery_status_check" in _sql(newer)


def test_stopped_memberships_index() -> None:
    stopped = MEMBERSHIP - {MembershipState.DELIVERABLE.value}
    assert _with(MEMBERSHIP, "services/contacts/migrations/0002_search_indexes.sql") == stopped


def test_membership_flag_bits() -> None:
    """The trigger's bits per state are what search reads (``MEMBER_FLAG``, ``STATE_FLAGS``)."""
    whens, otherwise = _case(
        "services/contacts/migrations/0003_membership_flags.sql", "membership_state_bits"
    )
    bits = {state: whens.get(state, otherwise) for state in MEMBERSHIP}
    assert set(whens) == set(STATE_FLAGS)
    assert bits == {state: MEMBER_FLAG | STATE_FLAGS.get(state, 0) for state in MembershipState}


def test_suppression_state_rank() -> None:
    """The SQL rank that propagation uses is the processor's ``RANK``."""
    whens, otherwise = _case("services/suppression/migrations/0001_suppression.sql", "state_rank")
    assert {state: whens.get(state, otherwise) for state in MEMBERSHIP} == RANK


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("services/suppression/queries.sql", MEMBERSHIP),
        ("services/scheduler/queries.sql", {"deliverable"}),
    ],
)
def test_query_literals(path: str, expected: set[str]) -> None:
    assert _with(DISTINCTIVE, path) == expected <= MEMBERSHIP


def test_daily_stats_literals() -> None:
    """The figures per day (issue 20) name states, classifications and outcomes that exist:
    the refused-memberships index leaves out exactly the deliverable rows, the bounce
    counts name the bounce table's classifications, the send counts delivery.results'
    outcomes."""
    index = "services/suppression/migrations/0005_daily_stats.sql"
    assert _with(DISTINCTIVE, index) == {MembershipState.DELIVERABLE.value}
    [classifications] = _check_in(
        "services/bounce_processor/migrations/0001_bounce_processor.sql", "classification"
    )
    bounces = _named("services/bounce_processor/queries.sql", "daily-bounces")
    assert set(_literals(bounces)) == classifications
    schema = json.loads((ROOT / "schemas/avro/delivery.results.avsc").read_text())
    [outcome] = [f for f in schema["fields"] if f["name"] == "outcome"]
    sends = _named("services/sender/queries.sql", "daily-sends")
    assert set(_literals(sends)) - {"campaign", "done"} == set(outcome["type"]["symbols"])
