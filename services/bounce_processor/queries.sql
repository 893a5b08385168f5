-- The bounce processor's SQL (services/bounce_processor/store.py runs it).

-- name: store-inbound
-- Mail from many SMTP sessions in one statement (one commit): the DATA handlers wait for it.
INSERT INTO inbound_mail (mail_from, rcpt_to, size, raw)
SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::bytea[])
RETURNING id;

-- name: pending-inbound
SELECT id, mail_from, rcpt_to, raw, received_at FROM inbound_mail
WHERE status = 'pending' ORDER BY id LIMIT $1
FOR UPDATE SKIP LOCKED;

-- name: pending-count
SELECT count(*) FROM inbound_mail WHERE status = 'pending';

-- name: forget-inbound
DELETE FROM inbound_mail WHERE id = ANY($1::bigint[]);

-- name: reject-inbound
UPDATE inbound_mail m
SET status = 'rejected', reason = r.reason, processed_at = now(),
    raw = substring(m.raw FROM 1 FOR $3::int)
FROM unnest($1::bigint[], $2::text[]) AS r(id, reason)
WHERE m.id = r.id;

-- name: rejected-inbound
SELECT id, received_at, mail_from, rcpt_to, size, reason, processed_at FROM inbound_mail
WHERE status = 'rejected' ORDER BY id DESC LIMIT $1;

-- name: lock-states
-- Creates the missing rows and locks every row, in contact order (no deadlocks between the
-- mail loop, the results consumer and the tracking writer). A known address is kept.
INSERT INTO contact_state (contact_id, email)
SELECT id, email FROM unnest($1::bigint[], $2::text[]) AS t(id, email) ORDER BY id
ON CONFLICT (contact_id) DO UPDATE SET email = EXCLUDED.email
WHERE EXCLUDED.email IS NOT NULL AND contact_state.email IS DISTINCT FROM EXCLUDED.email;

-- name: states
SELECT contact_id, email, soft_streak, delivery_status FROM contact_state
WHERE contact_id = ANY($1::bigint[]);

-- name: save-states
UPDATE contact_state s
SET soft_streak = n.soft_streak, delivery_status = n.delivery_status, updated_at = now()
FROM unnest($1::bigint[], $2::int[], $3::text[]) AS n(contact_id, soft_streak, delivery_status)
WHERE s.contact_id = n.contact_id;

-- name: contact-state
SELECT contact_id, email, soft_streak, delivery_status, updated_at FROM contact_state
WHERE contact_id = $1;

-- name: record-bounces
-- The failures not seen before (the duplicate rule), returned so only they reach the rules.
INSERT INTO bounce (campaign_id, contact_id, classification, source, diagnostic, message_id,
                    occurred_at)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::timestamptz[])
ON CONFLICT DO NOTHING
RETURNING campaign_id, contact_id, classification;

-- name: contact-bounces
SELECT campaign_id, classification, source, diagnostic, occurred_at FROM bounce
WHERE contact_id = $1 ORDER BY occurred_at DESC LIMIT 100;

-- name: record-engagement
INSERT INTO engagement (campaign_id, kind, contact_id, hits, first_at, last_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::timestamptz[],
                     $6::timestamptz[])
ON CONFLICT (campaign_id, kind, contact_id) DO UPDATE
SET hits = engagement.hits + EXCLUDED.hits,
    last_at = greatest(engagement.last_at, EXCLUDED.last_at);

-- name: campaign-engagement
SELECT kind, coalesce(sum(hits), 0)::bigint AS hits, count(*) AS people
FROM engagement WHERE campaign_id = $1 GROUP BY kind;

-- name: contacts-of-addresses
-- The contacts an address change concerns: by id when the change names one, else by address.
SELECT contact_id, email FROM contact_state
WHERE contact_id = ANY($1::bigint[]) OR lower(email) = ANY($2::text[])
ORDER BY contact_id;

-- name: forget-processed-events
-- Redeliveries come within minutes; ids older than the retention cannot come back.
WITH gone AS (
    DELETE FROM processed_event WHERE processed_at < now() - make_interval(days => $1)
    RETURNING 1
)
SELECT count(*) FROM gone;

-- name: forget-rejected-inbound
-- Mail kept for an operator to look at (GET /v1/inbound/rejected) is not kept for ever.
WITH gone AS (
    DELETE FROM inbound_mail
    WHERE status = 'rejected' AND received_at < now() - make_interval(days => $1)
    RETURNING 1
)
SELECT count(*) FROM gone;

-- name: claim-esp-events
-- Issue 21: the event ids of a webhook not seen before (a repeated one is a replay).
INSERT INTO esp_event (esp, event_id)
SELECT $1::text, id FROM unnest($2::text[]) AS t(id)
ON CONFLICT DO NOTHING
RETURNING event_id;

-- name: forget-esp-events
WITH gone AS (
    DELETE FROM esp_event WHERE seen_at < now() - make_interval(days => $1)
    RETURNING 1
)
SELECT count(*) FROM gone;
