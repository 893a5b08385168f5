"""One rule for a mail address (libs/common/mail/addresses.py): contacts' emails, a campaign's
from / reply-to / test addresses, an export's notify address."""

from __future__ import annotations

import pytest

from libs.common.errors import InvalidMessage
from libs.common.mail.addresses import normalise


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  Taro@Example.COM ", "Taro@example.com"),
        ("a.b+tag@Sub.Example.co.jp", "a.b+tag@sub.example.co.jp"),
    ],
)
def test_email_is_trimmed_and_domain_lowercased(raw: str, expected: str) -> None:
    assert normalise(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "plain",
        "@example.com",
        "a@",
        "a@b",
        "a..b@example.com",
        ".a@example.com",
        "a b@example.com",
        "a@exa mple.com",
        "a@-example.com",
        "a@example.com\r\nBcc: x@y.z",
        42,
    ],
)
def test_bad_emails_are_refused_naming_the_field(raw: object) -> None:
    with pytest.raises(InvalidMessage) as caught:
        normalise(raw)
    assert caught.value.field == "email"


@pytest.mark.parametrize(
    "address",
    [
        "a\n@example.jp",
        "a@example.jp\n.x",
        "a@exa\nmple.jp",
        "a@-x.jp",
        "a@x-.jp",
        "a@x..jp",
        "a@jp",
    ],
)
def test_addresses_with_a_newline_or_a_bad_label_are_refused(address: str) -> None:
    with pytest.raises(InvalidMessage):
        normalise(address)


def test_domain_labels_up_to_63_characters() -> None:
    assert normalise(f"a@{'x' * 63}.Example.JP.") == f"a@{'x' * 63}.example.jp"
    with pytest.raises(InvalidMessage):
        normalise(f"a@{'x' * 64}.jp")


def test_the_error_names_the_field_it_was_given() -> None:
    with pytest.raises(InvalidMessage) as caught:
        normalise("nobody", "from_address")
    assert caught.value.field == "from_address"
