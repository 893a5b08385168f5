"""VERP return paths: ``b-<signed token>@<bounce domain>`` names the campaign and contact.

The sender puts this address in MAIL FROM; a bounce (DSN) comes back to it, and the bounce
processor reads the campaign and contact from it without a lookup. The token is HMAC-signed
(:class:`libs.common.tokens.Signer`, purpose ``verp``, key ids for rotation), so a forged or
tampered address is refused (:class:`~libs.common.tokens.BadToken`) instead of blaming an
innocent contact.

The token is base64url and dots (``kid.payload.mac``): valid dot-atom text for a local part.
It is case-sensitive: relays preserve the case of the envelope address in DSNs; a lower-cased
one fails verification (and is treated as unknown, never mis-attributed). The local part is
about 80 characters, above RFC 5321's 64-octet recommendation; relays we know accept it.
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass

from libs.common.tokens import BadToken, Signer

PURPOSE = "verp"
PREFIX = "b-"


@dataclass(frozen=True)
class VerpTarget:
    campaign_id: str
    contact_id: int


def _compact_campaign(campaign_id: str) -> str:
    """A UUID as 22 base64url characters (shorter tokens); anything else as it is."""
    try:
        raw = uuid.UUID(campaign_id).bytes
    except ValueError:
        return "=" + campaign_id  # '=' never occurs in unpadded base64url: marks "verbatim"
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _expand_campaign(compact: str) -> str:
    if compact.startswith("="):
        return compact[1:]
    raw = base64.urlsafe_b64decode(compact + "==")
    return str(uuid.UUID(bytes=raw))


class VerpAddresses:
    """Builds and reads VERP return paths for one bounce domain."""

    def __init__(self, signing_keys: str, bounce_domain: str) -> None:
        self._signer = Signer(signing_keys, PURPOSE)
        self.domain = bounce_domain.strip().lower().rstrip(".")

    def address(self, campaign_id: str, contact_id: int) -> str:
        token = self._signer.sign({"m": _compact_campaign(campaign_id), "c": int(contact_id)})
        return f"{PREFIX}{token}@{self.domain}"

    def read(self, address: str) -> VerpTarget:
        """The campaign and contact of a return path; :class:`BadToken` for anything else
        (not VERP, another domain, forged, tampered)."""
        local, at, domain = address.strip().strip("<>").rpartition("@")
        if not at or domain.lower().rstrip(".") != self.domain or not local.startswith(PREFIX):
            raise BadToken()
        claims = self._signer.verify(local[len(PREFIX) :])
        try:
            return VerpTarget(_expand_campaign(str(claims["m"])), int(claims["c"]))
        except (KeyError, TypeError, ValueError):
            raise BadToken() from None
