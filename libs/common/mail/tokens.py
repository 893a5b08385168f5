"""HMAC-signed opaque tokens with key ids, so keys can rotate.

A token is ``<kid>.<payload>.<mac>``, base64url without padding. The payload is compact
JSON. Verification is constant-time and every failure (unknown key, bad MAC, bad
encoding, wrong purpose, expired) raises the same :class:`BadToken`, so a caller cannot
tell a forged token from an unknown one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from typing import Any

#: the one JSON form of a payload (built once: ``json.dumps`` with options builds an
#: encoder per call).
_PAYLOAD_JSON = json.JSONEncoder(separators=(",", ":"), sort_keys=True)
_URLSAFE = bytes.maketrans(b"+/", b"-_")


class BadToken(Exception):
    """The token is not one we issued (or no longer valid). Deliberately uninformative."""


def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).translate(_URLSAFE).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parse_keys(spec: str) -> dict[str, bytes]:
    """``"kid:secret,kid2:secret2"`` → ordered {kid: secret}; the first key signs."""
    keys: dict[str, bytes] = {}
    for pair in spec.split(","):
        kid, _, secret = pair.strip().partition(":")
        if kid and secret:
            keys[kid] = secret.encode()
    if not keys:
        raise ValueError("no signing keys configured (TAYORI_SIGNING_KEYS)")
    return keys


class Signer:
    """Signs and verifies tokens for one purpose (``unsubscribe``, ``click``, ``download``…)."""

    def __init__(self, keys: dict[str, bytes] | str, purpose: str) -> None:
        self._keys = parse_keys(keys) if isinstance(keys, str) else dict(keys)
        self._kid = next(iter(self._keys))
        self._purpose = purpose.encode()
        # Per key, the HMAC state after the constant prefix (purpose, kid): each token copies
        # it instead of keying a new HMAC (the same MAC, computed with less work).
        self._prefixed = {
            kid: hmac.new(secret, self._purpose + b"\x00" + kid.encode() + b"\x00", hashlib.sha256)
            for kid, secret in self._keys.items()
        }

    def _mac(self, kid: str, payload: str) -> str:
        mac = self._prefixed[kid].copy()
        mac.update(payload.encode())
        return _b64(mac.digest()[:20])

    def sign(self, claims: dict[str, Any], *, ttl_seconds: int | None = None) -> str:
        body = claims
        if ttl_seconds is not None:
            body = {**claims, "exp": int(time.time()) + ttl_seconds}
        payload = _b64(_PAYLOAD_JSON.encode(body).encode())
        return f"{self._kid}.{payload}.{self._mac(self._kid, payload)}"

    def verify(self, token: str, *, now: float | None = None) -> dict[str, Any]:
        if not token.isascii():
            raise BadToken()
        try:
            kid, payload, mac = token.split(".")
            expected = self._mac(kid, payload)
        except (ValueError, KeyError):
            raise BadToken() from None
        if not hmac.compare_digest(mac, expected):
            raise BadToken()
        try:
            claims = json.loads(_unb64(payload))
        except ValueError:
            raise BadToken() from None
        if not isinstance(claims, dict):
            raise BadToken()
        exp = claims.get("exp")
        if exp is not None and (now if now is not None else time.time()) >= exp:
            raise BadToken()
        return claims
