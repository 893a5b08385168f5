"""キャンペーン詳細 says when a sender holds some of the campaign's mail for its receiving
domains' rate limits (送信待ち, issue 21), in both languages, and says nothing otherwise."""

from __future__ import annotations

import datetime as dt
import html
from typing import Any

import pytest

from services.console.i18n import translator
from services.console.screens.campaign import COUNTERS
from services.console.web import NAV, templates


def page(lang: str, **campaign: Any) -> str:
    c: dict[str, Any] = {
        "id": "5d3f9443-c686-4095-9ac2-c6333d596562",
        "name": "冬のセール",
        "status_label": "配信中",
        "status_reason": None,
        "scheduled_at": dt.datetime(2026, 12, 5, 3, 0, tzinfo=dt.UTC),
        "subject": "冬のセール",
        "planned": 64,
        "success": 40,
        "error": 0,
        "suppressed": 0,
        "pending": 24,
        "unsent": 0,
        "sender_held": 0,
        **campaign,
    }
    rendered = (
        templates()
        .get_template("campaign.html")
        .render(
            user=None,
            csrf="",
            lang=lang,
            t=translator(lang),
            nav=NAV,
            path=f"/campaigns/{c['id']}",
            c=c,
            guard=None,
            rate="",
            counters=COUNTERS,
            error="",
            notice="",
            notice_title="",
            may_write=False,
        )
    )
    return html.unescape(rendered)


@pytest.mark.parametrize(
    ("lang", "label"),
    [("ja", "送信待ち (ドメインの速度制限)"), ("en", "Waiting (held for domain rate limits)")],
)
def test_held_mail_is_shown_with_its_count(lang: str, label: str) -> None:
    shown = page(lang, sender_held=17)
    assert label in shown
    assert 'id="count-sender-held">17 ' in shown
    assert 'id="sender-held"' in shown


def test_nothing_held_shows_nothing() -> None:
    shown = page("ja")
    assert "送信待ち" not in shown and "sender-held" not in shown


def test_a_scheduler_without_the_held_count_shows_the_page_without_it() -> None:
    shown = page("ja", sender_held=None)
    assert "送信待ち" not in shown and 'id="count-pending">24<' in shown
