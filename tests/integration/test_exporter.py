"""The exporter end to end (F-40 to F-43): real contacts, suppression and scheduler
services, the embedded broker and PostgreSQL, files read back with Python's csv module.

Rows come from contacts' ``POST /v1/contacts/stream``; every file is compared cell by cell
with the contacts API's view of the same rows. Time for link expiry is a FakeClock.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime as dt
import io
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from libs.common.topics import Topic
from services.exporter.context import context_of
from services.scheduler.clock import FakeClock
from tests.conftest import (
    OPERATOR_TOKEN,
    VIEWER_TOKEN,
    Service,
    eventually,
    running,
)
from tests.integration.test_contacts_projections import membership_change

PEOPLE = [
    ("山田 太郎", "ヤマダ タロウ", "株式会社さくら", "pro"),
    ("佐藤 花子", "サトウ ハナコ", "=HYPERLINK(\"http://evil\")", "free"),
    ("髙橋 一郎", "タカハシ イチロウ", "+81 3-1234-5678", "pro"),
    ("鈴木 美咲", "スズキ ミサキ", "-10", "free"),
    ("田中 健", "タナカ ケン", "@SUM(A1)", "pro"),
    ("伊藤 陽菜", "イトウ ヒナ", "=1+2 (合同会社)", "free"),
    ("渡辺 🍣", "ワタナベ", "改行\r\n商会, \"引用\"", "pro"),
]


async def _field(contacts: Service) -> None:
    await contacts.api.ok(
        "POST",
        "/v1/fields",
        {"key": "plan", "label": "契約プラン", "type": "choice", "choices": ["free", "pro"]},
    )


async def people(contacts: Service, tag: str = "展示会") -> list[dict[str, Any]]:
    """The PEOPLE as contacts (in id order), tagged ``tag``."""
    await _field(contacts)
    made = []
    for i, (name, kana, company, plan) in enumerate(PEOPLE):
        made.append(
            await contacts.api.ok(
                "POST",
                "/v1/contacts",
                {
                    "email": f"person{i}@example.jp",
                    "name": name,
                    "name_kana": kana,
                    "company": company,
                    "tags": [tag, "顧客"],
                    "custom_fields": {"plan": plan},
                },
            )
        )
    return made


async def finished(service: Service, job_id: str, token: str | None = None) -> dict[str, Any]:
    async def check() -> Any:
        job = await service.api.ok("GET", f"/v1/exports/{job_id}", **_token(token))
        return job if job["status"] in ("done", "failed") else None

    job: dict[str, Any] = await eventually(check, timeout=120)
    return job


def _token(token: str | None) -> dict[str, Any]:
    return {} if token is None else {"token": token}


async def export(service: Service, body: dict[str, Any], token: str | None = None) -> dict[str, Any]:
    status, job = await service.api.call("POST", "/v1/exports", body, **_token(token))
    assert status == 202, job
    assert job["status"] == "queued"
    return await finished(service, job["id"], token)


async def download(
    service: Service, job: dict[str, Any], token: str | None = None
) -> tuple[int, bytes]:
    link = urlsplit(job["download_url"])
    headers = {"Authorization": f"Bearer {token or _admin()}"}
    async with service.api.session.get(
        f"{service.api.base}{link.path}?{link.query}", headers=headers
    ) as response:
        return response.status, await response.read()


def _admin() -> str:
    from tests.conftest import ADMIN_TOKEN

    return ADMIN_TOKEN


def rows_of(data: bytes, encoding: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode(encoding), newline="")))


def safe(cell: str) -> str:
    return "'" + cell if cell[:1] in ("=", "+", "-", "@", "\t", "\r") else cell


COLUMNS = [
    {"key": "id", "label": "顧客ID"},
    {"key": "email", "label": "メールアドレス"},
    {"key": "name", "label": "氏名"},
    "name_kana",
    "company",
    {"key": "custom_fields.plan", "label": "プラン"},
    "tags",
]


def expected_row(contact: dict[str, Any]) -> list[str]:
    return [
        str(contact["id"]),
        contact["email"],
        contact["name"],
        contact["name_kana"],
        contact["company"],
        contact["custom_fields"]["plan"],
        ",".join(contact["tags"]),
    ]


async def test_export_by_filter_is_safe_csv_read_back_cell_by_cell(contacts, exporter, kafka):
    made = await people(contacts)
    await contacts.api.ok("POST", "/v1/contacts", {"email": "other@example.jp", "name": "他"})
    body = {
        "source": "filter",
        "filter": {"field": "tags", "op": "include_any", "value": ["展示会"]},
        "columns": COLUMNS,
    }
    job = await export(exporter, body)
    assert job["status"] == "done", job
    assert (job["rows"], job["encoding"], job["replaced_characters"]) == (7, "utf-8", 0)
    status, data = await download(exporter, job)
    assert status == 200
    assert not data.startswith(b"\xef\xbb\xbf")
    assert b"\r\n" in data  # RFC 4180 line ends
    rows = rows_of(data, "utf-8")
    assert rows[0] == ["顧客ID", "メールアドレス", "氏名", "name_kana", "company", "プラン", "tags"]
    assert rows[1:] == [[safe(c) for c in expected_row(p)] for p in made]
    # the formula cells, as a spreadsheet will see them
    companies = [r[4] for r in rows[1:]]
    assert companies[1:6] == [
        "'=HYPERLINK(\"http://evil\")",
        "'+81 3-1234-5678",
        "'-10",
        "'@SUM(A1)",
        "'=1+2 (合同会社)",
    ]
    assert companies[6] == "改行\r\n商会, \"引用\""  # quoted, kept exactly
    # (tab and CR starts cannot be stored through the API, which trims: see the unit tests)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "cp932"])
@pytest.mark.parametrize("header", [True, False])
async def test_encodings_and_header(contacts, exporter, encoding, header):
    made = await people(contacts)
    body = {
        "source": "contact_ids",
        "contact_ids": [p["id"] for p in made],
        "columns": COLUMNS,
        "encoding": encoding,
        "header": header,
        "safe_csv": False,
    }
    job = await export(exporter, body)
    assert job["status"] == "done", job
    status, data = await download(exporter, job)
    assert status == 200
    assert data.startswith(b"\xef\xbb\xbf") == (encoding == "utf-8-sig")
    rows = rows_of(data, "utf-8-sig" if encoding == "utf-8-sig" else encoding)
    expected = [expected_row(p) for p in made]
    if encoding == "cp932":
        # 🍣 has no CP932 code: written as ? and counted; 髙 (a CP932 extension) is kept
        expected = [[c.replace("🍣", "?") for c in row] for row in expected]
        assert job["replaced_characters"] == 1
        assert "髙橋 一郎" in {r[2] for r in rows}
    else:
        assert job["replaced_characters"] == 0
    if header:
        assert rows[0][:3] == ["顧客ID", "メールアドレス", "氏名"]
        rows = rows[1:]
    assert rows == expected  # exact cells: safe_csv false writes formulas as they are
