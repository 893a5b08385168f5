-- Search (F-05): the aggregate delivery state across a contact's memberships, kept on the
-- contact row, so "all deliverable" / "any unsubscribed" / "any banned" test a column instead
-- of probing membership twice per candidate (the cost of search (a)'s total count).
--
-- contact.membership_flags holds bits: 1 = a member of some group or plan, 2 = some
-- membership unsubscribed, 4 = some membership banned. all_deliverable is exactly 1.
--
-- Statement triggers on membership keep it, in the transaction of every write (joins,
-- leaves, the suppression.changes projection, cascades from a deleted group), whoever
-- writes: each recomputes the flags of the contacts a statement touched.
ALTER TABLE contact ADD COLUMN membership_flags smallint NOT NULL DEFAULT 0;

CREATE FUNCTION membership_state_bits(state text) RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE state WHEN 'unsubscribed' THEN 3 WHEN 'banned' THEN 5 ELSE 1 END;

CREATE FUNCTION refresh_membership_flags(contact_ids bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    -- Lock first, in id order: a concurrent writer of the same contact's memberships
    -- then finishes before the recompute below, which (a new statement, so a new snapshot
    -- under READ COMMITTED) sees its rows. NO KEY UPDATE does not conflict with the key
    -- share lock a membership insert takes on its contact.
    PERFORM 1 FROM contact WHERE id = ANY (contact_ids) ORDER BY id FOR NO KEY UPDATE;
    UPDATE contact c
    SET membership_flags = f.flags
    FROM (
        SELECT t.id, coalesce((SELECT bit_or(membership_state_bits(m.state))
                               FROM membership m WHERE m.contact_id = t.id), 0) AS flags
        FROM unnest(contact_ids) AS t (id)
    ) AS f
    WHERE c.id = f.id AND c.membership_flags <> f.flags;
END
$$;

CREATE FUNCTION membership_flags_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM refresh_membership_flags(ARRAY(SELECT DISTINCT contact_id FROM new_rows));
    ELSIF TG_OP = 'DELETE' THEN
        PERFORM refresh_membership_flags(ARRAY(SELECT DISTINCT contact_id FROM old_rows));
    ELSIF TG_OP = 'UPDATE' THEN
        PERFORM refresh_membership_flags(ARRAY(
            SELECT n.contact_id FROM new_rows n
            LEFT JOIN old_rows o ON o.contact_id = n.contact_id AND o.group_id = n.group_id
            WHERE o.state IS DISTINCT FROM n.state
            UNION
            SELECT o.contact_id FROM old_rows o
            WHERE NOT EXISTS (SELECT 1 FROM new_rows n
                              WHERE n.contact_id = o.contact_id AND n.group_id = o.group_id)));
    ELSE  -- TRUNCATE
        UPDATE contact SET membership_flags = 0 WHERE membership_flags <> 0;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER membership_flags_insert AFTER INSERT ON membership
REFERENCING NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION membership_flags_changed();
CREATE TRIGGER membership_flags_update AFTER UPDATE ON membership
REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION membership_flags_changed();
CREATE TRIGGER membership_flags_delete AFTER DELETE ON membership
REFERENCING OLD TABLE AS old_rows
FOR EACH STATEMENT EXECUTE FUNCTION membership_flags_changed();
CREATE TRIGGER membership_flags_truncate AFTER TRUNCATE ON membership
FOR EACH STATEMENT EXECUTE FUNCTION membership_flags_changed();

-- Backfill.
UPDATE contact c
SET membership_flags = f.flags
FROM (SELECT contact_id, bit_or(membership_state_bits(state)) AS flags
      FROM membership GROUP BY contact_id) AS f
WHERE c.id = f.contact_id;
