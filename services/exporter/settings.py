"""Settings of the exporter service (environment variables; see README's table)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from libs.common.settings import CommonSettings, env


def _default_export_dir() -> Path:
    return Path(os.environ.get("TAYORI_HOME", ".tayori")) / "exports"


@dataclass(frozen=True, repr=False)
class ExporterSettings(CommonSettings):
    service: str = "exporter"
    http_port: int = env("HTTP_PORT", 8086)
    #: the contacts service's HTTP API: its bulk read (POST /v1/contacts/stream).
    contacts_url: str = env("CONTACTS_URL", "http://127.0.0.1:8081")
    #: the scheduler's HTTP API: a campaign's frozen recipient list (recipients.csv).
    scheduler_url: str = env("SCHEDULER_URL", "http://127.0.0.1:8083")
    #: where export files are written (a temp name, renamed when complete).
    export_dir: Path = env("EXPORT_DIR", _default_export_dir())  # noqa: RUF009 — read once
    #: base of the download links in completion mails (this service as users reach it).
    public_url: str = env("EXPORTER_PUBLIC_URL", "http://127.0.0.1:8086")
    #: F-41: how long a download link works; the file is deleted after it.
    link_ttl_seconds: int = env("EXPORT_LINK_TTL_SECONDS", 24 * 3600)
    #: seconds between two sweeps for expired files.
    sweep_seconds: float = env("EXPORT_SWEEP_SECONDS", 60.0)
    #: exports one process runs at once (the others wait, queued).
    concurrency: int = env("EXPORT_CONCURRENCY", 2)
    #: the zone of times written into export files (配信停止日時, created_at...).
    time_zone: str = env("EXPORT_TIME_ZONE", "Asia/Tokyo")
    #: seconds between two progress records of a running export (jobs.events, heartbeat).
    progress_seconds: float = env("EXPORT_PROGRESS_SECONDS", 2.0)
    #: a running export whose heartbeat is older than this is taken over (its process died).
    stale_seconds: float = env("EXPORT_STALE_SECONDS", 120.0)
    #: seconds to wait for a row source (contacts, scheduler) to send more data.
    read_timeout_seconds: float = env("EXPORT_READ_TIMEOUT_SECONDS", 60.0)
    #: a row source away (unreachable, 503, its stream broken off) is asked again from the
    #: start of the export, with backoff, for this long; then the export fails.
    source_patience_seconds: float = env("EXPORT_SOURCE_PATIENCE_SECONDS", 300.0)
    #: where completion mails go when a request names no address.
    operator_email: str = env("TAYORI_OPERATOR_EMAIL", "operator@localhost")
