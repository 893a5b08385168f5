-- The exporter's schema: export jobs and their files (F-40, F-41), and the one jobs list
-- (F-43) kept from jobs.events.

CREATE TABLE export_job (
    id             uuid PRIMARY KEY,
    -- the ExportRequest as published on export.requests (columns, source, encoding...).
    request        jsonb NOT NULL,
    status         text NOT NULL DEFAULT 'queued'
        CHECK (status IN ('queued', 'running', 'done', 'failed')),
    -- the role of the token that asked: downloading needs at least this role.
    requested_by   text NOT NULL,
    notify_email   text NOT NULL,
    estimated_total bigint,
    rows_written   bigint NOT NULL DEFAULT 0,
    -- characters the chosen encoding cannot hold, written as '?'.
    replaced_chars bigint NOT NULL DEFAULT 0,
    file_name      text,
    size_bytes     bigint,
    error          text,
    created_at     timestamptz NOT NULL,
    started_at     timestamptz,
    finished_at    timestamptz,
    expires_at     timestamptz,
    -- when the sweeper deleted the file (the link then answers 410).
    file_deleted_at timestamptz,
    -- a running job's liveness (database time); a stale one is taken over.
    heartbeat_at   timestamptz,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX export_job_unfinished_idx ON export_job (status) WHERE status IN ('queued', 'running');
CREATE INDEX export_job_expiring_idx ON export_job (expires_at)
    WHERE status = 'done' AND file_deleted_at IS NULL;

-- F-43: every job of every service, as its latest jobs.events record says.
CREATE TABLE job (
    job_id       text PRIMARY KEY,
    kind         text NOT NULL,
    status       text NOT NULL,
    service      text NOT NULL,
    title        text NOT NULL,
    requested_by text,
    total        bigint,
    processed    bigint NOT NULL,
    succeeded    bigint NOT NULL,
    failed       bigint NOT NULL,
    errors       jsonb NOT NULL,
    detail       text,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL
);
CREATE INDEX job_newest_idx ON job (created_at DESC, job_id DESC);
