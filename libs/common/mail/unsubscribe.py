"""Unsubscribe links and the RFC 8058 headers, built the same way wherever mail is made.

Every campaign mail carries a per-recipient, per-group URL ``{public}/u/{token}`` and the
headers ``List-Unsubscribe`` (the https URL, optionally a mailto) and
``List-Unsubscribe-Post: List-Unsubscribe=One-Click``.

The token is opaque (F-13): its claims, in a few bytes (:func:`pack`), are sealed with
authenticated encryption (:class:`~libs.common.mail.tokens.Sealer`, purpose
``unsubscribe``, a key id for rotation), so it shows neither contact, group nor campaign,
and a different token is made each time. Links mailed before that were HMAC-signed JSON
(``<kid>.<payload>.<mac>``, :class:`~libs.common.mail.tokens.Signer`); they live in
mailboxes for years, so :meth:`UnsubscribeLinks.read` still accepts them, verified with the
same keys, and never issues one.

A test send's link (F-23) names the contact it was rendered for, or none, and says it is a
test (claim ``t``): the page it opens is a preview that changes nothing, and says so.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from functools import lru_cache

from libs.common.mail.tokens import BadToken, Sealer, Signer

PURPOSE = "unsubscribe"

# The packed claims: a flags byte, a byte with the lengths of the two ids (4 bits each),
# contact id and group id big-endian in that many bytes, then the campaign: 16 bytes for a
# UUID in its canonical form, UTF-8 for any other id.
_TEST = 0x01
_CAMPAIGN_UUID = 0x02
_CAMPAIGN_TEXT = 0x04
_FLAGS = _TEST | _CAMPAIGN_UUID | _CAMPAIGN_TEXT
#: ids up to 2^63 - 1 (bigint), 8 bytes at most.
_MAX_ID_BYTES = 8


@dataclass(frozen=True)
class UnsubscribeTarget:
    contact_id: int
    group_id: int
    campaign_id: str | None = None
    #: the link of a test mail: it opens a preview and never changes a membership.
    test: bool = False


@lru_cache(maxsize=64)
def _campaign_bytes(campaign_id: str) -> tuple[int, bytes]:
    """(flag, bytes) of a campaign id; cached: a send batch is one campaign."""
    try:
        as_uuid = uuid.UUID(campaign_id)
    except ValueError:
        as_uuid = None
    if as_uuid is not None and str(as_uuid) == campaign_id:
        return _CAMPAIGN_UUID, as_uuid.bytes
    return _CAMPAIGN_TEXT, campaign_id.encode()


def pack(target: UnsubscribeTarget) -> bytes:
    """The claims of a target in a few bytes (``ValueError`` for an id out of range)."""
    contact, group = target.contact_id, target.group_id
    c_len, g_len = (contact.bit_length() + 7) // 8 or 1, (group.bit_length() + 7) // 8 or 1
    if contact < 0 or group < 0 or c_len > _MAX_ID_BYTES or g_len > _MAX_ID_BYTES:
        raise ValueError("contact and group ids are 0 to 2^64 - 1")
    flags, campaign = _campaign_bytes(target.campaign_id) if target.campaign_id else (0, b"")
    if target.test:
        flags |= _TEST
    return (
        bytes((flags, c_len << 4 | g_len))
        + contact.to_bytes(c_len, "big")
        + group.to_bytes(g_len, "big")
        + campaign
    )


def unpack(packed: bytes) -> UnsubscribeTarget:
    """The target :func:`pack` made these bytes of; :class:`BadToken` for any other bytes."""
    if len(packed) < 4 or packed[0] & ~_FLAGS:
        raise BadToken()
    flags, c_len, g_len = packed[0], packed[1] >> 4, packed[1] & 0x0F
    c_end = 2 + c_len
    g_end = c_end + g_len
    if not (1 <= c_len <= _MAX_ID_BYTES and 1 <= g_len <= _MAX_ID_BYTES) or len(packed) < g_end:
        raise BadToken()
    rest = packed[g_end:]
    campaign: str | None = None
    if flags & _CAMPAIGN_UUID and len(rest) == 16 and not flags & _CAMPAIGN_TEXT:
        campaign = str(uuid.UUID(bytes=rest))
    elif flags & _CAMPAIGN_TEXT and rest and not flags & _CAMPAIGN_UUID:
        try:
            campaign = rest.decode()
        except UnicodeDecodeError:
            raise BadToken() from None
    elif rest or flags & (_CAMPAIGN_UUID | _CAMPAIGN_TEXT):
        raise BadToken()
    return UnsubscribeTarget(
        int.from_bytes(packed[2:c_end], "big"),
        int.from_bytes(packed[c_end:g_end], "big"),
        campaign,
        test=bool(flags & _TEST),
    )


class UnsubscribeLinks:
    def __init__(self, signing_keys: str, public_base_url: str) -> None:
        self._sealer = Sealer(signing_keys, PURPOSE)
        #: reads the signed links mailed before tokens were sealed; issues none.
        self._legacy = Signer(signing_keys, PURPOSE)
        self._base = public_base_url.rstrip("/")

    def token(self, target: UnsubscribeTarget) -> str:
        """A new opaque token naming ``target`` (a different one each call)."""
        return self._sealer.seal(pack(target))

    def url(self, target: UnsubscribeTarget) -> str:
        return f"{self._base}/u/{self.token(target)}"

    def headers(self, target: UnsubscribeTarget, mailto: str | None = None) -> dict[str, str]:
        """``List-Unsubscribe`` and ``List-Unsubscribe-Post`` for one recipient (RFC 8058).

        Every token is new, so a caller that needs the URL too takes it from the header."""
        links = [f"<{self.url(target)}>"]
        if mailto:
            links.append(f"<mailto:{mailto}?subject=unsubscribe>")
        return {
            "List-Unsubscribe": ", ".join(links),
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        }

    def read(self, token: str) -> UnsubscribeTarget:
        """The target a token names; :class:`BadToken` for anything we did not issue.

        A sealed token (``<kid>.<box>``) is opened; one with two dots is a signed link of a
        mail sent before (``<kid>.<payload>.<mac>``) and is verified as such, so every link
        ever mailed keeps working."""
        if token.count(".") == 1:
            return unpack(self._sealer.open(token))
        return self._read_signed(token)

    def _read_signed(self, token: str) -> UnsubscribeTarget:
        claims = self._legacy.verify(token)
        try:
            contact_id, group_id = int(claims["c"]), int(claims["g"])
        except (KeyError, TypeError, ValueError):
            raise BadToken() from None
        campaign = claims.get("m")
        return UnsubscribeTarget(
            contact_id, group_id, str(campaign) if campaign else None, test=claims.get("t") == 1
        )
