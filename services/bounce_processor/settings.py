"""Settings of the bounce processor (environment variables; see README's table)."""

from __future__ import annotations

from dataclasses import dataclass

from libs.common.settings import CommonSettings, env


@dataclass(frozen=True, repr=False)
class BounceSettings(CommonSettings):
    service: str = "bounce_processor"
    http_port: int = env("HTTP_PORT", 8085)
    #: the inbound SMTP listener for the VERP return path (the bounce domain's MX points here).
    smtp_host: str = env("BOUNCE_SMTP_HOST", "0.0.0.0")
    smtp_port: int = env("BOUNCE_SMTP_PORT", 2525)
    #: the domain of VERP return paths b-<token>@<domain>; RCPT to other domains is refused.
    bounce_domain: str = env("BOUNCE_DOMAIN", "bounces.localhost")
    #: F-31: this many soft bounces in a row (no open or click between) stop the address.
    soft_threshold: int = env("BOUNCE_SOFT_THRESHOLD", 5)
    #: largest inbound mail accepted (SMTP 552 beyond); DSNs carry headers, rarely more.
    max_message_bytes: int = env("BOUNCE_MAX_MESSAGE_BYTES", 2 << 20)
    #: bytes of an unattributable or unreadable mail kept with its reason.
    keep_bytes: int = env("BOUNCE_KEEP_BYTES", 64 << 10)
    #: inbound mails read and applied per transaction.
    batch: int = env("BOUNCE_BATCH", 200)
    #: upkeep: how often, and how long consumed result ids and unreadable mail are kept.
    maintenance_interval_seconds: float = env("MAINTENANCE_INTERVAL_SECONDS", 3600.0)
    processed_event_retention_days: int = env("PROCESSED_EVENT_RETENTION_DAYS", 14)
    rejected_retention_days: int = env("BOUNCE_REJECTED_RETENTION_DAYS", 30)
