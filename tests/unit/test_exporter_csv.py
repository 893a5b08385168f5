"""The export file writer (F-42): RFC 4180 quoting, formula neutralisation, encodings with
counted replacements, atomic commit — and the record splitting of the source reader."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from libs.common.safecsv import safe_cell
from services.exporter.csvfile import ExportFile
from services.exporter.processor import contacts_plan, unsubscribed_cell
from services.exporter.sources import complete_records

DANGEROUS = ["=1+1", "+81 3", "-5", "@SUM(A1)", "\tx", "\rx"]
HARMLESS = ["", "山田 太郎", "a=b", "x-1", "mail@example.jp", "'=already", " =space"]


def _read(path: Path, encoding: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(path.read_bytes().decode(encoding), newline="")))


@pytest.mark.parametrize("cell", DANGEROUS)
def test_dangerous_starts_get_an_apostrophe(cell: str) -> None:
    assert safe_cell(cell) == "'" + cell


@pytest.mark.parametrize("cell", HARMLESS)
def test_other_cells_stay(cell: str) -> None:
    assert safe_cell(cell) == cell


def test_rfc4180_quoting_crlf_and_safe_cells(tmp_path: Path) -> None:
    path = tmp_path / "out.csv"
    rows = [["1", 'say "hi"', "a,b", "line1\nline2", "=cmd", "\tx", "\rx"]]
    with ExportFile(path, "utf-8") as out:
        out.header(["id", "=label"])
        assert out.write_rows(rows) == 1
        out.commit()
    raw = path.read_bytes()
    assert raw == (b'id,\'=label\r\n1,"say ""hi""","a,b","line1\nline2",\'=cmd,\'\tx,"\'\rx"\r\n')
    assert _read(path, "utf-8")[1] == [
        "1",
        'say "hi"',
        "a,b",
        "line1\nline2",
        "'=cmd",
        "'\tx",
        "'\rx",
    ]


def test_unsafe_mode_writes_cells_exactly(tmp_path: Path) -> None:
    path = tmp_path / "out.csv"
    rows = [DANGEROUS, HARMLESS]
    with ExportFile(path, "utf-8", safe=False) as out:
        out.write_rows(rows)
        out.commit()
    assert _read(path, "utf-8") == rows


@pytest.mark.parametrize(
    ("encoding", "bom", "replaced"),
    [("utf-8", False, 0), ("utf-8-sig", True, 0), ("cp932", False, 3)],
)
def test_encodings_and_counted_replacements(
    tmp_path: Path, encoding: str, bom: bool, replaced: int
) -> None:
    path = tmp_path / "out.csv"
    rows = [["髙橋", "寿司🍣", "𠮷野家"], ["①②", "ﾊﾝｶｸ", "🍣"]] * 3000  # spans several flushes
    with ExportFile(path, encoding) as out:
        out.write_rows(rows)
        out.commit()
    assert out.replaced == replaced * 3000
    assert path.read_bytes().startswith(b"\xef\xbb\xbf") == bom
    read = _read(path, "utf-8-sig" if bom else encoding)
    if encoding == "cp932":  # 🍣 and 𠮷 are not in CP932; 髙, ① and half-width kana are
        assert read[:2] == [["髙橋", "寿司?", "?野家"], ["①②", "ﾊﾝｶｸ", "?"]]
    else:
        assert read == rows


def test_only_a_committed_file_exists(tmp_path: Path) -> None:
    path = tmp_path / "out.csv"
    with pytest.raises(RuntimeError), ExportFile(path, "utf-8") as out:
        out.write_rows([["1"]])
        assert out.part.exists() and not path.exists()
        raise RuntimeError("the source broke")
    assert list(tmp_path.iterdir()) == []
    with ExportFile(path, "utf-8") as out:
        out.write_rows([["1"]])
        size = out.commit()
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]
    assert size == path.stat().st_size == 3


def test_records_are_cut_only_outside_quotes() -> None:
    text = 'a,b\n"multi\nline",c\n"open\nfield'
    cut = complete_records(text)
    assert text[:cut] == 'a,b\n"multi\nline",c\n'
    assert complete_records('"x\ny') == 0
    assert complete_records('""""\n') == 5  # a doubled quote inside a field


def test_unsubscribed_cell_and_plans() -> None:
    assert (
        unsubscribed_cell("unsubscribed", "2026-11-20 10:15:42", "form")
        == "2026-11-20 10:15 (フォーム)"
    )
    labels = {
        method: unsubscribed_cell("unsubscribed", "2026-11-20 10:15", method)[-6:]
        for method in ("system", "auto_stop", "auto_sync")
    }
    assert labels == {"system": "(システム)", "auto_stop": "(自動停止)", "auto_sync": "(自動同期)"}
    assert (
        unsubscribed_cell("unsubscribed", "2026-11-20 10:15:42", "auto_stop", code=True)
        == "2026-11-20 10:15 (auto_stop)"
    )
    assert unsubscribed_cell("banned", "2026-11-20 10:15:42", "system") == ""
    assert unsubscribed_cell("", "", "") == ""
    plain = contacts_plan([{"key": "id"}, {"key": "custom_fields.plan"}])
    assert (plain.stream_columns, plain.shape) == (["id", "custom.plan"], None)
    plan = contacts_plan(
        [
            {"key": "email"},
            {"key": "unsubscribed_at:12"},
            {"key": "contact_id"},
            {"key": "email"},
            {"key": "unsubscribed_at:12:code"},
        ]
    )
    assert plan.stream_columns == [
        "email",
        "membership.12.state",
        "membership.12.changed_at",
        "membership.12.method",
        "id",
    ]
    assert plan.shape is not None
    row = ["a@x.jp", "unsubscribed", "2026-11-20 10:15:00", "form", "7"]
    assert plan.shape(row) == [
        "a@x.jp",
        "2026-11-20 10:15 (フォーム)",
        "7",
        "a@x.jp",
        "2026-11-20 10:15 (form)",
    ]


@pytest.mark.parametrize("safe", [True, False])
def test_copy_text_reads_back_the_same_whether_copied_or_rewritten(
    tmp_path: Path, safe: bool
) -> None:
    """COPY's CSV text (its cells made safe by the source when asked, as contacts' stream
    does in SQL) goes through as it is when it can, else row by row; either way the file
    reads back as the rows, with CRLF line ends."""
    plain = [["1", "山田 太郎", "a@example.jp", "2026-11-20 10:15:00"]] * 50
    tricky = [["2", "=cmd", "a,b", 'say "hi"'], ["3", "line1\nline2", "-5", "\tx"]]
    chunks = [plain, plain + tricky, [["4", "", "x", "y"]]]
    expected = [[safe_cell(c) if safe else c for c in row] for rows in chunks for row in rows]
    path = tmp_path / "out.csv"
    with ExportFile(path, "utf-8", safe=safe) as out:
        for rows in chunks:
            text = io.StringIO()
            source = [[safe_cell(c) if safe else c for c in row] for row in rows]
            csv.writer(text, lineterminator="\n").writerows(source)  # quotes like COPY's
            assert out.write_records(text.getvalue()) == len(rows)
        out.commit()
    assert _read(path, "utf-8") == expected
    raw = path.read_bytes()
    assert raw.count(b"\r\n") == len(expected) and b"line1\nline2" in raw
