"""processor.membership_writes: a batch of suppression.changes reduced to one delete and one
conditional upsert per membership does exactly what applying the changes one by one does
(the projection before the batch reduction: "left" deletes, a change applies when nothing
newer is held)."""

from __future__ import annotations

import datetime as dt
import itertools
import random
from typing import Any

from services.contacts.processor import membership_writes

T0 = dt.datetime(2026, 11, 26, tzinfo=dt.UTC)
Row = tuple[str, str, dt.datetime]
Held = dict[tuple[int, int], Row]


def change(contact: int, group: int, state: str, minute: int, method: str = "system") -> dict:
    return {
        "contact_id": contact,
        "group_id": group,
        "state": state,
        "method": method,
        "changed_at": T0 + dt.timedelta(minutes=minute),
    }


def one_by_one(held: Held, changes: list[dict[str, Any]]) -> Held:
    """The statements as they were, one per change."""
    held = dict(held)
    for c in changes:
        key = (c["contact_id"], c["group_id"])
        if c["state"] == "left":
            held.pop(key, None)
        elif key not in held or held[key][2] <= c["changed_at"]:
            held[key] = (c["state"], c["method"], c["changed_at"])
    return held


def reduced(held: Held, changes: list[dict[str, Any]]) -> Held:
    """The two statements of the handler now: the deletes, then the conditional upsert."""
    left, applied = membership_writes(changes)
    held = {k: v for k, v in held.items() if k not in left}
    for c in applied:
        key = (c["contact_id"], c["group_id"])
        assert key not in [(a["contact_id"], a["group_id"]) for a in applied if a is not c]
        if key not in held or held[key][2] <= c["changed_at"]:
            held[key] = (c["state"], c["method"], c["changed_at"])
    return held


def test_examples():
    held: Held = {(1, 1): ("deliverable", "system", T0 + dt.timedelta(minutes=5))}
    batch = [
        change(1, 1, "unsubscribed", 7, "form"),
        change(1, 1, "banned", 6),  # older than the one before it: never applies
        change(1, 2, "unsubscribed", 3),
        change(2, 1, "deliverable", 9),
        change(2, 1, "left", 1),  # "left" deletes whatever its changed_at
        change(3, 1, "left", 4),
        change(3, 1, "banned", 2),  # after a "left": applies, the row is gone
        change(4, 1, "banned", 8),
        change(4, 1, "unsubscribed", 8),  # a tie: the later one wins
    ]
    left, applied = membership_writes(batch)
    assert left == [(2, 1), (3, 1)]
    assert [(c["contact_id"], c["group_id"], c["state"]) for c in applied] == [
        (1, 1, "unsubscribed"),
        (1, 2, "unsubscribed"),
        (3, 1, "banned"),
        (4, 1, "unsubscribed"),
    ]
    assert reduced(held, batch) == one_by_one(held, batch)
    assert membership_writes([]) == ([], [])


def test_every_short_sequence_on_one_membership():
    steps = [("left", 0)] + [(s, m) for s in ("deliverable", "banned") for m in (1, 2, 3)]
    for before in (None, 0, 2, 4):
        held: Held = (
            {}
            if before is None
            else {(1, 1): ("unsubscribed", "x", T0 + dt.timedelta(minutes=before))}
        )
        for length in range(1, 5):
            for sequence in itertools.product(steps, repeat=length):
                batch = [change(1, 1, s, m, f"m{i}") for i, (s, m) in enumerate(sequence)]
                assert reduced(held, batch) == one_by_one(held, batch), (before, sequence)


def test_random_batches_of_several_memberships():
    rng = random.Random(3)
    states = ["deliverable", "unsubscribed", "banned", "left"]
    for _ in range(3000):
        held: Held = {
            (c, g): ("deliverable", "seed", T0 + dt.timedelta(minutes=rng.randrange(6)))
            for c in range(3)
            for g in range(2)
            if rng.random() < 0.5
        }
        batch = [
            change(
                rng.randrange(3), rng.randrange(2), rng.choice(states), rng.randrange(6), f"m{i}"
            )
            for i in range(rng.randrange(1, 12))
        ]
        assert reduced(held, batch) == one_by_one(held, batch), (held, batch)
