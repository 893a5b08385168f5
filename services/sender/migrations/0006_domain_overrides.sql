-- Operator overrides of the per-recipient-domain sending policy (domains.py, pacing.py),
-- written through /v1/domains/{domain}/override and read by every sender replica.
CREATE TABLE domain_override (
    domain       text PRIMARY KEY,
    -- messages per second and transactions in flight (0 = unlimited; NULL = the default's)
    rate         double precision CHECK (rate IS NULL OR rate >= 0),
    connections  integer CHECK (connections IS NULL OR connections >= 0),
    state        text NOT NULL DEFAULT 'normal' CHECK (state IN ('normal', 'throttled', 'paused')),
    -- the override ends then (NULL: until deleted)
    until        timestamptz,
    reason       text,
    -- warm-up: daily caps from warmup_start (UTC days), one per day
    warmup_start date,
    warmup_caps  integer[],
    updated_by   text NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    CHECK ((warmup_start IS NULL) = (warmup_caps IS NULL))
);
