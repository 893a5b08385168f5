"""The access log line and the request's trace (libs/common/http observe, libs/common/trace):
one ``http_request`` line per request with the route template (never the token in the path),
the caller's traceparent or request id honoured and echoed, a new trace otherwise."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web

from libs.common import trace
from libs.common.http import create_app, public
from libs.common.logging import get_logger

TOKEN = "c2VjcmV0LXRva2VuLW5vdC10by1iZS1sb2dnZWQ"
CALLER = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
log = get_logger(__name__)


async def _ok() -> tuple[bool, dict[str, Any]]:
    return True, {}


@public
async def unsubscribe(request: web.Request) -> web.Response:
    log.info("unsubscribe_request", outcome="unsubscribed")
    return web.Response(text=trace.current() or "")


@pytest.fixture
async def base() -> AsyncIterator[str]:
    app = create_app("test", {}, health=_ok, ready=_ok, title="test")
    app.router.add_post("/u/{token}", unsubscribe)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def _call(
    base: str, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, Any, str, list[Any]]:
    with structlog.testing.capture_logs(
        processors=[structlog.contextvars.merge_contextvars]
    ) as lines:
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, base + path, headers=headers or {}) as response,
        ):
            body = await response.text()
            return response.status, response.headers.copy(), body, list(lines)


async def test_one_access_line_with_the_route_template_and_the_callers_trace(base: str) -> None:
    status, headers, body, lines = await _call(
        base, "POST", f"/u/{TOKEN}", {"traceparent": CALLER, "X-Request-Id": "req-42"}
    )
    assert status == 200
    access = [line for line in lines if line["event"] == "http_request"]
    assert len(access) == 1
    line = access[0]
    assert line["method"] == "POST"
    assert line["route"] == "/u/{token}"
    assert line["status"] == 200
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
    assert line["request_id"] == "req-42"
    assert line["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert line["log_level"] == "info"
    # the token is nowhere in what was logged
    assert TOKEN not in repr(lines)
    # the view's own line is in the same trace
    (view,) = [line for line in lines if line["event"] == "unsubscribe_request"]
    assert view["trace_id"] == line["trace_id"] and view["request_id"] == "req-42"
    # answered with the caller's request id and the same trace under a parent id of ours
    assert headers["X-Request-Id"] == "req-42"
    echoed = headers["traceparent"]
    assert trace.trace_id(echoed) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert echoed != CALLER and echoed.endswith("-01")
    assert body == echoed  # the view ran in it (an outbox row written there carries it)


async def test_without_headers_a_new_trace_is_made_and_returned(base: str) -> None:
    status, headers, _, lines = await _call(base, "POST", f"/u/{TOKEN}")
    assert status == 200
    (line,) = [line for line in lines if line["event"] == "http_request"]
    assert re.fullmatch(r"[0-9a-f]{32}", line["trace_id"])
    assert line["request_id"] == line["trace_id"] == headers["X-Request-Id"]
    assert trace.parse(headers["traceparent"]) == headers["traceparent"]
    assert trace.trace_id(headers["traceparent"]) == line["trace_id"]


async def test_a_uuid_request_id_becomes_the_trace_id(base: str) -> None:
    given = "0f8fad5b-d9cb-469f-a165-70867728950e"
    _, headers, _, lines = await _call(base, "POST", f"/u/{TOKEN}", {"X-Request-Id": given})
    (line,) = [line for line in lines if line["event"] == "http_request"]
    assert line["request_id"] == given
    assert line["trace_id"] == given.replace("-", "")
    assert headers["X-Request-Id"] == given


@pytest.mark.parametrize(
    "traceparent",
    [
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero parent id
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # forbidden version
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case
        "not a traceparent",
    ],
)
async def test_an_invalid_traceparent_starts_a_new_trace(base: str, traceparent: str) -> None:
    _, headers, _, lines = await _call(
        base, "POST", f"/u/{TOKEN}", {"traceparent": traceparent, "X-Request-Id": "a b;c"}
    )
    (line,) = [line for line in lines if line["event"] == "http_request"]
    assert line["trace_id"] != "4bf92f3577b34da6a3ce929d0e0e4736"
    assert line["request_id"] == line["trace_id"]  # an untame request id is not kept
    assert trace.trace_id(headers["traceparent"]) == line["trace_id"]


async def test_errors_and_unknown_paths_are_logged_and_answered_with_the_ids(base: str) -> None:
    status, headers, _, lines = await _call(base, "GET", f"/nothing/{TOKEN}")
    assert status == 404
    (line,) = [line for line in lines if line["event"] == "http_request"]
    assert line["route"] == "unmatched" and line["status"] == 404
    assert TOKEN not in repr(lines)
    assert headers["X-Request-Id"] == line["request_id"]
    status, _, _, lines = await _call(base, "GET", f"/u/{TOKEN}")
    assert status == 405
    (line,) = [line for line in lines if line["event"] == "http_request"]
    # a method the path does not answer matches no route: labelled as unknown, token left out
    assert line["route"] == "unmatched" and line["status"] == 405
    assert TOKEN not in repr(lines)


async def test_probes_are_logged_at_debug(base: str) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        status, _, _, lines = await _call(base, "GET", path)
        assert status == 200
        (line,) = [line for line in lines if line["event"] == "http_request"]
        assert line["log_level"] == "debug" and line["route"] == path


def test_traceparent_forms() -> None:
    made = trace.new()
    assert trace.parse(made) == made
    assert trace.trace_id(trace.child(made)) == trace.trace_id(made)
    assert trace.child(made) != made
    # a later version's extra fields are ignored; version 00 must have none
    assert trace.parse(CALLER.replace("00-", "01-", 1) + "-extra") == CALLER
    assert trace.parse(CALLER + "-extra") is None
    assert trace.of_headers([("x", b"1"), ("traceparent", CALLER.encode())]) == CALLER
    assert trace.of_headers([("traceparent", b"garbage")]) is None
    assert trace.headers() == []
    with trace.bound(CALLER):
        assert trace.headers() == [("traceparent", CALLER.encode())]
        with trace.bound(None):
            assert trace.current() is None
            assert "trace_id" not in structlog.contextvars.merge_contextvars(None, "", {})
        assert structlog.contextvars.merge_contextvars(None, "", {})["trace_id"] == CALLER[3:35]
    assert trace.current() is None
