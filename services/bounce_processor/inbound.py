"""The inbound SMTP listener for the VERP return path (F-33): store first, answer 250, read later.

Remote MTAs send DSNs and ARF reports here (the bounce domain's MX). A DATA is acknowledged
only once the raw mail is **committed** in ``inbound_mail`` (a group commit shared by
concurrent sessions, :mod:`.batcher`), and read afterwards by the mail loop
(:func:`services.bounce_processor.agents.process_inbound`) from that table. So a crash
between the 250 and the reading loses nothing: the row is still ``pending`` when the
service comes back. Reading in the SMTP session instead would hold the remote MTA for the
parse and the rules, and a crash after the 250 would lose the bounce. When the database
cannot take the mail, the answer is 451 and the remote MTA tries again later (it keeps it).

RCPT is accepted for any local part of ``BOUNCE_DOMAIN`` — a forged or unknown VERP token
is stored and counted as unattributed rather than refused, so an operator can see it — and
refused for every other domain (this is no relay). Mail larger than
``BOUNCE_MAX_MESSAGE_BYTES`` is refused with 552 by aiosmtpd.
"""

from __future__ import annotations

import asyncio
import socket
import weakref
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from libs.common.errors import TransientError
from libs.common.logging import get_logger
from services.bounce_processor.batcher import GroupWriter
from services.bounce_processor.settings import BounceSettings

log = get_logger(__name__)


@dataclass(frozen=True)
class InboundMail:
    mail_from: str | None
    rcpt_to: tuple[str, ...]
    raw: bytes


class ReturnPathHandler:
    """aiosmtpd handler: RCPT for our bounce domain only; DATA stored before the 250."""

    def __init__(self, domain: str, writer: GroupWriter[InboundMail]) -> None:
        self.domain = domain.strip().lower().rstrip(".")
        self.writer = writer

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        if address.rpartition("@")[2].lower().rstrip(".") != self.domain:
            return "550 5.7.1 relaying denied: this host takes only return-path mail"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or envelope.content or b""
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        mail = InboundMail(envelope.mail_from or None, tuple(envelope.rcpt_tos), raw)
        try:
            await self.writer.write(mail)
        except TransientError as exc:
            log.warning("inbound_mail_not_stored", error=str(exc))
            return "451 4.3.0 cannot store the message now; try again later"
        return "250 2.0.0 OK: queued"


class Listener:
    """The SMTP server on the service's event loop, with the sessions it has open."""

    def __init__(self, settings: BounceSettings, handler: object) -> None:
        self.settings = settings
        self.handler = handler
        self.port = settings.smtp_port
        self._hostname = socket.getfqdn()  # once: it may ask the resolver
        self._server: asyncio.Server | None = None
        self._sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()

    def _session(self) -> SMTP:
        session = SMTP(
            self.handler,
            data_size_limit=self.settings.max_message_bytes,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=self._hostname,
            ident="Tayori bounce processor",
            timeout=60,
            loop=asyncio.get_running_loop(),
        )
        self._sessions.add(session)
        return session

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._session, self.settings.smtp_host, self.settings.smtp_port, reuse_address=True
        )
        sockets: list[socket.socket] = list(self._server.sockets or [])
        self.port = sockets[0].getsockname()[1] if sockets else self.settings.smtp_port
        log.info("inbound_smtp_listening", port=self.port)

    async def stop(self) -> None:
        """Stop accepting, then close open sessions (a sender whose DATA was not answered
        250 keeps its mail and tries again)."""
        if self._server is None:
            return
        self._server.close()
        for session in list(self._sessions):
            if session.transport is not None:
                session.transport.close()
        self._sessions.clear()
        await self._server.wait_closed()
        self._server = None
