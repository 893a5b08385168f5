-- Open and click tracking (F-34): per-campaign switches, and the campaign statistics fed by
-- feedback.events (opens, clicks, unique opens, unique clicks).

ALTER TABLE campaign
    ADD COLUMN track_opens   boolean NOT NULL DEFAULT true,
    ADD COLUMN track_clicks  boolean NOT NULL DEFAULT true,
    -- every open and click event, each counted once (its event_id in processed_event).
    ADD COLUMN opens         bigint NOT NULL DEFAULT 0,
    ADD COLUMN clicks        bigint NOT NULL DEFAULT 0,
    -- recipients who opened / clicked at least once.
    ADD COLUMN unique_opens  bigint NOT NULL DEFAULT 0,
    ADD COLUMN unique_clicks bigint NOT NULL DEFAULT 0;

-- The first open and the first click of each recipient: a row exists once it happened, so a
-- later event of the same kind is no longer unique (INSERT … ON CONFLICT DO NOTHING decides).
CREATE TABLE recipient_feedback (
    campaign_id uuid NOT NULL REFERENCES campaign (id) ON DELETE CASCADE,
    contact_id  bigint NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('open', 'click')),
    first_at    timestamptz NOT NULL,
    PRIMARY KEY (campaign_id, contact_id, kind)
);
