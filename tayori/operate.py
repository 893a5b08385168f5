"""The operator commands' entry: ``tayori dlq ...`` and ``tayori offsets ...``.

:func:`main` takes the arguments and the environment (KAFKA_BOOTSTRAP,
KAFKA_TOPIC_PREFIX, KAFKA_SECURITY_PROTOCOL and its TLS and SASL variables) and returns
the exit status: 0 done, 1 done in part (what was refused is said on stderr), 2 refused
or failed (one line on stderr, never a traceback). Output goes to the streams given,
tables for people or JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from aiokafka.errors import KafkaError

from libs.common.settings import CommonSettings, ConfigError, load
from tayori import dlq, offsets
from tayori.ops import EXIT_FAILED, Failure, Kafka, Output

COMMANDS = ("dlq", "offsets")


def add_commands(sub: Any) -> None:
    """Add ``dlq`` and ``offsets`` to a parser's subcommands (``tayori``'s own)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON for scripts")
    dlq.add_parser(sub, common)
    offsets.add_parser(sub, common)


def parser() -> argparse.ArgumentParser:
    commands = argparse.ArgumentParser(prog="tayori", description=__doc__)
    add_commands(commands.add_subparsers(dest="command", required=True))
    return commands


async def run(
    args: argparse.Namespace,
    environ: Mapping[str, str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run parsed ``dlq`` / ``offsets`` arguments; the exit status."""
    err = err or sys.stderr
    output = Output(out or sys.stdout, err, as_json=args.json)
    try:
        settings = load(CommonSettings, os.environ if environ is None else environ)
    except ValueError as exc:
        print(f"tayori: {exc}", file=err)
        return EXIT_FAILED
    try:
        async with Kafka(settings) as kafka:
            command = dlq.run if args.command == "dlq" else offsets.run
            return await command(args, kafka, output)
    except (Failure, ConfigError) as exc:
        print(f"tayori: {exc}", file=err)
    except (KafkaError, OSError) as exc:
        print(f"tayori: Kafka at {settings.kafka_bootstrap}: {_said(exc)}", file=err)
    except TimeoutError:
        print(f"tayori: Kafka at {settings.kafka_bootstrap} did not answer in time", file=err)
    return EXIT_FAILED


def _said(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


async def main_async(
    argv: Sequence[str],
    environ: Mapping[str, str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """:func:`main` inside a running event loop (the tests)."""
    try:
        args = parser().parse_args(list(argv))
    except SystemExit as exc:  # argparse said what is wrong (or printed the help)
        return exc.code if isinstance(exc.code, int) else EXIT_FAILED
    return await run(args, environ, out, err)


def main(
    argv: Sequence[str],
    environ: Mapping[str, str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """``tayori dlq|offsets ...``: the exit status."""
    quiet_clients()
    return asyncio.run(main_async(argv, environ, out, err))


def command(args: argparse.Namespace) -> int:
    """Parsed ``dlq`` / ``offsets`` arguments of ``tayori`` itself: the exit status."""
    quiet_clients()
    return asyncio.run(run(args))


def quiet_clients() -> None:
    """The Kafka client logs what it retries on stderr; a command says what failed once."""
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
