"""Merge tags (独自タグ, F-21): ``<#key>`` in a campaign's subject and body.

Shared by the scheduler (which refuses unknown tags when a campaign is created) and the
sender (which renders every recipient's mail), so both read the same syntax.

Syntax
    ``<#key>`` where ``key`` is ASCII ``[a-z][a-z0-9_.]*``: a contact field (``name``,
    ``company``, ``email`` ...), a custom field as the bare key or ``custom.<key>``, or one of
    the special keys ``unsubscribe_url`` and ``coupon_url``. The Japanese aliases
    ``<#氏名>``, ``<#会社名>``, ``<#配信停止URL>`` and ``<#クーポンURL>`` stand for
    ``name``, ``company``, ``unsubscribe_url`` and ``coupon_url``.

    A ``<#`` that does not form a valid tag (``<#Name>``, ``<# name>``, ``<#`` with no
    ``>``) is literal text when rendering. :func:`validate` still reports a tag-shaped
    ``<#...>`` with no whitespace inside (``<#Name>``, ``<#name-x>``) as unknown, because it is
    almost certainly a typo that would otherwise reach every recipient verbatim.

Rendering
    A template is parsed once into alternating literals and placeholders; rendering is one
    ``str.join``. ``values`` maps keys to strings; a missing key renders as ``""``. The value
    of ``<#key>`` is ``values[key]``, else ``values["custom." + key]``. Each value is escaped
    for where it goes: ``html`` (HTML-escaped, quotes included, so it is safe in text and in
    attribute values), ``text`` (as is) or ``header`` (control characters such as CR and LF
    removed and surrounding whitespace stripped, so a value can never start a new header).
    Literal template text is never escaped: it is the author's own HTML or text.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from libs.common.errors import InvalidMessage

Escape = Literal["html", "text", "header"]

#: The contact record's free-text fields, in display order (the contacts service's text
#: columns; every one of them is a merge value too).
TEXT_FIELDS: tuple[str, ...] = (
    "name",
    "name_kana",
    "company",
    "department",
    "title",
    "phone",
    "address",
    "website",
    "memo",
    "acquisition_channel",
)
#: The contact fields a recipient's merge values carry (F-21): contacts puts them, when
#: they have a value, into each campaign.recipients record; the scheduler accepts merge
#: tags naming them (and custom.<key> for custom fields).
CONTACT_FIELDS: tuple[str, ...] = (
    "email",
    "external_id",
    *TEXT_FIELDS,
    "acquired_at",
    "sales_status",
    "engagement",
    "score",
    "tags",
    "contact_id",
)
UNSUBSCRIBE_URL = "unsubscribe_url"
COUPON_URL = "coupon_url"
SPECIAL_KEYS: frozenset[str] = frozenset({UNSUBSCRIBE_URL, COUPON_URL})
CUSTOM_PREFIX = "custom."

ALIASES: Mapping[str, str] = {
    "氏名": "name",
    "会社名": "company",
    "配信停止URL": UNSUBSCRIBE_URL,
    "クーポンURL": COUPON_URL,
}

_KEY = r"[a-z][a-z0-9_.]*"
_TAG = re.compile("<#(" + "|".join([*map(re.escape, ALIASES), _KEY]) + ")>")
# Tag-shaped text that validate() reports even though it is not a valid tag.
_TAG_SHAPED = re.compile(r"<#([^\s<>]*)>")

# C0 controls (CR, LF, TAB, NUL ...), DEL, C1 controls (NEL ...) and the Unicode line and
# paragraph separators: none of them may reach a header line.
_HEADER_DELETE = dict.fromkeys(
    [*range(0x00, 0x20), *range(0x7F, 0xA0), 0x2028, 0x2029],
    None,
)


def escape_header(value: str) -> str:
    """``value`` made safe for one header line: no control characters, no outer whitespace."""
    return value.translate(_HEADER_DELETE).strip()


def escape_html(value: str) -> str:
    """``value`` HTML-escaped (``& < > " '``), safe in element text and quoted attributes."""
    return html.escape(value, quote=True)


def _as_is(value: str) -> str:
    return value


_ESCAPERS: Mapping[str, Callable[[str], str]] = {
    "html": escape_html,
    "text": _as_is,
    "header": escape_header,
}


@dataclass(frozen=True, slots=True)
class Tag:
    """A placeholder: ``key`` is canonical (aliases resolved), ``source`` as written."""

    key: str
    source: str

    @property
    def fallback(self) -> str:
        return CUSTOM_PREFIX + self.key


class Template:
    """A parsed template: ``literals[0] tag[0] literals[1] ... tag[n-1] literals[n]``."""

    __slots__ = ("_lookups", "_slots", "literals", "source", "tags")

    def __init__(self, source: str, literals: list[str], tags: list[Tag]) -> None:
        assert len(literals) == len(tags) + 1
        self.source = source
        self.literals: tuple[str, ...] = tuple(literals)
        self.tags: tuple[Tag, ...] = tuple(tags)
        # Each distinct key is looked up and escaped once per render, however often it is used;
        # _slots[i] is the index in _lookups of tags[i]'s value.
        lookups: dict[str, int] = {}
        for tag in tags:
            lookups.setdefault(tag.key, len(lookups))
        self._lookups = tuple((key, CUSTOM_PREFIX + key) for key in lookups)
        self._slots = tuple(lookups[tag.key] for tag in tags)

    @property
    def keys(self) -> frozenset[str]:
        """Every canonical key the template uses."""
        return frozenset(tag.key for tag in self.tags)

    @property
    def parts(self) -> tuple[str | Tag, ...]:
        """Literals and tags in order (empty literals left out)."""
        out: list[str | Tag] = []
        for lit, tag in zip(self.literals, self.tags, strict=False):
            if lit:
                out.append(lit)
            out.append(tag)
        if self.literals[-1]:
            out.append(self.literals[-1])
        return tuple(out)

    def render(self, values: Mapping[str, str], escape: Escape = "text") -> str:
        """The template with every tag replaced by its escaped value (missing → ``""``)."""
        if not self._slots:
            return self.literals[0]
        return "".join(self.render_parts(values, escape))

    def render_parts(self, values: Mapping[str, str], escape: Escape = "text") -> list[str]:
        """What :meth:`render` joins: the literals at even indices, each tag's escaped value
        between them (so a caller can treat the constant text apart, e.g. encode it once)."""
        if not self._slots:
            return [self.literals[0]]
        escaper = _ESCAPERS[escape]
        resolved: list[str] = []
        for key, fallback in self._lookups:
            value = values.get(key)
            if value is None:
                value = values.get(fallback)
            resolved.append(escaper(value) if value else "")
        pieces = [""] * (2 * len(self._slots) + 1)
        pieces[0::2] = self.literals
        pieces[1::2] = [resolved[slot] for slot in self._slots]
        return pieces

    def __repr__(self) -> str:
        return f"Template({self.source!r})"


@lru_cache(maxsize=512)
def parse(source: str) -> Template:
    """Parse ``source`` once; the result is immutable and cached by source text."""
    literals: list[str] = []
    tags: list[Tag] = []
    position = 0
    for match in _TAG.finditer(source):
        literals.append(source[position : match.start()])
        written = match.group(1)
        tags.append(Tag(ALIASES.get(written, written), match.group(0)))
        position = match.end()
    literals.append(source[position:])
    return Template(source, literals, tags)


def render(source: str, values: Mapping[str, str], escape: Escape = "text") -> str:
    """Convenience: ``parse(source).render(values, escape)``."""
    return parse(source).render(values, escape)


def _is_known(key: str, known_keys: Collection[str]) -> bool:
    if key in SPECIAL_KEYS or key in known_keys:
        return True
    if key.startswith(CUSTOM_PREFIX):
        return key[len(CUSTOM_PREFIX) :] in known_keys
    return CUSTOM_PREFIX + key in known_keys


def validate(
    template: str,
    known_keys: Collection[str],
    *,
    has_coupon: bool,
    field: str = "body",
) -> None:
    """Refuse a template that would not render as its author meant.

    ``known_keys`` holds the contact field names and the custom field keys (bare or as
    ``custom.<key>``; either spelling in the template matches either in ``known_keys``).
    Raises :class:`InvalidMessage` naming every unknown tag, and refusing ``<#coupon_url>``
    (or ``<#クーポンURL>``) when the campaign has no coupon.
    """
    parsed = parse(template)
    unknown: list[str] = []
    for tag in parsed.tags:
        if not _is_known(tag.key, known_keys) and tag.source not in unknown:
            unknown.append(tag.source)
    for match in _TAG_SHAPED.finditer(template):
        if not _TAG.fullmatch(match.group(0)) and match.group(0) not in unknown:
            unknown.append(match.group(0))
    problems: list[str] = []
    if unknown:
        problems.append("unknown merge tags: " + ", ".join(unknown))
    if not has_coupon and COUPON_URL in parsed.keys:
        problems.append("<#coupon_url> is used but the campaign has no coupon")
    if problems:
        raise InvalidMessage("; ".join(problems), field=field)
