-- One person, one address (issue 18 #8): an address's identity ignores case, as the
-- blacklist and search already do; `email` keeps what was typed, for display and sending.
-- contact_email_identity_key, a unique index on lower(email), replaces contact_email_key.
--
-- Existing rows that differ only by case are neither merged nor deleted: they are recorded
-- in contact_email_collision (GET /v1/contacts/email-collisions), the exact-case key stays,
-- and the new key is created partial, leaving those rows out, with a plain lower(email)
-- index for lookups. Once an operator has resolved them (edited or deleted one of each
-- pair), the maintenance loop calls contact_email_identity() again, which then creates the
-- full key and drops the interim indexes.

CREATE TABLE contact_email_collision (
    email_key  text NOT NULL,           -- lower(email): what the colliding rows share
    contact_id bigint NOT NULL,
    email      text NOT NULL,           -- the row's address as typed
    found_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (email_key, contact_id)
);

-- Brings the indexes in line with the data; returns how many contacts still collide
-- (0: every address is one identity). Cheap once the full key exists.
CREATE FUNCTION contact_email_identity() RETURNS integer
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    key regclass;
    recorded bigint[];
    colliding bigint[];
BEGIN
    key := to_regclass('contact_email_identity_key');
    IF key IS NOT NULL AND (SELECT indpred IS NULL FROM pg_index WHERE indexrelid = key) THEN
        RETURN 0;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('contacts.contact_email_identity'));
    key := to_regclass('contact_email_identity_key');
    IF key IS NOT NULL AND (SELECT indpred IS NULL FROM pg_index WHERE indexrelid = key) THEN
        RETURN 0;  -- another replica finished it while we waited
    END IF;
    SELECT coalesce(array_agg(contact_id ORDER BY contact_id), '{}') INTO recorded
    FROM contact_email_collision;
    WITH now_colliding AS (
        SELECT lower(c.email) AS email_key, c.id AS contact_id, c.email FROM contact c
        WHERE lower(c.email) IN (SELECT lower(email) FROM contact GROUP BY 1 HAVING count(*) > 1)
    ), resolved AS (
        DELETE FROM contact_email_collision x
        WHERE NOT EXISTS (SELECT 1 FROM now_colliding n
                          WHERE n.contact_id = x.contact_id AND n.email_key = x.email_key)
    )
    INSERT INTO contact_email_collision (email_key, contact_id, email)
    SELECT email_key, contact_id, email FROM now_colliding
    ON CONFLICT (email_key, contact_id) DO UPDATE SET email = EXCLUDED.email;
    SELECT coalesce(array_agg(x.contact_id ORDER BY x.contact_id), '{}') INTO colliding
    FROM contact_email_collision x
    WHERE EXISTS (SELECT 1 FROM contact c
                  WHERE c.id = x.contact_id AND lower(c.email) = x.email_key);
    IF colliding = '{}' THEN
        DROP INDEX IF EXISTS contact_email_identity_key;
        CREATE UNIQUE INDEX contact_email_identity_key ON contact (lower(email));
        DROP INDEX IF EXISTS contact_email_lower_idx;
        DROP INDEX IF EXISTS contact_email_key;
        RETURN 0;
    END IF;
    IF key IS NULL OR colliding IS DISTINCT FROM recorded THEN
        DROP INDEX IF EXISTS contact_email_identity_key;
        EXECUTE format('CREATE UNIQUE INDEX contact_email_identity_key ON contact (lower(email))'
                       ' WHERE id <> ALL (%L::bigint[])', colliding);
        CREATE INDEX IF NOT EXISTS contact_email_lower_idx ON contact (lower(email));
    END IF;
    RETURN cardinality(colliding);
END
$$;

SELECT contact_email_identity();
