"""A campaign's mail prepared once: everything about its message that is the same for every
recipient, so that composing one recipient's message (:mod:`libs.common.mail.compose`) only
joins strings.

Building an ``email.message.EmailMessage`` costs ~0.6 ms, more than the SMTP exchange
(shared/LIMITS.md), so :class:`CampaignTemplate` does the MIME work once per campaign:

- parses the subject and body templates (:mod:`libs.common.mail.mergetags`) and derives the
  text part of an HTML campaign (:mod:`libs.common.mail.textpart`);
- cuts each body part at its trackable links and at the open pixel's place — the link table
  (:mod:`libs.common.mail.links`) — and prepares the base64 of its constant text
  (:mod:`libs.common.mail.base64body`): one :class:`BodyPart` a part;
- folds the static headers (From, Reply-To, extra headers, MIME-Version, Content-Type) and
  picks the multipart boundary: the MIME frame that :func:`assemble` puts around each
  recipient's header lines and encoded parts.

The boundary is random per campaign and chosen so it does not occur in any static header. Every
body part is base64, whose alphabet (``A-Z a-z 0-9 + / =``) has no ``-``: a body line can never
start with ``--``, so it can never be read as a delimiter line, whatever a recipient's values are.

The envelope (MAIL FROM, VERP return path) is the SMTP client's business; no Return-Path header
is written here.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.policy import SMTP
from email.utils import formataddr, formatdate
from typing import Literal

from libs.common.errors import InvalidMessage
from libs.common.mail import links, mergetags, mime
from libs.common.mail.base64body import CRLF, Base64Part
from libs.common.mail.textpart import text_template_from_html
from libs.common.mail.tracking import TrackingLinks, trackable

Format = Literal["text", "html"]

_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


def _id_part(value: object) -> str:
    return _ID_UNSAFE.sub("", str(value)) or "0"


@dataclass(frozen=True, slots=True)
class BodyPart:
    """A body part as prepared once: its template cut at its links and pixel (``linked``)
    and the base64 of its constant text (``base64``)."""

    linked: links.LinkedTemplate
    base64: Base64Part

    @classmethod
    def of(cls, linked: links.LinkedTemplate) -> BodyPart:
        return cls(linked, Base64Part(linked.constants))


class CampaignTemplate:
    """One campaign's mail, prepared once (module docstring).

    ``body`` and ``subject`` are merge-tag templates (:mod:`libs.common.mail.mergetags`),
    validated by the scheduler when the campaign was created. ``headers`` are static extra
    headers added to every mail. ``now`` is injectable so tests get a fixed Date.
    ``coupon_url`` is the campaign's coupon link, signed per recipient into
    ``<#coupon_url>``.

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
        coupon_url: str | None = None,
    ) -> None:
        if format not in ("text", "html"):
            raise InvalidMessage(f"format must be text or html, not {format!r}", field="format")
        if mergetags.escape_header(subject) != subject.strip():
            raise InvalidMessage("subject must be one line", field="subject")
        #: the campaign as its tokens name it.
        self.campaign_id = str(campaign_id)
        self._id_prefix = _id_part(campaign_id)
        self.from_address = mime.address(from_address, "from_address")
        self.domain = self.from_address.rsplit("@", 1)[1]
        self.format = format
        self.coupon_url = coupon_url
        self.subject = mergetags.parse(subject.strip())
        self._now = now
        self._date_second = -1
        self._date = ""

        # The templates, and the link table of each body part.
        self.html: mergetags.Template | None
        if format == "html":
            self.html = mergetags.parse(body)
            self.text = text_template_from_html(self.html)
        else:
            self.html = None
            self.text = mergetags.parse(body)
        #: every merge tag key the subject or a body part renders.
        self.keys = self.subject.keys | self.text.keys
        if self.html is not None:
            self.keys |= self.html.keys
        self.tracking = tracking
        clicks = tracking is not None and track_clicks
        #: whether the HTML part gets an open pixel.
        self.pixel = tracking is not None and track_opens and self.html is not None
        tracks = tracking.tracks if tracking is not None else trackable
        parts = [BodyPart.of(links.linked_text(self.text, tracks, clicks=clicks))]
        if self.html is not None:
            html = links.linked_html(self.html, tracks, clicks=clicks, pixel=self.pixel)
            parts.append(BodyPart.of(html))
        #: the body parts in MIME order: text, then HTML when there is one.
        self.parts = tuple(parts)

        # The static head and the MIME frame.
        static: list[str] = [
            SMTP.fold("From", formataddr((mergetags.escape_header(from_name), self.from_address)))
        ]
        if reply_to:
            static.append(SMTP.fold("Reply-To", mime.address(reply_to, "reply_to")))
        for name, value in (headers or {}).items():
            mime.check_header_name(name)
            static.append(SMTP.fold(name, mergetags.escape_header(value)))
        static.append("MIME-Version: 1.0" + CRLF)
        text_headers = (
            'Content-Type: text/plain; charset="utf-8"' + CRLF + "Content-Transfer-Encoding: base64"
        )
        self.boundary: str | None
        self._head: str
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
        return key in self.keys

    def message_id(self, contact_id: str | int) -> str:
        """A fresh ``<{campaign_id}.{contact_id}.{random}@{domain of from}>``."""
        random = os.urandom(8).hex()
        return f"<{self._id_prefix}.{_id_part(contact_id)}.{random}@{self.domain}>"

    def date(self) -> str:
        """The Date header's value now (formatted once a second: formatdate is slow)."""
        now = self._now()
        second = int(now)
        if second != self._date_second:
            # formatdate writes UTC as "-0000" ("zone unknown", RFC 5322 §3.3); say +0000.
            self._date = formatdate(now, localtime=False)[:-5] + "+0000"
            self._date_second = second
        return self._date


def assemble(template: CampaignTemplate, head: list[str], bodies: list[str]) -> bytes:
    """The message: one recipient's header lines (``head``, each with its CRLF), the
    campaign's static head, then each encoded body part (``bodies``, in
    :attr:`CampaignTemplate.parts` order) in the campaign's MIME frame; UTF-8 bytes."""
    if template.boundary is None:
        frame = [template._head, bodies[0], CRLF]
    else:
        frame = [
            template._head,
            template._before_text,
            bodies[0],
            template._before_html,
            bodies[1],
            template._closing,
        ]
    return "".join(head + frame).encode("utf-8")


__all__ = ["BodyPart", "CampaignTemplate", "Format", "assemble"]
