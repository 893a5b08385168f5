"""Avro binary codecs compiled from a schema into Python source, for every topic.

fastavro's compiled reader and writer interpret the schema for every value: ~1.5 µs per
``["null", "string"]`` field, ~30–40 µs per ``contacts.events`` or ``contacts.changelog``
record, about a third of the contacts service's CPU during ingest. The functions made here
do the same work with the schema unrolled into straight-line code (one function per
schema, no dispatch per field).

They cover the types our schemas use — records, ``null``, ``boolean``, ``int``, ``long``,
``double``, ``string``, enums, arrays, maps, two-branch unions with ``null`` and
``timestamp-millis``, field defaults of any of those (a map's ``{}``, an array's ``[]``), so
every topic's schema compiles — and only the usual values: anything else (another type in the
schema, a value of an unexpected Python type, a malformed input) makes :func:`compile_writer` /
:func:`compile_reader` return None or the compiled function raise, and the caller
(:mod:`libs.common.avro`) uses fastavro, so every unusual case behaves exactly as fastavro
does. ``tests/unit/test_avrocodec.py`` checks both produce the same bytes and values.
"""

from __future__ import annotations

import datetime as dt
import struct
from collections.abc import Callable
from typing import Any

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1
_PRIMITIVE = {"null", "boolean", "int", "long", "double", "string"}
#: an Avro double: 8 bytes, IEEE 754, little-endian
_DOUBLE = struct.Struct("<d")
#: the ints a double holds exactly
_EXACT = 2**53


class Unsupported(Exception):
    """The schema uses something these codecs do not compile (fastavro handles it)."""


class Fallback(Exception):
    """A value the compiled writer does not handle as fastavro would: use fastavro."""


# Varints -----------------------------------------------------------------------------------


def _unsigned(z: int) -> bytes:
    """7 bits a byte, low first, the high bit set on every byte but the last."""
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


#: the varint bytes of 0 … 16383 (before zig-zag), and of 14 low bits followed by more
_UNSIGNED = [_unsigned(z) for z in range(1 << 14)]
_LOW14 = [bytes(((z & 0x7F) | 0x80, (z >> 7) | 0x80)) for z in range(1 << 14)]


def _varint(n: int) -> bytes:
    """An Avro int or long: zig-zag, then 7 bits a byte, low first (14 bits a table look-up:
    a timestamp in three instead of six turns of a loop)."""
    z = (n << 1) ^ (n >> 63)
    if z < 16384:
        return _UNSIGNED[z]
    parts = []
    while z >= 16384:
        parts.append(_LOW14[z & 0x3FFF])
        z >>= 14
    parts.append(_UNSIGNED[z])
    return b"".join(parts)


#: the encodings of 0 … 16383 (lengths, counts, attempts, small ids), made once
_SMALL = [_varint(n) for n in range(1 << 14)]


def zigzag(n: int) -> bytes:
    """An Avro int or long's bytes (the usual small ones from a table)."""
    return _SMALL[n] if 0 <= n < 16384 else _varint(n)


def _read_long(data: bytes, pos: int) -> tuple[int, int]:
    """A zigzag varint at ``pos`` (the one-byte case is inlined by the readers)."""
    shift = 0
    z = 0
    while True:
        b = data[pos]
        pos += 1
        z |= (b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")
    return (z >> 1) ^ -(z & 1), pos


def timestamp_millis(value: Any) -> int:
    """timestamp-millis as fastavro writes it: an int as it is, an aware datetime in whole
    milliseconds since the epoch; anything else raises :class:`Fallback`."""
    if type(value) is int:
        return value
    if isinstance(value, dt.datetime) and value.tzinfo is not None:
        delta = value - EPOCH
        return (delta.days * 86400 + delta.seconds) * 1000 + int(delta.microseconds / 1000)
    raise Fallback


#: the last datetime written as timestamp-millis and its bytes (one tuple, replaced whole)
_last_moment: tuple[Any, bytes] = (None, b"")


def timestamp_bytes(value: Any) -> bytes:
    """A timestamp-millis field's bytes. A chunk of records written together usually share
    one moment (the scheduler's ``released_at``): the same datetime object as the last call
    is not converted again."""
    global _last_moment
    last = _last_moment
    if value is last[0]:
        return last[1]
    encoded = zigzag(_long(timestamp_millis(value)))
    if type(value) is dt.datetime:
        _last_moment = (value, encoded)
    return encoded


def _long(value: Any) -> int:
    if type(value) is not int or not _LONG_MIN <= value <= _LONG_MAX:
        raise Fallback
    return value


def _int(value: Any) -> int:
    if type(value) is not int or not _INT_MIN <= value <= _INT_MAX:
        raise Fallback
    return value


def _double(value: Any) -> bytes:
    """A double's bytes: a float as it is, an int within ±2**53 as that float (as fastavro
    writes it); anything else (a bool, a Decimal, a larger int) raises :class:`Fallback`."""
    if type(value) is float:
        return _DOUBLE.pack(value)
    if type(value) is int and -_EXACT <= value <= _EXACT:
        return _DOUBLE.pack(float(value))
    raise Fallback


_HELPERS: dict[str, Any] = {
    "_zigzag": zigzag,
    "_SMALL": _SMALL,
    "_read_long": _read_long,
    "_timestamp_millis": timestamp_millis,
    "_timestamp_bytes": timestamp_bytes,
    "_long": _long,
    "_int": _int,
    "_double": _double,
    "_unpack_double": _DOUBLE.unpack_from,
    "_Fallback": Fallback,
    "_EPOCH": EPOCH,
    "_timedelta": dt.timedelta,
}


# Schema ------------------------------------------------------------------------------------


def _kind(schema: Any) -> tuple[str, Any]:
    """(type name, schema as a dict or the primitive name) of a schema node."""
    if isinstance(schema, str):
        if schema not in _PRIMITIVE:
            raise Unsupported(f"named type reference {schema!r}")
        return schema, schema
    if isinstance(schema, list):
        return "union", schema
    if isinstance(schema, dict):
        kind = schema.get("type")
        logical = schema.get("logicalType")
        if logical is not None:
            if logical == "timestamp-millis" and kind == "long":
                return "timestamp-millis", schema
            raise Unsupported(f"logical type {logical!r}")
        if kind in _PRIMITIVE:
            return kind, kind
        if kind in ("record", "enum", "array", "map"):
            return kind, schema
    raise Unsupported(f"schema {schema!r}")


def _nullable(schema: list[Any]) -> tuple[int, Any]:
    """(index of null, the other branch) of a two-branch union with null."""
    if len(schema) != 2:
        raise Unsupported("unions other than [null, X]")
    kinds = [_kind(branch)[0] for branch in schema]
    if kinds.count("null") != 1:
        raise Unsupported("unions other than [null, X]")
    null_at = kinds.index("null")
    return null_at, schema[1 - null_at]


class _Source:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.constants: dict[str, Any] = {}
        self._n = 0

    def var(self, stem: str) -> str:
        self._n += 1
        return f"{stem}{self._n}"

    def constant(self, value: Any) -> str:
        name = self.var("_c")
        self.constants[name] = value
        return name

    def emit(self, indent: int, line: str) -> None:
        self.lines.append("    " * indent + line)

    def function(self, header: str) -> Callable[..., Any]:
        text = "\n".join([header, *self.lines])
        namespace: dict[str, Any] = {**_HELPERS, **self.constants}
        exec(compile(text, "<avrocodec>", "exec"), namespace)  # our own source, from a schema
        return namespace["codec"]


# Writer ------------------------------------------------------------------------------------


def compile_writer(schema: Any) -> Callable[[Any], bytes] | None:
    """``write(datum) -> bytes`` for a parsed schema, or None when it uses what is not
    compiled. The function raises :class:`Fallback` (or a TypeError and the like) for a
    value it does not handle as fastavro would."""
    source = _Source()
    try:
        _write(source, schema, "datum", 1)
    except Unsupported:
        return None
    source.lines.insert(0, "    out = []\n    a = out.append")
    source.emit(1, 'return b"".join(out)')
    return source.function("def codec(datum):")


def _write(src: _Source, schema: Any, value: str, ind: int) -> None:
    kind, node = _kind(schema)
    if kind == "null":
        src.emit(ind, f"if {value} is not None: raise _Fallback")
    elif kind == "boolean":
        src.emit(ind, f"if {value} is True: a(b'\\x01')")
        src.emit(ind, f"elif {value} is False: a(b'\\x00')")
        src.emit(ind, "else: raise _Fallback")
    elif kind == "int":
        src.emit(ind, f"a(_zigzag(_int({value})))")
    elif kind == "long":
        # the usual small non-negative long from the table, without a call
        src.emit(ind, f"if type({value}) is int and 0 <= {value} < 16384: a(_SMALL[{value}])")
        src.emit(ind, f"else: a(_zigzag(_long({value})))")
    elif kind == "double":
        src.emit(ind, f"a(_double({value}))")
    elif kind == "timestamp-millis":
        src.emit(ind, f"a(_timestamp_bytes({value}))")
    elif kind == "string":
        raw = src.var("s")
        src.emit(ind, f"if type({value}) is not str: raise _Fallback")
        src.emit(ind, f"{raw} = {value}.encode()")
        size = src.var("n")
        src.emit(ind, f"{size} = len({raw})")
        src.emit(ind, f"a(_SMALL[{size}] if {size} < 16384 else _zigzag({size}))")
        src.emit(ind, f"a({raw})")
    elif kind == "enum":
        index = src.constant({s: zigzag(i) for i, s in enumerate(node["symbols"])})
        src.emit(ind, f"a({index}[{value}])")  # KeyError (unknown symbol): fastavro's error
    elif kind == "union":
        null_at, other = _nullable(node)
        null_byte, other_byte = zigzag(null_at), zigzag(1 - null_at)
        src.emit(ind, f"if {value} is None: a({null_byte!r})")
        src.emit(ind, "else:")
        src.emit(ind + 1, f"a({other_byte!r})")
        inner = value
        if _kind(other)[0] == "record":
            # fastavro's (record name, value) notation picks the branch by name
            name = other["name"]
            inner = src.var("r")
            src.emit(ind + 1, f"{inner} = {value}")
            src.emit(ind + 1, f"if type({inner}) is tuple:")
            src.emit(ind + 2, f"if len({inner}) != 2 or {inner}[0] != {name!r}: raise _Fallback")
            src.emit(ind + 2, f"{inner} = {inner}[1]")
        _write(src, other, inner, ind + 1)
    elif kind == "array":
        items = src.var("items")
        item = src.var("item")
        src.emit(ind, f"{items} = {value}")
        src.emit(ind, f"if type({items}) is not list: raise _Fallback")
        src.emit(ind, f"if {items}:")
        src.emit(ind + 1, f"a(_zigzag(len({items})))")
        src.emit(ind + 1, f"for {item} in {items}:")
        _write(src, node["items"], item, ind + 2)
        src.emit(ind, "a(b'\\x00')")
    elif kind == "map":
        entries = src.var("entries")
        key = src.var("key")
        item = src.var("item")
        src.emit(ind, f"{entries} = {value}")
        src.emit(ind, f"if type({entries}) is not dict: raise _Fallback")
        src.emit(ind, f"if {entries}:")
        src.emit(ind + 1, f"a(_zigzag(len({entries})))")
        src.emit(ind + 1, f"for {key}, {item} in {entries}.items():")
        _write(src, "string", key, ind + 2)
        _write(src, node["values"], item, ind + 2)
        src.emit(ind, "a(b'\\x00')")
    elif kind == "record":
        record = src.var("rec")
        src.emit(ind, f"{record} = {value}")
        src.emit(ind, f"if type({record}) is not dict: raise _Fallback")
        for fld in node["fields"]:
            field_value = src.var("f")
            name = fld["name"]
            if "default" in fld or (isinstance(fld["type"], list) and "null" in fld["type"]):
                src.emit(ind, f"{field_value} = {record}.get({name!r}, {_default(src, fld)})")
            else:
                src.emit(ind, f"{field_value} = {record}[{name!r}]")
            _write(src, fld["type"], field_value, ind)
    else:  # pragma: no cover - _kind returns only the kinds above
        raise Unsupported(kind)


def _default(src: _Source, fld: dict[str, Any]) -> str:
    """The expression for a missing field's value: its default, as fastavro writes it (the
    default as the value, checked by the field's own writer like any other value)."""
    default = fld.get("default")
    if isinstance(default, (type(None), bool, int, float, str)):
        return repr(default)
    if isinstance(default, (list, dict)):
        # one shared object (a map's {}, an array's []): the writer only reads it
        return src.constant(default)
    raise Unsupported(f"default {default!r}")


# Reader ------------------------------------------------------------------------------------


def compile_reader(schema: Any) -> Callable[[bytes], tuple[Any, int]] | None:
    """``read(data) -> (value, bytes read)`` for a parsed schema (read with the schema it
    was written with), or None when it uses what is not compiled. Malformed input raises
    (IndexError, ValueError, UnicodeDecodeError, KeyError): the caller asks fastavro."""
    source = _Source()
    try:
        _read(source, schema, "value", 1)
    except Unsupported:
        return None
    source.lines.insert(0, "    pos = 0")
    source.emit(1, "if pos > len(data): raise ValueError('truncated')")
    source.emit(1, "return value, pos")
    return source.function("def codec(data):")


def _read_varint(src: _Source, target: str, ind: int) -> None:
    byte = src.var("b")
    src.emit(ind, f"{byte} = data[pos]")
    src.emit(ind, f"if {byte} < 0x80:")
    src.emit(ind + 1, "pos += 1")
    src.emit(ind + 1, f"{target} = ({byte} >> 1) ^ -({byte} & 1)")
    src.emit(ind, "else:")
    src.emit(ind + 1, f"{target}, pos = _read_long(data, pos)")


def _read(src: _Source, schema: Any, target: str, ind: int) -> None:
    kind, node = _kind(schema)
    if kind == "null":
        src.emit(ind, f"{target} = None")
    elif kind == "boolean":
        byte = src.var("b")
        src.emit(ind, f"{byte} = data[pos]")
        src.emit(ind, "pos += 1")
        src.emit(ind, f"if {byte} > 1: raise ValueError('boolean')")
        src.emit(ind, f"{target} = {byte} == 1")
    elif kind in ("int", "long"):
        _read_varint(src, target, ind)
    elif kind == "double":
        # struct's own error for a short input is not one the caller expects
        src.emit(ind, "if pos + 8 > len(data): raise ValueError('truncated double')")
        src.emit(ind, f"{target} = _unpack_double(data, pos)[0]")
        src.emit(ind, "pos += 8")
    elif kind == "timestamp-millis":
        millis = src.var("ms")
        _read_varint(src, millis, ind)
        src.emit(ind, f"{target} = _EPOCH + _timedelta(microseconds={millis} * 1000)")
    elif kind == "string":
        size = src.var("n")
        _read_varint(src, size, ind)
        src.emit(ind, f"if {size} < 0: raise ValueError('negative length')")
        src.emit(ind, f"{target} = data[pos:pos + {size}].decode()")
        src.emit(ind, f"pos += {size}")
    elif kind == "enum":
        index = src.var("i")
        symbols = src.constant(tuple(node["symbols"]))
        _read_varint(src, index, ind)
        src.emit(ind, f"if {index} < 0: raise ValueError('enum index')")
        src.emit(ind, f"{target} = {symbols}[{index}]")
    elif kind == "union":
        null_at, other = _nullable(node)
        index = src.var("i")
        _read_varint(src, index, ind)
        src.emit(ind, f"if {index} == {null_at}:")
        src.emit(ind + 1, f"{target} = None")
        src.emit(ind, f"elif {index} == {1 - null_at}:")
        _read(src, other, target, ind + 1)
        src.emit(ind, "else: raise ValueError('union index')")
    elif kind in ("array", "map"):
        count = src.var("count")
        src.emit(ind, f"{target} = {'[]' if kind == 'array' else '{}'}")
        src.emit(ind, "while True:")
        _read_varint(src, count, ind + 1)
        src.emit(ind + 1, f"if {count} == 0: break")
        src.emit(ind + 1, f"if {count} < 0:")
        src.emit(ind + 2, f"{count} = -{count}")
        block = src.var("size")
        _read_varint(src, block, ind + 2)  # the block's size in bytes: not needed
        src.emit(ind + 1, f"for _ in range({count}):")
        item = src.var("item")
        if kind == "array":
            _read(src, node["items"], item, ind + 2)
            src.emit(ind + 2, f"{target}.append({item})")
        else:
            key = src.var("key")
            _read(src, "string", key, ind + 2)
            _read(src, node["values"], item, ind + 2)
            src.emit(ind + 2, f"{target}[{key}] = {item}")
    elif kind == "record":
        names = []
        for fld in node["fields"]:
            field_value = src.var("f")
            _read(src, fld["type"], field_value, ind)
            names.append((fld["name"], field_value))
        body = ", ".join(f"{name!r}: {var}" for name, var in names)
        src.emit(ind, f"{target} = {{{body}}}")
    else:  # pragma: no cover
        raise Unsupported(kind)
