"""Tokens with key ids, so keys can rotate: signed (:class:`Signer`) or sealed (:class:`Sealer`).

A signed token is ``<kid>.<payload>.<mac>``, base64url without padding: the payload is
compact JSON that anybody can read, HMAC-SHA256 makes it unforgeable. A sealed token is
``<kid>.<box>``: the payload is encrypted as well (AES-GCM-SIV), so it reveals nothing but
its length. Verification is constant-time and every failure (unknown key, bad MAC, bad
encoding, wrong purpose, expired) raises the same :class:`BadToken`, so a caller cannot
tell a forged token from an unknown one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import time
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

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


#: the nonce of a sealed token: random, 96 bits. AES-GCM-SIV rather than AES-GCM because a
#: repeated nonce then only shows that two tokens hold the same payload (GCM would lose its
#: authentication key), and at 3,000 mails/s for five years a key seals ~2^39 tokens.
NONCE_BYTES = 12
#: a box as :meth:`Sealer.seal` writes it: base64url without padding, at most 512 characters
#: (a sealed payload is a few dozen bytes); anything else is refused before decoding.
_BOX = re.compile(r"[A-Za-z0-9_-]{1,512}")


class Sealer:
    """Seals bytes into opaque tokens for one purpose: authenticated encryption, key ids.

    ``<kid>.<box>``, the box base64url of nonce ‖ ciphertext ‖ tag. The key of each kid is
    derived from its secret in ``TAYORI_SIGNING_KEYS`` by HKDF-SHA256 for this purpose, so
    one secret serves every purpose and a token of one purpose never opens as another; the
    kid is authenticated too. The first key seals, every key opens (rotation).
    """

    def __init__(self, keys: dict[str, bytes] | str, purpose: str) -> None:
        secrets = parse_keys(keys) if isinstance(keys, str) else dict(keys)
        self._kid = next(iter(secrets))
        info = b"tayori sealed token v1\x00" + purpose.encode()
        self._boxes = {
            kid: AESGCMSIV(
                HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)
            )
            for kid, secret in secrets.items()
        }
        self._aad = {kid: kid.encode() for kid in secrets}
        self._seal_box = self._boxes[self._kid]
        self._seal_aad = self._aad[self._kid]
        self._prefix = self._kid + "."

    def seal(self, payload: bytes) -> str:
        nonce = os.urandom(NONCE_BYTES)
        return self._prefix + _b64(nonce + self._seal_box.encrypt(nonce, payload, self._seal_aad))

    def open(self, token: str) -> bytes:
        """The payload of a token this sealer's keys made; :class:`BadToken` for anything else."""
        kid, dot, box = token.partition(".")
        aead = self._boxes.get(kid)
        if aead is None or not dot or _BOX.fullmatch(box) is None:
            raise BadToken()
        try:
            raw = _unb64(box)
            return aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], self._aad[kid])
        except (ValueError, binascii.Error, InvalidTag):
            raise BadToken() from None
