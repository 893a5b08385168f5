"""The text part of an HTML campaign: derived once per campaign from its HTML body.

:func:`html_to_text` reads HTML as a mail reader would show it as plain text;
:func:`text_template_from_html` does that to a body template with its merge tags kept in
place (they travel through the HTML parser as the sentinels of :mod:`libs.common.mail.links`),
so the text part is personalised with the same values as the HTML part.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

from libs.common.mail import links, mergetags

_HTML_SPACE = re.compile(r"[ \t\n\r\f]+")  # HTML's ASCII whitespace


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


__all__ = ["html_to_text", "text_template_from_html"]
