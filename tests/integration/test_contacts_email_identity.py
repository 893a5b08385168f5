"""One person, one address (issue 18 #8): an address's identity ignores case on every way in
(the API, contacts.events, imports), what was typed is kept for display, and the migration
that makes it so keeps and reports rows that already collide instead of losing one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from libs.common import db
from libs.common.topics import Topic
from services.contacts import maintenance
from services.contacts.app import MIGRATIONS, SCHEMA
from services.contacts.context import CONTEXT
from tests.conftest import Stack, eventually
from tests.integration.test_contacts_ingest import upserted
from tests.integration.test_imports import _csv, _import


async def _rows(service: Any, address: str) -> list[dict[str, Any]]:
    rows = await service.runtime.pool.fetch(
        "SELECT * FROM contact WHERE lower(email) = lower($1) ORDER BY id", address
    )
    return [dict(r) for r in rows]


async def test_the_api_refuses_an_address_in_another_case(contacts):
    api = contacts.api
    norm = await api.ok("POST", "/v1/contacts", {"email": "Norm@example.jp", "name": "ノーム"})
    for taken in ("norm@example.jp", "NORM@EXAMPLE.JP"):
        status, body = await api.call("POST", "/v1/contacts", {"email": taken})
        assert status == 409, body
        assert body["detail"] == "a contact with this email already exists"
    other = await api.ok("POST", "/v1/contacts", {"email": "other@example.jp"})
    status, body = await api.call(
        "PATCH", f"/v1/contacts/{other['id']}", {"email": "nORM@example.jp"}
    )
    assert status == 409, body

    # The owner may change the case of its own address; the display keeps what was typed.
    changed = await api.ok("PATCH", f"/v1/contacts/{norm['id']}", {"email": "norm@Example.JP"})
    assert changed["email"] == "norm@example.jp"
    assert [r["id"] for r in await _rows(contacts, "norm@example.jp")] == [norm["id"]]


async def test_an_event_in_another_case_updates_the_same_contact(contacts, kafka):
    norm = await contacts.api.ok("POST", "/v1/contacts", {"email": "Norm@example.jp"})
    await kafka.send(Topic.CONTACTS_EVENTS, "n", upserted("NORM@example.jp", name="大文字"))
    # New addresses differing by case in one batch: one contact, the later event updates it.
    await kafka.send(Topic.CONTACTS_EVENTS, "n", upserted("Pat@example.jp", name="一"))
    await kafka.send(Topic.CONTACTS_EVENTS, "n", upserted("pat@example.jp", name="二"))
    await kafka.send(Topic.CONTACTS_EVENTS, "n", upserted("last@example.jp"))

    await eventually(lambda: _rows(contacts, "last@example.jp"))
    (row,) = await _rows(contacts, "norm@example.jp")
    assert (row["id"], row["email"], row["name"]) == (norm["id"], "Norm@example.jp", "大文字")
    (pat,) = await _rows(contacts, "pat@example.jp")
    assert (pat["email"], pat["name"], pat["version"]) == ("Pat@example.jp", "二", 2)


async def test_an_import_in_another_case_updates_the_same_contact(contacts):
    norm = await contacts.api.ok("POST", "/v1/contacts", {"email": "Norm@example.jp"})
    rows = [
        "email,name",
        "NORM@EXAMPLE.JP,更新",  # 2: Norm@'s contact
        "Quinn@example.jp,一",  # 3: new
        "quinn@example.jp,二",  # 4: the contact line 3 created
    ]
    job = await _import(contacts, _csv(rows).encode())
    assert (job["inserted"], job["updated"], job["failed"]) == (1, 2, 0), job
    (row,) = await _rows(contacts, "norm@example.jp")
    assert (row["id"], row["email"], row["name"]) == (norm["id"], "Norm@example.jp", "更新")
    (quinn,) = await _rows(contacts, "quinn@example.jp")
    assert (quinn["email"], quinn["name"]) == ("Quinn@example.jp", "二")


async def _before_identity(stack: Stack, tmp_path: Path, name: str) -> tuple[str, list[Path]]:
    """A database migrated up to the migration that makes addresses case-insensitive."""
    before = tmp_path / "before"
    before.mkdir()
    files = [p for _, _, p in db.migration_files(MIGRATIONS)]
    identity = next(p for p in files if p.name.endswith("_email_identity.sql"))
    for path in files:
        if path.name < identity.name:
            (before / path.name).write_bytes(path.read_bytes())
    dsn = await stack.postgres.create_database(name)
    await db.migrate(dsn, SCHEMA, before)
    return dsn, files


async def test_the_migration_keeps_and_reports_colliding_rows(stack: Stack, tmp_path: Path):
    dsn, _ = await _before_identity(stack, tmp_path, "t_email_identity_collisions")
    conn = await db.connect(dsn, SCHEMA)
    try:
        ids = [
            await conn.fetchval("INSERT INTO contact (email) VALUES ($1) RETURNING id", email)
            for email in ("Norm@example.jp", "norm@example.jp", "solo@example.jp")
        ]
        applied = await db.migrate(dsn, SCHEMA, MIGRATIONS)
        assert applied[0].endswith("_email_identity.sql")

        assert await conn.fetchval("SELECT count(*) FROM contact") == 3  # nothing merged or lost
        collisions = await conn.fetch(
            "SELECT email_key, contact_id, email FROM contact_email_collision ORDER BY contact_id"
        )
        assert [tuple(r) for r in collisions] == [
            ("norm@example.jp", ids[0], "Norm@example.jp"),
            ("norm@example.jp", ids[1], "norm@example.jp"),
        ]
        # Every other address is already one identity: a third spelling of solo@ is refused.
        status = await conn.execute(
            "INSERT INTO contact (email) VALUES ('SOLO@example.jp') ON CONFLICT DO NOTHING"
        )
        assert status == "INSERT 0 0"
        # Once resolved, the re-check makes the key complete and the report empties.
        await conn.execute("UPDATE contact SET email = 'norm2@example.jp' WHERE id = $1", ids[1])
        assert await conn.fetchval("SELECT contact_email_identity()") == 0
        assert await conn.fetchval("SELECT count(*) FROM contact_email_collision") == 0
        assert (
            await conn.fetchval(
                "SELECT indexdef FROM pg_indexes WHERE schemaname = $1"
                " AND indexname = 'contact_email_identity_key'",
                SCHEMA,
            )
            == "CREATE UNIQUE INDEX contact_email_identity_key"
            f" ON {SCHEMA}.contact USING btree (lower(email))"
        )
        assert await conn.fetchval("SELECT to_regclass('contact_email_key')") is None
    finally:
        await conn.close()


async def test_the_migration_without_collisions_makes_the_key_at_once(stack: Stack, tmp_path: Path):
    dsn, _ = await _before_identity(stack, tmp_path, "t_email_identity_clean")
    conn = await db.connect(dsn, SCHEMA)
    try:
        await conn.execute("INSERT INTO contact (email) VALUES ('Norm@example.jp')")
        await db.migrate(dsn, SCHEMA, MIGRATIONS)
        partial = await conn.fetchval(
            "SELECT indpred IS NOT NULL FROM pg_index"
            " WHERE indexrelid = to_regclass('contact_email_identity_key')"
        )
        assert partial is False
        assert await conn.fetchval("SELECT to_regclass('contact_email_key')") is None
        assert await conn.fetchval("SELECT to_regclass('contact_email_lower_idx')") is None
    finally:
        await conn.close()


async def test_operators_see_collisions_and_resolve_them(contacts, kafka):
    # As a database migrated while it held two spellings of one address.
    pool = contacts.runtime.pool
    await pool.execute(
        "DROP INDEX contact_email_identity_key;"
        " CREATE UNIQUE INDEX contact_email_key ON contact (email);"
        " INSERT INTO contact (email, name)"
        " VALUES ('Norm@example.jp', '一'), ('norm@example.jp', '二');"
        " SELECT contact_email_identity();"
    )
    first, second = await _rows(contacts, "norm@example.jp")
    listed = await contacts.api.ok("GET", "/v1/contacts/email-collisions")
    assert listed["total"] == 2
    assert [(c["contact_id"], c["email"]) for c in listed["items"]] == [
        (first["id"], "Norm@example.jp"),
        (second["id"], "norm@example.jp"),
    ]
    # Meanwhile a third spelling is refused and an event goes to its exact spelling.
    status, _ = await contacts.api.call("POST", "/v1/contacts", {"email": "NORM@example.jp"})
    assert status == 409
    await kafka.send(Topic.CONTACTS_EVENTS, "n", upserted("norm@example.jp", memo="届いた"))
    await eventually(
        lambda: pool.fetchval("SELECT memo = '届いた' FROM contact WHERE id = $1", second["id"])
    )
    assert len(await _rows(contacts, "norm@example.jp")) == 2

    # The operator's fix: delete (or re-address) one of the pair; maintenance completes the key.
    await contacts.api.ok("DELETE", f"/v1/contacts/{second['id']}")
    await maintenance.run_once(contacts.runtime.app[CONTEXT])
    assert (await contacts.api.ok("GET", "/v1/contacts/email-collisions"))["total"] == 0
    status, _ = await contacts.api.call("POST", "/v1/contacts", {"email": "norm@EXAMPLE.jp"})
    assert status == 409
