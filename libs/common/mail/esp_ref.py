"""The signed reference an ESP echoes back in its webhooks (issue 21): whose mail it was.

An ESP (Amazon SES, SendGrid, Mailgun, Postmark) rewrites the return path, so a bounce it
reports cannot be attributed by the VERP address. The sender therefore puts the VERP token
(the local part of :meth:`VerpAddresses.address`: campaign, contact and an HMAC over them)
into every mail as ``X-Tayori-Ref``, and, when told to, into the header each ESP turns into
webhook metadata. The bounce processor reads it back from the payload
(:func:`read_reference`) and verifies it exactly like a VERP return path: a forged or
tampered reference is :class:`~libs.common.mail.tokens.BadToken`, never a guess.
"""

from __future__ import annotations

import json

from libs.common.mail.verp import VerpAddresses, VerpTarget

#: the header carrying the reference in every mail (SES echoes it in ``mail.headers``).
HEADER = "X-Tayori-Ref"
#: the key of the reference in an ESP's custom args, user variables, metadata or tags.
KEY = "tayori_ref"
#: ESPs whose own metadata header the sender can add (``ESP_REF_HEADERS``).
ESPS = ("ses", "sendgrid", "mailgun", "postmark")


def reference(verp: VerpAddresses, campaign_id: str, contact_id: int) -> str:
    """The reference of one mail: the local part of its VERP return path."""
    return verp.address(campaign_id, contact_id).rpartition("@")[0]


def read_reference(verp: VerpAddresses, ref: str) -> VerpTarget:
    """The campaign and contact of a reference; BadToken for anything we did not sign."""
    return verp.read(f"{ref.strip()}@{verp.domain}")


def esp_headers(ref: str, esps: tuple[str, ...]) -> dict[str, str]:
    """``X-Tayori-Ref`` and, per ESP named, the header it echoes as webhook metadata:
    SES message tags (``X-SES-MESSAGE-TAGS``), SendGrid unique args (``X-SMTPAPI``),
    Mailgun user variables (``X-Mailgun-Variables``), Postmark metadata
    (``X-PM-Metadata-tayori_ref``)."""
    headers = {HEADER: ref}
    arg = json.dumps({KEY: ref}, separators=(",", ":"))
    for esp in esps:
        if esp == "ses":
            headers["X-SES-MESSAGE-TAGS"] = f"{KEY}={ref}"
        elif esp == "sendgrid":
            headers["X-SMTPAPI"] = json.dumps({"unique_args": {KEY: ref}}, separators=(",", ":"))
        elif esp == "mailgun":
            headers["X-Mailgun-Variables"] = arg
        elif esp == "postmark":
            headers[f"X-PM-Metadata-{KEY}"] = ref
    return headers


def parse_esps(text: str) -> tuple[str, ...]:
    """``"sendgrid, mailgun"`` → ``("sendgrid", "mailgun")``; ValueError for an unknown name."""
    names = tuple(n.strip().lower() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in ESPS]
    if unknown:
        raise ValueError(f"unknown ESP {', '.join(unknown)}: one of {', '.join(ESPS)}")
    return names
