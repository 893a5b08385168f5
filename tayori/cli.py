"""``tayori``: run one service, the whole system (``dev``), or a service's migrations.

tayori dev                  the whole system on embedded defaults (SPEC §8, §10)
tayori contacts             one service (likewise suppression, scheduler, ...)
tayori console              the console (web pages on port 8080)
tayori console create-admin create or reset a console admin (prompts, or CONSOLE_ADMIN_*)
tayori migrate contacts     apply a service's migrations and exit
tayori topics               create every topic on KAFKA_BOOTSTRAP and exit
tayori dlq list|show|replay dead letters: count, inspect, send back (tayori/dlq.py)
tayori offsets show|skip    consumer group offsets and lag; move a stopped group past a
                            record that crashes it (tayori/offsets.py)
tayori schemas register     register every topic's schemas in SCHEMA_REGISTRY_URL
tayori schemas asyncapi     write docs/asyncapi.json (tayori/schemas.py)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from tayori import operate, schemas
from tayori.services import CONSOLE, SERVICES, service_parts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="tayori", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("dev", help="run the whole system on embedded defaults")
    for name in SERVICES:
        sub.add_parser(name, help=f"run the {name} service")
    console = sub.add_parser(CONSOLE, help="run the console (web pages)")
    console.add_argument("action", nargs="?", choices=["create-admin"], help="create an admin")
    console.add_argument(
        "--username", help="create-admin: the username (or CONSOLE_ADMIN_USERNAME)"
    )
    console.add_argument("--email", help="create-admin: the email (or CONSOLE_ADMIN_EMAIL)")
    console.add_argument(
        "--role", default="admin", choices=["admin", "operator", "viewer"], help="create-admin"
    )
    migrate = sub.add_parser("migrate", help="apply a service's database migrations")
    migrate.add_argument("service", choices=(*SERVICES, CONSOLE))
    sub.add_parser("topics", help="create every Tayori topic on KAFKA_BOOTSTRAP")
    operate.add_commands(sub)
    schemas.add_parser(sub)
    args = parser.parse_args(argv)

    if args.command in operate.COMMANDS:
        sys.exit(operate.command(args))
    if args.command == "schemas":
        sys.exit(schemas.command(args))

    if args.command == "dev":
        from tayori.dev import main as dev_main

        sys.exit(dev_main())
    if args.command == CONSOLE and args.action == "create-admin":
        from services.console.users import create_admin_command

        sys.exit(create_admin_command(args.username, args.email, args.role))
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
        from libs.common.kafkasecurity import check_connection
        from libs.common.settings import CommonSettings, ConfigError, load

        async def create() -> None:
            if settings.kafka_security_protocol.upper() != "PLAINTEXT":
                await check_connection(settings, "tayori-admin")
            await ensure_topics(settings, settings.topic_prefix)

        try:
            settings = load(CommonSettings)
            asyncio.run(create())
        except ConfigError as exc:
            sys.exit(f"tayori: {exc}")
        return
    from libs.common.runner import run_service

    app, settings_cls = service_parts(args.command)
    run_service(settings_cls, app.build)


if __name__ == "__main__":
    main()
