-- campaign.control v2 (issue 21): a pause or resume with `domains` holds, or lets go, a
-- campaign's mail to those receiving domains only (the complaint guard). One row per
-- (campaign, domain) ever named: held = its mail waits now. A resumed domain keeps its row
-- (held = false) so that, per domain, the later command wins, as apply-control does for the
-- whole campaign. A restart reads the held rows back (agents.load_stopped).
CREATE TABLE campaign_domain_control (
    campaign_id text NOT NULL,
    domain      text NOT NULL,       -- lower case, an IDN as its A-label
    held        boolean NOT NULL,
    reason      text,
    issued_at   timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (campaign_id, domain)
);
