"""The body parts' base64 with the constant text encoded once (base64body.Base64Part) is byte
for byte what encoding each recipient's whole part gives (b64_body below, the encoding used
before)."""

from __future__ import annotations

import base64
import dataclasses
import email
import random
from collections.abc import Mapping
from typing import cast

import pytest

from libs.common.mail import render
from libs.common.mail.base64body import Base64Part
from libs.common.mail.render import CampaignMessage
from libs.common.mail.tracking import TrackingLinks

TRACKING = TrackingLinks("k1:secret-one", "https://track.example")
# 1-, 2-, 3- and 4-byte UTF-8 characters and line ends: every 3-byte alignment is met.
ALPHABET = ["a", "é", "様", "😀", "\r\n", " ", "<"]


def b64_body(text: str) -> str:
    """The reference: ``text`` as UTF-8 base64, whole, in 76-character CRLF lines."""
    encoded = base64.b64encode(text.encode("utf-8")).decode("ascii")
    return "\r\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))


def _text(rng: random.Random, size: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(size))


@pytest.mark.parametrize("seed", range(8))
def test_part_matches_whole_part_encoding(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(400):
        count = rng.randint(0, 6)
        constants = tuple(
            _text(rng, rng.choice([0, 1, 2, 3, 5, 40, 200])) for _ in range(count + 1)
        )
        part = Base64Part(constants)
        for _ in range(4):  # again with the kept encodings, and new columns
            parts: list[str] = []
            for index, constant in enumerate(constants):
                parts.append(constant)
                if index < count:
                    parts.append(_text(rng, rng.choice([0, 0, 1, 2, 3, 4, 10, 80])))
            assert part.encode(parts) == b64_body("".join(parts))


def test_part_over_its_budget_still_matches() -> None:
    rng = random.Random(99)
    constants = (_text(rng, 300), _text(rng, 7), _text(rng, 300))
    part = Base64Part(constants)
    part._kept = Base64Part.BUDGET  # as if full: nothing more is kept
    for size in range(12):
        parts = [constants[0], _text(rng, size), constants[1], _text(rng, size + 1), constants[2]]
        assert part.encode(parts) == b64_body("".join(parts))
    assert not part._encoded


def _decoded(mail: bytes) -> bytes:
    parsed = email.message_from_bytes(mail)
    return b"".join(
        cast(bytes, part.get_payload(decode=True))
        for part in parsed.walk()
        if not part.is_multipart()
    )


class _WholePart:
    """The encoding before Base64Part: the joined part, encoded whole."""

    def encode(self, parts: list[str]) -> str:
        return b64_body("".join(parts))


HTML = (
    "<html><body><p><#name>様</p>"
    + "<p>いつもご愛顧いただきありがとうございます。</p>" * 9
    + '<p><a href="https://shop.example/<#name>?x=1">店</a> <a href="https://a.example/">a</a></p>'
    + '<p><a href="<#unsubscribe_url>">配信停止</a></p></body></html>'
)


@pytest.mark.parametrize(
    ("format", "body", "tracking"),
    [
        ("html", HTML, TRACKING),
        ("html", HTML, None),
        ("text", "Hello <#name>, see https://shop.example/x?<#name> — 様 <#coupon_code>", TRACKING),
    ],
)
def test_campaign_message_bytes_unchanged(
    format: render.Format, body: str, tracking: TrackingLinks | None
) -> None:
    def build() -> CampaignMessage:
        return CampaignMessage(
            campaign_id="c-1",
            from_address="news@example.com",
            subject="<#name>様",
            format=format,
            body=body,
            now=lambda: 1_700_000_000.0,
            tracking=tracking,
        )

    message, reference = build(), build()
    # every body part of the reference encoded whole (its BodyPart's base64 replaced)
    whole = cast(Base64Part, _WholePart())
    reference.parts = tuple(dataclasses.replace(part, base64=whole) for part in reference.parts)
    reference.boundary = message.boundary
    reference._head = message._head
    if message.boundary is not None:
        reference._before_text = message._before_text
        reference._before_html = message._before_html
        reference._closing = message._closing
    names = ["", "A", "Bo", "様", "山田 花子", "😀x", "Zoë Ångström-Lee", "x" * 100]
    for contact_id, name in enumerate(names * 2, start=1):
        values: Mapping[str, str] = {
            "name": name,
            "unsubscribe_url": "https://mail.example.com/u/" + "t" * contact_id,
            "coupon_code": "C" * contact_id,
        }
        mail = message.render(values, to="r@example.net", message_id="<m@x>", contact_id=contact_id)
        assert mail == reference.render(
            values, to="r@example.net", message_id="<m@x>", contact_id=contact_id
        )
        assert (tracking is not None) == (b"track.example" in _decoded(mail))
