-- The contacts service's schema: contacts, custom fields, groups and plans, memberships
-- (a projection of suppression state), saved filters, import jobs, idempotency, and the
-- projections of delivery history and feedback used by search (F-05) and score (F-08).

CREATE TABLE contact (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email               text NOT NULL,
    external_id         text,
    name                text,
    name_kana           text,
    company             text,
    department          text,
    title               text,
    phone               text,
    address             text,
    website             text,
    memo                text,
    acquired_at         date,
    acquisition_channel text,
    sales_status        text NOT NULL DEFAULT 'open'
        CHECK (sales_status IN ('open', 'replied', 'called', 'visited', 'contracted', 'lost')),
    engagement          text CHECK (engagement IN ('hot', 'active', 'inactive')),
    star                boolean NOT NULL DEFAULT false,
    tags                text[] NOT NULL DEFAULT '{}',
    custom              jsonb NOT NULL DEFAULT '{}',
    score               integer NOT NULL DEFAULT 0,
    delivery_status     text NOT NULL DEFAULT 'unconfirmed'
        CHECK (delivery_status IN ('unconfirmed', 'ok', 'invalid_address', 'error',
                                   'temporary_error', 'spam')),
    version             bigint NOT NULL DEFAULT 1,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX contact_email_key ON contact (email);
CREATE UNIQUE INDEX contact_external_id_key ON contact (external_id) WHERE external_id IS NOT NULL;
CREATE INDEX contact_tags_idx ON contact USING gin (tags);
CREATE INDEX contact_custom_idx ON contact USING gin (custom jsonb_path_ops);
CREATE INDEX contact_updated_idx ON contact (updated_at, id);
CREATE INDEX contact_score_idx ON contact (score, id);

-- F-02: typed custom fields.
CREATE TABLE field_definition (
    key        text PRIMARY KEY CHECK (key ~ '^[a-z][a-z0-9_]{0,62}$'),
    label      text NOT NULL,
    type       text NOT NULL CHECK (type IN ('text', 'number', 'date', 'boolean', 'choice')),
    choices    text[] NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Groups and step-mail plans share one id space: a membership names either.
CREATE TABLE contact_group (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind       text NOT NULL DEFAULT 'group' CHECK (kind IN ('group', 'plan')),
    name       text NOT NULL,
    description text,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (kind, name)
);

-- Projection of membership state. Joins are recorded here when contacts asks suppression
-- for them; state changes arrive on suppression.changes and win when newer.
CREATE TABLE membership (
    contact_id bigint NOT NULL REFERENCES contact (id) ON DELETE CASCADE,
    group_id   bigint NOT NULL REFERENCES contact_group (id) ON DELETE CASCADE,
    state      text NOT NULL CHECK (state IN ('deliverable', 'unsubscribed', 'banned')),
    method     text NOT NULL,
    joined_at  timestamptz NOT NULL DEFAULT now(),
    changed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (contact_id, group_id)
);
CREATE INDEX membership_group_idx ON membership (group_id, state, contact_id);

-- F-06: saved filters, global (group_id NULL) or scoped to one group.
CREATE TABLE saved_filter (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name       text NOT NULL,
    group_id   bigint REFERENCES contact_group (id) ON DELETE CASCADE,
    filter     jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX saved_filter_name_key ON saved_filter (coalesce(group_id, 0), name);

-- Idempotency: every consumed event or command id, once.
CREATE TABLE processed_event (
    event_id     text PRIMARY KEY,
    processed_at timestamptz NOT NULL DEFAULT now()
);

-- Projection of delivery.results and feedback.events: one row per contact, campaign, kind.
CREATE TABLE delivery_history (
    contact_id  bigint NOT NULL,
    campaign_id text NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('received', 'errored', 'opened', 'clicked')),
    first_at    timestamptz NOT NULL,
    last_at     timestamptz NOT NULL,
    count       integer NOT NULL DEFAULT 1,
    PRIMARY KEY (contact_id, kind, campaign_id)
);
CREATE INDEX delivery_history_campaign_idx ON delivery_history (campaign_id, kind, contact_id);
CREATE INDEX delivery_history_recent_idx ON delivery_history (kind, last_at, contact_id);

-- Engagement points for the score (F-08): each open/click once, by its event id.
CREATE TABLE engagement (
    event_id    text PRIMARY KEY,
    contact_id  bigint NOT NULL,
    campaign_id text NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('open', 'click')),
    points      integer NOT NULL,
    occurred_at timestamptz NOT NULL
);
CREATE INDEX engagement_contact_idx ON engagement (contact_id, occurred_at);

-- F-04 import jobs and their row errors.
CREATE TABLE import_job (
    id           text PRIMARY KEY,
    status       text NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed')),
    mode         text NOT NULL,
    key_field    text NOT NULL,
    encoding     text NOT NULL,
    filename     text,
    requested_by text,
    mapping      jsonb NOT NULL DEFAULT '{}',
    payload      bytea NOT NULL,            -- the uploaded file, so a restart resumes the job
    next_line    integer NOT NULL DEFAULT 0, -- checkpoint: data lines before it are committed
    total        integer NOT NULL DEFAULT 0,
    inserted     integer NOT NULL DEFAULT 0,
    updated      integer NOT NULL DEFAULT 0,
    skipped      integer NOT NULL DEFAULT 0,
    failed       integer NOT NULL DEFAULT 0,
    detail       text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE import_error (
    job_id  text NOT NULL REFERENCES import_job (id) ON DELETE CASCADE,
    line    integer NOT NULL,
    field   text,
    message text NOT NULL
);
CREATE INDEX import_error_job_idx ON import_error (job_id, line);
