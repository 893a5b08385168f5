-- The suppression.changes projection writes a batch of memberships at once and then
-- recomputes its contacts' flags once, in one statement (refresh_membership_flags of 0003:
-- lock the contacts in id order, then recompute them from their memberships in a new
-- statement, so a new snapshot under READ COMMITTED). Per row, the triggers of 0005 cost
-- it ~80 of its ~130 us of PostgreSQL per changed membership.
--
-- It says so with a transaction-local setting, tayori.defer_membership_flags = on
-- (set_config(..., true), as SET LOCAL), and the row triggers then queue nothing: the test
-- is in their WHEN, so no function is even called. Every other writer leaves the setting
-- unset and keeps the triggers. A writer that sets it takes on the recompute of every
-- contact whose memberships it wrote, before it commits.
DROP TRIGGER membership_flags_insert ON membership;
DROP TRIGGER membership_flags_update ON membership;
DROP TRIGGER membership_flags_delete ON membership;
CREATE TRIGGER membership_flags_insert AFTER INSERT ON membership
FOR EACH ROW WHEN (current_setting('tayori.defer_membership_flags', true) IS DISTINCT FROM 'on')
EXECUTE FUNCTION membership_flags_row_changed();
CREATE TRIGGER membership_flags_update AFTER UPDATE ON membership
FOR EACH ROW WHEN ((OLD.state IS DISTINCT FROM NEW.state
                    OR OLD.contact_id IS DISTINCT FROM NEW.contact_id)
                   AND current_setting('tayori.defer_membership_flags', true)
                       IS DISTINCT FROM 'on')
EXECUTE FUNCTION membership_flags_row_changed();
CREATE TRIGGER membership_flags_delete AFTER DELETE ON membership
FOR EACH ROW WHEN (current_setting('tayori.defer_membership_flags', true) IS DISTINCT FROM 'on')
EXECUTE FUNCTION membership_flags_row_changed();
-- membership_flags_truncate (0003) stays as it is: TRUNCATE has no rows to defer.

-- That recompute, called once per batch with the batch's contacts, is planned once: with a
-- custom plan per call (the default for an array parameter) planning cost ~0.4 ms of
-- PostgreSQL per call, more than the recompute of a few contacts. Its UPDATE now finds
-- the contacts by their ids, so the generic plan is an index scan whatever the table's
-- statistics say: 0003's join with unnest was planned as a hash join over a sequential
-- scan of every contact (seen on a freshly loaded table; at a million contacts, a scan
-- per batch).
CREATE OR REPLACE FUNCTION refresh_membership_flags(contact_ids bigint[]) RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    -- Lock first, in id order: a concurrent writer of the same contact's memberships
    -- then finishes before the recompute below, which (a new statement, so a new snapshot
    -- under READ COMMITTED) sees its rows.
    PERFORM 1 FROM contact WHERE id = ANY (contact_ids) ORDER BY id FOR NO KEY UPDATE;
    UPDATE contact c
    SET membership_flags = (SELECT coalesce(bit_or(membership_state_bits(m.state)), 0)
                            FROM membership m WHERE m.contact_id = c.id)
    WHERE c.id = ANY (contact_ids)
      AND c.membership_flags <> (SELECT coalesce(bit_or(membership_state_bits(m.state)), 0)
                                 FROM membership m WHERE m.contact_id = c.id);
END
$$;
