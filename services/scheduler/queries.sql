-- Named SQL of the scheduler service (loaded once by libs.common.db.Queries).

-- Categories -----------------------------------------------------------------------------

-- name: categories
SELECT * FROM category ORDER BY id;

-- name: category
SELECT * FROM category WHERE id = $1;

-- name: insert-category
INSERT INTO category (name, window_start, window_end, time_zone)
VALUES ($1, $2, $3, $4) RETURNING *;

-- name: update-category
UPDATE category SET name = $2, window_start = $3, window_end = $4, time_zone = $5,
    updated_at = now()
WHERE id = $1 RETURNING *;

-- name: category-in-use
SELECT EXISTS (SELECT 1 FROM campaign WHERE category_id = $1);

-- name: delete-category
DELETE FROM category WHERE id = $1 RETURNING id;

-- Campaigns ------------------------------------------------------------------------------

-- name: insert-campaign
INSERT INTO campaign (id, name, category_id, group_id, filter, saved_filter_id, from_address,
    from_name, reply_to, subject, format, body, coupon_url, dedupe, include_unsubscribed,
    scheduled_at, track_opens, track_clicks, created_by, created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19,
    $20)
RETURNING *;

-- name: campaign
SELECT * FROM campaign WHERE id = $1;

-- name: campaign-for-update
SELECT * FROM campaign WHERE id = $1 FOR UPDATE;

-- name: campaigns-page
-- Newest first; keyset on number; $1 the last number of the previous page.
SELECT * FROM campaign
WHERE ($1::bigint IS NULL OR number < $1)
  AND ($2::text IS NULL OR status = $2)
ORDER BY number DESC
LIMIT $3;

-- name: history
SELECT status, reason, at FROM campaign_status_change WHERE campaign_id = $1 ORDER BY id;

-- name: transition
-- One status change, only from a status that may reach $2 (status.sources), with its record.
WITH changed AS (
    UPDATE campaign SET status = $2::text, status_reason = COALESCE($4::text, status_reason),
        updated_at = now(),
        reserved_at = CASE WHEN $2::text = 'reserving' THEN $5::timestamptz ELSE reserved_at END,
        started_at = CASE WHEN $2::text = 'sending' THEN $5::timestamptz ELSE started_at END,
        finished_at = CASE WHEN $2::text IN ('sent', 'failed', 'halted', 'cancelled')
                           THEN $5::timestamptz ELSE finished_at END,
        paused = CASE WHEN $2::text = 'sending' THEN paused ELSE false END
    WHERE id = $1::uuid AND status = ANY($3::text[])
    RETURNING *
), recorded AS (
    INSERT INTO campaign_status_change (campaign_id, status, reason, at)
    SELECT id, $2, $4, $5 FROM changed
)
SELECT * FROM changed;

-- name: set-request
UPDATE campaign SET request_id = $2 WHERE id = $1;

-- Reservation: the recipient ledger ----------------------------------------------------------

-- name: reserving-campaigns
-- The campaigns of a batch of answers, locked, with the request they wait for.
SELECT id, request_id, status FROM campaign WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE;

-- name: insert-recipients
INSERT INTO recipient (campaign_id, seq, contact_id, email, group_id, membership_state,
    merge_values)
SELECT $1, r.seq, r.contact_id, r.email, r.group_id, r.membership_state, r.merge_values::jsonb
FROM unnest($2::bigint[], $3::bigint[], $4::text[], $5::bigint[], $6::text[], $7::text[])
    AS r (seq, contact_id, email, group_id, membership_state, merge_values)
ON CONFLICT DO NOTHING;

-- name: ledger-size
SELECT count(*) FROM recipient WHERE campaign_id = $1;

-- name: set-planned
UPDATE campaign SET planned = $2 WHERE id = $1;

-- Release ------------------------------------------------------------------------------------

-- name: due-campaigns
SELECT c.id, k.window_start, k.window_end, k.time_zone
FROM campaign c JOIN category k ON k.id = c.category_id
WHERE c.status = 'scheduled' AND c.scheduled_at <= $1
ORDER BY c.scheduled_at;

-- name: sending-campaigns
SELECT id FROM campaign WHERE status = 'sending' ORDER BY scheduled_at;

-- name: lock-sending-campaign
-- The releaser's lock: one process releases a campaign at a time, and a halt (which updates
-- the row) waits until the chunk in hand is acknowledged.
SELECT c.*, k.window_start, k.window_end, k.time_zone
FROM campaign c JOIN category k ON k.id = c.category_id
WHERE c.id = $1 AND c.status = 'sending'
FOR NO KEY UPDATE OF c SKIP LOCKED;

-- name: set-paused
UPDATE campaign SET paused = $2, updated_at = now() WHERE id = $1;

-- name: unrelease-pending
-- After a pause: rows released without a result go out again (attempt + 1).
UPDATE recipient SET released_at = NULL
WHERE campaign_id = $1 AND released_at IS NOT NULL AND outcome IS NULL;

-- name: unreleased
SELECT seq, contact_id, email, group_id, merge_values, attempt
FROM recipient WHERE campaign_id = $1 AND released_at IS NULL
ORDER BY seq LIMIT $2;

-- name: mark-released
UPDATE recipient SET released_at = $2, attempt = attempt + 1
WHERE campaign_id = $1 AND seq = ANY($3::bigint[]);

-- name: add-released
UPDATE campaign SET released = released + $2 WHERE id = $1;

-- name: finished-sending
SELECT id FROM campaign WHERE status = 'sent';

-- name: aggregation-due
SELECT id FROM campaign WHERE status = 'aggregating' AND finished_at <= $1;

-- name: status-counts
SELECT status, count(*) AS n, count(*) FILTER (WHERE paused) AS paused
FROM campaign GROUP BY status;

-- Results --------------------------------------------------------------------------------------

-- name: lock-campaigns
SELECT id FROM campaign WHERE id = ANY($1::uuid[]) ORDER BY id FOR NO KEY UPDATE;

-- name: record-outcomes
-- The first result of a recipient decides its row; later ones change nothing.
UPDATE recipient r SET outcome = x.outcome, result_id = x.result_id, result_at = x.at
FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::text[], $5::timestamptz[])
    AS x (campaign_id, contact_id, outcome, result_id, at)
WHERE r.campaign_id = x.campaign_id AND r.contact_id = x.contact_id AND r.outcome IS NULL
RETURNING r.campaign_id, r.outcome;

-- name: add-counts
UPDATE campaign SET success = success + $2, error = error + $3, suppressed = suppressed + $4,
    updated_at = now()
WHERE id = $1
RETURNING *;

-- Confirmation (F-24) ----------------------------------------------------------------------------

-- name: recipient-of
SELECT * FROM recipient WHERE campaign_id = $1 AND contact_id = $2;

-- name: first-recipient
SELECT * FROM recipient WHERE campaign_id = $1 ORDER BY seq LIMIT 1;

-- name: merge-keys
SELECT DISTINCT jsonb_object_keys(merge_values) AS key FROM recipient WHERE campaign_id = $1;

-- name: ledger
SELECT seq, contact_id, email, group_id, membership_state, merge_values
FROM recipient WHERE campaign_id = $1 ORDER BY seq;

-- Feedback (F-34) --------------------------------------------------------------------------------

-- name: record-feedback
-- One batch of opens and clicks, already deduplicated by event id and grouped per
-- (campaign, contact, kind) with their count and first time. Only recipients of a campaign's
-- frozen list count; the first event of a kind per recipient is unique. Returns the
-- campaigns whose counters moved.
WITH x AS (
    SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::bigint[], $5::timestamptz[])
        AS x (campaign_id, contact_id, kind, n, first_at)
), mine AS (
    SELECT x.* FROM x
    JOIN recipient r ON r.campaign_id = x.campaign_id AND r.contact_id = x.contact_id
), firsts AS (
    INSERT INTO recipient_feedback (campaign_id, contact_id, kind, first_at)
    SELECT campaign_id, contact_id, kind, first_at FROM mine
    ON CONFLICT DO NOTHING
    RETURNING campaign_id, kind
), added AS (
    SELECT m.campaign_id,
        sum(m.n) FILTER (WHERE m.kind = 'open') AS opens,
        sum(m.n) FILTER (WHERE m.kind = 'click') AS clicks,
        (SELECT count(*) FROM firsts f WHERE f.campaign_id = m.campaign_id AND f.kind = 'open')
            AS unique_opens,
        (SELECT count(*) FROM firsts f WHERE f.campaign_id = m.campaign_id AND f.kind = 'click')
            AS unique_clicks
    FROM mine m GROUP BY m.campaign_id
)
UPDATE campaign c SET opens = c.opens + COALESCE(a.opens, 0),
    clicks = c.clicks + COALESCE(a.clicks, 0),
    unique_opens = c.unique_opens + a.unique_opens,
    unique_clicks = c.unique_clicks + a.unique_clicks
FROM added a WHERE c.id = a.campaign_id
RETURNING c.id;
