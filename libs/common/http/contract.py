"""A route's contract as code: its inputs and answers are pydantic models.

``@contract`` reads and validates the path, the query and the JSON body before the view
runs, and hands them to the view as the keyword arguments ``path``, ``query`` and ``body``;
anything that does not fit becomes one 400 problem naming every failing value (a route
without a query model ignores the query string, as a probe should). The same
declaration is what ``/openapi.json`` shows (:mod:`libs.common.http.openapi`), so the
reference cannot drift from what the service accepts::

    class NewGroup(Model):
        name: Name = Field(title="グループ名")

    @routes.post("/v1/groups")
    @contract(body=NewGroup, response=Group, status=201, errors=(409,))
    async def create_group(request: web.Request, body: NewGroup) -> web.Response:
        ...

Transport limits live here too: the body is counted as it arrives (a chunked body as
well: 413 as soon as it passes the route's limit) and must arrive within the route's time
(408), so a client trickling a byte at a time cannot hold a handler for ever.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import re
import zoneinfo
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, get_args, get_origin

from aiohttp import web
from multidict import MultiMapping
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)
from pydantic_core import PydanticCustomError

from libs.common.checks import CONTROL
from libs.common.errors import InvalidMessage
from libs.common.http.problems import Issue

#: JSON bodies: the largest accepted, and the time the whole body may take to arrive.
JSON_BODY_BYTES = 1 << 20
BODY_SECONDS = 30.0
#: nesting of free-form JSON values (filters, mappings, custom fields).
JSON_DEPTH = 32
INT64_MAX = (1 << 63) - 1
#: how many failing values one problem lists.
MAX_ISSUES = 20


class Model(BaseModel):
    """A request or response shape. Unknown keys are refused: a misspelt option is an
    error, never silently ignored."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Answer(BaseModel):
    """A response shape: it names what a client may rely on; the service may add fields."""

    model_config = ConfigDict(extra="allow")


# Value types ----------------------------------------------------------------------------


def _plain(value: str) -> str:
    found = CONTROL.search(value)
    if found is not None:
        raise ValueError(f"must not contain the control character U+{ord(found.group()):04X}")
    return value


#: a control character multi-line text may not carry: C0 but tab, LF and CR; and DEL.
_UNSTORABLE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _storable(value: str) -> str:
    """Text that may span lines (tabs and line breaks allowed) but carries no NUL or other
    control character PostgreSQL or a mail header cannot hold."""
    found = _UNSTORABLE.search(value)
    if found is not None:
        raise ValueError(f"must not contain the control character U+{ord(found.group()):04X}")
    return value


def _zone(value: str) -> str:
    if value not in _zones():
        raise ValueError("must be an IANA time-zone name such as Asia/Tokyo")
    return value


@functools.cache
def _zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


_EARLIEST = dt.datetime(1900, 1, 1, tzinfo=dt.UTC)
_LATEST = dt.datetime(9999, 12, 30, tzinfo=dt.UTC)


def _in_range(value: dt.datetime) -> dt.datetime:
    try:
        utc = value.astimezone(dt.UTC)
    except OverflowError:
        raise ValueError("must be between 1900-01-01 and 9999-12-30") from None
    if not _EARLIEST <= utc <= _LATEST:
        raise ValueError("must be between 1900-01-01 and 9999-12-30")
    return value


def _depth(limit: int) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        stack = [(value, 1)]
        while stack:
            item, depth = stack.pop()
            if depth > limit:
                raise ValueError(f"is nested deeper than {limit} levels")
            if isinstance(item, dict):
                stack.extend((v, depth + 1) for v in item.values())
            elif isinstance(item, list):
                stack.extend((v, depth + 1) for v in item)
            elif isinstance(item, str):
                _storable(item)
        return value

    return check


#: the schema's words for "no control character" (the validators say it to a person).
PLAIN = Field(json_schema_extra={"pattern": f"^[^{CONTROL.pattern[1:-1]}]*$"})
STORABLE = Field(json_schema_extra={"pattern": f"^[^{_UNSTORABLE.pattern[1:-1]}]*$"})


def _digits(value: Any) -> Any:
    """A path or query value is text: only plain decimal digits make an integer (pydantic
    alone would take "+5", " 5" or "5_0")."""
    if isinstance(value, str) and not _INTEGER.fullmatch(value):
        raise PydanticCustomError(  # the error pydantic gives for "x": one wording for both
            "int_parsing", "Input should be a valid integer, unable to parse string as an integer"
        )
    return value


_INTEGER = re.compile(r"-?[0-9]+")
#: a database id: a positive 64-bit integer.
Id = Annotated[int, Field(ge=1, le=INT64_MAX), BeforeValidator(_digits)]


#: for a narrower integer of a path or query: ``Annotated[int, Field(ge=1, le=200), DIGITS]``
#: takes plain decimal digits only, as :data:`Id` does.
DIGITS = BeforeValidator(_digits)
#: a count or offset that PostgreSQL's bigint holds.
Int64 = Annotated[int, Field(ge=-INT64_MAX - 1, le=INT64_MAX), BeforeValidator(_digits)]
#: a name shown in lists (groups, plans, filters, categories, campaigns): one line.
Name = Annotated[
    str, StringConstraints(min_length=1, max_length=200), AfterValidator(_plain), PLAIN
]
#: a short identifier-like value (a key, a tag, a token): one line.
Token = Annotated[
    str, StringConstraints(min_length=1, max_length=255), AfterValidator(_plain), PLAIN
]
#: free text of a few paragraphs (a description, a note).
Text = Annotated[str, StringConstraints(max_length=2000), AfterValidator(_storable), STORABLE]
#: a mail body or template: long, multi-line.
Content = Annotated[
    str, StringConstraints(max_length=1_000_000), AfterValidator(_storable), STORABLE
]
#: an IANA time-zone name.
TimeZoneName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=64),
    AfterValidator(_zone),
    Field(examples=["Asia/Tokyo"], description="an IANA time-zone name"),
]
#: an instant with its offset, within the years PostgreSQL and Python both hold.
Timestamp = Annotated[AwareDatetime, AfterValidator(_in_range)]
#: a JSON object of free shape, bounded in depth, carrying no NUL.
JsonObject = Annotated[dict[str, Any], AfterValidator(_depth(JSON_DEPTH))]


# Reading a request ----------------------------------------------------------------------


async def read_body(
    request: web.Request, *, max_bytes: int = JSON_BODY_BYTES, seconds: float = BODY_SECONDS
) -> bytes:
    """The whole body, counted as it arrives: 413 as soon as it passes ``max_bytes`` (a
    declared length is refused before reading), 408 when it takes longer than ``seconds``."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise web.HTTPRequestEntityTooLarge(max_size=max_bytes, actual_size=request.content_length)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(seconds):
            while chunk := await request.content.readany():
                size += len(chunk)
                if size > max_bytes:
                    raise web.HTTPRequestEntityTooLarge(max_size=max_bytes, actual_size=size)
                chunks.append(chunk)
    except TimeoutError:
        raise web.HTTPRequestTimeout(
            text=f"the request body did not arrive within {seconds:g} seconds"
        ) from None
    return b"".join(chunks)


def issues_of(error: ValidationError, location: str, model: type[BaseModel]) -> list[Issue]:
    found = []
    for item in error.errors(include_url=False)[:MAX_ISSUES]:
        path = tuple(part for part in item["loc"] if not _member_name(part))
        kind = item["type"]
        if kind == "json_invalid":
            detail = f"is not valid JSON: {item['ctx'].get('error', item['msg'])}"
            path = ()
        elif kind == "extra_forbidden":
            detail = "is not a known key of this request"
        elif kind == "missing":
            detail = "is required"
        else:
            detail = item["msg"].removeprefix("Value error, ")
            if detail and detail[0].isupper() and not detail.startswith("Input"):
                detail = detail[0].lower() + detail[1:]
        found.append(Issue(location, path, detail, _label(model, path)))
    return found


#: the names pydantic gives the members of a union in an error's location.
_TYPE_NAMES = frozenset({"int", "str", "float", "bool", "list", "dict", "none", "set", "tuple"})


def _member_name(part: str | int) -> bool:
    """Whether a location part names a union member (``constrained-int``, ``str``,
    ``function-after[...]``) rather than a key or an index: a pointer names only those."""
    return isinstance(part, str) and ("[" in part or "-" in part or part in _TYPE_NAMES)


def _label(model: type[BaseModel], path: tuple[Any, ...]) -> str | None:
    if not path or not isinstance(path[0], str):
        return None
    info = model.model_fields.get(path[0])
    return info.title if info is not None and len(path) == 1 else None


class InvalidRequest(InvalidMessage):
    """Input that does not fit the route's contract, with every failing value."""

    def __init__(self, issues: list[Issue]) -> None:
        first = issues[0]
        where = f"{first.field}: " if first.field else ""
        more = f" (and {len(issues) - 1} more)" if len(issues) > 1 else ""
        subject = {"body": "request body", "query": "query", "path": "path"}.get(
            first.location, first.location
        )
        super().__init__(
            f"{where}{first.detail}{more}" if first.field else f"{subject} {first.detail}",
            field=first.field or None,
        )
        self.issues = issues


def parse_json(model: type[BaseModel], raw: bytes) -> BaseModel:
    if not raw.strip():
        raise InvalidRequest([Issue("body", (), "is empty; expected a JSON object")])
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise InvalidRequest(issues_of(exc, "body", model)) from None


def parse_params(model: type[BaseModel], values: Mapping[str, Any], location: str) -> BaseModel:
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise InvalidRequest(issues_of(exc, location, model)) from None


def query_values(model: type[BaseModel], query: MultiMapping[str]) -> dict[str, Any]:
    """The query as the model's input: a list field takes every value of its name."""
    values: dict[str, Any] = {}
    for name in query:
        if name in values:
            continue
        info = model.model_fields.get(name)
        many = info is not None and _is_list(info.annotation)
        values[name] = query.getall(name) if many else query[name]
    return values


def _is_list(annotation: Any) -> bool:
    if get_origin(annotation) in (list, tuple, set, frozenset):
        return True
    return any(_is_list(arg) for arg in get_args(annotation) if arg is not type(None))


# The decorator --------------------------------------------------------------------------

View = Callable[..., Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Contract:
    """What a route takes and answers; :mod:`libs.common.http.openapi` reads it."""

    path: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    #: an empty body is taken as ``{}`` (every field of ``body`` has a default).
    body_optional: bool = False
    #: the success answer: its status and model (None: no body, e.g. 204).
    status: int = 200
    response: type[BaseModel] | None = None
    #: a success that is not JSON: media type → description (CSV, HTML, a redirect).
    media: Mapping[str, str] = field(default_factory=dict)
    #: other successes (e.g. 200 beside 202), status → model or None.
    also: Mapping[int, type[BaseModel] | None] = field(default_factory=dict)
    #: error statuses the view itself answers (validation, auth, 503 are added).
    errors: tuple[int, ...] = ()
    #: error statuses answered in another media than the problem shape (a page for people):
    #: status → media type.
    pages: Mapping[int, str] = field(default_factory=dict)
    #: a body the view reads itself (multipart, CSV): media type → JSON schema.
    raw_body: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    max_bytes: int = JSON_BODY_BYTES
    seconds: float = BODY_SECONDS
    tags: tuple[str, ...] = ()
    #: OpenAPI links from the success answer: operationId → {parameter: expression}, e.g.
    #: ``{"get_group": {"id": "$response.body#/id"}}`` (create → read → update → delete).
    links: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


CONTRACT = "tayori_contract"


def contract(
    *,
    path: type[BaseModel] | None = None,
    query: type[BaseModel] | None = None,
    body: type[BaseModel] | None = None,
    body_optional: bool = False,
    response: type[BaseModel] | None = None,
    status: int = 200,
    media: Mapping[str, str] | None = None,
    also: Mapping[int, type[BaseModel] | None] | None = None,
    errors: tuple[int, ...] = (),
    pages: Mapping[int, str] | None = None,
    raw_body: Mapping[str, dict[str, Any]] | None = None,
    max_bytes: int = JSON_BODY_BYTES,
    seconds: float = BODY_SECONDS,
    tags: tuple[str, ...] = (),
    links: Mapping[str, Mapping[str, str]] | None = None,
) -> Callable[[View], Callable[[web.Request], Awaitable[web.StreamResponse]]]:
    """Validate a view's inputs against models and describe it in ``/openapi.json``."""
    declared = Contract(
        path=path,
        query=query,
        body=body,
        body_optional=body_optional,
        status=status,
        response=response,
        media=media or {},
        also=also or {},
        errors=errors,
        pages=pages or {},
        raw_body=raw_body or {},
        max_bytes=max_bytes,
        seconds=seconds,
        tags=tags,
        links=links or {},
    )

    def wrap(view: View) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        @functools.wraps(view)
        async def run(request: web.Request) -> web.StreamResponse:
            inputs: dict[str, BaseModel] = {}
            if path is not None:
                inputs["path"] = parse_params(path, request.match_info, "path")
            if query is not None:
                inputs["query"] = parse_params(query, query_values(query, request.query), "query")
            if body is not None:
                raw = await read_body(request, max_bytes=max_bytes, seconds=seconds)
                if body_optional and not raw.strip():
                    raw = b"{}"
                inputs["body"] = parse_json(body, raw)
            return await view(request, **inputs)

        setattr(run, CONTRACT, declared)
        return run

    return wrap


def declared(handler: Any) -> Contract | None:
    return getattr(handler, CONTRACT, None)
