"""``/openapi.json``: OpenAPI 3.1 built from the route table and each route's contract.

The models of every contract become ``components/schemas``; each operation lists its path
and query parameters, its body, its success answer and every error it can give (the
problem shape), its role (``x-tayori-role``) and the bearer scheme. The view's docstring
is the summary (first line) and the description (the rest).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from libs.common.http.contract import Contract, declared
from libs.common.http.problems import MEANINGS, MEDIA_TYPE, Problem

REF = "#/components/schemas/{model}"


def document(app: web.Application, title: str, description: str = "") -> dict[str, Any]:
    operations: list[tuple[str, str, Any, Contract]] = []
    models: set[type[BaseModel]] = {Problem}
    for route in app.router.routes():
        if route.method == "HEAD" or route.resource is None:
            continue
        if getattr(route.handler, "tayori_hidden", False):
            continue
        spec = declared(route.handler) or Contract()
        operations.append((route.resource.canonical, route.method, route.handler, spec))
        for model in (spec.body, spec.response, *spec.also.values()):
            if model is not None:
                models.add(model)
    ordered = sorted(models, key=lambda m: m.__name__)
    refs, top = models_json_schema([(m, "validation") for m in ordered], ref_template=REF)
    schemas = top.get("$defs", {})
    paths: dict[str, dict[str, Any]] = {}
    for path, method, handler, spec in operations:
        paths.setdefault(path, {})[method.lower()] = _operation(
            path, method, handler, spec, refs, schemas
        )
    info: dict[str, Any] = {"title": title, "version": "1"}
    if description:
        info["description"] = description
    return {
        "openapi": "3.1.0",
        "info": info,
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": _problems(),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a token of TAYORI_API_TOKENS: role admin, operator or viewer",
                }
            },
        },
    }


def _ref(refs: dict[Any, Any], model: type[BaseModel]) -> dict[str, Any]:
    return refs[(model, "validation")]


def _parameters(
    model: type[BaseModel], where: str, schemas: dict[str, Any]
) -> list[dict[str, Any]]:
    schema = model.model_json_schema(ref_template=REF)
    schemas.update(schema.pop("$defs", {}))
    required = set(schema.get("required", ()))
    params = []
    for name, prop in schema.get("properties", {}).items():
        param: dict[str, Any] = {
            "name": name,
            "in": where,
            "required": where == "path" or name in required,
            "schema": {k: v for k, v in prop.items() if k not in ("title", "description")},
        }
        if prop.get("description"):
            param["description"] = prop["description"]
        if prop.get("type") == "array" or "array" in str(prop.get("anyOf", "")):
            param["style"], param["explode"] = "form", True
        params.append(param)
    return params


def _problem(status: int) -> dict[str, Any]:
    return {"$ref": f"#/components/responses/Problem{status}"}


def _problems() -> dict[str, Any]:
    return {
        f"Problem{status}": {
            "description": meaning,
            "content": {MEDIA_TYPE: {"schema": {"$ref": REF.format(model="Problem")}}},
        }
        for status, meaning in MEANINGS.items()
    }


def _operation(
    path: str,
    method: str,
    handler: Any,
    spec: Contract,
    refs: dict[Any, Any],
    schemas: dict[str, Any],
) -> dict[str, Any]:
    doc = (handler.__doc__ or "").strip()
    summary, _, description = doc.partition("\n")
    operation: dict[str, Any] = {
        "operationId": handler.__name__,
        "summary": summary.strip() or handler.__name__,
    }
    if description.strip():
        operation["description"] = " ".join(description.split())
    if spec.tags:
        operation["tags"] = list(spec.tags)
    params: list[dict[str, Any]] = []
    if spec.path is not None:
        params += _parameters(spec.path, "path", schemas)
    else:
        params += [
            {"name": part[1:-1], "in": "path", "required": True, "schema": {"type": "string"}}
            for part in path.split("/")
            if part.startswith("{")
        ]
    if spec.query is not None:
        params += _parameters(spec.query, "query", schemas)
    if params:
        operation["parameters"] = params
    content: dict[str, Any] = {}
    if spec.body is not None:
        content["application/json"] = {"schema": _ref(refs, spec.body)}
    content.update({media: {"schema": schema} for media, schema in spec.raw_body.items()})
    if content:
        operation["requestBody"] = {"required": not spec.body_optional, "content": content}

    responses: dict[str, Any] = {}
    for status, model in {spec.status: spec.response, **spec.also}.items():
        answer: dict[str, Any] = {"description": _success(status)}
        if spec.media and status == spec.status:
            # a non-JSON success; with a model beside it, the same status may also be JSON
            answer["content"] = {m: {"schema": {"type": "string"}} for m in spec.media}
            answer["description"] = "; ".join(spec.media.values())
        if model is not None:
            answer.setdefault("content", {})["application/json"] = {"schema": _ref(refs, model)}
        elif "content" not in answer and status != 204 and not 300 <= status < 400:
            answer["content"] = {"application/json": {"schema": {"type": "object"}}}
        if spec.links and status == spec.status:
            answer["links"] = {
                target: {"operationId": target, "parameters": dict(parameters)}
                for target, parameters in spec.links.items()
            }
        responses[str(status)] = answer

    errors = set(spec.errors) | {503}
    role = getattr(handler, "tayori_role", "default")
    if role is not None:
        needed = role if role != "default" else ("viewer" if method == "GET" else "operator")
        operation["security"] = [{"bearer": []}]
        operation["x-tayori-role"] = needed
        errors |= {401, 403}
    if params or content:
        errors.add(400)
    if "{" in path:
        errors.add(404)
    if content:
        errors |= {408, 413}
    for status in sorted(errors | set(spec.pages)):
        if status in spec.pages:  # a page for people, or the problem shape
            problem = _problems()[f"Problem{status}"]
            responses[str(status)] = {
                "description": problem["description"],
                "content": {spec.pages[status]: {"schema": {"type": "string"}}}
                | problem["content"],
            }
        responses.setdefault(str(status), _problem(status))
    operation["responses"] = responses
    return operation


def _success(status: int) -> str:
    return {
        200: "OK",
        201: "created",
        202: "accepted: the work goes on in the background",
        204: "done; no body",
        302: "a redirect to the target",
        303: "a redirect to the answer page",
    }.get(status, "OK")
