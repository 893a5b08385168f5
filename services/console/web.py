"""The console's page machinery: templates, sessions, CSRF, roles, security headers and the
error pages every screen shares.

A view is marked with :func:`page` (who may open it: ``None`` for everyone, else the least
role); a POST to it must carry the form field ``csrf`` — the session's token, or before
login the ``tayori_csrf`` cookie's — or it is refused with a 403 page. Nothing a service
or a user sends reaches the browser as a stack trace: every failure becomes a page.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import jinja2
from aiohttp import web

from libs.common.errors import Fault, classify
from libs.common.http import SERVICE_KEY, observe
from libs.common.logging import get_logger
from services.console import auth
from services.console.auth import User
from services.console.clients import Api, ApiProblem, NoToken, RoleApi, ServiceUnavailable
from services.console.i18n import translator
from services.console.settings import ConsoleSettings

log = get_logger(__name__)
HERE = Path(__file__).parent
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SESSION_COOKIE = "tayori_session"
CSRF_COOKIE = "tayori_csrf"
POOL = web.AppKey("pool", asyncpg.Pool)
API = web.AppKey("api", Api)
SETTINGS = web.AppKey("settings", ConsoleSettings)
TEMPLATES = web.AppKey("templates", jinja2.Environment)
USER = web.RequestKey("user", User)
CSRF = web.RequestKey("csrf", str)

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}

#: the navigation: (path, label, ready). Screens still to come show 準備中.
NAV = (
    ("/", "ホーム", True),
    ("/contacts", "顧客検索", True),
    ("/groups", "配信リスト", True),
    ("/imports", "インポート", True),
    ("/jobs", "ジョブ確認", True),
    ("/campaigns", "キャンペーン", False),
    ("/steps", "ステップメール", False),
    ("/bounces", "バウンス", False),
)


def page(role: str | None = "viewer") -> Callable[[Handler], Handler]:
    """Mark a view: ``None`` opens it to everyone, else the least console role."""

    def mark(handler: Handler) -> Handler:
        handler.console_role = role  # type: ignore[attr-defined]
        return handler

    return mark


def templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader([HERE / "templates", HERE / "screens"]),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["when"] = _when
    return env


def _when(value: Any) -> str:
    """An ISO time as 'YYYY-MM-DD HH:MM' (Japan time when the API gave an offset)."""
    if not value:
        return ""
    import datetime as dt
    from zoneinfo import ZoneInfo

    try:
        at = dt.datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    if at.tzinfo is not None:
        at = at.astimezone(ZoneInfo("Asia/Tokyo"))
    return at.strftime("%Y-%m-%d %H:%M")


def user_of(request: web.Request) -> User:
    return request[USER]


def api(request: web.Request) -> RoleApi:
    """The services as the signed-in user's role sees them."""
    return request.app[API].for_role(request[USER].role)


def render(
    request: web.Request, template: str, *, status: int = 200, **values: Any
) -> web.Response:
    user = request.get(USER)
    lang = user.lang if user else request.cookies.get("lang", "ja")
    lang = lang if lang in ("ja", "en") else "ja"
    html = (
        request.app[TEMPLATES]
        .get_template(template)
        .render(
            user=user,
            csrf=request.get(CSRF, ""),
            lang=lang,
            t=translator(lang),
            nav=NAV,
            path=request.path,
            **values,
        )
    )
    return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")


def error_page(request: web.Request, status: int, title: str, detail: str = "") -> web.Response:
    return render(request, "error.html", status=status, title=title, detail=detail)


def set_cookie(
    request: web.Request,
    response: web.StreamResponse,
    name: str,
    value: str,
    *,
    max_age: int | None = None,
    samesite: str = "Lax",
) -> None:
    secure = request.secure or request.app[SETTINGS].secure_cookies
    response.set_cookie(
        name, value, httponly=True, samesite=samesite, secure=secure, path="/", max_age=max_age
    )


def login_redirect(request: web.Request) -> web.HTTPFound:
    return web.HTTPFound(f"/login?next={quote(request.path_qs, safe='')}")


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = exc
        for name, value in SECURITY_HEADERS.items():
            exc.headers.setdefault(name, value)
        raise
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if response.content_type == "text/html":
        response.headers.setdefault("Cache-Control", "no-store")
    return response


@web.middleware
async def pages(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Session, role, CSRF — and every failure as a page."""
    try:
        return await _guarded(request, handler)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 404:
            return error_page(request, 404, "ページが見つかりません")
        return error_page(request, exc.status, exc.reason)
    except ServiceUnavailable as exc:
        response = error_page(
            request, 503, "サービスに接続できません", f"{exc.service} ({exc.reason})"
        )
        response.headers["Retry-After"] = "5"
        return response
    except NoToken as exc:
        log.error("console_no_token", role=exc.role)
        return error_page(
            request,
            503,
            "サービスに接続できません",
            f"no API token is configured for the role {exc.role!r} (TAYORI_API_TOKENS)",
        )
    except ApiProblem as exc:
        if exc.status == 404:
            return error_page(request, 404, "ページが見つかりません", exc.detail)
        if exc.status in (401, 403):
            return error_page(request, 403, "この操作は許可されていません", exc.detail)
        return error_page(request, exc.status, "エラーが発生しました", exc.detail)
    except Exception as exc:
        if classify(exc) is Fault.TRANSIENT:  # the console's own database is away
            log.warning("console_database_unavailable", error=type(exc).__name__)
            response = error_page(request, 503, "サービスに接続できません", "console database")
            response.headers["Retry-After"] = "5"
            return response
        log.exception("console_page_failed", path=request.path, method=request.method)
        return error_page(request, 500, "エラーが発生しました")


async def _guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
    match = request.match_info
    if match.http_exception is not None:
        raise match.http_exception
    if isinstance(match.route.resource, web.StaticResource):
        return await handler(request)
    needed = getattr(match.handler, "console_role", "viewer")
    settings = request.app[SETTINGS]
    token = request.cookies.get(SESSION_COOKIE, "")
    user = None
    if token:
        user = await auth.session_user(request.app[POOL], token, settings.session_hours * 3600)
    fresh_csrf = None
    if user is not None:
        request[USER] = user
        request[CSRF] = user.csrf
    else:
        request[CSRF] = request.cookies.get(CSRF_COOKIE) or ""
        if not request[CSRF]:
            fresh_csrf = request[CSRF] = secrets.token_urlsafe(32)
    if needed is not None:
        if user is None:
            if request.method in ("GET", "HEAD"):
                raise login_redirect(request)
            return error_page(
                request, 403, "フォームの有効期限が切れました。ページを開き直してください。"
            )
        if not user.may(needed):
            return error_page(request, 403, "この操作は許可されていません")
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        form = await request.post()
        sent = form.get("csrf")
        if not isinstance(sent, str) or not request[CSRF] or not auth.same(sent, request[CSRF]):
            log.info("console_csrf_refused", path=request.path)
            return error_page(
                request, 403, "フォームの有効期限が切れました。ページを開き直してください。"
            )
    response = await handler(request)
    if fresh_csrf is not None:
        set_cookie(request, response, CSRF_COOKIE, fresh_csrf, samesite="Strict")
    return response


def create_web_app(settings: ConsoleSettings, max_upload: int) -> web.Application:
    app = web.Application(
        middlewares=[observe, security_headers, pages], client_max_size=max_upload
    )
    app[SERVICE_KEY] = settings.service
    app[SETTINGS] = settings
    app[TEMPLATES] = templates()
    return app
