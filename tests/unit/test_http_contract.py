"""libs/common/http: contracts, the problem shape, transport limits and the generated
OpenAPI, through a real aiohttp server on loopback."""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pydantic import Field

from libs.common.errors import Conflict
from libs.common.http import create_app, json_response
from libs.common.http.contract import (
    Answer,
    Id,
    JsonObject,
    Model,
    Name,
    Timestamp,
    TimeZoneName,
    contract,
)

TOKEN = "t0ken"


class ThingPath(Model):
    id: Id


class ThingQuery(Model):
    tag: list[str] = Field(default_factory=list, max_length=3)
    limit: int = Field(10, ge=1, le=100)


class NewThing(Model):
    name: Name = Field(title="名前")
    count: Id | list[Id] | None = None
    zone: TimeZoneName | None = None
    at: Timestamp | None = None
    extra: JsonObject | None = None


class Thing(Answer):
    id: int
    name: str


async def _ok() -> tuple[bool, dict[str, Any]]:
    return True, {}


def _app(*, body_seconds: float = 30.0) -> web.Application:
    app = create_app("test", {TOKEN: "admin"}, health=_ok, ready=_ok, title="Test")

    @contract(body=NewThing, response=Thing, status=201, errors=(409,), seconds=body_seconds)
    async def create_thing(request: web.Request, body: NewThing) -> web.Response:
        """Create a thing."""
        if body.name == "taken":
            raise Conflict("a thing named taken exists")
        return json_response({"id": 1, "name": body.name}, status=201)

    @contract(path=ThingPath, query=ThingQuery, response=Thing)
    async def get_thing(request: web.Request, path: ThingPath, query: ThingQuery) -> web.Response:
        """One thing."""
        return json_response({"id": path.id, "name": ",".join(query.tag), "limit": query.limit})

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("a bug")

    @contract(path=ThingPath, media={"text/html": "a page"}, pages={404: "text/html"})
    async def thing_page(request: web.Request, path: ThingPath) -> web.Response:
        """A page for people."""
        return web.Response(text="<p>gone</p>", status=404, content_type="text/html")

    app.router.add_post("/things", create_thing)
    app.router.add_get("/pages/{id}", thing_page)
    app.router.add_get("/broken", broken)
    app.router.add_get("/things/{id}", get_thing)
    return app


@pytest.fixture
async def server() -> AsyncIterator[TestServer]:
    running = TestServer(_app())
    async with running:
        yield running


async def _call(server: TestServer, method: str, path: str, **kwargs: Any) -> tuple[int, str, Any]:
    headers = {"Authorization": f"Bearer {TOKEN}", **kwargs.pop("headers", {})}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, server.make_url(path), headers=headers, **kwargs) as response,
    ):
        text = await response.text()
        try:
            body = json.loads(text)
        except ValueError:
            body = text
        return response.status, response.content_type, body


async def test_valid_input_reaches_the_view_typed(server: TestServer) -> None:
    status, media, body = await _call(server, "GET", "/things/7?tag=a&tag=b&limit=5")
    assert (status, media) == (200, "application/json")
    assert body == {"id": 7, "name": "a,b", "limit": 5}


@pytest.mark.parametrize(
    ("path", "pointer"),
    [
        ("/things/99999999999999999999", "/id"),
        ("/things/0", "/id"),
        ("/things/x", "/id"),
        ("/things/+5", "/id"),
        ("/things/5_0", "/id"),
        ("/things/%205", "/id"),
        ("/things/1?limit=0", "/limit"),
        ("/things/1?unknown=1", "/unknown"),
        ("/things/1?tag=a&tag=b&tag=c&tag=d", "/tag"),
    ],
)
async def test_a_bad_path_or_query_is_a_problem_naming_it(
    server: TestServer, path: str, pointer: str
) -> None:
    status, media, body = await _call(server, "GET", path)
    assert (status, media) == (400, "application/problem+json")
    assert body["status"] == 400 and body["title"] == "Bad Request"
    assert body["instance"] == urllib.parse.unquote(path.split("?")[0])
    assert body["errors"][0]["pointer"] == pointer
    assert body["error"] == body["detail"] and body["field"] == pointer[1:]


@pytest.mark.parametrize(
    ("payload", "pointer", "fragment"),
    [
        ({"name": "a\u0000b"}, "/name", "U+0000"),
        ({"name": "x" * 20_000}, "/name", "at most 200"),
        ({"name": ""}, "/name", "at least 1"),
        ({"name": 5}, "/name", "valid string"),
        ({}, "/name", "required"),
        ({"name": "a", "zone": "Asia"}, "/zone", "IANA"),
        ({"name": "a", "at": "0001-01-01T00:00:00+14:00"}, "/at", "1900"),
        ({"name": "a", "at": "2026-01-01T00:00:00"}, "/at", "timezone"),
        ({"name": "a", "colour": "red"}, "/colour", "not a known key"),
        ({"name": "a", "extra": {"k": "a\u0000"}}, "/extra", "U+0000"),
        ({"name": "a", "count": 0}, "/count", "greater than or equal to 1"),
    ],
)
async def test_a_bad_body_is_a_problem_naming_the_value(
    server: TestServer, payload: Any, pointer: str, fragment: str
) -> None:
    status, _, body = await _call(server, "POST", "/things", json=payload)
    assert status == 400, body
    issue = body["errors"][0]
    assert issue["location"] == "body" and issue["pointer"] == pointer
    assert fragment in issue["detail"], issue
    if pointer == "/name":
        assert issue["label"] == "名前"


async def test_deeply_nested_json_is_a_400_not_a_crash(server: TestServer) -> None:
    deep = "[" * 5000 + "]" * 5000
    status, _, body = await _call(
        server, "POST", "/things", data=deep, headers={"Content-Type": "application/json"}
    )
    assert status == 400
    nested: Any = {}
    for _ in range(40):
        nested = {"k": nested}
    status, _, body = await _call(server, "POST", "/things", json={"name": "a", "extra": nested})
    assert status == 400 and "nested deeper than 32" in body["errors"][0]["detail"]


async def test_domain_errors_and_aiohttps_own_are_problems(server: TestServer) -> None:
    status, media, body = await _call(server, "POST", "/things", json={"name": "taken"})
    assert (status, media, body["title"]) == (409, "application/problem+json", "Conflict")
    status, media, body = await _call(server, "GET", "/nowhere")
    assert (status, media) == (404, "application/problem+json")
    assert "/nowhere" in body["detail"]
    status, media, body = await _call(server, "DELETE", "/things/1")
    assert (status, media) == (405, "application/problem+json")
    status, _, body = await _call(server, "POST", "/things", headers={"Authorization": ""})
    assert status == 401 and body["status"] == 401


async def test_a_bug_is_logged_and_answered_as_a_problem_without_its_traceback(
    server: TestServer,
) -> None:
    status, media, body = await _call(server, "GET", "/broken")
    assert (status, media) == (500, "application/problem+json")
    assert "http_handler_failed" in body["detail"] and "a bug" not in json.dumps(body)


async def test_a_chunked_body_is_cut_at_the_limit() -> None:
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        chunk = b" " * 65536
        while sent < 64 << 20:
            sent += len(chunk)
            yield chunk

    server = TestServer(_app())
    async with server:
        status, _, body = await _call(
            server,
            "POST",
            "/things",
            data=endless(),
            headers={"Content-Type": "application/json"},
        )
    assert status == 413 and body["status"] == 413
    # What the client got rid of, not what the server read: the kernel's socket buffers
    # (up to net.ipv4.tcp_rmem's 32 MiB here, autotuned, more under load) take part of it.
    # A server reading the whole body would have taken all 64 MiB.
    assert sent < 48 << 20, f"the client sent {sent} bytes before the refusal"


async def test_a_trickled_body_times_out() -> None:
    async with TestServer(_app(body_seconds=0.5)) as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(
            b"POST /things HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t0ken\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(4096), 10)
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    assert b"application/problem+json" in answer


async def test_openapi_declares_inputs_answers_and_errors(server: TestServer) -> None:
    status, _, doc = await _call(server, "GET", "/openapi.json")
    assert status == 200 and doc["openapi"] == "3.1.0"
    create = doc["paths"]["/things"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/NewThing"
    }
    assert set(create["responses"]) == {"201", "400", "401", "403", "408", "409", "413", "503"}
    get = doc["paths"]["/things/{id}"]["get"]
    params = {p["name"]: p for p in get["parameters"]}
    assert params["id"]["in"] == "path" and params["id"]["schema"]["maximum"] == (1 << 63) - 1
    assert params["tag"]["schema"]["type"] == "array"
    name = doc["components"]["schemas"]["NewThing"]["properties"]["name"]
    assert name["maxLength"] == 200 and name["title"] == "名前"
    assert "Problem" in doc["components"]["schemas"]
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    page = doc["paths"]["/pages/{id}"]["get"]["responses"]
    assert set(page["200"]["content"]) == {"text/html"}
    assert set(page["404"]["content"]) == {"text/html", "application/problem+json"}
    name = doc["components"]["schemas"]["NewThing"]["properties"]["name"]
    assert name["pattern"] == "^[^\\x00-\\x1f\\x7f]*$"
    status, media, page = await _call(server, "GET", "/docs")
    assert (status, media) == (200, "text/html") and "/docs/redoc.standalone.js" in page
    status, media, script = await _call(server, "GET", "/docs/redoc.standalone.js")
    assert (status, media) == (200, "application/javascript") and len(script) > 500_000
