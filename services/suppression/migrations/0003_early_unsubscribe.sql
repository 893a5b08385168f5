-- A reader's unsubscribe that arrived before the membership it names (F-13): contacts
-- records a join at once and the Join command reaches this service a moment later, so a
-- link used in that moment is kept here and applied when the join arrives — when it was
-- joined before the click (a join made after the click is a new subscription and stands).
CREATE TABLE early_unsubscribe (
    contact_id  bigint NOT NULL,
    group_id    bigint NOT NULL,
    campaign_id text,
    clicked_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (contact_id, group_id)
);
CREATE INDEX early_unsubscribe_clicked_idx ON early_unsubscribe (clicked_at);
