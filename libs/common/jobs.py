"""The one shape of a job's progress on ``jobs.events`` (imports, sync runs, exports)."""

from __future__ import annotations

import datetime as dt
from typing import Any


def job_event(
    job_id: str,
    *,
    kind: str,
    status: str,
    service: str,
    title: str,
    created_at: dt.datetime,
    requested_by: str | None = None,
    total: int | None = None,
    processed: int = 0,
    succeeded: int = 0,
    failed: int = 0,
    errors: list[dict[str, Any]] | None = None,
    detail: str | None = None,
) -> dict[str, Any]:
    """A JobEvent record; ``errors`` holds at most the first 100 row errors."""
    return {
        "job_id": job_id,
        "kind": kind,
        "status": status,
        "service": service,
        "title": title,
        "requested_by": requested_by,
        "total": total,
        "processed": processed,
        "succeeded": succeeded,
        "failed": failed,
        "errors": [
            {"line": e.get("line"), "field": e.get("field"), "message": e["message"]}
            for e in (errors or [])[:100]
        ],
        "detail": detail,
        "created_at": created_at,
        "updated_at": dt.datetime.now(dt.UTC),
    }
