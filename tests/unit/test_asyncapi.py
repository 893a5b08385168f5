"""docs/asyncapi.json: what ``tayori schemas asyncapi`` makes now (a stale file fails), an
AsyncAPI 3.0 document in structure (the fields the specification requires, every ``$ref``
resolving, operations naming their channel's messages, Avro payloads that are the topics'
schemas), and true to the services: every consumer group and every declared producer, and
each service's ``PRODUCES`` matching the topics its code names.

No well-kept AsyncAPI JSON schema ships on PyPI, so the required fields are checked here by
a schema of our own (the specification's, for the parts the document uses)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import fastavro
import jsonschema
import pytest

from libs.common import avro
from libs.common.settings import load
from libs.common.topics import DOWNSTREAM, Topic
from tayori import asyncapi
from tayori.services import SERVICES, service_parts

ROOT = Path(__file__).resolve().parents[2]
CHECKED_IN = ROOT / "docs" / "asyncapi.json"
ID = "^[A-Za-z0-9_.-]+$"

REF = {"type": "object", "required": ["$ref"], "properties": {"$ref": {"type": "string"}}}
KAFKA_BINDING: dict[str, Any] = {
    "type": "object",
    "required": ["bindingVersion"],
    "properties": {"bindingVersion": {"const": "0.5.0"}},
}
#: the AsyncAPI 3.0.0 rules for the objects this document uses (spec §3: Info, Server,
#: Channel, Operation, Message, Multi Format Schema, Parameter; Kafka bindings 0.5.0).
STRUCTURE = {
    "type": "object",
    "required": ["asyncapi", "info"],
    "additionalProperties": False,
    "properties": {
        "asyncapi": {"const": "3.0.0"},
        "id": {"type": "string", "format": "uri"},
        "defaultContentType": {"type": "string"},
        "info": {
            "type": "object",
            "required": ["title", "version"],
            "properties": {
                "title": {"type": "string", "minLength": 1},
                "version": {"type": "string", "minLength": 1},
                "description": {"type": "string"},
            },
        },
        "servers": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["host", "protocol"],
                "properties": {"host": {"type": "string"}, "protocol": {"const": "kafka"}},
            },
        },
        "channels": {
            "type": "object",
            "propertyNames": {"pattern": ID},
            "additionalProperties": {
                "type": "object",
                "required": ["address", "messages"],
                "additionalProperties": False,
                "properties": {
                    "address": {"type": "string"},
                    "title": {"type": "string"},
                    "description": {"type": "string"},
                    "messages": {"type": "object", "additionalProperties": REF},
                    "parameters": {"type": "object", "additionalProperties": REF},
                    "bindings": {
                        "type": "object",
                        "properties": {"kafka": KAFKA_BINDING},
                        "additionalProperties": False,
                    },
                },
            },
        },
        "operations": {
            "type": "object",
            "propertyNames": {"pattern": ID},
            "additionalProperties": {
                "type": "object",
                "required": ["action", "channel"],
                "additionalProperties": False,
                "properties": {
                    "action": {"enum": ["send", "receive"]},
                    "channel": REF,
                    "title": {"type": "string"},
                    "messages": {"type": "array", "items": REF, "minItems": 1},
                    "tags": {
                        "type": "array",
                        "items": {"type": "object", "required": ["name"]},
                    },
                    "bindings": {"type": "object", "properties": {"kafka": KAFKA_BINDING}},
                },
            },
        },
        "components": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "messages": {
                    "type": "object",
                    "propertyNames": {"pattern": ID},
                    "additionalProperties": {
                        "type": "object",
                        "required": ["name", "payload"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string"},
                            "title": {"type": "string"},
                            "summary": {"type": "string"},
                            "description": {"type": "string"},
                            "contentType": {"type": "string"},
                            "headers": {"type": "object"},
                            "payload": {"type": "object"},
                            "bindings": {
                                "type": "object",
                                "properties": {
                                    "kafka": {
                                        **KAFKA_BINDING,
                                        "properties": {
                                            **KAFKA_BINDING["properties"],
                                            "key": {"type": "object"},
                                            "schemaIdLocation": {"enum": ["header", "payload"]},
                                            "schemaIdPayloadEncoding": {"type": "string"},
                                            "schemaLookupStrategy": {"type": "string"},
                                        },
                                        "additionalProperties": False,
                                    }
                                },
                            },
                            "examples": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "anyOf": [
                                        {"required": ["payload"]},
                                        {"required": ["headers"]},
                                    ],
                                },
                            },
                        },
                    },
                },
                "parameters": {"type": "object"},
            },
        },
    },
}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return json.loads(CHECKED_IN.read_text(encoding="utf-8"))


def test_the_checked_in_document_is_what_the_schemas_make_now() -> None:
    assert CHECKED_IN.read_text(encoding="utf-8") == asyncapi.render(), (
        "docs/asyncapi.json is stale: run `tayori schemas asyncapi` and commit it"
    )


def test_it_has_the_structure_asyncapi_3_requires(document: dict[str, Any]) -> None:
    validator = jsonschema.Draft7Validator(STRUCTURE)
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(document)]
    assert errors == []


def test_every_ref_resolves_and_operations_name_their_channels_messages(
    document: dict[str, Any],
) -> None:
    def resolve(ref: str) -> Any:
        assert ref.startswith("#/"), ref
        node: Any = document
        for part in ref[2:].split("/"):
            assert part in node, f"{ref}: no {part!r}"
            node = node[part]
        return node

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
            return found + [r for value in node.values() for r in refs(value)]
        if isinstance(node, list):
            return [r for value in node for r in refs(value)]
        return []

    for ref in refs(document):
        resolve(ref)
    for name, operation in document["operations"].items():
        channel = operation["channel"]["$ref"]
        for message in operation["messages"]:
            assert message["$ref"].startswith(channel + "/messages/"), name
    for name, channel in document["channels"].items():
        wanted = set(re.findall(r"{(\w+)}", channel["address"]))
        assert wanted == set(channel.get("parameters", {})), name


def test_payloads_are_the_topics_schemas_and_headers_and_keys_are_json_schemas(
    document: dict[str, Any],
) -> None:
    messages = document["components"]["messages"]
    for topic in Topic:
        schema = json.loads((avro.schemas_dir() / f"{topic.value}.avsc").read_text("utf-8"))
        message = messages[schema["name"]]
        assert message["payload"]["schemaFormat"].startswith("application/vnd.apache.avro")
        assert message["payload"]["schema"] == schema
        fastavro.parse_schema(message["payload"]["schema"])
        for example in message["examples"]:
            data, headers = avro.encode(topic, example["payload"])
            assert avro.decode(topic, data, headers)
            assert (
                dict(headers)[avro.VERSION_HEADER].decode()
                == example["headers"][avro.VERSION_HEADER]
            )
        if topic.upstream:
            confluent = messages[f"{schema['name']}Confluent"]["bindings"]["kafka"]
            assert confluent["schemaIdLocation"] == "payload"
    for message in messages.values():
        for part in (
            message.get("headers"),
            message.get("bindings", {}).get("kafka", {}).get("key"),
        ):
            if part is not None:
                jsonschema.Draft7Validator.check_schema(part)
        if "schemaFormat" not in message["payload"]:
            jsonschema.Draft7Validator.check_schema(message["payload"])


def test_every_topic_its_producers_and_each_consumer_group_are_there(
    document: dict[str, Any],
) -> None:
    channels, operations = document["channels"], document["operations"]
    for topic in Topic:
        for name in (topic.value, topic.dlq):
            assert channels[asyncapi.channel_id(name)]["address"] == "{prefix}" + name
    sends = {
        (op["tags"][0]["name"], op["channel"]["$ref"].split("/")[-1])
        for op in operations.values()
        if op["action"] == "send"
    }
    groups = {
        (op["bindings"]["kafka"]["groupId"]["enum"][0], op["channel"]["$ref"].split("/")[-1])
        for op in operations.values()
        if op["action"] == "receive" and "bindings" in op
    }
    for name in SERVICES:
        app, settings_cls = service_parts(name)
        for topic in app.PRODUCES:
            assert (name, asyncapi.channel_id(topic.value)) in sends
        for topic in getattr(app, "FOLLOWS", ()):
            assert f"{name}_receive_{asyncapi.channel_id(topic.value)}" in operations
        for spec in app.build(load(settings_cls, {})).consumers:
            for topic in spec.topics:
                assert (spec.group, asyncapi.channel_id(topic.value)) in groups
                assert (name, asyncapi.channel_id(topic.dlq)) in sends
    for topic in Topic:
        if topic.upstream:
            assert ("upstream", asyncapi.channel_id(topic.value)) in sends
    for topic in DOWNSTREAM:
        assert f"downstream_receive_{asyncapi.channel_id(topic.value)}" in operations


@pytest.mark.parametrize("name", SERVICES)
def test_what_a_service_declares_it_produces_is_what_its_code_names(name: str) -> None:
    """PRODUCES is a declaration: the topics a service's modules name (``Topic.X``) are the
    ones it produces or consumes, and each topic it declares is named in its code."""
    app, settings_cls = service_parts(name)
    consumed = {t for spec in app.build(load(settings_cls, {})).consumers for t in spec.topics}
    consumed |= set(getattr(app, "FOLLOWS", ()))
    named: set[Topic] = set()
    for path in (ROOT / "services" / name).glob("*.py"):
        if path.name == "app.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "Topic"
            ):
                named.add(Topic[node.attr])
    produces = set(app.PRODUCES)
    assert named - consumed <= produces, f"{name} names {named - consumed - produces}"
    assert produces <= named, f"{name} declares {produces - named} but never names them"


def test_the_readme_gives_every_topics_key_as_topics_py_does() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Producing to Tayori's upstream topics", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `([a-z.]+)` \| (.+?) \|$", section, re.M))
    assert rows == {topic.value: topic.key for topic in Topic}
