"""One rule for what a mail address is, for every service that takes one from a user: a
contact's email (contacts), a campaign's from / reply-to and test addresses (scheduler), an
export's notify address (exporter).

An address is trimmed and its domain lower-cased; the local part keeps its case (RFC 5321
says only the receiving host may interpret it). Accepted: a dot-atom local part of at most
64 octets (RFC 5322 atext, no leading, trailing or doubled dot) and a domain of at least two
LDH labels; the whole at most 254 octets (RFC 5321's path limit less the brackets). Quoted
local parts, address literals and comments are refused: real mailing lists do not use them
and each is a way to smuggle header syntax into a message.
"""

from __future__ import annotations

import re

from libs.common.errors import InvalidMessage

# \Z, not $: "$" also matches before a final newline, which let "a\n@example.jp" through.
_LOCAL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+\Z")
_DOMAIN = re.compile(r"(?:(?!-)[a-z0-9-]{1,63}(?<!-)\.)+(?!-)[a-z0-9-]{1,63}(?<!-)\Z")


def normalise(raw: object, field: str = "email") -> str:
    """The address in its stored form, or :class:`InvalidMessage` naming ``field``."""
    if not isinstance(raw, str):
        raise InvalidMessage(f"{field} must be a string", field=field)
    address = raw.strip()
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise InvalidMessage(f"{_shown(address)} is not an email address", field=field)
    domain = domain.lower().rstrip(".")
    if (
        len(address) > 254
        or len(local) > 64
        or not _LOCAL.match(local)
        or local.startswith(".")
        or local.endswith(".")
        or ".." in local
        or not _DOMAIN.match(domain)
    ):
        raise InvalidMessage(f"{_shown(address)} is not a valid email address", field=field)
    return f"{local}@{domain}"


def _shown(text: str) -> str:
    return repr(text[:80])
