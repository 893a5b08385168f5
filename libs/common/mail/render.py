"""A campaign's mail, built once and personalised per recipient as bytes.

Building an ``email.message.EmailMessage`` costs ~0.6 ms, more than the SMTP exchange
(shared/LIMITS.md), so :class:`CampaignMessage` does the MIME work once per campaign: it parses
the subject and body templates, derives the text part of an HTML campaign, picks a boundary and
folds the static headers (From, Reply-To, extra headers, MIME-Version, Content-Type). Per
recipient :meth:`CampaignMessage.render` only joins strings: Date, Message-ID, To, Subject
(RFC 2047 when non-ASCII), the per-recipient headers (``List-Unsubscribe`` and
``List-Unsubscribe-Post`` from :meth:`libs.common.mail.unsubscribe.UnsubscribeLinks.headers`) and
each body part as UTF-8 base64 in 76-character lines. Lines end in CRLF.

The boundary is random per campaign and chosen so it does not occur in any static header. Every
body part is base64, whose alphabet (``A-Z a-z 0-9 + / =``) has no ``-``: a body line can never
start with ``--``, so it can never be read as a delimiter line, whatever a recipient's values are.

Open and click tracking (F-34), when a :class:`~libs.common.mail.tracking.TrackingLinks` is given,
keeps that shape: the links of each body part and the place of the open pixel are found once,
when the campaign is built (:mod:`libs.common.mail.links`); per recipient only each destination is
signed (once, though it is in both parts) and joined in.

The envelope (MAIL FROM, VERP return path) is the SMTP client's business; no Return-Path header
is written here.
"""

from __future__ import annotations

import binascii
import os
import re
import secrets
import time
from collections.abc import Callable, Mapping
from email.policy import SMTP
from email.utils import formataddr, formatdate
from html.parser import HTMLParser
from typing import Literal

from libs.common.errors import InvalidMessage
from libs.common.mail import links, mergetags
from libs.common.mail.base64body import CRLF, Base64Part
from libs.common.mail.tracking import RecipientLinks, TrackingLinks, trackable

Format = Literal["text", "html"]

# RFC 2047: an encoded word is at most 75 characters. 42 UTF-8 bytes → 56 base64 characters,
# so ``=?UTF-8?B?…?=`` is 68 and even the first line, ``Subject: `` + word, stays within 78.
_ENCODED_WORD_BYTES = 42
_LINE = 78

# Headers this module writes itself; a caller may not set them through ``headers``.
_MANAGED = frozenset(
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
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")
_HTML_SPACE = re.compile(r"[ \t\n\r\f]+")  # HTML's ASCII whitespace


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


def _header_safe(value: str) -> str:
    """:func:`mergetags.escape_header`, but printable ASCII (what List-Unsubscribe, To and
    Message-ID values are) has nothing to delete: only stripped, without ``str.translate``'s
    dictionary lookup per character."""
    if value.isascii() and value.isprintable():
        return value.strip()
    return mergetags.escape_header(value)


def _encoded_word(data: bytes) -> str:
    return "=?UTF-8?B?" + binascii.b2a_base64(data, newline=False).decode("ascii") + "?="


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


def _check_header_name(name: str) -> None:
    if not _HEADER_NAME.fullmatch(name):
        raise InvalidMessage(f"bad header name {name!r}", field="headers")
    if name.lower() in _MANAGED:
        raise InvalidMessage(f"header {name} is set by the sender itself", field="headers")


def _address(value: str, field: str) -> str:
    clean = _header_safe(value)
    if clean != value.strip() or "@" not in clean or " " in clean or "<" in clean:
        raise InvalidMessage(f"bad address {value!r}", field=field)
    return clean


def _untracked(url: str) -> str:
    return url


def _id_part(value: object) -> str:
    return _ID_UNSAFE.sub("", str(value)) or "0"


class _TextFromHtml(HTMLParser):
    """Plain text from HTML: tags stripped, entities unescaped, links kept as ``text (url)``.

    Block elements (p, div, br, li, tr, h1–h6 ...) start new lines, list items get ``- ``,
    whitespace collapses as a browser would (except inside ``pre``), and the content of
    ``head``, ``script``, ``style`` and ``title`` is dropped. A link whose text already is its
    URL, or whose URL is an in-page anchor, ``javascript:`` or empty, is kept as its text alone.
    """

    _BLOCKS = frozenset(
        "p div br tr li ul ol table h1 h2 h3 h4 h5 h6 blockquote hr pre section article "
        "header footer center".split()
    )
    _HIDDEN = frozenset({"head", "script", "style", "title"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._out: list[str] = []
        self._hidden = 0
        self._pre = 0
        self._links: list[tuple[str, int]] = []  # (href, index in _out where its text starts)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._HIDDEN:
            self._hidden += 1
        elif tag in self._BLOCKS:
            self._out.append("\n")
            if tag == "li":
                self._out.append("- ")
            elif tag == "pre":
                self._pre += 1
        elif tag == "a":
            href = (dict(attrs).get("href") or "").strip()
            self._links.append((href, len(self._out)))
        elif tag == "img":
            alt = (dict(attrs).get("alt") or "").strip()
            if alt:
                self._out.append(alt)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag == "a":
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self._HIDDEN:
            self._hidden = max(0, self._hidden - 1)
        elif tag in self._BLOCKS and tag != "li":  # the next item starts its own line
            if tag == "pre":
                self._pre = max(0, self._pre - 1)
            self._out.append("\n")
        elif tag == "a" and self._links:
            href, start = self._links.pop()
            text = "".join(self._out[start:]).strip()
            lowered = href.lower()
            if href and href != text and not lowered.startswith(("#", "javascript:")):
                if lowered.startswith("mailto:") and href[7:] == text:
                    return
                self._out.append(f" ({href})" if text else href)

    def handle_data(self, data: str) -> None:
        if self._hidden:
            return
        if not self._pre:
            data = _HTML_SPACE.sub(" ", data)  # not \s: &nbsp; must survive
        self._out.append(data)

    def text(self) -> str:
        raw = "".join(self._out)
        lines = [line.strip(" ") for line in raw.split("\n")]
        joined = "\n".join(lines)
        return re.sub(r"\n{3,}", "\n\n", joined).strip("\n")


def html_to_text(source: str) -> str:
    """The plain-text alternative of an HTML document (see :class:`_TextFromHtml`)."""
    parser = _TextFromHtml()
    parser.feed(source)
    parser.close()
    return parser.text()


def text_template_from_html(template: mergetags.Template) -> mergetags.Template:
    """The text-part template of an HTML body template, merge tags kept in place."""
    return links.from_sentinels(html_to_text(links.with_sentinels(template)), template)


class _Body:
    """A body part: its template with links, and its base64 (constant text encoded once)."""

    __slots__ = ("_base64", "_linked")

    def __init__(self, linked: links.LinkedTemplate) -> None:
        self._linked = linked
        self._base64 = Base64Part(linked.constants)

    def encode(
        self, values: Mapping[str, str], click: Callable[[str], str], pixel: str = ""
    ) -> str:
        """The part for one recipient, base64 in CRLF lines."""
        return self._base64.encode(self._linked.render_parts(values, click, pixel))


class CampaignMessage:
    """One campaign's mail: built once, then :meth:`render` per recipient.

    ``body`` and ``subject`` are merge-tag templates (:mod:`libs.common.mail.mergetags`),
    validated by the scheduler when the campaign was created. ``headers`` are static extra
    headers added to every mail. ``now`` is injectable so tests get a fixed Date.

    With ``tracking``, http(s) links of both parts become per-recipient click URLs (when
    ``track_clicks``) and the HTML part gets an open pixel (when ``track_opens``); without it
    (previews, test sends) the mail is exactly as written.
    """

    def __init__(
        self,
        *,
        campaign_id: str | int,
        from_address: str,
        from_name: str = "",
        reply_to: str | None = None,
        subject: str,
        format: Format,
        body: str,
        headers: Mapping[str, str] | None = None,
        now: Callable[[], float] = time.time,
        tracking: TrackingLinks | None = None,
        track_opens: bool = True,
        track_clicks: bool = True,
    ) -> None:
        if format not in ("text", "html"):
            raise InvalidMessage(f"format must be text or html, not {format!r}", field="format")
        if mergetags.escape_header(subject) != subject.strip():
            raise InvalidMessage("subject must be one line", field="subject")
        self.campaign_id = _id_part(campaign_id)
        self._campaign = str(campaign_id)
        self.from_address = _address(from_address, "from_address")
        self.domain = self.from_address.rsplit("@", 1)[1]
        self.format = format
        self.subject = mergetags.parse(subject.strip())
        self._now = now
        self._date_second = -1
        self._date = ""

        self.html: mergetags.Template | None
        self.boundary: str | None
        self._head: str
        if format == "html":
            self.html = mergetags.parse(body)
            self.text = text_template_from_html(self.html)
        else:
            self.html = None
            self.text = mergetags.parse(body)
        self._tracking = tracking
        clicks = tracking is not None and track_clicks
        self._pixel = tracking is not None and track_opens and self.html is not None
        tracks = tracking.tracks if tracking is not None else trackable
        self._text_body = _Body(links.linked_text(self.text, tracks, clicks=clicks))
        self._html_body = (
            None
            if self.html is None
            else _Body(links.linked_html(self.html, tracks, clicks=clicks, pixel=self._pixel))
        )

        static: list[str] = [
            SMTP.fold("From", formataddr((mergetags.escape_header(from_name), self.from_address)))
        ]
        if reply_to:
            static.append(SMTP.fold("Reply-To", _address(reply_to, "reply_to")))
        for name, value in (headers or {}).items():
            _check_header_name(name)
            static.append(SMTP.fold(name, mergetags.escape_header(value)))
        static.append("MIME-Version: 1.0" + CRLF)
        text_headers = (
            'Content-Type: text/plain; charset="utf-8"' + CRLF + "Content-Transfer-Encoding: base64"
        )
        if self.html is None:
            self.boundary = None
            static.append(text_headers + CRLF + CRLF)
            self._head = "".join(static)
        else:
            head_without_type = "".join(static)
            boundary = "=_" + secrets.token_hex(16)
            while boundary in head_without_type:  # practically never; cheap to be sure
                boundary = "=_" + secrets.token_hex(16)
            self.boundary = boundary
            self._head = (
                head_without_type
                + f'Content-Type: multipart/alternative; boundary="{boundary}"'
                + CRLF
                + CRLF
            )
            delimiter = CRLF + "--" + boundary + CRLF
            self._before_text = "--" + boundary + CRLF + text_headers + CRLF + CRLF
            self._before_html = (
                delimiter
                + 'Content-Type: text/html; charset="utf-8"'
                + CRLF
                + "Content-Transfer-Encoding: base64"
                + CRLF
                + CRLF
            )
            self._closing = CRLF + "--" + boundary + "--" + CRLF

    def uses(self, key: str) -> bool:
        """Whether subject or body renders ``key`` (e.g. skip signing an unused coupon)."""
        return (
            key in self.subject.keys
            or key in self.text.keys
            or (self.html is not None and key in self.html.keys)
        )

    def message_id(self, contact_id: str | int) -> str:
        """A fresh ``<{campaign_id}.{contact_id}.{random}@{domain of from}>``."""
        random = os.urandom(8).hex()
        return f"<{self.campaign_id}.{_id_part(contact_id)}.{random}@{self.domain}>"

    def _date_header(self) -> str:
        now = self._now()
        second = int(now)
        if second != self._date_second:  # formatdate is the slow part: once per second
            # formatdate writes UTC as "-0000" ("zone unknown", RFC 5322 §3.3); say +0000.
            self._date = formatdate(now, localtime=False)[:-5] + "+0000"
            self._date_second = second
        return self._date

    def render(
        self,
        values: Mapping[str, str],
        *,
        to: str,
        message_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        contact_id: str | int | None = None,
        step_id: str | None = None,
    ) -> bytes:
        """The complete RFC 5322 message for one recipient, CRLF line endings.

        ``values`` feeds the merge tags (missing → ``""``); ``headers`` are this recipient's
        extra headers (``List-Unsubscribe``, ``List-Unsubscribe-Post``); their values are
        stripped of CR/LF. Without ``message_id`` one is generated from ``contact_id`` (or
        ``values["contact_id"]``), which also names the recipient in tracking links (with
        ``step_id`` for a step mail).
        """
        address = _address(to, "to")
        if contact_id is None:
            contact_id = values.get("contact_id", "0")
        if message_id is None:
            message_id = self.message_id(contact_id)
        else:
            message_id = _header_safe(message_id)
        lines = [
            "Date: ",
            self._date_header(),
            CRLF,
            "Message-ID: ",
            message_id,
            CRLF,
            "To: ",
            address,
            CRLF,
            fold_unstructured("Subject", self.subject.render(values, "header").strip()),
        ]
        if headers:
            for name, value in headers.items():
                _check_header_name(name)
                lines.append(fold_unstructured(name, _header_safe(value)))
        lines.append(self._head)
        click: Callable[[str], str] = _untracked
        pixel = ""
        if self._tracking is not None:
            recipient = RecipientLinks(self._tracking, self._campaign, int(contact_id), step_id)
            click = recipient.click
            if self._pixel:
                pixel = recipient.pixel()
        text_body = self._text_body.encode(values, click)
        if self._html_body is None:
            lines.append(text_body)
            lines.append(CRLF)
        else:
            lines.append(self._before_text)
            lines.append(text_body)
            lines.append(self._before_html)
            lines.append(self._html_body.encode(values, click, pixel))
            lines.append(self._closing)
        return "".join(lines).encode("utf-8")


__all__ = [
    "CampaignMessage",
    "fold_unstructured",
    "html_to_text",
    "text_template_from_html",
]
