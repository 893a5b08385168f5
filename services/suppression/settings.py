"""Settings of the suppression service (environment variables; see README's table)."""

from __future__ import annotations

from dataclasses import dataclass

from libs.common.settings import CommonSettings, env


@dataclass(frozen=True, repr=False)
class SuppressionSettings(CommonSettings):
    service: str = "suppression"
    http_port: int = env("HTTP_PORT", 8082)
    #: where completion mails of sync jobs go (F-12).
    operator_email: str = env("TAYORI_OPERATOR_EMAIL", "operator@localhost")
    #: contacts per transaction in a sync job (its checkpoint granularity).
    sync_chunk_contacts: int = env("SYNC_CHUNK_CONTACTS", 500)
