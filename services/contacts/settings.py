"""Settings of the contacts service (environment variables; see README's table)."""

from __future__ import annotations

from dataclasses import dataclass

from libs.common.settings import CommonSettings, env


@dataclass(frozen=True, repr=False)
class ContactsSettings(CommonSettings):
    service: str = "contacts"
    http_port: int = env("HTTP_PORT", 8081)
    #: F-08 points for an open and a click.
    score_open_points: int = env("SCORE_OPEN_POINTS", 1)
    score_click_points: int = env("SCORE_CLICK_POINTS", 3)
    #: how often expired score points are dropped and old idempotency ids forgotten.
    maintenance_interval_seconds: float = env("MAINTENANCE_INTERVAL_SECONDS", 3600.0)
    #: days an event id is remembered for deduplication (far beyond any redelivery).
    processed_event_retention_days: int = env("PROCESSED_EVENT_RETENTION_DAYS", 14)
    #: largest CSV upload accepted by POST /v1/imports.
    import_max_bytes: int = env("IMPORT_MAX_BYTES", 200 * 1024 * 1024)
    #: rows committed per transaction by an import job (its checkpoint granularity).
    import_chunk_rows: int = env("IMPORT_CHUNK_ROWS", 1000)
