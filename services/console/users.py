"""``tayori console create-admin``: a console user from the command line (and ``tayori dev``'s
``admin``). The password comes from ``CONSOLE_ADMIN_PASSWORD`` or a prompt, never an argument
(it would be seen in the process list and the shell history)."""

from __future__ import annotations

import asyncio
import getpass
import os
import sys
from pathlib import Path

from libs.common import db
from libs.common.settings import load
from services.console import auth
from services.console.settings import ConsoleSettings

SCHEMA = "console"
MIGRATIONS = Path(__file__).with_name("migrations")


async def ensure_user(
    dsn: str, username: str, password: str, role: str, email: str | None = None
) -> auth.User:
    """Apply the console's migrations and create (or update) one user."""
    await db.migrate(dsn, SCHEMA, MIGRATIONS)
    conn = await db.connect(dsn, SCHEMA)
    try:
        return await auth.save_user(conn, username, password, role, email)
    finally:
        await conn.close()


def create_admin_command(username: str | None, email: str | None, role: str) -> int:
    settings = load(ConsoleSettings)
    username = username or os.environ.get("CONSOLE_ADMIN_USERNAME") or input("username: ")
    email = email or os.environ.get("CONSOLE_ADMIN_EMAIL") or None
    password = os.environ.get("CONSOLE_ADMIN_PASSWORD") or ""
    if not password:
        password = getpass.getpass("password: ")
        if getpass.getpass("password again: ") != password:
            print("the passwords differ", file=sys.stderr)
            return 2
    try:
        user = asyncio.run(ensure_user(settings.database_url, username, password, role, email))
    except ValueError as exc:
        print(f"tayori console create-admin: {exc}", file=sys.stderr)
        return 2
    print(f"console user {user.username!r} ({user.role}) saved")
    return 0
