"""ログイン: sign in, sign out, and the language preference."""

from __future__ import annotations

from aiohttp import web

from libs.common.logging import get_logger
from services.console import auth
from services.console.i18n import LANGS
from services.console.web import (
    CSRF_COOKIE,
    POOL,
    SESSION_COOKIE,
    SETTINGS,
    USER,
    page,
    render,
    set_cookie,
)

log = get_logger(__name__)
routes = web.RouteTableDef()


def safe_next(value: object) -> str:
    """A local path to go on to after login (never another site)."""
    if isinstance(value, str) and value.startswith("/") and not value.startswith("//"):
        if "\\" not in value and "\n" not in value and "\r" not in value:
            return value
    return "/"


@routes.get("/login")
@page(None)
async def login_form(request: web.Request) -> web.Response:
    if request.get(USER) is not None:
        raise web.HTTPFound(safe_next(request.query.get("next")))
    return render(
        request, "login.html", next=safe_next(request.query.get("next")), error="", login=""
    )


@routes.post("/login")
@page(None)
async def login(request: web.Request) -> web.Response:
    form = await request.post()
    name = str(form.get("login", ""))[:320]
    password = str(form.get("password", ""))[:1024]
    go = safe_next(form.get("next"))
    settings = request.app[SETTINGS]
    client = auth.client_address(
        request.remote,
        request.headers.get("X-Forwarded-For"),
        auth.trusted_networks(settings.trusted_proxies),
    )
    try:
        user = await auth.login(
            request.app[POOL],
            name,
            password,
            client,
            max_failures=settings.login_max_failures,
            lock_seconds=settings.login_lock_seconds,
        )
    except auth.LockedOut:
        log.warning("console_login_locked")
        return render(
            request,
            "login.html",
            status=429,
            next=go,
            login=name,
            error="ログインの失敗が続いたため、しばらくお待ちください。",
        )
    if user is None:
        log.info("console_login_failed")
        return render(
            request,
            "login.html",
            status=401,
            next=go,
            login=name,
            error="ユーザー名かパスワードが違います。",
        )
    token = await auth.open_session(request.app[POOL], user, settings.session_hours * 3600)
    log.info("console_login", user_id=user.id)
    response = web.HTTPSeeOther(go)
    set_cookie(request, response, SESSION_COOKIE, token)
    response.del_cookie(CSRF_COOKIE, path="/")
    raise response


@routes.post("/logout")
@page("viewer")
async def logout(request: web.Request) -> web.Response:
    await auth.close_session(request.app[POOL], request.cookies.get(SESSION_COOKIE, ""))
    response = web.HTTPSeeOther("/login")
    response.del_cookie(SESSION_COOKIE, path="/")
    raise response


@routes.post("/preferences/lang")
@page("viewer")
async def set_lang(request: web.Request) -> web.Response:
    form = await request.post()
    lang = form.get("lang")
    if lang in LANGS:
        await request.app[POOL].execute(auth.QUERIES["set-lang"], request[USER].id, lang)
    raise web.HTTPSeeOther(safe_next(form.get("next")))
