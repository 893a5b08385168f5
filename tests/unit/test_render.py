"""The sender's per-recipient rendering: MIME built once, bytes personalised per recipient."""

from __future__ import annotations

import email
import email.header
import email.message
import email.policy
import re
from email.message import EmailMessage

import pytest

from libs.common.errors import InvalidMessage
from libs.common.mail.render import CampaignMessage, fold_unstructured, html_to_text
from libs.common.mail.unsubscribe import UnsubscribeLinks, UnsubscribeTarget

NOW = 1_790_000_000.0  # fixed clock: deterministic Date
LINKS = UnsubscribeLinks("k1:" + "s" * 32, "https://mail.example.jp")

VALUES = {
    "name": "山田 太郎 <script>&\"'",
    "company": "株式会社たより",
    "custom.plan": "ゴールド",
    "unsubscribe_url": "https://mail.example.jp/u/abc?x=1&y=2",
}

HTML_BODY = (
    "<html><head><title>t</title><style>p{color:red}</style></head><body>"
    "<p><#氏名> 様 (<#会社名>)</p><p>プラン: <#plan> &amp; more</p>"
    '<p><a href="<#配信停止URL>">配信停止</a></p></body></html>'
)


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def campaign(fmt: str = "html", **kwargs: object) -> CampaignMessage:
    options: dict[str, object] = {
        "campaign_id": "cmp1",
        "from_address": "news@example.jp",
        "from_name": "たより通信",
        "reply_to": "support@example.jp",
        "subject": "<#氏名>様へ、<#会社名>からのお知らせ(今月の特別なキャンペーンのご案内です)",
        "format": fmt,
        "body": HTML_BODY if fmt == "html" else "<#氏名> 様\n<#会社名>\n停止: <#unsubscribe_url>\n",
        "headers": {"X-Campaign": "cmp1"},
        "now": lambda: NOW,
    }
    options.update(kwargs)
    return CampaignMessage(**options)  # type: ignore[arg-type]


def unsubscribe_headers(contact_id: int) -> dict[str, str]:
    return LINKS.headers(UnsubscribeTarget(contact_id, 7, "cmp1"), mailto="unsub@example.jp")


def assert_crlf_only(data: bytes) -> None:
    assert b"\n" in data
    assert re.search(rb"(?<!\r)\n", data) is None, "bare LF"
    assert re.search(rb"\r(?!\n)", data) is None, "bare CR"
    for line in data.split(b"\r\n"):
        assert len(line) <= 998


def test_html_campaign_round_trip() -> None:
    mail = campaign("html")
    data = mail.render(
        VALUES, to="taro@example.com", contact_id=42, headers=unsubscribe_headers(42)
    )
    assert_crlf_only(data)
    message = parse(data)

    assert message["From"].addresses[0].display_name == "たより通信"
    assert message["From"].addresses[0].addr_spec == "news@example.jp"
    assert message["Reply-To"] == "support@example.jp"
    assert message["To"] == "taro@example.com"
    assert message["Subject"] == (
        "山田 太郎 <script>&\"'様へ、株式会社たよりから"
        "のお知らせ(今月の特別なキャンペーンのご案内です)"
    )
    assert message["Date"] == "Mon, 21 Sep 2026 14:13:20 +0000"
    assert message["X-Campaign"] == "cmp1"
    assert re.fullmatch(r"<cmp1\.42\.[0-9a-f]{16}@example\.jp>", message["Message-ID"])
    assert message["List-Unsubscribe"].startswith("<https://mail.example.jp/u/")
    assert "<mailto:unsub@example.jp?subject=unsubscribe>" in message["List-Unsubscribe"]
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert message.defects == []

    assert message.get_content_type() == "multipart/alternative"
    parts = list(message.iter_parts())
    assert [part.get_content_type() for part in parts] == ["text/plain", "text/html"]
    for part in parts:
        assert part["Content-Transfer-Encoding"] == "base64"
        assert part.get_content_charset() == "utf-8"
    text, html = (part.get_content() for part in parts)

    assert "山田 太郎 <script>&\"' 様 (株式会社たより)" in text
    assert "プラン: ゴールド & more" in text
    assert "配信停止 (https://mail.example.jp/u/abc?x=1&y=2)" in text
    assert "color:red" not in text and "<p>" not in text

    assert "山田 太郎 &lt;script&gt;&amp;&quot;&#x27; 様 (株式会社たより)" in html
    assert "<script>" not in html
    assert '<a href="https://mail.example.jp/u/abc?x=1&amp;y=2">' in html
    assert "プラン: ゴールド &amp; more" in html


def test_text_campaign_is_single_text_part() -> None:
    mail = campaign("text")
    data = mail.render(VALUES, to="taro@example.com", contact_id=1, headers=unsubscribe_headers(1))
    assert_crlf_only(data)
    message = parse(data)
    assert not message.is_multipart()
    assert message.get_content_type() == "text/plain"
    assert message["Content-Transfer-Encoding"] == "base64"
    body = message.get_content()
    assert body == (
        "山田 太郎 <script>&\"' 様\n株式会社たより\n停止: https://mail.example.jp/u/abc?x=1&y=2\n"
    )
    assert message["Subject"].startswith("山田 太郎")
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_base64_lines_are_76_chars() -> None:
    mail = campaign("text", body="<#name>")
    data = mail.render({"name": "あ" * 500}, to="a@example.com")
    body = data.split(b"\r\n\r\n", 1)[1]
    lines = [line for line in body.split(b"\r\n") if line]
    assert all(len(line) == 76 for line in lines[:-1])
    assert 0 < len(lines[-1]) <= 76


def test_message_ids_are_unique_across_recipients() -> None:
    mail = campaign("html")
    ids = {
        parse(mail.render(VALUES, to=f"r{i}@example.com", contact_id=i))["Message-ID"]
        for i in range(50)
    }
    ids |= {
        parse(mail.render(VALUES, to="same@example.com", contact_id=1))["Message-ID"]
        for _ in range(50)
    }
    assert len(ids) == 100


def test_explicit_message_id_and_contact_id_from_values() -> None:
    mail = campaign("text")
    assert (
        parse(mail.render({}, to="a@example.com", message_id="<fixed@x>"))["Message-ID"]
        == "<fixed@x>"
    )
    generated = parse(mail.render({"contact_id": "77"}, to="a@example.com"))["Message-ID"]
    assert generated.startswith("<cmp1.77.")


def test_header_injection_through_values_is_impossible() -> None:
    mail = campaign("text", subject="Hi <#name>")
    evil = {"name": "x\r\nBcc: evil@x\r\n\r\nbody"}
    data = mail.render(
        evil, to="a@example.com", headers={"List-Unsubscribe": "<https://u>\r\nBcc: evil@x"}
    )
    assert_crlf_only(data)
    message = parse(data)
    assert message["Bcc"] is None
    assert message["Subject"] == "Hi xBcc: evil@xbody"
    assert message["List-Unsubscribe"] == "<https://u>Bcc: evil@x"
    head = data.split(b"\r\n\r\n", 1)[0]
    assert not any(line.startswith(b"Bcc") for line in head.split(b"\r\n"))


def test_bad_recipient_and_headers_are_refused() -> None:
    mail = campaign("text")
    with pytest.raises(InvalidMessage):
        mail.render({}, to="a@example.com\r\nBcc: evil@x")
    with pytest.raises(InvalidMessage):
        mail.render({}, to="a@example.com", headers={"Bad Name": "v"})
    with pytest.raises(InvalidMessage):
        mail.render({}, to="a@example.com", headers={"Subject": "override"})


def test_bad_campaign_is_refused() -> None:
    with pytest.raises(InvalidMessage) as caught:
        campaign("pdf")
    assert caught.value.field == "format"
    with pytest.raises(InvalidMessage) as caught:
        campaign("text", from_address="not-an-address")
    assert caught.value.field == "from_address"
    with pytest.raises(InvalidMessage) as caught:
        campaign("text", subject="a\r\nBcc: x")
    assert caught.value.field == "subject"


def test_boundary_is_absent_from_every_part() -> None:
    mail = campaign("html")
    assert mail.boundary is not None
    data = mail.render(VALUES, to="a@example.com", headers=unsubscribe_headers(1))
    delimiter = b"--" + mail.boundary.encode()
    lines = data.split(b"\r\n")
    # the boundary appears only as the three delimiter lines and in Content-Type
    assert sum(1 for line in lines if line.startswith(delimiter)) == 3
    assert data.count(mail.boundary.encode()) == 4


def test_render_builds_no_email_message(monkeypatch: pytest.MonkeyPatch) -> None:
    mail = campaign("html")  # building the campaign may use the email package once

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("EmailMessage built per recipient")

    monkeypatch.setattr(EmailMessage, "__init__", refuse)
    monkeypatch.setattr(email.message.Message, "__init__", refuse)
    data = mail.render(VALUES, to="a@example.com", contact_id=3, headers=unsubscribe_headers(3))
    monkeypatch.undo()
    assert parse(data)["To"] == "a@example.com"


def test_subject_folding() -> None:
    ascii_subject = "word " * 40
    folded = fold_unstructured("Subject", ascii_subject.strip())
    assert all(len(line) <= 78 for line in folded.split("\r\n"))
    japanese = "日本語の件名" * 20
    folded = fold_unstructured("Subject", japanese)
    assert all(len(line) <= 78 for line in folded.split("\r\n"))
    assert all(len(word) <= 75 for word in re.findall(r"=\?UTF-8\?B\?[^?]*\?=", folded))
    message = email.message_from_bytes((folded + "\r\n").encode(), policy=email.policy.default)
    assert message["Subject"] == japanese
    # 1- to 4-byte characters at every offset: a word never ends inside a character.
    for shift in range(4):
        mixed = "a" * shift + "é顧🎉x" * 25
        folded = fold_unstructured("Subject", mixed)
        words = re.findall(r"=\?UTF-8\?B\?[^?]*\?=", folded)
        assert all(len(word) <= 75 for word in words)
        for word in words:  # each word is whole UTF-8 on its own
            email.header.decode_header(word)[0][0].decode("utf-8")
        message = email.message_from_bytes((folded + "\r\n").encode(), policy=email.policy.default)
        assert message["Subject"] == mixed


def test_html_to_text() -> None:
    text = html_to_text(
        "<h1>Title</h1><p>A &amp; B&nbsp;&lt;x&gt;</p><ul><li>one</li><li>two</li></ul>"
        '<p><a href="https://e.jp/a">link</a> <a href="https://e.jp/b">https://e.jp/b</a>'
        ' <a href="#top">top</a></p><script>var x = 1;</script><br>end'
    )
    assert text == (
        "Title\n\nA & B\xa0<x>\n\n- one\n- two\n\nlink (https://e.jp/a) https://e.jp/b top\n\nend"
    )
