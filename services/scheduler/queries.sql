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
SELECT EXISTS (SELECT 1 FROM campaign WHERE category_id = $1)
    OR EXISTS (SELECT 1 FROM plan WHERE category_id = $1);

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
-- The snapshot request a reservation waits for, and the reserving request's trace.
UPDATE campaign SET request_id = $2, traceparent = $3 WHERE id = $1;

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
-- the row) waits until the chunk in hand is acknowledged. held: the domains the complaint
-- guard holds (a guard record waits for the lock too, so the set cannot change meanwhile).
SELECT c.*, k.window_start, k.window_end, k.time_zone,
       COALESCE((SELECT g.held FROM campaign_guard g WHERE g.campaign_id = c.id), '{}') AS held
FROM campaign c JOIN category k ON k.id = c.category_id
WHERE c.id = $1 AND c.status = 'sending'
FOR NO KEY UPDATE OF c SKIP LOCKED;

-- name: set-paused
UPDATE campaign SET paused = $2, updated_at = now() WHERE id = $1;

-- name: unrelease-pending
-- After a pause: rows released without a result go out again (attempt + 1).
UPDATE recipient SET released_at = NULL
WHERE campaign_id = $1 AND released_at IS NOT NULL AND outcome IS NULL;

-- name: unrelease-overdue
-- Rows released before $2 without a result, with releases left: they go out again.
WITH again AS (
    UPDATE recipient SET released_at = NULL
    WHERE campaign_id = $1 AND outcome IS NULL AND released_at < $2 AND attempt < $3
    RETURNING 1
)
SELECT count(*) FROM again;

-- name: unanswered
-- Rows without a result, and those of them still worth waiting for: not released yet, with
-- releases left, or released after $2 and not covered by the campaign's confirmed
-- checkpoint $4 (a sender passed those without a result coming).
SELECT count(*) AS unanswered,
       count(*) FILTER (WHERE released_at IS NULL OR attempt < $3
                          OR (released_at >= $2 AND (release_mark IS NULL OR release_mark > $4)))
           AS waiting
FROM recipient WHERE campaign_id = $1 AND outcome IS NULL;

-- name: unreleased
-- The next rows to release, but none to a domain the complaint guard holds: marked held
-- (out of the index), or — a row that arrived after the hold — by its domain ($3; the
-- domain as services/scheduler/guard.py DOMAIN_SQL).
SELECT seq, contact_id, email, group_id, merge_values, attempt
FROM recipient WHERE campaign_id = $1 AND released_at IS NULL AND NOT held
  AND (cardinality($3::text[]) = 0
       OR NOT lower(substring(email from '[^@]*$')) = ANY($3::text[]))
ORDER BY seq LIMIT $2;

-- name: mark-released
-- The rows of an acknowledged chunk, with its release mark ($4).
UPDATE recipient SET released_at = $2, attempt = attempt + 1, release_mark = $4
WHERE campaign_id = $1 AND seq = ANY($3::bigint[]);

-- name: add-released
-- A chunk acknowledged: its first releases ($2) and re-releases ($3), and its release mark.
UPDATE campaign SET released = released + $2, re_released = re_released + $3,
    release_mark = release_mark + 1
WHERE id = $1
RETURNING release_mark;

-- Checkpoints: lost requests and results (services/scheduler/checkpoints.py) ---------------

-- name: checkpoints
-- A campaign's checkpoints newer than its confirmed mark $2, with the partitions that
-- reached them.
SELECT c.id, c.mark, c.partitions, c.fence, r.reached, r.held
FROM checkpoint c
CROSS JOIN LATERAL (
    SELECT count(*) AS reached, COALESCE(max(r.held), 0) AS held
    FROM checkpoint_reached r WHERE r.checkpoint_id = c.id
) r
WHERE c.campaign_id = $1 AND c.mark > $2
ORDER BY c.mark, c.issued_at;

-- name: insert-checkpoint
INSERT INTO checkpoint (id, campaign_id, mark, partitions, issued_at) VALUES ($1, $2, $3, $4, $5);

-- name: record-reached
-- Answers from send.progress, with the campaign's held count each saw; answers to
-- checkpoints this scheduler does not know (forgotten after a newer one was applied, or
-- never committed) change nothing.
INSERT INTO checkpoint_reached (checkpoint_id, partition, reached_at, held)
SELECT x.checkpoint_id, x.partition, x.reached_at, x.held
FROM unnest($1::uuid[], $2::int[], $3::timestamptz[], $4::int[])
    AS x (checkpoint_id, partition, reached_at, held)
JOIN checkpoint c ON c.id = x.checkpoint_id
ON CONFLICT DO NOTHING;

-- name: set-sender-held
-- An answer's held count of a campaign ($2, counted at $4 by its sender), received at $3
-- (the scheduler's clock); an answer counted before the one recorded changes nothing (two
-- senders' answers may reach send.progress in the other order).
UPDATE campaign SET sender_held = $2, sender_held_at = $3, sender_held_counted = $4
WHERE id = $1 AND (sender_held_counted IS NULL OR sender_held_counted <= $4);

-- name: forget-checkpoints
-- Checkpoints that can never be confirmed (every partition answered, one with held mail).
DELETE FROM checkpoint WHERE id = ANY($1::uuid[]);

-- name: set-fence
UPDATE checkpoint SET fence = $2 WHERE id = ANY($1::uuid[]) AND fence IS NULL;

-- name: unrelease-unseen
-- Rows released up to checkpoint mark $2 still without a result, with releases left: a
-- sender passed them (their request or their result was lost): they go out again.
WITH again AS (
    UPDATE recipient SET released_at = NULL
    WHERE campaign_id = $1 AND outcome IS NULL AND released_at IS NOT NULL
      AND release_mark <= $2 AND attempt < $3
    RETURNING 1
)
SELECT count(*) FROM again;

-- name: confirm-checkpoint
-- The checkpoint of mark $2 applied: it and older ones are forgotten.
WITH forgotten AS (
    DELETE FROM checkpoint WHERE campaign_id = $1 AND mark <= $2
)
UPDATE campaign SET confirmed_mark = $2 WHERE id = $1;

-- name: finished-sending
SELECT id FROM campaign WHERE status = 'sent';

-- name: forget-campaign-checkpoints
-- A campaign whose sending is over releases nothing again: its checkpoints (one issued
-- before the end, answered after it, with held mail perhaps) are of no use any more.
DELETE FROM checkpoint WHERE campaign_id = $1;

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
-- (target, contact, kind) with their count and first time. $6 says what the targets are:
-- 'campaign' (only recipients of a campaign's frozen list count) or 'step' (a step mail's
-- step: only contacts it was released to count). The first event of a kind per recipient is
-- unique. A click implies an open (the images were blocked, the mail was read): a recipient's
-- first click also makes its first open when it has none, so unique opens count the people
-- who read the mail; opens stays the raw count of pixel loads. Returns the targets whose
-- counters moved.
WITH x AS (
    SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::bigint[], $5::timestamptz[])
        AS x (target_id, contact_id, kind, n, first_at)
), mine AS (
    SELECT x.* FROM x WHERE CASE $6::text
        WHEN 'campaign' THEN EXISTS (SELECT 1 FROM recipient r
            WHERE r.campaign_id = x.target_id AND r.contact_id = x.contact_id)
        WHEN 'step' THEN EXISTS (SELECT 1 FROM step_delivery d
            WHERE d.step_id = x.target_id AND d.contact_id = x.contact_id)
    END
), seen AS (
    SELECT DISTINCT ON (target_id, contact_id, kind) target_id, contact_id, kind, first_at
    FROM (SELECT target_id, contact_id, kind, first_at FROM mine
          UNION ALL
          SELECT target_id, contact_id, 'open', first_at FROM mine WHERE kind = 'click') s
    ORDER BY target_id, contact_id, kind, first_at
), campaign_firsts AS (
    INSERT INTO recipient_feedback (campaign_id, contact_id, kind, first_at)
    SELECT target_id, contact_id, kind, first_at FROM seen WHERE $6 = 'campaign'
    ON CONFLICT DO NOTHING
    RETURNING campaign_id AS target_id, kind
), step_firsts AS (
    INSERT INTO step_feedback (step_id, contact_id, kind, first_at)
    SELECT target_id, contact_id, kind, first_at FROM seen WHERE $6 = 'step'
    ON CONFLICT DO NOTHING
    RETURNING step_id AS target_id, kind
), firsts AS (
    SELECT * FROM campaign_firsts UNION ALL SELECT * FROM step_firsts
), added AS (
    SELECT m.target_id,
        COALESCE(sum(m.n) FILTER (WHERE m.kind = 'open'), 0) AS opens,
        COALESCE(sum(m.n) FILTER (WHERE m.kind = 'click'), 0) AS clicks,
        (SELECT count(*) FROM firsts f WHERE f.target_id = m.target_id AND f.kind = 'open')
            AS unique_opens,
        (SELECT count(*) FROM firsts f WHERE f.target_id = m.target_id AND f.kind = 'click')
            AS unique_clicks
    FROM mine m GROUP BY m.target_id
), campaigns AS (
    UPDATE campaign c SET opens = c.opens + a.opens, clicks = c.clicks + a.clicks,
        unique_opens = c.unique_opens + a.unique_opens,
        unique_clicks = c.unique_clicks + a.unique_clicks
    FROM added a WHERE $6 = 'campaign' AND c.id = a.target_id
    RETURNING c.id
), steps AS (
    UPDATE plan_step s SET opens = s.opens + a.opens, clicks = s.clicks + a.clicks,
        unique_opens = s.unique_opens + a.unique_opens,
        unique_clicks = s.unique_clicks + a.unique_clicks
    FROM added a WHERE $6 = 'step' AND s.id = a.target_id
    RETURNING s.id
)
SELECT id FROM campaigns UNION ALL SELECT id FROM steps;

-- Step mail (F-29): memberships and enrolments -----------------------------------------------

-- name: apply-memberships
-- The newest change per (group, contact) wins; returns the ones that changed something.
WITH x AS (
    SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::timestamptz[], $5::bigint[])
        AS x (group_id, contact_id, state, changed_at, version)
)
INSERT INTO member AS m (group_id, contact_id, state, changed_at, version)
SELECT group_id, contact_id, state, changed_at, version FROM x
ON CONFLICT (group_id, contact_id) DO UPDATE
SET state = EXCLUDED.state, changed_at = EXCLUDED.changed_at, version = EXCLUDED.version
WHERE m.version < EXCLUDED.version
RETURNING m.group_id, m.contact_id, m.state, m.changed_at;

-- name: start-enrolments
-- Deliverable members of a plan with a schedule: an enrolment at changed_at, unless one runs.
INSERT INTO enrolment (plan_id, contact_id, enrolled_at)
SELECT x.plan_id, x.contact_id, x.at
FROM unnest($1::bigint[], $2::bigint[], $3::timestamptz[]) AS x (plan_id, contact_id, at)
JOIN plan p ON p.id = x.plan_id
ON CONFLICT (plan_id, contact_id) WHERE ended_at IS NULL DO NOTHING
RETURNING plan_id;

-- name: end-enrolments
UPDATE enrolment e SET ended_at = x.at, ended_reason = x.state
FROM unnest($1::bigint[], $2::bigint[], $3::timestamptz[], $4::text[])
    AS x (plan_id, contact_id, at, state)
WHERE e.plan_id = x.plan_id AND e.contact_id = x.contact_id AND e.ended_at IS NULL
RETURNING e.plan_id;

-- name: enrol-members
-- A schedule defined after its plan's members joined: enrol the deliverable ones.
INSERT INTO enrolment (plan_id, contact_id, enrolled_at)
SELECT group_id, contact_id, changed_at FROM member WHERE group_id = $1 AND state = 'deliverable'
ON CONFLICT (plan_id, contact_id) WHERE ended_at IS NULL DO NOTHING;

-- name: enrolments-of
SELECT e.*, (SELECT count(*) FROM step_delivery d WHERE d.enrolment_id = e.id) AS steps_done
FROM enrolment e
WHERE e.plan_id = $1 AND ($2::bigint IS NULL OR e.contact_id = $2)
  AND ($3::bigint IS NULL OR e.id < $3)
ORDER BY e.id DESC LIMIT $4;

-- name: enrolment-counts
SELECT count(*) FILTER (WHERE ended_at IS NULL) AS active,
       count(*) FILTER (WHERE ended_at IS NOT NULL) AS ended
FROM enrolment WHERE plan_id = $1;

-- Step mail: plans and steps ---------------------------------------------------------------------

-- name: plans
SELECT * FROM plan ORDER BY id;

-- name: plan
SELECT * FROM plan WHERE id = $1;

-- name: upsert-plan
INSERT INTO plan (id, name, category_id, from_address, from_name, reply_to, coupon_url,
    track_opens, track_clicks, created_at, updated_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10)
ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, category_id = EXCLUDED.category_id,
    from_address = EXCLUDED.from_address, from_name = EXCLUDED.from_name,
    reply_to = EXCLUDED.reply_to, coupon_url = EXCLUDED.coupon_url,
    track_opens = EXCLUDED.track_opens, track_clicks = EXCLUDED.track_clicks,
    updated_at = EXCLUDED.updated_at
RETURNING *, (xmax = 0) AS created;

-- name: plan-steps
SELECT * FROM plan_step WHERE plan_id = $1 AND removed_at IS NULL ORDER BY position;

-- name: lock-plan-steps
SELECT * FROM plan_step WHERE plan_id = $1 AND removed_at IS NULL ORDER BY position FOR UPDATE;

-- name: save-step
-- A new step, or an edit of one of this plan's steps; timed_since moves only when $10
-- (its day or time changed).
INSERT INTO plan_step AS s (id, plan_id, position, day_offset, send_time, subject, format,
    body, timed_since, created_at, updated_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $9)
ON CONFLICT (id) DO UPDATE SET position = EXCLUDED.position,
    day_offset = EXCLUDED.day_offset, send_time = EXCLUDED.send_time,
    subject = EXCLUDED.subject, format = EXCLUDED.format, body = EXCLUDED.body,
    timed_since = CASE WHEN $10::boolean THEN EXCLUDED.timed_since ELSE s.timed_since END,
    updated_at = EXCLUDED.updated_at
WHERE s.plan_id = EXCLUDED.plan_id;

-- name: remove-steps
UPDATE plan_step SET removed_at = $2, updated_at = $2 WHERE id = ANY($1::uuid[]);

-- Step mail: release -----------------------------------------------------------------------------

-- name: active-steps
-- Every step that may be due, with its plan's settings and category window.
SELECT s.*, p.from_address, p.from_name, p.reply_to, p.coupon_url, p.track_opens,
    p.track_clicks, k.window_start, k.window_end, k.time_zone
FROM plan_step s JOIN plan p ON p.id = s.plan_id JOIN category k ON k.id = p.category_id
WHERE s.removed_at IS NULL
ORDER BY s.plan_id, s.position;

-- name: due-enrolments
-- Running enrolments due for a step (steps.due_range) that have no delivery of it yet.
SELECT e.id, e.contact_id FROM enrolment e
WHERE e.plan_id = $1 AND e.ended_at IS NULL
  AND e.enrolled_at >= $3 AND e.enrolled_at < $4 AND e.enrolled_at <= $5
  AND NOT EXISTS (SELECT 1 FROM step_delivery d WHERE d.step_id = $2 AND d.enrolment_id = e.id)
ORDER BY e.enrolled_at, e.id
LIMIT $6;

-- name: lock-step
-- The releaser's lock on one step (another replica skips it this tick).
SELECT id FROM plan_step WHERE id = $1 AND removed_at IS NULL FOR NO KEY UPDATE SKIP LOCKED;

-- name: claim-step-deliveries
-- Deliveries of a step to running enrolments; the ones claimed here (not already there).
INSERT INTO step_delivery (step_id, enrolment_id, contact_id, released_at, skipped)
SELECT $1::uuid, x.enrolment_id, x.contact_id,
    CASE WHEN x.skipped IS NULL THEN $2::timestamptz END, x.skipped
FROM unnest($3::bigint[], $4::bigint[], $5::text[]) AS x (enrolment_id, contact_id, skipped)
JOIN enrolment e ON e.id = x.enrolment_id AND e.ended_at IS NULL
ON CONFLICT DO NOTHING
RETURNING enrolment_id;

-- name: add-step-released
UPDATE plan_step SET released = released + $2, skipped = skipped + $3 WHERE id = $1;

-- Step mail: results and feedback ----------------------------------------------------------------

-- name: lock-steps
SELECT id FROM plan_step WHERE id = ANY($1::uuid[]) ORDER BY id FOR NO KEY UPDATE;

-- name: record-step-outcomes
-- The first result of a (step, enrolment) decides; returns the newly decided ones.
UPDATE step_delivery d SET outcome = x.outcome, result_id = x.result_id, result_at = x.at
FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::text[], $5::timestamptz[])
    AS x (step_id, enrolment_id, outcome, result_id, at)
WHERE d.step_id = x.step_id AND d.enrolment_id = x.enrolment_id AND d.outcome IS NULL
RETURNING d.step_id, d.outcome;

-- name: add-step-counts
UPDATE plan_step SET success = success + $2, error = error + $3, suppressed = suppressed + $4
WHERE id = $1;

-- Re-send (F-28) ---------------------------------------------------------------------------------

-- name: campaign-times
-- Campaigns and steps a history filter names, with when they were sent.
SELECT id, started_at AS sent_at, false AS step FROM campaign WHERE id = ANY($1::uuid[])
UNION ALL
SELECT id, created_at, true FROM plan_step WHERE id = ANY($1::uuid[]);

-- name: set-resent-from
UPDATE campaign SET resent_from = $2 WHERE id = $1 RETURNING *;

-- Complaint guard (issue 21; services/scheduler/guard.py) -----------------------------------------

-- name: lock-guarded-campaigns
-- The campaigns of a batch of campaign.guard records, locked (after the chunk a releaser has
-- in hand), with their status and what the guard holds and resumed so far.
SELECT c.id, c.status, COALESCE(g.held, '{}') AS held,
       COALESCE(g.resumed, '{}') || COALESCE(g.dropped, '{}') AS resumed, g.decided_at
FROM campaign c LEFT JOIN campaign_guard g ON g.campaign_id = c.id
WHERE c.id = ANY($1::uuid[])
ORDER BY c.id
FOR NO KEY UPDATE OF c;

-- name: record-guard
-- A decision: $3 joins the held domains; the figures are the newest decision's.
INSERT INTO campaign_guard AS g (campaign_id, held, guard_id, reason, delivered, complaints,
    decided_at, updated_at)
VALUES ($1, $3, $2, $4, $5, $6, $7, $8)
ON CONFLICT (campaign_id) DO UPDATE SET
    held = ARRAY(SELECT DISTINCT d FROM unnest(g.held || EXCLUDED.held) AS d ORDER BY d),
    guard_id = CASE WHEN EXCLUDED.decided_at >= g.decided_at THEN EXCLUDED.guard_id
                    ELSE g.guard_id END,
    reason = CASE WHEN EXCLUDED.decided_at >= g.decided_at THEN EXCLUDED.reason
                  ELSE g.reason END,
    delivered = CASE WHEN EXCLUDED.decided_at >= g.decided_at THEN EXCLUDED.delivered
                     ELSE g.delivered END,
    complaints = CASE WHEN EXCLUDED.decided_at >= g.decided_at THEN EXCLUDED.complaints
                      ELSE g.complaints END,
    decided_at = GREATEST(g.decided_at, EXCLUDED.decided_at),
    updated_at = EXCLUDED.updated_at;

-- name: hold-rows
-- Rows of newly held domains ($2) without a result are held; those released already wait
-- unreleased again (the sender drops their requests; attempt + 1 when they go out after a
-- resume). Returns how many were held.
WITH held AS (
    UPDATE recipient SET released_at = NULL, held = true
    WHERE campaign_id = $1 AND outcome IS NULL AND NOT held
      AND lower(substring(email from '[^@]*$')) = ANY($2::text[])
    RETURNING 1
)
SELECT count(*) FROM held;

-- name: release-rows
-- The rows of resumed domains ($2) may be released again.
UPDATE recipient SET held = false
WHERE campaign_id = $1 AND held AND lower(substring(email from '[^@]*$')) = ANY($2::text[]);

-- name: drop-held-rows
-- An operator gave up the domains $2: their rows without a result are recorded suppressed
-- (no mail; a late result changes nothing, as record-outcomes says), so the campaign can
-- finish. Returns how many.
WITH dropped AS (
    UPDATE recipient SET held = false, outcome = 'suppressed', result_at = $3
    WHERE campaign_id = $1 AND outcome IS NULL
      AND lower(substring(email from '[^@]*$')) = ANY($2::text[])
    RETURNING 1
)
SELECT count(*) FROM dropped;

-- name: drop-guard
-- An operator gave up $2: held no more, dropped from now on.
UPDATE campaign_guard SET
    held = ARRAY(SELECT d FROM unnest(held) AS d WHERE d <> ALL($2::text[]) ORDER BY d),
    dropped = ARRAY(SELECT DISTINCT d FROM unnest(dropped || $2::text[]) AS d ORDER BY d),
    resumed_by = $3, resumed_at = $4, updated_at = $4
WHERE campaign_id = $1
RETURNING *;

-- name: guard
SELECT * FROM campaign_guard WHERE campaign_id = $1;

-- name: guard-for-update
SELECT * FROM campaign_guard WHERE campaign_id = $1 FOR UPDATE;

-- name: guards
SELECT * FROM campaign_guard WHERE campaign_id = ANY($1::uuid[]);

-- name: held-recipients
-- Recipients without a result whose domain is held ($2).
SELECT count(*) FROM recipient
WHERE campaign_id = $1 AND outcome IS NULL
  AND lower(substring(email from '[^@]*$')) = ANY($2::text[]);

-- name: resume-guard
-- An operator resumed $2: held no more, resumed from now on.
UPDATE campaign_guard SET
    held = ARRAY(SELECT d FROM unnest(held) AS d WHERE d <> ALL($2::text[]) ORDER BY d),
    resumed = ARRAY(SELECT DISTINCT d FROM unnest(resumed || $2::text[]) AS d ORDER BY d),
    resumed_by = $3, resumed_at = $4, updated_at = $4
WHERE campaign_id = $1
RETURNING *;
