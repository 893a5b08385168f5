"""``tayori schemas``: the topics' Avro schemas for other tools.

tayori schemas register     register every topic's schemas in the Schema Registry at
                            SCHEMA_REGISTRY_URL (SCHEMA_REGISTRY_USERNAME / _PASSWORD)
                            under ``<KAFKA_TOPIC_PREFIX><topic>-value`` with the topic's
                            compatibility rule; run again, it changes nothing
tayori schemas asyncapi     write the AsyncAPI document of every topic (docs/asyncapi.json);
                            ``--check`` only says whether the file is up to date

``register`` sets the subject's compatibility first (BACKWARD; BACKWARD_TRANSITIVE for a
compacted topic), then registers the versions the registry does not have yet, oldest first:
those of ``schemas/avro/history/`` newer than the newest it has, then the current one, so
the registry checks each step as Tayori's schema test does. A version registered already is
left as it is (the registry answers its id and version). Exit status: 0 done, 2 refused or
failed (one line on stderr: the registry's answer).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from libs.common import avro
from libs.common.errors import TransientError
from libs.common.registry import RegistryError, SchemaRegistry, from_settings
from libs.common.settings import CommonSettings, load
from libs.common.topics import Topic, topic_name
from tayori import asyncapi
from tayori.ops import EXIT_FAILED, EXIT_OK


def add_parser(sub: Any) -> None:
    schemas = sub.add_parser(
        "schemas",
        help="register the topics' schemas; write the AsyncAPI document",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = schemas.add_subparsers(dest="action", required=True)
    actions.add_parser("register", help="register every topic's schemas in SCHEMA_REGISTRY_URL")
    document = actions.add_parser("asyncapi", help="write docs/asyncapi.json")
    document.add_argument("--output", type=Path, default=asyncapi.DEFAULT_PATH)
    document.add_argument(
        "--check", action="store_true", help="exit 1 if the file is not up to date"
    )


def command(
    args: argparse.Namespace,
    environ: Mapping[str, str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run parsed ``schemas`` arguments: the exit status."""
    out, err = out or sys.stdout, err or sys.stderr
    if args.action == "asyncapi":
        return _asyncapi(args.output, args.check, out, err)
    try:
        settings = load(CommonSettings, os.environ if environ is None else environ)
        if not settings.schema_registry_url:
            raise ValueError("SCHEMA_REGISTRY_URL is not set")
        registry = from_settings(settings)
    except ValueError as exc:
        print(f"tayori: {exc}", file=err)
        return EXIT_FAILED
    return asyncio.run(register_all(registry, settings.topic_prefix, out, err))


def _asyncapi(path: Path, check: bool, out: TextIO, err: TextIO) -> int:
    shown = os.path.relpath(path)
    if check:
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current != asyncapi.render():
            print(f"tayori: {shown} is not up to date: run `tayori schemas asyncapi`", file=err)
            return 1
        print(f"{shown}: up to date", file=out)
        return EXIT_OK
    changed = asyncapi.write(path)
    print(f"{shown}: {'written' if changed else 'up to date'}", file=out)
    return EXIT_OK


async def register_all(registry: SchemaRegistry, prefix: str, out: TextIO, err: TextIO) -> int:
    """Register every topic's schemas: the exit status."""
    async with registry:
        try:
            for topic in Topic:
                for line in await register_topic(registry, topic, prefix):
                    print(line, file=out)
        except (TransientError, RegistryError) as exc:
            print(f"tayori: {exc}", file=err)
            return EXIT_FAILED
    return EXIT_OK


async def register_topic(registry: SchemaRegistry, topic: Topic, prefix: str) -> list[str]:
    """Bring ``topic``'s subject up to date; one line per thing done or found done."""
    subject = f"{topic_name(topic, prefix)}-value"
    said = []
    level = topic.compatibility
    found = await registry.compatibility(subject)
    if found == level:
        said.append(f"{subject}: compatibility {level} (unchanged)")
    else:
        await registry.set_compatibility(subject, level)
        said.append(f"{subject}: compatibility {level} (was {found or 'not set'})")
    versions = _versions(topic)
    newest_known = None
    known: dict[int, tuple[int, int]] = {}
    for version, text in reversed(versions):
        hit = await registry.lookup(subject, text)
        if hit is not None:
            newest_known, known[version] = version, hit
            break
    for version, text in versions:
        if newest_known is not None and version < newest_known:
            continue
        if version in known:
            schema_id, number = known[version]
            said.append(
                f"{subject}: v{version} registered already (id {schema_id}, version {number})"
            )
            continue
        schema_id = await registry.register(subject, text)
        said.append(f"{subject}: v{version} registered (id {schema_id})")
    return said


def _versions(topic: Topic) -> list[tuple[int, str]]:
    """(version, schema text) of every version of ``topic``'s schema, oldest first."""
    folder = avro.schemas_dir()
    paths = {
        int(path.name.rsplit(".v", 1)[1].removesuffix(".avsc")): path
        for path in (folder / "history").glob(f"{topic.value}.v*.avsc")
    }
    current = json.loads((folder / f"{topic.value}.avsc").read_text(encoding="utf-8"))
    paths[int(current.get("tayori_version", 1))] = folder / f"{topic.value}.avsc"
    return [(version, _compact(paths[version])) for version in sorted(paths)]


def _compact(path: Path) -> str:
    """The schema as one line of JSON (what the registry stores and compares)."""
    raw = json.loads(path.read_text(encoding="utf-8"))
    return json.dumps(raw, ensure_ascii=False, separators=(",", ":"))


def main(argv: Sequence[str], **kwargs: Any) -> int:
    """``tayori schemas ...`` with arguments (the tests): the exit status."""
    parser = argparse.ArgumentParser(prog="tayori")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return command(parser.parse_args(["schemas", *argv]), **kwargs)
