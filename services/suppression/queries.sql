-- Named SQL of the suppression service (loaded once by libs.common.db.Queries).

-- name: lock-memberships
-- Every membership of a contact, locked: changes of one contact are serialised.
SELECT * FROM membership WHERE contact_id = $1 ORDER BY group_id FOR UPDATE;

-- name: membership
SELECT * FROM membership WHERE contact_id = $1 AND group_id = $2;

-- name: memberships-of
SELECT * FROM membership WHERE contact_id = $1 ORDER BY group_id;

-- name: join
INSERT INTO membership (contact_id, group_id, state, method, joined_at, changed_at)
VALUES ($1, $2, $3, $4, $5, $5)
ON CONFLICT (contact_id, group_id) DO NOTHING
RETURNING *;

-- name: leave
DELETE FROM membership WHERE contact_id = $1 AND group_id = $2
RETURNING contact_id, group_id, method, nextval('change_version') AS version;

-- name: set-state
UPDATE membership
SET state = $3, method = $4, campaign_id = $5, changed_at = now(),
    version = nextval('change_version')
WHERE contact_id = $1 AND group_id = $2
RETURNING *;

-- name: reader-unsubscribe
-- The public link (F-13) in one statement, for the common case: the membership is in a state
-- a reader's unsubscribe stops ($3, from processor.reader_unsubscribe) and the sync policy
-- propagates nothing (processor.propagation: an unsubscribe propagates only with the
-- unsubscribe switch on). The change is queued in the outbox in the same statement: $6 is its
-- Avro record but for the trailing changed_at and version, appended here once taken; $9 the
-- request's traceparent.
-- was: the state before (NULL: no such membership); queued: whether this stopped it. A
-- membership still in state $3 and not stopped here (the policy propagates, or a concurrent
-- change took the row first) goes through store.change_state, which locks and decides.
-- Used by store.unsubscribe_by_link. The tail's Avro encoding in SQL (avro_long,
-- avro_timestamp_millis, migration 0002) stays beside libs/common/avrocodec on purpose: one
-- statement instead of a transaction that reads changed_at and version back costs ~0.37
-- instead of ~0.8 ms of CPU a request, for the link's p99 < 100 ms at 500/s (docs/BENCHMARKS.md,
-- kept 2026-12-04). tests/integration/test_suppression_link.py pins both functions and the
-- whole queued record byte for byte to the compiled codec.
WITH policy AS (SELECT unsubscribe FROM sync_policy WHERE id = 1),
changed AS (
    UPDATE membership
    SET state = 'unsubscribed', method = $4, campaign_id = $5, changed_at = now(),
        version = nextval('change_version')
    WHERE contact_id = $1 AND group_id = $2 AND state = ANY($3::text[])
      AND NOT (SELECT unsubscribe FROM policy)
    RETURNING changed_at, version
),
queued AS (
    INSERT INTO outbox (topic, key, payload, schema_version, traceparent)
    SELECT $7, $1::bigint::text, $6 || avro_timestamp_millis(changed_at) || avro_long(version), $8,
           $9::text
    FROM changed
    RETURNING 1
)
SELECT (SELECT state FROM membership WHERE contact_id = $1 AND group_id = $2) AS was,
       EXISTS (SELECT 1 FROM queued) AS queued;

-- name: propagate
-- F-12: the other memberships of a contact move to the stronger state, method auto_sync.
UPDATE membership
SET state = $3, method = 'auto_sync', changed_at = now(), version = nextval('change_version')
WHERE contact_id = $1 AND group_id <> $2 AND state_rank(state) < state_rank($3)
RETURNING *;

-- name: sync-policy
SELECT unsubscribe, ban, updated_at FROM sync_policy WHERE id = 1;

-- name: set-sync-policy
-- Returns the policy before and after, so the caller knows which switch was turned on.
WITH before AS (SELECT unsubscribe, ban FROM sync_policy WHERE id = 1 FOR UPDATE)
UPDATE sync_policy p
SET unsubscribe = coalesce($1, p.unsubscribe), ban = coalesce($2, p.ban), updated_at = now()
FROM before b
WHERE p.id = 1
RETURNING b.unsubscribe AS was_unsubscribe, b.ban AS was_ban, p.unsubscribe, p.ban, p.updated_at;

-- name: insert-sync-job
INSERT INTO sync_job (id, kind, status, requested_by) VALUES ($1, $2, 'queued', $3) RETURNING *;

-- name: sync-job
SELECT * FROM sync_job WHERE id = $1;

-- name: sync-job-for-update
SELECT * FROM sync_job WHERE id = $1 FOR UPDATE;

-- name: sync-jobs
SELECT * FROM sync_job ORDER BY created_at DESC LIMIT 100;

-- name: unfinished-sync-jobs
SELECT id FROM sync_job WHERE status IN ('queued', 'running') ORDER BY created_at;

-- name: sync-candidates
-- The next contacts holding a membership in the trigger state, after the checkpoint.
SELECT DISTINCT contact_id FROM membership
WHERE state = $1 AND contact_id > $2
ORDER BY contact_id LIMIT $3;

-- name: sync-apply
-- Every weaker membership of these contacts moves to the trigger state.
UPDATE membership
SET state = $2, method = 'auto_sync', changed_at = now(), version = nextval('change_version')
WHERE contact_id = ANY($1::bigint[]) AND state_rank(state) < state_rank($2)
RETURNING *;

-- name: update-sync-job
UPDATE sync_job
SET status = $2, after_contact = $3, contacts = contacts + $4, changed = changed + $5,
    detail = $6, updated_at = now()
WHERE id = $1
RETURNING *;

-- name: fail-sync-job
-- A bug ended the job (libs.common.jobrunner): failed with the error, unless it finished.
UPDATE sync_job SET status = 'failed', detail = $2, updated_at = now()
WHERE id = $1 AND status IN ('queued', 'running')
RETURNING *;

-- name: contact
SELECT * FROM contact WHERE id = $1;

-- name: upsert-contact-address
-- Projection of contacts.changelog: newer versions win.
INSERT INTO contact (id, email, changelog_version) VALUES ($1, $2, $3)
ON CONFLICT (id) DO UPDATE SET email = EXCLUDED.email, changelog_version = EXCLUDED.changelog_version,
                               updated_at = now()
WHERE contact.changelog_version < EXCLUDED.changelog_version;

-- name: forget-contact
-- A deleted contact: its memberships go (returned, to publish), its address suppressions
-- stay (they are per address).
WITH gone AS (DELETE FROM contact WHERE id = $1)
DELETE FROM membership WHERE contact_id = $1
RETURNING contact_id, group_id, method, nextval('change_version') AS version;

-- name: set-black
INSERT INTO contact (id, black, black_changed_at) VALUES ($1, $2, now())
ON CONFLICT (id) DO UPDATE SET black = EXCLUDED.black, black_changed_at = now(), updated_at = now()
WHERE contact.black IS DISTINCT FROM EXCLUDED.black
RETURNING id, email, black, black_changed_at, nextval('change_version') AS version;

-- name: set-delivery-status
INSERT INTO contact (id, delivery_status) VALUES ($1, $2)
ON CONFLICT (id) DO UPDATE SET delivery_status = EXCLUDED.delivery_status, updated_at = now();

-- name: blacklist
SELECT id, title, match, value, created_at FROM blacklist_rule ORDER BY id;

-- name: insert-blacklist-rule
INSERT INTO blacklist_rule (title, match, value) VALUES ($1, $2, $3)
ON CONFLICT (match, value) DO NOTHING
RETURNING id, title, match, value, created_at;

-- name: delete-blacklist-rule
DELETE FROM blacklist_rule WHERE id = $1 RETURNING id, title, match, value;

-- name: blacklist-match
-- The first rule matching an address: $1 the address, $2 its domain and parent domains.
SELECT id, title, match, value FROM blacklist_rule
WHERE (match = 'exact' AND value = lower($1)) OR (match = 'suffix' AND value = ANY($2::text[]))
ORDER BY id LIMIT 1;

-- name: suppress-address
INSERT INTO address_suppression (email, reason, source) VALUES (lower($1), $2, $3)
ON CONFLICT (email) DO UPDATE SET reason = EXCLUDED.reason, source = EXCLUDED.source
WHERE address_suppression.reason IS DISTINCT FROM EXCLUDED.reason
RETURNING email, reason, nextval('change_version') AS version;

-- name: address-suppression
SELECT email, reason, source, created_at FROM address_suppression WHERE email = lower($1);

-- name: clear-bounce
-- The operator's word outranks the bounce processor's last status for this address.
WITH cleared AS (
    DELETE FROM address_suppression WHERE email = lower($1) AND reason = 'bounced'
    RETURNING email
), reset AS (
    UPDATE contact SET delivery_status = NULL, updated_at = now()
    WHERE lower(email) = lower($1) AND EXISTS (SELECT 1 FROM cleared)
)
SELECT email, nextval('change_version') AS version FROM cleared;

-- name: contacts-with-address
SELECT id FROM contact WHERE lower(email) = lower($1);

-- name: lock-joins-of-contact
-- Serialises a contact's joins with early unsubscribes (store.join, store.unsubscribe_early):
-- without it a click and the join it names could each miss the other's uncommitted row.
SELECT pg_advisory_xact_lock(hashtextextended('suppression.join:' || $1::bigint::text, 0));

-- name: record-early-unsubscribe
-- A link used before its membership was applied here: kept (the latest click) until the join
-- arrives; clicks whose join never came are forgotten after 30 days.
WITH stale AS (
    DELETE FROM early_unsubscribe WHERE clicked_at < now() - interval '30 days'
)
INSERT INTO early_unsubscribe (contact_id, group_id, campaign_id) VALUES ($1, $2, $3)
ON CONFLICT (contact_id, group_id)
DO UPDATE SET campaign_id = EXCLUDED.campaign_id, clicked_at = EXCLUDED.clicked_at;

-- name: take-early-unsubscribe
DELETE FROM early_unsubscribe WHERE contact_id = $1 AND group_id = $2
RETURNING campaign_id, clicked_at;
