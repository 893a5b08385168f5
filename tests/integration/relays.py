"""Test SMTP relays (aiosmtpd) that the sender's integration tests script.

:class:`TestRelay` is the base every scripted relay of these tests shares: it keeps what
it accepts in a Maildir (tayori.embedded.MaildirHandler, envelope in headers) and offers
PIPELINING or not, so a test runs both of the sender's transaction paths (commands one by
one, or MAIL/RCPT/DATA written behind the previous end of data). A subclass answers RCPT or
DATA its own way. :func:`serving` runs a handler on a free loopback port for one test.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

from tayori.embedded import MaildirHandler, free_port


class TestRelay(MaildirHandler):
    """A relay that keeps every message it accepts; ``pipelining`` False: its EHLO does not
    offer PIPELINING (aiosmtpd's own answer), so the sender sends command by command."""

    __test__ = False  # not a test class, whatever pytest makes of its name

    def __init__(self, maildir: Path, pipelining: bool = True) -> None:
        super().__init__(maildir)
        self.pipelining = pipelining

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        if self.pipelining:
            return await super().handle_EHLO(server, session, envelope, hostname, responses)
        session.host_name = hostname
        return responses


def kept(handler: MaildirHandler) -> list[Message]:
    """The mail a relay kept."""
    return list(handler.maildir)


@contextlib.contextmanager
def serving(handler: MaildirHandler) -> Iterator[Controller]:
    """``handler`` answering SMTP on a free loopback port (its own thread) until the end."""
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield controller
    finally:
        controller.stop()
