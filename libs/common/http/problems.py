"""One error shape for every 4xx/5xx: RFC 9457 ``application/problem+json``.

Every answer that is not a success carries ``type``, ``title``, ``status``, ``detail`` and
``instance`` (the request path), and, where an input is at fault, ``errors``: one item per
failing value with ``location`` (body, query, path, header), its JSON Pointer into that
location, the ``detail`` a person can act on and, where the field has one, its Japanese
``label``. ``error`` (= detail) and ``field`` (the first failing field, dotted) are kept
beside them for the clients written against the first API.
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MEDIA_TYPE = "application/problem+json"


@dataclass(frozen=True, slots=True)
class Issue:
    """One failing value of a request."""

    location: str
    path: tuple[str | int, ...]
    detail: str
    label: str | None = None

    @property
    def pointer(self) -> str:
        parts = (str(p).replace("~", "~0").replace("/", "~1") for p in self.path)
        return "/" + "/".join(parts) if self.path else ""

    @property
    def field(self) -> str:
        return ".".join(str(p) for p in self.path)

    def json(self) -> dict[str, Any]:
        item: dict[str, Any] = {
            "location": self.location,
            "pointer": self.pointer,
            "field": self.field,
            "detail": self.detail,
        }
        if self.label:
            item["label"] = self.label
        return item


def title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def problem_body(
    status: int,
    detail: str,
    *,
    instance: str | None = None,
    field: str | None = None,
    issues: list[Issue] | tuple[Issue, ...] = (),
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": title(status),
        "status": status,
        "detail": detail,
        "error": detail,
    }
    if instance:
        body["instance"] = instance
    if issues:
        body["errors"] = [issue.json() for issue in issues]
        field = field or issues[0].field or None
    if field:
        body["field"] = field
    return body


# The shape as a schema, for /openapi.json ---------------------------------------------------


class ProblemIssue(BaseModel):
    """One failing value of a request."""

    model_config = ConfigDict(title="ProblemIssue")
    location: str = Field(description="body, query, path or header", examples=["body"])
    pointer: str = Field(description="JSON Pointer into that location", examples=["/name"])
    field: str = Field(description="the same path, dotted", examples=["name"])
    detail: str = Field(description="what is wrong and what to send instead")
    label: str | None = Field(None, description="the field's Japanese label, when it has one")


class Problem(BaseModel):
    """RFC 9457 problem details, with ``errors`` for the failing values."""

    model_config = ConfigDict(title="Problem", extra="allow")
    type: str = Field("about:blank", examples=["about:blank"])
    title: str = Field(examples=["Bad Request"])
    status: int = Field(ge=400, le=599, examples=[400])
    detail: str = Field(examples=["name: String should have at most 200 characters"])
    instance: str | None = Field(None, examples=["/v1/groups"])
    error: str = Field(description="the same as detail (kept for first-version clients)")
    field: str | None = Field(None, description="the first failing field, dotted")
    errors: list[ProblemIssue] | None = None


#: what each error status means, for the operation descriptions.
MEANINGS: dict[int, str] = {
    400: "the request is malformed or a value is invalid; `errors` names each one",
    401: "no bearer token, or an unknown one",
    403: "the token's role may not do this",
    404: "nothing exists at this address",
    405: "this path does not answer that method",
    408: "the request body did not arrive in time",
    409: "the request conflicts with the current state",
    410: "the resource existed and is gone",
    413: "the request body is larger than this operation accepts",
    415: "the body is not in a media type this operation reads",
    422: "the request is well-formed but cannot be carried out as asked",
    503: "a dependency is unavailable; retry after `Retry-After` seconds",
}
