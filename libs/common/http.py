"""HTTP for every service: JSON errors, bearer-token roles, metrics, health and OpenAPI.

Views are plain aiohttp handlers. ``@requires("operator")`` sets the least role a view
needs (default: ``viewer`` for GET/HEAD, ``operator`` for anything else); ``@public``
opens it to everyone (unsubscribe, tracking). Errors from :mod:`libs.common.errors` become
JSON answers: ``{"error": "...", "field": "..."}`` with 400/403/404/409.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from libs.common.errors import (
    Conflict,
    Fault,
    Forbidden,
    InvalidMessage,
    NotFound,
    TransientError,
    classify,
)
from libs.common.logging import get_logger
from libs.common.metrics import HTTP_REQUESTS, HTTP_SECONDS

log = get_logger(__name__)

ROLES = {"viewer": 1, "operator": 2, "admin": 3}
#: what a 503 tells the client to wait before trying again (seconds).
RETRY_AFTER_SECONDS = 5
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ROLE_KEY = web.AppKey("tokens", dict)
SERVICE_KEY = web.AppKey("service", str)
#: the caller's role, set by the auth middleware on every authenticated request.
ROLE = web.RequestKey("role", str)


def requires(role: str) -> Callable[[Handler], Handler]:
    def mark(handler: Handler) -> Handler:
        handler.tayori_role = role  # type: ignore[attr-defined]
        return handler

    return mark


def public(handler: Handler) -> Handler:
    handler.tayori_role = None  # type: ignore[attr-defined]
    return handler


def _default(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def int_param(raw: str | None, name: str) -> int:
    """A path or query parameter as an integer; a missing or malformed one is a 400
    naming ``name``."""
    try:
        return int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidMessage(f"{name} must be an integer", field=name) from None


def dumps(data: Any) -> str:
    return json.dumps(data, default=_default, ensure_ascii=False)


def json_response(data: Any, status: int = 200, **kwargs: Any) -> web.Response:
    return web.json_response(data, status=status, dumps=dumps, **kwargs)


def error(status: int, message: str, field: str | None = None) -> web.Response:
    body: dict[str, Any] = {"error": message}
    if field:
        body["field"] = field
    return json_response(body, status=status)


async def read_json(request: web.Request, *, max_bytes: int = 1 << 20) -> dict[str, Any]:
    """The request body as a JSON object, or InvalidMessage with a readable reason."""
    if request.content_length and request.content_length > max_bytes:
        raise InvalidMessage(f"request body larger than {max_bytes} bytes")
    raw = await request.read()
    if not raw:
        raise InvalidMessage("request body is empty; expected a JSON object")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidMessage(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidMessage("request body must be a JSON object")
    return body


def _route_label(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    service = request.app[SERVICE_KEY]
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        route = _route_label(request)
        HTTP_REQUESTS.labels(service, route, request.method, str(status)).inc()
        HTTP_SECONDS.labels(service, route).observe(time.perf_counter() - started)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except InvalidMessage as exc:
        return error(400, exc.reason, exc.field)
    except NotFound as exc:
        return error(404, str(exc))
    except Conflict as exc:
        return error(409, str(exc))
    except Forbidden as exc:
        return error(403, str(exc))
    except web.HTTPException:
        raise
    except Exception as exc:
        fault = classify(exc)
        if fault is Fault.TRANSIENT:
            # A dependency is away (PostgreSQL restarting, the broker electing a leader):
            # nothing was committed, the client may simply send the request again.
            log.warning(
                "http_dependency_unavailable",
                route=_route_label(request),
                error=repr(exc) if not isinstance(exc, TransientError) else str(exc),
            )
            response = error(503, "temporarily unavailable, retry later")
            response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
            return response
        if fault is Fault.DATA:  # a value the database refuses (NUL, out of range, too long)
            log.info("http_value_refused", route=_route_label(request), error=repr(exc))
            return error(400, f"a value cannot be stored: {exc}")
        raise


@web.middleware
async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    route_handler = request.match_info.handler
    needed = getattr(route_handler, "tayori_role", "default")
    if needed is None or request.match_info.http_exception is not None:
        return await handler(request)
    if needed == "default":
        needed = "viewer" if request.method in ("GET", "HEAD") else "operator"
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    role = request.app[ROLE_KEY].get(token.strip()) if scheme.lower() == "bearer" else None
    if role is None:
        return error(401, "missing or unknown bearer token")
    if ROLES.get(role, 0) < ROLES[needed]:
        return error(403, f"role {role!r} may not do this; {needed!r} or higher is required")
    request[ROLE] = role
    return await handler(request)


def create_app(
    service: str,
    tokens: dict[str, str],
    *,
    health: Callable[[], Awaitable[tuple[bool, dict[str, Any]]]],
    ready: Callable[[], Awaitable[tuple[bool, dict[str, Any]]]],
    title: str,
) -> web.Application:
    """An application with the standard endpoints; add the service's routes to it."""
    app = web.Application(middlewares=[observe, errors, auth], client_max_size=64 << 20)
    app[ROLE_KEY] = tokens
    app[SERVICE_KEY] = service

    @public
    async def healthz(_: web.Request) -> web.Response:
        ok, detail = await health()
        return json_response({"status": "ok" if ok else "failing", **detail}, 200 if ok else 503)

    @public
    async def readyz(_: web.Request) -> web.Response:
        ok, detail = await ready()
        return json_response(
            {"status": "ready" if ok else "not_ready", **detail}, 200 if ok else 503
        )

    @public
    async def metrics(_: web.Request) -> web.Response:
        response = web.Response(body=generate_latest())
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return response

    @public
    async def openapi(request: web.Request) -> web.Response:
        return json_response(openapi_document(request.app, title))

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    return app


def openapi_document(app: web.Application, title: str) -> dict[str, Any]:
    """OpenAPI 3.1 built from the route table and each view's docstring."""
    paths: dict[str, dict[str, Any]] = {}
    for route in app.router.routes():
        if route.method == "HEAD" or route.resource is None:
            continue
        path = route.resource.canonical
        doc = (route.handler.__doc__ or "").strip()
        summary, _, description = doc.partition("\n")
        role = getattr(route.handler, "tayori_role", "default")
        operation: dict[str, Any] = {
            "summary": summary or route.handler.__name__,
            "responses": {"200": {"description": "OK"}},
        }
        if description.strip():
            operation["description"] = description.strip()
        params = [
            {"name": part[1:-1], "in": "path", "required": True, "schema": {"type": "string"}}
            for part in path.split("/")
            if part.startswith("{")
        ]
        if params:
            operation["parameters"] = params
        if role is not None:
            needed = (
                role if role != "default" else ("viewer" if route.method == "GET" else "operator")
            )
            operation["security"] = [{"bearer": []}]
            operation["x-tayori-role"] = needed
            operation["responses"].update(
                {
                    "401": {"description": "no or unknown token"},
                    "403": {"description": "role too low"},
                }
            )
        if route.method in ("POST", "PUT", "PATCH"):
            operation["responses"]["400"] = {"description": "invalid input: {error, field}"}
        paths.setdefault(path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": "1"},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": paths,
    }
