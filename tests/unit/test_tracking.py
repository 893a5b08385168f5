"""Open and click tracking (F-34): signed tokens, where the links of a template are, and the
mail each recipient gets — links rewritten, the open pixel in place, nothing else touched."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import re
from email.message import EmailMessage

import pytest

from libs.common.mail import mergetags
from libs.common.mail.links import PIXEL, linked_html, linked_text
from libs.common.mail.render import CampaignMessage
from libs.common.mail.tokens import BadToken, Signer
from libs.common.mail.tracking import TrackingLinks, trackable
from services.scheduler.processor import feedback_tallies

KEYS = "k1:" + "s" * 32
BASE = "https://t.example.jp"
UNSUBSCRIBE = "https://mail.example.jp/u/"
LINKS = TrackingLinks(KEYS, BASE, untracked=(UNSUBSCRIBE,))
CAMPAIGN = "0b9f6c2e-3d1a-4c57-9f0e-6a2d8b1c4e73"

HTML = (
    "<html><head><title>t</title></head><body>\n"
    '<!-- <a href="https://commented.example/">not a link</a> -->\n'
    "<p><#氏名> 様</p>\n"
    '<p><a class="btn" href="https://shop.example.jp/sale?a=1&amp;b=2">セール</a></p>\n'
    "<p><a\n  title='x' HREF='https://shop.example.jp/me?id=<#contact_id>&amp;n=<#name>'>マイページ</a>"
    '</p>\n<p><a href="<#クーポンURL>">クーポン</a></p>\n'
    '<p><a href="mailto:support@example.jp">問い合わせ</a> <a href="tel:0312345678">電話</a>'
    ' <a href="#top">上へ</a> <a href="/relative">相対</a></p>\n'
    '<p><a href="<#配信停止URL>">配信停止</a></p>\n'
    "</body></html>"
)
VALUES = {
    "name": "A&B <x>",
    "contact_id": "42",
    "coupon_url": "https://shop.example.jp/c?code=X&t=tok",
    "unsubscribe_url": UNSUBSCRIBE + "abc",
}


def token_of(url: str, kind: str) -> str:
    prefix = f"{BASE}/t/{kind}/"
    assert url.startswith(prefix), url
    return url[len(prefix) :]


def mail(fmt: str = "html", body: str = HTML, **kwargs: object) -> CampaignMessage:
    options: dict[str, object] = {
        "campaign_id": CAMPAIGN,
        "from_address": "news@example.jp",
        "subject": "お知らせ",
        "format": fmt,
        "body": body,
        "tracking": LINKS,
    }
    options.update(kwargs)
    return CampaignMessage(**options)  # type: ignore[arg-type]


def parts(data: bytes) -> tuple[str, str | None]:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    if not message.is_multipart():
        return message.get_content(), None
    text, html = (p.get_content() for p in message.iter_parts())
    return text, html


def hrefs(html: str) -> list[str]:
    return [a or b for a, b in re.findall(r"""href="([^"]*)"|href='([^']*)'""", html, re.I)]


# Tokens --------------------------------------------------------------------------------------


def test_open_and_click_tokens_round_trip_with_their_step() -> None:
    opened = LINKS.read_open(token_of(LINKS.open_url(CAMPAIGN, 7, "step-2"), "o"))
    assert (opened.campaign_id, opened.contact_id, opened.step_id) == (CAMPAIGN, 7, "step-2")
    url = "https://shop.example.jp/?q=日本&x=1#frag"
    clicked = LINKS.read_click(token_of(LINKS.click_url(CAMPAIGN, 7, url), "c"))
    assert (clicked.campaign_id, clicked.contact_id, clicked.url) == (CAMPAIGN, 7, url)


def test_forged_tampered_and_crossed_tokens_are_refused() -> None:
    click = token_of(LINKS.click_url(CAMPAIGN, 7, "https://shop.example.jp/"), "c")
    opened = token_of(LINKS.open_url(CAMPAIGN, 7), "o")
    kid, payload, mac = click.split(".")
    forged = Signer("k1:another-secret", "click").sign(
        {"m": CAMPAIGN, "c": 7, "u": "https://evil.example/"}
    )
    for bad in (
        forged,
        f"{kid}.{payload}.{mac[:-1]}{'A' if mac[-1] != 'A' else 'B'}",
        f"{kid}.{payload[:-2]}.{mac}",
        "",
        "garbage",
        "k1.e30.AAAA",
    ):
        with pytest.raises(BadToken):
            LINKS.read_click(bad)
    with pytest.raises(BadToken):
        LINKS.read_click(opened)  # an open is never a click
    with pytest.raises(BadToken):
        LINKS.read_open(click)  # nor a click an open
    # A signed click token whose destination is not http(s) is refused too.
    javascript = Signer(KEYS, "click").sign({"m": CAMPAIGN, "c": 7, "u": "javascript:alert(1)"})
    with pytest.raises(BadToken):
        LINKS.read_click(javascript)


def test_only_absolute_http_urls_are_tracked() -> None:
    for url in ("https://x.example/", "HTTP://X.EXAMPLE/a?b=1"):
        assert trackable(url) and LINKS.tracks(url)
    for url in ("mailto:a@b.jp", "tel:0312345678", "#top", "/relative", "", "javascript:x()"):
        assert not LINKS.tracks(url)
        assert LINKS.click_url(CAMPAIGN, 1, url) == url
    assert not LINKS.tracks(UNSUBSCRIBE + "abc")  # the unsubscribe link stays itself
    assert not LINKS.tracks(LINKS.open_url(CAMPAIGN, 1))  # never tracked twice


# Where the links are (found once per campaign) -----------------------------------------------


def test_links_are_found_once_static_ones_decoded() -> None:
    linked = linked_html(mergetags.parse(HTML), LINKS.tracks, clicks=True, pixel=True)
    static = [s.url for s in linked.slots if s.url is not None]
    assert static == ["https://shop.example.jp/sale?a=1&b=2"]  # &amp; decoded, once
    dynamic = [s.href for s in linked.slots if s.href is not None and s.url is None]
    assert [sorted(t.keys) for t in dynamic if t is not None] == [
        ["contact_id", "name"],
        ["coupon_url"],
    ]
    assert linked.slots[-1] is PIXEL
    assert "</body>" in linked.pieces[-1].literals[0]
    assert "commented.example" in linked.pieces[0].literals[0]  # a comment is no link


def test_switches_and_text_urls() -> None:
    html = mergetags.parse(HTML)
    assert linked_html(html, LINKS.tracks, clicks=False, pixel=False).slots == ()
    assert linked_html(html, LINKS.tracks, clicks=False, pixel=True).slots == (PIXEL,)
    text = mergetags.parse(
        "詳細: https://shop.example.jp/a?x=1&y=2。\n(https://shop.example.jp/b) "
        "https://shop.example.jp/c?id=<#contact_id>, mailto:a@b.jp <#unsubscribe_url>\n"
    )
    linked = linked_text(text, LINKS.tracks, clicks=True)
    assert [s.url for s in linked.slots] == [
        "https://shop.example.jp/a?x=1&y=2",
        "https://shop.example.jp/b",
        None,
    ]


# The mail each recipient gets ----------------------------------------------------------------


def test_html_mail_is_tracked_per_recipient() -> None:
    text, html = parts(mail().render(VALUES, to="a@example.jp", contact_id=42))
    assert html is not None
    links = hrefs(html)
    clicks = [LINKS.read_click(token_of(h, "c")) for h in links if h.startswith(BASE)]
    assert {c.contact_id for c in clicks} == {42}
    assert {c.campaign_id for c in clicks} == {CAMPAIGN}
    assert [c.url for c in clicks] == [
        "https://shop.example.jp/sale?a=1&b=2",  # the real URL, not its HTML spelling
        "https://shop.example.jp/me?id=42&n=A&B <x>",  # merge values rendered, then signed
        "https://shop.example.jp/c?code=X&t=tok",
    ]
    untouched = [h for h in links if not h.startswith(BASE)]
    assert untouched == [
        "https://commented.example/",  # inside a comment: no link
        "mailto:support@example.jp",
        "tel:0312345678",
        "#top",
        "/relative",
        UNSUBSCRIBE + "abc",
    ]
    assert "A&amp;B &lt;x&gt; 様" in html
    pixel = re.findall(
        r'<img src="([^"]+)" width="1" height="1" alt="" style="display:none">', html
    )
    assert len(pixel) == 1 and html.index(pixel[0]) < html.index("</body>")
    assert LINKS.read_open(token_of(pixel[0], "o")).contact_id == 42
    # The text part carries the same signed click URLs, and the real unsubscribe URL.
    text_clicks = re.findall(re.escape(BASE) + r"/t/c/[A-Za-z0-9_.-]+", text)
    assert set(text_clicks) == {h for h in links if h.startswith(BASE)}
    assert f"配信停止 ({UNSUBSCRIBE}abc)" in text


def test_each_recipient_gets_their_own_signatures() -> None:
    message = mail()
    first, other = (
        [h for h in hrefs(parts(message.render(VALUES, to=to, contact_id=n))[1] or "") if BASE in h]
        for to, n in (("a@example.jp", 42), ("b@example.jp", 43))
    )
    assert first[0] != other[0]
    assert LINKS.read_click(token_of(other[0], "c")).contact_id == 43


def test_text_campaign_links_and_no_pixel() -> None:
    body = "見る: https://shop.example.jp/a?x=1&y=2\n停止: <#unsubscribe_url>\n"
    text, html = parts(mail("text", body).render(VALUES, to="a@example.jp", contact_id=5))
    assert html is None and "/t/o/" not in text
    [url] = re.findall(re.escape(BASE) + r"/t/c/\S+", text)
    assert LINKS.read_click(token_of(url, "c")).url == "https://shop.example.jp/a?x=1&y=2"
    assert f"停止: {UNSUBSCRIBE}abc" in text


def test_switched_off_or_no_tracking_leaves_the_mail_as_written() -> None:
    plain = parts(mail(tracking=None).render(VALUES, to="a@example.jp", contact_id=42))
    off = parts(
        mail(track_opens=False, track_clicks=False).render(VALUES, to="a@example.jp", contact_id=42)
    )
    assert plain == off
    assert BASE not in (plain[1] or "") and BASE not in plain[0]
    opens_only = parts(mail(track_clicks=False).render(VALUES, to="a@example.jp", contact_id=42))
    assert "/t/c/" not in (opens_only[1] or "") and "/t/o/" in (opens_only[1] or "")
    clicks_only = parts(mail(track_opens=False).render(VALUES, to="a@example.jp", contact_id=42))
    assert "/t/c/" in (clicks_only[1] or "") and "/t/o/" not in (clicks_only[1] or "")


# Campaign statistics (the scheduler's pure part) ---------------------------------------------


def test_feedback_is_tallied_per_recipient_and_kind() -> None:
    at = [dt.datetime(2026, 11, 26, 3, m, tzinfo=dt.UTC) for m in range(4)]
    events = [
        {"campaign_id": CAMPAIGN, "contact_id": 1, "type": "open", "occurred_at": at[2]},
        {"campaign_id": CAMPAIGN, "contact_id": 1, "type": "open", "occurred_at": at[0]},
        {"campaign_id": CAMPAIGN, "contact_id": 1, "type": "click", "occurred_at": at[3]},
        {"campaign_id": CAMPAIGN, "contact_id": 2, "type": "open", "occurred_at": at[1]},
        {"campaign_id": "step-mail-1", "contact_id": 2, "type": "open", "occurred_at": at[1]},
    ]
    tallies = {(t.contact_id, t.kind): (t.count, t.first_at) for t in feedback_tallies(events)}
    assert tallies == {(1, "open"): (2, at[0]), (1, "click"): (1, at[3]), (2, "open"): (1, at[1])}
