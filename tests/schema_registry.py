"""A Schema Registry served by the test: the subset of Confluent's REST API that Tayori's
client (``libs/common/registry.py``) uses, with Confluent's status codes and error codes.

- ``GET /schemas/ids/{id}``, ``GET /subjects``
- ``POST /subjects/{subject}/versions`` (an identical schema is kept once: its id again)
- ``POST /subjects/{subject}`` (is this schema registered under the subject?)
- ``GET|PUT /config/{subject}``

It listens on a loopback port that stays the same across :meth:`stop` and :meth:`start`, so
a test can take it away (connections refused) and bring it back.
"""

from __future__ import annotations

import copy
import io
import json
import struct
from pathlib import Path
from typing import Any

import aiohttp
import fastavro
from aiohttp import web

from tayori.embedded import free_port

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
SCHEMAS = Path(__file__).resolve().parents[1] / "schemas" / "avro"


def schema_of(topic: str, version: int | None = None) -> dict[str, Any]:
    """``topic``'s schema file as JSON: the current one, or ``version`` from history/."""
    name = f"{topic}.avsc" if version is None else f"history/{topic}.v{version}.avsc"
    return json.loads((SCHEMAS / name).read_text(encoding="utf-8"))


def confluent(schema_id: int, schema: dict[str, Any], value: dict[str, Any]) -> bytes:
    """``value`` as Confluent's Avro serializers write it: byte 0, the schema id in 4 bytes
    big-endian, the Avro body."""
    body = io.BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(copy.deepcopy(schema)), value)
    return struct.pack(">bI", 0, schema_id) + body.getvalue()


class TestRegistry:
    """The registry's state, its HTTP app, and what it was asked (``requests``)."""

    __test__ = False  # not a test class, whatever its name

    def __init__(self, username: str = "", password: str = "") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.username = username
        self.password = password
        self.schemas: list[str] = []  # id n is schemas[n - 1]
        self.types: dict[int, str] = {}  # schemaType of an id that is not AVRO
        self.versions: dict[str, list[int]] = {}  # subject → ids, version n at n - 1
        self.config: dict[str, str] = {}
        self.requests: list[tuple[str, str]] = []
        self._runner: web.AppRunner | None = None

    # State, as a test sets it up -------------------------------------------------------

    def add(self, schema: Any, subject: str | None = None, schema_type: str = "AVRO") -> int:
        """Store ``schema`` (a dict or the text), under ``subject`` if given: its id."""
        text = schema if isinstance(schema, str) else json.dumps(schema)
        for n, known in enumerate(self.schemas, 1):
            if _same(known, text) and self.types.get(n, "AVRO") == schema_type:
                schema_id = n
                break
        else:
            self.schemas.append(text)
            schema_id = len(self.schemas)
            if schema_type != "AVRO":
                self.types[schema_id] = schema_type
        if subject is not None and schema_id not in self.versions.setdefault(subject, []):
            self.versions[subject].append(schema_id)
        return schema_id

    # Serving -----------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/schemas/ids/{id}", self._schema)
        app.router.add_get("/subjects", self._subjects)
        app.router.add_post("/subjects/{subject}/versions", self._register)
        app.router.add_post("/subjects/{subject}", self._lookup)
        app.router.add_get("/config/{subject}", self._get_config)
        app.router.add_put("/config/{subject}", self._put_config)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        if self.username:
            expected = aiohttp.encode_basic_auth(self.username, self.password)
            if request.headers.get("Authorization") != expected:
                return _error(401, 40101, "Unauthorized")
        return await handler(request)

    async def _schema(self, request: web.Request) -> web.Response:
        schema_id = int(request.match_info["id"])
        if not 1 <= schema_id <= len(self.schemas):
            return _error(404, 40403, "Schema not found")
        body: dict[str, Any] = {"schema": self.schemas[schema_id - 1]}
        if schema_id in self.types:
            body["schemaType"] = self.types[schema_id]
        return _answer(body)

    async def _subjects(self, request: web.Request) -> web.Response:
        return _answer(sorted(self.versions))

    async def _register(self, request: web.Request) -> web.Response:
        body = await request.json()
        try:
            json.loads(body["schema"])
        except (KeyError, ValueError):
            return _error(422, 42201, "Invalid schema")
        return _answer({"id": self.add(body["schema"], request.match_info["subject"])})

    async def _lookup(self, request: web.Request) -> web.Response:
        subject = request.match_info["subject"]
        if subject not in self.versions:
            return _error(404, 40401, f"Subject '{subject}' not found.")
        text = (await request.json())["schema"]
        for version, schema_id in enumerate(self.versions[subject], 1):
            if _same(self.schemas[schema_id - 1], text):
                return _answer(
                    {"subject": subject, "id": schema_id, "version": version, "schema": text}
                )
        return _error(404, 40403, "Schema not found")

    async def _get_config(self, request: web.Request) -> web.Response:
        subject = request.match_info["subject"]
        if subject not in self.config:
            return _error(404, 40408, f"Subject '{subject}' has no compatibility level")
        return _answer({"compatibilityLevel": self.config[subject]})

    async def _put_config(self, request: web.Request) -> web.Response:
        level = (await request.json())["compatibility"]
        self.config[request.match_info["subject"]] = level
        return _answer({"compatibility": level})


def _same(a: str, b: str) -> bool:
    try:
        return bool(json.loads(a) == json.loads(b))
    except ValueError:  # a schema that is not JSON (Protobuf)
        return a == b


def _answer(body: Any) -> web.Response:
    return web.Response(text=json.dumps(body), content_type=CONTENT_TYPE)


def _error(status: int, code: int, message: str) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps({"error_code": code, "message": message}),
        content_type=CONTENT_TYPE,
    )
