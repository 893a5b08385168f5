"""The public unsubscribe endpoints (F-13): ``GET /u/{token}`` confirms, ``POST`` acts.

- GET never changes state (mail scanners follow links); it shows a confirmation form.
- POST unsubscribes — a form submit or an RFC 8058 one-click body
  (``List-Unsubscribe=One-Click``, urlencoded or multipart) — and answers 200 with a page,
  never a redirect, only after the change is committed.
- A forged, tampered, expired-key or unknown token gets exactly the same answer. A token we
  signed for a membership not applied here yet (a join contacts recorded a moment ago) is
  honoured: the unsubscribe is kept and applied when the join arrives.
Pages are plain HTML in Japanese and English with no external assets.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from structlog.contextvars import bound_contextvars

from libs.common.errors import NotFound
from libs.common.http import public
from libs.common.http.contract import BODY_SECONDS, contract
from libs.common.logging import get_logger
from libs.common.mail.states import MembershipState
from libs.common.mail.tokens import BadToken
from libs.common.mail.unsubscribe import UnsubscribeTarget
from libs.common.metrics import UNSUBSCRIBE_REQUESTS
from services.suppression import store
from services.suppression.context import CONTEXT, Context

log = get_logger(__name__)
routes = web.RouteTableDef()

_STYLE = (
    "body{font-family:system-ui,-apple-system,'Hiragino Sans','Noto Sans JP',sans-serif;"
    "max-width:36em;margin:3em auto;padding:0 1em;color:#222;line-height:1.7}"
    "button{font-size:1em;padding:.6em 1.4em;border-radius:6px;border:1px solid #888;"
    "background:#f4f4f4;cursor:pointer}p.en{color:#555}"
)
_HEADERS = {
    "Cache-Control": "no-store",
    "X-Robots-Tag": "noindex",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
}


#: what a mail client (RFC 8058 one-click) or the confirmation page's form posts.
FORM: dict[str, Any] = {
    "type": "object",
    "properties": {
        "List-Unsubscribe": {
            "type": "string",
            "enum": ["One-Click"],
            "description": "RFC 8058 one-click: exactly List-Unsubscribe=One-Click",
        },
        "confirm": {"type": "string", "description": "the confirmation page's button"},
    },
    "description": "the body is read only to tell one-click from the form; an unreadable "
    "one still unsubscribes",
    "examples": [{"List-Unsubscribe": "One-Click"}],
}


def _page(title: str, body: str, status: int = 200) -> web.Response:
    document = (
        f'<!doctype html><html lang="ja"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body>{body}</body></html>"
    )
    return web.Response(
        text=document, status=status, content_type="text/html", charset="utf-8", headers=_HEADERS
    )


def _not_valid() -> web.Response:
    # One answer for every token we cannot honour: nothing to learn by probing.
    return _page(
        "無効なリンク / Link not valid",
        "<h1>このリンクは無効です</h1><p>リンクの有効期限が切れているか、正しくありません。</p>"
        '<p class="en">This link is not valid. It may be incomplete or no longer in use.</p>',
        status=404,
    )


def _signed(ctx: Context, token: str) -> UnsubscribeTarget | None:
    try:
        return ctx.links.read(token)
    except BadToken:
        return None


def _test_page(done: bool) -> web.Response:
    """What a test mail's link opens (F-23): the page an operator checks, saying plainly that
    this was a test and nothing changed."""
    what = (
        "<p>これはテスト送信のメールのリンクです。配信停止は行われていません。"
        "実際のメールでは、ここで配信が停止されます。</p>"
        '<p class="en">This link came in a test mail: nothing was changed. In a real mail, '
        "this is where the reader is unsubscribed.</p>"
        if done
        else "<p>これはテスト送信のメールのリンクです。実際のメールでは、このページで配信停止を"
        "確認します。ボタンを押しても配信停止は行われません。</p>"
        '<p class="en">This link came in a test mail. In a real mail the reader confirms here; '
        "pressing the button changes nothing.</p>"
        '<form method="post"><input type="hidden" name="confirm" value="1">'
        '<button type="submit">配信を停止する（テスト） / Unsubscribe (test)</button></form>'
    )
    return _page("テスト送信 / Test mail", f"<h1>テスト送信のリンク</h1>{what}")


@routes.get("/u/{token}")
@public
@contract(media={"text/html": "the confirmation page (changes nothing)"}, pages={404: "text/html"})
async def confirm(request: web.Request) -> web.Response:
    """Public: the unsubscribe confirmation page (changes nothing).

    Any token we signed gets it, also while its membership is still being applied here (a
    join made in contacts a moment ago): the POST then keeps the unsubscribe for it."""
    ctx = request.app[CONTEXT]
    target = _signed(ctx, request.match_info["token"])
    if target is None:
        UNSUBSCRIBE_REQUESTS.labels("bad_token", "view").inc()
        return _not_valid()
    if target.test:
        return _test_page(done=False)
    return _page(
        "配信停止の確認 / Unsubscribe",
        "<h1>配信停止の確認</h1><p>このメールの配信を停止します。よろしければボタンを押してください。</p>"
        '<p class="en">To stop receiving these emails, press the button.</p>'
        '<form method="post"><input type="hidden" name="confirm" value="1">'
        '<button type="submit">配信を停止する / Unsubscribe</button></form>',
    )


@routes.post("/u/{token}")
@public
@contract(
    media={"text/html": "the page saying it is done (after the change is committed)"},
    pages={404: "text/html"},
    raw_body={"application/x-www-form-urlencoded": FORM, "multipart/form-data": FORM},
)
async def unsubscribe(request: web.Request) -> web.Response:
    """Public: unsubscribe (form submit or RFC 8058 one-click), durable before the answer.

    A membership not applied here yet (contacts records a join at once; suppression applies
    it a moment later) is unsubscribed too: the click is kept and applied when the join
    arrives, so a reader who clicks is never shown an invalid link for a real membership."""
    ctx = request.app[CONTEXT]
    kind = await _kind(request)
    target = _signed(ctx, request.match_info["token"])  # the membership is checked below
    if target is None:
        UNSUBSCRIBE_REQUESTS.labels("bad_token", kind).inc()
        return _not_valid()
    if target.test:
        UNSUBSCRIBE_REQUESTS.labels("test", kind).inc()
        return _test_page(done=True)
    with bound_contextvars(
        contact_id=target.contact_id, group_id=target.group_id, campaign_id=target.campaign_id
    ):
        stopped = await _unsubscribe(ctx, target)
        outcome = "unsubscribed" if stopped else "already_stopped"
        UNSUBSCRIBE_REQUESTS.labels(outcome, kind).inc()
        log.info("unsubscribe_request", outcome=outcome, kind=kind)
    return _page(
        "配信を停止しました / Unsubscribed",
        "<h1>配信を停止しました</h1><p>今後、このメールは届きません。</p>"
        '<p class="en">You have been unsubscribed. You will not receive these emails any more.</p>',
    )


async def _unsubscribe(ctx: Context, target: UnsubscribeTarget) -> bool:
    """Stop the membership, committed before this returns; whether it changed. One statement
    in the common case, whose change this process's relay publishes at once; the full
    transaction (lock, decide, propagate) otherwise."""
    async with ctx.pool.acquire() as conn:
        try:
            stopped = await store.unsubscribe_by_link(
                conn, target.contact_id, target.group_id, campaign_id=target.campaign_id
            )
            if stopped is not None:
                if stopped:
                    ctx.outbox.wake()
                return stopped
            async with conn.transaction():
                transition, _ = await store.change_state(
                    conn,
                    target.contact_id,
                    target.group_id,
                    MembershipState.UNSUBSCRIBED.value,
                    actor="reader",
                    method="form",
                    campaign_id=target.campaign_id,
                )
            return transition.changes
        except NotFound:
            # not applied here yet: kept, and applied when the join arrives
            async with conn.transaction():
                return await store.unsubscribe_early(
                    conn, target.contact_id, target.group_id, campaign_id=target.campaign_id
                )


async def _kind(request: web.Request) -> str:
    """one_click for an RFC 8058 body (either encoding), form otherwise; the body is read
    whole either way (bounded by the app's body limit and BODY_SECONDS) so the connection
    stays usable."""
    try:
        async with asyncio.timeout(BODY_SECONDS):
            try:
                form = await request.post()
            except (ValueError, LookupError, HttpProcessingError):
                # a body that is not the form it claims (no boundary, not UTF-8, an
                # unknown charset, a part's header that does not parse): still an
                # unsubscribe, by the form
                with contextlib.suppress(HttpProcessingError):
                    await request.read()
                return "form"
    except TimeoutError:
        raise web.HTTPRequestTimeout(
            text=f"the request body did not arrive within {BODY_SECONDS:g} seconds"
        ) from None
    values = {k: str(v)[:200] for k, v in form.items()}
    return "one_click" if values.get("List-Unsubscribe") == "One-Click" else "form"
