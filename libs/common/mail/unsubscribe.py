"""Unsubscribe links and the RFC 8058 headers, built the same way wherever mail is made.

Every campaign mail carries a per-recipient, per-group URL ``{public}/u/{token}`` whose
token is HMAC-signed (purpose ``unsubscribe``, with a key id for rotation), and the
headers ``List-Unsubscribe`` (the https URL, optionally a mailto) and
``List-Unsubscribe-Post: List-Unsubscribe=One-Click``.

A test send's link (F-23) names the contact it was rendered for, or none, and says it is a
test (claim ``t``): the page it opens is a preview that changes nothing, and says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from libs.common.mail.tokens import BadToken, Signer

PURPOSE = "unsubscribe"


@dataclass(frozen=True)
class UnsubscribeTarget:
    contact_id: int
    group_id: int
    campaign_id: str | None = None
    #: the link of a test mail: it opens a preview and never changes a membership.
    test: bool = False


class UnsubscribeLinks:
    def __init__(self, signing_keys: str, public_base_url: str) -> None:
        self._signer = Signer(signing_keys, PURPOSE)
        self._base = public_base_url.rstrip("/")

    def token(self, target: UnsubscribeTarget) -> str:
        claims: dict[str, object] = {"c": target.contact_id, "g": target.group_id}
        if target.campaign_id:
            claims["m"] = target.campaign_id
        if target.test:
            claims["t"] = 1
        return self._signer.sign(claims)

    def url(self, target: UnsubscribeTarget) -> str:
        return f"{self._base}/u/{self.token(target)}"

    def headers(self, target: UnsubscribeTarget, mailto: str | None = None) -> dict[str, str]:
        """``List-Unsubscribe`` and ``List-Unsubscribe-Post`` for one recipient (RFC 8058)."""
        links = [f"<{self.url(target)}>"]
        if mailto:
            links.append(f"<mailto:{mailto}?subject=unsubscribe>")
        return {
            "List-Unsubscribe": ", ".join(links),
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        }

    def read(self, token: str) -> UnsubscribeTarget:
        """The target a token names; :class:`BadToken` for anything we did not issue."""
        claims = self._signer.verify(token)
        try:
            contact_id, group_id = int(claims["c"]), int(claims["g"])
        except (KeyError, TypeError, ValueError):
            raise BadToken() from None
        campaign = claims.get("m")
        return UnsubscribeTarget(
            contact_id, group_id, str(campaign) if campaign else None, test=claims.get("t") == 1
        )
