-- The complaint guard (issue 21): per campaign, the receiving domains whose remaining sends
-- deliverability held (campaign.guard) and those an operator resumed since. The release loop
-- releases no row whose recipient's domain is held (services/scheduler/guard.py).
CREATE TABLE campaign_guard (
    campaign_id uuid PRIMARY KEY REFERENCES campaign (id) ON DELETE CASCADE,
    -- domains held now: lower case, as deliverability names them; never one of resumed.
    held        text[] NOT NULL DEFAULT '{}',
    -- domains an operator resumed; a later record naming them again does not hold them.
    resumed     text[] NOT NULL DEFAULT '{}',
    -- domains an operator gave up: their held rows were recorded suppressed (no mail) so the
    -- campaign could finish; a later record naming them does not hold them again.
    dropped     text[] NOT NULL DEFAULT '{}',
    -- the newest decision's figures, for people (the campaign page shows why).
    guard_id    text NOT NULL,
    reason      text NOT NULL,
    delivered   bigint NOT NULL,
    complaints  bigint NOT NULL,
    decided_at  timestamptz NOT NULL,
    -- who resumed last, and when (X-Tayori-Requested-By, else the token's role).
    resumed_by  text,
    resumed_at  timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- A row to a held domain, waiting unreleased: out of the release index, so a campaign whose
-- other rows are all out does not read its held rows again on every tick. Set and cleared
-- with the guard's held set (a row the guard holds has released_at NULL). The result's
-- update of a row (outcome) changes neither column: it stays HOT (0002).
ALTER TABLE recipient ADD COLUMN held boolean NOT NULL DEFAULT false;
DROP INDEX recipient_unreleased_idx;
CREATE INDEX recipient_unreleased_idx ON recipient (campaign_id, seq)
    WHERE released_at IS NULL AND NOT held;
