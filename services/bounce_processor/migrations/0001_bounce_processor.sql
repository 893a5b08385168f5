-- The bounce processor's schema: bounce counters, the feedback log, inbound bounce mail
-- (SPEC §5, F-30 to F-34).

-- What the rules know about a contact (F-31, F-32). email: the address our mail went to
-- (delivery.results), so a DSN that names a forwarded address still stops the right one.
CREATE TABLE contact_state (
    contact_id      bigint PRIMARY KEY,
    email           text,
    soft_streak     int NOT NULL DEFAULT 0 CHECK (soft_streak >= 0),
    delivery_status text NOT NULL DEFAULT 'unconfirmed' CHECK (delivery_status IN
                        ('unconfirmed', 'ok', 'invalid_address', 'error', 'temporary_error', 'spam')),
    updated_at      timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 80);

-- Every classified failure, once per (campaign, contact, classification): a DSN that comes
-- twice, or a DSN after the SMTP reply that said the same, counts once.
CREATE TABLE bounce (
    campaign_id    text NOT NULL,
    contact_id     bigint NOT NULL,
    classification text NOT NULL CHECK (classification IN
                       ('invalid_address', 'temporary_error', 'policy', 'error', 'spam')),
    source         text NOT NULL CHECK (source IN ('dsn', 'arf', 'heuristic', 'smtp')),
    diagnostic     text,
    message_id     text,
    occurred_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (campaign_id, contact_id, classification)
);
CREATE INDEX bounce_contact_idx ON bounce (contact_id, occurred_at);

-- Mail received on the VERP return path, stored before the 250 (nothing acknowledged is
-- lost). Read mail is deleted; mail that cannot be attributed or read stays, 'rejected'
-- with the reason and its first BOUNCE_KEEP_BYTES.
CREATE TABLE inbound_mail (
    id           bigserial PRIMARY KEY,
    received_at  timestamptz NOT NULL DEFAULT now(),
    mail_from    text,
    rcpt_to      text NOT NULL,
    size         int NOT NULL,
    raw          bytea NOT NULL,
    status       text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'rejected')),
    reason       text,
    processed_at timestamptz
);
CREATE INDEX inbound_mail_pending_idx ON inbound_mail (id) WHERE status = 'pending';
CREATE INDEX inbound_mail_rejected_idx ON inbound_mail (received_at) WHERE status = 'rejected';

-- Opens and clicks per (campaign, contact): the first one makes a "unique" (F-34), hits
-- counts them all.
CREATE TABLE engagement (
    campaign_id text NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('open', 'click')),
    contact_id  bigint NOT NULL,
    hits        bigint NOT NULL,
    first_at    timestamptz NOT NULL,
    last_at     timestamptz NOT NULL,
    PRIMARY KEY (campaign_id, kind, contact_id)
);

-- Idempotency of consumed messages (delivery.results result ids).
CREATE TABLE processed_event (
    event_id     text PRIMARY KEY,
    processed_at timestamptz NOT NULL DEFAULT now()
);
