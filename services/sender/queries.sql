-- Named SQL of the sender service (loaded once by libs.common.db.Queries).

-- name: claim
-- Claim a batch of ledger keys in one statement. New keys become 'claimed'; for keys that
-- were there already, the row as it was (status, stored result) tells what to do instead.
-- The join on send_ledger sees the table as it was before this statement's insert.
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[])
        AS i(campaign_id, step_id, contact_id, kind, email, request_id)
), fresh AS (
    INSERT INTO send_ledger
        (campaign_id, step_id, contact_id, kind, status, email, request_id, owner)
    SELECT campaign_id, step_id, contact_id, kind, 'claimed', email, request_id, $7 FROM input
    ON CONFLICT DO NOTHING
    RETURNING campaign_id, step_id, contact_id
)
SELECT i.campaign_id, i.step_id, i.contact_id, f.contact_id IS NOT NULL AS fresh,
       l.status, l.result, l.owner
FROM input i
LEFT JOIN fresh f USING (campaign_id, step_id, contact_id)
LEFT JOIN send_ledger l USING (campaign_id, step_id, contact_id);

-- name: adopt
-- Unfinished rows of a sender that is gone (its owner lock is free) become ours.
UPDATE send_ledger l
SET owner = $4, updated_at = now()
FROM unnest($1::text[], $2::text[], $3::bigint[]) AS u(campaign_id, step_id, contact_id)
WHERE l.campaign_id = u.campaign_id AND l.step_id = u.step_id AND l.contact_id = u.contact_id
  AND l.status IN ('claimed', 'handed');

-- name: owners
SELECT status, owner FROM send_ledger l
JOIN unnest($1::text[], $2::text[], $3::bigint[]) AS u(campaign_id, step_id, contact_id)
    USING (campaign_id, step_id, contact_id);

-- name: finish
-- Record outcomes with their delivery.results (published after the commit: ledger.py) in
-- one statement: the Ledger's group-commit cycle (its own transaction, one round trip) and
-- the suppressed outcomes of a batch's claim transaction.
-- The commit does not wait for the WAL flush (synchronous_commit off for this transaction
-- only): a crash of the *sender* loses nothing committed, and before a batch's offsets are
-- committed the handler makes everything durable with one flushing commit (Ledger.flush).
-- Only a PostgreSQL crash can lose the last cycles, and what they recorded is then resent
-- (same Message-ID) and re-reported: the ledger's rule, ledger.py.
WITH settings AS (
    SELECT set_config('synchronous_commit', 'off', true)
), finished AS (
    UPDATE send_ledger l
    SET status = 'done', outcome = u.outcome, relay = u.relay, message_id = u.message_id,
        result = u.result::jsonb, updated_at = now()
    FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[],
                $7::text[])
        AS u(campaign_id, step_id, contact_id, outcome, relay, message_id, result)
    WHERE l.campaign_id = u.campaign_id AND l.step_id = u.step_id
      AND l.contact_id = u.contact_id
    RETURNING 1
)
SELECT (SELECT count(*) FROM settings) AS asynchronous, (SELECT count(*) FROM finished) AS rows;

-- name: control-states
-- Campaigns of a batch that must not send now (state paused, halted, cancelled; NULL:
-- active) or not to some receiving domains (domains: the held ones; NULL: none).
SELECT campaign_id, c.state, h.domains
FROM (
    SELECT campaign_id, state FROM campaign_control
    WHERE campaign_id = ANY($1::text[]) AND state <> 'active'
) c
FULL JOIN (
    SELECT campaign_id, array_agg(domain) AS domains FROM campaign_domain_control
    WHERE campaign_id = ANY($1::text[]) AND held
    GROUP BY campaign_id
) h USING (campaign_id);

-- name: stopped-campaigns
-- control-states of every campaign (at start).
SELECT campaign_id, c.state, h.domains
FROM (SELECT campaign_id, state FROM campaign_control WHERE state <> 'active') c
FULL JOIN (
    SELECT campaign_id, array_agg(domain) AS domains FROM campaign_domain_control
    WHERE held
    GROUP BY campaign_id
) h USING (campaign_id);

-- name: apply-control
-- halted and cancelled are final; otherwise the later command wins.
INSERT INTO campaign_control AS c (campaign_id, state, reason, issued_at)
VALUES ($1, $2, $3, $4)
ON CONFLICT (campaign_id) DO UPDATE
SET state = excluded.state, reason = excluded.reason, issued_at = excluded.issued_at,
    updated_at = now()
WHERE c.state NOT IN ('halted', 'cancelled')
  AND (excluded.state IN ('halted', 'cancelled') OR c.issued_at <= excluded.issued_at)
RETURNING state;

-- name: control-state
SELECT state FROM campaign_control WHERE campaign_id = $1;

-- name: apply-domain-control
-- Hold ($2 true: a pause with domains) or let go (a resume) the campaign's mail to the
-- domains $3; per domain the later command wins. Nothing for a halted or cancelled
-- campaign: the whole of it stopped for good. Returns the domains changed.
INSERT INTO campaign_domain_control AS d (campaign_id, domain, held, reason, issued_at)
SELECT $1, x.domain, $2, $4, $5 FROM unnest($3::text[]) AS x (domain)
WHERE NOT EXISTS (
    SELECT 1 FROM campaign_control c
    WHERE c.campaign_id = $1 AND c.state IN ('halted', 'cancelled')
)
ON CONFLICT (campaign_id, domain) DO UPDATE
SET held = excluded.held, reason = excluded.reason, issued_at = excluded.issued_at,
    updated_at = now()
WHERE d.issued_at <= excluded.issued_at
RETURNING domain;

-- name: held-domains
-- The campaign's receiving domains whose mail is held now.
SELECT domain FROM campaign_domain_control WHERE campaign_id = $1 AND held ORDER BY domain;

-- name: copy-memberships
INSERT INTO membership_copy AS t (contact_id, group_id, state, version)
SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::bigint[])
ON CONFLICT (contact_id, group_id) DO UPDATE
SET state = excluded.state, version = excluded.version
WHERE t.version < excluded.version;

-- name: copy-contact-black
INSERT INTO contact_black_copy AS t (contact_id, black, version)
SELECT * FROM unnest($1::bigint[], $2::boolean[], $3::bigint[])
ON CONFLICT (contact_id) DO UPDATE
SET black = excluded.black, version = excluded.version
WHERE t.version < excluded.version;

-- name: copy-addresses
INSERT INTO address_copy AS t (email, state, version)
SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[])
ON CONFLICT (email) DO UPDATE
SET state = excluded.state, version = excluded.version
WHERE t.version < excluded.version;

-- name: copy-blacklist
INSERT INTO blacklist_copy AS t (value, state, version)
SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[])
ON CONFLICT (value) DO UPDATE
SET state = excluded.state, version = excluded.version
WHERE t.version < excluded.version;

-- name: memberships-for
SELECT m.contact_id, m.group_id, m.state
FROM membership_copy m
JOIN unnest($1::bigint[], $2::bigint[]) AS k(contact_id, group_id) USING (contact_id, group_id);

-- name: black-contacts
SELECT contact_id FROM contact_black_copy WHERE contact_id = ANY($1::bigint[]) AND black;

-- name: suppressed-addresses
SELECT email, state FROM address_copy WHERE email = ANY($1::text[]) AND state <> 'cleared';

-- name: blacklist-rules
SELECT value, state FROM blacklist_copy WHERE value = ANY($1::text[]) AND state <> 'cleared';

-- name: ledger-summary
SELECT status, outcome, count(*) AS n FROM send_ledger WHERE campaign_id = $1
GROUP BY status, outcome;

-- name: flush
-- One commit that waits for the WAL flush, and so for every earlier asynchronous commit:
-- assigning a transaction id makes the commit write a record (a read-only one would not).
SELECT txid_current();

-- name: forget-ledger
-- Finished rows claimed more than $1 days ago, at most $2 of them; how many went.
WITH gone AS (
    DELETE FROM send_ledger
    WHERE ctid IN (
        SELECT ctid FROM send_ledger
        WHERE claimed_at < now() - make_interval(days => $1) AND status = 'done'
        LIMIT $2
    )
    RETURNING 1
)
SELECT count(*) FROM gone;

-- name: forget-processed-events
WITH gone AS (
    DELETE FROM processed_event WHERE processed_at < now() - make_interval(days => $1)
    RETURNING 1
)
SELECT count(*) FROM gone;

-- name: store-contents
-- Contents from campaign.content (their ids already checked); an id names one content, so a
-- repeat changes nothing.
INSERT INTO campaign_content (content_id, campaign_id, content)
SELECT x.content_id, x.campaign_id, x.content::jsonb
FROM unnest($1::text[], $2::text[], $3::text[]) AS x (content_id, campaign_id, content)
ON CONFLICT DO NOTHING;

-- name: contents
SELECT content_id, campaign_id, content FROM campaign_content WHERE content_id = ANY($1::text[]);

-- name: forget-contents
-- Contents received more than $1 days ago of campaigns with no ledger row left (a request
-- older than the ledger's retention would be sent again anyway: see forget-ledger).
WITH gone AS (
    DELETE FROM campaign_content c
    WHERE c.received_at < now() - make_interval(days => $1)
      AND NOT EXISTS (SELECT 1 FROM send_ledger l WHERE l.campaign_id = c.campaign_id)
    RETURNING 1
)
SELECT count(*) FROM gone;

-- name: domain-overrides
-- Every operator override of a domain's sending policy (pacing.py loads them).
SELECT * FROM domain_override ORDER BY domain;

-- name: domain-override
SELECT * FROM domain_override WHERE domain = $1;

-- name: put-domain-override
-- Replace a domain's override (every field: a PUT).
INSERT INTO domain_override
    (domain, rate, connections, state, until, reason, warmup_start, warmup_caps, updated_by)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (domain) DO UPDATE SET
    rate = EXCLUDED.rate, connections = EXCLUDED.connections, state = EXCLUDED.state,
    until = EXCLUDED.until, reason = EXCLUDED.reason, warmup_start = EXCLUDED.warmup_start,
    warmup_caps = EXCLUDED.warmup_caps, updated_by = EXCLUDED.updated_by, updated_at = now()
RETURNING *;

-- name: delete-domain-override
DELETE FROM domain_override WHERE domain = $1 RETURNING domain;

-- name: daily-sends
-- Issue 20: campaign and step-mail deliveries with an outcome, per calendar day of their
-- claim in the zone $2, from the instant $1. send_ledger_claimed_at_brin bounds the read to
-- the window's pages (no btree here: an index on a column the ledger updates would cost the
-- hot path its HOT updates, migration 0003). The ledger keeps SENDER_LEDGER_RETENTION_DAYS.
SELECT (claimed_at AT TIME ZONE $2::text)::date AS day,
       count(*) FILTER (WHERE outcome = 'sent') AS sent,
       count(*) FILTER (WHERE outcome IN ('temporary_error', 'permanent_error', 'policy_error'))
           AS errors,
       count(*) FILTER (WHERE outcome = 'suppressed') AS suppressed
FROM send_ledger
WHERE claimed_at >= $1 AND kind = 'campaign' AND status = 'done'
GROUP BY 1;

-- name: hold
-- Held deliveries (holding.py): their requests, so that their batch may commit while they
-- wait for their domain. A key held already keeps its row.
INSERT INTO held_delivery
    (campaign_id, step_id, contact_id, domain, value, headers, trace)
SELECT x.campaign_id, x.step_id, x.contact_id, x.domain, x.value, x.headers::jsonb, x.trace
FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::bytea[], $6::text[],
            $7::text[])
    AS x (campaign_id, step_id, contact_id, domain, value, headers, trace)
ON CONFLICT DO NOTHING;

-- name: unhold
-- Held rows whose outcome is recorded and result acknowledged (or abandoned): gone.
DELETE FROM held_delivery h
USING unnest($1::text[], $2::text[], $3::bigint[]) AS u(campaign_id, step_id, contact_id)
WHERE h.campaign_id = u.campaign_id AND h.step_id = u.step_id AND h.contact_id = u.contact_id;

-- name: release
-- Abandoned deliveries (holding.Holder.abandoned: their campaign or domain stopped while
-- they queued): their unfinished rows, still ours, are let go (no owner), so that the
-- sender their request reaches again after a resume takes them over (claim, adopt).
UPDATE send_ledger l
SET owner = NULL, updated_at = now()
FROM unnest($1::text[], $2::text[], $3::bigint[]) AS u(campaign_id, step_id, contact_id)
WHERE l.campaign_id = u.campaign_id AND l.step_id = u.step_id AND l.contact_id = u.contact_id
  AND l.status IN ('claimed', 'handed') AND l.owner = $4;

-- name: held-among
-- Which of these keys are held (the claim skips them: their result comes when they go).
SELECT h.campaign_id, h.step_id, h.contact_id FROM held_delivery h
JOIN unnest($1::text[], $2::text[], $3::bigint[]) AS u(campaign_id, step_id, contact_id)
    USING (campaign_id, step_id, contact_id);

-- name: held-rows
-- Every held row's key with its ledger row's state (the sweep: agents.sweep_held); the
-- records only of those it takes over (held-records).
SELECT h.campaign_id, h.step_id, h.contact_id, l.status, l.owner
FROM held_delivery h
LEFT JOIN send_ledger l USING (campaign_id, step_id, contact_id)
ORDER BY h.held_at;

-- name: held-records
SELECT h.campaign_id, h.step_id, h.contact_id, h.value, h.headers, h.trace, l.status,
       l.result
FROM held_delivery h
JOIN unnest($1::text[], $2::text[], $3::bigint[]) AS u(campaign_id, step_id, contact_id)
    USING (campaign_id, step_id, contact_id)
LEFT JOIN send_ledger l USING (campaign_id, step_id, contact_id)
ORDER BY h.held_at;

-- name: adopt-held
-- A held row's unfinished ledger row becomes ours if its owner is still the one we saw
-- gone (another sender's sweep may have taken it meanwhile: then nothing is returned).
UPDATE send_ledger
SET owner = $5, updated_at = now()
WHERE campaign_id = $1 AND step_id = $2 AND contact_id = $3
  AND status IN ('claimed', 'handed') AND owner IS NOT DISTINCT FROM $4
RETURNING 1;

-- name: held-counts
-- How many deliveries of each of these campaigns are held now, by any sender (send.progress
-- v2 says so with each answer to a checkpoint: progress.py). Campaign mail only (step '').
SELECT campaign_id, count(*) AS held FROM held_delivery
WHERE campaign_id = ANY($1::text[]) AND step_id = ''
GROUP BY campaign_id;
