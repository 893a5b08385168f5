"""An opaque cursor for pages ordered newest first by (time, text key).

The cursor is the last item's sort values, ``<ISO instant>|<key>`` in URL-safe base64: a
client passes back what it was given and learns nothing from its shape. A cursor that does
not decode is bad input naming the field ``cursor`` (400), never a 500 or an empty page.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from typing import Annotated

from pydantic import Field, StringConstraints

from libs.common.checks import CONTROL
from libs.common.errors import InvalidMessage

_EARLIEST = dt.datetime(1900, 1, 1, tzinfo=dt.UTC)
_LATEST = dt.datetime(9999, 12, 30, tzinfo=dt.UTC)

#: the query value: what :func:`encode` makes, bounded.
Cursor = Annotated[
    str,
    StringConstraints(min_length=1, max_length=600, pattern=r"^[A-Za-z0-9_-]+={0,2}$"),
    Field(description="next_cursor of the page before"),
]


def encode(at: dt.datetime, key: str) -> str:
    return base64.urlsafe_b64encode(f"{at.isoformat()}|{key}".encode()).decode()


def decode(cursor: str) -> tuple[dt.datetime, str]:
    """The (time, key) a cursor carries; :class:`InvalidMessage` for anything else."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, key = text.split("|", 1)
        instant = dt.datetime.fromisoformat(at)
        if instant.tzinfo is None or CONTROL.search(key):
            raise ValueError(cursor)
        if not _EARLIEST <= instant.astimezone(dt.UTC) <= _LATEST:
            raise ValueError(cursor)
    except (binascii.Error, UnicodeDecodeError, ValueError, OverflowError):
        raise InvalidMessage("cursor is not one this API gave", field="cursor") from None
    return instant, key
