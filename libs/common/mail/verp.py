"""VERP return paths: ``b-<kid>-<token>@<bounce domain>`` names the campaign and contact.

The sender puts this address in MAIL FROM; a bounce (DSN) comes back to it, and the bounce
processor reads the campaign and contact from it without a lookup. The token is the
campaign (a UUID, 16 bytes) and the contact id (8 bytes) followed by an 80-bit HMAC-SHA256
over them, the purpose ``verp`` and the key id (keys from ``TAYORI_SIGNING_KEYS``, so they
rotate like every other token): a forged or tampered address is refused
(:class:`~libs.common.mail.tokens.BadToken`) instead of blaming an innocent contact.

The token is base32 without padding, so the local part is letters and digits only and
survives relays that change its case; with a short key id it stays within RFC 5321's 64
octets (``b-k1-`` + 55 characters). A campaign id that is not a UUID (none is today) falls
back to the longer signed-claims form of :class:`~libs.common.mail.tokens.Signer`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import uuid
from dataclasses import dataclass
from typing import Any

from libs.common.mail.tokens import BadToken, Signer, parse_keys

PURPOSE = "verp"
PREFIX = "b-"
MAC_BYTES = 10
#: campaigns whose shared address start is kept (forgotten all at once beyond that).
CAMPAIGNS_KEPT = 256


@dataclass(frozen=True)
class VerpTarget:
    campaign_id: str
    contact_id: int


_B32_ALPHABET = b"abcdefghijklmnopqrstuvwxyz234567"
#: every pair of base32 digits, by the 10 bits they stand for.
_B32_PAIRS = [bytes((a, b)) for a in _B32_ALPHABET for b in _B32_ALPHABET]


def _b32(data: bytes) -> str:
    """RFC 4648 base32, lower case, without padding: what
    ``base64.b32encode(data).rstrip(b"=").lower()`` gives, in one big-int pass of 10 bits a
    step (base64's base32 is pure Python in 3.11, a loop over 5-byte chunks)."""
    filled = data + bytes(-len(data) % 5)
    number = int.from_bytes(filled, "big")
    bits = len(filled) * 8
    pairs = b"".join([_B32_PAIRS[(number >> shift) & 0x3FF] for shift in range(bits - 10, -1, -10)])
    return pairs[: (len(data) * 8 + 4) // 5].decode()


def _unb32(text: str) -> bytes:
    return base64.b32decode(text.upper() + "=" * (-len(text) % 8))


class VerpAddresses:
    """Builds and reads VERP return paths for one bounce domain."""

    def __init__(self, signing_keys: str, bounce_domain: str) -> None:
        self._keys = parse_keys(signing_keys)
        self._kid = next(iter(self._keys))
        self._signer = Signer(self._keys, PURPOSE)
        self.domain = bounce_domain.strip().lower().rstrip(".")
        # Per key, the HMAC state after the constant prefix, copied per address.
        self._prefixed = {
            kid: hmac.new(secret, f"{PURPOSE}\x00{kid}\x00".encode(), hashlib.sha256)
            for kid, secret in self._keys.items()
        }
        self._campaigns: dict[str, tuple[str, bytes, Any]] = {}

    def _mac(self, kid: str, body: bytes) -> bytes:
        mac = self._prefixed[kid].copy()
        mac.update(body)
        return mac.digest()[:MAC_BYTES]

    def _campaign(self, campaign_id: str) -> tuple[str, bytes, Any]:
        """What every address of a campaign shares: the start of the address up to the
        token's 24th character (base32 of the UUID's first 15 bytes: 5-byte groups are
        encoded on their own), the UUID's last byte, and the MAC state after the UUID."""
        shared = self._campaigns.get(campaign_id)
        if shared is None:
            campaign = uuid.UUID(campaign_id).bytes  # ValueError: not a UUID
            mac = self._prefixed[self._kid].copy()
            mac.update(campaign)
            start = f"{PREFIX}{self._kid}-{_b32(campaign[:15])}"
            if len(self._campaigns) >= CAMPAIGNS_KEPT:
                self._campaigns.clear()
            shared = self._campaigns[campaign_id] = (start, campaign[15:], mac)
        return shared

    def address(self, campaign_id: str, contact_id: int) -> str:
        try:
            start, last, state = self._campaign(campaign_id)
        except ValueError:
            token = self._signer.sign({"m": campaign_id, "c": int(contact_id)})
            return f"{PREFIX}{token}@{self.domain}"
        contact = int(contact_id).to_bytes(8, "big", signed=True)
        mac = state.copy()
        mac.update(contact)
        return f"{start}{_b32(last + contact + mac.digest()[:MAC_BYTES])}@{self.domain}"

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
