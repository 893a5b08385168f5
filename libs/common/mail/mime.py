"""Header lines of a message: folding, RFC 2047 encoded words, and what a header may hold.

Used when a campaign's static head is built (:mod:`libs.common.mail.template`) and for each
recipient's own header lines (:mod:`libs.common.mail.compose`). Lines end in CRLF.
"""

from __future__ import annotations

import binascii
import re

from libs.common.errors import InvalidMessage
from libs.common.mail.base64body import CRLF
from libs.common.mail.mergetags import escape_header

# RFC 2047: an encoded word is at most 75 characters. 42 UTF-8 bytes → 56 base64 characters,
# so ``=?UTF-8?B?…?=`` is 68 and even the first line, ``Subject: `` + word, stays within 78.
_ENCODED_WORD_BYTES = 42
_LINE = 78

#: headers the mail package writes itself; a caller may not set them as extra headers.
MANAGED = frozenset(
    {
        "date",
        "from",
        "to",
        "cc",
        "bcc",
        "subject",
        "reply-to",
        "message-id",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "return-path",
    }
)
_HEADER_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 ftext: printable ASCII except ':'


def _encoded_word(data: bytes) -> str:
    return "=?UTF-8?B?" + binascii.b2a_base64(data, newline=False).decode("ascii") + "?="


def _encoded_words(value: str) -> list[str]:
    """``value`` as RFC 2047 UTF-8 ``B`` encoded words, never splitting a character: each
    word ends before a UTF-8 continuation byte (``10xxxxxx``)."""
    data = value.encode("utf-8")
    words: list[str] = []
    start = 0
    while len(data) - start > _ENCODED_WORD_BYTES:
        end = start + _ENCODED_WORD_BYTES
        while data[end] & 0xC0 == 0x80:
            end -= 1
        words.append(_encoded_word(data[start:end]))
        start = end
    if start < len(data):
        words.append(_encoded_word(data[start:]))
    return words


def fold_unstructured(name: str, value: str) -> str:
    """One header line ``name: value`` folded to 78 columns, with its CRLF.

    ASCII values are folded at spaces (a word longer than a line stays whole: the hard limit is
    998). Non-ASCII values become RFC 2047 encoded words, one per line; decoders drop the
    folding whitespace between adjacent encoded words, so the value reads back unchanged.
    ``value`` must already be free of control characters.
    """
    if value.isascii():
        line = name + ": " + value
        if len(line) <= _LINE:
            return line + CRLF
        lines: list[str] = []
        current = name + ":"
        for word in value.split(" "):
            if not word:
                continue
            if len(current) + 1 + len(word) > _LINE and current != name + ":":
                lines.append(current)
                current = ""
            current += " " + word
        lines.append(current)
        return CRLF.join(lines) + CRLF
    return name + ": " + (CRLF + " ").join(_encoded_words(value)) + CRLF


def header_safe(value: str) -> str:
    """:func:`~libs.common.mail.mergetags.escape_header`, but printable ASCII (what
    List-Unsubscribe, To and Message-ID values are) has nothing to delete: only stripped,
    without ``str.translate``'s dictionary lookup per character."""
    if value.isascii() and value.isprintable():
        return value.strip()
    return escape_header(value)


def check_header_name(name: str) -> None:
    """Refuse an extra header's name that is not a header name, or names one of :data:`MANAGED`."""
    if not _HEADER_NAME.fullmatch(name):
        raise InvalidMessage(f"bad header name {name!r}", field="headers")
    if name.lower() in MANAGED:
        raise InvalidMessage(f"header {name} is set by the sender itself", field="headers")


def address(value: str, field: str) -> str:
    """``value`` as one bare address for a header (``a@b``), or refused naming ``field``."""
    clean = header_safe(value)
    if clean != value.strip() or "@" not in clean or " " in clean or "<" in clean:
        raise InvalidMessage(f"bad address {value!r}", field=field)
    return clean


__all__ = ["MANAGED", "address", "check_header_name", "fold_unstructured", "header_safe"]
