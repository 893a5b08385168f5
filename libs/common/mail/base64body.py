"""A mail body part as UTF-8 base64 in 76-character CRLF lines (RFC 2045), per recipient:
:class:`Base64Part` gives the bytes of the whole part encoded at once for a text made of a
campaign's constant pieces and a recipient's own values, encoding the constant pieces once
(used by :mod:`libs.common.mail.render`)."""

from __future__ import annotations

import binascii

CRLF = "\r\n"
_B64_LINE = 76


def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def _wrap(encoded: str, column: int, out: list[str]) -> int:
    """Appends ``encoded`` to ``out`` as the continuation of a line already ``column``
    characters long, breaking lines at 76 characters; the column after it."""
    room = _B64_LINE - column
    size = len(encoded)
    if size <= room:
        out.append(encoded)
        return column + size
    if room:
        out.append(encoded[:room])
    for start in range(room, size, _B64_LINE):
        out.append(CRLF)
        out.append(encoded[start : start + _B64_LINE])
    return (size - room - 1) % _B64_LINE + 1


class Base64Part:
    """A body part as UTF-8 base64 in 76-character CRLF lines (no trailing CRLF), the
    same bytes as the whole part encoded at once, with its constant text encoded once.

    Base64 encodes 3 bytes at a time, so what a constant piece of a template encodes to
    depends only on how many bytes the recipient's text before it left over (0–2) and at which
    column its line stands; each (piece, bytes to complete, column) met is encoded and folded
    once and kept, up to :attr:`BUDGET` characters a part. Per recipient only the values,
    links and pixel, and the 3-byte groups they share with the constant text, are encoded.
    """

    BUDGET = 1 << 18  # characters kept per part; beyond, a piece is encoded each time

    __slots__ = ("_constants", "_encoded", "_kept")

    def __init__(self, constants: tuple[str, ...]) -> None:
        self._constants = tuple(text.encode("utf-8") for text in constants)
        self._encoded: dict[tuple[int, int, int], tuple[str, int, bytes]] = {}
        self._kept = 0

    def encode(self, parts: list[str]) -> str:
        """``"".join(parts)`` encoded as a whole; ``parts`` as
        :meth:`libs.common.mail.links.LinkedTemplate.render_parts` returns them."""
        out: list[str] = []
        carry = b""  # the last 0–2 bytes, not yet encoded
        column = 0
        for index, text in enumerate(parts):
            if index & 1:  # the recipient's own
                if text:
                    data = carry + text.encode("utf-8")
                    whole = len(data) - len(data) % 3
                    carry = data[whole:]
                    if whole:
                        column = _wrap(_b64(data[:whole]), column, out)
                continue
            constant = self._constants[index >> 1]
            skip = 0
            if carry:
                skip = 3 - len(carry)
                if len(constant) < skip:
                    carry += constant
                    continue
                column = _wrap(_b64(carry + constant[:skip]), column, out)
            key = (index, skip, column)
            encoded = self._encoded.get(key)
            if encoded is None:
                encoded = self._constant(constant[skip:], column)
                if self._kept < self.BUDGET:
                    self._encoded[key] = encoded
                    self._kept += len(encoded[0])
            text, column, carry = encoded
            out.append(text)
        if carry:
            _wrap(_b64(carry), column, out)
        return "".join(out)

    @staticmethod
    def _constant(data: bytes, column: int) -> tuple[str, int, bytes]:
        whole = len(data) - len(data) % 3
        out: list[str] = []
        column = _wrap(_b64(data[:whole]), column, out)
        return "".join(out), column, data[whole:]
