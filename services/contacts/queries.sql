-- Named SQL of the contacts service (loaded once by libs.common.db.Queries).

-- name: field-definitions
SELECT key, label, type, choices FROM field_definition ORDER BY created_at, key;

-- name: insert-field-definition
INSERT INTO field_definition (key, label, type, choices) VALUES ($1, $2, $3, $4)
ON CONFLICT (key) DO NOTHING
RETURNING key, label, type, choices;

-- name: contact-by-id
SELECT * FROM contact WHERE id = $1;

-- name: contact-exists
SELECT 1 FROM contact WHERE id = $1;

-- name: contact-by-id-for-update
SELECT * FROM contact WHERE id = $1 FOR UPDATE;

-- name: contact-by-email-for-update
-- An address's identity ignores case (lower(email), contact_email_identity_key). While rows
-- that collide by case are awaiting an operator (contact_email_collision), the exact spelling
-- wins, then the oldest.
SELECT * FROM contact WHERE lower(email) = lower($1)
ORDER BY email = $1 DESC, id LIMIT 1 FOR UPDATE;

-- name: contact-by-external-id-for-update
SELECT * FROM contact WHERE external_id = $1 FOR UPDATE;

-- name: contact-id-by-email
SELECT id FROM contact WHERE lower(email) = lower($1) ORDER BY email = $1 DESC, id LIMIT 1;

-- name: contact-id-by-external-id
SELECT id FROM contact WHERE external_id = $1;

-- name: delete-contact
DELETE FROM contact WHERE id = $1 RETURNING id, version;

-- name: contact-memberships
SELECT m.group_id, g.kind, g.name, m.state, m.method, m.joined_at, m.changed_at
FROM membership m JOIN contact_group g ON g.id = m.group_id
WHERE m.contact_id = $1 ORDER BY m.group_id;

-- name: groups
SELECT g.id, g.kind, g.name, g.description, g.created_at,
       (SELECT count(*) FROM membership m WHERE m.group_id = g.id) AS members
FROM contact_group g WHERE g.kind = $1 ORDER BY g.id;

-- name: groups-without-counts
SELECT g.id, g.kind, g.name, g.description, g.created_at, NULL::bigint AS members
FROM contact_group g WHERE g.kind = $1 ORDER BY g.id;

-- name: group-with-members
SELECT g.id, g.kind, g.name, g.description, g.created_at,
       (SELECT count(*) FROM membership m WHERE m.group_id = g.id) AS members
FROM contact_group g WHERE g.id = $1 AND g.kind = $2;

-- name: group-by-id
SELECT id, kind, name, description, created_at FROM contact_group WHERE id = $1;

-- name: insert-group
INSERT INTO contact_group (kind, name, description) VALUES ($1, $2, $3)
ON CONFLICT (kind, name) DO NOTHING
RETURNING id, kind, name, description, created_at;

-- name: join-membership
-- A new membership; an existing one is left as it is (suppression owns its state).
INSERT INTO membership (contact_id, group_id, state, method)
VALUES ($1, $2, $3, $4)
ON CONFLICT (contact_id, group_id) DO NOTHING
RETURNING contact_id, group_id, state, method, joined_at, changed_at;

-- name: members-among
-- The contacts of $2 that are members of group or plan $1 (store.set_states).
SELECT contact_id FROM membership WHERE group_id = $1 AND contact_id = ANY($2::bigint[])
ORDER BY contact_id;

-- name: leave-membership
DELETE FROM membership WHERE contact_id = $1 AND group_id = $2 RETURNING contact_id;

-- name: leave-memberships
-- Projection of suppression.changes: the memberships a batch's "left" changes remove.
DELETE FROM membership m
USING unnest($1::bigint[], $2::bigint[]) AS u(contact_id, group_id)
WHERE m.contact_id = u.contact_id AND m.group_id = u.group_id;

-- name: apply-membership-changes
-- Projection of suppression.changes, one row per membership (the batch reduced by
-- processor.membership_writes): newer changes win, stale redeliveries do nothing, a change
-- for an unknown contact or group is ignored.
INSERT INTO membership (contact_id, group_id, state, method, changed_at)
SELECT u.contact_id, u.group_id, u.state, u.method, u.changed_at
FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::timestamptz[])
    AS u(contact_id, group_id, state, method, changed_at)
WHERE EXISTS (SELECT 1 FROM contact WHERE id = u.contact_id)
  AND EXISTS (SELECT 1 FROM contact_group WHERE id = u.group_id)
ON CONFLICT (contact_id, group_id) DO UPDATE
SET state = EXCLUDED.state, method = EXCLUDED.method, changed_at = EXCLUDED.changed_at
WHERE membership.changed_at <= EXCLUDED.changed_at;

-- name: record-history-once
-- Projection of delivery.results for history filters (F-05, F-28), claimed by result id in
-- the same statement (one round trip, no transaction of its own): an id processed before,
-- or repeated in the batch, counts once. Grouped: one batch often holds several results of
-- one contact and campaign, and ON CONFLICT DO UPDATE may touch a row only once per statement.
WITH e AS (
    SELECT DISTINCT ON (event_id) contact_id, campaign_id, kind, at, event_id
    FROM unnest($1::bigint[], $2::text[], $3::text[], $4::timestamptz[], $5::text[])
        AS u(contact_id, campaign_id, kind, at, event_id)
), claimed AS (
    INSERT INTO processed_event (event_id) SELECT event_id FROM e
    ON CONFLICT DO NOTHING
    RETURNING event_id
)
INSERT INTO delivery_history (contact_id, campaign_id, kind, first_at, last_at, count)
SELECT e.contact_id, e.campaign_id, e.kind, min(e.at), max(e.at), count(*)
FROM e JOIN claimed USING (event_id)
GROUP BY e.contact_id, e.campaign_id, e.kind
ON CONFLICT (contact_id, kind, campaign_id) DO UPDATE
SET last_at = greatest(delivery_history.last_at, EXCLUDED.last_at),
    first_at = least(delivery_history.first_at, EXCLUDED.first_at),
    count = delivery_history.count + EXCLUDED.count;

-- name: record-feedback
-- Opens and clicks claimed by event id, their history and their engagement points, in one
-- statement; returns the contacts whose points changed (their score is refreshed next).
-- A click implies an open (images blocked, mail read): it records 'opened' too, with a count
-- of 0, so the opened / not-opened conditions see the reader while count stays the number
-- of pixel loads.
WITH e AS (
    SELECT DISTINCT ON (event_id) event_id, contact_id, campaign_id, kind, history_kind, points, at
    FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::int[],
                $7::timestamptz[])
        AS u(event_id, contact_id, campaign_id, kind, history_kind, points, at)
), claimed AS (
    INSERT INTO processed_event (event_id) SELECT event_id FROM e
    ON CONFLICT DO NOTHING
    RETURNING event_id
), fresh AS (
    SELECT e.* FROM e JOIN claimed USING (event_id)
), history AS (
    INSERT INTO delivery_history (contact_id, campaign_id, kind, first_at, last_at, count)
    SELECT contact_id, campaign_id, history_kind, min(at), max(at), sum(n)
    FROM (SELECT contact_id, campaign_id, history_kind, at, 1 AS n FROM fresh
          UNION ALL
          SELECT contact_id, campaign_id, 'opened', at, 0 FROM fresh WHERE kind = 'click') f
    GROUP BY contact_id, campaign_id, history_kind
    ON CONFLICT (contact_id, kind, campaign_id) DO UPDATE
    SET last_at = greatest(delivery_history.last_at, EXCLUDED.last_at),
        first_at = least(delivery_history.first_at, EXCLUDED.first_at),
        count = delivery_history.count + EXCLUDED.count
)
INSERT INTO engagement (event_id, contact_id, campaign_id, kind, points, occurred_at)
SELECT event_id, contact_id, campaign_id, kind, points, at FROM fresh
ON CONFLICT (event_id) DO NOTHING
RETURNING contact_id;

-- name: refresh-scores
-- F-08: the score is the engagement points of the last 90 days.
UPDATE contact c
SET score = coalesce((SELECT sum(e.points) FROM engagement e
                      WHERE e.contact_id = c.id AND e.occurred_at > now() - interval '90 days'), 0),
    version = c.version + 1, updated_at = now()
WHERE c.id = ANY($1::bigint[])
RETURNING c.*;

-- name: expire-engagement
-- Points older than 90 days no longer count: drop them, return whose score must change.
WITH expired AS (
    DELETE FROM engagement WHERE occurred_at <= now() - interval '90 days' RETURNING contact_id
)
SELECT DISTINCT contact_id FROM expired;

-- name: forget-processed-events
-- Redeliveries come within minutes; ids older than the retention cannot come back.
DELETE FROM processed_event WHERE processed_at < now() - make_interval(days => $1);

-- name: set-delivery-status
UPDATE contact SET delivery_status = $2, version = version + 1, updated_at = now()
WHERE id = $1 AND delivery_status IS DISTINCT FROM $2
RETURNING *;

-- name: saved-filters
SELECT id, name, group_id, filter, created_at, updated_at FROM saved_filter
WHERE ($1::bigint IS NULL OR group_id IS NULL OR group_id = $1)
ORDER BY id;

-- name: saved-filters-by-id
SELECT id, name, group_id, filter FROM saved_filter WHERE id = ANY($1::bigint[]);

-- name: insert-saved-filter
INSERT INTO saved_filter (name, group_id, filter) VALUES ($1, $2, $3)
RETURNING id, name, group_id, filter, created_at, updated_at;

-- name: update-saved-filter
UPDATE saved_filter SET name = coalesce($2, name), filter = coalesce($3, filter), updated_at = now()
WHERE id = $1 RETURNING id, name, group_id, filter, created_at, updated_at;

-- name: delete-saved-filter
DELETE FROM saved_filter WHERE id = $1 RETURNING id;

-- name: bulk-add-tag
UPDATE contact SET tags = array_append(tags, $2), version = version + 1, updated_at = now()
WHERE id = ANY($1::bigint[]) AND NOT tags @> ARRAY[$2]
RETURNING *;

-- name: bulk-remove-tag
UPDATE contact SET tags = array_remove(tags, $2), version = version + 1, updated_at = now()
WHERE id = ANY($1::bigint[]) AND tags @> ARRAY[$2]
RETURNING *;

-- name: bulk-star
UPDATE contact SET star = $2, version = version + 1, updated_at = now()
WHERE id = ANY($1::bigint[]) AND star IS DISTINCT FROM $2
RETURNING *;

-- name: bulk-delete
DELETE FROM contact WHERE id = ANY($1::bigint[]) RETURNING id, version;

-- name: lock-identities
-- Every contact an upsert batch could touch, by address or upstream key, locked (in id order).
-- The two lookups are separate so that each is an index probe or a hashed array test: as
-- one `email = ANY(..) OR external_id = ANY(..)` filter, on a table not yet analyzed the
-- planner walked the primary key and tested every row against both arrays, 2.4 s for a
-- batch of 2,000 on 50,000 rows (the first minutes of an ingest into a new database).
-- Addresses come lower-cased ($1): the lookup is by the identity key, lower(email).
SELECT * FROM contact
WHERE id = ANY (ARRAY(SELECT id FROM contact WHERE lower(email) = ANY($1::text[])
                      UNION
                      SELECT id FROM contact WHERE external_id = ANY($2::text[])))
ORDER BY id FOR UPDATE;

-- name: insert-contacts
-- One row per element of the column arrays (store.INSERT_COLUMNS, in this order; tags as JSON
-- text, since an array parameter cannot hold arrays of different lengths); NULL takes the
-- column's default.
INSERT INTO contact (email, external_id, name, name_kana, company, department, title, phone,
                     address, website, memo, acquisition_channel, acquired_at, sales_status,
                     engagement, star, tags, custom)
SELECT email, external_id, name, name_kana, company, department, title, phone,
       address, website, memo, acquisition_channel, acquired_at, coalesce(sales_status, 'open'),
       engagement, coalesce(star, false),
       coalesce(ARRAY(SELECT jsonb_array_elements_text(tags::jsonb)), '{}'), coalesce(custom, '{}')
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
            $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::date[],
            $14::text[], $15::text[], $16::boolean[], $17::text[], $18::jsonb[])
    WITH ORDINALITY AS u(email, external_id, name, name_kana, company, department, title, phone,
                         address, website, memo, acquisition_channel, acquired_at, sales_status,
                         engagement, star, tags, custom, n)
ORDER BY n
RETURNING *;

-- name: update-contacts
-- One (id, patch) per contact: a key present in the patch sets the column (null clears it),
-- an absent key leaves it.
UPDATE contact c SET
    email = CASE WHEN u.p ? 'email' THEN u.p->>'email' ELSE c.email END,
    external_id = CASE WHEN u.p ? 'external_id' THEN u.p->>'external_id' ELSE c.external_id END,
    name = CASE WHEN u.p ? 'name' THEN u.p->>'name' ELSE c.name END,
    name_kana = CASE WHEN u.p ? 'name_kana' THEN u.p->>'name_kana' ELSE c.name_kana END,
    company = CASE WHEN u.p ? 'company' THEN u.p->>'company' ELSE c.company END,
    department = CASE WHEN u.p ? 'department' THEN u.p->>'department' ELSE c.department END,
    title = CASE WHEN u.p ? 'title' THEN u.p->>'title' ELSE c.title END,
    phone = CASE WHEN u.p ? 'phone' THEN u.p->>'phone' ELSE c.phone END,
    address = CASE WHEN u.p ? 'address' THEN u.p->>'address' ELSE c.address END,
    website = CASE WHEN u.p ? 'website' THEN u.p->>'website' ELSE c.website END,
    memo = CASE WHEN u.p ? 'memo' THEN u.p->>'memo' ELSE c.memo END,
    acquired_at = CASE WHEN u.p ? 'acquired_at' THEN (u.p->>'acquired_at')::date ELSE c.acquired_at END,
    acquisition_channel = CASE WHEN u.p ? 'acquisition_channel' THEN u.p->>'acquisition_channel'
                               ELSE c.acquisition_channel END,
    sales_status = CASE WHEN u.p ? 'sales_status' THEN u.p->>'sales_status' ELSE c.sales_status END,
    engagement = CASE WHEN u.p ? 'engagement' THEN u.p->>'engagement' ELSE c.engagement END,
    star = CASE WHEN u.p ? 'star' THEN (u.p->>'star')::boolean ELSE c.star END,
    tags = CASE WHEN u.p ? 'tags' THEN ARRAY(SELECT jsonb_array_elements_text(u.p->'tags'))
                ELSE c.tags END,
    custom = (c.custom || coalesce(u.p->'custom_set', '{}'))
             - coalesce(ARRAY(SELECT jsonb_array_elements_text(u.p->'custom_clear')), '{}'),
    version = c.version + 1,
    updated_at = now()
FROM unnest($1::bigint[], $2::jsonb[]) AS u(id, p)
WHERE c.id = u.id
RETURNING c.*;

-- name: import-insert-job
-- Import jobs (F-04, imports.py): every answer carries the job's columns but the payload,
-- which only a run reads (import-job-to-run).
INSERT INTO import_job (id, status, mode, key_field, encoding, filename, requested_by, mapping,
                        payload, total)
VALUES ($1, 'queued', $2, $3, $4, $5, $6, $7, $8, $9)
RETURNING id, status, mode, key_field, encoding, filename, requested_by, mapping, next_line,
          total, inserted, updated, skipped, failed, detail, created_at, updated_at;

-- name: import-job
SELECT id, status, mode, key_field, encoding, filename, requested_by, mapping, next_line,
       total, inserted, updated, skipped, failed, detail, created_at, updated_at
FROM import_job WHERE id = $1;

-- name: import-job-to-run
-- A job to run (claim): queued or running, with its file.
SELECT id, status, mode, key_field, encoding, mapping, next_line, total, payload
FROM import_job WHERE id = $1 AND status IN ('queued', 'running');

-- name: import-jobs
SELECT id, status, mode, key_field, encoding, filename, requested_by, mapping, next_line,
       total, inserted, updated, skipped, failed, detail, created_at, updated_at
FROM import_job WHERE ($1::text IS NULL OR status = $1)
ORDER BY created_at DESC, id LIMIT $2;

-- name: import-unfinished-jobs
SELECT id FROM import_job WHERE status IN ('queued', 'running') ORDER BY created_at;

-- name: import-lock-job
-- A step's check that the job is still this run's: running or queued, checkpoint unmoved.
SELECT status, next_line FROM import_job WHERE id = $1 FOR UPDATE;

-- name: import-advance-job
UPDATE import_job SET status = 'running', next_line = $2, inserted = inserted + $3,
                      updated = updated + $4, skipped = skipped + $5, failed = failed + $6,
                      updated_at = now()
WHERE id = $1
RETURNING id, status, mode, key_field, encoding, filename, requested_by, mapping, next_line,
          total, inserted, updated, skipped, failed, detail, created_at, updated_at;

-- name: import-finish-job
UPDATE import_job SET status = $2, detail = $3, updated_at = now()
WHERE id = $1 AND status IN ('queued', 'running')
RETURNING id, status, mode, key_field, encoding, filename, requested_by, mapping, next_line,
          total, inserted, updated, skipped, failed, detail, created_at, updated_at;

-- name: import-insert-errors
INSERT INTO import_error (job_id, line, field, message)
SELECT $1, * FROM unnest($2::int[], $3::text[], $4::text[]);

-- name: import-errors
SELECT line, field, message FROM import_error WHERE job_id = $1 ORDER BY line LIMIT $2;

-- name: email-identity
-- Re-checks the address identity key (migration 0007); returns the contacts still colliding.
SELECT contact_email_identity();

-- name: email-collisions
-- Contacts whose addresses differ only by case, recorded for an operator to resolve.
SELECT x.email_key, x.contact_id, x.email, x.found_at, count(*) OVER () AS total
FROM contact_email_collision x
ORDER BY x.email_key, x.contact_id
LIMIT $1;

-- name: contact-activity
-- Issue 20: one contact's delivery history (F-05's received / errored / opened / clicked),
-- one row per campaign, newest first by the first thing recorded of it, strictly after the
-- cursor ($2 time, $3 campaign) when given; $4 rows. The primary key's prefix (contact_id)
-- reads this contact's rows only (a few per campaign it was sent), so no index of its own
-- adds to the writes of every delivery result and open.
SELECT campaign_id,
       min(first_at) AS at,
       min(first_at) FILTER (WHERE kind = 'received') AS received_at,
       min(first_at) FILTER (WHERE kind = 'errored') AS errored_at,
       min(first_at) FILTER (WHERE kind = 'opened') AS opened_at,
       coalesce(sum(count) FILTER (WHERE kind = 'opened'), 0)::bigint AS opens,
       min(first_at) FILTER (WHERE kind = 'clicked') AS clicked_at,
       coalesce(sum(count) FILTER (WHERE kind = 'clicked'), 0)::bigint AS clicks,
       max(last_at) AS last_at
FROM delivery_history
WHERE contact_id = $1
GROUP BY campaign_id
HAVING $2::timestamptz IS NULL OR (min(first_at), campaign_id) < ($2::timestamptz, $3::text)
ORDER BY at DESC, campaign_id DESC
LIMIT $4;

-- name: contact-activity-totals
-- Issue 20: how many campaigns this contact received, errored, opened and clicked.
SELECT count(*) FILTER (WHERE kind = 'received') AS received,
       count(*) FILTER (WHERE kind = 'errored') AS errored,
       count(*) FILTER (WHERE kind = 'opened') AS opened,
       count(*) FILTER (WHERE kind = 'clicked') AS clicked
FROM delivery_history
WHERE contact_id = $1;
