-- The scheduler's schema: categories, campaigns, their frozen recipient ledgers (SPEC §4).

-- 配信可能時間帯: local "HH:MM" start and end in an IANA zone; start > end crosses midnight.
CREATE TABLE category (
    id           bigserial PRIMARY KEY,
    name         text NOT NULL,
    window_start text NOT NULL,
    window_end   text NOT NULL,
    time_zone    text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE campaign (
    id                   uuid PRIMARY KEY,
    -- creation order (newest first in lists; the clock may stand still in tests).
    number               bigserial UNIQUE,
    name                 text NOT NULL,
    category_id          bigint NOT NULL REFERENCES category (id),
    group_id             bigint,
    filter               jsonb,
    saved_filter_id      bigint,
    from_address         text NOT NULL,
    from_name            text NOT NULL DEFAULT '',
    reply_to             text,
    subject              text NOT NULL,
    format               text NOT NULL CHECK (format IN ('text', 'html')),
    body                 text NOT NULL,
    coupon_url           text,
    dedupe               text NOT NULL DEFAULT 'none' CHECK (dedupe IN ('none', 'by_email')),
    include_unsubscribed boolean NOT NULL DEFAULT false,
    scheduled_at         timestamptz NOT NULL,
    status               text NOT NULL DEFAULT 'draft' CHECK (status IN (
        'draft', 'reserving', 'scheduled', 'sending', 'sent', 'aggregating', 'aggregated',
        'failed', 'halted', 'cancelled')),
    status_reason        text,
    -- the snapshot request whose answer is this campaign's ledger (others are ignored).
    request_id           uuid,
    -- the sending window closed while sending: nothing is released until it opens.
    paused               boolean NOT NULL DEFAULT false,
    planned              bigint NOT NULL DEFAULT 0,
    success              bigint NOT NULL DEFAULT 0,
    error                bigint NOT NULL DEFAULT 0,
    suppressed           bigint NOT NULL DEFAULT 0,
    released             bigint NOT NULL DEFAULT 0,
    created_by           text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    reserved_at          timestamptz,
    started_at           timestamptz,
    finished_at          timestamptz,
    updated_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX campaign_active_idx ON campaign (status)
    WHERE status IN ('scheduled', 'sending', 'sent', 'aggregating');

-- Every status change, with the scheduler clock's time and why.
CREATE TABLE campaign_status_change (
    id          bigserial PRIMARY KEY,
    campaign_id uuid NOT NULL REFERENCES campaign (id) ON DELETE CASCADE,
    status      text NOT NULL,
    reason      text,
    at          timestamptz NOT NULL
);
CREATE INDEX campaign_status_change_idx ON campaign_status_change (campaign_id, id);

-- The recipient ledger: the frozen list (one row per seq of the snapshot answer), what
-- was released and the first result of each recipient.
CREATE TABLE recipient (
    campaign_id      uuid NOT NULL REFERENCES campaign (id) ON DELETE CASCADE,
    seq              bigint NOT NULL,
    contact_id       bigint NOT NULL,
    email            text NOT NULL,
    group_id         bigint,
    membership_state text,
    merge_values     jsonb NOT NULL DEFAULT '{}',
    -- how many times released; send.requests carry it as attempt.
    attempt          int NOT NULL DEFAULT 0,
    released_at      timestamptz,
    outcome          text CHECK (outcome IN ('success', 'error', 'suppressed')),
    result_id        text,
    result_at        timestamptz,
    PRIMARY KEY (campaign_id, seq)
);
CREATE UNIQUE INDEX recipient_contact_idx ON recipient (campaign_id, contact_id);
CREATE INDEX recipient_unreleased_idx ON recipient (campaign_id, seq) WHERE released_at IS NULL;

CREATE TABLE processed_event (
    event_id     text PRIMARY KEY,
    processed_at timestamptz NOT NULL DEFAULT now()
);
