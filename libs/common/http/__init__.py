"""HTTP for every service: contracts, problem answers, bearer-token roles, metrics, health,
OpenAPI and its reference page.

Views are plain aiohttp handlers; ``@contract`` (:mod:`libs.common.http.contract`) declares
and validates their inputs and answers. ``@requires("operator")`` sets the least role a
view needs (default: ``viewer`` for GET/HEAD, ``operator`` for anything else); ``@public``
opens it to everyone (unsubscribe, tracking). Every error is an RFC 9457 problem
(:mod:`libs.common.http.problems`): errors from :mod:`libs.common.errors` become 400, 403,
404 and 409; a dependency away becomes 503 with ``Retry-After``; aiohttp's own (404 for an
unknown path, 405, 413) get the same shape.

Every request is logged once when it ends (``http_request``: method, route template — never
the path, which carries tokens on the public routes — status, duration_ms, request_id; the
probes and /metrics at debug) and is handled in its trace (:mod:`libs.common.trace`): the
caller's ``traceparent``, else a new one; the answer carries ``traceparent`` and
``X-Request-Id``.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field
from structlog.contextvars import bind_contextvars, reset_contextvars

from libs.common import metrics as tayori_metrics
from libs.common import trace
from libs.common.errors import (
    Conflict,
    Fault,
    Forbidden,
    InvalidMessage,
    NotFound,
    TransientError,
    classify,
)
from libs.common.http import docs, openapi
from libs.common.http.contract import (
    JSON_BODY_BYTES,
    InvalidRequest,
    contract,
)
from libs.common.http.problems import MEDIA_TYPE, problem_body
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
#: the request's (traceparent, request id), set by the observe middleware.
TRACE = web.RequestKey("trace", tuple)
#: the header naming a request for the caller (and a proxy: nginx's $request_id).
REQUEST_ID_HEADER = "X-Request-Id"
#: a caller's request id is kept if it is this tame (no spaces or control characters, so a
#: log line and a grep stay simple); another one is replaced by the trace id.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
#: routes whose access lines are debug: probes and scrapes, every few seconds, all day.
QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})


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


def dumps(data: Any) -> str:
    return json.dumps(data, default=_default, ensure_ascii=False)


def json_response(data: Any, status: int = 200, **kwargs: Any) -> web.Response:
    return web.json_response(data, status=status, dumps=dumps, **kwargs)


def error(
    status: int,
    message: str,
    field: str | None = None,
    *,
    request: web.Request | None = None,
    issues: Any = (),
) -> web.Response:
    """A problem answer (RFC 9457) with ``message`` as its detail."""
    body = problem_body(
        status,
        message,
        field=field,
        issues=issues,
        instance=request.path if request is not None else None,
    )
    return web.Response(text=dumps(body), status=status, content_type=MEDIA_TYPE)


def _route_label(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def request_trace(request: web.Request) -> tuple[str, str]:
    """(traceparent, request id) of a request: the caller's trace with a parent id of ours,
    or a new trace — whose id is the caller's ``X-Request-Id`` when that is 32 hex digits or
    a UUID (nginx's ``$request_id``), so the caller's id is the one to grep. The request id is
    the caller's ``X-Request-Id`` if tame, else the trace id."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = given if _REQUEST_ID.match(given) else ""
    incoming = trace.parse(request.headers.get(trace.HEADER))
    if incoming is not None:
        traceparent = trace.child(incoming)
    else:
        traceparent = trace.new()
        as_hex = request_id.replace("-", "").lower()
        if len(as_hex) == 32 and trace.parse(f"00-{as_hex}-{traceparent[36:52]}-01"):
            traceparent = f"00-{as_hex}{traceparent[35:]}"
    return traceparent, request_id or trace.trace_id(traceparent)


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Metrics per route, the access log line, and the request's trace around it all."""
    service = request.app[SERVICE_KEY]
    started = time.perf_counter()
    traceparent, request_id = request[TRACE] = request_trace(request)
    status = 500
    with trace.bound(traceparent):
        named = bind_contextvars(request_id=request_id)
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            seconds = time.perf_counter() - started
            route = _route_label(request)
            HTTP_REQUESTS.labels(service, route, request.method, str(status)).inc()
            HTTP_SECONDS.labels(service, route).observe(seconds)
            (log.debug if route in QUIET_ROUTES else log.info)(
                "http_request",
                method=request.method,
                route=route,
                status=status,
                duration_ms=round(seconds * 1000, 1),
            )
            reset_contextvars(**named)


async def _trace_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer (streams, problems, aiohttp's own) names its trace and request id."""
    found = request.get(TRACE)
    if found is not None:
        response.headers[trace.HEADER], response.headers[REQUEST_ID_HEADER] = found


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except InvalidRequest as exc:
        return error(400, exc.reason, request=request, issues=exc.issues)
    except InvalidMessage as exc:
        return error(400, exc.reason, exc.field, request=request)
    except NotFound as exc:
        return error(404, str(exc), request=request)
    except Conflict as exc:
        return error(409, str(exc), request=request)
    except Forbidden as exc:
        return error(403, str(exc), request=request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _problem_of(request, exc)
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
            response = error(503, "temporarily unavailable, retry later", request=request)
            response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
            return response
        if fault is Fault.DATA:  # a value the database refuses (NUL, out of range, too long)
            log.info("http_value_refused", route=_route_label(request), error=repr(exc))
            return error(400, f"a value cannot be stored: {exc}", request=request)
        # A bug: the traceback goes to the log, the client gets the problem shape without it.
        log.exception("http_handler_failed", route=_route_label(request), method=request.method)
        return error(
            500, "internal error; the service logged it as http_handler_failed", request=request
        )


def _problem_of(request: web.Request, exc: web.HTTPException) -> web.Response:
    """aiohttp's own errors (unknown path, wrong method, body too large) as problems."""
    detail = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else None
    if exc.status == 404 and detail is None:
        detail = f"there is nothing at {request.path}"
    elif exc.status == 405 and detail is None:
        detail = f"{request.method} is not answered here; use {exc.headers.get('Allow', '')}"
    elif exc.status == 413 and detail is None:
        detail = "the request body is larger than this operation accepts"
    response = error(exc.status, detail or exc.reason, request=request)
    for name in ("Allow", "Retry-After"):
        if name in exc.headers:
            response.headers[name] = exc.headers[name]
    return response


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
        response = error(401, "missing or unknown bearer token", request=request)
        response.headers["WWW-Authenticate"] = 'Bearer realm="tayori"'
        return response
    if ROLES.get(role, 0) < ROLES[needed]:
        return error(
            403,
            f"role {role!r} may not do this; {needed!r} or higher is required",
            request=request,
        )
    request[ROLE] = role
    return await handler(request)


class Health(BaseModel):
    """A probe's answer: ``status`` and one entry per check."""

    model_config = ConfigDict(extra="allow")
    status: str = Field(examples=["ok"])


class Document(BaseModel):
    """A JSON document (the OpenAPI description)."""

    model_config = ConfigDict(extra="allow")


def create_app(
    service: str,
    tokens: dict[str, str],
    *,
    health: Callable[[], Awaitable[tuple[bool, dict[str, Any]]]],
    ready: Callable[[], Awaitable[tuple[bool, dict[str, Any]]]],
    title: str,
    registry: CollectorRegistry | None = None,
    client_max_size: int = JSON_BODY_BYTES,
) -> web.Application:
    """An application with the standard endpoints; add the service's routes to it.

    ``/metrics`` serves ``registry`` (the service's: common and own families; without one,
    the common families alone). ``client_max_size`` bounds what aiohttp itself reads into
    memory for a view that does not stream its body; contracts set their own limit per
    route."""
    app = web.Application(middlewares=[observe, errors, auth], client_max_size=client_max_size)
    app[ROLE_KEY] = tokens
    app[SERVICE_KEY] = service
    app.on_response_prepare.append(_trace_headers)
    served = registry if registry is not None else tayori_metrics.registry(())

    @public
    @contract(response=Health, also={503: Health})
    async def healthz(_: web.Request) -> web.Response:
        """Liveness: 200 while the process works (dependencies may be away and retried)."""
        ok, detail = await health()
        return json_response({"status": "ok" if ok else "failing", **detail}, 200 if ok else 503)

    @public
    @contract(response=Health, also={503: Health})
    async def readyz(_: web.Request) -> web.Response:
        """Readiness: 200 when every dependency answers; 503 names the missing one."""
        ok, detail = await ready()
        return json_response(
            {"status": "ready" if ok else "not_ready", **detail}, 200 if ok else 503
        )

    @public
    @contract(media={"text/plain": "Prometheus text exposition"})
    async def metrics(_: web.Request) -> web.Response:
        """Prometheus metrics of this process."""
        response = web.Response(body=generate_latest(served))
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return response

    @public
    @contract(response=Document)
    async def openapi_json(request: web.Request) -> web.Response:
        """This service's OpenAPI 3.1 description."""
        return json_response(openapi.document(request.app, title))

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi_json)
    docs.add_routes(app, title)
    return app
