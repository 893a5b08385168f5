"""Building each recipient's bytes: campaign mail, test sends and operator notifications.

A campaign's mail is prepared once (:class:`~libs.common.mail.template.CampaignTemplate`) and
kept in a small LRU keyed by the content's id (send.requests v4: the content arrives once, on
``campaign.content``; see contents.py) or, for a request carrying its content inline, by
the content itself. Per recipient the mail package's pipeline
(:func:`libs.common.mail.compose.compose`: unsubscribe headers, merge values with the
unsubscribe and coupon links, header lines, tracking links (F-34), body parts, MIME) makes
the bytes from the request; this module adds what only the sender knows: the stable
Message-ID, the DKIM signature and the VERP return path.

Tracking is on unless the content switches it off (``track_opens`` / ``track_clicks``), and
never in a test send (F-23: a test mail must not count as an open or click of anybody); the
unsubscribe links ``{TAYORI_PUBLIC_URL}/u/`` are never rewritten.

Message-IDs are stable: the same ledger row always gets the same one. A message resent
because the sender cannot know whether its relay kept the first copy (ledger.py) is then
recognisably the same message, which is what mailbox providers drop duplicates by.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import OrderedDict
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate
from typing import Any

import dkim

from libs.common.errors import InvalidMessage
from libs.common.mail import content as content_fields
from libs.common.mail import esp_ref
from libs.common.mail.compose import Recipient, Signers, compose
from libs.common.mail.template import CampaignTemplate
from libs.common.mail.tracking import TrackingLinks
from libs.common.mail.verp import VerpAddresses
from services.sender.settings import SenderSettings

#: the namespace of stable Message-IDs (uuid5 of the ledger key).
MESSAGE_ID_NAMESPACE = uuid.UUID("6f3a1c52-8d4e-4b7a-9c2f-1e5d7b9a0c34")


_NAMESPACE_BYTES = MESSAGE_ID_NAMESPACE.bytes


def stable_message_id(campaign_id: str, step_id: str | None, contact_id: int, domain: str) -> str:
    """``<uuid5(campaign/step/contact)@domain>``: the same every time the row is sent, and
    opaque (no ids readable in it).

    The uuid5 is computed as RFC 4122 §4.3 (and ``uuid.uuid5``) does, a SHA-1 with the
    version and variant bits set, without building two UUID objects per message."""
    key = f"{campaign_id}/{step_id or ''}/{contact_id}"
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + key.encode("utf-8")).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    return f"<{digest.hex()}@{domain}>"


#: headers a DKIM signature covers (those absent from a message are signed as absent).
DKIM_HEADERS = (
    b"From",
    b"To",
    b"Subject",
    b"Date",
    b"Message-ID",
    b"MIME-Version",
    b"Content-Type",
    b"List-Unsubscribe",
    b"List-Unsubscribe-Post",
)


class DkimSigner:
    """Prepends a DKIM-Signature (relaxed/simple, rsa-sha256) to a message."""

    def __init__(self, selector: str, domain: str, private_key: str) -> None:
        self.selector = selector.encode()
        self.domain = domain.encode()
        self.key = private_key.encode()
        try:  # at start-up, not at the first mail: a key that cannot sign stops the sender
            self.sign(b"From: check@example.invalid\r\n\r\n")
        except dkim.DKIMException as exc:
            raise ValueError(f"DKIM_PRIVATE_KEY cannot sign: {exc}") from None

    def sign(self, message: bytes) -> bytes:
        signature: bytes = dkim.sign(
            message, self.selector, self.domain, self.key, include_headers=list(DKIM_HEADERS)
        )
        return signature + message


def dkim_signer(settings: SenderSettings) -> DkimSigner | None:
    if settings.dkim_selector and settings.dkim_domain and settings.dkim_private_key:
        return DkimSigner(settings.dkim_selector, settings.dkim_domain, settings.dkim_private_key)
    return None


class Composer:
    """Everything needed to turn a send request or a system mail into bytes."""

    def __init__(self, settings: SenderSettings) -> None:
        self.settings = settings
        self.signers = Signers.of(settings.signing_keys, settings.public_base_url)
        self.verp = VerpAddresses(settings.signing_keys, settings.bounce_domain)
        self.esps = esp_ref.parse_esps(settings.esp_ref_headers)
        unsubscribe = settings.public_base_url.rstrip("/") + "/u/"
        self.tracking = TrackingLinks(
            settings.signing_keys, settings.tracking_base_url, untracked=(unsubscribe,)
        )
        self.dkim = dkim_signer(settings)
        self._messages: OrderedDict[tuple[object, ...], CampaignTemplate] = OrderedDict()

    def cached(self, content_id: str) -> bool:
        """Whether the mail of a content named by id (send.requests v4) is built already."""
        return ("id", content_id) in self._messages

    def campaign_message(
        self,
        campaign_id: str,
        content: dict[str, Any],
        *,
        test: bool = False,
        content_id: str | None = None,
    ) -> CampaignTemplate:
        """The campaign's mail, prepared once; InvalidMessage for content no mail is made of.

        ``test``: a test send's mail, never tracked. ``content_id``: the content's id (a hash
        of campaign and content), the cache key; ``content`` is then only read to build."""
        # Without an id the content itself is the key (a tuple of its strings: hashing and
        # comparing them is a C scan, cheaper than serialising the content to hash it).
        digest: tuple[object, ...] = (
            ("id", content_id)
            if content_id
            else (campaign_id, test, *(content.get(name) for name in content_fields.FIELDS))
        )
        built = self._messages.get(digest)
        if built is not None:
            self._messages.move_to_end(digest)
            return built
        built = CampaignTemplate(
            campaign_id=campaign_id,
            from_address=content["from_address"],
            from_name=content.get("from_name") or "",
            reply_to=content.get("reply_to"),
            subject=content["subject"],
            format=content["format"],
            body=content["body"],
            tracking=None if test else self.tracking,
            track_opens=content.get("track_opens", True),
            track_clicks=content.get("track_clicks", True),
            coupon_url=content.get("coupon_url"),
        )
        self._messages[digest] = built
        if len(self._messages) > self.settings.render_cache:
            self._messages.popitem(last=False)
        return built

    def campaign_mail(
        self, built: CampaignTemplate, request: dict[str, Any]
    ) -> tuple[bytes, str, str]:
        """(content, Message-ID, MAIL FROM) of one recipient of a send request: the mail
        package's pipeline (:func:`libs.common.mail.compose.compose`), then DKIM and VERP."""
        campaign_id: str = request["campaign_id"]
        contact_id: int = request["contact_id"]
        group_id = request.get("group_id")
        # The VERP return path, and its token as X-Tayori-Ref: an ESP that rewrites the
        # return path echoes the header (or its metadata twin) in its webhooks (issue 21).
        return_path = self.verp.address(campaign_id, contact_id)
        message_id = stable_message_id(
            campaign_id, request.get("step_id"), contact_id, built.domain
        )
        recipient = Recipient(
            contact_id=contact_id,
            email=request["email"],
            values=request.get("merge_values") or {},
            group_id=None if group_id is None else int(group_id),
            step_id=request.get("step_id"),
            message_id=message_id,
            test=bool(request.get("test")),
            headers=esp_ref.esp_headers(return_path.rpartition("@")[0], self.esps),
        )
        data = compose(built, recipient, self.signers)
        if self.dkim is not None:
            data = self.dkim.sign(data)
        return data, message_id, return_path

    def system_mail(self, mail: dict[str, Any], to: str) -> tuple[bytes, str, str]:
        """(content, Message-ID, MAIL FROM) of an operator notification to ``to``."""
        message = EmailMessage(policy=SMTP)
        message["From"] = self.settings.system_from
        for header, value, field in (("To", to, "to"), ("Subject", mail["subject"], "subject")):
            try:
                message[header] = value
            except ValueError as exc:  # CR or LF: another header smuggled in
                raise InvalidMessage(f"not a {header} header: {exc}", field=field) from None
        message["Date"] = formatdate(localtime=False)
        domain = self.settings.system_from.rpartition("@")[2] or "localhost"
        message_id = stable_message_id(f"mail:{mail['mail_id']}", None, 0, domain)
        message["Message-ID"] = message_id
        message.set_content(mail["text_body"])
        if mail.get("html_body"):
            message.add_alternative(mail["html_body"], subtype="html")
        data = message.as_bytes()
        if self.dkim is not None:
            data = self.dkim.sign(data)
        return data, message_id, self.settings.system_from
