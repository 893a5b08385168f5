"""Console users, passwords, sessions and login throttling (the console's own schema).

Passwords are hashed with argon2id (argon2-cffi's defaults: memory-hard, salted). A session
cookie holds 32 random bytes; the table keeps their SHA-256 and a CSRF token of the session.
Failed logins are counted per account and client address: ``max_failures`` of them lock
that pair out for ``lock_seconds`` (a correct password is refused meanwhile too).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from libs.common.db import Queries

QUERIES = Queries(Path(__file__).with_name("queries.sql"))
ROLES = ("admin", "operator", "viewer")
RANK = {"viewer": 1, "operator": 2, "admin": 3}
_HASHER = PasswordHasher()
#: verified against when the account does not exist, so that a wrong name costs what a
#: wrong password costs (no user enumeration by timing).
_DUMMY_HASH = _HASHER.hash(secrets.token_urlsafe(16))
MIN_PASSWORD = 8


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def trusted_networks(cidrs: Sequence[str]) -> tuple[Network, ...]:
    """The proxies whose ``X-Forwarded-For`` is believed (CONSOLE_TRUSTED_PROXIES)."""
    return tuple(ipaddress.ip_network(cidr.strip(), strict=False) for cidr in cidrs)


def client_address(
    remote: str | None, forwarded_for: str | None, trusted: Sequence[Network]
) -> str:
    """The address a login is counted against: the peer, unless the peer is a trusted
    proxy (the ingress controller); then ``X-Forwarded-For`` read from the right, each
    trusted proxy skipped, and the first address that is not one is the client. What a
    client writes itself (the left of the header) is never believed past an untrusted hop,
    so no one picks the address their failures count against."""
    peer = remote or "unknown"
    if not trusted or not _within(peer, trusted):
        return peer
    client = peer
    for hop in reversed((forwarded_for or "").split(",")):
        hop = hop.strip()
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            break  # a malformed hop: believe nothing further left
        client = hop
        if not _within(hop, trusted):
            break
    return client


def _within(address: str, trusted: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


@dataclass(frozen=True)
class User:
    id: int
    username: str
    email: str | None
    role: str
    lang: str
    csrf: str = ""

    def may(self, role: str) -> bool:
        """Whether this user has ``role`` or a higher one."""
        return RANK[self.role] >= RANK[role]


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


async def save_user(
    pool: asyncpg.Pool | asyncpg.Connection,
    username: str,
    password: str,
    role: str,
    email: str | None = None,
) -> User:
    """Create the user, or set an existing one's password, role (and email)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if not username.strip():
        raise ValueError("a username is required")
    if len(password) < MIN_PASSWORD:
        raise ValueError(f"a password has at least {MIN_PASSWORD} characters")
    row = await pool.fetchrow(
        QUERIES["upsert-user"], username.strip(), email, hash_password(password), role
    )
    return User(row["id"], row["username"], row["email"], row["role"], row["lang"])


class LockedOut(Exception):
    """Too many failed logins for this account from this address."""

    def __init__(self, until: dt.datetime) -> None:
        super().__init__(f"locked until {until.isoformat()}")
        self.until = until


async def login(
    pool: asyncpg.Pool,
    login_name: str,
    password: str,
    client: str,
    *,
    max_failures: int,
    lock_seconds: int,
) -> User | None:
    """The user whose name (or email) and password these are, or None; raises
    :class:`LockedOut` while the pair (account, client address) is locked."""
    key = f"{login_name.strip().lower()}|{client}"
    locked = await pool.fetchval(QUERIES["login-lock"], key)
    if locked is not None:
        raise LockedOut(locked)
    row = await pool.fetchrow(QUERIES["user-by-login"], login_name.strip())
    if _verify(row["password_hash"] if row else _DUMMY_HASH, password) and row is not None:
        await pool.execute(QUERIES["login-succeeded"], key)
        if _HASHER.check_needs_rehash(row["password_hash"]):
            await pool.execute(QUERIES["rehash-user"], row["id"], hash_password(password))
        return User(row["id"], row["username"], row["email"], row["role"], row["lang"])
    failures = await pool.fetchval(QUERIES["login-failed"], key, float(lock_seconds))
    if failures >= max_failures:
        await pool.execute(QUERIES["lock-login"], key, float(lock_seconds))
        raise LockedOut(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=lock_seconds))
    return None


def _verify(stored: str, password: str) -> bool:
    try:
        return _HASHER.verify(stored, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


async def open_session(pool: asyncpg.Pool, user: User, seconds: float) -> str:
    """A new session of ``user``; returns the cookie's token."""
    token = secrets.token_urlsafe(32)
    await pool.execute(
        QUERIES["insert-session"], token_hash(token), user.id, secrets.token_urlsafe(32), seconds
    )
    return token


async def session_user(pool: asyncpg.Pool, token: str, seconds: float) -> User | None:
    if not token or len(token) > 100:
        return None
    row = await pool.fetchrow(QUERIES["session-user"], token_hash(token), seconds)
    if row is None:
        return None
    return User(row["id"], row["username"], row["email"], row["role"], row["lang"], row["csrf"])


async def close_session(pool: asyncpg.Pool, token: str) -> None:
    await pool.execute(QUERIES["delete-session"], token_hash(token))


async def audit(
    pool: asyncpg.Pool,
    user: User,
    action: str,
    target: str | None,
    status: int,
    detail: dict[str, Any] | None = None,
) -> None:
    """Record a write the console made for ``user`` (the services see only the role)."""
    await pool.execute(
        QUERIES["audit"], user.id, user.username, action, target, detail or {}, status
    )
