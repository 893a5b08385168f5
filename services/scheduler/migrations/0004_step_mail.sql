-- Step mail (F-29) and re-sending (F-28).

-- Memberships as suppression publishes them (suppression.changes kind=membership), the
-- newest version per (group, contact). The scheduler cannot tell a plan from a group by the
-- change alone, so it keeps every membership: a plan whose schedule is defined after its
-- members joined still enrols them.
CREATE TABLE member (
    group_id   bigint NOT NULL,
    contact_id bigint NOT NULL,
    state      text NOT NULL,
    changed_at timestamptz NOT NULL,
    version    bigint NOT NULL,
    PRIMARY KEY (group_id, contact_id)
);

-- The schedule of a step-mail plan; the plan (id, name, memberships) is contacts'.
CREATE TABLE plan (
    id           bigint PRIMARY KEY,
    name         text NOT NULL,
    category_id  bigint NOT NULL REFERENCES category (id),
    from_address text NOT NULL,
    from_name    text NOT NULL DEFAULT '',
    reply_to     text,
    coupon_url   text,
    track_opens  boolean NOT NULL DEFAULT true,
    track_clicks boolean NOT NULL DEFAULT true,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL
);

-- A step; its id is the campaign id of its sends on the topics. Removed steps stay for
-- their statistics and are never due again.
CREATE TABLE plan_step (
    id            uuid PRIMARY KEY,
    plan_id       bigint NOT NULL REFERENCES plan (id) ON DELETE CASCADE,
    position      int NOT NULL,
    day_offset    int NOT NULL CHECK (day_offset >= 0),
    send_time     text NOT NULL,
    subject       text NOT NULL,
    format        text NOT NULL CHECK (format IN ('text', 'html')),
    body          text NOT NULL,
    -- when day_offset / send_time were set: the step is never due for an earlier moment.
    timed_since   timestamptz NOT NULL,
    removed_at    timestamptz,
    released      bigint NOT NULL DEFAULT 0,
    success       bigint NOT NULL DEFAULT 0,
    error         bigint NOT NULL DEFAULT 0,
    suppressed    bigint NOT NULL DEFAULT 0,
    skipped       bigint NOT NULL DEFAULT 0,
    opens         bigint NOT NULL DEFAULT 0,
    clicks        bigint NOT NULL DEFAULT 0,
    unique_opens  bigint NOT NULL DEFAULT 0,
    unique_clicks bigint NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL
);
CREATE INDEX plan_step_plan_idx ON plan_step (plan_id, position) WHERE removed_at IS NULL;

-- One enrolment per join: deliverable starts one (at the change's changed_at), any other
-- state (unsubscribed, banned, left) ends it; joining again starts a new one.
CREATE TABLE enrolment (
    id           bigserial PRIMARY KEY,
    plan_id      bigint NOT NULL,
    contact_id   bigint NOT NULL,
    enrolled_at  timestamptz NOT NULL,
    ended_at     timestamptz,
    ended_reason text
);
CREATE UNIQUE INDEX enrolment_active_idx ON enrolment (plan_id, contact_id) WHERE ended_at IS NULL;
CREATE INDEX enrolment_due_idx ON enrolment (plan_id, enrolled_at) WHERE ended_at IS NULL;

-- Each (step, enrolment) once: written in the transaction that releases it (a row exists
-- = released or skipped), with the first delivery result.
CREATE TABLE step_delivery (
    step_id       uuid NOT NULL REFERENCES plan_step (id) ON DELETE CASCADE,
    enrolment_id  bigint NOT NULL,
    contact_id    bigint NOT NULL,
    released_at   timestamptz,
    skipped       text,
    outcome       text CHECK (outcome IN ('success', 'error', 'suppressed')),
    result_id     text,
    result_at     timestamptz,
    PRIMARY KEY (step_id, enrolment_id)
);
CREATE INDEX step_delivery_contact_idx ON step_delivery (step_id, contact_id);

-- First open / click per (step, contact), for the unique counts.
CREATE TABLE step_feedback (
    step_id    uuid NOT NULL REFERENCES plan_step (id) ON DELETE CASCADE,
    contact_id bigint NOT NULL,
    kind       text NOT NULL CHECK (kind IN ('open', 'click')),
    first_at   timestamptz NOT NULL,
    PRIMARY KEY (step_id, contact_id, kind)
);

-- F-28: the campaign a re-send was made from (配信実績の再送信).
ALTER TABLE campaign ADD COLUMN resent_from uuid REFERENCES campaign (id) ON DELETE SET NULL;
