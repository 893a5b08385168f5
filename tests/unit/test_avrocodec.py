"""The compiled Avro codecs (libs/common/avrocodec.py) against fastavro: the same bytes, the
same values, and fastavro's behaviour wherever they step aside."""

from __future__ import annotations

import datetime as dt
import io
import json
import random
from pathlib import Path
from typing import Any

import fastavro
import pytest

from libs.common import avro, avrocodec
from libs.common.errors import InvalidMessage
from libs.common.topics import Topic

TOPICS = [topic.value for topic in Topic]
STRINGS = ["", "a", "山崎 健", "x" * 70, "ヤマザキ" * 40, "\u00e9\U0001f600", "0"]


def fast_write(schema: Any, value: Any) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, schema, value)
    return buffer.getvalue()


def fast_read(schema: Any, data: bytes) -> Any:
    return fastavro.schemaless_reader(io.BytesIO(data), schema, None)


def random_value(schema: Any, rng: random.Random) -> Any:
    """A random value of a schema node of the kinds the codecs compile."""
    if isinstance(schema, list):
        branch = rng.choice(schema)
        value = random_value(branch, rng)
        if isinstance(branch, dict) and branch.get("type") == "record" and rng.random() < 0.5:
            return (branch["name"], value)  # fastavro's named-branch notation
        return value
    kind = schema if isinstance(schema, str) else schema["type"]
    if isinstance(schema, dict) and schema.get("logicalType") == "timestamp-millis":
        if rng.random() < 0.2:
            return rng.randrange(-(2**40), 2**42)
        return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(
            microseconds=rng.randrange(-(2**50), 2**52)
        )
    if kind == "null":
        return None
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "int":
        return rng.choice([0, -1, 63, 64, -64, -65, 2**31 - 1, -(2**31), rng.randrange(-999, 999)])
    if kind == "long":
        return rng.choice([0, -1, 64, -65, 2**63 - 1, -(2**63), rng.randrange(-(2**40), 2**40)])
    if kind == "double":
        # an int is written as that double, as fastavro writes it
        return rng.choice([0.0, -0.0, 1.5, -2.25, 1e300, 5e-324, 3, 0, rng.random() * 100])
    if kind == "string":
        return rng.choice(STRINGS)
    if kind == "enum":
        return rng.choice(schema["symbols"])
    if kind == "array":
        return [random_value(schema["items"], rng) for _ in range(rng.choice([0, 1, 3, 70]))]
    if kind == "map":
        return {
            f"k{i}{rng.choice(STRINGS)}": random_value(schema["values"], rng)
            for i in range(rng.choice([0, 1, 3, 70]))
        }
    if kind == "record":
        # a field with a default (or a null branch) is sometimes left out: the writer then
        # writes the default, as fastavro does
        return {
            f["name"]: random_value(f["type"], rng)
            for f in schema["fields"]
            if not (_may_be_missing(f) and rng.random() < 0.25)
        }
    raise AssertionError(f"no generator for {schema!r}")


def _may_be_missing(field: dict[str, Any]) -> bool:
    return "default" in field or (isinstance(field["type"], list) and "null" in field["type"])


def examples(topic: str) -> list[dict[str, Any]]:
    paths = sorted((avro.schemas_dir() / "examples" / topic).glob("*.json"))
    return [json.loads(Path(p).read_text(encoding="utf-8")) for p in paths]


@pytest.mark.parametrize("topic", TOPICS)
def test_every_topic_is_compiled(topic: str) -> None:
    assert avro._compiled_writer(topic) is not None
    assert avro._compiled_reader(topic) is not None


def test_defaults_that_are_maps_and_arrays_are_written_as_fastavro_writes_them() -> None:
    schema = fastavro.parse_schema(
        {
            "type": "record",
            "name": "M",
            "fields": [
                {"name": "m", "type": {"type": "map", "values": "string"}, "default": {}},
                {"name": "a", "type": {"type": "array", "items": "long"}, "default": [1, 2]},
                {"name": "s", "type": "string", "default": "x"},
            ],
        }
    )
    write = avrocodec.compile_writer(schema)
    assert write is not None
    values: list[dict[str, Any]] = [{}, {"m": {"k": "v"}}, {"a": []}, {"m": {}, "a": [3], "s": ""}]
    for value in values:
        assert write(value) == fast_write(schema, value), value
    assert write({}) == write({})  # the shared default is not changed by a write


@pytest.mark.parametrize("topic", TOPICS)
def test_same_bytes_and_values_as_fastavro(topic: str) -> None:
    schema = avro.current_schema(topic)[1]
    write = avrocodec.compile_writer(schema)
    read = avrocodec.compile_reader(schema)
    assert write is not None and read is not None
    rng = random.Random(topic)
    values = examples(topic) + [random_value(schema, rng) for _ in range(300)]
    for value in values:
        expected = fast_write(schema, value)
        assert write(value) == expected, value
        decoded, end = read(expected)
        assert end == len(expected)
        assert decoded == fast_read(schema, expected)
        assert avro.decode(topic, *avro.encode(topic, value)) == decoded


SCHEMA = fastavro.parse_schema(
    {
        "type": "record",
        "name": "T",
        "fields": [
            {"name": "n", "type": "long"},
            {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
            {"name": "tags", "type": {"type": "array", "items": "string"}},
            {"name": "s", "type": ["null", "string"], "default": None},
            {"name": "b", "type": "boolean", "default": False},
            {"name": "d", "type": "double", "default": 0.5},
        ],
    }
)
UNUSUAL = [
    {"n": True, "at": 0, "tags": []},  # bool for long
    {"n": 1.0, "at": 0, "tags": []},  # float for long
    {"n": 2**63, "at": 0, "tags": []},  # out of range
    {"n": 1, "at": dt.datetime(2026, 1, 1), "tags": []},  # naive datetime
    {"n": 1, "at": dt.date(2026, 1, 1), "tags": []},
    {"n": 1, "at": 0, "tags": ("a", "b")},  # a tuple for an array
    {"n": 1, "at": 0, "tags": ["a", 3]},
    {"n": 1, "at": 0, "tags": [], "s": 5},
    {"n": 1, "at": 0, "tags": [], "b": 1},
    {"at": 0, "tags": []},  # missing, no default
    {"n": 1, "at": 0, "tags": [], "d": True},  # bool for double
    {"n": 1, "at": 0, "tags": [], "d": "1.5"},
    {"n": 1, "at": 0, "tags": [], "d": 2**1100},  # an int no double holds
    {"n": 1, "at": 0, "tags": [], "d": float("nan")},
]


@pytest.mark.parametrize("value", UNUSUAL)
def test_values_it_steps_aside_for_behave_as_in_fastavro(value: dict[str, Any]) -> None:
    write = avrocodec.compile_writer(SCHEMA)
    assert write is not None
    try:
        expected: Any = fast_write(SCHEMA, value)
    except Exception as exc:  # whatever fastavro raises: ours must not write it
        expected = type(exc)
    try:
        got: Any = write(value)
    except (avrocodec.Fallback, KeyError, TypeError, AttributeError, ValueError):
        return  # the caller asks fastavro
    assert got == expected


def test_malformed_input_is_refused_as_fastavro_refuses_it() -> None:
    topic = "contacts.changelog"
    value = examples(topic)[0]
    data, headers = avro.encode(topic, value)
    for bad in (data[:-1], data + b"\x00", b"\x01" + data[1:], b"\xff" * 12, b""):
        with pytest.raises(InvalidMessage):
            avro.decode(topic, bad, headers)


def test_unsupported_schemas_are_left_to_fastavro() -> None:
    for schema in (
        {"type": "record", "name": "F", "fields": [{"name": "f", "type": "float"}]},
        {"type": "record", "name": "U", "fields": [{"name": "u", "type": ["string", "long"]}]},
        {
            "type": "record",
            "name": "L",
            "fields": [{"name": "d", "type": {"type": "int", "logicalType": "date"}}],
        },
    ):
        parsed = fastavro.parse_schema(schema)
        assert avrocodec.compile_writer(parsed) is None
        assert avrocodec.compile_reader(parsed) is None


def test_encode_all_gives_what_encode_gives_one_by_one() -> None:
    topic = "send.requests"
    values = examples(topic) * 2
    encoded, headers = avro.encode_all(topic, values)
    assert [(data, headers) for data in encoded] == [avro.encode(topic, v) for v in values]
    with pytest.raises(InvalidMessage):  # fastavro's verdict on what the codec steps aside for
        avro.encode_all(topic, [{**values[0], "merge_values": {"n": 3}}])
