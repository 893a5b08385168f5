"""``tayori``: run one service, the whole system (``dev``), or a service's migrations.

tayori dev                  the whole system on embedded defaults (SPEC §8, §10)
tayori contacts             one service (likewise suppression, scheduler, ...)
tayori migrate contacts     apply a service's migrations and exit
tayori topics               create every topic on KAFKA_BOOTSTRAP and exit
tayori dlq list|show|replay dead letters: count, inspect, send back (tayori/dlq.py)
tayori offsets show|skip    consumer group offsets and lag; move a stopped group past a
                            record that crashes it (tayori/offsets.py)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from tayori import operate
from tayori.services import SERVICES, service_parts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="tayori", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("dev", help="run the whole system on embedded defaults")
    for name in SERVICES:
        sub.add_parser(name, help=f"run the {name} service")
    migrate = sub.add_parser("migrate", help="apply a service's database migrations")
    migrate.add_argument("service", choices=SERVICES)
    sub.add_parser("topics", help="create every Tayori topic on KAFKA_BOOTSTRAP")
    operate.add_commands(sub)
    args = parser.parse_args(argv)

    if args.command in operate.COMMANDS:
        sys.exit(operate.command(args))

    if args.command == "dev":
        from tayori.dev import main as dev_main

        sys.exit(dev_main())
    if args.command == "migrate":
        from libs.common.runner import migrate_service

        app, settings_cls = service_parts(args.service)
        if getattr(app, "MIGRATIONS", None) is None:
            print(f"{args.service}: no database")
            return
        applied = migrate_service(settings_cls, app.SCHEMA, Path(app.MIGRATIONS))
        print(f"{args.service}: {len(applied)} migration(s) applied")
        return
    if args.command == "topics":
        from libs.common.kafka import ensure_topics
        from libs.common.settings import CommonSettings, load

        settings = load(CommonSettings)
        asyncio.run(ensure_topics(settings.kafka_bootstrap, settings.topic_prefix))
        return
    from libs.common.runner import run_service

    app, settings_cls = service_parts(args.command)
    run_service(settings_cls, app.build)


if __name__ == "__main__":
    main()
