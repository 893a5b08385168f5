"""ESP event webhooks (issue 21), no servers: the signed reference the sender adds, each
ESP's signature check (valid, forged, replayed), and the reading of each ESP's documented
payloads (tests/fixtures/esp/) into the DSN classification (F-30)."""

from __future__ import annotations

import base64
import datetime as dt
import email
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from libs.common.errors import TransientError
from libs.common.mail import esp_ref
from libs.common.mail.tokens import BadToken
from libs.common.mail.verp import VerpAddresses
from services.bounce_processor import esp, esp_auth, webhooks
from services.bounce_processor.esp_auth import Refused, SnsCertificates
from services.sender.compose import Composer
from tests.unit.test_sender_units import compose, request, settings

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "esp"
KEYS = "k1:" + "a" * 64
CAMPAIGN = "6f1c2f1e-0000-4000-8000-000000000001"
NOW = dt.datetime(2026, 12, 5, tzinfo=dt.UTC)
CERT_URL = "https://sns.ap-northeast-1.amazonaws.com/SimpleNotificationService-test.pem"
TOPIC = "arn:aws:sns:ap-northeast-1:123456789012:tayori-ses"


@pytest.fixture(scope="module")
def verp() -> VerpAddresses:
    return VerpAddresses(KEYS, "bounces.example")


def payload(name: str, ref: str) -> Any:
    return json.loads((FIXTURES / name).read_text().replace("TAYORI_REF", ref))


# -- the reference -----------------------------------------------------------------------


def test_a_reference_names_campaign_and_contact_and_refuses_tampering(verp) -> None:
    ref = esp_ref.reference(verp, CAMPAIGN, 42)
    target = esp_ref.read_reference(verp, ref)
    assert (target.campaign_id, target.contact_id) == (CAMPAIGN, 42)
    tampered = ref[:-1] + ("a" if ref[-1] != "a" else "b")
    with pytest.raises(BadToken):
        esp_ref.read_reference(verp, tampered)
    other_key = VerpAddresses("k1:" + "b" * 64, "bounces.example")
    with pytest.raises(BadToken):
        esp_ref.read_reference(verp, esp_ref.reference(other_key, CAMPAIGN, 42))


def test_the_sender_puts_the_reference_in_every_mail() -> None:
    composer = Composer(
        settings(bounce_domain="bounce.example", esp_ref_headers="sendgrid,mailgun,postmark,ses")
    )
    data, _, mail_from = compose(composer, request())
    mail = email.message_from_bytes(data)
    ref = mail["X-Tayori-Ref"]
    assert mail_from == f"{ref}@bounce.example"  # the VERP token itself
    assert json.loads(mail["X-SMTPAPI"]) == {"unique_args": {"tayori_ref": ref}}
    assert json.loads(mail["X-Mailgun-Variables"]) == {"tayori_ref": ref}
    assert mail["X-PM-Metadata-tayori_ref"] == ref
    assert mail["X-SES-MESSAGE-TAGS"] == f"tayori_ref={ref}"
    plain = email.message_from_bytes(compose(Composer(settings()), request(group_id=None))[0])
    assert plain["X-Tayori-Ref"] and plain["X-SMTPAPI"] is None  # no ESP named: ours only
    with pytest.raises(ValueError, match="unknown ESP"):
        esp_ref.parse_esps("sendgrid, sparkpost")


# -- Amazon SNS ----------------------------------------------------------------------------


def self_signed() -> tuple[rsa.RSAPrivateKey, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return key, cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def sns_key() -> tuple[rsa.RSAPrivateKey, bytes]:
    return self_signed()


def sns_message(
    key: rsa.RSAPrivateKey, message: str, *, version: str = "2", **fields: Any
) -> dict[str, Any]:
    """An SNS Notification signed like SNS signs it."""
    body: dict[str, Any] = {
        "Type": "Notification",
        "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
        "TopicArn": TOPIC,
        "Subject": "Amazon SES Email Event Notification",
        "Message": message,
        "Timestamp": "2026-12-05T00:00:00.000Z",
        "SignatureVersion": version,
        "SigningCertURL": CERT_URL,
        "UnsubscribeURL": "https://sns.ap-northeast-1.amazonaws.com/?Action=Unsubscribe",
        **fields,
    }
    algorithm = hashes.SHA1() if version == "1" else hashes.SHA256()
    signature = key.sign(esp_auth.sns_string_to_sign(body), padding.PKCS1v15(), algorithm)
    body["Signature"] = base64.b64encode(signature).decode()
    return body


async def never_fetched(url: str) -> bytes:
    raise AssertionError(f"fetched {url}")


@pytest.mark.parametrize("version", ["1", "2"])
async def test_sns_signatures_of_both_versions_are_verified(sns_key, version) -> None:
    key, pem = sns_key
    certificates = SnsCertificates(never_fetched, preloaded={CERT_URL: pem})
    message = sns_message(key, '{"notificationType": "Delivery"}', version=version)
    await esp_auth.verify_sns(message, certificates)
    forged = {**message, "Message": '{"notificationType": "Complaint"}'}
    with pytest.raises(Refused) as refused:
        await esp_auth.verify_sns(forged, certificates)
    assert (refused.value.status, refused.value.outcome) == (403, "forged")


async def test_a_subscription_confirmation_is_signed_over_its_own_fields(sns_key) -> None:
    key, pem = sns_key
    certificates = SnsCertificates(never_fetched, preloaded={CERT_URL: pem})
    message = sns_message(
        key,
        "You have chosen to subscribe to the topic",
        Type="SubscriptionConfirmation",
        Token="2336412f37",
        SubscribeURL="https://sns.ap-northeast-1.amazonaws.com/?Action=ConfirmSubscription",
    )
    del message["Subject"]
    await esp_auth.verify_sns(message, certificates)
    with pytest.raises(Refused):
        await esp_auth.verify_sns({**message, "Token": "other"}, certificates)


async def test_a_certificate_from_anywhere_but_sns_is_never_fetched(sns_key) -> None:
    key, pem = sns_key
    for url in (
        "https://sns.ap-northeast-1.amazonaws.com.evil.example/cert.pem",
        "http://sns.ap-northeast-1.amazonaws.com/cert.pem",
        "https://evil.example/sns.ap-northeast-1.amazonaws.com/cert.pem",
        "https://sns.ap-northeast-1.amazonaws.com:8443/cert.pem",
        "https://user@sns.ap-northeast-1.amazonaws.com/cert.pem",
        "https://sns.ap-northeast-1.amazonaws.com/cert.txt",
    ):
        # Even preloaded, a certificate under a foreign URL is refused by the host check.
        certificates = SnsCertificates(never_fetched, preloaded={url: pem})
        message = sns_message(key, "{}", SigningCertURL=url)
        with pytest.raises(Refused, match="SigningCertURL"):
            await esp_auth.verify_sns(message, certificates)


async def test_a_signing_certificate_is_fetched_once(sns_key) -> None:
    key, pem = sns_key
    fetched: list[str] = []

    async def fetch(url: str) -> bytes:
        fetched.append(url)
        return pem

    certificates = SnsCertificates(fetch)
    for _ in range(3):
        await esp_auth.verify_sns(sns_message(key, "{}"), certificates)
    assert fetched == [CERT_URL]


async def test_an_unknown_signature_version_or_type_is_refused(sns_key) -> None:
    key, pem = sns_key
    certificates = SnsCertificates(never_fetched, preloaded={CERT_URL: pem})
    with pytest.raises(Refused, match="SignatureVersion"):
        await esp_auth.verify_sns({**sns_message(key, "{}"), "SignatureVersion": "3"}, certificates)
    with pytest.raises(Refused, match="message type"):
        await esp_auth.verify_sns({**sns_message(key, "{}"), "Type": "Other"}, certificates)


def test_a_stale_or_future_timestamp_is_a_replay() -> None:
    esp_auth.check_age(1000.0, 1100.0, 300)
    for signed in (500.0, 1500.0):
        with pytest.raises(Refused) as refused:
            esp_auth.check_age(signed, 1100.0, 300)
        assert (refused.value.status, refused.value.outcome) == (409, "replayed")


# -- SendGrid ------------------------------------------------------------------------------


def test_sendgrid_ecdsa_signature() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key = esp_auth.sendgrid_key(base64.b64encode(der).decode())  # as SendGrid shows it
    body = (FIXTURES / "sendgrid_events.json").read_bytes()
    timestamp = "1764892800"
    signature = base64.b64encode(
        private.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    ).decode()
    assert esp_auth.verify_sendgrid(key, signature, timestamp, body) == 1764892800.0
    for forged in (
        (signature, timestamp, body.replace(b"delivered", b"bounce")),
        (signature, "1764892801", body),
        (base64.b64encode(b"not a signature").decode(), timestamp, body),
    ):
        with pytest.raises(Refused) as refused:
            esp_auth.verify_sendgrid(key, *forged)
        assert refused.value.status == 403
    with pytest.raises(Refused) as refused:
        esp_auth.verify_sendgrid(key, None, timestamp, body)
    assert refused.value.status == 401
    with pytest.raises(ValueError, match="ESP_SENDGRID_PUBLIC_KEY"):
        esp_auth.sendgrid_key("bm90IGEga2V5")


# -- Mailgun and Postmark ------------------------------------------------------------------


def mailgun_signature(key: str, timestamp: str, token: str) -> dict[str, str]:
    digest = hmac.new(key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()
    return {"timestamp": timestamp, "token": token, "signature": digest}


def test_mailgun_hmac_signature() -> None:
    signed = mailgun_signature("key-secret", "1529006854", "a8ce0edb2dd8301dee6c")
    assert esp_auth.verify_mailgun("key-secret", signed) == 1529006854.0
    with pytest.raises(Refused) as refused:
        esp_auth.verify_mailgun("key-other", signed)
    assert refused.value.status == 403
    with pytest.raises(Refused):  # the token swapped: the signature no longer matches
        esp_auth.verify_mailgun("key-secret", {**signed, "token": "ffff"})
    with pytest.raises(Refused) as refused:
        esp_auth.verify_mailgun("key-secret", None)
    assert refused.value.status == 401


def test_postmark_basic_authentication() -> None:
    good = "Basic " + base64.b64encode(b"tayori:s3cret").decode()
    esp_auth.verify_basic_auth(good, "tayori", "s3cret")
    for header in (None, "Bearer x", "Basic " + base64.b64encode(b"tayori:guess").decode()):
        with pytest.raises(Refused) as refused:
            esp_auth.verify_basic_auth(header, "tayori", "s3cret")
        assert refused.value.status == 401


# -- payloads → classification -------------------------------------------------------------


def kinds(events: list[esp.EspEvent]) -> list[tuple[str, str | None]]:
    return [(e.kind, e.classification) for e in events]


def test_ses_notifications(verp) -> None:
    ref = esp_ref.reference(verp, CAMPAIGN, 7)

    def read(name: str) -> list[esp.EspEvent]:
        return esp.ses_events("m-1", json.dumps(payload(name, ref)), NOW)

    [bounce] = read("ses_bounce.json")
    assert kinds([bounce]) == [("failure", "invalid_address")]
    assert bounce.ref == ref and bounce.email == "jane@example.com"
    assert bounce.diagnostic is not None and "5.1.1" in bounce.diagnostic
    assert bounce.occurred_at == dt.datetime(2016, 1, 27, 14, 59, 38, 237000, dt.UTC)
    [full] = read("ses_transient_bounce.json")  # the reference from the message tags
    assert kinds([full]) == [("failure", "temporary_error")] and full.ref == ref
    assert kinds(read("ses_complaint.json")) == [("failure", "spam")]
    assert kinds(read("ses_delivery.json")) == [("delivered", None)]
    assert kinds(read("ses_delivery_delay.json")) == [("ignored", None)]
    not_abuse = payload("ses_complaint.json", ref)
    not_abuse["complaint"]["complaintFeedbackType"] = "not-spam"
    assert kinds(esp.ses_events("m-2", json.dumps(not_abuse), NOW)) == [("ignored", None)]
    with pytest.raises(esp.BadPayload):
        esp.ses_events("m-3", "not json", NOW)


def test_sendgrid_events(verp) -> None:
    ref = esp_ref.reference(verp, CAMPAIGN, 7)
    events = esp.sendgrid_events(payload("sendgrid_events.json", ref), NOW)
    assert kinds(events) == [
        ("delivered", None),
        ("failure", "invalid_address"),  # 5.0.0 + "500 unknown recipient": the wording
        ("failure", "policy"),  # blocked, 5.7.1
        ("failure", "spam"),
        ("ignored", None),  # deferred: SendGrid retries, like a DSN's "delayed"
        ("ignored", None),  # open: our own pixel counts opens
    ]
    assert {e.ref for e in events} == {ref}
    assert len({e.event_id for e in events}) == len(events)
    with pytest.raises(esp.BadPayload):
        esp.sendgrid_events({"event": "bounce"}, NOW)


def test_mailgun_events(verp) -> None:
    ref = esp_ref.reference(verp, CAMPAIGN, 7)

    def read(name: str) -> list[esp.EspEvent]:
        return esp.mailgun_events(payload(name, ref), NOW)

    assert kinds(read("mailgun_failed.json")) == [("failure", "error")]  # 605, suppressed
    [smtp] = read("mailgun_failed_smtp.json")
    assert kinds([smtp]) == [("failure", "invalid_address")] and smtp.ref == ref
    assert kinds(read("mailgun_temporary.json")) == [("ignored", None)]  # Mailgun retries
    assert kinds(read("mailgun_complained.json")) == [("failure", "spam")]
    assert kinds(read("mailgun_delivered.json")) == [("delivered", None)]


def test_postmark_events(verp) -> None:
    ref = esp_ref.reference(verp, CAMPAIGN, 7)

    def read(name: str) -> list[esp.EspEvent]:
        return esp.postmark_events(payload(name, ref), NOW)

    [hard] = read("postmark_bounce.json")
    assert kinds([hard]) == [("failure", "invalid_address")] and hard.ref == ref
    assert kinds(read("postmark_soft_bounce.json")) == [("failure", "temporary_error")]
    assert kinds(read("postmark_spam_complaint.json")) == [("failure", "spam")]
    assert kinds(read("postmark_delivery.json")) == [("delivered", None)]
    transient = {**payload("postmark_bounce.json", ref), "Type": "Transient", "Details": "x"}
    assert kinds(esp.postmark_events(transient, NOW)) == [("ignored", None)]


async def test_sns_out_of_reach_is_transient_not_a_refusal() -> None:
    with pytest.raises(TransientError):  # 503 with Retry-After: SNS delivers again
        await webhooks._get("https://127.0.0.1:1/cert.pem")
