"""The console benchmark's forms ask the search page for the filters the API's figure uses
(bench/console.py): a page figure beside an API figure of another filter would compare
nothing."""

from __future__ import annotations

import random

from bench import console, search
from services.console.screens import search_form

KINDS = {"plan": "choice", "birthday": "date"}


def test_form_a_is_the_api_filter_a() -> None:
    form = console.form_a(random.Random(3))
    built = search_form.build(form, KINDS)
    assert not built.errors and built.filter is not None
    expected = search.filter_a(random.Random(0))["all"]
    expected[0]["value"] = [form["tags_in"]]
    assert sorted(map(repr, built.filter["all"])) == sorted(map(repr, expected))


def test_form_b_is_opened_within_28_days_of_any_campaign() -> None:
    built = search_form.build(console.form_b(random.Random(4)), KINDS)
    assert built.filter == {"all": [{"history": {"event": "opened", "within_days": 28}}]}


def test_a_page_shows_the_total_only_when_it_is_the_exact_one() -> None:
    html = '<p class="total">該当: <strong id="total">1234</strong> 件</p>'
    assert console.shows_total(html, 1234)
    assert not console.shows_total(html, 123)
    assert not console.shows_total("<h1>エラーが発生しました</h1>", 0)
