"""VERP return paths: ``b-<kid>-<token>@<bounce domain>`` names the campaign and contact.

The sender puts this address in MAIL FROM; a bounce (DSN) comes back to it, and the bounce
processor reads the campaign and contact from it without a lookup. The token is the
campaign (a UUID, 16 bytes) and the contact id (8 bytes) followed by an 80-bit HMAC-SHA256
over them, the purpose ``verp`` and the key id (keys from ``TAYORI_SIGNING_KEYS``, so they
rotate like every other token): a forged or tampered address is refused
(:class:`~libs.common.tokens.BadToken`) instead of blaming an innocent contact.

The token is base32 without padding, so the local part is letters and digits only and
survives relays that change its case; with a short key id it stays within RFC 5321's 64
octets (``b-k1-`` + 55 characters). A campaign id that is not a UUID (none is today) falls
back to the longer signed-claims form of :class:`~libs.common.tokens.Signer`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import uuid
from dataclasses import dataclass

from libs.common.tokens import BadToken, Signer, parse_keys

PURPOSE = "verp"
PREFIX = "b-"
MAC_BYTES = 10


@dataclass(frozen=True)
class VerpTarget:
    campaign_id: str
    contact_id: int


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def _unb32(text: str) -> bytes:
    return base64.b32decode(text.upper() + "=" * (-len(text) % 8))


class VerpAddresses:
    """Builds and reads VERP return paths for one bounce domain."""

    def __init__(self, signing_keys: str, bounce_domain: str) -> None:
        self._keys = parse_keys(signing_keys)
        self._kid = next(iter(self._keys))
        self._signer = Signer(self._keys, PURPOSE)
        self.domain = bounce_domain.strip().lower().rstrip(".")

    def _mac(self, kid: str, body: bytes) -> bytes:
        message = PURPOSE.encode() + b"\x00" + kid.encode() + b"\x00" + body
        return hmac.new(self._keys[kid], message, hashlib.sha256).digest()[:MAC_BYTES]

    def address(self, campaign_id: str, contact_id: int) -> str:
        try:
            body = uuid.UUID(campaign_id).bytes + int(contact_id).to_bytes(8, "big", signed=True)
        except ValueError:
            token = self._signer.sign({"m": campaign_id, "c": int(contact_id)})
            return f"{PREFIX}{token}@{self.domain}"
        token = _b32(body + self._mac(self._kid, body))
        return f"{PREFIX}{self._kid}-{token}@{self.domain}"

    def read(self, address: str) -> VerpTarget:
        """The campaign and contact of a return path; :class:`BadToken` for anything else
        (not VERP, another domain, forged, tampered)."""
        local, at, domain = address.strip().strip("<>").rpartition("@")
        if not at or domain.lower().rstrip(".") != self.domain:
            raise BadToken()
        if local[: len(PREFIX)].lower() != PREFIX:
            raise BadToken()
        token = local[len(PREFIX) :]
        if "." in token:  # the signed-claims form (a campaign id that is not a UUID)
            claims = self._signer.verify(token)
            try:
                return VerpTarget(str(claims["m"]), int(claims["c"]))
            except (KeyError, TypeError, ValueError):
                raise BadToken() from None
        kid_text, _, packed = token.rpartition("-")
        kid = next((k for k in self._keys if k.lower() == kid_text.lower()), None)
        if kid is None or not packed.isascii():
            raise BadToken()
        try:
            raw = _unb32(packed)
        except (binascii.Error, ValueError):
            raise BadToken() from None
        body, mac = raw[:-MAC_BYTES], raw[-MAC_BYTES:]
        if len(body) != 24 or not hmac.compare_digest(mac, self._mac(kid, body)):
            raise BadToken()
        return VerpTarget(
            str(uuid.UUID(bytes=body[:16])), int.from_bytes(body[16:], "big", signed=True)
        )
