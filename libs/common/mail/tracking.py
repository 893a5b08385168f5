"""Open and click tracking links (F-34), signed so that nobody can forge an open or a redirect.

The sender puts, per recipient, an open pixel ``{tracking}/t/o/{token}`` and rewrites each
http(s) link to ``{tracking}/t/c/{token}``; the bounce processor reads them back. A click
token carries the destination URL *under the signature*: a redirect only ever goes to a URL
that was in the mail we sent, so ``/t/c/`` is never an open redirect, and no lookup of the
campaign's content is needed to answer a click.

Tokens are :class:`~libs.common.mail.tokens.Signer` tokens (keys from ``TAYORI_SIGNING_KEYS``, with
a key id so keys rotate), one purpose each, so an open token is never accepted as a click.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from libs.common.mail.tokens import BadToken, Signer

OPEN = "open"
CLICK = "click"
TRACKABLE_SCHEMES = ("http", "https")
#: the 1×1 transparent GIF the open endpoint answers with (43 bytes).
PIXEL_GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")


@dataclass(frozen=True)
class TrackingTarget:
    """Whose mail was opened or clicked, and for a click where it goes."""

    campaign_id: str
    contact_id: int
    url: str | None = None
    step_id: str | None = None


def trackable(url: str) -> bool:
    """Whether a link is rewritten: absolute http(s) URLs only (never mailto:, tel:, #…)."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return False
    return parts.scheme.lower() in TRACKABLE_SCHEMES and bool(parts.netloc)


class TrackingLinks:
    """Builds and reads tracking URLs for one public base URL.

    ``untracked`` are URL prefixes never rewritten (the unsubscribe links ``{public}/u/``:
    RFC 8058 and the reader expect the real one); our own tracking URLs are never tracked
    twice.
    """

    def __init__(self, signing_keys: str, base_url: str, untracked: Iterable[str] = ()) -> None:
        self._open = Signer(signing_keys, OPEN)
        self._click = Signer(signing_keys, CLICK)
        self._base = base_url.rstrip("/")
        self._untracked = (f"{self._base}/t/", *untracked)

    def tracks(self, url: str) -> bool:
        """Whether ``url`` is rewritten to a click URL."""
        return trackable(url) and not url.strip().startswith(self._untracked)

    @staticmethod
    def _claims(campaign_id: str, contact_id: int, step_id: str | None) -> dict[str, object]:
        claims: dict[str, object] = {"m": campaign_id, "c": int(contact_id)}
        if step_id:
            claims["s"] = step_id
        return claims

    def open_url(self, campaign_id: str, contact_id: int, step_id: str | None = None) -> str:
        token = self._open.sign(self._claims(campaign_id, contact_id, step_id))
        return f"{self._base}/t/o/{token}"

    def click_url(
        self, campaign_id: str, contact_id: int, url: str, step_id: str | None = None
    ) -> str:
        """The tracked form of ``url``; ``url`` itself when it is not tracked."""
        if not self.tracks(url):
            return url
        claims = self._claims(campaign_id, contact_id, step_id)
        claims["u"] = url.strip()
        return f"{self._base}/t/c/{self._click.sign(claims)}"

    @staticmethod
    def _target(claims: dict[str, object], url: str | None = None) -> TrackingTarget:
        try:
            campaign_id, contact_id = str(claims["m"]), int(claims["c"])  # type: ignore[call-overload]
        except (KeyError, TypeError, ValueError):
            raise BadToken() from None
        step = claims.get("s")
        return TrackingTarget(campaign_id, contact_id, url, str(step) if step else None)

    def read_open(self, token: str) -> TrackingTarget:
        """The mail an open token names; :class:`BadToken` for anything we did not issue."""
        return self._target(self._open.verify(token))

    def read_click(self, token: str) -> TrackingTarget:
        """The mail and destination of a click token; :class:`BadToken` unless the signature
        covers a trackable URL (so a redirect can only go where the mail pointed)."""
        claims = self._click.verify(token)
        url = claims.get("u")
        if not isinstance(url, str) or not trackable(url):
            raise BadToken()
        return self._target(claims, url)


class RecipientLinks:
    """The tracking of one recipient's mail: its open pixel, and each distinct destination
    signed once (the same link is in the text and the HTML part)."""

    __slots__ = ("_campaign_id", "_contact_id", "_links", "_signed", "_step_id")

    def __init__(
        self, links: TrackingLinks, campaign_id: str, contact_id: int, step_id: str | None = None
    ) -> None:
        self._links = links
        self._campaign_id = campaign_id
        self._contact_id = contact_id
        self._step_id = step_id
        self._signed: dict[str, str] = {}

    def click(self, url: str) -> str:
        signed = self._signed.get(url)
        if signed is None:
            signed = self._signed[url] = self._links.click_url(
                self._campaign_id, self._contact_id, url, self._step_id
            )
        return signed

    def pixel(self) -> str:
        """The open pixel: a 1×1 image, hidden, with an empty alt (nothing shown or read)."""
        url = self._links.open_url(self._campaign_id, self._contact_id, self._step_id)
        return f'<img src="{html.escape(url)}" width="1" height="1" alt="" style="display:none">'
