"""CSV import's pure parts: encoding detection, record line numbers, header mapping, rows."""

from __future__ import annotations

import pytest

from libs.common.errors import InvalidMessage
from services.contacts.importfile import (
    decode,
    match_header,
    plan_import,
    records,
    resolve_columns,
    row_patch,
)
from services.contacts.models import FieldDefinition

FIELDS = {
    "plan": FieldDefinition("plan", "契約プラン", "choice", ("free", "pro")),
    "seats": FieldDefinition("seats", "席数", "number"),
}


# Encodings -----------------------------------------------------------------------------------


def test_auto_detects_bom_utf8_and_cp932():
    text = "email,name\na@example.jp,山田 太郎\n"
    assert decode(b"\xef\xbb\xbf" + text.encode(), "auto") == (text, "utf-8-sig")
    assert decode(text.encode(), "auto") == (text, "utf-8")
    assert decode(text.encode("cp932"), "auto") == (text, "cp932")
    assert decode("髙橋 ①".encode("cp932"), "auto") == ("髙橋 ①", "cp932")  # CP932-only characters


def test_bom_is_dropped_whatever_the_encoding_chosen():
    assert decode(b"\xef\xbb\xbfemail\n", "utf-8") == ("email\n", "utf-8")
    assert decode(b"email\n", "utf-8-sig") == ("email\n", "utf-8-sig")


def test_encoding_aliases_and_unknown_encoding():
    assert decode("名前".encode("cp932"), "Windows-31J")[1] == "cp932"
    # What Japanese users call Shift_JIS is CP932: Excel's ㈱ ① 髙 decode under every name
    excel = "㈱髙橋 ①".encode("cp932")
    for name in ("shift_jis", "SJIS", "Shift-JIS", "MS932"):
        assert decode(excel, name) == ("㈱髙橋 ①", "cp932")
    with pytest.raises(InvalidMessage) as caught:
        decode(b"a", "latin-1")
    assert caught.value.field == "encoding"


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_undecodable_byte_is_reported_with_its_line(newline):
    payload = newline.join([b"email,name", b"a@example.jp,ok", b"b@example.jp,bad \xff", b""])
    with pytest.raises(InvalidMessage) as caught:
        decode(payload, "utf-8")
    assert caught.value.field == "encoding"
    assert caught.value.reason.startswith("line 3: byte 0xff is not valid utf-8")


def test_line_of_a_bad_byte_counts_the_bom_bytes_out():
    with pytest.raises(InvalidMessage, match=r"^line 2: byte 0xff"):
        decode(b"\xef\xbb\xbfemail\n\xff\n", "utf-8-sig")


def test_auto_refuses_damaged_utf8_rather_than_guessing_cp932():
    payload = "email,name\na@example.jp,山田\n".encode() + b"b@example.jp,\xe5\xb1\n"
    with pytest.raises(InvalidMessage, match=r"^line 3: .* not valid utf-8"):
        decode(payload, "auto")


def test_cp932_with_an_illegal_sequence_names_its_line():
    payload = "email\n".encode("cp932") + "山田".encode("cp932") + b"\n\x85\x40\n"
    with pytest.raises(InvalidMessage, match=r"^line 3: byte 0x85 is not valid cp932"):
        decode(payload, "cp932")


# Records and lines ------------------------------------------------------------------------


def test_records_carry_physical_line_numbers_across_multiline_cells():
    text = (
        "email,memo\r\n"
        'a@example.jp,"first\r\nsecond\r\nthird"\r\n'
        "\r\n"
        "b@example.jp,plain\r\n"
        'c@example.jp,"with ""quotes""\nand LF"\n'
        "d@example.jp,last"
    )
    found = list(records(text))
    lines = [(start, after) for start, after, _ in found]
    assert lines == [(1, 2), (2, 5), (6, 7), (7, 9), (9, 10)]
    assert found[1][2] == ["a@example.jp", "first\r\nsecond\r\nthird"]
    assert found[3][2] == ["c@example.jp", 'with "quotes"\nand LF']


def test_blank_and_whitespace_records_are_skipped_but_counted_as_lines():
    found = list(records("email\n\n  \n,\na@example.jp\n"))
    assert [(start, cells) for start, _, cells in found] == [(1, ["email"]), (5, ["a@example.jp"])]


def test_malformed_csv_names_the_line_where_the_record_starts():
    with pytest.raises(InvalidMessage, match=r"^line 3: malformed CSV") as caught:
        list(records('email,memo\na@example.jp,ok\nb@example.jp,"never closed\nmore\n'))
    assert caught.value.field == "file"
    with pytest.raises(InvalidMessage, match=r"^line 2: malformed CSV"):
        list(records('email,memo\na@example.jp,"x"y\n'))


# Header mapping ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "target"),
    [
        ("email", "email"),
        (" Email ", "email"),
        ("メールアドレス", "email"),
        ("顧客ID", "external_id"),
        ("情報獲得日", "acquired_at"),
        ("plan", "custom.plan"),
        ("custom.seats", "custom.seats"),
        ("契約プラン", "custom.plan"),
        ("\ufeffemail", "email"),
        ("score", None),
        ("unknown", None),
    ],
)
def test_header_matching(header, target):
    assert match_header(header, FIELDS) == target


def test_mapping_wins_and_can_ignore_columns():
    header = ["Mail", "氏名", "会員種別", "memo"]
    columns = resolve_columns(
        header, {"Mail": "email", "会員種別": "custom.plan", "memo": ""}, FIELDS
    )
    assert columns == ["email", "name", "custom.plan", None]


@pytest.mark.parametrize(
    ("header", "mapping", "field", "message"),
    [
        (["email", "favourite"], None, "mapping", "column 'favourite' matches no field"),
        (["email", "id"], None, "mapping", "column 'id' matches no field"),
        (["email", "x"], {"x": "score"}, "mapping", "'score' is not a writable field"),
        (["email", "x"], {"x": "custom.nope"}, "mapping", "'custom.nope' is not a writable field"),
        (["email"], {"other": "name"}, "mapping", "mapping names column 'other'"),
        (["email", "メールアドレス"], None, "mapping", "both map to email"),
        (["email", "email"], None, "file", "column 'email' appears twice"),
    ],
)
def test_bad_headers_and_mappings(header, mapping, field, message):
    with pytest.raises(InvalidMessage) as caught:
        resolve_columns(header, mapping, FIELDS)
    assert caught.value.field == field
    assert message in caught.value.reason


def test_plan_checks_key_column_and_counts_records():
    text = 'email,顧客ID,memo\na@example.jp,C-1,"two\nlines"\n\nb@example.jp,C-2,\n'
    mapping, total = plan_import(text, None, FIELDS, key="external_id", mode="insert_or_update")
    assert total == 2
    assert mapping == {"email": "email", "顧客ID": "external_id", "memo": "memo"}
    with pytest.raises(InvalidMessage) as caught:
        plan_import("name\n太郎\n", None, FIELDS, key="email", mode="insert_or_update")
    assert caught.value.field == "key"
    with pytest.raises(InvalidMessage) as caught:
        plan_import("顧客ID,name\nC-1,太郎\n", None, FIELDS, key="external_id", mode="insert_only")
    assert caught.value.field == "mode"
    _, total = plan_import("顧客ID\nC-1\n", None, FIELDS, key="external_id", mode="update_only")
    assert total == 1
    with pytest.raises(InvalidMessage, match="header row"):
        plan_import("\n\n", None, FIELDS, key="email", mode="insert_or_update")


# Rows ----------------------------------------------------------------------------------------


def test_row_patch_leaves_empty_cells_unchanged_and_types_custom_values():
    columns = ["email", "name", "custom.plan", "custom.seats", None]
    patch = row_patch(["A@Example.JP", "", "pro", "12", "ignored"], columns, FIELDS)
    assert patch.columns == {"email": "A@example.jp"}
    assert patch.custom_set == {"plan": "pro", "seats": 12}
    assert patch.custom_clear == []


def test_row_patch_errors_name_the_field():
    columns = ["email", "acquired_at", "custom.plan"]
    for cells, field in [
        (["bad", "", ""], "email"),
        (["a@example.jp", "2024-13-45", ""], "acquired_at"),
        (["a@example.jp", "", "gold"], "custom.plan"),
    ]:
        with pytest.raises(InvalidMessage) as caught:
            row_patch(cells, columns, FIELDS)
        assert caught.value.field == field


def test_row_patch_short_rows_are_fine_but_extra_cells_are_not():
    short = row_patch(["a@example.jp"], ["email", "name"], FIELDS)
    assert short.columns == {"email": "a@example.jp"}
    assert row_patch(["a@example.jp", "", " "], ["email"], FIELDS).email == "a@example.jp"
    with pytest.raises(InvalidMessage, match="3 cells but the header 1"):
        row_patch(["a@example.jp", "", "x"], ["email"], FIELDS)
