"""F-04 CSV import through the real service: upload → job → contacts, errors, jobs.events."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from typing import Any

import aiohttp
import pytest

from libs.common.topics import Topic
from services.contacts import imports
from services.contacts.context import CONTEXT, Context
from tests.conftest import OPERATOR_TOKEN, VIEWER_TOKEN, eventually, running

PLAN_FIELD = {"key": "plan", "label": "契約プラン", "type": "choice", "choices": ["free", "pro"]}

# Japanese headings (aliases and a custom field's label); line numbers on the right.
MIXED_ROWS = [
    "メールアドレス,顧客ID,氏名,情報獲得日,営業ステータス,契約プラン,メモ",  # 1
    "taro@example.jp,C-1,山田 太郎,2024-04-01,返信済,pro,",  # 2 ok
    "not-an-email,C-2,鈴木 一郎,,,,",  # 3 email
    'hanako@example.jp,C-3,佐藤 花子,2024/5/6,,free,"一行目',  # 4 ok
    '二行目"',  # 5
    "jiro@example.jp,C-4,田中 次郎,2024-02-30,,,",  # 6 date
    "saburo@example.jp,C-5,高橋 三郎,,,gold,",  # 7 choice
    "shiro@example.jp,C-900,伊藤 四郎,,,,",  # 8 ext id
    "taro@example.jp,,山田 太郎（更新）,,,,",  # 9 upd. 2
    "goro@example.jp,C-6,渡辺 五郎,,,,①㈱",  # 10 ok
]
MIXED_ERRORS = [(3, "email"), (6, "acquired_at"), (7, "custom.plan"), (8, "external_id")]


def _ctx(service: Any) -> Context:
    return service.runtime.app[CONTEXT]


def _form(payload: bytes, filename: str = "contacts.csv", **options: str) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for name, value in options.items():
        form.add_field(name, value)
    form.add_field("file", payload, filename=filename, content_type="text/csv")
    return form


async def _upload(
    service: Any, payload: bytes, *, token: str = OPERATOR_TOKEN, **options: str
) -> tuple[int, Any]:
    return await service.api.call(
        "POST", "/v1/imports", token=token, data=_form(payload, **options)
    )


async def _finished(service: Any, job_id: str) -> dict[str, Any]:
    async def check() -> Any:
        job = await service.api.ok("GET", f"/v1/imports/{job_id}")
        return job if job["status"] in ("done", "failed") else None

    job: dict[str, Any] = await eventually(check)
    assert job["status"] == "done", job
    return job


async def _import(service: Any, payload: bytes, **options: str) -> dict[str, Any]:
    status, body = await _upload(service, payload, **options)
    assert status == 202, body
    assert body["status"] == "queued"
    return await _finished(service, body["id"])


async def _find(service: Any, email: str) -> dict[str, Any] | None:
    body = await service.api.ok(
        "POST", "/v1/contacts/search", {"filter": {"field": "email", "op": "eq", "value": email}}
    )
    assert body["total"] <= 1
    return body["items"][0] if body["items"] else None


async def _post_raw(service: Any, body: bytes, content_type: str, **params: str) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {OPERATOR_TOKEN}", "Content-Type": content_type}
    async with service.api.session.post(
        service.api.base + "/v1/imports", data=body, headers=headers, params=params
    ) as response:
        return response.status, await response.json()


def _csv(lines: list[str], newline: str = "\n") -> str:
    return newline.join(lines) + newline


@pytest.mark.parametrize(
    ("label", "encoding", "option", "detected"),
    [
        ("utf-8", "utf-8", "utf-8", "utf-8"),
        ("utf-8 with BOM", "utf-8-sig", "auto", "utf-8-sig"),
        ("cp932 (Excel)", "cp932", "auto", "cp932"),
    ],
)
async def test_mixed_rows_per_encoding(contacts, kafka, label, encoding, option, detected):
    await contacts.api.ok("POST", "/v1/fields", PLAN_FIELD)
    await contacts.api.ok(
        "POST", "/v1/contacts", {"email": "owner@example.jp", "external_id": "C-900"}
    )
    ctx = _ctx(contacts)
    ctx.settings = dataclasses.replace(ctx.settings, import_chunk_rows=3)  # several chunks
    payload = _csv(MIXED_ROWS, "\r\n" if encoding == "cp932" else "\n").encode(encoding)

    status, accepted = await _upload(contacts, payload, encoding=option)
    assert status == 202, accepted
    assert (accepted["total"], accepted["encoding"], accepted["mode"], accepted["key"]) == (
        8,
        detected,
        "insert_or_update",
        "email",
    )
    assert accepted["mapping"]["契約プラン"] == "custom.plan"
    job = await _finished(contacts, accepted["id"])

    assert {
        k: job[k] for k in ("total", "inserted", "updated", "skipped", "failed", "processed")
    } == {"total": 8, "inserted": 3, "updated": 1, "skipped": 0, "failed": 4, "processed": 8}
    assert [(e["line"], e["field"]) for e in job["errors"]] == MIXED_ERRORS
    assert "2024-02-30" in job["errors"][1]["message"]
    assert job["filename"] == "contacts.csv" and job["created_at"] and job["updated_at"]

    taro = await _find(contacts, "taro@example.jp")
    assert taro is not None
    assert (taro["name"], taro["external_id"], taro["acquired_at"], taro["sales_status"]) == (
        "山田 太郎（更新）",
        "C-1",
        "2024-04-01",
        "replied",
    )  # line 9 updated line 2's contact
    assert taro["custom_fields"] == {"plan": "pro"}
    hanako = await _find(contacts, "hanako@example.jp")
    assert hanako["memo"].splitlines() == ["一行目", "二行目"]
    assert hanako["acquired_at"] == "2024-05-06"
    assert (await _find(contacts, "goro@example.jp"))["memo"] == "①㈱"
    for email in ("jiro@example.jp", "saburo@example.jp", "shiro@example.jp"):
        assert await _find(contacts, email) is None
    owner = await _find(contacts, "owner@example.jp")
    assert owner["external_id"] == "C-900" and owner["name"] is None

    events = await kafka.read(
        Topic.JOBS_EVENTS,
        until=lambda rs: any(r["job_id"] == accepted["id"] and r["status"] == "done" for r in rs),
    )
    mine = [e for e in events if e["job_id"] == accepted["id"]]
    assert [e["status"] for e in mine] == ["queued", "running", "running", "running", "done"]
    done = mine[-1]
    assert (
        done["kind"],
        done["service"],
        done["total"],
        done["processed"],
        done["succeeded"],
        done["failed"],
    ) == ("import", "contacts", 8, 8, 4, 4)
    assert [(e["line"], e["field"]) for e in done["errors"]] == MIXED_ERRORS
    assert done["title"] == "CSV import contacts.csv"


async def test_update_only_and_insert_only(contacts):
    await contacts.api.ok("POST", "/v1/contacts", {"email": "a@example.jp", "name": "旧A"})
    await contacts.api.ok("POST", "/v1/contacts", {"email": "b@example.jp", "name": "旧B"})

    rows = ["email,name", "a@example.jp,新A", "new@example.jp,新規"]
    job = await _import(contacts, _csv(rows).encode(), mode="update_only")
    assert (job["updated"], job["skipped"], job["inserted"], job["failed"]) == (1, 1, 0, 0)
    assert (await _find(contacts, "a@example.jp"))["name"] == "新A"
    assert await _find(contacts, "new@example.jp") is None

    rows = ["email,name", "b@example.jp,新B", "c@example.jp,新C"]
    job = await _import(contacts, _csv(rows).encode(), mode="insert_only")
    assert (job["updated"], job["skipped"], job["inserted"], job["failed"]) == (0, 1, 1, 0)
    assert (await _find(contacts, "b@example.jp"))["name"] == "旧B"
    assert (await _find(contacts, "c@example.jp"))["name"] == "新C"


async def test_external_id_key(contacts):
    await contacts.api.ok("POST", "/v1/contacts", {"email": "k1@example.jp", "external_id": "K-1"})
    # Update by upstream id, changing the address; a new id with a new address is created;
    # a new id whose address belongs to a contact with another id is refused.
    await contacts.api.ok("POST", "/v1/contacts", {"email": "k2@example.jp", "external_id": "K-2"})
    rows = [
        "顧客ID,メールアドレス,会社名",
        "K-1,k1-new@example.jp,新社名",
        "K-3,k3@example.jp,三社",
        "K-4,k2@example.jp,四社",
        "K-5,,五社",
    ]
    job = await _import(contacts, _csv(rows).encode(), key="external_id")
    assert (job["inserted"], job["updated"], job["failed"]) == (1, 1, 2)
    assert [(e["line"], e["field"]) for e in job["errors"]] == [(4, "email"), (5, "email")]
    moved = await _find(contacts, "k1-new@example.jp")
    assert (moved["external_id"], moved["company"]) == ("K-1", "新社名")
    assert (await _find(contacts, "k3@example.jp"))["external_id"] == "K-3"

    job = await _import(
        contacts,
        _csv(["顧客ID,会社名", "K-3,更新", "K-9,無し"]).encode(),
        key="external_id",
        mode="update_only",
    )
    assert (job["updated"], job["skipped"], job["failed"]) == (1, 1, 0)
    assert (await _find(contacts, "k3@example.jp"))["company"] == "更新"


async def test_rows_apply_as_if_one_by_one_in_file_order(contacts):
    # One chunk, applied in batches (store.upsert_run), with the outcome of row by row: a
    # row may take the address an earlier row freed, a refusal costs no other row, and the
    # same key twice updates the contact its first row created.
    await contacts.api.ok("POST", "/v1/contacts", {"email": "f1@example.jp", "external_id": "F-1"})
    await contacts.api.ok("POST", "/v1/contacts", {"email": "f2@example.jp", "external_id": "F-2"})
    rows = [
        "顧客ID,メールアドレス,氏名",
        "F-1,f1-new@example.jp,移動",  # 2: F-1 leaves f1@
        "F-3,f1@example.jp,後任",  # 3: takes the address line 2 freed: a new contact
        "F-4,f2@example.jp,重複",  # 4: f2@ is F-2's: refused
        "F-5,f5@example.jp,五",  # 5
        "F-3,,後任（更新）",  # 6: updates the contact of line 3, its address unchanged
    ]
    job = await _import(contacts, _csv(rows).encode(), key="external_id")
    assert (job["inserted"], job["updated"], job["failed"]) == (2, 2, 1)
    assert [(e["line"], e["field"]) for e in job["errors"]] == [(4, "email")]
    successor = await _find(contacts, "f1@example.jp")
    assert (successor["external_id"], successor["name"]) == ("F-3", "後任（更新）")
    assert (await _find(contacts, "f1-new@example.jp"))["external_id"] == "F-1"
    assert (await _find(contacts, "f2@example.jp"))["external_id"] == "F-2"
    assert (await _find(contacts, "f5@example.jp"))["name"] == "五"


async def test_a_row_the_database_refuses_costs_no_other_row(contacts):
    # As if a concurrent writer took the address after the chunk's checks: the database
    # refuses that row's insert; the rows around it are still applied.
    await contacts.runtime.pool.execute(
        """
        CREATE FUNCTION taken() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.email = 'taken@example.jp' THEN
                RAISE unique_violation USING CONSTRAINT = 'contact_email_key';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER taken BEFORE INSERT ON contact FOR EACH ROW EXECUTE FUNCTION taken();
        """
    )
    rows = ["email,name", "d1@example.jp,一", "taken@example.jp,二", "d3@example.jp,三"]
    job = await _import(contacts, _csv(rows).encode())
    assert (job["inserted"], job["failed"]) == (2, 1)
    assert [(e["line"], e["field"]) for e in job["errors"]] == [(3, "email")]
    assert job["errors"][0]["message"].startswith("refused by the database")
    assert await _find(contacts, "d1@example.jp") and await _find(contacts, "d3@example.jp")


async def test_custom_fields_are_typed_and_mapping_and_raw_body(contacts):
    for field in (
        {"key": "seats", "label": "席数", "type": "number"},
        {"key": "since", "label": "契約日", "type": "date"},
        {"key": "active", "label": "有効", "type": "boolean"},
    ):
        await contacts.api.ok("POST", "/v1/fields", field)
    rows = [
        "Mail,Seats,契約日,有効,Ignored",
        't@example.jp,"1,200",2024/1/2,はい,x',
        "u@example.jp,many,,,",
        "v@example.jp,3.5,,false,",
    ]
    mapping = {"Mail": "email", "Seats": "custom.seats", "Ignored": ""}
    job = await _import(contacts, _csv(rows).encode(), mapping=json.dumps(mapping))
    assert (job["inserted"], job["failed"]) == (2, 1)
    assert [(e["line"], e["field"]) for e in job["errors"]] == [(3, "custom.seats")]
    assert "'many'" in job["errors"][0]["message"]
    assert job["mapping"] == {
        "Mail": "email",
        "Seats": "custom.seats",
        "契約日": "custom.since",
        "有効": "custom.active",
        "Ignored": "",
    }
    row = await contacts.runtime.pool.fetchrow(
        "SELECT custom FROM contact WHERE email = $1", "t@example.jp"
    )
    assert row["custom"] == {"seats": 1200, "since": "2024-01-02", "active": True}
    v = await _find(contacts, "v@example.jp")
    assert v["custom_fields"] == {"seats": 3.5, "active": False}

    # The same API with a text/csv body and the options as query parameters.
    body = _csv(["メールアドレス,席数", "w@example.jp,7"]).encode("cp932")
    status, accepted = await _post_raw(
        contacts, body, "text/csv", encoding="cp932", mode="insert_only", filename="w.csv"
    )
    assert status == 202, accepted
    job = await _finished(contacts, accepted["id"])
    assert (job["inserted"], job["encoding"], job["filename"]) == (1, "cp932", "w.csv")
    assert (await _find(contacts, "w@example.jp"))["custom_fields"] == {"seats": 7}


REFUSED = [
    (b"email\na@example.jp\n", {"encoding": "latin-1"}, "encoding", "encoding must be one of"),
    (
        "email,name\na@example.jp,山田\n".encode("cp932"),
        {"encoding": "utf-8"},
        "encoding",
        "line 2: byte 0x8e is not valid utf-8",
    ),
    (b"email,favourite\na@example.jp,x\n", {}, "mapping", "column 'favourite' matches no field"),
    (b"email\na@example.jp\n", {"mode": "upsert"}, "mode", "mode must be one of"),
    (b"email\na@example.jp\n", {"key": "id"}, "key", "key must be one of"),
    (b"name\nx\n", {}, "key", "no column for the key field email"),
    (b"email\na@example.jp\n", {"mapping": "{not json"}, "mapping", "JSON object"),
    (b"email,x\na@example.jp,1\n", {"mapping": '{"x": "score"}'}, "mapping", "'score' is not"),
    (b"", {}, "file", "header row"),
    (b'email,memo\na@example.jp,"open\n', {}, "file", "line 2: malformed CSV"),
    (
        b"email,name\na@example.jp,x\n",
        {"mapping": '{"name": "", "memo": "memo"}'},
        "mapping",
        "mapping names column 'memo'",
    ),
    (b"email,email\na@example.jp,x\n", {}, "file", "column 'email' appears twice"),
]


async def test_refused_uploads(contacts):
    for payload, options, field, message in REFUSED:
        status, body = await _upload(contacts, payload, **options)
        assert status == 400, (options, body)
        assert (body["field"], message in body["error"]) == (field, True), (message, body)
    assert await contacts.runtime.pool.fetchval("SELECT count(*) FROM import_job") == 0


async def test_roles_size_limit_and_listing(contacts):
    status, _ = await _upload(contacts, b"email\na@example.jp\n", token=VIEWER_TOKEN)
    assert status == 403
    status, body = await _post_raw(contacts, b"{}", "application/json")
    assert status == 400 and body["field"] == "file"

    ctx = _ctx(contacts)
    ctx.settings = dataclasses.replace(ctx.settings, import_max_bytes=64)
    status, body = await _upload(contacts, b"email\n" + b"a@example.jp\n" * 10)
    assert status == 413 and body["field"] == "file"
    ctx.settings = dataclasses.replace(ctx.settings, import_max_bytes=1 << 20)

    first = await _import(contacts, b"email\na@example.jp\n", encoding="utf-8")
    second = await _import(contacts, b"email\n", encoding="utf-8")  # a header alone: done, 0 rows
    assert (second["total"], second["processed"], second["errors"]) == (0, 0, [])
    listing = await contacts.api.ok("GET", "/v1/imports", token=VIEWER_TOKEN)
    assert [j["id"] for j in listing["items"]] == [second["id"], first["id"]]
    assert "payload" not in listing["items"][0] and "errors" not in listing["items"][0]
    status, _ = await contacts.api.call("GET", f"/v1/imports/{uuid.uuid4()}")
    assert status == 404


def _resume_payload() -> bytes:
    return _csv(
        [
            "email,memo",
            "r1@example.jp,",
            'r2@example.jp,"a',
            'b"',
            "r3@example.jp,",
            "bad,",
            "r4@example.jp,",
        ]
    ).encode()


async def _insert_job(
    service: Any, *, status: str, next_line: int, inserted: int = 0, failed: int = 0
) -> str:
    job_id = str(uuid.uuid4())
    await service.runtime.pool.execute(
        "INSERT INTO import_job (id, status, mode, key_field, encoding, mapping, payload, total,"
        " next_line, inserted, failed) VALUES ($1, $2, 'insert_or_update', 'email', 'utf-8', $3,"
        " $4, 5, $5, $6, $7)",
        job_id,
        status,
        {"email": "email", "memo": "memo"},
        _resume_payload(),
        next_line,
        inserted,
        failed,
    )
    return job_id


async def test_resume_processes_only_the_rows_after_the_checkpoint(
    stack, database, prefix, contacts, kafka
):
    # Lines 2–4 (r1, and r2 whose memo spans lines 3–4) were committed before a restart.
    job_id = await _insert_job(contacts, status="running", next_line=5, inserted=2)
    async with running("contacts", stack, database, prefix):  # the restarted service
        job = await _finished(contacts, job_id)
    assert (job["total"], job["inserted"], job["failed"], job["next_line"]) == (5, 4, 1, 8)
    assert [(e["line"], e["field"]) for e in job["errors"]] == [(6, "email")]
    rows = await contacts.runtime.pool.fetch("SELECT email FROM contact")
    assert {r["email"] for r in rows} == {"r3@example.jp", "r4@example.jp"}
    events = await kafka.read(
        Topic.JOBS_EVENTS,
        until=lambda rs: any(r["job_id"] == job_id and r["status"] == "done" for r in rs),
    )
    assert [e["status"] for e in events if e["job_id"] == job_id] == ["running", "done"]


async def test_two_runners_of_one_job_apply_it_once(contacts, kafka):
    # Two replicas starting together both run the job; the checkpoint, checked under the
    # job's row lock in every chunk, lets one of them apply each chunk and the other step
    # aside.
    job_id = await _insert_job(contacts, status="queued", next_line=0)
    runtime = contacts.runtime
    settings = dataclasses.replace(runtime.settings, import_chunk_rows=2)
    replicas = [Context(settings, runtime.pool, runtime.publisher) for _ in range(2)]
    await asyncio.gather(*(imports.run(ctx, job_id) for ctx in replicas))
    job = await _finished(contacts, job_id)
    assert (job["inserted"], job["updated"], job["failed"]) == (4, 0, 1)
    assert [e["line"] for e in job["errors"]] == [6]
    emails = await runtime.pool.fetch("SELECT email FROM contact ORDER BY id")
    assert [r["email"] for r in emails] == [f"r{n}@example.jp" for n in range(1, 5)]

    await imports.run(replicas[0], job_id)  # a finished job is not run again
    assert (await _finished(contacts, job_id))["inserted"] == 4
    events = await kafka.read(
        Topic.JOBS_EVENTS,
        until=lambda rs: any(r["job_id"] == job_id and r["status"] == "done" for r in rs),
    )
    # three chunks of two records (r1 r2, r3 bad, r4), each committed once, then the end
    assert [e["status"] for e in events if e["job_id"] == job_id] == [*["running"] * 3, "done"]
