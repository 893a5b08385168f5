"""The CSV file of an import (F-04), pure: its encoding, its records with their line
numbers, its header's mapping to fields and each row's patch. No I/O.

``line`` is the physical line in the file where a record starts (the header is line 1; a
quoted cell holding newlines spans several lines).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Mapping
from typing import Any

from libs.common.errors import InvalidMessage
from services.contacts.models import JAPANESE_ALIASES, WRITABLE, FieldDefinition
from services.contacts.processor import ContactPatch, contact_patch

ENCODINGS = ("auto", "utf-8", "utf-8-sig", "cp932", "shift_jis")
#: what Japanese users call Shift_JIS is CP932 (Excel's, with ㈱ ① 髙 and the other NEC and
#: IBM extensions JIS X 0208's Shift_JIS lacks): every name of it decodes as CP932.
_ENCODING_ALIASES = {
    "utf8": "utf-8",
    "utf-8-bom": "utf-8-sig",
    "shift_jis": "cp932",
    "sjis": "cp932",
    "shift-jis": "cp932",
    "windows-31j": "cp932",
    "ms932": "cp932",
}
_BOM = b"\xef\xbb\xbf"
#: records of a file: (first line, line after it, cells).
Records = Iterator[tuple[int, int, list[str]]]


def decode(payload: bytes, encoding: str) -> tuple[str, str]:
    """The file's text and the encoding used; ``auto``: BOM → utf-8-sig, UTF-8, else cp932.

    Undecodable bytes raise InvalidMessage naming the line of the first bad byte. A UTF-8
    BOM is dropped whatever the encoding chosen.
    """
    encoding = _ENCODING_ALIASES.get(encoding.strip().lower(), encoding.strip().lower())
    if encoding not in ENCODINGS:
        raise InvalidMessage(f"encoding must be one of {', '.join(ENCODINGS)}", field="encoding")
    bom = payload.startswith(_BOM)
    if encoding == "auto":
        if bom:
            encoding = "utf-8-sig"
        else:
            try:
                return payload.decode("utf-8"), "utf-8"
            except UnicodeDecodeError as exc:
                # Valid multi-byte UTF-8 before the bad byte: a damaged UTF-8 file, not CP932.
                if not payload[: exc.start].isascii():
                    raise _undecodable(payload, exc, "utf-8") from None
            encoding = "cp932"
    body = payload[len(_BOM) :] if bom and encoding.startswith("utf-8") else payload
    try:
        text = body.decode("utf-8" if encoding == "utf-8-sig" else encoding)
    except UnicodeDecodeError as exc:
        raise _undecodable(body, exc, encoding) from None
    return text.removeprefix("\ufeff"), encoding


def _undecodable(body: bytes, exc: UnicodeDecodeError, encoding: str) -> InvalidMessage:
    ending = b"\n" if b"\n" in body else b"\r"  # a file may end its lines with CR alone
    line = body.count(ending, 0, exc.start) + 1
    return InvalidMessage(
        f"line {line}: byte 0x{body[exc.start]:02x} is not valid {encoding}; choose the file's"
        " encoding (utf-8, utf-8-sig, cp932 or shift_jis)",
        field="encoding",
    )


def records(text: str) -> Iterator[tuple[int, int, list[str]]]:
    """(first line, line after it, cells) of each non-blank record, RFC 4180, CRLF or LF."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    line = 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise InvalidMessage(f"line {line}: malformed CSV ({exc})", field="file") from None
        start, line = line, reader.line_num + 1
        if any(cell.strip() for cell in cells):
            yield start, line, cells


def match_header(header: str, fields: Mapping[str, FieldDefinition]) -> str | None:
    """The field a column heading names: a field name, a Japanese alias, a custom key or label."""
    name = header.strip().removeprefix("\ufeff")
    lower = name.lower()
    if lower in WRITABLE:
        return lower
    if name in JAPANESE_ALIASES:
        return JAPANESE_ALIASES[name]
    key = lower.removeprefix("custom.")
    if key in fields:
        return f"custom.{key}"
    for definition in fields.values():
        if definition.label.strip() == name:
            return f"custom.{definition.key}"
    return None


def _target(value: Any, fields: Mapping[str, FieldDefinition], column: str) -> str | None:
    if value == "":
        return None
    if isinstance(value, str) and (
        value in WRITABLE
        or (value.startswith("custom.") and value.removeprefix("custom.") in fields)
    ):
        return value
    raise InvalidMessage(
        f"mapping of {column!r}: {value!r} is not a writable field, custom.<key> of a defined"
        ' custom field, or "" to ignore the column',
        field="mapping",
    )


def resolve_columns(
    header: list[str], mapping: Mapping[str, Any] | None, fields: Mapping[str, FieldDefinition]
) -> list[str | None]:
    """The target of each column (``name``, ``custom.<key>`` or None = ignored).

    ``mapping`` (heading → target) wins; other headings are matched by :func:`match_header`.
    """
    mapping = mapping or {}
    names = [h.strip().removeprefix("\ufeff") for h in header]
    for column in mapping:
        if column not in names:
            raise InvalidMessage(
                f"mapping names column {column!r}, which the file does not have", field="mapping"
            )
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise InvalidMessage(f"column {twice!r} appears twice in the header", field="file")
    columns: list[str | None] = []
    seen: dict[str, str] = {}
    for name in names:
        if name in mapping:
            target = _target(mapping[name], fields, name)
        else:
            target = match_header(name, fields)
            if target is None:
                raise InvalidMessage(
                    f'column {name!r} matches no field; map it to a field, or to "" to ignore it',
                    field="mapping",
                )
        if target is not None:
            if target in seen:
                raise InvalidMessage(
                    f"columns {seen[target]!r} and {name!r} both map to {target}", field="mapping"
                )
            seen[target] = name
        columns.append(target)
    return columns


def row_patch(
    cells: list[str], columns: list[str | None], fields: Mapping[str, FieldDefinition]
) -> ContactPatch:
    """Validate one record; empty cells are left out, so they leave the field unchanged."""
    if any(cell.strip() for cell in cells[len(columns) :]):
        raise InvalidMessage(f"the row has {len(cells)} cells but the header {len(columns)}")
    data: dict[str, Any] = {}
    custom: dict[str, str] = {}
    for target, cell in zip(columns, cells, strict=False):
        if target is None or not cell.strip():
            continue
        if target.startswith("custom."):
            custom[target.removeprefix("custom.")] = cell
        else:
            data[target] = cell
    if custom:
        data["custom_fields"] = custom
    try:
        return contact_patch(data, fields)
    except InvalidMessage as exc:
        field = exc.field or ""
        if field.startswith("custom_fields."):
            field = "custom." + field.removeprefix("custom_fields.")
        raise InvalidMessage(exc.reason, field=field or None) from None


def plan_import(
    text: str,
    mapping: Mapping[str, Any] | None,
    fields: Mapping[str, FieldDefinition],
    *,
    key: str,
    mode: str,
) -> tuple[dict[str, str], int]:
    """Check a decoded file before accepting it: header, mapping, key column, CSV syntax.

    Returns the resolved mapping (heading → target, "" ignored) and the number of records.
    """
    rows = records(text)
    first = next(rows, None)
    if first is None:
        raise InvalidMessage("the file is empty; expected a header row", field="file")
    header = first[2]
    columns = resolve_columns(header, mapping, fields)
    if key not in columns:
        raise InvalidMessage(f"the file has no column for the key field {key}", field="key")
    if mode != "update_only" and "email" not in columns:
        raise InvalidMessage(
            "creating contacts needs an email column; use mode update_only", field="mode"
        )
    total = sum(1 for _ in rows)
    names = [h.strip().removeprefix("\ufeff") for h in header]
    return {n: c or "" for n, c in zip(names, columns, strict=True)}, total
