"""Where a body template's links are: found once per campaign, rewritten per recipient.

Open and click tracking (F-34) must keep render.py's design — the template work once per
campaign, only string joins per recipient — so the links of a body template are located when
the campaign's mail is built: a :class:`LinkedTemplate` is the template cut at each trackable
link (and at the open pixel's place), and per recipient only each link's tracked URL is signed
and joined in.

- HTML: the ``href`` of every ``<a>`` element, found with the standard HTML parser (so markup
  inside comments or scripts is not taken for a link). Character references in the attribute
  are decoded before signing (``&amp;`` → ``&``): the redirect goes where a browser would
  have gone, and the tracked URL is escaped again where it is put.
- Text: bare ``http(s)://`` URLs (ASCII URL characters; trailing punctuation left out) and
  the ``<#coupon_url>`` tag, whose value is a URL.
- A link without merge tags is decided and decoded once. A link with merge tags
  (``https://x/?id=<#contact_id>``) is rendered per recipient — escaped as its part escapes
  values — then decoded, decided and signed. An href that is nothing but
  ``<#unsubscribe_url>`` is not a link here: it stays the signed unsubscribe URL.

Merge tags travel through the parsing as private-use sentinels (``\\ue000N\\ue001``): no HTML
meaning, no whitespace, never produced by a parser, turned back into tags afterwards.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from html.parser import HTMLParser

from libs.common.mail import mergetags
from libs.common.mail.mergetags import Escape, Template

_OPEN, _CLOSE = "\ue000", "\ue001"
_SENTINEL = re.compile(f"{_OPEN}([0-9]+){_CLOSE}")
# Attributes of a start tag as HTMLParser reads them (its tolerant attribute pattern).
_ATTRIBUTE = re.compile(
    r"""((?<=['"\s/])[^\s/>][^\s/=>]*)(\s*=+\s*('[^']*'|"[^"]*"|(?!['"])[^>\s]*))?(?:\s|/(?!>))*"""
)
_TAG_NAME = re.compile(r"<[a-zA-Z][^\t\n\r\f />\x00]*")
# A bare URL in text: ASCII URL characters (merge-tag sentinels included); the trailing
# punctuation of the sentence around it is not part of it.
_TEXT_URL = re.compile(r"https?://[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%\ue000\ue001]+", re.I)
_TRAILING = ".,;:!?'\")]"
#: merge tags whose value is a URL to track wherever they stand (a text part's coupon link
#: is the bare tag; other tags are only known to be URLs inside an href).
URL_KEYS = frozenset({mergetags.COUPON_URL})


def with_sentinels(template: Template) -> str:
    """The template's text with each merge tag as a sentinel holding its index."""
    pieces = [template.literals[0].replace(_OPEN, "")]
    for index, literal in enumerate(template.literals[1:]):
        pieces.append(f"{_OPEN}{index}{_CLOSE}")
        pieces.append(literal.replace(_OPEN, ""))
    return "".join(pieces)


def from_sentinels(text: str, template: Template) -> Template:
    """A template of ``text`` (a piece of :func:`with_sentinels` output) with its tags back."""
    literals: list[str] = []
    tags: list[mergetags.Tag] = []
    position = 0
    for match in _SENTINEL.finditer(text):
        literals.append(text[position : match.start()])
        tags.append(template.tags[int(match.group(1))])
        position = match.end()
    literals.append(text[position:])
    return Template(text, literals, tags)


@dataclass(frozen=True, slots=True)
class Slot:
    """What a :class:`LinkedTemplate` joins in per recipient: a link, or the open pixel
    (``href`` None). ``url`` is a link's decoded URL when it has no merge tags."""

    href: Template | None
    url: str | None = None


PIXEL = Slot(None)


def _decode(mode: Escape, text: str) -> str:
    return html.unescape(text).strip() if mode == "html" else text.strip()


def _encode(mode: Escape, url: str) -> str:
    return mergetags.escape_html(url) if mode == "html" else url


class LinkedTemplate:
    """A body template cut at its slots: ``pieces[0] slot[0] pieces[1] … pieces[n]``."""

    __slots__ = ("mode", "pieces", "slots")

    def __init__(self, mode: Escape, pieces: list[Template], slots: list[Slot]) -> None:
        assert len(pieces) == len(slots) + 1
        self.mode = mode
        self.pieces = tuple(pieces)
        self.slots = tuple(slots)

    def render(
        self, values: Mapping[str, str], click: Callable[[str], str], pixel: str = ""
    ) -> str:
        """The part for one recipient: each link's URL through ``click`` (which returns a URL
        it does not track unchanged), the open pixel as ``pixel``."""
        return "".join(self.render_parts(values, click, pixel))

    @property
    def constants(self) -> tuple[str, ...]:
        """The text every recipient gets, in order: what :meth:`render_parts` puts at its
        even indices."""
        return tuple(literal for piece in self.pieces for literal in piece.literals)

    def render_parts(
        self, values: Mapping[str, str], click: Callable[[str], str], pixel: str = ""
    ) -> list[str]:
        """What :meth:`render` joins: :attr:`constants` at even indices, the recipient's
        values, links and pixel at odd ones."""
        mode = self.mode
        out = self.pieces[0].render_parts(values, mode)
        for slot, piece in zip(self.slots, self.pieces[1:], strict=True):
            if slot.href is None:
                out.append(pixel)
            else:
                url = slot.url
                if url is None:
                    url = _decode(mode, slot.href.render(values, mode))
                out.append(_encode(mode, click(url)))
            out += piece.render_parts(values, mode)
        return out


def _is_link(href: Template, mode: Escape, tracks: Callable[[str], bool]) -> Slot | None:
    """The slot of one link as written, or None when it is never rewritten."""
    if not href.tags:
        url = _decode(mode, href.literals[0])
        return Slot(href, url) if tracks(url) else None
    if href.keys == {mergetags.UNSUBSCRIBE_URL} and not "".join(href.literals).strip():
        return None
    return Slot(href)


def _cut(
    template: Template,
    source: str,
    spans: list[tuple[int, int, Slot | None]],
    mode: Escape,
    tracks: Callable[[str], bool],
) -> LinkedTemplate:
    """``source`` (sentinel form) cut at ``spans``: (start, end, PIXEL) or (start, end, None)
    for a link whose slot is decided here."""
    pieces: list[Template] = []
    slots: list[Slot] = []
    position = 0
    for start, end, given in sorted(spans, key=lambda span: span[0]):
        slot = given or _is_link(from_sentinels(source[start:end], template), mode, tracks)
        if slot is None:
            continue
        pieces.append(from_sentinels(source[position:start], template))
        slots.append(slot)
        position = end
    pieces.append(from_sentinels(source[position:], template))
    return LinkedTemplate(mode, pieces, slots)


class _Anchors(HTMLParser):
    """Offsets of every ``<a>``'s href value and of the last ``</body>`` in a document."""

    def __init__(self, source: str) -> None:
        super().__init__(convert_charrefs=True)
        self._line_starts = [0]
        for line in source.split("\n")[:-1]:
            self._line_starts.append(self._line_starts[-1] + len(line) + 1)
        self.hrefs: list[tuple[int, int]] = []
        self.body_end: int | None = None
        self.feed(source)
        self.close()

    def _offset(self) -> int:
        line, column = self.getpos()
        return self._line_starts[line - 1] + column

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag != "a":
            return
        raw = self.get_starttag_text() or ""
        name = _TAG_NAME.match(raw)
        for match in _ATTRIBUTE.finditer(raw, name.end() if name else 0):
            if match.group(1).lower() != "href" or match.group(3) is None:
                continue
            start, end = match.span(3)
            if match.group(3)[:1] in ("'", '"'):
                start, end = start + 1, end - 1
            at = self._offset()
            self.hrefs.append((at + start, at + end))
            return  # the first href wins, as in a browser

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag == "body":
            self.body_end = self._offset()


def linked_html(
    template: Template, tracks: Callable[[str], bool], *, clicks: bool, pixel: bool
) -> LinkedTemplate:
    """An HTML body cut at its ``<a href>`` links (when ``clicks``) and at the place of the
    open pixel (when ``pixel``: before the last ``</body>``, or at the end)."""
    source = with_sentinels(template)
    found = _Anchors(source)
    spans: list[tuple[int, int, Slot | None]] = []
    if clicks:
        spans += [(start, end, None) for start, end in found.hrefs]
    if pixel:
        at = len(source) if found.body_end is None else found.body_end
        spans.append((at, at, PIXEL))
    return _cut(template, source, spans, "html", tracks)


def linked_text(
    template: Template, tracks: Callable[[str], bool], *, clicks: bool
) -> LinkedTemplate:
    """A text body cut at its bare http(s) URLs (when ``clicks``)."""
    source = with_sentinels(template)
    spans: list[tuple[int, int, Slot | None]] = []
    if clicks:
        for match in _TEXT_URL.finditer(source):
            url = match.group(0)
            end = match.end()
            while url and url[-1] in _TRAILING and not (url[-1] == ")" and "(" in url):
                url, end = url[:-1], end - 1
            spans.append((match.start(), end, None))
        for match in _SENTINEL.finditer(source):
            inside = any(start <= match.start() < end for start, end, _ in spans)
            if template.tags[int(match.group(1))].key in URL_KEYS and not inside:
                spans.append((match.start(), match.end(), None))
    return _cut(template, source, spans, "text", tracks)


__all__ = [
    "PIXEL",
    "LinkedTemplate",
    "Slot",
    "from_sentinels",
    "linked_html",
    "linked_text",
    "with_sentinels",
]
