"""Composing one recipient's message: a linear pipeline of pure stages.

    compose(template, recipient, signers) -> bytes

The campaign's share of the work is done once, when its
:class:`~libs.common.mail.template.CampaignTemplate` is built (parsed templates, the link table
of each body part, the base64 of the constant text, the static head and the MIME frame). Per
recipient the stages below run in this order, each taking what the ones before it made:

1. :func:`unsubscribe_headers` — a new unsubscribe token for the recipient's group, as
   ``List-Unsubscribe`` and ``List-Unsubscribe-Post: List-Unsubscribe=One-Click`` (RFC 8058);
   none without a group (a filter-only target has no membership to leave).
2. :func:`merge_values` — the merge tags' values: the recipient's own, ``<#unsubscribe_url>``
   (the URL in stage 1's header: one token, not two) and ``<#coupon_url>`` (signed for the
   recipient, when the mail uses it).
3. :func:`header_lines` — Date, Message-ID, To, Subject (its merge tags filled, RFC 2047 when
   not ASCII) and the recipient's extra headers (stage 1's), folded.
4. :func:`recipient_tracking` — the click rewrite (each destination signed once, though it is
   in both parts) and the open pixel; nothing when the template is not tracked.
5. :func:`fill` — each body part's merge tags and links filled in (a link may hold merge tags,
   so both are one pass): constant pieces and the recipient's pieces, alternating.
6. :func:`encode` — each part as UTF-8 base64 in 76-column CRLF lines, the constant pieces'
   encoding kept from the campaign's earlier recipients.
7. :func:`~libs.common.mail.template.assemble` — the header lines, the static head and the
   encoded parts in the campaign's MIME frame, as bytes.

Stages 3–7 are :func:`personalise`, for a caller that brings its own values and headers (the
scheduler's preview, whose unsubscribe link is a placeholder). What comes after the bytes — a
DKIM signature, the VERP envelope — is the sender's (``services/sender/compose.py``).

Each stage is a function with no I/O whose output depends only on its arguments, except what
must differ every time: a sealed token's nonce, the clock's Date, a random Message-ID when
none is given.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from libs.common.mail import mime
from libs.common.mail.base64body import CRLF
from libs.common.mail.mergetags import COUPON_URL, UNSUBSCRIBE_URL
from libs.common.mail.template import BodyPart, CampaignTemplate, assemble
from libs.common.mail.tokens import Signer
from libs.common.mail.tracking import RecipientLinks
from libs.common.mail.unsubscribe import UnsubscribeLinks, UnsubscribeTarget


@dataclass(slots=True)  # not frozen: one is made per message, and a frozen one costs 2.5×
class Recipient:
    """Who one message is for."""

    contact_id: int
    email: str
    #: the merge values of the send request (contact fields, custom fields).
    values: Mapping[str, str] = field(default_factory=dict)
    #: the group an unsubscribe leaves; None: no unsubscribe link and no List-Unsubscribe.
    group_id: int | None = None
    #: a step mail's step (named in its tracking links), or a test send's.
    step_id: str | None = None
    #: None: a fresh random one (:meth:`CampaignTemplate.message_id`).
    message_id: str | None = None
    #: a test send (F-23): its unsubscribe link opens a preview that changes nothing.
    test: bool = False
    #: header fields the sender adds before the List-Unsubscribe pair (X-Tayori-Ref).
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Signers:
    """What signs a recipient's links: one set per service, from its signing keys."""

    unsubscribe: UnsubscribeLinks
    coupons: Signer

    @classmethod
    def of(cls, signing_keys: str, public_base_url: str) -> Signers:
        """Unsubscribe links under ``{public_base_url}/u/``, coupon tokens (purpose coupon)."""
        return cls(UnsubscribeLinks(signing_keys, public_base_url), Signer(signing_keys, "coupon"))


@dataclass(slots=True)
class Tracking:
    """One recipient's tracking: how a link's URL is rewritten, and the open pixel's markup."""

    click: Callable[[str], str]
    pixel: str = ""


def _untracked(url: str) -> str:
    return url


#: the tracking of a mail that is not tracked: links as written, no pixel.
UNTRACKED = Tracking(_untracked)


def compose(template: CampaignTemplate, recipient: Recipient, signers: Signers) -> bytes:
    """The complete RFC 5322 message for one recipient of a campaign (module docstring)."""
    unsubscribe = unsubscribe_headers(template, recipient, signers)
    values = merge_values(template, recipient, signers, unsubscribe)
    return personalise(
        template,
        values,
        to=recipient.email,
        message_id=recipient.message_id,
        headers={**recipient.headers, **unsubscribe} if recipient.headers else unsubscribe,
        contact_id=recipient.contact_id,
        step_id=recipient.step_id,
    )


def personalise(
    template: CampaignTemplate,
    values: Mapping[str, str],
    *,
    to: str,
    message_id: str | None = None,
    headers: Mapping[str, str] | None = None,
    contact_id: str | int | None = None,
    step_id: str | None = None,
) -> bytes:
    """Stages 3–7: the message for one recipient whose merge values and extra headers are
    given. Without ``contact_id``, ``values["contact_id"]`` names the recipient (in the
    Message-ID and the tracking links)."""
    if contact_id is None:
        contact_id = values.get("contact_id", "0")
    head = header_lines(
        template, values, to=to, message_id=message_id, headers=headers, contact_id=contact_id
    )
    tracking = recipient_tracking(template, contact_id, step_id)
    bodies = [encode(part, fill(part, values, tracking)) for part in template.parts]
    return assemble(template, head, bodies)


def unsubscribe_headers(
    template: CampaignTemplate, recipient: Recipient, signers: Signers
) -> dict[str, str]:
    """Stage 1: ``List-Unsubscribe`` and ``List-Unsubscribe-Post`` with a new token naming the
    recipient, its group and the campaign; empty without a group."""
    if recipient.group_id is None:
        return {}
    target = UnsubscribeTarget(
        recipient.contact_id, recipient.group_id, template.campaign_id, test=recipient.test
    )
    return signers.unsubscribe.headers(target)


def merge_values(
    template: CampaignTemplate,
    recipient: Recipient,
    signers: Signers,
    unsubscribe: Mapping[str, str],
) -> dict[str, str]:
    """Stage 2: the recipient's merge values with ``unsubscribe_url`` (the URL of the
    ``List-Unsubscribe`` header; ``""`` without one) and ``coupon_url`` (the campaign's
    coupon link with the recipient's signed token, when subject or body uses it)."""
    values = dict(recipient.values)
    link = unsubscribe.get("List-Unsubscribe", "")
    values[UNSUBSCRIBE_URL] = link[1 : link.index(">")] if link else ""
    coupon = template.coupon_url
    if coupon and template.uses(COUPON_URL):
        token = signers.coupons.sign({"m": template.campaign_id, "c": recipient.contact_id})
        values[COUPON_URL] = f"{coupon}{'&' if '?' in coupon else '?'}t={token}"
    return values


def header_lines(
    template: CampaignTemplate,
    values: Mapping[str, str],
    *,
    to: str,
    message_id: str | None,
    headers: Mapping[str, str] | None,
    contact_id: str | int,
) -> list[str]:
    """Stage 3: the recipient's own header lines, each ending in CRLF: Date, Message-ID (a
    fresh one when None), To, Subject, then ``headers`` (their values stripped of CR/LF;
    names checked against the ones the package writes itself)."""
    address = mime.address(to, "to")
    if message_id is None:
        message_id = template.message_id(contact_id)
    else:
        message_id = mime.header_safe(message_id)
    subject = template.subject.render(values, "header").strip()
    lines = [
        "Date: " + template.date() + CRLF,
        "Message-ID: " + message_id + CRLF,
        "To: " + address + CRLF,
        mime.fold_unstructured("Subject", subject),
    ]
    if headers:
        for name, value in headers.items():
            mime.check_header_name(name)
            lines.append(mime.fold_unstructured(name, mime.header_safe(value)))
    return lines


def recipient_tracking(
    template: CampaignTemplate, contact_id: str | int, step_id: str | None
) -> Tracking:
    """Stage 4: the recipient's click rewrite and open pixel (:data:`UNTRACKED` when the
    template has no tracking: a preview, a test send)."""
    if template.tracking is None:
        return UNTRACKED
    links = RecipientLinks(template.tracking, template.campaign_id, int(contact_id), step_id)
    return Tracking(links.click, links.pixel() if template.pixel else "")


def fill(part: BodyPart, values: Mapping[str, str], tracking: Tracking) -> list[str]:
    """Stage 5: a body part for the recipient as pieces: the part's constant text at even
    indices, the recipient's values, rewritten links and pixel at odd ones."""
    return part.linked.render_parts(values, tracking.click, tracking.pixel)


def encode(part: BodyPart, pieces: list[str]) -> str:
    """Stage 6: the pieces of :func:`fill`, joined, as UTF-8 base64 in 76-column CRLF lines
    (no trailing CRLF)."""
    return part.base64.encode(pieces)


__all__ = [
    "UNTRACKED",
    "Recipient",
    "Signers",
    "Tracking",
    "compose",
    "encode",
    "fill",
    "header_lines",
    "merge_values",
    "personalise",
    "recipient_tracking",
    "unsubscribe_headers",
]
