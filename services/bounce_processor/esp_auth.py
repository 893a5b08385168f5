"""Is a webhook really from the ESP? Signature checks of the four ESPs (issue 21), pure
except for fetching an SNS signing certificate.

- **Amazon SES** (through SNS): RSA over the SNS "string to sign" (SignatureVersion 1:
  SHA1, 2: SHA256) with the certificate at ``SigningCertURL``, which must be
  ``https://sns.<region>.amazonaws.com[.cn]/….pem`` (any other host is refused before a
  byte is fetched: the URL comes from the request). Certificates are cached per URL.
- **SendGrid**: ECDSA P-256 / SHA256 over ``timestamp + raw body``
  (``X-Twilio-Email-Event-Webhook-Signature`` / ``-Timestamp``), verified with the
  webhook's public key (base64 DER or PEM).
- **Mailgun**: HMAC-SHA256 of ``timestamp + token`` with the webhook signing key, in the
  payload's ``signature`` object.
- **Postmark** signs nothing; its documentation protects webhooks with HTTP basic
  authentication in the webhook URL (``https://user:password@host/esp/postmark``).

Replays: a signed timestamp older (or newer) than the tolerance is refused; within it, a
repeated event id is refused by the caller (``esp_event`` table).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa


class Refused(Exception):
    """A webhook not accepted: ``status`` 401 (no or bad credentials), 403 (a bad
    signature, a topic not allowed) or 409 (replayed), with the reason; ``outcome`` is the
    metric label."""

    def __init__(self, status: int, outcome: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.outcome = outcome
        self.reason = reason


def check_age(timestamp: float, now: float, tolerance: float) -> None:
    """Refuse a signed timestamp outside ``now ± tolerance`` (a replayed or stale webhook)."""
    if abs(now - timestamp) > tolerance:
        raise Refused(409, "replayed", "the signed timestamp is outside the accepted window")


# -- Amazon SNS ------------------------------------------------------------------------

#: the only hosts an SNS signing certificate (or a SubscribeURL) may come from.
SNS_HOST = re.compile(r"sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?")
#: fields of the string to sign, in order, per message type (optional ones skipped).
SNS_FIELDS = {
    "Notification": ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    "SubscriptionConfirmation": (
        "Message",
        "MessageId",
        "SubscribeURL",
        "Timestamp",
        "Token",
        "TopicArn",
        "Type",
    ),
}
SNS_FIELDS["UnsubscribeConfirmation"] = SNS_FIELDS["SubscriptionConfirmation"]
SNS_HASHES = {"1": hashes.SHA1, "2": hashes.SHA256}

Fetch = Callable[[str], Awaitable[bytes]]


def is_sns_url(url: str, *, suffix: str = "") -> bool:
    """An https URL on an SNS host (and, with ``suffix``, a path ending with it)."""
    parts = urlsplit(url)
    return (
        parts.scheme == "https"
        and parts.port is None
        and parts.username is None
        and SNS_HOST.fullmatch(parts.hostname or "") is not None
        and parts.path.endswith(suffix)
    )


def sns_string_to_sign(message: Mapping[str, Any]) -> bytes:
    """The SNS canonical string: ``name\\nvalue\\n`` per signed field present."""
    fields = SNS_FIELDS.get(str(message.get("Type")))
    if fields is None:
        raise Refused(403, "forged", f"unknown SNS message type {message.get('Type')!r}")
    lines = []
    for name in fields:
        value = message.get(name)
        if value is None:
            if name == "Subject":
                continue
            raise Refused(403, "forged", f"the SNS message has no {name}")
        lines.append(f"{name}\n{value}\n")
    return "".join(lines).encode()


class SnsCertificates:
    """SNS signing certificates by URL, fetched once (``fetch``: GET the URL's bytes).

    ``preloaded`` certificates are served without fetching; the host check applies to them
    too, so a test that preloads a self-made certificate under an SNS URL still goes
    through every check production does, and settings cannot preload anything."""

    def __init__(self, fetch: Fetch, preloaded: Mapping[str, bytes] | None = None) -> None:
        self._fetch = fetch
        self._keys: dict[str, rsa.RSAPublicKey] = {}
        for url, pem in (preloaded or {}).items():
            self._keys[url] = self._load(pem)

    @staticmethod
    def _load(pem: bytes) -> rsa.RSAPublicKey:
        try:
            key = x509.load_pem_x509_certificate(pem).public_key()
        except ValueError:
            raise Refused(403, "forged", "the signing certificate is not PEM") from None
        if not isinstance(key, rsa.RSAPublicKey):
            raise Refused(403, "forged", "the signing certificate has no RSA key")
        return key

    async def key(self, url: str) -> rsa.RSAPublicKey:
        if not is_sns_url(url, suffix=".pem"):
            raise Refused(
                403,
                "forged",
                "SigningCertURL is not an https://sns.<region>.amazonaws.com/….pem URL",
            )
        key = self._keys.get(url)
        if key is None:
            key = self._keys[url] = self._load(await self._fetch(url))
        return key


async def verify_sns(message: Mapping[str, Any], certificates: SnsCertificates) -> None:
    """Refused unless ``message`` carries a valid SNS signature (version 1 or 2)."""
    algorithm = SNS_HASHES.get(str(message.get("SignatureVersion")))
    if algorithm is None:
        raise Refused(403, "forged", "SignatureVersion must be 1 or 2")
    try:
        signature = base64.b64decode(str(message.get("Signature") or ""), validate=True)
    except binascii.Error:
        raise Refused(403, "forged", "Signature is not base64") from None
    text = sns_string_to_sign(message)
    key = await certificates.key(str(message.get("SigningCertURL") or ""))
    try:
        key.verify(signature, text, padding.PKCS1v15(), algorithm())
    except InvalidSignature:
        raise Refused(403, "forged", "the SNS signature does not match") from None


# -- SendGrid --------------------------------------------------------------------------


def sendgrid_key(text: str) -> ec.EllipticCurvePublicKey:
    """The verification key as SendGrid shows it (base64 DER), or PEM."""
    data = text.strip().encode()
    try:
        if data.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_der_public_key(base64.b64decode(data))
    except (ValueError, binascii.Error) as exc:
        raise ValueError(f"ESP_SENDGRID_PUBLIC_KEY is not a public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("ESP_SENDGRID_PUBLIC_KEY is not an ECDSA key")
    return key


def verify_sendgrid(
    key: ec.EllipticCurvePublicKey, signature: str | None, timestamp: str | None, body: bytes
) -> float:
    """The signed timestamp, or Refused."""
    if not signature or not timestamp:
        raise Refused(401, "unsigned", "the signature or timestamp header is missing")
    try:
        der = base64.b64decode(signature, validate=True)
        key.verify(der, timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    except (binascii.Error, InvalidSignature):
        raise Refused(403, "forged", "the SendGrid signature does not match") from None
    try:
        return float(timestamp)
    except ValueError:
        raise Refused(403, "forged", "the timestamp is not a number") from None


# -- Mailgun ---------------------------------------------------------------------------


def verify_mailgun(signing_key: str, signature: Any) -> float:
    """The signed timestamp of a Mailgun payload's ``signature`` object, or Refused."""
    if not isinstance(signature, dict):
        raise Refused(401, "unsigned", "the payload has no signature object")
    timestamp, token, digest = (
        str(signature.get(k) or "") for k in ("timestamp", "token", "signature")
    )
    if not (timestamp and token and digest):
        raise Refused(401, "unsigned", "signature needs timestamp, token and signature")
    expected = hmac.new(
        signing_key.encode(), (timestamp + token).encode(), hashlib.sha256
    ).hexdigest()
    if not hmac.compare_digest(expected, digest.lower()):
        raise Refused(403, "forged", "the Mailgun signature does not match")
    try:
        return float(timestamp)
    except ValueError:
        raise Refused(403, "forged", "the timestamp is not a number") from None


# -- Postmark --------------------------------------------------------------------------


def verify_basic_auth(header: str | None, username: str, password: str) -> None:
    """Refused unless ``Authorization: Basic`` carries exactly these credentials."""
    scheme, _, encoded = (header or "").partition(" ")
    if scheme.lower() != "basic" or not encoded:
        raise Refused(401, "unsigned", "HTTP basic authentication is required")
    try:
        given = base64.b64decode(encoded.strip(), validate=True)
    except binascii.Error:
        raise Refused(401, "forged", "the basic authentication is not base64") from None
    expected = f"{username}:{password}".encode()
    if not hmac.compare_digest(given, expected):
        raise Refused(401, "forged", "wrong user name or password")
