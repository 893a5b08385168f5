-- The sender's schema: its send ledger, campaign control state and its own copy of
-- suppression state (fed by suppression.changes) for the last-moment can-send rule (F-16).

-- One row per (campaign, step, contact): a redelivered or replayed request never sends twice.
-- claimed → handed (the end of data is about to be written) → done. See ledger.py.
CREATE TABLE send_ledger (
    campaign_id  text NOT NULL,          -- 'mail:<mail_id>' for mail.system
    step_id      text NOT NULL DEFAULT '', -- '' for a campaign, 'test:<id>:<n>' for test sends
    contact_id   bigint NOT NULL,        -- the recipient's index for mail.system
    kind         text NOT NULL CHECK (kind IN ('campaign', 'test', 'system')),
    status       text NOT NULL CHECK (status IN ('claimed', 'handed', 'done')),
    email        text NOT NULL,
    request_id   text,
    relay        text,
    message_id   text,
    outcome      text,
    result       jsonb,                  -- the DeliveryResult as published (campaign rows only)
    claimed_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (campaign_id, step_id, contact_id)
);
CREATE INDEX send_ledger_unfinished_idx ON send_ledger (status) WHERE status <> 'done';

-- campaign.control: halted and cancelled are final, paused holds until resumed.
CREATE TABLE campaign_control (
    campaign_id text PRIMARY KEY,
    state       text NOT NULL CHECK (state IN ('active', 'paused', 'halted', 'cancelled')),
    reason      text,
    issued_at   timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- The copy of suppression.changes; each entity keeps its highest version. Cleared and left
-- entities stay as rows (state 'cleared' / 'left') so an older change cannot come back.
CREATE TABLE membership_copy (
    contact_id bigint NOT NULL,
    group_id   bigint NOT NULL,
    state      text NOT NULL,
    version    bigint NOT NULL,
    PRIMARY KEY (contact_id, group_id)
);

CREATE TABLE contact_black_copy (
    contact_id bigint PRIMARY KEY,
    black      boolean NOT NULL,
    version    bigint NOT NULL
);

CREATE TABLE address_copy (
    email   text PRIMARY KEY,               -- lower-cased
    state   text NOT NULL,                  -- bounced | complained | invalid | cleared
    version bigint NOT NULL
);

CREATE TABLE blacklist_copy (
    value   text PRIMARY KEY,               -- normalised rule value (address or domain)
    state   text NOT NULL,                  -- exact | suffix | cleared
    version bigint NOT NULL
);

-- Idempotency of campaign.control commands.
CREATE TABLE processed_event (
    event_id     text PRIMARY KEY,
    processed_at timestamptz NOT NULL DEFAULT now()
);
