"""The release's send.requests: each row of a chunk becomes the request it should, in the
bytes fastavro writes for it."""

from __future__ import annotations

import datetime as dt
import io
import random
import re
import uuid
from typing import Any

import fastavro
import pytest

from libs.common import avro
from libs.common.errors import InvalidMessage
from libs.common.mail.content import BY_REFERENCE
from libs.common.topics import Topic
from services.scheduler import requests

CONTACT_IDS = [0, 1, 63, 64, 127, 128, 8191, 8192, 16383, 16384, 2**31, 2**62, -1, -(2**40)]
MAIL_CONTENT_DEFAULTS = {
    "from_name": None,
    "reply_to": None,
    "coupon_url": None,
    "track_opens": True,
    "track_clicks": True,
}
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def _expected(
    row: dict[str, Any],
    request_id: str,
    *,
    campaign_id: str,
    include: bool,
    content: dict[str, Any],
    content_id: str | None,
    released_at: dt.datetime,
) -> dict[str, Any]:
    """The request a release row should become: every field of send.requests, defaults spelt
    out (no step, not a test send, not a checkpoint)."""
    return {
        "request_id": request_id,
        "campaign_id": campaign_id,
        "step_id": None,
        "contact_id": row["contact_id"],
        "email": row["email"],
        "group_id": row["group_id"],
        "include_unsubscribed": include,
        "merge_values": row["merge_values"] or {},
        "content": {**MAIL_CONTENT_DEFAULTS, **content},
        "attempt": row["attempt"] + 1,
        "released_at": released_at,
        "test": False,
        "content_id": content_id,
        "checkpoint": False,
    }


def _fastavro(value: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, avro.current_schema(Topic.SEND_REQUESTS.value)[1], value)
    return buffer.getvalue()


def _text(rng: random.Random) -> str:
    alphabet = "abcXYZ019 -_@.様顧客山田花子😀\u00e9"
    return "".join(rng.choice(alphabet) for _ in range(rng.choice([0, 1, 5, 40, 70, 200])))


def _merge_values(rng: random.Random) -> dict[str, str] | None:
    """Up to 70 merge values; where there are none, no map at all or an empty one."""
    values = {_text(rng): _text(rng) for _ in range(rng.choice([0, 0, 1, 3, 70]))}
    return values or rng.choice([None, {}])


def _row(rng: random.Random) -> dict[str, Any]:
    return {
        "contact_id": rng.choice([*CONTACT_IDS, rng.randrange(2**63)]),
        "email": _text(rng) + "@example.jp",
        "group_id": rng.choice([None, 0, 1, 64, 300, 2**40]),
        "merge_values": _merge_values(rng),
        "attempt": rng.choice([0, 1, 2, 63, 64]),
    }


def test_requests_carry_the_current_schema_version() -> None:
    (_, _, headers) = requests.chunk_records(
        campaign_id="c",
        include_unsubscribed=False,
        content=BY_REFERENCE,
        content_id=None,
        released_at=dt.datetime.now(dt.UTC),
        recipients=[{**_row(random.Random(0)), "merge_values": {}}],
    )[0]
    version = avro.current_schema(Topic.SEND_REQUESTS.value)[0]
    assert headers == [(avro.VERSION_HEADER, str(version).encode())]


@pytest.mark.parametrize("seed", range(20))
def test_chunk_requests_decode_as_the_rows_released(seed: int) -> None:
    rng = random.Random(seed)
    content = (
        BY_REFERENCE
        if seed % 2
        else {
            "from_address": "news@example.jp",
            "from_name": rng.choice([None, "差出人"]),
            "reply_to": rng.choice([None, "r@example.jp"]),
            "subject": _text(rng),
            "format": "html",
            "body": _text(rng),
            "coupon_url": rng.choice([None, "https://c.example"]),
            "track_opens": rng.choice([True, False]),
            "track_clicks": rng.choice([True, False]),
        }
    )
    chunk: dict[str, Any] = {
        "campaign_id": str(uuid.UUID(int=rng.getrandbits(128))),
        "include": rng.choice([True, False]),
        "content": content,
        "content_id": rng.choice([None, "c1-" + "ab" * 16]),
        "released_at": dt.datetime(2026, 11, 26, 9, 3, 7, rng.randrange(10**6), tzinfo=dt.UTC)
        + dt.timedelta(days=rng.randrange(-30000, 30000)),
    }
    rows = [_row(rng) for _ in range(30)]
    encoded = requests.chunk_records(
        campaign_id=chunk["campaign_id"],
        include_unsubscribed=chunk["include"],
        content=content,
        content_id=chunk["content_id"],
        released_at=chunk["released_at"],
        recipients=rows,
    )
    ids = set()
    for row, (key, data, headers) in zip(rows, encoded, strict=True):
        assert key == row["contact_id"]
        decoded = avro.decode(Topic.SEND_REQUESTS, data, headers)
        assert UUID4.match(decoded["request_id"])
        ids.add(decoded["request_id"])
        expected = _expected(row, decoded["request_id"], **chunk)
        millis = dt.timedelta(microseconds=chunk["released_at"].microsecond % 1000)
        assert decoded == {**expected, "released_at": chunk["released_at"] - millis}
        assert data == _fastavro(expected)  # and the bytes are fastavro's
    assert len(ids) == len(rows)


def test_request_ids_are_uuid4_text() -> None:
    ids = set(requests.request_ids(1000)) | set(requests.request_ids(1000))
    assert len(ids) == 2000
    for text in ids:
        assert UUID4.match(text), text
        assert str(uuid.UUID(text)) == text and uuid.UUID(text).version == 4


def test_a_merge_value_that_is_not_text_is_refused() -> None:
    row = {
        "contact_id": 1,
        "email": "a@example.jp",
        "group_id": 1,
        "merge_values": {"n": 3},
        "attempt": 0,
    }
    with pytest.raises(InvalidMessage):
        requests.chunk_records(
            campaign_id="c",
            include_unsubscribed=False,
            content=BY_REFERENCE,
            content_id=None,
            released_at=dt.datetime.now(dt.UTC),
            recipients=[row],
        )
