"""Export files: safe CSV (F-42) in the chosen encoding, written whole or not at all.

- **Quoting** follows RFC 4180: fields holding a comma, a double quote, CR or LF are quoted,
  quotes doubled, records end with CRLF (Python's ``csv`` with ``QUOTE_MINIMAL``).
- **Formula injection** (CSV injection): a spreadsheet runs a cell beginning with ``=``,
  ``+``, ``-`` or ``@`` as a formula, and tab or CR at the start can hide one. With
  ``safe=True`` (the default) such a cell is written with a leading apostrophe ``'`` —
  the OWASP advice: spreadsheets show the text as it was, the apostrophe hidden or plain.
  Machine consumers that want the exact bytes ask with ``"safe_csv": false``.
- **Encodings**: ``utf-8``, ``utf-8-sig`` (UTF-8 with a BOM, so Excel detects it) and
  ``cp932`` (Shift_JIS as Windows/Excel in Japan reads it, with ㈱ ① 髙: what Japanese
  users call Shift_JIS is CP932, so ``shift_jis``, ``sjis`` and ``windows-31j`` name it
  too, :data:`ALIASES`). A character the encoding cannot
  hold (an emoji, 𠮷 in CP932) is written as ``?`` and counted (:attr:`ExportFile.replaced`):
  the job reports how many, it never fails for it.
- **Atomic**: rows go to ``<name>.part``; :meth:`ExportFile.commit` flushes, fsyncs and
  renames it to ``<name>``, so no half file is ever offered; :meth:`ExportFile.discard`
  removes the part file of a failed export.

Memory stays flat: text is encoded and written every :data:`FLUSH_CHARS` characters.
"""

from __future__ import annotations

import codecs
import contextlib
import contextvars
import csv
import io
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from libs.common.safecsv import FORMULA_STARTS, safe_cell

ENCODINGS = ("utf-8", "utf-8-sig", "cp932")
#: other names of an encoding that a request may use (JIS X 0208's Shift_JIS lacks the NEC
#: and IBM extensions every Windows file carries: the name means CP932 in practice).
ALIASES = {"shift_jis": "cp932", "sjis": "cp932", "shift-jis": "cp932", "windows-31j": "cp932"}
FLUSH_CHARS = 256 * 1024
_ERRORS = "tayori-export-replace"
#: the replacement counter of the file being flushed (set around each encode call).
_REPLACED: contextvars.ContextVar[list[int]] = contextvars.ContextVar("replaced")


def _replace_counted(error: UnicodeError) -> tuple[str, int]:
    """Codec error handler: '?' per unencodable character, counted for the job."""
    if not isinstance(error, UnicodeEncodeError):
        raise error
    count = error.end - error.start
    _REPLACED.get()[0] += count
    return "?" * count, error.end


codecs.register_error(_ERRORS, _replace_counted)


def _line_break_in_quotes(text: str) -> bool:
    """Whether a quoted field of ``text`` (complete records) spans lines: then the line
    holding its opening quote has an odd number of quotes (inner quotes are doubled)."""
    if '"' not in text:
        return False
    return any(line.count('"') & 1 for line in text.split("\n"))


class CannotWrite(Exception):
    """The export file cannot be written (disk full, no permission): the job fails with it.

    Not an OSError: :func:`libs.common.errors.classify` calls an OSError transient (a
    dependency's socket), and a full disk is not something to wait for."""


@contextlib.contextmanager
def _writing() -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise CannotWrite(str(exc)) from exc


class ExportFile:
    """One export file being written; use as a context manager that discards on error.
    A failed write raises :class:`CannotWrite`."""

    def __init__(self, path: Path, encoding: str, *, safe: bool = True) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}")
        self.path = path
        self.part = path.with_name(path.name + ".part")
        self.safe = safe
        self.rows = 0
        self._replaced = [0]
        self._encoder = codecs.getincrementalencoder(encoding)(errors=_ERRORS)
        self._text = io.StringIO()
        self._csv = csv.writer(self._text, lineterminator="\r\n")
        with _writing():
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.part, "wb")  # closed by commit() or discard()

    @property
    def replaced(self) -> int:
        """Characters written as ``?`` because the encoding cannot hold them."""
        return self._replaced[0]

    def header(self, labels: Sequence[str]) -> None:
        """The first line: column labels (neutralised like any cell)."""
        self._csv.writerow([safe_cell(label) for label in labels] if self.safe else labels)

    def write_rows(self, rows: Iterable[Sequence[str]]) -> int:
        """Append data rows (each a sequence of cell texts); returns how many."""
        count = 0
        writerow = self._csv.writerow
        if self.safe:
            starts = FORMULA_STARTS
            for row in rows:
                writerow([("'" + c) if c[:1] in starts else c for c in row])
                count += 1
        else:
            for row in rows:
                writerow(row)
                count += 1
        self.rows += count
        if self._text.tell() >= FLUSH_CHARS:
            self._flush()
        return count

    def write_records(self, text: str) -> int:
        """Append complete CSV records as PostgreSQL's COPY writes them (LF line ends,
        quotes only where needed), whose cells the source already made safe when this file
        is (contacts' stream does F-42 in its query); returns how many.

        Such text is already RFC 4180 but for its line ends, so when no quoted field holds
        a line break it is copied with LF made CRLF — no per-row work, which is most of an
        export's cost. Otherwise it is parsed and written row by row.
        """
        if _line_break_in_quotes(text):
            count = 0
            for row in csv.reader(io.StringIO(text)):
                self._csv.writerow(row)
                count += 1
            self.rows += count
            return count
        count = text.count("\n")
        self._text.write(text.replace("\n", "\r\n"))
        self.rows += count
        if self._text.tell() >= FLUSH_CHARS:
            self._flush()
        return count

    def _flush(self, final: bool = False) -> None:
        token = _REPLACED.set(self._replaced)
        try:
            data = self._encoder.encode(self._text.getvalue(), final)
        finally:
            _REPLACED.reset(token)
        with _writing():
            self._file.write(data)
        self._text.seek(0)
        self._text.truncate()

    def commit(self) -> int:
        """Finish the file under its final name; returns its size in bytes."""
        self._flush(final=True)
        with _writing():
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.part, self.path)
            return self.path.stat().st_size

    def discard(self) -> None:
        """Drop what was written (a failed export leaves no file behind)."""
        if not self._file.closed:
            self._file.close()
        self.part.unlink(missing_ok=True)

    def __enter__(self) -> ExportFile:
        return self

    def __exit__(self, kind: object, *_: object) -> None:
        if kind is not None:
            self.discard()
