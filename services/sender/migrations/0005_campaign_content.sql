-- send.requests v4 names its content by id; the content arrives once on campaign.content and
-- is kept here, shared by every sender replica and surviving restarts (contents.py).
CREATE TABLE campaign_content (
    content_id  text PRIMARY KEY,
    campaign_id text NOT NULL,
    content     jsonb NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
-- Upkeep forgets the content of campaigns whose ledger rows are all forgotten.
CREATE INDEX campaign_content_received_idx ON campaign_content (received_at);
