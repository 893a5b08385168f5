"""The console's client of the services against a real local HTTP server: the answers a
screen cannot use become ServiceUnavailable naming the service (never an exception a page
would show as a 500), and every call names the user for the services to record."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from libs.common.http import REQUESTED_BY_HEADER, requested_by
from services.console.clients import Api, ApiProblem, ServiceUnavailable
from tayori.embedded import free_port

seen: list[str | None] = []


async def _html(request: web.Request) -> web.Response:
    seen.append(request.headers.get(REQUESTED_BY_HEADER))
    return web.Response(text="<html>a proxy's page</html>", content_type="text/html")


async def _json(request: web.Request) -> web.Response:
    seen.append(request.headers.get(REQUESTED_BY_HEADER))
    return web.json_response({"ok": True})


async def _problem(_: web.Request) -> web.Response:
    return web.json_response({"detail": "no", "field": "state"}, status=400)


async def _failing(_: web.Request) -> web.Response:
    return web.Response(text="upstream failed", status=502)


@pytest.fixture
async def server() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/html", _html)
    app.router.add_get("/json", _json)
    app.router.add_get("/problem", _problem)
    app.router.add_get("/failing", _failing)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.fixture
async def api(server: str) -> AsyncIterator[Api]:
    client = Api(
        {"contacts": server, "exporter": f"http://127.0.0.1:{free_port()}"},
        {"operator": "t0ken"},
        5.0,
    )
    await client.start()
    yield client
    await client.close()


async def test_a_json_answer_is_returned_and_the_user_is_named(api: Api) -> None:
    seen.clear()
    user = api.for_role("operator", "田中 <tanaka@example.jp>")
    assert await user.get("contacts", "/json") == {"ok": True}
    assert seen and seen[-1] is not None
    assert requested_by(seen[-1]) == "田中 <tanaka@example.jp>"  # what the services read


async def test_an_answer_that_is_not_json_is_the_service_being_away(api: Api) -> None:
    with pytest.raises(ServiceUnavailable) as caught:
        await api.for_role("operator").get("contacts", "/html")
    assert caught.value.service == "contacts" and "not JSON" in caught.value.reason
    assert "contacts サービスに接続できません" in str(caught.value)
    assert "the contacts service cannot be reached" in str(caught.value)


async def test_a_stopped_service_and_a_5xx_are_the_service_being_away(api: Api) -> None:
    with pytest.raises(ServiceUnavailable) as caught:
        await api.for_role("operator").get("exporter", "/v1/jobs")
    assert caught.value.reason == "ClientConnectorError"
    with pytest.raises(ServiceUnavailable) as caught:
        await api.for_role("operator").get("contacts", "/failing")
    assert caught.value.reason == "HTTP 502"


async def test_a_4xx_is_a_problem_naming_its_field(api: Api) -> None:
    with pytest.raises(ApiProblem) as caught:
        await api.for_role("operator").get("contacts", "/problem")
    assert caught.value.by_field() == {"state": ["no"]}
