-- Named SQL of the exporter service (loaded once by libs.common.db.Queries).

-- Export jobs ----------------------------------------------------------------------------

-- name: insert-job
-- A job from its ExportRequest; a redelivered request of a known job changes nothing.
INSERT INTO export_job (id, request, requested_by, notify_email, created_at, requester)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (id) DO NOTHING
RETURNING *;

-- name: job
SELECT * FROM export_job WHERE id = $1;

-- name: claim-job
-- queued → running for run $4, or take a running job up again: run $4's own (it lost the
-- database mid-export), or one whose process stopped beating ($2 seconds).
UPDATE export_job
SET status = 'running', started_at = $3, heartbeat_at = now(), updated_at = now(),
    rows_written = 0, replaced_chars = 0, error = NULL, runner = $4
WHERE id = $1
  AND (status = 'queued'
       OR (status = 'running'
           AND (runner = $4 OR heartbeat_at < now() - make_interval(secs => $2))))
RETURNING *;

-- name: progress
UPDATE export_job
SET rows_written = $2, estimated_total = COALESCE($3, estimated_total),
    heartbeat_at = now(), updated_at = now()
WHERE id = $1 AND status = 'running'
RETURNING *;

-- name: heartbeat
-- Run $2 still works on its job (libs.common.jobrunner beats while the export streams).
UPDATE export_job SET heartbeat_at = now()
WHERE id = $1 AND runner = $2 AND status = 'running';

-- name: finish-done
-- A finished job's total is what it wrote, no longer the planner's estimate.
UPDATE export_job
SET status = 'done', rows_written = $2, estimated_total = $2, replaced_chars = $3,
    file_name = $4, size_bytes = $5,
    finished_at = $6, expires_at = $7, updated_at = now()
WHERE id = $1 AND status = 'running'
RETURNING *;

-- name: finish-failed
UPDATE export_job
SET status = 'failed', rows_written = $2, error = $3, finished_at = $4, updated_at = now()
WHERE id = $1 AND status = 'running'
RETURNING *;

-- name: unfinished-jobs
SELECT id FROM export_job WHERE status IN ('queued', 'running') ORDER BY created_at;

-- name: expired-files
-- Files whose link has expired, marked deleted (the caller unlinks them after the commit).
UPDATE export_job
SET file_deleted_at = $1, updated_at = now()
WHERE status = 'done' AND file_deleted_at IS NULL AND expires_at <= $1
RETURNING id, file_name;

-- The jobs list (F-43) ---------------------------------------------------------------------

-- name: upsert-jobs
-- The newest state per job; a record not newer than the one kept is ignored.
INSERT INTO job (job_id, kind, status, service, title, requested_by, total, processed,
    succeeded, failed, errors, detail, created_at, updated_at)
SELECT job_id, kind, status, service, title, requested_by, total, processed, succeeded, failed,
    errors::jsonb, detail, created_at, updated_at
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
    $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[], $11::text[], $12::text[],
    $13::timestamptz[], $14::timestamptz[])
    AS u (job_id, kind, status, service, title, requested_by, total, processed, succeeded,
          failed, errors, detail, created_at, updated_at)
ON CONFLICT (job_id) DO UPDATE SET
    kind = EXCLUDED.kind, status = EXCLUDED.status, service = EXCLUDED.service,
    title = EXCLUDED.title, requested_by = EXCLUDED.requested_by, total = EXCLUDED.total,
    processed = EXCLUDED.processed, succeeded = EXCLUDED.succeeded, failed = EXCLUDED.failed,
    errors = EXCLUDED.errors, detail = EXCLUDED.detail, created_at = EXCLUDED.created_at,
    updated_at = EXCLUDED.updated_at
WHERE job.updated_at < EXCLUDED.updated_at;

-- name: jobs-page
-- Newest first; keyset after ($1 created_at, $2 job_id); optional kind and status.
SELECT * FROM job
WHERE ($1::timestamptz IS NULL OR (created_at, job_id) < ($1, $2))
  AND ($3::text IS NULL OR kind = $3)
  AND ($4::text IS NULL OR status = $4)
ORDER BY created_at DESC, job_id DESC
LIMIT $5;
