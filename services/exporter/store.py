"""The exporter's SQL (queries.sql) and the shapes its rows take in the API."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import asyncpg

from libs.common.db import Queries
from libs.common.errors import NotFound
from services.exporter.processor import latest_per_job

QUERIES = Queries(Path(__file__).with_name("queries.sql"))


def job_uuid(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise NotFound(f"export {raw} does not exist") from None


async def get_job(conn: asyncpg.Connection | asyncpg.Pool, raw_id: str) -> asyncpg.Record:
    row = await conn.fetchrow(QUERIES["job"], job_uuid(raw_id))
    if row is None:
        raise NotFound(f"export {raw_id} does not exist")
    return row


def export_json(row: Mapping[str, Any], download_url: str | None) -> dict[str, Any]:
    """GET /v1/exports/{id}: the job, its progress (rows done / estimated total) and link."""
    request = row["request"]
    return {
        "id": str(row["id"]),
        "status": row["status"],
        "source": request["source"],
        "columns": request["columns"],
        "header": request["header"],
        "encoding": request["encoding"],
        "safe_csv": request.get("safe_csv", True),
        "requested_by": row["requested_by"],
        "requester": row["requester"],
        "notify_email": row["notify_email"],
        "rows": row["rows_written"],
        "estimated_total": row["estimated_total"],
        "replaced_characters": row["replaced_chars"],
        "size_bytes": row["size_bytes"],
        "error": row["error"],
        "created_at": row["created_at"],
        "started_at": row["started_at"],
        "finished_at": row["finished_at"],
        "expires_at": row["expires_at"],
        "file_deleted": row["file_deleted_at"] is not None,
        "download_url": download_url,
    }


def listed_job(row: Mapping[str, Any]) -> dict[str, Any]:
    """One line of GET /v1/jobs (ジョブ確認)."""
    return {key: row[key] for key in row.keys()}


async def upsert_jobs(conn: asyncpg.Connection, events: list[Mapping[str, Any]]) -> None:
    """Keep the newest state of each job (jobs.events is an upsert by job_id)."""
    latest = latest_per_job(events)
    if not latest:
        return
    columns = (
        "job_id",
        "kind",
        "status",
        "service",
        "title",
        "requested_by",
        "total",
        "processed",
        "succeeded",
        "failed",
    )
    values: list[list[Any]] = [[e[c] for e in latest] for c in columns]
    values.append([json.dumps(e["errors"], ensure_ascii=False) for e in latest])
    values += [[e[c] for e in latest] for c in ("detail", "created_at", "updated_at")]
    await conn.execute(QUERIES["upsert-jobs"], *values)
