-- The suppression service's schema: who must never be mailed (SPEC §3, F-10 to F-16).

-- Every published change takes a number from here: consumers keep the highest per entity.
CREATE SEQUENCE change_version;

-- deliverable < unsubscribed < banned: propagation only ever strengthens a refusal.
CREATE FUNCTION state_rank(state text) RETURNS int LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE state WHEN 'deliverable' THEN 0 WHEN 'unsubscribed' THEN 1 ELSE 2 END
$$;

-- Projection of contacts.changelog (the address), plus what this service owns about a
-- contact: the black flag and the delivery status reported by the bounce processor.
CREATE TABLE contact (
    id                bigint PRIMARY KEY,
    email             text,
    changelog_version bigint NOT NULL DEFAULT 0,
    black             boolean NOT NULL DEFAULT false,
    black_changed_at  timestamptz,
    delivery_status   text,
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX contact_email_idx ON contact (lower(email));

-- F-10: the state of each (contact, group or plan), authoritative.
CREATE TABLE membership (
    contact_id  bigint NOT NULL,
    group_id    bigint NOT NULL,
    state       text NOT NULL CHECK (state IN ('deliverable', 'unsubscribed', 'banned')),
    method      text NOT NULL CHECK (method IN ('form', 'system', 'auto_sync', 'auto_stop', 'upstream')),
    campaign_id text,
    joined_at   timestamptz NOT NULL DEFAULT now(),
    changed_at  timestamptz NOT NULL DEFAULT now(),
    version     bigint NOT NULL DEFAULT nextval('change_version'),
    PRIMARY KEY (contact_id, group_id)
);
CREATE INDEX membership_state_idx ON membership (state, contact_id);

-- F-12: the two switches (one row).
CREATE TABLE sync_policy (
    id          int PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    unsubscribe boolean NOT NULL DEFAULT false,
    ban         boolean NOT NULL DEFAULT false,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO sync_policy (id) VALUES (1);

-- F-12: the job that applies a switch to existing data when it is turned on.
CREATE TABLE sync_job (
    id              text PRIMARY KEY,
    kind            text NOT NULL CHECK (kind IN ('unsubscribe', 'ban')),
    status          text NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed')),
    requested_by    text,
    after_contact   bigint NOT NULL DEFAULT 0,  -- checkpoint: contacts up to here are done
    contacts        integer NOT NULL DEFAULT 0,
    changed         integer NOT NULL DEFAULT 0,
    detail          text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- F-14: blacklist rules. Matching looks values up by equality (an address, or the domain
-- and each parent domain of an address), so it is an index lookup, not a scan.
CREATE TABLE blacklist_rule (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    title      text NOT NULL,
    match      text NOT NULL CHECK (match IN ('exact', 'suffix')),
    value      text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (match, value)
);

-- F-15: address-level suppressions; a cleared one is deleted (the change is published).
CREATE TABLE address_suppression (
    email      text PRIMARY KEY,  -- lower-cased
    reason     text NOT NULL CHECK (reason IN ('bounced', 'complained', 'invalid')),
    source     text,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Idempotency of consumed commands and events.
CREATE TABLE processed_event (
    event_id     text PRIMARY KEY,
    processed_at timestamptz NOT NULL DEFAULT now()
);
