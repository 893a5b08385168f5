"""Merge tags (F-21): parsing, aliases, validation, escaping."""

from __future__ import annotations

import pytest

from libs.common.errors import InvalidMessage
from libs.common.mail import mergetags
from libs.common.mail.mergetags import Tag, parse, render, validate

KNOWN = {"name", "company", "email", "plan"}


def test_parse_splits_literals_and_tags() -> None:
    template = parse("Hello <#name>, from <#company>!")
    assert template.literals == ("Hello ", ", from ", "!")
    assert [tag.key for tag in template.tags] == ["name", "company"]
    assert template.parts == (
        "Hello ",
        Tag("name", "<#name>"),
        ", from ",
        Tag("company", "<#company>"),
        "!",
    )
    assert template.keys == {"name", "company"}


def test_parse_is_cached() -> None:
    assert parse("a <#name> b") is parse("a <#name> b")


@pytest.mark.parametrize(
    ("alias", "key"),
    [
        ("氏名", "name"),
        ("会社名", "company"),
        ("配信停止URL", "unsubscribe_url"),
        ("クーポンURL", "coupon_url"),
    ],
)
def test_every_alias_maps_to_its_key(alias: str, key: str) -> None:
    template = parse(f"[<#{alias}>]")
    assert template.tags == (Tag(key, f"<#{alias}>"),)
    assert template.render({key: "v"}) == "[v]"


def test_aliases_table_is_complete() -> None:
    assert dict(mergetags.ALIASES) == {
        "氏名": "name",
        "会社名": "company",
        "配信停止URL": "unsubscribe_url",
        "クーポンURL": "coupon_url",
    }


@pytest.mark.parametrize(
    "source",
    ["<#Name>", "<# name>", "<#name", "a <# b", "<#1abc>", "<#na-me>", "<#>", "<<#>>"],
)
def test_invalid_tags_are_literal_text(source: str) -> None:
    template = parse(source)
    assert template.tags == ()
    assert template.render({"name": "X", "Name": "X"}) == source


def test_dotted_and_custom_keys() -> None:
    template = parse("<#custom.plan>|<#plan>|<#a.b_c1>")
    assert [tag.key for tag in template.tags] == ["custom.plan", "plan", "a.b_c1"]


def test_missing_keys_render_empty() -> None:
    assert render("Hi <#name>!<#company>", {}) == "Hi !"


def test_custom_fallback() -> None:
    values = {"custom.plan": "gold"}
    assert render("<#plan>", values) == "gold"
    assert render("<#custom.plan>", values) == "gold"
    # the bare key wins over custom.<key>
    assert render("<#plan>", {"plan": "silver", "custom.plan": "gold"}) == "silver"
    # an empty value present is used as is, not replaced by the fallback
    assert render("<#plan>", {"plan": "", "custom.plan": "gold"}) == ""


def test_html_escaping() -> None:
    values = {"name": "<script>alert('x')</script> & \"co\""}
    out = render('<p title="<#name>"><#name></p>', values, "html")
    assert "<script>" not in out
    assert "&lt;script&gt;" in out
    assert "&amp;" in out
    assert "&quot;co&quot;" in out
    assert "&#x27;x&#x27;" in out
    # literal template HTML is never escaped
    assert out.startswith('<p title="') and out.endswith("</p>")


def test_text_mode_is_verbatim() -> None:
    value = "<b>A & B</b>\nline2"
    assert render("<#name>", {"name": value}, "text") == value


def test_header_mode_strips_cr_lf_and_controls() -> None:
    out = render("Hello <#name>", {"name": "  x\r\nBcc: evil@x \t"}, "header")
    assert out == "Hello xBcc: evil@x"
    assert "\r" not in out and "\n" not in out
    assert mergetags.escape_header("a\x00b\x7fc\x85d\u2028e\u2029f\x0bg") == "abcdefg"


def test_validate_accepts_known_and_special_keys() -> None:
    validate(
        "<#name> <#氏名> <#会社名> <#email> <#plan> <#custom.plan>"
        " <#unsubscribe_url> <#配信停止URL>",
        KNOWN,
        has_coupon=False,
    )
    validate("<#plan>", {"custom.plan"}, has_coupon=False)
    validate("<#coupon_url> <#クーポンURL>", set(), has_coupon=True)
    validate("no tags at all", set(), has_coupon=False)


def test_validate_lists_every_unknown_tag() -> None:
    with pytest.raises(InvalidMessage) as caught:
        validate(
            "<#name> <#foo> <#bar.baz> <#foo> <#Name>", KNOWN, has_coupon=False, field="subject"
        )
    error = caught.value
    assert error.field == "subject"
    assert "<#foo>" in error.reason and "<#bar.baz>" in error.reason and "<#Name>" in error.reason
    assert error.reason.count("<#foo>") == 1
    assert "<#name>" not in error.reason


def test_validate_default_field_is_body() -> None:
    with pytest.raises(InvalidMessage) as caught:
        validate("<#nope>", KNOWN, has_coupon=False)
    assert caught.value.field == "body"


@pytest.mark.parametrize("source", ["<#coupon_url>", "<#クーポンURL>"])
def test_validate_refuses_coupon_without_coupon(source: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        validate(source, KNOWN, has_coupon=False)
    assert "coupon" in caught.value.reason


def test_validate_reports_unknown_and_coupon_together() -> None:
    with pytest.raises(InvalidMessage) as caught:
        validate("<#coupon_url> <#zzz>", KNOWN, has_coupon=False)
    assert "<#zzz>" in caught.value.reason and "no coupon" in caught.value.reason


def test_repeated_and_aliased_keys_render_everywhere() -> None:
    values = {"name": "a&b"}
    assert render("<#name>-<#氏名>-<#name>", values, "html") == "a&amp;b-a&amp;b-a&amp;b"
    assert render("<#name><#name>", values) == "a&ba&b"
    assert render("plain", values) == "plain"
