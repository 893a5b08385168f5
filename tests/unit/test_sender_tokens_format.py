"""Tokens already issued (in mail that is out there) keep verifying: the token formats are
pinned to values made by the code as it was before signing got faster (a prebuilt HMAC
state copied per token, the payload's JSON encoder made once, base32 without base64's
pure-Python loop, a campaign's share of its VERP addresses kept)."""

from __future__ import annotations

import base64
import os
import uuid

import pytest

from libs.common.mail import verp
from libs.common.mail.tokens import BadToken, Signer
from libs.common.mail.tracking import TrackingLinks
from libs.common.mail.unsubscribe import UnsubscribeLinks, UnsubscribeTarget
from libs.common.mail.verp import VerpAddresses

KEYS = "k1:secret-one,k2:secret-two"
CAMPAIGN = "6f3a1c52-8d4e-4b7a-9c2f-1e5d7b9a0c34"
UNSUBSCRIBE = (
    "https://mail.example.com/u/k1.eyJjIjoxMjM0NSwiZyI6NywibSI6IjZmM2ExYzUyLThkNGUtNGI3YS05Yz"
    "JmLTFlNWQ3YjlhMGMzNCJ9.FHHIXrLAlZOxrczyb2_cgZf44II"
)
VERP = {
    12345: "b-k1-n45byuunjzfxvhbpdzoxxgqmgqaaaaaaaaadaom7eobwtdhvcocerkq@bounces.example.com",
    -3: "b-k1-n45byuunjzfxvhbpdzoxxgqmgt777777777777j6sjy5n2zzkvo7yza@bounces.example.com",
}
VERP_NOT_UUID = (
    "b-k1.eyJjIjo5LCJtIjoibm90LWEtdXVpZCJ9.iG70mwmP4WZ4d7AAnsgPOhFkpwU@bounces.example.com"
)
OPEN = (
    "https://t.example.com/t/o/k1.eyJjIjoxMjM0NSwibSI6IjZmM2ExYzUyLThkNGUtNGI3YS05YzJmLTFlNW"
    "Q3YjlhMGMzNCIsInMiOiJwbGFuOjE6ZW5yb2xtZW50OjIifQ.o4S1iss4wuypxN8ipdyjheoO9qs"
)
CLICK_URL = "https://shop.example/セール?a=1&b=2"
CLICK = (
    "https://t.example.com/t/c/k1.eyJjIjoxMjM0NSwibSI6IjZmM2ExYzUyLThkNGUtNGI3YS05YzJmLTFlNW"
    "Q3YjlhMGMzNCIsInUiOiJodHRwczovL3Nob3AuZXhhbXBsZS9cdTMwYmJcdTMwZmNcdTMwZWI_YT0xJmI9MiJ9"
    ".g-3afKfGi5ktgUstEffXfS2fuCQ"
)
DOWNLOAD = "k2.eyJqb2IiOiJqMSIsIlx1MDBlOSI6Ilx1MDBmYyJ9.XzTyPUCksdYlhKXbWD9BTZ_qEEY"


def test_unsubscribe_links_mailed_before_still_read() -> None:
    """Unsubscribe tokens are sealed now (F-13), but the signed ones made before are in
    mailboxes for years: this one, made by the code as it was, still reads."""
    links = UnsubscribeLinks(KEYS, "https://mail.example.com")
    target = UnsubscribeTarget(12345, 7, CAMPAIGN)
    assert links.read(UNSUBSCRIBE.rpartition("/")[2]) == target
    sealed = links.url(target)
    assert sealed != UNSUBSCRIBE and sealed.startswith("https://mail.example.com/u/k1.")
    assert links.read(sealed.rpartition("/")[2]) == target


def test_verp_addresses_are_made_and_read_as_before() -> None:
    addresses = VerpAddresses(KEYS, "bounces.example.com")
    for contact_id, address in VERP.items():
        assert addresses.address(CAMPAIGN, contact_id) == address
        assert addresses.read(address) == verp.VerpTarget(CAMPAIGN, contact_id)
    assert addresses.address("not-a-uuid", 9) == VERP_NOT_UUID
    assert addresses.read(VERP_NOT_UUID) == verp.VerpTarget("not-a-uuid", 9)


def test_verp_addresses_of_many_campaigns_each_read_back() -> None:
    addresses = VerpAddresses(KEYS, "bounces.example.com")
    campaigns = [str(uuid.uuid4()) for _ in range(verp.CAMPAIGNS_KEPT + 10)]
    for n, campaign in enumerate(campaigns * 2):
        address = addresses.address(campaign, n)
        assert addresses.read(address) == verp.VerpTarget(campaign, n)
    tampered = addresses.address(campaigns[0], 1).replace("-", "-a", 1)
    with pytest.raises(BadToken):
        addresses.read(tampered)


def test_tracking_tokens_are_made_and_read_as_before() -> None:
    links = TrackingLinks(KEYS, "https://t.example.com")
    assert links.open_url(CAMPAIGN, 12345, "plan:1:enrolment:2") == OPEN
    assert links.click_url(CAMPAIGN, 12345, CLICK_URL) == CLICK
    assert links.read_click(CLICK.rpartition("/")[2]).url == CLICK_URL


def test_signed_claims_with_another_key_and_expiry() -> None:
    signer = Signer("k2:secret-two", "download")
    assert signer.sign({"job": "j1", "é": "ü"}) == DOWNLOAD
    assert Signer(KEYS, "download").verify(DOWNLOAD) == {"job": "j1", "é": "ü"}
    expiring = signer.sign({"job": "j2"}, ttl_seconds=60)
    assert signer.verify(expiring)["job"] == "j2"
    with pytest.raises(BadToken):
        signer.verify(expiring, now=10**12)
    with pytest.raises(BadToken):
        Signer(KEYS, "unsubscribe").verify(DOWNLOAD)  # another purpose


@pytest.mark.parametrize("size", range(0, 41))
def test_base32_is_rfc4648_lower_case_without_padding(size: int) -> None:
    data = os.urandom(size)
    assert verp._b32(data) == base64.b32encode(data).decode().rstrip("=").lower()
