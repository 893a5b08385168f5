"""The sender's pure parts: reply classification, VERP, dot-stuffing, DKIM, composing, the
SMTP reply reader."""

from __future__ import annotations

import asyncio
import email
import email.message
import uuid
from typing import Any, cast

import dkim
import pytest
from aiosmtplib import SMTPResponseException, SMTPServerDisconnected
from aiosmtplib.protocol import SMTPProtocol

from libs.common.mail.smtp_reply import classify, enhanced_code, outcome_of
from libs.common.mail.tokens import BadToken, Signer
from libs.common.mail.tracking import TrackingLinks
from libs.common.mail.verp import VerpAddresses
from services.sender.compose import MESSAGE_ID_NAMESPACE, Composer, DkimSigner, stable_message_id
from services.sender.exchange import Exchange
from services.sender.settings import SenderSettings
from services.sender.smtp import TERMINATOR, RateLimit, data_payload

KEYS = "k1:secret-one,k0:secret-old"
TRACKING = TrackingLinks(KEYS, "https://track.example")

# A throw-away 1024-bit test key (dkim.verify's minimum), generated for this test only.
TEST_KEY = """-----BEGIN RSA PRIVATE KEY-----
MIICXgIBAAKBgQCtlc/l1PnAhL/1F7IkTLka+mnMwJ1tVvnOmFV/WD3sBB4ahY8G
Ma30hLhgiH/WAjD6LgBuXOcgywMN4xFPb3S1XyRFik3qQQXpzr1sBBvZJaj6WjHv
M7UWjMk2Y1ezNWx1pP8/H8C4pnfJmYxNCqzVmMer+NftSr6fBByarUkDUwIDAQAB
AoGAZy+9LBSUeprvORTi8q0hBCaDqhF+A7dGPEdV26Nq+9fexUlLohT6IXab29aI
l4Ep+C5MV06mnlnP8PtgGOZaa1PyH3ce7hrO0/PYUqJwdHtWImiIPexuAvpfAaj8
19IBatU0+m1uGECzHmukzDwGUDi/mg0wGbqhWfVFFglQ0FECQQDYkiV6nwlXgG5v
7QseCJ74cUIVTic9zcMzyp6cx2+5tlbQUazTdYR3daA7t3nzwZOmnzr+/McS+k+8
+HlocR2lAkEAzTA0lNofPCeJDBFgoYEXYIV4v2llflx0REhBbi2IbCfmxkZ1fL8H
j2KvUlLjCfhb4cikMyEjs+3BvmazV/W7lwJBAJbcFyd3qTY+zK9C3D+rmbFOk83r
hwJSVuu49QwZEQa4sXijrFQQxJnCYj+260iVS5kBykLdKn9ZxjnIjCnowdECQQDB
i2jtx1mTKk+xXGrjrJraZsvg8Y/Uw2zAQ8/EF5sJOhIKkMedpauB6ropUxnpe6Vf
shyARhAhVnFcIg+lNpt9AkEAwNiOTV76p6mHeRY5ptI2V3wN3kSr50BsSVR1w3g8
QPDzHCZlMa6j3qgcK6fClrtueu4fwxfBs+29yDuk1yjURQ==
-----END RSA PRIVATE KEY-----
"""
TEST_PUBLIC = (
    "MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQCtlc/l1PnAhL/1F7IkTLka+mnMwJ1tVvnOmFV/WD3s"
    "BB4ahY8GMa30hLhgiH/WAjD6LgBuXOcgywMN4xFPb3S1XyRFik3qQQXpzr1sBBvZJaj6WjHvM7UWjMk2"
    "Y1ezNWx1pP8/H8C4pnfJmYxNCqzVmMer+NftSr6fBByarUkDUwIDAQAB"
)


@pytest.mark.parametrize(
    ("code", "text", "verdict", "outcome", "enhanced"),
    [
        (250, "2.0.0 Ok: queued", "ok", "sent", "2.0.0"),
        (
            550,
            "5.1.1 <a@b>: Recipient address rejected",
            "permanent_error",
            "permanent_error",
            "5.1.1",
        ),
        (
            554,
            "5.7.1 Service unavailable; client host blocked",
            "policy_error",
            "policy_error",
            "5.7.1",
        ),
        (550, "Mailbox unavailable", "permanent_error", "permanent_error", None),
        (451, "4.3.0 Try again later", "retry", "temporary_error", "4.3.0"),
        (452, "Too many recipients", "retry", "temporary_error", None),
        (421, "4.7.0 closing connection", "relay_problem", "temporary_error", "4.7.0"),
        (999, "nonsense", "relay_problem", "temporary_error", None),
    ],
)
def test_reply_classification(
    code: int, text: str, verdict: str, outcome: str, enhanced: str | None
) -> None:
    reply = classify(code, text)
    assert (reply.verdict, outcome_of(reply), reply.enhanced_code) == (verdict, outcome, enhanced)


def test_a_4xx_after_the_last_retry_is_a_temporary_error() -> None:
    assert classify(451, "4.3.0 later", final=True).verdict == "temporary_error"


def test_enhanced_code_only_at_the_start_and_diagnostic_on_one_line() -> None:
    assert enhanced_code("user 5.1.1 unknown") is None
    assert enhanced_code("5.1.10 x") == "5.1.10"
    reply = classify(550, "5.1.1 first line\nsecond   line")
    assert reply.diagnostic == "550 5.1.1 first line second line"
    assert len(classify(550, "x" * 5000).diagnostic) == 500


def test_verp_round_trip() -> None:
    verp = VerpAddresses(KEYS, "Bounces.Example.COM")
    campaign = str(uuid.uuid4())
    address = verp.address(campaign, 12345)
    local, _, domain = address.partition("@")
    assert domain == "bounces.example.com"
    assert local.startswith("b-")
    assert all(c.isalnum() or c == "-" for c in local)
    assert len(local) <= 64  # RFC 5321 §4.5.3.1.1
    target = verp.read(address)
    assert (target.campaign_id, target.contact_id) == (campaign, 12345)
    assert verp.read(f"<{local}@BOUNCES.example.com>").contact_id == 12345
    # A relay that changes the case of the return path does not break it.
    assert verp.read(address.upper()).campaign_id == campaign
    other = verp.read(verp.address("not-a-uuid", 7))
    assert (other.campaign_id, other.contact_id) == ("not-a-uuid", 7)


def test_verp_survives_key_rotation() -> None:
    old = VerpAddresses("k0:secret-old", "b.example")
    address = old.address(str(uuid.uuid4()), 5)
    assert VerpAddresses(KEYS, "b.example").read(address).contact_id == 5


@pytest.mark.parametrize(
    "tamper",
    [
        lambda a: a.replace("@b.example", "@other.example"),
        lambda a: "x" + a,
        lambda a: a[:10] + ("b" if a[10].lower() != "b" else "c") + a[11:],
        lambda a: a.split("@")[0][:-3] + "@b.example",
        lambda a: "someone@b.example",
        lambda a: a.replace("b-", "b-x", 1),  # a key id we do not have
    ],
)
def test_verp_refuses_tampered_addresses(tamper: Any) -> None:
    verp = VerpAddresses(KEYS, "b.example")
    address = verp.address(str(uuid.uuid4()), 99)
    with pytest.raises(BadToken):
        verp.read(tamper(address))


def test_verp_refuses_a_token_of_another_purpose() -> None:
    token = Signer(KEYS, "unsubscribe").sign({"m": "x", "c": 1})
    with pytest.raises(BadToken):
        VerpAddresses(KEYS, "b.example").read(f"b-{token}@b.example")


def test_dot_stuffing_and_held_terminator() -> None:
    content = b".first\r\nmiddle\r\n..two\r\n.\r\nlast line\nbare lf\r\n"
    payload = data_payload(content)
    assert payload == b"..first\r\nmiddle\r\n...two\r\n..\r\nlast line\r\nbare lf"
    assert TERMINATOR == b"\r\n.\r\n"
    # What a server reads back, once it removed the stuffing, is the content (CRLF lines).
    received = (payload + TERMINATOR).split(b"\r\n")[:-2]
    unstuffed = b"\r\n".join(line[1:] if line.startswith(b".") else line for line in received)
    assert unstuffed + b"\r\n" == content.replace(b"line\nbare", b"line\r\nbare")
    assert data_payload(b"no final newline") == b"no final newline"


class FakeTransport:
    """What Exchange needs of a transport, recording what was written."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def exchange() -> tuple[Exchange, FakeTransport]:
    transport = FakeTransport()
    return Exchange(SMTPProtocol(), cast(asyncio.Transport, transport)), transport


async def test_pipelined_replies_in_any_segments_are_all_kept() -> None:
    ex, transport = exchange()
    ex.write(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n")
    waiting = asyncio.ensure_future(ex.replies(3, timeout=5))
    # Two replies in one segment, the third split mid-line and across a continuation.
    for segment in (
        b"250 2.1.0 Ok\r\n250 2.1.5",
        b" Ok\r\n354-End data with\r\n",
        b"354 <CR><LF>.<CR><LF>\r\n",
    ):
        await asyncio.sleep(0)
        ex.data_received(segment)
    assert await waiting == [
        (250, "2.1.0 Ok"),
        (250, "2.1.5 Ok"),
        (354, "End data with\n<CR><LF>.<CR><LF>"),
    ]
    assert transport.written == [b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n"]
    ex.data_received(b"250 already here\r\n")  # a reply that came before it was asked for
    assert await ex.replies(1, timeout=5) == [(250, "already here")]
    ex.data_received(b"421 out of turn\r\n")
    assert ex.discard_unasked() == 1


async def test_a_lost_connection_or_no_smtp_fails_the_wait_and_every_write() -> None:
    ex, transport = exchange()
    waiting = asyncio.ensure_future(ex.replies(2, timeout=5))
    await asyncio.sleep(0)
    ex.data_received(b"250 Ok\r\n")
    ex.connection_lost(None)
    with pytest.raises(SMTPServerDisconnected):
        await waiting
    with pytest.raises(SMTPServerDisconnected):
        ex.write(b"\r\n.\r\n")  # a terminator that cannot go out says so
    garbled, transport = exchange()
    garbled.data_received(b"HTTP/1.1 400 Bad Request\r\n")
    with pytest.raises(SMTPResponseException):
        await garbled.replies(1, timeout=5)
    assert transport.closed


async def test_replies_that_do_not_come_time_out() -> None:
    ex, _ = exchange()
    with pytest.raises(TimeoutError):
        await ex.replies(1, timeout=0.01)


@pytest.mark.parametrize("step", [None, "", "step-1", "ステップ"])
def test_stable_message_id_is_the_uuid5_of_the_ledger_key(step: str | None) -> None:
    # Rows handed before an upgrade are resent after it: the Message-ID must not change.
    for campaign, contact in ((str(uuid.uuid4()), 42), ("mail:m-1", 0), ("c", -(2**63))):
        key = f"{campaign}/{step or ''}/{contact}"
        expected = f"<{uuid.uuid5(MESSAGE_ID_NAMESPACE, key).hex}@shop.example>"
        assert stable_message_id(campaign, step, contact, "shop.example") == expected


async def test_rate_limit_spaces_messages() -> None:
    limit = RateLimit(1000.0)
    assert limit.interval == pytest.approx(0.001)
    for _ in range(3):
        await limit.wait()
    assert RateLimit(0).interval == 0


def test_rate_limit_take_now_refuses_a_slot_not_due_without_waiting() -> None:
    """A connection looks ahead only when the relay's rate allows it at once."""
    limit = RateLimit(0.5)  # a slot every 2 s
    assert limit.take_now()
    assert not limit.take_now()  # the next slot is not due yet: refused, not waited for
    unlimited = RateLimit(0)
    assert all(unlimited.take_now() for _ in range(100))


def settings(**overrides: Any) -> SenderSettings:
    values: dict[str, Any] = dict(
        signing_keys=KEYS,
        public_base_url="https://t.example",
        tracking_base_url="https://track.example",
    )
    values.update(overrides)
    return SenderSettings(**values)


def request(**fields: Any) -> dict[str, Any]:
    value: dict[str, Any] = {
        "campaign_id": "6f1c2f1e-0000-4000-8000-000000000001",
        "contact_id": 42,
        "email": "taro@example.jp",
        "group_id": 3,
        "merge_values": {"name": "Taro"},
        "content": {
            "from_address": "news@shop.example",
            "from_name": "Shop",
            "reply_to": None,
            "subject": "Hi <#name>",
            "format": "html",
            "body": "<p>Hi <#name></p><a href='<#coupon_url>'>coupon</a> <#unsubscribe_url>",
            "coupon_url": "https://shop.example/c?code=X",
        },
    }
    value.update(fields)
    return value


def compose(composer: Composer, r: dict[str, Any]) -> tuple[bytes, str, str]:
    built = composer.campaign_message(r["campaign_id"], r["content"])
    return composer.campaign_mail(built, r)


def test_composing_a_campaign_mail() -> None:
    composer = Composer(settings(bounce_domain="bounce.example"))
    data, message_id, mail_from = compose(composer, request())
    mail = email.message_from_bytes(data)
    assert mail["Message-ID"] == message_id
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    url = "".join(mail["List-Unsubscribe"].split()).strip("<>")
    assert url.startswith("https://t.example/u/")
    parts = mail.get_payload()
    assert isinstance(parts, list)
    assert isinstance(parts[1], email.message.Message)
    html_part = parts[1].get_payload(decode=True)
    assert isinstance(html_part, bytes)
    html = html_part.decode()
    assert url in html
    # The coupon link is tracked (F-34): its click token carries the signed coupon URL.
    click = html.split("href='")[1].split("'")[0]
    coupon = TRACKING.read_click(click.removeprefix("https://track.example/t/c/")).url
    assert coupon is not None and coupon.startswith("https://shop.example/c?code=X&t=")
    token = coupon.split("t=")[1]
    claims = Signer(KEYS, "coupon").verify(token)
    assert "https://track.example/t/o/" in html  # the open pixel
    assert claims == {"m": request()["campaign_id"], "c": 42}
    target = VerpAddresses(KEYS, "bounce.example").read(mail_from)
    assert (target.campaign_id, target.contact_id) == (request()["campaign_id"], 42)
    # Cached per content: the same built message serves the next recipient.
    r2 = request(contact_id=43, email="hanako@example.jp")
    assert composer.campaign_message(r2["campaign_id"], r2["content"]) is (
        composer.campaign_message(request()["campaign_id"], request()["content"])
    )


def html_of(data: bytes) -> str:
    parts = email.message_from_bytes(data).get_payload()
    assert isinstance(parts, list) and isinstance(parts[1], email.message.Message)
    payload = parts[1].get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode()


def test_test_sends_and_switched_off_campaigns_are_not_tracked() -> None:
    composer = Composer(settings())
    tracked = request()
    test = request(test=True, step_id="test:abc:0")
    switched_off = request(content={**tracked["content"], "track_opens": False})
    built = composer.campaign_message(test["campaign_id"], test["content"], test=True)
    assert built is not composer.campaign_message(tracked["campaign_id"], tracked["content"])
    assert "track.example" not in html_of(composer.campaign_mail(built, test)[0])
    html = html_of(compose(composer, switched_off)[0])
    assert "/t/o/" not in html and "/t/c/" in html


def test_no_group_means_no_unsubscribe_headers() -> None:
    data, _, _ = compose(Composer(settings()), request(group_id=None))
    mail = email.message_from_bytes(data)
    assert mail["List-Unsubscribe"] is None
    assert mail["List-Unsubscribe-Post"] is None


def _dns(name: bytes, timeout: int = 5) -> bytes:
    assert name == b"sel._domainkey.shop.example."
    return b"v=DKIM1; k=rsa; p=" + TEST_PUBLIC.encode()


def test_dkim_signature_verifies_and_covers_list_unsubscribe() -> None:
    composer = Composer(
        settings(dkim_selector="sel", dkim_domain="shop.example", dkim_private_key=TEST_KEY)
    )
    data, _, _ = compose(composer, request())
    assert data.startswith(b"DKIM-Signature:")
    assert dkim.verify(data, dnsfunc=_dns)
    signature = email.message_from_bytes(data)["DKIM-Signature"]
    signed = "".join(signature.split()).split("h=")[1].split(";")[0].lower().split(":")
    for header in (
        "from",
        "to",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "content-type",
        "list-unsubscribe",
        "list-unsubscribe-post",
    ):
        assert header in signed
    # A changed List-Unsubscribe breaks the signature.
    forged = data.replace(
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click", b"List-Unsubscribe-Post: nothing"
    )
    assert not dkim.verify(forged, dnsfunc=_dns)


def test_a_dkim_key_that_cannot_sign_stops_the_sender_at_start() -> None:
    for key in (
        "not a key",
        "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----",
    ):
        with pytest.raises(ValueError, match="DKIM_PRIVATE_KEY cannot sign"):
            Composer(
                settings(dkim_selector="sel", dkim_domain="shop.example", dkim_private_key=key)
            )


def test_dkim_is_off_unless_configured() -> None:
    assert Composer(settings(dkim_selector="sel")).dkim is None
    assert isinstance(
        Composer(settings(dkim_selector="s", dkim_domain="d", dkim_private_key=TEST_KEY)).dkim,
        DkimSigner,
    )


def test_relays_setting() -> None:
    assert settings().relays() == [("127.0.0.1", 1025)]
    assert settings(smtp_host="mx", smtp_port=25).relays() == [("mx", 25)]
    assert settings(smtp_relays="a:25, [::1]:2525").relays() == [("a", 25), ("::1", 2525)]
    with pytest.raises(ValueError):
        settings(smtp_relays="nohost").relays()


async def test_a_relay_pool_stops_twice_quietly() -> None:
    """A second stop (a stop hook run again) finds nothing to stop."""
    from typing import cast

    from services.sender.ledger import Ledger
    from services.sender.smtp import RelayPool

    pool = RelayPool(settings(smtp_relays="127.0.0.1:9"), cast(Ledger, None))
    pool.start()
    await pool.stop()
    await pool.stop()
    assert pool.closing and not pool._workers
