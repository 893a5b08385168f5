"""The release's send.requests encoder gives fastavro's bytes, byte for byte."""

from __future__ import annotations

import datetime as dt
import random
import re
import uuid
from typing import Any

import pytest

from libs.common import avro
from libs.common.errors import InvalidMessage
from libs.common.mail.content import BY_REFERENCE
from libs.common.topics import Topic
from services.scheduler import requests

CONTACT_IDS = [0, 1, 63, 64, 127, 128, 8191, 8192, 16383, 16384, 2**31, 2**62, -1, -(2**40)]
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def _reference(
    row: dict[str, Any],
    request_id: str,
    *,
    campaign_id: str,
    include: bool,
    content: dict[str, Any],
    content_id: str | None,
    released_at: dt.datetime,
) -> bytes:
    """What the release loop encoded before: the request as a dict, through fastavro."""
    data, headers = avro.encode(
        Topic.SEND_REQUESTS,
        {
            "request_id": request_id,
            "campaign_id": campaign_id,
            "step_id": None,
            "contact_id": row["contact_id"],
            "email": row["email"],
            "group_id": row["group_id"],
            "include_unsubscribed": include,
            "merge_values": row["merge_values"],
            "content": content,
            "content_id": content_id,
            "attempt": row["attempt"] + 1,
            "released_at": released_at,
            "test": False,
        },
    )
    assert headers == requests.HEADERS
    return data


def _text(rng: random.Random) -> str:
    alphabet = "abcXYZ019 -_@.様顧客山田花子😀\u00e9"
    return "".join(rng.choice(alphabet) for _ in range(rng.choice([0, 1, 5, 40, 70, 200])))


def _row(rng: random.Random) -> dict[str, Any]:
    return {
        "contact_id": rng.choice([*CONTACT_IDS, rng.randrange(2**63)]),
        "email": _text(rng) + "@example.jp",
        "group_id": rng.choice([None, 0, 1, 64, 300, 2**40]),
        "merge_values": {_text(rng): _text(rng) for _ in range(rng.choice([0, 0, 1, 3, 70]))}
        or rng.choice([None, {}]),
        "attempt": rng.choice([0, 1, 2, 63, 64]),
    }


def test_schema_version_is_the_encoders() -> None:
    assert avro.current_schema(Topic.SEND_REQUESTS.value)[0] == requests.VERSION


@pytest.mark.parametrize("seed", range(20))
def test_chunk_bytes_are_fastavros(seed: int) -> None:
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
    chunk = {
        "campaign_id": str(uuid.UUID(int=rng.getrandbits(128))),
        "include": rng.choice([True, False]),
        "content": content,
        "content_id": rng.choice([None, "c1-" + "ab" * 16]),
        "released_at": dt.datetime(2026, 11, 26, 9, 3, 7, rng.randrange(10**6), tzinfo=dt.UTC)
        + dt.timedelta(days=rng.randrange(-30000, 30000)),
    }
    rows = [_row(rng) for _ in range(30)]
    encoded = requests.encode_chunk(
        campaign_id=chunk["campaign_id"],
        include_unsubscribed=chunk["include"],
        content=content,
        content_id=chunk["content_id"],
        released_at=chunk["released_at"],
        recipients=rows,
    )
    for row, (key, data, headers) in zip(rows, encoded, strict=True):
        assert key == row["contact_id"]
        assert headers == requests.HEADERS
        decoded = avro.decode(Topic.SEND_REQUESTS, data, headers)
        row = {**row, "merge_values": row["merge_values"] or {}}
        assert data == _reference(row, decoded["request_id"], **chunk)


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
        requests.encode_chunk(
            campaign_id="c",
            include_unsubscribed=False,
            content=BY_REFERENCE,
            content_id=None,
            released_at=dt.datetime.now(dt.UTC),
            recipients=[row],
        )
