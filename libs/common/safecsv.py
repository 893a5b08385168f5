"""Safe CSV cells (F-42): what a spreadsheet would run as a formula is shown as text.

A cell that begins with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return can be read by
Excel, LibreOffice or Google Sheets as a formula (CSV injection, OWASP). Such a cell gets a
leading ``'``, which every spreadsheet takes as "this is text" and does not display. Every
CSV Tayori offers for download (a campaign's recipient list, export files) goes through here;
an export for a machine consumer can turn it off (``"safe_csv": false``).
"""

from __future__ import annotations

FORMULA_STARTS = frozenset("=+-@\t\r")


def safe_cell(value: object) -> str:
    """``value`` as CSV cell text that a spreadsheet will not read as a formula."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in FORMULA_STARTS else text
