"""The composition pipeline (libs/common/mail/compose.py) stage by stage, and the pipeline as
a whole: what each stage makes of what the ones before it made."""

from __future__ import annotations

import base64
import email
import email.policy
import re
from email.message import EmailMessage

import pytest

from libs.common.errors import InvalidMessage
from libs.common.mail import compose as pipeline
from libs.common.mail.compose import (
    UNTRACKED,
    Recipient,
    Signers,
    compose,
    encode,
    fill,
    header_lines,
    merge_values,
    personalise,
    recipient_tracking,
    unsubscribe_headers,
)
from libs.common.mail.template import CampaignTemplate, assemble
from libs.common.mail.tracking import TrackingLinks

KEYS = "k1:" + "s" * 32
PUBLIC = "https://mail.example.jp"
SIGNERS = Signers.of(KEYS, PUBLIC)
TRACKING = TrackingLinks(KEYS, "https://t.example.jp", untracked=(PUBLIC + "/u/",))
CAMPAIGN = "0b9f6c2e-3d1a-4c57-9f0e-6a2d8b1c4e73"
NOW = 1_790_000_000.0
HTML = (
    "<html><body><p><#name> 様</p>"
    '<p><a href="https://shop.example.jp/item?id=<#contact_id>">商品</a></p>'
    '<p><a href="<#coupon_url>">クーポン</a></p>'
    '<p><a href="<#unsubscribe_url>">配信停止</a></p></body></html>'
)


def template(fmt: str = "html", **kwargs: object) -> CampaignTemplate:
    options: dict[str, object] = {
        "campaign_id": CAMPAIGN,
        "from_address": "news@example.jp",
        "subject": "<#name>様へのお知らせ",
        "format": fmt,
        "body": HTML if fmt == "html" else "<#name> 様\n停止: <#unsubscribe_url>\n",
        "now": lambda: NOW,
        "tracking": TRACKING,
        "coupon_url": "https://shop.example.jp/c?code=X",
    }
    options.update(kwargs)
    return CampaignTemplate(**options)  # type: ignore[arg-type]


def recipient(**kwargs: object) -> Recipient:
    options: dict[str, object] = {
        "contact_id": 42,
        "email": "taro@example.com",
        "values": {"name": "山田 <太郎>", "contact_id": "42"},
        "group_id": 7,
    }
    options.update(kwargs)
    return Recipient(**options)  # type: ignore[arg-type]


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


# 1. unsubscribe headers -----------------------------------------------------------------------


def test_unsubscribe_headers_name_the_recipient_its_group_and_the_campaign() -> None:
    headers = unsubscribe_headers(template(), recipient(test=True), SIGNERS)
    assert set(headers) == {"List-Unsubscribe", "List-Unsubscribe-Post"}
    assert headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    url = headers["List-Unsubscribe"]
    assert url.startswith(f"<{PUBLIC}/u/") and url.endswith(">")
    target = SIGNERS.unsubscribe.read(url[1:-1].rsplit("/", 1)[1])
    assert (target.contact_id, target.group_id, target.campaign_id, target.test) == (
        42,
        7,
        CAMPAIGN,
        True,
    )


def test_no_group_no_unsubscribe_headers() -> None:
    assert unsubscribe_headers(template(), recipient(group_id=None), SIGNERS) == {}


# 2. merge values ------------------------------------------------------------------------------


def test_merge_values_take_the_unsubscribe_url_from_its_header_and_sign_the_coupon() -> None:
    mail, who = template(), recipient(values={"name": "x", "unsubscribe_url": "forged"})
    headers = unsubscribe_headers(mail, who, SIGNERS)
    values = merge_values(mail, who, SIGNERS, headers)
    assert values["unsubscribe_url"] == headers["List-Unsubscribe"][1:-1]  # one token, not two
    assert values["name"] == "x"
    coupon = values["coupon_url"]
    assert coupon.startswith("https://shop.example.jp/c?code=X&t=")
    assert SIGNERS.coupons.verify(coupon.split("&t=")[1]) == {"m": CAMPAIGN, "c": 42}
    assert who.values == {"name": "x", "unsubscribe_url": "forged"}  # the request's, untouched


def test_merge_values_without_group_or_coupon_use() -> None:
    plain = template("text", coupon_url="https://shop.example.jp/c")
    values = merge_values(plain, recipient(group_id=None), SIGNERS, {})
    assert values["unsubscribe_url"] == ""
    assert "coupon_url" not in values  # the text body never says <#coupon_url>: nothing signed
    used = template("text", body="<#coupon_url>", coupon_url="https://shop.example.jp/c")
    coupon = merge_values(used, recipient(), SIGNERS, {})["coupon_url"]
    assert coupon.startswith("https://shop.example.jp/c?t=")


# 3. header lines ------------------------------------------------------------------------------


def test_header_lines() -> None:
    mail = template()
    lines = header_lines(
        mail,
        {"name": "山田\r\nBcc: x@evil.example"},
        to="taro@example.com",
        message_id="<given@example.jp>",
        headers={"List-Unsubscribe": "<https://x/u/t>\r\n"},
        contact_id=42,
    )
    assert all(line.endswith("\r\n") for line in lines)
    assert lines[:3] == [
        "Date: Mon, 21 Sep 2026 14:13:20 +0000\r\n",
        "Message-ID: <given@example.jp>\r\n",
        "To: taro@example.com\r\n",
    ]
    head = parse("".join(lines).encode() + b"\r\n")
    assert head["Subject"] == "山田Bcc: x@evil.example様へのお知らせ"  # no new header line
    assert head["Bcc"] is None
    assert head["List-Unsubscribe"] == "<https://x/u/t>"
    generated = header_lines(mail, {}, to="a@b.jp", message_id=None, headers=None, contact_id=9)
    assert re.fullmatch(
        r"Message-ID: <0b9f6c2e-3d1a-4c57-9f0e-6a2d8b1c4e73\.9\.[0-9a-f]{16}@example\.jp>\r\n",
        generated[1],
    )


@pytest.mark.parametrize(
    ("to", "headers", "field"),
    [
        ("not an address", None, "to"),
        ("a@b.jp\r\nBcc: x@y", None, "to"),
        ("a@b.jp", {"From": "x@y"}, "headers"),
        ("a@b.jp", {"Bad Name": "x"}, "headers"),
    ],
)
def test_header_lines_refuse(to: str, headers: dict[str, str] | None, field: str) -> None:
    with pytest.raises(InvalidMessage) as refused:
        header_lines(template(), {}, to=to, message_id=None, headers=headers, contact_id=1)
    assert refused.value.field == field


# 4. tracking ----------------------------------------------------------------------------------


def test_recipient_tracking() -> None:
    assert recipient_tracking(template(tracking=None), 42, None) is UNTRACKED
    assert UNTRACKED.click("https://x.example/") == "https://x.example/"
    tracked = recipient_tracking(template(), 42, "step-1")
    click = tracked.click("https://shop.example.jp/a")
    target = TRACKING.read_click(click.rsplit("/", 1)[1])
    assert (target.campaign_id, target.contact_id, target.step_id, target.url) == (
        CAMPAIGN,
        42,
        "step-1",
        "https://shop.example.jp/a",
    )
    assert tracked.click(PUBLIC + "/u/x") == PUBLIC + "/u/x"  # never the unsubscribe link
    assert 'width="1" height="1"' in tracked.pixel and "/t/o/" in tracked.pixel
    assert recipient_tracking(template(track_opens=False), 42, None).pixel == ""
    assert recipient_tracking(template("text"), 42, None).pixel == ""  # no HTML part


# 5.–6. fill and encode ------------------------------------------------------------------------


def test_fill_then_encode_is_the_whole_part_encoded() -> None:
    mail = template()
    values = {"name": "山田 <太郎>", "contact_id": "42", "coupon_url": "https://c.example/?t=1"}
    tracking = recipient_tracking(mail, 42, None)
    text, html = mail.parts
    pieces = fill(html, values, tracking)
    joined = "".join(pieces)
    assert pieces[0::2] == list(html.linked.constants)  # the constant text, at even indices
    assert "山田 &lt;太郎&gt; 様" in joined
    assert "shop.example.jp/item" not in joined  # the link is rewritten ...
    assert tracking.pixel in joined  # ... and the pixel is in place
    for part in (text, html):
        pieces = fill(part, values, tracking)
        whole = base64.b64encode("".join(pieces).encode("utf-8")).decode("ascii")
        lines = [whole[i : i + 76] for i in range(0, len(whole), 76)]
        assert encode(part, pieces) == "\r\n".join(lines)


# 7. assemble, and the pipeline -----------------------------------------------------------------


def test_assemble_frames_the_parts() -> None:
    for fmt, types in (("text", ["text/plain"]), ("html", ["text/plain", "text/html"])):
        mail = template(fmt)
        bodies = [base64.b64encode(f"part {n}".encode()).decode() for n in range(len(types))]
        data = assemble(mail, ["To: a@b.jp\r\n"], bodies)
        message = parse(data)
        assert message["To"] == "a@b.jp"
        leaves = [p for p in message.walk() if not p.is_multipart()]
        assert [p.get_content_type() for p in leaves] == types
        assert [p.get_content() for p in leaves] == [f"part {n}" for n in range(len(types))]


def test_compose_is_the_stages_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """compose = unsubscribe headers → merge values → personalise (header lines → tracking →
    fill → encode → assemble), and the unsubscribe URL in the body is the header's."""
    calls: list[str] = []
    stages = [
        "unsubscribe_headers",
        "merge_values",
        "header_lines",
        "recipient_tracking",
        "fill",
        "encode",
        "assemble",
    ]
    for name in stages:
        stage = getattr(pipeline, name)

        def traced(
            *args: object, _stage: object = stage, _name: str = name, **kw: object
        ) -> object:
            calls.append(_name)
            return _stage(*args, **kw)  # type: ignore[operator]

        monkeypatch.setattr(pipeline, name, traced)
    data = compose(template(), recipient(message_id="<m@example.jp>"), SIGNERS)
    assert calls == [*stages[:4], "fill", "encode", "fill", "encode", "assemble"]  # two parts
    message = parse(data)
    assert message["Message-ID"] == "<m@example.jp>"
    unsubscribe = message["List-Unsubscribe"][1:-1]
    html = next(p for p in message.walk() if p.get_content_type() == "text/html").get_content()
    assert f'href="{unsubscribe}"' in html


def test_personalise_is_compose_with_the_values_and_headers_given() -> None:
    mail, who = template(tracking=None), recipient(message_id="<m@example.jp>")
    headers = {"List-Unsubscribe": "<https://mail.example.jp/u/fixed>"}
    values = {**who.values, "unsubscribe_url": "https://mail.example.jp/u/fixed"}
    given = personalise(mail, values, to=who.email, message_id="<m@example.jp>", headers=headers)
    message = parse(given)
    assert message["List-Unsubscribe"] == "<https://mail.example.jp/u/fixed>"
    assert message["List-Unsubscribe-Post"] is None  # only what was given
    assert "https://mail.example.jp/u/fixed" in message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
