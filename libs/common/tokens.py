"""HMAC-signed opaque tokens with key ids, so keys can rotate.

A token is ``<kid>.<payload>.<mac>``, base64url without padding. The payload is compact
JSON. Verification is constant-time and every failure (unknown key, bad MAC, bad
encoding, wrong purpose, expired) raises the same :class:`BadToken`, so a caller cannot
tell a forged token from an unknown one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any


class BadToken(Exception):
    """The token is not one we issued (or no longer valid). Deliberately uninformative."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


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

    def _mac(self, secret: bytes, kid: str, payload: str) -> str:
        message = self._purpose + b"\x00" + kid.encode() + b"\x00" + payload.encode()
        return _b64(hmac.new(secret, message, hashlib.sha256).digest()[:20])

    def sign(self, claims: dict[str, Any], *, ttl_seconds: int | None = None) -> str:
        body = dict(claims)
        if ttl_seconds is not None:
            body["exp"] = int(time.time()) + ttl_seconds
        payload = _b64(json.dumps(body, separators=(",", ":"), sort_keys=True).encode())
        return f"{self._kid}.{payload}.{self._mac(self._keys[self._kid], self._kid, payload)}"

    def verify(self, token: str, *, now: float | None = None) -> dict[str, Any]:
        if not token.isascii():
            raise BadToken()
        try:
            kid, payload, mac = token.split(".")
            secret = self._keys[kid]
        except (ValueError, KeyError):
            raise BadToken() from None
        if not hmac.compare_digest(mac, self._mac(secret, kid, payload)):
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
