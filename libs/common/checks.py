"""Checks on text that comes from outside and is stored or passed on as it is.

PostgreSQL cannot store NUL in text (a batch with one fails as a whole), and other control
characters in an identifier break CSV rows, mail headers and log lines; refusing them where
the value enters names the field, instead of a database error naming none.
"""

from __future__ import annotations

import re

from libs.common.errors import InvalidMessage

#: a control character: C0 and DEL.
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def is_plain(value: str) -> bool:
    """Whether ``value`` carries no control character."""
    return CONTROL.search(value) is None


def identifier(value: str, field: str) -> str:
    """``value`` unchanged, or :class:`InvalidMessage` naming ``field`` if it carries a
    control character (NUL, a line break, a tab …)."""
    found = CONTROL.search(value)
    if found is not None:
        raise InvalidMessage(
            f"contains the control character U+{ord(found.group()):04X}, which an identifier"
            " may not carry",
            field=field,
        )
    return value
